//! `rim-bench room-routes`: job and comet CPU per room message with room
//! routing (issue #15, part 3) and without it.
//!
//! Starts K `rim comet` processes and one `rim logic` (in-memory router,
//! static discovery, its producer on `--brokers`), each with its own ports
//! on 127.0.0.1, and connects TCP clients so that each of R rooms has
//! `members-per-comet` members on exactly two comets: room `i` on comets
//! `i mod K` and `(i + 1) mod K`. Then two phases, each with its own
//! `rim job` process (static discovery listing the K comets, the same
//! consumer group, so the second continues where the first committed):
//!
//! 1. `routed`: `job.room_routes_interval` = `--routes-interval` (the job
//!    polls every comet's rooms and sends a room's batches only to the
//!    comets hosting it);
//! 2. `unrouted`: `job.room_routes_interval` = 0 s (every comet gets every
//!    room's batches: the behaviour before routing).
//!
//! In each phase: the job is started, a probe push every 500 ms until one
//! is delivered (the job has its partitions), a settle time of two routing
//! intervals plus one second (the job's routes know every comet), warmup
//! pushes (delivered, not counted), then `rate` room pushes per second for
//! `duration` seconds over HTTP, rooms round robin, each body
//! `"<send time> <seq>"`. The CPU window runs from the first measured push
//! until every measured delivery arrived (at most `drain` seconds after
//! the last push): utime + stime of the job, of every comet and of the
//! logic. The job's `rim_job_room_calls_total{result=sent|skipped}` is read
//! before and after. At the end of the phase the job gets SIGTERM (it
//! commits and leaves its group) and is waited for.
//!
//! Every measured push must reach every member of its room: missing and
//! extra deliveries are counted per client.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use rim_client::{AuthToken, Client};
use rim_proto::{Frame, Op};
use serde::Serialize;
use tokio::process::{Child, Command};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use crate::cluster::{self, Cluster};
use crate::latency::{Percentiles, Recorder, human};
use crate::options::{Output, RimProcesses};
use crate::procstat::{CpuUse, Snapshot, Watched};
use crate::push_latency::{PushCounters, load};
use crate::receiver::{FrameCounts, FrameSink, start_receivers};
use crate::wire::now_nanos;

/// How long one client may take to connect and authenticate.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Clients connecting at once.
const CONNECT_CONCURRENCY: usize = 64;
/// How long one HTTP push may take.
const PUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a started job may take to deliver its first probe push.
const READY_LIMIT: Duration = Duration::from_secs(90);
/// How long a job may take to stop after SIGTERM before it is killed.
const STOP_LIMIT: Duration = Duration::from_secs(20);
/// Shards of the latency recorder.
const SHARDS: usize = 16;
/// Largest accepted rate, room pushes/s.
const MAX_RATE: f64 = 20_000.0;
/// Most clients this process holds.
const MAX_CLIENTS: u64 = 15_000;

/// Options of `rim-bench room-routes`.
#[derive(Clone, Debug, clap::Args, Serialize)]
pub struct Args {
    #[command(flatten)]
    #[serde(flatten)]
    pub rim: RimProcesses,
    /// Kafka-protocol bootstrap servers, `host:port[,host:port]` on
    /// 127.0.0.0/8, with the topic already created (e.g. a fresh tansu).
    #[arg(long, value_delimiter = ',', required = true)]
    pub brokers: Vec<SocketAddr>,
    /// Topic the logic produces to and the job consumes.
    #[arg(long, default_value = "rim-push")]
    pub topic: String,
    /// Comet processes (routing applies from 4, `job.room_routes_min_comets`).
    #[arg(long, default_value_t = 20,
          value_parser = clap::value_parser!(u16).range(4..=100))]
    pub comets: u16,
    /// Rooms; room i has members on comets i mod K and (i + 1) mod K.
    #[arg(long, default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=7_500))]
    pub rooms: u32,
    /// Members of each room on each of its two comets.
    #[arg(long, default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub members_per_comet: u32,
    /// Room pushes per second in all (paced, rooms round robin).
    #[arg(long, default_value_t = 200.0, value_parser = parse_rate)]
    pub rate: f64,
    /// Measured seconds of pushes per phase.
    #[arg(long, default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(1..=600))]
    pub duration: u64,
    /// Seconds of pushes before measuring, per phase (delivered, not counted).
    #[arg(long, default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(0..=120))]
    pub warmup: u64,
    /// Seconds to wait after the last push for deliveries still on their way.
    #[arg(long, default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=120))]
    pub drain: u64,
    /// `job.room_routes_interval` of the routed phase, seconds.
    #[arg(long, default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..=60))]
    pub routes_interval: u64,
    /// Pushes waiting for their HTTP answer at most; beyond that a push is
    /// skipped and counted.
    #[arg(long, default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_in_flight: u32,
    /// Logic on port-base and +1 (HTTP), the job's metrics on +2, comet i
    /// on port-base + 10 + 10 i ... + 9.
    #[arg(long, default_value_t = 34_000,
          value_parser = clap::value_parser!(u16).range(1024..=60_000))]
    pub port_base: u16,
    /// TCP clients connect from 127.0.0.2 .. 127.0.0.(1+N).
    #[arg(long, default_value_t = 8,
          value_parser = clap::value_parser!(u8).range(1..=8))]
    pub source_addrs: u8,
    /// Seconds between heartbeats of each client.
    #[arg(long, default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub heartbeat: u64,
    /// Business op of the pushes.
    #[arg(long, default_value_t = 1000)]
    pub operation: i32,
    #[command(flatten)]
    #[serde(flatten)]
    pub output: Output,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    crate::pacing::parse_rate(s, MAX_RATE)
}

