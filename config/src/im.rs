//! `[im]`: the IM layer (../shared/docs/im.md) — where messages are stored
//! and the limits of the chat ops. `rim standalone` keeps them in SQLite
//! under `rim-data/`; a logic cluster shares PostgreSQL.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::sections::{in_range, not_blank, positive, secret};
use crate::{ConfigError, Result};

/// Which message store the IM layer uses.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ImStore {
    /// No IM: IM requests are refused with code 2 and the /im/v1 endpoints
    /// answer 404 (the default of `rim logic`, which needs a shared store).
    Off,
    /// An embedded SQLite file (`im.sqlite_path`; the default of `rim
    /// standalone`). One process only.
    Sqlite,
    /// PostgreSQL (`im.postgres`), shared by every logic.
    Postgres,
}

/// How hard SQLite syncs a commit to disk.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SqliteSync {
    /// fsync on every commit: an acknowledged message survives power loss.
    Full,
    /// No fsync per commit (WAL): survives a process crash, but a power
    /// loss may take the last commits (never corrupting the file).
    Normal,
}

/// `[im]`: the IM layer's store and limits.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImConfig {
    /// Where messages are stored: off, sqlite or postgres.
    pub store: ImStore,
    /// The SQLite file (created with its directory).
    pub sqlite_path: PathBuf,
    /// SQLite's `synchronous`: full (default) or normal.
    pub sqlite_synchronous: SqliteSync,
    /// PostgreSQL URLs, `postgres://user@host:port/db`, one per primary
    /// (several: the store is sharded over them). A URL may name the
    /// primary and its standbys, tried in order,
    /// `postgres://user@h1:5432,h2:5432/db?target_session_attrs=read-write`
    /// (required with several hosts), so rim follows a promotion.
    #[serde(default, deserialize_with = "crate::serde_list::deserialize_urls")]
    pub postgres: Vec<String>,
    /// Which primary holds which of the 1024 virtual buckets, as
    /// `"first-last=primary"` ranges covering every bucket once; empty =
    /// the buckets split evenly in order.
    #[serde(default, deserialize_with = "crate::serde_list::deserialize")]
    pub shard_map: Vec<String>,
    /// Connections per PostgreSQL primary.
    pub postgres_pool: usize,
    /// How long a store operation may take before the request gets code 5.
    #[serde(with = "humantime_serde")]
    pub store_timeout: Duration,
    /// Sends committed together at most (group commit).
    pub max_batch: usize,
    /// This process's number in message ids (0..=1023); distinct per logic
    /// sharing a store. Default: derived from `node.id`.
    pub node: Option<u16>,
    /// The largest message body, in bytes.
    pub max_body: usize,
    /// A connected device that has not acked a pushed message this long is
    /// told to SYNC (NOTIFY sync) instead of getting the message again.
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// Groups whose `max_members` is above this are big groups (read
    /// diffusion: no inbox entry per member, delivery by the group's
    /// channel, capped at `big_group_rate`); at or below it, every message
    /// writes one inbox entry per member.
    pub big_group_members: u32,
    /// The most members any group may have (`max_members` of a PUT).
    pub max_group_members: u32,
    /// Messages per second a big group's members are pushed at most; over
    /// it, the rest are thinned and members get NOTIFY truncated (0 = no cap).
    pub big_group_rate: u32,
    /// Bearer token for the /im/v1 endpoints; unset = `api.admin_token`.
    pub api_token: Option<String>,
    /// Messages older than this many days are pruned (0: kept forever).
    pub retention_days: u32,
    /// Each conversation keeps at most its latest this many messages (0:
    /// all of them).
    pub max_messages_per_conv: u64,
    /// How often retention looks for what to prune (when a limit is set).
    #[serde(with = "humantime_serde")]
    pub prune_interval: Duration,
    /// Rows one pruning step removes at most, each step one short
    /// transaction.
    pub prune_batch: u32,
    /// SENDs (op 18) per second one connection may make; 0 = no limit.
    pub send_rate_per_conn: u32,
    /// SENDs one connection may make at once above its rate.
    pub send_burst_per_conn: u32,
    /// SENDs per second one user may make over all its devices on one
    /// logic process; 0 = no limit.
    pub send_rate_per_user: u32,
    /// SENDs one user may make at once above its rate.
    pub send_burst_per_user: u32,
    /// /im/v1 write requests (POST, PUT) per second per API token, or per
    /// client IP address when no token is set; 0 = no limit.
    pub api_write_rate: u32,
    /// /im/v1 write requests one token (or address) may make at once above
    /// its rate.
    pub api_write_burst: u32,
}

