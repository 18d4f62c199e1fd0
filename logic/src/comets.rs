//! The comets logic knows of: where clients reach them, how loaded they
//! are, and a `CometApi` client for each (for admin calls and stats).
//!
//! Today the directory is filled from static discovery (or, in standalone,
//! with the local comet); ZooKeeper discovery will feed `replace`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rim_config::StaticComet;
use rim_proto::api::{CometApi, RemoteComet};

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
    /// gRPC address, `host:port`.
    pub grpc: String,
    /// Connections at the last stats refresh.
    pub conn_count: u64,
    /// Distinct client IPs at the last stats refresh.
    pub ip_count: u64,
}

struct Entry {
    node: CometNode,
    api: Arc<dyn CometApi>,
}

/// The directory of comets; cheap to share behind an `Arc`.
#[derive(Default)]
pub struct Comets {
    entries: RwLock<HashMap<String, Entry>>,
}

impl std::fmt::Debug for Comets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Comets")
            .field("nodes", &self.nodes())
            .finish()
    }
}

/// Why the directory could not be built.
#[derive(Debug, thiserror::Error)]
#[error("comet {id}: bad grpc address {addr:?}: {reason}")]
pub struct BadComet {
    id: String,
    addr: String,
    reason: String,
}

impl Comets {
    /// Creates an empty directory.
    pub fn new() -> Comets {
        Comets::default()
    }

    /// Creates a directory of remote comets from static discovery.
    pub fn from_static(list: &[StaticComet]) -> Result<Comets, BadComet> {
        let comets = Comets::new();
        comets.replace(
            list.iter()
                .map(|c| CometNode {
                    id: c.id.clone(),
                    region: c.region.clone(),
                    weight: c.weight,
                    tcp: c.tcp.clone(),
                    ws: c.ws.clone(),
                    wss: c.wss.clone(),
                    grpc: c.grpc.clone(),
                    conn_count: 0,
                    ip_count: 0,
                })
                .collect(),
        )?;
        Ok(comets)
    }

    /// Makes the directory hold exactly `nodes` (from discovery): clients of
    /// comets whose gRPC address did not change are kept, new ones connect
    /// lazily, missing ones are dropped.
    pub fn replace(&self, nodes: Vec<CometNode>) -> Result<(), BadComet> {
        let mut fresh = HashMap::with_capacity(nodes.len());
        for node in nodes {
            let kept = {
                let entries = self
                    .entries
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                entries
                    .get(&node.id)
                    .filter(|e| e.node.grpc == node.grpc)
                    .map(|e| Arc::clone(&e.api))
            };
            let api = match kept {
                Some(api) => api,
                None => Arc::new(RemoteComet::connect_lazy(&node.grpc).map_err(|e| BadComet {
                    id: node.id.clone(),
                    addr: node.grpc.clone(),
                    reason: e.to_string(),
                })?) as Arc<dyn CometApi>,
            };
            fresh.insert(node.id.clone(), Entry { node, api });
        }
        *self
            .entries
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
        Ok(())
    }

    /// Adds (or replaces) one comet.
    pub fn insert(&self, node: CometNode, api: Arc<dyn CometApi>) {
        let mut entries = self
            .entries
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        entries.insert(node.id.clone(), Entry { node, api });
    }

    /// Returns every comet, sorted by id.
    pub fn nodes(&self) -> Vec<CometNode> {
        let entries = self
            .entries
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut nodes: Vec<CometNode> = entries.values().map(|e| e.node.clone()).collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        nodes
    }

    /// Returns the client of one comet.
    pub fn api(&self, id: &str) -> Option<Arc<dyn CometApi>> {
        let entries = self
            .entries
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        entries.get(id).map(|e| Arc::clone(&e.api))
    }

    /// Returns every comet with its client.
    pub fn all(&self) -> Vec<(CometNode, Arc<dyn CometApi>)> {
        let entries = self
            .entries
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
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
            match tokio::time::timeout(Duration::from_secs(5), api.stats()).await {
                Ok(Ok(stats)) => {
                    let mut entries = self
                        .entries
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if let Some(entry) = entries.get_mut(&node.id) {
                        entry.node.conn_count = stats.tcp_connections + stats.ws_connections;
                        entry.node.ip_count = stats.ip_count;
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