/// The two comets hosting `room` among `comets` (≥ 2): `room mod K` and
/// `(room + 1) mod K`.
pub fn hosting_comets(room: u32, comets: u16) -> [u16; 2] {
    let k = u32::from(comets.max(2));
    // Both below k ≤ u16::MAX: the conversions cannot fail.
    [
        u16::try_from(room % k).unwrap_or(0),
        u16::try_from((room + 1) % k).unwrap_or(0),
    ]
}

/// Every client as (room, comet): `members` members of each room on each
/// of its two comets, rooms in order.
pub fn placements(rooms: u32, comets: u16, members: u32) -> Vec<(u32, u16)> {
    let mut out = Vec::with_capacity(rooms as usize * 2 * members as usize);
    for room in 0..rooms {
        for comet in hosting_comets(room, comets) {
            for _ in 0..members {
                out.push((room, comet));
            }
        }
    }
    out
}

/// `rim_job_room_calls_total` by result, from a Prometheus text page:
/// (sent, skipped). Absent series count 0.
pub fn room_calls(metrics: &str) -> (u64, u64) {
    let (mut sent, mut skipped) = (0u64, 0u64);
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("rim_job_room_calls_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once('}') else {
            continue;
        };
        let Some(value) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        let value = value.max(0.0) as u64;
        if labels.contains("result=\"sent\"") {
            sent += value;
        } else if labels.contains("result=\"skipped\"") {
            skipped += value;
        }
    }
    (sent, skipped)
}

/// Deliveries missing and extra, from each client's (expected, received).
pub fn missing_and_extra(clients: impl IntoIterator<Item = (u64, u64)>) -> (u64, u64) {
    clients
        .into_iter()
        .fold((0, 0), |(missing, extra), (expected, got)| {
            (
                missing + expected.saturating_sub(got),
                extra + got.saturating_sub(expected),
            )
        })
}

/// What one phase used, summed over its window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Totals {
    /// Room pushes the API accepted in the window.
    pub messages: u64,
    /// CPU seconds of the job.
    pub job_cpu_secs: f64,
    /// CPU seconds of every comet, summed.
    pub comets_cpu_secs: f64,
    /// CPU seconds of the logic.
    pub logic_cpu_secs: f64,
    /// Room batch calls the job made to comets.
    pub calls_sent: u64,
    /// Room batch calls the job left out (comet not hosting the room).
    pub calls_skipped: u64,
}

/// A phase's figures per room message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct PerMessage {
    /// Job CPU, µs.
    pub job_cpu_us: f64,
    /// CPU of all comets summed, µs.
    pub comets_cpu_us: f64,
    /// Logic CPU, µs.
    pub logic_cpu_us: f64,
    /// Room calls made to comets (a call carries a batch of one or more
    /// messages of the room).
    pub calls_sent: f64,
    /// Room calls left out.
    pub calls_skipped: f64,
}

impl Totals {
    /// The totals per message; all 0 without messages.
    pub fn per_message(&self) -> PerMessage {
        if self.messages == 0 {
            return PerMessage::default();
        }
        let n = self.messages as f64;
        PerMessage {
            job_cpu_us: self.job_cpu_secs * 1e6 / n,
            comets_cpu_us: self.comets_cpu_secs * 1e6 / n,
            logic_cpu_us: self.logic_cpu_secs * 1e6 / n,
            calls_sent: self.calls_sent as f64 / n,
            calls_skipped: self.calls_skipped as f64 / n,
        }
    }
}

/// `(after - before)` ratio as "x% less": 1 - after / before, in percent;
/// 0 when `before` is 0.
pub fn saving_percent(before: f64, after: f64) -> f64 {
    if before > 0.0 {
        (1.0 - after / before) * 100.0
    } else {
        0.0
    }
}

/// State shared by the pushers and the clients.
struct Shared {
    operation: Op,
    /// Measured pushes have `measure_from <= seq < measure_to`.
    measure_from: AtomicU64,
    measure_to: AtomicU64,
    /// Room of each client.
    client_room: Vec<u32>,
    /// Measured push frames received, per client.
    client_got: Vec<AtomicU64>,
    /// Measured pushes accepted, per room.
    room_accepted: Vec<AtomicU64>,
    /// Measured push frames received.
    measured_deliveries: AtomicU64,
    frames: FrameCounts,
    latency: Recorder,
}

impl Shared {
    fn measured(&self, seq: u64) -> bool {
        seq >= self.measure_from.load(Ordering::Acquire)
            && seq < self.measure_to.load(Ordering::Acquire)
    }

    /// Forgets the previous phase's measured counts.
    fn reset_measured(&self) {
        for c in self.client_got.iter().chain(&self.room_accepted) {
            c.store(0, Ordering::Relaxed);
        }
        self.measured_deliveries.store(0, Ordering::Relaxed);
        self.latency.reset();
    }

    /// Deliveries the measured pushes accepted so far should make.
    fn expected(&self, members_per_room: u64) -> u64 {
        self.room_accepted.iter().map(load).sum::<u64>() * members_per_room
    }
}

impl FrameSink for Shared {
    fn counts(&self) -> &FrameCounts {
        &self.frames
    }

