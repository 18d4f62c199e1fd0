//! The embedded message store: one SQLite file in WAL mode, the default of
//! `rim standalone`.
//!
//! One writer thread owns the write connection and commits writes in
//! batches (group commit, see `writer`); reads run on a small pool of their
//! own connections beside it, which WAL allows. Each read is one read
//! transaction, so a page never mixes two commits.

mod prune;
mod schema;
mod writer;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use rusqlite::types::Type;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, Transaction, params};
use tokio::sync::{mpsc, oneshot};

use crate::conv::ConvId;
use crate::error::{Error, Result, StoreFailure};
use crate::id::{IdGenerator, MessageId};
use crate::message::Draft;
use crate::store::{
    ConvSummary, DEFAULT_SYNC_LIMIT, Group, GroupSpec, MAX_BIG_GROUPS_LIMIT,
    MAX_CONVERSATIONS_LIMIT, MAX_MEMBERS_LIMIT, MAX_PULL_LIMIT, MAX_SYNC_LIMIT, MembersChanged,
    MembersPage, Message, MessageStore, Page, PruneCursor, Pruned, PullPage, ReadPos, Reader,
    Retention, Sent, SyncPage, Synced, clamp_limit,
};

use self::writer::{Done, Op, Request};

/// How hard each commit is pushed to disk (SQLite's `synchronous` in WAL
/// mode).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Synchronous {
    /// Every commit is fsync'd before it is acknowledged: an acknowledged
    /// message survives a power loss.
    #[default]
    Full,
    /// The WAL is fsync'd only at checkpoints: faster, and the file is never
    /// corrupted, but a power loss (not a process crash) may lose the last
    /// acknowledged commits.
    Normal,
}

impl Synchronous {
    fn pragma(self) -> i64 {
        match self {
            Synchronous::Full => 2,
            Synchronous::Normal => 1,
        }
    }
}

/// How a [`SqliteStore`] runs.
#[derive(Clone, Debug)]
pub struct SqliteOptions {
    /// How hard each commit is pushed to disk (default [`Synchronous::Full`]).
    pub synchronous: Synchronous,
    /// How long an operation waits for the file's lock (SQLite's busy
    /// timeout) before it fails with [`Error::Unavailable`] (default 5 s).
    pub timeout: Duration,
    /// The most writes one commit carries (default 256; 0 counts as 1).
    pub max_batch: usize,
    /// Read connections beside the writer (default 4; 0 counts as 1).
    pub readers: usize,
    /// Issues the ids of the messages this store accepts.
    pub ids: Arc<IdGenerator>,
}

impl SqliteOptions {
    /// The defaults, with message ids from `ids`.
    pub fn new(ids: Arc<IdGenerator>) -> SqliteOptions {
        SqliteOptions {
            synchronous: Synchronous::Full,
            timeout: Duration::from_secs(5),
            max_batch: 256,
            readers: 4,
            ids,
        }
    }
}

/// The settings SQLite reports for the write connection, read back at open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pragmas {
    /// `journal_mode` (always `wal`: open refuses anything else).
    pub journal_mode: String,
    /// `synchronous`.
    pub synchronous: Synchronous,
}

/// A [`MessageStore`] in one SQLite file.
#[derive(Debug)]
pub struct SqliteStore {
    /// Writes to the writer thread. Bounded: when it is full, callers wait
    /// for the writer to take a batch.
    writes_tx: mpsc::Sender<Request>,
    readers: Arc<Readers>,
    commits: Arc<AtomicU64>,
    pragmas: Pragmas,
    /// Where retention's sweeps go on.
    prune_cursor: Mutex<PruneCursor>,
}

