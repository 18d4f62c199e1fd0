//! The IM rate limits: SENDs per connection (`im.send_rate_per_conn`), per
//! user over all its devices (`im.send_rate_per_user`) and /im/v1 writes
//! per API token or client address (`im.api_write_rate`), each a keyed GCRA
//! limiter of the governor crate.
//!
//! The state lives in this process: with several logics, a user whose
//! devices reach different logics gets the per-user limit once per logic.
//! A refusal is decided before anything is stored, and says how long to
//! wait (`retry_ms`). Keys of connections, users and clients that went
//! quiet are dropped by a periodic pass ([`Limits::prune`]), so the maps
//! hold only the keys active within a bucket's refill time plus one period.

use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};
use rim_config::{ImConfig, RateLimit};

/// How often the keys of quiet connections, users and clients are dropped.
const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// Which limit refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// `im.send_rate_per_conn`: one connection's SENDs.
    Connection,
    /// `im.send_rate_per_user`: one user's SENDs over its devices.
    User,
    /// `im.api_write_rate`: one API token's (or client address's) writes.
    Api,
}

impl Limit {
    /// Returns the limit's name (its metric label).
    pub fn name(self) -> &'static str {
        match self {
            Limit::Connection => "connection",
            Limit::User => "user",
            Limit::Api => "api",
        }
    }

    /// Returns the config key of the limit's rate.
    fn key(self) -> &'static str {
        match self {
            Limit::Connection => "im.send_rate_per_conn",
            Limit::User => "im.send_rate_per_user",
            Limit::Api => "im.api_write_rate",
        }
    }
}

/// A request refused for being over a rate limit: nothing was done; the
/// same request may be made again after `retry`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("rate limited ({}): retry in {} ms", limit.key(), self.retry_ms())]
pub struct Limited {
    /// The limit the request is over.
    pub limit: Limit,
    /// How long until the limit lets one more request through.
    pub retry: Duration,
}

impl Limited {
    /// Returns the wait in milliseconds, rounded up and at least 1 (what
    /// a SEND_REPLY's `retry_ms` says).
    pub fn retry_ms(&self) -> u64 {
        let ms = self.retry.as_nanos().div_ceil(1_000_000);
        u64::try_from(ms).unwrap_or(u64::MAX).max(1)
    }

    /// Returns the wait in whole seconds, rounded up and at least 1 (what
    /// an HTTP `Retry-After` says).
    pub fn retry_secs(&self) -> u64 {
        self.retry_ms().div_ceil(1000)
    }
}

/// Who makes an /im/v1 write, for `im.api_write_rate`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ApiClient {
    /// A business server presenting the configured token (there is one
    /// token, so one bucket).
    Token,
    /// A client of an API without a token, by IP address.
    Addr(IpAddr),
}

/// One keyed limiter over governor's DashMap state.
type Keyed<K, C> = RateLimiter<K, DashMapStateStore<K>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// The IM rate limiters of this process; each is absent when its rate is 0.
pub(crate) struct Limits<C: Clock = DefaultClock> {
    clock: C,
    /// By (user, connection key): a key is unique per connection on its
    /// comet, and the user keeps two users' keys apart whatever they are.
    per_conn: Option<Keyed<(i64, String), C>>,
    per_user: Option<Keyed<i64, C>>,
    api: Option<Keyed<ApiClient, C>>,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("keys", &self.keys())
            .finish_non_exhaustive()
    }
}

impl Limits {
    /// Creates the limits `[im]` configures, on the monotonic clock.
    pub(crate) fn new(config: &ImConfig) -> Limits {
        Limits::with_clock(config, DefaultClock::default())
    }

    /// Drops quiet keys every 10 s until `limits` is dropped, on the
    /// current runtime.
    pub(crate) fn spawn_pruning(limits: &Arc<Limits>) {
        tokio::spawn(prune_every(Arc::downgrade(limits), PRUNE_EVERY));
    }
}

