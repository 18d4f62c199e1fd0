//! TLS for the WSS listeners: the acceptor built from `comet.tls_cert` and
//! `comet.tls_key`.

use std::path::Path;
use std::sync::Arc;

use rim_config::CometConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

use crate::error::TlsError;

/// Returns the acceptor the WSS listeners need: `None` when there are none,
/// an error when there are some but no certificate and key to serve them.
pub(crate) fn wss_acceptor(
    config: &CometConfig,
    has_wss_listeners: bool,
) -> Result<Option<TlsAcceptor>, TlsError> {
    if !has_wss_listeners {
        return Ok(None);
    }
    match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => acceptor(cert, key).map(Some),
        _ => Err(TlsError::MissingFiles),
    }
}

/// Loads the certificate chain and key into a TLS acceptor.
fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::ReadCertificates {
            path: cert.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.to_path_buf(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::ReadKey {
        path: key.to_path_buf(),
        source,
    })?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(TlsError::Provider)?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(TlsError::Config)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn wss_listeners_need_both_files_and_no_listener_needs_none() {
        let config = CometConfig::default();
        assert!(matches!(
            wss_acceptor(&config, true),
            Err(TlsError::MissingFiles)
        ));
        assert!(matches!(wss_acceptor(&config, false), Ok(None)));
    }

    #[test]
    fn an_unreadable_key_is_named_and_keeps_its_cause() {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        std::fs::write(&cert, certified.cert.pem()).unwrap();
        let key = dir.path().join("missing-key.pem");
        let config = CometConfig {
            tls_cert: Some(cert),
            tls_key: Some(key.clone()),
            ..CometConfig::default()
        };
        match wss_acceptor(&config, true) {
            Err(err @ TlsError::ReadKey { .. }) => {
                assert!(err.to_string().contains("missing-key.pem"), "{err}");
                assert!(err.source().is_some(), "the i/o cause is kept");
            }
            other => panic!("expected a key error, got {:?}", other.map(|_| ())),
        }
    }
}
