//! The logic gRPC server (port 3119).

use std::sync::Arc;

use rim_proto::api::LogicGrpc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Logic;

/// Serves the logic service on `listener` until `stop` is cancelled,
/// refusing calls without `token` (the cluster's `node.grpc_token`) as
/// `Unauthenticated`; `None` = no check.
pub async fn serve(
    logic: Arc<Logic>,
    token: Option<&str>,
    listener: TcpListener,
    stop: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    tracing::info!(addr = ?listener.local_addr().ok(), "logic grpc serving");
    tonic::transport::Server::builder()
        .add_service(LogicGrpc(logic).into_guarded_service(token))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async move {
                stop.cancelled().await;
            },
        )
        .await
}
