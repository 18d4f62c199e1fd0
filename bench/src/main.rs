//! rim-bench: rim's load generator, one subcommand per benchmark.
//!
//! Every benchmark sends traffic to 127.0.0.0/8 only (it refuses other
//! addresses), runs for a bounded time and prints a progress line per second.
//! Method: `docs/benchmarks.md` and the shared benchmarking rules.

mod addrs;
mod baseline;
mod clientproc;
mod cluster;
mod connections;
mod fanout;
mod fleet;
mod latency;
mod pacing;
mod plot;
mod procstat;
mod push_latency;
mod wire;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// rim's load generator.
#[derive(Debug, Parser)]
#[command(name = "rim-bench", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Pushes/s and p50/p99 latency from an HTTP push to its receipt by
    /// clients, for unicast (push to one key) or room pushes.
    PushLatency(push_latency::Args),
    /// Idle connections: comet RSS per connection and idle CPU with
    /// heartbeats, over one or several comets and load-generator processes.
    Connections(connections::Args),
    /// Room fan-out: deliveries per server CPU-second of rim's comets,
    /// unbatched and op-9 batched, next to a raw tokio baseline.
    Fanout(fanout::Args),
    /// The raw tokio fan-out server `fanout` compares rim with.
    Baseline(baseline::Args),
    /// A load-generator child process driven over stdin (used by the other
    /// subcommands).
    #[command(hide = true)]
    ClientProc(clientproc::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("rim-bench: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::PushLatency(args) => push_latency::run(args).await,
            Command::Connections(args) => connections::run(args).await,
            Command::Fanout(args) => fanout::run(args).await,
            Command::Baseline(args) => baseline::run(args).await,
            Command::ClientProc(args) => clientproc::run(args).await,
        }
    });
    // Client tasks still parked on sockets must not delay the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("rim-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}
