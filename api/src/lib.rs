//! rim-api owns the HTTP API on port 3111: the goim-compatible push, online
//! and nodes endpoints, push planning (keys grouped by comet, one queue
//! message per comet), the admin endpoints, the IM endpoints `/im/v1/*`
//! (../shared/docs/im.md, through logic's IM service), and health checks.
//!
//! Everything it asks of logic goes through one boundary,
//! `rim_logic::LogicFacade`; it never reaches the router or the comets
//! directly.
//!
//! Responses keep goim's envelope `{"code", "message", "data"}` (code 0,
//! -400 for bad requests, -500 for failures; the /im/v1 endpoints answer
//! im.md's codes 1, 2, 4, 5 instead) and also use the matching HTTP status. Nothing is lost silently: a push that could not be fully enqueued
//! answers 503 saying what was not enqueued.
//!
//! It does not deliver messages (rim-job) nor keep presence (rim-logic).

mod admin;
mod bearer;
mod connections;
mod error;
mod im;
mod metrics;
mod nodes;
mod online;
mod params;
mod push;
mod server;

pub use connections::TlsAcceptor;
pub use error::{HttpError, NotEnqueued};
pub use server::{Api, router, serve, serve_with_metrics, tls_acceptor};
