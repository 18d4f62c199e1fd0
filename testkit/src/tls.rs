//! Certificates for TLS tests, generated in the test: a private CA and the
//! node certificates it signs (for `127.0.0.1` and `localhost`, good for a
//! server and a client alike), written as PEM files into a directory that
//! lives as long as the CA.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A certificate and its key, as PEM files.
#[derive(Clone, Debug)]
pub struct CertFiles {
    /// The certificate (`node.tls_cert`, `api.tls_cert`).
    pub cert: PathBuf,
    /// Its private key (`node.tls_key`, `api.tls_key`).
    pub key: PathBuf,
}

/// A private certificate authority for one test.
pub struct TestCa {
    dir: tempfile::TempDir,
    issuer: CertifiedIssuer<'static, KeyPair>,
    ca: PathBuf,
    issued: AtomicU32,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").field("ca", &self.ca).finish()
    }
}

impl TestCa {
    /// Creates a CA named `name` and writes its certificate to `ca.pem`.
    pub fn new(name: &str) -> TestCa {
        let dir = tempfile::tempdir().expect("temporary directory for certificates");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("ca key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("ca certificate");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, issuer.pem()).expect("write ca.pem");
        TestCa {
            dir,
            issuer,
            ca,
            issued: AtomicU32::new(0),
        }
    }

    /// The CA certificate (`node.tls_ca`).
    pub fn ca(&self) -> PathBuf {
        self.ca.clone()
    }

    /// A TLS client (no certificate of its own) trusting only this CA.
    pub fn client(&self) -> tokio_rustls::TlsConnector {
        use tokio_rustls::rustls::pki_types::CertificateDer;
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&self.ca).expect("read ca.pem") {
            roots
                .add(cert.expect("a CA certificate"))
                .expect("trust the CA");
        }
        let config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    /// Issues a certificate for `127.0.0.1` and `localhost`, usable by a
    /// server and by a client, and writes it with its key.
    pub fn issue(&self, name: &str) -> CertFiles {
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .expect("node params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().expect("node key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("node certificate");
        let n = self.issued.fetch_add(1, Ordering::Relaxed);
        let files = CertFiles {
            cert: self.dir.path().join(format!("{n}-{name}.pem")),
            key: self.dir.path().join(format!("{n}-{name}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write certificate");
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
        files
    }
}

/// Reads what a server sends until it closes the stream (or fails), within
/// `bound`; panics when the server neither answers nor closes in time.
pub async fn read_to_close(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    bound: Duration,
) -> String {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(bound, stream.read_to_end(&mut answer))
        .await
        .expect("the server answers or closes in time");
    String::from_utf8_lossy(&answer).into_owned()
}
