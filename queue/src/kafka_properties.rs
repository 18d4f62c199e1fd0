//! The `queue.kafka` pass-through: the TLS and SASL properties (already
//! checked by the config) set on every Kafka client rim creates.

use rdkafka::ClientConfig;

/// Sets extra librdkafka properties on a client configuration.
pub(crate) trait ClientProperties {
    /// Sets each `(name, value)`; later ones win.
    fn set_properties(&mut self, properties: &[(String, String)]) -> &mut Self;
}

impl ClientProperties for ClientConfig {
    fn set_properties(&mut self, properties: &[(String, String)]) -> &mut Self {
        for (name, value) in properties {
            self.set(name, value);
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::kafka_producer::Batching;
    use crate::{KafkaConsumer, KafkaConsumerOptions, KafkaProducer};

    fn props(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const BATCHING: Batching = Batching {
        linger: Duration::from_millis(5),
        in_flight: 1,
    };

    /// No broker is needed: librdkafka checks the properties when the
    /// client is created and connects later, in the background.
    const NOWHERE: &str = "127.0.0.1:9";

    #[tokio::test]
    async fn tls_and_sasl_properties_reach_librdkafka_built_with_ssl() {
        let sasl_ssl = props(&[
            ("security.protocol", "sasl_ssl"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "rim"),
            ("sasl.password", "secret"),
            ("ssl.endpoint.identification.algorithm", "https"),
        ]);
        let brokers = [NOWHERE.to_string()];
        KafkaProducer::with_properties(&brokers, "rim-push", BATCHING, &sasl_ssl)
            .expect("librdkafka is built with SSL and SCRAM");
        let options = KafkaConsumerOptions {
            brokers: brokers.to_vec(),
            topic: "rim-push".into(),
            group: "rim-job-test".into(),
            instance: Some("job-test".into()),
            session_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(1),
            assignment_strategy: "cooperative-sticky".into(),
            max_in_flight: 16,
            max_in_flight_bytes: 1 << 20,
            fetch_wait: Duration::from_millis(100),
        };
        KafkaConsumer::with_properties(&options, &sasl_ssl).expect("the consumer takes them too");

        // The properties are really set: a value librdkafka refuses fails
        // the client's creation.
        let bad = props(&[("ssl.endpoint.identification.algorithm", "nonsense")]);
        assert!(KafkaProducer::with_properties(&brokers, "rim-push", BATCHING, &bad).is_err());
        assert!(KafkaConsumer::with_properties(&options, &bad).is_err());
    }
}
