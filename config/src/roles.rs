//! One config per `rim` subcommand, each a set of sections.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::{
    ApiConfig, CometConfig, DiscoveryBackend, DiscoveryConfig, ImConfig, JobConfig, Load,
    LogicConfig, MetricsConfig, NodeConfig, QueueBackend, QueueConfig, Result, RouterBackend,
    RouterConfig,
};

/// `rim standalone`: every role in one process. Defaults need no external
/// service (in-memory router and queue); roles reach each other directly,
/// so there is no discovery section.
///
/// Its HTTP API and comet gRPC bind loopback by default (the client ports
/// are public): the demo's defaults open nothing that can push or kick.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
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
    /// The IM layer (default: SQLite under `rim-data/`).
    pub im: ImConfig,
}

impl Default for StandaloneConfig {
    fn default() -> Self {
        StandaloneConfig {
            node: NodeConfig::default(),
            comet: CometConfig {
                grpc_bind: crate::sections::addr("127.0.0.1:3109"),
                ..CometConfig::default()
            },
            logic: LogicConfig::default(),
            api: ApiConfig {
                http_bind: crate::sections::addr("127.0.0.1:3111"),
                ..ApiConfig::default()
            },
            router: RouterConfig::default(),
            queue: QueueConfig::default(),
            job: JobConfig::default(),
            metrics: MetricsConfig::default(),
            im: ImConfig::standalone(),
        }
    }
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
        self.im.validate()?;
        presence_renew_within_lease(&self.comet, &self.logic)?;
        refuse_open(&self.node, &self.open_listeners())
    }

    fn open_listeners(&self) -> Vec<OpenListener> {
        let mut open = http_api_open(&self.api);
        open.extend(grpc_open(
            "comet.grpc_bind",
            self.comet.grpc_bind,
            &self.node,
        ));
        open
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
        self.node.validate_grpc_server_tls()?;
        self.comet.validate()?;
        self.discovery.validate()?;
        self.metrics.validate()?;
        refuse_open(&self.node, &self.open_listeners())
    }

    fn open_listeners(&self) -> Vec<OpenListener> {
        grpc_open("comet.grpc_bind", self.comet.grpc_bind, &self.node)
            .into_iter()
            .collect()
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
    /// The IM layer (default: off; set `store = "postgres"`).
    pub im: ImConfig,
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
            im: ImConfig::default(),
        }
    }
}

impl Load for LogicRoleConfig {
    fn validate(&mut self) -> Result<()> {
        self.node.validate()?;
        self.node.validate_grpc_server_tls()?;
        self.logic.validate()?;
        self.api.validate()?;
        self.router.validate()?;
        self.queue.validate()?;
        self.discovery.validate()?;
        self.im.validate()?;
        refuse_open(&self.node, &self.open_listeners())
    }

    fn open_listeners(&self) -> Vec<OpenListener> {
        let mut open = http_api_open(&self.api);
        open.extend(grpc_open(
            "logic.grpc_bind",
            self.logic.grpc_bind,
            &self.node,
        ));
        open
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
        self.queue.validate_group_instance(&self.node)?;
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

/// A listener that can push or kick, bound to a non-loopback address
/// without the token that protects it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenListener {
    /// The bind key, e.g. `api.http_bind`.
    pub bind_key: &'static str,
    /// The address it binds.
    pub bind: SocketAddr,
    /// The token key that is not set, e.g. `api.push_token`.
    pub missing: &'static str,
}

impl std::fmt::Display for OpenListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}) without {}",
            self.bind_key, self.bind, self.missing
        )
    }
}

/// The HTTP API's endpoints that need a token it does not have, when it
/// binds a non-loopback address.
fn http_api_open(api: &ApiConfig) -> Vec<OpenListener> {
    if api.http_bind.ip().is_loopback() {
        return Vec::new();
    }
    [
        ("api.admin_token", api.admin_token.is_none()),
        ("api.push_token", api.push_token.is_none()),
    ]
    .into_iter()
    .filter(|(_, unset)| *unset)
    .map(|(missing, _)| OpenListener {
        bind_key: "api.http_bind",
        bind: api.http_bind,
        missing,
    })
    .collect()
}

/// A gRPC server bound to a non-loopback address without `node.grpc_token`.
fn grpc_open(bind_key: &'static str, bind: SocketAddr, node: &NodeConfig) -> Option<OpenListener> {
    (!bind.ip().is_loopback() && node.grpc_token.is_none()).then_some(OpenListener {
        bind_key,
        bind,
        missing: "node.grpc_token",
    })
}

/// Refuses the first open listener, unless `node.allow_unauthenticated`.
fn refuse_open(node: &NodeConfig, open: &[OpenListener]) -> Result<()> {
    match open.first() {
        Some(first) if !node.allow_unauthenticated => Err(crate::ConfigError::Missing {
            key: first.missing.to_owned(),
            reason: format!(
                "required when {} ({}) is not a loopback address (or set node.allow_unauthenticated = true)",
                first.bind_key, first.bind
            ),
        }),
        _ => Ok(()),
    }
}
