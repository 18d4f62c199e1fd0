//! The PostgreSQL message store: the cluster backend of im.md, Storage.
//!
//! Sends go through a batcher ([`batch`]): whatever is queued, up to
//! `max_batch`, is stored in one transaction with one commit, and several
//! batches may be in flight on different pooled connections. Several rim
//! processes may write the same database: every transaction takes its row
//! locks in one order (the conversations' `convs` rows sorted by id, then
//! the `users` rows sorted by mid), so they cannot deadlock one another;
//! a batch that still meets a deadlock or serialization failure is retried
//! whole a bounded number of times. Seq and sync numbers are assigned in
//! the transaction that stores the rows, so a rollback or a crash gives
//! them back: no hole and no reuse. Reads, read positions and group
//! changes run on the pool directly. The schema is versioned ([`schema`]).
//!
//! A send is answered once PostgreSQL has confirmed its batch's commit:
//! durable as the server's `synchronous_commit` says (`on` by default: in
//! the WAL on disk; with synchronous standbys, on them too). A batch whose
//! connection is lost before the commit runs again on another connection;
//! one lost during the commit is answered `Unavailable`, as its outcome is
//! unknown: the sender's resend with the same cmid then finds it stored
//! (`duplicate`) or stores it.
//!
//! Failover: the url may list the primary and its standbys with
//! `target_session_attrs=read-write`. When the primary is lost, its pooled
//! connections are closed and the pool drops them (the `Fast` recycling
//! checks `is_closed`), new ones skip the read-only standbys, so calls
//! fail with `Unavailable` within the store timeout, nothing half-stored,
//! until a standby is promoted; then new connections, and the message-id
//! node's lock ([`node`]), land on it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;

use crate::conv::ConvId;
use crate::error::{Error, Result};
use crate::id::{IdGenerator, MessageId};
use crate::message::Draft;
use crate::shard::ShardMap;
use crate::store::{
    ConvSummary, DEFAULT_SYNC_LIMIT, Group, GroupSpec, MAX_BIG_GROUPS_LIMIT,
    MAX_CONVERSATIONS_LIMIT, MAX_MEMBERS_LIMIT, MAX_PULL_LIMIT, MAX_SYNC_LIMIT, MembersChanged,
    MembersPage, Message, MessageStore, Page, PruneCursor, Pruned, PullPage, ReadPos, Reader,
    Retention, Sent, SyncPage, Synced, clamp_limit,
};

/// The pooled connections a [`PostgresStore`] opens by default.
const DEFAULT_POOL_SIZE: usize = 8;
/// The store timeout by default.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// The most sends one batch carries by default.
const DEFAULT_MAX_BATCH: usize = 256;
/// Send batches in flight at once at most (each on its own connection).
const MAX_BATCHES_IN_FLIGHT: usize = 4;

/// How to reach and use a PostgreSQL database.
#[derive(Clone)]
pub struct PostgresOptions {
    /// The connection string, `postgres://user[:password]@host:port/db`; it
    /// may carry `options=-csearch_path%3D<schema>` to keep rim's tables in
    /// a schema of their own. It may name a primary and its standbys,
    /// `postgres://user@primary:5432,standby:5432/db?target_session_attrs=read-write`
    /// (required with several hosts): every new connection tries them in
    /// order and keeps the first that takes writes, so after a standby is
    /// promoted the store reaches it without a restart.
    pub url: String,
    /// How many connections the store's pool opens at most, shared by the
    /// send batches and everything else (default 8).
    pub pool_size: usize,
    /// The store timeout (default 5 s): each statement's `statement_timeout`
    /// and `lock_timeout` on the server, the longest wait for a pooled
    /// connection or a place in the send queue, and half the longest a
    /// whole transaction may take before its connection is abandoned. Past
    /// it the call fails with [`Error::Unavailable`] and stores nothing.
    pub timeout: Duration,
    /// The most sends stored by one transaction (default 256).
    pub max_batch: usize,
    /// Issues the ids (and so the accept times) of stored messages. Its
    /// node is locked in the database for the store's lifetime (so no two
    /// processes writing to one database issue the same ids); when another
    /// process holds it, the store takes the next free node and switches
    /// the generator to it, unless `exact_node`.
    pub ids: Arc<IdGenerator>,
    /// The generator's node was configured (`im.node`): refuse to open when
    /// another process holds it, rather than taking another.
    pub exact_node: bool,
    /// This database is primary `.1` of a store sharded by `.0`
    /// ([`ShardedStore`](crate::ShardedStore)): a send's inbox entries for
    /// members whose inbox is on another primary go to this primary's
    /// outbox, and retention leaves inboxes alone (their messages may be
    /// elsewhere). `None`: a store of its own.
    pub shard: Option<(Arc<ShardMap>, usize)>,
}

impl PostgresOptions {
    /// Options for `url` with the default pool size, timeout and batch size.
    pub fn new(url: impl Into<String>, ids: Arc<IdGenerator>) -> PostgresOptions {
        PostgresOptions {
            url: url.into(),
            pool_size: DEFAULT_POOL_SIZE,
            timeout: DEFAULT_TIMEOUT,
            max_batch: DEFAULT_MAX_BATCH,
            ids,
            exact_node: false,
            shard: None,
        }
    }
}

/// A [`MessageStore`] on PostgreSQL.
pub struct PostgresStore {
    shared: Arc<Shared>,
    /// Sends waiting for a batch; bounded: when full, a send waits up to the
    /// store timeout for room and then fails with `Unavailable`.
    send_tx: mpsc::Sender<batch::Job>,
    /// Where retention's sweeps go on.
    prune_cursor: parking_lot::Mutex<PruneCursor>,
}