impl SqliteStore {
    /// Opens (creating it and its parent directories if needed) the store at
    /// `path`, brings its schema to this version, and starts its writer.
    /// A file written by a newer rim is refused with [`Error::Unavailable`].
    pub fn open(path: &Path, options: SqliteOptions) -> Result<SqliteStore> {
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|err| Error::unavailable(format!("creating {}", dir.display()), err))?;
        }
        let shown = path.display().to_string();
        let mut conn = connect(path, &options)?;
        let journal_mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .map_err(failed("setting the SQLite journal mode"))?;
        if !journal_mode.eq_ignore_ascii_case("wal") {
            return Err(Error::Unavailable(StoreFailure::bare(format!(
                "{shown}: SQLite cannot use WAL mode here (it reports journal mode {journal_mode})"
            ))));
        }
        conn.pragma_update(None, "synchronous", options.synchronous.pragma())
            .map_err(failed("setting SQLite's synchronous"))?;
        let synchronous: i64 = conn
            .query_row("PRAGMA synchronous", [], |row| row.get(0))
            .map_err(failed("reading SQLite's synchronous"))?;
        let synchronous = match synchronous {
            2 => Synchronous::Full,
            1 => Synchronous::Normal,
            other => {
                return Err(Error::Unavailable(StoreFailure::bare(format!(
                    "{shown}: SQLite reports synchronous = {other}, asked for {:?}",
                    options.synchronous
                ))));
            }
        };
        schema::migrate(&mut conn, &shown)?;

        let mut readers = Vec::with_capacity(options.readers.max(1));
        for _ in 0..options.readers.max(1) {
            let reader = connect(path, &options)?;
            reader
                .pragma_update(None, "query_only", true)
                .map_err(failed("opening a SQLite read connection"))?;
            readers.push(Mutex::new(reader));
        }

        let max_batch = options.max_batch.max(1);
        let (writes_tx, writes_rx) = mpsc::channel(max_batch.saturating_mul(4));
        let commits = Arc::new(AtomicU64::new(0));
        let writer = writer::Writer::new(conn, options.ids, commits.clone(), max_batch);
        std::thread::Builder::new()
            .name("im-sqlite-writer".into())
            .spawn(move || writer.run(writes_rx))
            .map_err(|err| Error::unavailable("starting the SQLite writer thread", err))?;

        Ok(SqliteStore {
            writes_tx,
            readers: Arc::new(Readers {
                conns: readers,
                next: AtomicUsize::new(0),
            }),
            commits,
            pragmas: Pragmas {
                journal_mode: journal_mode.to_ascii_lowercase(),
                synchronous,
            },
            prune_cursor: Mutex::default(),
        })
    }

    /// Returns the journal mode and synchronous setting SQLite reported for
    /// the write connection.
    pub fn pragmas(&self) -> &Pragmas {
        &self.pragmas
    }

    async fn write(&self, op: Op) -> Result<Done> {
        let (reply_tx, reply_rx) = oneshot::channel();
        self.writes_tx
            .send(Request { op, reply_tx })
            .await
            .map_err(|_| Error::Unavailable(StoreFailure::bare("the SQLite writer has stopped")))?;
        reply_rx.await.map_err(|_| {
            Error::Unavailable(StoreFailure::bare(
                "the SQLite writer stopped before answering",
            ))
        })?
    }

    /// Runs `read` in one read transaction on a pooled connection, off the
    /// async threads.
    async fn read<T, F>(&self, what: &'static str, read: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T> + Send + 'static,
    {
        let readers = self.readers.clone();
        tokio::task::spawn_blocking(move || readers.read(what, read))
            .await
            .map_err(|err| Error::unavailable(what, err))?
    }
}

/// Opens one connection with the settings every connection shares.
fn connect(path: &Path, options: &SqliteOptions) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|err| Error::unavailable(format!("opening {}", path.display()), err))?;
    conn.busy_timeout(options.timeout)
        .map_err(failed("setting SQLite's busy timeout"))?;
    Ok(conn)
}

/// The read connections.
#[derive(Debug)]
struct Readers {
    /// Never empty.
    conns: Vec<Mutex<Connection>>,
    next: AtomicUsize,
}

