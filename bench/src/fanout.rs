//! `rim-bench fanout`: room fan-out cost — deliveries per server CPU-second
//! — of rim's comets, unbatched and with op-9 batches, next to the raw tokio
//! baseline (`rim-bench baseline`), with the same client processes, in the
//! same run.
//!
//! Order of a run: the load-generator processes connect `--members` clients
//! to K baseline processes and every rate of the sweep is measured; they
//! close, reconnect the same number of clients to K `rim comet` processes
//! (with one `rim logic` for auth) and every rate is measured unbatched, then
//! batched. Messages go in through the comet gRPC `BroadcastRoom` call, as
//! the job sends them: one call per message per comet (unbatched), or one
//! call per op-9 batch of up to `--batch` messages (batched: the job's fixed
//! rule; adaptive: its adaptive rule; full batches), each comet (or
//! baseline process) fed by one sequential worker like the job's.
//! Server CPU is utime + stime from /proc of every server process over the
//! step (sending, then draining until every delivery arrived or `--drain`).

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use clap::ValueEnum;
use rim_proto::api::{CometApi, RemoteComet};
use rim_proto::pb::comet::v1 as pb;
use rim_proto::{BatchBuilder, Frame, Op};
use serde::Serialize;
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::cluster::{self, Cluster};
use crate::fleet::Fleet;
use crate::latency::{self, Percentiles, human};
use crate::options::{LoadGenerators, Output, RimProcesses};
use crate::pacing::{self, Pacer};
use crate::plot::{Chart, Series, render};
use crate::procstat::{self, CpuUse, Snapshot, Watched};
use crate::wire::{self, Transport};

/// Business op of the messages.
const OP: i32 = 1000;
/// Room every client joins.
const ROOM: &str = "live://bench-0";
/// Largest message rate.
const MAX_RATE: f64 = 100_000.0;
/// Calls queued per server worker before messages are skipped.
const WORKER_QUEUE: usize = 1024;

/// What a step measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The raw tokio baseline, one call (one write per socket) per message.
    Baseline,
    /// rim comets, one BroadcastRoom call per message.
    Unbatched,
    /// rim comets, messages merged into op-9 batches as the job's fixed
    /// rule does: a batch goes out at `--batch` messages or `--flush-ms`
    /// after its first.
    Batched,
    /// rim comets, batches as the job's adaptive rule (the default) makes
    /// them: a message goes at once while no batch is in flight (sent and
    /// not yet answered by every comet); else messages gather until the
    /// batch in flight is answered, the batch holds `--batch` messages, or
    /// its first has waited `--flush-ms`.
    Adaptive,
    /// rim comets, always full batches of `--batch` messages (no timed
    /// flush): what batching saves once a room's rate fills batches.
    FullBatches,
}

/// Options of `rim-bench fanout`.
#[derive(Clone, Debug, clap::Args, Serialize)]
pub struct Args {
    #[command(flatten)]
    #[serde(flatten)]
    pub processes: RimProcesses,
    /// Room members (clients) in all.
    #[arg(long, default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub members: u64,
    /// Server processes (comets, and as many baseline processes); default:
    /// members / 15,000 rounded up.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=200))]
    pub comets: Option<u16>,
    #[command(flatten)]
    #[serde(flatten)]
    pub load: LoadGenerators,
    /// Message rates to sweep, messages/s, comma-separated.
    #[arg(long, default_value = "10,50,200", value_delimiter = ',',
          value_parser = |s: &str| pacing::parse_rate(s, MAX_RATE))]
    pub rates: Vec<f64>,
    /// What to measure, comma-separated, in this order per connection.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "baseline,unbatched,batched,adaptive,full-batches"
    )]
    pub modes: Vec<Mode>,
    /// Seconds of sending per step.
    #[arg(long, default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=600))]
    pub step_secs: u64,
    /// Messages per op-9 batch in the batched and adaptive modes (the job's
    /// room_batch).
    #[arg(long, default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(2..=1000))]
    pub batch: u32,
    /// Milliseconds after its first message a partial batch is sent anyway
    /// (the job's room_flush; in adaptive mode the most a batch waits for
    /// the one in flight); 0 = no timed flush.
    #[arg(long, default_value_t = 50,
          value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub flush_ms: u64,
    /// Body bytes of each message (send time and sequence, padded).
    #[arg(long, default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(24..=4096))]
    pub payload: u32,
    /// Seconds to wait after a step's last message for its deliveries.
    #[arg(long, default_value_t = 15,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub drain: u64,
    /// First port of the rim processes (see `connections --help`).
    #[arg(long, default_value_t = 30_000)]
    pub port_base: u16,
    #[command(flatten)]
    #[serde(flatten)]
    pub output: Output,
}

