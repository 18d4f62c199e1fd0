//! `rim-bench push-latency`: pushes/s and latency from an HTTP push to its
//! receipt by clients, through whatever queue the deployment uses.
//!
//! N clients connect to the comet(s) over TCP (from source addresses
//! 127.0.0.2–9) or WebSocket and authenticate. A pacer then sends `rate`
//! pushes per second for `warmup + duration` seconds to the HTTP API: in
//! `unicast` mode each push targets one random client by key
//! (`POST /goim/push/keys`); in `room` mode every client is in one room and
//! every push goes to it (`POST /goim/push/room`), so one push is N
//! deliveries. The body of each push is `"<send time> <seq>"`, the send time
//! in CLOCK_REALTIME nanoseconds taken just before the request is written;
//! every client records receive time − send time per frame. Pushes sent
//! during the warmup are delivered but not counted. After the last push the
//! benchmark waits (at most `drain` seconds) for the deliveries still on
//! their way, then reports.
//!
//! The pacer is open-loop: it does not wait for answers. When
//! `max-in-flight` pushes are already waiting for theirs, the next push is
//! skipped and counted, so a saturated server shows as skipped pushes rather
//! than as a silently lower rate with flattering latencies.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use clap::ValueEnum;
use hdrhistogram::Histogram;
use rim_client::{AuthToken, Client};
use rim_proto::{Frame, Op};
use serde::Serialize;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use crate::latency::{self, Percentiles, Recorder, human};
use crate::options::{ClientOptions, Output};
use crate::procstat::{self, CpuUse, Snapshot, Watched};
use crate::receiver::{FrameCounts, FrameSink, start_receivers};
use crate::wire::{Transport, now_nanos};

/// How long one client may take to connect and authenticate.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Clients connecting at once.
const CONNECT_CONCURRENCY: usize = 64;
/// How long one HTTP push may take.
const PUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// Shards of the latency recorder.
const SHARDS: usize = 16;
/// Largest accepted rate, pushes/s.
const MAX_RATE: f64 = 100_000.0;

/// Whom each push targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Each push goes to one random client, by key.
    Unicast,
    /// Every client is in one room; each push goes to the room.
    Room,
}

/// Options of `rim-bench push-latency`.
#[derive(Clone, Debug, clap::Args, Serialize)]
pub struct Args {
    /// Base URL of the HTTP push API (loopback only).
    #[arg(long, default_value = "http://127.0.0.1:3111")]
    pub api: String,
    /// Comet client addresses, comma-separated; clients are spread over them
    /// round-robin (loopback only).
    #[arg(long, default_value = "127.0.0.1:3101", value_delimiter = ',')]
    pub comet: Vec<SocketAddr>,
    #[command(flatten)]
    #[serde(flatten)]
    pub client: ClientOptions,
    /// Number of clients (one process holds under 20,000 open files).
    #[arg(long, default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=15_000))]
    pub clients: u32,
    /// unicast: each push to one random client; room: each push to a room
    /// all clients are in.
    #[arg(long, value_enum, default_value_t = Mode::Unicast)]
    pub mode: Mode,
    /// Pushes per second (paced; at most 100,000).
    #[arg(long, default_value_t = 1000.0, value_parser = parse_rate)]
    pub rate: f64,
    /// Measured seconds, after the warmup.
    #[arg(long, default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub duration: u64,
    /// Seconds of pushes before measuring (delivered, not counted).
    #[arg(long, default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(0..=600))]
    pub warmup: u64,
    /// Seconds to wait after the last push for deliveries still on their way.
    #[arg(long, default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=120))]
    pub drain: u64,
    /// Pushes waiting for their HTTP answer at most; beyond that a push is
    /// skipped and counted.
    #[arg(long, default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_in_flight: u32,
    /// TCP clients connect from 127.0.0.2 .. 127.0.0.(1+N).
    #[arg(long, default_value_t = 8,
          value_parser = clap::value_parser!(u8).range(1..=8))]
    pub source_addrs: u8,
    /// Business op of the pushes.
    #[arg(long, default_value_t = 1000)]
    pub operation: i32,
    /// Also report the CPU time of these processes over the measured window,
    /// as NAME=PID (repeatable), e.g. `--proc comet=1234`.
    #[arg(long = "proc", value_name = "NAME=PID", value_parser = procstat::parse_watched)]
    pub procs: Vec<Watched>,
    #[command(flatten)]
    #[serde(flatten)]
    pub output: Output,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let rate: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if rate > 0.0 && rate <= MAX_RATE {
        Ok(rate)
    } else {
        Err(format!("the rate must be in (0, {MAX_RATE}]"))
    }
}

