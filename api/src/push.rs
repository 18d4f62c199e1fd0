//! goim's push, online and nodes endpoints.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{Extensions, HeaderMap};
use axum::response::Response;
use bytes::Bytes;
use rim_queue::{PushMsg, PushType};
use serde_json::json;
use tracing::Instrument;

use crate::error::ok;
use crate::params::Params;
use crate::{Api, ApiError};

const OP: &str = "a 32-bit integer";

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// One push through the API: its kind, and its id — the accept time its
/// queue messages carry (`accepted_unix_nanos`), which the job's spans and
/// push latency use too.
#[derive(Clone, Copy)]
pub(crate) struct Push {
    kind: &'static str,
    accepted: i64,
}

impl Push {
    /// Starts a push of `kind` (keys, mids, room, all) now.
    pub(crate) fn new(kind: &'static str) -> Push {
        Push {
            kind,
            accepted: now_nanos(),
        }
    }

    /// The push's span; `op` and `targets` are recorded as they are known.
    fn span(self) -> tracing::Span {
        tracing::debug_span!(
            "push",
            kind = self.kind,
            push.id = self.accepted,
            op = tracing::field::Empty,
            targets = tracing::field::Empty,
        )
    }

    /// Runs the push's planning in its span and counts it once it is enqueued.
    pub(crate) async fn run(
        self,
        api: &Api,
        plan: impl std::future::Future<Output = Result<Response, ApiError>>,
    ) -> Result<Response, ApiError> {
        let answer = plan.instrument(self.span()).await;
        if answer.is_ok() {
            api.metrics.pushed(self.kind);
        }
        answer
    }

    fn message(self, kind: PushType, operation: i32, msg: &Bytes) -> PushMsg {
        PushMsg {
            r#type: kind as i32,
            operation,
            msg: msg.clone(),
            accepted_unix_nanos: self.accepted,
            ..PushMsg::default()
        }
    }

    /// Writes one queue message, counting it.
    async fn send(self, api: &Api, msg: PushMsg) -> rim_queue::Result<()> {
        let sent = api.producer.send(msg).await;
        match &sent {
            Ok(()) => api.metrics.enqueued(self.kind),
            Err(_) => api.metrics.queue_error(self.kind),
        }
        sent
    }
}

/// Records what the current push span learned.
fn record(field: &str, value: i64) {
    tracing::Span::current().record(field, value);
}

fn router_down(api: &Api) -> impl FnOnce(rim_router::Error) -> ApiError + '_ {
    move |err| {
        api.metrics.router_error();
        ApiError::Unavailable(format!("router: {err}; nothing was enqueued"))
    }
}

/// Enqueues one PUSH message per comet; fails naming every comet whose
/// message was not enqueued.
async fn enqueue_by_server(
    api: &Api,
    push: Push,
    operation: i32,
    by_server: BTreeMap<String, Vec<String>>,
    msg: &Bytes,
) -> Result<Response, ApiError> {
    let connections: usize = by_server.values().map(Vec::len).sum();
    let comets = by_server.len();
    record("targets", connections as i64);
    let mut failed = Vec::new();
    for (server, keys) in by_server {
        let count = keys.len();
        let message = PushMsg {
            server: server.clone(),
            keys,
            ..push.message(PushType::Push, operation, msg)
        };
        if let Err(err) = push.send(api, message).await {
            failed.push(format!("comet {server} ({count} connections): {err}"));
        }
    }
    if !failed.is_empty() {
        return Err(ApiError::Unavailable(format!(
            "enqueued {} of {comets} comet messages; not enqueued: {}",
            comets - failed.len(),
            failed.join("; ")
        )));
    }
    Ok(ok(json!({ "connections": connections, "comets": comets })))
}

/// POST /goim/push/keys?operation=&keys=…: push to connections by key.
pub(crate) async fn keys(
    State(api): State<Arc<Api>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let push = Push::new("keys");
    push.run(&api, plan_keys(&api, push, query, headers, body))
        .await
}

