//! The writer thread: the only user of the write connection, committing
//! writes in batches (group commit).
//!
//! It blocks for one request, takes whatever else is already queued (up to
//! `max_batch`) without waiting, and runs them all in one `BEGIN IMMEDIATE`
//! transaction, each under its own savepoint so that a refused request
//! (not a member, group full) rolls back only itself. One COMMIT, so one
//! fsync, then every request is answered; a failing COMMIT answers all of
//! them [`Error::Unavailable`] and stored nothing. Nobody is answered before
//! the commit their write is in is durable.
//!
//! A send to a big group (read diffusion) reads the group's row and the
//! sender's membership and writes the message, the conversation's head and
//! the sender's read position: its member list is never read, and no inbox
//! moves.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::{mpsc, oneshot};

use crate::conv::ConvId;
use crate::error::{Error, Result, StoreFailure};
use crate::id::IdGenerator;
use crate::message::Draft;
use crate::store::{
    Group, GroupSpec, InboxEntry, MembersChanged, Message, PruneCursor, Pruned, ReadPos, Retention,
    Sent,
};

use super::{MESSAGE_COLUMNS, failed, find_group, from_sql, max_seq, message_at, read_seq};

/// A write, as the store's methods hand it to the writer.
#[derive(Debug)]
pub(super) enum Op {
    Send(Draft),
    Read {
        conv: ConvId,
        mid: i64,
        seq: i64,
    },
    PutGroup {
        conv: ConvId,
        spec: GroupSpec,
    },
    ChangeMembers {
        conv: ConvId,
        add: Vec<i64>,
        remove: Vec<i64>,
    },
    Prune {
        retention: Retention,
        budget: u64,
        cursor: PruneCursor,
    },
}

/// What a write did.
#[derive(Debug)]
pub(super) enum Done {
    Sent(Sent),
    Read(ReadPos),
    Group(Group),
    Members(MembersChanged),
    Pruned(Pruned, PruneCursor),
}

impl Done {
    /// The writer answered with another kind of outcome than the op asked
    /// for; it never does.
    pub(super) fn mismatch(&self) -> Error {
        Error::Unavailable(StoreFailure::bare(
            "the SQLite writer answered a different request",
        ))
    }
}

/// A write and where its outcome goes.
#[derive(Debug)]
pub(super) struct Request {
    pub(super) op: Op,
    pub(super) reply_tx: oneshot::Sender<Result<Done>>,
}

/// The writer's state.
pub(super) struct Writer {
    conn: Connection,
    ids: Arc<IdGenerator>,
    commits: Arc<AtomicU64>,
    max_batch: usize,
}

impl Writer {
    pub(super) fn new(
        conn: Connection,
        ids: Arc<IdGenerator>,
        commits: Arc<AtomicU64>,
        max_batch: usize,
    ) -> Writer {
        Writer {
            conn,
            ids,
            commits,
            max_batch,
        }
    }

