//! The job's Prometheus metrics: messages by kind and result, push latency
//! from the api's accept to the comets' answer, comet RPC errors and
//! durations, room batch sizes, pushes per push call, messages in flight and
//! consumer lag.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rim_metrics::{Counter, DescriptorEncoder, Family, Gauge, Histogram, Registry, gauge_family};
use rim_queue::{HeldBytes, Lag, PushType};

use crate::Outcome;

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];
type HistogramFamily = Family<Labels1, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(rim_metrics::latency_buckets())
}

/// The job's metrics; shared by the consumers, the workers and the aggregator.
#[derive(Debug)]
pub(crate) struct JobMetrics {
    messages: Family<Labels2, Counter>,
    push_latency: HistogramFamily,
    rpc_errors: Family<[(&'static str, String); 1], Counter>,
    rpc_seconds: HistogramFamily,
    room_batch: Histogram,
    /// Pushes per delivery call to a comet (1 = PushMsg, more = PushMsgs).
    push_batch: Histogram,
    /// Room batch calls to comets, by whether the comet hosts the room.
    room_calls: Family<[(&'static str, &'static str); 1], Counter>,
    /// Big groups' messages over the group's cap, not delivered.
    group_thinned: Counter,
    /// NOTIFY truncated frames added to big groups' batches.
    group_truncated: Counter,
    in_flight: Gauge,
    /// The consumer's lag by partition, read on each scrape.
    lag: OnceLock<Lag>,
    /// The bytes the queue holds in this process, read on each scrape.
    held: OnceLock<HeldBytes>,
}

impl Default for JobMetrics {
    fn default() -> Self {
        let metrics = JobMetrics {
            messages: Family::default(),
            push_latency: Family::new_with_constructor(latency_histogram),
            rpc_errors: Family::default(),
            rpc_seconds: Family::new_with_constructor(latency_histogram),
            room_batch: Histogram::new(rim_metrics::size_buckets()),
            push_batch: Histogram::new(rim_metrics::size_buckets()),
            room_calls: Family::default(),
            group_thinned: Counter::default(),
            group_truncated: Counter::default(),
            in_flight: Gauge::default(),
            lag: OnceLock::new(),
            held: OnceLock::new(),
        };
        // Series that exist from the start, so that dashboards and alerts
        // see zeros rather than nothing (an empty family is not exposed).
        for kind in [
            PushType::Push,
            PushType::Room,
            PushType::Broadcast,
            PushType::Group,
        ] {
            let kind = kind_label(kind);
            for outcome in [Outcome::Delivered, Outcome::Rejected, Outcome::Gone] {
                let _ = metrics
                    .messages
                    .get_or_create(&[("kind", kind), ("result", outcome_label(outcome))]);
            }
            let _ = metrics.push_latency.get_or_create(&[("kind", kind)]);
            let _ = metrics.rpc_seconds.get_or_create(&[("rpc", kind)]);
        }
        let _ = metrics.rpc_seconds.get_or_create(&[("rpc", "push_batch")]);
        metrics
    }
}

/// The `kind` label of a queue message.
pub(crate) fn kind_label(kind: PushType) -> &'static str {
    match kind {
        PushType::Push => "push",
        PushType::Room => "room",
        PushType::Broadcast => "broadcast",
        PushType::Group => "group",
        PushType::GroupJoin => "group_join",
        PushType::GroupLeave => "group_leave",
        PushType::Unspecified => "unspecified",
    }
}

fn outcome_label(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Delivered => "delivered",
        Outcome::Rejected => "rejected",
        Outcome::Gone => "gone",
    }
}

/// Time since `accepted_unix_nanos`; `None` when the message carries no
/// (or a future) accept time.
fn since(accepted_unix_nanos: i64) -> Option<Duration> {
    let accepted = u64::try_from(accepted_unix_nanos).ok().filter(|&n| n > 0)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
    now.checked_sub(Duration::from_nanos(accepted))
}

