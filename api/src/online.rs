//! goim's online endpoints: room counts and connection totals.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::response::Response;
use serde_json::json;

use crate::error::ok;
use crate::params::Params;
use crate::{Api, HttpError};

/// GET /goim/online/top?type=&limit=: the most populated rooms of a type.
pub(crate) async fn top(
    State(api): State<Arc<Api>>,
    RawQuery(query): RawQuery,
) -> Result<Response, HttpError> {
    let params = Params::parse(query.as_deref());
    let kind = params.required("type")?;
    let limit: usize = params.parse_required("limit", "a positive integer")?;
    if limit == 0 {
        return Err(HttpError::BadRequest(
            "invalid parameter \"limit\": must be positive".into(),
        ));
    }
    let prefix = format!("{kind}://");
    let counts = api.logic.room_counts().await?;
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
pub(crate) async fn room(
    State(api): State<Arc<Api>>,
    RawQuery(query): RawQuery,
) -> Result<Response, HttpError> {
    let params = Params::parse(query.as_deref());
    let kind = params.required("type")?;
    let rooms = params.list("rooms")?;
    let counts = api.logic.room_counts().await?;
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
pub(crate) async fn total(State(api): State<Arc<Api>>) -> Response {
    let nodes = api.logic.comets();
    let conn_count: u64 = nodes.iter().map(|n| n.conn_count).sum();
    let ip_count: u64 = nodes.iter().map(|n| n.ip_count).sum();
    ok(json!({ "ip_count": ip_count, "conn_count": conn_count }))
}
