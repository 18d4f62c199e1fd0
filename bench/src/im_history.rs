//! `rim-bench im-history`: history pages of one big conversation through
//! `rim standalone`.
//!
//! The raw writer (`im_raw`, rim's own schema, rim's rows) fills
//! conversation `p:1:2` with `--messages` messages in `--load-batch`
//! transactions into the SQLite file rim then starts on. User 1's device
//! PULLs `--pages` newest pages (`before` = max_seq + 1, `--limit`), then
//! as many pages at random depths (`before` uniform in the conversation),
//! one request at a time; `--warmup` pages of each kind go first,
//! uncounted. Figures: p50/p99/max of PULL → PULL_REPLY per page. Every
//! page is checked: full, dense, newest first, ending just below `before`.

use std::time::Duration;

use anyhow::{Context, ensure};
use rim_client::Client;
use rim_proto::im::{Code, PullRequest};
use serde::Serialize;
use tokio::time::Instant;

use crate::cluster::Cluster;
use crate::im_device::{self, Machine, Standalone, now_nanos};
use crate::im_raw;
use crate::latency::{self, Percentiles, cdf_points, human};
use crate::options::Output;

/// The conversation read.
const CONV: &str = "p:1:2";
/// How long one reply may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Options of `rim-bench im-history`.
#[derive(Clone, Debug, clap::Args, Serialize)]
pub struct Args {
    #[command(flatten)]
    #[serde(flatten)]
    pub standalone: Standalone,
    /// Messages in the conversation.
    #[arg(long, default_value_t = 1_000_000,
          value_parser = clap::value_parser!(u64).range(100..=50_000_000))]
    pub messages: u64,
    /// Messages per transaction while loading.
    #[arg(long, default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub load_batch: u64,
    /// Message body length in bytes.
    #[arg(long, default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..=4000))]
    pub body_bytes: u64,
    /// Pages measured of each kind (newest, random depth).
    #[arg(long, default_value_t = 2_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub pages: u32,
    /// Uncounted pages before each kind.
    #[arg(long, default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub warmup: u32,
    /// Messages per page (the server allows at most 100).
    #[arg(long, default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub limit: u32,
    /// Measure on PostgreSQL instead of SQLite: a loopback URL of an empty
    /// database rim may fill (`postgres://rim@127.0.0.1:PORT/rim`). The
    /// rows are written by SQL on the server (generate_series) into the
    /// tables rim-im creates, then rim standalone starts with
    /// `im.store = postgres`.
    #[arg(long)]
    pub postgres: Option<String>,
    /// Seconds the reading may take at most, per kind.
    #[arg(long, default_value_t = 120,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub max_secs: u64,
    #[command(flatten)]
    #[serde(flatten)]
    pub output: Output,
}

/// One kind of page.
#[derive(Debug, Serialize)]
struct Pages {
    kind: &'static str,
    pages: u64,
    page_us: Percentiles,
    /// (ms, % at or below).
    cdf: Vec<(f64, f64)>,
}

/// Everything the run reports (also the JSON).
#[derive(Debug, Serialize)]
struct Report {
    command: String,
    started_unix_secs: u64,
    machine: Machine,
    args: Args,
    load: im_raw::Outcome,
    sqlite_bytes: u64,
    rim_start_secs: f64,
    results: Vec<Pages>,
    goal_p99_ms: f64,
}

