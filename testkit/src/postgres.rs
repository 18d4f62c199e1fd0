//! A private PostgreSQL server for tests that crash and restart it: Debian's
//! server binaries (package `postgresql`), a cluster initdb'd into a temp dir
//! of its own with database `rim` owned by role `rim` and trust auth, on a
//! loopback port of its own, the way `deploy/test.sh` starts the shared one.
//! As root (initdb refuses root) the server runs as the `postgres` user
//! through `runuser`; otherwise as the current user. Stopped by its
//! postmaster's PID on drop.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::alive;

const BIN_ROOT: &str = "/usr/lib/postgresql";
/// Bound for `pg_ctl start` to see the server take connections.
const START_LIMIT_SECS: u32 = 30;
/// Bound for the postmaster to exit after a stop before it is killed.
const STOP_LIMIT: Duration = Duration::from_secs(20);

/// A running (or stopped) private PostgreSQL server.
pub struct PostgresServer {
    /// Holds `data/`, the socket and the server log; owned by `postgres`.
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl PostgresServer {
    /// Initialises a fresh cluster on a port of its own, starts it and
    /// creates database `rim`.
    pub fn start_new() -> PostgresServer {
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("rim-pg")
            .tempdir()
            .expect("creating the PostgreSQL temp dir");
        if is_root() {
            // The postgres user must reach and own its directory.
            run(Command::new("chmod").arg("755").arg(dir.path()), "chmod");
            run(
                Command::new("chown").arg("postgres:").arg(dir.path()),
                "chown",
            );
        }
        let server = PostgresServer {
            dir,
            bin,
            port: crate::free_port(),
        };
        server.as_postgres(
            "initdb",
            &[
                "-D",
                &server.data().display().to_string(),
                "-U",
                "rim",
                "--auth=trust",
                "--no-sync",
            ],
        );
        server.start_again();
        server.as_postgres(
            "createdb",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &server.port.to_string(),
                "-U",
                "rim",
                "rim",
            ],
        );
        server
    }

    /// The URL of database `rim` as role `rim`.
    pub fn url(&self) -> String {
        format!("postgres://rim@127.0.0.1:{}/rim", self.port)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// Starts the server on its data dir and port; returns once it takes
    /// connections (`pg_ctl -w`).
    pub fn start_again(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.path().display()
        );
        self.as_postgres(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-l",
                &self.log_file().display().to_string(),
                "-w",
                "-t",
                &START_LIMIT_SECS.to_string(),
                "-o",
                &options,
                "start",
            ],
        );
    }

    /// Stops the server the way a crash would (`pg_ctl stop -m immediate`:
    /// no checkpoint, every connection cut; the next start recovers from
    /// the WAL).
    pub fn stop_immediate(&self) {
        let pid = self.pid();
        self.as_postgres(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
        if let Some(pid) = pid {
            wait_gone(pid);
        }
    }

    /// The postmaster's PID while it runs.
    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data().join("postmaster.pid"))
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse().ok())
    }

    /// The last lines of the server log (for failure messages).
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_file()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Runs one of the server's tools, as `postgres` when this is root.
    fn as_postgres(&self, tool: &str, args: &[&str]) {
        let mut cmd = if is_root() {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(self.bin.join(tool));
            cmd
        } else {
            Command::new(self.bin.join(tool))
        };
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}{}\n---- server log ----\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        // Fast shutdown (SIGINT) by PID, then SIGKILL after the bound.
        let Some(pid) = self.pid() else { return };
        let _ = Command::new("kill")
            .arg("-INT")
            .arg(pid.to_string())
            .status();
        wait_gone(pid);
    }
}

/// Waits for `pid` to exit, killing it after [`STOP_LIMIT`].
fn wait_gone(pid: u32) {
    let deadline = Instant::now() + STOP_LIMIT;
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    if alive(pid) {
        let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        while alive(pid) && Instant::now() < deadline + STOP_LIMIT {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The newest server binaries under /usr/lib/postgresql/<version>/bin.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(BIN_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .unwrap_or_else(|| {
            panic!(
                "no PostgreSQL server binaries under {BIN_ROOT}: install the postgresql package (deploy/test.sh does)"
            )
        })
}

/// Whether this process runs as root (real uid 0, from /proc/self/status).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let uids = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
            uids.split_whitespace().next().map(|uid| uid == "0")
        })
        .unwrap_or(false)
}

fn run(cmd: &mut Command, what: &str) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("running {what}: {e}"));
    assert!(status.success(), "{what} failed: {status}");
}
