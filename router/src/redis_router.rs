//! The Redis router, shared by every logic: a single Redis or a Redis Cluster.
//!
//! Key layout (`P` is the prefix, `rim` by default). Every key carries a
//! hash tag `{…}` and every atomic operation touches one key, so each one
//! stays inside one cluster slot:
//! - `P:key:{<key>}` string `"<mid>|<server>"`, PEXPIRE = the lease. The mid
//!   is kept so that a key re-added under another user leaves the first
//!   user's hash, and so that remove/renew check the whole session.
//! - `P:mid:{<mid>}` hash, field key -> `"<server>|<expiry unix ms>"` (a
//!   per-field lease, as Redis 7.0 has no HEXPIRE), PEXPIRE on the whole
//!   hash at least the longest lease. Readers skip expired fields and delete
//!   them (compare-and-delete, so a concurrent renewal wins); adds drop the
//!   user's expired fields too.
//! - `P:dev:{<mid>}` hash, field key -> `"<since unix ms>|<platform>"`, kept
//!   next to the user hash (same fields, same lease) for the presence query.
//! - `P:presence:{<mid>}` hash: `seen` (last add, renewal or removal, unix
//!   ms), `state` (last announced, `online` / `offline`), `seq` (transitions
//!   announced); PEXPIRE [`PRESENCE_KEEP`](crate::PRESENCE_KEEP) after the
//!   last write. Settling reads the user hash and writes this one in one
//!   script (both carry the tag `{<mid>}`, so one slot).
//! - `P:presence:due` sorted set: mid -> end of its last live lease, for
//!   users announced online; a hint for re-settling sessions that ended
//!   without a disconnect, written after each settle (an offline user
//!   leaves it once its entry is due).
//! - `P:online:{<server>}` hash: field `t` = report time (unix ms), field
//!   `r:<room>` = members; replaced whole by one script on each report.
//! - `P:online:servers` sorted set: server -> report time, read with
//!   ZRANGEBYSCORE over the max age, pruned on writes.
//!
//! Field expiries and report times are unix milliseconds by the clock of the
//! logic that wrote them; the hosts' clocks are assumed to agree to well
//! within a lease. Key-string leases use Redis's own clock (PEXPIRE).
//!
//! Needs Redis 6.2 or later (`SET … GET`); Debian 12 ships 7.0.
//!
//! Writes to the key string and to the user hash are separate single-key
//! operations (sent concurrently), not one transaction: a crash between
//! them leaves at most one half, which ends with its lease.

mod connection;
mod scripts;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::Duration;

use futures::{StreamExt, stream};
use redis::cluster_routing::Slot;
use redis::{Cmd, ErrorKind, FromRedisValue, RedisError, ServerErrorKind, Value};

use self::connection::Connection;
use self::scripts::{
    ADD_DEVICE, PRUNE_DEVICE, REMOVE_DEVICE, REMOVE_KEY, RENEW_DEVICE, RENEW_KEY, REPLACE_ROOMS,
    SET_ACK, SETTLE_PRESENCE, UNSCHEDULE_PRESENCE,
};
use crate::{
    Device, DeviceInfo, Error, PRESENCE_KEEP, Presence, PresenceState, Result, Router,
    ServerReport, Transition, millis, unix_ms,
};

/// Default bound on one Redis request (or batch) before it fails as unavailable.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// Default bound on connecting (and, for a cluster, reading its slot map).
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Room reports are kept (and their servers listed) this many max ages, so
/// routers configured with a longer max age still see them.
const REPORT_HORIZON_FACTOR: i64 = 10;

/// Room reports are kept at least this long.
const MIN_REPORT_HORIZON_MS: i64 = 60_000;

/// Most expired fields deleted concurrently after one read.
const PRUNE_CONCURRENCY: usize = 16;

/// Field of an online hash holding the report time.
const REPORT_TIME_FIELD: &str = "t";

/// Prefix of the online-hash fields holding room counts.
const ROOM_FIELD_PREFIX: &str = "r:";

