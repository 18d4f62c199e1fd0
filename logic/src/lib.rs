//! rim-logic owns the logic service: auth policies, presence (connect,
//! disconnect, heartbeat leases) written to the router, cluster-wide online
//! counts, node selection for clients, and the logic gRPC service comets call.
//!
//! It does not store the online map (rim-router) nor serve HTTP (rim-api).

pub mod auth;
pub mod comets;
pub mod grpc;
mod metrics;
pub mod nodes;
mod service;
pub mod webhook;

pub use service::Logic;
