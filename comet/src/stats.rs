//! Counters of one comet, reported by the Stats RPC and, read at scrape
//! time, by `/metrics` (see `metrics.rs`).
//!
//! Everything on the per-frame path is a relaxed atomic add on a shard
//! picked by connection id, so connections on different cores rarely share
//! a cache line; nothing here grows with the number of connections.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rim_metrics::{Family, Histogram};

/// How a client is connected, as `/metrics` labels it (WSS apart from WS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Wire {
    Tcp = 0,
    Ws = 1,
    Wss = 2,
}

impl Wire {
    pub(crate) const ALL: [Wire; 3] = [Wire::Tcp, Wire::Ws, Wire::Wss];

    /// Returns the `transport` label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Wire::Tcp => "tcp",
            Wire::Ws => "ws",
            Wire::Wss => "wss",
        }
    }
}

/// The push RPCs, as `/metrics` labels them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Rpc {
    Push = 0,
    Room = 1,
    Broadcast = 2,
    Group = 3,
}

impl Rpc {
    pub(crate) const ALL: [Rpc; 4] = [Rpc::Push, Rpc::Room, Rpc::Broadcast, Rpc::Group];

    /// Returns the `rpc` label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Rpc::Push => "push",
            Rpc::Room => "room",
            Rpc::Broadcast => "broadcast",
            Rpc::Group => "group",
        }
    }
}

/// How a pushed frame reached the socket, as `/metrics` labels it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum WritePath {
    /// Written whole by the pushing task; the connection task not woken.
    Direct = 0,
    /// Begun by the pushing task, finished by the connection task.
    Partial = 1,
    /// Queued for the connection task.
    Queued = 2,
}

impl WritePath {
    pub(crate) const ALL: [WritePath; 3] =
        [WritePath::Direct, WritePath::Partial, WritePath::Queued];

    /// Returns the `path` label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            WritePath::Direct => "direct",
            WritePath::Partial => "partial",
            WritePath::Queued => "queued",
        }
    }
}

/// The `rpc` label set of the RPC duration histogram.
pub(crate) type RpcLabels = [(&'static str, &'static str); 1];

/// Histograms of how long push RPCs take, by RPC.
pub(crate) type RpcSeconds = Family<RpcLabels, Histogram, fn() -> Histogram>;

fn rpc_histogram() -> Histogram {
    Histogram::new(rim_metrics::latency_buckets())
}

/// Monotonic counters and gauges, updated with relaxed atomics.
#[derive(Debug)]
pub(crate) struct Stats {
    /// Authenticated connections by wire (gauges).
    pub(crate) connections: [AtomicU64; 3],
    pub(crate) auth_ok: AtomicU64,
    /// Logic refused the token.
    pub(crate) auth_refused: AtomicU64,
    /// Logic failed, assigned no key or did not answer in time.
    pub(crate) auth_failed: AtomicU64,
    pub(crate) handshake_timeouts: AtomicU64,
    pub(crate) refused_connections: AtomicU64,
    pub(crate) bad_frames: AtomicU64,
    /// Upstream frames (ops the comet does not handle) logic took.
    pub(crate) upstream_ok: AtomicU64,
    /// Upstream frames logic refused or did not take in time.
    pub(crate) upstream_failed: AtomicU64,
    /// IM SENDs answered here with code 3 (over im.send_rate_per_conn).
    pub(crate) upstream_limited: AtomicU64,
    pub(crate) dropped_frames: AtomicU64,
    pub(crate) slow_consumer_closes: AtomicU64,
    /// Push RPCs received, by [`Rpc`].
    pub(crate) rpcs: [AtomicU64; 4],
    /// Recipients of push RPCs: delivered, filtered, missing, dropped.
    pub(crate) recipients: [AtomicU64; 4],
    /// Delivered pushes by [`WritePath`].
    pub(crate) push_writes: [AtomicU64; 3],
    pub(crate) rpc_seconds: RpcSeconds,
    pub(crate) traffic: Traffic,
}

