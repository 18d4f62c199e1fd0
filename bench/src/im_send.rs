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
//! With `--abuser-rate R`, every rate is measured three times: without,
//! with one abusive user sending R SENDs per second on one connection
//! beside the pairs (`im_abuser`), and without again: the report gives the
//! abuser's share of code-3 replies and the pairs' p99 SEND → SEND_REPLY
//! with it against the mean of the two steps around it. The
//! standalone runs with `--send-rate-per-conn` and `--send-rate-per-user`
//! (bursts twice the rate); a cluster with its own `[im]` limits.
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

use crate::im_abuser::{self, AbuseComparison, AbuserPlan, AbuserReport, AbuserStats};
use crate::im_device::{self, Machine, Standalone, now_nanos};
use crate::im_raw;
use crate::latency::{Percentiles, Recorder, cdf_points, human};
use crate::options::Output;
use crate::pacing::{Pacer, parse_rate};
use crate::procstat::{self, CpuUse, Snapshot, TreeSnapshot, Watched};

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
    /// Run against a running cluster instead of starting a standalone: its
    /// comets' TCP client addresses, comma-separated (127.0.0.0/8 only).
    /// Pair i's sender connects to comet i mod N and its recipient to comet
    /// (i + N/2) mod N, so every MSG crosses logic → queue → job → another
    /// comet. No standalone is started and no raw baseline runs.
    #[arg(long, value_delimiter = ',')]
    pub comets: Vec<SocketAddr>,
    /// With --comets: base URLs of the logics' HTTP APIs, comma-separated
    /// (loopback only); their /metrics give the store's commits (summed).
    #[arg(long, value_delimiter = ',', requires = "comets")]
    pub api: Vec<String>,
    /// With --comets: the jobs' /metrics URLs, comma-separated (loopback
    /// only): consumer lag and the jobs' push latency per rate.
    #[arg(long, value_delimiter = ',', requires = "comets")]
    pub job_metrics: Vec<String>,
    /// Also report the CPU time over each measured window of these
    /// processes, as NAME=PID (repeatable), each counted with its direct
    /// children (give PostgreSQL's postmaster: its backends are its
    /// children). CPU per message is summed by role: the name without a
    /// short `-suffix` (comet-a1 and comet-b2 are `comet`).
    #[arg(long = "proc", value_name = "NAME=PID", value_parser = procstat::parse_watched)]
    pub procs: Vec<Watched>,
    /// One abusive user beside the pairs, sending this many SENDs per second
    /// on one connection regardless of code 3 (e.g. 10 × its limit: 200
    /// with `--send-rate-per-conn 20`); every rate is then measured without,
    /// with and again without it. 0 = no abuser.
    #[arg(long, default_value_t = 0.0, value_parser = parse_abuser_rate)]
    pub abuser_rate: f64,
    /// With `--abuser-rate`: how many steps with the abuser each rate gets,
    /// each between two without it (without, with, without, with, …,
    /// without): each step with it is compared with its two neighbours,
    /// and the report gives the median change over the rounds, so drift
    /// between windows weighs less than in a single comparison.
    #[arg(long, default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=20))]
    pub abuser_rounds: u32,
    /// The standalone's `im.send_rate_per_conn` (its burst twice that;
    /// 0 = off). The default keeps the limiter on the path but far above
    /// any pair's share; rim's own default is 20. A cluster uses its config.
    #[arg(long, default_value_t = 1000, conflicts_with = "comets",
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub send_rate_per_conn: u32,
    /// The standalone's `im.send_rate_per_user` (its burst twice that;
    /// 0 = off); rim's own default is 50.
    #[arg(long, default_value_t = 1000, conflicts_with = "comets",
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub send_rate_per_user: u32,
    #[command(flatten)]
    #[serde(flatten)]
    pub output: Output,
}

/// Parses `--abuser-rate`: 0 (none) or a rate up to `MAX_RATE`.
fn parse_abuser_rate(s: &str) -> Result<f64, String> {
    if s.trim() == "0" {
        return Ok(0.0);
    }
    parse_rate(s, MAX_RATE)
}

/// One measured step: an offered rate, with or without the abuser.
#[derive(Clone, Copy, Debug)]
struct Phase {
    rate: f64,
    abuser: bool,
}

