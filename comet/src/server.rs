//! The comet's life as a server: start accepting clients and serving gRPC,
//! then, on shutdown, the fixed drain order — stop accepting → the role's
//! hook (deregister from discovery) → close clients spread over the drain
//! window → stop gRPC.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rim_proto::api::CometGrpc;
use rim_shutdown::Shutdown;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::comet::{Comet, Inner};
use crate::listener::{Accepting, Listeners};
use crate::room_report::report_rooms;
use crate::session::CloseReason;
use crate::{Error, Result, tls};

impl Comet {
    /// Serves clients and the gRPC service until `shutdown` triggers, then
    /// drains: stop accepting, close clients spread over the drain window,
    /// stop the gRPC service.
    pub async fn run(self, listeners: Listeners, shutdown: Shutdown) -> Result<()> {
        self.serve(listeners, shutdown, async {}).await
    }

    /// Like [`Comet::run`], and awaits `accepting_stopped` between "stop
    /// accepting" and "drain clients" — where a role deregisters from
    /// discovery, so nobody sends clients or pushes here while it drains.
    pub async fn serve(
        self,
        listeners: Listeners,
        shutdown: Shutdown,
        accepting_stopped: impl Future<Output = ()>,
    ) -> Result<()> {
        let inner = Arc::clone(&self.inner);
        let tls = tls::wss_acceptor(&inner.config, !listeners.wss.is_empty())?;
        let grpc_tls = tls::grpc_server(&inner.grpc_tls)?;
        tracing::info!(
            id = %inner.id,
            region = %inner.region,
            tcp = ?Listeners::addrs(&listeners.tcp),
            ws = ?Listeners::addrs(&listeners.ws),
            wss = ?Listeners::addrs(&listeners.wss),
            grpc = ?listeners.grpc.local_addr().ok(),
            buckets = inner.buckets().len(),
            "comet starting"
        );
        let Listeners { tcp, ws, wss, grpc } = listeners;
        let accepting = Accepting::start(&inner, [tcp, ws, wss], tls, &shutdown);
        let reporter = tokio::spawn(report_rooms(Arc::clone(&inner), accepting.stopped_token()));
        let mut grpc = GrpcServer::spawn(self.clone(), grpc, grpc_tls)?;

        tokio::select! {
            () = shutdown.triggered() => {}
            ended = &mut grpc.task => {
                // The gRPC server ended on its own: that is fatal.
                accepting.stop().await;
                return Err(match ended {
                    Ok(Ok(())) => Error::GrpcStopped,
                    Ok(Err(e)) => e.into(),
                    Err(e) => Error::GrpcTask(e),
                });
            }
        }
        // 1. Stop accepting.
        inner.draining.store(true, Ordering::Release);
        let drain = accepting.stop().await;
        let _ = reporter.await;
        // 2. Deregister from discovery (the role's hook), so nobody sends
        //    clients or pushes here.
        accepting_stopped.await;
        // 3. Close clients spread over the drain window.
        drain.cancel();
        drain_clients(&inner, inner.config.drain_window).await;
        // 4. Stop the gRPC service.
        grpc.stop().await;
        tracing::info!("comet stopped");
        Ok(())
    }
}

/// Closes every client, one bucket at a time spread over `window`, so that
/// clients do not all reconnect in the same instant.
async fn drain_clients(inner: &Inner, window: Duration) {
    let buckets = inner.buckets();
    let step = window / buckets.len().max(1) as u32;
    let mut closed = 0usize;
    for bucket in buckets {
        let sessions = bucket.sessions();
        if sessions.is_empty() {
            // Pacing only matters between buckets that had clients.
            continue;
        }
        for session in sessions {
            session.close(CloseReason::Drain);
            closed += 1;
        }
        tokio::time::sleep(step).await;
    }
    tracing::info!(closed, window = ?window, "clients drained");
}

/// The comet gRPC service the job pushes through, stopped last.
struct GrpcServer {
    task: JoinHandle<Result<(), tonic::transport::Error>>,
    stop: CancellationToken,
}

impl GrpcServer {
    /// Serves `comet` on `listener` until [`GrpcServer::stop`], with TLS
    /// when `tls` is given (`node.tls_cert`, and `node.tls_client_auth`).
    fn spawn(
        comet: Comet,
        listener: TcpListener,
        tls: Option<tonic::transport::ServerTlsConfig>,
    ) -> Result<GrpcServer> {
        let stop = CancellationToken::new();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        // Calls without node.grpc_token (when set) are refused as Unauthenticated.
        let token = comet.inner.grpc_token.clone();
        let service = CometGrpc(Arc::new(comet)).into_guarded_service(token.as_deref());
        let stopped = stop.clone();
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = builder.tls_config(tls)?;
        }
        let task = tokio::spawn(
            builder
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async move { stopped.cancelled().await }),
        );
        Ok(GrpcServer { task, stop })
    }

    /// Stops serving and waits for the server to end.
    async fn stop(self) {
        self.stop.cancel();
        if let Ok(Err(err)) = self.task.await {
            tracing::warn!(reason = %err, "grpc server ended with an error");
        }
    }
}
