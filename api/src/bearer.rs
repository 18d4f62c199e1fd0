//! The API's bearer tokens: `api.admin_token` guards `/admin/*`,
//! `api.push_token` guards `/goim/push/*`, and `im.api_token` (or, when it
//! is unset, `api.admin_token`) guards `/im/v1/*`. An unset token means no check
//! (config validation allows that only on a loopback `api.http_bind`, or
//! with `node.allow_unauthenticated`). A refused request gets 401 with goim
//! code -401.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::Response;

use crate::error::ImError;
use crate::{Api, HttpError};

/// Which endpoints a token guards, for the refusal's message.
#[derive(Clone, Copy)]
enum Guarded {
    Admin,
    Push,
    Im,
}

/// Refuses an `/admin/*` request without `Authorization: Bearer
/// <api.admin_token>`, when the token is set.
pub(crate) async fn require_admin_token(
    State(api): State<Arc<Api>>,
    request: Request,
    next: Next,
) -> Result<Response, HttpError> {
    check(
        api.admin_token.as_deref(),
        request.headers(),
        Guarded::Admin,
    )?;
    Ok(next.run(request).await)
}

/// Refuses a `/goim/push/*` request without `Authorization: Bearer
/// <api.push_token>`, when the token is set.
pub(crate) async fn require_push_token(
    State(api): State<Arc<Api>>,
    request: Request,
    next: Next,
) -> Result<Response, HttpError> {
    check(api.push_token.as_deref(), request.headers(), Guarded::Push)?;
    Ok(next.run(request).await)
}

/// Refuses an `/im/v1/*` request without `Authorization: Bearer
/// <im.api_token>` (`api.admin_token` when that is unset), when a token is
/// set; the refusal carries the IM code 2.
pub(crate) async fn require_im_token(
    State(api): State<Arc<Api>>,
    request: Request,
    next: Next,
) -> Result<Response, ImError> {
    check(api.im.token.as_deref(), request.headers(), Guarded::Im)?;
    Ok(next.run(request).await)
}

/// The one check of a bearer token: nothing to check when `expected` is
/// unset; otherwise the header must carry exactly that token.
fn check(expected: Option<&str>, headers: &HeaderMap, guarded: Guarded) -> Result<(), HttpError> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match (given, guarded) {
        (Some(token), _) if rim_proto::api::same_secret(token.as_bytes(), expected.as_bytes()) => {
            Ok(())
        }
        (Some(_), Guarded::Admin) => Err(HttpError::Unauthorized("admin token does not match")),
        (Some(_), Guarded::Push) => Err(HttpError::Unauthorized("push token does not match")),
        (Some(_), Guarded::Im) => Err(HttpError::Unauthorized(
            "IM token does not match (im.api_token, or api.admin_token when unset)",
        )),
        (None, Guarded::Admin) => Err(HttpError::Unauthorized(
            "admin endpoints need Authorization: Bearer <token>",
        )),
        (None, Guarded::Push) => Err(HttpError::Unauthorized(
            "push endpoints need Authorization: Bearer <token>",
        )),
        (None, Guarded::Im) => Err(HttpError::Unauthorized(
            "IM endpoints need Authorization: Bearer <token>",
        )),
    }
}