impl JobMetrics {
    /// Counts a message handed out; `finished` must follow.
    pub(crate) fn started(&self) {
        self.in_flight.inc();
    }

    /// Counts a fully handled message and its latency since the api accepted it.
    pub(crate) fn finished(&self, kind: PushType, outcome: Outcome, accepted_unix_nanos: i64) {
        self.in_flight.dec();
        let kind = kind_label(kind);
        self.messages
            .get_or_create(&[("kind", kind), ("result", outcome_label(outcome))])
            .inc();
        if outcome == Outcome::Delivered
            && let Some(latency) = since(accepted_unix_nanos)
        {
            self.push_latency
                .get_or_create(&[("kind", kind)])
                .observe(latency.as_secs_f64());
        }
    }

    /// Starts the error series of a comet the job now delivers to.
    pub(crate) fn comet_added(&self, comet: &str) {
        let _ = self
            .rpc_errors
            .get_or_create(&[("comet", comet.to_owned())]);
    }

    /// Records one comet RPC attempt.
    pub(crate) fn rpc(&self, comet: &str, rpc: &'static str, took: Duration, failed: bool) {
        self.rpc_seconds
            .get_or_create(&[("rpc", rpc)])
            .observe(took.as_secs_f64());
        if failed {
            self.rpc_errors
                .get_or_create(&[("comet", comet.to_owned())])
                .inc();
        }
    }

    /// Records the number of messages merged into one room batch.
    pub(crate) fn room_batch(&self, messages: usize) {
        self.room_batch.observe(messages as f64);
    }

    /// Records the number of pushes sent to a comet in one call (once per
    /// call, not per retry).
    pub(crate) fn push_batch(&self, pushes: usize) {
        self.push_batch.observe(pushes as f64);
    }

    /// Counts a room batch call made to a comet hosting the room, or
    /// skipped for one that does not.
    pub(crate) fn room_call(&self, sent: bool) {
        let result = if sent { "sent" } else { "skipped" };
        self.room_calls.get_or_create(&[("result", result)]).inc();
    }

    /// Counts a big group's message over its cap, not delivered.
    pub(crate) fn group_thinned(&self) {
        self.group_thinned.inc();
    }

    /// Counts a NOTIFY truncated added to a big group's batch.
    pub(crate) fn group_truncated(&self) {
        self.group_truncated.inc();
    }

    /// Reports the lag of the queue consumer the job reads.
    pub(crate) fn watch_lag(&self, lag: Lag) {
        let _ = self.lag.set(lag);
    }

    /// Reports the bytes the queue holds in this process.
    pub(crate) fn watch_held_bytes(&self, held: HeldBytes) {
        let _ = self.held.set(held);
    }

    /// Registers the job's metrics (`rim_job_*`).
    pub(crate) fn register(self: &std::sync::Arc<Self>, registry: &mut Registry) {
        registry.register(
            "rim_job_messages",
            "Queue messages fully handled, by kind (push, room, broadcast, group, group_join, group_leave) and result (delivered, rejected as invalid, gone: the comet left)",
            self.messages.clone(),
        );
        registry.register(
            "rim_job_push_latency_seconds",
            "Time from the api accepting a push (the queue message's accept time) to the comets answering its delivery, by kind",
            self.push_latency.clone(),
        );
        registry.register(
            "rim_job_comet_rpc_errors",
            "Failed delivery RPC attempts (each retry counts), by comet",
            self.rpc_errors.clone(),
        );
        registry.register(
            "rim_job_comet_rpc_duration_seconds",
            "Duration of delivery RPC attempts to comets, by RPC (push, push_batch, room, broadcast, group, change_group)",
            self.rpc_seconds.clone(),
        );
        registry.register(
            "rim_job_room_batch_messages",
            "Messages merged into one room batch (op 9) per flush",
            self.room_batch.clone(),
        );
        registry.register(
            "rim_job_push_batch_pushes",
            "Pushes sent to a comet in one delivery call: 1 = a PushMsg alone, more = one PushMsgs of the pushes queued back to back for that comet",
            self.push_batch.clone(),
        );
        registry.register(
            "rim_job_room_calls",
            "Room batches per comet, by result: sent (the comet hosts the room, or its rooms are not known yet), skipped (it hosts none of the room's members)",
            self.room_calls.clone(),
        );
        registry.register(
            "rim_job_group_thinned",
            "Big groups' messages over im.big_group_rate, not delivered (their members are told by NOTIFY truncated and PULL them)",
            self.group_thinned.clone(),
        );
        registry.register(
            "rim_job_group_truncated_notifies",
            "NOTIFY truncated frames added to big groups' batches (at most one per group per second)",
            self.group_truncated.clone(),
        );
        registry.register(
            "rim_job_in_flight",
            "Messages handed to comets but not yet fully handled",
            self.in_flight.clone(),
        );
        registry.register_collector(Box::new(LagCollector(std::sync::Arc::clone(self))));
    }
}

