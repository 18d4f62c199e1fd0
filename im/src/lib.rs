//! rim-im owns the IM domain of ../shared/docs/im.md: conversation ids and
//! their validation, messages and their limits, time-ordered 64-bit message
//! ids, and (as it lands) membership, dense per-conversation sequences,
//! sender dedup, per-user inboxes and read positions behind a
//! `MessageStore` with SQLite and PostgreSQL backends.
//!
//! It does not know sockets, frames, HTTP or the queue: comet, logic, api
//! and job reach the IM layer through its types and its store boundary.

mod conv;
mod error;
mod id;
mod message;

pub use crate::conv::{ConvId, MAX_GID_LEN};
pub use crate::error::{Code, Error};
pub use crate::id::{IdGenerator, MAX_NODE, MessageId};
pub use crate::message::{Draft, MAX_CMID_LEN};