/// Figures of one (mode, rate) step.
#[derive(Debug, Serialize)]
struct Step {
    mode: Mode,
    rate: f64,
    members: u64,
    messages_planned: u64,
    messages_sent: u64,
    messages_skipped: u64,
    calls: u64,
    call_errors: u64,
    dropped_reported: u64,
    deliveries_expected: u64,
    deliveries: u64,
    deliveries_missing: u64,
    window_secs: f64,
    deliveries_per_sec: f64,
    server_cpu_seconds: f64,
    deliveries_per_server_cpu_sec: f64,
    client_cpu_seconds: f64,
    lost_clients: u64,
    /// Fewest and most messages one client received in the step.
    per_client_min: u64,
    per_client_max: u64,
    latency_us: Percentiles,
    cpu: Vec<CpuUse>,
    /// (seconds since the step start, deliveries/s) every 500 ms.
    series: Vec<(f64, f64)>,
    /// Latency CDF: (ms, % of deliveries at or below).
    cdf: Vec<(f64, f64)>,
}

#[derive(Debug, Serialize)]
struct Ratio {
    rate: f64,
    unbatched_vs_baseline: Option<f64>,
    batched_vs_baseline: Option<f64>,
    adaptive_vs_baseline: Option<f64>,
    full_batches_vs_baseline: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    command: String,
    started_unix_secs: u64,
    load_average_start: Option<f64>,
    load_average_end: Option<f64>,
    args: Args,
    servers: u16,
    client_processes: usize,
    steps: Vec<Step>,
    ratios: Vec<Ratio>,
}

/// Servers of one kind: pids and gRPC clients.
struct Servers {
    pids: Vec<u32>,
    tcp: Vec<SocketAddr>,
    apis: Vec<RemoteComet>,
}

/// Baseline processes started by this run.
struct Baselines {
    children: Vec<Child>,
}

impl Baselines {
    async fn start(count: u16) -> anyhow::Result<(Baselines, Servers)> {
        let exe = std::env::current_exe().context("locating rim-bench")?;
        let mut children = Vec::new();
        let mut servers = Servers {
            pids: Vec::new(),
            tcp: Vec::new(),
            apis: Vec::new(),
        };
        for _ in 0..count {
            let mut child = Command::new(&exe)
                .arg("baseline")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .context("starting a baseline process")?;
            let pid = child.id().context("baseline pid")?;
            let stdout = child.stdout.take().context("baseline stdout")?;
            children.push(child);
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
                .await
                .context("baseline did not start in 20 s")??
                .context("baseline exited at start")?;
            let words: Vec<&str> = line.split_whitespace().collect();
            let ["READY", tcp, grpc] = words[..] else {
                bail!("baseline said {line:?}");
            };
            servers.pids.push(pid);
            servers.tcp.push(tcp.parse()?);
            servers
                .apis
                .push(RemoteComet::connect_lazy(grpc).map_err(|e| anyhow::anyhow!("{e}"))?);
        }
        Ok((Baselines { children }, servers))
    }

