//! `rim-bench im-store`: the IM message store alone, no sockets — what one
//! PostgreSQL primary (or a few, sharded) stores per message and per
//! second.
//!
//! The benchmark opens rim-im's store directly: one `--postgres` URL is a
//! `PostgresStore`, several are a `ShardedStore` over `ShardMap::even(n)`.
//! It creates a schema of its own on each server (`CREATE SCHEMA`, then
//! `options=-csearch_path%3D<schema>` on the store's URL, as the tests do)
//! and drops it at the end unless `--keep`. Each `--scenario` runs
//! `--senders` concurrent tasks for `--seconds`, each sending 100-byte
//! messages one after the other (the store batches them into shared
//! commits) to conversations picked at random, so batches mix:
//!
//! - `one-to-one`: pairs of users (user 2i+1 with 2i+2);
//! - `group:N`: `--groups` groups of N members (inbox diffusion: N inbox
//!   rows per message);
//! - `big:N`: `--big-groups` big groups of N members (read diffusion: no
//!   inbox rows).
//!
//! Per scenario: messages/s acknowledged, inbox rows/s, commits and
//! messages per commit, send latency, and per message the growth of each
//! table (`pg_total_relation_size`: heap, TOAST and indexes; the window
//! starts after a CHECKPOINT), the WAL written (`pg_current_wal_lsn`
//! difference, the whole server's) and, with `--pg-pid`, PostgreSQL's CPU
//! (the postmasters and their children). The servers should be the
//! benchmark's own: WAL and CPU are counted server-wide.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use rim_im::{
    ConvId, Draft, GroupSpec, IdGenerator, MAX_NODE, MessageStore, PostgresOptions, PostgresStore,
    ShardMap, ShardedStore,
};
use serde::{Serialize, Serializer};
use tokio::time::Instant;

use crate::im_device::{Machine, XorShift, now_nanos};
use crate::latency::{self, Percentiles, human};
use crate::procstat::{self, TreeSnapshot, Watched};

/// Body length of every message, bytes.
const BODY_BYTES: usize = 100;
/// Members added per membership call while setting groups up.
const MEMBERS_PER_CALL: usize = 1000;
/// How long the senders may take to finish their last send after the
/// window (a send fails after the store timeout, 5 s, anyway).
const DRAIN: Duration = Duration::from_secs(30);
/// The tables whose growth is reported, in this order.
const TABLES: [&str; 7] = [
    "messages",
    "inbox",
    "inbox_remote",
    "inbox_outbox",
    "users",
    "convs",
    "members",
];

/// What the senders send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// 1:1 conversations.
    OneToOne,
    /// Groups of this many members, inbox diffusion.
    Group(u32),
    /// Big groups of this many members, read diffusion.
    Big(u32),
}

impl Scenario {
    /// Members of each conversation.
    fn members(self) -> u32 {
        match self {
            Scenario::OneToOne => 2,
            Scenario::Group(n) | Scenario::Big(n) => n,
        }
    }
}

impl std::fmt::Display for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scenario::OneToOne => f.write_str("one-to-one"),
            Scenario::Group(n) => write!(f, "group:{n}"),
            Scenario::Big(n) => write!(f, "big:{n}"),
        }
    }
}

