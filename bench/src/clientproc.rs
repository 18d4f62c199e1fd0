//! `rim-bench client-proc`: one load-generator process driven by a parent
//! `rim-bench` over its stdin/stdout, so that totals beyond one process's
//! 20,000 open files are reached with several processes.
//!
//! Commands, one per line on stdin (answers on stdout):
//!
//! - `connect TRANSPORT TARGETS COUNT FIRST ROOM_PREFIX ROOMS HEARTBEAT OP`:
//!   connects clients FIRST..FIRST+COUNT, client i to TARGETS[i % len]
//!   (comma-separated) from this process's own 127.x source addresses,
//!   authenticates it (room `ROOM_PREFIX<i % ROOMS>`, none when ROOMS is 0;
//!   accepting op OP) and keeps it heartbeating every HEARTBEAT seconds.
//!   Answers `connected OK FAILED CONNECT_HIST_JSON`.
//! - `reset`: zeroes the delivery counters and latencies; answers `reset`.
//! - `report`: answers `report JSON` (deliveries and latency since the reset).
//! - `close`: closes every client; answers `closed`.
//!
//! Every 200 ms it prints `tick DELIVERIES CONNECTED LOST CONNECTING FAILED`.
//! It exits when stdin closes or after `--max-secs`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::addrs;
use crate::latency::{self, Recorder};
use crate::wire::{self, Conn, Transport};

/// How long one client may take to connect and authenticate.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Clients connecting at once.
const CONNECT_CONCURRENCY: usize = 128;
/// Latency recorder shards.
const SHARDS: usize = 16;

/// Options of `rim-bench client-proc`.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// This process's number among its siblings: picks its source addresses.
    #[arg(long, default_value_t = 0)]
    pub process: u32,
    /// Source addresses this process spreads its clients over.
    #[arg(long, default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(addrs::MAX_SOURCE_ADDRS)))]
    pub source_addrs: u32,
    /// The process exits after this many seconds whatever happens.
    #[arg(long, default_value_t = 7200,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub max_secs: u64,
}

/// A parsed `connect` command.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnectCmd {
    /// TCP or WebSocket.
    pub transport: Transport,
    /// Server addresses, clients round-robin over them by global index.
    pub targets: Vec<SocketAddr>,
    /// Clients to connect.
    pub count: u64,
    /// Global index of the first.
    pub first: u64,
    /// Room id prefix, e.g. `live://bench-`.
    pub room_prefix: String,
    /// Rooms the clients spread over; 0 = none.
    pub rooms: u64,
    /// Seconds between heartbeats.
    pub heartbeat_secs: u64,
    /// Business op the clients accept and count.
    pub op: i32,
}

impl ConnectCmd {
    /// The command line.
    pub fn to_line(&self) -> String {
        let targets: Vec<String> = self.targets.iter().map(ToString::to_string).collect();
        format!(
            "connect {} {} {} {} {} {} {} {}",
            self.transport.name(),
            targets.join(","),
            self.count,
            self.first,
            self.room_prefix,
            self.rooms,
            self.heartbeat_secs,
            self.op
        )
    }

