use std::error::Error as _;

use super::*;

/// A self-signed certificate for localhost written to `dir`: (cert, key).
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

#[test]
fn an_unreadable_key_is_named_and_keeps_its_cause() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, _) = self_signed(dir.path());
    let key = dir.path().join("missing-key.pem");
    match acceptor(&cert, &key) {
        Err(err @ TlsError::ReadKey { .. }) => {
            assert!(err.to_string().contains("missing-key.pem"), "{err}");
            assert!(err.source().is_some(), "the i/o cause is kept");
        }
        other => panic!("expected a key error, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn a_file_without_certificates_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_, key) = self_signed(dir.path());
    // The key file holds no CERTIFICATE block.
    match acceptor(&key, &key) {
        Err(TlsError::NoCertificate { path }) => assert_eq!(path, key),
        other => panic!("expected no certificate, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn a_key_of_another_certificate_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, _) = self_signed(dir.path());
    let other = tempfile::tempdir().unwrap();
    let (_, key) = self_signed(other.path());
    assert!(matches!(acceptor(&cert, &key), Err(TlsError::Config(_))));
    let files = GrpcTlsFiles {
        cert: Some(cert),
        key: Some(key),
        ..GrpcTlsFiles::default()
    };
    assert!(matches!(GrpcTls::load(&files), Err(TlsError::Config(_))));
}

#[test]
fn grpc_tls_follows_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());

    let plain = GrpcTls::load(&GrpcTlsFiles::default()).unwrap();
    assert!(plain.server().is_none() && !plain.client_tls());
    let endpoint = plain.endpoint("127.0.0.1:3109").unwrap();
    assert_eq!(endpoint.uri().scheme_str(), Some("http"));

    // A server certificate without a CA: the server speaks TLS, clients do not.
    let server_only = GrpcTls::load(&GrpcTlsFiles {
        cert: Some(cert.clone()),
        key: Some(key.clone()),
        ..GrpcTlsFiles::default()
    })
    .unwrap();
    assert!(server_only.server().is_some() && !server_only.client_tls());

    // A CA alone (a job): clients speak TLS to https:// endpoints.
    let client_only = GrpcTls::load(&GrpcTlsFiles {
        ca: Some(cert.clone()),
        ..GrpcTlsFiles::default()
    })
    .unwrap();
    assert!(client_only.server().is_none() && client_only.client_tls());
    let endpoint = client_only.endpoint("comet-1:3109").unwrap();
    assert_eq!(endpoint.uri().scheme_str(), Some("https"));
}

#[test]
fn incomplete_grpc_settings_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let half = GrpcTlsFiles {
        cert: Some(cert.clone()),
        ..GrpcTlsFiles::default()
    };
    assert!(matches!(
        GrpcTls::load(&half),
        Err(TlsError::Incomplete(m)) if m.contains("node.tls_key")
    ));
    let mtls_without_ca = GrpcTlsFiles {
        cert: Some(cert),
        key: Some(key),
        ca: None,
        client_auth: true,
    };
    assert!(matches!(
        GrpcTls::load(&mtls_without_ca),
        Err(TlsError::Incomplete(m)) if m.contains("node.tls_ca")
    ));
}
