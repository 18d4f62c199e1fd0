//! rim-api owns the HTTP API on port 3111: the goim-compatible push and
//! online endpoints, push planning (router lookup, keys grouped by comet,
//! one queue message per comet), the admin endpoints, and health checks.
//!
//! Responses keep goim's envelope `{"code", "message", "data"}` (code 0,
//! -400 for bad requests, -500 for failures) and also use the matching HTTP
//! status. Nothing is lost silently: a push that could not be fully enqueued
//! answers 503 saying what was not enqueued.
//!
//! It does not deliver messages (rim-job) nor keep presence (rim-logic).

mod admin;
mod error;
mod metrics;
mod params;
mod push;
mod role;
mod server;

pub use error::ApiError;
pub use role::{LOAD_REFRESH, Listeners, RunError, run};
pub use server::{Api, router, serve, serve_with_metrics};

/// Returns a metrics registry holding what every role exposes
/// (`rim_build_info` for `role`, `rim_process_*`); each role's crate then
/// registers its own metrics in it.
pub fn metrics_registry(role: &'static str) -> rim_metrics::Registry {
    let mut registry = rim_metrics::Registry::default();
    rim_metrics::register_common(&mut registry, role);
    registry
}