    /// Parses the words after `connect`.
    pub fn parse(words: &[&str]) -> anyhow::Result<ConnectCmd> {
        let [
            transport,
            targets,
            count,
            first,
            room_prefix,
            rooms,
            heartbeat,
            op,
        ] = words
        else {
            bail!("connect takes 8 arguments, got {}", words.len());
        };
        let transport =
            Transport::parse(transport).with_context(|| format!("transport {transport:?}"))?;
        let targets = targets
            .split(',')
            .map(|t| {
                t.parse::<SocketAddr>()
                    .with_context(|| format!("target {t:?}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        ensure!(
            targets.iter().all(addrs::is_loopback),
            "targets must be in 127.0.0.0/8"
        );
        let cmd = ConnectCmd {
            transport,
            targets,
            count: count.parse().context("count")?,
            first: first.parse().context("first")?,
            room_prefix: (*room_prefix).to_owned(),
            rooms: rooms.parse().context("rooms")?,
            heartbeat_secs: heartbeat.parse().context("heartbeat")?,
            op: op.parse().context("op")?,
        };
        ensure!(cmd.count <= 20_000, "at most 20,000 clients per process");
        ensure!(
            (1..=3600).contains(&cmd.heartbeat_secs),
            "heartbeat must be 1..=3600 s"
        );
        Ok(cmd)
    }

    /// Room of client `index` (`""` = none).
    pub fn room(&self, index: u64) -> String {
        if self.rooms == 0 {
            String::new()
        } else {
            format!("{}{}", self.room_prefix, index % self.rooms)
        }
    }
}

/// What `report` answers.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ChildReport {
    /// Push frames (op OP) received since the reset.
    pub deliveries: u64,
    /// Other frames (heartbeat replies...).
    pub other_frames: u64,
    /// Push frames whose body did not carry a send time.
    pub bad_bodies: u64,
    /// Clients whose connection ended while not asked to.
    pub lost: u64,
    /// Clients connected now.
    pub connected: u64,
    /// Fewest push frames one client received since the reset.
    pub per_client_min: u64,
    /// Most push frames one client received since the reset.
    pub per_client_max: u64,
    /// Send → receipt latency since the reset, (µs, count) pairs.
    pub latency: Vec<(u64, u64)>,
}

struct Stats {
    op: AtomicU64,
    deliveries: AtomicU64,
    other_frames: AtomicU64,
    bad_bodies: AtomicU64,
    lost: AtomicU64,
    connected: AtomicU64,
    connecting: AtomicU64,
    failed: AtomicU64,
    latency: Recorder,
    /// Push frames per client since the reset, one counter per client of
    /// the current `connect` (cleared on `close`).
    per_client: parking_lot::Mutex<Vec<Arc<AtomicU64>>>,
}

impl Stats {
    /// (fewest, most) push frames one client received since the reset.
    fn per_client_range(&self) -> (u64, u64) {
        let counters = self.per_client.lock();
        let counts = counters.iter().map(|c| c.load(Ordering::Relaxed));
        let min = counts.clone().min().unwrap_or(0);
        (min, counts.max().unwrap_or(0))
    }

    fn on_frame(&self, who: usize, frame: &rim_proto::Frame, mine: &AtomicU64) {
        if i64::from(frame.op.0) != self.op.load(Ordering::Relaxed) as i64 {
            self.other_frames.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let received = wire::now_nanos();
        self.deliveries.fetch_add(1, Ordering::Relaxed);
        mine.fetch_add(1, Ordering::Relaxed);
        match wire::parse_body(&frame.body) {
            Some((sent, _)) => {
                self.latency
                    .record(who, received.saturating_sub(sent) / 1_000, true);
            }
            None => {
                self.bad_bodies.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Runs the child process until stdin closes.
pub async fn run(args: Args) -> anyhow::Result<()> {
    if let Err(err) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("client-proc: cannot raise the open-file limit: {err}");
    }
    let stats = Arc::new(Stats {
        op: AtomicU64::new(1000),
        deliveries: AtomicU64::new(0),
        other_frames: AtomicU64::new(0),
        bad_bodies: AtomicU64::new(0),
        lost: AtomicU64::new(0),
        connected: AtomicU64::new(0),
        connecting: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        latency: Recorder::new(SHARDS),
        per_client: parking_lot::Mutex::new(Vec::new()),
    });
    let deadline = Instant::now() + Duration::from_secs(args.max_secs);
    let ticker = tokio::spawn(tick(Arc::clone(&stats), deadline));
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let (mut stop_tx, _) = watch::channel(false);
    let mut clients: JoinSet<()> = JoinSet::new();
    loop {
        let line = tokio::select! {
            line = lines.next_line() => line?,
            () = tokio::time::sleep_until(deadline) => None,
        };
        let Some(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.first().copied() {
            Some("connect") => {
                let cmd = ConnectCmd::parse(&words[1..])?;
                let hist = connect(&args, &cmd, &stats, &stop_tx, &mut clients, deadline).await;
                println!(
                    "connected {} {} {}",
                    stats.connected.load(Ordering::Relaxed),
                    stats.failed.load(Ordering::Relaxed),
                    serde_json::to_string(&latency::to_pairs(&hist))?
                );
            }
            Some("reset") => {
                for c in [&stats.deliveries, &stats.other_frames, &stats.bad_bodies] {
                    c.store(0, Ordering::Relaxed);
                }
                stats.latency.reset();
                for c in stats.per_client.lock().iter() {
                    c.store(0, Ordering::Relaxed);
                }
                println!("reset");
            }
            Some("report") => {
                let (per_client_min, per_client_max) = stats.per_client_range();
                let report = ChildReport {
                    per_client_min,
                    per_client_max,
                    deliveries: stats.deliveries.load(Ordering::Relaxed),
                    other_frames: stats.other_frames.load(Ordering::Relaxed),
                    bad_bodies: stats.bad_bodies.load(Ordering::Relaxed),
                    lost: stats.lost.load(Ordering::Relaxed),
                    connected: stats.connected.load(Ordering::Relaxed),
                    latency: latency::to_pairs(&stats.latency.total()),
                };
                println!("report {}", serde_json::to_string(&report)?);
            }
            Some("close") => {
                let _ = stop_tx.send(true);
                let _ = tokio::time::timeout(Duration::from_secs(10), async {
                    while clients.join_next().await.is_some() {}
                })
                .await;
                clients.abort_all();
                while clients.join_next().await.is_some() {}
                stats.connected.store(0, Ordering::Relaxed);
                stats.per_client.lock().clear();
                stats.failed.store(0, Ordering::Relaxed);
                stop_tx = watch::channel(false).0;
                println!("closed");
            }
            Some(other) => bail!("unknown command {other:?}"),
            None => {}
        }
    }
    let _ = stop_tx.send(true);
    clients.abort_all();
    ticker.abort();
    Ok(())
}

/// Prints counters every 200 ms until the deadline.
async fn tick(stats: Arc<Stats>, deadline: Instant) {
    let mut every = tokio::time::interval(Duration::from_millis(200));
    while Instant::now() < deadline {
        every.tick().await;
        println!(
            "tick {} {} {} {} {}",
            stats.deliveries.load(Ordering::Relaxed),
            stats.connected.load(Ordering::Relaxed),
            stats.lost.load(Ordering::Relaxed),
            stats.connecting.load(Ordering::Relaxed),
            stats.failed.load(Ordering::Relaxed),
        );
    }
}

/// Connects the clients of one `connect` command; returns the histogram of
/// connect + auth times.
async fn connect(
    args: &Args,
    cmd: &ConnectCmd,
    stats: &Arc<Stats>,
    stop_tx: &watch::Sender<bool>,
    clients: &mut JoinSet<()>,
    deadline: Instant,
) -> hdrhistogram::Histogram<u64> {
    stats.op.store(cmd.op as u64, Ordering::Relaxed);
    stats.failed.store(0, Ordering::Relaxed);
    stats.connecting.store(cmd.count, Ordering::Relaxed);
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut connecting = JoinSet::new();
    let pid = std::process::id();
    for index in cmd.first..cmd.first + cmd.count {
        let target = cmd.targets[(index % cmd.targets.len() as u64) as usize];
        let source = addrs::source_addr(args.process, index, args.source_addrs);
        let token = wire::token(
            index + 1,
            &format!("b{pid}-{index}"),
            &cmd.room(index),
            cmd.op,
        );
        let (gate, transport) = (Arc::clone(&gate), cmd.transport);
        connecting.spawn(async move {
            let _permit = gate.acquire_owned().await;
            let started = Instant::now();
            let attempt = async {
                let mut conn = Conn::connect(transport, target, Some(source)).await?;
                conn.auth(token, CONNECT_TIMEOUT).await?;
                Ok::<_, anyhow::Error>(conn)
            };
            let result = match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
                Ok(result) => result,
                Err(_) => Err(anyhow::anyhow!("no auth reply in time")),
            };
            (
                index,
                started.elapsed(),
                result.map_err(|e| format!("{target} from {source}: {e:#}")),
            )
        });
    }
    let mut hist = latency::histogram();
    let mut reported = 0;
    let heartbeat = Duration::from_secs(cmd.heartbeat_secs);
    while let Some(done) = connecting.join_next().await {
        stats.connecting.fetch_sub(1, Ordering::Relaxed);
        match done {
            Ok((index, took, Ok(conn))) => {
                hist.saturating_record(took.as_micros().max(1) as u64);
                stats.connected.fetch_add(1, Ordering::Relaxed);
                let mine = Arc::new(AtomicU64::new(0));
                stats.per_client.lock().push(Arc::clone(&mine));
                clients.spawn(hold(
                    conn,
                    mine,
                    index,
                    Arc::clone(stats),
                    stop_tx.subscribe(),
                    heartbeat,
                    deadline,
                ));
            }
            Ok((_, _, Err(err))) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                if reported < 3 {
                    reported += 1;
                    eprintln!("client-proc {}: {err}", args.process);
                }
            }
            Err(err) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                eprintln!("client-proc {}: connect task: {err}", args.process);
            }
        }
    }
    hist
}

/// Keeps one client: heartbeats (the first one at a spread offset), counts
/// pushed frames, ends on stop, at the deadline or when the server closes.
async fn hold(
    mut conn: Conn,
    mine: Arc<AtomicU64>,
    index: u64,
    stats: Arc<Stats>,
    mut stop: watch::Receiver<bool>,
    heartbeat: Duration,
    deadline: Instant,
) {
    let offset = heartbeat.mul_f64((index % 1000) as f64 / 1000.0);
    let mut beat = tokio::time::interval_at(Instant::now() + offset, heartbeat);
    let end = tokio::time::sleep_until(deadline);
    tokio::pin!(end);
    let who = index as usize;
    let lost = loop {
        tokio::select! {
            () = &mut end => break false,
            _ = stop.changed() => break false,
            _ = beat.tick() => {
                if conn.heartbeat().await.is_err() {
                    break true;
                }
            }
            frame = conn.next_frame() => match frame {
                Ok(Some(frame)) => stats.on_frame(who, &frame, &mine),
                Ok(None) | Err(_) => break true,
            },
        }
    };
    if lost && !*stop.borrow() {
        stats.lost.fetch_add(1, Ordering::Relaxed);
    }
    stats.connected.fetch_sub(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_commands_round_trip() {
        let cmd = ConnectCmd {
            transport: Transport::Ws,
            targets: vec![
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:2".parse().unwrap(),
            ],
            count: 100,
            first: 200,
            room_prefix: "live://bench-".into(),
            rooms: 3,
            heartbeat_secs: 30,
            op: 1000,
        };
        let line = cmd.to_line();
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words[0], "connect");
        assert_eq!(ConnectCmd::parse(&words[1..]).unwrap(), cmd);
        assert_eq!(cmd.room(205), "live://bench-1");
        assert_eq!(ConnectCmd { rooms: 0, ..cmd }.room(5), "");
    }

    #[test]
    fn bad_connect_commands_are_refused() {
        let parse = |s: &str| ConnectCmd::parse(&s.split_whitespace().collect::<Vec<_>>());
        assert!(parse("tcp 127.0.0.1:1 10 0 live:// 1 30 1000").is_ok());
        assert!(parse("udp 127.0.0.1:1 10 0 live:// 1 30 1000").is_err());
        assert!(parse("tcp 10.0.0.1:1 10 0 live:// 1 30 1000").is_err());
        assert!(parse("tcp 127.0.0.1:1 30000 0 live:// 1 30 1000").is_err());
        assert!(parse("tcp 127.0.0.1:1 10 0 live:// 1 0 1000").is_err());
        assert!(parse("tcp 127.0.0.1:1 10 0").is_err());
    }
}
