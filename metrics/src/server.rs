//! `GET /metrics` over HTTP, for roles without an HTTP API of their own.

use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::exposition::{CONTENT_TYPE, encode};

/// Returns a router answering `GET /metrics` with the registry's
/// exposition, without a fallback, so that it merges into another router.
pub fn router(registry: Arc<Registry>) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let registry = Arc::clone(&registry);
            async move { ([(header::CONTENT_TYPE, CONTENT_TYPE)], encode(&registry)) }
        }),
    )
}

/// Serves `GET /metrics` on `listener` until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    tracing::info!(addr = ?listener.local_addr().ok(), "metrics serving");
    let routes = router(registry).fallback(|| async {
        (StatusCode::NOT_FOUND, "only /metrics is served here\n").into_response()
    });
    axum::serve(listener, routes)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;

    use super::*;

    #[tokio::test]
    async fn metrics_are_served_until_stopped() {
        let mut registry = Registry::default();
        let pushes: Counter = Counter::default();
        registry.register("t_pushes", "Pushes.", pushes.clone());
        pushes.inc_by(3);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, Arc::new(registry), stop.clone()));

        let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::new();
        let answer = http
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        assert_eq!(
            answer.headers()[header::CONTENT_TYPE.as_str()],
            CONTENT_TYPE
        );
        let text = answer.text().await.unwrap();
        assert!(text.lines().any(|l| l == "t_pushes_total 3"), "{text}");
        let other = http.get(format!("http://{addr}/")).send().await.unwrap();
        assert_eq!(other.status(), 404);

        stop.cancel();
        server.await.unwrap().unwrap();
    }
}
