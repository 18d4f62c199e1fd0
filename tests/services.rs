//! Real-service harness tests: one round trip each against the Redis,
//! ZooKeeper, Kafka-protocol (tansu) and PostgreSQL servers that
//! `deploy/test.sh` starts.
//!
//! They are `#[ignore]`d so a plain `cargo test` skips them visibly;
//! `deploy/test.sh` starts the services, exports `RIM_TEST_REDIS`,
//! `RIM_TEST_ZK`, `RIM_TEST_KAFKA` and `RIM_TEST_POSTGRES`, and runs them
//! with `--include-ignored`.

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::Message;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use zookeeper_client as zk;

/// Bound for establishing a connection/session to a service.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound for a single request or watch notification.
const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound for Kafka steps that may include a consumer-group rebalance.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(60);
/// Pre-created topic (see deploy/test.sh) used if the broker rejects CreateTopics.
const FALLBACK_TOPIC: &str = "rim-push";

/// Address of a test service from the environment, or a panic saying how to get one.
fn service(var: &str) -> String {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => v.trim().to_string(),
        _ => panic!("{var} is not set: run deploy/test.sh"),
    }
}

/// A name that will not collide with other runs or other tests.
fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock before 1970")
        .as_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// Awaits `fut` for at most `limit`, panicking with `what` on timeout.
async fn within<T>(
    limit: Duration,
    what: impl std::fmt::Display,
    fut: impl Future<Output = T>,
) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

// ---------------------------------------------------------------- Redis

#[tokio::test]
#[ignore = "needs Redis: run deploy/test.sh"]
async fn redis_set_get_del_round_trip() {
    let url = service("RIM_TEST_REDIS");
    let client = redis::Client::open(url.as_str())
        .unwrap_or_else(|e| panic!("RIM_TEST_REDIS={url} is not a valid Redis URL: {e}"));
    let mut con = within(
        CONNECT_TIMEOUT,
        format!("connecting to Redis at RIM_TEST_REDIS={url}"),
        client.get_multiplexed_async_connection(),
    )
    .await
    .unwrap_or_else(|e| panic!("cannot connect to Redis at RIM_TEST_REDIS={url}: {e}"));

    let key = unique("rim-test");
    let value = format!("value-of-{key}");

    within(
        OP_TIMEOUT,
        "Redis SET",
        redis::cmd("SET")
            .arg(&key)
            .arg(&value)
            .query_async::<()>(&mut con),
    )
    .await
    .expect("Redis SET failed");
    let got: Option<String> = within(
        OP_TIMEOUT,
        "Redis GET",
        redis::cmd("GET").arg(&key).query_async(&mut con),
    )
    .await
    .expect("Redis GET failed");
    assert_eq!(
        got.as_deref(),
        Some(value.as_str()),
        "GET {key} returned something else than was SET"
    );

    let deleted: i64 = within(
        OP_TIMEOUT,
        "Redis DEL",
        redis::cmd("DEL").arg(&key).query_async(&mut con),
    )
    .await
    .expect("Redis DEL failed");
    assert_eq!(deleted, 1, "DEL {key} should delete exactly one key");
    let gone: Option<String> = within(
        OP_TIMEOUT,
        "Redis GET after DEL",
        redis::cmd("GET").arg(&key).query_async(&mut con),
    )
    .await
    .expect("Redis GET after DEL failed");
    assert_eq!(gone, None, "{key} still present after DEL");
}

// ------------------------------------------------------------ ZooKeeper

async fn zk_session(addr: &str) -> zk::Client {
    within(
        CONNECT_TIMEOUT,
        format!("connecting to ZooKeeper at RIM_TEST_ZK={addr}"),
        zk::Client::connector()
            .with_session_timeout(Duration::from_secs(6))
            .with_connection_timeout(CONNECT_TIMEOUT)
            .with_fail_eagerly()
            .connect(addr),
    )
    .await
    .unwrap_or_else(|e| panic!("cannot connect to ZooKeeper at RIM_TEST_ZK={addr}: {e}"))
}

