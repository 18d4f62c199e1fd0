//! The region's comets this job delivers to, each behind its delivery client.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;
use rim_proto::api::CometApi;

use crate::comet_client::CometClient;
use crate::metrics::JobMetrics;

/// A comet this job delivers to: its node id and its client.
pub type CometHandle = (String, Arc<dyn CometApi>);

/// The current comets, by node id.
#[derive(Default)]
pub(crate) struct Comets {
    clients: RwLock<HashMap<String, Arc<CometClient>>>,
}

impl Comets {
    /// Replaces the set: new comets get a client, missing ones are retired
    /// (their pending calls end as Gone).
    pub(crate) fn replace(&self, comets: Vec<CometHandle>, metrics: &Arc<JobMetrics>) {
        let keep: HashMap<String, Arc<dyn CometApi>> = comets.into_iter().collect();
        let mut clients = self.clients.write();
        clients.retain(|id, client| {
            let stays = keep.contains_key(id);
            if !stays {
                client.retire();
            }
            stays
        });
        for (id, api) in keep {
            clients
                .entry(id.clone())
                .or_insert_with(|| Arc::new(CometClient::spawn(id, api, Arc::clone(metrics))));
        }
    }

    /// Returns the client of one comet.
    pub(crate) fn get(&self, id: &str) -> Option<Arc<CometClient>> {
        self.clients.read().get(id).cloned()
    }

    /// Returns every comet's client.
    pub(crate) fn all(&self) -> Vec<(String, Arc<CometClient>)> {
        self.clients
            .read()
            .iter()
            .map(|(id, c)| (id.clone(), Arc::clone(c)))
            .collect()
    }
}
