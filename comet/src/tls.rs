//! TLS of the comet's listeners: the WSS acceptor built from
//! `comet.tls_cert` and `comet.tls_key`, and the gRPC service's settings
//! from `node.tls_*` (both read by `rim_tls`).

use rim_config::CometConfig;
use rim_tls::{GrpcTls, GrpcTlsFiles};
use tokio_rustls::TlsAcceptor;

use crate::error::Error;

/// Returns the acceptor the WSS listeners need: `None` when there are none,
/// an error when there are some but no certificate and key to serve them.
pub(crate) fn wss_acceptor(
    config: &CometConfig,
    has_wss_listeners: bool,
) -> Result<Option<TlsAcceptor>, Error> {
    if !has_wss_listeners {
        return Ok(None);
    }
    match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => rim_tls::acceptor(cert, key).map(Some).map_err(Error::Tls),
        _ => Err(Error::WssWithoutFiles),
    }
}

/// Returns what the gRPC service serves with: `None` = plaintext.
pub(crate) fn grpc_server(
    files: &GrpcTlsFiles,
) -> Result<Option<tonic::transport::ServerTlsConfig>, Error> {
    Ok(GrpcTls::load(files).map_err(Error::GrpcTls)?.server())
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
            Err(Error::WssWithoutFiles)
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
            Err(Error::Tls(err @ rim_tls::TlsError::ReadKey { .. })) => {
                assert!(err.to_string().contains("missing-key.pem"), "{err}");
                assert!(err.source().is_some(), "the i/o cause is kept");
            }
            other => panic!("expected a key error, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn grpc_serves_plaintext_without_node_tls_files() {
        assert!(matches!(grpc_server(&GrpcTlsFiles::default()), Ok(None)));
    }
}
