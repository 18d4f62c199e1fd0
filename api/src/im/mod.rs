//! The IM endpoints `/im/v1/*` (../shared/docs/im.md, HTTP API): business
//! servers send messages, read history, inboxes and conversation lists,
//! move read positions and manage groups, through logic's IM service.
//!
//! Every handler parses (with the helpers here), calls the service and
//! answers in goim's envelope; every refusal is an [`ImError`]: the im.md
//! code in the envelope, a matching HTTP status, and the parameter or
//! field it is about in the message. They are guarded by `im.api_token`
//! (or `api.admin_token`) and answer 404 when `im.store` is off, except
//! the presence query, which the router answers alone. The writes (POST,
//! PUT) are rate limited per token, or per client address when no token is
//! set (`im.api_write_rate`: 429 with `Retry-After`).

mod groups;
mod messages;
mod presence;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use rim_im::ConvId;
use rim_logic::{ApiClient, Im};
use serde::de::DeserializeOwned;

use crate::error::ImError;
use crate::{Api, HttpError};

/// What a `limit` parameter is.
const LIMIT: &str = "a non-negative 32-bit integer";

/// The routes under `/im/v1`.
pub(crate) fn routes(api: Arc<Api>) -> Router<Arc<Api>> {
    Router::new()
        .route("/messages", post(messages::send))
        .route("/conversations/{conv}/messages", get(messages::history))
        .route("/conversations/{conv}/read", post(messages::read))
        .route("/users/{mid}/conversations", get(messages::conversations))
        .route("/users/{mid}/sync", get(messages::sync))
        .route("/users/{mid}/presence", get(presence::get))
        .route("/groups/{gid}", get(groups::get).put(groups::put))
        .route(
            "/groups/{gid}/members",
            get(groups::members).post(groups::change_members),
        )
        // Added first, so it runs after the token check: a refused token
        // takes nothing from the limit.
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&api),
            limit_writes,
        ))
        .layer(middleware::from_fn_with_state(
            api,
            crate::bearer::require_im_token,
        ))
}

/// Refuses an /im/v1 write (anything but GET and HEAD) over
/// `im.api_write_rate` with 429, before it is read or done. With a token
/// set every caller presents the one token and shares its limit; without
/// one each client IP address has its own.
async fn limit_writes(
    State(api): State<Arc<Api>>,
    request: Request,
    next: Next,
) -> Result<Response, ImError> {
    let write = !matches!(*request.method(), Method::GET | Method::HEAD);
    // With IM off there is no limiter; the handler answers 404.
    if let (true, Some(im)) = (write, api.logic.im()) {
        let client = if api.im.token.is_some() {
            ApiClient::Token
        } else {
            // The server always records the peer; a router driven without
            // it (in-process) counts as one client.
            let peer = request
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map_or(Ipv4Addr::UNSPECIFIED.into(), |ConnectInfo(peer)| peer.ip());
            ApiClient::Addr(peer)
        };
        im.admit_api_write(&client)
            .map_err(|limited| ImError(HttpError::RateLimited(limited)))?;
    }
    Ok(next.run(request).await)
}

/// Returns the IM service, or 404 when `im.store` is off.
fn service(api: &Api) -> Result<Arc<Im>, ImError> {
    api.logic.im().ok_or(ImError(HttpError::ImOff))
}

/// Reads a JSON body (within `api.max_body`) into `T`, refusing one that
/// does not decode with 400 naming the field.
async fn json<T: DeserializeOwned>(
    api: &Api,
    headers: &HeaderMap,
    body: Body,
) -> Result<T, ImError> {
    let bytes = api.read_body(headers, body).await?;
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        // Broken JSON is about no field; a missing or unknown field is
        // named by serde itself; any other error is about the field at `path`.
        bad(if !inner.is_data() || path == "." {
            format!("invalid JSON body: {inner}")
        } else {
            format!("invalid field \"{path}\": {inner}")
        })
    })?;
    de.end()
        .map_err(|err| bad(format!("invalid JSON body: {err}")))?;
    Ok(value)
}

/// The one `{…}` segment of an /im/v1 path, percent-decoded; one that does
/// not decode is refused in the envelope like any other parameter.
pub(super) struct Segment(pub(super) String);

impl<S: Send + Sync> FromRequestParts<S> for Segment {
    type Rejection = ImError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Segment, ImError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(segment)) => Ok(Segment(segment)),
            Err(err) => Err(bad(format!("invalid path: {}", err.body_text()))),
        }
    }
}

/// Parses the `{conv}` of a path (400 naming `conv`).
fn conv(text: &str) -> Result<ConvId, ImError> {
    Ok(text.parse::<ConvId>()?)
}

/// Parses the `{gid}` of a path into the group's conversation (400 naming
/// `gid`).
fn group(gid: &str) -> Result<ConvId, ImError> {
    ConvId::group(gid).map_err(|err| match err {
        rim_im::Error::Invalid { reason, .. } => {
            bad(format!("invalid parameter \"gid\": {reason}"))
        }
        other => other.into(),
    })
}

/// Parses a mid: a non-negative 64-bit integer (400 naming `name`).
fn mid(name: &str, text: &str) -> Result<i64, ImError> {
    match text.parse::<i64>() {
        Ok(mid) => checked_mid(name, mid),
        Err(_) => Err(bad(format!(
            "invalid parameter \"{name}\": {text:?} is not a mid (a non-negative 64-bit integer)"
        ))),
    }
}

/// Refuses a negative mid (400 naming `name`).
fn checked_mid(name: &str, mid: i64) -> Result<i64, ImError> {
    if mid < 0 {
        return Err(bad(format!(
            "invalid field \"{name}\": {mid} is not a mid (mids are not negative)"
        )));
    }
    Ok(mid)
}

/// A 400 with this message (which names the parameter or field).
fn bad(message: impl Into<String>) -> ImError {
    ImError(HttpError::BadRequest(message.into()))
}
