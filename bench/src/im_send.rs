//! `rim-bench im-send`: 1:1 chat throughput and latency of `rim standalone`
//! (SQLite store, `synchronous` FULL), beside a raw SQLite program writing
//! the same rows, in the same run.
//!
//! C pairs of users: each sender connection sends SEND (op 18) to its own
//! recipient, whose device accepts MSG (21) and NOTIFY (27) and ACKs what it
//! got every 100 ms. For each offered rate R (msg/s in all, `--rates`),
//! every sender paces R/C sends per second, open loop (it does not wait for
//! replies; senders are phase-shifted so the sends spread over time), for
//! `warmup + duration` seconds; only sends of the measured window count.
//! Each body starts with `"<rate step> <send nanos> <measured>"`
//! (CLOCK_REALTIME): the sender records SEND → SEND_REPLY, the recipient
//! SEND → MSG. A sender with `--max-in-flight` sends unanswered skips the
//! next send and counts it. After the last send, replies and MSGs still on
//! their way are waited for (`--drain`). The achieved rate is OK replies ÷
//! (last OK reply − start of the measured window). CPU comes from
//! `/proc/<pid>/stat` of rim and of rim-bench over the measured window, and
//! the store's commits (fsyncs) from rim's `/metrics`.
//!
//! Then rim is stopped and the raw baseline (`im_raw`) writes
//! `--raw-messages` messages over as many conversations into a fresh SQLite
//! file beside rim's, in `--raw-batch` transactions: rim's best sustained
//! rate is reported as a share of it.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, ensure};
use futures::StreamExt;
use rim_client::Client;
use rim_proto::im::{Body, Msg, SendReply, SendRequest};
use rim_proto::{Frame, Op};
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

use crate::cluster::{self, Cluster};
use crate::im_device::{self, Machine, Standalone, now_nanos};
use crate::im_raw;
use crate::latency::{Percentiles, Recorder, cdf_points, human};
use crate::options::Output;
use crate::pacing::{Pacer, parse_rate};
use crate::procstat::{self, CpuUse, Snapshot, Watched};

/// Largest offered rate, msg/s.
const MAX_RATE: f64 = 100_000.0;
/// Latency shards.
const SHARDS: usize = 16;
/// Devices connecting at once.
const CONNECT_CONCURRENCY: usize = 32;
/// How often a recipient ACKs what it got.
const ACK_EVERY: Duration = Duration::from_millis(100);
/// How often an idle-ish connection heartbeats (well inside the server's
/// limit).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(60);
/// First user id; pair i is users BASE+2i (sender) and BASE+2i+1.
const MID_BASE: i64 = 100_000;

/// Options of `rim-bench im-send`.
#[derive(Clone, Debug, clap::Args, Serialize)]
pub struct Args {
    #[command(flatten)]
    #[serde(flatten)]
    pub standalone: Standalone,
    /// Sender/recipient pairs (each pair is one 1:1 conversation and two
    /// connections).
    #[arg(long, default_value_t = 200,
          value_parser = clap::value_parser!(u32).range(1..=5_000))]
    pub pairs: u32,
    /// Offered rates, msg/s in all, comma-separated; measured in this order.
    #[arg(long, default_value = "500,1000,2000,3000,4000,6000", value_delimiter = ',',
          value_parser = |s: &str| parse_rate(s, MAX_RATE))]
    pub rates: Vec<f64>,
    /// Measured seconds per rate, after the warmup.
    #[arg(long, default_value_t = 15,
          value_parser = clap::value_parser!(u64).range(1..=600))]
    pub duration: u64,
    /// Seconds of sends before measuring, per rate (stored, not counted).
    #[arg(long, default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(0..=120))]
    pub warmup: u64,
    /// Seconds to wait after the last send for replies and MSGs.
    #[arg(long, default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=120))]
    pub drain: u64,
    /// Unanswered sends per sender at most; beyond, a send is skipped and
    /// counted.
    #[arg(long, default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_in_flight: u32,
    /// Message body length in bytes.
    #[arg(long, default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(48..=4000))]
    pub body_bytes: u64,
    /// A rate is sustained when the achieved rate is at least 95 % of it,
    /// nothing is refused, skipped or lost, every MSG arrives, and p99
    /// SEND → SEND_REPLY is at most this many ms.
    #[arg(long, default_value_t = 100.0)]
    pub sustained_p99_ms: f64,
    /// Messages the raw baseline writes (0: no baseline).
    #[arg(long, default_value_t = 200_000,
          value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    pub raw_messages: u64,
    /// Messages per raw transaction, comma-separated: one baseline each,
    /// the first is the one rim is compared with (rim's `im.max_batch`
    /// default is 256; 1 shows what one fsync per message allows).
    #[arg(long, default_value = "256,1", value_delimiter = ',',
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub raw_batch: Vec<u64>,
    /// Seconds each raw baseline may run at most.
    #[arg(long, default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub raw_max_secs: u64,
    #[command(flatten)]
    #[serde(flatten)]
    pub output: Output,
}

