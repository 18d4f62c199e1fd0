//! `rim-bench connections`: how many idle connections rim holds and what
//! each costs. Starts one `rim logic` and K `rim comet` processes (each its
//! own process with its own ports) — or, with `--standalone`, one
//! `rim standalone` whose whole RSS is measured — then P load-generator processes (at most
//! `--per-process` clients each, from their own 127.x source addresses)
//! that connect, authenticate, join rooms and heartbeat. Reports per comet
//! the user-space RSS per connection (VmRSS after − before, divided by the
//! comet's connections) and its CPU while the connections idle with
//! heartbeats, and the host totals.

use std::time::Duration;

use anyhow::ensure;
use rim_proto::api::{CometApi, RemoteComet};
use serde::Serialize;
use tokio::time::Instant;

use crate::cluster::{self, Cluster};
use crate::fleet::Fleet;
use crate::latency::{self, Percentiles, human};
use crate::options::{ClientOptions, LoadGenerators, Output, RimProcesses};
use crate::plot::{Chart, Series, render};
use crate::procstat::{self, CpuUse, Snapshot, Watched};
use crate::wire::Transport;

/// Options of `rim-bench connections`.
#[derive(Clone, Debug, clap::Args, Serialize)]
pub struct Args {
    #[command(flatten)]
    #[serde(flatten)]
    pub processes: RimProcesses,
    /// Comet processes; clients are spread evenly over them.
    #[arg(long, default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=200))]
    pub comets: u16,
    /// Measure one `rim standalone` (every role in one process: its RSS per
    /// connection includes the in-memory router's entry) instead of a logic
    /// and `--comets` comet processes.
    #[arg(long, conflicts_with = "comets")]
    pub standalone: bool,
    /// Clients in all (host total).
    #[arg(long, default_value_t = 15_000,
          value_parser = clap::value_parser!(u64).range(1..=2_000_000))]
    pub clients: u64,
    #[command(flatten)]
    #[serde(flatten)]
    pub client: ClientOptions,
    #[command(flatten)]
    #[serde(flatten)]
    pub load: LoadGenerators,
    /// Rooms the clients spread over.
    #[arg(long, default_value_t = 100)]
    pub rooms: u64,
    /// Seconds the idle CPU is measured over (heartbeats keep going).
    #[arg(long, default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub idle: u64,
    /// First port: the logic takes it and the next; comet i takes
    /// base+10+10i (TCP), +1 (WebSocket), +8 (metrics), +9 (gRPC).
    #[arg(long, default_value_t = 31_000)]
    pub port_base: u16,
    #[command(flatten)]
    #[serde(flatten)]
    pub output: Output,
}

/// Figures of one comet.
#[derive(Debug, Serialize)]
struct CometFigures {
    pid: u32,
    connections: u64,
    rss_before: u64,
    rss_after: u64,
    rss_after_idle: u64,
    bytes_per_connection: f64,
    idle_cpu_seconds: f64,
    idle_cpu_percent: f64,
}

/// One sample of the time series.
#[derive(Debug, Serialize)]
struct Sample {
    secs: f64,
    connected: u64,
    comet_rss_total: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    command: String,
    started_unix_secs: u64,
    load_average_start: Option<f64>,
    load_average_end: Option<f64>,
    args: Args,
    client_processes: usize,
    connected: u64,
    failed: u64,
    lost_during_idle: u64,
    connect_secs: f64,
    connect_us: Percentiles,
    /// CPU of every process while the clients connected and authenticated.
    connect_cpu: Vec<CpuUse>,
    comets: Vec<CometFigures>,
    total_rss_delta: u64,
    bytes_per_connection: f64,
    idle_secs: f64,
    idle_cpu: Vec<CpuUse>,
    samples: Vec<Sample>,
}

fn comet_rss_total(cluster: &Cluster) -> u64 {
    cluster
        .comets
        .iter()
        .filter_map(|c| procstat::rss_bytes(c.pid))
        .sum()
}

/// Runs the benchmark.
pub async fn run(args: Args) -> anyhow::Result<()> {
    ensure!(
        args.processes.rim.exists(),
        "--rim {}: no such file (cargo build --release -p rim)",
        args.processes.rim.display()
    );
    if let Err(err) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("warning: cannot raise the open-file limit: {err}");
    }
    let started_unix_secs = crate::wire::now_nanos() / 1_000_000_000;
    let load_average_start = procstat::load_average();
    let log_dir = args
        .processes
        .log_dir
        .clone()
        .unwrap_or_else(cluster::default_log_dir);
    let cluster = if args.standalone {
        eprintln!("starting rim standalone, logs in {}", log_dir.display());
        Cluster::standalone(&args.processes.rim, args.port_base, &log_dir).await?
    } else {
        eprintln!(
            "starting a logic and {} comet(s), logs in {}",
            args.comets,
            log_dir.display()
        );
        Cluster::start(
            &args.processes.rim,
            args.comets,
            args.port_base,
            &log_dir,
            &[],
        )
        .await?
    };
    let result = measure(&args, &cluster, started_unix_secs, load_average_start).await;
    cluster.stop().await;
    let report = result?;
    print_report(&report);
    args.output
        .write(|| serde_json::to_string_pretty(&report), || plot(&report))?;
    ensure!(report.connected > 0, "no client connected");
    Ok(())
}

