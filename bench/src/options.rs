//! Command-line options several subcommands share, flattened into each
//! subcommand's `Args` (`#[command(flatten)]`) and into its JSON results
//! (`#[serde(flatten)]`), so flag names, defaults and the JSON keys stay
//! the same everywhere.

use std::path::PathBuf;

use serde::Serialize;

use crate::wire::Transport;

/// The rim processes a benchmark starts (`connections`, `fanout`).
#[derive(Clone, Debug, clap::Args, Serialize)]
pub struct RimProcesses {
    /// The rim binary to start comets and the logic from.
    #[arg(long, default_value = "target/release/rim")]
    pub rim: PathBuf,
    /// Directory for the rim processes' logs (default: a temp directory).
    #[arg(long)]
    pub log_dir: Option<PathBuf>,
}

/// The load-generator child processes holding the clients (`connections`,
/// `fanout`).
#[derive(Clone, Debug, clap::Args, Serialize)]
pub struct LoadGenerators {
    /// Most clients per load-generator process (20,000 open files each).
    #[arg(long, default_value_t = 15_000,
          value_parser = clap::value_parser!(u64).range(1..=19_000))]
    pub per_process: u64,
    /// Source addresses per load-generator process.
    #[arg(long, default_value_t = 16)]
    pub source_addrs: u32,
}

/// How each client connects and keeps alive (`connections`, `push-latency`).
#[derive(Clone, Debug, clap::Args, Serialize)]
pub struct ClientOptions {
    /// Client transport (`--comet` addresses, where given, are of this kind).
    #[arg(long, value_enum, default_value_t = Transport::Tcp)]
    pub transport: Transport,
    /// Seconds between heartbeats of each client.
    #[arg(long, default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub heartbeat: u64,
}

/// Where the results go besides the terminal (`connections`, `fanout`,
/// `push-latency`).
#[derive(Clone, Debug, clap::Args, Serialize)]
pub struct Output {
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the plots as SVG here (the subcommand's help says which).
    #[arg(long)]
    pub svg: Option<PathBuf>,
}

impl Output {
    /// Writes `json` (the serialized report) and the plot `svg` draws to
    /// the paths given, saying where on stderr.
    pub fn write(
        &self,
        json: impl FnOnce() -> serde_json::Result<String>,
        svg: impl FnOnce() -> String,
    ) -> anyhow::Result<()> {
        use anyhow::Context as _;
        if let Some(path) = &self.json {
            std::fs::write(path, json()? + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("results written to {}", path.display());
        }
        if let Some(path) = &self.svg {
            std::fs::write(path, svg()).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("plot written to {}", path.display());
        }
        Ok(())
    }
}