impl Serialize for Scenario {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Parses `one-to-one`, `group:N` (2 ≤ N ≤ 1000) or `big:N` (2 ≤ N ≤ 100,000).
pub fn parse_scenario(arg: &str) -> Result<Scenario, String> {
    if arg == "one-to-one" {
        return Ok(Scenario::OneToOne);
    }
    let (kind, n) = arg
        .split_once(':')
        .ok_or_else(|| format!("expected one-to-one, group:N or big:N, got {arg:?}"))?;
    let n: u32 = n
        .parse()
        .map_err(|_| format!("{n:?} is not a member count"))?;
    match kind {
        "group" if (2..=1000).contains(&n) => Ok(Scenario::Group(n)),
        "big" if (2..=100_000).contains(&n) => Ok(Scenario::Big(n)),
        "group" => Err(format!("group:{n}: a group has 2 to 1000 members here")),
        "big" => Err(format!("big:{n}: a big group has 2 to 100000 members here")),
        _ => Err(format!(
            "expected one-to-one, group:N or big:N, got {arg:?}"
        )),
    }
}

/// Options of `rim-bench im-store`.
#[derive(Clone, Debug, clap::Args, Serialize)]
pub struct Args {
    /// A loopback PostgreSQL URL the benchmark may create a schema on
    /// (`postgres://postgres@127.0.0.1:PORT/postgres`); repeat it for a
    /// store sharded over several primaries (`ShardMap::even(n)`).
    #[arg(long = "postgres", required = true)]
    pub postgres: Vec<String>,
    /// Concurrent sending tasks.
    #[arg(long, default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub senders: u32,
    /// Seconds each scenario sends for.
    #[arg(long, default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(1..=600))]
    pub seconds: u64,
    /// What to send: one-to-one, group:N (inbox diffusion) or big:N (read
    /// diffusion); repeat for several, run in order on the same schema.
    #[arg(long = "scenario", value_parser = parse_scenario,
          default_values_t = [Scenario::OneToOne, Scenario::Group(20), Scenario::Group(200), Scenario::Big(10_000)])]
    pub scenarios: Vec<Scenario>,
    /// Users the conversations are spread over (mids 1..=users).
    #[arg(long, default_value_t = 20_000,
          value_parser = clap::value_parser!(u64).range(2..=10_000_000))]
    pub users: u64,
    /// Groups per `group:N` scenario.
    #[arg(long, default_value_t = 200,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub groups: u64,
    /// Big groups per `big:N` scenario.
    #[arg(long, default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub big_groups: u64,
    /// Pooled connections of each primary's store (rim's default: 8).
    #[arg(long, default_value_t = 8,
          value_parser = clap::value_parser!(u64).range(1..=256))]
    pub pool_size: u64,
    /// PID of a PostgreSQL postmaster to count the CPU of (with its
    /// children: backends, WAL writer, checkpointer); repeatable.
    #[arg(long = "pg-pid")]
    pub pg_pids: Vec<u32>,
    /// Leave the schemas and their rows in place.
    #[arg(long)]
    pub keep: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// One table's growth over a scenario's window, all primaries together.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Growth {
    /// The table.
    pub table: &'static str,
    /// Rows added (count after − before; 0 for a table emptied again).
    pub rows: i64,
    /// Bytes added: heap, TOAST and indexes.
    pub bytes: i64,
    /// `bytes` per message stored in the window.
    pub bytes_per_message: Option<f64>,
    /// `bytes` per row added.
    pub bytes_per_row: Option<f64>,
}

/// `a / b`, or `None` when `b` is 0.
pub fn per(a: f64, b: f64) -> Option<f64> {
    (b != 0.0).then(|| a / b)
}

/// The growth of every table from `before` to `after` (each a (rows,
/// bytes) per table of [`TABLES`]), per one of `messages` messages.
pub fn growth(before: &[(i64, i64)], after: &[(i64, i64)], messages: i64) -> Vec<Growth> {
    TABLES
        .iter()
        .zip(before.iter().zip(after))
        .map(|(table, ((rows0, bytes0), (rows1, bytes1)))| {
            let rows = rows1 - rows0;
            let bytes = bytes1 - bytes0;
            Growth {
                table,
                rows,
                bytes,
                bytes_per_message: per(bytes as f64, messages as f64),
                bytes_per_row: per(bytes as f64, rows as f64),
            }
        })
        .collect()
}

