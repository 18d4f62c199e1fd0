//! Measures the comet's user-space memory per idle authenticated connection
//! (RSS delta / connections) and its CPU while those connections heartbeat.
//!
//! ```sh
//! cargo run --release -p rim-comet --example idle_memory -- --transport tcp --connections 15000
//! cargo run --release -p rim-comet --example idle_memory -- --transport ws --connections 15000
//! ```
//!
//! The same binary plays three parts: the orchestrator (default) starts one
//! comet process (`server`) and client processes (`clients`, at most 15000
//! connections each because of the 20000 open-file limit), reads the comet's
//! VmRSS from /proc before and after, and its utime+stime over an idle
//! window. Clients connect from several 127.0.0.x source addresses, wait for
//! the WebSocket 101 before sending Auth, and heartbeat every
//! `--heartbeat-secs`. Every loop is bounded in count and time; all traffic
//! stays on 127.0.0.0/8.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rim_client::{AuthToken, Client};
use rim_comet::{Comet, Listeners, WS_PATH};
use rim_config::{CometConfig, NodeConfig};
use rim_proto::api::{ApiError, ApiResult, LogicApi};
use rim_proto::pb::logic::v1 as logic;
use rim_shutdown::Shutdown;

/// Largest client count one process holds (20000 open files per process).
const PER_PROCESS: usize = 15_000;

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.windows(2)
        .find(|w| w[0] == name)
        .map_or_else(|| default.to_string(), |w| w[1].clone())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("server") => server(),
        Some("clients") => clients(&args),
        _ => orchestrate(&args),
    }
}

/// Trusts goim JSON tokens (what logic's `none` policy does) and keeps no
/// per-connection state, so the comet's process RSS is the comet's.
struct TrustingLogic;

#[derive(serde::Deserialize)]
struct Token {
    mid: i64,
    key: String,
    #[serde(default)]
    room_id: String,
    #[serde(default)]
    accepts: Vec<i32>,
}

#[async_trait]
impl LogicApi for TrustingLogic {
    async fn connect(&self, req: logic::ConnectRequest) -> ApiResult<logic::ConnectReply> {
        let t: Token = serde_json::from_slice(&req.token)
            .map_err(|e| ApiError::Unauthenticated(e.to_string()))?;
        Ok(logic::ConnectReply {
            mid: t.mid,
            key: t.key,
            room_id: t.room_id,
            accepts: t.accepts,
            heartbeat_ms: 30_000,
            heartbeat_max: 4,
        })
    }
    async fn disconnect(&self, _req: logic::DisconnectRequest) -> ApiResult<bool> {
        Ok(true)
    }
    async fn heartbeat(&self, _req: logic::HeartbeatRequest) -> ApiResult<()> {
        Ok(())
    }
    async fn renew_online(
        &self,
        _req: logic::RenewOnlineRequest,
    ) -> ApiResult<logic::RenewOnlineReply> {
        Ok(logic::RenewOnlineReply::default())
    }
    async fn receive(&self, _req: logic::ReceiveRequest) -> ApiResult<()> {
        Ok(())
    }
    async fn nodes(&self, _req: logic::NodesRequest) -> ApiResult<logic::NodesReply> {
        Err(ApiError::Internal("not used".into()))
    }
}

/// Completes when the orchestrator closes this process's stdin.
async fn until_stdin_closes() -> anyhow::Result<()> {
    tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {
            line.clear();
        }
    })
    .await?;
    Ok(())
}

fn server() -> anyhow::Result<()> {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let config = CometConfig {
            tcp_bind: vec!["127.0.0.1:0".parse()?],
            ws_bind: vec!["127.0.0.1:0".parse()?],
            grpc_bind: "127.0.0.1:0".parse()?,
            max_connections_per_ip: 1_000_000,
            ..CometConfig::default()
        };
        let listeners = Listeners::bind(&config).await?;
        let (tcp, ws) = (
            listeners.tcp[0].local_addr()?,
            listeners.ws[0].local_addr()?,
        );
        let node = NodeConfig {
            id: "bench-comet".into(),
            ..NodeConfig::default()
        };
        let comet = Comet::new(&node, config, Arc::new(TrustingLogic));
        let shutdown = Shutdown::new();
        let task = tokio::spawn(comet.run(listeners, shutdown.clone()));
        println!("READY {tcp} {ws}");
        std::io::stdout().flush()?;
        // Run until the orchestrator closes our stdin.
        until_stdin_closes().await?;
        shutdown.trigger();
        let _ = tokio::time::timeout(Duration::from_secs(20), task).await;
        Ok(())
    })
}

