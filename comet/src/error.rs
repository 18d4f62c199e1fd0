//! Why the comet could not start or run, with the cause of each failure.

use std::path::PathBuf;

use rustls_pki_types::pem;
use tokio_rustls::rustls;

/// Why the comet could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The WSS listeners could not get a TLS configuration.
    #[error("wss")]
    Tls(#[from] TlsError),
    /// The gRPC server failed.
    #[error("grpc server")]
    Grpc(#[from] tonic::transport::Error),
    /// The gRPC server ended on its own, before shutdown.
    #[error("grpc server stopped before shutdown")]
    GrpcStopped,
    /// The gRPC server's task panicked or was aborted.
    #[error("grpc server task")]
    GrpcTask(#[source] tokio::task::JoinError),
}

/// Result of starting or running the comet.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why the WSS certificate and key do not make a TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// WSS listeners were given but `comet.tls_cert` or `comet.tls_key` is unset.
    #[error("wss listeners given without tls_cert and tls_key")]
    MissingFiles,
    /// The certificate file could not be read or parsed as PEM.
    #[error("cannot read certificates from {}", path.display())]
    ReadCertificates {
        /// The `comet.tls_cert` file.
        path: PathBuf,
        /// What went wrong reading it.
        #[source]
        source: pem::Error,
    },
    /// The certificate file holds no certificate.
    #[error("no certificate in {}", path.display())]
    NoCertificate {
        /// The `comet.tls_cert` file.
        path: PathBuf,
    },
    /// The key file could not be read or holds no private key.
    #[error("cannot read a private key from {}", path.display())]
    ReadKey {
        /// The `comet.tls_key` file.
        path: PathBuf,
        /// What went wrong reading it.
        #[source]
        source: pem::Error,
    },
    /// The TLS provider offers no safe protocol version.
    #[error("the tls provider offers no safe protocol version")]
    Provider(#[source] rustls::Error),
    /// rustls refused the certificate and key.
    #[error("certificate and key do not make a TLS config")]
    Config(#[source] rustls::Error),
}
