//! Admin endpoints, behind a bearer token when `api.admin_token` is set
//! (see [`crate::bearer`]):
//! rooms with counts, one room, broadcast to a room, kick, comets' stats.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::middleware;
use axum::response::Response;
use axum::routing::{get, post};
use serde_json::json;

use crate::error::ok;
use crate::params::Params;
use crate::{Api, HttpError};

pub(crate) fn routes(api: Arc<Api>) -> Router<Arc<Api>> {
    Router::new()
        .route("/rooms", get(rooms))
        .route("/room", get(room))
        .route("/room/broadcast", post(broadcast_room))
        .route("/kick", post(kick))
        .route("/comets", get(comets))
        .layer(middleware::from_fn_with_state(
            api,
            crate::bearer::require_admin_token,
        ))
}

/// GET /admin/rooms?page=&size=&sort=count|room&order=desc|asc
async fn rooms(
    State(api): State<Arc<Api>>,
    RawQuery(query): RawQuery,
) -> Result<Response, HttpError> {
    let params = Params::parse(query.as_deref());
    let page: usize = params.parse_or("page", "a page number from 1", 1)?;
    let size: usize = params.parse_or("size", "a page size from 1 to 1000", 50)?;
    if page == 0 {
        return Err(HttpError::BadRequest(
            "invalid parameter \"page\": pages start at 1".into(),
        ));
    }
    if size == 0 || size > 1000 {
        return Err(HttpError::BadRequest(format!(
            "invalid parameter \"size\": {size} is not between 1 and 1000"
        )));
    }
    let by_room = match params.opt("sort").unwrap_or("count") {
        "count" => false,
        "room" => true,
        other => {
            return Err(HttpError::BadRequest(format!(
                "invalid parameter \"sort\": {other:?} is not count or room"
            )));
        }
    };
    let ascending = match params
        .opt("order")
        .unwrap_or(if by_room { "asc" } else { "desc" })
    {
        "asc" => true,
        "desc" => false,
        other => {
            return Err(HttpError::BadRequest(format!(
                "invalid parameter \"order\": {other:?} is not asc or desc"
            )));
        }
    };
    let mut rooms: Vec<(String, i64)> = api.logic.room_counts().await?.into_iter().collect();
    rooms.sort_by(|a, b| {
        let order = if by_room {
            a.0.cmp(&b.0)
        } else {
            a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0))
        };
        if ascending { order } else { order.reverse() }
    });
    let total = rooms.len();
    let page_rooms: Vec<_> = rooms
        .into_iter()
        .skip((page - 1).saturating_mul(size))
        .take(size)
        .map(|(room_id, count)| json!({ "room_id": room_id, "count": count }))
        .collect();
    Ok(ok(
        json!({ "total": total, "page": page, "size": size, "rooms": page_rooms }),
    ))
}

/// GET /admin/room?room=type://id: the room's count per comet.
async fn room(
    State(api): State<Arc<Api>>,
    RawQuery(query): RawQuery,
) -> Result<Response, HttpError> {
    let params = Params::parse(query.as_deref());
    let room = params.required("room")?;
    let reports = api.logic.room_reports().await?;
    let comets: BTreeMap<&String, i32> = reports
        .iter()
        .filter_map(|(server, report)| report.rooms.get(room).map(|n| (server, *n)))
        .collect();
    let count: i64 = comets.values().map(|n| i64::from(*n)).sum();
    Ok(ok(
        json!({ "room_id": room, "count": count, "comets": comets }),
    ))
}

/// POST /admin/room/broadcast?room=type://id&operation=: push to a room.
async fn broadcast_room(
    State(api): State<Arc<Api>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, HttpError> {
    let params = Params::parse(query.as_deref());
    let operation = crate::push::push_operation(&params)?;
    let room = params.required("room")?.to_owned();
    if !room.contains("://") {
        return Err(HttpError::BadRequest(format!(
            "invalid parameter \"room\": {room:?} is not type://id"
        )));
    }
    let msg = api.read_body(&headers, body).await?;
    let push = crate::push::Push::new("room");
    push.run(
        &api,
        crate::push::push_room(&api, push, operation, room, &msg),
    )
    .await
}

/// POST /admin/kick?mid= | ?key=: closes every connection of a user, or one key.
async fn kick(
    State(api): State<Arc<Api>>,
    RawQuery(query): RawQuery,
) -> Result<Response, HttpError> {
    let params = Params::parse(query.as_deref());
    let by_server = match (params.opt("mid"), params.opt("key")) {
        (Some(_), None) => {
            let mid: i64 = params.parse_required("mid", "an integer")?;
            api.logic.user_keys_by_comet(&[mid]).await?
        }
        (None, Some(_)) => {
            let key = params.required("key")?.to_owned();
            api.logic.keys_by_comet(&[key]).await?
        }
        _ => {
            return Err(HttpError::BadRequest(
                "give exactly one of the parameters \"mid\" or \"key\"".into(),
            ));
        }
    };
    let mut kicked = 0;
    let mut failed = Vec::new();
    for (server, keys) in by_server {
        match api.logic.kick(&server, keys).await {
            Ok(n) => kicked += n,
            Err(err) => failed.push(err),
        }
    }
    if !failed.is_empty() {
        return Err(HttpError::KickFailed { kicked, failed });
    }
    Ok(ok(json!({ "kicked": kicked })))
}

/// GET /admin/comets: every comet with its live stats.
async fn comets(State(api): State<Arc<Api>>) -> Response {
    let mut out = Vec::new();
    for (node, stats) in api.logic.comet_stats().await {
        let stats = match stats {
            Ok(s) => json!({
                "tcp_connections": s.tcp_connections,
                "ws_connections": s.ws_connections,
                "ip_count": s.ip_count,
                "rooms": s.room_counts.len(),
                "dropped_frames": s.dropped_frames,
                "slow_consumer_closes": s.slow_consumer_closes,
                "bad_frames": s.bad_frames,
            }),
            Err(err) => json!({ "error": err.to_string() }),
        };
        out.push(json!({ "node": node, "stats": stats }));
    }
    out.sort_by(|a, b| a["node"]["id"].as_str().cmp(&b["node"]["id"].as_str()));
    ok(out)
}