/// What one scenario measured.
#[derive(Debug, Serialize)]
struct Outcome {
    scenario: Scenario,
    primaries: usize,
    /// Members per conversation.
    members: u32,
    /// Conversations the sends were spread over.
    conversations: u64,
    senders: u32,
    /// From the first send to the last reply.
    secs: f64,
    /// Sends acknowledged (not duplicates).
    messages: u64,
    /// Inbox entries the acknowledgements carried.
    inbox_rows: u64,
    /// Entries left to the relay (sharded: the other primary did not
    /// append in time).
    pending: u64,
    duplicates: u64,
    errors: u64,
    first_error: Option<String>,
    msgs_per_sec: f64,
    inbox_rows_per_sec: f64,
    /// Messages + inbox rows per second.
    rows_per_sec: f64,
    /// Inbox rows per message.
    inbox_amplification: Option<f64>,
    commits: u64,
    commits_per_sec: f64,
    msgs_per_commit: Option<f64>,
    send_us: Percentiles,
    /// Messages stored in the window (count of `messages` after − before).
    stored_messages: i64,
    tables: Vec<Growth>,
    /// Every table's growth per message.
    total_bytes_per_message: Option<f64>,
    wal_bytes: f64,
    wal_bytes_per_message: Option<f64>,
    /// Full-page images in the WAL (pg_stat_wal; its counters lag by up to
    /// a second).
    wal_fpi: Option<i64>,
    /// PostgreSQL CPU (postmasters and children), when `--pg-pid` given.
    pg_cpu_seconds: Option<f64>,
    pg_cores: Option<f64>,
    pg_cpu_us_per_message: Option<f64>,
    /// This process's CPU (the store's client side included).
    bench_cpu_seconds: Option<f64>,
    /// Cores busy on the whole box.
    box_busy_cores: Option<f64>,
    load_average_start: Option<f64>,
    load_average_end: Option<f64>,
    /// The CHECKPOINT before the window ran on every primary.
    checkpointed: bool,
}

/// Everything the run reports (also the JSON).
#[derive(Debug, Serialize)]
struct Report {
    command: String,
    started_unix_secs: u64,
    machine: Machine,
    args: Args,
    schema: String,
    server_version: String,
    results: Vec<Outcome>,
}

/// One primary as the benchmark sees it besides the store.
struct Primary {
    /// The URL given.
    url: String,
    /// The URL with the schema's search_path.
    schema_url: String,
    client: tokio_postgres::Client,
    conn: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
}

/// Adds `options=-csearch_path%3D<schema>` to `url`.
pub fn with_schema(url: &str, schema: &str) -> anyhow::Result<String> {
    ensure!(
        !url.contains("options="),
        "--postgres {url}: the benchmark sets options= itself (search_path)"
    );
    let separator = if url.contains('?') { '&' } else { '?' };
    Ok(format!("{url}{separator}options=-csearch_path%3D{schema}"))
}

