//! The behavioural suite against a single Redis (`RIM_TEST_REDIS`, started by
//! `deploy/test.sh`), plus what a Redis that cannot be reached looks like.

mod suite;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rim_config::{RouterBackend, RouterConfig};
use rim_router::{Error, RedisOptions, RedisRouter, Router};

/// The test Redis URL, or a panic saying how to get one.
fn redis_url() -> String {
    match std::env::var("RIM_TEST_REDIS") {
        Ok(url) if !url.trim().is_empty() => url.trim().to_string(),
        _ => panic!("RIM_TEST_REDIS is not set: run deploy/test.sh"),
    }
}

async fn router(max_age: Duration) -> Arc<dyn Router> {
    let url = redis_url();
    let options = RedisOptions::new(max_age).with_prefix(suite::unique_prefix());
    match RedisRouter::connect(std::slice::from_ref(&url), options).await {
        Ok(router) => Arc::new(router),
        Err(e) => panic!("cannot reach Redis at RIM_TEST_REDIS={url}: {e}"),
    }
}

suite::router_tests!(router, #[ignore = "needs Redis: run deploy/test.sh"]);

#[tokio::test]
#[ignore = "needs Redis: run deploy/test.sh"]
async fn connect_builds_the_redis_backend() {
    let config = RouterConfig {
        backend: RouterBackend::Redis,
        redis: vec![redis_url()],
        online_max_age: Duration::from_secs(30),
        tls_ca: None,
    };
    let router = rim_router::connect(&config)
        .await
        .unwrap_or_else(|e| panic!("cannot reach Redis at RIM_TEST_REDIS: {e}"));
    router.ping().await.unwrap();
}

#[tokio::test]
async fn unreachable_redis_is_unavailable() {
    let started = Instant::now();
    let options = RedisOptions::new(Duration::from_secs(30));
    let err = RedisRouter::connect(&["redis://127.0.0.1:1".into()], options)
        .await
        .expect_err("connected to port 1");
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    assert!(err.is_transient());
    let message = err.to_string();
    assert!(
        message.starts_with("redis at redis://127.0.0.1:1: ") && message.contains("refused"),
        "{message}"
    );
    // Bounded by the connect timeout (5 s), not by a TCP default.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}