/// A rate limit from `[im]`: `rate` per second on average, `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests per second, replenished evenly.
    pub rate: NonZeroU32,
    /// Requests allowed at once (the bucket's size).
    pub burst: NonZeroU32,
}

impl RateLimit {
    /// The limit of a validated rate and burst; `None` when the rate is 0 (off).
    fn of(rate: u32, burst: u32) -> Option<RateLimit> {
        Some(RateLimit {
            rate: NonZeroU32::new(rate)?,
            burst: NonZeroU32::new(burst)?,
        })
    }
}

impl ImConfig {
    /// The defaults of `rim standalone`: SQLite under `rim-data/`.
    pub fn standalone() -> ImConfig {
        ImConfig {
            store: ImStore::Sqlite,
            ..ImConfig::default()
        }
    }

    /// The id-generator node: `im.node`, or one derived from `node_id`
    /// (FNV-1a, stable across versions).
    pub fn id_node(&self, node_id: &str) -> u16 {
        self.node.unwrap_or_else(|| {
            let hash = node_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
            (hash % (u64::from(MAX_ID_NODE) + 1)) as u16
        })
    }

    /// The per-connection SEND limit (`im.send_rate_per_conn`), if on.
    pub fn send_limit_per_conn(&self) -> Option<RateLimit> {
        RateLimit::of(self.send_rate_per_conn, self.send_burst_per_conn)
    }

    /// The per-user SEND limit (`im.send_rate_per_user`), if on.
    pub fn send_limit_per_user(&self) -> Option<RateLimit> {
        RateLimit::of(self.send_rate_per_user, self.send_burst_per_user)
    }

    /// The `im.shard_map` ranges, (first bucket, last bucket, primary),
    /// checked for form and bounds (whether they cover every bucket once is
    /// checked when the store opens).
    pub fn shard_ranges(&self) -> Result<Vec<(u16, u16, usize)>> {
        let primaries = self.postgres.len().max(1);
        self.shard_map
            .iter()
            .map(|range| {
                let invalid = |why: &str| {
                    ConfigError::invalid(
                        "im.shard_map",
                        format!("{range:?}: {why} (write \"first-last=primary\", buckets 0-{MAX_BUCKET})"),
                    )
                };
                let (buckets, primary) = range.split_once('=').ok_or_else(|| invalid("no '='"))?;
                let (lo, hi) = buckets
                    .split_once('-')
                    .ok_or_else(|| invalid("no '-' between the buckets"))?;
                let bucket = |text: &str| {
                    text.trim()
                        .parse::<u16>()
                        .ok()
                        .filter(|b| *b <= MAX_BUCKET)
                        .ok_or_else(|| invalid("a bucket is not a number in range"))
                };
                let (lo, hi) = (bucket(lo)?, bucket(hi)?);
                if lo > hi {
                    return Err(invalid("the first bucket is after the last"));
                }
                let primary: usize = primary
                    .trim()
                    .parse()
                    .map_err(|_| invalid("the primary is not a number"))?;
                if primary >= primaries {
                    return Err(invalid(&format!(
                        "primary {primary}, but im.postgres lists {primaries}"
                    )));
                }
                Ok((lo, hi, primary))
            })
            .collect()
    }

