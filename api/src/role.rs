//! `rim logic`: the logic gRPC service and the HTTP API in one process.

use std::sync::Arc;
use std::time::Duration;

use rim_config::LogicRoleConfig;
use rim_discovery::{Addrs, Kind, NodeInfo};
use rim_logic::comets::{CometNode, Comets};
use rim_logic::webhook::HttpClient;
use rim_logic::{Logic, grpc};
use rim_shutdown::Shutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{Api, serve_with_metrics};

/// How often comets are asked for their load (node selection, online totals).
pub const LOAD_REFRESH: Duration = Duration::from_secs(10);

/// The logic process's bound listeners.
#[derive(Debug)]
pub struct Listeners {
    /// The logic gRPC service (comets call it).
    pub grpc: TcpListener,
    /// The HTTP API.
    pub http: TcpListener,
}

impl Listeners {
    /// Binds the addresses the config names.
    pub async fn bind(config: &LogicRoleConfig) -> std::io::Result<Listeners> {
        let bind = |addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot bind {addr}: {e}")))
        };
        Ok(Listeners {
            grpc: bind(config.logic.grpc_bind).await?,
            http: bind(config.api.http_bind).await?,
        })
    }
}

/// Why the logic process could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The router backend could not be reached.
    #[error("router: {0}")]
    Router(#[from] rim_router::Error),
    /// The queue could not be set up.
    #[error("queue: {0}")]
    Queue(#[from] rim_queue::Error),
    /// Discovery is not usable.
    #[error("discovery: {0}")]
    Discovery(String),
    /// The webhook HTTP client could not be built.
    #[error("http client: {0}")]
    Http(String),
    /// A server failed.
    #[error("{0}")]
    Serve(String),
}

/// The comet directory's view of discovered comets (their load comes with
/// them; Stats refreshes it between registrations).
fn comet_nodes(nodes: &[NodeInfo]) -> Vec<CometNode> {
    nodes
        .iter()
        .map(|n| CometNode {
            id: n.id.clone(),
            region: n.region.clone(),
            weight: n.weight,
            tcp: n.addrs.tcp.clone(),
            ws: n.addrs.ws.clone(),
            wss: n.addrs.wss.clone(),
            grpc: n.addrs.grpc.clone(),
            conn_count: n.conn_count,
            ip_count: n.ip_count,
        })
        .collect()
}

/// Runs `rim logic` until `shutdown` triggers.
pub async fn run(
    config: LogicRoleConfig,
    listeners: Listeners,
    shutdown: Shutdown,
) -> Result<(), RunError> {
    let discovery = rim_discovery::connect(&config.discovery)
        .await
        .map_err(|e| RunError::Discovery(e.to_string()))?;
    let mut watched = discovery
        .watch(Kind::Comet)
        .await
        .map_err(|e| RunError::Discovery(e.to_string()))?;
    let comets = Comets::new();
    comets
        .replace(comet_nodes(&watched.borrow_and_update()))
        .map_err(|e| RunError::Discovery(e.to_string()))?;
    let grpc_addr = listeners
        .grpc
        .local_addr()
        .map(rim_discovery::advertise)
        .unwrap_or_default();
    let registration = discovery
        .register(
            Kind::Logic,
            NodeInfo {
                id: config.node.id.clone(),
                region: config.node.region.clone(),
                zone: config.node.zone.clone(),
                addrs: Addrs {
                    grpc: grpc_addr,
                    ..Addrs::default()
                },
                weight: config.node.weight,
                ..NodeInfo::default()
            },
        )
        .await
        .map_err(|e| RunError::Discovery(format!("cannot register: {e}")))?;
    let router = rim_router::connect(&config.router).await?;
    let producer = rim_queue::kafka_producer(&config.queue)?;
    let http = HttpClient::new().map_err(|e| RunError::Http(e.to_string()))?;
    let logic = Arc::new(Logic::new(&config.logic, router, Arc::new(comets), http));
    // Follow the comets discovery reports (node selection, admin, online totals).
    let follow = {
        let logic = Arc::clone(&logic);
        tokio::spawn(async move {
            while watched.changed().await.is_ok() {
                let nodes = comet_nodes(&watched.borrow_and_update());
                if let Err(err) = logic.comets().replace(nodes) {
                    tracing::warn!(reason = %err, "comet directory not updated");
                }
            }
        })
    };

    let stop = CancellationToken::new();
    let refresher = Arc::clone(logic.comets()).refresh_every(LOAD_REFRESH, stop.clone());
    let grpc_task = tokio::spawn(grpc::serve(
        Arc::clone(&logic),
        listeners.grpc,
        stop.clone(),
    ));
    let api = Api::new(&config.api, Arc::clone(&logic), producer);
    let mut registry = crate::metrics_registry("logic");
    logic.register_metrics(&mut registry);
    api.register_metrics(&mut registry);
    let http_task = tokio::spawn(serve_with_metrics(
        api,
        Arc::new(registry),
        listeners.http,
        stop.clone(),
    ));

    shutdown.triggered().await;
    if let Err(err) = registration.deregister().await {
        tracing::warn!(reason = %err, "deregistration failed; the node expires with the session");
    }
    follow.abort();
    stop.cancel();
    let _ = refresher.await;
    let grpc_result = grpc_task.await;
    let http_result = http_task.await;
    tracing::info!("logic stopped");
    match (grpc_result, http_result) {
        (Ok(Ok(())), Ok(Ok(()))) => Ok(()),
        (Ok(Err(e)), _) => Err(RunError::Serve(format!("grpc: {e}"))),
        (_, Ok(Err(e))) => Err(RunError::Serve(format!("http: {e}"))),
        (Err(e), _) | (_, Err(e)) => Err(RunError::Serve(e.to_string())),
    }
}