/// One progress line: (seconds since the pushes started, accepted pushes/s,
/// deliveries/s, p50 ms, p99 ms).
type SecondSample = (f64, f64, f64, f64, f64);

/// Counters of the HTTP side, one set for the warmup and one measured.
#[derive(Default)]
pub(crate) struct PushCounters {
    pub(crate) sent: AtomicU64,
    pub(crate) accepted: AtomicU64,
    /// Accepted, but the API found no connection for the key.
    pub(crate) no_recipient: AtomicU64,
    /// Answered with a status other than 200.
    pub(crate) rejected: AtomicU64,
    /// No answer: connection error or timeout.
    pub(crate) failed: AtomicU64,
    /// Not sent: `max_in_flight` pushes were already waiting.
    pub(crate) skipped: AtomicU64,
}

/// Reads a counter.
pub(crate) fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// State shared by the pacer, the push tasks, the clients and the reporter.
struct Shared {
    operation: Op,
    /// First measured sequence number; `u64::MAX` during the warmup.
    measure_from: AtomicU64,
    warmup: PushCounters,
    measured: PushCounters,
    /// Push frames of measured pushes received.
    measured_deliveries: AtomicU64,
    frames: FrameCounts,
    /// Send → receipt.
    latency: Recorder,
    /// HTTP request → answer, measured pushes.
    http: parking_lot::Mutex<Histogram<u64>>,
    /// One entry per progress line: (seconds since the pushes started,
    /// accepted pushes/s, deliveries/s, p50 ms, p99 ms).
    series: parking_lot::Mutex<Vec<SecondSample>>,
}

impl Shared {
    fn counters(&self, seq: u64) -> &PushCounters {
        if seq >= self.measure_from.load(Ordering::Acquire) {
            &self.measured
        } else {
            &self.warmup
        }
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
        let measured = seq >= self.measure_from.load(Ordering::Acquire);
        if measured {
            self.measured_deliveries.fetch_add(1, Ordering::Relaxed);
        }
        self.latency.record(client, micros, measured);
    }
}

/// A small xorshift generator: which client a unicast push targets.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        // n is at most 15,000: the modulo bias is negligible.
        usize::try_from(self.next() % n as u64).unwrap_or(0)
    }
}

/// Everything the run reports (also written as JSON with `--json`).
#[derive(Debug, Serialize)]
struct Report {
    command: String,
    started_unix_secs: u64,
    args: Args,
    clients_connected: usize,
    connect_secs: f64,
    measured_secs: f64,
    pushes_planned: u64,
    pushes_sent: u64,
    pushes_accepted: u64,
    pushes_accepted_per_sec: f64,
    pushes_no_recipient: u64,
    pushes_rejected: u64,
    pushes_failed: u64,
    pushes_skipped: u64,
    deliveries_expected: u64,
    deliveries: u64,
    deliveries_per_sec: f64,
    deliveries_missing: u64,
    deliveries_extra: u64,
    bad_bodies: u64,
    other_frames: u64,
    negative_latencies: u64,
    lost_clients: u64,
    errors: u64,
    latency_us: Percentiles,
    http_us: Percentiles,
    cpu: Vec<CpuUse>,
    /// Per second: (seconds, accepted pushes/s, deliveries/s, p50 ms, p99 ms).
    series: Vec<SecondSample>,
    /// Latency CDF of the measured window: (ms, % at or below).
    cdf: Vec<(f64, f64)>,
}