/// How to use a Redis: names, timing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisOptions {
    /// First part of every key name (`rim` by default); must not contain `{` or `}`.
    pub prefix: String,
    /// Room reports older than this are ignored.
    pub online_max_age: Duration,
    /// Bound on one request or batch; past it the call fails with [`Error::Unavailable`].
    pub timeout: Duration,
    /// Bound on connecting.
    pub connect_timeout: Duration,
    /// PEM CA certificates that sign the servers' certificates, for
    /// `rediss://` URLs; `None` = the system's roots.
    pub tls_ca: Option<Vec<u8>>,
}

impl RedisOptions {
    /// Returns the default options (prefix `rim`, 2 s requests, 5 s connect) with this max age.
    pub fn new(online_max_age: Duration) -> Self {
        RedisOptions {
            prefix: "rim".into(),
            online_max_age,
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            tls_ca: None,
        }
    }

    /// Returns these options trusting the CA certificates in `pem` for `rediss://` URLs.
    pub fn with_tls_ca(mut self, pem: Vec<u8>) -> Self {
        self.tls_ca = Some(pem);
        self
    }

    /// Returns these options with another key prefix (tests use one per run).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }
}

/// Key names under one prefix.
#[derive(Clone, Debug)]
struct Names {
    prefix: String,
    servers: String,
    due: String,
}

impl Names {
    fn new(prefix: &str) -> Self {
        Names {
            prefix: prefix.to_owned(),
            servers: format!("{prefix}:online:servers"),
            due: format!("{prefix}:presence:due"),
        }
    }

    fn key(&self, key: &str) -> String {
        format!("{}:key:{{{key}}}", self.prefix)
    }

    fn user(&self, mid: i64) -> String {
        format!("{}:mid:{{{mid}}}", self.prefix)
    }

    /// The platform and start of the user's connections (same hash slot as the user's hash).
    fn device_info(&self, mid: i64) -> String {
        format!("{}:dev:{{{mid}}}", self.prefix)
    }

    /// The user's presence: last seen, last announced state (same hash slot as the user's hash).
    fn presence(&self, mid: i64) -> String {
        format!("{}:presence:{{{mid}}}", self.prefix)
    }

    /// The user's IM ack positions (same hash slot as the user's hash).
    fn acks(&self, mid: i64) -> String {
        format!("{}:acks:{{{mid}}}", self.prefix)
    }

    fn online(&self, server: &str) -> String {
        format!("{}:online:{{{server}}}", self.prefix)
    }
}

/// The online map in Redis (single node or cluster).
#[derive(Clone)]
pub struct RedisRouter {
    connection: Connection,
    /// "redis at <url>" or "redis cluster at <urls>", passwords hidden, for messages.
    target: String,
    names: Names,
    max_age: Duration,
    timeout: Duration,
}