/// What the store's calls and its batcher share.
struct Shared {
    pool: Pool,
    ids: Arc<IdGenerator>,
    /// The lock on the generator's node.
    node: node::NodeHold,
    timeout: Duration,
    /// How many times a send batch runs at most when it meets a deadlock,
    /// a serialization failure or a lost connection: enough to get past
    /// every pooled connection a server restart left dead.
    attempts: usize,
    commits: AtomicU64,
    /// Set when this database is one primary of a sharded store.
    shard: Option<(Arc<ShardMap>, usize)>,
}

impl Shared {
    /// Whether `mid`'s inbox is in this database.
    fn holds_inbox(&self, mid: i64) -> bool {
        self.shard
            .as_ref()
            .is_none_or(|(map, me)| map.mid_shard(mid) == *me)
    }
}

impl PostgresStore {
    /// Connects to the database, applies the schema migrations this rim
    /// knows (refusing a database whose schema is newer) and starts the
    /// send batcher.
    pub async fn connect(options: PostgresOptions) -> Result<PostgresStore> {
        if options.pool_size == 0 {
            return Err(Error::invalid(
                "pool_size",
                "the pool needs 1 connection or more",
            ));
        }
        if options.max_batch == 0 {
            return Err(Error::invalid(
                "max_batch",
                "a batch carries 1 send or more",
            ));
        }
        let timeout_ms = options.timeout.as_millis();
        if timeout_ms == 0 {
            return Err(Error::invalid(
                "timeout",
                "the store timeout is 1 ms or more",
            ));
        }
        let mut config: tokio_postgres::Config = options.url.parse().map_err(|e| {
            Error::invalid("url", format!("not a PostgreSQL connection string: {e}"))
        })?;
        primary_only(&config)?;
        // Session settings ride on the startup packet, after any the url
        // carries (a search_path), so every pooled connection has them.
        // Every statement of the store is a key lookup or a range of an
        // index. A plan chosen while a table was small (a scan of the whole
        // table is then cheapest) must not stay cached while the table
        // grows until its next ANALYZE — the cluster benchmark saw the
        // dedup lookup scan `messages` a thousand times, tens of thousands
        // of rows each — so scans are ruled out where an index serves, and
        // with that the statements keep one generic plan, sparing the
        // planning of every execution (a fifth of PostgreSQL's CPU).
        let timeout_ms = timeout_ms.min(i32::MAX as u128);
        let settings = format!(
            "-c enable_seqscan=off -c plan_cache_mode=force_generic_plan \
             -c statement_timeout={timeout_ms} -c lock_timeout={timeout_ms} \
             -c idle_in_transaction_session_timeout={}",
            timeout_ms.saturating_mul(4).min(i32::MAX as u128)
        );
        let startup = match config.get_options() {
            Some(from_url) if !from_url.trim().is_empty() => format!("{from_url} {settings}"),
            _ => settings,
        };
        config.options(startup);
        config.connect_timeout(options.timeout);
        detect_dead_peers(&mut config, options.timeout);
        if config.get_application_name().is_none() {
            config.application_name("rim-im");
        }
        let manager = Manager::from_config(
            config.clone(),
            tokio_postgres::NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size)
            .wait_timeout(Some(options.timeout))
            .create_timeout(Some(options.timeout))
            .recycle_timeout(Some(options.timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| Error::unavailable("building the connection pool", e))?;
        let shared = Arc::new(Shared {
            pool,
            node: node::NodeHold::take(
                config,
                Arc::clone(&options.ids),
                options.exact_node,
                options.timeout,
            )
            .await?,
            ids: options.ids,
            timeout: options.timeout,
            attempts: options.pool_size.saturating_add(2),
            commits: AtomicU64::new(0),
            shard: options.shard,
        });
        schema::migrate(&shared).await?;
        let in_flight = (options.pool_size / 2).clamp(1, MAX_BATCHES_IN_FLIGHT);
        let (send_tx, send_rx) = mpsc::channel(options.max_batch.saturating_mul(4));
        tokio::spawn(batch::run(
            shared.clone(),
            send_rx,
            options.max_batch,
            in_flight,
        ));
        Ok(PostgresStore {
            shared,
            send_tx,
            prune_cursor: parking_lot::Mutex::default(),
        })
    }
}

impl Shared {
    /// Takes a pooled connection, waiting at most the store timeout.
    async fn client(&self, what: &'static str) -> Result<Object> {
        self.pool
            .get()
            .await
            .map_err(|e| Error::unavailable(format!("getting a connection for {what}"), e))
    }

    /// The longest a transaction or a read may take on its connection:
    /// twice the store timeout (the server bounds each statement at once
    /// the timeout; this bounds a connection that stopped answering).
    fn bound(&self) -> Duration {
        self.timeout.saturating_mul(2)
    }

    /// Gives `client` back to the pool, or closes it when the work on it
    /// overran [`Shared::bound`].
    fn settle<T>(
        &self,
        what: &'static str,
        client: Object,
        outcome: Result<Result<T>, tokio::time::error::Elapsed>,
    ) -> Result<T> {
        match outcome {
            Ok(result) => result,
            Err(elapsed) => {
                drop(Object::take(client));
                Err(Error::unavailable(format!("{what} timed out"), elapsed))
            }
        }
    }