    /// The /im/v1 write limit (`im.api_write_rate`), if on.
    pub fn api_write_limit(&self) -> Option<RateLimit> {
        RateLimit::of(self.api_write_rate, self.api_write_burst)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.store == ImStore::Sqlite && self.sqlite_path.as_os_str().is_empty() {
            return Err(ConfigError::invalid(
                "im.sqlite_path",
                "store is sqlite but no path is set",
            ));
        }
        if self.store == ImStore::Postgres {
            match self.postgres.as_slice() {
                [] => {
                    return Err(ConfigError::invalid(
                        "im.postgres",
                        "store is postgres but no URL is set",
                    ));
                }
                urls => {
                    for url in urls {
                        postgres_url("im.postgres", url)?;
                    }
                }
            }
            self.shard_ranges()?;
        }
        in_range("im.postgres_pool", self.postgres_pool as u64, 1, 1024)?;
        positive("im.store_timeout", self.store_timeout)?;
        in_range("im.max_batch", self.max_batch as u64, 1, 10_000)?;
        if let Some(node) = self.node {
            in_range("im.node", u64::from(node), 0, u64::from(MAX_ID_NODE))?;
        }
        // A SEND must fit goim's 4096-byte frame with its JSON around it.
        in_range("im.max_body", self.max_body as u64, 1, 1 << 20)?;
        positive("im.ack_timeout", self.ack_timeout)?;
        in_range(
            "im.big_group_members",
            u64::from(self.big_group_members),
            2,
            1_000_000,
        )?;
        in_range(
            "im.max_group_members",
            u64::from(self.max_group_members),
            u64::from(self.big_group_members),
            10_000_000,
        )?;
        in_range(
            "im.big_group_rate",
            u64::from(self.big_group_rate),
            0,
            100_000,
        )?;
        if let Some(token) = &self.api_token {
            secret("im.api_token", token)?;
        }
        in_range(
            "im.retention_days",
            u64::from(self.retention_days),
            0,
            100 * 366,
        )?;
        positive("im.prune_interval", self.prune_interval)?;
        in_range("im.prune_batch", u64::from(self.prune_batch), 1, 100_000)?;
        rate_limit(
            ("im.send_rate_per_conn", self.send_rate_per_conn),
            ("im.send_burst_per_conn", self.send_burst_per_conn),
        )?;
        rate_limit(
            ("im.send_rate_per_user", self.send_rate_per_user),
            ("im.send_burst_per_user", self.send_burst_per_user),
        )?;
        rate_limit(
            ("im.api_write_rate", self.api_write_rate),
            ("im.api_write_burst", self.api_write_burst),
        )?;
        Ok(())
    }
}

/// The largest rate or burst of a limit (far above any one client's need;
/// it keeps a typo from meaning "no limit" silently).
const MAX_RATE: u64 = 1_000_000;

/// Checks a rate (0 = off) and its burst, which must be at least 1 when
/// the rate is on.
fn rate_limit((rate_key, rate): (&str, u32), (burst_key, burst): (&str, u32)) -> Result<()> {
    in_range(rate_key, u64::from(rate), 0, MAX_RATE)?;
    if rate > 0 {
        in_range(burst_key, u64::from(burst), 1, MAX_RATE)?;
    }
    Ok(())
}

/// The largest id-generator node number (10 bits).
const MAX_ID_NODE: u16 = 1023;

/// Checks a PostgreSQL URL as libpq reads it,
/// `postgres://[user[:password]@]host[:port][,host[:port]…][/db][?key=value&…]`:
/// every host named, every port a number, and several hosts (a primary and
/// its standbys) only with `target_session_attrs=read-write`, so that no
/// connection lands on a read-only standby. Errors do not repeat the URL
/// (it may hold a password).
/// The last of the store's 1024 virtual buckets (rim-im's `BUCKETS` - 1).
const MAX_BUCKET: u16 = 1023;