impl std::fmt::Debug for RedisRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisRouter")
            .field("target", &self.target)
            .field("prefix", &self.names.prefix)
            .field("max_age", &self.max_age)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl RedisRouter {
    /// Connects to one Redis (one URL) or to a Redis Cluster (several seed URLs).
    ///
    /// Fails with [`Error::Config`] for a bad URL or prefix and with
    /// [`Error::Unavailable`] when the server cannot be reached in time.
    pub async fn connect(urls: &[String], options: RedisOptions) -> Result<Self> {
        if options.prefix.is_empty() || options.prefix.contains(['{', '}']) {
            return Err(Error::Config(format!(
                "invalid redis key prefix {:?}: must be non-empty and without braces",
                options.prefix
            )));
        }
        let target = describe(urls);
        if urls.is_empty() {
            return Err(Error::Config("no redis url given".into()));
        }
        if urls.iter().any(|url| url.starts_with("rediss://")) {
            // TLS to Redis uses rustls with ring, like every TLS client in rim;
            // a provider installed earlier in the process is kept.
            let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
        }
        let opening = Connection::open(urls, options.timeout, options.tls_ca.as_deref());
        let connection = match tokio::time::timeout(options.connect_timeout, opening).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(e)) if e.kind() == ErrorKind::InvalidClientConfig => {
                return Err(Error::Config(format!("{target}: {e}")));
            }
            Ok(Err(e)) => return Err(classify(&target, "connect", &e)),
            Err(_) => {
                return Err(Error::Unavailable(format!(
                    "{target}: connect timed out after {:?}",
                    options.connect_timeout
                )));
            }
        };
        tracing::debug!(redis = %target, prefix = %options.prefix, "router connected");
        Ok(RedisRouter {
            connection,
            target,
            names: Names::new(&options.prefix),
            max_age: options.online_max_age,
            timeout: options.timeout,
        })
    }

    /// Awaits one Redis request (or batch) for at most the timeout.
    async fn call<T>(
        &self,
        what: &str,
        request: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.timeout, request).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(classify(&self.target, what, &e)),
            Err(_) => Err(Error::Unavailable(format!(
                "{}: {what}: timed out after {:?}",
                self.target, self.timeout
            ))),
        }
    }

    /// Converts one reply of a batch, naming the command on failure.
    fn parse<T: FromRedisValue>(&self, what: &str, value: Value) -> Result<T> {
        redis::from_redis_value(value).map_err(|e| {
            Error::Backend(format!("{}: unexpected reply to {what}: {e}", self.target))
        })
    }

    /// Room-report lifetime in Redis: well past the max age (see [`REPORT_HORIZON_FACTOR`]).
    fn horizon_ms(&self) -> i64 {
        millis(self.max_age)
            .saturating_mul(REPORT_HORIZON_FACTOR)
            .max(MIN_REPORT_HORIZON_MS)
    }

    /// Deletes device fields a reader found expired, unless they changed since.
    /// Best effort: a failure only leaves them for the next add or the hash TTL.
    async fn prune(&self, expired: Vec<(i64, String, String)>) {
        let deletes = stream::iter(expired)
            .map(|(mid, key, value)| {
                let mut connection = self.connection.clone();
                let mut invocation = PRUNE_DEVICE.prepare_invoke();
                invocation
                    .key(self.names.user(mid))
                    .key(self.names.device_info(mid))
                    .arg(key)
                    .arg(value);
                async move { invocation.invoke_async::<i64>(&mut connection).await }
            })
            .buffer_unordered(PRUNE_CONCURRENCY)
            .collect::<Vec<_>>();
        match self
            .call("delete expired sessions", async { Ok(deletes.await) })
            .await
        {
            Ok(results) => {
                if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
                    tracing::debug!(redis = %self.target, error = %e, "deleting expired sessions failed");
                }
            }
            Err(e) => tracing::debug!(error = %e, "deleting expired sessions failed"),
        }
    }

    /// Returns the fresh reports: server, report time, rooms.
    async fn fresh_reports(&self) -> Result<Vec<(String, ServerReport)>> {
        let now = unix_ms();
        let max_age = millis(self.max_age);
        let oldest = format!("({}", now.saturating_sub(max_age));
        let mut connection = self.connection.clone();
        let servers: Vec<String> = self
            .call(
                "list reporting servers",
                redis::cmd("ZRANGEBYSCORE")
                    .arg(&self.names.servers)
                    .arg(oldest)
                    .arg("+inf")
                    .query_async(&mut connection),
            )
            .await?;
        let commands = servers
            .iter()
            .map(|server| single_key("HGETALL", self.names.online(server)))
            .collect();
        let replies = self
            .call("read room counts", self.connection.batch(commands))
            .await?;
        let mut reports = Vec::with_capacity(servers.len());
        for (server, reply) in servers.into_iter().zip(replies) {
            let fields: HashMap<String, String> = self.parse("HGETALL of room counts", reply)?;
            let Some(updated) = fields
                .get(REPORT_TIME_FIELD)
                .and_then(|t| t.parse::<i64>().ok())
            else {
                continue; // expired or replaced since the listing
            };
            if now.saturating_sub(updated) >= max_age {
                continue;
            }
            let mut rooms = HashMap::with_capacity(fields.len().saturating_sub(1));
            for (field, count) in fields {
                let Some(room) = field.strip_prefix(ROOM_FIELD_PREFIX) else {
                    continue;
                };
                match count.parse::<i32>() {
                    Ok(count) => {
                        rooms.insert(room.to_owned(), count);
                    }
                    Err(_) => tracing::warn!(
                        server = %server, room = %room, value = %count,
                        "ignoring a room count that is not an integer"
                    ),
                }
            }
            let report = ServerReport {
                rooms,
                updated_unix_ms: updated,
            };
            reports.push((server, report));
        }
        Ok(reports)
    }
}

