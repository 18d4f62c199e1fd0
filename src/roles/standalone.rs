//! `rim standalone`: comet, logic, api and job in one process, talking
//! through the local implementations of their traits (no loopback gRPC):
//! the comet calls `Logic` directly, the api writes to an in-process queue,
//! the job reads it and calls the `Comet` directly.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use rim_comet::{Comet, Listeners};
use rim_config::{QueueBackend, StandaloneConfig};
use rim_discovery::{Addrs, NodeInfo};
use rim_logic::{CometNode, Comets};
use rim_proto::api::CometApi;
use rim_shutdown::Shutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::MetricsServer;

/// An address clients can use: a wildcard bind is advertised as loopback.
fn loopback_advertised(addr: Option<SocketAddr>) -> String {
    match addr {
        Some(addr) if addr.ip().is_unspecified() => format!("127.0.0.1:{}", addr.port()),
        Some(addr) => addr.to_string(),
        None => String::new(),
    }
}

/// Says at startup who can reach what: the client ports are public, and
/// the push/admin API and the comet gRPC (which can push and kick) are
/// loopback-only by default, or else protected by tokens.
fn print_exposure(config: &StandaloneConfig) {
    let public_clients = config
        .comet
        .tcp_bind
        .iter()
        .chain(&config.comet.ws_bind)
        .chain(if config.comet.wss_enabled() {
            &config.comet.wss_bind[..]
        } else {
            &[]
        })
        .any(|addr| !addr.ip().is_loopback());
    if public_clients {
        println!("  client ports are public (any host that reaches them can connect)");
    }
    let (http, grpc) = (config.api.http_bind, config.comet.grpc_bind);
    if http.ip().is_loopback() && grpc.ip().is_loopback() {
        println!("  push/admin API ({http}) and comet gRPC ({grpc}) are loopback-only");
        return;
    }
    let open = rim_config::Load::open_listeners(config);
    if open.is_empty() {
        println!(
            "  push/admin API ({http}) and comet gRPC ({grpc}) take remote calls with their tokens only"
        );
    }
    for listener in open {
        println!(
            "  WARNING: {listener}: anyone who reaches it can push or kick (node.allow_unauthenticated)"
        );
    }
}

