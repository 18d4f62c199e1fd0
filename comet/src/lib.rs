//! rim-comet owns the edge server: TCP, WebSocket and WSS listeners, the
//! goim connection lifecycle (auth, heartbeat, rooms, sub/unsub), sharded
//! session buckets and rooms, the per-connection write path, and the comet
//! gRPC service the job pushes through.
//!
//! It does not authenticate or track presence itself: that is logic's,
//! reached through the [`LogicApi`](rim_proto::api::LogicApi) trait (a local
//! implementation in standalone, gRPC otherwise). Nor does it know
//! discovery or how the process is wired: the role (`src/roles/comet.rs`)
//! registers the node and hands [`Comet::serve`] a hook that runs once
//! accepting has stopped, before clients are drained.
//!
//! Where things are: `server` (start, then the drain order), `listener`
//! (listeners and accept loops), `tls` (WSS and gRPC TLS), `connection` (one client from
//! accept to close), `transport` (frames over TCP or WebSocket), `limits` (the
//! checks of what a client asks for: room ids, accepted ops), `session`
//! and `bucket` (sessions, rooms and outbound queues), `comet` (shared state
//! and the `CometApi` deliveries), `room_report` (room counts to logic),
//! `stats` and `metrics` (counters and their Prometheus names).
//!
//! Memory per idle connection is kept small on purpose: one task, no read
//! buffer while idle (TCP), an outbound queue that holds no allocation while
//! empty, and small tungstenite buffers (WebSocket).

mod bucket;
mod comet;
mod connection;
mod detached;
mod error;
mod im;
mod limits;
mod listener;
mod log_limit;
mod metrics;
mod pacer;
mod room_report;
mod server;
mod session;
mod stats;
mod tls;
mod transport;

pub use crate::comet::Comet;
#[doc(hidden)]
pub use crate::detached::{DetachedSession, NoLogic};
pub use crate::error::{Error, Result, TlsError};
pub use crate::listener::{Listeners, WS_PATH, listen};
pub use crate::session::TransportKind;
