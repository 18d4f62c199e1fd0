//! rim-job owns delivery from the queue to the comets: one consume loop over
//! the queue's `Consumer` ([`consume`]), a dispatcher that plans each message
//! by type ([`Job`]: PUSH to the named comet, ROOM through a per-room
//! aggregator into op-9 batches, BROADCAST to every comet with the pace
//! divided among them), and one ordered delivery client per comet, with
//! retries and a breaker. A message's receipt is handled only once it was
//! fully handled, so the queue commits only what was delivered.
//!
//! It does not plan pushes (rim-api), does not know sockets (rim-comet), and
//! does not know which queue it reads (rim-queue) nor how comets are found
//! (the role wiring hands it the region's comets).

mod comet_client;
mod comets;
mod consume;
mod dispatch;
mod metrics;
mod room;
mod routes;
mod ticket;

pub use crate::comet_client::Outcome;
pub use crate::comets::CometHandle;
pub use crate::consume::{FINAL_WAIT, consume};
pub use crate::dispatch::Job;
pub use crate::ticket::Ticket;