    /// Commits batches until every sender of requests is gone.
    pub(super) fn run(mut self, mut requests_rx: mpsc::Receiver<Request>) {
        let mut batch = Vec::with_capacity(self.max_batch);
        while let Some(first) = requests_rx.blocking_recv() {
            batch.push(first);
            while batch.len() < self.max_batch {
                match requests_rx.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            self.commit(&mut batch);
        }
    }

    /// Runs and commits one batch, then answers it.
    fn commit(&mut self, batch: &mut Vec<Request>) {
        let mut outcomes = Vec::with_capacity(batch.len());
        match self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
        {
            Err(err) => {
                let err = Arc::new(err);
                outcomes.extend(
                    batch
                        .iter()
                        .map(|_| Err(Error::unavailable("starting a write", err.clone()))),
                );
            }
            Ok(mut tx) => {
                for request in batch.iter() {
                    // Some errors (disk full, I/O) make SQLite roll back the
                    // whole transaction: what follows would run outside it
                    // and commit on its own, so it does not run.
                    if tx.is_autocommit() {
                        outcomes.push(Err(Error::Unavailable(StoreFailure::bare(
                            "SQLite rolled back the write transaction",
                        ))));
                        continue;
                    }
                    outcomes.push(apply(&mut tx, &self.ids, &request.op));
                }
                // On failure the transaction is dropped, which rolls it back.
                match tx.commit() {
                    Ok(()) => {
                        self.commits.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(err) => {
                        let err = Arc::new(err);
                        for outcome in &mut outcomes {
                            *outcome = Err(Error::unavailable("committing writes", err.clone()));
                        }
                    }
                }
            }
        }
        for (request, outcome) in batch.drain(..).zip(outcomes) {
            // A caller that stopped waiting finds its write done (or not)
            // when it resends.
            let _ = request.reply_tx.send(outcome);
        }
    }
}

/// Runs one write under its own savepoint: a refusal or failure rolls back
/// this write only.
fn apply(tx: &mut rusqlite::Transaction<'_>, ids: &IdGenerator, op: &Op) -> Result<Done> {
    let sp = tx.savepoint().map_err(failed("opening a savepoint"))?;
    let done = match op {
        Op::Send(draft) => Done::Sent(send(&sp, ids, draft)?),
        Op::Read { conv, mid, seq } => Done::Read(read(&sp, conv, *mid, *seq)?),
        Op::PutGroup { conv, spec } => Done::Group(put_group(&sp, conv, spec)?),
        Op::ChangeMembers { conv, add, remove } => {
            Done::Members(change_members(&sp, conv, add, remove)?)
        }
        Op::Prune {
            retention,
            budget,
            cursor,
        } => {
            let mut cursor = cursor.clone();
            let pruned = super::prune::step(&sp, retention, *budget, &mut cursor)?;
            Done::Pruned(pruned, cursor)
        }
    };
    sp.commit().map_err(failed("releasing a savepoint"))?;
    Ok(done)
}

fn send(conn: &Connection, ids: &IdGenerator, draft: &Draft) -> Result<Sent> {
    let conv = draft.conv.to_string();
    // A group's row (a primary key probe): whether it exists and is big.
    let group = find_group(conn, &draft.conv)?;
    let big = group.as_ref().is_some_and(|group| group.big);
    // Dedup first: a resend, even within this batch, finds the first send.
    let first = conn
        .prepare_cached(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conv = ?1 AND sender = ?2 AND cmid = ?3"
        ))
        .and_then(|mut stmt| {
            stmt.query_row(params![conv, draft.from, draft.cmid], |row| {
                message_at(draft.conv.clone(), row, 0)
            })
            .optional()
        })
        .map_err(failed("looking up a resend"))?;
    if let Some(message) = first {
        return Ok(Sent {
            message,
            duplicate: true,
            inbox: Vec::new(),
            big,
            pending: Vec::new(),
        });
    }

    let not_member = || Error::NotMember {
        conv: draft.conv.clone(),
        mid: draft.from,
    };
    let current = max_seq(conn, &conv).map_err(failed("reading a conversation"))?;
    let sender_is_member = match &draft.conv {
        ConvId::Peer { low, high } => {
            if !draft.system && !draft.conv.is_peer_of(draft.from) {
                return Err(not_member());
            }
            if current == 0 {
                // A pair's members rows come with its first message.
                conn.prepare_cached(
                    "INSERT INTO members (conv, mid, read_seq) VALUES (?1, ?2, 0), (?1, ?3, 0) \
                     ON CONFLICT DO NOTHING",
                )
                .and_then(|mut stmt| stmt.execute(params![conv, low, high]))
                .map_err(failed("adding a conversation's members"))?;
            }
            draft.conv.is_peer_of(draft.from)
        }
        ConvId::Group(_) => {
            if group.is_none() {
                return Err(if draft.system {
                    Error::NoSuchGroup {
                        conv: draft.conv.clone(),
                    }
                } else {
                    not_member()
                });
            }
            // The sender's row only, big group or not.
            let member = read_seq(conn, &conv, draft.from)
                .map_err(failed("checking membership"))?
                .is_some();
            if !member && !draft.system {
                return Err(not_member());
            }
            member
        }
    };

    let seq = current
        .checked_add(1)
        .ok_or_else(|| Error::Unavailable(StoreFailure::bare(format!("{conv} is out of seqs"))))?;
    let id = ids.next();
    let stored_id = i64::try_from(id.as_u64()).map_err(|_| {
        Error::Unavailable(StoreFailure::bare(format!("message id {id} overflows")))
    })?;
    let ts = i64::try_from(id.unix_ms()).map_err(|_| {
        Error::Unavailable(StoreFailure::bare(format!("message id {id} overflows")))
    })?;
    conn.prepare_cached(
        "INSERT INTO convs (conv, max_seq, last_ts) VALUES (?1, ?2, ?3) \
         ON CONFLICT (conv) DO UPDATE SET max_seq = excluded.max_seq, last_ts = excluded.last_ts",
    )
    .and_then(|mut stmt| stmt.execute(params![conv, seq, ts]))
    .map_err(failed("advancing a conversation"))?;
    conn.prepare_cached(
        "INSERT INTO messages (conv, seq, id, sender, cmid, kind, body, ts) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .and_then(|mut stmt| {
        stmt.execute(params![
            conv, seq, stored_id, draft.from, draft.cmid, draft.kind, draft.body, ts
        ])
    })
    .map_err(failed("storing a message"))?;

