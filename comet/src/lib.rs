//! rim-comet owns the edge server: TCP, WebSocket and WSS listeners, the
//! goim connection lifecycle (auth, heartbeat, rooms, sub/unsub), sharded
//! session buckets and rooms, the per-connection write path, and the comet
//! gRPC service the job pushes through.
//!
//! It does not authenticate or track presence itself: that is logic's,
//! reached through the [`LogicApi`](rim_proto::api::LogicApi) trait (a local
//! implementation in standalone, gRPC otherwise).
//!
//! Memory per idle connection is kept small on purpose: one task, no read
//! buffer while idle (TCP), an outbound queue that holds no allocation while
//! empty, and small tungstenite buffers (WebSocket).

mod bucket;
mod comet;
mod connection;
mod detached;
mod listener;
mod metrics;
mod session;
mod stats;
mod transport;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rim_config::CometConfig;
use rim_proto::api::CometGrpc;
use rim_shutdown::Shutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use crate::comet::Comet;
#[doc(hidden)]
pub use crate::detached::{DetachedSession, NoLogic};
pub use crate::listener::WS_PATH;
pub use crate::session::TransportKind;

/// Why the comet could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The WSS certificate or key could not be loaded.
    #[error("tls: {0}")]
    Tls(String),
    /// Logic could not be reached or configured.
    #[error("logic: {0}")]
    Logic(String),
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// A socket operation failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Result of starting or running the comet.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The comet's bound listeners.
#[derive(Debug)]
pub struct Listeners {
    /// Raw TCP client listeners.
    pub tcp: Vec<TcpListener>,
    /// WebSocket client listeners.
    pub ws: Vec<TcpListener>,
    /// WebSocket-over-TLS client listeners (need `tls_cert` and `tls_key`).
    pub wss: Vec<TcpListener>,
    /// The comet gRPC service.
    pub grpc: TcpListener,
}

impl Listeners {
    /// Binds every listener the config names (WSS only when TLS is configured).
    pub async fn bind(config: &CometConfig) -> io::Result<Listeners> {
        let wss = if config.wss_enabled() {
            listener::bind_all(&config.wss_bind).await?
        } else {
            Vec::new()
        };
        Ok(Listeners {
            tcp: listener::bind_all(&config.tcp_bind).await?,
            ws: listener::bind_all(&config.ws_bind).await?,
            wss,
            grpc: listener::bind_all(&[config.grpc_bind]).await?.remove(0),
        })
    }

    fn addrs(list: &[TcpListener]) -> Vec<SocketAddr> {
        list.iter().filter_map(|l| l.local_addr().ok()).collect()
    }
}

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
        accepting_stopped: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        let inner = Arc::clone(&self.inner);
        let tls = match (&inner.config.tls_cert, &inner.config.tls_key) {
            (Some(cert), Some(key)) if !listeners.wss.is_empty() => {
                Some(listener::tls_acceptor(cert, key)?)
            }
            _ if !listeners.wss.is_empty() => {
                return Err(Error::Tls(
                    "wss listeners given without tls_cert and tls_key".into(),
                ));
            }
            _ => None,
        };
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

        let stop_accepting = CancellationToken::new();
        let drain = CancellationToken::new();
        let mut loops = Vec::new();
        let protocols = listeners
            .tcp
            .into_iter()
            .map(|l| (l, listener::Protocol::Tcp))
            .chain(
                listeners
                    .ws
                    .into_iter()
                    .map(|l| (l, listener::Protocol::Ws)),
            )
            .chain(
                listeners
                    .wss
                    .into_iter()
                    .filter_map(|l| tls.clone().map(|t| (l, listener::Protocol::Wss(t)))),
            );
        for (l, protocol) in protocols {
            loops.push(tokio::spawn(listener::accept_loop(
                Arc::clone(&inner),
                l,
                protocol,
                shutdown.clone(),
                stop_accepting.clone(),
                drain.clone(),
            )));
        }

        let reporter = tokio::spawn(report_rooms(Arc::clone(&inner), stop_accepting.clone()));

        let grpc_stop = CancellationToken::new();
        let mut grpc = {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listeners.grpc);
            let service = CometGrpc(Arc::new(self.clone())).into_service();
            let stop = grpc_stop.clone();
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await }),
            )
        };

        tokio::select! {
            () = shutdown.triggered() => {}
            ended = &mut grpc => {
                // The gRPC server ended on its own: that is fatal.
                stop_accepting.cancel();
                return Err(match ended {
                    Ok(Ok(())) => Error::Io(io::Error::other("grpc server stopped")),
                    Ok(Err(e)) => e.into(),
                    Err(e) => Error::Io(io::Error::other(e)),
                });
            }
        }
        // 1. Stop accepting.
        inner.draining.store(true, Ordering::Release);
        stop_accepting.cancel();
        for l in loops {
            let _ = l.await;
        }
        let _ = reporter.await;
        // 2. Deregister from discovery (the role's hook), so nobody sends
        //    clients or pushes here.
        accepting_stopped.await;
        // 3. Close clients spread over the drain window.
        drain.cancel();
        self.drain_clients(inner.config.drain_window).await;
        // 4. Stop the gRPC service.
        grpc_stop.cancel();
        if let Ok(Err(err)) = grpc.await {
            tracing::warn!(reason = %err, "grpc server ended with an error");
        }
        tracing::info!("comet stopped");
        Ok(())
    }

    /// Closes every client, one bucket at a time spread over `window`, so
    /// that clients do not all reconnect in the same instant.
    async fn drain_clients(&self, window: Duration) {
        let buckets = self.inner.buckets();
        let step = window / buckets.len().max(1) as u32;
        let mut closed = 0usize;
        for bucket in buckets {
            let sessions = bucket.sessions();
            if sessions.is_empty() {
                // Pacing only matters between buckets that had clients.
                continue;
            }
            for session in sessions {
                session.close(session::CloseReason::Drain);
                closed += 1;
            }
            tokio::time::sleep(step).await;
        }
        tracing::info!(closed, window = ?window, "clients drained");
    }
}

/// Reports room counts to logic periodically and keeps the cluster-wide
/// counts it answers with.
async fn report_rooms(inner: Arc<comet::Inner>, stop: CancellationToken) {
    let period = inner.config.room_report_interval;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let room_count = inner
            .room_counts()
            .into_iter()
            .map(|(room, n)| (room, i32::try_from(n).unwrap_or(i32::MAX)))
            .collect();
        let req = rim_proto::pb::logic::v1::RenewOnlineRequest {
            server: inner.id.clone(),
            room_count,
        };
        match tokio::time::timeout(period, inner.logic.renew_online(req)).await {
            Ok(Ok(reply)) => inner.set_online(reply.all_room_count),
            Ok(Err(err)) => tracing::warn!(reason = %err, "room counts not reported to logic"),
            Err(_) => tracing::warn!("logic did not answer renew_online in time"),
        }
    }
}
