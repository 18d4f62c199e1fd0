//! The in-memory router, for standalone and single-logic setups.
//!
//! Sessions live twice, in two sharded maps: key -> (mid, server, expiry) for
//! lookups by key, and mid -> [(key, server, expiry)] for lookups by user.
//! Both share one allocation of the key and of the server id, and a user's
//! devices are a short vector (users have a handful), not a map: an idle
//! connection costs the router a few dozen bytes beyond its key.
//! Every writer locks the key's shard first and, while holding it, one user
//! shard at a time; readers lock one shard at a time. That order keeps the
//! two maps in agreement under concurrent writers of the same key and cannot
//! deadlock. No lock is held across an `.await` (there is none inside).
//!
//! Expired entries are treated as absent by every read and dropped when met;
//! a background sweep (one shard per tick) drops the ones nobody reads.
//!
//! Presence (last seen, announced state) is a third sharded map by user,
//! locked after the user's device shard when both are needed, never before.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hash};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::{Instant, MissedTickBehavior};

use crate::{
    DeviceInfo, PRESENCE_KEEP, Presence, PresenceState, Result, Router, ServerReport, Transition,
    millis, unix_ms,
};

/// Number of shards of each map; a power of two well above the core count so
/// that concurrent connects rarely meet on one lock.
const SHARDS: usize = 64;

/// Time between two sweep steps; each step sweeps one shard of each map, so a
/// full pass takes `SHARDS * SWEEP_TICK` (6.4 s).
const SWEEP_TICK: Duration = Duration::from_millis(100);

/// The longest lease honoured; longer ones are cut to it so that
/// `Instant + lease` cannot overflow.
const MAX_LEASE: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// One session as seen from its key.
#[derive(Debug)]
struct KeyEntry {
    mid: i64,
    server: Arc<str>,
    expires: Instant,
}

/// One session as seen from its user.
#[derive(Debug)]
struct Device {
    key: Arc<str>,
    server: Arc<str>,
    expires: Instant,
    platform: Box<str>,
    since_unix_ms: i64,
}

/// What a user's presence entry remembers.
#[derive(Debug)]
struct PresenceEntry {
    /// Whether the last announced state is online.
    online: bool,
    /// Transitions announced so far.
    seq: u64,
    /// Last add, renewal or removal of one of its connections (unix ms).
    seen_unix_ms: i64,
    /// When an online user must be settled again (its last lease ends).
    check_at: Option<Instant>,
}

/// One comet's last room-count report.
#[derive(Debug)]
struct Report {
    rooms: HashMap<String, i32>,
    updated_unix_ms: i64,
    at: Instant,
}

type KeyShard = HashMap<Arc<str>, KeyEntry>;
type UserShard = HashMap<i64, Vec<Device>>;
/// IM ack positions by connection key: (mid, acked sync, expiry). Apart from
/// the sessions so that connections without IM pay nothing for them.
type AckShard = HashMap<Box<str>, (i64, u64, Instant)>;
type PresenceShard = HashMap<i64, PresenceEntry>;

#[derive(Debug)]
struct Inner {
    hasher: RandomState,
    keys: Box<[Mutex<KeyShard>]>,
    users: Box<[Mutex<UserShard>]>,
    acks: Box<[Mutex<AckShard>]>,
    presence: Box<[Mutex<PresenceShard>]>,
    reports: Mutex<HashMap<String, Report>>,
    max_age: Duration,
}

/// The online map in this process's memory: sharded, leased, swept.
#[derive(Clone, Debug)]
pub struct MemoryRouter {
    inner: Arc<Inner>,
}

