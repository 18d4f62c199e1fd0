//! Logic as the HTTP API sees it: the one boundary between rim-api and
//! rim-logic.
//!
//! The API plans pushes, answers online and node queries, runs admin calls
//! and reaches the IM service through [`LogicFacade`] alone; it never
//! reaches the router, the comet directory or the node selector behind it.
//! [`Logic`] implements it here, so what the API may ask of logic is this
//! one trait.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;
use rim_proto::api::RpcError;
use rim_proto::pb::comet::v1::StatsReply;
use rim_proto::pb::logic::v1 as pb;
use rim_router::{Presence, ServerReport};

use crate::comets::{COMET_CALL, CometNode};
use crate::im::Im;
use crate::nodes::{Choice, Platform};
use crate::service::Logic;

/// Connection keys grouped by the comet (node id) that holds them, in comet order.
pub type KeysByComet = BTreeMap<String, Vec<String>>;

/// Why a call to one comet failed.
#[derive(Debug, thiserror::Error)]
pub enum CometCallError {
    /// The comet answered with an error (or could not be reached).
    #[error("{0}")]
    Rpc(#[from] RpcError),
    /// The comet did not answer within the call's time limit.
    #[error("timed out")]
    TimedOut,
}

/// Why logic could not answer the API.
#[derive(Debug, thiserror::Error)]
pub enum FacadeError {
    /// The online map (router) failed.
    #[error("router: {0}")]
    Router(#[from] rim_router::Error),
    /// No comet with this node id is in the directory.
    #[error("comet {0} is not known")]
    UnknownComet(String),
    /// A call to a comet failed.
    #[error("comet {comet}: {source}")]
    Comet {
        /// The comet's node id.
        comet: String,
        /// What went wrong.
        #[source]
        source: CometCallError,
    },
}

/// Who asks for comets: goim's `platform`, an explicit region and the
/// client's address.
#[derive(Clone, Copy, Debug, Default)]
pub struct NodeQuery<'a> {
    /// goim's platform (`web` gets WebSocket addresses).
    pub platform: &'a str,
    /// The client's region, when it names one (beats the address lookup).
    pub region: Option<&'a str>,
    /// The client's IP address, for the region lookup.
    pub client_ip: Option<IpAddr>,
}

/// The comets chosen for one client.
#[derive(Clone, Debug)]
pub struct NodeSelection {
    /// The region the choice was made for, if one was known.
    pub region: Option<String>,
    /// The comets, best first, with their scores.
    pub choices: Vec<Choice>,
    /// goim's answer built from them.
    pub reply: pb::NodesReply,
}

/// What the HTTP API asks of logic: push planning, online queries, node
/// selection, admin calls, readiness and the IM service.
#[async_trait]
pub trait LogicFacade: Send + Sync + 'static {
    /// Groups `keys` by the comet holding each; keys not online are left out.
    async fn keys_by_comet(&self, keys: &[String]) -> Result<KeysByComet, FacadeError>;

    /// Groups every online connection of the users `mids` by comet.
    async fn user_keys_by_comet(&self, mids: &[i64]) -> Result<KeysByComet, FacadeError>;

    /// Returns the members of every room, summed over the comets' latest reports.
    async fn room_counts(&self) -> Result<HashMap<String, i64>, FacadeError>;

    /// Returns each comet's latest room report (by node id), with its time.
    async fn room_reports(&self) -> Result<HashMap<String, ServerReport>, FacadeError>;

    /// Returns every comet in the directory, sorted by id, with its last load.
    fn comets(&self) -> Vec<CometNode>;

    /// Chooses comets for a client (`/goim/nodes/weighted`).
    fn select_nodes(&self, query: NodeQuery<'_>) -> NodeSelection;

    /// Closes the connections `keys` on comet `comet`; returns how many it found.
    async fn kick(&self, comet: &str, keys: Vec<String>) -> Result<u64, FacadeError>;

    /// Asks every comet for its live stats; each comet answers or says why not.
    async fn comet_stats(&self) -> Vec<(CometNode, Result<StatsReply, CometCallError>)>;

    /// Checks that logic can answer (its router is reachable).
    async fn ping(&self) -> Result<(), FacadeError>;

    /// Returns user `mid`'s live connections (platform, comet, start) and
    /// when it was last seen.
    async fn presence(&self, mid: i64) -> Result<Presence, FacadeError>;

    /// Returns the IM service, or `None` when `im.store` is off.
    fn im(&self) -> Option<Arc<Im>>;
}

/// Runs one call to a comet within [`COMET_CALL`].
async fn call_comet<T>(
    call: impl Future<Output = Result<T, RpcError>>,
) -> Result<T, CometCallError> {
    match tokio::time::timeout(COMET_CALL, call).await {
        Ok(answer) => Ok(answer?),
        Err(_) => Err(CometCallError::TimedOut),
    }
}

#[async_trait]
impl LogicFacade for Logic {
    async fn keys_by_comet(&self, keys: &[String]) -> Result<KeysByComet, FacadeError> {
        let servers = self.router().servers_of_keys(keys).await?;
        let mut by_comet = KeysByComet::new();
        for (key, server) in keys.iter().zip(servers) {
            if let Some(server) = server {
                by_comet.entry(server).or_default().push(key.clone());
            }
        }
        Ok(by_comet)
    }

    async fn user_keys_by_comet(&self, mids: &[i64]) -> Result<KeysByComet, FacadeError> {
        Ok(self
            .router()
            .keys_by_server(mids)
            .await?
            .into_iter()
            .collect())
    }

    async fn room_counts(&self) -> Result<HashMap<String, i64>, FacadeError> {
        Ok(self.router().room_counts().await?)
    }

    async fn room_reports(&self) -> Result<HashMap<String, ServerReport>, FacadeError> {
        Ok(self.router().server_reports().await?)
    }

    fn comets(&self) -> Vec<CometNode> {
        self.directory().nodes()
    }

    fn select_nodes(&self, query: NodeQuery<'_>) -> NodeSelection {
        let selector = self.selector();
        let platform = Platform::of(query.platform);
        let region = selector.region_of(query.region, query.client_ip);
        let choices = selector.rank(&self.directory().nodes(), platform, region.as_deref());
        let reply = selector.reply(&choices, platform);
        NodeSelection {
            region,
            choices,
            reply,
        }
    }

    async fn kick(&self, comet: &str, keys: Vec<String>) -> Result<u64, FacadeError> {
        let client = self
            .directory()
            .api(comet)
            .ok_or_else(|| FacadeError::UnknownComet(comet.to_owned()))?;
        call_comet(client.kick(keys))
            .await
            .map_err(|source| FacadeError::Comet {
                comet: comet.to_owned(),
                source,
            })
    }

    async fn comet_stats(&self) -> Vec<(CometNode, Result<StatsReply, CometCallError>)> {
        let mut out = Vec::new();
        for (node, client) in self.directory().all() {
            let stats = call_comet(client.stats()).await;
            out.push((node, stats));
        }
        out
    }

    async fn ping(&self) -> Result<(), FacadeError> {
        Ok(self.router().ping().await?)
    }

    async fn presence(&self, mid: i64) -> Result<Presence, FacadeError> {
        Ok(self.router().presence(mid).await?)
    }

    fn im(&self) -> Option<Arc<Im>> {
        Logic::im(self).cloned()
    }
}
