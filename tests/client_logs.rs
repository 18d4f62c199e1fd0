//! What a client can make the comet and logic write to the log: upstream
//! frames cost a counter, not a line each, and client-chosen text (the auth
//! key here) is written escaped, so it can neither forge a line nor send
//! terminal escape sequences to whoever reads the log.
//!
//! Comet and logic run in process, wired as standalone wires them, with
//! the plain log format captured into a buffer.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rim_client::{AuthToken, Client};
use rim_comet::{Comet, Listeners};
use rim_config::{CometConfig, LogicConfig, NodeConfig, RouterBackend, RouterConfig};
use rim_logic::{Comets, HttpClient, Logic};
use rim_proto::{Frame, Op};
use rim_shutdown::Shutdown;
use rim_testkit::Logs;
use tokio::net::TcpListener;

struct Standalone {
    tcp: std::net::SocketAddr,
    comet: Comet,
    logic: Arc<Logic>,
    shutdown: Shutdown,
}

impl Standalone {
    /// Starts logic (in-memory router, no receive webhook) and a comet on it.
    async fn start() -> Standalone {
        let router = rim_router::connect(&RouterConfig {
            backend: RouterBackend::Memory,
            ..RouterConfig::default()
        })
        .await
        .unwrap();
        let logic = Arc::new(Logic::new(
            &LogicConfig::default(),
            router,
            Arc::new(Comets::new()),
            HttpClient::new().unwrap(),
        ));
        let node = NodeConfig {
            id: "standalone-logs".into(),
            ..NodeConfig::default()
        };
        let comet = Comet::new(&node, CometConfig::default(), logic.clone());
        let bind = || TcpListener::bind("127.0.0.1:0");
        let listeners = Listeners {
            tcp: vec![bind().await.unwrap()],
            ws: vec![],
            wss: vec![],
            grpc: bind().await.unwrap(),
        };
        let tcp = listeners.tcp[0].local_addr().unwrap();
        let shutdown = Shutdown::new();
        tokio::spawn(comet.clone().run(listeners, shutdown.clone()));
        Standalone {
            tcp,
            comet,
            logic,
            shutdown,
        }
    }

    fn metrics(&self) -> String {
        let mut registry = rim_metrics::Registry::default();
        self.comet.register_metrics(&mut registry);
        self.logic.register_metrics(&mut registry);
        rim_metrics::encode(&registry)
    }
}

async fn within<F: std::future::Future>(fut: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .expect("timed out")
}

#[tokio::test]
async fn upstream_frames_write_no_line_each_and_are_counted() {
    let rim = Standalone::start().await;
    let mut client = Client::connect_tcp(rim.tcp).await.unwrap();
    client
        .auth(&AuthToken {
            mid: 1,
            key: "chatty".into(),
            ..AuthToken::default()
        })
        .await
        .unwrap();

    // Captured from here on, at the default level (info).
    let (logs, guard) = Logs::capture(tracing::Level::INFO);
    within(async {
        for seq in 0..1000 {
            client
                .send(Frame::new(Op(1000), seq, Bytes::new()))
                .await
                .unwrap();
        }
        for seq in 0..1000 {
            let ack = client.next_frame().await.unwrap().expect("connection open");
            assert_eq!((ack.op, ack.seq), (Op(1000), seq));
        }
    })
    .await;
    drop(guard);
    let written = String::from_utf8(logs.bytes()).unwrap();
    assert!(
        written.is_empty(),
        "1000 empty upstream frames wrote {} bytes of log:\n{}",
        written.len(),
        written.lines().take(3).collect::<Vec<_>>().join("\n")
    );
    let metrics = rim.metrics();
    for counted in [
        "rim_logic_upstream_frames_total{result=\"no_webhook\"} 1000",
        "rim_comet_upstream_frames_total{result=\"ok\"} 1000",
    ] {
        assert!(metrics.contains(counted), "no {counted:?} in:\n{metrics}");
    }
    rim.shutdown.trigger();
}

#[tokio::test]
async fn a_forged_line_in_an_auth_key_stays_escaped_on_its_line() {
    let forged = "ERROR rim: forged line";
    let key = format!("dev-1\n2026-12-06T22:00:00.000000Z {forged}\u{1b}[31m\u{1b}]0;owned\u{7}");
    // Debug shows every line that mentions the key.
    let (logs, guard) = Logs::capture(tracing::Level::DEBUG);
    let rim = Standalone::start().await;
    let mut client = Client::connect_tcp(rim.tcp).await.unwrap();
    within(async {
        client
            .auth(&AuthToken {
                mid: 7,
                key: key.clone(),
                room_id: "live://1".into(),
                ..AuthToken::default()
            })
            .await
            .unwrap();
        client
            .send_upstream(Op(1000), Bytes::from_static(b"\n\x1b[2Jhi"))
            .await
            .unwrap();
        client.heartbeat().await.unwrap();
        drop(client);
        // The disconnect is logged too: wait for logic to hear of it.
        while !String::from_utf8_lossy(&logs.bytes()).contains("client closed") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    rim.shutdown.trigger();
    drop(guard);

    let written = logs.bytes();
    assert!(
        !written.contains(&0x1b) && !written.contains(&0x07),
        "a raw control byte reached the log"
    );
    let written = String::from_utf8(written).unwrap();
    let mentions: Vec<&str> = written.lines().filter(|l| l.contains(forged)).collect();
    assert!(!mentions.is_empty(), "the key was never logged:\n{written}");
    let escaped = format!("{key:?}");
    let escaped = escaped.trim_matches('"');
    for line in &mentions {
        assert!(
            line.contains(escaped),
            "the key is not escaped on one line: {line:?}\nin:\n{written}"
        );
        assert!(
            !line.starts_with("2026-12-06T22:00:00.000000Z"),
            "forged line: {line:?}"
        );
    }
}
