//! goim's push endpoints: each push is planned through logic, enqueued, and
//! answered with what it targeted.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use bytes::Bytes;
use rim_logic::{CometNode, FacadeError, KeysByComet};
use rim_queue::{PushMsg, PushType};
use rim_router::ServerReport;
use serde::Serialize;
use serde_json::json;
use tracing::Instrument;

use crate::error::{NotEnqueued, ok};
use crate::params::Params;
use crate::{Api, HttpError};

const OP: &str = "a 32-bit integer";

/// The first op a push may carry: the client protocol reserves 0–17
/// (goim's, protocol.md) and 18–27 (rim's IM ops, im.md), and a pushed frame
/// with one of those ops would reach clients as a forged heartbeat, auth or
/// batch reply.
const FIRST_PUSH_OP: i32 = 28;

/// Reads the required `operation` parameter of a push, refusing every op
/// the client protocol reserves (negative ones too).
pub(crate) fn push_operation(params: &Params) -> Result<i32, HttpError> {
    let operation: i32 = params.parse_required("operation", OP)?;
    if operation < FIRST_PUSH_OP {
        return Err(HttpError::BadRequest(format!(
            "invalid parameter \"operation\": {operation} is reserved by the client protocol \
             (ops below {FIRST_PUSH_OP}); push a business op, e.g. 1000"
        )));
    }
    Ok(operation)
}

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

fn now_millis() -> i64 {
    now_nanos() / 1_000_000
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
        plan: impl std::future::Future<Output = Result<Response, HttpError>>,
    ) -> Result<Response, HttpError> {
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

fn router_down(api: &Api) -> impl FnOnce(FacadeError) -> HttpError + '_ {
    move |source| {
        api.metrics.router_error();
        HttpError::NothingEnqueued { source }
    }
}

/// Enqueues one PUSH message per comet; fails naming every comet whose
/// message was not enqueued.
async fn enqueue_by_server(
    api: &Api,
    push: Push,
    operation: i32,
    by_server: KeysByComet,
    msg: &Bytes,
) -> Result<Response, HttpError> {
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
        if let Err(source) = push.send(api, message).await {
            failed.push(NotEnqueued {
                comet: server,
                connections: count,
                source,
            });
        }
    }
    if !failed.is_empty() {
        return Err(HttpError::PartlyEnqueued {
            total: comets,
            failed,
        });
    }
    Ok(ok(json!({ "connections": connections, "comets": comets })))
}

