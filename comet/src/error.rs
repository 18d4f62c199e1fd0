//! Why the comet could not start or run, with the cause of each failure.

pub use rim_tls::TlsError;

/// Why the comet could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The WSS listeners could not get a TLS configuration.
    #[error("wss")]
    Tls(#[source] TlsError),
    /// WSS listeners were given but `comet.tls_cert` or `comet.tls_key` is unset.
    #[error("wss listeners given without comet.tls_cert and comet.tls_key")]
    WssWithoutFiles,
    /// The gRPC server could not get its TLS configuration (`node.tls_*`).
    #[error("grpc tls")]
    GrpcTls(#[source] TlsError),
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
