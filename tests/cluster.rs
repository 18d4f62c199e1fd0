//! The distributed end-to-end suite: two regions of two comets each, two
//! logics and one job per region, every role its own `rim` process, on the
//! real ZooKeeper, Redis, Kafka-protocol broker and PostgreSQL (the IM
//! store) deploy/test.sh starts.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use rim_client::{AuthToken, Client};
use support::exposition::scrape;
use support::{Proc, get_json, next_push, post_ok, service, shipped_config};

struct Cluster {
    logics: Vec<(Proc, SocketAddr)>,
    comets: Vec<(Proc, SocketAddr, SocketAddr)>,
    jobs: Vec<Proc>,
    /// Where each comet and each job serves /metrics, in start order.
    comet_metrics: Vec<SocketAddr>,
    job_metrics: Vec<SocketAddr>,
    http: reqwest::Client,
}

async fn start_cluster(run: &str) -> Cluster {
    let (zk, redis, kafka) = (
        service("RIM_TEST_ZK"),
        service("RIM_TEST_REDIS"),
        service("RIM_TEST_KAFKA"),
    );
    let topic = format!("rim-e2e-{run}");
    support::create_topic(&kafka, &topic).await;
    let common = |id: String, region: &str| -> Vec<(&'static str, String)> {
        vec![
            ("RIM_NODE__ID", id),
            ("RIM_NODE__REGION", region.to_string()),
            ("RIM_DISCOVERY__BACKEND", "zookeeper".into()),
            ("RIM_DISCOVERY__ZOOKEEPER", zk.clone()),
            ("RIM_DISCOVERY__ROOT", format!("/rim-e2e-{run}")),
            ("RIM_QUEUE__BROKERS", kafka.clone()),
            ("RIM_QUEUE__TOPIC", topic.clone()),
        ]
    };
    // Both logics share one message store (a schema of this run's own).
    let store = support::postgres_schema(&format!("rim_e2e_{run}").replace('-', "_")).await;
    let mut logics = Vec::new();
    for (n, name) in ["a", "b"].into_iter().enumerate() {
        let mut env = common(format!("logic-{name}-{run}"), "r1");
        env.extend([
            ("RIM_LOGIC__GRPC_BIND", "127.0.0.1:0".to_string()),
            ("RIM_API__HTTP_BIND", "127.0.0.1:0".into()),
            ("RIM_LOGIC__AUTH__POLICY", "none".into()),
            ("RIM_ROUTER__REDIS", redis.clone()),
            ("RIM_IM__STORE", "postgres".into()),
            ("RIM_IM__POSTGRES", store.clone()),
            ("RIM_IM__NODE", n.to_string()),
        ]);
        let mut logic = Proc::start(&["logic", "--config", &shipped_config("logic")], &env);
        let http = logic.addr_after("http api serving");
        logics.push((logic, http));
    }
    let mut comets = Vec::new();
    let mut comet_metrics = Vec::new();
    for (name, region) in [("1", "r1"), ("2", "r1"), ("3", "r2"), ("4", "r2")] {
        let mut env = common(format!("comet-{name}-{run}"), region);
        env.extend([
            ("RIM_COMET__TCP_BIND", "127.0.0.1:0".to_string()),
            ("RIM_COMET__WS_BIND", "127.0.0.1:0".into()),
            ("RIM_COMET__GRPC_BIND", "127.0.0.1:0".into()),
            ("RIM_COMET__ROOM_REPORT_INTERVAL", "300ms".into()),
            ("RIM_COMET__DRAIN_WINDOW", "200ms".into()),
        ]);
        let mut comet = Proc::start(&["comet", "--config", &shipped_config("comet")], &env);
        let tcp = comet.addr_after("accepting clients listener=\"tcp\"");
        let ws = comet.addr_after("accepting clients listener=\"ws\"");
        comet_metrics.push(comet.addr_after("metrics serving"));
        comets.push((comet, tcp, ws));
    }
    let mut jobs = Vec::new();
    let mut job_metrics = Vec::new();
    for region in ["r1", "r2"] {
        let mut env = common(format!("job-{region}-{run}"), region);
        env.push(("RIM_JOB__GROUP", format!("rim-job-{region}-{run}")));
        let mut job = Proc::start(&["job", "--config", &shipped_config("job")], &env);
        job_metrics.push(job.addr_after("metrics serving"));
        jobs.push(job);
    }
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let cluster = Cluster {
        logics,
        comets,
        jobs,
        comet_metrics,
        job_metrics,
        http: reqwest::Client::new(),
    };
    // Every logic sees every comet through ZooKeeper.
    for (_, http) in &cluster.logics {
        let url = format!("http://{http}/goim/nodes/instances");
        wait_until("logics to discover the 4 comets", || async {
            let answer = get_json(&cluster.http, &url).await;
            answer["data"].as_array().is_some_and(|a| a.len() == 4)
        })
        .await;
    }
    cluster
}

