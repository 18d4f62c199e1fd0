//! Both Kafka halves against the broker deploy/test.sh starts: the producer
//! read back by a plain consumer, and the behaviour suite (each test on a
//! topic and group of its own).

mod suite;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use prost::Message as _;
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rim_queue::{
    Consumer as _, KafkaConsumer, KafkaConsumerOptions, KafkaProducer, Producer, PushMsg, PushType,
};
use suite::Backend;

fn brokers() -> String {
    std::env::var("RIM_TEST_KAFKA").expect("RIM_TEST_KAFKA is not set: run deploy/test.sh")
}

/// A fresh topic (3 partitions) and consumer group on the test broker.
struct Kafka {
    brokers: String,
    topic: String,
    producer: Arc<KafkaProducer>,
}

impl Kafka {
    async fn new(test: &str) -> Kafka {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let brokers = brokers();
        let topic = format!(
            "rim-queue-{test}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .expect("admin client");
        let created = tokio::time::timeout(
            Duration::from_secs(30),
            admin.create_topics(
                &[NewTopic::new(&topic, 3, TopicReplication::Fixed(1))],
                &AdminOptions::new(),
            ),
        )
        .await
        .unwrap_or_else(|_| panic!("RIM_TEST_KAFKA={brokers} set but not answering"))
        .unwrap_or_else(|e| panic!("RIM_TEST_KAFKA={brokers}: cannot create a topic: {e}"));
        assert!(created.iter().all(Result::is_ok), "{created:?}");
        let producer = Arc::new(
            KafkaProducer::new(
                std::slice::from_ref(&brokers),
                &topic,
                std::time::Duration::from_millis(5),
            )
            .expect("producer"),
        );
        Kafka {
            brokers,
            topic,
            producer,
        }
    }
}

#[async_trait]
impl Backend for Kafka {
    type Consumer = KafkaConsumer;

    fn producer(&self) -> Arc<dyn Producer> {
        Arc::clone(&self.producer) as Arc<dyn Producer>
    }

    async fn consumer(&self, max_in_flight: usize) -> KafkaConsumer {
        KafkaConsumer::new(&KafkaConsumerOptions {
            brokers: vec![self.brokers.clone()],
            topic: self.topic.clone(),
            group: format!("{}-group", self.topic),
            // The same member every time: a restart after a crash takes the
            // partitions back at once.
            instance: Some(format!("{}-member", self.topic)),
            max_in_flight,
            max_in_flight_bytes: 64 << 20,
            fetch_wait: std::time::Duration::from_millis(100),
            session_timeout: std::time::Duration::from_secs(10),
            heartbeat_interval: std::time::Duration::from_secs(3),
            assignment_strategy: "range,roundrobin".into(),
        })
        .expect("consumer")
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Kafka: run deploy/test.sh"]
async fn order_holds_per_key() {
    suite::order_holds_per_key(&Kafka::new("order").await).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Kafka: run deploy/test.sh"]
async fn a_crash_before_commit_redelivers() {
    suite::a_crash_before_commit_redelivers(&Kafka::new("crash").await).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Kafka: run deploy/test.sh"]
async fn a_clean_close_resumes_after_the_handled_prefix() {
    suite::a_clean_close_resumes_after_the_handled_prefix(&Kafka::new("close").await).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Kafka: run deploy/test.sh"]
async fn in_flight_is_bounded() {
    suite::in_flight_is_bounded(&Kafka::new("bound").await).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Kafka: run deploy/test.sh"]
async fn pushes_are_produced_keyed_and_readable() {
    let brokers = brokers();
    let topic = "rim-push";
    let producer = KafkaProducer::new(
        std::slice::from_ref(&brokers),
        topic,
        std::time::Duration::from_millis(5),
    )
    .unwrap();
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

/// The Kafka consumer stops handing out messages while `queue.max_bytes`
/// of them are in flight, and goes on once some are handled.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Kafka: run deploy/test.sh"]
async fn in_flight_bytes_are_bounded() {
    let kafka = Kafka::new("bytes").await;
    for i in 0..5 {
        let mut msg = suite::push("bytes", i);
        msg.msg = bytes::Bytes::from(vec![b'x'; 64 << 10]);
        kafka.producer.send(msg).await.expect("enqueued");
    }
    let mut consumer = KafkaConsumer::new(&KafkaConsumerOptions {
        brokers: vec![kafka.brokers.clone()],
        topic: kafka.topic.clone(),
        group: format!("{}-group", kafka.topic),
        instance: Some(format!("{}-member", kafka.topic)),
        max_in_flight: 64,
        max_in_flight_bytes: 150_000,
        fetch_wait: std::time::Duration::from_millis(100),
        session_timeout: std::time::Duration::from_secs(10),
        heartbeat_interval: std::time::Duration::from_secs(3),
        assignment_strategy: "range,roundrobin".into(),
    })
    .expect("consumer");
    // Two messages (~128 KiB) are under the limit, the third crosses it.
    let mut out = Vec::new();
    for _ in 0..3 {
        out.push(suite::next(&mut consumer).await.receipt);
    }
    assert!(consumer.held_bytes().get() > 150_000);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), consumer.recv())
            .await
            .is_err(),
        "a fourth message was handed out with {} bytes in flight",
        consumer.held_bytes().get()
    );
    out.remove(0).handled();
    out.remove(0).handled();
    suite::next(&mut consumer).await.receipt.handled();
    for receipt in out {
        receipt.handled();
    }
    suite::next(&mut consumer).await.receipt.handled();
    assert_eq!(consumer.held_bytes().get(), 0);
    consumer.close(Duration::from_secs(5)).await.expect("close");
}
