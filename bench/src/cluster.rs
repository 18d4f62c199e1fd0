//! Starts the rim processes a benchmark measures: one `rim logic` (auth
//! policy `none`, in-memory router and queue, static discovery) and K
//! `rim comet` processes, each its own process with its own ports on
//! 127.0.0.1 — or one `rim standalone` holding both — and stops them (by
//! their own handles) at the end.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// One started comet.
pub struct CometProc {
    /// `None` when the comet runs inside the standalone process.
    child: Option<Child>,
    /// Process id.
    pub pid: u32,
    /// Raw TCP client address.
    pub tcp: SocketAddr,
    /// WebSocket client address.
    pub ws: SocketAddr,
    /// gRPC address.
    pub grpc: SocketAddr,
}

/// A logic and its comets.
pub struct Cluster {
    logic: Child,
    /// The logic's process id.
    pub logic_pid: u32,
    /// The comets.
    pub comets: Vec<CometProc>,
}

/// Ports of comet `i` from `base`: TCP, WebSocket, gRPC.
pub fn comet_ports(base: u16, i: u16) -> (u16, u16, u16) {
    let p = base + 10 + 10 * i;
    (p, p + 1, p + 9)
}

/// Metrics (Prometheus) port of comet `i`.
pub fn comet_metrics_port(base: u16, i: u16) -> u16 {
    base + 10 + 10 * i + 8
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<Stdio> {
    let file = std::fs::File::create(dir.join(name))
        .with_context(|| format!("creating {}", dir.join(name).display()))?;
    Ok(Stdio::from(file))
}

/// Waits until something accepts on `addr`, `limit` at most, failing at
/// once if `child` exits.
pub async fn wait_listening(
    child: &mut Child,
    addr: SocketAddr,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("the process that should listen on {addr} exited: {status} (see its log)");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("nothing listens on {addr} after {limit:?}")
}

impl Cluster {
    /// Starts a logic on `base`, `base + 1` and `comets` comets on the ports
    /// of [`comet_ports`]; `extra_env` goes to every comet. Logs go to
    /// `log_dir`.
    pub async fn start(
        rim: &Path,
        comets: u16,
        base: u16,
        log_dir: &Path,
        extra_env: &[(String, String)],
    ) -> anyhow::Result<Cluster> {
        Cluster::start_with(rim, comets, base, log_dir, extra_env, &[]).await
    }

    /// [`Cluster::start`] with `logic_env` set for the logic after the
    /// benchmark's own settings, so it may override them (e.g. a real
    /// Kafka broker in `RIM_QUEUE__BROKERS`).
    pub async fn start_with(
        rim: &Path,
        comets: u16,
        base: u16,
        log_dir: &Path,
        extra_env: &[(String, String)],
        logic_env: &[(String, String)],
    ) -> anyhow::Result<Cluster> {
        anyhow::ensure!(
            u32::from(base) + 20 + 10 * u32::from(comets) < 65_000,
            "--port-base {base} leaves no room for {comets} comets"
        );
        // Something else listening on one of our ports would be measured
        // in our place: refuse rather than attach to it.
        let mut ports = vec![base, base + 1];
        for i in 0..comets {
            let (tcp, ws, grpc) = comet_ports(base, i);
            ports.extend([tcp, ws, grpc, comet_metrics_port(base, i)]);
        }
        for port in ports {
            if std::net::TcpListener::bind(addr(port)).is_err() {
                bail!("port {port} on 127.0.0.1 is taken: choose another --port-base");
            }
        }
        std::fs::create_dir_all(log_dir)
            .with_context(|| format!("creating {}", log_dir.display()))?;
        let logic_grpc = addr(base);
        let logic = Command::new(rim)
            .arg("logic")
            .env("RIM_NODE__ID", "bench-logic")
            .env("RIM_LOGIC__AUTH__POLICY", "none")
            .env("RIM_LOGIC__GRPC_BIND", logic_grpc.to_string())
            .env("RIM_API__HTTP_BIND", addr(base + 1).to_string())
            .env("RIM_ROUTER__BACKEND", "memory")
            // The logic process has no in-process queue; fan-out and
            // connection benchmarks never push through it, so the Kafka
            // producer points at a closed port (unless `logic_env` names a
            // broker).
            .env("RIM_QUEUE__BACKEND", "kafka")
            .env("RIM_QUEUE__BROKERS", "127.0.0.1:9")
            .env("RIM_DISCOVERY__BACKEND", "static")
            .env("RIM_DISCOVERY__LOGICS", logic_grpc.to_string())
            .envs(logic_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log_file(log_dir, "logic.log")?)
            .stderr(log_file(log_dir, "logic.err")?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} logic", rim.display()))?;
        let logic_pid = logic.id().context("logic pid")?;
        let mut cluster = Cluster {
            logic,
            logic_pid,
            comets: Vec::new(),
        };
        wait_listening(&mut cluster.logic, logic_grpc, Duration::from_secs(30)).await?;
        for i in 0..comets {
            let (tcp, ws, grpc) = comet_ports(base, i);
            let mut cmd = Command::new(rim);
            cmd.arg("comet")
                .env("RIM_NODE__ID", format!("bench-comet-{i}"))
                .env("RIM_COMET__TCP_BIND", addr(tcp).to_string())
                .env("RIM_COMET__WS_BIND", addr(ws).to_string())
                .env("RIM_COMET__GRPC_BIND", addr(grpc).to_string())
                .env(
                    "RIM_METRICS__BIND",
                    addr(comet_metrics_port(base, i)).to_string(),
                )
                .env("RIM_COMET__MAX_CONNECTIONS_PER_IP", "1000000")
                .env("RIM_DISCOVERY__BACKEND", "static")
                .env("RIM_DISCOVERY__LOGICS", logic_grpc.to_string());
            for (k, v) in extra_env {
                cmd.env(k, v);
            }
            let child = cmd
                .stdin(Stdio::null())
                .stdout(log_file(log_dir, &format!("comet-{i}.log"))?)
                .stderr(log_file(log_dir, &format!("comet-{i}.err"))?)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {} comet", rim.display()))?;
            let pid = child.id().context("comet pid")?;
            cluster.comets.push(CometProc {
                child: Some(child),
                pid,
                tcp: addr(tcp),
                ws: addr(ws),
                grpc: addr(grpc),
            });
        }
        for comet in &mut cluster.comets {
            if let Some(child) = &mut comet.child {
                wait_listening(child, comet.tcp, Duration::from_secs(30)).await?;
                wait_listening(child, comet.grpc, Duration::from_secs(30)).await?;
            }
        }
        Ok(cluster)
    }

    /// Starts one `rim standalone` (every role in one process, its defaults:
    /// in-memory router and queue, auth policy `none`) with its comet on the
    /// ports of comet 0 of [`comet_ports`] and its HTTP API on `base + 1`.
    /// The cluster's logic and its one comet are that process.
    pub async fn standalone(rim: &Path, base: u16, log_dir: &Path) -> anyhow::Result<Cluster> {
        Cluster::standalone_with(rim, base, log_dir, &[]).await
    }

    /// [`Cluster::standalone`] with `extra_env` set for the process (after
    /// the benchmark's own settings, so it may override them).
    pub async fn standalone_with(
        rim: &Path,
        base: u16,
        log_dir: &Path,
        extra_env: &[(String, String)],
    ) -> anyhow::Result<Cluster> {
        let (tcp, ws, grpc) = comet_ports(base, 0);
        for port in [base + 1, tcp, ws, grpc] {
            if std::net::TcpListener::bind(addr(port)).is_err() {
                bail!("port {port} on 127.0.0.1 is taken: choose another --port-base");
            }
        }
        std::fs::create_dir_all(log_dir)
            .with_context(|| format!("creating {}", log_dir.display()))?;
        let mut child = Command::new(rim)
            .arg("standalone")
            .env("RIM_NODE__ID", "bench-standalone")
            .env("RIM_COMET__TCP_BIND", addr(tcp).to_string())
            .env("RIM_COMET__WS_BIND", addr(ws).to_string())
            .env("RIM_COMET__GRPC_BIND", addr(grpc).to_string())
            .env("RIM_COMET__MAX_CONNECTIONS_PER_IP", "1000000")
            .env("RIM_API__HTTP_BIND", addr(base + 1).to_string())
            // Chat history of this run beside its logs, not in the working dir.
            .env("RIM_IM__SQLITE_PATH", log_dir.join("im.sqlite3"))
            .envs(extra_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log_file(log_dir, "standalone.log")?)
            .stderr(log_file(log_dir, "standalone.err")?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} standalone", rim.display()))?;
        let pid = child.id().context("standalone pid")?;
        for port in [tcp, grpc] {
            wait_listening(&mut child, addr(port), Duration::from_secs(30)).await?;
        }
        Ok(Cluster {
            logic: child,
            logic_pid: pid,
            comets: vec![CometProc {
                child: None,
                pid,
                tcp: addr(tcp),
                ws: addr(ws),
                grpc: addr(grpc),
            }],
        })
    }

    /// Stops every process of the cluster (SIGKILL through each child's own
    /// handle) and waits for them.
    pub async fn stop(mut self) {
        for comet in &mut self.comets {
            if let Some(child) = &mut comet.child {
                let _ = child.kill().await;
            }
        }
        let _ = self.logic.kill().await;
    }
}

/// Default log directory of a run: `$TMPDIR/rim-bench-<pid>`.
pub fn default_log_dir() -> PathBuf {
    std::env::temp_dir().join(format!("rim-bench-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comets_get_disjoint_ports_clear_of_the_logic() {
        let base = 24_000;
        let mut seen = vec![base, base + 1];
        for i in 0..100 {
            let (t, w, g) = comet_ports(base, i);
            for p in [t, w, g, comet_metrics_port(base, i)] {
                assert!(!seen.contains(&p), "port {p} reused");
                seen.push(p);
            }
        }
    }
}
