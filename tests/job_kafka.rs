//! `rim job` on the real Kafka-protocol broker: every accepted push is
//! delivered even when the job is killed mid-stream (duplicates allowed and
//! counted), order holds per key, and a job restarted with the same identity
//! takes its partitions back and delivers what is produced after the restart.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// When each push arrived, in the order of `pushes`.
    arrivals: Mutex<Vec<Instant>>,
}

#[async_trait]
impl CometApi for RecordingComet {
    async fn push_msg(&self, req: pb::PushMsgRequest) -> RpcResult<pb::Delivery> {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let body = String::from_utf8_lossy(&req.proto.unwrap_or_default().body).into_owned();
        let mut pushes = self.pushes.lock().unwrap();
        pushes.push((req.keys.join(","), body));
        self.arrivals.lock().unwrap().push(Instant::now());
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

/// A topic of this run's own, a recording comet on real gRPC, and a job
/// config naming them (node id `name`, group and topic `rim-<name>-<pid>`,
/// the group settings for tansu).
struct JobUnderTest {
    brokers: String,
    topic: String,
    comet: Arc<RecordingComet>,
    config: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl JobUnderTest {
    async fn new(name: &str) -> JobUnderTest {
        let brokers = service("RIM_TEST_KAFKA");
        let run = std::process::id();
        let topic = format!("rim-{name}-{run}");
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
                "[node]\nid = \"{name}\"\nregion = \"r1\"\n[job]\ngroup = \"rim-{name}-{run}\"\n\
                 [queue]\nbackend = \"kafka\"\nbrokers = [\"{brokers}\"]\ntopic = \"{topic}\"\n\
                 {TANSU_GROUP}\
                 [discovery]\nbackend = \"static\"\n[[discovery.comets]]\nid = \"fake-1\"\nregion = \"r1\"\ngrpc = \"{grpc}\"\n"
            ),
        )
        .unwrap();
        JobUnderTest {
            brokers,
            topic,
            comet,
            config,
            _dir: dir,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Kafka: run deploy/test.sh"]
async fn a_job_killed_mid_stream_loses_no_push() {
    let JobUnderTest {
        brokers,
        topic,
        comet,
        config,
        _dir,
    } = JobUnderTest::new("job-test").await;
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

/// Consumer group settings for tansu, the test broker: it holds a static
/// member's JoinGroup and SyncGroup for 3 s each, so jobs join as dynamic
/// members, and a session shorter than its 3 s pause for a follower keeps a
/// restarted job from being stranded without partitions (docs/operations.md).
const TANSU_GROUP: &str =
    "static_membership = false\nsession_timeout = \"2s\"\nheartbeat_interval = \"500ms\"\n";

/// Extra environment for the jobs of the restart test, to measure settings
/// other than the defaults: `RIM_TEST_JOB_ENV="RIM_QUEUE__SESSION_TIMEOUT=10s
/// RIM_QUEUE__GROUP_INSTANCE_ID=job-restart"` (space-separated `NAME=value`).
fn job_env() -> Vec<(String, String)> {
    std::env::var("RIM_TEST_JOB_ENV")
        .unwrap_or_default()
        .split_whitespace()
        .map(|pair| {
            let (name, value) = pair
                .split_once('=')
                .unwrap_or_else(|| panic!("RIM_TEST_JOB_ENV: {pair:?} is not NAME=value"));
            (name.to_owned(), value.to_owned())
        })
        .collect()
}

/// A job SIGKILLed after it owned every partition, and started again with
/// the same node id (after `RIM_TEST_JOB_RESTART_DELAY_MS`, default at
/// once), delivers pushes produced after the restart on every partition and
/// keeps them: no revocation in the next 5 s. Prints the time from the
/// start to the first delivery (docs/benchmarks.md, "Job restart recovery").
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Kafka: run deploy/test.sh"]
async fn a_restarted_job_takes_its_partitions_back_and_delivers() {
    // The same node id (the job's identity) before and after the restart,
    // and the group settings for tansu (docs/operations.md, "Job restart").
    let JobUnderTest {
        brokers,
        topic,
        comet,
        config,
        _dir,
    } = JobUnderTest::new("job-restart").await;
    let env = job_env();
    let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let start = || Proc::start(&["job", "--config", config.to_str().unwrap()], &env);
    let producer = Arc::new(
        KafkaProducer::new(
            std::slice::from_ref(&brokers),
            &topic,
            Duration::from_millis(5),
        )
        .unwrap(),
    );
    // 30 keys: every partition of the 3 gets some.
    const KEYS: usize = 30;
    let push = |body: String, i: usize| PushMsg {
        r#type: PushType::Push as i32,
        operation: 1000,
        server: "fake-1".into(),
        keys: vec![format!("k{}", i % KEYS)],
        msg: Bytes::from(body),
        ..PushMsg::default()
    };
    let bodies = |comet: &RecordingComet, prefix: &str| -> HashSet<String> {
        comet
            .pushes
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, b)| b.starts_with(prefix))
            .map(|(_, b)| b.clone())
            .collect()
    };

    // The first job owns every partition once it delivered a push of every key.
    let mut first = start();
    for i in 0..KEYS {
        producer.send(push(format!("before-{i}"), i)).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while bodies(&comet, "before-").len() < KEYS {
        if Instant::now() > deadline {
            first.drain_log();
            panic!(
                "the first job delivered only {:?}; log:\n{}",
                bodies(&comet, "before-"),
                first.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.crash();
    let delay = Duration::from_millis(
        std::env::var("RIM_TEST_JOB_RESTART_DELAY_MS")
            .ok()
            .and_then(|ms| ms.parse().ok())
            .unwrap_or(0),
    );
    tokio::time::sleep(delay).await;

    // Restart with the same identity and produce a push every 50 ms until
    // one produced after the restart arrives.
    let started = Instant::now();
    let mut job = start();
    let mut produced = 0;
    let deadline = started + Duration::from_secs(60);
    while bodies(&comet, "after-").is_empty() {
        if Instant::now() > deadline {
            job.drain_log();
            panic!(
                "nothing produced after the restart arrived; job log:\n{}",
                job.log()
            );
        }
        producer
            .send(push(format!("after-{produced}"), produced))
            .await
            .unwrap();
        produced += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Then one push of every key: the restarted job must own every partition.
    for i in produced..produced + KEYS {
        producer.send(push(format!("after-{i}"), i)).await.unwrap();
    }
    produced += KEYS;
    let all: HashSet<String> = (0..produced).map(|i| format!("after-{i}")).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !all.is_subset(&bodies(&comet, "after-")) {
        if Instant::now() > deadline {
            job.drain_log();
            panic!(
                "after the restart {} of {produced} pushes arrived; job log:\n{}",
                bodies(&comet, "after-").len(),
                job.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let everything = started.elapsed();
    let (first_delivery, first_new) = {
        let pushes = comet.pushes.lock().unwrap();
        let arrivals = comet.arrivals.lock().unwrap();
        let after_start = |new_only: bool| {
            pushes
                .iter()
                .zip(arrivals.iter())
                .filter(|((_, body), at)| {
                    **at >= started && (!new_only || body.starts_with("after-"))
                })
                .map(|(_, at)| at.duration_since(started))
                .min()
        };
        (after_start(false), after_start(true))
    };

    // A while later, still the owner of every partition: a member the
    // coordinator expelled on its first heartbeats (what tansu does to a
    // static member that rejoined later than its session allowed) has been
    // revoked and is rejoining by now.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let later = Instant::now();
    for i in 0..KEYS {
        producer.send(push(format!("later-{i}"), i)).await.unwrap();
    }
    let deadline = later + Duration::from_secs(60);
    while bodies(&comet, "later-").len() < KEYS {
        if Instant::now() > deadline {
            job.drain_log();
            panic!(
                "the later pushes did not all arrive; job log:\n{}",
                job.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let later = later.elapsed();
    job.drain_log();
    let log = job.log();
    let count = |what: &str| log.lines().filter(|l| l.contains(what)).count();
    let (assigned, revoked) = (count("partitions assigned"), count("partitions revoked"));
    println!(
        "restart {delay:?} after the kill, settings {env:?}: first delivery {first_delivery:?} \
         after the start, first push produced after the restart {first_new:?}, all {produced} \
         by {everything:?}; {KEYS} pushes 5 s later took {later:?}; {assigned} assignments, \
         {revoked} revocations"
    );
    for line in log.lines().filter(|l| l.contains("partitions ")) {
        println!("  {line}");
    }
    assert!(assigned >= 1, "no assignment logged:\n{log}");
    assert_eq!(revoked, 0, "the restarted job lost partitions:\n{log}");
    job.stop();
}