impl Default for Stats {
    fn default() -> Self {
        let stats = Stats {
            connections: Default::default(),
            auth_ok: AtomicU64::new(0),
            auth_refused: AtomicU64::new(0),
            auth_failed: AtomicU64::new(0),
            handshake_timeouts: AtomicU64::new(0),
            refused_connections: AtomicU64::new(0),
            bad_frames: AtomicU64::new(0),
            upstream_ok: AtomicU64::new(0),
            upstream_failed: AtomicU64::new(0),
            upstream_limited: AtomicU64::new(0),
            dropped_frames: AtomicU64::new(0),
            slow_consumer_closes: AtomicU64::new(0),
            rpcs: Default::default(),
            recipients: Default::default(),
            push_writes: Default::default(),
            rpc_seconds: Family::new_with_constructor(rpc_histogram),
            traffic: Traffic::default(),
        };
        // Histograms exposed from the start (an empty family is not).
        for rpc in Rpc::ALL {
            let _ = stats.rpc_seconds.get_or_create(&[("rpc", rpc.as_str())]);
        }
        stats
    }
}

impl Stats {
    /// Returns the connection gauge of a wire.
    pub(crate) fn connections(&self, wire: Wire) -> &AtomicU64 {
        &self.connections[wire as usize]
    }

    /// Records one push RPC that took `took`.
    pub(crate) fn rpc(&self, rpc: Rpc, took: Duration) {
        incr(&self.rpcs[rpc as usize]);
        self.rpc_seconds
            .get_or_create(&[("rpc", rpc.as_str())])
            .observe(took.as_secs_f64());
    }
}

/// Shards of the traffic counters; a connection always uses the same one.
const SHARDS: usize = 16;

/// Frames and bytes in and out, by wire, sharded by connection id.
#[derive(Debug, Default)]
pub(crate) struct Traffic {
    shards: [Shard; SHARDS],
}

/// One shard: [wire] × (frames in, bytes in, frames out, bytes out), on
/// cache lines of its own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard {
    counters: [[AtomicU64; 4]; 3],
}

const FRAMES_IN: usize = 0;
const BYTES_IN: usize = 1;
const FRAMES_OUT: usize = 2;
const BYTES_OUT: usize = 3;

/// Totals of one wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct WireTotals {
    pub(crate) frames_in: u64,
    pub(crate) bytes_in: u64,
    pub(crate) frames_out: u64,
    pub(crate) bytes_out: u64,
}

impl Traffic {
    fn shard(&self, conn: u64, wire: Wire) -> &[AtomicU64; 4] {
        &self.shards[(conn % SHARDS as u64) as usize].counters[wire as usize]
    }

    /// Counts one frame of `bytes` (header included) read from a client.
    pub(crate) fn read(&self, conn: u64, wire: Wire, bytes: usize) {
        let shard = self.shard(conn, wire);
        incr(&shard[FRAMES_IN]);
        add(&shard[BYTES_IN], bytes as u64);
    }

    /// Counts one write of `frames` frames (an op-9 batch is one) and `bytes`.
    pub(crate) fn written(&self, conn: u64, wire: Wire, frames: usize, bytes: usize) {
        let shard = self.shard(conn, wire);
        add(&shard[FRAMES_OUT], frames as u64);
        add(&shard[BYTES_OUT], bytes as u64);
    }

    /// Sums the shards of one wire.
    pub(crate) fn totals(&self, wire: Wire) -> WireTotals {
        let mut totals = WireTotals::default();
        for shard in &self.shards {
            let c = &shard.counters[wire as usize];
            totals.frames_in += get(&c[FRAMES_IN]);
            totals.bytes_in += get(&c[BYTES_IN]);
            totals.frames_out += get(&c[FRAMES_OUT]);
            totals.bytes_out += get(&c[BYTES_OUT]);
        }
        totals
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traffic_sums_every_shard_per_wire() {
        let traffic = Traffic::default();
        for conn in 0..40 {
            traffic.read(conn, Wire::Tcp, 20);
        }
        traffic.written(3, Wire::Wss, 2, 100);
        traffic.written(4, Wire::Wss, 1, 30);
        assert_eq!(
            traffic.totals(Wire::Tcp),
            WireTotals {
                frames_in: 40,
                bytes_in: 800,
                ..WireTotals::default()
            }
        );
        assert_eq!(
            traffic.totals(Wire::Wss),
            WireTotals {
                frames_out: 3,
                bytes_out: 130,
                ..WireTotals::default()
            }
        );
        assert_eq!(traffic.totals(Wire::Ws), WireTotals::default());
    }
}
