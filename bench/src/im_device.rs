//! What the IM benchmarks share: the `rim standalone` they start (options,
//! ports, its SQLite file), chat devices (rim-client connections
//! authenticated as a user and accepting MSG and NOTIFY), and the store's
//! commit counter read from a `/metrics` page.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use rim_client::{AuthToken, Client};
use serde::Serialize;

/// How long one device may take to connect and authenticate.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The `rim standalone` an IM benchmark starts.
#[derive(Clone, Debug, clap::Args, Serialize)]
pub struct Standalone {
    /// The rim binary to start `rim standalone` from.
    #[arg(long, default_value = "target/release/rim")]
    pub rim: PathBuf,
    /// Directory for rim's log and its SQLite file `im.sqlite3` (default: a
    /// temp directory).
    #[arg(long)]
    pub log_dir: Option<PathBuf>,
    /// First port: the HTTP API (and /metrics) takes base+1, the comet
    /// base+10 (TCP), +11 (WebSocket), +19 (gRPC).
    #[arg(long, default_value_t = 32_000)]
    pub port_base: u16,
}

impl Standalone {
    /// The run's log directory (`--log-dir`, else a temp directory).
    pub fn log_dir(&self) -> PathBuf {
        self.log_dir
            .clone()
            .unwrap_or_else(crate::cluster::default_log_dir)
    }

    /// Starts `rim standalone` with a fresh SQLite file in the run's log
    /// directory (refusing one that holds a previous run's file); returns
    /// the directory and the running process.
    pub async fn start_fresh(&self) -> anyhow::Result<(PathBuf, crate::cluster::Cluster)> {
        self.start_fresh_with(&[]).await
    }

    /// [`Standalone::start_fresh`] with `extra_env` set for the process
    /// (e.g. its `[im]` limits).
    pub async fn start_fresh_with(
        &self,
        extra_env: &[(String, String)],
    ) -> anyhow::Result<(PathBuf, crate::cluster::Cluster)> {
        let log_dir = self.log_dir();
        anyhow::ensure!(
            !log_dir.join("im.sqlite3").exists(),
            "{} already holds a run's files: give a fresh --log-dir",
            log_dir.display()
        );
        eprintln!(
            "starting rim standalone, logs and SQLite in {}",
            log_dir.display()
        );
        let cluster = crate::cluster::Cluster::standalone_with(
            &self.rim,
            self.port_base,
            &log_dir,
            extra_env,
        )
        .await?;
        Ok((log_dir, cluster))
    }
}

/// CLOCK_REALTIME now, in nanoseconds.
pub fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Connects a chat device of user `mid` (accepts MSG and NOTIFY) to `tcp`.
pub async fn device(tcp: SocketAddr, mid: i64, key: String) -> anyhow::Result<Client> {
    let connect = async {
        let mut client = Client::connect_tcp(tcp).await?;
        client
            .auth(
                &AuthToken {
                    mid,
                    key,
                    ..AuthToken::default()
                }
                .accepting_im(),
            )
            .await?;
        anyhow::Ok(client)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .with_context(|| format!("user {mid} did not connect within {CONNECT_TIMEOUT:?}"))?
        .with_context(|| format!("connecting user {mid}"))
}

/// The text of a Prometheus `/metrics` page at `url`; `None` when it cannot
/// be read within 5 s.
pub async fn metrics_text(http: &reqwest::Client, url: &str) -> Option<String> {
    http.get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?
        .error_for_status()
        .ok()?
        .text()
        .await
        .ok()
}

/// `rim_logic_im_store_commits` of a `/metrics` page.
pub fn parse_commits(text: &str) -> Option<u64> {
    text.lines()
        .filter(|l| l.starts_with("rim_logic_im_store_commits"))
        .find_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .map(|v| v as u64)
}

/// A small xorshift generator (random page depths).
pub struct XorShift(u64);

impl XorShift {
    /// A generator from `seed` (any value; 0 is replaced).
    pub fn new(seed: u64) -> XorShift {
        XorShift(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    /// The next value.
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A value in `0..n` (`n` > 0; the modulo bias is negligible for the
    /// sizes used here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The host: cores and memory, for the results.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// Online CPUs.
    pub cores: usize,
    /// MemTotal, bytes.
    pub memory_bytes: u64,
    /// 1-minute load average at the start.
    pub load_average: Option<f64>,
}

impl Machine {
    /// Reads the host now.
    pub fn now() -> Machine {
        let memory_bytes = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map_or(0, |kb| kb * 1024);
        Machine {
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            memory_bytes,
            load_average: crate::procstat::load_average(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_commit_counter() {
        let text = "# HELP rim_logic_im_store_commits Durable commits\n\
                    # TYPE rim_logic_im_store_commits counter\n\
                    rim_logic_im_store_commits_total 1234\n";
        assert_eq!(parse_commits(text), Some(1234));
        assert_eq!(parse_commits("other 5\n"), None);
        assert!(Machine::now().cores > 0);
        let mut rng = XorShift::new(0);
        assert!((0..1000).all(|_| rng.below(7) < 7));
    }
}