impl Primary {
    async fn open(url: &str, schema: &str) -> anyhow::Result<Primary> {
        let parsed = reqwest::Url::parse(url).with_context(|| format!("--postgres {url}"))?;
        ensure!(
            crate::addrs::is_loopback_url(&parsed),
            "--postgres {url}: the benchmark's database is on 127.0.0.0/8 only"
        );
        let schema_url = with_schema(url, schema)?;
        let (client, conn) = tokio_postgres::connect(&schema_url, tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connecting to {url}"))?;
        let conn = tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .with_context(|| format!("creating schema {schema} on {url}"))?;
        Ok(Primary {
            url: url.to_owned(),
            schema_url,
            client,
            conn,
        })
    }

    /// (rows, bytes) of every table of [`TABLES`].
    async fn tables(&self) -> anyhow::Result<Vec<(i64, i64)>> {
        let mut out = Vec::with_capacity(TABLES.len());
        for table in TABLES {
            let row = self
                .client
                .query_one(
                    &format!(
                        "SELECT (SELECT count(*) FROM {table}), \
                         coalesce(pg_total_relation_size(to_regclass($1)), 0)::int8"
                    ),
                    &[&table],
                )
                .await
                .with_context(|| format!("measuring {table} on {}", self.url))?;
            out.push((row.try_get(0)?, row.try_get(1)?));
        }
        Ok(out)
    }

    /// The WAL position in bytes.
    async fn wal(&self) -> anyhow::Result<f64> {
        Ok(self
            .client
            .query_one(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8",
                &[],
            )
            .await
            .with_context(|| format!("reading the WAL position of {}", self.url))?
            .try_get(0)?)
    }

    /// Full-page images written so far, if the server says.
    async fn wal_fpi(&self) -> Option<i64> {
        self.client
            .query_one("SELECT wal_fpi FROM pg_stat_wal", &[])
            .await
            .ok()?
            .try_get(0)
            .ok()
    }

    /// Runs a CHECKPOINT; false when refused (not a superuser).
    async fn checkpoint(&self) -> bool {
        match self.client.batch_execute("CHECKPOINT").await {
            Ok(()) => true,
            Err(err) => {
                eprintln!("CHECKPOINT on {}: {err}", self.url);
                false
            }
        }
    }
}

/// Sums (rows, bytes) over primaries, table by table.
fn sum_tables(per_primary: &[Vec<(i64, i64)>]) -> Vec<(i64, i64)> {
    let mut sum = vec![(0, 0); TABLES.len()];
    for tables in per_primary {
        for (s, (rows, bytes)) in sum.iter_mut().zip(tables) {
            s.0 += rows;
            s.1 += bytes;
        }
    }
    sum
}

/// Who sends where in one scenario.
struct Plan {
    scenario: Scenario,
    users: u64,
    /// Group conversations (empty for 1:1).
    groups: Vec<ConvId>,
    /// 1:1 pairs: users 2i+1 and 2i+2.
    pairs: u64,
    run: u64,
    body: String,
}

/// Member `j` of group `k` of `n` members among `users`: consecutive
/// windows of users, wrapping.
pub fn group_member(k: u64, j: u64, n: u64, users: u64) -> i64 {
    ((k * n + j) % users + 1) as i64
}

impl Plan {
    /// A random conversation and one of its members as the sender.
    fn pick(&self, rng: &mut XorShift) -> anyhow::Result<(ConvId, i64)> {
        match self.scenario {
            Scenario::OneToOne => {
                let i = rng.below(self.pairs);
                let (a, b) = ((2 * i + 1) as i64, (2 * i + 2) as i64);
                let from = if rng.below(2) == 0 { a } else { b };
                Ok((ConvId::peer(a, b)?, from))
            }
            Scenario::Group(n) | Scenario::Big(n) => {
                let k = rng.below(self.groups.len() as u64);
                let j = rng.below(u64::from(n));
                Ok((
                    self.groups[k as usize].clone(),
                    group_member(k, j, u64::from(n), self.users),
                ))
            }
        }
    }
}

/// Counters the senders share.
#[derive(Default)]
struct Counters {
    messages: AtomicU64,
    inbox: AtomicU64,
    pending: AtomicU64,
    duplicates: AtomicU64,
    errors: AtomicU64,
    first_error: parking_lot::Mutex<Option<String>>,
}

/// Runs the benchmark.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let started_unix_secs = now_nanos() / 1_000_000_000;
    let machine = Machine::now();
    let schema = format!(
        "rim_bench_store_{}_{}",
        std::process::id(),
        started_unix_secs
    );
    let mut primaries = Vec::with_capacity(args.postgres.len());
    for url in &args.postgres {
        primaries.push(Primary::open(url, &schema).await?);
    }
    let outcome = measure(&args, &primaries).await;
    if args.keep {
        eprintln!("kept schema {schema}");
    } else {
        for p in &primaries {
            if let Err(err) = p
                .client
                .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
                .await
            {
                eprintln!("dropping schema {schema} on {}: {err}", p.url);
            }
        }
    }
    let server_version = match primaries.first() {
        Some(p) => p
            .client
            .query_one("SHOW server_version", &[])
            .await
            .ok()
            .and_then(|r| r.try_get::<_, String>(0).ok())
            .unwrap_or_default(),
        None => String::new(),
    };
    for p in primaries {
        drop(p.client);
        let _ = p.conn.await;
    }
    let results = outcome?;
    let report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        started_unix_secs,
        machine,
        args: args.clone(),
        schema,
        server_version,
        results,
    };
    print_report(&report);
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// Opens the store and runs every scenario.
async fn measure(args: &Args, primaries: &[Primary]) -> anyhow::Result<Vec<Outcome>> {
    let ids = Arc::new(IdGenerator::new(MAX_NODE).context("id generator")?);
    let options: Vec<PostgresOptions> = primaries
        .iter()
        .map(|p| {
            let mut o = PostgresOptions::new(p.schema_url.clone(), Arc::clone(&ids));
            o.pool_size = usize::try_from(args.pool_size).unwrap_or(8);
            o
        })
        .collect();
    let store: Arc<dyn MessageStore> = if options.len() == 1 {
        let Some(o) = options.into_iter().next() else {
            bail!("no --postgres");
        };
        Arc::new(
            PostgresStore::connect(o)
                .await
                .context("opening the store")?,
        )
    } else {
        let map = ShardMap::even(options.len()).context("shard map")?;
        Arc::new(
            ShardedStore::connect(options, map)
                .await
                .context("opening the sharded store")?,
        )
    };
    let watched: Vec<Watched> = args
        .pg_pids
        .iter()
        .enumerate()
        .map(|(i, &pid)| Watched {
            name: format!("postgres-{i}"),
            pid,
        })
        .collect();
    let mut results = Vec::new();
    for (index, &scenario) in args.scenarios.iter().enumerate() {
        ensure!(
            u64::from(scenario.members()) <= args.users,
            "{scenario}: more members than --users {}",
            args.users
        );
        let plan = setup(args, store.as_ref(), scenario, index).await?;
        let outcome = scenario_run(args, &store, primaries, &watched, plan).await?;
        eprintln!(
            "{scenario}: {:.0} msg/s, {:.0} inbox rows/s, {:.1} msg/commit, p99 {}",
            outcome.msgs_per_sec,
            outcome.inbox_rows_per_sec,
            outcome.msgs_per_commit.unwrap_or(0.0),
            human(outcome.send_us.p99)
        );
        results.push(outcome);
    }
    drop(store);
    Ok(results)
}