    async fn stop(self) {
        for mut child in self.children {
            drop(child.stdin.take());
            if tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }
}

/// Runs the benchmark.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let wants_rim = args.modes.iter().any(|m| *m != Mode::Baseline);
    ensure!(
        !wants_rim || args.processes.rim.exists(),
        "--rim {}: no such file (cargo build --release -p rim)",
        args.processes.rim.display()
    );
    ensure!(!args.modes.is_empty(), "--modes: give at least one");
    if let Err(err) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("warning: cannot raise the open-file limit: {err}");
    }
    let servers_n = args
        .comets
        .unwrap_or_else(|| u16::try_from(args.members.div_ceil(15_000)).unwrap_or(u16::MAX));
    let started_unix_secs = wire::now_nanos() / 1_000_000_000;
    let load_average_start = procstat::load_average();
    let processes = args.members.div_ceil(args.load.per_process) as usize;
    let steps_n = (args.rates.len() * args.modes.len()) as u64;
    let max_secs = 900 + steps_n * (args.step_secs + args.drain + 30) + args.members / 50;
    let mut fleet = Fleet::spawn(processes, args.load.source_addrs, max_secs).await?;
    let mut steps = Vec::new();
    let result = async {
        if args.modes.contains(&Mode::Baseline) {
            let (baselines, servers) = Baselines::start(servers_n).await?;
            let r = sweep(&args, &mut fleet, &servers, &[Mode::Baseline], &mut steps).await;
            baselines.stop().await;
            r?;
        }
        if wants_rim {
            let log_dir = args
                .processes
                .log_dir
                .clone()
                .unwrap_or_else(cluster::default_log_dir);
            eprintln!(
                "starting a logic and {servers_n} comet(s), logs in {}",
                log_dir.display()
            );
            let cluster = Cluster::start(
                &args.processes.rim,
                servers_n,
                args.port_base,
                &log_dir,
                &[],
            )
            .await?;
            let servers = Servers {
                pids: cluster.comets.iter().map(|c| c.pid).collect(),
                tcp: cluster.comets.iter().map(|c| c.tcp).collect(),
                apis: cluster
                    .comets
                    .iter()
                    .map(|c| RemoteComet::connect_lazy(&c.grpc.to_string()))
                    .collect::<Result<_, _>>()
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
            };
            let modes: Vec<Mode> = args
                .modes
                .iter()
                .copied()
                .filter(|m| *m != Mode::Baseline)
                .collect();
            let r = sweep(&args, &mut fleet, &servers, &modes, &mut steps).await;
            cluster.stop().await;
            r?;
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    fleet.shutdown().await;
    result?;
    let ratios = args
        .rates
        .iter()
        .map(|&rate| {
            let per = |mode: Mode| {
                steps
                    .iter()
                    .find(|s| s.mode == mode && s.rate == rate)
                    .map(|s| s.deliveries_per_server_cpu_sec)
            };
            let base = per(Mode::Baseline).filter(|b| *b > 0.0);
            Ratio {
                rate,
                unbatched_vs_baseline: base.zip(per(Mode::Unbatched)).map(|(b, u)| u / b),
                batched_vs_baseline: base.zip(per(Mode::Batched)).map(|(b, u)| u / b),
                adaptive_vs_baseline: base.zip(per(Mode::Adaptive)).map(|(b, u)| u / b),
                full_batches_vs_baseline: base.zip(per(Mode::FullBatches)).map(|(b, u)| u / b),
            }
        })
        .collect();
    let report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        started_unix_secs,
        load_average_start,
        load_average_end: procstat::load_average(),
        args: args.clone(),
        servers: servers_n,
        client_processes: processes,
        steps,
        ratios,
    };
    print_report(&report);
    args.output
        .write(|| serde_json::to_string(&report), || plot(&report))?;
    Ok(())
}

/// Connects the clients to `servers`, measures every rate of every mode,
/// closes the clients.
async fn sweep(
    args: &Args,
    fleet: &mut Fleet,
    servers: &Servers,
    modes: &[Mode],
    steps: &mut Vec<Step>,
) -> anyhow::Result<()> {
    eprintln!(
        "connecting {} clients to {} {} process(es)",
        args.members,
        servers.tcp.len(),
        if modes == [Mode::Baseline] {
            "baseline"
        } else {
            "comet"
        }
    );
    let connected = fleet
        .connect(
            Transport::Tcp,
            &servers.tcp,
            args.members,
            "live://bench-",
            1,
            30,
            OP,
        )
        .await?;
    eprintln!("{} connected, {} failed", connected.ok, connected.failed);
    ensure!(connected.ok > 0, "no client connected");
    tokio::time::sleep(Duration::from_secs(2)).await;
    for &mode in modes {
        for &rate in &args.rates {
            let step = step(args, fleet, servers, mode, rate).await?;
            eprintln!(
                "{:?} at {rate}/s: {} of {} deliveries (each client {}..={} of {} messages), {:.0}/s, server CPU {:.2}s -> {:.0} deliveries per CPU-second, p50 {} p99 {}",
                mode,
                step.deliveries,
                step.deliveries_expected,
                step.per_client_min,
                step.per_client_max,
                step.messages_sent,
                step.deliveries_per_sec,
                step.server_cpu_seconds,
                step.deliveries_per_server_cpu_sec,
                human(step.latency_us.p50),
                human(step.latency_us.p99),
            );
            steps.push(step);
        }
    }
    fleet.close().await?;
    Ok(())
}

