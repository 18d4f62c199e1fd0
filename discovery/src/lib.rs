//! rim-discovery owns how comets and logics find each other: the
//! [`Discovery`] trait, a ZooKeeper implementation ([`ZkDiscovery`]: every
//! node registers an ephemeral znode and watchers keep a live view of each
//! role) and a static one from config ([`StaticDiscovery`]) for standalone
//! and tests.
//!
//! It only publishes and watches membership: choosing a node (weights,
//! regions, load) is the caller's, as is deciding what to register and how
//! often to refresh the load figures with [`Registration::update`].

mod configured;
mod node;
mod registration;
mod zookeeper;

use std::sync::Arc;

use async_trait::async_trait;
use rim_config::{DiscoveryBackend, DiscoveryConfig};
use tokio::sync::watch;

pub use crate::configured::StaticDiscovery;
pub use crate::node::{Addrs, Kind, NodeInfo, advertise, in_region};
pub use crate::registration::Registration;
pub use crate::zookeeper::ZkDiscovery;

/// Why a discovery operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// ZooKeeper is unreachable, timed out or refused the request.
    #[error("discovery unavailable: {0}")]
    Unavailable(String),
    /// The caller passed something that cannot be registered or connected to.
    #[error("invalid discovery request: {0}")]
    Invalid(String),
}

/// Result of a discovery operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Publishes this node and watches the others.
#[async_trait]
pub trait Discovery: Send + Sync + 'static {
    /// Registers this node (ZooKeeper: an ephemeral node) and keeps it
    /// registered (re-created after session expiry) until the registration
    /// is dropped or deregistered.
    ///
    /// `info.updated` is set to the current time; one discovery holds at most
    /// one registration per kind and id.
    async fn register(&self, kind: Kind, info: NodeInfo) -> Result<Registration>;

    /// Returns a receiver always holding the current set of nodes of `kind`
    /// (sorted by id), updated by watches.
    ///
    /// The receiver keeps working across ZooKeeper reconnections and session
    /// expiries; its sender closes when the discovery is dropped.
    async fn watch(&self, kind: Kind) -> Result<watch::Receiver<Vec<NodeInfo>>>;
}

/// Connects the discovery `config.backend` names: the static lists of the
/// section, or ZooKeeper at `config.zookeeper` under `config.root`.
pub async fn connect(config: &DiscoveryConfig) -> Result<Arc<dyn Discovery>> {
    match config.backend {
        DiscoveryBackend::Static => Ok(Arc::new(StaticDiscovery::new(config))),
        DiscoveryBackend::Zookeeper => {
            let discovery =
                ZkDiscovery::connect(&config.zookeeper, &config.root, config.session_timeout)
                    .await?;
            Ok(discovery)
        }
    }
}
