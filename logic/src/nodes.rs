//! Node selection: which comets a client should connect to
//! (`/goim/nodes/weighted` and the Nodes RPC).
//!
//! goim's weighting is the baseline — a node in the client's region has its
//! weight × 1.6; score = weight + round((weight share − 0.5 × connection
//! share) × total connections), clamped to [1, 2^20] — and rim makes it
//! region-aware: the client's region comes from an explicit parameter or the
//! longest matching CIDR, and same-region comets are listed before others.
//!
//! Like goim, web clients (`platform=web`) get the host names of WebSocket
//! listeners (a comet's public domain when it has one) and every other
//! client the hosts of its addresses, TCP first.

use std::net::IpAddr;
use std::time::Duration;

use rim_config::NodesConfig;
use rim_proto::pb::logic::v1 as pb;

use crate::comets::CometNode;

/// goim's multiplier for a node in the client's region.
const SAME_REGION_FACTOR: f64 = 1.6;
/// goim's clamp on a score.
const MAX_SCORE: f64 = (1u64 << 20) as f64;
/// goim's platform name of browser clients, which can only use WebSocket.
const PLATFORM_WEB: &str = "web";

/// Which of a comet's listeners a client can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Platform {
    /// A browser: WebSocket and WSS only.
    Web,
    /// Any other client (goim's apps): TCP, else WebSocket.
    Other,
}

impl Platform {
    /// Reads goim's `platform` parameter; anything but `web` is an app.
    pub(crate) fn of(name: &str) -> Platform {
        if name == PLATFORM_WEB {
            Platform::Web
        } else {
            Platform::Other
        }
    }

    /// Whether a client of this platform can connect to `node`.
    fn can_use(self, node: &CometNode) -> bool {
        match self {
            Platform::Web => !node.ws.is_empty() || !node.wss.is_empty(),
            Platform::Other => !node.tcp.is_empty() || !node.ws.is_empty() || !node.wss.is_empty(),
        }
    }

    /// The host a client of this platform is given for `node`.
    fn host(self, node: &CometNode) -> String {
        if self == Platform::Web && !node.domain.is_empty() {
            return node.domain.clone();
        }
        let first = match self {
            Platform::Web => [&node.ws, &node.wss].into_iter().find(|a| !a.is_empty()),
            Platform::Other => [&node.tcp, &node.ws, &node.wss]
                .into_iter()
                .find(|a| !a.is_empty()),
        };
        host(first.map_or("", String::as_str))
    }
}

/// Chooses comets for clients.
#[derive(Clone, Debug)]
pub(crate) struct NodeSelector {
    config: NodesConfig,
    heartbeat: Duration,
    heartbeat_max: u32,
}

/// A comet chosen for a client, with its score.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    /// The comet.
    pub node: CometNode,
    /// Its score for this client (higher is better).
    pub score: u64,
    /// Whether it is in the client's region.
    pub same_region: bool,
}

impl NodeSelector {
    /// Creates a selector; the heartbeat figures are passed on to clients.
    pub(crate) fn new(
        config: NodesConfig,
        heartbeat: Duration,
        heartbeat_max: u32,
    ) -> NodeSelector {
        NodeSelector {
            config,
            heartbeat,
            heartbeat_max,
        }
    }

    /// Returns the client's region: `explicit` when given, else the longest
    /// CIDR match of `client_ip`.
    pub(crate) fn region_of(
        &self,
        explicit: Option<&str>,
        client_ip: Option<IpAddr>,
    ) -> Option<String> {
        if let Some(region) = explicit.filter(|r| !r.is_empty()) {
            return Some(region.to_owned());
        }
        let ip = client_ip?;
        self.config
            .regions
            .iter()
            .filter(|row| row.cidr.contains(ip))
            .max_by_key(|row| row.cidr.prefix())
            .map(|row| row.region.clone())
    }

