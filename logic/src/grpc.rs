//! The logic gRPC server (port 3119).

use std::sync::Arc;

use rim_proto::api::LogicGrpc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::ServerTlsConfig;

use crate::Logic;

/// Serves the logic service on `listener` until `stop` is cancelled,
/// refusing calls without `token` (the cluster's `node.grpc_token`) as
/// `Unauthenticated`; `None` = no check. With `tls` (from `node.tls_*`,
/// see `rim_tls::GrpcTls::server`) it speaks only TLS, and with
/// `node.tls_client_auth` only to clients whose certificate the CA signed.
pub async fn serve(
    logic: Arc<Logic>,
    token: Option<&str>,
    tls: Option<ServerTlsConfig>,
    listener: TcpListener,
    stop: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    tracing::info!(addr = ?listener.local_addr().ok(), tls = tls.is_some(), "logic grpc serving");
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    builder
        .add_service(LogicGrpc(logic).into_guarded_service(token))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async move {
                stop.cancelled().await;
            },
        )
        .await
}
