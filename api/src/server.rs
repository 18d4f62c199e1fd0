//! The HTTP server: state, routes, body limits, health and readiness.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use rim_config::{ApiConfig, ImConfig};
use rim_logic::LogicFacade;
use rim_queue::Producer;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::connections::{Limits, TlsAcceptor};
use crate::error::ok;
use crate::metrics::{ApiMetrics, ConnectionMetrics, track};
use crate::{HttpError, admin, im, nodes, online, push};

/// What the handlers share.
pub struct Api {
    /// Everything the handlers ask of logic, through its one boundary.
    pub(crate) logic: Arc<dyn LogicFacade>,
    pub(crate) producer: Arc<dyn Producer>,
    pub(crate) max_body: usize,
    pub(crate) body_read_timeout: Duration,
    pub(crate) limits: Limits,
    pub(crate) admin_token: Option<String>,
    pub(crate) push_token: Option<String>,
    pub(crate) im: ImSettings,
    pub(crate) metrics: ApiMetrics,
}

/// What the /im/v1 endpoints take from `[im]`.
#[derive(Debug)]
pub(crate) struct ImSettings {
    /// The bearer token: `im.api_token`, else `api.admin_token`.
    pub(crate) token: Option<String>,
    /// `im.big_group_members`: a group's `max_members` when a PUT names none.
    pub(crate) big_group_members: u32,
    /// `im.max_group_members`: the most members a group may be set to.
    pub(crate) max_group_members: u32,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("max_body", &self.max_body)
            .finish_non_exhaustive()
    }
}

impl Api {
    /// Creates the API over logic's facade and a queue producer; `im` gives
    /// the /im/v1 endpoints their token and group limit.
    pub fn new(
        config: &ApiConfig,
        im: &ImConfig,
        logic: Arc<dyn LogicFacade>,
        producer: Arc<dyn Producer>,
    ) -> Arc<Api> {
        Arc::new(Api {
            logic,
            producer,
            max_body: config.max_body,
            body_read_timeout: config.body_read_timeout,
            limits: Limits {
                header_read_timeout: config.header_read_timeout,
                keep_alive_timeout: config.keep_alive_timeout,
                max_connections: config.max_connections,
                drain_timeout: config.drain_timeout,
            },
            admin_token: config.admin_token.clone(),
            push_token: config.push_token.clone(),
            im: ImSettings {
                token: im.api_token.clone().or_else(|| config.admin_token.clone()),
                big_group_members: im.big_group_members,
                max_group_members: im.max_group_members,
            },
            metrics: ApiMetrics::default(),
        })
    }

    /// Registers the API's metrics (`rim_api_*`) in `registry`.
    pub fn register_metrics(&self, registry: &mut rim_metrics::Registry) {
        self.metrics.register(registry);
    }

    /// Reads a request body, refusing one over `api.max_body` with 413 and one
    /// that does not arrive within `api.body_read_timeout` with 408.
    pub(crate) async fn read_body(
        &self,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<Bytes, HttpError> {
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.max_body as u64) {
            return Err(HttpError::TooLarge(self.max_body));
        }
        match tokio::time::timeout(
            self.body_read_timeout,
            axum::body::to_bytes(body, self.max_body),
        )
        .await
        {
            Ok(read) => read.map_err(|_| HttpError::TooLarge(self.max_body)),
            Err(_) => Err(HttpError::BodyTimeout(self.body_read_timeout)),
        }
    }
}

/// Builds the routes.
pub fn router(api: Arc<Api>) -> Router {
    routes(api, None)
}

/// Builds the routes, with `GET /metrics` answering `registry`'s exposition
/// when given.
fn routes(api: Arc<Api>, registry: Option<Arc<rim_metrics::Registry>>) -> Router {
    let metrics = registry.map(rim_metrics::router).unwrap_or_default();
    let pushes = Router::new()
        .route("/goim/push/keys", post(push::keys))
        .route("/goim/push/mids", post(push::mids))
        .route("/goim/push/room", post(push::room))
        .route("/goim/push/all", post(push::all))
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(&api),
            crate::bearer::require_push_token,
        ));
    Router::new()
        .merge(pushes)
        .route("/goim/online/top", get(online::top))
        .route("/goim/online/room", get(online::room))
        .route("/goim/online/total", get(online::total))
        .route("/goim/nodes/weighted", get(nodes::weighted))
        .route("/goim/nodes/instances", get(nodes::instances))
        .nest("/admin", admin::routes(Arc::clone(&api)))
        .nest("/im/v1", im::routes(Arc::clone(&api)))
        .route("/", get(demo))
        .route("/healthz", get(|| async { ok("ok") }))
        .route("/readyz", get(readyz))
        .fallback(|| async {
            (StatusCode::NOT_FOUND, axum::Json(json!({ "code": -404, "message": "no such endpoint", "data": null })))
        })
        .method_not_allowed_fallback(|| async {
            (
                StatusCode::METHOD_NOT_ALLOWED,
                axum::Json(json!({ "code": -405, "message": "method not allowed on this endpoint", "data": null })),
            )
        })
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&api), track))
        .with_state(api)
        .merge(metrics)
}

/// The browser chat demo: a page with its own client of the binary protocol.
async fn demo() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("../static/demo.html"))
}

/// Ready when logic (its router) and the queue answer.
async fn readyz(State(api): State<Arc<Api>>) -> Response {
    let router = api.logic.ping().await.err();
    let queue = api.producer.ping().await.err().map(Box::new);
    if router.is_none() && queue.is_none() {
        ok("ready")
    } else {
        HttpError::NotReady { router, queue }.into_response()
    }
}

/// Returns the TLS acceptor of the API when `api.tls_cert` and
/// `api.tls_key` are set (HTTPS only), `None` for plain HTTP.
pub fn tls_acceptor(config: &ApiConfig) -> Result<Option<TlsAcceptor>, rim_tls::TlsError> {
    match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => rim_tls::acceptor(cert, key).map(Some),
        // The config check refuses half a pair.
        _ => Ok(None),
    }
}

/// Serves the API on `listener` until `stop` is cancelled; HTTPS with
/// `tls` (see [`tls_acceptor`]).
pub async fn serve(
    api: Arc<Api>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let (limits, metrics) = (api.limits, api.metrics.connections.clone());
    serve_routes(routes(api, None), listener, tls, limits, metrics, stop).await
}

/// Serves the API and `GET /metrics` (the registry's exposition) on
/// `listener` until `stop` is cancelled; HTTPS with `tls` (see
/// [`tls_acceptor`]).
pub async fn serve_with_metrics(
    api: Arc<Api>,
    registry: Arc<rim_metrics::Registry>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let (limits, metrics) = (api.limits, api.metrics.connections.clone());
    let routes = routes(api, Some(registry));
    serve_routes(routes, listener, tls, limits, metrics, stop).await
}

async fn serve_routes(
    routes: Router,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    metrics: ConnectionMetrics,
    stop: CancellationToken,
) -> std::io::Result<()> {
    tracing::info!(addr = ?listener.local_addr().ok(), tls = tls.is_some(), "http api serving");
    crate::connections::serve(routes, listener, tls, limits, metrics, stop).await
}