    /// Ranks the comets a client of `platform` can use, for a client in
    /// `region`: same-region first, then by score; at most `max_nodes`.
    pub(crate) fn rank(
        &self,
        nodes: &[CometNode],
        platform: Platform,
        region: Option<&str>,
    ) -> Vec<Choice> {
        let usable: Vec<&CometNode> = nodes.iter().filter(|n| platform.can_use(n)).collect();
        let weights: Vec<f64> = usable
            .iter()
            .map(|n| {
                let base = f64::from(n.weight.max(1));
                if region.is_some_and(|r| r == n.region) {
                    base * SAME_REGION_FACTOR
                } else {
                    base
                }
            })
            .collect();
        let total_weight: f64 = weights.iter().sum();
        let total_conns: f64 = usable.iter().map(|n| n.conn_count as f64).sum();
        let mut choices: Vec<Choice> = usable
            .iter()
            .zip(&weights)
            .map(|(node, &weight)| {
                let weight_ratio = if total_weight > 0.0 {
                    weight / total_weight
                } else {
                    0.0
                };
                let conn_ratio = if total_conns > 0.0 {
                    node.conn_count as f64 / total_conns * 0.5
                } else {
                    0.0
                };
                let score = (weight + ((weight_ratio - conn_ratio) * total_conns).round())
                    .clamp(1.0, MAX_SCORE);
                Choice {
                    node: (*node).clone(),
                    score: score as u64,
                    same_region: region.is_some_and(|r| r == node.region),
                }
            })
            .collect();
        choices.sort_by(|a, b| {
            b.same_region
                .cmp(&a.same_region)
                .then(b.score.cmp(&a.score))
                .then(a.node.id.cmp(&b.node.id))
        });
        choices.truncate(self.config.max_nodes);
        choices
    }

    /// Builds goim's answer for a client of `platform`: the hosts of the
    /// ranked comets (goim's default domain when there is none) and the
    /// ports of the first; a port the first comet does not listen on is 0.
    pub(crate) fn reply(&self, choices: &[Choice], platform: Platform) -> pb::NodesReply {
        let port = |addr: &str| {
            addr.rsplit_once(':')
                .and_then(|(_, p)| p.parse::<i32>().ok())
                .unwrap_or(0)
        };
        let first = choices.first().map(|c| &c.node);
        let mut nodes: Vec<String> = choices.iter().map(|c| platform.host(&c.node)).collect();
        if nodes.is_empty() && !self.config.domain.is_empty() {
            nodes.push(self.config.domain.clone());
        }
        pb::NodesReply {
            domain: self.config.domain.clone(),
            tcp_port: first.map_or(0, |n| port(&n.tcp)),
            ws_port: first.map_or(0, |n| port(&n.ws)),
            wss_port: first.map_or(0, |n| port(&n.wss)),
            heartbeat: i32::try_from(self.heartbeat.as_secs()).unwrap_or(i32::MAX),
            heartbeat_max: i32::try_from(self.heartbeat_max).unwrap_or(i32::MAX),
            nodes,
            backoff: Some(pb::Backoff {
                max_delay: 300,
                base_delay: 3,
                factor: 1.8,
                jitter: 0.3,
            }),
        }
    }
}

