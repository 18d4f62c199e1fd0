//! The Kafka consumer: at-least-once delivery in a consumer group.
//!
//! goim commits an offset before processing and loses messages on a crash.
//! Here an offset is committed only once the message at it, and every
//! message before it in the partition, is fully handled (delivered to the
//! comets, refused as invalid, or its comet gone). Commits go out once a
//! second and when a partition is revoked (what was handled is committed
//! before the partition is given up), and at shutdown.
//!
//! **Duplicate window.** A crash (or a SIGKILL) loses no accepted message:
//! what was handed to comets but not yet committed — at most the last commit
//! interval (1 s) plus the messages in flight — is consumed again by the
//! next owner of the partition and delivered a second time.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use prost::Message as _;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaResult;
use rdkafka::statistics::Statistics;
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};
use rim_queue::PushMsg;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::metrics::{JobMetrics, kind_label};
use crate::{Job, Outcome};

/// How often handled offsets are committed.
const COMMIT_EVERY: Duration = Duration::from_secs(1);
/// Messages handed out but not yet handled before the consumer stops reading.
const MAX_IN_FLIGHT: usize = 8192;
/// How long shutdown waits for in-flight messages before the final commit.
const FINAL_WAIT: Duration = Duration::from_secs(10);
/// How often librdkafka reports statistics (the consumer lag gauge).
const STATISTICS_EVERY: Duration = Duration::from_secs(5);

/// Why the consumer could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[error("kafka consumer: {0}")]
pub struct ConsumeError(String);

/// Handled offsets per partition of the topic.
#[derive(Default)]
struct Tracker {
    partitions: HashMap<i32, PartitionState>,
}

struct PartitionState {
    /// Bumped when the partition is (re)assigned, so completions of a
    /// previous ownership are ignored.
    epoch: u64,
    /// offset → handled?
    pending: BTreeMap<i64, bool>,
    /// Next offset to commit (Kafka commits "the next offset to read").
    committed: Option<i64>,
}

impl Tracker {
    fn start(&mut self, partition: i32, offset: i64) -> u64 {
        let state = self
            .partitions
            .entry(partition)
            .or_insert_with(|| PartitionState {
                epoch: 0,
                pending: BTreeMap::new(),
                committed: None,
            });
        state.pending.insert(offset, false);
        state.epoch
    }

    fn done(&mut self, partition: i32, offset: i64, epoch: u64) {
        if let Some(state) = self.partitions.get_mut(&partition)
            && state.epoch == epoch
            && let Some(handled) = state.pending.get_mut(&offset)
        {
            *handled = true;
        }
    }

    /// Drops the handled prefix of each partition and returns the offsets to
    /// commit (only those that moved).
    fn committable(&mut self, topic: &str, only: Option<&[i32]>) -> Option<TopicPartitionList> {
        let mut list = TopicPartitionList::new();
        for (&partition, state) in &mut self.partitions {
            if only.is_some_and(|only| !only.contains(&partition)) {
                continue;
            }
            let mut next = None;
            while let Some((&offset, &handled)) = state.pending.first_key_value() {
                if !handled {
                    break;
                }
                state.pending.pop_first();
                next = Some(offset + 1);
            }
            if let Some(next) = next
                && state.committed != Some(next)
                && list
                    .add_partition_offset(topic, partition, Offset::Offset(next))
                    .is_ok()
            {
                state.committed = Some(next);
            }
        }
        (list.count() > 0).then_some(list)
    }

    fn revoke(&mut self, partition: i32) {
        if let Some(state) = self.partitions.get_mut(&partition) {
            state.pending.clear();
            state.committed = None;
            state.epoch += 1;
        }
    }
}

/// Commits what was handled before a partition is given up, and keeps the
/// consumer lag from librdkafka's statistics.
struct Context {
    topic: String,
    tracker: Arc<Mutex<Tracker>>,
    metrics: Arc<JobMetrics>,
}

