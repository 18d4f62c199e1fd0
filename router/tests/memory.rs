//! The behavioural suite against the in-memory backend.

mod suite;

use std::sync::Arc;
use std::time::Duration;

use rim_config::{RouterBackend, RouterConfig};
use rim_router::{MemoryRouter, Router};

async fn router(max_age: Duration) -> Arc<dyn Router> {
    Arc::new(MemoryRouter::new(max_age))
}

suite::router_tests!(router);

#[tokio::test]
async fn connect_builds_the_memory_backend() {
    let config = RouterConfig {
        backend: RouterBackend::Memory,
        ..RouterConfig::default()
    };
    let router = rim_router::connect(&config).await.unwrap();
    router.ping().await.unwrap();
    suite::add_then_look_up_by_key_and_by_user(&*router).await;
}
