//! A gRPC channel balanced over the nodes discovery reports for one role,
//! following discovery (the comet's channel to the logics).

use std::collections::HashSet;
use std::time::Duration;

use rim_discovery::NodeInfo;
use rim_tls::GrpcTls;
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::transport::channel::Change;

/// How long connecting to one node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Returns a gRPC channel balanced over the gRPC addresses of `nodes`, and
/// keeps it following them: nodes discovery adds become endpoints, nodes it
/// drops are removed. Endpoints dial with `tls` (`node.tls_ca`: `https://`,
/// verified against the cluster's CA) or plaintext.
pub fn follow(mut nodes: watch::Receiver<Vec<NodeInfo>>, tls: GrpcTls) -> Channel {
    let (channel, changes) = Channel::balance_channel::<String>(64);
    tokio::spawn(async move {
        let mut current: HashSet<String> = HashSet::new();
        loop {
            let wanted: HashSet<String> = nodes
                .borrow_and_update()
                .iter()
                .map(|n| n.addrs.grpc.clone())
                .filter(|a| !a.is_empty())
                .collect();
            for gone in current.difference(&wanted) {
                let _ = changes.send(Change::Remove(gone.clone())).await;
            }
            for new in wanted.difference(&current) {
                match tls.endpoint(new) {
                    Ok(endpoint) => {
                        let endpoint = endpoint
                            .connect_timeout(CONNECT_TIMEOUT)
                            .timeout(CALL_TIMEOUT);
                        let _ = changes.send(Change::Insert(new.clone(), endpoint)).await;
                    }
                    Err(err) => {
                        tracing::warn!(addr = %new, reason = %err, "bad grpc address in discovery")
                    }
                }
            }
            if wanted != current {
                tracing::info!(nodes = ?wanted, "balanced nodes changed");
            }
            current = wanted;
            if nodes.changed().await.is_err() {
                return;
            }
        }
    });
    channel
}
