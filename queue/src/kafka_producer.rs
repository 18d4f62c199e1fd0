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
    /// gathers messages for up to `linger` into one request.
    pub fn new(brokers: &[String], topic: &str, linger: Duration) -> Result<KafkaProducer> {
        Self::with_properties(brokers, topic, linger, &[])
    }

    /// Like [`KafkaProducer::new`], with extra librdkafka `properties`
    /// (`queue.kafka`: TLS and SASL).
    pub fn with_properties(
        brokers: &[String],
        topic: &str,
        linger: Duration,
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
            .set("linger.ms", linger.as_millis().min(1_000).to_string())
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