impl MemoryRouter {
    /// Creates an empty map whose room reports count for `online_max_age`.
    ///
    /// Spawns the background sweep on the current tokio runtime if there is
    /// one (it ends when the last clone of the router is dropped); without a
    /// runtime, expired entries are only dropped when read or overwritten.
    pub fn new(online_max_age: Duration) -> Self {
        let inner = Arc::new(Inner {
            hasher: RandomState::new(),
            keys: (0..SHARDS).map(|_| Mutex::default()).collect(),
            users: (0..SHARDS).map(|_| Mutex::default()).collect(),
            acks: (0..SHARDS).map(|_| Mutex::default()).collect(),
            presence: (0..SHARDS).map(|_| Mutex::default()).collect(),
            reports: Mutex::default(),
            max_age: online_max_age,
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(sweep_forever(Arc::downgrade(&inner)));
        }
        MemoryRouter { inner }
    }
}

/// Sweeps one shard per tick until the router is dropped.
async fn sweep_forever(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(SWEEP_TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    for shard in (0..SHARDS).cycle() {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner.sweep(shard, Instant::now());
    }
}

fn expiry(now: Instant, lease: Duration) -> Instant {
    now + lease.min(MAX_LEASE)
}

impl Inner {
    fn shard_of<T: Hash + ?Sized>(&self, value: &T) -> usize {
        // The modulo keeps the index below SHARDS, so truncating the hash is fine.
        (self.hasher.hash_one(value) % SHARDS as u64) as usize
    }

    fn key_shard(&self, key: &str) -> &Mutex<KeyShard> {
        &self.keys[self.shard_of(key)]
    }

    fn user_shard(&self, mid: i64) -> &Mutex<UserShard> {
        &self.users[self.shard_of(&mid)]
    }

    fn ack_shard(&self, key: &str) -> &Mutex<AckShard> {
        &self.acks[self.shard_of(key)]
    }

    fn presence_shard(&self, mid: i64) -> &Mutex<PresenceShard> {
        &self.presence[self.shard_of(&mid)]
    }

    /// Sets the device entry of `key` under `mid`; `connected` (platform, start) is
    /// given by a new connection and None by a renewal, which keeps what is known.
    /// Callers hold the key's shard.
    fn put_device(
        &self,
        mid: i64,
        key: &Arc<str>,
        server: Arc<str>,
        expires: Instant,
        connected: Option<(&str, i64)>,
    ) {
        let mut users = self.user_shard(mid).lock();
        let devices = users.entry(mid).or_insert_with(|| Vec::with_capacity(1));
        match devices.iter_mut().find(|d| *d.key == **key) {
            Some(device) => {
                device.server = server;
                device.expires = expires;
                if let Some((platform, since)) = connected {
                    device.platform = platform.into();
                    device.since_unix_ms = since;
                }
            }
            None => {
                let (platform, since) = connected.unwrap_or(("", unix_ms()));
                devices.push(Device {
                    key: Arc::clone(key),
                    server,
                    expires,
                    platform: platform.into(),
                    since_unix_ms: since,
                });
            }
        }
    }

    /// Records that a connection of `mid` was added, renewed or removed at `now_ms`.
    fn touch(&self, mid: i64, now_ms: i64) {
        let mut presence = self.presence_shard(mid).lock();
        let entry = presence.entry(mid).or_insert(PresenceEntry {
            online: false,
            seq: 0,
            seen_unix_ms: now_ms,
            check_at: None,
        });
        entry.seen_unix_ms = entry.seen_unix_ms.max(now_ms);
    }

    /// Drops the device entry of `key` under `mid` if it is on `server` (any
    /// server when None). Callers hold the key's shard.
    fn drop_device(&self, mid: i64, key: &str, server: Option<&str>) {
        let mut users = self.user_shard(mid).lock();
        let Some(devices) = users.get_mut(&mid) else {
            return;
        };
        let owned = devices
            .iter()
            .position(|d| *d.key == *key && server.is_none_or(|s| *d.server == *s));
        if let Some(at) = owned {
            devices.swap_remove(at);
            if devices.is_empty() {
                users.remove(&mid);
            }
        }
    }

    fn is_fresh(&self, report: &Report, now: Instant) -> bool {
        now.saturating_duration_since(report.at) < self.max_age
    }

    /// Drops the expired entries of one shard of each map (and stale reports with shard 0).
    fn sweep(&self, shard: usize, now: Instant) {
        self.keys[shard]
            .lock()
            .retain(|_, entry| entry.expires > now);
        self.users[shard].lock().retain(|_, devices| {
            devices.retain(|device| device.expires > now);
            !devices.is_empty()
        });
        self.acks[shard]
            .lock()
            .retain(|_, (_, _, expires)| *expires > now);
        let forget_before = unix_ms().saturating_sub(millis(PRESENCE_KEEP));
        self.presence[shard]
            .lock()
            .retain(|_, entry| entry.online || entry.seen_unix_ms >= forget_before);
        if shard == 0 {
            self.reports
                .lock()
                .retain(|_, report| self.is_fresh(report, now));
        }
    }
}

#[async_trait::async_trait]
impl Router for MemoryRouter {
    async fn add_device(
        &self,
        mid: i64,
        key: &str,
        server: &str,
        platform: &str,
        lease: Duration,
    ) -> Result<()> {
        let inner = &*self.inner;
        let expires = expiry(Instant::now(), lease);
        let server: Arc<str> = Arc::from(server);
        let mut keys = inner.key_shard(key).lock();
        let entry = KeyEntry {
            mid,
            server: server.clone(),
            expires,
        };
        let (shared_key, previous) = match keys.get_key_value(key).map(|(k, _)| Arc::clone(k)) {
            Some(shared_key) => {
                let previous = keys.insert(Arc::clone(&shared_key), entry);
                (shared_key, previous)
            }
            None => {
                let shared_key: Arc<str> = Arc::from(key);
                keys.insert(Arc::clone(&shared_key), entry);
                (shared_key, None)
            }
        };
        if let Some(previous) = previous
            && previous.mid != mid
        {
            // The key changed hands: the old user must no longer list it.
            inner.drop_device(previous.mid, key, None);
        }
        let now_ms = unix_ms();
        inner.put_device(mid, &shared_key, server, expires, Some((platform, now_ms)));
        drop(keys);
        inner.touch(mid, now_ms);
        Ok(())
    }

    async fn remove(&self, mid: i64, key: &str, server: &str) -> Result<bool> {
        let inner = &*self.inner;
        let now = Instant::now();
        let mut keys = inner.key_shard(key).lock();
        let owned = keys
            .get(key)
            .filter(|entry| entry.mid == mid && *entry.server == *server)
            .map(|entry| entry.expires > now);
        let Some(live) = owned else {
            return Ok(false);
        };
        keys.remove(key);
        inner.drop_device(mid, key, Some(server));
        drop(keys);
        inner.ack_shard(key).lock().remove(key);
        if live {
            inner.touch(mid, unix_ms());
        }
        Ok(live)
    }

    async fn renew(&self, mid: i64, key: &str, server: &str, lease: Duration) -> Result<bool> {
        let inner = &*self.inner;
        let now = Instant::now();
        let mut keys = inner.key_shard(key).lock();
        let Some((shared_key, entry)) = keys.get_key_value(key) else {
            return Ok(false);
        };
        if entry.expires <= now {
            let stale_mid = entry.mid;
            keys.remove(key);
            inner.drop_device(stale_mid, key, None);
            return Ok(false);
        }
        if entry.mid != mid || *entry.server != *server {
            return Ok(false);
        }
        let (shared_key, server) = (Arc::clone(shared_key), entry.server.clone());
        let expires = expiry(now, lease);
        if let Some(entry) = keys.get_mut(key) {
            entry.expires = expires;
        }
        inner.put_device(mid, &shared_key, server, expires, None);
        drop(keys);
        inner.touch(mid, unix_ms());
        Ok(true)
    }

    async fn servers_of_keys(&self, keys: &[String]) -> Result<Vec<Option<String>>> {
        let inner = &*self.inner;
        let now = Instant::now();
        let servers = keys
            .iter()
            .map(|key| {
                let mut shard = inner.key_shard(key).lock();
                match shard.get(key.as_str()) {
                    Some(entry) if entry.expires > now => Some(entry.server.to_string()),
                    Some(_) => {
                        // Its device entry expired too; the sweep takes it.
                        shard.remove(key.as_str());
                        None
                    }
                    None => None,
                }
            })
            .collect();
        Ok(servers)
    }

    async fn set_acked(&self, mid: i64, key: &str, sync: u64, lease: Duration) -> Result<()> {
        let expires = expiry(Instant::now(), lease);
        let mut acks = self.inner.ack_shard(key).lock();
        match acks.get_mut(key) {
            Some(entry) if entry.0 == mid => *entry = (mid, entry.1.max(sync), expires),
            _ => {
                acks.insert(key.into(), (mid, sync, expires));
            }
        }
        Ok(())
    }

    async fn acked(&self, mid: i64, keys: &[String]) -> Result<Vec<u64>> {
        let now = Instant::now();
        Ok(keys
            .iter()
            .map(
                |key| match self.inner.ack_shard(key).lock().get(key.as_str()) {
                    Some(&(owner, sync, expires)) if owner == mid && expires > now => sync,
                    _ => 0,
                },
            )
            .collect())
    }

    async fn devices(&self, mids: &[i64]) -> Result<Vec<crate::Device>> {
        let inner = &*self.inner;
        let now = Instant::now();
        let mut seen = HashSet::with_capacity(mids.len());
        let mut found = Vec::new();
        for &mid in mids {
            if !seen.insert(mid) {
                continue;
            }
            let mut users = inner.user_shard(mid).lock();
            let Some(devices) = users.get_mut(&mid) else {
                continue;
            };
            devices.retain(|device| device.expires > now);
            if devices.is_empty() {
                users.remove(&mid);
                continue;
            }
            found.extend(devices.iter().map(|device| crate::Device {
                mid,
                key: device.key.to_string(),
                server: device.server.to_string(),
            }));
        }
        Ok(found)
    }

    async fn set_room_counts(&self, server: &str, counts: &HashMap<String, i32>) -> Result<()> {
        let report = Report {
            rooms: counts.clone(),
            updated_unix_ms: unix_ms(),
            at: Instant::now(),
        };
        self.inner.reports.lock().insert(server.to_owned(), report);
        Ok(())
    }

    async fn room_counts(&self) -> Result<HashMap<String, i64>> {
        let inner = &*self.inner;
        let now = Instant::now();
        let mut totals: HashMap<String, i64> = HashMap::new();
        let reports = inner.reports.lock();
        for report in reports.values().filter(|r| inner.is_fresh(r, now)) {
            for (room, &count) in &report.rooms {
                match totals.get_mut(room) {
                    Some(total) => *total += i64::from(count),
                    None => {
                        totals.insert(room.clone(), i64::from(count));
                    }
                }
            }
        }
        Ok(totals)
    }

    async fn server_reports(&self) -> Result<HashMap<String, ServerReport>> {
        let inner = &*self.inner;
        let now = Instant::now();
        let reports = inner.reports.lock();
        let fresh = reports
            .iter()
            .filter(|(_, report)| inner.is_fresh(report, now))
            .map(|(server, report)| {
                let report = ServerReport {
                    rooms: report.rooms.clone(),
                    updated_unix_ms: report.updated_unix_ms,
                };
                (server.clone(), report)
            })
            .collect();
        Ok(fresh)
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }

    async fn presence(&self, mid: i64) -> Result<Presence> {
        let inner = &*self.inner;
        let now = Instant::now();
        let devices = match inner.user_shard(mid).lock().get(&mid) {
            Some(devices) => devices
                .iter()
                .filter(|device| device.expires > now)
                .map(|device| DeviceInfo {
                    key: device.key.to_string(),
                    server: device.server.to_string(),
                    platform: device.platform.to_string(),
                    since_unix_ms: device.since_unix_ms,
                })
                .collect(),
            None => Vec::new(),
        };
        let last_seen_unix_ms = inner
            .presence_shard(mid)
            .lock()
            .get(&mid)
            .map(|entry| entry.seen_unix_ms);
        Ok(Presence {
            devices,
            last_seen_unix_ms,
        })
    }

    async fn settle_presence(&self, mid: i64) -> Result<Option<Transition>> {
        let inner = &*self.inner;
        let now = Instant::now();
        let now_ms = unix_ms();
        // The user's device shard stays locked until the state is recorded,
        // so no connect or disconnect of the user slips in between.
        let users = inner.user_shard(mid).lock();
        let live: Vec<&Device> = users
            .get(&mid)
            .map(|devices| devices.iter().filter(|d| d.expires > now).collect())
            .unwrap_or_default();
        let last_lease_end = live.iter().map(|d| d.expires).max();
        let mut presence = inner.presence_shard(mid).lock();
        let entry = presence.entry(mid).or_insert(PresenceEntry {
            online: false,
            seq: 0,
            seen_unix_ms: now_ms,
            check_at: None,
        });
        entry.check_at = last_lease_end;
        let online = !live.is_empty();
        if entry.online == online {
            return Ok(None);
        }
        entry.online = online;
        entry.seq += 1;
        Ok(Some(Transition {
            mid,
            state: if online {
                PresenceState::Online
            } else {
                PresenceState::Offline
            },
            seq: entry.seq,
            devices: u32::try_from(live.len()).unwrap_or(u32::MAX),
            last_seen_unix_ms: entry.seen_unix_ms,
            at_unix_ms: now_ms,
        }))
    }

    async fn presence_due(&self, limit: usize) -> Result<Vec<i64>> {
        let now = Instant::now();
        let mut due = Vec::new();
        for shard in &self.inner.presence {
            if due.len() >= limit {
                break;
            }
            let shard = shard.lock();
            due.extend(
                shard
                    .iter()
                    .filter(|(_, e)| e.online && e.check_at.is_some_and(|at| at <= now))
                    .map(|(mid, _)| *mid)
                    .take(limit - due.len()),
            );
        }
        Ok(due)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(60);

    fn stored(router: &MemoryRouter) -> (usize, usize) {
        let keys = router.inner.keys.iter().map(|s| s.lock().len()).sum();
        let users = router.inner.users.iter().map(|s| s.lock().len()).sum();
        (keys, users)
    }

    #[tokio::test(start_paused = true)]
    async fn sweep_drops_expired_entries_nobody_reads() {
        let router = MemoryRouter::new(Duration::from_secs(30));
        for i in 0..200 {
            router
                .add(i, &format!("k{i}"), "c1", Duration::from_secs(1))
                .await
                .unwrap();
        }
        router.add(1000, "kept", "c1", LEASE).await.unwrap();
        assert_eq!(stored(&router), (201, 201));

        // One full pass of the sweep after the short leases ended.
        tokio::time::sleep(Duration::from_secs(1) + SWEEP_TICK * (SHARDS as u32 + 1)).await;
        assert_eq!(stored(&router), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn sweep_stops_when_the_router_is_dropped() {
        let router = MemoryRouter::new(Duration::from_secs(30));
        let weak = Arc::downgrade(&router.inner);
        drop(router);
        tokio::time::sleep(SWEEP_TICK * 2).await;
        assert!(weak.upgrade().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn lease_ends_exactly_at_expiry() {
        let router = MemoryRouter::new(Duration::from_secs(30));
        router
            .add(1, "k", "c1", Duration::from_secs(10))
            .await
            .unwrap();
        tokio::time::advance(Duration::from_millis(9_999)).await;
        let keys = vec!["k".to_string()];
        assert_eq!(
            router.servers_of_keys(&keys).await.unwrap(),
            [Some("c1".into())]
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(router.servers_of_keys(&keys).await.unwrap(), [None]);
        assert!(!router.renew(1, "k", "c1", LEASE).await.unwrap());
    }

    #[tokio::test]
    async fn moving_a_key_to_another_user_drops_it_from_the_first() {
        let router = MemoryRouter::new(Duration::from_secs(30));
        router.add(1, "k", "c1", LEASE).await.unwrap();
        router.add(2, "k", "c2", LEASE).await.unwrap();
        assert!(router.keys_by_server(&[1]).await.unwrap().is_empty());
        let by_server = router.keys_by_server(&[2]).await.unwrap();
        assert_eq!(by_server, HashMap::from([("c2".into(), vec!["k".into()])]));
        // The old user's stale comet cannot remove or renew it.
        assert!(!router.remove(1, "k", "c1").await.unwrap());
        assert!(!router.renew(1, "k", "c2", LEASE).await.unwrap());
    }

    #[tokio::test]
    async fn works_without_a_runtime_sweeper() {
        let router = std::thread::spawn(|| MemoryRouter::new(Duration::from_secs(30)))
            .join()
            .unwrap();
        router.add(1, "k", "c1", LEASE).await.unwrap();
        assert_eq!(stored(&router), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn stale_reports_are_swept() {
        let router = MemoryRouter::new(Duration::from_secs(1));
        let counts = HashMap::from([("r".to_string(), 3)]);
        router.set_room_counts("c1", &counts).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1) + SWEEP_TICK * (SHARDS as u32 + 1)).await;
        assert!(router.inner.reports.lock().is_empty());
    }
}