#[async_trait::async_trait]
impl Router for RedisRouter {
    async fn add_device(
        &self,
        mid: i64,
        key: &str,
        server: &str,
        platform: &str,
        lease: Duration,
    ) -> Result<()> {
        let lease_ms = millis(lease);
        let keep_ms = millis(PRESENCE_KEEP);
        let now = unix_ms();
        let session = format!("{mid}|{server}");
        let device = format!("{server}|{}", now.saturating_add(lease_ms));

        let mut set_connection = self.connection.clone();
        let mut set = redis::cmd("SET");
        set.arg(self.names.key(key))
            .arg(&session)
            .arg("PX")
            .arg(lease_ms)
            .arg("GET");
        let mut put_connection = self.connection.clone();
        let mut put = ADD_DEVICE.prepare_invoke();
        put.key(self.names.user(mid))
            .key(self.names.device_info(mid))
            .key(self.names.presence(mid))
            .arg(key)
            .arg(&device)
            .arg(lease_ms)
            .arg(now)
            .arg(format!("{now}|{platform}"))
            .arg(keep_ms);
        let (previous, _): (Option<String>, i64) = self
            .call("add session", async {
                tokio::try_join!(
                    set.query_async(&mut set_connection),
                    put.invoke_async(&mut put_connection)
                )
            })
            .await?;

        if let Some((previous_mid, previous_server)) = previous.as_deref().and_then(parse_session)
            && previous_mid != mid
        {
            // The key changed hands: the old user must no longer list it.
            let mut connection = self.connection.clone();
            let mut drop = REMOVE_DEVICE.prepare_invoke();
            drop.key(self.names.user(previous_mid))
                .key(self.names.device_info(previous_mid))
                .key(self.names.presence(previous_mid))
                .arg(key)
                .arg(previous_server)
                .arg(now)
                .arg(keep_ms);
            self.call(
                "remove moved session",
                drop.invoke_async::<i64>(&mut connection),
            )
            .await?;
        }
        Ok(())
    }

    async fn remove(&self, mid: i64, key: &str, server: &str) -> Result<bool> {
        let now = unix_ms();
        let mut key_connection = self.connection.clone();
        let mut remove_key = REMOVE_KEY.prepare_invoke();
        remove_key
            .key(self.names.key(key))
            .arg(format!("{mid}|{server}"));
        let mut device_connection = self.connection.clone();
        let mut remove_device = REMOVE_DEVICE.prepare_invoke();
        remove_device
            .key(self.names.user(mid))
            .key(self.names.device_info(mid))
            .key(self.names.presence(mid))
            .arg(key)
            .arg(server)
            .arg(now)
            .arg(millis(PRESENCE_KEEP));
        let mut ack_connection = self.connection.clone();
        let mut drop_ack = redis::cmd("HDEL");
        drop_ack.arg(self.names.acks(mid)).arg(key);
        let (key_removed, device_removed, _): (i64, i64, i64) = self
            .call("remove session", async {
                tokio::try_join!(
                    remove_key.invoke_async(&mut key_connection),
                    remove_device.invoke_async(&mut device_connection),
                    drop_ack.query_async(&mut ack_connection)
                )
            })
            .await?;
        Ok(key_removed == 1 || device_removed == 1)
    }

    async fn renew(&self, mid: i64, key: &str, server: &str, lease: Duration) -> Result<bool> {
        let lease_ms = millis(lease);
        let mut connection = self.connection.clone();
        let mut renew_key = RENEW_KEY.prepare_invoke();
        renew_key
            .key(self.names.key(key))
            .arg(format!("{mid}|{server}"))
            .arg(lease_ms);
        let renewed: i64 = self
            .call("renew session", renew_key.invoke_async(&mut connection))
            .await?;
        if renewed != 1 {
            return Ok(false);
        }
        // Only after the key string proved the session is ours, so a stale
        // comet never resurrects a device field.
        let now = unix_ms();
        let device = format!("{server}|{}", now.saturating_add(lease_ms));
        let mut renew_device = RENEW_DEVICE.prepare_invoke();
        renew_device
            .key(self.names.user(mid))
            .key(self.names.device_info(mid))
            .key(self.names.presence(mid))
            .arg(key)
            .arg(server)
            .arg(device)
            .arg(lease_ms)
            .arg(now)
            .arg(millis(PRESENCE_KEEP));
        let _: i64 = self
            .call("renew session", renew_device.invoke_async(&mut connection))
            .await?;
        Ok(true)
    }