/// The steps of a run: each rate, and with `--abuser-rate` each rate with
/// the abuser between two steps without it — consecutive identical steps
/// slow down as the store grows (docs/benchmarks.md), so the step with the
/// abuser is compared with the ones on both sides of it.
fn phases(args: &Args) -> Vec<Phase> {
    let abuser = args.abuser_rate > 0.0;
    args.rates
        .iter()
        .flat_map(|&rate| {
            let without = Phase {
                rate,
                abuser: false,
            };
            let with = Phase { rate, abuser: true };
            if abuser {
                let mut steps = vec![without];
                for _ in 0..args.abuser_rounds {
                    steps.extend([with, without]);
                }
                steps
            } else {
                vec![without]
            }
        })
        .collect()
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
    /// Whether the abusive user sent beside the pairs in this step.
    with_abuser: bool,
    /// The abuser's figures (steps with the abuser only).
    #[serde(skip_serializing_if = "Option::is_none")]
    abuser: Option<AbuserReport>,
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
    /// Cores of the whole box busy in the window (`/proc/stat`: every
    /// process on the machine, not only rim's).
    box_busy_cores: Option<f64>,
    /// Achieved msg/s ÷ the box's online cores.
    msgs_per_sec_per_box_core: f64,
    /// Achieved msg/s ÷ `box_busy_cores`.
    msgs_per_sec_per_busy_core: Option<f64>,
    /// CPU µs per message of each process in `cpu`.
    cpu_us_per_msg: BTreeMap<String, f64>,
    /// The same summed by role (`comet-a1` → `comet`).
    cpu_us_per_msg_by_role: BTreeMap<String, f64>,
    /// Σ CPU µs per message of the `--proc` processes (rim-bench left out).
    watched_cpu_us_per_msg: Option<f64>,
    /// Messages per CPU-second of the `--proc` processes: the msg/s per
    /// core the watched processes would reach if they had the cores to
    /// themselves (a shared box's other load left out).
    msgs_per_watched_cpu_second: Option<f64>,
    /// The jobs' own figures (with `--job-metrics`).
    #[serde(skip_serializing_if = "Option::is_none")]
    job: Option<JobFigures>,
    /// (ms, % at or below).
    send_reply_cdf: Vec<(f64, f64)>,
    send_msg_cdf: Vec<(f64, f64)>,
}

/// The jobs' figures of one rate, from their `/metrics`.
#[derive(Debug, Default, Serialize)]
struct JobFigures {
    /// Σ `rim_job_consumer_lag` over the jobs and partitions at the start
    /// of the window, its end, and after the drain (librdkafka refreshes it
    /// every 5 s).
    lag_at_start: Option<f64>,
    lag_at_end: Option<f64>,
    lag_after_drain: Option<f64>,
    /// Messages the jobs delivered in the window, all kinds
    /// (Δ `rim_job_push_latency_seconds_count`).
    pushes: f64,
    /// Mean of `rim_job_push_latency_seconds` over the window (queue
    /// message accepted → comets answered).
    push_latency_mean_ms: Option<f64>,
    /// Upper bound of the histogram bucket holding the window's 99th
    /// percentile of the same.
    push_latency_p99_le_ms: Option<f64>,
}

/// The cluster goals of issue #13 and how this run did.
#[derive(Debug, Serialize)]
struct ClusterSummary {
    cores: usize,
    goal_msgs_per_sec_per_core: f64,
    goal_p99_send_msg_ms: f64,
    /// Highest achieved rate of a step whose MSGs all arrived with p99
    /// SEND → MSG within the goal.
    best_within_p99_goal: Option<f64>,
    best_within_p99_goal_per_core: Option<f64>,
    best_achieved_per_core: f64,
    lowest_p99_send_msg_ms: Option<f64>,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<ClusterSummary>,
    /// With `--abuser-rate`: per rate, the abuser's code-3 share and the
    /// pairs' p99 without and with it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    abuse: Vec<AbuseComparison>,
}

/// Everything the run reports (also the JSON).
#[derive(Debug, Serialize)]
struct Report {
    command: String,
    started_unix_secs: u64,
    machine: Machine,
    args: Args,
    rim_pid: Option<u32>,
    sqlite_path: Option<String>,
    sqlite_bytes: Option<u64>,
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
    if !args.comets.is_empty() {
        return run_cluster(args, started_unix_secs, machine).await;
    }
    let per_sender = args.rates.iter().copied().fold(0.0, f64::max) / f64::from(args.pairs);
    let limit = f64::from(args.send_rate_per_conn.min(args.send_rate_per_user.max(1)));
    if args.send_rate_per_conn > 0 && per_sender > limit {
        eprintln!(
            "warning: at the highest rate each sender offers {per_sender:.1} SENDs/s, above --send-rate-per-conn / --send-rate-per-user: the pairs themselves will get code 3"
        );
    }
    let limits = [
        ("SEND_RATE_PER_CONN", args.send_rate_per_conn),
        (
            "SEND_BURST_PER_CONN",
            args.send_rate_per_conn.saturating_mul(2),
        ),
        ("SEND_RATE_PER_USER", args.send_rate_per_user),
        (
            "SEND_BURST_PER_USER",
            args.send_rate_per_user.saturating_mul(2),
        ),
    ]
    .map(|(key, value)| (format!("RIM_IM__{key}"), value.to_string()));
    let (log_dir, cluster) = args.standalone.start_fresh_with(&limits).await?;
    let sqlite_path = log_dir.join("im.sqlite3");
    let rim_pid = cluster.logic_pid;
    let tcp = cluster.comets[0].tcp;
    let api = SocketAddr::from(([127, 0, 0, 1], args.standalone.port_base + 1));
    let mut plain = vec![Watched {
        name: "rim".into(),
        pid: rim_pid,
    }];
    plain.push(Watched {
        name: "rim-bench".into(),
        pid: std::process::id(),
    });
    let target = Target {
        comets: vec![tcp],
        commit_metrics: vec![format!("http://{api}/metrics")],
        job_metrics: Vec::new(),
        plain,
        writer_pid: Some(rim_pid),
        cmid_prefix: None,
        cluster: false,
    };
    let outcome = measure(&args, &target).await;
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
        let outcome = im_raw::write_reporting(path, plan, "raw:").await?;
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

