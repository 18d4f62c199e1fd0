//! rim-im owns the IM domain of ../shared/docs/im.md: conversation ids and
//! their validation, messages and their limits, time-ordered 64-bit message
//! ids, membership, dense per-conversation sequences, sender dedup,
//! per-user inboxes and read positions behind a `MessageStore`, with an
//! embedded SQLite backend (`SqliteStore`) and (as it lands) PostgreSQL.
//!
//! It does not know sockets, frames, HTTP or the queue: comet, logic, api
//! and job reach the IM layer through its types and its store boundary.

mod conv;
mod error;
mod id;
mod message;
mod postgres;
mod shard;
mod sharded;
mod sqlite;
mod store;

pub use crate::conv::{ConvId, MAX_GID_LEN};
pub use crate::error::{Code, Error, Result, StoreFailure};
pub use crate::id::{IdGenerator, MAX_NODE, MessageId};
pub use crate::message::{Draft, MAX_CMID_LEN};
pub use crate::postgres::{PostgresOptions, PostgresStore};
pub use crate::shard::{BUCKETS, ShardMap, conv_bucket, mid_bucket};
pub use crate::sharded::ShardedStore;
pub use crate::sqlite::{Pragmas, SqliteOptions, SqliteStore, Synchronous};
pub use crate::store::{
    ConvSummary, DEFAULT_SYNC_LIMIT, Group, GroupSpec, InboxEntry, MAX_BIG_GROUPS_LIMIT,
    MAX_CONVERSATIONS_LIMIT, MAX_MEMBERS_LIMIT, MAX_PULL_LIMIT, MAX_SYNC_LIMIT, MembersChanged,
    MembersPage, Message, MessageStore, Page, Pruned, PullPage, ReadPos, Reader, Relayed,
    Retention, Sent, SyncPage, Synced, clamp_limit,
};
