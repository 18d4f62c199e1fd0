//! The IM layer's metrics in logic: requests by op and reply code, store
//! commits, and deliveries by result.

use std::sync::Arc;

use rim_im::MessageStore;
use rim_metrics::{Counter, DescriptorEncoder, Family, Registry};

type OpCode = [(&'static str, &'static str); 2];
type Result1 = [(&'static str, &'static str); 1];

/// Counters of the IM requests and deliveries.
#[derive(Debug, Default)]
pub(crate) struct ImMetrics {
    requests: Family<OpCode, Counter>,
    deliveries: Family<Result1, Counter>,
}

/// Reply codes as label values (a code outside 0–5 is never produced).
const CODES: [&str; 6] = ["0", "1", "2", "3", "4", "5"];

impl ImMetrics {
    /// Counts one client or HTTP request `op` answered with `code`.
    pub(crate) fn request(&self, op: &'static str, code: i32) {
        let code = usize::try_from(code)
            .ok()
            .and_then(|i| CODES.get(i).copied())
            .unwrap_or("other");
        self.requests.get_or_create(&[("op", op), ("code", code)]).inc();
    }

    /// Counts one delivery step: queued, router_failed, queue_failed.
    pub(crate) fn delivery(&self, result: &'static str) {
        self.deliveries.get_or_create(&[("result", result)]).inc();
    }

    pub(crate) fn register(&self, registry: &mut Registry, store: Arc<dyn MessageStore>) {
        registry.register(
            "rim_logic_im_requests",
            "IM requests (client ops and /im/v1 calls) by op and reply code (0 ok, 1 bad request, 2 not allowed, 3 rate limited, 4 too large, 5 unavailable)",
            self.requests.clone(),
        );
        registry.register(
            "rim_logic_im_deliveries",
            "IM frames (MSG, NOTIFY) handed to the push queue, one per comet and user, by result: queued, router_failed, queue_failed (devices catch up by SYNC)",
            self.deliveries.clone(),
        );
        registry.register_collector(Box::new(StoreCollector(store)));
    }
}

struct StoreCollector(Arc<dyn MessageStore>);

impl std::fmt::Debug for StoreCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreCollector")
    }
}

impl rim_metrics::Collector for StoreCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        rim_metrics::counter(
            &mut e,
            "rim_logic_im_store_commits",
            "Durable commits of the message store (group commit: each carries a batch of writes)",
            self.0.commits(),
        )
    }
}