async fn plan_keys(
    api: &Api,
    push: Push,
    query: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let params = Params::parse(query.as_deref());
    let operation: i32 = params.parse_required("operation", OP)?;
    record("op", operation.into());
    let mut keys = params.list("keys")?;
    // A key listed twice is one connection: push it once.
    let mut seen = std::collections::HashSet::new();
    keys.retain(|key| seen.insert(key.clone()));
    let msg = api.read_body(&headers, body).await?;
    let servers = api
        .logic
        .router()
        .servers_of_keys(&keys)
        .await
        .map_err(router_down(api))?;
    let mut by_server: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (key, server) in keys.into_iter().zip(servers) {
        if let Some(server) = server {
            by_server.entry(server).or_default().push(key);
        }
    }
    enqueue_by_server(api, push, operation, by_server, &msg).await
}

/// POST /goim/push/mids?operation=&mids=…: push to every connection of each user.
pub(crate) async fn mids(
    State(api): State<Arc<Api>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let push = Push::new("mids");
    push.run(&api, plan_mids(&api, push, query, headers, body))
        .await
}

async fn plan_mids(
    api: &Api,
    push: Push,
    query: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let params = Params::parse(query.as_deref());
    let operation: i32 = params.parse_required("operation", OP)?;
    record("op", operation.into());
    let mids: Vec<i64> = params.parse_list("mids", "an integer")?;
    let msg = api.read_body(&headers, body).await?;
    let by_server = api
        .logic
        .router()
        .keys_by_server(&mids)
        .await
        .map_err(router_down(api))?;
    enqueue_by_server(api, push, operation, by_server.into_iter().collect(), &msg).await
}

/// Enqueues one ROOM message; the answer counts the room's members known
/// to the router (best effort: the push does not depend on it).
pub(crate) async fn push_room(
    api: &Api,
    push: Push,
    operation: i32,
    room: String,
    msg: &Bytes,
) -> Result<Response, ApiError> {
    record("op", operation.into());
    let message = PushMsg {
        room: room.clone(),
        ..push.message(PushType::Room, operation, msg)
    };
    push.send(api, message)
        .await
        .map_err(|e| ApiError::Unavailable(format!("room message for {room} not enqueued: {e}")))?;
    let (connections, comets) = match api.logic.router().server_reports().await {
        Ok(reports) => reports
            .values()
            .filter_map(|r| r.rooms.get(&room))
            .fold((0i64, 0usize), |(n, c), count| {
                (n + i64::from(*count), c + 1)
            }),
        Err(_) => (0, 0),
    };
    record("targets", connections);
    Ok(ok(
        json!({ "room": room, "connections": connections, "comets": comets }),
    ))
}

/// POST /goim/push/room?operation=&type=&room=: push to room `type://room`.
pub(crate) async fn room(
    State(api): State<Arc<Api>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let push = Push::new("room");
    let plan = async {
        let params = Params::parse(query.as_deref());
        let operation: i32 = params.parse_required("operation", OP)?;
        let kind = params.required("type")?;
        let room = params.required("room")?;
        let msg = api.read_body(&headers, body).await?;
        push_room(&api, push, operation, format!("{kind}://{room}"), &msg).await
    };
    push.run(&api, plan).await
}

/// POST /goim/push/all?operation=&speed=: push to everyone, paced.
pub(crate) async fn all(
    State(api): State<Arc<Api>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let push = Push::new("all");
    let plan = async {
        let params = Params::parse(query.as_deref());
        let operation: i32 = params.parse_required("operation", OP)?;
        record("op", operation.into());
        let speed: i32 = params.parse_or("speed", "a non-negative 32-bit integer", 0)?;
        if speed < 0 {
            return Err(ApiError::BadRequest(format!(
                "invalid parameter \"speed\": {speed} is negative"
            )));
        }
        let msg = api.read_body(&headers, body).await?;
        let message = PushMsg {
            speed,
            ..push.message(PushType::Broadcast, operation, &msg)
        };
        push.send(&api, message)
            .await
            .map_err(|e| ApiError::Unavailable(format!("broadcast not enqueued: {e}")))?;
        let nodes = api.logic.comets().nodes();
        let connections: u64 = nodes.iter().map(|n| n.conn_count).sum();
        record("targets", i64::try_from(connections).unwrap_or(i64::MAX));
        Ok(ok(
            json!({ "connections": connections, "comets": nodes.len() }),
        ))
    };
    push.run(&api, plan).await
}

