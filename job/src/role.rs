//! `rim job`: consume the push topic in the region's consumer group and
//! deliver to the region's comets.

use std::sync::Arc;
use std::time::Duration;

use rim_config::{DiscoveryBackend, JobRoleConfig, QueueBackend};
use rim_proto::api::{CometApi, RemoteComet};
use rim_shutdown::Shutdown;
use tokio_util::sync::CancellationToken;

use crate::{CometHandle, Job, consume_kafka};

/// Why the job could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration cannot work for a job process.
    #[error("{0}")]
    Config(String),
    /// The consumer failed.
    #[error(transparent)]
    Consume(#[from] crate::ConsumeError),
}

/// The region's comets from static discovery, as lazily connected clients.
fn static_comets(config: &JobRoleConfig) -> Result<Vec<CometHandle>, RunError> {
    config
        .discovery
        .comets
        .iter()
        .filter(|c| c.region == config.node.region)
        .map(|c| {
            let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", c.grpc))
                .map_err(|e| {
                    RunError::Config(format!(
                        "comet {}: bad grpc address {:?}: {e}",
                        c.id, c.grpc
                    ))
                })?
                .connect_timeout(Duration::from_secs(3))
                .timeout(Duration::from_secs(30));
            let api: Arc<dyn CometApi> = Arc::new(RemoteComet::new(endpoint.connect_lazy()));
            Ok((c.id.clone(), api))
        })
        .collect()
}

/// Runs `rim job` until `shutdown` triggers.
pub async fn run(config: JobRoleConfig, shutdown: Shutdown) -> Result<(), RunError> {
    if config.queue.backend != QueueBackend::Kafka {
        return Err(RunError::Config(
            "rim job consumes Kafka: set queue.backend = \"kafka\" (the in-process queue is standalone's)".into(),
        ));
    }
    let comets = match config.discovery.backend {
        DiscoveryBackend::Static => static_comets(&config)?,
        DiscoveryBackend::Zookeeper => {
            return Err(RunError::Config(
                "zookeeper discovery is not built yet (issue #5); set discovery.backend = \"static\" \
                 and list the region's comets in [[discovery.comets]]"
                    .into(),
            ));
        }
    };
    tracing::info!(region = %config.node.region, comets = comets.len(), group = %config.job.group, "job starting");
    let job = Job::new(&config.job);
    job.set_comets(comets);
    let stop = CancellationToken::new();
    let consumer = consume_kafka(
        job,
        &config.queue.brokers,
        &config.queue.topic,
        &config.job.group,
        &config.node.id,
        stop.clone(),
    );
    tokio::pin!(consumer);
    tokio::select! {
        result = &mut consumer => return result.map_err(Into::into),
        () = shutdown.triggered() => {}
    }
    stop.cancel();
    consumer.await?;
    tracing::info!("job stopped");
    Ok(())
}