async fn measure(
    args: &Args,
    cluster: &Cluster,
    started_unix_secs: u64,
    load_average_start: Option<f64>,
) -> anyhow::Result<Report> {
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before: Vec<u64> = cluster
        .comets
        .iter()
        .map(|c| procstat::rss_bytes(c.pid).unwrap_or(0))
        .collect();
    let processes = args.clients.div_ceil(args.load.per_process) as usize;
    let max_secs = 600 + args.idle + args.clients / 100;
    let mut fleet = Fleet::spawn(processes, args.load.source_addrs, max_secs).await?;
    let targets: Vec<_> = cluster
        .comets
        .iter()
        .map(|c| match args.client.transport {
            Transport::Tcp => c.tcp,
            Transport::Ws => c.ws,
        })
        .collect();
    eprintln!(
        "connecting {} {} clients from {processes} process(es) to {} comet(s)",
        args.clients,
        args.client.transport.name(),
        targets.len()
    );
    let mut watched: Vec<Watched> = cluster
        .comets
        .iter()
        .enumerate()
        .map(|(i, c)| Watched {
            name: format!("comet-{i}"),
            pid: c.pid,
        })
        .collect();
    // Standalone's logic is its comet's process, already watched.
    if cluster.comets.iter().all(|c| c.pid != cluster.logic_pid) {
        watched.push(Watched {
            name: "logic".into(),
            pid: cluster.logic_pid,
        });
    }
    for (i, pid) in fleet.pids().into_iter().enumerate() {
        watched.push(Watched {
            name: format!("client-proc-{i}"),
            pid,
        });
    }
    let connect_before = Snapshot::take(&watched);
    let t0 = Instant::now();
    let samples = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    // Sampled once a second while connecting and idling.
    let sampler = {
        let samples = std::sync::Arc::clone(&samples);
        let pids: Vec<u32> = cluster.comets.iter().map(|c| c.pid).collect();
        let ticks = fleet_totals_handle(&fleet);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            for _ in 0..max_secs {
                every.tick().await;
                let sample = Sample {
                    secs: t0.elapsed().as_secs_f64(),
                    connected: ticks(),
                    comet_rss_total: pids.iter().filter_map(|p| procstat::rss_bytes(*p)).sum(),
                };
                samples.lock().push(sample);
            }
        })
    };
    let connected = fleet
        .connect(
            args.client.transport,
            &targets,
            args.clients,
            "live://bench-",
            args.rooms,
            args.client.heartbeat,
            1000,
        )
        .await;
    let connected = match connected {
        Ok(c) => c,
        Err(err) => {
            sampler.abort();
            fleet.shutdown().await;
            return Err(err);
        }
    };
    let connect_secs = t0.elapsed().as_secs_f64();
    let connect_cpu = connect_before.used_until(&Snapshot::take(&watched), connect_secs);
    eprintln!(
        "{} connected, {} failed in {connect_secs:.1}s; settling 3s",
        connected.ok, connected.failed
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_after: Vec<u64> = cluster
        .comets
        .iter()
        .map(|c| procstat::rss_bytes(c.pid).unwrap_or(0))
        .collect();
    let lost_before = fleet.totals().lost;
    eprintln!(
        "measuring idle CPU for {}s (each client heartbeats every {}s)",
        args.idle, args.client.heartbeat
    );
    let before = Snapshot::take(&watched);
    let idle_started = Instant::now();
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.tick().await;
    for _ in 0..args.idle {
        every.tick().await;
        let t = fleet.totals();
        eprintln!(
            "[{:>4.0}s] idle: {} connected, {} lost, comet RSS {:.1} MiB",
            idle_started.elapsed().as_secs_f64(),
            t.connected,
            t.lost - lost_before,
            comet_rss_total(cluster) as f64 / 1048576.0
        );
    }
    let idle_secs = idle_started.elapsed().as_secs_f64();
    let idle_cpu = before.used_until(&Snapshot::take(&watched), idle_secs);
    let lost_during_idle = fleet.totals().lost - lost_before;
    let mut comets = Vec::new();
    for (i, c) in cluster.comets.iter().enumerate() {
        // Connection counts from the comet itself.
        let stats = RemoteComet::connect_lazy(&c.grpc.to_string())
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .stats()
            .await
            .map_err(|e| anyhow::anyhow!("comet {i} stats: {e}"))?;
        let conns = stats.tcp_connections + stats.ws_connections;
        let cpu = idle_cpu
            .iter()
            .find(|u| u.pid == c.pid)
            .map_or(0.0, |u| u.cpu_seconds);
        comets.push(CometFigures {
            pid: c.pid,
            connections: conns,
            rss_before: rss_before[i],
            rss_after: rss_after[i],
            rss_after_idle: procstat::rss_bytes(c.pid).unwrap_or(0),
            bytes_per_connection: rss_after[i].saturating_sub(rss_before[i]) as f64
                / conns.max(1) as f64,
            idle_cpu_seconds: cpu,
            idle_cpu_percent: cpu / idle_secs * 100.0,
        });
    }
    sampler.abort();
    fleet.shutdown().await;
    let total_rss_delta: u64 = comets
        .iter()
        .map(|c| c.rss_after.saturating_sub(c.rss_before))
        .sum();
    let total_conns: u64 = comets.iter().map(|c| c.connections).sum();
    let mut hist = latency::histogram();
    latency::add_pairs(&mut hist, &connected.hist);
    let samples = std::mem::take(&mut *samples.lock());
    Ok(Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        started_unix_secs,
        load_average_start,
        load_average_end: procstat::load_average(),
        args: args.clone(),
        client_processes: processes,
        connected: connected.ok,
        failed: connected.failed,
        lost_during_idle,
        connect_secs,
        connect_us: Percentiles::of(&hist),
        connect_cpu,
        comets,
        total_rss_delta,
        bytes_per_connection: total_rss_delta as f64 / total_conns.max(1) as f64,
        idle_secs,
        idle_cpu,
        samples,
    })
}