/// Runs every role until `shutdown` triggers.
pub async fn run(mut config: StandaloneConfig, shutdown: Shutdown) -> anyhow::Result<()> {
    super::clamp_connections(&mut config.comet);
    anyhow::ensure!(
        config.queue.backend == QueueBackend::Memory,
        "standalone consumes its own in-process queue; queue.backend = \"kafka\" needs `rim job` (issue #5)"
    );
    // Certificates are read before anything binds.
    let http_tls = rim_api::tls_acceptor(&config.api).context("api.tls_cert")?;
    let scheme = if http_tls.is_some() { "https" } else { "http" };
    // Bind everything first: a port in use fails before anything starts.
    let backlog = config.node.listen_backlog;
    let listeners = Listeners::bind(&config.comet, backlog)?;
    let http = rim_comet::listen(config.api.http_bind, backlog).context("api.http_bind")?;
    let metrics = super::bind_metrics(config.metrics.bind_addr(), backlog)?;
    let first =
        |list: &[TcpListener]| loopback_advertised(list.first().and_then(|l| l.local_addr().ok()));
    // The local comet as discovery would describe it, with loopback addresses.
    let node = CometNode::from(&NodeInfo {
        id: config.node.id.clone(),
        region: config.node.region.clone(),
        zone: config.node.zone.clone(),
        addrs: Addrs {
            tcp: first(&listeners.tcp),
            ws: first(&listeners.ws),
            wss: first(&listeners.wss),
            grpc: loopback_advertised(listeners.grpc.local_addr().ok()),
        },
        domain: config.comet.public_domain.clone(),
        weight: config.node.weight,
        ..NodeInfo::default()
    });
    let http_addr = loopback_advertised(http.local_addr().ok());

    let comets = Arc::new(Comets::new());
    let (producer, queue) = rim_queue::memory_queue(config.queue.capacity, config.queue.max_bytes);
    let producer: Arc<dyn rim_queue::Producer> = Arc::new(producer);
    let logic = super::logic::build_logic(
        &config.logic,
        &config.router,
        (&config.im, &config.node),
        Arc::clone(&producer),
        Arc::clone(&comets),
    )
    .await?;
    let comet = Comet::new(
        &config.node,
        config.comet.clone(),
        Arc::clone(&logic) as Arc<dyn rim_proto::api::LogicApi>,
    );
    let comet_api: Arc<dyn CometApi> = Arc::new(comet.clone());
    comets.insert(node.clone(), Arc::clone(&comet_api));

    let consumer = queue
        .consumer(rim_queue::MAX_IN_FLIGHT)
        .context("queue consumer")?;
    let job = rim_job::Job::new(&config.job);
    job.set_comets(vec![(node.id.clone(), comet_api)]);
    // Every role's metrics, served on the API listener at /metrics (and on
    // metrics.bind when set).
    let mut registry = super::metrics_registry("standalone");
    comet.register_metrics(&mut registry);
    logic.register_metrics(&mut registry);
    job.register_metrics(&mut registry);

    let stop = CancellationToken::new();
    let consuming = tokio::spawn(rim_job::consume(job, consumer, stop.clone()));
    let refresher = Arc::clone(&comets).refresh_every(super::logic::LOAD_REFRESH, stop.clone());
    let api = rim_api::Api::new(
        &config.api,
        &config.im,
        Arc::clone(&logic) as Arc<dyn rim_logic::LogicFacade>,
        producer,
    );
    api.register_metrics(&mut registry);
    let registry = Arc::new(registry);
    // The same exposition on a listener of its own, when `metrics.bind` is set.
    let metrics_addr = metrics.as_ref().and_then(|l| l.local_addr().ok());
    let metrics = metrics.map(|listener| MetricsServer::spawn(listener, Arc::clone(&registry)));
    let serving = super::logic::spawn_http(api, registry, http, http_tls, stop.clone());

    println!(
        "rim standalone is running (node {}, region {})",
        node.id, node.region
    );
    if !node.tcp.is_empty() {
        println!("  clients, TCP:        {}", node.tcp);
    }
    if !node.ws.is_empty() {
        println!("  clients, WebSocket:  ws://{}/sub", node.ws);
    }
    if !node.wss.is_empty() {
        println!("  clients, WSS:        wss://{}/sub", node.wss);
    }
    println!("  push API:            {scheme}://{http_addr}/goim/push/...");
    println!("  metrics:             {scheme}://{http_addr}/metrics");
    if config.im.store == rim_config::ImStore::Sqlite {
        println!(
            "  chat (IM) store:     {} (SQLite, synchronous={:?})",
            config.im.sqlite_path.display(),
            config.im.sqlite_synchronous
        );
    }
    if let Some(addr) = metrics_addr {
        println!(
            "  metrics, own port:   http://{}/metrics",
            loopback_advertised(Some(addr))
        );
    }
    print_exposure(&config);
    // The token itself is never printed.
    let auth = if config.api.push_token.is_some() {
        "-H 'Authorization: Bearer <api.push_token>' "
    } else {
        ""
    };
    println!(
        "  try:  curl {auth}-X POST '{scheme}://{http_addr}/goim/push/room?operation=1000&type=live&room=1000' -d 'hello'"
    );

    // The comet runs until shutdown, then drains its clients.
    let result = comet.run(listeners, shutdown).await;
    stop.cancel();
    let _ = refresher.await;
    if let Ok(Err(err)) = consuming.await {
        tracing::warn!(reason = %err, "queue consumer ended with an error");
    }
    if let Ok(Err(err)) = serving.await {
        tracing::warn!(reason = %err, "http api ended with an error");
    }
    if let Some(metrics) = metrics {
        metrics.stop().await;
    }
    result.context("comet")
}
