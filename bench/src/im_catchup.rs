//! `rim-bench im-catchup`: offline catch-up through `rim standalone`.
//!
//! `--convs` users each send `--messages / --convs` messages (SEND, pipelined
//! up to `--max-in-flight` per sender, every one answered OK) to one user who
//! is offline the whole time, so that user's inbox holds `--messages`
//! entries over `--convs` conversations. Then, `--rounds` times, a new device
//! of that user connects and SYNCs from 0 with `--limit`, paging while the
//! reply says `more`: the figures are round trips and the time from the
//! first SYNC to the last reply (connect excluded), per page too. Every
//! round checks it got every entry once, in order.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use futures::StreamExt;
use rim_client::Client;
use rim_proto::Op;
use rim_proto::im::{Body, Code, SendReply, SendRequest, SyncRequest};
use serde::Serialize;
use tokio::time::Instant;

use crate::im_device::{self, Machine, Standalone, now_nanos};
use crate::latency::{self, Percentiles, human};
use crate::options::Output;

/// The user who catches up.
const READER: i64 = 200_000;
/// How long one reply may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Options of `rim-bench im-catchup`.
#[derive(Clone, Debug, clap::Args, Serialize)]
pub struct Args {
    #[command(flatten)]
    #[serde(flatten)]
    pub standalone: Standalone,
    /// Messages waiting for the offline user.
    #[arg(long, default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub messages: u64,
    /// Conversations they are spread over (one sender each).
    #[arg(long, default_value_t = 50,
          value_parser = clap::value_parser!(u64).range(1..=1_000))]
    pub convs: u64,
    /// SYNC page size (the server allows at most 200).
    #[arg(long, default_value_t = 200,
          value_parser = clap::value_parser!(u32).range(1..=200))]
    pub limit: u32,
    /// Catch-ups measured (each by a new device, from sync 0).
    #[arg(long, default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
    /// Unanswered SENDs per sender at most while filling the inbox.
    #[arg(long, default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub max_in_flight: u32,
    /// Message body length in bytes.
    #[arg(long, default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..=4000))]
    pub body_bytes: u64,
    #[command(flatten)]
    #[serde(flatten)]
    pub output: Output,
}

/// One catch-up.
#[derive(Debug, Serialize)]
struct Round {
    round_trips: u32,
    messages: u64,
    total_ms: f64,
    page_us: Percentiles,
    /// Each SYNC's round trip, ms, in order.
    pages_ms: Vec<f64>,
}

/// Everything the run reports (also the JSON).
#[derive(Debug, Serialize)]
struct Report {
    command: String,
    started_unix_secs: u64,
    machine: Machine,
    args: Args,
    fill_secs: f64,
    fill_msgs_per_sec: f64,
    rounds: Vec<Round>,
    round_trips: u32,
    total_ms_p50: f64,
    total_ms_max: f64,
    goal_round_trips: u32,
}

/// Runs the benchmark.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let started_unix_secs = now_nanos() / 1_000_000_000;
    let machine = Machine::now();
    let (_, cluster) = args.standalone.start_fresh().await?;
    let tcp = cluster.comets[0].tcp;
    let outcome = measure(&args, tcp).await;
    cluster.stop().await;
    let (fill_secs, rounds) = outcome?;

    let mut totals: Vec<f64> = rounds.iter().map(|r| r.total_ms).collect();
    totals.sort_by(f64::total_cmp);
    let report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        started_unix_secs,
        machine,
        fill_secs,
        fill_msgs_per_sec: args.messages as f64 / fill_secs.max(1e-9),
        round_trips: rounds.iter().map(|r| r.round_trips).max().unwrap_or(0),
        total_ms_p50: totals
            .get(totals.len().saturating_sub(1) / 2)
            .copied()
            .unwrap_or(0.0),
        total_ms_max: totals.last().copied().unwrap_or(0.0),
        goal_round_trips: 50,
        args: args.clone(),
        rounds,
    };
    println!(
        "rim-bench im-catchup: {} messages over {} conversations, SYNC limit {}",
        args.messages, args.convs, args.limit
    );
    println!("  command: {}", report.command);
    println!(
        "  filled in {:.1}s ({:.0} msg/s through rim)",
        report.fill_secs, report.fill_msgs_per_sec
    );
    for (i, r) in report.rounds.iter().enumerate() {
        println!(
            "  round {i}: {} messages in {} round trips, {:.1} ms; per page p50 {} p99 {} max {}",
            r.messages,
            r.round_trips,
            r.total_ms,
            human(r.page_us.p50),
            human(r.page_us.p99),
            human(r.page_us.max)
        );
    }
    println!(
        "  => {} round trips (goal ≤ {}), total p50 {:.1} ms, max {:.1} ms",
        report.round_trips, report.goal_round_trips, report.total_ms_p50, report.total_ms_max
    );
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