/// A closure reading the fleet's connected total (shares its tick table).
fn fleet_totals_handle(fleet: &Fleet) -> impl Fn() -> u64 + Send + 'static {
    let ticks = fleet.ticks_handle();
    move || ticks.lock().iter().map(|t| t.connected).sum()
}

fn plot(r: &Report) -> String {
    let title = format!(
        "rim-bench connections: {} {} clients, {} comet(s)",
        r.connected,
        r.args.client.transport.name(),
        r.comets.len()
    );
    render(&[
        Chart {
            title: title.clone(),
            x_label: "seconds since the first connect".into(),
            y_label: "connections".into(),
            log_x: false,
            series: vec![Series {
                label: "connected".into(),
                points: r
                    .samples
                    .iter()
                    .map(|s| (s.secs, s.connected as f64))
                    .collect(),
            }],
        },
        Chart {
            title: "comet RSS, all comets".into(),
            x_label: "seconds since the first connect".into(),
            y_label: "MiB".into(),
            log_x: false,
            series: vec![Series {
                label: "comet RSS".into(),
                points: r
                    .samples
                    .iter()
                    .map(|s| (s.secs, s.comet_rss_total as f64 / 1048576.0))
                    .collect(),
            }],
        },
    ])
}

fn print_report(r: &Report) {
    println!(
        "rim-bench connections: {} {} clients over {} comet(s), {} client process(es)",
        r.connected,
        r.args.client.transport.name(),
        r.comets.len(),
        r.client_processes
    );
    println!("  command:       {}", r.command);
    println!(
        "  connect:       {:.1}s, {} failed; connect+auth p50 {} p99 {} max {}",
        r.connect_secs,
        r.failed,
        human(r.connect_us.p50),
        human(r.connect_us.p99),
        human(r.connect_us.max)
    );
    for (i, c) in r.comets.iter().enumerate() {
        println!(
            "  comet-{i:<3} pid {:>7}: {:>6} conns, RSS {:.1} -> {:.1} MiB, {:.0} B/conn, idle CPU {:.2}% of a core",
            c.pid,
            c.connections,
            c.rss_before as f64 / 1048576.0,
            c.rss_after as f64 / 1048576.0,
            c.bytes_per_connection,
            c.idle_cpu_percent
        );
    }
    println!(
        "  total:         {} connections, comet RSS delta {:.1} MiB = {:.0} B/conn; {} lost while idle",
        r.comets.iter().map(|c| c.connections).sum::<u64>(),
        r.total_rss_delta as f64 / 1048576.0,
        r.bytes_per_connection,
        r.lost_during_idle
    );
    let per_connect = |prefix: &str| {
        r.connect_cpu
            .iter()
            .filter(|c| c.name.starts_with(prefix))
            .map(|c| c.cpu_seconds)
            .sum::<f64>()
            / r.connected.max(1) as f64
            * 1e6
    };
    // Standalone has no logic process of its own: its work is the comet's.
    let logic = if r.args.standalone {
        "in the comet's".to_owned()
    } else {
        format!("{:.0} µs", per_connect("logic"))
    };
    println!(
        "  connect cpu:   comets {:.0} µs, logic {logic}, load generator {:.0} µs per connection",
        per_connect("comet-"),
        per_connect("client-proc-")
    );
    for c in &r.idle_cpu {
        println!(
            "  idle cpu:      {} {:.2} s = {:.2}% of a core over {:.0}s",
            c.name,
            c.cpu_seconds,
            c.cores * 100.0,
            r.idle_secs
        );
    }
    println!(
        "  load average:  {:?} at start, {:?} at end",
        r.load_average_start, r.load_average_end
    );
}
