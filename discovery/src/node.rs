//! What a registered node says about itself, and the roles that register.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A node's addresses, each `host:port` or empty when it does not listen there.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Addrs {
    /// Client TCP address (comets).
    pub tcp: String,
    /// Client WebSocket address (comets).
    pub ws: String,
    /// Client secure WebSocket address (comets).
    pub wss: String,
    /// gRPC address (comets and logics).
    pub grpc: String,
}

/// A registered node: the JSON stored in its ZooKeeper node.
///
/// Missing fields read as their defaults and unknown fields are ignored, so
/// nodes written by older or newer versions still parse.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeInfo {
    /// The node's `node.id`, also its ZooKeeper node name.
    pub id: String,
    /// The node's region.
    pub region: String,
    /// The node's zone within the region.
    pub zone: String,
    /// Where the node listens.
    pub addrs: Addrs,
    /// Public host name web clients reach the node's WebSocket listeners by
    /// (comets, `comet.public_domain`); empty = the host of `addrs.ws` /
    /// `addrs.wss`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub domain: String,
    /// Relative weight in node selection.
    pub weight: u32,
    /// Open client connections (comets).
    pub conn_count: u64,
    /// Distinct client IPs (comets).
    pub ip_count: u64,
    /// When the registration was last written, unix milliseconds.
    pub updated: i64,
}

/// The roles that register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Comets, under `{root}/comets`.
    Comet,
    /// Logics, under `{root}/logics`.
    Logic,
}

impl Kind {
    /// Every kind, in path order.
    pub const ALL: [Kind; 2] = [Kind::Comet, Kind::Logic];

    /// Returns the ZooKeeper directory name of this kind under the root.
    pub fn dir(self) -> &'static str {
        match self {
            Kind::Comet => "comets",
            Kind::Logic => "logics",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Comet => "comet",
            Kind::Logic => "logic",
        })
    }
}

/// Returns the nodes of `region`, in their order.
pub fn in_region(nodes: &[NodeInfo], region: &str) -> Vec<NodeInfo> {
    nodes
        .iter()
        .filter(|node| node.region == region)
        .cloned()
        .collect()
}

/// Longest node id accepted; ids are ZooKeeper node names.
const MAX_ID_LEN: usize = 255;

/// Checks that `id` can be a ZooKeeper node name.
pub(crate) fn check_id(id: &str) -> Result<()> {
    if id.is_empty() || id == "." || id == ".." {
        return Err(Error::Invalid(format!(
            "invalid node id {id:?}: reserved or empty"
        )));
    }
    if id.len() > MAX_ID_LEN {
        return Err(Error::Invalid(format!(
            "invalid node id {id:?}: longer than {MAX_ID_LEN} bytes"
        )));
    }
    if id.chars().any(|c| c == '/' || c.is_control()) {
        return Err(Error::Invalid(format!(
            "invalid node id {id:?}: contains '/' or a control character"
        )));
    }
    Ok(())
}

/// Returns the wall-clock time in unix milliseconds.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The address other nodes and clients use for a listener bound at `addr`:
/// a wildcard bind (0.0.0.0 / [::]) is advertised with the host name.
pub fn advertise(addr: std::net::SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let host = host.trim();
        if !host.is_empty() {
            return format!("{host}:{}", addr.port());
        }
    }
    addr.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_the_documented_fields() {
        let info = NodeInfo {
            id: "comet-1".into(),
            region: "sh".into(),
            zone: "a".into(),
            addrs: Addrs {
                tcp: "10.0.0.1:3101".into(),
                ws: "10.0.0.1:3102".into(),
                wss: String::new(),
                grpc: "10.0.0.1:3109".into(),
            },
            domain: "comet-1.example.com".into(),
            weight: 10,
            conn_count: 3,
            ip_count: 2,
            updated: 1_700_000_000_000,
        };
        let json: serde_json::Value = serde_json::to_value(&info).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "id": "comet-1", "region": "sh", "zone": "a",
                "addrs": {"tcp": "10.0.0.1:3101", "ws": "10.0.0.1:3102", "wss": "", "grpc": "10.0.0.1:3109"},
                "domain": "comet-1.example.com",
                "weight": 10, "conn_count": 3, "ip_count": 2, "updated": 1_700_000_000_000i64
            })
        );
        let back: NodeInfo = serde_json::from_value(json).unwrap();
        assert_eq!(back, info);
    }

    #[test]
    fn json_tolerates_missing_and_unknown_fields() {
        let info: NodeInfo =
            serde_json::from_str(r#"{"id":"l1","addrs":{"grpc":"h:1"},"extra":true}"#).unwrap();
        assert_eq!(info.id, "l1");
        assert_eq!(info.addrs.grpc, "h:1");
        assert_eq!(info.weight, 0);
    }

    #[test]
    fn ids_must_be_node_names() {
        assert!(check_id("comet-1").is_ok());
        for bad in ["", ".", "..", "a/b", "a\nb"] {
            assert!(check_id(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_id(&"x".repeat(MAX_ID_LEN + 1)).is_err());
    }

    #[test]
    fn wildcard_binds_are_advertised_by_host_name() {
        let bound: std::net::SocketAddr = "127.0.0.1:3101".parse().unwrap();
        assert_eq!(advertise(bound), "127.0.0.1:3101");
        let wildcard: std::net::SocketAddr = "0.0.0.0:3101".parse().unwrap();
        let advertised = advertise(wildcard);
        assert!(
            advertised.ends_with(":3101") && !advertised.starts_with("0.0.0.0"),
            "{advertised}"
        );
    }

    #[test]
    fn in_region_keeps_order() {
        let node = |id: &str, region: &str| NodeInfo {
            id: id.into(),
            region: region.into(),
            ..NodeInfo::default()
        };
        let nodes = [node("a", "sh"), node("b", "bj"), node("c", "sh")];
        let ids: Vec<String> = in_region(&nodes, "sh").into_iter().map(|n| n.id).collect();
        assert_eq!(ids, ["a", "c"]);
    }
}