    fn on_frame(&self, client: usize, frame: &Frame) {
        let Some((seq, micros)) = self.frames.push(self.operation, frame) else {
            return;
        };
        let measured = self.measured(seq);
        if measured {
            self.measured_deliveries.fetch_add(1, Ordering::Relaxed);
            if let Some(got) = self.client_got.get(client) {
                got.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency.record(client, micros, measured);
    }
}

/// Which phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Routing on: a room's batches only to the comets hosting it.
    Routed,
    /// Routing off (`job.room_routes_interval` = 0 s): every comet gets
    /// every room's batches.
    Unrouted,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Routed => "routed",
            Phase::Unrouted => "unrouted",
        }
    }
}

/// One phase's results.
#[derive(Debug, Serialize)]
struct PhaseReport {
    phase: Phase,
    /// `job.room_routes_interval` the job ran with.
    room_routes_interval: String,
    job_pid: u32,
    /// From the job's start to its first delivered probe.
    ready_secs: f64,
    /// CPU window: first measured push → last measured delivery (or the
    /// drain limit).
    window_secs: f64,
    pushes_planned: u64,
    pushes_sent: u64,
    pushes_accepted: u64,
    pushes_rejected: u64,
    pushes_failed: u64,
    pushes_skipped: u64,
    deliveries_expected: u64,
    deliveries: u64,
    deliveries_missing: u64,
    deliveries_extra: u64,
    latency_us: Percentiles,
    totals: Totals,
    per_message: PerMessage,
    cpu: Vec<CpuUse>,
}

/// Everything the run reports (also written as JSON with `--json`).
#[derive(Debug, Serialize)]
struct Report {
    command: String,
    started_unix_secs: u64,
    args: Args,
    clients_planned: usize,
    clients_connected: usize,
    connect_secs: f64,
    /// Per measured message, unrouted → routed: (job, comets) CPU saved, %.
    job_cpu_saved_percent: f64,
    comets_cpu_saved_percent: f64,
    bad_bodies: u64,
    other_frames: u64,
    negative_latencies: u64,
    lost_clients: u64,
    phases: Vec<PhaseReport>,
}

/// One `rim job` process of a phase.
struct JobProc {
    child: Child,
    pid: u32,
}

impl JobProc {
    /// Starts `rim job` with `config` and the phase's routing interval.
    async fn start(
        rim: &Path,
        config: &Path,
        phase: Phase,
        interval: &str,
        metrics: SocketAddr,
        log_dir: &Path,
    ) -> anyhow::Result<JobProc> {
        let name = phase.name();
        let log = |suffix: &str| -> anyhow::Result<Stdio> {
            let path = log_dir.join(format!("job-{name}.{suffix}"));
            let file = std::fs::File::create(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            Ok(Stdio::from(file))
        };
        let mut child = Command::new(rim)
            .arg("job")
            .arg("--config")
            .arg(config)
            .env("RIM_NODE__ID", format!("bench-job-{name}"))
            .env("RIM_JOB__ROOM_ROUTES_INTERVAL", interval)
            .stdin(Stdio::null())
            .stdout(log("log")?)
            .stderr(log("err")?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} job", rim.display()))?;
        let pid = child.id().context("job pid")?;
        cluster::wait_listening(&mut child, metrics, Duration::from_secs(30)).await?;
        Ok(JobProc { child, pid })
    }

    /// SIGTERM (the job commits and leaves its group), then waits; killed
    /// (its own handle) when it has not stopped after `STOP_LIMIT`.
    async fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status()
            .await;
        if tokio::time::timeout(STOP_LIMIT, self.child.wait())
            .await
            .is_err()
        {
            eprintln!("warning: job {} did not stop on SIGTERM: killed", self.pid);
            let _ = self.child.kill().await;
        }
    }
}

/// The job's config file: static discovery of the comets, the broker, the
/// metrics listener, consumer settings that suit tansu (the environment's
/// `RIM_*` variables still override them, e.g. for Apache Kafka).
/// `comets` holds each comet's (gRPC, TCP) address, comet 0 first.
fn job_config(args: &Args, comets: &[(SocketAddr, SocketAddr)], metrics: SocketAddr) -> String {
    let brokers: Vec<String> = args.brokers.iter().map(|b| format!("\"{b}\"")).collect();
    let mut toml = format!(
        "# written by rim-bench room-routes\n\
         [queue]\n\
         backend = \"kafka\"\n\
         brokers = [{}]\n\
         topic = \"{}\"\n\
         static_membership = false\n\
         session_timeout = \"2s\"\n\
         heartbeat_interval = \"500ms\"\n\n\
         [metrics]\n\
         bind = \"{metrics}\"\n\n\
         [discovery]\n\
         backend = \"static\"\n",
        brokers.join(", "),
        args.topic.replace(['"', '\\'], ""),
    );
    for (i, (grpc, tcp)) in comets.iter().enumerate() {
        toml.push_str(&format!(
            "\n[[discovery.comets]]\nid = \"bench-comet-{i}\"\ngrpc = \"{grpc}\"\ntcp = \"{tcp}\"\n"
        ));
    }
    toml
}

