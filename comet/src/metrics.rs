//! The comet's Prometheus metrics: a collector that reads the comet's own
//! atomics at scrape time (nothing is added to the per-frame path for it),
//! and the push RPC duration histograms.

use std::sync::Arc;

use rim_metrics::{DescriptorEncoder, Registry, counter, counter_family, gauge, gauge_family};

use crate::comet::{Comet, Inner};
use crate::stats::{Rpc, Wire, WritePath, get};

impl Comet {
    /// Registers this comet's metrics (`rim_comet_*`) in `registry`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register_collector(Box::new(Collector(Arc::clone(&self.inner))));
        registry.register(
            "rim_comet_push_rpc_duration_seconds",
            "Time a push RPC (push, room, broadcast) took to queue its frame for every recipient, pacing included",
            self.inner.stats.rpc_seconds.clone(),
        );
    }
}

struct Collector(Arc<Inner>);

impl std::fmt::Debug for Collector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CometCollector").finish_non_exhaustive()
    }
}

/// Converts a counter to a gauge value (gauges here never exceed i64).
fn level(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl rim_metrics::Collector for Collector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        let inner = &self.0;
        let s = &inner.stats;
        gauge_family(
            &mut e,
            "rim_comet_connections",
            "Authenticated client connections, by transport.",
            "transport",
            Wire::ALL.map(|w| (w.as_str(), level(get(s.connections(w))))),
        )?;
        gauge(
            &mut e,
            "rim_comet_sockets",
            "Accepted client sockets, authenticated or not (what comet.max_connections limits).",
            level(inner.sockets()),
        )?;
        counter_family(
            &mut e,
            "rim_comet_auth",
            "Auth frames handled: ok, refused by logic, failed (logic unavailable or too slow), timeout (no Auth or upgrade within comet.handshake_timeout).",
            "result",
            [
                ("ok", get(&s.auth_ok)),
                ("refused", get(&s.auth_refused)),
                ("failed", get(&s.auth_failed)),
                ("timeout", get(&s.handshake_timeouts)),
            ],
        )?;
        counter(
            &mut e,
            "rim_comet_refused_connections",
            "Sockets closed at accept: connection limit, per-IP limit, or draining.",
            get(&s.refused_connections),
        )?;
        gauge(
            &mut e,
            "rim_comet_rooms",
            "Rooms with at least one member on this comet.",
            level(inner.room_counts().len() as u64),
        )?;
        gauge(
            &mut e,
            "rim_comet_group_channel_seats",
            "Connections in big groups' delivery channels, one per connection and group.",
            level(inner.channel_seats()),
        )?;
        let traffic = Wire::ALL.map(|w| (w.as_str(), s.traffic.totals(w)));
        counter_family(
            &mut e,
            "rim_comet_frames_in",
            "Frames read from clients, by transport.",
            "transport",
            traffic.map(|(w, t)| (w, t.frames_in)),
        )?;
        counter_family(
            &mut e,
            "rim_comet_bytes_in",
            "Frame bytes (header included) read from clients, by transport.",
            "transport",
            traffic.map(|(w, t)| (w, t.bytes_in)),
        )?;
        counter_family(
            &mut e,
            "rim_comet_frames_out",
            "Frames written to clients (replies and pushes; an op-9 batch counts as one), by transport.",
            "transport",
            traffic.map(|(w, t)| (w, t.frames_out)),
        )?;
        counter_family(
            &mut e,
            "rim_comet_bytes_out",
            "Frame bytes written to clients (without WebSocket framing), by transport.",
            "transport",
            traffic.map(|(w, t)| (w, t.bytes_out)),
        )?;
        counter(
            &mut e,
            "rim_comet_bad_frames",
            "Connections closed for breaking the protocol (bad header, oversized or undecodable frame, failed upgrade).",
            get(&s.bad_frames),
        )?;
        counter_family(
            &mut e,
            "rim_comet_upstream_frames",
            "Upstream client frames (ops the comet does not handle itself) handed to logic: ok, failed (refused or not taken in time); limited: IM SENDs over im.send_rate_per_conn, answered by the comet with code 3 and not handed on.",
            "result",
            [
                ("ok", get(&s.upstream_ok)),
                ("failed", get(&s.upstream_failed)),
                ("limited", get(&s.upstream_limited)),
            ],
        )?;
        counter(
            &mut e,
            "rim_comet_dropped_frames",
            "Pushed frames dropped for one connection because its outbound queue was full.",
            get(&s.dropped_frames),
        )?;
        counter(
            &mut e,
            "rim_comet_slow_consumer_closes",
            "Connections closed because their outbound queue stayed full for comet.slow_consumer_timeout.",
            get(&s.slow_consumer_closes),
        )?;
        counter_family(
            &mut e,
            "rim_comet_push_rpc",
            "Push RPCs handled (from the job, or in-process in standalone), by RPC.",
            "rpc",
            Rpc::ALL.map(|r| (r.as_str(), get(&s.rpcs[r as usize]))),
        )?;
        counter_family(
            &mut e,
            "rim_comet_push_recipients",
            "Recipients of push RPCs: delivered (queued), filtered (op not accepted), missing (key not here), dropped (queue full).",
            "result",
            ["delivered", "filtered", "missing", "dropped"]
                .into_iter()
                .zip(s.recipients.iter().map(get)),
        )?;
        counter_family(
            &mut e,
            "rim_comet_push_writes",
            "Delivered pushes by how they reached the socket: direct (written whole by the pushing task, the connection task not woken; raw TCP only), partial (begun by the pushing task, finished by the connection task), queued (written by the connection task).",
            "path",
            WritePath::ALL.map(|p| (p.as_str(), get(&s.push_writes[p as usize]))),
        )?;
        Ok(())
    }
}