    let mids = match &draft.conv {
        // A pair's members are its two users (one when talking to oneself).
        ConvId::Peer { low, high } if low == high => vec![*low],
        ConvId::Peer { low, high } => vec![*low, *high],
        // Read diffusion: no inbox entries, and the member list is not read.
        ConvId::Group(_) if big => Vec::new(),
        ConvId::Group(_) => conn
            .prepare_cached("SELECT mid FROM members WHERE conv = ?1 ORDER BY mid")
            .and_then(|mut stmt| {
                stmt.query_map([&conv], |row| row.get(0))?
                    .collect::<rusqlite::Result<Vec<i64>>>()
            })
            .map_err(failed("listing a conversation's members"))?,
    };
    let mut inbox = Vec::with_capacity(mids.len());
    for mid in mids {
        let sync: i64 = conn
            .prepare_cached(
                "INSERT INTO users (mid, max_sync) VALUES (?1, 1) \
                 ON CONFLICT (mid) DO UPDATE SET max_sync = max_sync + 1 RETURNING max_sync",
            )
            .and_then(|mut stmt| stmt.query_row([mid], |row| row.get(0)))
            .map_err(failed("advancing an inbox"))?;
        conn.prepare_cached("INSERT INTO inbox (mid, sync, conv, seq) VALUES (?1, ?2, ?3, ?4)")
            .and_then(|mut stmt| stmt.execute(params![mid, sync, conv, seq]))
            .map_err(failed("storing an inbox entry"))?;
        inbox.push(InboxEntry {
            mid,
            sync: from_sql("sync", sync)?,
        });
    }
    if sender_is_member {
        move_read_seq(conn, &conv, draft.from, seq)?;
    }

    Ok(Sent {
        message: Message {
            conv: draft.conv.clone(),
            seq: from_sql("seq", seq)?,
            id,
            from: draft.from,
            cmid: draft.cmid.clone(),
            kind: draft.kind,
            body: draft.body.clone(),
            ts,
        },
        duplicate: false,
        inbox,
        big,
        pending: Vec::new(),
    })
}

/// Moves `mid`'s read position in `conv` up to `seq` (never down).
fn move_read_seq(conn: &Connection, conv: &str, mid: i64, seq: i64) -> Result<bool> {
    let moved = conn
        .prepare_cached(
            "UPDATE members SET read_seq = ?3 WHERE conv = ?1 AND mid = ?2 AND read_seq < ?3",
        )
        .and_then(|mut stmt| stmt.execute(params![conv, mid, seq]))
        .map_err(failed("moving a read position"))?;
    Ok(moved > 0)
}