/// Runs the benchmark.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let api = reqwest::Url::parse(&args.api).with_context(|| format!("--api {}", args.api))?;
    ensure!(
        crate::addrs::is_loopback_url(&api),
        "--api {api}: load goes to 127.0.0.0/8 (or localhost) only"
    );
    ensure!(!args.comet.is_empty(), "--comet: give at least one address");
    for comet in &args.comet {
        ensure!(
            comet.ip().is_loopback(),
            "--comet {comet}: load goes to 127.0.0.0/8 only"
        );
    }
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < u64::from(args.clients) + 256 => {
            eprintln!(
                "warning: open-file limit {limit} is low for {} clients",
                args.clients
            );
        }
        Ok(_) => {}
        Err(err) => eprintln!("warning: cannot raise the open-file limit: {err}"),
    }
    let started_unix_secs = now_nanos() / 1_000_000_000;
    let pid = std::process::id();
    let shared = Arc::new(Shared {
        operation: Op(args.operation),
        measure_from: AtomicU64::new(u64::MAX),
        warmup: PushCounters::default(),
        measured: PushCounters::default(),
        measured_deliveries: AtomicU64::new(0),
        frames: FrameCounts::default(),
        latency: Recorder::new(SHARDS),
        http: parking_lot::Mutex::new(latency::histogram()),
        series: parking_lot::Mutex::new(Vec::new()),
    });

    // ---- clients
    let room = format!("bench-{pid}");
    let total_secs = args.warmup + args.duration;
    // Clients end by themselves at the latest here, whatever happens.
    let client_deadline = Instant::now()
        + Duration::from_secs(total_secs + args.drain + 120 + u64::from(args.clients) / 50);
    let (stop_tx, stop_rx) = watch::channel(false);
    eprintln!(
        "connecting {} {:?} clients to {} comet(s)...",
        args.clients,
        args.client.transport,
        args.comet.len()
    );
    let connect_started = Instant::now();
    let (keys, mut clients) = connect_all(&args, &room, &shared, &stop_rx, client_deadline).await;
    let connect_secs = connect_started.elapsed().as_secs_f64();
    ensure!(!keys.is_empty(), "no client could connect and authenticate");
    eprintln!(
        "{} of {} clients connected in {connect_secs:.1}s",
        keys.len(),
        args.clients
    );
    let connected = keys.len();

    // ---- progress, once per second
    let progress = tokio::spawn(progress(
        Arc::clone(&shared),
        stop_rx.clone(),
        Instant::now() + Duration::from_secs(total_secs + args.drain + 60),
    ));

    // ---- pushes
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.max_in_flight as usize)
        .tcp_nodelay(true)
        .timeout(PUSH_TIMEOUT)
        .build()
        .context("HTTP client")?;
    let base = args.api.trim_end_matches('/').to_owned();
    let room_url = Arc::new(format!(
        "{base}/goim/push/room?operation={}&type=live&room={room}",
        args.operation
    ));
    let keys_url = format!("{base}/goim/push/keys?operation={}&keys=", args.operation);
    let in_flight = Arc::new(Semaphore::new(args.max_in_flight as usize));
    let (planned, warm_count) = (
        (args.rate * total_secs as f64).round() as u64,
        (args.rate * args.warmup as f64).round() as u64,
    );
    let before_cpu = std::cell::OnceCell::new();
    let mut watched = args.procs.clone();
    watched.push(Watched {
        name: "rim-bench".into(),
        pid,
    });
    let mut rng = XorShift(u64::from(pid) << 32 | (now_nanos() & 0xffff_ffff) | 1);
    let pacer = crate::pacing::Pacer::new(args.rate, planned);
    let mut interval = tokio::time::interval(pacer.tick());
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let push_started = Instant::now();
    let hard_stop = push_started + Duration::from_secs(total_secs + 5);
    let mut measure_started = push_started;
    let mut seq = 0u64;
    if warm_count > 0 {
        eprintln!("warming up for {}s", args.warmup);
    }
    while seq < planned && Instant::now() < hard_stop {
        interval.tick().await;
        let due = pacer.due(push_started.elapsed().as_secs_f64());
        while seq < due {
            if seq == warm_count {
                measure_started = Instant::now();
                let _ = before_cpu.set(Snapshot::take(&watched));
                shared.measure_from.store(seq, Ordering::Release);
                eprintln!("measuring for {}s", args.duration);
            }
            let counters = shared.counters(seq);
            let Ok(permit) = Arc::clone(&in_flight).try_acquire_owned() else {
                counters.skipped.fetch_add(1, Ordering::Relaxed);
                seq += 1;
                continue;
            };
            counters.sent.fetch_add(1, Ordering::Relaxed);
            let url = match args.mode {
                Mode::Room => Arc::clone(&room_url),
                Mode::Unicast => Arc::new(format!("{keys_url}{}", keys[rng.below(keys.len())])),
            };
            let (http, shared) = (http.clone(), Arc::clone(&shared));
            let unicast = args.mode == Mode::Unicast;
            tokio::spawn(async move {
                push_once(&http, &url, seq, unicast, &shared).await;
                drop(permit);
            });
            seq += 1;
        }
    }
    let measured_secs = measure_started.elapsed().as_secs_f64();
    let after_cpu = Snapshot::take(&watched);
    let cpu = before_cpu
        .get()
        .map(|before| before.used_until(&after_cpu, measured_secs))
        .unwrap_or_default();
    eprintln!(
        "last push sent; waiting for answers and deliveries (at most {}s)",
        args.drain
    );

    // ---- drain: answers first, then deliveries
    let drain_deadline = Instant::now() + PUSH_TIMEOUT + Duration::from_secs(args.drain);
    let _ = tokio::time::timeout_at(
        Instant::now() + PUSH_TIMEOUT + Duration::from_secs(1),
        in_flight.acquire_many(args.max_in_flight),
    )
    .await;
    let m = &shared.measured;
    let accepted = load(&m.accepted);
    let expected = match args.mode {
        Mode::Unicast => accepted - load(&m.no_recipient),
        Mode::Room => accepted * connected as u64,
    };
    let deliveries_deadline =
        (Instant::now() + Duration::from_secs(args.drain)).min(drain_deadline);
    while shared.measured_deliveries.load(Ordering::Relaxed) < expected
        && Instant::now() < deliveries_deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while clients.join_next().await.is_some() {}
    })
    .await;
    clients.abort_all();
    let _ = progress.await;

    // ---- report
    let deliveries = shared.measured_deliveries.load(Ordering::Relaxed);
    let lost_clients = shared.frames.lost_clients.load(Ordering::Relaxed);
    let http_hist = shared.http.lock().clone();
    let (missing, extra) = (
        expected.saturating_sub(deliveries),
        deliveries.saturating_sub(expected),
    );
    let (bad_bodies, negative) = (
        shared.frames.bad_bodies.load(Ordering::Relaxed),
        shared.frames.negative.load(Ordering::Relaxed),
    );
    let errors = load(&m.no_recipient)
        + load(&m.rejected)
        + load(&m.failed)
        + load(&m.skipped)
        + missing
        + bad_bodies
        + lost_clients;
    let report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        started_unix_secs,
        clients_connected: connected,
        connect_secs,
        measured_secs,
        pushes_planned: planned - warm_count,
        pushes_sent: load(&m.sent),
        pushes_accepted: accepted,
        pushes_accepted_per_sec: accepted as f64 / measured_secs,
        pushes_no_recipient: load(&m.no_recipient),
        pushes_rejected: load(&m.rejected),
        pushes_failed: load(&m.failed),
        pushes_skipped: load(&m.skipped),
        deliveries_expected: expected,
        deliveries,
        deliveries_per_sec: deliveries as f64 / measured_secs,
        deliveries_missing: missing,
        deliveries_extra: extra,
        bad_bodies,
        other_frames: shared.frames.other_frames.load(Ordering::Relaxed),
        negative_latencies: negative,
        lost_clients,
        errors,
        latency_us: Percentiles::of(&shared.latency.total()),
        http_us: Percentiles::of(&http_hist),
        cpu,
        series: shared.series.lock().clone(),
        cdf: latency::cdf_points(&shared.latency.total(), 300),
        args,
    };
    print_report(&report);
    report
        .args
        .output
        .write(|| serde_json::to_string_pretty(&report), || plot(&report))?;
    if report.pushes_accepted == 0 {
        bail!("no push was accepted");
    }
    Ok(())
}

