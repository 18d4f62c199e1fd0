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
pub fn bind_metrics(addr: Option<SocketAddr>, backlog: u32) -> anyhow::Result<Option<TcpListener>> {
    match addr {
        None => Ok(None),
        Some(addr) => rim_comet::listen(addr, backlog)
            .map(Some)
            .context("metrics.bind"),
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

/// Descriptors kept for everything but client connections — the HTTP API,
/// gRPC servers and clients, Redis, Kafka, logs, metrics — at most a quarter
/// of a small limit.
const FD_RESERVE: u64 = 1024;

/// Returns how many client connections fit under an open-file limit of
/// `fd_limit` once the reserve is kept: `max`, or less.
fn connection_cap(max: usize, fd_limit: u64) -> usize {
    let reserve = FD_RESERVE.min(fd_limit / 4);
    let room = usize::try_from(fd_limit.saturating_sub(reserve)).unwrap_or(usize::MAX);
    max.min(room.max(1))
}

/// Lowers `comet.max_connections` to what the process's open-file limit
/// allows, so that clients can never take the descriptors the API, gRPC and
/// the stores need (at the limit, accepts fail and `/healthz` stops
/// answering); says so in one log line when it does.
pub fn clamp_connections(comet: &mut rim_config::CometConfig) {
    let fd_limit = match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok((soft, _hard)) => soft,
        Err(err) => {
            tracing::warn!(reason = %err, "cannot read the open-file limit; comet.max_connections not checked");
            return;
        }
    };
    let cap = connection_cap(comet.max_connections, fd_limit);
    if cap < comet.max_connections {
        tracing::warn!(
            configured = comet.max_connections,
            using = cap,
            open_file_limit = fd_limit,
            "comet.max_connections is more than the open-file limit allows; lowered, keeping descriptors for the API, gRPC and stores (raise the limit, e.g. LimitNOFILE, to allow more)"
        );
        comet.max_connections = cap;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_leave_descriptors_for_the_rest_of_the_process() {
        // The limit seen here: 20,000 open files, 1,000,000 configured.
        assert_eq!(connection_cap(1_000_000, 20_000), 20_000 - 1024);
        assert_eq!(connection_cap(5_000, 20_000), 5_000, "fits: unchanged");
        // A small limit keeps a quarter.
        assert_eq!(connection_cap(1_000_000, 1_024), 768);
        assert_eq!(connection_cap(10, 0), 1);
    }
}
