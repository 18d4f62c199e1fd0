//! Faults the cluster must ride out without losing an accepted push or a
//! registration: a Kafka broker restart and a ZooKeeper restart. (Killing a
//! job is in job_kafka.rs, stopping a comet in cluster.rs.) Each test runs
//! private service instances it may restart.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use rim_client::{AuthToken, Client};
use rim_testkit::{TansuServer, ZkServer};
use support::{Proc, get_json, service, shipped_config, start_static_comet};

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Redis and tansu: run deploy/test.sh"]
async fn a_kafka_broker_restart_loses_no_accepted_push() {
    let redis = service("RIM_TEST_REDIS");
    let run = std::process::id();
    let mut broker = TansuServer::start_new();
    let topic = format!("rim-faults-{run}");
    broker.create_topic(&topic, 2);

    let queue = [
        ("RIM_QUEUE__BROKERS", broker.addr()),
        ("RIM_QUEUE__TOPIC", topic.clone()),
    ];
    let mut env = vec![
        ("RIM_NODE__ID", format!("logic-f-{run}")),
        ("RIM_LOGIC__GRPC_BIND", "127.0.0.1:0".to_string()),
        ("RIM_API__HTTP_BIND", "127.0.0.1:0".into()),
        ("RIM_LOGIC__AUTH__POLICY", "none".into()),
        ("RIM_ROUTER__REDIS", redis),
        ("RIM_DISCOVERY__BACKEND", "static".into()),
    ];
    env.extend(queue.iter().cloned());
    let mut logic = Proc::start(&["logic", "--config", &shipped_config("logic")], &env);
    let grpc = logic.addr_after("logic grpc serving");
    let api = logic.addr_after("http api serving");
    let comet_id = format!("comet-f-{run}");
    let mut comet = start_static_comet(&comet_id, grpc);
    let tcp = comet.addr_after("accepting clients listener=\"tcp\"");
    let comet_grpc = comet.addr_after("grpc=Some(");

    let key = format!("durable-{run}");
    let mut client = Client::connect_tcp(tcp).await.unwrap();
    let token = AuthToken {
        mid: 9,
        key: key.clone(),
        room_id: String::new(),
        platform: "test".into(),
        accepts: vec![1000],
    };
    client.auth(&token).await.unwrap();

    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let url = format!("http://{api}/goim/push/keys?operation=1000&keys={key}");
    let push = async |i: usize| -> Option<String> {
        let answer = http.post(&url).body(i.to_string()).send().await.ok()?;
        answer.status().is_success().then(|| i.to_string())
    };
    let mut accepted = HashSet::new();
    // No job yet: these wait in the broker, on disk.
    for i in 0..40 {
        accepted.extend(push(i).await);
    }
    assert_eq!(
        accepted.len(),
        40,
        "the broker accepted every push before the restart"
    );
    broker.stop();
    broker.start();
    for i in 40..80 {
        accepted.extend(push(i).await);
    }

    let dir = tempfile::tempdir().unwrap();
    let job_config = dir.path().join("job.toml");
    std::fs::write(
        &job_config,
        format!(
            "[node]\nid = \"job-f-{run}\"\n[queue]\nbackend = \"kafka\"\nbrokers = [\"{}\"]\ntopic = \"{topic}\"\n\
             [discovery]\nbackend = \"static\"\n[[discovery.comets]]\nid = \"{comet_id}\"\ngrpc = \"{comet_grpc}\"\n",
            broker.addr()
        ),
    )
    .unwrap();
    let job = Proc::start(&["job", "--config", job_config.to_str().unwrap()], &[]);

    let mut received = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !accepted.is_subset(&received) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let frame = tokio::time::timeout(left, client.next_frame()).await;
        let Ok(Ok(Some(frame))) = frame else {
            let missing: Vec<_> = accepted.difference(&received).collect();
            panic!(
                "accepted pushes never arrived: {missing:?}\nbroker log:\n{}",
                broker.log()
            );
        };
        received.insert(String::from_utf8_lossy(&frame.body).into_owned());
    }
    println!(
        "{} of 80 pushes accepted across the broker restart, all delivered",
        accepted.len()
    );
    drop(client);
    job.stop();
    comet.stop();
    logic.stop();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Redis, ZooKeeper and tansu: run deploy/test.sh"]