/// Runs the benchmark.
pub async fn run(args: Args) -> anyhow::Result<()> {
    for broker in &args.brokers {
        ensure!(
            broker.ip().is_loopback(),
            "--brokers {broker}: load goes to 127.0.0.0/8 only"
        );
    }
    let planned_clients = u64::from(args.rooms) * 2 * u64::from(args.members_per_comet);
    ensure!(
        planned_clients <= MAX_CLIENTS,
        "--rooms × 2 × --members-per-comet = {planned_clients} clients: at most {MAX_CLIENTS}"
    );
    ensure!(
        u32::from(args.port_base) + 20 + 10 * u32::from(args.comets) < 65_000,
        "--port-base {} leaves no room for {} comets",
        args.port_base,
        args.comets
    );
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < planned_clients + 256 => {
            eprintln!("warning: open-file limit {limit} is low for {planned_clients} clients");
        }
        Ok(_) => {}
        Err(err) => eprintln!("warning: cannot raise the open-file limit: {err}"),
    }
    let started_unix_secs = now_nanos() / 1_000_000_000;
    let log_dir = args
        .rim
        .log_dir
        .clone()
        .unwrap_or_else(cluster::default_log_dir);
    let job_metrics = SocketAddr::from(([127, 0, 0, 1], args.port_base + 2));
    ensure!(
        std::net::TcpListener::bind(job_metrics).is_ok(),
        "port {job_metrics} is taken: choose another --port-base"
    );
    eprintln!(
        "starting a logic and {} comets (logs in {})",
        args.comets,
        log_dir.display()
    );
    let logic_env = vec![
        ("RIM_QUEUE__BROKERS".to_owned(), join_brokers(&args.brokers)),
        ("RIM_QUEUE__TOPIC".to_owned(), args.topic.clone()),
    ];
    let cluster = Cluster::start_with(
        &args.rim.rim,
        args.comets,
        args.port_base,
        &log_dir,
        &[],
        &logic_env,
    )
    .await?;
    let result = measure(&args, &cluster, &log_dir, job_metrics, started_unix_secs).await;
    cluster.stop().await;
    let report = result?;
    print_report(&report);
    report
        .args
        .output
        .write(|| serde_json::to_string_pretty(&report), || plot(&report))?;
    if report.phases.iter().any(|p| p.pushes_accepted == 0) {
        bail!("a phase had no accepted push");
    }
    Ok(())
}

fn join_brokers(brokers: &[SocketAddr]) -> String {
    brokers
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Everything between starting the cluster and stopping it.
async fn measure(
    args: &Args,
    cluster: &Cluster,
    log_dir: &Path,
    job_metrics: SocketAddr,
    started_unix_secs: u64,
) -> anyhow::Result<Report> {
    let config_path: PathBuf = log_dir.join("job.toml");
    std::fs::write(
        &config_path,
        job_config(
            args,
            &cluster
                .comets
                .iter()
                .map(|c| (c.grpc, c.tcp))
                .collect::<Vec<_>>(),
            job_metrics,
        ),
    )
    .with_context(|| format!("writing {}", config_path.display()))?;

    // ---- clients
    let places = placements(args.rooms, args.comets, args.members_per_comet);
    let pid = std::process::id();
    let shared = Arc::new(Shared {
        operation: Op(args.operation),
        measure_from: AtomicU64::new(u64::MAX),
        measure_to: AtomicU64::new(u64::MAX),
        client_room: places.iter().map(|&(room, _)| room).collect(),
        client_got: places.iter().map(|_| AtomicU64::new(0)).collect(),
        room_accepted: (0..args.rooms).map(|_| AtomicU64::new(0)).collect(),
        measured_deliveries: AtomicU64::new(0),
        frames: FrameCounts::default(),
        latency: Recorder::new(SHARDS),
    });
    let phase_secs = READY_LIMIT.as_secs()
        + 2 * args.routes_interval
        + 1
        + args.warmup
        + args.duration
        + 2 * args.drain
        + 2 * PUSH_TIMEOUT.as_secs()
        + STOP_LIMIT.as_secs()
        + 30;
    let client_deadline =
        Instant::now() + Duration::from_secs(2 * phase_secs + 120 + places.len() as u64 / 50);
    let (stop_tx, stop_rx) = watch::channel(false);
    eprintln!(
        "connecting {} TCP clients: {} rooms × 2 comets × {} member(s)",
        places.len(),
        args.rooms,
        args.members_per_comet
    );
    let connect_started = Instant::now();
    let (connected, mut clients) = connect_all(
        args,
        cluster,
        &places,
        pid,
        &shared,
        &stop_rx,
        client_deadline,
    )
    .await;
    let connect_secs = connect_started.elapsed().as_secs_f64();
    eprintln!(
        "{connected} of {} clients connected in {connect_secs:.1}s",
        places.len()
    );
    ensure!(
        connected == places.len(),
        "{} clients could not connect: every room must have its members",
        places.len() - connected
    );

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.max_in_flight as usize)
        .tcp_nodelay(true)
        .timeout(PUSH_TIMEOUT)
        .build()
        .context("HTTP client")?;
    let base = format!("http://127.0.0.1:{}", args.port_base + 1);
    let urls: Arc<Vec<String>> = Arc::new(
        (0..args.rooms)
            .map(|r| {
                format!(
                    "{base}/goim/push/room?operation={}&type=live&room={}",
                    args.operation,
                    room_name(pid, r)
                )
            })
            .collect(),
    );
    let mut pusher = Pusher {
        http,
        urls,
        shared: Arc::clone(&shared),
        in_flight: Arc::new(Semaphore::new(args.max_in_flight as usize)),
        max_in_flight: args.max_in_flight,
        next_seq: 0,
        next_room: 0,
    };

    let mut phases = Vec::new();
    let mut failure = None;
    for (phase, interval) in [
        (Phase::Routed, format!("{}s", args.routes_interval)),
        (Phase::Unrouted, "0s".to_owned()),
    ] {
        match run_phase(
            args,
            cluster,
            &config_path,
            log_dir,
            job_metrics,
            phase,
            &interval,
            &mut pusher,
        )
        .await
        {
            Ok(report) => phases.push(report),
            Err(err) => {
                failure = Some(err.context(format!("phase {}", phase.name())));
                break;
            }
        }
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while clients.join_next().await.is_some() {}
    })
    .await;
    clients.abort_all();
    if let Some(err) = failure {
        return Err(err);
    }
    let per = |p: Phase| {
        phases
            .iter()
            .find(|r| r.phase == p)
            .map(|r| r.per_message)
            .unwrap_or_default()
    };
    let (routed, unrouted) = (per(Phase::Routed), per(Phase::Unrouted));
    Ok(Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        started_unix_secs,
        clients_planned: places.len(),
        clients_connected: connected,
        connect_secs,
        job_cpu_saved_percent: saving_percent(unrouted.job_cpu_us, routed.job_cpu_us),
        comets_cpu_saved_percent: saving_percent(unrouted.comets_cpu_us, routed.comets_cpu_us),
        bad_bodies: load(&shared.frames.bad_bodies),
        other_frames: load(&shared.frames.other_frames),
        negative_latencies: load(&shared.frames.negative),
        lost_clients: load(&shared.frames.lost_clients),
        phases,
        args: args.clone(),
    })
}

