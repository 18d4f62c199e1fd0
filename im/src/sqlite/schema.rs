//! The SQLite file's schema, versioned by `PRAGMA user_version`. The
//! PostgreSQL store keeps the same tables and columns.
//!
//! Version 1:
//! - `convs`: a conversation's latest seq and the time of its latest
//!   message (a group's creation time until it has one).
//! - `groups`: a group's settings and member count.
//! - `members`: who is in a conversation and how far they have read; a 1:1
//!   conversation's two users get their rows with its first message.
//! - `messages`: the messages; `(conv, sender, cmid)` is the dedup key and
//!   `id` is unique (a clock stepping back across restarts must not store a
//!   second message under an id already given out).
//! - `users`: each user's latest inbox `sync`.
//! - `inbox`: `(mid, sync) → (conv, seq)`.
//!
//! Version 2 (retention): `convs.min_seq`, a conversation's oldest retained
//! seq, and `users.min_sync`, a user's oldest retained inbox entry
//! (everything below them was pruned).
//!
//! Version 3 (big groups): `groups.big`, 1 when the group is big (read
//! diffusion: its messages get no inbox entries); never set back to 0. A
//! user's big groups are found through `members_by_mid`, its range of
//! group ids (`g:…`, ahead of `p:…` in byte order), joined to `groups`.

use rusqlite::{Connection, TransactionBehavior};

use crate::error::{Error, Result, StoreFailure};

use super::failed;

/// The schema version this code writes and reads.
pub(super) const VERSION: i64 = 3;

/// Version 1. `messages` keeps its rowid: bodies run to kilobytes, and
/// SQLite advises WITHOUT ROWID only for small rows.
const V1: &str = "
CREATE TABLE convs (
    conv TEXT PRIMARY KEY,
    max_seq INTEGER NOT NULL,
    last_ts INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE groups (
    conv TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    max_members INTEGER NOT NULL,
    members INTEGER NOT NULL,
    created_ts INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE members (
    conv TEXT NOT NULL,
    mid INTEGER NOT NULL,
    read_seq INTEGER NOT NULL,
    PRIMARY KEY (conv, mid)
) WITHOUT ROWID;
CREATE INDEX members_by_mid ON members (mid, conv);
CREATE TABLE messages (
    conv TEXT NOT NULL,
    seq INTEGER NOT NULL,
    id INTEGER NOT NULL,
    sender INTEGER NOT NULL,
    cmid TEXT NOT NULL,
    kind INTEGER NOT NULL,
    body TEXT NOT NULL,
    ts INTEGER NOT NULL,
    PRIMARY KEY (conv, seq),
    UNIQUE (conv, sender, cmid)
);
CREATE UNIQUE INDEX messages_by_id ON messages (id);
CREATE TABLE users (
    mid INTEGER PRIMARY KEY,
    max_sync INTEGER NOT NULL
);
CREATE TABLE inbox (
    mid INTEGER NOT NULL,
    sync INTEGER NOT NULL,
    conv TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (mid, sync)
) WITHOUT ROWID;
";

/// Version 2: the retention floors.
const V2: &str = "
ALTER TABLE convs ADD COLUMN min_seq INTEGER NOT NULL DEFAULT 1;
ALTER TABLE users ADD COLUMN min_sync INTEGER NOT NULL DEFAULT 1;
";

/// Version 3: read diffusion.
const V3: &str = "
ALTER TABLE groups ADD COLUMN big INTEGER NOT NULL DEFAULT 0;
";

/// Brings the file to [`VERSION`] in one transaction, or refuses a file
/// written by a newer rim (its tables may mean something this code does
/// not know).
pub(super) fn migrate(conn: &mut Connection, path: &str) -> Result<()> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(failed("locking the SQLite file to check its schema"))?;
    let found: i64 = tx
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(failed("reading the SQLite schema version"))?;
    if found > VERSION {
        return Err(Error::Unavailable(StoreFailure::bare(format!(
            "{path} has schema version {found}, newer than version {VERSION} this rim knows: \
             refusing to open it (run the rim that wrote it, or restore a backup)"
        ))));
    }
    if found < 1 {
        tx.execute_batch(V1)
            .map_err(failed("creating the SQLite schema"))?;
    }
    if found < 2 {
        tx.execute_batch(V2)
            .map_err(failed("adding the retention floors to the SQLite schema"))?;
    }
    if found < 3 {
        tx.execute_batch(V3)
            .map_err(failed("adding big groups to the SQLite schema"))?;
    }
    if found < VERSION {
        tx.pragma_update(None, "user_version", VERSION)
            .map_err(failed("recording the SQLite schema version"))?;
    }
    tx.commit().map_err(failed("committing the SQLite schema"))
}