/// GET /goim/online/top?type=&limit=: the most populated rooms of a type.
pub(crate) async fn online_top(
    State(api): State<Arc<Api>>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = Params::parse(query.as_deref());
    let kind = params.required("type")?;
    let limit: usize = params.parse_required("limit", "a positive integer")?;
    if limit == 0 {
        return Err(ApiError::BadRequest(
            "invalid parameter \"limit\": must be positive".into(),
        ));
    }
    let prefix = format!("{kind}://");
    let counts = api.logic.router().room_counts().await?;
    let mut top: Vec<(String, i64)> = counts
        .into_iter()
        .filter_map(|(room, n)| room.strip_prefix(&prefix).map(|id| (id.to_owned(), n)))
        .collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    top.truncate(limit);
    Ok(ok(top
        .into_iter()
        .map(|(room_id, count)| json!({ "room_id": room_id, "count": count }))
        .collect::<Vec<_>>()))
}

/// GET /goim/online/room?type=&rooms=…: `{"<room>": count}`.
pub(crate) async fn online_room(
    State(api): State<Arc<Api>>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = Params::parse(query.as_deref());
    let kind = params.required("type")?;
    let rooms = params.list("rooms")?;
    let counts = api.logic.router().room_counts().await?;
    let answer: BTreeMap<String, i64> = rooms
        .into_iter()
        .map(|room| {
            let count = counts
                .get(&format!("{kind}://{room}"))
                .copied()
                .unwrap_or(0);
            (room, count)
        })
        .collect();
    Ok(ok(answer))
}

/// GET /goim/online/total: connections and distinct IPs over all comets.
pub(crate) async fn online_total(State(api): State<Arc<Api>>) -> Response {
    let nodes = api.logic.comets().nodes();
    let conn_count: u64 = nodes.iter().map(|n| n.conn_count).sum();
    let ip_count: u64 = nodes.iter().map(|n| n.ip_count).sum();
    ok(json!({ "ip_count": ip_count, "conn_count": conn_count }))
}

/// The client's address: the first X-Forwarded-For hop, X-Real-IP, or the peer.
fn client_ip(headers: &HeaderMap, peer: Option<SocketAddr>) -> Option<IpAddr> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    header("x-forwarded-for")
        .and_then(|v| v.split(',').next())
        .or_else(|| header("x-real-ip"))
        .and_then(|v| v.trim().parse().ok())
        .or_else(|| peer.map(|p| p.ip()))
}

/// GET /goim/nodes/weighted?platform=&region=: comets for this client.
pub(crate) async fn nodes_weighted(
    State(api): State<Arc<Api>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    extensions: Extensions,
) -> Result<Response, ApiError> {
    let params = Params::parse(query.as_deref());
    // Present when served with connect info (always, outside unit tests).
    let peer = extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(p)| *p);
    let ip = client_ip(&headers, peer);
    let selector = api.logic.selector();
    let region = selector.region_of(params.opt("region"), ip);
    let choices = selector.rank(&api.logic.comets().nodes(), region.as_deref());
    let reply = selector.reply(&choices);
    let backoff = reply.backoff.unwrap_or_default();
    Ok(ok(json!({
        "domain": reply.domain,
        "tcp_port": reply.tcp_port,
        "ws_port": reply.ws_port,
        "wss_port": reply.wss_port,
        "heartbeat": reply.heartbeat,
        "heartbeat_max": reply.heartbeat_max,
        "nodes": reply.nodes,
        "backoff": {
            "max_delay": backoff.max_delay,
            "base_delay": backoff.base_delay,
            "factor": backoff.factor,
            "jitter": backoff.jitter,
        },
        // rim: the full addresses behind `nodes`, in the same order, for
        // clients that can use per-node ports; and the region it used.
        "region": region,
        "instances": choices.iter().map(|c| json!({
            "id": c.node.id, "region": c.node.region, "tcp": c.node.tcp, "ws": c.node.ws, "wss": c.node.wss,
        })).collect::<Vec<_>>(),
    })))
}

/// GET /goim/nodes/instances: the comets logic knows of.
pub(crate) async fn nodes_instances(State(api): State<Arc<Api>>) -> Response {
    ok(api.logic.comets().nodes())
}
