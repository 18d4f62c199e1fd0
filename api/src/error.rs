//! The API's errors and their one mapping to goim's envelope and an HTTP status.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rim_logic::FacadeError;
use serde_json::json;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// A parameter is missing or invalid (HTTP 400, code -400).
    #[error("{0}")]
    BadRequest(String),
    /// The body is larger than `api.max_body` (HTTP 413, code -400).
    #[error("request body exceeds {0} bytes")]
    TooLarge(usize),
    /// The body did not arrive within `api.body_read_timeout` (HTTP 408,
    /// code -400).
    #[error("request body not received within {} s (api.body_read_timeout)", .0.as_secs_f64())]
    BodyTimeout(std::time::Duration),
    /// Missing or wrong admin token (HTTP 401, code -401).
    #[error("{0}")]
    Unauthorized(&'static str),
    /// Logic could not answer: its router or a comet failed (HTTP 503, code -500).
    #[error("{0}")]
    Logic(#[from] FacadeError),
    /// Planning a push failed, so nothing was enqueued (HTTP 503, code -500).
    #[error("{source}; nothing was enqueued")]
    NothingEnqueued {
        /// Why the push could not be planned.
        #[source]
        source: FacadeError,
    },
    /// The one queue message of a push was not enqueued (HTTP 503, code -500).
    #[error("{what} not enqueued: {source}")]
    NotEnqueued {
        /// The message, e.g. `room message for live://1`.
        what: String,
        /// Why the queue refused it (boxed: a Kafka error is large).
        #[source]
        source: Box<rim_queue::Error>,
    },
    /// Some comets' messages of a push were not enqueued (HTTP 503, code -500).
    #[error(
        "enqueued {} of {total} comet messages; not enqueued: {}",
        total - failed.len(),
        failed.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    )]
    PartlyEnqueued {
        /// Messages the push needed, one per comet.
        total: usize,
        /// The messages that were not enqueued.
        failed: Vec<NotEnqueued>,
    },
    /// A kick reached some comets but not all (HTTP 503, code -500).
    #[error(
        "kicked {kicked}; failed: {}",
        failed.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    )]
    KickFailed {
        /// Connections the comets that answered closed.
        kicked: u64,
        /// Why each other comet was not kicked.
        failed: Vec<FacadeError>,
    },
    /// The IM layer refused an /im/v1 request (its code; HTTP per
    /// [`HttpError::status_and_code`]).
    #[error("{0}")]
    Im(#[from] rim_im::Error),
    /// No IM service: `im.store` is off (HTTP 404, code 2).
    #[error(
        "IM is off on this deployment (im.store = \"off\"): the /im/v1 endpoints need a message store"
    )]
    ImOff,
    /// A group's `max_members` is above `im.max_group_members` (HTTP 413,
    /// code 4).
    #[error("invalid field \"max_members\": {max_members} is above im.max_group_members ({limit})")]
    BigGroup {
        /// What the request asked for.
        max_members: u32,
        /// `im.max_group_members`.
        limit: u32,
    },
    /// An /im/v1 write over `im.api_write_rate` (HTTP 429 with
    /// `Retry-After`, IM code 3): nothing was done.
    #[error("{0}")]
    RateLimited(#[from] rim_logic::Limited),
    /// A dependency is not ready (HTTP 503, code -500).
    #[error("{}", not_ready(router.as_ref(), queue.as_deref()))]
    NotReady {
        /// Why logic (its router) is not ready, if it is not.
        router: Option<FacadeError>,
        /// Why the queue is not ready, if it is not (boxed: a Kafka error is large).
        queue: Option<Box<rim_queue::Error>>,
    },
}

/// One comet's queue message that was not enqueued.
#[derive(Debug, thiserror::Error)]
#[error("comet {comet} ({connections} connections): {source}")]
pub struct NotEnqueued {
    /// The comet's node id.
    pub comet: String,
    /// Connections the message was for.
    pub connections: usize,
    /// Why the queue refused it.
    #[source]
    pub source: rim_queue::Error,
}

fn not_ready(router: Option<&FacadeError>, queue: Option<&rim_queue::Error>) -> String {
    let router = router.map(ToString::to_string);
    let queue = queue.map(|e| format!("queue: {e}"));
    router
        .into_iter()
        .chain(queue)
        .collect::<Vec<_>>()
        .join("; ")
}