impl Readers {
    fn read<T>(
        &self,
        what: &'static str,
        read: impl FnOnce(&Transaction<'_>) -> Result<T>,
    ) -> Result<T> {
        let mut conn = match self.conns.iter().find_map(|conn| conn.try_lock()) {
            Some(free) => free,
            None => {
                // All busy: queue on one of them, round robin.
                let at = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len().max(1);
                match self.conns.get(at) {
                    Some(conn) => conn.lock(),
                    None => {
                        return Err(Error::Unavailable(StoreFailure::bare(
                            "no SQLite read connection",
                        )));
                    }
                }
            }
        };
        let tx = conn.transaction().map_err(failed(what))?;
        // Read only: dropping the transaction ends it.
        read(&tx)
    }
}

/// Maps a SQLite error met while doing `what` to code 5.
fn failed(what: &'static str) -> impl Fn(rusqlite::Error) -> Error {
    move |err| Error::unavailable(what, err)
}

/// A seq, sync or position from a request, as SQLite stores it.
fn to_sql(field: &'static str, value: u64) -> Result<i64> {
    i64::try_from(value)
        .map_err(|_| Error::invalid(field, format!("{value} is above the largest stored value")))
}

/// A stored seq, sync or count, which is never negative.
fn from_sql(what: &'static str, value: i64) -> Result<u64> {
    u64::try_from(value).map_err(|_| {
        Error::Unavailable(StoreFailure::bare(format!(
            "the SQLite file holds a negative {what}: {value}"
        )))
    })
}

/// Reads a seq, sync or id from column `at`: never negative.
fn unsigned_at(row: &Row<'_>, at: usize) -> rusqlite::Result<u64> {
    let value: i64 = row.get(at)?;
    u64::try_from(value).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(at, value))
}

/// Reads a conversation id from column `at`.
fn conv_at(row: &Row<'_>, at: usize) -> rusqlite::Result<ConvId> {
    let text: String = row.get(at)?;
    text.parse().map_err(|err: Error| {
        rusqlite::Error::FromSqlConversionFailure(at, Type::Text, Box::new(err))
    })
}

/// The message columns, in the order [`message_at`] reads them.
const MESSAGE_COLUMNS: &str = "seq, id, sender, cmid, kind, body, ts";

/// Reads a message of `conv` from [`MESSAGE_COLUMNS`] starting at column `at`.
fn message_at(conv: ConvId, row: &Row<'_>, at: usize) -> rusqlite::Result<Message> {
    Ok(Message {
        conv,
        seq: unsigned_at(row, at)?,
        id: MessageId::from_u64(unsigned_at(row, at + 1)?),
        from: row.get(at + 2)?,
        cmid: row.get(at + 3)?,
        kind: row.get(at + 4)?,
        body: row.get(at + 5)?,
        ts: row.get(at + 6)?,
    })
}

/// Returns the conversation's latest seq (0 when it has no messages).
fn max_seq(conn: &Connection, conv: &str) -> rusqlite::Result<i64> {
    Ok(conn
        .prepare_cached("SELECT max_seq FROM convs WHERE conv = ?1")?
        .query_row([conv], |row| row.get(0))
        .optional()?
        .unwrap_or(0))
}

/// Returns `conv`'s latest seq and its oldest retained one ((0, 1) when it
/// has no row).
fn bounds(conn: &Connection, conv: &str) -> rusqlite::Result<(i64, i64)> {
    Ok(conn
        .prepare_cached("SELECT max_seq, min_seq FROM convs WHERE conv = ?1")?
        .query_row([conv], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?
        .unwrap_or((0, 1)))
}

/// Returns `mid`'s read position in `conv`, or None when not a member.
fn read_seq(conn: &Connection, conv: &str, mid: i64) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached("SELECT read_seq FROM members WHERE conv = ?1 AND mid = ?2")?
        .query_row(params![conv, mid], |row| row.get(0))
        .optional()
}