/// Counters of one step's server calls.
#[derive(Default)]
struct CallStats {
    calls: AtomicU64,
    errors: AtomicU64,
    dropped: AtomicU64,
}

/// The job's adaptive rule, as job/src/room.rs `flush_now` has it
/// (duplicated: the bench does not build the job and its Kafka client):
/// a gathered batch goes when it is full, or, adaptive, as soon as none of
/// the room's batches is in flight. The timed flush is separate.
fn flush_now(adaptive: bool, gathered: u64, batch_size: u64, in_flight: u32) -> bool {
    gathered >= batch_size || (adaptive && gathered > 0 && in_flight == 0)
}

/// A frame for a server's worker, and in adaptive mode its batch's answer.
struct Call {
    frame: Frame,
    answer: Option<Arc<Answer>>,
}

/// Counts the servers yet to answer a batch; tells the sender when none is
/// left (like the job's wait for every comet).
struct Answer {
    remaining: AtomicUsize,
    /// Unbounded: one message per batch, and batches in flight are bounded
    /// by the workers' queues.
    tx: mpsc::UnboundedSender<()>,
}

impl Answer {
    fn done(&self, n: usize) {
        if self.remaining.fetch_sub(n, Ordering::AcqRel) == n {
            let _ = self.tx.send(());
        }
    }
}

/// One server's worker: calls BroadcastRoom for each frame, in order.
async fn worker(api: RemoteComet, mut rx: mpsc::Receiver<Call>, stats: Arc<CallStats>) {
    while let Some(Call { frame, answer }) = rx.recv().await {
        let req = pb::BroadcastRoomRequest {
            room_id: ROOM.into(),
            proto: Some(frame.into()),
        };
        stats.calls.fetch_add(1, Ordering::Relaxed);
        match api.broadcast_room(req).await {
            Ok(d) => {
                stats.dropped.fetch_add(d.dropped, Ordering::Relaxed);
            }
            Err(err) => {
                if stats.errors.fetch_add(1, Ordering::Relaxed) < 3 {
                    eprintln!("warning: BroadcastRoom: {err}");
                }
            }
        }
        if let Some(answer) = answer {
            answer.done(1);
        }
    }
}

