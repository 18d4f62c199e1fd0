//! goim's nodes endpoints: which comets a client should connect to, and
//! every comet logic knows of.
//!
//! Like goim, the answer leaves out what is unset (an empty domain, a port
//! the first comet does not listen on, an unknown region) rather than
//! printing empty strings, zeros or nulls.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{Extensions, HeaderMap};
use axum::response::Response;
use rim_logic::{CometNode, NodeQuery, NodeSelection};
use serde::Serialize;

use crate::error::ok;
use crate::params::Params;
use crate::{Api, HttpError};

/// The client's address: the first X-Forwarded-For hop, X-Real-IP, or the peer.
fn client_ip(headers: &HeaderMap, peer: Option<SocketAddr>) -> Option<IpAddr> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    header("x-forwarded-for")
        .and_then(|v| v.split(',').next())
        .or_else(|| header("x-real-ip"))
        .and_then(|v| v.trim().parse().ok())
        .or_else(|| peer.map(|p| p.ip()))
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

/// goim's `/goim/nodes/weighted` answer, plus rim's `region` and `instances`.
#[derive(Serialize)]
struct Weighted<'a> {
    #[serde(skip_serializing_if = "str::is_empty")]
    domain: &'a str,
    #[serde(skip_serializing_if = "is_zero")]
    tcp_port: i32,
    #[serde(skip_serializing_if = "is_zero")]
    ws_port: i32,
    #[serde(skip_serializing_if = "is_zero")]
    wss_port: i32,
    heartbeat: i32,
    heartbeat_max: i32,
    nodes: &'a [String],
    backoff: Backoff,
    /// rim: the region the choice was made for.
    #[serde(skip_serializing_if = "Option::is_none")]
    region: Option<&'a str>,
    /// rim: the full addresses behind `nodes`, in the same order, for
    /// clients that can use per-node ports.
    instances: Vec<Instance<'a>>,
}

#[derive(Serialize)]
struct Backoff {
    max_delay: i32,
    base_delay: i32,
    factor: f64,
    jitter: f64,
}

/// One chosen comet's addresses.
#[derive(Serialize)]
struct Instance<'a> {
    id: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    region: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    tcp: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    ws: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    wss: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    domain: &'a str,
}

impl<'a> From<&'a CometNode> for Instance<'a> {
    fn from(node: &'a CometNode) -> Self {
        Instance {
            id: &node.id,
            region: &node.region,
            tcp: &node.tcp,
            ws: &node.ws,
            wss: &node.wss,
            domain: &node.domain,
        }
    }
}

/// GET /goim/nodes/weighted?platform=&region=: comets for this client; web
/// clients get the hosts of WebSocket listeners.
pub(crate) async fn weighted(
    State(api): State<Arc<Api>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    extensions: Extensions,
) -> Result<Response, HttpError> {
    let params = Params::parse(query.as_deref());
    // Present when served with connect info (always, outside unit tests).
    let peer = extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(p)| *p);
    let NodeSelection {
        region,
        choices,
        reply,
    } = api.logic.select_nodes(NodeQuery {
        platform: params.opt("platform").unwrap_or_default(),
        region: params.opt("region"),
        client_ip: client_ip(&headers, peer),
    });
    let backoff = reply.backoff.unwrap_or_default();
    Ok(ok(Weighted {
        domain: &reply.domain,
        tcp_port: reply.tcp_port,
        ws_port: reply.ws_port,
        wss_port: reply.wss_port,
        heartbeat: reply.heartbeat,
        heartbeat_max: reply.heartbeat_max,
        nodes: &reply.nodes,
        backoff: Backoff {
            max_delay: backoff.max_delay,
            base_delay: backoff.base_delay,
            factor: backoff.factor,
            jitter: backoff.jitter,
        },
        region: region.as_deref(),
        instances: choices.iter().map(|c| Instance::from(&c.node)).collect(),
    }))
}

/// GET /goim/nodes/instances: the comets logic knows of.
pub(crate) async fn instances(State(api): State<Arc<Api>>) -> Response {
    ok(api.logic.comets())
}