fn read(conn: &Connection, conv: &ConvId, mid: i64, seq: i64) -> Result<ReadPos> {
    let key = conv.to_string();
    let max_seq = max_seq(conn, &key).map_err(failed("reading a conversation"))?;
    let Some(read_seq) = read_seq(conn, &key, mid).map_err(failed("reading a read position"))?
    else {
        // A 1:1 conversation's users are its members before its first
        // message too; there is nothing to read yet.
        if conv.is_peer_of(mid) {
            return Ok(ReadPos {
                read_seq: 0,
                max_seq: from_sql("seq", max_seq)?,
                advanced: false,
            });
        }
        return Err(Error::NotMember {
            conv: conv.clone(),
            mid,
        });
    };
    let target = seq.min(max_seq);
    let advanced = target > read_seq && move_read_seq(conn, &key, mid, target)?;
    Ok(ReadPos {
        read_seq: from_sql("seq", read_seq.max(target))?,
        max_seq: from_sql("seq", max_seq)?,
        advanced,
    })
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn put_group(conn: &Connection, conv: &ConvId, spec: &GroupSpec) -> Result<Group> {
    let key = conv.to_string();
    let created = find_group(conn, conv)?.is_none();
    if created {
        let now = now_ms();
        conn.prepare_cached(
            "INSERT INTO groups (conv, name, max_members, members, created_ts, big) \
             VALUES (?1, ?2, ?3, 0, ?4, ?5)",
        )
        .and_then(|mut stmt| stmt.execute(params![key, spec.name, spec.max_members, now, spec.big]))
        .map_err(failed("creating a group"))?;
        // Listed in its members' conversations from the start.
        conn.prepare_cached(
            "INSERT INTO convs (conv, max_seq, last_ts) VALUES (?1, 0, ?2) \
             ON CONFLICT (conv) DO NOTHING",
        )
        .and_then(|mut stmt| stmt.execute(params![key, now]))
        .map_err(failed("creating a group"))?;
    } else {
        // Sticky: a big group stays big (store.rs, `Group::big`).
        conn.prepare_cached(
            "UPDATE groups SET name = ?2, max_members = ?3, big = (big OR ?4) WHERE conv = ?1",
        )
        .and_then(|mut stmt| stmt.execute(params![key, spec.name, spec.max_members, spec.big]))
        .map_err(failed("updating a group"))?;
    }
    let group = find_group(conn, conv)?.ok_or_else(|| {
        Error::Unavailable(StoreFailure::bare("a group vanished while it was written"))
    })?;
    Ok(Group { created, ..group })
}

fn change_members(
    conn: &Connection,
    conv: &ConvId,
    add: &[i64],
    remove: &[i64],
) -> Result<MembersChanged> {
    let Some(group) = find_group(conn, conv)? else {
        return Err(Error::NoSuchGroup { conv: conv.clone() });
    };
    let key = conv.to_string();
    let max_seq = max_seq(conn, &key).map_err(failed("reading a conversation"))?;
    let add: BTreeSet<i64> = add.iter().copied().collect();
    // A mid in both lists ends up a member: it is not removed at all, so an
    // existing member keeps its read position.
    let remove: BTreeSet<i64> = remove
        .iter()
        .copied()
        .filter(|mid| !add.contains(mid))
        .collect();

    let mut removed = Vec::new();
    for &mid in &remove {
        let gone = conn
            .prepare_cached("DELETE FROM members WHERE conv = ?1 AND mid = ?2")
            .and_then(|mut stmt| stmt.execute(params![key, mid]))
            .map_err(failed("removing a member"))?;
        if gone > 0 {
            removed.push(mid);
        }
    }
    let mut added = Vec::new();
    for &mid in &add {
        let new = conn
            .prepare_cached(
                "INSERT INTO members (conv, mid, read_seq) VALUES (?1, ?2, ?3) \
                 ON CONFLICT DO NOTHING",
            )
            .and_then(|mut stmt| stmt.execute(params![key, mid, max_seq]))
            .map_err(failed("adding a member"))?;
        if new > 0 {
            added.push(mid);
        }
    }
    let members: i64 = conn
        .prepare_cached("SELECT count(*) FROM members WHERE conv = ?1")
        .and_then(|mut stmt| stmt.query_row([&key], |row| row.get(0)))
        .map_err(failed("counting members"))?;
    let members = from_sql("member count", members)?;
    if members > u64::from(group.max_members) {
        // The savepoint rolls the whole change back.
        return Err(Error::GroupFull {
            conv: conv.clone(),
            members,
            limit: group.max_members,
        });
    }
    let members = u32::try_from(members)
        .map_err(|_| Error::Unavailable(StoreFailure::bare("a group's member count overflows")))?;
    conn.prepare_cached("UPDATE groups SET members = ?2 WHERE conv = ?1")
        .and_then(|mut stmt| stmt.execute(params![key, members]))
        .map_err(failed("counting members"))?;
    Ok(MembersChanged {
        added,
        removed,
        members,
    })
}
