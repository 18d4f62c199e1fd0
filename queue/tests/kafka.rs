//! The Kafka producer against the broker deploy/test.sh starts.

use std::time::Duration;

use futures::StreamExt;
use prost::Message as _;
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rim_queue::{KafkaProducer, Producer, PushMsg, PushType};

fn brokers() -> String {
    std::env::var("RIM_TEST_KAFKA").expect("RIM_TEST_KAFKA is not set: run deploy/test.sh")
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Kafka: run deploy/test.sh"]
async fn pushes_are_produced_keyed_and_readable() {
    let brokers = brokers();
    let topic = "rim-push";
    let producer = KafkaProducer::new(std::slice::from_ref(&brokers), topic).unwrap();
    tokio::time::timeout(Duration::from_secs(10), producer.ping())
        .await
        .unwrap_or_else(|_| panic!("RIM_TEST_KAFKA={brokers} set but not answering"))
        .unwrap_or_else(|e| panic!("RIM_TEST_KAFKA={brokers} unreachable: {e}"));

    let run = format!("run-{}", std::process::id());
    let sent = PushMsg {
        r#type: PushType::Room as i32,
        operation: 1000,
        room: format!("live://{run}"),
        msg: bytes::Bytes::from("hello"),
        ..PushMsg::default()
    };
    producer.send(sent.clone()).await.unwrap();

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", format!("rim-queue-test-{run}"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        let mut stream = consumer.stream();
        while let Some(message) = stream.next().await {
            let message = message.unwrap();
            if message.key() == Some(sent.room.as_bytes()) {
                return PushMsg::decode(message.payload().unwrap()).unwrap();
            }
        }
        panic!("consumer stream ended");
    })
    .await
    .expect("the produced message was not consumed within 60 s");
    assert_eq!(found, sent);
}