/// Connects and authenticates every client, `CONNECT_CONCURRENCY` at a
/// time; returns the keys of the connected ones and their receive tasks.
async fn connect_all(
    args: &Args,
    room: &str,
    shared: &Arc<Shared>,
    stop: &watch::Receiver<bool>,
    deadline: Instant,
) -> (Vec<String>, JoinSet<()>) {
    let pid = std::process::id();
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut connecting = JoinSet::new();
    for i in 0..args.clients as usize {
        let comet = args.comet[i % args.comet.len()];
        let source = SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(
                127,
                0,
                0,
                2 + u8::try_from(i % usize::from(args.source_addrs)).unwrap_or(0),
            )),
            0,
        );
        let token = AuthToken {
            mid: i64::try_from(i).unwrap_or(0) + 1,
            key: format!("bench-{pid}-{i}"),
            room_id: match args.mode {
                Mode::Room => format!("live://{room}"),
                Mode::Unicast => String::new(),
            },
            platform: "bench".into(),
            accepts: vec![args.operation],
        };
        let (transport, gate) = (args.client.transport, Arc::clone(&gate));
        connecting.spawn(async move {
            let _permit = gate.acquire_owned().await;
            let connect = async {
                let mut client = match transport {
                    Transport::Tcp => Client::connect_tcp_from(comet, source).await?,
                    Transport::Ws => Client::connect_ws(&format!("ws://{comet}/sub")).await?,
                };
                client.auth(&token).await?;
                Ok::<_, rim_client::Error>(client)
            };
            match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
                Ok(Ok(client)) => Ok((i, token.key, client)),
                Ok(Err(err)) => Err(format!("client {i} via {comet}: {err}")),
                Err(_) => Err(format!("client {i} via {comet}: no auth reply in time")),
            }
        });
    }
    let heartbeat = Duration::from_secs(args.client.heartbeat);
    start_receivers(connecting, shared, stop, heartbeat, deadline).await
}

