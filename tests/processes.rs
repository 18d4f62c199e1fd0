//! `rim logic` and `rim comet` as separate processes against the real Redis
//! and Kafka-protocol broker that deploy/test.sh starts.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rim_client::{AuthToken, Client};

fn service(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set: run deploy/test.sh"))
}

/// A running `rim` process whose log lines are collected.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Proc {
    fn start(args: &[&str], env: &[(&str, String)]) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rim"));
        for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("RIM_")) {
            cmd.env_remove(name);
        }
        let mut child = cmd
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .expect("rim starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Proc {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a log line containing `marker` and returns the first
    /// 127.0.0.1:port in it.
    fn addr_after(&mut self, marker: &str) -> SocketAddr {
        let find = |line: &str| -> Option<SocketAddr> {
            let at = line
                .find(marker)
                .and_then(|m| line[m..].find("127.0.0.1:").map(|a| m + a))?;
            let digits: String = line[at + 10..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            format!("127.0.0.1:{digits}").parse().ok()
        };
        if let Some(addr) = self.seen.iter().find_map(|line| find(line)) {
            return addr;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {marker:?} line; saw:\n{}", self.seen.join("\n")));
            self.seen.push(line.clone());
            if let Some(addr) = find(&line) {
                return addr;
            }
        }
    }

    fn stop(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(exit) = self.child.try_wait().unwrap() {
                assert!(
                    exit.success(),
                    "exit {exit:?}; log:\n{}",
                    self.seen.join("\n")
                );
                return;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Only reached with the child still running when a test failed.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Redis and Kafka: run deploy/test.sh"]
async fn a_client_of_a_comet_process_is_pushed_to_through_the_logic_process() {
    let (redis, kafka) = (service("RIM_TEST_REDIS"), service("RIM_TEST_KAFKA"));
    let run = std::process::id();
    let logic_config = format!("{}/deploy/config/logic.toml", env!("CARGO_MANIFEST_DIR"));
    let mut logic = Proc::start(
        &["logic", "--config", &logic_config],
        &[
            ("RIM_NODE__ID", format!("logic-{run}")),
            ("RIM_LOGIC__GRPC_BIND", "127.0.0.1:0".into()),
            ("RIM_API__HTTP_BIND", "127.0.0.1:0".into()),
            ("RIM_LOGIC__AUTH__POLICY", "none".into()),
            ("RIM_ROUTER__REDIS", redis),
            ("RIM_QUEUE__BROKERS", kafka),
            ("RIM_DISCOVERY__BACKEND", "static".into()),
        ],
    );
    let grpc = logic.addr_after("logic grpc serving");
    let http = logic.addr_after("http api serving");

    let comet_config = format!("{}/deploy/config/comet.toml", env!("CARGO_MANIFEST_DIR"));
    let comet_id = format!("proc-comet-{run}");
    let mut comet = Proc::start(
        &["comet", "--config", &comet_config],
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

    let key = format!("proc-key-{run}");
    let mut client = Client::connect_tcp(tcp).await.unwrap();
    let token = AuthToken {
        mid: 4242,
        key: key.clone(),
        accepts: vec![1000],
        ..AuthToken::default()
    };
    client
        .auth(&token)
        .await
        .expect("logic accepts the goim token");

    // reqwest is built without a default TLS provider (rim uses ring).
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let http_client = reqwest::Client::new();
    let answer: serde_json::Value = http_client
        .post(format!(
            "http://{http}/goim/push/keys?operation=1000&keys={key}"
        ))
        .body("hello")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["code"], 0, "{answer}");
    assert_eq!(answer["data"]["connections"], 1, "{answer}");
    assert_eq!(answer["data"]["comets"], 1, "{answer}");

    let ready = http_client
        .get(format!("http://{http}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);

    drop(client);
    comet.stop();
    logic.stop();
}
