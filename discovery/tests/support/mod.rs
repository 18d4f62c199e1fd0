//! Helpers for the ZooKeeper tests: the shared server from `RIM_TEST_ZK`,
//! private servers for restart tests, unique roots and bounded waits.

pub mod proxy;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rim_discovery::{Addrs, NodeInfo, ZkDiscovery};
use tokio::sync::watch;
use zookeeper_client as zk;

/// Bound for any wait on a watched view or a session change.
pub const WAIT: Duration = Duration::from_secs(30);
/// Session timeout of the discoveries on the shared server.
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(6);

/// The shared server `deploy/test.sh` starts, from `RIM_TEST_ZK`.
pub fn shared_zk() -> String {
    match std::env::var("RIM_TEST_ZK") {
        Ok(addr) if !addr.trim().is_empty() => addr.trim().to_owned(),
        _ => panic!("RIM_TEST_ZK is not set: run deploy/test.sh"),
    }
}

/// Sends logs to the test output when `RUST_LOG` asks for them.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A ZooKeeper root no other test or run uses.
pub fn unique_root() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock before 1970")
        .as_nanos();
    format!(
        "/rim-test-{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Connects a discovery, failing clearly when the server is unreachable.
pub async fn discovery(addr: &str, root: &str, session_timeout: Duration) -> Arc<ZkDiscovery> {
    init_logs();
    ZkDiscovery::connect(addr, root, session_timeout)
        .await
        .unwrap_or_else(|e| {
            panic!("ZooKeeper at {addr} (RIM_TEST_ZK or a private server) is unreachable: {e}")
        })
}

/// A raw client for looking behind the discovery's back.
pub async fn raw_client(addr: &str) -> zk::Client {
    tokio::time::timeout(
        WAIT,
        zk::Client::connector()
            .with_session_timeout(SESSION_TIMEOUT)
            .with_fail_eagerly()
            .connect(addr),
    )
    .await
    .unwrap_or_else(|_| panic!("connecting to ZooKeeper at {addr} timed out"))
    .unwrap_or_else(|e| {
        panic!("ZooKeeper at {addr} (RIM_TEST_ZK or a private server) is unreachable: {e}")
    })
}

/// Deletes `root` and everything below it (best effort, for cleanup).
pub async fn remove_tree(client: &zk::Client, root: &str) {
    let mut paths = vec![root.to_owned()];
    let mut i = 0;
    while i < paths.len() {
        if let Ok(children) = client.list_children(&paths[i]).await {
            let parent = paths[i].clone();
            paths.extend(children.into_iter().map(|c| format!("{parent}/{c}")));
        }
        i += 1;
    }
    for path in paths.iter().rev() {
        let _ = client.delete(path, None).await;
    }
}

/// A comet's registration data.
pub fn comet(id: &str, region: &str) -> NodeInfo {
    NodeInfo {
        id: id.into(),
        region: region.into(),
        zone: "z1".into(),
        addrs: Addrs {
            tcp: "127.0.0.1:3101".into(),
            ws: "127.0.0.1:3102".into(),
            wss: String::new(),
            grpc: "127.0.0.1:3109".into(),
        },
        domain: String::new(),
        weight: 10,
        conn_count: 0,
        ip_count: 0,
        updated: 0,
    }
}

/// A logic's registration data.
pub fn logic(id: &str) -> NodeInfo {
    NodeInfo {
        id: id.into(),
        region: "sh".into(),
        addrs: Addrs {
            grpc: "127.0.0.1:3119".into(),
            ..Addrs::default()
        },
        weight: 10,
        ..NodeInfo::default()
    }
}

/// The ids of a view, in order.
pub fn ids(nodes: &[NodeInfo]) -> Vec<&str> {
    nodes.iter().map(|n| n.id.as_str()).collect()
}

/// True when the view holds `expected` (its `updated` stamp aside).
pub fn holds(nodes: &[NodeInfo], expected: &NodeInfo) -> bool {
    nodes.iter().any(|n| {
        n.updated > 0
            && NodeInfo {
                updated: 0,
                ..n.clone()
            } == NodeInfo {
                updated: 0,
                ..expected.clone()
            }
    })
}

/// Waits until the view satisfies `ready`, panicking after [`WAIT`].
pub async fn wait_view(
    rx: &mut watch::Receiver<Vec<NodeInfo>>,
    what: &str,
    mut ready: impl FnMut(&[NodeInfo]) -> bool,
) -> Vec<NodeInfo> {
    let waited = tokio::time::timeout(WAIT, rx.wait_for(|nodes| ready(nodes)))
        .await
        .map(|found| found.map(|nodes| nodes.clone()));
    match waited {
        Ok(Ok(nodes)) => nodes,
        Ok(Err(_)) => panic!("the view closed while waiting for {what}"),
        Err(_) => panic!(
            "timed out after {WAIT:?} waiting for {what}; the view holds {:?}",
            rx.borrow()
        ),
    }
}

/// Waits until `ready()` holds, polling, panicking after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !ready() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The session that owns the ephemeral node at `path`, if it exists.
pub async fn owner(client: &zk::Client, path: &str) -> Option<i64> {
    client
        .check_stat(path)
        .await
        .unwrap_or_else(|e| panic!("stat {path}: {e}"))
        .map(|stat| stat.ephemeral_owner)
}