async fn step(
    args: &Args,
    fleet: &mut Fleet,
    servers: &Servers,
    mode: Mode,
    rate: f64,
) -> anyhow::Result<Step> {
    fleet.reset().await?;
    let members = fleet.totals().connected;
    let lost_before = fleet.totals().lost;
    let mut watched: Vec<Watched> = servers
        .pids
        .iter()
        .enumerate()
        .map(|(i, &pid)| Watched {
            name: format!("server-{i}"),
            pid,
        })
        .collect();
    for (i, pid) in fleet.pids().into_iter().enumerate() {
        watched.push(Watched {
            name: format!("client-proc-{i}"),
            pid,
        });
    }
    let stats = Arc::new(CallStats::default());
    let mut txs = Vec::new();
    let mut workers = Vec::new();
    for api in &servers.apis {
        let (tx, rx) = mpsc::channel(WORKER_QUEUE);
        txs.push(tx);
        workers.push(tokio::spawn(worker(api.clone(), rx, Arc::clone(&stats))));
    }
    let planned = Pacer::planned_for(rate, args.step_secs as f64);
    let pacer = Pacer::new(rate, planned);
    eprintln!("{mode:?}: {planned} messages at {rate}/s to {members} members");
    let before = Snapshot::take(&watched);
    let started = Instant::now();
    let ticks = fleet.ticks_handle();
    let (sampler_stop_tx, mut sampler_stop_rx) = tokio::sync::watch::channel(false);
    let sampler = tokio::spawn(async move {
        let mut series = Vec::new();
        let mut every = tokio::time::interval(Duration::from_millis(500));
        let mut last = (0.0, 0u64);
        let mut printed = Instant::now();
        // Bounded: ends on stop, or after an hour.
        for _ in 0..7200 {
            tokio::select! {
                _ = every.tick() => {}
                _ = sampler_stop_rx.changed() => break,
            }
            let now = started.elapsed().as_secs_f64();
            let delivered: u64 = ticks.lock().iter().map(|t| t.deliveries).sum();
            let per_sec = delivered.saturating_sub(last.1) as f64 / (now - last.0).max(1e-3);
            series.push((now, per_sec));
            if printed.elapsed() >= Duration::from_secs(1) {
                printed = Instant::now();
                eprintln!("[{now:>5.1}s] deliveries {per_sec:>10.0}/s  total {delivered}");
            }
            last = (now, delivered);
        }
        series
    });
    // Batched modes also wake to flush partial batches on time.
    let wake = match mode {
        Mode::Batched | Mode::Adaptive | Mode::FullBatches => {
            pacer.tick().min(Duration::from_millis(10))
        }
        Mode::Baseline | Mode::Unbatched => pacer.tick(),
    };
    let adaptive = mode == Mode::Adaptive;
    let batch_size = u64::from(args.batch);
    let mut tick = tokio::time::interval(wake);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let hard_stop = started + Duration::from_secs(args.step_secs + 5);
    let (mut seq, mut sent, mut skipped) = (0u64, 0u64, 0u64);
    let mut batch = BatchBuilder::new();
    let mut in_batch = 0u64;
    let mut batch_opened = Instant::now();
    let flush_after = Duration::from_millis(args.flush_ms);
    // Like the job: a batch of one goes out as the frame itself.
    let finish = |batch: BatchBuilder, single: &Option<Frame>, n: u64| match (n, single) {
        (1, Some(frame)) => frame.clone(),
        _ => batch.finish(),
    };
    let mut single: Option<Frame> = None;
    // Adaptive mode: the room's batches not yet answered by every server.
    let (answered_tx, mut answered_rx) = mpsc::unbounded_channel();
    let mut in_flight = 0u32;
    let send =
        |frame: Frame, messages: u64, sent: &mut u64, skipped: &mut u64, in_flight: &mut u32| {
            let answer = adaptive.then(|| {
                // One more than the servers until all were tried: a server
                // that skipped it will not answer.
                Arc::new(Answer {
                    remaining: AtomicUsize::new(txs.len() + 1),
                    tx: answered_tx.clone(),
                })
            });
            // A message counts as sent when every server took it.
            let mut took = 0;
            for tx in &txs {
                let call = Call {
                    frame: frame.clone(),
                    answer: answer.clone(),
                };
                took += usize::from(tx.try_send(call).is_ok());
            }
            if took == txs.len() {
                *sent += messages;
            } else {
                *skipped += messages;
            }
            if let Some(answer) = answer {
                *in_flight += 1;
                answer.done(txs.len() - took + 1);
            }
        };
    while seq < planned && Instant::now() < hard_stop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(()) = answered_rx.recv(), if adaptive => {
                in_flight = in_flight.saturating_sub(1);
                if flush_now(adaptive, in_batch, batch_size, in_flight) {
                    let gathered = finish(std::mem::take(&mut batch), &single, in_batch);
                    send(gathered, in_batch, &mut sent, &mut skipped, &mut in_flight);
                    in_batch = 0;
                }
                continue;
            }
        }
        let due = pacer.due(started.elapsed().as_secs_f64());
        while seq < due {
            let frame = Frame::new(
                Op(OP),
                0,
                wire::body(wire::now_nanos(), seq, args.payload as usize),
            );
            seq += 1;
            match mode {
                Mode::Baseline | Mode::Unbatched => {
                    send(frame, 1, &mut sent, &mut skipped, &mut in_flight);
                }
                Mode::Batched | Mode::Adaptive | Mode::FullBatches => {
                    batch.push(&frame)?;
                    if in_batch == 0 {
                        batch_opened = Instant::now();
                        single = Some(frame);
                    }
                    in_batch += 1;
                    if flush_now(adaptive, in_batch, batch_size, in_flight) {
                        let ready = finish(std::mem::take(&mut batch), &single, in_batch);
                        send(ready, in_batch, &mut sent, &mut skipped, &mut in_flight);
                        in_batch = 0;
                    }
                }
            }
        }
        if in_batch > 0
            && matches!(mode, Mode::Batched | Mode::Adaptive)
            && args.flush_ms > 0
            && batch_opened.elapsed() >= flush_after
        {
            let partial = finish(std::mem::take(&mut batch), &single, in_batch);
            send(partial, in_batch, &mut sent, &mut skipped, &mut in_flight);
            in_batch = 0;
        }
    }
    if in_batch > 0 {
        send(
            finish(batch, &single, in_batch),
            in_batch,
            &mut sent,
            &mut skipped,
            &mut in_flight,
        );
    }
    skipped += planned - seq;
    drop(txs);
    let drain_deadline = Instant::now() + Duration::from_secs(args.drain);
    for w in workers {
        let _ = tokio::time::timeout_at(drain_deadline, w).await;
    }
    let expected = sent * members;
    while fleet.totals().deliveries < expected && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let window_secs = started.elapsed().as_secs_f64();
    let cpu = before.used_until(&Snapshot::take(&watched), window_secs);
    let _ = sampler_stop_tx.send(true);
    let series = sampler.await.unwrap_or_default();
    let reports = fleet.report().await?;
    let deliveries: u64 = reports.iter().map(|r| r.deliveries).sum();
    let mut hist = latency::histogram();
    for r in &reports {
        latency::add_pairs(&mut hist, &r.latency);
    }
    let server_cpu: f64 = cpu
        .iter()
        .filter(|c| c.name.starts_with("server-"))
        .map(|c| c.cpu_seconds)
        .sum();
    let client_cpu: f64 = cpu
        .iter()
        .filter(|c| c.name.starts_with("client-proc-"))
        .map(|c| c.cpu_seconds)
        .sum();
    Ok(Step {
        mode,
        rate,
        members,
        messages_planned: planned,
        messages_sent: sent,
        messages_skipped: skipped,
        calls: stats.calls.load(Ordering::Relaxed),
        call_errors: stats.errors.load(Ordering::Relaxed),
        dropped_reported: stats.dropped.load(Ordering::Relaxed),
        deliveries_expected: expected,
        deliveries,
        deliveries_missing: expected.saturating_sub(deliveries),
        window_secs,
        deliveries_per_sec: deliveries as f64 / window_secs,
        server_cpu_seconds: server_cpu,
        deliveries_per_server_cpu_sec: if server_cpu > 0.0 {
            deliveries as f64 / server_cpu
        } else {
            0.0
        },
        client_cpu_seconds: client_cpu,
        lost_clients: fleet.totals().lost - lost_before,
        per_client_min: reports.iter().map(|r| r.per_client_min).min().unwrap_or(0),
        per_client_max: reports.iter().map(|r| r.per_client_max).max().unwrap_or(0),
        latency_us: Percentiles::of(&hist),
        cpu,
        series,
        cdf: latency::cdf_points(&hist, 200),
    })
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Baseline => "baseline",
        Mode::Unbatched => "rim unbatched",
        Mode::Batched => "rim batched",
        Mode::Adaptive => "rim adaptive",
        Mode::FullBatches => "rim full batches",
    }
}