/// Creates the scenario's groups and their members.
async fn setup(
    args: &Args,
    store: &dyn MessageStore,
    scenario: Scenario,
    index: usize,
) -> anyhow::Result<Plan> {
    let (count, big) = match scenario {
        Scenario::OneToOne => (0, false),
        Scenario::Group(_) => (args.groups, false),
        Scenario::Big(_) => (args.big_groups, true),
    };
    let n = u64::from(scenario.members());
    let mut groups = Vec::new();
    if count > 0 {
        eprintln!("{scenario}: creating {count} groups of {n} members");
    }
    for k in 0..count {
        let conv = ConvId::group(&format!("s{index}-{k}"))?;
        store
            .put_group(
                &conv,
                GroupSpec {
                    name: format!("{scenario} #{k}"),
                    max_members: scenario.members(),
                    big,
                },
            )
            .await
            .with_context(|| format!("creating {conv}"))?;
        let mids: Vec<i64> = (0..n).map(|j| group_member(k, j, n, args.users)).collect();
        for chunk in mids.chunks(MEMBERS_PER_CALL) {
            store
                .change_members(&conv, chunk, &[])
                .await
                .with_context(|| format!("adding members to {conv}"))?;
        }
        groups.push(conv);
    }
    Ok(Plan {
        scenario,
        users: args.users,
        groups,
        pairs: args.users / 2,
        run: now_nanos(),
        body: "x".repeat(BODY_BYTES),
    })
}

