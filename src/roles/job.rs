//! `rim job`: consume the push topic in the region's consumer group and
//! deliver to the region's comets.

use std::sync::Arc;

use anyhow::Context;
use rim_config::{JobRoleConfig, QueueBackend};
use rim_discovery::{Kind, NodeInfo};
use rim_job::{CometHandle, Job};
use rim_proto::api::{CometApi, RemoteComet};
use rim_queue::{KafkaConsumer, KafkaConsumerOptions};
use rim_shutdown::Shutdown;
use rim_tls::{GrpcTls, GrpcTlsFiles};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::MetricsServer;

/// Binds the job's metrics listener.
pub fn bind(config: &JobRoleConfig) -> anyhow::Result<Option<TcpListener>> {
    super::bind_metrics(config.metrics.bind_addr(), config.node.listen_backlog)
}

/// The comets of `region` among discovered nodes, as lazily connected
/// clients sending `token` (the cluster's `node.grpc_token`) and dialing
/// with `tls` (`node.tls_ca`).
fn region_comets(
    nodes: &[NodeInfo],
    region: &str,
    token: Option<&str>,
    tls: &GrpcTls,
) -> Vec<CometHandle> {
    rim_discovery::in_region(nodes, region)
        .into_iter()
        .filter_map(|node| {
            match RemoteComet::connect_lazy_with_tls(&node.addrs.grpc, tls)
                .and_then(|client| client.with_token(token))
            {
                Ok(client) => Some((node.id, Arc::new(client) as Arc<dyn CometApi>)),
                Err(err) => {
                    tracing::warn!(comet = %node.id, reason = %err, "comet skipped");
                    None
                }
            }
        })
        .collect()
}

/// Runs `rim job` until `shutdown` triggers, serving `GET /metrics` on
/// `metrics` when given.
pub async fn run(
    config: JobRoleConfig,
    metrics: Option<TcpListener>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        config.queue.backend == QueueBackend::Kafka,
        "rim job consumes Kafka: set queue.backend = \"kafka\" (the in-process queue is standalone's)"
    );
    // Certificates are read before anything connects: a bad file stops the role at once.
    let tls = GrpcTls::load(&GrpcTlsFiles::of(&config.node)).context("node.tls")?;
    let discovery = rim_discovery::connect(&config.discovery)
        .await
        .context("discovery")?;
    let mut comets = discovery
        .watch(Kind::Comet)
        .await
        .context("discovery: cannot watch the comets")?;
    let region = config.node.region.clone();
    let instance = config.queue.group_instance(&config.node);
    let job = Job::new(&config.job);
    let metrics = metrics.map(|listener| {
        let mut registry = super::metrics_registry("job");
        job.register_metrics(&mut registry);
        MetricsServer::spawn(listener, registry)
    });
    let token = config.node.grpc_token.clone();
    job.set_comets(region_comets(
        &comets.borrow_and_update(),
        &region,
        token.as_deref(),
        &tls,
    ));
    tracing::info!(%region, comets = ?job.comet_ids(), group = %config.job.group, "job starting");
    // Follow the region's comets: a comet that leaves discovery is retired
    // (its pending calls end as Gone and their offsets can be committed).
    let follow = {
        let job = job.clone();
        tokio::spawn(async move {
            while comets.changed().await.is_ok() {
                let token = config.node.grpc_token.clone();
                job.set_comets(region_comets(
                    &comets.borrow_and_update(),
                    &region,
                    token.as_deref(),
                    &tls,
                ));
                tracing::info!(comets = ?job.comet_ids(), "region comets changed");
            }
        })
    };
    let consumer = KafkaConsumer::with_properties(
        &KafkaConsumerOptions {
            brokers: config.queue.brokers.clone(),
            topic: config.queue.topic.clone(),
            group: config.job.group.clone(),
            instance,
            session_timeout: config.queue.session_timeout,
            heartbeat_interval: config.queue.heartbeat_interval,
            assignment_strategy: config.queue.assignment_strategy.as_str().to_owned(),
            max_in_flight: rim_queue::MAX_IN_FLIGHT,
            max_in_flight_bytes: config.queue.max_bytes,
            fetch_wait: config.queue.fetch_wait,
        },
        &config.queue.kafka_properties(),
    )
    .context("queue consumer")?;
    let stop = CancellationToken::new();
    let consumer = rim_job::consume(job, consumer, stop.clone());
    tokio::pin!(consumer);
    let result = tokio::select! {
        result = &mut consumer => result,
        () = shutdown.triggered() => {
            stop.cancel();
            consumer.await
        }
    };
    follow.abort();
    drop(discovery);
    // Metrics are served until the consumer committed and stopped.
    if let Some(metrics) = metrics {
        metrics.stop().await;
    }
    result.context("queue consumer")?;
    tracing::info!("job stopped");
    Ok(())
}
