//! rim-router owns the online map: user id (mid) -> connection key -> comet
//! server id, the reverse key -> server, the lease of every entry, and the
//! room counts each comet reports, behind one [`Router`] trait with an
//! in-memory backend ([`MemoryRouter`], one process) and a Redis backend
//! ([`RedisRouter`], a single Redis or a Redis Cluster, shared by every
//! logic).
//!
//! It also keeps each user's presence: the platform and start of every
//! connection, when the user was last seen, and the last presence state
//! announced for it, which [`Router::settle_presence`] moves atomically so
//! that one logic out of many announces each online/offline transition.
//!
//! It does not decide who may connect, assign keys or choose lease times:
//! that is rim-logic's, which passes the lease with every call. It does not
//! deliver anything either; the api uses it only to plan pushes.

mod error;
mod memory;
mod redis_router;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rim_config::{RouterBackend, RouterConfig};

pub use crate::error::{Error, Result};
pub use crate::memory::MemoryRouter;
pub use crate::redis_router::{RedisOptions, RedisRouter};

/// The online map: sessions (mid -> key -> comet) under leases, and the room
/// counts every comet reports.
#[async_trait::async_trait]
pub trait Router: Send + Sync + 'static {
    /// Records that connection `key` of user `mid` is on comet `server`, leased for `lease`,
    /// with no known platform.
    /// Re-adding an existing key moves it (to the new server) and refreshes the lease.
    async fn add(&self, mid: i64, key: &str, server: &str, lease: Duration) -> Result<()> {
        self.add_device(mid, key, server, "", lease).await
    }

    /// Records that connection `key` of user `mid`, a client of `platform`, is on comet
    /// `server` since now, leased for `lease`, and that the user was seen now.
    /// Re-adding an existing key moves it (to the new server, platform and start time)
    /// and refreshes the lease.
    async fn add_device(
        &self,
        mid: i64,
        key: &str,
        server: &str,
        platform: &str,
        lease: Duration,
    ) -> Result<()>;

    /// Removes the session only if it still belongs to `server` (a stale comet must not
    /// delete a newer session); returns whether it removed it.
    async fn remove(&self, mid: i64, key: &str, server: &str) -> Result<bool>;

    /// Renews the lease of the session if it still belongs to `server`; returns false when
    /// it is gone or owned by another server.
    async fn renew(&self, mid: i64, key: &str, server: &str, lease: Duration) -> Result<bool>;

    /// Returns the server of each key, in the order given (None = offline or expired).
    async fn servers_of_keys(&self, keys: &[String]) -> Result<Vec<Option<String>>>;

    /// Records that connection `key` of user `mid` has every IM inbox entry
    /// up to `sync` (a device's cumulative ACK); the position never moves
    /// back, and is kept for `lease` after the last ACK or until the
    /// session is removed.
    async fn set_acked(&self, mid: i64, key: &str, sync: u64, lease: Duration) -> Result<()>;

    /// Returns the acked inbox position of each of `mid`'s connections
    /// `keys`, in order (0 when none is known).
    async fn acked(&self, mid: i64, keys: &[String]) -> Result<Vec<u64>>;

    /// Returns the live connections of the given users (each user once,
    /// however often it is named), in no particular order.
    async fn devices(&self, mids: &[i64]) -> Result<Vec<Device>>;

    /// Returns the live keys of the given users grouped by server: server -> keys.
    async fn keys_by_server(&self, mids: &[i64]) -> Result<HashMap<String, Vec<String>>> {
        let mut by_server: HashMap<String, Vec<String>> = HashMap::new();
        for device in self.devices(mids).await? {
            by_server.entry(device.server).or_default().push(device.key);
        }
        Ok(by_server)
    }

    /// Replaces comet `server`'s room counts (room -> members), stamped now.
    async fn set_room_counts(&self, server: &str, counts: &HashMap<String, i32>) -> Result<()>;

    /// Returns the cluster-wide count per room: the sum over servers whose last report is
    /// younger than the max age.
    async fn room_counts(&self) -> Result<HashMap<String, i64>>;

    /// Returns each server's last report (room counts and when it was made, unix millis),
    /// fresh ones only.
    async fn server_reports(&self) -> Result<HashMap<String, ServerReport>>;

    /// Checks the backend is reachable (for /readyz).
    async fn ping(&self) -> Result<()>;

    /// Returns the user's live connections (with platform and start time) and when it
    /// was last seen.
    async fn presence(&self, mid: i64) -> Result<Presence>;

    /// Compares the user's live connections with the presence state last announced for
    /// it and, when they disagree (live connections but announced offline, or none but
    /// announced online), records the new state and returns it.
    ///
    /// The compare and the record are one atomic step on the shared state, so of many
    /// logics settling the same user at once exactly one gets each transition. A user
    /// never announced counts as offline. While the user stays online it is scheduled
    /// for another settle when its last live lease ends (see [`Router::presence_due`]).
    async fn settle_presence(&self, mid: i64) -> Result<Option<Transition>>;

    /// Returns up to `limit` users announced online whose last lease has ended since
    /// their last settle: sessions that ended without a disconnect (a comet crash), to
    /// be settled again.
    async fn presence_due(&self, limit: usize) -> Result<Vec<i64>>;
}

