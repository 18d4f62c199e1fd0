//! Static discovery: the comets and logics listed in `[discovery]`.

use async_trait::async_trait;
use rim_config::DiscoveryConfig;
use tokio::sync::watch;

use crate::node::check_id;
use crate::{Addrs, Discovery, Kind, NodeInfo, Registration, Result};

/// Region given to the logics of a static list, which carries none.
const STATIC_LOGIC_REGION: &str = "default";
/// Weight given to the logics of a static list, which carries none.
const STATIC_LOGIC_WEIGHT: u32 = 10;

/// A fixed membership from config, for standalone and tests: registering
/// publishes nothing and watching returns the configured set.
#[derive(Debug)]
pub struct StaticDiscovery {
    comets_tx: watch::Sender<Vec<NodeInfo>>,
    logics_tx: watch::Sender<Vec<NodeInfo>>,
}

impl StaticDiscovery {
    /// Builds the sets from `[[discovery.comets]]` and `discovery.logics`
    /// (a logic's id is its gRPC address).
    pub fn new(config: &DiscoveryConfig) -> StaticDiscovery {
        let mut comets: Vec<NodeInfo> = config
            .comets
            .iter()
            .map(|comet| NodeInfo {
                id: comet.id.clone(),
                region: comet.region.clone(),
                zone: String::new(),
                addrs: Addrs {
                    tcp: comet.tcp.clone(),
                    ws: comet.ws.clone(),
                    wss: comet.wss.clone(),
                    grpc: comet.grpc.clone(),
                },
                domain: comet.domain.clone(),
                weight: comet.weight,
                ..NodeInfo::default()
            })
            .collect();
        let mut logics: Vec<NodeInfo> = config
            .logics
            .iter()
            .map(|grpc| NodeInfo {
                id: grpc.clone(),
                region: STATIC_LOGIC_REGION.into(),
                addrs: Addrs {
                    grpc: grpc.clone(),
                    ..Addrs::default()
                },
                weight: STATIC_LOGIC_WEIGHT,
                ..NodeInfo::default()
            })
            .collect();
        for set in [&mut comets, &mut logics] {
            set.sort_by(|a, b| a.id.cmp(&b.id));
            set.dedup_by(|a, b| a.id == b.id);
        }
        StaticDiscovery {
            comets_tx: watch::Sender::new(comets),
            logics_tx: watch::Sender::new(logics),
        }
    }
}

#[async_trait]
impl Discovery for StaticDiscovery {
    async fn register(&self, _kind: Kind, info: NodeInfo) -> Result<Registration> {
        check_id(&info.id)?;
        Ok(Registration::noop())
    }

    async fn watch(&self, kind: Kind) -> Result<watch::Receiver<Vec<NodeInfo>>> {
        Ok(match kind {
            Kind::Comet => self.comets_tx.subscribe(),
            Kind::Logic => self.logics_tx.subscribe(),
        })
    }
}
