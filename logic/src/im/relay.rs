//! The relay of a sharded message store: inbox entries a send could not
//! append on their member's primary (that primary was unreachable, or the
//! process died between the message's commit and the append) wait in the
//! outbox of the message's primary; every second this task has the store
//! append them ([`MessageStore::relay`], idempotent, so every logic may
//! run it) and tells their owners' devices to SYNC. A single store has
//! nothing to relay.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use rim_im::MessageStore;
use rim_proto::im::Notify;

use super::deliver::Deliverer;
use super::metrics::ImMetrics;

/// How often the outbox is looked at.
const EVERY: Duration = Duration::from_secs(1);

/// Outbox entries one relay call appends at most (per primary).
const BATCH: u32 = 500;

/// Calls one round makes at most, so a backlog is spread over rounds.
const MAX_CALLS_PER_ROUND: usize = 20;

/// Starts relaying on the current runtime; the task ends once the store
/// is dropped.
pub(crate) fn start(store: &Arc<dyn MessageStore>, deliver: Deliverer, metrics: &Arc<ImMetrics>) {
    tokio::spawn(run(Arc::downgrade(store), deliver, Arc::clone(metrics)));
}

async fn run(store: Weak<dyn MessageStore>, deliver: Deliverer, metrics: Arc<ImMetrics>) {
    let mut interval = tokio::time::interval(EVERY);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(store) = store.upgrade() else {
            return;
        };
        for _ in 0..MAX_CALLS_PER_ROUND {
            match store.relay(BATCH).await {
                Ok(relayed) => {
                    metrics.relayed(relayed.appended.len());
                    // Each owner's devices SYNC up to its latest entry.
                    let mut latest: BTreeMap<i64, u64> = BTreeMap::new();
                    for entry in &relayed.appended {
                        let sync = latest.entry(entry.mid).or_default();
                        *sync = (*sync).max(entry.sync);
                    }
                    for (mid, sync) in latest {
                        deliver.notify(mid, &Notify::Sync { sync }, None).await;
                    }
                    if !relayed.more {
                        break;
                    }
                }
                Err(err) => {
                    tracing::warn!(%err, "IM relay: appending pending inbox entries failed; retried in {EVERY:?}");
                    break;
                }
            }
        }
    }
}
