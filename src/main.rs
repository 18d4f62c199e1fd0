//! `rim`: one binary, a subcommand per role.
//!
//! Each subcommand loads its role's config (defaults < `--config` TOML <
//! `RIM_<SECTION>__<KEY>` environment), validates it before binding anything
//! (exit 64 on a bad config), binds its listeners, then runs the role until
//! SIGINT/SIGTERM. Roles are wired in [`roles`], one module per subcommand.

mod logging;
mod roles;

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use rim_config::{CometRoleConfig, JobRoleConfig, Load, LogicRoleConfig, StandaloneConfig};
use rim_shutdown::Shutdown;
use serde::Serialize;

use crate::logging::LogFormat;

/// Exit code for a bad configuration (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;

/// How long tasks still running after a role returned may take to finish.
const GRACE: Duration = Duration::from_secs(5);

/// rim: a goim-compatible distributed push/IM system.
#[derive(Debug, Parser)]
#[command(name = "rim", version, about, long_about = None)]
struct Cli {
    /// Log line format (filter with RUST_LOG, e.g. RUST_LOG=rim_comet=debug).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Plain)]
    log_format: LogFormat,

    #[command(subcommand)]
    role: Role,
}

#[derive(Debug, Subcommand)]
enum Role {
    /// Every role in one process on embedded defaults (no external services).
    Standalone(RoleArgs),
    /// The edge server clients connect to (TCP 3101, WebSocket 3102, gRPC 3109).
    Comet(RoleArgs),
    /// Auth, presence and the HTTP push API (gRPC 3119, HTTP 3111).
    Logic(RoleArgs),
    /// Consumes the push queue and delivers to the region's comets.
    Job(RoleArgs),
}

#[derive(Debug, clap::Args)]
struct RoleArgs {
    /// TOML config file; values override built-in defaults, and
    /// RIM_<SECTION>__<KEY> environment variables override the file.
    #[arg(long, short, value_name = "PATH")]
    config: Option<PathBuf>,

    /// Validate the configuration, print it with defaults filled in, and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    match cli.role {
        Role::Standalone(args) => load::<StandaloneConfig>("standalone", &args).map_or_else(
            |code| code,
            |config| {
                serve("standalone", config.node.worker_threads, |shutdown| {
                    roles::standalone::run(config, shutdown)
                })
            },
        ),
        Role::Comet(args) => load::<CometRoleConfig>("comet", &args).map_or_else(
            |code| code,
            |config| {
                serve("comet", config.node.worker_threads, |shutdown| async move {
                    let (listeners, metrics) = roles::comet::bind(&config)?;
                    Ok(roles::comet::run(config, listeners, metrics, shutdown).await?)
                })
            },
        ),
        Role::Logic(args) => load::<LogicRoleConfig>("logic", &args).map_or_else(
            |code| code,
            |config| {
                serve("logic", config.node.worker_threads, |shutdown| async move {
                    let listeners = roles::logic::Listeners::bind(&config)?;
                    roles::logic::run(config, listeners, shutdown).await
                })
            },
        ),
        Role::Job(args) => load::<JobRoleConfig>("job", &args).map_or_else(
            |code| code,
            |config| {
                serve("job", config.node.worker_threads, |shutdown| async move {
                    let metrics = roles::job::bind(&config)?;
                    roles::job::run(config, metrics, shutdown).await
                })
            },
        ),
    }
}

/// Loads and validates a role's config; `Err` carries the exit code when
/// the process should stop here (bad config, or `--check`).
fn load<C: Load + Serialize>(role: &str, args: &RoleArgs) -> Result<C, ExitCode> {
    let config = match C::load(args.config.as_deref()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("rim {role}: bad configuration: {err}");
            return Err(ExitCode::from(EXIT_CONFIG));
        }
    };
    // The environment may be shared by several roles: say which overrides
    // this one ignores, so that one meant for it is not dropped silently.
    for variable in C::inapplicable_overrides(std::env::vars()).unwrap_or_default() {
        tracing::warn!(
            %variable,
            "environment override ignored: rim {role} has no such config section"
        );
    }
    // Only reachable with node.allow_unauthenticated = true: validation
    // refuses these otherwise.
    for open in config.open_listeners() {
        tracing::warn!(
            listener = %open,
            "node.allow_unauthenticated: {open} is open to anyone who can reach it (it can push or kick)"
        );
    }
    if args.check {
        return Err(match toml::to_string_pretty(&config) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("rim {role}: cannot print the configuration: {err}");
                ExitCode::FAILURE
            }
        });
    }
    Ok(config)
}

/// Runs a role on a multi-threaded runtime (`workers` threads, 0 = one per
/// core) until it returns, with SIGINT/SIGTERM wired to its shutdown signal.
fn serve<F, Fut>(role: &str, workers: u32, run: F) -> ExitCode
where
    F: FnOnce(Shutdown) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    raise_fd_limit(role);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if workers > 0 {
        builder.worker_threads(workers as usize);
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("rim {role}: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = Shutdown::new();
        if let Err(err) = shutdown.on_signals() {
            eprintln!("rim {role}: cannot watch signals: {err}");
            return ExitCode::FAILURE;
        }
        let result = run(shutdown.clone()).await;
        shutdown.drain(GRACE).await;
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("rim {role}: {err:#}");
                tracing::error!(reason = %format!("{err:#}"), "{role} failed");
                ExitCode::FAILURE
            }
        }
    })
}

/// Raises the soft open-file limit to the hard limit: every connection is a
/// file descriptor.
fn raise_fd_limit(role: &str) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(role, limit, "open-file limit"),
        Err(err) => tracing::warn!(role, reason = %err, "cannot raise the open-file limit"),
    }
}
