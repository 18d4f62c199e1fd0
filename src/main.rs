//! `rim`: one binary, a subcommand per role.
//!
//! Each subcommand loads its role's config (defaults < `--config` TOML <
//! `RIM_<SECTION>__<KEY>` environment), validates it before binding anything
//! (exit 64 on a bad config), then runs the role until SIGINT/SIGTERM.

mod logging;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rim_config::{CometRoleConfig, JobRoleConfig, Load, LogicRoleConfig, StandaloneConfig};
use serde::Serialize;

use crate::logging::LogFormat;

/// Exit code for a bad configuration (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// Exit code for a role this build cannot run yet (sysexits EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: u8 = 69;

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
        Role::Standalone(args) => start::<StandaloneConfig>("standalone", &args, "#6"),
        Role::Comet(args) => start::<CometRoleConfig>("comet", &args, "#3"),
        Role::Logic(args) => start::<LogicRoleConfig>("logic", &args, "#4"),
        Role::Job(args) => start::<JobRoleConfig>("job", &args, "#5"),
    }
}

/// Loads and validates a role's config, then runs the role.
fn start<C: Load + Serialize>(role: &str, args: &RoleArgs, issue: &str) -> ExitCode {
    let config = match C::load(args.config.as_deref()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("rim {role}: bad configuration: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.check {
        return match toml::to_string_pretty(&config) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("rim {role}: cannot print the configuration: {err}");
                ExitCode::FAILURE
            }
        };
    }
    eprintln!(
        "rim {role}: the {role} role is not built yet (tracked in issue {issue}); \
         its configuration is valid, but this build cannot run it"
    );
    ExitCode::from(EXIT_UNAVAILABLE)
}
