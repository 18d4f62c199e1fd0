//! The Kafka producer: acks from all in-sync replicas, idempotence on.

use std::time::Duration;

use async_trait::async_trait;
use prost::Message;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::util::Timeout;

use crate::kafka_properties::ClientProperties as _;
use crate::{Error, Producer, PushMsg, Result, partition_key};

/// How long one message may take to be acknowledged before the push fails.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// How the producer gathers messages into produce requests
/// (`queue.linger`, `queue.produce_in_flight`).
#[derive(Clone, Copy, Debug)]
pub struct Batching {
    /// The longest a message waits for others (`linger.ms`).
    pub linger: Duration,
    /// Requests in flight per broker (1..=5, idempotence keeps order).
    pub in_flight: u32,
}

/// Produces push messages to a Kafka topic.
pub struct KafkaProducer {
    producer: FutureProducer,
    topic: String,
}

impl std::fmt::Debug for KafkaProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaProducer")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl KafkaProducer {
    /// Creates a producer for `topic` on the given bootstrap brokers that
    /// gathers messages for up to `linger` into one request, with up to 5
    /// requests in flight.
    pub fn new(brokers: &[String], topic: &str, linger: Duration) -> Result<KafkaProducer> {
        let batching = Batching {
            linger,
            in_flight: 5,
        };
        Self::with_properties(brokers, topic, batching, &[])
    }

    /// Like [`KafkaProducer::new`], with its batching and extra librdkafka
    /// `properties` (`queue.kafka`: TLS and SASL).
    pub fn with_properties(
        brokers: &[String],
        topic: &str,
        batching: Batching,
        properties: &[(String, String)],
    ) -> Result<KafkaProducer> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers.join(","))
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set(
                "message.timeout.ms",
                DELIVERY_TIMEOUT.as_millis().to_string(),
            )
            .set("linger.ms", linger_ms(batching.linger))
            .set(
                "max.in.flight.requests.per.connection",
                batching.in_flight.clamp(1, 5).to_string(),
            )
            .set_properties(properties)
            .create()
            .map_err(Error::kafka(format!(
                "create a producer for {}",
                brokers.join(",")
            )))?;
        Ok(KafkaProducer {
            producer,
            topic: topic.to_owned(),
        })
    }
}

/// `linger.ms` with its fraction (librdkafka takes 0.5), at most 1 s.
fn linger_ms(linger: Duration) -> String {
    let micros = linger.as_micros().min(1_000_000);
    format!("{}.{:03}", micros / 1_000, micros % 1_000)
}

#[async_trait]
impl Producer for KafkaProducer {
    async fn send(&self, msg: PushMsg) -> Result<()> {
        let key = partition_key(&msg)?;
        let payload = msg.encode_to_vec();
        let record = FutureRecord::to(&self.topic).key(&key).payload(&payload);
        self.producer
            .send(record, Timeout::After(DELIVERY_TIMEOUT))
            .await
            .map(drop)
            .map_err(|(e, _)| Error::kafka(format!("produce to topic {}", self.topic))(e))
    }

    async fn ping(&self) -> Result<()> {
        let producer = self.producer.clone();
        let topic = self.topic.clone();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&topic), Timeout::After(Duration::from_secs(3)))
                .map(drop)
                .map_err(Error::kafka(format!("read the metadata of topic {topic}")))
        })
        .await
        .map_err(|_| Error::Closed("the kafka metadata task ended without an answer"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linger_keeps_its_fraction_of_a_millisecond() {
        assert_eq!(linger_ms(Duration::ZERO), "0.000");
        assert_eq!(linger_ms(Duration::from_micros(500)), "0.500");
        assert_eq!(linger_ms(Duration::from_millis(5)), "5.000");
        assert_eq!(linger_ms(Duration::from_secs(5)), "1000.000");
    }
}