/// Sends for the window and measures.
async fn scenario_run(
    args: &Args,
    store: &Arc<dyn MessageStore>,
    primaries: &[Primary],
    watched: &[Watched],
    plan: Plan,
) -> anyhow::Result<Outcome> {
    let scenario = plan.scenario;
    let conversations = match scenario {
        Scenario::OneToOne => plan.pairs,
        _ => plan.groups.len() as u64,
    };
    let mut checkpointed = true;
    for p in primaries {
        checkpointed &= p.checkpoint().await;
    }
    let mut before = Vec::new();
    let mut wal0 = 0.0;
    let mut fpi0 = Some(0);
    for p in primaries {
        before.push(p.tables().await?);
        wal0 += p.wal().await?;
        fpi0 = fpi0.zip(p.wal_fpi().await).map(|(a, b)| a + b);
    }
    let load_average_start = procstat::load_average();
    let commits0 = store.commits();
    let cpu0 = TreeSnapshot::take(watched);
    let bench0 = procstat::cpu_seconds(std::process::id());
    let box0 = procstat::box_ticks();
    let counters = Arc::new(Counters::default());
    let plan = Arc::new(plan);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    for task in 0..args.senders {
        tasks.push(tokio::spawn(sender(
            Arc::clone(store),
            Arc::clone(&plan),
            Arc::clone(&counters),
            task,
            deadline,
        )));
    }
    let ticker = {
        let counters = Arc::clone(&counters);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(
                Instant::now() + Duration::from_secs(1),
                Duration::from_secs(1),
            );
            let mut last = 0;
            loop {
                tick.tick().await;
                let now = counters.messages.load(Ordering::Relaxed);
                eprintln!(
                    "{scenario}: {} msg/s, {} stored, {} errors",
                    now - last,
                    now,
                    counters.errors.load(Ordering::Relaxed)
                );
                last = now;
            }
        })
    };
    let mut hist = latency::histogram();
    let joined = tokio::time::timeout_at(deadline + DRAIN, futures::future::join_all(tasks)).await;
    ticker.abort();
    let Ok(joined) = joined else {
        bail!("{scenario}: senders still busy {DRAIN:?} after the window");
    };
    for h in joined {
        hist.add(h.context("a sender panicked")?)
            .context("merging histograms")?;
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu1 = TreeSnapshot::take(watched);
    let bench1 = procstat::cpu_seconds(std::process::id());
    let box1 = procstat::box_ticks();
    let commits = store.commits() - commits0;
    let load_average_end = procstat::load_average();
    let mut after = Vec::new();
    let mut wal1 = 0.0;
    let mut fpi1 = Some(0);
    for p in primaries {
        wal1 += p.wal().await?;
        fpi1 = fpi1.zip(p.wal_fpi().await).map(|(a, b)| a + b);
    }
    for p in primaries {
        after.push(p.tables().await?);
    }
    let before = sum_tables(&before);
    let after = sum_tables(&after);
    let stored_messages = after[0].0 - before[0].0;
    let tables = growth(&before, &after, stored_messages);
    let total_bytes: i64 = tables.iter().map(|g| g.bytes).sum();
    let messages = counters.messages.load(Ordering::Relaxed);
    let inbox_rows = counters.inbox.load(Ordering::Relaxed);
    let pg_cpu_seconds = (!watched.is_empty()).then(|| {
        cpu0.used_until(&cpu1, secs)
            .iter()
            .map(|u| u.cpu_seconds)
            .sum::<f64>()
    });
    let wal_bytes = wal1 - wal0;
    let first_error = counters.first_error.lock().clone();
    Ok(Outcome {
        scenario,
        primaries: primaries.len(),
        members: scenario.members(),
        conversations,
        senders: args.senders,
        secs,
        messages,
        inbox_rows,
        pending: counters.pending.load(Ordering::Relaxed),
        duplicates: counters.duplicates.load(Ordering::Relaxed),
        errors: counters.errors.load(Ordering::Relaxed),
        first_error,
        msgs_per_sec: messages as f64 / secs,
        inbox_rows_per_sec: inbox_rows as f64 / secs,
        rows_per_sec: (messages + inbox_rows) as f64 / secs,
        inbox_amplification: per(inbox_rows as f64, messages as f64),
        commits,
        commits_per_sec: commits as f64 / secs,
        msgs_per_commit: per(messages as f64, commits as f64),
        send_us: Percentiles::of(&hist),
        stored_messages,
        total_bytes_per_message: per(total_bytes as f64, stored_messages as f64),
        tables,
        wal_bytes,
        wal_bytes_per_message: per(wal_bytes, stored_messages as f64),
        wal_fpi: fpi1.zip(fpi0).map(|(b, a)| b - a),
        pg_cpu_seconds,
        pg_cores: pg_cpu_seconds.map(|c| c / secs),
        pg_cpu_us_per_message: pg_cpu_seconds.and_then(|c| per(c * 1e6, messages as f64)),
        bench_cpu_seconds: bench0.zip(bench1).map(|(a, b)| b - a),
        box_busy_cores: box0
            .zip(box1)
            .and_then(|(a, b)| procstat::box_busy_cores(a, b, secs)),
        load_average_start,
        load_average_end,
        checkpointed,
    })
}