    async fn servers_of_keys(&self, keys: &[String]) -> Result<Vec<Option<String>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let commands = keys
            .iter()
            .map(|key| single_key("GET", self.names.key(key)))
            .collect();
        let replies = self
            .call("look up keys", self.connection.batch(commands))
            .await?;
        replies
            .into_iter()
            .map(|reply| {
                let session: Option<String> = self.parse("GET of a key", reply)?;
                Ok(session
                    .as_deref()
                    .and_then(parse_session)
                    .map(|(_, server)| server.to_owned()))
            })
            .collect()
    }

    async fn set_acked(&self, mid: i64, key: &str, sync: u64, lease: Duration) -> Result<()> {
        let mut connection = self.connection.clone();
        let mut set = SET_ACK.prepare_invoke();
        set.key(self.names.acks(mid))
            .arg(key)
            .arg(sync)
            .arg(millis(lease));
        let _: u64 = self
            .call("store an ack position", set.invoke_async(&mut connection))
            .await?;
        Ok(())
    }

    async fn acked(&self, mid: i64, keys: &[String]) -> Result<Vec<u64>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut connection = self.connection.clone();
        let mut get = redis::cmd("HMGET");
        get.arg(self.names.acks(mid)).arg(keys);
        let values: Vec<Option<u64>> = self
            .call("read ack positions", get.query_async(&mut connection))
            .await?;
        Ok(values.into_iter().map(Option::unwrap_or_default).collect())
    }

    async fn devices(&self, mids: &[i64]) -> Result<Vec<Device>> {
        let mut seen = HashSet::with_capacity(mids.len());
        let mids: Vec<i64> = mids
            .iter()
            .copied()
            .filter(|mid| seen.insert(*mid))
            .collect();
        if mids.is_empty() {
            return Ok(Vec::new());
        }
        let commands = mids
            .iter()
            .map(|&mid| single_key("HGETALL", self.names.user(mid)))
            .collect();
        let replies = self
            .call("look up users", self.connection.batch(commands))
            .await?;
        let now = unix_ms();
        let mut found = Vec::new();
        let mut expired = Vec::new();
        for (mid, reply) in mids.into_iter().zip(replies) {
            let devices: HashMap<String, String> = self.parse("HGETALL of a user", reply)?;
            for (key, value) in devices {
                match parse_device(&value) {
                    Some((server, expires)) if expires > now => found.push(Device {
                        mid,
                        key,
                        server: server.to_owned(),
                    }),
                    _ => expired.push((mid, key, value)),
                }
            }
        }
        if !expired.is_empty() {
            self.prune(expired).await;
        }
        Ok(found)
    }

    async fn set_room_counts(&self, server: &str, counts: &HashMap<String, i32>) -> Result<()> {
        let now = unix_ms();
        let horizon = self.horizon_ms();
        let mut connection = self.connection.clone();
        let mut replace = REPLACE_ROOMS.prepare_invoke();
        replace.key(self.names.online(server)).arg(now).arg(horizon);
        for (room, count) in counts {
            replace
                .arg(format!("{ROOM_FIELD_PREFIX}{room}"))
                .arg(*count);
        }
        let _: i64 = self
            .call("store room counts", replace.invoke_async(&mut connection))
            .await?;

        // One key, so one slot: a plain pipeline works on a cluster too.
        let servers = &self.names.servers;
        let mut register = redis::pipe();
        register
            .cmd("ZADD")
            .arg(servers)
            .arg(now)
            .arg(server)
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(servers)
            .arg("-inf")
            .arg(format!("({}", now.saturating_sub(horizon)))
            .ignore()
            .cmd("PEXPIRE")
            .arg(servers)
            .arg(horizon)
            .ignore();
        self.call(
            "register room counts",
            register.query_async::<()>(&mut connection),
        )
        .await
    }

    async fn room_counts(&self) -> Result<HashMap<String, i64>> {
        let mut totals: HashMap<String, i64> = HashMap::new();
        for (_, report) in self.fresh_reports().await? {
            for (room, count) in report.rooms {
                *totals.entry(room).or_default() += i64::from(count);
            }
        }
        Ok(totals)
    }

    async fn server_reports(&self) -> Result<HashMap<String, ServerReport>> {
        Ok(self.fresh_reports().await?.into_iter().collect())
    }

    async fn ping(&self) -> Result<()> {
        let mut connection = self.connection.clone();
        let _: Value = self
            .call("ping", redis::cmd("PING").query_async(&mut connection))
            .await?;
        Ok(())
    }

    async fn presence(&self, mid: i64) -> Result<Presence> {
        let mut seen = single_key("HGET", self.names.presence(mid));
        seen.1.arg("seen");
        let commands = vec![
            single_key("HGETALL", self.names.user(mid)),
            single_key("HGETALL", self.names.device_info(mid)),
            seen,
        ];
        let replies = self
            .call("read presence", self.connection.batch(commands))
            .await?;
        let [sessions, infos, seen]: [Value; 3] = replies.try_into().map_err(|_| {
            Error::Backend(format!("{}: read presence: wrong reply count", self.target))
        })?;
        let sessions: HashMap<String, String> = self.parse("HGETALL of a user", sessions)?;
        let mut infos: HashMap<String, String> =
            self.parse("HGETALL of a user's devices", infos)?;
        let last_seen_unix_ms: Option<i64> = self.parse("HGET of a presence", seen)?;
        let now = unix_ms();
        let devices = sessions
            .into_iter()
            .filter_map(|(key, value)| {
                let (server, expires) = parse_device(&value)?;
                if expires <= now {
                    return None;
                }
                let (since_unix_ms, platform) = infos
                    .remove(&key)
                    .as_deref()
                    .and_then(parse_device_info)
                    .map_or((0, String::new()), |(since, platform)| {
                        (since, platform.to_owned())
                    });
                Some(DeviceInfo {
                    server: server.to_owned(),
                    key,
                    platform,
                    since_unix_ms,
                })
            })
            .collect();
        Ok(Presence {
            devices,
            last_seen_unix_ms,
        })
    }

    async fn settle_presence(&self, mid: i64) -> Result<Option<Transition>> {
        let now = unix_ms();
        let mut connection = self.connection.clone();
        let mut settle = SETTLE_PRESENCE.prepare_invoke();
        settle
            .key(self.names.user(mid))
            .key(self.names.presence(mid))
            .arg(now)
            .arg(millis(PRESENCE_KEEP));
        let (changed, online, seq, live, seen, last_end): (i64, i64, u64, u32, i64, i64) = self
            .call("settle presence", settle.invoke_async(&mut connection))
            .await?;
        // The schedule is a hint next to the state (another slot, so not in
        // the script): were this write lost, a later settle of the user
        // writes it again. A user settled offline leaves the set only once
        // its entry is due, so an online settle racing with this one and
        // scheduling a later check is never undone; a user left in the set
        // is settled (to no change) and removed when its entry comes due.
        if online == 1 {
            let mut schedule = redis::cmd("ZADD");
            schedule.arg(&self.names.due).arg(last_end).arg(mid);
            self.call(
                "schedule presence",
                schedule.query_async::<i64>(&mut connection),
            )
            .await?;
        } else {
            let mut unschedule = UNSCHEDULE_PRESENCE.prepare_invoke();
            unschedule.key(&self.names.due).arg(mid).arg(now);
            self.call(
                "unschedule presence",
                unschedule.invoke_async::<i64>(&mut connection),
            )
            .await?;
        }
        if changed != 1 {
            return Ok(None);
        }
        Ok(Some(Transition {
            mid,
            state: if online == 1 {
                PresenceState::Online
            } else {
                PresenceState::Offline
            },
            seq,
            devices: live,
            last_seen_unix_ms: seen,
            at_unix_ms: now,
        }))
    }

    async fn presence_due(&self, limit: usize) -> Result<Vec<i64>> {
        let mut connection = self.connection.clone();
        self.call(
            "list presence due",
            redis::cmd("ZRANGEBYSCORE")
                .arg(&self.names.due)
                .arg("-inf")
                .arg(unix_ms())
                .arg("LIMIT")
                .arg(0)
                .arg(limit)
                .query_async(&mut connection),
        )
        .await
    }
}