/// Each SYNC's round trip by page, one line per catch-up.
fn plot(r: &Report) -> String {
    use crate::plot::{Chart, Series, render};
    render(&[Chart {
        title: format!(
            "im-catchup: {} messages over {} conversations, SYNC limit {}",
            r.args.messages, r.args.convs, r.args.limit
        ),
        x_label: "SYNC round trip number".into(),
        y_label: "ms".into(),
        log_x: false,
        series: r
            .rounds
            .iter()
            .enumerate()
            .map(|(i, round)| Series {
                label: format!("catch-up {}", i + 1),
                points: round
                    .pages_ms
                    .iter()
                    .enumerate()
                    .map(|(n, ms)| ((n + 1) as f64, *ms))
                    .collect(),
            })
            .collect(),
    }])
}

async fn measure(args: &Args, tcp: SocketAddr) -> anyhow::Result<(f64, Vec<Round>)> {
    // ---- fill the offline user's inbox
    let convs = i64::try_from(args.convs).context("--convs")?;
    let senders: Vec<Client> = futures::stream::iter(1..=convs)
        .map(|i| im_device::device(tcp, READER + i, format!("s{i}")))
        .buffered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    eprintln!(
        "filling: {} senders × {} messages to offline user {READER}",
        args.convs,
        args.messages / args.convs
    );
    let fill_started = Instant::now();
    let mut fills = tokio::task::JoinSet::new();
    for (i, client) in senders.into_iter().enumerate() {
        let count = args.messages / args.convs + u64::from((i as u64) < args.messages % args.convs);
        fills.spawn(fill(
            client,
            count,
            args.max_in_flight as usize,
            "y".repeat(usize::try_from(args.body_bytes).unwrap_or(100)),
        ));
    }
    while let Some(joined) = fills.join_next().await {
        joined.context("fill task")??;
    }
    let fill_secs = fill_started.elapsed().as_secs_f64();
    eprintln!("filled in {fill_secs:.1}s");

    // ---- catch up
    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        let mut device = im_device::device(tcp, READER, format!("r{round}")).await?;
        let mut pages = latency::histogram();
        let mut pages_ms = Vec::new();
        let (mut cursor, mut got, mut trips) = (0u64, 0u64, 0u32);
        let max_trips =
            u32::try_from(args.messages / u64::from(args.limit) + 10).unwrap_or(u32::MAX);
        let started = Instant::now();
        loop {
            ensure!(
                trips < max_trips,
                "round {round}: still paging after {trips} round trips"
            );
            let asked = Instant::now();
            let reply = device
                .request(
                    &SyncRequest {
                        sync: cursor,
                        limit: args.limit,
                    },
                    REPLY_TIMEOUT,
                )
                .await
                .with_context(|| format!("round {round}: SYNC after {cursor}"))?;
            let took = asked.elapsed();
            pages.saturating_record((took.as_micros() as u64).max(1));
            pages_ms.push(took.as_secs_f64() * 1e3);
            trips += 1;
            ensure!(
                reply.code == Code::OK,
                "round {round}: SYNC refused: {:?} {}",
                reply.code,
                reply.error
            );
            for msg in &reply.msgs {
                cursor += 1;
                ensure!(
                    msg.sync == Some(cursor),
                    "round {round}: entry {:?} where {cursor} was due",
                    msg.sync
                );
                got += 1;
            }
            ensure!(
                reply.sync == cursor,
                "round {round}: reply sync {} ≠ {cursor}",
                reply.sync
            );
            if !reply.more {
                break;
            }
        }
        let total_ms = started.elapsed().as_secs_f64() * 1e3;
        ensure!(
            got == args.messages,
            "round {round}: caught up {got} entries of {}",
            args.messages
        );
        eprintln!("round {round}: {got} entries in {trips} round trips, {total_ms:.1} ms");
        rounds.push(Round {
            round_trips: trips,
            messages: got,
            total_ms,
            page_us: Percentiles::of(&pages),
            pages_ms,
        });
    }
    Ok((fill_secs, rounds))
}

/// Sends `count` messages to the offline reader, at most `window`
/// unanswered, and checks every reply is OK.
async fn fill(mut client: Client, count: u64, window: usize, body: String) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut in_flight: HashMap<i32, u64> = HashMap::new();
    let mut n = 0u64;
    while n < count || !in_flight.is_empty() {
        while n < count && in_flight.len() < window {
            let seq = client
                .send_im(&SendRequest {
                    cmid: format!("f{n}"),
                    to: Some(READER),
                    body: body.clone(),
                    ..SendRequest::default()
                })
                .await?;
            in_flight.insert(seq, n);
            n += 1;
        }
        let frame = tokio::time::timeout_at(deadline, client.next_frame())
            .await
            .context("filling took over 600 s")??
            .context("rim closed a sender's connection")?;
        if frame.op != Op::IM_SEND_REPLY || in_flight.remove(&frame.seq).is_none() {
            continue;
        }
        let reply = SendReply::decode(&frame.body)?;
        if reply.code != Code::OK {
            bail!("a SEND was refused: {:?} {}", reply.code, reply.error);
        }
    }
    Ok(())
}