/// A user's presence: state announced, live connections, last activity.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Presence {
    /// The live connections, in no particular order.
    pub devices: Vec<DeviceInfo>,
    /// When a connection of the user was last added, renewed or removed (unix
    /// milliseconds); None when the router knows nothing of the user (never seen, or
    /// longer ago than [`PRESENCE_KEEP`]).
    pub last_seen_unix_ms: Option<i64>,
}

/// One live connection of a user, as the presence query shows it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DeviceInfo {
    /// The connection key.
    pub key: String,
    /// The comet (node id) holding it.
    pub server: String,
    /// The client platform the auth gave it (`""` when unknown).
    pub platform: String,
    /// When it connected (unix milliseconds; 0 when unknown).
    pub since_unix_ms: i64,
}

/// A presence state announced for a user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PresenceState {
    /// At least one live connection.
    Online,
    /// No live connection.
    Offline,
}

impl PresenceState {
    /// Returns the state's name: `online` or `offline`.
    pub fn as_str(self) -> &'static str {
        match self {
            PresenceState::Online => "online",
            PresenceState::Offline => "offline",
        }
    }
}

/// One presence transition, won by the caller of [`Router::settle_presence`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    /// The user.
    pub mid: i64,
    /// The new state.
    pub state: PresenceState,
    /// The user's transition number: 1 for its first, one more for each next one (so a
    /// receiver can order and deduplicate events); it restarts after the router forgot
    /// the user ([`PRESENCE_KEEP`] without activity).
    pub seq: u64,
    /// Live connections when the transition was decided.
    pub devices: u32,
    /// When a connection of the user was last added, renewed or removed (unix ms).
    pub last_seen_unix_ms: i64,
    /// When the transition was decided (unix ms).
    pub at_unix_ms: i64,
}

/// How long the router remembers a user's presence (last seen, last announced state)
/// after its last activity.
pub const PRESENCE_KEEP: Duration = Duration::from_secs(30 * 24 * 3600);

/// One live connection of a user.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Device {
    /// The user.
    pub mid: i64,
    /// The connection key.
    pub key: String,
    /// The comet (node id) holding it.
    pub server: String,
}

/// One comet's last room-count report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerReport {
    /// Members per room on that comet.
    pub rooms: HashMap<String, i32>,
    /// When the report was stored, in unix milliseconds.
    pub updated_unix_ms: i64,
}

/// Connects to the backend `config.backend` names and returns it as a shared [`Router`].
///
/// For Redis, one URL in `config.redis` means a single Redis and several mean
/// the seed nodes of a Redis Cluster; the connection is made (and checked)
/// before this returns, so an unreachable Redis is an [`Error::Unavailable`]
/// here rather than on the first request.
pub async fn connect(config: &RouterConfig) -> Result<Arc<dyn Router>> {
    match config.backend {
        RouterBackend::Memory => Ok(Arc::new(MemoryRouter::new(config.online_max_age))),
        RouterBackend::Redis => {
            let mut options = RedisOptions::new(config.online_max_age);
            if let Some(path) = &config.tls_ca {
                let pem = std::fs::read(path).map_err(|e| {
                    Error::Config(format!(
                        "router.tls_ca: cannot read {}: {e}",
                        path.display()
                    ))
                })?;
                options = options.with_tls_ca(pem);
            }
            let router = RedisRouter::connect(&config.redis, options).await?;
            Ok(Arc::new(router))
        }
    }
}

/// Milliseconds since the unix epoch by this host's clock (0 if the clock is before 1970).
pub(crate) fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A duration in whole milliseconds, at least 1 (Redis rejects a zero TTL) and at most
/// 100 years (so that adding it to a unix time cannot overflow).
pub(crate) fn millis(d: Duration) -> i64 {
    const MAX_MS: u128 = 100 * 365 * 24 * 3600 * 1000;
    // The clamp keeps the value far below i64::MAX, so the cast is lossless.
    d.as_millis().clamp(1, MAX_MS) as i64
}
