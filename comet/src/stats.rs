//! Counters of one comet, reported by the Stats RPC (and, later, /metrics).

use std::sync::atomic::{AtomicU64, Ordering};

/// Monotonic counters and gauges, updated with relaxed atomics.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) tcp_connections: AtomicU64,
    pub(crate) ws_connections: AtomicU64,
    pub(crate) auth_ok: AtomicU64,
    pub(crate) auth_failed: AtomicU64,
    pub(crate) handshake_timeouts: AtomicU64,
    pub(crate) refused_connections: AtomicU64,
    pub(crate) bad_frames: AtomicU64,
    pub(crate) dropped_frames: AtomicU64,
    pub(crate) slow_consumer_closes: AtomicU64,
}

/// Adds one to a counter.
pub(crate) fn incr(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Adds `n` to a counter.
pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Subtracts one from a gauge.
pub(crate) fn decr(gauge: &AtomicU64) {
    gauge.fetch_sub(1, Ordering::Relaxed);
}

/// Reads a counter.
pub(crate) fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}