/// A one-key command with its cluster slot, for [`Connection::batch`].
fn single_key(command: &str, key: String) -> (Slot, Cmd) {
    let slot = Slot::for_key(&key);
    let mut cmd = redis::cmd(command);
    cmd.arg(key);
    (slot, cmd)
}

/// Splits a key-string value `"<mid>|<server>"`.
fn parse_session(value: &str) -> Option<(i64, &str)> {
    let (mid, server) = value.split_once('|')?;
    Some((mid.parse().ok()?, server))
}

/// Splits a device value `"<server>|<expiry unix ms>"` (the server may contain `|`).
fn parse_device(value: &str) -> Option<(&str, i64)> {
    let (server, expires) = value.rsplit_once('|')?;
    Some((server, expires.parse().ok()?))
}

/// Splits a device-info value `"<since unix ms>|<platform>"` (the platform may contain `|`).
fn parse_device_info(value: &str) -> Option<(i64, &str)> {
    let (since, platform) = value.split_once('|')?;
    Some((since.parse().ok()?, platform))
}

/// Names the Redis behind some URLs for messages, without passwords.
fn describe(urls: &[String]) -> String {
    let urls: Vec<String> = urls.iter().map(|url| redact(url)).collect();
    match urls.as_slice() {
        [url] => format!("redis at {url}"),
        _ => format!("redis cluster at {}", urls.join(",")),
    }
}

