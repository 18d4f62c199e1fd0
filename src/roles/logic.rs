//! `rim logic`: the logic gRPC service and the HTTP API in one process.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rim_api::{Api, serve_with_metrics};
use rim_config::{ImConfig, ImStore, LogicConfig, LogicRoleConfig, NodeConfig, RouterConfig};
use rim_discovery::{Addrs, Kind, NodeInfo};
use rim_im::{
    IdGenerator, MessageStore, PostgresOptions, PostgresStore, ShardMap, ShardedStore,
    SqliteOptions, SqliteStore, Synchronous,
};
use rim_logic::{CometNode, Comets, HttpClient, Im, Logic, LogicFacade};
use rim_queue::Producer;
use rim_shutdown::Shutdown;
use rim_tls::{GrpcTls, GrpcTlsFiles};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

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
    pub fn bind(config: &LogicRoleConfig) -> std::io::Result<Listeners> {
        let backlog = config.node.listen_backlog;
        Ok(Listeners {
            grpc: rim_comet::listen(config.logic.grpc_bind, backlog)?,
            http: rim_comet::listen(config.api.http_bind, backlog)?,
        })
    }
}

/// The comet directory's view of discovered comets (their load comes with
/// them; Stats refreshes it between registrations).
fn comet_nodes(nodes: &[NodeInfo]) -> Vec<CometNode> {
    nodes.iter().map(CometNode::from).collect()
}

/// Runs `rim logic` until `shutdown` triggers.
pub async fn run(
    config: LogicRoleConfig,
    listeners: Listeners,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    // Certificates are read before anything connects: a bad file stops the role at once.
    let grpc_tls = GrpcTls::load(&GrpcTlsFiles::of(&config.node)).context("node.tls")?;
    let http_tls = rim_api::tls_acceptor(&config.api).context("api.tls_cert")?;
    let discovery = rim_discovery::connect(&config.discovery)
        .await
        .context("discovery")?;
    let mut watched = discovery
        .watch(Kind::Comet)
        .await
        .context("discovery: cannot watch the comets")?;
    let comets = Arc::new(
        Comets::with_grpc_token(config.node.grpc_token.clone()).with_grpc_tls(grpc_tls.clone()),
    );
    comets
        .replace(comet_nodes(&watched.borrow_and_update()))
        .context("discovery")?;
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
        .context("discovery: cannot register")?;
    let producer = rim_queue::kafka_producer(&config.queue).context("queue")?;
    let logic = build_logic(
        &config.logic,
        &config.router,
        (&config.im, &config.node),
        Arc::clone(&producer),
        Arc::clone(&comets),
    )
    .await?;
    // Follow the comets discovery reports (node selection, admin, online totals).
    let follow = {
        let comets = Arc::clone(&comets);
        tokio::spawn(async move {
            while watched.changed().await.is_ok() {
                let nodes = comet_nodes(&watched.borrow_and_update());
                if let Err(err) = comets.replace(nodes) {
                    tracing::warn!(reason = %err, "comet directory not updated");
                }
            }
        })
    };

    let stop = CancellationToken::new();
    let refresher = Arc::clone(&comets).refresh_every(LOAD_REFRESH, stop.clone());
    let grpc_token = config.node.grpc_token.clone();
    let grpc_task = {
        let (logic, stop) = (Arc::clone(&logic), stop.clone());
        tokio::spawn(async move {
            let tls = grpc_tls.server();
            rim_logic::serve_grpc(logic, grpc_token.as_deref(), tls, listeners.grpc, stop).await
        })
    };
    let api = Api::new(
        &config.api,
        &config.im,
        Arc::clone(&logic) as Arc<dyn LogicFacade>,
        producer,
    );
    let mut registry = super::metrics_registry("logic");
    logic.register_metrics(&mut registry);
    api.register_metrics(&mut registry);
    let http_task = spawn_http(
        api,
        Arc::new(registry),
        listeners.http,
        http_tls,
        stop.clone(),
    );

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
    grpc_result
        .context("logic grpc task")?
        .context("logic grpc")?;
    http_result.context("http api task")?.context("http api")?;
    Ok(())
}

