//! `rim logic`: the logic gRPC service and the HTTP API in one process.

use std::sync::Arc;
use std::time::Duration;

use rim_config::{DiscoveryBackend, LogicRoleConfig};
use rim_logic::comets::Comets;
use rim_logic::webhook::HttpClient;
use rim_logic::{Logic, grpc};
use rim_shutdown::Shutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{Api, serve};

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

/// Runs `rim logic` until `shutdown` triggers.
pub async fn run(
    config: LogicRoleConfig,
    listeners: Listeners,
    shutdown: Shutdown,
) -> Result<(), RunError> {
    let comets = match config.discovery.backend {
        DiscoveryBackend::Static => Comets::from_static(&config.discovery.comets)
            .map_err(|e| RunError::Discovery(e.to_string()))?,
        DiscoveryBackend::Zookeeper => {
            return Err(RunError::Discovery(
                "zookeeper discovery is not built yet (issue #5); set discovery.backend = \"static\" \
                 and list the comets in [[discovery.comets]]"
                    .into(),
            ));
        }
    };
    let router = rim_router::connect(&config.router).await?;
    let producer = rim_queue::kafka_producer(&config.queue)?;
    let http = HttpClient::new().map_err(|e| RunError::Http(e.to_string()))?;
    let logic = Arc::new(Logic::new(&config.logic, router, Arc::new(comets), http));

    let stop = CancellationToken::new();
    let refresher = Arc::clone(logic.comets()).refresh_every(LOAD_REFRESH, stop.clone());
    let grpc_task = tokio::spawn(grpc::serve(
        Arc::clone(&logic),
        listeners.grpc,
        stop.clone(),
    ));
    let http_task = tokio::spawn(serve(
        Api::new(&config.api, logic, producer),
        listeners.http,
        stop.clone(),
    ));

    shutdown.triggered().await;
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
