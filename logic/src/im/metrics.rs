//! The IM layer's metrics in logic: requests by op and reply code, store
//! commits, deliveries by result, and rate-limit refusals and keys.

use std::sync::Arc;

use rim_im::MessageStore;
use rim_metrics::{Counter, DescriptorEncoder, Family, Registry};

use super::limits::{Limit, Limits};

type OpCode = [(&'static str, &'static str); 2];
type Result1 = [(&'static str, &'static str); 1];

/// Counters of the IM requests and deliveries.
#[derive(Debug, Default)]
pub(crate) struct ImMetrics {
    requests: Family<OpCode, Counter>,
    deliveries: Family<Result1, Counter>,
    limited: Family<Result1, Counter>,
    pruned: Family<Result1, Counter>,
    relayed: Counter,
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
        self.requests
            .get_or_create(&[("op", op), ("code", code)])
            .inc();
    }

    /// Counts one delivery step: queued, router_failed, queue_failed.
    pub(crate) fn delivery(&self, result: &'static str) {
        self.deliveries.get_or_create(&[("result", result)]).inc();
    }

    /// Counts one request refused by `limit`.
    pub(crate) fn limited(&self, limit: Limit) {
        self.limited.get_or_create(&[("limit", limit.name())]).inc();
    }

    /// Counts rows retention removed.
    pub(crate) fn pruned(&self, messages: u64, inbox: u64) {
        self.pruned
            .get_or_create(&[("rows", "messages")])
            .inc_by(messages);
        self.pruned
            .get_or_create(&[("rows", "inbox")])
            .inc_by(inbox);
    }

    /// Counts inbox entries a sharded store appended late (the relay).
    pub(crate) fn relayed(&self, entries: usize) {
        self.relayed.inc_by(entries as u64);
    }

    pub(crate) fn register(
        &self,
        registry: &mut Registry,
        store: Arc<dyn MessageStore>,
        limits: Arc<Limits>,
    ) {
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
        registry.register(
            "rim_logic_im_rate_limited",
            "IM requests refused for a rate limit (SEND code 3, /im/v1 writes 429), by limit: connection (im.send_rate_per_conn), user (im.send_rate_per_user), api (im.api_write_rate)",
            self.limited.clone(),
        );
        registry.register(
            "rim_logic_im_pruned",
            "Rows retention removed (im.retention_days, im.max_messages_per_conv), by rows: messages, inbox",
            self.pruned.clone(),
        );
        registry.register(
            "rim_logic_im_relayed",
            "Inbox entries a sharded store appended late on their primary, from the outbox of the message's primary (the append right after the send failed, or its process died); their owners get NOTIFY sync",
            self.relayed.clone(),
        );
        registry.register_collector(Box::new(StoreCollector(store)));
        registry.register_collector(Box::new(LimitsCollector(limits)));
    }
}

/// The keys the rate limiters hold (pruned every 10 s), read at scrape time.
#[derive(Debug)]
struct LimitsCollector(Arc<Limits>);

impl rim_metrics::Collector for LimitsCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        let keys = self.0.keys();
        rim_metrics::gauge_family(
            &mut e,
            "rim_logic_im_rate_limit_keys",
            "Keys (connections, users, API clients) the IM rate limiters hold: the active ones plus those not yet pruned",
            "limit",
            keys.iter().map(|(limit, n)| (limit.name(), *n as i64)),
        )
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
