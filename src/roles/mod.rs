//! The only place roles are wired: each module builds its role's components
//! from config (router, queue, discovery, metrics) and hands them to the
//! library crates, which export services and constructors, never "run the
//! process" functions. `standalone` composes the same builders in one
//! process with the local implementations of the boundaries.
//!
//! | subcommand | module | builds |
//! |---|---|---|
//! | `rim comet` | [`comet`] | discovery registration, a balanced logic client, the comet, metrics |
//! | `rim logic` | [`logic`] | router, queue producer, comet directory from discovery, logic gRPC, the HTTP API |
//! | `rim job` | [`job`] | the Kafka consumer, the region's comets from discovery, the job, metrics |
//! | `rim standalone` | [`standalone`] | all of the above in one process, in-memory router and queue |
//!
//! [`balanced_channel`] is the gRPC channel that follows discovery (the
//! comet's balanced client of the logics).

pub mod balanced_channel;
pub mod comet;
pub mod job;
pub mod logic;
pub mod standalone;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Binds `metrics.bind`; `None` when metrics are disabled.
pub async fn bind_metrics(addr: Option<SocketAddr>) -> anyhow::Result<Option<TcpListener>> {
    match addr {
        None => Ok(None),
        Some(addr) => TcpListener::bind(addr)
            .await
            .map(Some)
            .with_context(|| format!("cannot bind metrics.bind {addr}")),
    }
}

/// Returns a metrics registry holding what every role exposes
/// (`rim_build_info` for `role`, `rim_process_*`); each role's components
/// then register their own metrics in it.
pub fn metrics_registry(role: &'static str) -> rim_metrics::Registry {
    let mut registry = rim_metrics::Registry::default();
    rim_metrics::register_common(&mut registry, role);
    registry
}

/// The advertised address of a listener (empty when there is none): a
/// wildcard bind is advertised with the host name.
pub fn advertised(listener: Option<&TcpListener>) -> String {
    listener
        .and_then(|l| l.local_addr().ok())
        .map(rim_discovery::advertise)
        .unwrap_or_default()
}

/// `GET /metrics` on its own listener, stopped after the role drained.
pub struct MetricsServer {
    task: JoinHandle<std::io::Result<()>>,
    stop: CancellationToken,
}

impl MetricsServer {
    /// Serves `registry` on `listener` until [`MetricsServer::stop`].
    pub fn spawn(
        listener: TcpListener,
        registry: impl Into<Arc<rim_metrics::Registry>>,
    ) -> MetricsServer {
        let stop = CancellationToken::new();
        let task = tokio::spawn(rim_metrics::serve(listener, registry.into(), stop.clone()));
        MetricsServer { task, stop }
    }

    /// Stops serving and waits for the server to end.
    pub async fn stop(self) {
        self.stop.cancel();
        if let Ok(Err(err)) = self.task.await {
            tracing::warn!(reason = %err, "metrics server ended with an error");
        }
    }
}
