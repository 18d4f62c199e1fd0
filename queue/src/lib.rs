//! rim-queue owns the push queue between the api (producer) and the job
//! (consumer): the `Producer` trait, a Kafka producer (rdkafka) and a bounded
//! in-process queue for standalone.
//!
//! Partitioning keeps order where it matters: a message is keyed by its first
//! connection key (PUSH), its room (ROOM) or its op (BROADCAST), so messages
//! to one key or one room stay in one partition, in order.
//!
//! It does not interpret messages: planning is the api's, delivery the job's.

mod kafka;
mod memory;

use std::sync::Arc;

use async_trait::async_trait;
use rim_config::{QueueBackend, QueueConfig};
pub use rim_proto::pb::queue::v1::PushMsg;
pub use rim_proto::pb::queue::v1::push_msg::Type as PushType;

pub use crate::kafka::KafkaProducer;
pub use crate::memory::{MemoryConsumer, MemoryProducer, QueueDepth, memory_queue};

/// Why a message could not be enqueued.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The queue is full and did not drain in time (in-process queue).
    #[error("queue full: {0}")]
    Full(String),
    /// The broker is unreachable or refused the message.
    #[error("queue unavailable: {0}")]
    Unavailable(String),
    /// The message is not a valid push.
    #[error("invalid push message: {0}")]
    Invalid(String),
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
/// room (ROOM) or the op (BROADCAST).
pub fn partition_key(msg: &PushMsg) -> Result<String> {
    match msg.r#type() {
        PushType::Push => msg
            .keys
            .first()
            .cloned()
            .ok_or_else(|| Error::Invalid("a PUSH message has no key".into())),
        PushType::Room if !msg.room.is_empty() => Ok(msg.room.clone()),
        PushType::Room => Err(Error::Invalid("a ROOM message has no room".into())),
        PushType::Broadcast => Ok(msg.operation.to_string()),
        PushType::Unspecified => Err(Error::Invalid("message type is unspecified".into())),
    }
}

/// Connects the producer the config names. The in-process queue is not
/// built here: its consumer must be handed to the job of the same process
/// (see [`memory_queue`]).
pub fn kafka_producer(config: &QueueConfig) -> Result<Arc<dyn Producer>> {
    match config.backend {
        QueueBackend::Kafka => Ok(Arc::new(KafkaProducer::new(
            &config.brokers,
            &config.topic,
        )?)),
        QueueBackend::Memory => Err(Error::Invalid(
            "queue.backend is memory: use memory_queue() and give the consumer to the job".into(),
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
        assert!(partition_key(&msg(PushType::Unspecified)).is_err());
        let mut empty = msg(PushType::Push);
        empty.keys.clear();
        assert!(partition_key(&empty).is_err());
    }
}
