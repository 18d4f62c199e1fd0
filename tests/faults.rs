//! Faults the cluster must ride out without losing an accepted push: a
//! Kafka broker restart. (Killing a job is in job_kafka.rs, stopping a comet
//! in cluster.rs.) Each test runs private service instances it may restart.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use rim_client::{AuthToken, Client};
use rim_testkit::TansuServer;
use support::{Proc, service};

fn config(role: &str) -> String {
    format!("{}/deploy/config/{role}.toml", env!("CARGO_MANIFEST_DIR"))
}

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
    let mut logic = Proc::start(&["logic", "--config", &config("logic")], &env);
    let grpc = logic.addr_after("logic grpc serving");
    let api = logic.addr_after("http api serving");
    let comet_id = format!("comet-f-{run}");
    let mut comet = Proc::start(
        &["comet", "--config", &config("comet")],
        &[
            ("RIM_NODE__ID", comet_id.clone()),
            ("RIM_COMET__TCP_BIND", "127.0.0.1:0".into()),
            ("RIM_COMET__WS_BIND", "127.0.0.1:0".into()),
            ("RIM_COMET__GRPC_BIND", "127.0.0.1:0".into()),
            ("RIM_COMET__DRAIN_WINDOW", "100ms".into()),
            ("RIM_DISCOVERY__BACKEND", "static".into()),
            ("RIM_DISCOVERY__LOGICS", grpc.to_string()),
        ],
    );
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
