//! rim-testkit holds what rim's fault tests need and production code never
//! does: private service instances (ZooKeeper, a Kafka-protocol broker with
//! durable storage, PostgreSQL) on ports and data dirs of their own, so a test can stop
//! and restart them without disturbing the shared services deploy/test.sh
//! runs. Every instance is stopped by its own PID on drop. It also holds
//! [`Logs`], which captures what the code under test writes to its log,
//! and [`TestCa`], the certificates of TLS tests.

mod logs;
mod postgres;
mod tansu;
mod tls;
mod zookeeper;

pub use logs::Logs;
pub use postgres::PostgresServer;
pub use tansu::TansuServer;
pub use tls::{CertFiles, TestCa, read_to_close};
pub use zookeeper::ZkServer;

use std::time::Duration;

/// True while the process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// A port on 127.0.0.1 that was free a moment ago (the caller's server
/// binds it next; good enough for a private test instance).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port`.
pub fn wait_listening(port: u16, limit: Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}