impl<C: Clock + Clone> Limits<C> {
    /// Creates the limits `[im]` configures, on `clock`.
    pub(crate) fn with_clock(config: &ImConfig, clock: C) -> Limits<C> {
        Limits {
            per_conn: keyed(config.send_limit_per_conn(), &clock),
            per_user: keyed(config.send_limit_per_user(), &clock),
            api: keyed(config.api_write_limit(), &clock),
            clock,
        }
    }

    /// Takes one SEND from connection `key` of user `mid`: first from the
    /// connection's limit, then from the user's. A SEND the user's limit
    /// refuses has still used the connection's cell (governor cannot give
    /// it back), which only makes a device at both limits wait a little
    /// longer.
    pub(crate) fn check_send(&self, mid: i64, key: &str) -> Result<(), Limited> {
        if let Some(per_conn) = &self.per_conn {
            self.check(per_conn, &(mid, key.to_owned()), Limit::Connection)?;
        }
        if let Some(per_user) = &self.per_user {
            self.check(per_user, &mid, Limit::User)?;
        }
        Ok(())
    }

    /// Takes one /im/v1 write of `client`.
    pub(crate) fn check_api(&self, client: &ApiClient) -> Result<(), Limited> {
        match &self.api {
            Some(api) => self.check(api, client, Limit::Api),
            None => Ok(()),
        }
    }

    fn check<K: Hash + Eq + Clone>(
        &self,
        limiter: &Keyed<K, C>,
        key: &K,
        limit: Limit,
    ) -> Result<(), Limited> {
        limiter.check_key(key).map_err(|not_until| Limited {
            limit,
            retry: not_until.wait_time_from(self.clock.now()),
        })
    }

    /// Drops every key whose bucket has refilled (it behaves like a new
    /// key) and gives the maps' spare room back.
    pub(crate) fn prune(&self) {
        fn prune<K: Hash + Eq + Clone, C: Clock>(limiter: &Option<Keyed<K, C>>) {
            if let Some(limiter) = limiter {
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
        }
        prune(&self.per_conn);
        prune(&self.per_user);
        prune(&self.api);
    }

    /// Returns how many keys each limiter holds: connection, user, API.
    pub(crate) fn keys(&self) -> [(Limit, usize); 3] {
        fn len<K: Hash + Eq + Clone, C: Clock>(limiter: &Option<Keyed<K, C>>) -> usize {
            limiter.as_ref().map_or(0, |l| l.len())
        }
        [
            (Limit::Connection, len(&self.per_conn)),
            (Limit::User, len(&self.per_user)),
            (Limit::Api, len(&self.api)),
        ]
    }
}

/// A keyed limiter of `limit` on `clock` (none when the limit is off).
fn keyed<K: Hash + Eq + Clone, C: Clock + Clone>(
    limit: Option<RateLimit>,
    clock: &C,
) -> Option<Keyed<K, C>> {
    limit.map(|limit| {
        let quota = Quota::per_second(limit.rate).allow_burst(limit.burst);
        RateLimiter::dashmap_with_clock(quota, clock.clone())
    })
}

/// Prunes `limits` every `period` until it is dropped.
async fn prune_every(limits: Weak<Limits>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(limits) = limits.upgrade() else {
            return;
        };
        limits.prune();
    }
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;

    use super::*;

    fn config(conn: (u32, u32), user: (u32, u32), api: (u32, u32)) -> ImConfig {
        ImConfig {
            send_rate_per_conn: conn.0,
            send_burst_per_conn: conn.1,
            send_rate_per_user: user.0,
            send_burst_per_user: user.1,
            api_write_rate: api.0,
            api_write_burst: api.1,
            ..ImConfig::default()
        }
    }

