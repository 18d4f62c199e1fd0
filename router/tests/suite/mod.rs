//! The behaviour every [`Router`] backend must have, written once.
//!
//! Each test file builds its backend with a fixture
//! `async fn(max_age: Duration) -> Arc<dyn Router>` and expands
//! [`router_tests!`] with it, which makes one `#[tokio::test]` per behaviour.
//! Fixtures of shared backends (Redis) give each router a key prefix of its
//! own, so tests run in parallel and reruns against a long-lived server never
//! see each other's data.
//!
//! Expiry is tested in real time with short leases: only "gone after the
//! lease plus a margin" is asserted, never how long anything took.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{StreamExt, TryStreamExt, stream};
use rim_router::{PresenceState, Router};

/// Max age of room reports for every test but the staleness one.
pub const MAX_AGE: Duration = Duration::from_secs(30);
/// Max age of room reports for the staleness test.
pub const SHORT_MAX_AGE: Duration = Duration::from_secs(1);
/// A lease that does not end during a test.
const LEASE: Duration = Duration::from_secs(60);
/// A lease that a test outlives on purpose.
const SHORT_LEASE: Duration = Duration::from_millis(300);
/// Slack after a lease or max age before asserting it ended.
const MARGIN: Duration = Duration::from_millis(700);

/// Makes one `#[tokio::test]` per behaviour, building each router with `$make`
/// and putting the given attributes (e.g. `#[ignore = "..."]`) on every test.
macro_rules! router_tests {
    ($make:path $(, #[$attr:meta])* $(,)?) => {
        $crate::suite::router_tests!(@each $make, [$(#[$attr])*],
            add_then_look_up_by_key_and_by_user: MAX_AGE,
            re_adding_a_key_moves_it: MAX_AGE,
            remove_by_owner: MAX_AGE,
            remove_by_stale_server_does_nothing: MAX_AGE,
            renew_by_owner_extends_the_lease: MAX_AGE,
            renew_by_non_owner_returns_false: MAX_AGE,
            lease_expires: MAX_AGE,
            expired_user_entries_are_not_returned: MAX_AGE,
            room_counts_sum_over_servers: MAX_AGE,
            stale_room_report_is_ignored: SHORT_MAX_AGE,
            replacing_a_report_drops_old_rooms: MAX_AGE,
            unknown_keys_and_users_are_absent: MAX_AGE,
            large_batches: MAX_AGE,
            odd_characters_in_ids: MAX_AGE,
            ping: MAX_AGE,
            ack_positions_are_monotonic_and_end_with_the_session: MAX_AGE,
            presence_shows_platform_start_and_last_seen: MAX_AGE,
            settling_announces_each_transition_once: MAX_AGE,
            sessions_ending_without_disconnect_come_due: MAX_AGE,
        );
    };
    (@each $make:path, $attrs:tt, $($name:ident: $age:ident),* $(,)?) => {
        $( $crate::suite::router_tests!(@one $make, $attrs, $name, $age); )*
    };
    (@one $make:path, [$(#[$attr:meta])*], $name:ident, $age:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])*
        async fn $name() {
            let router = $make($crate::suite::$age).await;
            $crate::suite::$name(&*router).await;
        }
    };
}
pub(crate) use router_tests;

/// A key prefix no other test or run uses.
#[allow(dead_code, reason = "used by the Redis suites only")]
pub fn unique_prefix() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock before 1970")
        .as_nanos();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("rimtest-{}-{nanos}-{n}", std::process::id())
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn some(server: &str) -> Option<String> {
    Some(server.to_string())
}

/// A keys_by_server answer in a comparable form (sorted servers and keys).
fn sorted(by_server: HashMap<String, Vec<String>>) -> BTreeMap<String, Vec<String>> {
    by_server
        .into_iter()
        .map(|(server, mut keys)| {
            keys.sort();
            (server, keys)
        })
        .collect()
}

fn expect(pairs: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
    pairs
        .iter()
        .map(|(server, keys)| {
            let mut keys = strings(keys);
            keys.sort();
            (server.to_string(), keys)
        })
        .collect()
}

async fn by_server(router: &dyn Router, mids: &[i64]) -> BTreeMap<String, Vec<String>> {
    sorted(router.keys_by_server(mids).await.expect("keys_by_server"))
}

async fn servers(router: &dyn Router, keys: &[&str]) -> Vec<Option<String>> {
    router
        .servers_of_keys(&strings(keys))
        .await
        .expect("servers_of_keys")
}

fn counts(pairs: &[(&str, i32)]) -> HashMap<String, i32> {
    pairs
        .iter()
        .map(|(room, n)| (room.to_string(), *n))
        .collect()
}

fn totals(pairs: &[(&str, i64)]) -> HashMap<String, i64> {
    pairs
        .iter()
        .map(|(room, n)| (room.to_string(), *n))
        .collect()
}

/// A user with devices on two comets is found by key and by user, grouped by comet.
pub async fn add_then_look_up_by_key_and_by_user(r: &dyn Router) {
    r.add(1, "k1", "c1", LEASE).await.unwrap();
    r.add(1, "k2", "c2", LEASE).await.unwrap();
    r.add(2, "k3", "c1", LEASE).await.unwrap();

    assert_eq!(
        servers(r, &["k2", "nope", "k1", "k3"]).await,
        [some("c2"), None, some("c1"), some("c1")]
    );
    assert_eq!(
        by_server(r, &[1]).await,
        expect(&[("c1", &["k1"]), ("c2", &["k2"])])
    );
    // Repeated mids do not repeat keys.
    assert_eq!(
        by_server(r, &[1, 2, 1]).await,
        expect(&[("c1", &["k1", "k3"]), ("c2", &["k2"])])
    );
    // Per user: each connection once, with its user and comet.
    let mut devices: Vec<(i64, String, String)> = r
        .devices(&[2, 1, 2, 9])
        .await
        .expect("devices")
        .into_iter()
        .map(|d| (d.mid, d.key, d.server))
        .collect();
    devices.sort();
    let owned = |mid: i64, key: &str, server: &str| (mid, key.to_owned(), server.to_owned());
    assert_eq!(
        devices,
        [
            owned(1, "k1", "c1"),
            owned(1, "k2", "c2"),
            owned(2, "k3", "c1")
        ]
    );
}

/// Re-adding a key moves it to the new comet (and to the new user), and the
/// old owner can no longer remove or renew it.
pub async fn re_adding_a_key_moves_it(r: &dyn Router) {
    r.add(1, "k", "c1", LEASE).await.unwrap();
    r.add(1, "k", "c2", LEASE).await.unwrap();
    assert_eq!(servers(r, &["k"]).await, [some("c2")]);
    assert_eq!(by_server(r, &[1]).await, expect(&[("c2", &["k"])]));

    assert!(!r.remove(1, "k", "c1").await.unwrap());
    assert!(!r.renew(1, "k", "c1", LEASE).await.unwrap());
    assert_eq!(servers(r, &["k"]).await, [some("c2")]);

    r.add(2, "k", "c3", LEASE).await.unwrap();
    assert_eq!(servers(r, &["k"]).await, [some("c3")]);
    assert_eq!(by_server(r, &[1]).await, expect(&[]));
    assert_eq!(by_server(r, &[2]).await, expect(&[("c3", &["k"])]));
    assert!(
        !r.remove(1, "k", "c3").await.unwrap(),
        "removed by the old user"
    );
    assert_eq!(servers(r, &["k"]).await, [some("c3")]);
}

/// The owning comet removes a session; a second remove finds nothing.
pub async fn remove_by_owner(r: &dyn Router) {
    r.add(1, "k1", "c1", LEASE).await.unwrap();
    r.add(1, "k2", "c1", LEASE).await.unwrap();
    assert!(r.remove(1, "k1", "c1").await.unwrap());
    assert_eq!(servers(r, &["k1", "k2"]).await, [None, some("c1")]);
    assert_eq!(by_server(r, &[1]).await, expect(&[("c1", &["k2"])]));
    assert!(!r.remove(1, "k1", "c1").await.unwrap());

    assert!(r.remove(1, "k2", "c1").await.unwrap());
    assert_eq!(by_server(r, &[1]).await, expect(&[]));
}

/// A comet that lost the session (the key reconnected elsewhere) cannot delete it.
pub async fn remove_by_stale_server_does_nothing(r: &dyn Router) {
    r.add(1, "k", "c1", LEASE).await.unwrap();
    r.add(1, "k", "c2", LEASE).await.unwrap();
    assert!(!r.remove(1, "k", "c1").await.unwrap());
    assert!(
        !r.remove(2, "k", "c2").await.unwrap(),
        "removed by another user"
    );
    assert_eq!(servers(r, &["k"]).await, [some("c2")]);
    assert_eq!(by_server(r, &[1]).await, expect(&[("c2", &["k"])]));
}

/// The owner's renewal outlives the original lease.
pub async fn renew_by_owner_extends_the_lease(r: &dyn Router) {
    r.add(1, "k", "c1", SHORT_LEASE).await.unwrap();
    assert!(r.renew(1, "k", "c1", LEASE).await.unwrap());
    tokio::time::sleep(SHORT_LEASE + MARGIN).await;
    assert_eq!(servers(r, &["k"]).await, [some("c1")]);
    assert_eq!(by_server(r, &[1]).await, expect(&[("c1", &["k"])]));
}

/// Another comet, another user or an unknown key cannot renew, and a failed
/// renewal does not extend anything.
pub async fn renew_by_non_owner_returns_false(r: &dyn Router) {
    r.add(1, "k", "c1", SHORT_LEASE).await.unwrap();
    assert!(!r.renew(1, "k", "c2", LEASE).await.unwrap());
    assert!(!r.renew(2, "k", "c1", LEASE).await.unwrap());
    assert!(!r.renew(1, "unknown", "c1", LEASE).await.unwrap());
    tokio::time::sleep(SHORT_LEASE + MARGIN).await;
    assert_eq!(servers(r, &["k", "unknown"]).await, [None, None]);
    assert_eq!(by_server(r, &[1, 2]).await, expect(&[]));
}

/// A session nobody renews is gone after its lease, for every operation.
pub async fn lease_expires(r: &dyn Router) {
    r.add(1, "k", "c1", SHORT_LEASE).await.unwrap();
    assert_eq!(servers(r, &["k"]).await, [some("c1")]);
    tokio::time::sleep(SHORT_LEASE + MARGIN).await;
    assert_eq!(servers(r, &["k"]).await, [None]);
    assert_eq!(by_server(r, &[1]).await, expect(&[]));
    assert!(!r.renew(1, "k", "c1", LEASE).await.unwrap());
    assert!(!r.remove(1, "k", "c1").await.unwrap());
    // The key can be used again.
    r.add(1, "k", "c2", LEASE).await.unwrap();
    assert_eq!(by_server(r, &[1]).await, expect(&[("c2", &["k"])]));
}

/// One device's lease ending does not hide the user's other devices.
pub async fn expired_user_entries_are_not_returned(r: &dyn Router) {
    r.add(1, "old", "c1", SHORT_LEASE).await.unwrap();
    r.add(1, "new", "c2", LEASE).await.unwrap();
    tokio::time::sleep(SHORT_LEASE + MARGIN).await;
    assert_eq!(by_server(r, &[1]).await, expect(&[("c2", &["new"])]));
    assert_eq!(servers(r, &["old", "new"]).await, [None, some("c2")]);
    // Again, after the first read dropped the expired entry.
    assert_eq!(by_server(r, &[1]).await, expect(&[("c2", &["new"])]));
    // A new device after the expiry sits next to the survivor.
    r.add(1, "newer", "c1", LEASE).await.unwrap();
    assert_eq!(
        by_server(r, &[1]).await,
        expect(&[("c1", &["newer"]), ("c2", &["new"])])
    );
}

/// Room counts are summed over comets; each comet's report is kept with its time.
pub async fn room_counts_sum_over_servers(r: &dyn Router) {
    let before = unix_ms();
    r.set_room_counts("c1", &counts(&[("a", 3), ("b", 1)]))
        .await
        .unwrap();
    r.set_room_counts("c2", &counts(&[("a", 2), ("c", 5)]))
        .await
        .unwrap();
    let after = unix_ms();

    assert_eq!(
        r.room_counts().await.unwrap(),
        totals(&[("a", 5), ("b", 1), ("c", 5)])
    );
    let reports = r.server_reports().await.unwrap();
    let mut servers: Vec<&String> = reports.keys().collect();
    servers.sort();
    assert_eq!(servers, ["c1", "c2"]);
    assert_eq!(reports["c1"].rooms, counts(&[("a", 3), ("b", 1)]));
    assert_eq!(reports["c2"].rooms, counts(&[("a", 2), ("c", 5)]));
    for report in reports.values() {
        assert!(
            (before..=after).contains(&report.updated_unix_ms),
            "report time {} outside {before}..={after}",
            report.updated_unix_ms
        );
    }
}

/// A report older than the max age no longer counts (router built with [`SHORT_MAX_AGE`]).
pub async fn stale_room_report_is_ignored(r: &dyn Router) {
    r.set_room_counts("c1", &counts(&[("a", 3), ("b", 1)]))
        .await
        .unwrap();
    tokio::time::sleep(SHORT_MAX_AGE + MARGIN).await;
    r.set_room_counts("c2", &counts(&[("a", 2)])).await.unwrap();
    assert_eq!(r.room_counts().await.unwrap(), totals(&[("a", 2)]));
    let reports = r.server_reports().await.unwrap();
    assert_eq!(reports.keys().collect::<Vec<_>>(), ["c2"]);
}

/// A new report replaces the comet's previous one, rooms it no longer has included.
pub async fn replacing_a_report_drops_old_rooms(r: &dyn Router) {
    r.set_room_counts("c1", &counts(&[("a", 1), ("b", 2)]))
        .await
        .unwrap();
    r.set_room_counts("c1", &counts(&[("b", 5)])).await.unwrap();
    assert_eq!(r.room_counts().await.unwrap(), totals(&[("b", 5)]));
    assert_eq!(
        r.server_reports().await.unwrap()["c1"].rooms,
        counts(&[("b", 5)])
    );

    r.set_room_counts("c1", &HashMap::new()).await.unwrap();
    assert_eq!(r.room_counts().await.unwrap(), totals(&[]));
    let reports = r.server_reports().await.unwrap();
    assert!(reports["c1"].rooms.is_empty(), "{reports:?}");
}

/// Unknown keys and users, and empty inputs, give None and empty answers.
pub async fn unknown_keys_and_users_are_absent(r: &dyn Router) {
    assert_eq!(servers(r, &["x", "y"]).await, [None, None]);
    assert_eq!(servers(r, &[]).await, Vec::<Option<String>>::new());
    assert_eq!(by_server(r, &[404, 405]).await, expect(&[]));
    assert_eq!(by_server(r, &[]).await, expect(&[]));
    assert!(!r.remove(404, "x", "c1").await.unwrap());
    assert!(!r.renew(404, "x", "c1", LEASE).await.unwrap());
    assert_eq!(r.room_counts().await.unwrap(), totals(&[]));
    assert!(r.server_reports().await.unwrap().is_empty());
}

/// 2,000 keys of 1,000 users on four comets come back in one call each way.
pub async fn large_batches(r: &dyn Router) {
    const USERS: i64 = 1000;
    const COMETS: i64 = 4;
    let sessions: Vec<(i64, String, String)> = (0..2 * USERS)
        .map(|i| {
            (
                i % USERS,
                format!("key-{i}"),
                format!("comet-{}", i % COMETS),
            )
        })
        .collect();
    stream::iter(&sessions)
        .map(|(mid, key, server)| r.add(*mid, key, server, LEASE))
        .buffer_unordered(64)
        .try_collect::<Vec<()>>()
        .await
        .unwrap();

    let mut keys: Vec<String> = sessions.iter().map(|(_, key, _)| key.clone()).collect();
    keys.push("missing".into());
    let found = r.servers_of_keys(&keys).await.unwrap();
    let mut wanted: Vec<Option<String>> = sessions.iter().map(|(_, _, s)| some(s)).collect();
    wanted.push(None);
    assert_eq!(found, wanted);

    let mids: Vec<i64> = (0..USERS).collect();
    let got = by_server(r, &mids).await;
    let mut want: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (_, key, server) in &sessions {
        want.entry(server.clone()).or_default().push(key.clone());
    }
    for keys in want.values_mut() {
        keys.sort();
    }
    assert_eq!(got, want);
}

/// Separators and braces in keys, servers and rooms, and extreme mids, are just data.
pub async fn odd_characters_in_ids(r: &dyn Router) {
    let key = "a{b}c|d:e";
    let server = "comet|1:{x}";
    for mid in [-1, 0, i64::MAX, i64::MIN] {
        r.add(mid, key, server, LEASE).await.unwrap();
        assert_eq!(servers(r, &[key]).await, [some(server)]);
        assert_eq!(by_server(r, &[mid]).await, expect(&[(server, &[key])]));
        assert!(!r.remove(mid, key, "comet").await.unwrap());
        assert!(r.renew(mid, key, server, LEASE).await.unwrap());
        assert!(r.remove(mid, key, server).await.unwrap());
        assert_eq!(servers(r, &[key]).await, [None]);
    }
    let rooms = counts(&[("live://1000 {x}|y", 2), ("t", 1), ("r:t", 4), ("", 3)]);
    r.set_room_counts(server, &rooms).await.unwrap();
    assert_eq!(r.server_reports().await.unwrap()[server].rooms, rooms);
}

/// The backend answers a ping.
pub async fn ping(r: &dyn Router) {
    r.ping().await.unwrap();
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock before 1970")
        .as_millis() as i64
}

/// A connection's IM ack position only moves forward, is per connection of
/// its user, and goes with the session.
pub async fn ack_positions_are_monotonic_and_end_with_the_session(r: &dyn Router) {
    r.add(1, "k1", "c1", LEASE).await.unwrap();
    r.add(1, "k2", "c1", LEASE).await.unwrap();
    let keys = strings(&["k1", "k2", "nope"]);
    assert_eq!(r.acked(1, &keys).await.unwrap(), [0, 0, 0]);
    r.set_acked(1, "k1", 5, LEASE).await.unwrap();
    r.set_acked(1, "k1", 3, LEASE).await.unwrap();
    r.set_acked(1, "k2", 2, LEASE).await.unwrap();
    assert_eq!(r.acked(1, &keys).await.unwrap(), [5, 2, 0]);
    assert_eq!(r.acked(2, &keys[..1]).await.unwrap(), [0], "another user's");
    assert!(r.remove(1, "k1", "c1").await.unwrap());
    assert_eq!(r.acked(1, &keys).await.unwrap(), [0, 2, 0]);
}

/// The presence query shows each live connection with its platform, comet
/// and start, and when the user was last seen (kept after it went offline).
pub async fn presence_shows_platform_start_and_last_seen(r: &dyn Router) {
    let nobody = r.presence(7).await.unwrap();
    assert!(nobody.devices.is_empty());
    assert_eq!(nobody.last_seen_unix_ms, None);

    let before = unix_ms();
    r.add_device(7, "phone", "c1", "ios|x", LEASE)
        .await
        .unwrap();
    r.add_device(7, "laptop", "c2", "web", LEASE).await.unwrap();
    r.add(7, "old", "c2", SHORT_LEASE).await.unwrap();
    let after = unix_ms();
    tokio::time::sleep(SHORT_LEASE + MARGIN).await;
    let presence = r.presence(7).await.unwrap();
    let mut devices = presence.devices.clone();
    devices.sort_by(|a, b| a.key.cmp(&b.key));
    let shown: Vec<(&str, &str, &str)> = devices
        .iter()
        .map(|d| (d.key.as_str(), d.server.as_str(), d.platform.as_str()))
        .collect();
    assert_eq!(shown, [("laptop", "c2", "web"), ("phone", "c1", "ios|x")]);
    for device in &devices {
        assert!(
            (before..=after).contains(&device.since_unix_ms),
            "since {} outside {before}..={after}",
            device.since_unix_ms
        );
    }
    let seen = presence.last_seen_unix_ms.expect("last seen");
    assert!((before..=after).contains(&seen), "{seen}");

    // A renewal keeps the start; removing every device keeps last seen.
    assert!(r.renew(7, "phone", "c1", LEASE).await.unwrap());
    let renewed = r.presence(7).await.unwrap();
    let phone = renewed.devices.iter().find(|d| d.key == "phone").unwrap();
    assert_eq!(phone.platform, "ios|x");
    assert!(phone.since_unix_ms <= after);
    let removing = unix_ms();
    assert!(r.remove(7, "phone", "c1").await.unwrap());
    assert!(r.remove(7, "laptop", "c2").await.unwrap());
    let gone = r.presence(7).await.unwrap();
    assert!(gone.devices.is_empty(), "{gone:?}");
    let seen = gone.last_seen_unix_ms.expect("last seen after removal");
    assert!(seen >= removing, "{seen} < {removing}");
}

/// Settling moves the announced state only on a real change, numbers the
/// transitions, and of concurrent settles exactly one wins each transition.
pub async fn settling_announces_each_transition_once(r: &dyn Router) {
    assert_eq!(r.settle_presence(8).await.unwrap(), None, "never seen");
    r.add_device(8, "k1", "c1", "android", LEASE).await.unwrap();
    r.add_device(8, "k2", "c2", "web", LEASE).await.unwrap();

    let settles = (0..8).map(|_| r.settle_presence(8));
    let won: Vec<_> = futures::future::join_all(settles)
        .await
        .into_iter()
        .filter_map(|result| result.unwrap())
        .collect();
    assert_eq!(won.len(), 1, "{won:?}");
    let online = won[0];
    assert_eq!((online.mid, online.state), (8, PresenceState::Online));
    assert_eq!((online.seq, online.devices), (1, 2));
    assert_eq!(r.settle_presence(8).await.unwrap(), None);

    // One device left: still online.
    assert!(r.remove(8, "k1", "c1").await.unwrap());
    assert_eq!(r.settle_presence(8).await.unwrap(), None);
    // The last one gone, and back before anyone settled: nothing to announce.
    assert!(r.remove(8, "k2", "c2").await.unwrap());
    r.add_device(8, "k2", "c1", "web", LEASE).await.unwrap();
    assert_eq!(r.settle_presence(8).await.unwrap(), None);

    assert!(r.remove(8, "k2", "c1").await.unwrap());
    let settles = (0..8).map(|_| r.settle_presence(8));
    let won: Vec<_> = futures::future::join_all(settles)
        .await
        .into_iter()
        .filter_map(|result| result.unwrap())
        .collect();
    assert_eq!(won.len(), 1, "{won:?}");
    let offline = won[0];
    assert_eq!(offline.state, PresenceState::Offline);
    assert_eq!((offline.seq, offline.devices), (2, 0));
    assert!(offline.last_seen_unix_ms <= offline.at_unix_ms);
    assert_eq!(r.settle_presence(8).await.unwrap(), None);
}

/// A user announced online whose only session ends by its lease (no
/// remove) comes due, and settling it announces offline once.
pub async fn sessions_ending_without_disconnect_come_due(r: &dyn Router) {
    r.add_device(9, "k", "c1", "ios", SHORT_LEASE)
        .await
        .unwrap();
    r.add_device(10, "k10", "c1", "ios", LEASE).await.unwrap();
    assert_eq!(
        r.settle_presence(9).await.unwrap().map(|t| t.state),
        Some(PresenceState::Online)
    );
    assert!(r.settle_presence(10).await.unwrap().is_some());
    assert!(r.presence_due(100).await.unwrap().is_empty());

    tokio::time::sleep(SHORT_LEASE + MARGIN).await;
    assert_eq!(r.presence_due(100).await.unwrap(), [9]);
    let offline = r.settle_presence(9).await.unwrap().expect("offline");
    assert_eq!(
        (offline.state, offline.devices),
        (PresenceState::Offline, 0)
    );
    assert!(r.presence_due(100).await.unwrap().is_empty());
    assert!(r.presence(9).await.unwrap().devices.is_empty());
}