#[tokio::test]
#[ignore = "needs ZooKeeper: run deploy/test.sh"]
async fn zookeeper_ephemeral_node_and_watches() {
    let addr = service("RIM_TEST_ZK");
    let parent = format!("/rim-test/{}", unique("zk"));
    let node = format!("{parent}/comet-1");

    // Session A owns the ephemeral node; session B observes it.
    let owner = zk_session(&addr).await;
    let observer = zk_session(&addr).await;

    let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    within(
        OP_TIMEOUT,
        "ZooKeeper mkdir",
        owner.mkdir(&parent, &persistent),
    )
    .await
    .unwrap_or_else(|e| panic!("creating persistent parents {parent}: {e}"));
    let ephemeral = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
    within(
        OP_TIMEOUT,
        "ZooKeeper create",
        owner.create(&node, b"v1", &ephemeral),
    )
    .await
    .unwrap_or_else(|e| panic!("creating ephemeral {node}: {e}"));

    // The observer sees the node with its data and the owner's session id.
    let (data, stat, data_watch) = within(
        OP_TIMEOUT,
        "ZooKeeper get_and_watch_data",
        observer.get_and_watch_data(&node),
    )
    .await
    .unwrap_or_else(|e| panic!("observer reading {node}: {e}"));
    assert_eq!(data, b"v1");
    assert_eq!(
        stat.ephemeral_owner,
        owner.session_id().0,
        "{node} is not owned by the creating session"
    );

    // A data change by the owner fires the observer's data watch.
    within(
        OP_TIMEOUT,
        "ZooKeeper set_data",
        owner.set_data(&node, b"v2", None),
    )
    .await
    .unwrap_or_else(|e| panic!("owner updating {node}: {e}"));
    let event = within(
        OP_TIMEOUT,
        format!("data watch on {node} after set_data"),
        data_watch.changed(),
    )
    .await;
    assert_eq!(
        event.event_type,
        zk::EventType::NodeDataChanged,
        "unexpected watch event {event:?}"
    );
    assert_eq!(event.path, node);

    // Closing the owner's session removes the ephemeral node and fires an exists watch.
    let (stat, exists_watch) = within(
        OP_TIMEOUT,
        "ZooKeeper check_and_watch_stat",
        observer.check_and_watch_stat(&node),
    )
    .await
    .unwrap_or_else(|e| panic!("observer watching {node}: {e}"));
    assert!(stat.is_some(), "{node} vanished before its session closed");
    drop(owner); // last handle: the client closes the session
    let event = within(
        Duration::from_secs(20),
        format!("exists watch on {node} after the owning session closed"),
        exists_watch.changed(),
    )
    .await;
    assert_eq!(
        event.event_type,
        zk::EventType::NodeDeleted,
        "unexpected watch event {event:?}"
    );
    let after = within(
        OP_TIMEOUT,
        "ZooKeeper check_stat",
        observer.check_stat(&node),
    )
    .await
    .unwrap_or_else(|e| panic!("observer checking {node}: {e}"));
    assert!(
        after.is_none(),
        "ephemeral {node} survived its session: {after:?}"
    );

    // Clean up the persistent parent (leave the shared /rim-test root).
    within(
        OP_TIMEOUT,
        "ZooKeeper delete",
        observer.delete(&parent, None),
    )
    .await
    .unwrap_or_else(|e| panic!("deleting {parent}: {e}"));
}

// ---------------------------------------------------------------- Kafka