/// Runs the benchmark.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let started_unix_secs = now_nanos() / 1_000_000_000;
    let machine = Machine::now();
    let log_dir = args.standalone.log_dir();
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let path = log_dir.join("im.sqlite3");
    let (load, sqlite_bytes, env) = match &args.postgres {
        None => {
            let load = load_sqlite(&args, &path).await?;
            (load, im_raw::file_bytes(&path), Vec::new())
        }
        Some(url) => {
            let load = load_postgres(&args, url).await?;
            let env = vec![
                ("RIM_IM__STORE".to_owned(), "postgres".to_owned()),
                ("RIM_IM__POSTGRES".to_owned(), url.clone()),
            ];
            (load, 0, env)
        }
    };
    eprintln!(
        "loaded in {:.1}s ({:.0} msg/s, {:.0} rows/s); starting rim standalone",
        load.secs, load.msgs_per_sec, load.rows_per_sec
    );
    let rim_started = Instant::now();
    let cluster = Cluster::standalone_with(
        &args.standalone.rim,
        args.standalone.port_base,
        &log_dir,
        &env,
    )
    .await?;
    let rim_start_secs = rim_started.elapsed().as_secs_f64();
    let tcp = cluster.comets[0].tcp;
    let outcome = async {
        let mut device = im_device::device(tcp, 1, "h1".into()).await?;
        let mut results = Vec::new();
        for kind in ["newest", "random"] {
            results.push(read_pages(&mut device, &args, kind).await?);
        }
        anyhow::Ok(results)
    }
    .await;
    cluster.stop().await;
    let results = outcome?;

    let report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        started_unix_secs,
        machine,
        args: args.clone(),
        load,
        sqlite_bytes,
        rim_start_secs,
        results,
        goal_p99_ms: if args.postgres.is_some() { 10.0 } else { 5.0 },
    };
    println!(
        "rim-bench im-history: conversation of {} messages, pages of {}",
        args.messages, args.limit
    );
    println!("  command: {}", report.command);
    println!(
        "  load: {:.1}s, {:.0} msg/s, {:.0} rows/s{}",
        report.load.secs,
        report.load.msgs_per_sec,
        report.load.rows_per_sec,
        if args.postgres.is_some() {
            " (PostgreSQL, on the server)".to_owned()
        } else {
            format!(", file {:.0} MiB", report.sqlite_bytes as f64 / 1048576.0)
        }
    );
    for r in &report.results {
        println!(
            "  {:>6} pages: {} measured, p50 {} p90 {} p99 {} max {} (goal p99 ≤ {} ms for newest pages)",
            r.kind,
            r.pages,
            human(r.page_us.p50),
            human(r.page_us.p90),
            human(r.page_us.p99),
            human(r.page_us.max),
            report.goal_p99_ms
        );
    }
    if let Some(p) = &args.output.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &args.output.svg {
        std::fs::write(p, plot(&report)).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// Fills the SQLite file with the raw writer.
async fn load_sqlite(args: &Args, path: &std::path::Path) -> anyhow::Result<im_raw::Outcome> {
    eprintln!(
        "loading {} messages into {} ({} per commit)",
        args.messages,
        path.display(),
        args.load_batch
    );
    let plan = im_raw::Plan {
        pairs: vec![(1, 2)],
        messages: args.messages,
        batch: args.load_batch,
        body_bytes: usize::try_from(args.body_bytes).unwrap_or(100),
        full_sync: true,
        max_secs: 3600.0,
    };
    let load = im_raw::write_reporting(path.to_owned(), plan, "loaded").await?;
    ensure!(
        load.messages == args.messages,
        "loaded {} messages of {}",
        load.messages,
        args.messages
    );
    Ok(load)
}

/// Creates rim's tables in an empty PostgreSQL database (through rim-im)
/// and fills them on the server with the rows rim writes for `p:1:2`:
/// messages from user 1, an inbox entry for each user, the counters, the
/// members with user 1 having read everything.
async fn load_postgres(args: &Args, url: &str) -> anyhow::Result<im_raw::Outcome> {
    use std::sync::Arc;

    use rim_im::{IdGenerator, MAX_NODE, PostgresOptions, PostgresStore};

    let parsed = reqwest::Url::parse(url).with_context(|| format!("--postgres {url}"))?;
    ensure!(
        crate::addrs::is_loopback_url(&parsed),
        "--postgres {url}: the benchmark's database is on 127.0.0.0/8 only"
    );
    let ids = Arc::new(IdGenerator::new(MAX_NODE).context("id generator")?);
    let first = ids.next();
    drop(
        PostgresStore::connect(PostgresOptions::new(url, Arc::clone(&ids)))
            .await
            .context("creating rim's tables through rim-im")?,
    );
    let (mut client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let conn = tokio::spawn(conn);
    let n = i64::try_from(args.messages).context("--messages")?;
    let existing: i64 = client
        .query_one("SELECT count(*) FROM messages", &[])
        .await?
        .get(0);
    ensure!(
        existing == 0,
        "{url} holds {existing} messages already: the benchmark needs an empty database"
    );
    let id0 = i64::try_from(first.as_u64()).context("message id")?;
    let ts = i64::try_from(first.unix_ms()).context("timestamp")?;
    let body = "x".repeat(usize::try_from(args.body_bytes).unwrap_or(100));
    eprintln!("loading {n} messages into PostgreSQL on the server");
    let cpu_before = crate::procstat::cpu_seconds(std::process::id()).unwrap_or(0.0);
    let started = std::time::Instant::now();
    let tx = client.transaction().await?;
    tx.execute(
        "INSERT INTO messages (conv, seq, id, sender, cmid, kind, body, ts) \
         SELECT 'p:1:2', s, $2::BIGINT + s, 1, 'r' || s, 0, $3, $4 \
         FROM generate_series(1::BIGINT, $1::BIGINT) AS s",
        &[&n, &id0, &body, &ts],
    )
    .await
    .context("loading messages")?;
    tx.execute(
        "INSERT INTO inbox (mid, sync, conv, seq) \
         SELECT m, s, 'p:1:2', s FROM generate_series(1::BIGINT, $1::BIGINT) AS s, \
         (VALUES (1::BIGINT), (2::BIGINT)) AS v(m)",
        &[&n],
    )
    .await
    .context("loading inbox entries")?;
    tx.execute(
        "INSERT INTO convs (conv, max_seq, last_ts) VALUES ('p:1:2', $1, $2)",
        &[&n, &ts],
    )
    .await?;
    tx.execute(
        "INSERT INTO members (conv, mid, read_seq) VALUES ('p:1:2', 1, $1), ('p:1:2', 2, 0)",
        &[&n],
    )
    .await?;
    tx.execute(
        "INSERT INTO users (mid, max_sync) VALUES (1, $1), (2, $1)",
        &[&n],
    )
    .await?;
    tx.commit().await.context("committing the load")?;
    client.batch_execute("ANALYZE").await?;
    let secs = started.elapsed().as_secs_f64();
    drop(client);
    let _ = conn.await;
    let rows = args.messages * 3 + 5;
    Ok(im_raw::Outcome {
        messages: args.messages,
        rows,
        commits: 1,
        batch: args.messages,
        secs,
        msgs_per_sec: args.messages as f64 / secs.max(1e-9),
        rows_per_sec: rows as f64 / secs.max(1e-9),
        commits_per_sec: 1.0 / secs.max(1e-9),
        cpu_seconds: crate::procstat::cpu_seconds(std::process::id()).unwrap_or(cpu_before)
            - cpu_before,
        write_bytes: None,
        journal_mode: "postgresql".into(),
        synchronous: 0,
        file_bytes: 0,
    })
}

/// Reads warmup + `--pages` pages of `kind` and summarizes the measured
/// ones.
async fn read_pages(device: &mut Client, args: &Args, kind: &'static str) -> anyhow::Result<Pages> {
    let max_seq = args.messages;
    let limit = u64::from(args.limit);
    let mut rng = im_device::XorShift::new(now_nanos());
    let mut hist = latency::histogram();
    let deadline = Instant::now() + Duration::from_secs(args.max_secs);
    let total = u64::from(args.warmup) + u64::from(args.pages);
    let mut done = 0u64;
    while done < total && Instant::now() < deadline {
        let before = match kind {
            "newest" => max_seq + 1,
            // Full pages only: before in (limit, max_seq + 1].
            _ => limit + 1 + rng.below(max_seq - limit + 1),
        };
        let asked = Instant::now();
        let reply = device
            .request(
                &PullRequest {
                    conv: CONV.into(),
                    before: Some(before),
                    after: None,
                    limit: args.limit,
                },
                REPLY_TIMEOUT,
            )
            .await
            .with_context(|| format!("PULL before {before}"))?;
        let micros = (asked.elapsed().as_micros() as u64).max(1);
        ensure!(
            reply.code == Code::OK,
            "PULL refused: {:?} {}",
            reply.code,
            reply.error
        );
        ensure!(
            reply.max_seq == max_seq,
            "max_seq {} ≠ {max_seq}",
            reply.max_seq
        );
        let seqs: Vec<u64> = reply.msgs.iter().map(|m| m.seq).collect();
        let want: Vec<u64> = (before - limit..before).rev().collect();
        ensure!(seqs == want, "PULL before {before} answered seqs {seqs:?}");
        if done >= u64::from(args.warmup) {
            hist.saturating_record(micros);
        }
        done += 1;
    }
    eprintln!("{kind}: {} pages read", hist.len());
    Ok(Pages {
        kind,
        pages: hist.len(),
        page_us: Percentiles::of(&hist),
        cdf: cdf_points(&hist, 200),
    })
}

fn plot(r: &Report) -> String {
    use crate::plot::{Chart, Series, render};
    render(&[Chart {
        title: format!(
            "im-history: PULL of {} messages from a {}-message conversation ({})",
            r.args.limit,
            r.args.messages,
            if r.args.postgres.is_some() {
                "PostgreSQL"
            } else {
                "SQLite"
            }
        ),
        x_label: "PULL → PULL_REPLY, ms (log)".into(),
        y_label: "% of pages".into(),
        log_x: true,
        series: r
            .results
            .iter()
            .map(|p| Series {
                label: format!("{} pages", p.kind),
                points: p.cdf.clone(),
            })
            .collect(),
    }])
}
