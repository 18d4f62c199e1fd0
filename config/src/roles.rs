//! One config per `rim` subcommand, each a set of sections.

use serde::{Deserialize, Serialize};

use crate::{
    ApiConfig, CometConfig, DiscoveryBackend, DiscoveryConfig, JobConfig, Load, LogicConfig,
    MetricsConfig, NodeConfig, QueueBackend, QueueConfig, Result, RouterBackend, RouterConfig,
};

/// `rim standalone`: every role in one process. Defaults need no external
/// service (in-memory router and queue); roles reach each other directly,
/// so there is no discovery section.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StandaloneConfig {
    /// Identity of the process.
    pub node: NodeConfig,
    /// The comet's listeners and limits.
    pub comet: CometConfig,
    /// The logic service.
    pub logic: LogicConfig,
    /// The HTTP API.
    pub api: ApiConfig,
    /// The online map.
    pub router: RouterConfig,
    /// The push queue.
    pub queue: QueueConfig,
    /// The queue consumer.
    pub job: JobConfig,
    /// A separate listener for `GET /metrics` (default: none; metrics are
    /// always served on `api.http_bind` too).
    pub metrics: MetricsConfig,
}

impl Load for StandaloneConfig {
    fn validate(&mut self) -> Result<()> {
        self.node.validate()?;
        self.comet.validate()?;
        self.logic.validate()?;
        self.api.validate()?;
        self.router.validate()?;
        self.queue.validate()?;
        self.job.validate(&self.node)?;
        self.metrics.validate()?;
        presence_renew_within_lease(&self.comet, &self.logic)
    }
}

/// `rim comet`: an edge server.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CometRoleConfig {
    /// Identity, region and weight of this comet.
    pub node: NodeConfig,
    /// Listeners and limits.
    pub comet: CometConfig,
    /// How this comet finds logics and registers itself.
    pub discovery: DiscoveryConfig,
    /// Where Prometheus metrics are served (default port 3108).
    pub metrics: MetricsConfig,
}

impl Default for CometRoleConfig {
    fn default() -> Self {
        CometRoleConfig {
            node: NodeConfig::default(),
            comet: CometConfig::default(),
            discovery: distributed_discovery(),
            metrics: MetricsConfig::comet(),
        }
    }
}

impl Load for CometRoleConfig {
    fn validate(&mut self) -> Result<()> {
        self.node.validate()?;
        self.comet.validate()?;
        self.discovery.validate()?;
        self.metrics.validate()
    }
}

/// `rim logic`: the logic gRPC service and the HTTP API.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogicRoleConfig {
    /// Identity of this logic.
    pub node: NodeConfig,
    /// The logic service.
    pub logic: LogicConfig,
    /// The HTTP API.
    pub api: ApiConfig,
    /// The shared online map.
    pub router: RouterConfig,
    /// The push queue the API writes to.
    pub queue: QueueConfig,
    /// How this logic registers itself and sees the comets.
    pub discovery: DiscoveryConfig,
}

impl Default for LogicRoleConfig {
    fn default() -> Self {
        LogicRoleConfig {
            node: NodeConfig::default(),
            logic: LogicConfig::default(),
            api: ApiConfig::default(),
            router: RouterConfig {
                backend: RouterBackend::Redis,
                ..RouterConfig::default()
            },
            queue: kafka_queue(),
            discovery: distributed_discovery(),
        }
    }
}

impl Load for LogicRoleConfig {
    fn validate(&mut self) -> Result<()> {
        self.node.validate()?;
        self.logic.validate()?;
        self.api.validate()?;
        self.router.validate()?;
        self.queue.validate()?;
        self.discovery.validate()
    }
}

/// `rim job`: consumes the push queue and delivers to the region's comets.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobRoleConfig {
    /// Identity and region of this job.
    pub node: NodeConfig,
    /// Batching and consumer group.
    pub job: JobConfig,
    /// The push queue.
    pub queue: QueueConfig,
    /// How this job sees its region's comets.
    pub discovery: DiscoveryConfig,
    /// Where Prometheus metrics are served (default port 3128).
    pub metrics: MetricsConfig,
}

impl Default for JobRoleConfig {
    fn default() -> Self {
        JobRoleConfig {
            node: NodeConfig::default(),
            job: JobConfig::default(),
            queue: kafka_queue(),
            discovery: distributed_discovery(),
            metrics: MetricsConfig::job(),
        }
    }
}

impl Load for JobRoleConfig {
    fn validate(&mut self) -> Result<()> {
        self.node.validate()?;
        self.job.validate(&self.node)?;
        self.queue.validate()?;
        self.discovery.validate()?;
        self.metrics.validate()
    }
}

fn distributed_discovery() -> DiscoveryConfig {
    DiscoveryConfig {
        backend: DiscoveryBackend::Zookeeper,
        ..DiscoveryConfig::default()
    }
}

fn kafka_queue() -> QueueConfig {
    QueueConfig {
        backend: QueueBackend::Kafka,
        ..QueueConfig::default()
    }
}

fn presence_renew_within_lease(comet: &CometConfig, logic: &LogicConfig) -> Result<()> {
    if comet.presence_renew >= logic.lease {
        return Err(crate::ConfigError::invalid(
            "comet.presence_renew",
            "must be shorter than logic.lease, or live sessions expire between renewals",
        ));
    }
    Ok(())
}