/// Creates a fresh single-partition topic, or falls back to the pre-created
/// one when the broker refuses CreateTopics. Returns (topic, is_fallback).
async fn kafka_topic(brokers: &str) -> (String, bool) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("socket.connection.setup.timeout.ms", "10000")
        .create()
        .expect("creating Kafka admin client");
    // Fail clearly on an unreachable broker instead of falling back below.
    let metadata =
        tokio::task::block_in_place(|| admin.inner().fetch_metadata(None, CONNECT_TIMEOUT))
            .unwrap_or_else(|e| {
                panic!("cannot connect to Kafka broker at RIM_TEST_KAFKA={brokers}: {e}")
            });
    assert!(
        !metadata.brokers().is_empty(),
        "Kafka at RIM_TEST_KAFKA={brokers} reports no brokers"
    );

    let topic = unique("rim-test");
    let new_topic = NewTopic::new(&topic, 1, TopicReplication::Fixed(1));
    let opts = AdminOptions::new()
        .request_timeout(Some(CONNECT_TIMEOUT))
        .operation_timeout(Some(CONNECT_TIMEOUT));
    let outcome = within(
        CONNECT_TIMEOUT + OP_TIMEOUT,
        format!("creating topic {topic} at RIM_TEST_KAFKA={brokers}"),
        admin.create_topics([&new_topic], &opts),
    )
    .await;
    match outcome {
        Ok(results) => match results.into_iter().next() {
            Some(Ok(_)) | Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => (topic, false),
            other => {
                eprintln!(
                    "broker refused CreateTopics ({other:?}); using pre-created topic {FALLBACK_TOPIC}"
                );
                (FALLBACK_TOPIC.to_string(), true)
            }
        },
        Err(e) => {
            eprintln!("CreateTopics failed ({e}); using pre-created topic {FALLBACK_TOPIC}");
            (FALLBACK_TOPIC.to_string(), true)
        }
    }
}

fn kafka_consumer(brokers: &str, group: &str, topic: &str) -> StreamConsumer {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .set("socket.connection.setup.timeout.ms", "10000")
        .create()
        .expect("creating Kafka consumer");
    consumer
        .subscribe(&[topic])
        .unwrap_or_else(|e| panic!("subscribing to {topic}: {e}"));
    consumer
}

/// Reads the next `n` messages whose payload starts with `prefix`, returning
/// (payload, offset) pairs; with `commit_last` the offset after the n-th is
/// committed synchronously. Foreign messages are tolerated only on the shared
/// fallback topic.
async fn read_own(
    consumer: &StreamConsumer,
    topic: &str,
    prefix: &str,
    fallback: bool,
    n: usize,
    commit_last: bool,
) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    while out.len() < n {
        let msg = consumer
            .recv()
            .await
            .unwrap_or_else(|e| panic!("receiving from {topic}: {e}"));
        let body = String::from_utf8_lossy(msg.payload().unwrap_or_default()).into_owned();
        if !body.starts_with(prefix) {
            assert!(fallback, "foreign message {body:?} in fresh topic {topic}");
            continue;
        }
        out.push((body, msg.offset()));
        if commit_last && out.len() == n {
            consumer
                .commit_message(&msg, CommitMode::Sync)
                .unwrap_or_else(|e| {
                    panic!("committing offset {} of {topic}: {e}", msg.offset() + 1)
                });
        }
    }
    out
}