/// The room id of room `r` (clients join `live://<it>`).
fn room_name(pid: u32, r: u32) -> String {
    format!("rr-{pid}-{r}")
}

/// Sends room pushes, rooms round robin, one sequence over both phases.
struct Pusher {
    http: reqwest::Client,
    urls: Arc<Vec<String>>,
    shared: Arc<Shared>,
    in_flight: Arc<Semaphore>,
    max_in_flight: u32,
    next_seq: u64,
    next_room: u32,
}

impl Pusher {
    /// Sends one push to the next room without waiting for its answer.
    fn push(&mut self, counters: &Arc<PushCounters>, measured: bool) {
        let room = self.next_room;
        self.next_room = (room + 1) % u32::try_from(self.urls.len()).unwrap_or(1).max(1);
        let seq = self.next_seq;
        self.next_seq += 1;
        let Ok(permit) = Arc::clone(&self.in_flight).try_acquire_owned() else {
            counters.skipped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        counters.sent.fetch_add(1, Ordering::Relaxed);
        let (http, urls, shared, counters) = (
            self.http.clone(),
            Arc::clone(&self.urls),
            Arc::clone(&self.shared),
            Arc::clone(counters),
        );
        tokio::spawn(async move {
            let body = format!("{} {seq}", now_nanos());
            let url = &urls[room as usize];
            match http.post(url).body(body).send().await {
                Ok(response) if response.status() == reqwest::StatusCode::OK => {
                    counters.accepted.fetch_add(1, Ordering::Relaxed);
                    if measured && let Some(c) = shared.room_accepted.get(room as usize) {
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(_) => {
                    counters.rejected.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            drop(permit);
        });
    }

    /// Paces `count` pushes at `rate` per second (bounded by the pace plus
    /// five seconds).
    async fn paced(&mut self, rate: f64, count: u64, counters: &Arc<PushCounters>, measured: bool) {
        let pacer = crate::pacing::Pacer::new(rate, count);
        let mut interval = tokio::time::interval(pacer.tick());
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let started = Instant::now();
        let hard_stop = started + Duration::from_secs_f64(count as f64 / rate + 5.0);
        let mut done = 0u64;
        while done < count && Instant::now() < hard_stop {
            interval.tick().await;
            let due = pacer.due(started.elapsed().as_secs_f64());
            while done < due {
                self.push(counters, measured);
                done += 1;
            }
        }
    }

    /// Waits (bounded) until no push waits for its answer.
    async fn answered(&self) {
        let _ = tokio::time::timeout(
            PUSH_TIMEOUT + Duration::from_secs(1),
            self.in_flight.acquire_many(self.max_in_flight),
        )
        .await;
    }
}

/// Reads the job's room call counters; (0, 0) when it cannot.
async fn scrape_room_calls(http: &reqwest::Client, metrics: SocketAddr) -> (u64, u64) {
    let url = format!("http://{metrics}/metrics");
    match http.get(&url).send().await {
        Ok(response) => match response.text().await {
            Ok(text) => room_calls(&text),
            Err(err) => {
                eprintln!("warning: reading {url}: {err}");
                (0, 0)
            }
        },
        Err(err) => {
            eprintln!("warning: {url}: {err}");
            (0, 0)
        }
    }
}

/// One phase with its own job process.
#[allow(clippy::too_many_arguments)]
async fn run_phase(
    args: &Args,
    cluster: &Cluster,
    config: &Path,
    log_dir: &Path,
    job_metrics: SocketAddr,
    phase: Phase,
    interval: &str,
    pusher: &mut Pusher,
) -> anyhow::Result<PhaseReport> {
    let shared = Arc::clone(&pusher.shared);
    eprintln!(
        "phase {}: starting the job (job.room_routes_interval = {interval})",
        phase.name()
    );
    let job_started = Instant::now();
    let job = JobProc::start(&args.rim.rim, config, phase, interval, job_metrics, log_dir).await?;
    let job_pid = job.pid;
    let result = async {
        // ---- ready: a probe every 500 ms until one is delivered
        let probes = Arc::new(PushCounters::default());
        let before = load(&shared.frames.deliveries);
        let ready_deadline = Instant::now() + READY_LIMIT;
        while load(&shared.frames.deliveries) == before {
            ensure!(
                Instant::now() < ready_deadline,
                "the job delivered no probe push in {READY_LIMIT:?} (see job-{}.log)",
                phase.name()
            );
            pusher.push(&probes, false);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let ready_secs = job_started.elapsed().as_secs_f64();
        let settle = Duration::from_secs(2 * args.routes_interval + 1);
        eprintln!(
            "phase {}: job ready after {ready_secs:.1}s; settling {settle:?}",
            phase.name()
        );
        tokio::time::sleep(settle).await;

        // ---- warmup, then let it drain
        if args.warmup > 0 {
            eprintln!("phase {}: warming up for {}s", phase.name(), args.warmup);
            let warm = Arc::new(PushCounters::default());
            let count = crate::pacing::Pacer::planned_for(args.rate, args.warmup as f64);
            pusher.paced(args.rate, count, &warm, false).await;
            pusher.answered().await;
            quiet(&shared, Duration::from_secs(args.drain)).await;
        }

        // ---- measured window
        shared.reset_measured();
        let http = pusher.http.clone();
        let calls_before = scrape_room_calls(&http, job_metrics).await;
        let mut watched = vec![
            Watched {
                name: "job".into(),
                pid: job_pid,
            },
            Watched {
                name: "logic".into(),
                pid: cluster.logic_pid,
            },
        ];
        watched.extend(cluster.comets.iter().enumerate().map(|(i, c)| Watched {
            name: format!("comet-{i}"),
            pid: c.pid,
        }));
        watched.push(Watched {
            name: "rim-bench".into(),
            pid: std::process::id(),
        });
        let counters = Arc::new(PushCounters::default());
        let planned = crate::pacing::Pacer::planned_for(args.rate, args.duration as f64);
        eprintln!(
            "phase {}: measuring {planned} room pushes over {}s",
            phase.name(),
            args.duration
        );
        let cpu_before = Snapshot::take(&watched);
        let window_started = Instant::now();
        shared
            .measure_from
            .store(pusher.next_seq, Ordering::Release);
        shared.measure_to.store(u64::MAX, Ordering::Release);
        pusher.paced(args.rate, planned, &counters, true).await;
        shared.measure_to.store(pusher.next_seq, Ordering::Release);
        pusher.answered().await;
        let members = 2 * u64::from(args.members_per_comet);
        let deadline = Instant::now() + Duration::from_secs(args.drain);
        while load(&shared.measured_deliveries) < shared.expected(members)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let window_secs = window_started.elapsed().as_secs_f64();
        let cpu = cpu_before.used_until(&Snapshot::take(&watched), window_secs);
        let calls_after = scrape_room_calls(&http, job_metrics).await;
        // Late frames of this window still count until the report is made.
        tokio::time::sleep(Duration::from_millis(200)).await;

        let expected_per_client =
            shared
                .client_room
                .iter()
                .zip(&shared.client_got)
                .map(|(&room, got)| {
                    // Every member gets every accepted push to its room.
                    (load(&shared.room_accepted[room as usize]), load(got))
                });
        let (missing, extra) = missing_and_extra(expected_per_client);
        let cpu_of = |prefix: &str| -> f64 {
            cpu.iter()
                .filter(|c| c.name == prefix || c.name.starts_with(&format!("{prefix}-")))
                .map(|c| c.cpu_seconds)
                .sum()
        };
        let totals = Totals {
            messages: load(&counters.accepted),
            job_cpu_secs: cpu_of("job"),
            comets_cpu_secs: cpu_of("comet"),
            logic_cpu_secs: cpu_of("logic"),
            calls_sent: calls_after.0.saturating_sub(calls_before.0),
            calls_skipped: calls_after.1.saturating_sub(calls_before.1),
        };
        Ok(PhaseReport {
            phase,
            room_routes_interval: interval.to_owned(),
            job_pid,
            ready_secs,
            window_secs,
            pushes_planned: planned,
            pushes_sent: load(&counters.sent),
            pushes_accepted: load(&counters.accepted),
            pushes_rejected: load(&counters.rejected),
            pushes_failed: load(&counters.failed),
            pushes_skipped: load(&counters.skipped),
            deliveries_expected: shared.expected(members),
            deliveries: load(&shared.measured_deliveries),
            deliveries_missing: missing,
            deliveries_extra: extra,
            latency_us: Percentiles::of(&shared.latency.total()),
            per_message: totals.per_message(),
            totals,
            cpu,
        })
    }
    .await;
    eprintln!("phase {}: stopping the job", phase.name());
    job.stop().await;
    result
}

/// Waits until no frame arrived for one second, `limit` at most.
async fn quiet(shared: &Shared, limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut last = load(&shared.frames.deliveries);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = load(&shared.frames.deliveries);
        if now == last {
            return;
        }
        last = now;
    }
}

/// Connects and authenticates every client of `places`,
/// `CONNECT_CONCURRENCY` at a time; returns how many connected and their
/// receive tasks.
async fn connect_all(
    args: &Args,
    cluster: &Cluster,
    places: &[(u32, u16)],
    pid: u32,
    shared: &Arc<Shared>,
    stop: &watch::Receiver<bool>,
    deadline: Instant,
) -> (usize, JoinSet<()>) {
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut connecting = JoinSet::new();
    for (i, &(room, comet)) in places.iter().enumerate() {
        let addr = cluster.comets[usize::from(comet)].tcp;
        let source = crate::addrs::source_addr(0, i as u64, u32::from(args.source_addrs));
        let token = AuthToken {
            mid: i64::try_from(i).unwrap_or(0) + 1,
            key: format!("rr-{pid}-{i}"),
            room_id: format!("live://{}", room_name(pid, room)),
            platform: "bench".into(),
            accepts: vec![args.operation],
        };
        let gate = Arc::clone(&gate);
        connecting.spawn(async move {
            let _permit = gate.acquire_owned().await;
            let connect = async {
                let mut client = Client::connect_tcp_from(addr, source).await?;
                client.auth(&token).await?;
                Ok::<_, rim_client::Error>(client)
            };
            match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
                Ok(Ok(client)) => Ok((i, (), client)),
                Ok(Err(err)) => Err(format!("client {i} via {addr}: {err}")),
                Err(_) => Err(format!("client {i} via {addr}: no auth reply in time")),
            }
        });
    }
    let heartbeat = Duration::from_secs(args.heartbeat);
    let (connected, clients) = start_receivers(connecting, shared, stop, heartbeat, deadline).await;
    (connected.len(), clients)
}

/// Bars per phase: job CPU, comets' CPU and room calls per message.
fn plot(r: &Report) -> String {
    use crate::plot::{Chart, Series, render};
    // A bar as a closed outline at x = 1 + index, 0.6 wide.
    let bar = |i: usize, y: f64| -> Vec<(f64, f64)> {
        let x = 1.0 + i as f64;
        vec![
            (x - 0.3, 0.0),
            (x - 0.3, y),
            (x + 0.3, y),
            (x + 0.3, 0.0),
            (x - 0.3, 0.0),
        ]
    };
    let title = format!(
        "room-routes: {} comets, {} rooms on 2 comets each, {} msg/s",
        r.args.comets, r.args.rooms, r.args.rate
    );
    let chart = |what: &str, y_label: &str, f: fn(&PerMessage) -> f64| Chart {
        title: format!("{title}: {what}"),
        x_label: "phase (1 = routed, 2 = unrouted)".into(),
        y_label: y_label.into(),
        log_x: false,
        series: r
            .phases
            .iter()
            .enumerate()
            .map(|(i, p)| Series {
                label: format!("{} {:.1}", p.phase.name(), f(&p.per_message)),
                points: bar(i, f(&p.per_message)),
            })
            .collect(),
    };
    render(&[
        chart("job CPU per room message", "µs", |p| p.job_cpu_us),
        chart("comets' CPU per room message (sum)", "µs", |p| {
            p.comets_cpu_us
        }),
        chart("room calls to comets per message", "calls", |p| {
            p.calls_sent
        }),
    ])
}

fn print_report(r: &Report) {
    println!(
        "rim-bench room-routes: {} comets, {} rooms × 2 comets × {} member(s), {} clients",
        r.args.comets, r.args.rooms, r.args.members_per_comet, r.clients_connected
    );
    println!("  command:  {}", r.command);
    for p in &r.phases {
        let m = &p.per_message;
        println!(
            "  {:<8} (job.room_routes_interval {}): {} of {} pushes accepted over {:.1}s ({} skipped, {} rejected, {} failed)",
            p.phase.name(),
            p.room_routes_interval,
            p.pushes_accepted,
            p.pushes_planned,
            p.window_secs,
            p.pushes_skipped,
            p.pushes_rejected,
            p.pushes_failed
        );
        println!(
            "           CPU per message: job {:.1} µs, comets {:.1} µs (sum of {}), logic {:.1} µs",
            m.job_cpu_us, m.comets_cpu_us, r.args.comets, m.logic_cpu_us
        );
        println!(
            "           room calls per message: {:.2} sent, {:.2} skipped",
            m.calls_sent, m.calls_skipped
        );
        println!(
            "           deliveries {} of {} ({} missing, {} extra); latency p50 {} p99 {} max {}",
            p.deliveries,
            p.deliveries_expected,
            p.deliveries_missing,
            p.deliveries_extra,
            human(p.latency_us.p50),
            human(p.latency_us.p99),
            human(p.latency_us.max)
        );
    }
    for p in &r.phases {
        if p.phase == Phase::Routed && p.totals.calls_skipped == 0 {
            println!(
                "  warning: the routed phase skipped no room call: routing did not apply (see job-routed.log)"
            );
        }
        if p.deliveries_missing > 0 {
            println!(
                "  warning: phase {} lost {} deliveries",
                p.phase.name(),
                p.deliveries_missing
            );
        }
    }
    println!(
        "  routed vs unrouted, per message: job CPU {:.0}% less, comets' CPU {:.0}% less",
        r.job_cpu_saved_percent, r.comets_cpu_saved_percent
    );
    println!(
        "  errors: lost clients {}, bad bodies {}, clock steps {}",
        r.lost_clients, r.bad_bodies, r.negative_latencies
    );
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;

    /// Every room has its members on exactly two distinct comets, the same
    /// number on each, and the rooms spread evenly over the comets.
    #[test]
    fn each_room_lives_on_exactly_two_comets() {
        for (rooms, comets, members) in [(1000, 20, 1), (20, 4, 3), (7, 5, 2)] {
            let places = placements(rooms, comets, members);
            assert_eq!(places.len(), (rooms * 2 * members) as usize);
            let mut by_room: HashMap<u32, HashMap<u16, u32>> = HashMap::new();
            for &(room, comet) in &places {
                assert!(comet < comets);
                *by_room.entry(room).or_default().entry(comet).or_default() += 1;
            }
            assert_eq!(by_room.len(), rooms as usize);
            for (room, hosts) in &by_room {
                assert_eq!(hosts.len(), 2, "room {room} on {hosts:?}");
                assert!(hosts.values().all(|&n| n == members), "room {room}");
                let expected: HashSet<u16> = hosting_comets(*room, comets).into_iter().collect();
                assert_eq!(hosts.keys().copied().collect::<HashSet<_>>(), expected);
            }
        }
        // 1,000 rooms on 20 comets: each comet hosts 100 rooms.
        let mut per_comet = [0u32; 20];
        for room in 0..1000 {
            for comet in hosting_comets(room, 20) {
                per_comet[usize::from(comet)] += 1;
            }
        }
        assert!(per_comet.iter().all(|&n| n == 100), "{per_comet:?}");
        assert_eq!(hosting_comets(19, 20), [19, 0]);
    }

    #[test]
    fn reads_room_calls_from_the_metrics_page() {
        let page = "# HELP rim_job_room_calls Room batches per comet.\n\
                    # TYPE rim_job_room_calls counter\n\
                    rim_job_room_calls_total{result=\"sent\"} 1234\n\
                    rim_job_room_calls_total{result=\"skipped\"} 17100\n\
                    rim_job_room_calls_other_total{result=\"sent\"} 9\n\
                    rim_job_messages_total{kind=\"room\",result=\"delivered\"} 5\n";
        assert_eq!(room_calls(page), (1234, 17_100));
        assert_eq!(room_calls("# nothing yet\n"), (0, 0));
        assert_eq!(
            room_calls("rim_job_room_calls_total{result=\"sent\"} 3 1700000000\n"),
            (3, 0)
        );
    }

    #[test]
    fn counts_missing_and_extra_per_client() {
        assert_eq!(missing_and_extra([(10, 10), (10, 8), (5, 7)]), (2, 2));
        assert_eq!(missing_and_extra([]), (0, 0));
        assert_eq!(missing_and_extra([(0, 3)]), (0, 3));
    }

    #[test]
    fn per_message_figures() {
        let totals = Totals {
            messages: 4_000,
            job_cpu_secs: 0.2,
            comets_cpu_secs: 1.0,
            logic_cpu_secs: 0.4,
            calls_sent: 8_000,
            calls_skipped: 72_000,
        };
        let per = totals.per_message();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(per.job_cpu_us, 50.0), "{per:?}");
        assert!(close(per.comets_cpu_us, 250.0), "{per:?}");
        assert!(close(per.logic_cpu_us, 100.0), "{per:?}");
        assert!(close(per.calls_sent, 2.0) && close(per.calls_skipped, 18.0));
        assert_eq!(Totals::default().per_message(), PerMessage::default());
        assert!(close(saving_percent(200.0, 50.0), 75.0));
        assert!(close(saving_percent(0.0, 50.0), 0.0));
    }

    #[test]
    fn the_job_config_lists_every_comet() {
        let cli = <crate::Cli as clap::Parser>::try_parse_from([
            "rim-bench",
            "room-routes",
            "--brokers",
            "127.0.0.1:29192",
            "--comets",
            "4",
        ])
        .unwrap();
        let crate::Command::RoomRoutes(args) = cli.command else {
            panic!("parsed {:?}", cli.command)
        };
        let comets: Vec<(SocketAddr, SocketAddr)> = (0..4u16)
            .map(|i| {
                let (tcp, _, grpc) = cluster::comet_ports(34_000, i);
                let a = |p| SocketAddr::from(([127, 0, 0, 1], p));
                (a(grpc), a(tcp))
            })
            .collect();
        let toml = job_config(&args, &comets, "127.0.0.1:34002".parse().unwrap());
        assert!(toml.contains("brokers = [\"127.0.0.1:29192\"]"), "{toml}");
        assert!(toml.contains("bind = \"127.0.0.1:34002\""), "{toml}");
        assert_eq!(toml.matches("[[discovery.comets]]").count(), 4);
        assert!(toml.contains("id = \"bench-comet-3\"\ngrpc = \"127.0.0.1:34049\""));
    }

    /// The broker is required, routing needs 4 comets, and the defaults are
    /// the setup (20 comets, 1,000 rooms, one member per comet).
    #[test]
    fn flags_and_defaults() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["rim-bench", "room-routes"];
            argv.extend(extra);
            <crate::Cli as clap::Parser>::try_parse_from(argv)
        };
        assert!(parse(&[]).is_err());
        assert!(parse(&["--brokers", "127.0.0.1:1", "--comets", "3"]).is_err());
        assert!(parse(&["--brokers", "127.0.0.1:1", "--rate", "0"]).is_err());
        let cli = parse(&["--brokers", "127.0.0.1:1,127.0.0.2:2"]).unwrap();
        let crate::Command::RoomRoutes(args) = cli.command else {
            panic!("parsed {:?}", cli.command)
        };
        let json = serde_json::to_value(&args).unwrap();
        assert_eq!(
            json["brokers"],
            serde_json::json!(["127.0.0.1:1", "127.0.0.2:2"])
        );
        assert_eq!(
            (json["comets"].as_u64(), json["rooms"].as_u64()),
            (Some(20), Some(1000))
        );
        assert_eq!(json["members_per_comet"], 1);
        assert_eq!(json["rim"], "target/release/rim");
        assert_eq!(json["port_base"], 34_000);
    }
}