/// Builds logic over the router the config names and a comet directory,
/// with the IM layer on the store `im` names (shared by `rim logic` and
/// `rim standalone`); IM frames are pushed through `queue`.
pub(super) async fn build_logic(
    logic: &LogicConfig,
    router: &RouterConfig,
    (im, node): (&ImConfig, &NodeConfig),
    queue: Arc<dyn Producer>,
    comets: Arc<Comets>,
) -> anyhow::Result<Arc<Logic>> {
    let router = rim_router::connect(router).await.context("router")?;
    let http = HttpClient::new().context("webhook http client")?;
    let service = Logic::new(logic, Arc::clone(&router), comets, http);
    let Some(store) = open_store(im, node).await? else {
        tracing::info!("im.store is off: IM requests are refused with code 2");
        return Ok(Arc::new(service));
    };
    let im = Im::new(store, router, queue, im);
    Ok(Arc::new(service.with_im(Arc::new(im))))
}

/// Opens the message store `im.store` names (None when IM is off).
async fn open_store(
    im: &ImConfig,
    node: &NodeConfig,
) -> anyhow::Result<Option<Arc<dyn MessageStore>>> {
    let id_node = im.id_node(&node.id);
    let ids = Arc::new(IdGenerator::new(id_node).context("im.node")?);
    match im.store {
        ImStore::Off => Ok(None),
        ImStore::Sqlite => {
            let options = SqliteOptions {
                synchronous: match im.sqlite_synchronous {
                    rim_config::SqliteSync::Full => Synchronous::Full,
                    rim_config::SqliteSync::Normal => Synchronous::Normal,
                },
                timeout: im.store_timeout,
                max_batch: im.max_batch,
                ..SqliteOptions::new(ids)
            };
            let path = im.sqlite_path.clone();
            let store = tokio::task::spawn_blocking(move || SqliteStore::open(&path, options))
                .await
                .context("im store")?
                .with_context(|| format!("im.sqlite_path {}", im.sqlite_path.display()))?;
            tracing::info!(path = %im.sqlite_path.display(), id_node, "IM messages are stored in SQLite");
            Ok(Some(Arc::new(store)))
        }
        ImStore::Postgres => {
            let primaries: Vec<PostgresOptions> = im
                .postgres
                .iter()
                .map(|url| PostgresOptions {
                    pool_size: im.postgres_pool,
                    timeout: im.store_timeout,
                    max_batch: im.max_batch,
                    exact_node: im.node.is_some(),
                    ..PostgresOptions::new(url.clone(), Arc::clone(&ids))
                })
                .collect();
            if primaries.len() > 1 {
                let ranges = im.shard_ranges()?;
                let map = if ranges.is_empty() {
                    ShardMap::even(primaries.len())
                } else {
                    ShardMap::from_ranges(primaries.len(), &ranges)
                }
                .context("im.shard_map")?;
                let shards = primaries.len();
                let store = ShardedStore::connect(primaries, map)
                    .await
                    .context("im.postgres: cannot open the sharded message store")?;
                tracing::info!(
                    id_node = ids.node(),
                    primaries = shards,
                    "IM messages are stored in PostgreSQL, sharded"
                );
                return Ok(Some(Arc::new(store)));
            }
            let options = primaries.into_iter().next().context("im.postgres")?;
            let store = PostgresStore::connect(options)
                .await
                .context("im.postgres: cannot open the message store")?;
            tracing::info!(id_node = ids.node(), "IM messages are stored in PostgreSQL");
            Ok(Some(Arc::new(store)))
        }
    }
}

/// Serves the HTTP API on `listener`, with `registry` (where the caller
/// registered the API's own metrics too) at `/metrics`, until `stop`
/// (shared by `rim logic` and `rim standalone`).
pub(super) fn spawn_http(
    api: Arc<Api>,
    registry: Arc<rim_metrics::Registry>,
    listener: TcpListener,
    tls: Option<rim_api::TlsAcceptor>,
    stop: CancellationToken,
) -> JoinHandle<std::io::Result<()>> {
    tokio::spawn(serve_with_metrics(api, registry, listener, tls, stop))
}
