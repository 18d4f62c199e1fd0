//! A private ZooKeeper server for tests that stop and restart it: its own
//! temp dir and port, started and stopped with Debian's `zkServer.sh` the way
//! `deploy/test.sh` does, and stopped by its pid file on drop.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::alive;

const ZK_SERVER: &str = "/usr/share/zookeeper/bin/zkServer.sh";
/// Where Debian's zkEnv.sh sends the server's stdout, whatever the caller sets.
const ZK_LOG_DIR: &str = "/var/log/zookeeper";
/// Bound for the server to take sessions (answer `srvr` with its mode) after a start.
const START_LIMIT: Duration = Duration::from_secs(30);
/// Bound for the process to exit after SIGTERM before it is killed.
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// A running (or stopped) private ZooKeeper server.
pub struct ZkServer {
    dir: tempfile::TempDir,
    port: u16,
}

impl ZkServer {
    /// Writes a config for a fresh data dir and a port of its own, and starts it.
    pub fn start_new() -> ZkServer {
        assert!(
            Path::new(ZK_SERVER).exists(),
            "{ZK_SERVER} not found: install the zookeeperd package (deploy/test.sh does)"
        );
        let dir = tempfile::Builder::new()
            .prefix("rim-zk")
            .tempdir()
            .expect("creating the ZooKeeper temp dir");
        let port = crate::free_port();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).expect("creating the ZooKeeper data dir");
        let config = format!(
            "tickTime=500\ninitLimit=10\nsyncLimit=5\ndataDir={}\nclientPort={port}\n\
             clientPortAddress=127.0.0.1\nmaxSessionTimeout=60000\nadmin.enableServer=false\n\
             4lw.commands.whitelist=ruok,srvr\n",
            data.display()
        );
        std::fs::write(dir.path().join("zoo.cfg"), config).expect("writing zoo.cfg");
        let server = ZkServer { dir, port };
        server.start();
        server
    }

    /// The connect string.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("zoo.cfg")
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.path().join("data").join("zookeeper_server.pid")
    }

    /// zkServer.sh names its stdout file after `$USER`, so a per-port user
    /// keeps this server's output apart from others'.
    fn user(&self) -> String {
        format!("rim-test-{}", self.port)
    }

    fn out_file(&self) -> PathBuf {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        Path::new(ZK_LOG_DIR).join(format!(
            "zookeeper-{}-server-{}.out",
            self.user(),
            host.trim()
        ))
    }

    fn script(&self, action: &str) -> std::process::Output {
        Command::new(ZK_SERVER)
            .arg(action)
            .arg(self.config())
            .env("USER", self.user())
            .env("JMXDISABLE", "true")
            .env("SERVER_JVMFLAGS", "-Xmx256m")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {ZK_SERVER} {action}: {e}"))
    }

    /// Starts the server on its port and data dir and waits until it answers.
    pub fn start(&self) {
        let out = self.script("start");
        assert!(
            out.status.success(),
            "zkServer.sh start failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        let deadline = Instant::now() + START_LIMIT;
        while !self.answers() {
            assert!(
                Instant::now() < deadline,
                "private ZooKeeper on port {} did not answer within {START_LIMIT:?}\n{}",
                self.port,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops the server and waits for its process to exit (killing it after
    /// [`STOP_LIMIT`]).
    pub fn stop(&self) {
        let Some(pid) = self.pid() else { return };
        let _ = self.script("stop");
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

    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.pid_file())
            .ok()
            .and_then(|pid| pid.trim().parse().ok())
    }

    /// True when the server takes sessions (its `srvr` answer names its mode).
    fn answers(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut answer = String::new();
        // `ruok` says imok as soon as the process runs; `srvr` names the
        // mode only once the server takes sessions.
        stream.write_all(b"srvr").is_ok()
            && stream.read_to_string(&mut answer).is_ok()
            && answer.contains("Mode: ")
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.out_file()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        format!("---- {} ----\n{tail}", self.out_file().display())
    }
}

impl Drop for ZkServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(self.out_file());
    }
}
