//! The ack timeout (im.md, "Devices"): a connected device that has not
//! acked a pushed inbox entry within `im.ack_timeout` gets NOTIFY sync (the
//! user's entries up to N are waiting: SYNC now) instead of the messages
//! again. Devices' ACKs are kept in the router, so any logic may take
//! them; this logic remembers what it pushed, and checks the router once
//! the timeout has passed.

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// The most connections tracked at once; pushes beyond it are not tracked
/// (their devices still catch up by a later MSG's sync or on reconnect).
const MAX_TRACKED: usize = 1 << 20;

/// A push to one connection not yet known to be acked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Pending {
    /// The connection's user.
    pub(crate) mid: i64,
    /// The connection's comet.
    pub(crate) server: String,
    /// The highest inbox entry pushed to it.
    pub(crate) sync: u64,
    /// When the oldest unchecked push went out.
    since: Instant,
}

/// What this logic pushed and has not yet checked, by connection key.
#[derive(Debug)]
pub(crate) struct Tracker {
    timeout: Duration,
    pending: Mutex<HashMap<String, Pending>>,
}

impl Tracker {
    pub(crate) fn new(timeout: Duration) -> Tracker {
        Tracker {
            timeout,
            pending: Mutex::default(),
        }
    }

    /// The time between two checks: a quarter of the timeout, at least
    /// 50 ms (a NOTIFY comes between 1 and 1.25 timeouts after the push).
    pub(crate) fn tick(&self) -> Duration {
        (self.timeout / 4).max(Duration::from_millis(50))
    }

    /// Records that inbox entry `sync` was pushed to connection `key`;
    /// returns false when too many connections are tracked already.
    pub(crate) fn pushed(
        &self,
        mid: i64,
        key: &str,
        server: &str,
        sync: u64,
        now: Instant,
    ) -> bool {
        let mut pending = self.pending.lock();
        if let Some(entry) = pending.get_mut(key)
            && entry.mid == mid
        {
            entry.sync = entry.sync.max(sync);
            entry.server = server.to_owned();
            return true;
        }
        if pending.len() >= MAX_TRACKED && !pending.contains_key(key) {
            return false;
        }
        pending.insert(
            key.to_owned(),
            Pending {
                mid,
                server: server.to_owned(),
                sync,
                since: now,
            },
        );
        true
    }

    /// Takes the pushes whose timeout has passed at `now`.
    pub(crate) fn due(&self, now: Instant) -> Vec<(String, Pending)> {
        let mut pending = self.pending.lock();
        let keys: Vec<String> = pending
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.since) >= self.timeout)
            .map(|(key, _)| key.clone())
            .collect();
        keys.into_iter()
            .filter_map(|key| pending.remove(&key).map(|p| (key, p)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_push_is_due_once_after_the_timeout_with_its_highest_sync() {
        let tracker = Tracker::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(tracker.pushed(1, "k", "c1", 3, t0));
        assert!(tracker.pushed(1, "k", "c1", 5, t0 + Duration::from_secs(4)));
        assert!(tracker.pushed(2, "other", "c2", 1, t0 + Duration::from_secs(6)));
        assert!(tracker.due(t0 + Duration::from_secs(9)).is_empty());
        let due = tracker.due(t0 + Duration::from_secs(10));
        assert_eq!(due.len(), 1, "the oldest push decides");
        assert_eq!((due[0].0.as_str(), due[0].1.sync), ("k", 5));
        assert!(
            tracker.due(t0 + Duration::from_secs(11)).is_empty(),
            "taken"
        );
        assert_eq!(tracker.due(t0 + Duration::from_secs(16))[0].0, "other");
        assert_eq!(tracker.tick(), Duration::from_millis(2500));
    }
}