async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl Cluster {
    async fn push(&self, logic: usize, path: &str, body: &str) -> serde_json::Value {
        let (_, http) = &self.logics[logic];
        post_ok(&self.http, &format!("http://{http}{path}"), body).await
    }

    fn stop(self) {
        // Jobs first (they commit), then comets (they drain), then logics.
        for job in self.jobs {
            job.stop();
        }
        for (comet, _, _) in self.comets {
            comet.stop();
        }
        for (logic, _) in self.logics {
            logic.stop();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs ZooKeeper, Redis, Kafka and PostgreSQL: run deploy/test.sh"]
async fn pushes_reach_exactly_their_recipients_across_comets_and_regions() {
    let run = format!("{}", std::process::id());
    let cluster = start_cluster(&run).await;
    let room = format!("live://e2e-{run}");
    let token = |mid: i64, key: &str, room: &str| AuthToken {
        mid,
        key: format!("{key}-{run}"),
        room_id: room.into(),
        platform: "test".into(),
        accepts: vec![1000],
    };
    let (c1, c2, c3, c4) = (
        &cluster.comets[0],
        &cluster.comets[1],
        &cluster.comets[2],
        &cluster.comets[3],
    );
    // User 1: a TCP device on comet 1 (r1) and a WebSocket device on comet 3 (r2).
    let mut u1_tcp = Client::connect_tcp(c1.1).await.unwrap();
    u1_tcp.auth(&token(1, "u1-tcp", &room)).await.unwrap();
    let mut u1_ws = Client::connect_ws(&format!("ws://{}/sub", c3.2))
        .await
        .unwrap();
    u1_ws.auth(&token(1, "u1-ws", &room)).await.unwrap();
    // User 2 on comet 2 (r1, WebSocket); user 3 on comet 4 (r2, TCP, another room).
    let mut u2 = Client::connect_ws(&format!("ws://{}/sub", c2.2))
        .await
        .unwrap();
    u2.auth(&token(2, "u2", &room)).await.unwrap();
    let mut u3 = Client::connect_tcp(c4.1).await.unwrap();
    u3.auth(&token(3, "u3", "live://elsewhere")).await.unwrap();

    // Unicast by key, through either logic.
    let answer = cluster
        .push(
            1,
            &format!("/goim/push/keys?operation=1000&keys=u2-{run}"),
            "to-u2",
        )
        .await;
    assert_eq!(answer["data"]["connections"], 1);
    assert_eq!(next_push(&mut u2).await, "to-u2");

    // By user: both devices, in both regions.
    let answer = cluster
        .push(0, "/goim/push/mids?operation=1000&mids=1", "to-u1")
        .await;
    assert_eq!(
        (
            answer["data"]["connections"].as_u64(),
            answer["data"]["comets"].as_u64()
        ),
        (Some(2), Some(2))
    );
    assert_eq!(next_push(&mut u1_tcp).await, "to-u1");
    assert_eq!(next_push(&mut u1_ws).await, "to-u1");

    // A room spread over comets of both regions.
    cluster
        .push(
            0,
            &format!("/goim/push/room?operation=1000&type=live&room=e2e-{run}"),
            "to-room",
        )
        .await;
    for client in [&mut u1_tcp, &mut u1_ws, &mut u2] {
        assert_eq!(next_push(client).await, "to-room");
    }

    // Everyone.
    cluster
        .push(1, "/goim/push/all?operation=1000", "to-all")
        .await;
    for client in [&mut u1_tcp, &mut u1_ws, &mut u2, &mut u3] {
        assert_eq!(next_push(client).await, "to-all");
    }

    // Nothing else reached anyone: each client's next frame is the end marker.
    cluster
        .push(0, "/goim/push/all?operation=1000", "end")
        .await;
    for client in [&mut u1_tcp, &mut u1_ws, &mut u2, &mut u3] {
        assert_eq!(next_push(client).await, "end");
    }

    // Cluster-wide room counts flow back through logic to heartbeats.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while u2.heartbeat().await.unwrap() != 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the room's cluster-wide count never reached 3"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Every comet's connection gauge counts its clients: u1-tcp (TCP) on
    // comet 1, u2 (WebSocket) on 2, u1-ws (WebSocket) on 3, u3 (TCP) on 4.
    for (i, (tcp, ws)) in [(1.0, 0.0), (0.0, 1.0), (0.0, 1.0), (1.0, 0.0)]
        .into_iter()
        .enumerate()
    {
        let metrics = scrape(&cluster.http, cluster.comet_metrics[i]).await;
        assert_eq!(
            metrics.get("rim_build_info", &[("role", "comet")]),
            Some(1.0)
        );
        assert_eq!(
            metrics.get("rim_comet_connections", &[("transport", "tcp")]),
            Some(tcp),
            "comet {}",
            i + 1
        );
        assert_eq!(
            metrics.get("rim_comet_connections", &[("transport", "ws")]),
            Some(ws),
            "comet {}",
            i + 1
        );
        // At least the auth reply and the first broadcast were written.
        assert!(metrics.sum("rim_comet_frames_out_total") >= 2.0);
    }
    // Each region's job delivered both broadcasts (and r1's the room push
    // and unicasts) and reports its consumer lag per partition: librdkafka
    // statistics come every 5 s, and a message is counted once every comet
    // answered, which may be just after its client saw it.
    for (i, addr) in cluster.job_metrics.iter().enumerate() {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let metrics = scrape(&cluster.http, *addr).await;
            assert_eq!(metrics.families["rim_job_consumer_lag"], "gauge");
            let lag = metrics
                .samples
                .iter()
                .any(|s| s.name == "rim_job_consumer_lag");
            let broadcasts = metrics.get(
                "rim_job_messages_total",
                &[("kind", "broadcast"), ("result", "delivered")],
            );
            if lag
                && broadcasts >= Some(2.0)
                && metrics.sum("rim_job_push_latency_seconds_count") >= 2.0
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {i}: no lag or not every delivery counted: {:?}",
                metrics.samples
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    drop((u1_tcp, u1_ws, u2, u3));
    cluster.stop();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs ZooKeeper, Redis, Kafka and PostgreSQL: run deploy/test.sh"]
async fn clients_of_a_stopped_comet_reconnect_to_one_node_selection_picks() {
    let run = format!("{}-b", std::process::id());
    let mut cluster = start_cluster(&run).await;
    let key = format!("mover-{run}");
    let token = AuthToken {
        mid: 5,
        key: key.clone(),
        room_id: String::new(),
        platform: "test".into(),
        accepts: vec![1000],
    };
    let mut client = Client::connect_tcp(cluster.comets[1].1).await.unwrap();
    client.auth(&token).await.unwrap();
    cluster
        .push(
            0,
            &format!("/goim/push/keys?operation=1000&keys={key}"),
            "before",
        )
        .await;
    assert_eq!(next_push(&mut client).await, "before");

    // Stop comet 2 (region r1): it deregisters and drains its clients.
    let (comet2, _, _) = cluster.comets.remove(1);
    comet2.stop();
    client
        .closed_within(Duration::from_secs(10))
        .await
        .expect("the drained client is closed");

    // The client asks for nodes in its region and reconnects to the first.
    let (_, http) = &cluster.logics[0];
    let url = format!("http://{http}/goim/nodes/weighted?platform=test&region=r1");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let target = loop {
        let answer = get_json(&cluster.http, &url).await;
        let instances = answer["data"]["instances"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let first = instances.first().cloned().unwrap_or_default();
        if instances.len() == 3
            && first["region"] == "r1"
            && first["id"] != format!("comet-2-{run}")
        {
            break first["tcp"].as_str().unwrap_or_default().to_string();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node selection still offers the stopped comet: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut client = Client::connect_tcp(target.parse().unwrap()).await.unwrap();
    client.auth(&token).await.unwrap();
    let answer = cluster
        .push(
            1,
            &format!("/goim/push/keys?operation=1000&keys={key}"),
            "after",
        )
        .await;
    assert_eq!(answer["data"]["connections"], 1, "{answer}");
    assert_eq!(next_push(&mut client).await, "after");
    drop(client);
    cluster.stop();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs ZooKeeper, Redis, Kafka and PostgreSQL: run deploy/test.sh"]
async fn chat_messages_are_stored_once_and_reach_every_device_across_regions() {
    use rim_proto::im::{Body, Code, Msg, SendReply, SendRequest, SyncReply, SyncRequest};
    use rim_proto::{Frame, Op};

    let run = format!("im{}", std::process::id());
    let cluster = start_cluster(&run).await;
    let device = |mid: i64, key: &str| AuthToken {
        mid,
        key: format!("{key}-{run}"),
        accepts: vec![21, 27],
        ..AuthToken::default()
    };
    async fn next_im(client: &mut Client) -> Frame {
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(30), client.next_frame())
                .await
                .expect("a frame within 30 s")
                .unwrap()
                .expect("open");
            if frame.op != rim_proto::Op::HEARTBEAT_REPLY {
                return frame;
            }
        }
    }
    // Alice on comet 1 (r1); Bob on comet 2 (r1) and comet 3 (r2).
    let mut alice = Client::connect_tcp(cluster.comets[0].1).await.unwrap();
    alice.auth(&device(1, "alice")).await.unwrap();
    let mut bob_r1 = Client::connect_tcp(cluster.comets[1].1).await.unwrap();
    bob_r1.auth(&device(2, "bob-r1")).await.unwrap();
    let mut bob_r2 = Client::connect_tcp(cluster.comets[2].1).await.unwrap();
    bob_r2.auth(&device(2, "bob-r2")).await.unwrap();

    for (i, seq) in [(1, 1u64), (2, 2), (1, 1)] {
        // The third send repeats the first cmid: the same message.
        let send = SendRequest {
            cmid: format!("c-{i}"),
            to: Some(2),
            body: format!("hello {i}"),
            ..SendRequest::default()
        };
        alice.send(send.to_frame(i)).await.unwrap();
        let reply = next_im(&mut alice).await;
        assert_eq!((reply.op, reply.seq), (Op::IM_SEND_REPLY, i));
        let reply = SendReply::decode(&reply.body).unwrap();
        assert_eq!((reply.code, reply.seq), (Code::OK, seq), "{reply:?}");
    }
    // Each of Bob's devices, in both regions, gets each message once (the
    // resend's NOTIFY sync may come in between; clients order by seq).
    for bob in [&mut bob_r1, &mut bob_r2] {
        let mut got = Vec::new();
        while got.len() < 2 {
            let frame = next_im(bob).await;
            if frame.op == Op::IM_NOTIFY {
                continue;
            }
            assert_eq!(frame.op, Op::IM_MSG);
            let msg = Msg::decode(&frame.body).unwrap();
            assert_eq!((msg.sync, msg.from), (Some(msg.seq), 1));
            got.push(msg.seq);
        }
        got.sort_unstable();
        assert_eq!(got, [1, 2]);
    }
    // A new device of Bob on comet 4 syncs through either logic.
    let mut bob_new = Client::connect_tcp(cluster.comets[3].1).await.unwrap();
    bob_new.auth(&device(2, "bob-new")).await.unwrap();
    bob_new
        .send(SyncRequest { sync: 0, limit: 0 }.to_frame(5))
        .await
        .unwrap();
    let reply = next_im(&mut bob_new).await;
    assert_eq!((reply.op, reply.seq), (Op::IM_SYNC_REPLY, 5));
    let sync = SyncReply::decode(&reply.body).unwrap();
    let bodies: Vec<&str> = sync.msgs.iter().map(|m| m.body.as_str()).collect();
    assert_eq!(bodies, ["hello 1", "hello 2"]);
    cluster.stop();
}