impl ClientContext for Context {
    fn stats(&self, statistics: Statistics) {
        let lag = statistics
            .topics
            .get(&self.topic)
            .map(|topic| {
                topic
                    .partitions
                    .values()
                    .filter(|p| p.partition >= 0 && p.desired)
                    .filter_map(|p| {
                        partition_lag(p.hi_offset, p.app_offset, p.consumer_lag)
                            .map(|lag| (p.partition, lag))
                    })
                    .collect()
            })
            .unwrap_or_default();
        self.metrics.set_lag(lag);
    }
}

/// A partition's lag: the high watermark minus the consumer's position
/// (the next offset it hands out); before it has a position, librdkafka's
/// lag behind the committed offset; `None` when neither is known yet.
fn partition_lag(high_watermark: i64, position: i64, committed_lag: i64) -> Option<i64> {
    if high_watermark >= 0 && position >= 0 {
        Some((high_watermark - position).max(0))
    } else if committed_lag >= 0 {
        Some(committed_lag)
    } else {
        None
    }
}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let revoked: Vec<i32> = list
                .elements()
                .iter()
                .filter(|e| e.topic() == self.topic)
                .map(|e| e.partition())
                .collect();
            let mut tracker = self
                .tracker
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(offsets) = tracker.committable(&self.topic, Some(&revoked))
                && let Err(err) = consumer.commit(&offsets, CommitMode::Sync)
            {
                tracing::warn!(reason = %err, "commit before giving partitions up failed; their messages may be delivered twice");
            }
            for partition in revoked {
                tracker.revoke(partition);
            }
            tracing::info!(partitions = ?list.elements().iter().map(|e| e.partition()).collect::<Vec<_>>(), "partitions revoked");
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            tracing::info!(partitions = ?list.elements().iter().map(|e| e.partition()).collect::<Vec<_>>(), "partitions assigned");
        }
    }
}

fn commit(
    consumer: &StreamConsumer<Context>,
    tracker: &Mutex<Tracker>,
    topic: &str,
    mode: CommitMode,
) -> KafkaResult<()> {
    let offsets = tracker
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .committable(topic, None);
    match offsets {
        Some(offsets) => consumer.commit(&offsets, mode),
        None => Ok(()),
    }
}