/// Counters and histograms of one offered rate (measured sends only,
/// unless named `all_`).
struct StepStats {
    all_sent: AtomicU64,
    all_replies: AtomicU64,
    all_msgs: AtomicU64,
    sent: AtomicU64,
    ok: AtomicU64,
    /// Refusals by code (index = code, 6 = any other).
    refused: [AtomicU64; 7],
    skipped: AtomicU64,
    missing_replies: AtomicU64,
    lost_senders: AtomicU64,
    msgs: AtomicU64,
    last_ok_nanos: AtomicU64,
    /// SEND → SEND_REPLY.
    reply: Recorder,
    /// SEND → MSG at the recipient.
    msg: Recorder,
}

impl StepStats {
    fn new() -> StepStats {
        StepStats {
            all_sent: AtomicU64::new(0),
            all_replies: AtomicU64::new(0),
            all_msgs: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            ok: AtomicU64::new(0),
            refused: Default::default(),
            skipped: AtomicU64::new(0),
            missing_replies: AtomicU64::new(0),
            lost_senders: AtomicU64::new(0),
            msgs: AtomicU64::new(0),
            last_ok_nanos: AtomicU64::new(0),
            reply: Recorder::new(SHARDS),
            msg: Recorder::new(SHARDS),
        }
    }
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Parses a body `"<step> <nanos> <measured 0|1> ..."`.
fn parse_body(body: &str) -> Option<(usize, u64, bool)> {
    let mut words = body.split_ascii_whitespace();
    let step = words.next()?.parse().ok()?;
    let nanos = words.next()?.parse().ok()?;
    let measured = match words.next()? {
        "1" => true,
        "0" => false,
        _ => return None,
    };
    Some((step, nanos, measured))
}

fn body(step: usize, nanos: u64, measured: bool, len: usize) -> String {
    let mut body = format!("{step} {nanos} {} ", u8::from(measured));
    while body.len() < len {
        body.push('x');
    }
    body
}

/// Figures of one offered rate.
#[derive(Debug, Serialize)]
struct StepReport {
    offered_rate: f64,
    measured_secs: f64,
    planned: u64,
    sent: u64,
    ok: u64,
    refused_by_code: BTreeMap<String, u64>,
    skipped: u64,
    missing_replies: u64,
    lost_senders: u64,
    achieved_msgs_per_sec: f64,
    msgs_received: u64,
    msgs_missing: u64,
    sustained: bool,
    send_reply_us: Percentiles,
    send_msg_us: Percentiles,
    cpu: Vec<CpuUse>,
    rim_cpu_us_per_msg: Option<f64>,
    store_commits: Option<u64>,
    /// Bytes rim wrote to storage in the measured window (`/proc/<pid>/io`).
    rim_write_bytes: Option<u64>,
    rim_write_bytes_per_msg: Option<f64>,
    commits_per_sec: Option<f64>,
    msgs_per_commit: Option<f64>,
    /// (ms, % at or below).
    send_reply_cdf: Vec<(f64, f64)>,
    send_msg_cdf: Vec<(f64, f64)>,
}

/// The goals of issue #13 and how this run did.
#[derive(Debug, Serialize)]
struct Summary {
    raw_msgs_per_sec: Option<f64>,
    max_sustained_offered: Option<f64>,
    max_sustained_achieved: Option<f64>,
    sustained_pct_of_raw: Option<f64>,
    goal_pct_of_raw: f64,
    best_achieved: f64,
    best_achieved_pct_of_raw: Option<f64>,
    p99_send_reply_ms_at_4000: Option<f64>,
    goal_p99_ms_at_4000: f64,
}

/// Everything the run reports (also the JSON).
#[derive(Debug, Serialize)]
struct Report {
    command: String,
    started_unix_secs: u64,
    machine: Machine,
    args: Args,
    rim_pid: u32,
    sqlite_path: String,
    sqlite_bytes: u64,
    steps: Vec<StepReport>,
    /// One per `--raw-batch`; rim is compared with the first.
    raw: Vec<im_raw::Outcome>,
    summary: Summary,
}

/// Runs the benchmark.
pub async fn run(args: Args) -> anyhow::Result<()> {
    ensure!(!args.rates.is_empty(), "--rates: give at least one rate");
    let started_unix_secs = now_nanos() / 1_000_000_000;
    let machine = Machine::now();
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    // reqwest (rim's /metrics) needs a TLS provider even for plain HTTP.
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let log_dir = args
        .standalone
        .log_dir
        .clone()
        .unwrap_or_else(cluster::default_log_dir);
    let sqlite_path = log_dir.join("im.sqlite3");
    ensure!(
        !sqlite_path.exists(),
        "{} already holds a run's files: give a fresh --log-dir",
        log_dir.display()
    );
    eprintln!(
        "starting rim standalone, logs and SQLite in {}",
        log_dir.display()
    );
    let cluster =
        Cluster::standalone(&args.standalone.rim, args.standalone.port_base, &log_dir).await?;
    let rim_pid = cluster.logic_pid;
    let tcp = cluster.comets[0].tcp;
    let api = SocketAddr::from(([127, 0, 0, 1], args.standalone.port_base + 1));
    let outcome = measure(&args, tcp, api, rim_pid).await;
    cluster.stop().await;
    let steps = outcome?;
    let sqlite_bytes = im_raw::file_bytes(&sqlite_path);

    let mut raw = Vec::new();
    for &batch in args.raw_batch.iter().filter(|_| args.raw_messages > 0) {
        let path = log_dir.join(format!("raw-{batch}.sqlite3"));
        eprintln!(
            "raw baseline: {} messages over {} conversations, {batch} per commit, into {}",
            args.raw_messages,
            args.pairs,
            path.display()
        );
        let plan = im_raw::Plan {
            pairs: (0..i64::from(args.pairs))
                .map(|i| (MID_BASE + 2 * i, MID_BASE + 2 * i + 1))
                .collect(),
            messages: args.raw_messages,
            batch,
            body_bytes: usize::try_from(args.body_bytes).unwrap_or(100),
            full_sync: true,
            max_secs: args.raw_max_secs as f64,
        };
        let outcome = tokio::task::spawn_blocking(move || {
            let mut last = std::time::Instant::now();
            im_raw::write(&path, &plan, |n| {
                if last.elapsed() >= Duration::from_secs(1) {
                    last = std::time::Instant::now();
                    eprintln!("  raw: {n} messages");
                }
            })
        })
        .await
        .context("raw baseline task")??;
        eprintln!(
            "  raw: {} messages in {:.1}s = {:.0} msg/s, {:.0} rows/s, {:.0} commits/s",
            outcome.messages,
            outcome.secs,
            outcome.msgs_per_sec,
            outcome.rows_per_sec,
            outcome.commits_per_sec
        );
        raw.push(outcome);
    }

    let summary = summarize(&steps, raw.first());
    let report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        started_unix_secs,
        machine,
        args: args.clone(),
        rim_pid,
        sqlite_path: sqlite_path.display().to_string(),
        sqlite_bytes,
        steps,
        raw,
        summary,
    };
    print_report(&report);
    if let Some(path) = &args.output.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.output.svg {
        std::fs::write(path, plot(&report))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn summarize(steps: &[StepReport], raw: Option<&im_raw::Outcome>) -> Summary {
    let raw_rate = raw.map(|r| r.msgs_per_sec).filter(|r| *r > 0.0);
    let best = steps
        .iter()
        .filter(|s| s.sustained)
        .max_by(|a, b| a.offered_rate.total_cmp(&b.offered_rate));
    let best_achieved = steps
        .iter()
        .map(|s| s.achieved_msgs_per_sec)
        .fold(0.0, f64::max);
    let pct = |v: f64| raw_rate.map(|r| v * 100.0 / r);
    Summary {
        raw_msgs_per_sec: raw_rate,
        max_sustained_offered: best.map(|s| s.offered_rate),
        max_sustained_achieved: best.map(|s| s.achieved_msgs_per_sec),
        sustained_pct_of_raw: best.and_then(|s| pct(s.achieved_msgs_per_sec)),
        goal_pct_of_raw: 50.0,
        best_achieved,
        best_achieved_pct_of_raw: pct(best_achieved),
        p99_send_reply_ms_at_4000: steps
            .iter()
            .find(|s| (s.offered_rate - 4000.0).abs() < 0.5)
            .map(|s| s.send_reply_us.p99 as f64 / 1e3),
        goal_p99_ms_at_4000: 20.0,
    }
}

/// Connects the pairs, runs every rate, and returns their figures.
async fn measure(
    args: &Args,
    tcp: SocketAddr,
    api: SocketAddr,
    rim_pid: u32,
) -> anyhow::Result<Vec<StepReport>> {
    let pairs = i64::from(args.pairs);
    eprintln!("connecting {pairs} pairs of chat devices...");
    let connect = |mid: i64| im_device::device(tcp, mid, format!("d{mid}"));
    let recipients: Vec<Client> = futures::stream::iter(0..pairs)
        .map(|i| connect(MID_BASE + 2 * i + 1))
        .buffered(CONNECT_CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let mut senders: Vec<Option<Client>> = futures::stream::iter(0..pairs)
        .map(|i| connect(MID_BASE + 2 * i))
        .buffered(CONNECT_CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .map(|c| c.map(Some))
        .collect::<anyhow::Result<_>>()?;

    let steps: Arc<Vec<Arc<StepStats>>> = Arc::new(
        args.rates
            .iter()
            .map(|_| Arc::new(StepStats::new()))
            .collect(),
    );
    let step_secs = args.warmup + args.duration + args.drain;
    let run_deadline =
        Instant::now() + Duration::from_secs((step_secs + 30) * args.rates.len() as u64 + 60);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut receivers = tokio::task::JoinSet::new();
    for (i, client) in recipients.into_iter().enumerate() {
        receivers.spawn(recipient(
            client,
            i,
            Arc::clone(&steps),
            stop_rx.clone(),
            run_deadline,
        ));
    }

    let http = reqwest::Client::new();
    let watched = [
        Watched {
            name: "rim".into(),
            pid: rim_pid,
        },
        Watched {
            name: "rim-bench".into(),
            pid: std::process::id(),
        },
    ];
    let mut reports = Vec::new();
    for (index, &rate) in args.rates.iter().enumerate() {
        let stats = Arc::clone(&steps[index]);
        eprintln!(
            "rate {rate} msg/s: {}s warmup, {}s measured",
            args.warmup, args.duration
        );
        let start = Instant::now() + Duration::from_millis(200);
        let mut tasks = tokio::task::JoinSet::new();
        for (i, slot) in senders.iter_mut().enumerate() {
            if let Some(client) = slot.take() {
                tasks.spawn(sender(
                    client,
                    Plan {
                        index,
                        sender: i,
                        senders: args.pairs as usize,
                        rate,
                        warmup: args.warmup,
                        duration: args.duration,
                        drain: args.drain,
                        max_in_flight: args.max_in_flight as usize,
                        body_bytes: usize::try_from(args.body_bytes).unwrap_or(100),
                        start,
                    },
                    Arc::clone(&stats),
                ));
            }
        }
        let (progress_stop_tx, progress_stop_rx) = watch::channel(false);
        let progress = tokio::spawn(progress(
            Arc::clone(&stats),
            progress_stop_rx,
            start + Duration::from_secs(step_secs + 30),
        ));
        // The measured window: CPU and commits at its ends.
        let window_start = start + Duration::from_secs(args.warmup);
        let window_start_nanos =
            now_nanos() + u64::try_from((window_start - Instant::now()).as_nanos()).unwrap_or(0);
        tokio::time::sleep_until(window_start).await;
        let cpu_before = Snapshot::take(&watched);
        let commits_before = im_device::store_commits(&http, api).await;
        let written_before = procstat::write_bytes(rim_pid);
        tokio::time::sleep_until(window_start + Duration::from_secs(args.duration)).await;
        let cpu = cpu_before.used_until(&Snapshot::take(&watched), args.duration as f64);
        let commits_after = im_device::store_commits(&http, api).await;
        let written = procstat::write_bytes(rim_pid)
            .zip(written_before)
            .map(|(after, before)| after.saturating_sub(before));
        while let Some(joined) = tasks.join_next().await {
            if let Ok((i, Some(client))) = joined {
                senders[i] = Some(client);
            }
        }
        // MSGs still on their way after the last reply get a moment.
        let msg_wait = Instant::now() + Duration::from_secs(args.drain);
        while get(&stats.msgs) < get(&stats.ok) && Instant::now() < msg_wait {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = progress_stop_tx.send(true);
        let _ = progress.await;
        let report = step_report(
            &stats,
            rate,
            args,
            window_start_nanos,
            cpu,
            commits_before.zip(commits_after).map(|(a, b)| b - a),
            written,
        );
        eprintln!(
            "  => {:.0} msg/s achieved of {rate}, SEND→SEND_REPLY p50 {} p99 {}, SEND→MSG p50 {} p99 {}{}",
            report.achieved_msgs_per_sec,
            human(report.send_reply_us.p50),
            human(report.send_reply_us.p99),
            human(report.send_msg_us.p50),
            human(report.send_msg_us.p99),
            if report.sustained {
                ""
            } else {
                "  (not sustained)"
            }
        );
        reports.push(report);
        if senders.iter().all(Option::is_none) {
            eprintln!("every sender lost its connection: stopping");
            break;
        }
    }
    let _ = stop_tx.send(true);
    while receivers.join_next().await.is_some() {}
    Ok(reports)
}

fn step_report(
    s: &StepStats,
    rate: f64,
    args: &Args,
    window_start_nanos: u64,
    cpu: Vec<CpuUse>,
    commits: Option<u64>,
    written: Option<u64>,
) -> StepReport {
    let reply = s.reply.total();
    let msg = s.msg.total();
    let ok = get(&s.ok);
    let duration = args.duration as f64;
    let last = get(&s.last_ok_nanos);
    let secs = if last > window_start_nanos {
        ((last - window_start_nanos) as f64 / 1e9).max(duration)
    } else {
        duration
    };
    let achieved = ok as f64 / secs;
    let refused_by_code: BTreeMap<String, u64> = s
        .refused
        .iter()
        .enumerate()
        .filter(|(_, c)| get(c) > 0)
        .map(|(code, c)| {
            let name = if code == 6 {
                "other".to_owned()
            } else {
                code.to_string()
            };
            (name, get(c))
        })
        .collect();
    let refused: u64 = refused_by_code.values().sum();
    let send_reply_us = Percentiles::of(&reply);
    let (skipped, missing_replies, lost) = (
        get(&s.skipped),
        get(&s.missing_replies),
        get(&s.lost_senders),
    );
    let msgs = get(&s.msgs);
    let sustained = achieved >= 0.95 * rate
        && refused + skipped + missing_replies + lost == 0
        && msgs >= ok
        && send_reply_us.p99 as f64 <= args.sustained_p99_ms * 1e3;
    let rim_cpu = cpu.iter().find(|c| c.name == "rim").map(|c| c.cpu_seconds);
    StepReport {
        offered_rate: rate,
        measured_secs: secs,
        planned: Pacer::planned_for(rate, duration),
        sent: get(&s.sent),
        ok,
        refused_by_code,
        skipped,
        missing_replies,
        lost_senders: lost,
        achieved_msgs_per_sec: achieved,
        msgs_received: msgs,
        msgs_missing: ok.saturating_sub(msgs),
        sustained,
        send_reply_us,
        send_msg_us: Percentiles::of(&msg),
        rim_cpu_us_per_msg: rim_cpu
            .filter(|_| ok > 0)
            .map(|c| c * 1e6 / (achieved * duration).max(1.0)),
        cpu,
        store_commits: commits,
        rim_write_bytes: written,
        rim_write_bytes_per_msg: written
            .filter(|_| ok > 0)
            .map(|w| w as f64 / (achieved * duration).max(1.0)),
        commits_per_sec: commits.map(|c| c as f64 / duration),
        msgs_per_commit: commits
            .filter(|c| *c > 0)
            .map(|c| achieved * duration / c as f64),
        send_reply_cdf: cdf_points(&reply, 200),
        send_msg_cdf: cdf_points(&msg, 200),
    }
}

/// What one sender does at one rate.
#[derive(Clone, Copy, Debug)]
struct Plan {
    index: usize,
    sender: usize,
    senders: usize,
    rate: f64,
    warmup: u64,
    duration: u64,
    drain: u64,
    max_in_flight: usize,
    body_bytes: usize,
    start: Instant,
}

enum Event {
    Frame(rim_client::Result<Option<Frame>>),
    Tick,
    Heartbeat,
    Done,
}

/// Sends this sender's share of the rate, records its replies, and hands
/// the connection back (`None` when it was lost).
async fn sender(mut client: Client, p: Plan, stats: Arc<StepStats>) -> (usize, Option<Client>) {
    let rate = p.rate / p.senders as f64;
    let planned = Pacer::planned_for(rate, (p.warmup + p.duration) as f64);
    let warm = Pacer::planned_for(rate, p.warmup as f64);
    let pacer = Pacer::new(rate, planned);
    // Phase shift: sender i starts i/C of a send interval late.
    let offset = (p.sender as f64 / p.senders as f64) * (1.0 / rate).min(1.0);
    let began = p.start + Duration::from_secs_f64(offset);
    tokio::time::sleep_until(began).await;
    let mut tick = tokio::time::interval(pacer.tick());
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut heartbeat = tokio::time::interval_at(began + HEARTBEAT_EVERY, HEARTBEAT_EVERY);
    let hard_stop = began + Duration::from_secs(p.warmup + p.duration + p.drain + 5);
    let mut drain_until = hard_stop;
    let mut in_flight: HashMap<i32, (u64, bool)> = HashMap::new();
    let mut n = 0u64;
    loop {
        if n >= planned && in_flight.is_empty() {
            break;
        }
        let event = tokio::select! {
            biased;
            frame = client.next_frame() => Event::Frame(frame),
            _ = tick.tick(), if n < planned => Event::Tick,
            _ = heartbeat.tick() => Event::Heartbeat,
            () = tokio::time::sleep_until(drain_until) => Event::Done,
        };
        match event {
            Event::Tick => {
                let due = pacer.due(began.elapsed().as_secs_f64());
                while n < due {
                    let measured = n >= warm;
                    n += 1;
                    add(&stats.all_sent, 1);
                    if measured {
                        add(&stats.sent, 1);
                    }
                    if in_flight.len() >= p.max_in_flight {
                        if measured {
                            add(&stats.skipped, 1);
                        }
                        continue;
                    }
                    let nanos = now_nanos();
                    let req = SendRequest {
                        cmid: format!("{}-{n}", p.index),
                        to: Some(MID_BASE + 2 * p.sender as i64 + 1),
                        body: body(p.index, nanos, measured, p.body_bytes),
                        ..SendRequest::default()
                    };
                    match client.send_im(&req).await {
                        Ok(seq) => {
                            in_flight.insert(seq, (nanos, measured));
                        }
                        Err(_) => {
                            add(&stats.lost_senders, 1);
                            return (p.sender, None);
                        }
                    }
                }
                if n >= planned {
                    drain_until = Instant::now() + Duration::from_secs(p.drain);
                }
            }
            Event::Frame(Ok(Some(frame))) => {
                if frame.op != Op::IM_SEND_REPLY {
                    continue;
                }
                let Some((sent, measured)) = in_flight.remove(&frame.seq) else {
                    continue;
                };
                add(&stats.all_replies, 1);
                if !measured {
                    continue;
                }
                let now = now_nanos();
                match SendReply::decode(&frame.body) {
                    Ok(reply) if reply.code.0 == 0 => {
                        add(&stats.ok, 1);
                        stats.last_ok_nanos.fetch_max(now, Ordering::Relaxed);
                        stats
                            .reply
                            .record(p.sender, now.saturating_sub(sent) / 1_000, true);
                    }
                    Ok(reply) => {
                        let code = usize::try_from(reply.code.0).unwrap_or(6).min(6);
                        add(&stats.refused[code], 1);
                    }
                    Err(_) => add(&stats.refused[6], 1),
                }
            }
            Event::Frame(_) => {
                add(&stats.lost_senders, 1);
                return (p.sender, None);
            }
            Event::Heartbeat => {
                if client
                    .send(Frame::new(Op::HEARTBEAT, 0, bytes::Bytes::new()))
                    .await
                    .is_err()
                {
                    add(&stats.lost_senders, 1);
                    return (p.sender, None);
                }
            }
            Event::Done => break,
        }
    }
    let missing = in_flight.values().filter(|(_, measured)| *measured).count();
    add(&stats.missing_replies, missing as u64);
    (p.sender, Some(client))
}

/// A recipient device: records SEND → MSG of every rate's MSGs, ACKs what
/// it got, until told to stop or the run's deadline.
async fn recipient(
    mut client: Client,
    who: usize,
    steps: Arc<Vec<Arc<StepStats>>>,
    mut stop: watch::Receiver<bool>,
    deadline: Instant,
) {
    let mut ack = tokio::time::interval(ACK_EVERY);
    let mut heartbeat = tokio::time::interval_at(Instant::now() + HEARTBEAT_EVERY, HEARTBEAT_EVERY);
    let (mut seen, mut acked) = (0u64, 0u64);
    loop {
        let event = tokio::select! {
            biased;
            _ = stop.changed() => Event::Done,
            frame = client.next_frame() => Event::Frame(frame),
            _ = ack.tick() => Event::Tick,
            _ = heartbeat.tick() => Event::Heartbeat,
            () = tokio::time::sleep_until(deadline) => Event::Done,
        };
        match event {
            Event::Frame(Ok(Some(frame))) => {
                if frame.op != Op::IM_MSG {
                    continue;
                }
                let now = now_nanos();
                let Ok(msg) = Msg::decode(&frame.body) else {
                    continue;
                };
                seen = seen.max(msg.sync.unwrap_or(0));
                let Some((step, sent, measured)) = parse_body(&msg.body) else {
                    continue;
                };
                if let Some(stats) = steps.get(step) {
                    add(&stats.all_msgs, 1);
                    if measured {
                        add(&stats.msgs, 1);
                        stats
                            .msg
                            .record(who, now.saturating_sub(sent) / 1_000, true);
                    }
                }
            }
            Event::Frame(_) | Event::Done => return,
            Event::Tick => {
                if seen > acked {
                    if client.ack(seen).await.is_err() {
                        return;
                    }
                    acked = seen;
                }
            }
            Event::Heartbeat => {
                if client
                    .send(Frame::new(Op::HEARTBEAT, 0, bytes::Bytes::new()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

/// A line per second: sends, replies and MSGs per second, and the
/// latencies of that second.
async fn progress(stats: Arc<StepStats>, mut stop: watch::Receiver<bool>, deadline: Instant) {
    let started = Instant::now();
    let mut tick =
        tokio::time::interval_at(started + Duration::from_secs(1), Duration::from_secs(1));
    let mut last = (0u64, 0u64, 0u64);
    while Instant::now() < deadline {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        let now = (
            get(&stats.all_sent),
            get(&stats.all_replies),
            get(&stats.all_msgs),
        );
        let reply = Percentiles::of(&stats.reply.take_interval());
        let msg = Percentiles::of(&stats.msg.take_interval());
        let errors: u64 = stats.refused.iter().map(get).sum::<u64>()
            + get(&stats.skipped)
            + get(&stats.lost_senders);
        eprintln!(
            "[{:>3.0}s] sent {:>6}/s  replies {:>6}/s  msgs {:>6}/s  reply p50 {:>7} p99 {:>7}  msg p50 {:>7} p99 {:>7}  errors {errors}",
            started.elapsed().as_secs_f64(),
            now.0 - last.0,
            now.1 - last.1,
            now.2 - last.2,
            human(reply.p50),
            human(reply.p99),
            human(msg.p50),
            human(msg.p99),
        );
        last = now;
    }
}

fn print_report(r: &Report) {
    println!(
        "rim-bench im-send: {} pairs, {} cores, load average {:?}",
        r.args.pairs, r.machine.cores, r.machine.load_average
    );
    println!("  command: {}", r.command);
    println!(
        "  {:>8} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>7}  errors",
        "offered",
        "achieved",
        "ok",
        "reply p50",
        "reply p99",
        "reply max",
        "msg p50",
        "msg p99",
        "msg max",
        "rim cpu",
        "commits/s",
        "msg/cmt"
    );
    for s in &r.steps {
        let rim_cores = s
            .cpu
            .iter()
            .find(|c| c.name == "rim")
            .map_or(0.0, |c| c.cores);
        println!(
            "  {:>8.0} {:>9.0} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8.2} {:>8.0} {:>7.1}  refused {:?} skipped {} missing replies {} missing msgs {} lost {}{}",
            s.offered_rate,
            s.achieved_msgs_per_sec,
            s.ok,
            human(s.send_reply_us.p50),
            human(s.send_reply_us.p99),
            human(s.send_reply_us.max),
            human(s.send_msg_us.p50),
            human(s.send_msg_us.p99),
            human(s.send_msg_us.max),
            rim_cores,
            s.commits_per_sec.unwrap_or(0.0),
            s.msgs_per_commit.unwrap_or(0.0),
            s.refused_by_code,
            s.skipped,
            s.missing_replies,
            s.msgs_missing,
            s.lost_senders,
            if s.sustained { "" } else { "  NOT SUSTAINED" }
        );
        for c in &s.cpu {
            println!(
                "           cpu {} (pid {}): {:.2} s = {:.2} cores",
                c.name, c.pid, c.cpu_seconds, c.cores
            );
        }
        if let Some(w) = s.rim_write_bytes {
            println!(
                "           rim wrote {:.1} MB to storage = {:.1} MB/s, {:.0} bytes per message",
                w as f64 / 1e6,
                w as f64 / 1e6 / r.args.duration as f64,
                s.rim_write_bytes_per_msg.unwrap_or(0.0)
            );
        }
    }
    for raw in &r.raw {
        println!(
            "  raw SQLite: {} msgs in {:.1}s = {:.0} msg/s ({:.0} rows/s, {:.0} commits/s of {} msgs, {:.2} cpu-s, {:.1} MB/s written, {:.0} bytes per message)",
            raw.messages,
            raw.secs,
            raw.msgs_per_sec,
            raw.rows_per_sec,
            raw.commits_per_sec,
            raw.batch,
            raw.cpu_seconds,
            raw.write_bytes.unwrap_or(0) as f64 / 1e6 / raw.secs.max(1e-9),
            raw.write_bytes.unwrap_or(0) as f64 / (raw.messages.max(1)) as f64
        );
    }
    let s = &r.summary;
    println!(
        "  max sustained: {:?} msg/s offered, {:?} achieved = {:?} % of raw (goal ≥ {} %); best achieved {:.0} = {:?} % of raw",
        s.max_sustained_offered,
        s.max_sustained_achieved.map(|v| v.round()),
        s.sustained_pct_of_raw.map(|v| (v * 10.0).round() / 10.0),
        s.goal_pct_of_raw,
        s.best_achieved,
        s.best_achieved_pct_of_raw
            .map(|v| (v * 10.0).round() / 10.0)
    );
    println!(
        "  p99 SEND→SEND_REPLY at 4,000 msg/s: {:?} ms (goal ≤ {} ms)",
        s.p99_send_reply_ms_at_4000, s.goal_p99_ms_at_4000
    );
}

fn plot(r: &Report) -> String {
    use crate::plot::{Chart, Series, render};
    let title = format!(
        "im-send: {} pairs, rim standalone (SQLite FULL)",
        r.args.pairs
    );
    let cdf = |f: fn(&StepReport) -> &Vec<(f64, f64)>| -> Vec<Series> {
        r.steps
            .iter()
            .map(|s| Series {
                label: format!("{} msg/s", s.offered_rate),
                points: f(s).clone(),
            })
            .collect()
    };
    let by_rate = |f: fn(&StepReport) -> f64| -> Vec<(f64, f64)> {
        r.steps.iter().map(|s| (s.offered_rate, f(s))).collect()
    };
    let mut throughput = vec![
        Series {
            label: "achieved".into(),
            points: by_rate(|s| s.achieved_msgs_per_sec),
        },
        Series {
            label: "offered".into(),
            points: by_rate(|s| s.offered_rate),
        },
    ];
    for raw in &r.raw {
        let xs: Vec<f64> = r.steps.iter().map(|s| s.offered_rate).collect();
        let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = xs.iter().copied().fold(0.0, f64::max);
        throughput.push(Series {
            label: format!("raw SQLite, {} per commit", raw.batch),
            points: vec![(lo, raw.msgs_per_sec), (hi, raw.msgs_per_sec)],
        });
    }
    render(&[
        Chart {
            title: format!("{title}: SEND → SEND_REPLY CDF"),
            x_label: "ms (log)".into(),
            y_label: "% of sends".into(),
            log_x: true,
            series: cdf(|s| &s.send_reply_cdf),
        },
        Chart {
            title: format!("{title}: SEND → MSG at the recipient CDF"),
            x_label: "ms (log)".into(),
            y_label: "% of messages".into(),
            log_x: true,
            series: cdf(|s| &s.send_msg_cdf),
        },
        Chart {
            title: format!("{title}: throughput"),
            x_label: "offered msg/s".into(),
            y_label: "msg/s".into(),
            log_x: false,
            series: throughput,
        },
        Chart {
            title: format!("{title}: latency by rate"),
            x_label: "offered msg/s".into(),
            y_label: "ms".into(),
            log_x: false,
            series: vec![
                Series {
                    label: "reply p50".into(),
                    points: by_rate(|s| s.send_reply_us.p50 as f64 / 1e3),
                },
                Series {
                    label: "reply p99".into(),
                    points: by_rate(|s| s.send_reply_us.p99 as f64 / 1e3),
                },
                Series {
                    label: "msg p99".into(),
                    points: by_rate(|s| s.send_msg_us.p99 as f64 / 1e3),
                },
            ],
        },
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_carry_step_time_and_window() {
        let b = body(3, 1_700_000_000_000_000_000, true, 100);
        assert_eq!(b.len(), 100);
        assert_eq!(parse_body(&b), Some((3, 1_700_000_000_000_000_000, true)));
        assert_eq!(parse_body("0 5 0"), Some((0, 5, false)));
        assert_eq!(parse_body("0 5 2"), None);
        assert_eq!(parse_body("x 5 1"), None);
        assert_eq!(parse_body(""), None);
    }
}
