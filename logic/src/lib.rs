//! rim-logic owns the logic service: auth policies, presence (connect,
//! disconnect, heartbeat leases) written to the router, presence events
//! to a webhook, cluster-wide online counts, node selection for clients, the comet directory, and the logic
//! gRPC service comets call.
//!
//! The HTTP API reaches it through one boundary, [`LogicFacade`] (push
//! planning, online queries, node selection, admin calls, readiness);
//! comets reach it through `rim_proto::api::LogicApi`.
//!
//! It does not store the online map (rim-router) nor serve HTTP (rim-api).

pub mod auth;
mod comets;
mod facade;
mod grpc;
mod im;
mod metrics;
mod nodes;
mod presence;
mod service;
mod webhook;

pub use comets::{BadComet, CometNode, Comets};
pub use facade::{CometCallError, FacadeError, KeysByComet, LogicFacade, NodeQuery, NodeSelection};
pub use grpc::serve as serve_grpc;
pub use im::{ApiClient, Im, Limit, Limited, wire_msg};
pub use nodes::Choice;
pub use service::Logic;
pub use webhook::{HttpClient, MAX_RESPONSE_BODY, WebhookError};