    fn committed(&self) {
        self.commits.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs `$body` with `$client` bound to a pooled connection, bounded by
/// [`Shared::bound`]; `return` in the body leaves the body only.
macro_rules! with_client {
    ($shared:expr, $what:expr, |$client:ident| $body:block) => {{
        let shared: &Shared = &$shared;
        let mut conn = shared.client($what).await?;
        let outcome = tokio::time::timeout(shared.bound(), async {
            let $client = &mut conn;
            $body
        })
        .await;
        shared.settle($what, conn, outcome)
    }};
}

mod batch;
mod node;
mod prune;
mod remote;
mod schema;

pub(crate) use remote::{InboxKeys, Owed};

/// Refuses a connection string that could connect to a standby: one
/// that names several hosts (a primary and its standbys, tried in order)
/// must ask for `target_session_attrs=read-write`, so that every
/// connection — the pool's and the message-id node's — skips a read-only
/// standby and reaches whichever host is the primary now; and none may ask
/// for `read-only`.
fn primary_only(config: &tokio_postgres::Config) -> Result<()> {
    use tokio_postgres::config::TargetSessionAttrs;
    let hosts = config.get_hosts().len().max(config.get_hostaddrs().len());
    match config.get_target_session_attrs() {
        TargetSessionAttrs::ReadWrite => Ok(()),
        TargetSessionAttrs::Any if hosts <= 1 => Ok(()),
        TargetSessionAttrs::Any => Err(Error::invalid(
            "url",
            format!(
                "names {hosts} hosts but not target_session_attrs=read-write: \
                 a connection could land on a read-only standby"
            ),
        )),
        _ => Err(Error::invalid(
            "url",
            "the store writes: target_session_attrs must be read-write (or unset with one host)",
        )),
    }
}

/// Linux's TCP keepalive default: the first probe after two hours idle.
const KERNEL_KEEPALIVE_IDLE: Duration = Duration::from_secs(2 * 60 * 60);

/// Makes a connection to a server that vanished without closing it (a
/// machine powered off, a network partition) end within seconds rather
/// than hours, unless the url chose otherwise: an idle connection is
/// probed after the store timeout, every second, and given up after three
/// unanswered probes; data unacknowledged for twice the store timeout ends
/// it too. The message-id node's connection is idle while it holds the
/// lock: without this, after a failover it would look held on a server
/// nobody writes to any more, while sends go on against the new primary.
fn detect_dead_peers(config: &mut tokio_postgres::Config, timeout: Duration) {
    if config.get_keepalives()
        && config.get_keepalives_idle() == KERNEL_KEEPALIVE_IDLE
        && config.get_keepalives_interval().is_none()
        && config.get_keepalives_retries().is_none()
    {
        // TCP counts these in whole seconds.
        config.keepalives_idle(timeout.max(Duration::from_secs(1)));
        config.keepalives_interval(Duration::from_secs(1));
        config.keepalives_retries(3);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(timeout.saturating_mul(2).max(Duration::from_secs(1)));
    }
}

/// Maps a database error to [`Error::Unavailable`] saying what failed.
fn db(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> Error {
    move |e| Error::unavailable(what, e)
}

/// Returns whether a failed transaction may simply be run again: a
/// deadlock or serialization failure, or a connection lost before the
/// commit was asked for.
fn retryable(err: &Error, committing: bool) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cause {
        if let Some(pg) = e.downcast_ref::<tokio_postgres::Error>() {
            let code = pg.code();
            if code == Some(&SqlState::T_R_DEADLOCK_DETECTED)
                || code == Some(&SqlState::T_R_SERIALIZATION_FAILURE)
            {
                return true;
            }
            // The connection is gone (closed, or the server ended the
            // session: 57P01-03 shutdowns, 08 connection exceptions): safe
            // to run again elsewhere unless the commit may have happened.
            let lost = pg.is_closed()
                || code.is_some_and(|c| {
                    c == &SqlState::ADMIN_SHUTDOWN
                        || c == &SqlState::CRASH_SHUTDOWN
                        || c == &SqlState::CANNOT_CONNECT_NOW
                        || c.code().starts_with("08")
                });
            return lost && !committing;
        }
        cause = e.source();
    }
    false
}

/// A seq, sync or position from a caller as a BIGINT.
/// One page of `mid`'s inbox after `after` by `page_sql` ($1 the mid, $2
/// the sync after which, $3 how many rows), with the user's bounds: at most
/// `limit` rows, whether more follow, the latest sync (0 without any) and
/// the oldest retained (1 while nothing was pruned).
async fn inbox_page(
    client: &Object,
    page_sql: &str,
    mid: i64,
    after: u64,
    limit: u32,
) -> Result<(Vec<Row>, bool, u64, u64)> {
    let after_db = to_db("sync", after)?;
    let fetch = limit_db(limit) + 1;
    let (page, bounds) = tokio::try_join!(
        client.prepare_cached(page_sql),
        client.prepare_cached("SELECT max_sync, min_sync FROM users WHERE mid = $1"),
    )
    .map_err(db("preparing an inbox read"))?;
    let (mut rows, bounds) = tokio::try_join!(
        async { client.query(&page, &[&mid, &after_db, &fetch]).await },
        async { client.query_opt(&bounds, &[&mid]).await },
    )
    .map_err(db("reading an inbox"))?;
    let (latest, oldest) = match bounds {
        Some(row) => (
            from_db("a sync", get(&row, 0)?)?,
            from_db("a sync", get(&row, 1)?)?,
        ),
        None => (0, 1),
    };
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    Ok((rows, more, latest, oldest))
}

fn to_db(field: &'static str, value: u64) -> Result<i64> {
    i64::try_from(value)
        .map_err(|_| Error::invalid(field, format!("{value} is over the largest, {}", i64::MAX)))
}

/// A limit as a BIGINT (a u32 always fits).
fn limit_db(limit: u32) -> i64 {
    i64::from(limit)
}

/// A BIGINT the store wrote as a seq, sync or position, back as a u64.
fn from_db(what: &'static str, value: i64) -> Result<u64> {
    u64::try_from(value).map_err(|e| {
        Error::unavailable(
            format!("{what} read back as {value}: the database is damaged"),
            e,
        )
    })
}

fn get<'r, T: tokio_postgres::types::FromSql<'r>>(row: &'r Row, at: usize) -> Result<T> {
    row.try_get(at).map_err(db("reading a row"))
}

fn conv_from_db(text: &str) -> Result<ConvId> {
    text.parse::<ConvId>()
        .map_err(|e| Error::unavailable("reading a conversation id: the database is damaged", e))
}

/// The columns [`message_at`] reads, from a table aliased `m`.
const MESSAGE_COLUMNS: &str = "m.conv, m.seq, m.id, m.sender, m.cmid, m.kind, m.body, m.ts";

/// Reads the eight [`MESSAGE_COLUMNS`] starting at column `at`.
fn message_at(row: &Row, at: usize) -> Result<Message> {
    let conv: &str = get(row, at)?;
    let id: i64 = get(row, at + 2)?;
    Ok(Message {
        conv: conv_from_db(conv)?,
        seq: from_db("a seq", get(row, at + 1)?)?,
        id: MessageId::from_u64(from_db("a message id", id)?),
        from: get(row, at + 3)?,
        cmid: get(row, at + 4)?,
        kind: get(row, at + 5)?,
        body: get(row, at + 6)?,
        ts: get(row, at + 7)?,
    })
}

/// Refuses a conversation that is not a group.
fn group_id(conv: &ConvId) -> Result<String> {
    match conv {
        ConvId::Group(_) => Ok(conv.to_string()),
        ConvId::Peer { .. } => Err(Error::NoSuchGroup { conv: conv.clone() }),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[async_trait]
impl MessageStore for PostgresStore {
    async fn send(&self, draft: Draft) -> Result<Sent> {
        // Checked here, not in the batch: a row PostgreSQL refuses would
        // fail every other send of its batch.
        if draft.body.contains('\0') {
            return Err(Error::invalid(
                "body",
                "a body has no NUL character (U+0000)",
            ));
        }
        if draft.cmid.contains('\0') {
            return Err(Error::invalid("cmid", "a cmid has no control characters"));
        }
        if matches!(draft.conv, ConvId::Peer { .. })
            && !draft.system
            && !draft.conv.is_peer_of(draft.from)
        {
            return Err(Error::NotMember {
                conv: draft.conv,
                mid: draft.from,
            });
        }
        let (reply_tx, reply_rx) = oneshot::channel();
        let job = batch::Job {
            draft,
            reply_tx,
            asked: tokio::time::Instant::now(),
        };
        match tokio::time::timeout(self.shared.timeout, self.send_tx.send(job)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                return Err(Error::Unavailable(crate::StoreFailure::bare(
                    "the store's send batcher has stopped",
                )));
            }
            Err(elapsed) => {
                return Err(Error::unavailable(
                    "waiting for room in the store's send queue",
                    elapsed,
                ));
            }
        }
        reply_rx
            .await
            .map_err(|e| Error::unavailable("waiting for the send's batch", e))?
    }

    async fn sync(&self, mid: i64, after: u64, limit: u32) -> Result<SyncPage> {
        let limit = clamp_limit(limit, DEFAULT_SYNC_LIMIT, MAX_SYNC_LIMIT);
        with_client!(self.shared, "reading an inbox", |client| {
            // An entry whose message retention removed comes back without
            // it (m.conv NULL) and is skipped.
            let page_sql = format!(
                "SELECT i.sync, {MESSAGE_COLUMNS} FROM inbox i \
                     LEFT JOIN messages m ON m.conv = i.conv AND m.seq = i.seq \
                     WHERE i.mid = $1 AND i.sync > $2 ORDER BY i.sync LIMIT $3"
            );
            let (rows, more, latest, oldest) =
                inbox_page(client, &page_sql, mid, after, limit).await?;
            let mut entries = Vec::with_capacity(rows.len());
            let mut last = None;
            let mut pruned = false;
            for row in &rows {
                let sync = from_db("a sync", get(row, 0)?)?;
                last = Some(sync);
                if get::<Option<&str>>(row, 1)?.is_none() {
                    pruned = true;
                    continue;
                }
                entries.push(Synced {
                    sync,
                    message: message_at(row, 1)?,
                });
            }
            Ok(SyncPage {
                entries,
                sync: last.unwrap_or_else(|| after.min(latest)),
                more,
                reset: pruned || after.saturating_add(1) < oldest,
            })
        })
    }

    async fn prune(&self, retention: &Retention, budget: u32) -> Result<Pruned> {
        let mut cursor = self.prune_cursor.lock().clone();
        let inboxes = self.shared.shard.is_none();
        let outcome = with_client!(self.shared, "pruning", |client| {
            prune::step(client, retention, u64::from(budget), &mut cursor, inboxes).await
        });
        *self.prune_cursor.lock() = cursor;
        outcome
    }

    async fn inbox_heads(&self, mids: &[i64]) -> Result<Vec<u64>> {
        with_client!(self.shared, "reading inbox heads", |client| {
            let heads = client
                .prepare_cached("SELECT mid, max_sync FROM users WHERE mid = ANY($1)")
                .await
                .map_err(db("preparing an inbox heads read"))?;
            let mut found = HashMap::with_capacity(mids.len());
            for row in client
                .query(&heads, &[&mids])
                .await
                .map_err(db("reading inbox heads"))?
            {
                let mid: i64 = get(&row, 0)?;
                found.insert(mid, from_db("a sync", get(&row, 1)?)?);
            }
            Ok(mids
                .iter()
                .map(|mid| found.get(mid).copied().unwrap_or(0))
                .collect())
        })
    }

    async fn pull(
        &self,
        conv: &ConvId,
        reader: Reader,
        page: Page,
        limit: u32,
    ) -> Result<PullPage> {
        let conv_text = conv.to_string();
        let conv = conv.clone();
        let limit = limit_db(clamp_limit(limit, MAX_PULL_LIMIT, MAX_PULL_LIMIT));
        let after_sql = "seq > $2 AND seq <= $3 ORDER BY seq";
        let (sql, bound) = match page {
            Page::Before(seq) => (
                "seq < $2 AND seq <= $3 ORDER BY seq DESC",
                to_db("before", seq)?,
            ),
            Page::After(seq) => (after_sql, to_db("after", seq)?),
            Page::Latest => ("seq > $2 AND seq <= $3 ORDER BY seq DESC", 0),
        };
        with_client!(self.shared, "reading history", |client| {
            let head = client
                .prepare_cached(
                    "SELECT (SELECT max_seq FROM convs WHERE conv = $1), \
                         EXISTS (SELECT 1 FROM members WHERE conv = $1 AND mid = $2), \
                         (SELECT min_seq FROM convs WHERE conv = $1)",
                )
                .await
                .map_err(db("preparing a history read"))?;
            let member = match reader {
                Reader::Member(mid) => mid,
                Reader::Business => 0,
            };
            let row = client
                .query_one(&head, &[&conv_text, &member])
                .await
                .map_err(db("reading a conversation's latest seq"))?;
            let max_seq: Option<i64> = get(&row, 0)?;
            // A pair's two users are its members before its first
            // message too (their rows come with that message).
            let is_member: bool = get(&row, 1)? || conv.is_peer_of(member);
            if let Reader::Member(mid) = reader
                && !is_member
            {
                return Err(Error::NotMember { conv, mid });
            }
            let max_seq = max_seq.unwrap_or(0);
            let min_seq: i64 = get::<Option<i64>>(&row, 2)?.unwrap_or(1);
            // Below the floor nothing is left: the page starts at it (an
            // `after` below it finds the floor's rows by itself).
            let reset = match page {
                Page::Before(_) => bound > 1 && bound <= min_seq,
                Page::After(_) => bound.saturating_add(1) < min_seq,
                Page::Latest => false,
            };
            let (sql, bound) = match page {
                Page::Before(_) if reset => (after_sql, min_seq - 1),
                _ => (sql, bound),
            };
            let select = client
                .prepare_cached(&format!(
                    "SELECT {MESSAGE_COLUMNS} FROM messages m WHERE conv = $1 AND {sql} LIMIT $4"
                ))
                .await
                .map_err(db("preparing a history read"))?;
            let rows = client
                .query(&select, &[&conv_text, &bound, &max_seq, &limit])
                .await
                .map_err(db("reading history"))?;
            let messages = rows
                .iter()
                .map(|row| message_at(row, 0))
                .collect::<Result<Vec<_>>>()?;
            Ok(PullPage {
                messages,
                max_seq: from_db("a seq", max_seq)?,
                min_seq: from_db("a seq", min_seq)?,
                reset,
            })
        })
    }

    async fn read(&self, conv: &ConvId, mid: i64, seq: u64) -> Result<ReadPos> {
        let seq = to_db("seq", seq)?;
        let conv_text = conv.to_string();
        let conv = conv.clone();
        let shared = &self.shared;
        with_client!(shared, "moving a read position", |client| {
            // One UPDATE: it locks only the member's row, so it cannot
            // take part in a deadlock with the batches.
            let advance = client
                .prepare_cached(
                    "UPDATE members m SET read_seq = LEAST($3, c.max_seq) FROM convs c \
                         WHERE m.conv = $1 AND m.mid = $2 AND c.conv = m.conv \
                         AND m.read_seq < LEAST($3, c.max_seq) \
                         RETURNING m.read_seq, c.max_seq",
                )
                .await
                .map_err(db("preparing a read position update"))?;
            if let Some(row) = client
                .query_opt(&advance, &[&conv_text, &mid, &seq])
                .await
                .map_err(db("moving a read position"))?
            {
                shared.committed();
                return Ok(ReadPos {
                    read_seq: from_db("a read position", get(&row, 0)?)?,
                    max_seq: from_db("a seq", get(&row, 1)?)?,
                    advanced: true,
                });
            }
            let current = client
                .prepare_cached(
                    "SELECT m.read_seq, c.max_seq FROM members m \
                         JOIN convs c ON c.conv = m.conv WHERE m.conv = $1 AND m.mid = $2",
                )
                .await
                .map_err(db("preparing a read position read"))?;
            match client
                .query_opt(&current, &[&conv_text, &mid])
                .await
                .map_err(db("reading a read position"))?
            {
                Some(row) => Ok(ReadPos {
                    read_seq: from_db("a read position", get(&row, 0)?)?,
                    max_seq: from_db("a seq", get(&row, 1)?)?,
                    advanced: false,
                }),
                // A pair without messages yet: nothing to read.
                None if conv.is_peer_of(mid) => Ok(ReadPos {
                    read_seq: 0,
                    max_seq: 0,
                    advanced: false,
                }),
                None => Err(Error::NotMember { conv, mid }),
            }
        })
    }

    async fn conversations(&self, mid: i64, limit: u32) -> Result<Vec<ConvSummary>> {
        let limit = limit_db(clamp_limit(
            limit,
            MAX_CONVERSATIONS_LIMIT,
            MAX_CONVERSATIONS_LIMIT,
        ));
        with_client!(self.shared, "listing conversations", |client| {
            let list = client
                .prepare_cached(&format!(
                    "SELECT c.conv, c.max_seq, s.read_seq, m.seq IS NOT NULL, {MESSAGE_COLUMNS} \
                         FROM members s JOIN convs c ON c.conv = s.conv \
                         LEFT JOIN messages m ON m.conv = c.conv AND m.seq = c.max_seq \
                         WHERE s.mid = $1 ORDER BY c.last_ts DESC, c.conv COLLATE \"C\" LIMIT $2"
                ))
                .await
                .map_err(db("preparing a conversation list"))?;
            let rows = client
                .query(&list, &[&mid, &limit])
                .await
                .map_err(db("listing conversations"))?;
            rows.iter()
                .map(|row| {
                    let max_seq = from_db("a seq", get(row, 1)?)?;
                    let read_seq = from_db("a read position", get(row, 2)?)?;
                    let has_last: bool = get(row, 3)?;
                    Ok(ConvSummary {
                        conv: conv_from_db(get(row, 0)?)?,
                        max_seq,
                        read_seq,
                        unread: max_seq.saturating_sub(read_seq),
                        last: if has_last {
                            Some(message_at(row, 4)?)
                        } else {
                            None
                        },
                    })
                })
                .collect()
        })
    }

    async fn put_group(&self, conv: &ConvId, spec: GroupSpec) -> Result<Group> {
        let ConvId::Group(_) = conv else {
            return Err(Error::invalid("conv", "a group id is g:<gid>"));
        };
        let max_members = i32::try_from(spec.max_members).map_err(|_| {
            Error::invalid(
                "max_members",
                format!("{} is over the largest, {}", spec.max_members, i32::MAX),
            )
        })?;
        if spec.name.contains('\0') {
            return Err(Error::invalid(
                "name",
                "a group name has no NUL character (U+0000)",
            ));
        }
        let conv_text = conv.to_string();
        let conv = conv.clone();
        let shared = &self.shared;
        with_client!(shared, "storing a group", |client| {
            let tx = client
                .transaction()
                .await
                .map_err(db("starting a group change"))?;
            // The conversation's row first (created or locked), as in
            // every transaction. A new group is listed in its members'
            // conversations from its creation time.
            let now = now_ms();
            let lock = tx
                .prepare_cached(
                    "INSERT INTO convs (conv, max_seq, last_ts) VALUES ($1, 0, $2) \
                         ON CONFLICT (conv) DO UPDATE SET max_seq = convs.max_seq",
                )
                .await
                .map_err(db("preparing a group change"))?;
            tx.execute(&lock, &[&conv_text, &now])
                .await
                .map_err(db("locking a group's conversation"))?;
            // Sticky: a big group stays big (store.rs, `Group::big`).
            let update = tx
                .prepare_cached(
                    "UPDATE groups SET name = $2, max_members = $3, big = (big OR $4) \
                         WHERE conv = $1 RETURNING members, big",
                )
                .await
                .map_err(db("preparing a group change"))?;
            let (members, big, created) = match tx
                .query_opt(&update, &[&conv_text, &spec.name, &max_members, &spec.big])
                .await
                .map_err(db("updating a group"))?
            {
                Some(row) => (get::<i32>(&row, 0)?, get::<bool>(&row, 1)?, false),
                None => {
                    let insert = tx
                        .prepare_cached(
                            "INSERT INTO groups (conv, name, max_members, members, created_ts, big) \
                                 VALUES ($1, $2, $3, 0, $4, $5)",
                        )
                        .await
                        .map_err(db("preparing a group change"))?;
                    tx.execute(
                        &insert,
                        &[&conv_text, &spec.name, &max_members, &now, &spec.big],
                    )
                    .await
                    .map_err(db("creating a group"))?;
                    (0, spec.big, true)
                }
            };
            tx.commit().await.map_err(db("committing a group change"))?;
            shared.committed();
            Ok(Group {
                conv,
                name: spec.name,
                max_members: spec.max_members,
                members: u32::try_from(members).unwrap_or(0),
                big,
                created,
            })
        })
    }

    async fn change_members(
        &self,
        conv: &ConvId,
        add: &[i64],
        remove: &[i64],
    ) -> Result<MembersChanged> {
        let conv_text = group_id(conv)?;
        let conv = conv.clone();
        let add: std::collections::BTreeSet<i64> = add.iter().copied().collect();
        let remove: std::collections::BTreeSet<i64> = remove.iter().copied().collect();
        let shared = &self.shared;
        with_client!(shared, "changing group members", |client| {
            let tx = client
                .transaction()
                .await
                .map_err(db("starting a membership change"))?;
            let lock = tx
                .prepare_cached(
                    "SELECT c.max_seq, g.max_members, g.members FROM convs c \
                         JOIN groups g ON g.conv = c.conv WHERE c.conv = $1 FOR UPDATE OF c",
                )
                .await
                .map_err(db("preparing a membership change"))?;
            let Some(row) = tx
                .query_opt(&lock, &[&conv_text])
                .await
                .map_err(db("locking a group's conversation"))?
            else {
                return Err(Error::NoSuchGroup { conv });
            };
            let max_seq: i64 = get(&row, 0)?;
            let limit: i32 = get(&row, 1)?;
            let count: i32 = get(&row, 2)?;
            let named: Vec<i64> = add.union(&remove).copied().collect();
            let current = tx
                .prepare_cached("SELECT mid FROM members WHERE conv = $1 AND mid = ANY($2)")
                .await
                .map_err(db("preparing a membership change"))?;
            let current: std::collections::BTreeSet<i64> = tx
                .query(&current, &[&conv_text, &named])
                .await
                .map_err(db("reading group members"))?
                .iter()
                .map(|row| get::<i64>(row, 0))
                .collect::<Result<_>>()?;
            // Net effect of "removals first, then additions": a mid in
            // both lists ends up a member, untouched if it was one.
            let removed: Vec<i64> = remove
                .iter()
                .copied()
                .filter(|mid| current.contains(mid) && !add.contains(mid))
                .collect();
            let added: Vec<i64> = add
                .iter()
                .copied()
                .filter(|mid| !current.contains(mid))
                .collect();
            let members = i64::from(count) - removed.len() as i64 + added.len() as i64;
            if members > i64::from(limit) {
                return Err(Error::GroupFull {
                    conv,
                    members: u64::try_from(members).unwrap_or(0),
                    limit: u32::try_from(limit).unwrap_or(0),
                });
            }
            let members_db = i32::try_from(members)
                .map_err(|e| Error::unavailable("counting group members", e))?;
            let delete = tx
                .prepare_cached("DELETE FROM members WHERE conv = $1 AND mid = ANY($2)")
                .await
                .map_err(db("preparing a membership change"))?;
            let insert = tx
                .prepare_cached(
                    "INSERT INTO members (conv, mid, read_seq) \
                         SELECT $1, mid, $3 FROM unnest($2::BIGINT[]) AS t(mid)",
                )
                .await
                .map_err(db("preparing a membership change"))?;
            let count = tx
                .prepare_cached("UPDATE groups SET members = $2 WHERE conv = $1")
                .await
                .map_err(db("preparing a membership change"))?;
            tx.execute(&delete, &[&conv_text, &removed])
                .await
                .map_err(db("removing group members"))?;
            tx.execute(&insert, &[&conv_text, &added, &max_seq])
                .await
                .map_err(db("adding group members"))?;
            tx.execute(&count, &[&conv_text, &members_db])
                .await
                .map_err(db("counting group members"))?;
            tx.commit()
                .await
                .map_err(db("committing a membership change"))?;
            shared.committed();
            Ok(MembersChanged {
                added,
                removed,
                members: u32::try_from(members).unwrap_or(0),
            })
        })
    }

    async fn members(&self, conv: &ConvId, after: Option<i64>, limit: u32) -> Result<MembersPage> {
        let conv_text = group_id(conv)?;
        let conv = conv.clone();
        let limit = clamp_limit(limit, MAX_MEMBERS_LIMIT, MAX_MEMBERS_LIMIT);
        with_client!(self.shared, "listing group members", |client| {
            let exists = client
                .prepare_cached("SELECT 1 FROM groups WHERE conv = $1")
                .await
                .map_err(db("preparing a member list"))?;
            if client
                .query_opt(&exists, &[&conv_text])
                .await
                .map_err(db("reading a group"))?
                .is_none()
            {
                return Err(Error::NoSuchGroup { conv });
            }
            let page = client
                .prepare_cached(
                    "SELECT mid FROM members WHERE conv = $1 \
                         AND ($2::BIGINT IS NULL OR mid > $2) ORDER BY mid LIMIT $3",
                )
                .await
                .map_err(db("preparing a member list"))?;
            let rows = client
                .query(&page, &[&conv_text, &after, &(limit_db(limit) + 1)])
                .await
                .map_err(db("listing group members"))?;
            let mut mids = rows
                .iter()
                .map(|row| get::<i64>(row, 0))
                .collect::<Result<Vec<_>>>()?;
            let next = if mids.len() > limit as usize {
                mids.truncate(limit as usize);
                mids.last().copied()
            } else {
                None
            };
            Ok(MembersPage { mids, next })
        })
    }

    async fn group(&self, conv: &ConvId) -> Result<Group> {
        let conv_text = group_id(conv)?;
        let conv = conv.clone();
        with_client!(self.shared, "reading a group", |client| {
            let select = client
                .prepare_cached(
                    "SELECT name, max_members, members, big FROM groups WHERE conv = $1",
                )
                .await
                .map_err(db("preparing a group read"))?;
            let Some(row) = client
                .query_opt(&select, &[&conv_text])
                .await
                .map_err(db("reading a group"))?
            else {
                return Err(Error::NoSuchGroup { conv });
            };
            let max_members: i32 = get(&row, 1)?;
            let members: i32 = get(&row, 2)?;
            Ok(Group {
                conv,
                name: get(&row, 0)?,
                max_members: u32::try_from(max_members).unwrap_or(0),
                members: u32::try_from(members).unwrap_or(0),
                big: get(&row, 3)?,
                created: false,
            })
        })
    }

    async fn big_groups(&self, mid: i64, limit: u32) -> Result<Vec<ConvId>> {
        let limit = limit_db(clamp_limit(
            limit,
            MAX_BIG_GROUPS_LIMIT,
            MAX_BIG_GROUPS_LIMIT,
        ));
        with_client!(self.shared, "listing big groups", |client| {
            // members_groups_by_mid holds the user's group memberships in
            // the order asked for; each is checked against its group's
            // primary key, until the limit.
            let list = client
                .prepare_cached(
                    "SELECT m.conv FROM members m JOIN groups g ON g.conv = m.conv \
                         WHERE m.mid = $1 AND m.conv LIKE 'g:%' AND g.big \
                         ORDER BY m.conv COLLATE \"C\" LIMIT $2",
                )
                .await
                .map_err(db("preparing a big group list"))?;
            client
                .query(&list, &[&mid, &limit])
                .await
                .map_err(db("listing big groups"))?
                .iter()
                .map(|row| conv_from_db(get(row, 0)?))
                .collect()
        })
    }

    fn commits(&self) -> u64 {
        self.shared.commits.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_peers_are_detected_unless_the_url_says_otherwise() {
        let timeout = Duration::from_secs(5);
        let mut config: tokio_postgres::Config = "postgres://rim@127.0.0.1/rim".parse().unwrap();
        detect_dead_peers(&mut config, timeout);
        assert_eq!(config.get_keepalives_idle(), timeout);
        assert_eq!(
            config.get_keepalives_interval(),
            Some(Duration::from_secs(1))
        );
        assert_eq!(config.get_keepalives_retries(), Some(3));
        assert_eq!(
            config.get_tcp_user_timeout(),
            Some(&Duration::from_secs(10))
        );
        let mut chosen: tokio_postgres::Config =
            "postgres://rim@127.0.0.1/rim?keepalives_idle=60&tcp_user_timeout=30"
                .parse()
                .unwrap();
        detect_dead_peers(&mut chosen, timeout);
        assert_eq!(chosen.get_keepalives_idle(), Duration::from_secs(60));
        assert_eq!(chosen.get_keepalives_interval(), None);
        assert_eq!(
            chosen.get_tcp_user_timeout(),
            Some(&Duration::from_secs(30))
        );
    }

    #[test]
    fn a_url_that_could_reach_a_standby_is_refused() {
        let check = |url: &str| primary_only(&url.parse().unwrap());
        for fine in [
            "postgres://rim@127.0.0.1:5432/rim",
            "postgres://rim@127.0.0.1:5432/rim?target_session_attrs=read-write",
            "postgres://rim@10.0.0.1:5432,10.0.0.2:5432/rim?target_session_attrs=read-write",
            "host=10.0.0.1,10.0.0.2 user=rim target_session_attrs=read-write",
        ] {
            assert!(check(fine).is_ok(), "{fine}");
        }
        for (bad, says) in [
            (
                "postgres://rim@10.0.0.1:5432,10.0.0.2:5432/rim",
                "names 2 hosts",
            ),
            (
                "postgres://rim@10.0.0.1,10.0.0.2,10.0.0.3/rim?target_session_attrs=any",
                "names 3 hosts",
            ),
            (
                "postgres://rim@127.0.0.1/rim?target_session_attrs=read-only",
                "must be read-write",
            ),
        ] {
            let err = check(bad).unwrap_err();
            assert!(matches!(err, Error::Invalid { .. }), "{bad}: {err:?}");
            assert!(err.to_string().contains(says), "{bad}: {err}");
        }
    }

    async fn session(url: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to RIM_TEST_POSTGRES={url}: {e}"));
        tokio::spawn(connection);
        client
    }

    #[tokio::test]
    #[ignore = "needs PostgreSQL: run deploy/test.sh"]
    async fn deadlocks_are_retried_and_lost_commits_are_not() {
        let url = std::env::var("RIM_TEST_POSTGRES")
            .unwrap_or_else(|_| panic!("RIM_TEST_POSTGRES is not set: run deploy/test.sh"));
        let table = format!("rim_deadlock_{}", std::process::id());
        let (mut a, mut b) = (session(&url).await, session(&url).await);
        a.batch_execute(&format!(
            "CREATE TABLE {table} (k INT PRIMARY KEY); INSERT INTO {table} VALUES (1), (2)"
        ))
        .await
        .unwrap();
        // Two sessions locking two rows in opposite orders: one of them is
        // chosen as the deadlock's victim.
        let (ta, tb) = (
            a.transaction().await.unwrap(),
            b.transaction().await.unwrap(),
        );
        let lock = |k: i32| format!("SELECT k FROM {table} WHERE k = {k} FOR UPDATE");
        ta.batch_execute(&lock(1)).await.unwrap();
        tb.batch_execute(&lock(2)).await.unwrap();
        let (second_a, second_b) = (lock(2), lock(1));
        let (ra, rb) = tokio::join!(ta.batch_execute(&second_a), tb.batch_execute(&second_b));
        let victim = ra.err().or(rb.err()).expect("one of them deadlocked");
        let err = Error::unavailable("storing sends", victim);
        assert!(retryable(&err, false));
        drop((ta, tb));

        // A session the server ended: run again only if not committing.
        let pid: i32 = b
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        a.execute("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .unwrap();
        let lost = b.batch_execute("SELECT 1").await.unwrap_err();
        let err = Error::unavailable("storing sends", lost);
        assert!(retryable(&err, false), "{err:?}");
        assert!(!retryable(&err, true), "the commit may have happened");
        assert!(!retryable(&Error::invalid("x", "y"), false));
        a.batch_execute(&format!("DROP TABLE {table}"))
            .await
            .unwrap();
    }
}