/// Closes a consumer (leaves the group) without blocking the runtime forever:
/// rdkafka's Drop polls until librdkafka reports the consumer closed.
async fn close_consumer(consumer: StreamConsumer, what: &str) {
    within(
        KAFKA_TIMEOUT,
        format!("closing {what}"),
        tokio::task::spawn_blocking(move || drop(consumer)),
    )
    .await
    .expect("consumer close task panicked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kafka-protocol broker: run deploy/test.sh"]
async fn kafka_commit_and_resume_in_group() {
    let brokers = service("RIM_TEST_KAFKA");
    let (topic, fallback) = kafka_topic(&brokers).await;
    let group = unique("rim-test-group");
    let prefix = unique("msg");
    let payload = |i: usize| format!("{prefix}-{i:02}");

    // Produce 10 messages to partition 0 (so order is defined even on the
    // multi-partition fallback topic).
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("acks", "all")
        .set("message.timeout.ms", "30000")
        .set("socket.connection.setup.timeout.ms", "10000")
        .create()
        .expect("creating Kafka producer");
    for i in 1..=10 {
        let body = payload(i);
        let record = FutureRecord::<str, str>::to(&topic)
            .partition(0)
            .key("rim")
            .payload(&body);
        within(
            KAFKA_TIMEOUT,
            format!("producing {body} to {topic} at RIM_TEST_KAFKA={brokers}"),
            producer.send(record, Duration::from_secs(30)),
        )
        .await
        .unwrap_or_else(|(e, _)| {
            panic!("producing {body} to {topic} at RIM_TEST_KAFKA={brokers}: {e}")
        });
    }

    // First consumer: read messages 1..=5, commit after the 5th, close.
    let first = kafka_consumer(&brokers, &group, &topic);
    let read = within(
        KAFKA_TIMEOUT,
        format!("first consumer in {group} reading messages 1..=5 from {topic} at RIM_TEST_KAFKA={brokers}"),
        read_own(&first, &topic, &prefix, fallback, 5, true),
    )
    .await;
    let (bodies, offsets): (Vec<_>, Vec<_>) = read.into_iter().unzip();
    assert_eq!(
        bodies,
        (1..=5).map(payload).collect::<Vec<_>>(),
        "first consumer read out of order"
    );
    let committed = offsets[4] + 1;
    close_consumer(first, "first consumer").await;

    // Second consumer in the same group resumes exactly at message 6.
    let second = kafka_consumer(&brokers, &group, &topic);
    let read = within(
        KAFKA_TIMEOUT,
        format!("second consumer in {group} reading messages 6..=10 from {topic} at RIM_TEST_KAFKA={brokers}"),
        read_own(&second, &topic, &prefix, fallback, 5, false),
    )
    .await;
    let (bodies, offsets): (Vec<_>, Vec<_>) = read.into_iter().unzip();
    assert_eq!(
        bodies,
        (6..=10).map(payload).collect::<Vec<_>>(),
        "second consumer did not resume exactly at message 6"
    );
    assert_eq!(
        offsets[0], committed,
        "second consumer did not resume at the committed offset"
    );
    close_consumer(second, "second consumer").await;
}

// ---------------------------------------------------------------- PostgreSQL

/// The PostgreSQL the IM layer's cluster store will use: a committed write
/// is read back, a rolled-back one is gone, and a unique key refuses a
/// duplicate (what dense sequences and sender dedup will stand on).
#[tokio::test]
#[ignore = "needs PostgreSQL: run deploy/test.sh"]
async fn postgres_transactions_commit_roll_back_and_keep_keys_unique() {
    let url = service("RIM_TEST_POSTGRES");
    let (mut client, connection) = within(
        CONNECT_TIMEOUT,
        format!("connecting to PostgreSQL at RIM_TEST_POSTGRES={url}"),
        tokio_postgres::connect(&url, tokio_postgres::NoTls),
    )
    .await
    .unwrap_or_else(|e| panic!("cannot connect to PostgreSQL at RIM_TEST_POSTGRES={url}: {e}"));
    tokio::spawn(connection);
    let table = unique("rim_services").replace('-', "_");
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (conv TEXT NOT NULL, seq BIGINT NOT NULL, body TEXT, PRIMARY KEY (conv, seq))"
        ))
        .await
        .expect("create table");

    let tx = client.transaction().await.expect("begin");
    tx.execute(
        &format!("INSERT INTO {table} VALUES ($1, $2, $3)"),
        &[&"c1", &1_i64, &"kept"],
    )
    .await
    .expect("insert");
    tx.commit().await.expect("commit");

    let tx = client.transaction().await.expect("begin");
    tx.execute(
        &format!("INSERT INTO {table} VALUES ($1, $2, $3)"),
        &[&"c1", &2_i64, &"rolled back"],
    )
    .await
    .expect("insert");
    tx.rollback().await.expect("rollback");

    let duplicate = client
        .execute(
            &format!("INSERT INTO {table} VALUES ($1, $2, $3)"),
            &[&"c1", &1_i64, &"again"],
        )
        .await
        .expect_err("a duplicate (conv, seq) is refused");
    assert_eq!(
        duplicate.code(),
        Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION),
        "{duplicate}"
    );

    let rows = client
        .query(&format!("SELECT seq, body FROM {table} ORDER BY seq"), &[])
        .await
        .expect("select");
    let got: Vec<(i64, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(got, vec![(1, "kept".to_owned())]);
    client
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .expect("drop table");
}
