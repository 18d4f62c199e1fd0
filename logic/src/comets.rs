//! The comets logic knows of: where clients reach them, how loaded they
//! are, and a `CometApi` client for each (for admin calls and stats).
//!
//! The directory is filled from discovery (`replace`, with every change the
//! watch reports) or, in standalone, with the local comet (`insert`); its
//! load is refreshed from each comet's stats (`refresh_every`).

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rim_discovery::NodeInfo;
use rim_proto::api::{CometApi, RemoteComet, RpcError};
use rim_tls::GrpcTls;

/// How long one call to a comet (stats, kick) may take.
pub(crate) const COMET_CALL: Duration = Duration::from_secs(5);

/// A comet as logic sees it.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct CometNode {
    /// The comet's node id (the router's server id).
    pub id: String,
    /// Region the comet serves.
    pub region: String,
    /// Relative weight in node selection.
    pub weight: u32,
    /// Client TCP address, `host:port` (empty = none).
    pub tcp: String,
    /// Client WebSocket address, `host:port` (empty = none).
    pub ws: String,
    /// Client WSS address, `host:port` (empty = none).
    pub wss: String,
    /// Public host name web clients reach the WebSocket listeners by
    /// (`comet.public_domain`; empty = the host of `ws` / `wss`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub domain: String,
    /// gRPC address, `host:port`.
    pub grpc: String,
    /// Connections at the last stats refresh.
    pub conn_count: u64,
    /// Distinct client IPs at the last stats refresh.
    pub ip_count: u64,
    /// When `conn_count` and `ip_count` were measured; `None` = never (they
    /// are then unknown, not zero).
    #[serde(skip)]
    pub load_as_of: Option<SystemTime>,
}

impl From<&NodeInfo> for CometNode {
    /// The directory's view of a comet discovery reports; its load comes
    /// with the registration (measured when it was written).
    fn from(info: &NodeInfo) -> CometNode {
        CometNode {
            id: info.id.clone(),
            region: info.region.clone(),
            weight: info.weight,
            tcp: info.addrs.tcp.clone(),
            ws: info.addrs.ws.clone(),
            wss: info.addrs.wss.clone(),
            domain: info.domain.clone(),
            grpc: info.addrs.grpc.clone(),
            conn_count: info.conn_count,
            ip_count: info.ip_count,
            load_as_of: u64::try_from(info.updated)
                .ok()
                .filter(|ms| *ms > 0)
                .map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
        }
    }
}

struct Entry {
    node: CometNode,
    api: Arc<dyn CometApi>,
}

/// The directory of comets; cheap to share behind an `Arc`.
#[derive(Default)]
pub struct Comets {
    entries: RwLock<HashMap<String, Entry>>,
    /// The cluster's gRPC token (`node.grpc_token`) sent to the comets it
    /// connects to; `None` = none.
    grpc_token: Option<String>,
    /// How clients of discovered comets dial them (`node.tls_ca`).
    grpc_tls: GrpcTls,
}

impl std::fmt::Debug for Comets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Comets")
            .field("nodes", &self.nodes())
            .finish()
    }
}

/// Why the directory could not be built: a comet's gRPC address is unusable.
#[derive(Debug, thiserror::Error)]
#[error("comet {id}: bad grpc address {addr:?}: {source}")]
pub struct BadComet {
    id: String,
    addr: String,
    #[source]
    source: RpcError,
}

impl Comets {
    /// Creates an empty directory.
    pub fn new() -> Comets {
        Comets::default()
    }

    /// Creates an empty directory whose clients of discovered comets send
    /// `token` (the cluster's `node.grpc_token`) with every call.
    pub fn with_grpc_token(token: Option<String>) -> Comets {
        Comets {
            grpc_token: token,
            ..Comets::default()
        }
    }

    /// Makes clients of discovered comets dial with `tls` (`node.tls_ca`,
    /// presenting `node.tls_cert` to comets that require it).
    pub fn with_grpc_tls(mut self, tls: GrpcTls) -> Comets {
        self.grpc_tls = tls;
        self
    }

    /// Makes the directory hold exactly `nodes` (from discovery): clients of
    /// comets whose gRPC address did not change are kept, new ones connect
    /// lazily, missing ones are dropped.
    pub fn replace(&self, nodes: Vec<CometNode>) -> Result<(), BadComet> {
        let mut fresh = HashMap::with_capacity(nodes.len());
        for node in nodes {
            let kept = {
                let entries = self.entries.read();
                entries
                    .get(&node.id)
                    .filter(|e| e.node.grpc == node.grpc)
                    .map(|e| Arc::clone(&e.api))
            };
            let api = match kept {
                Some(api) => api,
                None => Arc::new(
                    RemoteComet::connect_lazy_with_tls(&node.grpc, &self.grpc_tls)
                        .and_then(|c| c.with_token(self.grpc_token.as_deref()))
                        .map_err(|e| BadComet {
                            id: node.id.clone(),
                            addr: node.grpc.clone(),
                            source: e,
                        })?,
                ) as Arc<dyn CometApi>,
            };
            fresh.insert(node.id.clone(), Entry { node, api });
        }
        *self.entries.write() = fresh;
        Ok(())
    }

    /// Adds (or replaces) one comet.
    pub fn insert(&self, node: CometNode, api: Arc<dyn CometApi>) {
        let mut entries = self.entries.write();
        entries.insert(node.id.clone(), Entry { node, api });
    }

    /// Returns every comet, sorted by id.
    pub fn nodes(&self) -> Vec<CometNode> {
        let entries = self.entries.read();
        let mut nodes: Vec<CometNode> = entries.values().map(|e| e.node.clone()).collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        nodes
    }

    /// Returns the client of one comet.
    pub(crate) fn api(&self, id: &str) -> Option<Arc<dyn CometApi>> {
        let entries = self.entries.read();
        entries.get(id).map(|e| Arc::clone(&e.api))
    }

    /// Returns every comet with its client.
    pub(crate) fn all(&self) -> Vec<(CometNode, Arc<dyn CometApi>)> {
        let entries = self.entries.read();
        entries
            .values()
            .map(|e| (e.node.clone(), Arc::clone(&e.api)))
            .collect()
    }

    /// Refreshes the load every `period` until `stop` is cancelled.
    pub fn refresh_every(
        self: Arc<Self>,
        period: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => self.refresh_load().await,
                }
            }
        })
    }

    /// Asks every comet for its stats and records its load; a comet that
    /// does not answer keeps its last figures (and is logged).
    pub async fn refresh_load(&self) {
        for (node, api) in self.all() {
            match tokio::time::timeout(COMET_CALL, api.stats()).await {
                Ok(Ok(stats)) => {
                    let mut entries = self.entries.write();
                    if let Some(entry) = entries.get_mut(&node.id) {
                        entry.node.conn_count = stats.tcp_connections + stats.ws_connections;
                        entry.node.ip_count = stats.ip_count;
                        entry.node.load_as_of = Some(SystemTime::now());
                    }
                }
                Ok(Err(err)) => {
                    tracing::debug!(comet = %node.id, reason = %err, "comet stats unavailable")
                }
                Err(_) => tracing::debug!(comet = %node.id, "comet stats timed out"),
            }
        }
    }
}
