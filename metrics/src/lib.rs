//! rim-metrics owns how rim exposes Prometheus metrics: the [`Registry`]
//! every role registers its metrics in (passed down, never global), the
//! text exposition (OpenMetrics 1.0, which Prometheus scrapes natively),
//! the metrics every role has (`rim_build_info`, `rim_process_*` from
//! `/proc/self`), helpers for collectors that read a role's own atomics at
//! scrape time, and a tiny HTTP server answering `GET /metrics` for roles
//! without an HTTP API (comet, job).
//!
//! It does not decide what a role measures: each role crate owns its
//! metrics and registers them (see docs/metrics.md for the list).

mod exposition;
mod process;
mod server;

pub use prometheus_client;
pub use prometheus_client::collector::Collector;
pub use prometheus_client::encoding::DescriptorEncoder;
pub use prometheus_client::metrics::counter::Counter;
pub use prometheus_client::metrics::family::Family;
pub use prometheus_client::metrics::gauge::Gauge;
pub use prometheus_client::metrics::histogram::Histogram;
pub use prometheus_client::registry::Registry;

pub use crate::exposition::{
    CONTENT_TYPE, counter, counter_family, encode, gauge, gauge_family, latency_buckets,
    size_buckets,
};
pub use crate::process::register_common;
pub use crate::server::{router, serve};
