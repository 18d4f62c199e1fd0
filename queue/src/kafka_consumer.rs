//! The Kafka consumer: at-least-once delivery in a consumer group.
//!
//! goim commits an offset before processing and loses messages on a crash.
//! Here an offset is committed only once the message at it, and every
//! message before it in the partition, is handled (its [`Receipt`] says so).
//! Commits go out once a second, when a partition is revoked (what was
//! handled is committed before the partition is given up), and at close.
//!
//! **Duplicate window.** A crash (or a SIGKILL) loses no accepted message:
//! what was handed out but not yet committed — at most the last commit
//! interval (1 s) plus the messages in flight — is consumed again by the
//! next owner of the partition and handled a second time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use prost::Message as _;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaResult;
use rdkafka::statistics::Statistics;
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};
use tokio::task::JoinHandle;

use crate::budget::Budget;
use crate::consumer::{Consumer, Delivery, HeldFor, Lag, Receipt, Slots};
use crate::kafka_properties::ClientProperties as _;
use crate::tracker::Tracker;
use crate::{Error, HeldBytes, PushMsg, Result};

/// How often handled offsets are committed.
const COMMIT_EVERY: Duration = Duration::from_secs(1);
/// How often librdkafka reports statistics (the lag).
const STATISTICS_EVERY: Duration = Duration::from_secs(5);
/// Pause after a failed fetch before the next one.
const RETRY_AFTER: Duration = Duration::from_millis(200);

/// Where and as whom a [`KafkaConsumer`] consumes.
#[derive(Clone, Debug)]
pub struct KafkaConsumerOptions {
    /// Bootstrap brokers, `host:port`.
    pub brokers: Vec<String>,
    /// The topic.
    pub topic: String,
    /// The consumer group.
    pub group: String,
    /// Static group membership id (`group.instance.id`; `None` = a dynamic
    /// member): on Apache Kafka a consumer restarted after a crash takes its
    /// partitions back at once instead of waiting for the dead member's
    /// session to expire.
    pub instance: Option<String>,
    /// `session.timeout.ms`: how long the coordinator waits for a silent
    /// member before its partitions go to others.
    pub session_timeout: Duration,
    /// `heartbeat.interval.ms`.
    pub heartbeat_interval: Duration,
    /// `partition.assignment.strategy` (`range`, `roundrobin`,
    /// `cooperative-sticky`).
    pub assignment_strategy: String,
    /// Messages handed out and not yet handled before `recv` waits.
    pub max_in_flight: usize,
    /// Bytes of messages handed out and not yet handled before `recv` waits
    /// (`queue.max_bytes`).
    pub max_in_flight_bytes: usize,
    /// The longest a fetch waits for data (`queue.fetch_wait`; librdkafka's
    /// `fetch.wait.max.ms`). Kafka answers as soon as data arrives; brokers
    /// that hold a fetch for part of it (tansu) add that to push latency.
    pub fetch_wait: std::time::Duration,
}

/// Consumes a topic in a consumer group, committing only handled offsets.
pub struct KafkaConsumer {
    consumer: Arc<StreamConsumer<Context>>,
    topic: String,
    tracker: Arc<Mutex<Tracker>>,
    lag: Arc<Mutex<BTreeMap<i32, i64>>>,
    slots: Slots,
    budget: Arc<Budget>,
    committer: JoinHandle<()>,
}

impl std::fmt::Debug for KafkaConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConsumer")
            .field("topic", &self.topic)
            .field("slots", &self.slots)
            .finish_non_exhaustive()
    }
}

impl KafkaConsumer {
    /// Joins the group and subscribes to the topic; commits start at once.
    pub fn new(options: &KafkaConsumerOptions) -> Result<KafkaConsumer> {
        Self::with_properties(options, &[])
    }

