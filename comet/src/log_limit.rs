//! Rate-limited log lines for events that a crowd of clients can cause at
//! once (every client's auth failing while logic is down, accepts failing
//! at the descriptor limit): at most one line per window, saying how many
//! events it stands for.

use std::sync::atomic::{AtomicU64, Ordering};

/// One line per `window_ms` at most.
#[derive(Debug)]
pub(crate) struct LogLimit {
    window_ms: u64,
    /// When the last line was allowed (ms on the caller's clock), plus one,
    /// so that 0 means never.
    last: AtomicU64,
    /// Events since the last allowed line.
    events: AtomicU64,
}

impl LogLimit {
    /// Allows one line per `window_ms`.
    pub(crate) const fn new(window_ms: u64) -> LogLimit {
        LogLimit {
            window_ms,
            last: AtomicU64::new(0),
            events: AtomicU64::new(0),
        }
    }

    /// Counts an event at `now_ms`; returns how many events the line to log
    /// now stands for, or `None` when this one is not to be logged.
    pub(crate) fn event(&self, now_ms: u64) -> Option<u64> {
        let events = self.events.fetch_add(1, Ordering::AcqRel) + 1;
        let last = self.last.load(Ordering::Acquire);
        let due = last == 0 || now_ms.saturating_sub(last - 1) >= self.window_ms;
        if due
            && self
                .last
                .compare_exchange(last, now_ms + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.events.fetch_sub(events, Ordering::AcqRel);
            Some(events)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_window_counting_what_it_stands_for() {
        let limit = LogLimit::new(10_000);
        assert_eq!(limit.event(0), Some(1), "the first event is logged");
        for t in 1..=500 {
            assert_eq!(limit.event(t), None);
        }
        assert_eq!(
            limit.event(10_000),
            Some(501),
            "the next window's line counts them"
        );
        assert_eq!(limit.event(10_001), None);
    }
}