fn plot(r: &Report) -> String {
    let modes: Vec<Mode> = r.args.modes.clone();
    // Deliveries/s over the run, steps laid end to end per mode.
    let over_time = modes
        .iter()
        .map(|&mode| {
            let mut offset = 0.0;
            let mut points = Vec::new();
            for s in r.steps.iter().filter(|s| s.mode == mode) {
                points.extend(s.series.iter().map(|&(t, v)| (offset + t, v)));
                offset += s.window_secs + 1.0;
            }
            Series {
                label: mode_name(mode).into(),
                points,
            }
        })
        .collect();
    let per_cpu = modes
        .iter()
        .map(|&mode| Series {
            label: mode_name(mode).into(),
            points: r
                .steps
                .iter()
                .filter(|s| s.mode == mode)
                .map(|s| (s.rate, s.deliveries_per_server_cpu_sec))
                .collect(),
        })
        .collect();
    let top_rate = r.args.rates.iter().copied().fold(0.0, f64::max);
    let cdfs = r
        .steps
        .iter()
        .filter(|s| s.rate == top_rate)
        .map(|s| Series {
            label: format!("{} {}/s", mode_name(s.mode), s.rate),
            points: s.cdf.clone(),
        })
        .collect();
    let title = format!(
        "room of {} members over {} server(s)",
        r.args.members, r.servers
    );
    render(&[
        Chart {
            title: format!("{title}: deliveries/s, each mode's rate steps end to end"),
            x_label: "seconds".into(),
            y_label: "deliveries/s".into(),
            log_x: false,
            series: over_time,
        },
        Chart {
            title: format!("{title}: deliveries per server CPU-second"),
            x_label: "messages/s".into(),
            y_label: "deliveries / CPU-second".into(),
            log_x: false,
            series: per_cpu,
        },
        Chart {
            title: format!("{title}: latency CDF at {top_rate} messages/s"),
            x_label: "latency, ms (log)".into(),
            y_label: "% of deliveries".into(),
            log_x: true,
            series: cdfs,
        },
    ])
}

