//! rim-queue owns both halves of the push queue between the api (producer)
//! and the job (consumer): the [`Producer`] and [`Consumer`] traits, their
//! Kafka implementations (rdkafka) and a bounded in-process queue for
//! standalone, and commit-after-delivery tracking — a message's position is
//! committed only once it and every message before it in its partition were
//! handled, so a consumer that crashes loses nothing (at-least-once).
//!
//! Partitioning keeps order where it matters: a message is keyed by its first
//! connection key (PUSH), its room (ROOM) or its op (BROADCAST), so messages
//! to one key or one room stay in one partition, in order.
//!
//! It does not interpret messages: planning is the api's, delivery the job's.

mod budget;
mod consumer;
mod kafka_consumer;
mod kafka_producer;
mod kafka_properties;
mod memory;
mod tracker;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rim_config::{QueueBackend, QueueConfig};
pub use rim_proto::pb::queue::v1::PushMsg;
pub use rim_proto::pb::queue::v1::push_msg::Type as PushType;

pub use crate::budget::HeldBytes;
pub use crate::consumer::{Consumer, Delivery, Lag, Receipt};
pub use crate::kafka_consumer::{KafkaConsumer, KafkaConsumerOptions};
pub use crate::kafka_producer::{Batching, KafkaProducer};
pub use crate::memory::{MemoryConsumer, MemoryProducer, MemoryQueue, memory_queue};

/// Messages a consumer hands out before it waits for some to be handled
/// (bounds the job's memory when comets are slow).
pub const MAX_IN_FLIGHT: usize = 8192;

/// Why a queue operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The in-process queue stayed at one of its limits for `waited` (HTTP
    /// 503 to the pusher).
    #[error("queue full: the in-process queue stayed at {limit} for {waited:?}")]
    Full {
        /// The limit reached, naming its config key.
        limit: String,
        /// How long the producer waited for room.
        waited: Duration,
    },
    /// The in-process queue's other half is gone.
    #[error("in-process queue is closed: {0}")]
    Closed(&'static str),
    /// The broker is unreachable or refused the operation.
    #[error("kafka: {what}")]
    Kafka {
        /// What was attempted, e.g. `produce to topic rim-push`.
        what: String,
        /// librdkafka's error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// The message is not a valid push.
    #[error("invalid push message: {0}")]
    Invalid(&'static str),
}

impl Error {
    fn kafka(what: impl Into<String>) -> impl FnOnce(rdkafka::error::KafkaError) -> Error {
        let what = what.into();
        move |source| Error::Kafka { what, source }
    }
}

/// Result of a queue operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Writes push messages to the queue.
#[async_trait]
pub trait Producer: Send + Sync + 'static {
    /// Enqueues one message; `Ok` means it is durably accepted (Kafka: acked
    /// by all in-sync replicas).
    async fn send(&self, msg: PushMsg) -> Result<()>;

    /// Checks that the queue is reachable (for readiness).
    async fn ping(&self) -> Result<()>;
}

/// Returns the partitioning key of a message: the first key (PUSH), the
/// room (ROOM), the group (GROUP, GROUP_JOIN, GROUP_LEAVE) or the op
/// (BROADCAST).
pub fn partition_key(msg: &PushMsg) -> Result<String> {
    match msg.r#type() {
        PushType::Push => msg
            .keys
            .first()
            .cloned()
            .ok_or(Error::Invalid("a PUSH message has no key")),
        PushType::Room if !msg.room.is_empty() => Ok(msg.room.clone()),
        PushType::Room => Err(Error::Invalid("a ROOM message has no room")),
        // A group's messages and channel changes share one partition: one
        // job sees them in order and caps the group's rate alone.
        PushType::Group | PushType::GroupJoin | PushType::GroupLeave if !msg.room.is_empty() => {
            Ok(msg.room.clone())
        }
        PushType::Group | PushType::GroupJoin | PushType::GroupLeave => {
            Err(Error::Invalid("a GROUP message has no group"))
        }
        PushType::Broadcast => Ok(msg.operation.to_string()),
        PushType::Unspecified => Err(Error::Invalid("message type is unspecified")),
    }
}

/// Connects the producer the config names. The in-process queue is not
/// built here: both its halves come from [`memory_queue`], in the process
/// that runs the job.
pub fn kafka_producer(config: &QueueConfig) -> Result<Arc<dyn Producer>> {
    match config.backend {
        QueueBackend::Kafka => Ok(Arc::new(KafkaProducer::with_properties(
            &config.brokers,
            &config.topic,
            Batching {
                linger: config.linger,
                in_flight: config.produce_in_flight,
            },
            &config.kafka_properties(),
        )?)),
        QueueBackend::Memory => Err(Error::Invalid(
            "queue.backend is memory: use memory_queue() and give the consumer to the job",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: PushType) -> PushMsg {
        PushMsg {
            r#type: kind as i32,
            operation: 1000,
            room: "live://1".into(),
            keys: vec!["k1".into(), "k2".into()],
            ..PushMsg::default()
        }
    }

    #[test]
    fn messages_are_keyed_by_first_key_room_or_op() {
        assert_eq!(partition_key(&msg(PushType::Push)).unwrap(), "k1");
        assert_eq!(partition_key(&msg(PushType::Room)).unwrap(), "live://1");
        assert_eq!(partition_key(&msg(PushType::Broadcast)).unwrap(), "1000");
        assert_eq!(partition_key(&msg(PushType::Group)).unwrap(), "live://1");
        assert_eq!(
            partition_key(&msg(PushType::GroupJoin)).unwrap(),
            "live://1"
        );
        assert!(partition_key(&msg(PushType::Unspecified)).is_err());
        let mut empty = msg(PushType::Push);
        empty.keys.clear();
        assert!(partition_key(&empty).is_err());
    }
}