    #[test]
    fn a_connection_gets_its_burst_then_waits_one_cell() {
        let clock = FakeRelativeClock::default();
        let limits = Limits::with_clock(&config((10, 3), (0, 0), (0, 0)), clock.clone());
        for _ in 0..3 {
            limits.check_send(1, "k").unwrap();
        }
        let limited = limits.check_send(1, "k").unwrap_err();
        assert_eq!(limited.limit, Limit::Connection);
        // 10 per second: one cell every 100 ms.
        assert_eq!(limited.retry_ms(), 100);
        assert_eq!(limited.retry_secs(), 1);
        // Another connection of the same user is not affected (no user limit).
        limits.check_send(1, "other").unwrap();
        clock.advance(Duration::from_millis(100));
        limits.check_send(1, "k").unwrap();
        assert!(limits.check_send(1, "k").is_err());
    }

    #[test]
    fn the_user_limit_spans_connections_and_spares_other_users() {
        let clock = FakeRelativeClock::default();
        let limits = Limits::with_clock(&config((100, 100), (1, 4), (0, 0)), clock);
        for key in ["phone", "laptop", "phone", "laptop"] {
            limits.check_send(7, key).unwrap();
        }
        let limited = limits.check_send(7, "tablet").unwrap_err();
        assert_eq!(limited.limit, Limit::User);
        assert_eq!(limited.retry_ms(), 1000);
        limits.check_send(8, "phone").unwrap();
    }

    #[test]
    fn api_writes_are_limited_per_client() {
        let limits = Limits::with_clock(
            &config((0, 0), (0, 0), (1, 2)),
            FakeRelativeClock::default(),
        );
        let a = ApiClient::Addr([127, 0, 0, 1].into());
        let b = ApiClient::Addr([127, 0, 0, 2].into());
        limits.check_api(&a).unwrap();
        limits.check_api(&a).unwrap();
        assert_eq!(limits.check_api(&a).unwrap_err().limit, Limit::Api);
        limits.check_api(&b).unwrap();
        limits.check_api(&ApiClient::Token).unwrap();
        // Sends are not limited when their rates are 0.
        for _ in 0..1000 {
            limits.check_send(1, "k").unwrap();
        }
        assert_eq!(limits.keys().map(|(_, n)| n), [0, 0, 3]);
    }

    #[test]
    fn pruning_drops_the_keys_of_quiet_connections_and_users() {
        let clock = FakeRelativeClock::default();
        let limits = Limits::with_clock(&config((20, 40), (50, 100), (2000, 4000)), clock.clone());
        for conn in 0..10_000i64 {
            limits.check_send(conn, &format!("key-{conn}")).unwrap();
            limits
                .check_api(&ApiClient::Addr(
                    std::net::Ipv6Addr::from(conn as u128).into(),
                ))
                .unwrap();
        }
        assert_eq!(limits.keys().map(|(_, n)| n), [10_000, 10_000, 10_000]);
        // Still within the buckets' refill time: nothing is forgotten, so
        // a pruning pass cannot hand anyone a fresh burst.
        limits.prune();
        assert_eq!(limits.keys().map(|(_, n)| n), [10_000, 10_000, 10_000]);
        // Once every bucket has refilled, a pass drops them all but the
        // one still busy.
        clock.advance(Duration::from_secs(1));
        for _ in 0..40 {
            let _ = limits.check_send(-1, "busy");
        }
        clock.advance(Duration::from_millis(500));
        limits.prune();
        assert_eq!(limits.keys().map(|(_, n)| n), [1, 1, 0]);
        // Its bucket survived the pass: it has not got a fresh burst of 40.
        let passed = (0..40)
            .filter(|_| limits.check_send(-1, "busy").is_ok())
            .count();
        assert!(passed < 40, "{passed} of 40 passed");
    }

    #[tokio::test(start_paused = true)]
    async fn the_pruning_task_runs_until_the_limits_are_dropped() {
        let limits = Arc::new(Limits::new(&config((1, 1), (0, 0), (0, 0))));
        limits.check_send(1, "k").unwrap();
        let task = tokio::spawn(prune_every(Arc::downgrade(&limits), PRUNE_EVERY));
        drop(limits);
        tokio::time::timeout(PRUNE_EVERY * 3, task)
            .await
            .expect("the task ends within two periods of the drop")
            .unwrap();
    }
}