/// Hides the user and password of a URL.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((_, host)) => format!("{scheme}://***@{host}{path}"),
        None => url.to_owned(),
    }
}

/// Turns a redis error into the router's: unreachable or overloaded servers
/// are [`Error::Unavailable`], anything else [`Error::Backend`].
fn classify(target: &str, what: &str, e: &RedisError) -> Error {
    let unavailable = e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_cluster_error()
        || matches!(
            e.kind(),
            ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::ReadOnly
                )
        );
    if unavailable {
        let detail = if e.is_connection_refusal() {
            "connection refused".to_owned()
        } else if e.is_timeout() {
            "timed out".to_owned()
        } else {
            e.to_string()
        };
        Error::Unavailable(format!("{target}: {what}: {detail}"))
    } else {
        Error::Backend(format!("{target}: {what}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_carry_one_hash_tag() {
        let names = Names::new("rim");
        assert_eq!(names.key("k-1"), "rim:key:{k-1}");
        assert_eq!(names.user(-42), "rim:mid:{-42}");
        assert_eq!(names.acks(-42), "rim:acks:{-42}");
        assert_eq!(names.device_info(-42), "rim:dev:{-42}");
        assert_eq!(names.presence(-42), "rim:presence:{-42}");
        assert_eq!(names.due, "rim:presence:due");
        assert_eq!(names.online("comet-1"), "rim:online:{comet-1}");
        assert_eq!(names.servers, "rim:online:servers");
    }

    #[test]
    fn values_parse_with_separators_in_server_ids() {
        assert_eq!(parse_session("7|a|b"), Some((7, "a|b")));
        assert_eq!(parse_session("x|a"), None);
        assert_eq!(
            parse_device("a|b|1700000000000"),
            Some(("a|b", 1_700_000_000_000))
        );
        assert_eq!(parse_device("a|soon"), None);
        assert_eq!(parse_device("a"), None);
        assert_eq!(parse_device_info("17|ios|x"), Some((17, "ios|x")));
        assert_eq!(parse_device_info("17|"), Some((17, "")));
        assert_eq!(parse_device_info("ios"), None);
    }

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(redact("redis://:secret@h:6379/0"), "redis://***@h:6379/0");
        assert_eq!(redact("redis://u:p@ss@h"), "redis://***@h");
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
        let urls = ["redis://a:1".to_string(), "redis://x:y@b:2".to_string()];
        assert_eq!(
            describe(&urls),
            "redis cluster at redis://a:1,redis://***@b:2"
        );
    }

    #[tokio::test]
    async fn bad_prefix_and_urls_are_config_errors() {
        let options = RedisOptions::new(Duration::from_secs(30));
        let err = RedisRouter::connect(&["redis://h".into()], options.clone().with_prefix("a{b"))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err:?}");
        let err = RedisRouter::connect(&[], options.clone())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err:?}");
        let err = RedisRouter::connect(&["http://h".into()], options)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err:?}");
    }
}
