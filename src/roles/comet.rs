//! `rim comet`: an edge server that registers in discovery, reaches the
//! logics it finds there over gRPC (balanced, following discovery), and
//! serves `GET /metrics` on its own listener.

use std::sync::Arc;
use std::time::Duration;

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
pub fn bind(config: &CometRoleConfig) -> anyhow::Result<(Listeners, Option<TcpListener>)> {
    let backlog = config.node.listen_backlog;
    let listeners = Listeners::bind(&config.comet, backlog)?;
    let metrics = super::bind_metrics(config.metrics.bind_addr(), backlog)?;
    Ok((listeners, metrics))
}

/// Why `rim comet` could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Discovery could not be reached.
    #[error("discovery: cannot connect")]
    Connect(#[source] rim_discovery::Error),
    /// Discovery could not report the logics.
    #[error("discovery: cannot watch the logics")]
    WatchLogics(#[source] rim_discovery::Error),
    /// The comet could not register in discovery.
    #[error("discovery: cannot register")]
    Register(#[source] rim_discovery::Error),
    /// The `node.tls_*` files do not make gRPC TLS settings.
    #[error("node.tls")]
    GrpcTls(#[source] rim_tls::TlsError),
    /// `node.grpc_token` cannot be sent in gRPC metadata.
    #[error("node.grpc_token")]
    GrpcToken(#[source] rim_proto::api::RpcError),
    /// The comet failed.
    #[error("comet")]
    Comet(#[from] rim_comet::Error),
}

/// Runs `rim comet` until `shutdown` triggers.
pub async fn run(
    mut config: CometRoleConfig,
    listeners: Listeners,
    metrics: Option<TcpListener>,
    shutdown: Shutdown,
) -> Result<(), Error> {
    super::clamp_connections(&mut config.comet);
    // Certificates are read before anything connects: a bad file stops the role at once.
    let grpc_tls =
        rim_tls::GrpcTls::load(&rim_tls::GrpcTlsFiles::of(&config.node)).map_err(Error::GrpcTls)?;
    let discovery = rim_discovery::connect(&config.discovery)
        .await
        .map_err(Error::Connect)?;
    let logics = discovery
        .watch(Kind::Logic)
        .await
        .map_err(Error::WatchLogics)?;
    let logic = RemoteLogic::new(super::balanced_channel::follow(logics, grpc_tls))
        .with_token(config.node.grpc_token.as_deref())
        .map_err(Error::GrpcToken)?;
    // Advertised to web clients through discovery (the comet config moves below).
    let domain = config.comet.public_domain.clone();
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
        domain,
        weight: config.node.weight,
        ..NodeInfo::default()
    };
    let registration = discovery
        .register(Kind::Comet, info.clone())
        .await
        .map_err(Error::Register)?;
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
    Ok(result?)
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
