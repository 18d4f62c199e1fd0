//! `rim job` on the real Kafka-protocol broker: every accepted push is
//! delivered even when the job is killed mid-stream (duplicates allowed and
//! counted), and order holds per key.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rim_proto::api::{CometApi, CometGrpc, RpcResult};
use rim_proto::pb::comet::v1 as pb;
use rim_queue::{KafkaProducer, Producer, PushMsg, PushType};
use support::{Proc, service};

/// A comet that records what it was asked to deliver, slowly.
#[derive(Default)]
struct RecordingComet {
    pushes: Mutex<Vec<(String, String)>>,
}

#[async_trait]
impl CometApi for RecordingComet {
    async fn push_msg(&self, req: pb::PushMsgRequest) -> RpcResult<pb::Delivery> {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let body = String::from_utf8_lossy(&req.proto.unwrap_or_default().body).into_owned();
        self.pushes.lock().unwrap().push((req.keys.join(","), body));
        Ok(pb::Delivery {
            delivered: 1,
            ..pb::Delivery::default()
        })
    }
    async fn broadcast(&self, _req: pb::BroadcastRequest) -> RpcResult<pb::Delivery> {
        Ok(pb::Delivery::default())
    }
    async fn broadcast_room(&self, _req: pb::BroadcastRoomRequest) -> RpcResult<pb::Delivery> {
        Ok(pb::Delivery::default())
    }
    async fn broadcast_group(&self, _req: pb::BroadcastGroupRequest) -> RpcResult<pb::Delivery> {
        Ok(pb::Delivery::default())
    }
    async fn change_group(&self, _req: pb::ChangeGroupRequest) -> RpcResult<pb::ChangeGroupReply> {
        Ok(pb::ChangeGroupReply::default())
    }
    async fn rooms(&self) -> RpcResult<Vec<String>> {
        Ok(vec![])
    }
    async fn kick(&self, _keys: Vec<String>) -> RpcResult<u64> {
        Ok(0)
    }
    async fn stats(&self) -> RpcResult<pb::StatsReply> {
        Ok(pb::StatsReply::default())
    }
}

async fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Kafka: run deploy/test.sh"]
async fn a_job_killed_mid_stream_loses_no_push() {
    let brokers = service("RIM_TEST_KAFKA");
    let run = std::process::id();
    let topic = format!("rim-job-test-{run}");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let created = admin
        .create_topics(
            &[NewTopic::new(&topic, 3, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap_or_else(|e| panic!("RIM_TEST_KAFKA={brokers}: cannot create a topic: {e}"));
    assert!(created.iter().all(Result::is_ok), "{created:?}");

    // The comet, over real gRPC.
    let comet = Arc::new(RecordingComet::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(CometGrpc(Arc::clone(&comet)).into_service())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("job.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nid = \"job-test\"\nregion = \"r1\"\n[job]\ngroup = \"rim-job-test-{run}\"\n\
             [queue]\nbackend = \"kafka\"\nbrokers = [\"{brokers}\"]\ntopic = \"{topic}\"\n\
             [discovery]\nbackend = \"static\"\n[[discovery.comets]]\nid = \"fake-1\"\nregion = \"r1\"\ngrpc = \"{grpc}\"\n"
        ),
    )
    .unwrap();
    let start = || Proc::start(&["job", "--config", config.to_str().unwrap()], &[]);

    const N: usize = 300;
    let producer = KafkaProducer::new(
        std::slice::from_ref(&brokers),
        &topic,
        std::time::Duration::from_millis(5),
    )
    .unwrap();
    for i in 0..N {
        let msg = PushMsg {
            r#type: PushType::Push as i32,
            operation: 1000,
            server: "fake-1".into(),
            keys: vec![format!("k{}", i % 10)],
            msg: Bytes::from(format!("{i}")),
            ..PushMsg::default()
        };
        producer.send(msg).await.unwrap();
    }

    let delivered = |comet: &RecordingComet| comet.pushes.lock().unwrap().len();
    let job = start();
    wait_for("a third of the pushes", Duration::from_secs(60), || {
        delivered(&comet) >= N / 3
    })
    .await;
    job.crash();
    let at_crash = delivered(&comet);
    assert!(
        at_crash < N,
        "the job finished before it could be killed; nothing was tested"
    );

    let mut job = start();
    let all: HashSet<String> = (0..N).map(|i| i.to_string()).collect();
    let complete = || {
        let seen: HashSet<String> = comet
            .pushes
            .lock()
            .unwrap()
            .iter()
            .map(|(_, b)| b.clone())
            .collect();
        all.is_subset(&seen)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while !complete() {
        if tokio::time::Instant::now() > deadline {
            job.drain_log();
            panic!(
                "after the restart only {} of {N} pushes arrived; job log:\n{}",
                delivered(&comet),
                job.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    job.stop();

    let pushes = comet.pushes.lock().unwrap().clone();
    let duplicates = pushes.len() - N;
    println!(
        "delivered {} calls for {N} pushes: {duplicates} duplicates after a SIGKILL at {at_crash}",
        pushes.len()
    );
    // Order per key: the first delivery of each message follows the produce order.
    let mut first_seen: HashMap<String, Vec<usize>> = HashMap::new();
    let mut seen = HashSet::new();
    for (key, body) in &pushes {
        if seen.insert(body.clone()) {
            first_seen
                .entry(key.clone())
                .or_default()
                .push(body.parse().unwrap());
        }
    }
    for (key, order) in first_seen {
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "key {key} out of order: {order:?}"
        );
    }
}
