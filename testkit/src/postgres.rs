//! A private PostgreSQL server for tests that crash and restart it: Debian's
//! server binaries (package `postgresql`), a cluster initdb'd into a temp dir
//! of its own with database `rim` owned by role `rim` and trust auth, on a
//! loopback port of its own, the way `deploy/test.sh` starts the shared one.
//! As root (initdb refuses root) the server runs as the `postgres` user
//! through `runuser`; otherwise as the current user. Stopped by its
//! postmaster's PID on drop.
//!
//! For failover tests a running server gives a streaming standby of its
//! own ([`PostgresServer::start_sync_standby`]: `pg_basebackup -R` into
//! another temp dir and port, made the primary's synchronous standby), can
//! be lost the way a machine is ([`PostgresServer::kill`]: SIGKILL to the
//! postmaster and every process it started, by PID) and a standby can be
//! promoted ([`PostgresServer::promote`]).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::alive;

const BIN_ROOT: &str = "/usr/lib/postgresql";
/// Bound for `pg_ctl start` to see the server take connections.
const START_LIMIT_SECS: u32 = 30;
/// Bound for the postmaster to exit after a stop before it is killed.
const STOP_LIMIT: Duration = Duration::from_secs(20);
/// Bound for a standby to stream synchronously, or a promoted one to take
/// writes.
const ROLE_LIMIT: Duration = Duration::from_secs(60);

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
        let server = PostgresServer::empty();
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

    /// A server not initialised yet: its temp dir (reachable and owned by
    /// `postgres` when this is root) and a port of its own.
    fn empty() -> PostgresServer {
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
        PostgresServer {
            dir,
            bin: bin_dir(),
            port: crate::free_port(),
        }
    }

    /// The URL of database `rim` as role `rim`.
    pub fn url(&self) -> String {
        format!("postgres://rim@127.0.0.1:{}/rim", self.port)
    }

    /// The port it listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Builds a streaming standby of this running server and makes it the
    /// synchronous one: `pg_basebackup -R` (WAL streamed, `standby.signal`
    /// and `primary_conninfo` written, `application_name` naming it) into a
    /// temp dir and port of its own, started as a hot standby; then this
    /// server gets `synchronous_standby_names` naming it and
    /// `synchronous_commit = on` (by `ALTER SYSTEM`, after the base backup,
    /// so the standby does not inherit them: promoted, it must not wait
    /// for a standby of its own). Returns once this server reports the
    /// standby streaming as `sync`, so from then on a commit here returns
    /// only once the standby has flushed it.
    pub fn start_sync_standby(&self) -> PostgresServer {
        let standby = PostgresServer::empty();
        let name = format!("rim_standby_{}", standby.port);
        let source = format!(
            "host=127.0.0.1 port={} user=rim application_name={name}",
            self.port
        );
        self.as_postgres(
            "pg_basebackup",
            &[
                "-d",
                &source,
                "-D",
                &standby.data().display().to_string(),
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ],
        );
        standby.start_again();
        self.psql(&format!(
            "ALTER SYSTEM SET synchronous_standby_names = '\"{name}\"'"
        ));
        self.psql("ALTER SYSTEM SET synchronous_commit = on");
        self.psql("SELECT pg_reload_conf()");
        self.wait_sync(&standby);
        standby
    }

    /// Waits until this server reports `standby` (one of
    /// [`PostgresServer::start_sync_standby`]) streaming as its synchronous
    /// standby, e.g. after the standby was restarted.
    pub fn wait_sync(&self, standby: &PostgresServer) {
        let state = format!(
            "SELECT sync_state FROM pg_stat_replication \
             WHERE application_name = 'rim_standby_{}' AND state = 'streaming'",
            standby.port
        );
        self.wait_for("the standby to stream synchronously", || {
            self.psql(&state) == "sync"
        });
    }

    /// Loses the server the way a machine is lost: SIGKILL, by PID, to the
    /// postmaster and to every process it started (backends, WAL sender,
    /// checkpointer…), so none of them answers, flushes or sends anything
    /// more. Returns once they are gone. The data dir is left as it was.
    pub fn kill(&self) {
        let Some(pid) = self.pid() else {
            panic!("kill: the server is not running")
        };
        let children = children_of(pid);
        // The postmaster first: with it gone nothing starts a new child.
        for victim in std::iter::once(pid).chain(children.iter().copied()) {
            let _ = Command::new("kill")
                .arg("-9")
                .arg(victim.to_string())
                .status();
        }
        for victim in std::iter::once(pid).chain(children) {
            wait_gone(victim);
        }
        // Stale, and its PID may be reused: drop must not signal it.
        std::fs::remove_file(self.data().join("postmaster.pid"))
            .expect("removing the killed server's postmaster.pid");
    }

    /// Promotes this standby (`pg_ctl promote`) and returns once it takes
    /// writes (`pg_is_in_recovery()` is false), within a bound.
    pub fn promote(&self) {
        self.as_postgres(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-w",
                "-t",
                &START_LIMIT_SECS.to_string(),
                "promote",
            ],
        );
        self.wait_for("the promoted standby to take writes", || {
            self.psql("SELECT pg_is_in_recovery()") == "f"
        });
    }

    /// Runs one statement in database `rim` with `psql` and returns its
    /// output, unaligned and trimmed (an empty string when it fails).
    pub fn psql(&self, sql: &str) -> String {
        self.tool_output(
            "psql",
            &[
                "-X",
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "rim",
                "-d",
                "rim",
                "-Atc",
                sql,
            ],
        )
        .map(|out| out.trim().to_owned())
        .unwrap_or_default()
    }

    /// Polls `ready` every 100 ms, panicking with the server log after
    /// [`ROLE_LIMIT`].
    fn wait_for(&self, what: &str, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + ROLE_LIMIT;
        while !ready() {
            assert!(
                Instant::now() < deadline,
                "timed out after {ROLE_LIMIT:?} waiting for {what}\n---- server log ----\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
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

    /// Runs one of the server's tools, as `postgres` when this is root,
    /// and returns its output, or `None` when it failed.
    fn tool_output(&self, tool: &str, args: &[&str]) -> Option<String> {
        let out = self
            .tool(tool)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// One of the server's tools, to run as `postgres` when this is root.
    fn tool(&self, tool: &str) -> Command {
        if is_root() {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(self.bin.join(tool));
            cmd
        } else {
            Command::new(self.bin.join(tool))
        }
    }

    /// Runs one of the server's tools, as `postgres` when this is root.
    fn as_postgres(&self, tool: &str, args: &[&str]) {
        let out = self
            .tool(tool)
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

/// The processes whose parent is `pid`, from /proc.
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let child: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // State, then the parent's PID, follow the parenthesised name.
            let (_, rest) = stat.rsplit_once(')')?;
            let parent: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
            (parent == pid).then_some(child)
        })
        .collect()
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