    /// Like [`KafkaConsumer::new`], with extra librdkafka `properties`
    /// (`queue.kafka`: TLS and SASL).
    pub fn with_properties(
        options: &KafkaConsumerOptions,
        properties: &[(String, String)],
    ) -> Result<KafkaConsumer> {
        let brokers = options.brokers.join(",");
        let topic = options.topic.clone();
        let tracker = Arc::new(Mutex::new(Tracker::default()));
        let lag = Arc::new(Mutex::new(BTreeMap::new()));
        let context = Context {
            topic: topic.clone(),
            tracker: Arc::clone(&tracker),
            lag: Arc::clone(&lag),
        };
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &brokers)
            .set("group.id", &options.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", millis(options.session_timeout))
            .set("heartbeat.interval.ms", millis(options.heartbeat_interval))
            .set(
                "partition.assignment.strategy",
                &options.assignment_strategy,
            )
            .set("fetch.wait.max.ms", millis(options.fetch_wait))
            .set("statistics.interval.ms", millis(STATISTICS_EVERY))
            .set_properties(properties);
        if let Some(instance) = &options.instance {
            config.set("group.instance.id", instance);
        }
        let consumer: StreamConsumer<Context> = config
            .create_with_context(context)
            .map_err(Error::kafka(format!("create a consumer for {brokers}")))?;
        consumer
            .subscribe(&[&topic])
            .map_err(Error::kafka(format!("subscribe to {topic}")))?;
        tracing::info!(
            %topic,
            group = %options.group,
            instance = options.instance.as_deref().unwrap_or(""),
            session_timeout = ?options.session_timeout,
            assignment = %options.assignment_strategy,
            "consuming"
        );
        let consumer = Arc::new(consumer);
        let committer = tokio::spawn(commit_every(
            Arc::clone(&consumer),
            Arc::clone(&tracker),
            topic.clone(),
        ));
        Ok(KafkaConsumer {
            consumer,
            topic,
            tracker,
            lag,
            slots: Slots::new(options.max_in_flight),
            budget: Budget::new(options.max_in_flight_bytes),
            committer,
        })
    }
}

#[async_trait]
impl Consumer for KafkaConsumer {
    async fn recv(&mut self) -> Result<Option<Delivery>> {
        let slot = self.slots.acquire().await?;
        self.budget.below_limit().await;
        loop {
            let message = match self.consumer.recv().await {
                Ok(message) => message,
                Err(err) => {
                    tracing::warn!(reason = %err, "kafka receive failed");
                    tokio::time::sleep(RETRY_AFTER).await;
                    continue;
                }
            };
            let (partition, offset) = (message.partition(), message.offset());
            let at = self.tracker.lock().start(partition, offset);
            match message.payload().map(|p| (p.len(), PushMsg::decode(p))) {
                Some((bytes, Ok(msg))) => {
                    self.budget.add(bytes);
                    let held = HeldFor::new(Arc::clone(&self.budget), bytes, true);
                    return Ok(Some(Delivery {
                        msg,
                        receipt: Receipt::new(Arc::clone(&self.tracker), at, held, slot),
                    }));
                }
                Some((_, Err(err))) => {
                    tracing::warn!(partition, offset, reason = %err, "undecodable queue message skipped");
                }
                None => tracing::warn!(partition, offset, "empty queue message skipped"),
            }
            // Nothing to deliver: handled as it is.
            self.tracker.lock().done(at);
        }
    }

    fn lag(&self) -> Lag {
        let lag = Arc::clone(&self.lag);
        Lag::new(move || {
            lag.lock()
                .iter()
                .map(|(partition, lag)| (partition.to_string(), *lag))
                .collect()
        })
    }

    fn held_bytes(&self) -> HeldBytes {
        self.budget.held()
    }

    async fn close(self, grace: Duration) -> Result<()> {
        self.slots.drain(grace, &self.tracker).await;
        self.committer.abort();
        let result = commit(&self.consumer, &self.tracker, &self.topic, CommitMode::Sync)
            .map_err(Error::kafka(format!("commit offsets of {}", self.topic)));
        tracing::info!("consumer stopped");
        result
    }
}

