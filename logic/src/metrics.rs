//! Logic's Prometheus metrics: connects by result, disconnects, presence
//! renewals, router errors by operation, upstream frames by result, and
//! the comets it knows.

use std::sync::Arc;

use rim_metrics::{Counter, DescriptorEncoder, Family, Registry, gauge};

use crate::comets::Comets;

type Labels = [(&'static str, &'static str); 1];

/// Counters updated by the logic service.
#[derive(Debug)]
pub(crate) struct LogicMetrics {
    pub(crate) connects: Family<Labels, Counter>,
    pub(crate) disconnects: Counter,
    pub(crate) renewals: Counter,
    pub(crate) router_errors: Family<Labels, Counter>,
    pub(crate) upstream_frames: Family<Labels, Counter>,
}

impl Default for LogicMetrics {
    fn default() -> Self {
        let metrics = LogicMetrics {
            connects: Family::default(),
            disconnects: Counter::default(),
            renewals: Counter::default(),
            router_errors: Family::default(),
            upstream_frames: Family::default(),
        };
        for result in ["forwarded", "failed", "no_webhook"] {
            let _ = metrics.upstream_frames.get_or_create(&[("result", result)]);
        }
        // Series that exist from the start (an empty family is not exposed).
        for result in ["ok", "refused", "failed"] {
            let _ = metrics.connects.get_or_create(&[("result", result)]);
        }
        for op in [
            "add",
            "remove",
            "renew",
            "lookup",
            "set_room_counts",
            "room_counts",
            "settle_presence",
            "presence_due",
        ] {
            let _ = metrics.router_errors.get_or_create(&[("op", op)]);
        }
        metrics
    }
}

impl LogicMetrics {
    /// Counts one connect by result: ok, refused (bad token) or failed.
    pub(crate) fn connect(&self, result: &'static str) {
        self.connects.get_or_create(&[("result", result)]).inc();
    }

    /// Counts one upstream client frame by result: forwarded (the receive
    /// webhook took it), failed, or no_webhook (none configured: dropped).
    pub(crate) fn upstream(&self, result: &'static str) {
        self.upstream_frames
            .get_or_create(&[("result", result)])
            .inc();
    }

    /// Counts one failed router call.
    pub(crate) fn router_error(&self, op: &'static str) {
        self.router_errors.get_or_create(&[("op", op)]).inc();
    }

    pub(crate) fn register(&self, registry: &mut Registry, comets: Arc<Comets>) {
        registry.register(
            "rim_logic_connects",
            "Connect calls from comets, by result: ok, refused (token refused), failed (auth or router unavailable)",
            self.connects.clone(),
        );
        registry.register(
            "rim_logic_disconnects",
            "Disconnect calls from comets",
            self.disconnects.clone(),
        );
        registry.register(
            "rim_logic_renewals",
            "Presence lease renewals (heartbeats forwarded by comets)",
            self.renewals.clone(),
        );
        registry.register(
            "rim_logic_router_errors",
            "Failed router (Redis) calls made by the logic service, by operation",
            self.router_errors.clone(),
        );
        registry.register(
            "rim_logic_upstream_frames",
            "Upstream client frames received from comets, by result: forwarded (receive webhook answered 2xx), failed, no_webhook (none configured: acknowledged and dropped)",
            self.upstream_frames.clone(),
        );
        registry.register_collector(Box::new(CometsCollector(comets)));
    }
}

#[derive(Debug)]
struct CometsCollector(Arc<Comets>);

impl rim_metrics::Collector for CometsCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        let nodes = self.0.nodes();
        gauge(
            &mut e,
            "rim_logic_comets",
            "Comets in this logic's directory (from discovery).",
            nodes.len() as i64,
        )?;
        let connections: u64 = nodes.iter().map(|n| n.conn_count).sum();
        gauge(
            &mut e,
            "rim_logic_comet_connections",
            "Client connections the known comets last reported (refreshed every 10 s); summed over logics it counts each comet once per logic.",
            i64::try_from(connections).unwrap_or(i64::MAX),
        )
    }
}
