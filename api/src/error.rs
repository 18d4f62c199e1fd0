//! The API's errors and their one mapping to goim's envelope and an HTTP status.

use axum::Json;
use axum::http::StatusCode;
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
            HttpError::Logic(_)
            | HttpError::NothingEnqueued { .. }
            | HttpError::NotEnqueued { .. }
            | HttpError::PartlyEnqueued { .. }
            | HttpError::KickFailed { .. }
            | HttpError::NotReady { .. } => (StatusCode::SERVICE_UNAVAILABLE, -500),
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
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