/// Consumes `topic` in consumer group `group` and hands every message to
/// `job` until `stop` is cancelled, committing only handled offsets.
///
/// `instance` is the static group membership id (the job's node id): a job
/// restarted after a crash takes its partitions back at once instead of
/// waiting for the dead member's session to expire.
pub async fn consume_kafka(
    job: Job,
    brokers: &[String],
    topic: &str,
    group: &str,
    instance: &str,
    stop: CancellationToken,
) -> Result<(), ConsumeError> {
    let tracker = Arc::new(Mutex::new(Tracker::default()));
    let context = Context {
        topic: topic.to_owned(),
        tracker: Arc::clone(&tracker),
        metrics: Arc::clone(&job.inner.metrics),
    };
    let consumer: StreamConsumer<Context> = ClientConfig::new()
        .set("bootstrap.servers", brokers.join(","))
        .set("group.id", group)
        .set("group.instance.id", instance)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set(
            "statistics.interval.ms",
            STATISTICS_EVERY.as_millis().to_string(),
        )
        .create_with_context(context)
        .map_err(|e| ConsumeError(format!("create for {}: {e}", brokers.join(","))))?;
    consumer
        .subscribe(&[topic])
        .map_err(|e| ConsumeError(format!("subscribe to {topic}: {e}")))?;
    tracing::info!(%topic, %group, "consuming");

    let mut in_flight = FuturesUnordered::new();
    let mut tick = tokio::time::interval(COMMIT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let room = in_flight.len() < MAX_IN_FLIGHT;
        let busy = !in_flight.is_empty();
        let received = tokio::select! {
            () = stop.cancelled() => break,
            Some((partition, offset, epoch, _outcome)) = in_flight.next(), if busy => {
                let (partition, offset, epoch): (i32, i64, u64) = (partition, offset, epoch);
                tracker.lock().unwrap_or_else(std::sync::PoisonError::into_inner).done(partition, offset, epoch);
                continue;
            }
            _ = tick.tick() => {
                if let Err(err) = commit(&consumer, &tracker, topic, CommitMode::Async) {
                    tracing::warn!(reason = %err, "offset commit failed; will retry");
                }
                continue;
            }
            received = consumer.recv(), if room => received,
        };
        let message = match received {
            Ok(message) => message,
            Err(err) => {
                tracing::warn!(reason = %err, "kafka receive failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let (partition, offset) = (message.partition(), message.offset());
        let epoch = tracker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .start(partition, offset);
        let decoded = message.payload().map(PushMsg::decode);
        let ticket = match decoded {
            Some(Ok(msg)) => {
                let span = tracing::debug_span!(
                    "push",
                    kind = kind_label(msg.r#type()),
                    push.id = msg.accepted_unix_nanos,
                    op = msg.operation,
                    partition,
                    offset,
                );
                job.deliver(msg).instrument(span).await
            }
            Some(Err(err)) => {
                tracing::warn!(partition, offset, reason = %err, "undecodable queue message skipped");
                Box::pin(std::future::ready(Outcome::Rejected)) as crate::Ticket
            }
            None => Box::pin(std::future::ready(Outcome::Rejected)) as crate::Ticket,
        };
        in_flight.push(async move { (partition, offset, epoch, ticket.await) });
    }

    // Finish what was handed out (bounded), then commit it.
    let _ = tokio::time::timeout(FINAL_WAIT, async {
        while let Some((partition, offset, epoch, _)) = in_flight.next().await {
            tracker
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .done(partition, offset, epoch);
        }
    })
    .await;
    if let Err(err) = commit(&consumer, &tracker, topic, CommitMode::Sync) {
        tracing::warn!(reason = %err, "final offset commit failed; the last messages may be delivered twice");
    }
    tracing::info!("consumer stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_handled_prefix_of_a_partition_is_committed() {
        let mut tracker = Tracker::default();
        let e = tracker.start(0, 10);
        tracker.start(0, 11);
        tracker.start(0, 12);
        tracker.done(0, 11, e);
        assert!(
            tracker.committable("t", None).is_none(),
            "10 is not handled yet"
        );
        tracker.done(0, 10, e);
        let list = tracker.committable("t", None).unwrap();
        assert_eq!(
            list.find_partition("t", 0).unwrap().offset(),
            Offset::Offset(12)
        );
        assert!(tracker.committable("t", None).is_none(), "nothing new");
        tracker.done(0, 12, e);
        let list = tracker.committable("t", None).unwrap();
        assert_eq!(
            list.find_partition("t", 0).unwrap().offset(),
            Offset::Offset(13)
        );
    }

    #[test]
    fn lag_is_the_high_watermark_minus_the_position() {
        assert_eq!(partition_lag(120, 100, 30), Some(20));
        assert_eq!(partition_lag(100, 100, 0), Some(0));
        // No position yet: librdkafka's lag behind the committed offset.
        assert_eq!(partition_lag(120, -1001, 30), Some(30));
        assert_eq!(partition_lag(-1, -1001, -1), None);
    }

    #[test]
    fn completions_from_before_a_revocation_are_ignored() {
        let mut tracker = Tracker::default();
        let old = tracker.start(3, 5);
        tracker.revoke(3);
        let new = tracker.start(3, 5);
        assert_ne!(old, new);
        tracker.done(3, 5, old);
        assert!(tracker.committable("t", None).is_none());
        tracker.done(3, 5, new);
        assert!(tracker.committable("t", None).is_some());
    }
}