impl HttpError {
    /// Returns the HTTP status and goim code of this error: the one mapping.
    fn status_and_code(&self) -> (StatusCode, i32) {
        match self {
            HttpError::BadRequest(_) => (StatusCode::BAD_REQUEST, -400),
            HttpError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, -400),
            HttpError::BodyTimeout(_) => (StatusCode::REQUEST_TIMEOUT, -400),
            HttpError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, -401),
            HttpError::Im(err) => (im_status(err), err.code() as i32),
            HttpError::ImOff => (StatusCode::NOT_FOUND, rim_im::Code::NotAllowed as i32),
            HttpError::BigGroup { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, rim_im::Code::TooLarge as i32)
            }
            HttpError::RateLimited(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                rim_im::Code::RateLimited as i32,
            ),
            HttpError::Logic(_)
            | HttpError::NothingEnqueued { .. }
            | HttpError::NotEnqueued { .. }
            | HttpError::PartlyEnqueued { .. }
            | HttpError::KickFailed { .. }
            | HttpError::NotReady { .. } => (StatusCode::SERVICE_UNAVAILABLE, -500),
        }
    }

    /// Returns the im.md code of this error, which the /im/v1 endpoints
    /// answer in the envelope whatever failed: 1 bad request, 2 not
    /// allowed, 3 rate limited, 4 too large, 5 unavailable.
    fn im_code(&self) -> i32 {
        use rim_im::Code;
        let code = match self {
            HttpError::Im(err) => err.code(),
            HttpError::BadRequest(_) | HttpError::BodyTimeout(_) => Code::BadRequest,
            HttpError::Unauthorized(_) | HttpError::ImOff => Code::NotAllowed,
            HttpError::TooLarge(_) | HttpError::BigGroup { .. } => Code::TooLarge,
            HttpError::RateLimited(_) => Code::RateLimited,
            HttpError::Logic(_)
            | HttpError::NothingEnqueued { .. }
            | HttpError::NotEnqueued { .. }
            | HttpError::PartlyEnqueued { .. }
            | HttpError::KickFailed { .. }
            | HttpError::NotReady { .. } => Code::Unavailable,
        };
        code as i32
    }

    /// Answers this error with `code` in goim's envelope.
    fn respond(self, code: i32) -> Response {
        let (status, _) = self.status_and_code();
        if status.is_server_error() {
            tracing::warn!(reason = %self, "request failed");
        }
        (
            status,
            Json(json!({ "code": code, "message": self.to_string(), "data": null })),
        )
            .into_response()
    }
}

/// The HTTP status of an IM refusal: code 1 → 400, 2 → 403 (a missing
/// group → 404), 4 → 413 (a full group → 409: the same request may pass
/// once members leave), 5 → 503.
fn im_status(err: &rim_im::Error) -> StatusCode {
    match err {
        rim_im::Error::Invalid { .. } => StatusCode::BAD_REQUEST,
        rim_im::Error::NotMember { .. } => StatusCode::FORBIDDEN,
        rim_im::Error::NoSuchGroup { .. } => StatusCode::NOT_FOUND,
        rim_im::Error::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        rim_im::Error::GroupFull { .. } => StatusCode::CONFLICT,
        rim_im::Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let (_, code) = self.status_and_code();
        self.respond(code)
    }
}

/// A refusal of an /im/v1 request: the status of its [`HttpError`], with
/// the im.md code in the envelope and, on 503, `Retry-After: 1` (nothing
/// was stored: resend, a message with the same cmid); on 429, `Retry-After`
/// in whole seconds, rounded up.
#[derive(Debug)]
pub(crate) struct ImError(pub(crate) HttpError);

impl From<HttpError> for ImError {
    fn from(err: HttpError) -> ImError {
        ImError(err)
    }
}

impl From<rim_im::Error> for ImError {
    fn from(err: rim_im::Error) -> ImError {
        ImError(HttpError::Im(err))
    }
}

impl IntoResponse for ImError {
    fn into_response(self) -> Response {
        let code = self.0.im_code();
        let retry_after = match &self.0 {
            HttpError::RateLimited(limited) => Some(HeaderValue::from(limited.retry_secs())),
            _ => None,
        };
        let mut response = self.0.respond(code);
        let retry_after = retry_after.or_else(|| {
            (response.status() == StatusCode::SERVICE_UNAVAILABLE)
                .then(|| HeaderValue::from_static("1"))
        });
        if let Some(retry_after) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, retry_after);
        }
        response
    }
}

