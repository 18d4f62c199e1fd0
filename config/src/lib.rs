//! rim-config owns rim's configuration: one typed config per role
//! ([`StandaloneConfig`], [`CometRoleConfig`], [`LogicRoleConfig`],
//! [`JobRoleConfig`]) built from sections ([`NodeConfig`], [`CometConfig`],
//! ...), and the one way to load them: built-in defaults < TOML file <
//! `RIM_<SECTION>__<KEY>` environment variables, then validation.
//!
//! Unknown keys are rejected naming the key, and every value is checked
//! before a role binds a port. It does not own what the values mean at run
//! time: each role crate reads its section.

mod cidr;
mod error;
mod im;
mod load;
mod roles;
mod sections;
mod serde_list;

pub use cidr::Cidr;
pub use error::{ConfigError, Result};
pub use im::{ImConfig, ImStore, RateLimit, SqliteSync};
pub use load::{ENV_PREFIX, Load};
pub use roles::{CometRoleConfig, JobRoleConfig, LogicRoleConfig, OpenListener, StandaloneConfig};
pub use sections::{
    ApiConfig, AssignmentStrategy, AuthConfig, AuthPolicy, CometConfig, DiscoveryBackend,
    DiscoveryConfig, JobConfig, LogicConfig, MetricsConfig, NodeConfig, NodesConfig, QueueBackend,
    QueueConfig, RegionCidr, RoomFlushRule, RouterBackend, RouterConfig, StaticComet,
};

#[cfg(test)]
mod tests;