    let summary = summarize(&steps, raw.first(), None);
    let report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        started_unix_secs,
        machine,
        args: args.clone(),
        rim_pid: Some(rim_pid),
        sqlite_path: Some(sqlite_path.display().to_string()),
        sqlite_bytes: Some(sqlite_bytes),
        steps,
        raw,
        summary,
    };
    finish(&report, &args)
}

/// `--comets`: runs every rate against a running cluster.
async fn run_cluster(args: Args, started_unix_secs: u64, machine: Machine) -> anyhow::Result<()> {
    for comet in &args.comets {
        ensure!(
            comet.ip().is_loopback(),
            "--comets {comet}: load goes to 127.0.0.0/8 only"
        );
    }
    let loopback_url = |flag: &str, url: &str| -> anyhow::Result<String> {
        let parsed = reqwest::Url::parse(url).with_context(|| format!("{flag} {url}"))?;
        ensure!(
            crate::addrs::is_loopback_url(&parsed),
            "{flag} {url}: 127.0.0.0/8 (or localhost) only"
        );
        Ok(url.trim_end_matches('/').to_owned())
    };
    let commit_metrics = args
        .api
        .iter()
        .map(|api| Ok(format!("{}/metrics", loopback_url("--api", api)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let job_metrics = args
        .job_metrics
        .iter()
        .map(|url| loopback_url("--job-metrics", url))
        .collect::<anyhow::Result<Vec<_>>>()?;
    eprintln!(
        "cluster: {} comets, {} logic /metrics, {} job /metrics, {} watched processes",
        args.comets.len(),
        commit_metrics.len(),
        job_metrics.len(),
        args.procs.len()
    );
    let target = Target {
        comets: args.comets.clone(),
        commit_metrics,
        job_metrics,
        plain: vec![Watched {
            name: "rim-bench".into(),
            pid: std::process::id(),
        }],
        writer_pid: None,
        cmid_prefix: Some(started_unix_secs),
        cluster: true,
    };
    let steps = measure(&args, &target).await?;
    let summary = summarize(&steps, None, Some(machine.cores));
    let report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        started_unix_secs,
        machine,
        args: args.clone(),
        rim_pid: None,
        sqlite_path: None,
        sqlite_bytes: None,
        steps,
        raw: Vec::new(),
        summary,
    };
    finish(&report, &args)
}

/// The abuser's figures of a step, as one line (steps with the abuser).
fn abuser_line(s: &StepReport) -> Option<String> {
    let a = s.abuser.as_ref()?;
    Some(format!(
        "   with the abuser: it sent {} at {:.0} msg/s: {} ok, {} code 3 ({:.1} %), {} other refusals, {} skipped, {} unanswered; longest retry_ms {}",
        a.sent,
        a.rate,
        a.ok,
        a.limited,
        a.limited_pct,
        a.other_refused,
        a.skipped,
        a.missing_replies,
        a.retry_ms_max
    ))
}

/// Prints the report and writes its JSON and SVG where asked.
fn finish(report: &Report, args: &Args) -> anyhow::Result<()> {
    print_report(report);
    if let Some(path) = &args.output.json {
        std::fs::write(path, serde_json::to_string_pretty(report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.output.svg {
        std::fs::write(path, plot(report))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn summarize(
    steps: &[StepReport],
    raw: Option<&im_raw::Outcome>,
    cluster_cores: Option<usize>,
) -> Summary {
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
        cluster: cluster_cores.map(|cores| cluster_summary(steps, cores, best_achieved)),
        abuse: abuse_comparisons(steps),
    }
}

/// Compares each step with the abuser with its neighbours of the same rate
/// without it (the step before and the step after: their mean p99).
fn abuse_comparisons(steps: &[StepReport]) -> Vec<AbuseComparison> {
    steps
        .iter()
        .enumerate()
        .filter_map(|(at, with)| {
            let abuser = with.abuser.as_ref()?;
            let p99 = |s: &StepReport| s.send_reply_us.p99 as f64 / 1e3;
            let neighbour = |s: &&StepReport| !s.with_abuser && s.offered_rate == with.offered_rate;
            let withouts: Vec<f64> = steps[..at]
                .iter()
                .rev()
                .find(neighbour)
                .into_iter()
                .chain(steps[at + 1..].iter().find(neighbour))
                .map(p99)
                .collect();
            if withouts.is_empty() {
                return None;
            }
            let before = withouts.iter().sum::<f64>() / withouts.len() as f64;
            let after = p99(with);
            Some(AbuseComparison {
                offered_rate: with.offered_rate,
                abuser_rate: abuser.rate,
                abuser_limited_pct: abuser.limited_pct,
                goal_abuser_limited_pct: 90.0,
                others_p99_reply_ms_without: before,
                others_p99_reply_ms_with: after,
                others_p99_change_pct: if before > 0.0 {
                    (after - before) * 100.0 / before
                } else {
                    0.0
                },
                goal_change_pct: 10.0,
                others_refused_with: with.refused_by_code.values().sum(),
            })
        })
        .collect()
}

/// Per offered rate: the median of the others' p99 changes over the rounds
/// with the abuser, and how many rounds.
fn median_abuse_changes(abuse: &[AbuseComparison]) -> Vec<(f64, f64, usize)> {
    let mut by_rate: Vec<(f64, Vec<f64>)> = Vec::new();
    for a in abuse {
        match by_rate.iter_mut().find(|(rate, _)| *rate == a.offered_rate) {
            Some((_, changes)) => changes.push(a.others_p99_change_pct),
            None => by_rate.push((a.offered_rate, vec![a.others_p99_change_pct])),
        }
    }
    by_rate
        .into_iter()
        .map(|(rate, mut changes)| {
            changes.sort_by(f64::total_cmp);
            let n = changes.len();
            let median = if n % 2 == 1 {
                changes[n / 2]
            } else {
                (changes[n / 2 - 1] + changes[n / 2]) / 2.0
            };
            (rate, median, n)
        })
        .collect()
}

fn cluster_summary(steps: &[StepReport], cores: usize, best_achieved: f64) -> ClusterSummary {
    const GOAL_P99_MS: f64 = 100.0;
    let per_core = |v: f64| v / cores.max(1) as f64;
    let best_within = steps
        .iter()
        .filter(|s| {
            s.ok > 0 && s.msgs_missing == 0 && s.send_msg_us.p99 as f64 <= GOAL_P99_MS * 1e3
        })
        .map(|s| s.achieved_msgs_per_sec)
        .fold(None, |best: Option<f64>, v| {
            Some(best.map_or(v, |b| b.max(v)))
        });
    ClusterSummary {
        cores,
        goal_msgs_per_sec_per_core: 1_400.0,
        goal_p99_send_msg_ms: GOAL_P99_MS,
        best_within_p99_goal: best_within,
        best_within_p99_goal_per_core: best_within.map(per_core),
        best_achieved_per_core: per_core(best_achieved),
        lowest_p99_send_msg_ms: steps
            .iter()
            .filter(|s| s.ok > 0)
            .map(|s| s.send_msg_us.p99 as f64 / 1e3)
            .reduce(f64::min),
    }
}

/// Where `measure` sends its load and what it watches.
struct Target {
    /// Comet TCP client addresses; pairs are spread over them.
    comets: Vec<SocketAddr>,
    /// `/metrics` URLs whose store commits are summed.
    commit_metrics: Vec<String>,
    /// The jobs' `/metrics` URLs.
    job_metrics: Vec<String>,
    /// Processes whose CPU is read alone (rim-bench's child is the
    /// standalone itself); `--proc` ones are read with their children.
    plain: Vec<Watched>,
    /// The process whose storage writes are reported (the standalone).
    writer_pid: Option<u32>,
    /// Prefix of every cmid (a cluster's store outlives one run).
    cmid_prefix: Option<u64>,
    /// Against a cluster (`--comets`).
    cluster: bool,
}

/// Connects the pairs, runs every rate, and returns their figures.
async fn measure(args: &Args, target: &Target) -> anyhow::Result<Vec<StepReport>> {
    let pairs = i64::from(args.pairs);
    eprintln!(
        "connecting {pairs} pairs of chat devices to {} comet(s)...",
        target.comets.len()
    );
    let connect =
        |mid: i64, comet: usize| im_device::device(target.comets[comet], mid, format!("d{mid}"));
    let n = target.comets.len();
    let recipients: Vec<Client> = futures::stream::iter(0..pairs)
        .map(|i| {
            let (_, comet) = comet_of_pair(i as usize, n);
            connect(MID_BASE + 2 * i + 1, comet)
        })
        .buffered(CONNECT_CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let mut senders: Vec<Option<Client>> = futures::stream::iter(0..pairs)
        .map(|i| connect(MID_BASE + 2 * i, comet_of_pair(i as usize, n).0))
        .buffered(CONNECT_CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .map(|c| c.map(Some))
        .collect::<anyhow::Result<_>>()?;
    let mut abuser = if args.abuser_rate > 0.0 {
        Some(connect(im_abuser::ABUSER_MID, 0).await?)
    } else {
        None
    };

    let phases = phases(args);
    let steps: Arc<Vec<Arc<StepStats>>> =
        Arc::new(phases.iter().map(|_| Arc::new(StepStats::new())).collect());
    let step_secs = args.warmup + args.duration + args.drain;
    let run_deadline =
        Instant::now() + Duration::from_secs((step_secs + 30) * phases.len() as u64 + 60);
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
    let mut reports = Vec::new();
    for (index, &phase) in phases.iter().enumerate() {
        let rate = phase.rate;
        let stats = Arc::clone(&steps[index]);
        eprintln!(
            "rate {rate} msg/s{}: {}s warmup, {}s measured",
            if phase.abuser {
                format!(" with an abuser at {} msg/s", args.abuser_rate)
            } else {
                String::new()
            },
            args.warmup,
            args.duration
        );
        let start = Instant::now() + Duration::from_millis(200);
        let abuser_stats = Arc::new(AbuserStats::default());
        let abuser_task = match (phase.abuser, abuser.take()) {
            (true, Some(client)) => {
                let plan = AbuserPlan {
                    step: index,
                    rate: args.abuser_rate,
                    start,
                    warmup: args.warmup,
                    duration: args.duration,
                    drain: args.drain,
                    cmid_prefix: target.cmid_prefix,
                };
                Some(tokio::spawn(im_abuser::abuser(
                    client,
                    plan,
                    Arc::clone(&abuser_stats),
                )))
            }
            (_, client) => {
                abuser = client;
                None
            }
        };
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
                        cmid_prefix: target.cmid_prefix,
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
        let cpu_before = Snapshot::take(&target.plain);
        let tree_before = TreeSnapshot::take(&args.procs);
        let box_before = procstat::box_ticks();
        let commits_before = commits(&http, &target.commit_metrics).await;
        let written_before = target.writer_pid.and_then(procstat::write_bytes);
        let jobs_before = scrape(&http, &target.job_metrics).await;
        tokio::time::sleep_until(window_start + Duration::from_secs(args.duration)).await;
        let secs = args.duration as f64;
        let mut cpu = cpu_before.used_until(&Snapshot::take(&target.plain), secs);
        cpu.extend(tree_before.used_until(&TreeSnapshot::take(&args.procs), secs));
        let box_cores = box_before
            .zip(procstat::box_ticks())
            .and_then(|(before, after)| procstat::box_busy_cores(before, after, secs));
        let commits_after = commits(&http, &target.commit_metrics).await;
        let written = target
            .writer_pid
            .and_then(procstat::write_bytes)
            .zip(written_before)
            .map(|(after, before)| after.saturating_sub(before));
        let jobs_after = scrape(&http, &target.job_metrics).await;
        while let Some(joined) = tasks.join_next().await {
            if let Ok((i, Some(client))) = joined {
                senders[i] = Some(client);
            }
        }
        if let Some(task) = abuser_task {
            abuser = task.await.ok().flatten();
            if abuser.is_none() && phase.abuser {
                eprintln!("the abuser lost its connection");
            }
        }
        // MSGs still on their way after the last reply get a moment.
        let msg_wait = Instant::now() + Duration::from_secs(args.drain);
        while get(&stats.msgs) < get(&stats.ok) && Instant::now() < msg_wait {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = progress_stop_tx.send(true);
        let _ = progress.await;
        let job = if target.job_metrics.is_empty() {
            None
        } else {
            let mut figures = job_figures(&jobs_before, &jobs_after);
            figures.lag_after_drain = consumer_lag(&scrape(&http, &target.job_metrics).await);
            Some(figures)
        };
        let mut report = step_report(
            &stats,
            rate,
            args,
            window_start_nanos,
            cpu,
            commits_before
                .zip(commits_after)
                .map(|(a, b)| b.saturating_sub(a)),
            written,
        );
        add_cluster_figures(&mut report, box_cores, job, args.duration as f64);
        if phase.abuser {
            report.with_abuser = true;
            report.abuser = Some(abuser_stats.report(args.abuser_rate));
        }
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
        if target.cluster {
            for line in cluster_step_lines(&report) {
                eprintln!("{line}");
            }
        }
        if let Some(line) = abuser_line(&report) {
            eprintln!("{line}");
        }
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
        with_abuser: false,
        abuser: None,
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
        box_busy_cores: None,
        msgs_per_sec_per_box_core: 0.0,
        msgs_per_sec_per_busy_core: None,
        cpu_us_per_msg: BTreeMap::new(),
        cpu_us_per_msg_by_role: BTreeMap::new(),
        watched_cpu_us_per_msg: None,
        msgs_per_watched_cpu_second: None,
        job: None,
        send_reply_cdf: cdf_points(&reply, 200),
        send_msg_cdf: cdf_points(&msg, 200),
    }
}

/// The comets of pair `i`'s sender and recipient among `n`: the sender on
/// `i mod n`, the recipient half the comets further (never the same comet
/// when there are two or more).
fn comet_of_pair(i: usize, n: usize) -> (usize, usize) {
    let n = n.max(1);
    let shift = if n > 1 { (n / 2).max(1) } else { 0 };
    (i % n, (i + shift) % n)
}

/// A process's role: its name without a short `-suffix` (`comet-a1` →
/// `comet`, `job-b` → `job`, `rim-bench` stays).
fn role_of(name: &str) -> &str {
    match name.rsplit_once('-') {
        Some((head, tail)) if !head.is_empty() && !tail.is_empty() && tail.len() <= 3 => head,
        _ => name,
    }
}

/// Reads every `/metrics` page of `urls` (`None` for one that failed).
async fn scrape(http: &reqwest::Client, urls: &[String]) -> Vec<Option<String>> {
    futures::future::join_all(urls.iter().map(|u| im_device::metrics_text(http, u))).await
}

/// Σ of the store's commits over `urls`; `None` without URLs or when one
/// could not be read.
async fn commits(http: &reqwest::Client, urls: &[String]) -> Option<u64> {
    if urls.is_empty() {
        return None;
    }
    scrape(http, urls)
        .await
        .iter()
        .map(|t| im_device::parse_commits(t.as_deref()?))
        .sum()
}

/// Σ of the samples of metric family `name` (`name` or `name{...}`) in a
/// `/metrics` page.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

/// Σ `rim_job_consumer_lag` over the pages; `None` when one is missing.
fn consumer_lag(pages: &[Option<String>]) -> Option<f64> {
    pages
        .iter()
        .map(|p| Some(metric_sum(p.as_deref()?, "rim_job_consumer_lag")))
        .sum()
}

/// Cumulative bucket counts of `rim_job_push_latency_seconds`, all kinds
/// summed, by upper bound in seconds.
fn push_latency_buckets(pages: &[Option<String>]) -> BTreeMap<u64, f64> {
    let mut buckets = BTreeMap::new();
    for line in pages.iter().flatten().flat_map(|p| p.lines()) {
        let Some(rest) = line.strip_prefix("rim_job_push_latency_seconds_bucket{") else {
            continue;
        };
        let Some(le) = rest.split("le=\"").nth(1).and_then(|r| r.split('"').next()) else {
            continue;
        };
        let bound = if le == "+Inf" {
            f64::INFINITY
        } else {
            match le.parse::<f64>() {
                Ok(v) => v,
                Err(_) => continue,
            }
        };
        let Some(count) = line
            .split_whitespace()
            .last()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        // Keyed by the bound's bits: positive floats sort like their bits.
        *buckets.entry(bound.to_bits()).or_insert(0.0) += count;
    }
    buckets
}

/// The jobs' figures between two scrapes.
fn job_figures(before: &[Option<String>], after: &[Option<String>]) -> JobFigures {
    let total = |pages: &[Option<String>], name: &str| -> f64 {
        pages.iter().flatten().map(|p| metric_sum(p, name)).sum()
    };
    let pushes = total(after, "rim_job_push_latency_seconds_count")
        - total(before, "rim_job_push_latency_seconds_count");
    let seconds = total(after, "rim_job_push_latency_seconds_sum")
        - total(before, "rim_job_push_latency_seconds_sum");
    let (b0, b1) = (push_latency_buckets(before), push_latency_buckets(after));
    let p99 = (pushes > 0.0)
        .then(|| {
            b1.iter()
                .find(|(bound, n)| **n - b0.get(bound).copied().unwrap_or(0.0) >= 0.99 * pushes)
                .map(|(bound, _)| f64::from_bits(*bound) * 1e3)
        })
        .flatten();
    JobFigures {
        lag_at_start: consumer_lag(before),
        lag_at_end: consumer_lag(after),
        lag_after_drain: None,
        pushes,
        push_latency_mean_ms: (pushes > 0.0).then(|| seconds * 1e3 / pushes),
        push_latency_p99_le_ms: p99,
    }
}

/// Fills the per-core, per-message and job figures of a step.
fn add_cluster_figures(
    r: &mut StepReport,
    box_cores: Option<f64>,
    job: Option<JobFigures>,
    secs: f64,
) {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let msgs = (r.achieved_msgs_per_sec * secs).max(1.0);
    r.box_busy_cores = box_cores;
    r.msgs_per_sec_per_box_core = r.achieved_msgs_per_sec / cores as f64;
    r.msgs_per_sec_per_busy_core = box_cores
        .filter(|c| *c > 0.0)
        .map(|c| r.achieved_msgs_per_sec / c);
    for c in &r.cpu {
        let us = c.cpu_seconds * 1e6 / msgs;
        r.cpu_us_per_msg.insert(c.name.clone(), us);
        *r.cpu_us_per_msg_by_role
            .entry(role_of(&c.name).to_owned())
            .or_insert(0.0) += us;
    }
    let watched: Vec<f64> = r
        .cpu
        .iter()
        .filter(|c| c.name != "rim-bench")
        .map(|c| c.cpu_seconds * 1e6 / msgs)
        .collect();
    if !watched.is_empty() {
        let us: f64 = watched.iter().sum();
        r.watched_cpu_us_per_msg = Some(us);
        r.msgs_per_watched_cpu_second = (us > 0.0).then(|| 1e6 / us);
    }
    r.job = job;
}

/// The cluster figures of one step, to print after its summary line.
fn cluster_step_lines(s: &StepReport) -> Vec<String> {
    let mut lines = vec![format!(
        "     box: {} cores busy, {:.0} msg/s per box core, {} msg/s per busy core; errors: refused {:?} skipped {} missing replies {} missing msgs {} lost {}",
        s.box_busy_cores.map_or("?".into(), |c| format!("{c:.2}")),
        s.msgs_per_sec_per_box_core,
        s.msgs_per_sec_per_busy_core
            .map_or("?".into(), |c| format!("{c:.0}")),
        s.refused_by_code,
        s.skipped,
        s.missing_replies,
        s.msgs_missing,
        s.lost_senders
    )];
    let roles: Vec<String> = s
        .cpu_us_per_msg_by_role
        .iter()
        .map(|(role, us)| format!("{role} {us:.0}"))
        .collect();
    lines.push(format!(
        "     CPU µs per message by role: {}; all --proc processes {} µs = {} msg per CPU-second",
        roles.join(", "),
        s.watched_cpu_us_per_msg
            .map_or("?".into(), |v| format!("{v:.0}")),
        s.msgs_per_watched_cpu_second
            .map_or("?".into(), |v| format!("{v:.0}"))
    ));
    if let Some(j) = &s.job {
        lines.push(format!(
            "     jobs: {:.0} pushes in the window, latency mean {} ms, p99 ≤ {} ms; consumer lag at start {:?}, end {:?}, after drain {:?}",
            j.pushes,
            j.push_latency_mean_ms.map_or("?".into(), |v| format!("{v:.1}")),
            j.push_latency_p99_le_ms.map_or("?".into(), |v| format!("{v}")),
            j.lag_at_start,
            j.lag_at_end,
            j.lag_after_drain
        ));
    }
    lines
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
    cmid_prefix: Option<u64>,
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
                        cmid: match p.cmid_prefix {
                            Some(run) => format!("r{run}-{}-{n}", p.index),
                            None => format!("{}-{n}", p.index),
                        },
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
        if r.summary.cluster.is_some() {
            for line in cluster_step_lines(s) {
                println!("    {line}");
            }
        }
        if let Some(line) = abuser_line(s) {
            println!("  {line}");
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
    for (rate, median, n) in median_abuse_changes(&s.abuse) {
        println!(
            "  abuse at {rate:.0} msg/s over {n} rounds: the others' p99 SEND→SEND_REPLY changed by a median of {median:+.1} % (goal < 10 %)"
        );
    }
    for a in &s.abuse {
        println!(
            "  abuse at {:.0} msg/s: abuser at {:.0} msg/s got {:.1} % code 3 (goal ≥ {} %); the others' p99 SEND→SEND_REPLY {:.2} ms without, {:.2} ms with = {:+.1} % (goal < {} %); the others refused with it: {}",
            a.offered_rate,
            a.abuser_rate,
            a.abuser_limited_pct,
            a.goal_abuser_limited_pct,
            a.others_p99_reply_ms_without,
            a.others_p99_reply_ms_with,
            a.others_p99_change_pct,
            a.goal_change_pct,
            a.others_refused_with
        );
    }
    if let Some(c) = &s.cluster {
        println!(
            "  cluster, {} cores: best achieved {:.0} msg/s = {:.0} per core (goal ≥ {}); best with p99 SEND→MSG ≤ {} ms: {:?} msg/s = {:?} per core; lowest p99 SEND→MSG {:?} ms",
            c.cores,
            s.best_achieved,
            c.best_achieved_per_core,
            c.goal_msgs_per_sec_per_core,
            c.goal_p99_send_msg_ms,
            c.best_within_p99_goal.map(f64::round),
            c.best_within_p99_goal_per_core.map(f64::round),
            c.lowest_p99_send_msg_ms
        );
        return;
    }
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
    let title = if r.args.comets.is_empty() {
        format!(
            "im-send: {} pairs, rim standalone (SQLite FULL)",
            r.args.pairs
        )
    } else {
        format!(
            "im-send: {} pairs, cluster of {} comets (Kafka + PostgreSQL)",
            r.args.pairs,
            r.args.comets.len()
        )
    };
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
    let mut roles: Vec<&String> = r
        .steps
        .iter()
        .flat_map(|s| s.cpu_us_per_msg_by_role.keys())
        .collect();
    roles.sort();
    roles.dedup();
    let cpu_by_role: Vec<Series> = roles
        .into_iter()
        .map(|role| Series {
            label: role.clone(),
            points: r
                .steps
                .iter()
                .filter_map(|s| Some((s.offered_rate, *s.cpu_us_per_msg_by_role.get(role)?)))
                .collect(),
        })
        .collect();
    let mut charts = vec![
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
    ];
    if !r.args.comets.is_empty() {
        charts.push(Chart {
            title: format!("{title}: CPU µs per message by role"),
            x_label: "offered msg/s".into(),
            y_label: "CPU µs per message".into(),
            log_x: false,
            series: cpu_by_role,
        });
    }
    render(&charts)
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

    #[test]
    fn abuser_rounds_interleave_and_the_median_is_per_rate() {
        use clap::Parser;
        let cli = crate::Cli::try_parse_from([
            "rim-bench",
            "im-send",
            "--rates",
            "1000,2000",
            "--abuser-rate",
            "200",
            "--abuser-rounds",
            "3",
        ])
        .unwrap();
        let crate::Command::ImSend(args) = cli.command else {
            panic!("im-send");
        };
        let plan: Vec<(f64, bool)> = phases(&args).iter().map(|p| (p.rate, p.abuser)).collect();
        let one = |rate: f64| {
            let mut steps = vec![(rate, false)];
            for _ in 0..3 {
                steps.extend([(rate, true), (rate, false)]);
            }
            steps
        };
        assert_eq!(plan, [one(1000.0), one(2000.0)].concat());
        let comparison = |rate: f64, change: f64| AbuseComparison {
            offered_rate: rate,
            abuser_rate: 200.0,
            abuser_limited_pct: 90.0,
            goal_abuser_limited_pct: 90.0,
            others_p99_reply_ms_without: 1.0,
            others_p99_reply_ms_with: 1.0,
            others_p99_change_pct: change,
            goal_change_pct: 10.0,
            others_refused_with: 0,
        };
        let all = [
            comparison(1000.0, 30.0),
            comparison(1000.0, -2.0),
            comparison(1000.0, 4.0),
            comparison(2000.0, 8.0),
            comparison(2000.0, 2.0),
        ];
        assert_eq!(
            median_abuse_changes(&all),
            [(1000.0, 4.0, 3), (2000.0, 5.0, 2)]
        );
    }

    #[test]
    fn pairs_cross_comets() {
        for n in [2, 3, 4, 5] {
            for i in 0..20 {
                let (sender, recipient) = comet_of_pair(i, n);
                assert!(sender < n && recipient < n);
                assert_ne!(sender, recipient, "pair {i} of {n} comets");
            }
        }
        // Four comets a1, a2, b1, b2: a pair's ends are in different regions.
        assert_eq!(comet_of_pair(0, 4), (0, 2));
        assert_eq!(comet_of_pair(3, 4), (3, 1));
        assert_eq!(comet_of_pair(7, 1), (0, 0));
    }

    #[test]
    fn roles_and_job_metrics() {
        assert_eq!(role_of("comet-a1"), "comet");
        assert_eq!(role_of("job-b"), "job");
        assert_eq!(role_of("rim-bench"), "rim-bench");
        assert_eq!(role_of("postgres"), "postgres");
        let before = Some(
            "# TYPE rim_job_consumer_lag gauge\n\
             rim_job_consumer_lag{partition=\"0\"} 3\n\
             rim_job_consumer_lag{partition=\"1\"} 4\n\
             rim_job_consumer_lag_other 100\n\
             rim_job_push_latency_seconds_bucket{kind=\"push\",le=\"0.1\"} 10\n\
             rim_job_push_latency_seconds_bucket{kind=\"push\",le=\"0.5\"} 10\n\
             rim_job_push_latency_seconds_bucket{kind=\"push\",le=\"+Inf\"} 10\n\
             rim_job_push_latency_seconds_sum{kind=\"push\"} 0.5\n\
             rim_job_push_latency_seconds_count{kind=\"push\"} 10\n"
                .to_owned(),
        );
        let after = Some(
            "rim_job_consumer_lag{partition=\"0\"} 0\n\
             rim_job_push_latency_seconds_bucket{kind=\"push\",le=\"0.1\"} 20\n\
             rim_job_push_latency_seconds_bucket{kind=\"push\",le=\"0.5\"} 110\n\
             rim_job_push_latency_seconds_bucket{kind=\"push\",le=\"+Inf\"} 110\n\
             rim_job_push_latency_seconds_sum{kind=\"push\"} 30.5\n\
             rim_job_push_latency_seconds_count{kind=\"push\"} 110\n"
                .to_owned(),
        );
        assert_eq!(consumer_lag(std::slice::from_ref(&before)), Some(7.0));
        assert_eq!(consumer_lag(&[before.clone(), None]), None);
        let f = job_figures(&[before], &[after]);
        assert_eq!(f.pushes, 100.0);
        assert_eq!(f.push_latency_mean_ms, Some(300.0));
        // 10 of the window's 100 pushes took ≤ 100 ms, all ≤ 500 ms.
        assert_eq!(f.push_latency_p99_le_ms, Some(500.0));
        assert_eq!((f.lag_at_start, f.lag_at_end), (Some(7.0), Some(0.0)));
    }
}
