//! A user's presence: its live connections and when it was last seen.
//!
//! Served from the router through logic whether or not `im.store` is on:
//! presence does not need the message store.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use serde::Serialize;

use super::{Segment, mid};
use crate::error::{ImError, ok};
use crate::{Api, HttpError};

/// One live connection.
#[derive(Serialize)]
struct Device {
    key: String,
    platform: String,
    comet: String,
    /// When it connected, unix milliseconds (0 when unknown).
    since: i64,
}

/// The answer of GET /im/v1/users/{mid}/presence.
#[derive(Serialize)]
struct Answer {
    online: bool,
    devices: Vec<Device>,
    /// When a connection of the user was last added, renewed or removed,
    /// unix milliseconds; null when the router knows nothing of it.
    last_seen: Option<i64>,
}

/// GET /im/v1/users/{mid}/presence: the user's live connections, oldest
/// first, and when it was last seen.
pub(super) async fn get(
    State(api): State<Arc<Api>>,
    Segment(user): Segment,
) -> Result<Response, ImError> {
    let user = mid("mid", &user)?;
    let presence = api
        .logic
        .presence(user)
        .await
        .map_err(|err| ImError(HttpError::Logic(err)))?;
    let mut devices: Vec<Device> = presence
        .devices
        .into_iter()
        .map(|d| Device {
            key: d.key,
            platform: d.platform,
            comet: d.server,
            since: d.since_unix_ms,
        })
        .collect();
    devices.sort_by(|a, b| a.since.cmp(&b.since).then_with(|| a.key.cmp(&b.key)));
    Ok(ok(Answer {
        online: !devices.is_empty(),
        devices,
        last_seen: presence.last_seen_unix_ms,
    }))
}