/// Sends one push and counts its answer.
async fn push_once(http: &reqwest::Client, url: &str, seq: u64, unicast: bool, shared: &Shared) {
    let counters = shared.counters(seq);
    let measured = std::ptr::eq(counters, &shared.measured);
    let body = format!("{} {seq}", now_nanos());
    let started = Instant::now();
    let answer = http.post(url).body(body).send().await;
    let answered = started.elapsed();
    match answer {
        Ok(response) if response.status() == reqwest::StatusCode::OK => {
            counters.accepted.fetch_add(1, Ordering::Relaxed);
            if unicast {
                // {"code":0,"data":{"connections":N,...}}: 0 = key not online.
                let connections = response
                    .json::<serde_json::Value>()
                    .await
                    .ok()
                    .and_then(|v| v["data"]["connections"].as_u64());
                if connections == Some(0) {
                    counters.no_recipient.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(_) => {
            counters.rejected.fetch_add(1, Ordering::Relaxed);
        }
        Err(_) => {
            counters.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
    if measured {
        let micros = answered.as_micros() as u64;
        shared.http.lock().saturating_record(micros.max(1));
    }
}

/// Prints a line per second: rates since the last line and the latency of
/// the frames received in it.
async fn progress(shared: Arc<Shared>, mut stop: watch::Receiver<bool>, deadline: Instant) {
    let started = Instant::now();
    let mut tick =
        tokio::time::interval_at(started + Duration::from_secs(1), Duration::from_secs(1));
    let mut last = (0u64, 0u64, 0u64, started);
    let total = |c: fn(&PushCounters) -> &AtomicU64| {
        c(&shared.warmup).load(Ordering::Relaxed) + c(&shared.measured).load(Ordering::Relaxed)
    };
    while Instant::now() < deadline {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let secs = (now - last.3).as_secs_f64();
        let (sent, accepted, delivered) = (
            total(|c| &c.sent),
            total(|c| &c.accepted),
            shared.frames.deliveries.load(Ordering::Relaxed),
        );
        let errors = total(|c| &c.rejected)
            + total(|c| &c.failed)
            + total(|c| &c.skipped)
            + total(|c| &c.no_recipient)
            + shared.frames.lost_clients.load(Ordering::Relaxed);
        let window = Percentiles::of(&shared.latency.take_interval());
        let rate = |n: u64, before: u64| (n - before) as f64 / secs;
        eprintln!(
            "[{:>4.0}s] pushes {:>7.0}/s  accepted {:>7.0}/s  deliveries {:>8.0}/s  latency p50 {:>8} p99 {:>8} max {:>8}  errors {errors}",
            (now - started).as_secs_f64(),
            rate(sent, last.0),
            rate(accepted, last.1),
            rate(delivered, last.2),
            human(window.p50),
            human(window.p99),
            human(window.max),
        );
        shared.series.lock().push((
            (now - started).as_secs_f64(),
            rate(accepted, last.1),
            rate(delivered, last.2),
            window.p50 as f64 / 1e3,
            window.p99 as f64 / 1e3,
        ));
        last = (sent, accepted, delivered, now);
    }
}

/// The run's plots: latency CDF of the measured deliveries, and per second
/// the accepted pushes, deliveries and latency percentiles.
fn plot(r: &Report) -> String {
    use crate::plot::{Chart, Series, render};
    let mode = match r.args.mode {
        Mode::Unicast => "unicast",
        Mode::Room => "room",
    };
    let title = format!(
        "push-latency: {mode}, {} pushes/s asked, {} clients",
        r.args.rate, r.clients_connected
    );
    let col = |f: fn(&SecondSample) -> (f64, f64)| -> Vec<(f64, f64)> {
        r.series.iter().map(f).collect()
    };
    render(&[
        Chart {
            title: format!("{title}: latency CDF (measured window)"),
            x_label: "HTTP push → client receipt, ms (log)".into(),
            y_label: "% of deliveries".into(),
            log_x: true,
            series: vec![Series {
                label: "latency".into(),
                points: r.cdf.clone(),
            }],
        },
        Chart {
            title: format!("{title}: per second"),
            x_label: "seconds since the first push (warmup included)".into(),
            y_label: "per second".into(),
            log_x: false,
            series: vec![
                Series {
                    label: "pushes accepted/s".into(),
                    points: col(|s| (s.0, s.1)),
                },
                Series {
                    label: "deliveries/s".into(),
                    points: col(|s| (s.0, s.2)),
                },
            ],
        },
        Chart {
            title: format!("{title}: latency of each second's deliveries"),
            x_label: "seconds since the first push (warmup included)".into(),
            y_label: "ms".into(),
            log_x: false,
            series: vec![
                Series {
                    label: "p50".into(),
                    points: col(|s| (s.0, s.3)),
                },
                Series {
                    label: "p99".into(),
                    points: col(|s| (s.0, s.4)),
                },
            ],
        },
    ])
}

fn print_report(r: &Report) {
    let l = &r.latency_us;
    let h = &r.http_us;
    println!(
        "rim-bench push-latency: {} mode, {} clients connected",
        match r.args.mode {
            Mode::Unicast => "unicast",
            Mode::Room => "room",
        },
        r.clients_connected
    );
    println!("  command:      {}", r.command);
    println!(
        "  pushes:       {} planned, {} sent, {} accepted ({:.0}/s over {:.1}s), {} skipped, {} rejected, {} failed, {} without recipient",
        r.pushes_planned,
        r.pushes_sent,
        r.pushes_accepted,
        r.pushes_accepted_per_sec,
        r.measured_secs,
        r.pushes_skipped,
        r.pushes_rejected,
        r.pushes_failed,
        r.pushes_no_recipient
    );
    println!(
        "  deliveries:   {} of {} expected ({:.0}/s), {} missing, {} extra",
        r.deliveries,
        r.deliveries_expected,
        r.deliveries_per_sec,
        r.deliveries_missing,
        r.deliveries_extra
    );
    println!(
        "  latency:      p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (mean {})",
        human(l.p50),
        human(l.p90),
        human(l.p99),
        human(l.p999),
        human(l.max),
        human(l.mean as u64)
    );
    println!(
        "  HTTP answer:  p50 {}  p99 {}  p99.9 {}  max {}",
        human(h.p50),
        human(h.p99),
        human(h.p999),
        human(h.max)
    );
    for c in &r.cpu {
        println!(
            "  cpu:          {} (pid {}) {:.2} s = {:.2} cores",
            c.name, c.pid, c.cpu_seconds, c.cores
        );
    }
    println!(
        "  errors:       {} (lost clients {}, bad bodies {}, clock steps {})",
        r.errors, r.lost_clients, r.bad_bodies, r.negative_latencies
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_bounded() {
        assert!(parse_rate("1000").is_ok());
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("1e9").is_err());
    }

    #[test]
    fn random_targets_stay_in_range() {
        let mut rng = XorShift(7);
        assert!((0..1000).all(|_| rng.below(10) < 10));
    }
}