/// POST /goim/push/keys?operation=&keys=…: push to connections by key.
pub(crate) async fn keys(
    State(api): State<Arc<Api>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, HttpError> {
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
) -> Result<Response, HttpError> {
    let params = Params::parse(query.as_deref());
    let operation = push_operation(&params)?;
    record("op", operation.into());
    let mut keys = params.list("keys")?;
    // A key listed twice is one connection: push it once.
    let mut seen = std::collections::HashSet::new();
    keys.retain(|key| seen.insert(key.clone()));
    let msg = api.read_body(&headers, body).await?;
    let by_server = api
        .logic
        .keys_by_comet(&keys)
        .await
        .map_err(router_down(api))?;
    enqueue_by_server(api, push, operation, by_server, &msg).await
}

/// POST /goim/push/mids?operation=&mids=…: push to every connection of each user.
pub(crate) async fn mids(
    State(api): State<Arc<Api>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, HttpError> {
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
) -> Result<Response, HttpError> {
    let params = Params::parse(query.as_deref());
    let operation = push_operation(&params)?;
    record("op", operation.into());
    let mids: Vec<i64> = params.parse_list("mids", "an integer")?;
    let msg = api.read_body(&headers, body).await?;
    let by_server = api
        .logic
        .user_keys_by_comet(&mids)
        .await
        .map_err(router_down(api))?;
    enqueue_by_server(api, push, operation, by_server, &msg).await
}

/// What a room or broadcast push targets, as far as logic knows: the
/// comets it goes to and, when every one of them has reported, their
/// connections (room members, or all connections) with the age of the
/// oldest report. An unknown count is left out, never given as 0.
#[derive(Debug, PartialEq, Serialize)]
struct Reach {
    /// Comets the push goes to: every comet in the directory.
    comets: usize,
    /// Connections on those comets at their latest reports.
    #[serde(skip_serializing_if = "Option::is_none")]
    connections: Option<i64>,
    /// How old the oldest report behind `connections` is, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    connections_age_ms: Option<u64>,
}

impl Reach {
    /// Counts over `comets`, each `Some((count, reported at unix ms))` when
    /// known; the count is known only when every comet's is.
    fn new(comets: usize, per_comet: impl IntoIterator<Item = Option<(i64, i64)>>) -> Reach {
        let now = now_millis();
        let mut known = Some((0i64, i64::MAX));
        for count in per_comet {
            known = match (known, count) {
                (Some((total, oldest)), Some((n, at))) => {
                    Some((total.saturating_add(n), oldest.min(at)))
                }
                _ => None,
            };
        }
        let known = known.filter(|_| comets > 0);
        Reach {
            comets,
            connections: known.map(|(total, _)| total),
            connections_age_ms: known
                .map(|(_, oldest)| u64::try_from(now.saturating_sub(oldest)).unwrap_or(0)),
        }
    }

    /// The reach of a push to `room`: members from each comet's latest room
    /// report (`reports` is `None` when the router could not say).
    fn room(
        comets: &[CometNode],
        reports: Option<&HashMap<String, ServerReport>>,
        room: &str,
    ) -> Reach {
        let per_comet = comets.iter().map(|comet| {
            let report = reports?.get(&comet.id)?;
            let members = report.rooms.get(room).copied().unwrap_or(0);
            Some((i64::from(members), report.updated_unix_ms))
        });
        Reach::new(comets.len(), per_comet)
    }

    /// The reach of a broadcast: each comet's connections at its last load refresh.
    fn all(comets: &[CometNode]) -> Reach {
        let per_comet = comets.iter().map(|comet| {
            let at = comet.load_as_of?.duration_since(UNIX_EPOCH).ok()?;
            Some((
                i64::try_from(comet.conn_count).unwrap_or(i64::MAX),
                i64::try_from(at.as_millis()).unwrap_or(i64::MAX),
            ))
        });
        Reach::new(comets.len(), per_comet)
    }

    /// Records the known connection count on the push span.
    fn record(&self) {
        if let Some(connections) = self.connections {
            record("targets", connections);
        }
    }
}

/// The answer to a room push.
#[derive(Serialize)]
struct RoomReach {
    room: String,
    #[serde(flatten)]
    reach: Reach,
}

/// Enqueues one ROOM message; the answer says what it targets (best
/// effort: the push does not depend on the router).
pub(crate) async fn push_room(
    api: &Api,
    push: Push,
    operation: i32,
    room: String,
    msg: &Bytes,
) -> Result<Response, HttpError> {
    record("op", operation.into());
    let message = PushMsg {
        room: room.clone(),
        ..push.message(PushType::Room, operation, msg)
    };
    push.send(api, message)
        .await
        .map_err(|source| HttpError::NotEnqueued {
            what: format!("room message for {room}"),
            source: Box::new(source),
        })?;
    let reports = match api.logic.room_reports().await {
        Ok(reports) => Some(reports),
        Err(err) => {
            tracing::debug!(reason = %err, "room reports unavailable; the room push answers without counts");
            None
        }
    };
    let reach = Reach::room(&api.logic.comets(), reports.as_ref(), &room);
    reach.record();
    Ok(ok(RoomReach { room, reach }))
}

/// POST /goim/push/room?operation=&type=&room=: push to room `type://room`.
pub(crate) async fn room(
    State(api): State<Arc<Api>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, HttpError> {
    let push = Push::new("room");
    let plan = async {
        let params = Params::parse(query.as_deref());
        let operation = push_operation(&params)?;
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
) -> Result<Response, HttpError> {
    let push = Push::new("all");
    let plan = async {
        let params = Params::parse(query.as_deref());
        let operation = push_operation(&params)?;
        record("op", operation.into());
        let speed: i32 = params.parse_or("speed", "a non-negative 32-bit integer", 0)?;
        if speed < 0 {
            return Err(HttpError::BadRequest(format!(
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
            .map_err(|source| HttpError::NotEnqueued {
                what: "broadcast".into(),
                source: Box::new(source),
            })?;
        let reach = Reach::all(&api.logic.comets());
        reach.record();
        Ok(ok(reach))
    };
    push.run(&api, plan).await
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    fn comet(id: &str, conns: u64, load_as_of: Option<SystemTime>) -> CometNode {
        CometNode {
            id: id.into(),
            conn_count: conns,
            load_as_of,
            ..CometNode::default()
        }
    }

    fn report(rooms: &[(&str, i32)], age: Duration) -> ServerReport {
        ServerReport {
            rooms: rooms.iter().map(|(r, n)| ((*r).to_owned(), *n)).collect(),
            updated_unix_ms: now_millis() - i64::try_from(age.as_millis()).unwrap(),
        }
    }

    #[test]
    fn a_room_count_is_given_only_when_every_comet_reported() {
        let comets = [comet("a", 0, None), comet("b", 0, None)];
        let mut reports = HashMap::from([
            (
                "a".to_owned(),
                report(&[("live://1", 2)], Duration::from_secs(3)),
            ),
            (
                "b".to_owned(),
                report(&[("live://1", 3)], Duration::from_secs(8)),
            ),
        ]);
        let reach = Reach::room(&comets, Some(&reports), "live://1");
        assert_eq!((reach.comets, reach.connections), (2, Some(5)));
        let age = reach.connections_age_ms.unwrap();
        assert!(age >= 8_000, "the oldest report is 8 s old, got {age} ms");

        // A room no member is in, by every comet's report: known to be empty.
        let reach = Reach::room(&comets, Some(&reports), "live://9");
        assert_eq!(reach.connections, Some(0));

        // One comet has not reported: the count is unknown, not partial.
        reports.remove("b");
        let reach = Reach::room(&comets, Some(&reports), "live://1");
        assert_eq!(
            reach,
            Reach {
                comets: 2,
                connections: None,
                connections_age_ms: None
            }
        );
        // No reports at all (the router is down).
        assert_eq!(Reach::room(&comets, None, "live://1").connections, None);
    }

    #[test]
    fn a_broadcast_count_is_given_only_when_every_comets_load_is_known() {
        let measured = SystemTime::now() - Duration::from_secs(4);
        let comets = [
            comet("a", 5, Some(measured)),
            comet("b", 10, Some(SystemTime::now())),
        ];
        let reach = Reach::all(&comets);
        assert_eq!((reach.comets, reach.connections), (2, Some(15)));
        assert!(reach.connections_age_ms.unwrap() >= 4_000);

        let comets = [comet("a", 5, Some(measured)), comet("b", 0, None)];
        assert_eq!(
            Reach::all(&comets),
            Reach {
                comets: 2,
                connections: None,
                connections_age_ms: None
            }
        );
        assert_eq!(Reach::all(&[]).connections, None, "no comet, nothing known");
    }

    #[test]
    fn unknown_counts_are_left_out_of_the_answer() {
        let reach = Reach {
            comets: 3,
            connections: None,
            connections_age_ms: None,
        };
        assert_eq!(
            serde_json::to_value(&reach).unwrap(),
            json!({ "comets": 3 })
        );
    }
}
