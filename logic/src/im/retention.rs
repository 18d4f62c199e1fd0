//! Retention (`im.retention_days`, `im.max_messages_per_conv`): a background
//! task prunes the store every `im.prune_interval`, in steps of at most
//! `im.prune_batch` rows (each one short transaction beside the sends),
//! until the store has nothing more due or the round's step limit is
//! reached; the sweeps over conversations and users go on from there in the
//! next round. Every logic sharing a store may prune it: the store's steps
//! are idempotent. A client that asks for what was pruned gets `reset`.

use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rim_config::ImConfig;
use rim_im::{MessageStore, Retention};

use super::metrics::ImMetrics;

/// Steps one round takes at most, so that a huge backlog or a sweep over
/// millions of users is spread over rounds rather than run in one go.
const MAX_STEPS_PER_ROUND: usize = 1000;

/// The limits `[im]` sets, or None when nothing is ever pruned.
struct Policy {
    max_age: Option<Duration>,
    max_per_conv: Option<u64>,
    every: Duration,
    batch: u32,
}

impl Policy {
    fn of(config: &ImConfig) -> Option<Policy> {
        let max_age = (config.retention_days > 0)
            .then(|| Duration::from_secs(u64::from(config.retention_days) * 86_400));
        let max_per_conv =
            (config.max_messages_per_conv > 0).then_some(config.max_messages_per_conv);
        (max_age.is_some() || max_per_conv.is_some()).then_some(Policy {
            max_age,
            max_per_conv,
            every: config.prune_interval,
            batch: config.prune_batch,
        })
    }

    /// What is kept as of now.
    fn now(&self) -> Retention {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Retention {
            before_ms: self.max_age.map(|age| {
                now_ms.saturating_sub(u64::try_from(age.as_millis()).unwrap_or(u64::MAX))
            }),
            max_per_conv: self.max_per_conv,
        }
    }
}

/// Starts pruning `store` per `config` on the current runtime (nothing
/// when no limit is set); the task ends once the store is dropped.
pub(crate) fn start(store: &Arc<dyn MessageStore>, config: &ImConfig, metrics: &Arc<ImMetrics>) {
    let Some(policy) = Policy::of(config) else {
        return;
    };
    tracing::info!(
        retention_days = config.retention_days,
        max_messages_per_conv = config.max_messages_per_conv,
        every = ?policy.every,
        "IM retention: pruning what the limits no longer keep"
    );
    tokio::spawn(run(Arc::downgrade(store), policy, Arc::clone(metrics)));
}

async fn run(store: Weak<dyn MessageStore>, policy: Policy, metrics: Arc<ImMetrics>) {
    let mut interval = tokio::time::interval(policy.every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(store) = store.upgrade() else {
            return;
        };
        for _ in 0..MAX_STEPS_PER_ROUND {
            match store.prune(&policy.now(), policy.batch).await {
                Ok(step) => {
                    metrics.pruned(step.messages, step.inbox);
                    if !step.more {
                        break;
                    }
                }
                Err(err) => {
                    tracing::warn!(%err, "IM retention: a pruning step failed; next round in {:?}", policy.every);
                    break;
                }
            }
        }
    }
}