async fn a_zookeeper_restart_loses_no_registration() {
    let redis = service("RIM_TEST_REDIS");
    let zk = tokio::task::block_in_place(ZkServer::start_new);
    let run = std::process::id();
    let topic = format!("rim-zkfault-{run}");
    let broker = rim_testkit::TansuServer::start_new();
    broker.create_topic(&topic, 2);
    let discovery = |id: String| -> Vec<(&'static str, String)> {
        vec![
            ("RIM_NODE__ID", id),
            ("RIM_DISCOVERY__BACKEND", "zookeeper".into()),
            ("RIM_DISCOVERY__ZOOKEEPER", zk.addr()),
            ("RIM_DISCOVERY__ROOT", format!("/rim-zkfault-{run}")),
            ("RIM_DISCOVERY__SESSION_TIMEOUT", "2s".into()),
            ("RIM_QUEUE__BROKERS", broker.addr()),
            ("RIM_QUEUE__TOPIC", topic.clone()),
        ]
    };
    let mut env = discovery(format!("logic-z-{run}"));
    env.extend([
        ("RIM_LOGIC__GRPC_BIND", "127.0.0.1:0".to_string()),
        ("RIM_API__HTTP_BIND", "127.0.0.1:0".into()),
        ("RIM_LOGIC__AUTH__POLICY", "none".into()),
        ("RIM_ROUTER__REDIS", redis),
    ]);
    let mut logic = Proc::start(&["logic", "--config", &shipped_config("logic")], &env);
    let api = logic.addr_after("http api serving");
    let mut env = discovery(format!("comet-z-{run}"));
    env.extend([
        ("RIM_COMET__TCP_BIND", "127.0.0.1:0".to_string()),
        ("RIM_COMET__WS_BIND", "127.0.0.1:0".into()),
        ("RIM_COMET__GRPC_BIND", "127.0.0.1:0".into()),
        ("RIM_COMET__DRAIN_WINDOW", "100ms".into()),
    ]);
    let mut comet = Proc::start(&["comet", "--config", &shipped_config("comet")], &env);
    let tcp = comet.addr_after("accepting clients listener=\"tcp\"");
    let job = Proc::start(
        &["job", "--config", &shipped_config("job")],
        &discovery(format!("job-z-{run}")),
    );

    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let instances = async || -> usize {
        let answer = get_json(&http, &format!("http://{api}/goim/nodes/instances")).await;
        answer["data"].as_array().map_or(0, Vec::len)
    };
    let wait_registered = async |what: &str| {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while instances().await != 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: the comet is not registered"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    wait_registered("before the restart").await;

    let key = format!("zk-{run}");
    let token = AuthToken {
        mid: 11,
        key: key.clone(),
        room_id: String::new(),
        platform: "test".into(),
        accepts: vec![1000],
    };
    let mut client = Client::connect_tcp(tcp).await.unwrap();
    client.auth(&token).await.unwrap();
    let push = async |body: &'static str| {
        let url = format!("http://{api}/goim/push/keys?operation=1000&keys={key}");
        let answer = http.post(url).body(body).send().await.unwrap();
        assert!(
            answer.status().is_success(),
            "{}",
            answer.text().await.unwrap_or_default()
        );
    };
    let next = async |client: &mut Client| -> String {
        let frame = tokio::time::timeout(Duration::from_secs(60), client.next_frame()).await;
        let frame = frame
            .expect("a frame within 60 s")
            .expect("read")
            .expect("open");
        String::from_utf8_lossy(&frame.body).into_owned()
    };
    push("before").await;
    assert_eq!(next(&mut client).await, "before");

    // Down for longer than the session timeout: the sessions expire.
    tokio::task::block_in_place(|| zk.stop());
    tokio::time::sleep(Duration::from_secs(4)).await;
    tokio::task::block_in_place(|| zk.start());

    wait_registered("after the restart").await;
    push("after").await;
    assert_eq!(next(&mut client).await, "after");
    drop(client);
    job.stop();
    comet.stop();
    logic.stop();
}