fn postgres_url(key: &str, url: &str) -> Result<()> {
    not_blank(key, url)?;
    let invalid = |reason: String| Err(ConfigError::invalid(key, reason));
    let Some(rest) = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
    else {
        let scheme = url.split_once("://").map_or("none", |(scheme, _)| scheme);
        return invalid(format!("not a postgres:// URL (scheme {scheme:?})"));
    };
    // The credentials end at the first '@', the hosts at the path or query.
    let rest = rest.split_once('@').map_or(rest, |(_, after)| after);
    let (hosts, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    if hosts.is_empty() {
        return invalid("the URL names no host".into());
    }
    let mut count = 0;
    for host in hosts.split(',') {
        count += 1;
        postgres_host(host).or_else(|reason| invalid(format!("host {count}: {reason}")))?;
    }
    let query = tail.split_once('?').map_or("", |(_, query)| query);
    let mut attrs = None;
    for param in query.split('&').filter(|param| !param.is_empty()) {
        let Some((name, value)) = param.split_once('=') else {
            return invalid(format!("parameter {name:?} has no value", name = param));
        };
        if name == "target_session_attrs" {
            attrs = Some(value);
        }
    }
    match attrs {
        Some("read-write") => Ok(()),
        None | Some("any") if count == 1 => Ok(()),
        None | Some("any") => invalid(format!(
            "names {count} hosts (a primary and its standbys) but not \
             ?target_session_attrs=read-write: rim could connect to a read-only standby"
        )),
        Some(other) => invalid(format!(
            "target_session_attrs={other:?}: rim writes, so it must be read-write"
        )),
    }
}

/// Checks one `host[:port]` or `[ipv6][:port]` of a PostgreSQL URL.
fn postgres_host(host: &str) -> std::result::Result<(), String> {
    let (name, port) = match host.strip_prefix('[') {
        Some(bracketed) => {
            let (name, after) = bracketed
                .split_once(']')
                .ok_or_else(|| format!("{host:?} has no closing ']'"))?;
            match after {
                "" => (name, None),
                _ => (
                    name,
                    Some(
                        after
                            .strip_prefix(':')
                            .ok_or_else(|| format!("{host:?}: ':' must follow ']'"))?,
                    ),
                ),
            }
        }
        None => match host.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        },
    };
    if name.is_empty() {
        return Err("empty (two commas in a row, or a port without a host?)".into());
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{name:?} has a blank or control character"));
    }
    if let Some(port) = port {
        match port.parse::<u16>() {
            Ok(1..) => {}
            _ => {
                return Err(format!(
                    "port {port:?} of {name} is not a number from 1 to 65535"
                ));
            }
        }
    }
    Ok(())
}

impl Default for ImConfig {
    /// The defaults of `rim logic`: IM off until a store is configured.
    fn default() -> Self {
        ImConfig {
            store: ImStore::Off,
            sqlite_path: PathBuf::from("rim-data/im.sqlite3"),
            sqlite_synchronous: SqliteSync::Full,
            postgres: Vec::new(),
            shard_map: Vec::new(),
            postgres_pool: 8,
            store_timeout: Duration::from_secs(5),
            max_batch: 256,
            node: None,
            max_body: 4000,
            ack_timeout: Duration::from_secs(10),
            big_group_members: 500,
            max_group_members: 100_000,
            big_group_rate: 40,
            api_token: None,
            retention_days: 0,
            max_messages_per_conv: 0,
            prune_interval: Duration::from_secs(60),
            prune_batch: 1000,
            // A person types and taps far below 20 messages a second; a
            // burst of 40 lets a client flush what it queued offline.
            send_rate_per_conn: 20,
            send_burst_per_conn: 40,
            // Several devices of one person, each well under its own limit.
            send_rate_per_user: 50,
            send_burst_per_user: 100,
            // One business server's writes (sends, reads, groups).
            api_write_rate: 2000,
            api_write_burst: 4000,
        }
    }
}