fn clients(args: &[String]) -> anyhow::Result<()> {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let target: SocketAddr = arg(args, "--addr", "127.0.0.1:3101").parse()?;
    let ws = arg(args, "--transport", "tcp") == "ws";
    let count: usize = arg(args, "--count", "1000").parse()?;
    let first: usize = arg(args, "--first", "0").parse()?;
    let heartbeat = Duration::from_secs(arg(args, "--heartbeat-secs", "30").parse()?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(256));
        for i in first..first + count {
            let (ok, failed, gate) = (ok.clone(), failed.clone(), gate.clone());
            tokio::spawn(async move {
                let permit = gate.acquire_owned().await;
                // Spread over 127.0.0.2..=127.0.0.9 to stay clear of one
                // address's ephemeral-port range.
                let source =
                    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % 8) as u8)), 0);
                let connected = if ws {
                    tokio::time::timeout(
                        Duration::from_secs(30),
                        Client::connect_ws(&format!("ws://{target}{WS_PATH}")),
                    )
                    .await
                } else {
                    tokio::time::timeout(
                        Duration::from_secs(30),
                        Client::connect_tcp_from(target, source),
                    )
                    .await
                };
                let mut client = match connected {
                    Ok(Ok(client)) => client,
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                };
                let token = AuthToken {
                    mid: i as i64,
                    key: format!("bench-{i}"),
                    room_id: format!("live://{}", i % 100),
                    platform: "bench".into(),
                    accepts: vec![1000],
                };
                if client.auth(&token).await.is_err() {
                    failed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                ok.fetch_add(1, Ordering::Relaxed);
                drop(permit);
                // Heartbeat, spread over the interval; bounded to one hour.
                tokio::time::sleep(heartbeat.mul_f64((i % 1000) as f64 / 1000.0)).await;
                let end = Instant::now() + Duration::from_secs(3600);
                while Instant::now() < end {
                    if client.heartbeat().await.is_err() {
                        return;
                    }
                    tokio::time::sleep(heartbeat).await;
                }
            });
        }
        let started = Instant::now();
        loop {
            let (done, bad) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
            println!("PROGRESS {done} {bad}");
            if done + bad >= count as u64 || started.elapsed() > Duration::from_secs(300) {
                println!("DONE {done} {bad}");
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        // Hold the connections until the orchestrator closes our stdin.
        until_stdin_closes().await?;
        Ok(())
    })
}

/// Resident set size of a process, in bytes.
fn rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for {pid}"))?;
    Ok(kb * 1024)
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the ")" that closes the command name; utime and stime are
    // fields 14 and 15 of the whole line.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11)
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
    Ok(ticks / 100.0)
}

fn spawn_self(args: &[&str]) -> anyhow::Result<Child> {
    Ok(Command::new(std::env::current_exe()?)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?)
}

fn orchestrate(args: &[String]) -> anyhow::Result<()> {
    let transport = arg(args, "--transport", "tcp");
    let total: usize = arg(args, "--connections", "15000").parse()?;
    let idle_secs: u64 = arg(args, "--idle-secs", "30").parse()?;
    let heartbeat = arg(args, "--heartbeat-secs", "30");

    let mut server = spawn_self(&["server"])?;
    let mut line = String::new();
    BufReader::new(
        server
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?,
    )
    .read_line(&mut line)?;
    let parts: Vec<&str> = line.split_whitespace().collect();
    anyhow::ensure!(parts.first() == Some(&"READY"), "server said {line:?}");
    let addr = if transport == "ws" {
        parts[2]
    } else {
        parts[1]
    };
    let pid = server.id();
    std::thread::sleep(Duration::from_secs(2));
    let before = rss(pid)?;
    eprintln!(
        "comet pid {pid} listening on {addr} ({transport}); RSS with no connection: {} KiB",
        before / 1024
    );

    let mut children = Vec::new();
    let mut first = 0;
    while first < total {
        let count = PER_PROCESS.min(total - first);
        let child = spawn_self(&[
            "clients",
            "--addr",
            addr,
            "--transport",
            &transport,
            "--count",
            &count.to_string(),
            "--first",
            &first.to_string(),
            "--heartbeat-secs",
            &heartbeat,
        ])?;
        children.push(child);
        first += count;
    }
    let mut connected = 0u64;
    let mut failed = 0u64;
    for child in &mut children {
        let out = BufReader::new(
            child
                .stdout
                .take()
                .ok_or_else(|| anyhow::anyhow!("no stdout"))?,
        );
        for line in out.lines().take(400) {
            let line = line?;
            if let Some(rest) = line.strip_prefix("PROGRESS ") {
                eprint!("\r  clients connected+authenticated: {rest:<20}");
            }
            if let Some(rest) = line.strip_prefix("DONE ") {
                let n: Vec<u64> = rest
                    .split_whitespace()
                    .filter_map(|v| v.parse().ok())
                    .collect();
                connected += n.first().copied().unwrap_or(0);
                failed += n.get(1).copied().unwrap_or(0);
                break;
            }
        }
    }
    eprintln!();
    std::thread::sleep(Duration::from_secs(3));
    let after = rss(pid)?;
    let cpu_start = cpu_seconds(pid)?;
    eprintln!(
        "measuring idle CPU over {idle_secs} s (heartbeat every {heartbeat} s per connection)"
    );
    std::thread::sleep(Duration::from_secs(idle_secs));
    let cpu = cpu_seconds(pid)? - cpu_start;
    let after_idle = rss(pid)?;

    let per_conn = (after.saturating_sub(before)) as f64 / connected.max(1) as f64;
    println!(
        "{{\"transport\":\"{transport}\",\"connections\":{connected},\"failed\":{failed},\
         \"rss_before_kib\":{},\"rss_after_kib\":{},\"rss_after_idle_kib\":{},\
         \"bytes_per_connection\":{per_conn:.0},\"idle_cpu_percent\":{:.2},\"idle_secs\":{idle_secs}}}",
        before / 1024,
        after / 1024,
        after_idle / 1024,
        cpu / idle_secs as f64 * 100.0
    );

    for mut child in children {
        drop(child.stdin.take());
        let _ = child.wait();
    }
    drop(server.stdin.take());
    let _ = server.wait();
    Ok(())
}