/// A successful answer in goim's envelope.
pub(crate) fn ok<T: serde::Serialize>(data: T) -> Response {
    Json(json!({ "code": 0, "message": "", "data": data })).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_its_status_and_goim_code() {
        let router = || FacadeError::Router(rim_router::Error::Unavailable("down".into()));
        let queue = || rim_queue::Error::Closed("the consumer is gone");
        let cases = [
            (HttpError::BadRequest("bad".into()), 400, -400),
            (HttpError::TooLarge(16), 413, -400),
            (
                HttpError::BodyTimeout(std::time::Duration::from_secs(10)),
                408,
                -400,
            ),
            (HttpError::Unauthorized("no token"), 401, -401),
            (HttpError::Logic(router()), 503, -500),
            (HttpError::NothingEnqueued { source: router() }, 503, -500),
            (
                HttpError::NotEnqueued {
                    what: "broadcast".into(),
                    source: Box::new(queue()),
                },
                503,
                -500,
            ),
            (
                HttpError::NotReady {
                    router: Some(router()),
                    queue: Some(Box::new(queue())),
                },
                503,
                -500,
            ),
        ];
        for (err, status, code) in cases {
            assert_eq!(
                err.status_and_code(),
                (StatusCode::from_u16(status).unwrap(), code),
                "{err}"
            );
        }
    }

    #[test]
    fn every_im_refusal_has_its_status_and_im_code() {
        let group = || rim_im::ConvId::group("team").unwrap();
        let cases = [
            (HttpError::BadRequest("bad".into()), 400, 1),
            (HttpError::TooLarge(16), 413, 4),
            (HttpError::Unauthorized("no token"), 401, 2),
            (HttpError::ImOff, 404, 2),
            (
                HttpError::BigGroup {
                    max_members: 600,
                    limit: 500,
                },
                413,
                4,
            ),
            ("x:1".parse::<rim_im::ConvId>().unwrap_err().into(), 400, 1),
            (
                rim_im::Error::NotMember {
                    conv: group(),
                    mid: 3,
                }
                .into(),
                403,
                2,
            ),
            (rim_im::Error::NoSuchGroup { conv: group() }.into(), 404, 2),
            (
                rim_im::Error::TooLarge {
                    field: "body",
                    len: 5000,
                    limit: 4000,
                }
                .into(),
                413,
                4,
            ),
            (
                rim_im::Error::GroupFull {
                    conv: group(),
                    members: 3,
                    limit: 2,
                }
                .into(),
                409,
                4,
            ),
            (
                rim_im::Error::unavailable("storing", std::io::Error::other("disk")).into(),
                503,
                5,
            ),
            (limited(1500).into(), 429, 3),
        ];
        for (err, status, code) in cases {
            let shown = err.to_string();
            let response = ImError(err).into_response();
            assert_eq!(response.status().as_u16(), status, "{shown}");
            let retry = response.headers().get(header::RETRY_AFTER);
            assert_eq!(retry.is_some(), status == 503 || status == 429, "{shown}");
            let body = json_body(response);
            assert_eq!(body["code"], code, "{shown}");
            assert_eq!(body["message"], shown);
        }
    }

    fn limited(ms: u64) -> rim_logic::Limited {
        rim_logic::Limited {
            limit: rim_logic::Limit::Api,
            retry: std::time::Duration::from_millis(ms),
        }
    }

    #[test]
    fn a_rate_limited_write_says_when_to_retry_in_whole_seconds() {
        for (ms, secs) in [(1, "1"), (999, "1"), (1000, "1"), (1001, "2"), (2500, "3")] {
            let response = ImError(limited(ms).into()).into_response();
            assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(response.headers()[header::RETRY_AFTER], secs, "{ms} ms");
            let body = json_body(response);
            assert_eq!(body["code"], 3);
            let message = body["message"].as_str().unwrap();
            assert!(message.contains("im.api_write_rate"), "{message}");
            assert!(message.contains(&format!("{ms} ms")), "{message}");
        }
    }

    /// Reads a response's JSON body (already in memory).
    fn json_body(response: Response) -> serde_json::Value {
        let bytes = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(axum::body::to_bytes(response.into_body(), usize::MAX))
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn causes_are_kept_as_sources() {
        use std::error::Error as _;
        let err = HttpError::NothingEnqueued {
            source: FacadeError::Router(rim_router::Error::Unavailable("redis down".into())),
        };
        assert!(err.to_string().ends_with("; nothing was enqueued"), "{err}");
        let source = err.source().map(ToString::to_string).unwrap_or_default();
        assert!(source.contains("redis down"), "{source}");
    }
}
