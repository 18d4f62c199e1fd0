//! The HTTP API's Prometheus metrics: requests by endpoint and status with
//! their duration (a middleware around every route), pushes by kind, queue
//! messages, and the queue and router failures of push planning.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use rim_metrics::{Counter, Family, Gauge, Histogram, Registry};

use crate::Api;

type Labels1 = [(&'static str, &'static str); 1];
type EndpointLabel = [(&'static str, String); 1];
type EndpointSeconds = Family<EndpointLabel, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(rim_metrics::latency_buckets())
}

/// The API's metrics.
#[derive(Debug)]
pub(crate) struct ApiMetrics {
    requests: Family<[(&'static str, String); 2], Counter>,
    request_seconds: EndpointSeconds,
    pushes: Family<Labels1, Counter>,
    messages: Family<Labels1, Counter>,
    queue_errors: Family<Labels1, Counter>,
    router_errors: Counter,
    pub(crate) connections: ConnectionMetrics,
}

/// Why the server closed an HTTP API connection.
pub(crate) const CLOSE_REASONS: [&str; 4] = ["header_timeout", "idle", "drain", "tls_handshake"];

/// The connections' metrics, shared with every connection's task.
#[derive(Clone, Debug, Default)]
pub(crate) struct ConnectionMetrics {
    open: Gauge,
    closed: Family<Labels1, Counter>,
}

impl ConnectionMetrics {
    /// Counts a connection open until the returned guard is dropped.
    pub(crate) fn opened(&self) -> OpenConnection {
        self.open.inc();
        OpenConnection(self.open.clone())
    }

    /// Counts a connection the server closed, by one of [`CLOSE_REASONS`].
    pub(crate) fn closed(&self, reason: &'static str) {
        self.closed.get_or_create(&[("reason", reason)]).inc();
    }
}

/// An open connection, counted in `rim_api_connections` while it lives.
pub(crate) struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The push kinds, one per push endpoint.
const KINDS: [&str; 4] = ["keys", "mids", "room", "all"];

impl Default for ApiMetrics {
    fn default() -> Self {
        let metrics = ApiMetrics {
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(latency_histogram),
            pushes: Family::default(),
            messages: Family::default(),
            queue_errors: Family::default(),
            router_errors: Counter::default(),
            connections: ConnectionMetrics::default(),
        };
        for reason in CLOSE_REASONS {
            let _ = metrics
                .connections
                .closed
                .get_or_create(&[("reason", reason)]);
        }
        // Series that exist from the start, so that dashboards and alerts
        // see zeros rather than nothing (an empty family is not exposed).
        for kind in KINDS {
            let labels = [("kind", kind)];
            let _ = metrics.pushes.get_or_create(&labels);
            let _ = metrics.messages.get_or_create(&labels);
            let _ = metrics.queue_errors.get_or_create(&labels);
            let _ = metrics
                .request_seconds
                .get_or_create(&[("endpoint", format!("/goim/push/{kind}"))]);
        }
        metrics
    }
}

impl ApiMetrics {
    /// Counts a push of `kind` (keys, mids, room, all) fully enqueued.
    pub(crate) fn pushed(&self, kind: &'static str) {
        self.pushes.get_or_create(&[("kind", kind)]).inc();
    }

    /// Counts one queue message written for a push of `kind`.
    pub(crate) fn enqueued(&self, kind: &'static str) {
        self.messages.get_or_create(&[("kind", kind)]).inc();
    }

    /// Counts one queue message that could not be written.
    pub(crate) fn queue_error(&self, kind: &'static str) {
        self.queue_errors.get_or_create(&[("kind", kind)]).inc();
    }

    /// Counts a router lookup that failed while planning a push.
    pub(crate) fn router_error(&self) {
        self.router_errors.inc();
    }

    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "rim_api_requests",
            "HTTP requests answered, by endpoint (route pattern) and status code",
            self.requests.clone(),
        );
        registry.register(
            "rim_api_request_duration_seconds",
            "Time to answer an HTTP request, by endpoint (push endpoints: until the queue accepted every message)",
            self.request_seconds.clone(),
        );
        registry.register(
            "rim_api_pushes",
            "Pushes fully enqueued, by kind (keys, mids, room, all; room includes the admin room broadcast)",
            self.pushes.clone(),
        );
        registry.register(
            "rim_api_push_messages",
            "Queue messages written for pushes (one per comet for keys and mids), by kind",
            self.messages.clone(),
        );
        registry.register(
            "rim_api_queue_errors",
            "Queue messages that could not be written (the push answered 503), by kind",
            self.queue_errors.clone(),
        );
        registry.register(
            "rim_api_router_errors",
            "Router lookups that failed while planning a push (the push answered 503)",
            self.router_errors.clone(),
        );
        registry.register(
            "rim_api_connections",
            "HTTP API connections open (at most api.max_connections)",
            self.connections.open.clone(),
        );
        registry.register(
            "rim_api_connections_closed",
            "HTTP API connections the server closed, by reason (header_timeout, idle, drain)",
            self.connections.closed.clone(),
        );
    }
}

/// Counts and times every request by its route pattern (never the raw
/// path, so label values stay a small fixed set).
pub(crate) async fn track(State(api): State<Arc<Api>>, request: Request, next: Next) -> Response {
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    let metrics = &api.metrics;
    metrics
        .request_seconds
        .get_or_create(&[("endpoint", endpoint.clone())])
        .observe(started.elapsed().as_secs_f64());
    metrics
        .requests
        .get_or_create(&[
            ("endpoint", endpoint),
            ("status", response.status().as_u16().to_string()),
        ])
        .inc();
    response
}