/// Returns the stored group, if it exists.
fn find_group(conn: &Connection, conv: &ConvId) -> Result<Option<Group>> {
    let ConvId::Group(_) = conv else {
        return Ok(None);
    };
    conn.prepare_cached("SELECT name, max_members, members, big FROM groups WHERE conv = ?1")
        .and_then(|mut stmt| {
            stmt.query_row([conv.to_string()], |row| {
                Ok(Group {
                    conv: conv.clone(),
                    name: row.get(0)?,
                    max_members: row.get(1)?,
                    members: row.get(2)?,
                    big: row.get(3)?,
                    created: false,
                })
            })
            .optional()
        })
        .map_err(failed("reading a group"))
}

#[async_trait]
impl MessageStore for SqliteStore {
    async fn send(&self, draft: Draft) -> Result<Sent> {
        match self.write(Op::Send(draft)).await? {
            Done::Sent(sent) => Ok(sent),
            other => Err(other.mismatch()),
        }
    }

    async fn sync(&self, mid: i64, after: u64, limit: u32) -> Result<SyncPage> {
        let after = to_sql("sync", after)?;
        let limit = clamp_limit(limit, DEFAULT_SYNC_LIMIT, MAX_SYNC_LIMIT);
        self.read("reading an inbox", move |tx| {
            let (latest, oldest): (i64, i64) = tx
                .prepare_cached("SELECT max_sync, min_sync FROM users WHERE mid = ?1")
                .and_then(|mut stmt| {
                    stmt.query_row([mid], |row| Ok((row.get(0)?, row.get(1)?)))
                        .optional()
                })
                .map_err(failed("reading an inbox"))?
                .unwrap_or((0, 1));
            // An entry whose message retention removed comes back without
            // it (m.seq NULL) and is skipped.
            let rows = tx
                .prepare_cached(
                    "SELECT i.sync, i.conv, m.seq, m.id, m.sender, m.cmid, m.kind, m.body, m.ts \
                     FROM inbox i \
                     LEFT JOIN messages m ON m.conv = i.conv AND m.seq = i.seq \
                     WHERE i.mid = ?1 AND i.sync > ?2 ORDER BY i.sync LIMIT ?3",
                )
                .and_then(|mut stmt| {
                    stmt.query_map(params![mid, after, limit], |row| {
                        let sync = unsigned_at(row, 0)?;
                        let kept: Option<i64> = row.get(2)?;
                        Ok(match kept {
                            Some(_) => Ok(Synced {
                                sync,
                                message: message_at(conv_at(row, 1)?, row, 2)?,
                            }),
                            None => Err(sync),
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(failed("reading an inbox"))?;
            let mut pruned = false;
            let mut last = None;
            let mut entries = Vec::with_capacity(rows.len());
            for row in rows {
                match row {
                    Ok(entry) => {
                        last = Some(entry.sync);
                        entries.push(entry);
                    }
                    Err(sync) => {
                        last = Some(sync);
                        pruned = true;
                    }
                }
            }
            let sync = match last {
                Some(last) => last,
                None => from_sql("sync", after.min(latest))?,
            };
            Ok(SyncPage {
                more: sync < from_sql("sync", latest)?,
                entries,
                sync,
                reset: pruned || after.saturating_add(1) < oldest,
            })
        })
        .await
    }

    async fn prune(&self, retention: &Retention, budget: u32) -> Result<Pruned> {
        let cursor = self.prune_cursor.lock().clone();
        let op = Op::Prune {
            retention: *retention,
            budget: u64::from(budget),
            cursor,
        };
        match self.write(op).await? {
            Done::Pruned(pruned, cursor) => {
                *self.prune_cursor.lock() = cursor;
                Ok(pruned)
            }
            other => Err(other.mismatch()),
        }
    }

    async fn inbox_heads(&self, mids: &[i64]) -> Result<Vec<u64>> {
        let mids = mids.to_vec();
        self.read("reading inbox heads", move |tx| {
            let mut stmt = tx
                .prepare_cached("SELECT max_sync FROM users WHERE mid = ?1")
                .map_err(failed("reading inbox heads"))?;
            mids.iter()
                .map(|mid| {
                    let head: Option<i64> = stmt
                        .query_row([mid], |row| row.get(0))
                        .optional()
                        .map_err(failed("reading inbox heads"))?;
                    from_sql("sync", head.unwrap_or(0))
                })
                .collect()
        })
        .await
    }

    async fn pull(
        &self,
        conv: &ConvId,
        reader: Reader,
        page: Page,
        limit: u32,
    ) -> Result<PullPage> {
        let limit = clamp_limit(limit, MAX_PULL_LIMIT, MAX_PULL_LIMIT);
        const AFTER: &str = "seq > ?2 ORDER BY seq ASC";
        let (clause, bound) = match page {
            Page::Before(seq) => ("seq < ?2 ORDER BY seq DESC", to_sql("before", seq)?),
            Page::After(seq) => (AFTER, to_sql("after", seq)?),
            Page::Latest => ("seq <= ?2 ORDER BY seq DESC", i64::MAX),
        };
        let conv = conv.clone();
        self.read("reading a conversation's history", move |tx| {
            let key = conv.to_string();
            if let Reader::Member(mid) = reader {
                let member = conv.is_peer_of(mid)
                    || read_seq(tx, &key, mid)
                        .map_err(failed("checking membership"))?
                        .is_some();
                if !member {
                    return Err(Error::NotMember { conv, mid });
                }
            }
            let (max_seq, min_seq) = bounds(tx, &key).map_err(failed("reading a conversation"))?;
            // Below the floor nothing is left: the page starts at it (an
            // `after` below it finds the floor's rows by itself).
            let reset = match page {
                Page::Before(_) => bound > 1 && bound <= min_seq,
                Page::After(_) => bound.saturating_add(1) < min_seq,
                Page::Latest => false,
            };
            let (clause, bound) = if reset && matches!(page, Page::Before(_)) {
                (AFTER, min_seq - 1)
            } else {
                (clause, bound)
            };
            let messages = tx
                .prepare_cached(&format!(
                    "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conv = ?1 AND {clause} LIMIT ?3"
                ))
                .and_then(|mut stmt| {
                    stmt.query_map(params![key, bound, limit], |row| {
                        message_at(conv.clone(), row, 0)
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(failed("reading a conversation's history"))?;
            Ok(PullPage {
                messages,
                max_seq: from_sql("seq", max_seq)?,
                min_seq: from_sql("seq", min_seq)?,
                reset,
            })
        })
        .await
    }

    async fn read(&self, conv: &ConvId, mid: i64, seq: u64) -> Result<ReadPos> {
        let seq = to_sql("seq", seq)?;
        match self
            .write(Op::Read {
                conv: conv.clone(),
                mid,
                seq,
            })
            .await?
        {
            Done::Read(pos) => Ok(pos),
            other => Err(other.mismatch()),
        }
    }

    async fn conversations(&self, mid: i64, limit: u32) -> Result<Vec<ConvSummary>> {
        let limit = clamp_limit(limit, MAX_CONVERSATIONS_LIMIT, MAX_CONVERSATIONS_LIMIT);
        self.read("listing conversations", move |tx| {
            let rows = tx
                .prepare_cached(
                    "SELECT m.conv, c.max_seq, m.read_seq, \
                     g.seq, g.id, g.sender, g.cmid, g.kind, g.body, g.ts \
                     FROM members m JOIN convs c ON c.conv = m.conv \
                     LEFT JOIN messages g ON g.conv = m.conv AND g.seq = c.max_seq \
                     WHERE m.mid = ?1 ORDER BY c.last_ts DESC, m.conv LIMIT ?2",
                )
                .and_then(|mut stmt| {
                    stmt.query_map(params![mid, limit], |row| {
                        let conv = conv_at(row, 0)?;
                        let max_seq: i64 = row.get(1)?;
                        let read_seq: i64 = row.get(2)?;
                        let last = match row.get::<_, Option<i64>>(3)? {
                            Some(_) => Some(message_at(conv.clone(), row, 3)?),
                            None => None,
                        };
                        Ok((conv, max_seq, read_seq, last))
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(failed("listing conversations"))?;
            rows.into_iter()
                .map(|(conv, max_seq, read_seq, last)| {
                    let (max_seq, read_seq) =
                        (from_sql("seq", max_seq)?, from_sql("seq", read_seq)?);
                    Ok(ConvSummary {
                        conv,
                        max_seq,
                        read_seq,
                        unread: max_seq.saturating_sub(read_seq),
                        last,
                    })
                })
                .collect()
        })
        .await
    }

    async fn put_group(&self, conv: &ConvId, spec: GroupSpec) -> Result<Group> {
        if !matches!(conv, ConvId::Group(_)) {
            return Err(Error::invalid("conv", format!("{conv} is not a group")));
        }
        match self
            .write(Op::PutGroup {
                conv: conv.clone(),
                spec,
            })
            .await?
        {
            Done::Group(group) => Ok(group),
            other => Err(other.mismatch()),
        }
    }

    async fn change_members(
        &self,
        conv: &ConvId,
        add: &[i64],
        remove: &[i64],
    ) -> Result<MembersChanged> {
        if !matches!(conv, ConvId::Group(_)) {
            return Err(Error::NoSuchGroup { conv: conv.clone() });
        }
        match self
            .write(Op::ChangeMembers {
                conv: conv.clone(),
                add: add.to_vec(),
                remove: remove.to_vec(),
            })
            .await?
        {
            Done::Members(changed) => Ok(changed),
            other => Err(other.mismatch()),
        }
    }

    async fn members(&self, conv: &ConvId, after: Option<i64>, limit: u32) -> Result<MembersPage> {
        let limit = clamp_limit(limit, MAX_MEMBERS_LIMIT, MAX_MEMBERS_LIMIT);
        let conv = conv.clone();
        self.read("listing members", move |tx| {
            if find_group(tx, &conv)?.is_none() {
                return Err(Error::NoSuchGroup { conv });
            }
            let mut mids = tx
                .prepare_cached(
                    "SELECT mid FROM members WHERE conv = ?1 AND (?2 IS NULL OR mid > ?2) \
                     ORDER BY mid LIMIT ?3",
                )
                .and_then(|mut stmt| {
                    stmt.query_map(
                        params![conv.to_string(), after, i64::from(limit) + 1],
                        |row| row.get(0),
                    )?
                    .collect::<rusqlite::Result<Vec<i64>>>()
                })
                .map_err(failed("listing members"))?;
            let more = mids.len() > limit as usize;
            mids.truncate(limit as usize);
            Ok(MembersPage {
                next: if more { mids.last().copied() } else { None },
                mids,
            })
        })
        .await
    }

    async fn group(&self, conv: &ConvId) -> Result<Group> {
        let conv = conv.clone();
        self.read("reading a group", move |tx| {
            find_group(tx, &conv)?.ok_or(Error::NoSuchGroup { conv })
        })
        .await
    }

    async fn big_groups(&self, mid: i64, limit: u32) -> Result<Vec<ConvId>> {
        let limit = clamp_limit(limit, MAX_BIG_GROUPS_LIMIT, MAX_BIG_GROUPS_LIMIT);
        self.read("listing big groups", move |tx| {
            // The user's group memberships are one range of
            // members_by_mid ("g:" up to "g;", ':' + 1: group ids sort
            // ahead of pairs), in conversation order; each is checked
            // against its group's primary key.
            tx.prepare_cached(
                "SELECT m.conv FROM members m JOIN groups g ON g.conv = m.conv \
                 WHERE m.mid = ?1 AND m.conv >= 'g:' AND m.conv < 'g;' AND g.big \
                 ORDER BY m.conv LIMIT ?2",
            )
            .and_then(|mut stmt| {
                stmt.query_map(params![mid, limit], |row| conv_at(row, 0))?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(failed("listing big groups"))
        })
        .await
    }

    fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }
}