/// One sending task: sends one message after the other until the
/// deadline; returns its latency histogram (µs).
async fn sender(
    store: Arc<dyn MessageStore>,
    plan: Arc<Plan>,
    counters: Arc<Counters>,
    task: u32,
    deadline: Instant,
) -> hdrhistogram::Histogram<u64> {
    let mut hist = latency::histogram();
    let mut rng = XorShift::new(plan.run ^ (u64::from(task) + 1).wrapping_mul(0x9e37_79b9));
    let mut n: u64 = 0;
    while Instant::now() < deadline {
        n += 1;
        // 34 characters, about a UUID's 36.
        let cmid = format!("{:016x}-{task:04}-{n:012}", plan.run);
        let draft = plan.pick(&mut rng).and_then(|(conv, from)| {
            Ok(Draft::new(
                conv,
                from,
                cmid,
                0,
                plan.body.clone(),
                BODY_BYTES,
            )?)
        });
        let draft = match draft {
            Ok(draft) => draft,
            Err(err) => {
                note_error(&counters, format!("{err:#}"));
                break;
            }
        };
        let asked = Instant::now();
        match store.send(draft).await {
            Ok(sent) if sent.duplicate => {
                counters.duplicates.fetch_add(1, Ordering::Relaxed);
            }
            Ok(sent) => {
                hist.saturating_record((asked.elapsed().as_micros() as u64).max(1));
                counters.messages.fetch_add(1, Ordering::Relaxed);
                counters
                    .inbox
                    .fetch_add(sent.inbox.len() as u64, Ordering::Relaxed);
                counters
                    .pending
                    .fetch_add(sent.pending.len() as u64, Ordering::Relaxed);
            }
            Err(err) => note_error(&counters, err.to_string()),
        }
    }
    hist
}

fn note_error(counters: &Counters, err: String) {
    counters.errors.fetch_add(1, Ordering::Relaxed);
    counters.first_error.lock().get_or_insert(err);
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"))
}