/// The host part of a `host:port` address.
fn host(addr: &str) -> String {
    match addr.rsplit_once(':') {
        Some((host, _)) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        None => addr.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use rim_config::{Cidr, RegionCidr};

    use super::*;

    fn node(id: &str, region: &str, weight: u32, conns: u64) -> CometNode {
        CometNode {
            id: id.into(),
            region: region.into(),
            weight,
            tcp: format!("{id}.example:3101"),
            ws: format!("{id}.example:3102"),
            conn_count: conns,
            ..CometNode::default()
        }
    }

    fn selector(max_nodes: usize) -> NodeSelector {
        let regions = vec![
            RegionCidr {
                cidr: "10.0.0.0/8".parse::<Cidr>().unwrap(),
                region: "eu".into(),
            },
            RegionCidr {
                cidr: "10.9.0.0/16".parse::<Cidr>().unwrap(),
                region: "us".into(),
            },
        ];
        NodeSelector::new(
            NodesConfig {
                domain: "im.example".into(),
                max_nodes,
                regions,
            },
            Duration::from_secs(240),
            2,
        )
    }

    #[test]
    fn the_client_region_comes_from_the_parameter_or_the_longest_cidr() {
        let s = selector(5);
        assert_eq!(
            s.region_of(Some("ap"), "10.9.1.1".parse().ok()).as_deref(),
            Some("ap")
        );
        assert_eq!(
            s.region_of(None, "10.9.1.1".parse().ok()).as_deref(),
            Some("us")
        );
        assert_eq!(
            s.region_of(None, "10.1.1.1".parse().ok()).as_deref(),
            Some("eu")
        );
        assert_eq!(s.region_of(None, "192.0.2.1".parse().ok()), None);
        assert_eq!(s.region_of(Some(""), None), None);
    }

    #[test]
    fn same_region_comets_come_first() {
        let nodes = [
            node("eu1", "eu", 10, 100),
            node("us1", "us", 50, 0),
            node("eu2", "eu", 10, 0),
        ];
        let ranked = selector(5).rank(&nodes, Platform::Other, Some("eu"));
        let ids: Vec<&str> = ranked.iter().map(|c| c.node.id.as_str()).collect();
        assert_eq!(ids, ["eu2", "eu1", "us1"]);
        assert!(ranked[0].same_region && !ranked[2].same_region);
    }

    #[test]
    fn load_spreads_to_the_less_loaded_of_equal_comets() {
        let nodes = [node("a", "eu", 10, 900), node("b", "eu", 10, 100)];
        let ranked = selector(5).rank(&nodes, Platform::Other, Some("eu"));
        assert_eq!(ranked[0].node.id, "b");
        assert!(ranked[0].score > ranked[1].score);
        // With no load at all, the heavier weight wins.
        let nodes = [node("light", "eu", 5, 0), node("heavy", "eu", 20, 0)];
        assert_eq!(
            selector(5).rank(&nodes, Platform::Other, None)[0].node.id,
            "heavy"
        );
    }

    #[test]
    fn scores_follow_goims_formula() {
        // weights 16 (10 x 1.6) and 10; conns 300 and 100.
        let nodes = [node("a", "eu", 10, 300), node("b", "us", 10, 100)];
        let ranked = selector(5).rank(&nodes, Platform::Other, Some("eu"));
        // a: 16 + round((16/26 - 300/400*0.5) * 400) = 16 + round(96.15) = 112
        // b: 10 + round((10/26 - 100/400*0.5) * 400) = 10 + round(103.85) = 114
        let score = |id: &str| ranked.iter().find(|c| c.node.id == id).unwrap().score;
        assert_eq!((score("a"), score("b")), (112, 114));
        assert_eq!(
            ranked[0].node.id, "a",
            "same region first despite the lower score"
        );
    }

    #[test]
    fn the_reply_has_goims_shape_and_at_most_max_nodes() {
        let nodes = [
            node("a", "eu", 10, 0),
            node("b", "eu", 10, 0),
            node("c", "eu", 10, 0),
        ];
        let s = selector(2);
        let reply = s.reply(&s.rank(&nodes, Platform::Other, None), Platform::Other);
        assert_eq!(reply.nodes.len(), 2);
        assert_eq!(
            (reply.tcp_port, reply.ws_port, reply.wss_port),
            (3101, 3102, 0)
        );
        assert_eq!(
            (reply.heartbeat, reply.heartbeat_max, reply.domain.as_str()),
            (240, 2, "im.example")
        );
        assert_eq!(reply.nodes[0], "a.example");
        assert_eq!(reply.backoff.unwrap().max_delay, 300);
    }

    #[test]
    fn comets_without_client_addresses_are_not_offered() {
        let mut hidden = node("hidden", "eu", 10, 0);
        hidden.tcp.clear();
        hidden.ws.clear();
        assert!(
            selector(5)
                .rank(&[hidden], Platform::Other, None)
                .is_empty()
        );
    }

    #[test]
    fn web_clients_get_websocket_hosts_and_public_domains() {
        let mut tcp_only = node("tcp", "eu", 50, 0);
        tcp_only.ws.clear();
        let mut wss_only = node("wss", "eu", 20, 0);
        wss_only.tcp.clear();
        wss_only.ws.clear();
        wss_only.wss = "wss.internal:3103".into();
        wss_only.domain = "wss.im.example".into();
        let mut plain = node("plain", "eu", 10, 0);
        plain.tcp = "10.0.0.9:3101".into();
        plain.ws = "plain.example:3102".into();
        let nodes = [tcp_only, wss_only, plain];
        let s = selector(5);

        let web = s.rank(&nodes, Platform::of("web"), None);
        let ids: Vec<&str> = web.iter().map(|c| c.node.id.as_str()).collect();
        assert_eq!(
            ids,
            ["wss", "plain"],
            "a TCP-only comet is no use to a browser"
        );
        let reply = s.reply(&web, Platform::Web);
        assert_eq!(reply.nodes, ["wss.im.example", "plain.example"]);
        assert_eq!(
            (reply.tcp_port, reply.ws_port, reply.wss_port),
            (0, 0, 3103)
        );

        let app = s.rank(&nodes, Platform::of("android"), None);
        let reply = s.reply(&app, Platform::Other);
        assert_eq!(reply.nodes, ["tcp.example", "wss.internal", "10.0.0.9"]);
        assert_eq!(
            (reply.tcp_port, reply.ws_port, reply.wss_port),
            (3101, 0, 0)
        );
    }

    #[test]
    fn with_no_usable_comet_the_default_domain_is_the_node() {
        let s = selector(5);
        let reply = s.reply(&[], Platform::Web);
        assert_eq!(reply.nodes, ["im.example"]);
        let mut bare = s.clone();
        bare.config.domain.clear();
        assert!(bare.reply(&[], Platform::Web).nodes.is_empty());
    }
}