#[derive(Debug)]
struct LagCollector(std::sync::Arc<JobMetrics>);

impl rim_metrics::Collector for LagCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        let samples = self.0.lag.get().map(Lag::read).unwrap_or_default();
        gauge_family(
            &mut e,
            "rim_job_consumer_lag",
            "Messages not yet consumed, by partition: Kafka high watermark minus the consumer's position (from librdkafka statistics, every 5 s); partition=\"memory\" is the in-process queue's depth.",
            "partition",
            samples,
        )?;
        let (held, limit) = self.0.held.get().map_or((0, 0), |h| (h.get(), h.limit()));
        let as_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        rim_metrics::gauge(
            &mut e,
            "rim_job_queue_bytes",
            "Bytes of push messages (encoded) the queue holds in this process: in-process queue, waiting plus in flight in the job; Kafka, in flight in the job",
            as_i64(held),
        )?;
        rim_metrics::gauge(
            &mut e,
            "rim_job_queue_bytes_limit",
            "queue.max_bytes: the most rim_job_queue_bytes may reach before producers wait (in-process) or the consumer stops reading (Kafka)",
            as_i64(limit),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_is_measured_from_the_accept_time() {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let accepted = (now - Duration::from_millis(250)).as_nanos() as i64;
        let latency = since(accepted).unwrap();
        assert!(latency >= Duration::from_millis(250), "{latency:?}");
        assert_eq!(since(0), None);
        assert_eq!(since(-5), None);
        let future = (now + Duration::from_secs(60)).as_nanos() as i64;
        assert_eq!(since(future), None);
    }

    #[test]
    fn finished_messages_are_counted_by_kind_and_result() {
        let metrics = std::sync::Arc::new(JobMetrics::default());
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        metrics.watch_lag(Lag::new(|| vec![("0".into(), 3), ("2".into(), 0)]));
        let accepted = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i64;
        for _ in 0..2 {
            metrics.started();
        }
        metrics.finished(PushType::Room, Outcome::Delivered, accepted);
        metrics.finished(PushType::Push, Outcome::Gone, accepted);
        metrics.rpc("comet-1", "push", Duration::from_millis(2), true);
        let text = rim_metrics::encode(&registry);
        for line in [
            "rim_job_messages_total{kind=\"room\",result=\"delivered\"} 1",
            "rim_job_messages_total{kind=\"push\",result=\"gone\"} 1",
            "rim_job_push_latency_seconds_count{kind=\"room\"} 1",
            "rim_job_comet_rpc_errors_total{comet=\"comet-1\"} 1",
            "rim_job_in_flight 0",
            "rim_job_consumer_lag{partition=\"0\"} 3",
            "rim_job_consumer_lag{partition=\"2\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
        // Only delivered messages have a push latency.
        assert!(
            text.lines()
                .any(|l| l == "rim_job_push_latency_seconds_count{kind=\"push\"} 0"),
            "{text}"
        );
    }
}