fn print_report(r: &Report) {
    println!(
        "rim-bench im-store: {} primar{} (PostgreSQL {}), {} senders, {} s per scenario, {}-byte bodies",
        r.args.postgres.len(),
        if r.args.postgres.len() == 1 {
            "y"
        } else {
            "ies"
        },
        r.server_version,
        r.args.senders,
        r.args.seconds,
        BODY_BYTES
    );
    println!("  command: {}", r.command);
    for o in &r.results {
        println!(
            "  {}: {} msg/s, {} inbox rows/s ({} per message), {} commits/s, {} msg/commit, send p50 {} p99 {}, errors {}, pending {}, load {}→{}",
            o.scenario,
            o.msgs_per_sec.round(),
            o.inbox_rows_per_sec.round(),
            opt(o.inbox_amplification, 1),
            o.commits_per_sec.round(),
            opt(o.msgs_per_commit, 2),
            human(o.send_us.p50),
            human(o.send_us.p99),
            o.errors,
            o.pending,
            opt(o.load_average_start, 2),
            opt(o.load_average_end, 2),
        );
        let bytes: Vec<String> = o
            .tables
            .iter()
            .filter(|g| g.bytes != 0 || g.rows != 0)
            .map(|g| {
                format!(
                    "{} {} B/msg ({} rows, {} B/row)",
                    g.table,
                    opt(g.bytes_per_message, 0),
                    g.rows,
                    opt(g.bytes_per_row, 0)
                )
            })
            .collect();
        println!("    per message: {}", bytes.join("; "));
        println!(
            "    all tables {} B/msg, WAL {} B/msg ({} full-page images), PostgreSQL CPU {} µs/msg ({} cores), box {} cores busy",
            opt(o.total_bytes_per_message, 0),
            opt(o.wal_bytes_per_message, 0),
            o.wal_fpi.map_or_else(|| "-".to_owned(), |f| f.to_string()),
            opt(o.pg_cpu_us_per_message, 0),
            opt(o.pg_cores, 2),
            opt(o.box_busy_cores, 2),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_scenarios_and_refuses_the_rest() {
        assert_eq!(parse_scenario("one-to-one"), Ok(Scenario::OneToOne));
        assert_eq!(parse_scenario("group:20"), Ok(Scenario::Group(20)));
        assert_eq!(parse_scenario("big:10000"), Ok(Scenario::Big(10_000)));
        for bad in [
            "",
            "group",
            "group:",
            "group:1",
            "group:1001",
            "big:1",
            "big:x",
            "small:5",
            "1:1",
        ] {
            assert!(parse_scenario(bad).is_err(), "{bad:?} accepted");
        }
        for s in [Scenario::OneToOne, Scenario::Group(7), Scenario::Big(600)] {
            assert_eq!(parse_scenario(&s.to_string()), Ok(s));
        }
        assert_eq!(
            serde_json::to_value(Scenario::Group(20)).unwrap(),
            serde_json::json!("group:20")
        );
        assert_eq!(
            (
                Scenario::OneToOne.members(),
                Scenario::Group(20).members(),
                Scenario::Big(9).members()
            ),
            (2, 20, 9)
        );
    }

    #[test]
    fn growth_is_per_table_per_message_and_per_row() {
        let before = [
            (10, 1000),
            (20, 500),
            (0, 0),
            (0, 8192),
            (5, 100),
            (1, 1),
            (2, 2),
        ];
        let after = [
            (110, 41_000),
            (2020, 222_500),
            (0, 0),
            (0, 8192),
            (5, 900),
            (1, 1),
            (2, 2),
        ];
        let g = growth(&before, &after, 100);
        assert_eq!(g.len(), TABLES.len());
        assert_eq!(
            (g[0].table, g[0].rows, g[0].bytes),
            ("messages", 100, 40_000)
        );
        assert_eq!(g[0].bytes_per_message, Some(400.0));
        assert_eq!(g[0].bytes_per_row, Some(400.0));
        assert_eq!(
            (g[1].table, g[1].rows, g[1].bytes),
            ("inbox", 2000, 222_000)
        );
        assert_eq!(g[1].bytes_per_message, Some(2220.0));
        assert_eq!(g[1].bytes_per_row, Some(111.0));
        // No rows: no per-row figure, a per-message one of 0.
        assert_eq!(g[3].bytes_per_row, None);
        assert_eq!(g[3].bytes_per_message, Some(0.0));
        // Updated in place: bytes without rows.
        assert_eq!((g[4].rows, g[4].bytes, g[4].bytes_per_row), (0, 800, None));
        assert_eq!(growth(&before, &after, 0)[0].bytes_per_message, None);
        assert_eq!(per(3.0, 0.0), None);
        assert_eq!(per(3.0, 2.0), Some(1.5));
    }

    #[test]
    fn sums_tables_over_primaries() {
        let a = vec![(1, 10); TABLES.len()];
        let b = vec![(2, 5); TABLES.len()];
        assert_eq!(sum_tables(&[a, b]), vec![(3, 15); TABLES.len()]);
        assert_eq!(sum_tables(&[]), vec![(0, 0); TABLES.len()]);
    }

    #[test]
    fn groups_are_windows_of_users_and_pairs_are_members() {
        let members: Vec<i64> = (0..5).map(|j| group_member(1, j, 5, 12)).collect();
        assert_eq!(members, [6, 7, 8, 9, 10]);
        // Wraps around the users, never 0 or above them.
        let members: Vec<i64> = (0..5).map(|j| group_member(2, j, 5, 12)).collect();
        assert_eq!(members, [11, 12, 1, 2, 3]);
        let plan = Plan {
            scenario: Scenario::OneToOne,
            users: 10,
            groups: Vec::new(),
            pairs: 5,
            run: 1,
            body: String::new(),
        };
        let mut rng = XorShift::new(3);
        for _ in 0..200 {
            let (conv, from) = plan.pick(&mut rng).unwrap();
            assert!(conv.is_peer_of(from), "{conv} from {from}");
            assert!((1..=10).contains(&from));
        }
        let plan = Plan {
            scenario: Scenario::Group(4),
            users: 10,
            groups: vec![ConvId::group("a").unwrap(), ConvId::group("b").unwrap()],
            pairs: 5,
            run: 1,
            body: String::new(),
        };
        for _ in 0..200 {
            let (conv, from) = plan.pick(&mut rng).unwrap();
            let k = if conv == plan.groups[0] { 0 } else { 1 };
            assert!((0..4).any(|j| group_member(k, j, 4, 10) == from));
        }
    }

    #[test]
    fn the_schema_rides_on_the_url() {
        assert_eq!(
            with_schema("postgres://u@127.0.0.1:1/db", "s").unwrap(),
            "postgres://u@127.0.0.1:1/db?options=-csearch_path%3Ds"
        );
        assert_eq!(
            with_schema("postgres://u@127.0.0.1:1/db?sslmode=disable", "s").unwrap(),
            "postgres://u@127.0.0.1:1/db?sslmode=disable&options=-csearch_path%3Ds"
        );
        assert!(with_schema("postgres://u@127.0.0.1:1/db?options=-cx%3Dy", "s").is_err());
    }
}