fn print_report(r: &Report) {
    println!(
        "rim-bench fanout: room of {} members, {} server process(es) per kind, {} client process(es)",
        r.args.members, r.servers, r.client_processes
    );
    println!("  command: {}", r.command);
    println!(
        "  {:<17} {:>8} {:>9} {:>12} {:>12} {:>9} {:>14} {:>9} {:>9} {:>8} {:>8}",
        "mode",
        "msg/s",
        "sent",
        "deliveries",
        "missing",
        "srv CPU",
        "deliv/CPU-s",
        "p50",
        "p99",
        "skipped",
        "lost"
    );
    for s in &r.steps {
        println!(
            "  {:<17} {:>8} {:>9} {:>12} {:>12} {:>8.2}s {:>14.0} {:>9} {:>9} {:>8} {:>8}",
            mode_name(s.mode),
            s.rate,
            s.messages_sent,
            s.deliveries,
            s.deliveries_missing,
            s.server_cpu_seconds,
            s.deliveries_per_server_cpu_sec,
            human(s.latency_us.p50),
            human(s.latency_us.p99),
            s.messages_skipped,
            s.lost_clients
        );
    }
    for ratio in &r.ratios {
        let f = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{:.0}%", v * 100.0));
        println!(
            "  at {}/s: unbatched = {} of the baseline, batched = {}, adaptive = {}, full batches = {}",
            ratio.rate,
            f(ratio.unbatched_vs_baseline),
            f(ratio.batched_vs_baseline),
            f(ratio.adaptive_vs_baseline),
            f(ratio.full_batches_vs_baseline)
        );
    }
    println!(
        "  load average: {:?} at start, {:?} at end",
        r.load_average_start, r.load_average_end
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_adaptive_rule_is_the_jobs() {
        assert!(flush_now(true, 1, 20, 0), "alone, at once, when idle");
        assert!(!flush_now(true, 1, 20, 1), "gathers while one is in flight");
        assert!(flush_now(true, 20, 20, 2), "a full batch goes at once");
        assert!(!flush_now(true, 0, 20, 0), "nothing to send");
        assert!(!flush_now(false, 1, 20, 0), "the fixed rule waits");
        assert!(flush_now(false, 20, 20, 0));
    }

    /// A batch is answered once every server answered it, or skipped it.
    #[test]
    fn a_batch_is_answered_by_the_last_server() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        // Three servers, one of which skipped it: 3 + 1 - 1 answers left
        // once the sender has counted.
        let answer = Answer {
            remaining: AtomicUsize::new(4),
            tx,
        };
        answer.done(1);
        answer.done(2);
        assert!(rx.try_recv().is_err(), "one server still working");
        answer.done(1);
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err(), "told once");
    }
}
