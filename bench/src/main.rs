//! rim-bench: rim's load generator, one subcommand per benchmark.
//!
//! Every benchmark sends traffic to 127.0.0.0/8 only (it refuses other
//! addresses), runs for a bounded time and prints a progress line per second.
//! Method: `docs/benchmarks.md` and the shared benchmarking rules.

mod latency;
mod procstat;
mod push_latency;

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
