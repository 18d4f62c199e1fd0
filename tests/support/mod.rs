//! Running `rim` processes in tests: start with an environment, read the
//! addresses they log, stop them with SIGTERM.
#![allow(dead_code)]

pub mod exposition;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The environment that runs `rim standalone` as node `id` with every
/// listener on 127.0.0.1 port 0 and a 100 ms drain window, then `extra`
/// (a later entry wins).
pub fn standalone_env(id: &str, extra: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    let mut env: Vec<(&'static str, String)> = vec![
        ("RIM_NODE__ID", id.to_owned()),
        ("RIM_IM__SQLITE_PATH", fresh_sqlite_path(id)),
        ("RIM_COMET__TCP_BIND", "127.0.0.1:0".into()),
        ("RIM_COMET__WS_BIND", "127.0.0.1:0".into()),
        ("RIM_COMET__GRPC_BIND", "127.0.0.1:0".into()),
        ("RIM_COMET__DRAIN_WINDOW", "100ms".into()),
        ("RIM_API__HTTP_BIND", "127.0.0.1:0".into()),
    ];
    env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    env
}

/// A message store file of its own for one standalone process (under
/// cargo's temp dir for integration tests; `extra` may name another).
pub fn fresh_sqlite_path(id: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("im-{id}-{}-{n}", std::process::id()))
        .join("im.sqlite3")
        .display()
        .to_string()
}

/// Starts `rim standalone` with the shipped config and [`standalone_env`].
pub fn start_standalone(id: &str, extra: &[(&'static str, &str)]) -> Proc {
    Proc::start(
        &["standalone", "--config", &shipped_config("standalone")],
        &standalone_env(id, extra),
    )
}

pub fn service(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set: run deploy/test.sh"))
}

/// Creates an empty schema `name` in the PostgreSQL of RIM_TEST_POSTGRES
/// (dropping an older one of that name) and returns a URL whose
/// connections use it, for a store of its own.
pub async fn postgres_schema(name: &str) -> String {
    postgres_schema_on("RIM_TEST_POSTGRES", name).await
}

/// Like [`postgres_schema`], on the server the environment variable `var`
/// names (RIM_TEST_POSTGRES_2: the second primary deploy/test.sh starts).
pub async fn postgres_schema_on(var: &str, name: &str) -> String {
    let url = service(var);
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to PostgreSQL at {var}={url}: {e}"));
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name}"
        ))
        .await
        .unwrap();
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}options=-csearch_path%3D{name}")
}

/// A running `rim` process whose log lines are collected.
pub struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Proc {
    pub fn start(args: &[&str], env: &[(&str, String)]) -> Proc {
        Proc::spawn(Command::new(env!("CARGO_BIN_EXE_rim")), args, env)
    }

    /// Starts `rim` with its open-file limit (soft and hard) set to `nofile`,
    /// through util-linux's `prlimit`.
    pub fn start_with_nofile(nofile: u64, args: &[&str], env: &[(&str, String)]) -> Proc {
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--nofile={nofile}:{nofile}"))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_rim"));
        Proc::spawn(cmd, args, env)
    }

    fn spawn(mut cmd: Command, args: &[&str], env: &[(&str, String)]) -> Proc {
        for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("RIM_")) {
            cmd.env_remove(name);
        }
        let mut child = cmd
            .args(args)
            // Comets and jobs serve metrics on a port of their own: pick a
            // free one unless the test names it.
            .env("RIM_METRICS__BIND", "127.0.0.1:0")
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
    pub fn addr_after(&mut self, marker: &str) -> SocketAddr {
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

    /// Kills the process with SIGKILL (a crash) and reaps it.
    pub fn crash(mut self) {
        let status = Command::new("kill")
            .args(["-KILL", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let _ = self.child.wait();
    }

    /// Reads every log line available now.
    pub fn drain_log(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
    }

    /// Returns the log lines read so far.
    pub fn log(&self) -> String {
        self.seen.join("\n")
    }

    /// Sends SIGTERM and waits up to 20 s for a successful exit.
    pub fn stop(self) {
        self.stop_within(Duration::from_secs(20));
    }

    /// Sends SIGTERM and waits up to `limit` for a successful exit.
    pub fn stop_within(mut self, limit: Duration) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + limit;
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
                self.drain_log();
                panic!(
                    "did not stop within {limit:?} of SIGTERM; log:\n{}",
                    self.seen.join("\n")
                );
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

/// Returns the body of the next pushed frame (business op 1000) a client
/// receives, failing the test after 30 s.
pub async fn next_push(client: &mut rim_client::Client) -> String {
    let frame = tokio::time::timeout(Duration::from_secs(30), client.next_frame())
        .await
        .expect("a frame within 30 s")
        .expect("read")
        .expect("open");
    assert_eq!(frame.op, rim_proto::Op(1000));
    String::from_utf8_lossy(&frame.body).into_owned()
}

/// GETs a URL and returns its JSON answer (`Null` when it cannot be read).
pub async fn get_json(http: &reqwest::Client, url: &str) -> serde_json::Value {
    match http.get(url).send().await {
        Ok(answer) => answer.json().await.unwrap_or_default(),
        Err(_) => serde_json::Value::Null,
    }
}

/// POSTs a body and returns the JSON answer, which must have code 0.
pub async fn post_ok(http: &reqwest::Client, url: &str, body: &str) -> serde_json::Value {
    let answer: serde_json::Value = http
        .post(url)
        .body(body.to_owned())
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: not JSON: {e}"));
    assert_eq!(answer["code"], 0, "POST {url}: {answer}");
    answer
}

/// The path of a shipped config, deploy/config/<role>.toml.
pub fn shipped_config(role: &str) -> String {
    format!("{}/deploy/config/{role}.toml", env!("CARGO_MANIFEST_DIR"))
}

/// Starts `rim comet` on loopback ports with static discovery of one logic.
pub fn start_static_comet(id: &str, logic_grpc: SocketAddr) -> Proc {
    Proc::start(
        &["comet", "--config", &shipped_config("comet")],
        &[
            ("RIM_NODE__ID", id.to_owned()),
            ("RIM_COMET__TCP_BIND", "127.0.0.1:0".into()),
            ("RIM_COMET__WS_BIND", "127.0.0.1:0".into()),
            ("RIM_COMET__GRPC_BIND", "127.0.0.1:0".into()),
            ("RIM_COMET__DRAIN_WINDOW", "100ms".into()),
            ("RIM_DISCOVERY__BACKEND", "static".into()),
            ("RIM_DISCOVERY__LOGICS", logic_grpc.to_string()),
        ],
    )
}

/// Dotted paths of every scalar or list key in a TOML table.
pub fn key_paths(table: &toml::Table, prefix: &str, out: &mut std::collections::BTreeSet<String>) {
    for (key, value) in table {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            toml::Value::Table(inner) => key_paths(inner, &path, out),
            _ => {
                out.insert(path);
            }
        }
    }
}

/// Creates `topic` with 4 partitions on the Kafka-protocol broker at `kafka`.
pub async fn create_topic(kafka: &str, topic: &str) {
    use rdkafka::ClientConfig;
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .create()
        .unwrap();
    let created = admin
        .create_topics(
            &[NewTopic::new(topic, 4, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    assert!(created.iter().all(Result::is_ok), "{created:?}");
}
