//! The behavioural suite against a three-master Redis Cluster
//! (`RIM_TEST_REDIS_CLUSTER`, comma-separated seed URLs, started by
//! `deploy/test.sh`).

mod suite;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rim_config::{RouterBackend, RouterConfig};
use rim_router::{Error, RedisOptions, RedisRouter, Router};

/// The cluster's seed URLs, or a panic saying how to get them.
fn cluster_urls() -> Vec<String> {
    let urls: Vec<String> = std::env::var("RIM_TEST_REDIS_CLUSTER")
        .unwrap_or_default()
        .split(',')
        .map(|url| url.trim().to_string())
        .filter(|url| !url.is_empty())
        .collect();
    assert!(
        urls.len() > 1,
        "RIM_TEST_REDIS_CLUSTER is not set to several seed URLs: run deploy/test.sh"
    );
    urls
}

async fn router(max_age: Duration) -> Arc<dyn Router> {
    let urls = cluster_urls();
    let options = RedisOptions::new(max_age).with_prefix(suite::unique_prefix());
    match RedisRouter::connect(&urls, options).await {
        Ok(router) => Arc::new(router),
        Err(e) => panic!(
            "cannot reach the Redis Cluster at RIM_TEST_REDIS_CLUSTER={}: {e}",
            urls.join(",")
        ),
    }
}

suite::router_tests!(router, #[ignore = "needs a Redis Cluster: run deploy/test.sh"]);

#[tokio::test]
#[ignore = "needs a Redis Cluster: run deploy/test.sh"]
async fn connect_builds_the_cluster_backend() {
    let config = RouterConfig {
        backend: RouterBackend::Redis,
        redis: cluster_urls(),
        online_max_age: Duration::from_secs(30),
        tls_ca: None,
    };
    let router = rim_router::connect(&config)
        .await
        .unwrap_or_else(|e| panic!("cannot reach the Redis Cluster: {e}"));
    router.ping().await.unwrap();
}

#[tokio::test]
async fn unreachable_cluster_is_unavailable() {
    let started = Instant::now();
    let seeds = [
        "redis://127.0.0.1:1".to_string(),
        "redis://127.0.0.1:2".to_string(),
    ];
    let options = RedisOptions::new(Duration::from_secs(30));
    let err = RedisRouter::connect(&seeds, options)
        .await
        .expect_err("connected to ports 1 and 2");
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("redis cluster at redis://127.0.0.1:1,redis://127.0.0.1:2: "),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}
