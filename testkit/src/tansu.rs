//! A private tansu broker with SQLite storage, so it keeps its topics,
//! messages and committed offsets across a restart.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{free_port, wait_listening};

/// The broker binary `cargo install tansu` puts in cargo's bin dir.
fn binary() -> PathBuf {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    cargo_home.join("bin/tansu")
}

/// A private broker: its own port and database file.
pub struct TansuServer {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl TansuServer {
    /// Starts a broker on a port and a database of its own.
    pub fn start_new() -> TansuServer {
        let dir = tempfile::Builder::new()
            .prefix("rim-tansu")
            .tempdir()
            .expect("temp dir");
        let mut server = TansuServer {
            dir,
            port: free_port(),
            child: None,
        };
        server.start();
        server
    }

    /// The bootstrap address, `127.0.0.1:port`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port and database.
    pub fn start(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::File::create(self.dir.path().join("tansu.log")).expect("log file");
        let child = Command::new(binary())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
            ])
            // tansu resolves the database path against its working directory.
            .arg("sqlite://tansu.db")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "starting {}: {e} (deploy/test.sh installs tansu)",
                    binary().display()
                )
            });
        self.child = Some(child);
        assert!(
            wait_listening(self.port, Duration::from_secs(30)),
            "tansu did not listen:\n{}",
            self.log()
        );
    }

    /// Stops the broker (SIGTERM, then SIGKILL after 10 s) and waits for it.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        for _ in 0..100 {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Creates a topic through the broker's CLI.
    pub fn create_topic(&self, name: &str, partitions: u32) {
        let out = Command::new(binary())
            .args([
                "topic",
                "create",
                name,
                "--broker",
                &format!("tcp://127.0.0.1:{}", self.port),
            ])
            .args(["--partitions", &partitions.to_string()])
            .output()
            .expect("tansu topic create runs");
        assert!(
            out.status.success(),
            "tansu topic create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default()
    }
}

impl Drop for TansuServer {
    fn drop(&mut self) {
        self.stop();
    }
}