impl Drop for KafkaConsumer {
    fn drop(&mut self) {
        self.committer.abort();
    }
}

/// A duration in whole milliseconds for librdkafka, at least 1 and at most
/// librdkafka's largest (1 h); config validation keeps values inside.
fn millis(duration: Duration) -> String {
    duration.as_millis().clamp(1, 3_600_000).to_string()
}

/// Commits handled offsets every COMMIT_EVERY.
async fn commit_every(
    consumer: Arc<StreamConsumer<Context>>,
    tracker: Arc<Mutex<Tracker>>,
    topic: String,
) {
    let mut tick = tokio::time::interval(COMMIT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(err) = commit(&consumer, &tracker, &topic, CommitMode::Async) {
            tracing::warn!(reason = %err, "offset commit failed; will retry");
        }
    }
}

/// The tracker's committable offsets as a Kafka list (`None` when nothing moved).
fn offsets(tracker: &mut Tracker, topic: &str, only: Option<&[i32]>) -> Option<TopicPartitionList> {
    let mut list = TopicPartitionList::new();
    for (partition, next) in tracker.committable(only) {
        if let Err(err) = list.add_partition_offset(topic, partition, Offset::Offset(next)) {
            tracing::warn!(partition, reason = %err, "offset not committed");
        }
    }
    (list.count() > 0).then_some(list)
}

fn commit(
    consumer: &StreamConsumer<Context>,
    tracker: &Mutex<Tracker>,
    topic: &str,
    mode: CommitMode,
) -> KafkaResult<()> {
    let offsets = offsets(&mut tracker.lock(), topic, None);
    match offsets {
        Some(offsets) => consumer.commit(&offsets, mode),
        None => Ok(()),
    }
}

/// Commits what was handled before a partition is given up, and keeps the
/// lag from librdkafka's statistics.
struct Context {
    topic: String,
    tracker: Arc<Mutex<Tracker>>,
    lag: Arc<Mutex<BTreeMap<i32, i64>>>,
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
        *self.lag.lock() = lag;
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
            let mut tracker = self.tracker.lock();
            if let Some(offsets) = offsets(&mut tracker, &self.topic, Some(&revoked))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_group_settings_reach_librdkafka() {
        let options = KafkaConsumerOptions {
            brokers: vec!["127.0.0.1:9".into()],
            topic: "rim-push".into(),
            group: "rim-job-test".into(),
            instance: None,
            session_timeout: Duration::from_secs(2),
            heartbeat_interval: Duration::from_millis(500),
            assignment_strategy: "cooperative-sticky".into(),
            max_in_flight: 16,
            max_in_flight_bytes: 1 << 20,
            fetch_wait: Duration::from_millis(100),
        };
        KafkaConsumer::new(&options).expect("dynamic, cooperative");
        KafkaConsumer::new(&KafkaConsumerOptions {
            instance: Some("job-1".into()),
            assignment_strategy: "range".into(),
            ..options.clone()
        })
        .expect("static, eager");
        // librdkafka refuses what it does not know, and eager mixed with
        // cooperative: the strategy is really passed.
        for refused in ["sticky-ish", "range,cooperative-sticky"] {
            assert!(
                KafkaConsumer::new(&KafkaConsumerOptions {
                    assignment_strategy: refused.into(),
                    ..options.clone()
                })
                .is_err(),
                "{refused}"
            );
        }
    }

    #[test]
    fn lag_is_the_high_watermark_minus_the_position() {
        assert_eq!(partition_lag(120, 100, 30), Some(20));
        assert_eq!(partition_lag(100, 100, 0), Some(0));
        // No position yet: librdkafka's lag behind the committed offset.
        assert_eq!(partition_lag(120, -1001, 30), Some(30));
        assert_eq!(partition_lag(-1, -1001, -1), None);
    }
}
