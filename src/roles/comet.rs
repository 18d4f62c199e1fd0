//! `rim comet`: an edge server that registers in discovery, reaches the
//! logics it finds there over gRPC (balanced, following discovery), and
//! serves `GET /metrics` on its own listener.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rim_comet::{Comet, Listeners};
use rim_config::CometRoleConfig;
use rim_discovery::{Addrs, Kind, NodeInfo, Registration};
use rim_proto::api::{CometApi, RemoteLogic};
use rim_shutdown::Shutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{MetricsServer, advertised};

/// How often the comet's registration is refreshed with its load.
const REGISTRATION_REFRESH: Duration = Duration::from_secs(10);

/// Binds the comet's listeners and its metrics listener.
pub async fn bind(config: &CometRoleConfig) -> anyhow::Result<(Listeners, Option<TcpListener>)> {
    let listeners = Listeners::bind(&config.comet).await?;
    let metrics = super::bind_metrics(config.metrics.bind_addr()).await?;
    Ok((listeners, metrics))
}

/// Runs `rim comet` until `shutdown` triggers.
pub async fn run(
    config: CometRoleConfig,
    listeners: Listeners,
    metrics: Option<TcpListener>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let discovery = rim_discovery::connect(&config.discovery)
        .await
        .context("discovery")?;
    let logics = discovery
        .watch(Kind::Logic)
        .await
        .context("discovery: cannot watch the logics")?;
    let logic = RemoteLogic::new(balanced_logics(logics));
    let comet = Comet::new(&config.node, config.comet, Arc::new(logic));
    let metrics = metrics.map(|listener| {
        let mut registry = super::metrics_registry("comet");
        comet.register_metrics(&mut registry);
        MetricsServer::spawn(listener, registry)
    });
    let info = NodeInfo {
        id: config.node.id.clone(),
        region: config.node.region.clone(),
        zone: config.node.zone.clone(),
        addrs: Addrs {
            tcp: advertised(listeners.tcp.first()),
            ws: advertised(listeners.ws.first()),
            wss: advertised(listeners.wss.first()),
            grpc: advertised(Some(&listeners.grpc)),
        },
        weight: config.node.weight,
        ..NodeInfo::default()
    };
    let registration = discovery
        .register(Kind::Comet, info.clone())
        .await
        .context("discovery: cannot register")?;
    let registration = Arc::new(registration);
    let stop_refreshing = CancellationToken::new();
    let refresher = tokio::spawn(refresh_registration(
        comet.clone(),
        Arc::clone(&registration),
        info,
        stop_refreshing.clone(),
    ));
    // Runs once the comet stopped accepting, before it drains its clients.
    let deregister = async move {
        stop_refreshing.cancel();
        let _ = refresher.await;
        match Arc::try_unwrap(registration) {
            Ok(registration) => {
                if let Err(err) = registration.deregister().await {
                    tracing::warn!(reason = %err, "deregistration failed; the node expires with the session");
                }
            }
            Err(_) => tracing::warn!("registration still shared; it expires with the session"),
        }
    };
    let result = comet.serve(listeners, shutdown, deregister).await;
    drop(discovery);
    // Metrics are served until the clients are drained.
    if let Some(metrics) = metrics {
        metrics.stop().await;
    }
    result.context("comet")
}

/// Refreshes the registration with the comet's load until `stop`.
async fn refresh_registration(
    comet: Comet,
    registration: Arc<Registration>,
    mut info: NodeInfo,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(REGISTRATION_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Ok(stats) = comet.stats().await {
            info.conn_count = stats.tcp_connections + stats.ws_connections;
            info.ip_count = stats.ip_count;
        }
        if let Err(err) = registration.update(info.clone()).await {
            tracing::warn!(reason = %err, "registration refresh failed");
        }
    }
}

/// A gRPC channel balanced over the logics discovery reports, following it.
fn balanced_logics(
    mut logics: tokio::sync::watch::Receiver<Vec<NodeInfo>>,
) -> tonic::transport::Channel {
    use std::collections::HashSet;
    use tonic::transport::channel::Change;
    let (channel, changes) = tonic::transport::Channel::balance_channel::<String>(64);
    tokio::spawn(async move {
        let mut current: HashSet<String> = HashSet::new();
        loop {
            let wanted: HashSet<String> = logics
                .borrow_and_update()
                .iter()
                .map(|n| n.addrs.grpc.clone())
                .filter(|a| !a.is_empty())
                .collect();
            for gone in current.difference(&wanted) {
                let _ = changes.send(Change::Remove(gone.clone())).await;
            }
            for new in wanted.difference(&current) {
                match tonic::transport::Endpoint::from_shared(format!("http://{new}")) {
                    Ok(endpoint) => {
                        let endpoint = endpoint
                            .connect_timeout(Duration::from_secs(3))
                            .timeout(Duration::from_secs(10));
                        let _ = changes.send(Change::Insert(new.clone(), endpoint)).await;
                    }
                    Err(err) => {
                        tracing::warn!(addr = %new, reason = %err, "bad logic address in discovery")
                    }
                }
            }
            if wanted != current {
                tracing::info!(logics = ?wanted, "logics changed");
            }
            current = wanted;
            if logics.changed().await.is_err() {
                return;
            }
        }
    });
    channel
}
