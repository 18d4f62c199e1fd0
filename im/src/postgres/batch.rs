//! Group commit: the send batcher and the transaction that stores a batch.
//!
//! One task takes whatever sends are queued (up to `max_batch`, without
//! waiting for more) once a batch slot is free, and stores them in one
//! transaction with one commit; up to `in_flight` batches run at once on
//! their own connections. While every slot is busy, sends queue up, so a
//! busier store writes bigger batches rather than more commits.
//!
//! A batch takes its locks in the order every transaction of this store
//! takes them, so concurrent batches (of this process or another) only
//! wait for one another, never deadlock: the conversations' `convs` rows
//! sorted by id in byte order (`g:` groups sort before `p:` pairs, so the
//! two statements that take them keep that order), then the `users` rows
//! of the inbox owners sorted by mid. Each of those is one statement that
//! walks its rows in order; an `INSERT … ON CONFLICT DO UPDATE` creates a
//! missing row or locks an existing one in the same step (first inserting
//! the missing rows and then locking all of them would lock in two passes,
//! out of order). Membership, dedup and refusals are decided under the
//! conversation locks, in the batch's order.
//!
//! The transaction takes two round trips (see [`transact`]): its
//! statements are pipelined, and the inbox entries are numbered by the
//! statement that locks their owners, so the only wait in the middle is
//! for what the decisions need (the conversations' seqs, the groups'
//! members, earlier sends).
//!
//! A big group (read diffusion) gets no inbox entries, so its member list
//! is never read: the first round trip reads only whether each of its
//! senders in the batch is a member (a primary key probe each), and the
//! second writes its messages, its head and those senders' read
//! positions. Its cost per message does not grow with the group.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_postgres::Statement;

use crate::conv::ConvId;
use crate::error::{Error, Result};
use crate::id::MessageId;
use crate::message::Draft;
use crate::store::{InboxEntry, Message, Sent};

use super::{MESSAGE_COLUMNS, Object, Shared, db, from_db, get, message_at, retryable};

/// A send waiting for its batch.
pub(super) struct Job {
    /// What to store.
    pub draft: Draft,
    /// Where its outcome goes once the batch has committed (or failed).
    pub reply_tx: oneshot::Sender<Result<Sent>>,
    /// When the send was asked for: its wait for the message-id node ends
    /// a store timeout after it, however long it queued for its batch.
    pub asked: tokio::time::Instant,
}

/// Forms batches from `send_rx` until every sender is gone.
pub(super) async fn run(
    shared: Arc<Shared>,
    mut send_rx: mpsc::Receiver<Job>,
    max_batch: usize,
    in_flight: usize,
) {
    let slots = Arc::new(Semaphore::new(in_flight));
    loop {
        // A slot first: while all are busy, sends gather in the queue and
        // the next batch takes them all.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = send_rx.recv().await else {
            return;
        };
        let mut jobs = Vec::with_capacity(max_batch.min(64));
        jobs.push(first);
        while jobs.len() < max_batch {
            match send_rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            write(&shared, jobs).await;
            drop(slot);
        });
    }
}

/// A send of the batch with what the store needs of it.
struct Planned {
    draft: Draft,
    conv: String,
    id: MessageId,
    id_db: i64,
    ts: i64,
}

/// What became of one send in one attempt.
enum Decision {
    /// Stored with this seq; its inbox entries are filled once the users
    /// rows are locked.
    Stored {
        message: Message,
        /// The inbox owners (none for a big group), ascending: those whose
        /// inbox is in this database.
        recipients: Vec<i64>,
        /// Members whose inbox is on another primary of a sharded store:
        /// kept in the outbox with the message, appended there later.
        remote: Vec<i64>,
        inbox: Vec<InboxEntry>,
        /// The sender is a member: its read position moves.
        sender_member: bool,
        /// The conversation is a big group.
        big: bool,
    },
    /// Already stored (before, or earlier in this batch); `big` as the
    /// conversation is now.
    Duplicate { message: Message, big: bool },
    /// Refused; the rest of the batch goes on.
    Refused(Error),
}

/// Issues a message id, with its BIGINT and its time.
fn issue_id(shared: &Shared) -> Result<(MessageId, i64, i64)> {
    let id = shared.ids.next();
    let id_db = i64::try_from(id.as_u64())
        .map_err(|e| Error::unavailable("a message id over 63 bits", e))?;
    let ts = i64::try_from(id.unix_ms())
        .map_err(|e| Error::unavailable("a message time over 63 bits", e))?;
    Ok((id, id_db, ts))
}

/// Gives every send of `plan` a new id (from the generator's node now).
fn reissue_ids(shared: &Shared, plan: &mut [Planned]) -> Result<()> {
    for planned in plan {
        (planned.id, planned.id_db, planned.ts) = issue_id(shared)?;
    }
    Ok(())
}

/// Stores one batch and answers each of its sends.
async fn write(shared: &Shared, jobs: Vec<Job>) {
    let mut plan = Vec::with_capacity(jobs.len());
    let mut replies = Vec::with_capacity(jobs.len());
    // While the node is not held (its connection was lost: a failover, a
    // restart) a send is answered `Unavailable` within the store timeout
    // of when it was asked, not that timeout after its batch started.
    let node_deadline = jobs
        .iter()
        .map(|job| job.asked)
        .min()
        .unwrap_or_else(tokio::time::Instant::now)
        + shared.timeout;
    for job in jobs {
        match issue_id(shared) {
            Ok((id, id_db, ts)) => {
                plan.push(Planned {
                    conv: job.draft.conv.to_string(),
                    draft: job.draft,
                    id,
                    id_db,
                    ts,
                });
                replies.push(job.reply_tx);
            }
            Err(e) => {
                let _ = job.reply_tx.send(Err(e));
            }
        }
    }
    if plan.is_empty() {
        return;
    }
    let mut attempt = 0;
    let outcome = loop {
        attempt += 1;
        // Ids of a node this process may no longer hold are not written.
        let wait = node_deadline.saturating_duration_since(tokio::time::Instant::now());
        if let Err(e) = shared.node.held(wait).await {
            break Err(e);
        }
        // Taken back, the node may be another one (the old one went to
        // another process meanwhile): ids issued from the old one are not
        // written either.
        if plan.iter().any(|p| p.id.node() != shared.ids.node())
            && let Err(e) = reissue_ids(shared, &mut plan)
        {
            break Err(e);
        }
        let client = match shared.client("storing sends").await {
            Ok(client) => client,
            Err(e) => break Err(e),
        };
        let mut progress = Progress::default();
        let holds = |mid: i64| shared.holds_inbox(mid);
        let outcome =
            tokio::time::timeout(shared.bound(), store(&client, &plan, &holds, &mut progress))
                .await;
        let outcome = if progress.left_open {
            // A transaction that could not be ended stays out of the pool.
            drop(Object::take(client));
            outcome.unwrap_or_else(|elapsed| {
                Err(Error::unavailable("storing sends timed out", elapsed))
            })
        } else {
            shared.settle("storing sends", client, outcome)
        };
        match outcome {
            Ok(decisions) => break Ok(decisions),
            Err(e) if attempt < shared.attempts && retryable(&e, progress.committing) => continue,
            Err(e) => break Err(e),
        }
    };
    match outcome {
        Ok(decisions) => {
            shared.committed();
            for (decision, reply_tx) in decisions.into_iter().zip(replies) {
                let answer = match decision {
                    Decision::Stored {
                        message,
                        inbox,
                        big,
                        remote,
                        ..
                    } => Ok(Sent {
                        message,
                        duplicate: false,
                        inbox,
                        big,
                        pending: remote,
                    }),
                    Decision::Duplicate { message, big } => Ok(Sent {
                        message,
                        duplicate: true,
                        inbox: Vec::new(),
                        big,
                        pending: Vec::new(),
                    }),
                    Decision::Refused(e) => Err(e),
                };
                // A sender that stopped waiting finds its message stored
                // when it resends with the same cmid.
                let _ = reply_tx.send(answer);
            }
        }
        Err(e) => {
            let failure = e.to_string();
            let mut e = Some(e);
            for reply_tx in replies {
                let answer = match e.take() {
                    Some(e) => e,
                    None => Error::Unavailable(crate::StoreFailure::bare(failure.clone())),
                };
                let _ = reply_tx.send(Err(answer));
            }
        }
    }
}

/// The statements of a batch, prepared once per connection.
struct Statements {
    lock_groups: Statement,
    lock_pairs: Statement,
    group_members: Statement,
    big_senders: Statement,
    earlier_sends: Statement,
    append_inboxes: Statement,
    insert_messages: Statement,
    move_convs: Statement,
    move_reads: Statement,
    outbox: Statement,
}

impl Statements {
    async fn prepare(client: &Object) -> Result<Statements> {
        // One probe of the dedup key's index per send whatever plan is
        // cached: a join may become a scan of all of `messages`, and the
        // LIMIT (the key is unique) keeps the lateral from being turned
        // into one.
        let earlier_sends = format!(
            "SELECT {MESSAGE_COLUMNS} \
             FROM unnest($1::TEXT[], $2::BIGINT[], $3::TEXT[]) AS t(conv, sender, cmid) \
             CROSS JOIN LATERAL (SELECT * FROM messages \
             WHERE conv = t.conv AND sender = t.sender AND cmid = t.cmid LIMIT 1) m"
        );
        let (
            lock_groups,
            lock_pairs,
            group_members,
            big_senders,
            earlier_sends,
            append_inboxes,
            insert_messages,
            move_convs,
            move_reads,
            outbox,
        ) = tokio::try_join!(
            client.prepare_cached(
                "SELECT conv, max_seq FROM convs WHERE conv = ANY($1) \
                 ORDER BY conv COLLATE \"C\" FOR UPDATE"
            ),
            // A new pair (max_seq 0: this statement created its row) gets
            // its members, both users (one for p:7:7); members of a pair
            // are never removed, so this happens once.
            client.prepare_cached(
                "WITH c AS (INSERT INTO convs (conv, max_seq, last_ts) \
                 SELECT conv, 0, 0 FROM unnest($1::TEXT[]) AS t(conv) ORDER BY conv COLLATE \"C\" \
                 ON CONFLICT (conv) DO UPDATE SET max_seq = convs.max_seq \
                 RETURNING conv, max_seq), \
                 m AS (INSERT INTO members (conv, mid, read_seq) \
                 SELECT c.conv, t.mid, 0 FROM c \
                 JOIN unnest($2::TEXT[], $3::BIGINT[]) AS t(conv, mid) ON t.conv = c.conv \
                 WHERE c.max_seq = 0 ON CONFLICT DO NOTHING) \
                 SELECT conv, max_seq FROM c"
            ),
            // The members of the batch's groups that are not big: a big
            // group's list (tens of thousands of rows) is never read.
            client.prepare_cached(
                "SELECT conv, mid FROM members WHERE conv = ANY(ARRAY(\
                 SELECT conv FROM groups WHERE conv = ANY($1) AND NOT big))"
            ),
            // The batch's senders to big groups, and whether each is a
            // member: its own row, a primary key probe.
            client.prepare_cached(
                "SELECT t.conv, t.mid, EXISTS (SELECT 1 FROM members m \
                 WHERE m.conv = t.conv AND m.mid = t.mid) \
                 FROM unnest($1::TEXT[], $2::BIGINT[]) AS t(conv, mid) \
                 JOIN groups g ON g.conv = t.conv WHERE g.big"
            ),
            client.prepare_cached(&earlier_sends),
            // Each inbox owner's row takes the batch's count of its new
            // entries in the statement that locks it, and the entries are
            // numbered back from the new end: `back` = how many of the
            // owner's entries in this batch come after this one.
            client.prepare_cached(
                "WITH u AS (INSERT INTO users (mid, max_sync) \
                 SELECT mid, n FROM unnest($1::BIGINT[], $2::BIGINT[]) AS t(mid, n) ORDER BY mid \
                 ON CONFLICT (mid) DO UPDATE SET max_sync = users.max_sync + EXCLUDED.max_sync \
                 RETURNING mid, max_sync), \
                 i AS (INSERT INTO inbox (mid, sync, conv, seq) \
                 SELECT e.mid, u.max_sync - e.back, e.conv, e.seq \
                 FROM unnest($3::BIGINT[], $4::BIGINT[], $5::TEXT[], $6::BIGINT[]) \
                 AS e(mid, back, conv, seq) JOIN u ON u.mid = e.mid) \
                 SELECT mid, max_sync FROM u"
            ),
            client.prepare_cached(
                "INSERT INTO messages (conv, seq, id, sender, cmid, kind, body, ts) \
                 SELECT * FROM unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[], \
                 $5::TEXT[], $6::INT[], $7::TEXT[], $8::BIGINT[])"
            ),
            client.prepare_cached(
                "UPDATE convs c SET max_seq = t.max_seq, last_ts = t.last_ts \
                 FROM unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[]) AS t(conv, max_seq, last_ts) \
                 WHERE c.conv = t.conv"
            ),
            client.prepare_cached(
                "UPDATE members m SET read_seq = GREATEST(m.read_seq, t.seq) \
                 FROM unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[]) AS t(conv, mid, seq) \
                 WHERE m.conv = t.conv AND m.mid = t.mid"
            ),
            // One outbox row per message, its remote members in an array.
            client.prepare_cached(
                "INSERT INTO inbox_outbox (conv, seq, mids, at) \
                 SELECT conv, seq, array_agg(mid ORDER BY mid), $4 \
                 FROM unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[]) AS t(conv, seq, mid) \
                 GROUP BY conv, seq"
            ),
        )
        .map_err(db("preparing a batch"))?;
        Ok(Statements {
            lock_groups,
            lock_pairs,
            group_members,
            big_senders,
            earlier_sends,
            append_inboxes,
            insert_messages,
            move_convs,
            move_reads,
            outbox,
        })
    }
}

/// How far one attempt got.
#[derive(Default)]
struct Progress {
    /// The commit has been asked for: on a lost connection its outcome is
    /// unknown.
    committing: bool,
    /// The transaction could not be ended: the connection must not go back
    /// to the pool.
    left_open: bool,
}

/// Runs one attempt at storing `plan` in one transaction, and ends the
/// transaction when the attempt failed.
async fn store(
    client: &Object,
    plan: &[Planned],
    holds: &(dyn Fn(i64) -> bool + Sync),
    progress: &mut Progress,
) -> Result<Vec<Decision>> {
    let statements = Statements::prepare(client).await?;
    let outcome = transact(client, &statements, plan, holds, progress).await;
    // ROLLBACK ends the transaction in whatever state it is (only a
    // warning once the pipelined COMMIT has ended it, as a rollback after
    // an error).
    if outcome.is_err() && client.batch_execute("ROLLBACK").await.is_err() {
        progress.left_open = true;
    }
    outcome
}

/// The transaction in two round trips: BEGIN, the locks and what is read
/// under them pipelined; then, once each send is decided, the inbox
/// entries, messages, conversation heads, read positions and COMMIT
/// pipelined. The server runs a pipeline's statements in the order they
/// were sent (`biased` polls them in that order), each after the one
/// before, so everything read in the first runs under its locks.
async fn transact(
    client: &Object,
    st: &Statements,
    plan: &[Planned],
    holds: &(dyn Fn(i64) -> bool + Sync),
    progress: &mut Progress,
) -> Result<Vec<Decision>> {
    // 1. The conversations' rows, in byte order: groups ("g:…") exist
    // already (put_group creates them) and are locked as they are; pairs
    // ("p:…") are created on their first message, and their members are
    // the two users the id names.
    let mut groups = BTreeSet::new();
    let mut pairs: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for p in plan {
        match p.draft.conv {
            ConvId::Group(_) => {
                groups.insert(p.conv.as_str());
            }
            ConvId::Peer { low, high } => {
                pairs.entry(p.conv.as_str()).or_insert_with(|| {
                    if low == high {
                        vec![low]
                    } else {
                        vec![low, high]
                    }
                });
            }
        }
    }
    let groups: Vec<&str> = groups.into_iter().collect();
    let pair_ids: Vec<&str> = pairs.keys().copied().collect();
    let (pair_member_conv, pair_member_mid): (Vec<&str>, Vec<i64>) = pairs
        .iter()
        .flat_map(|(conv, mids)| mids.iter().map(move |mid| (*conv, *mid)))
        .unzip();
    let keys: BTreeSet<(&str, i64, &str)> = plan
        .iter()
        .map(|p| (p.conv.as_str(), p.draft.from, p.draft.cmid.as_str()))
        .collect();
    let group_senders: BTreeSet<(&str, i64)> = plan
        .iter()
        .filter(|p| matches!(p.draft.conv, ConvId::Group(_)))
        .map(|p| (p.conv.as_str(), p.draft.from))
        .collect();
    let (s_conv, s_mid): (Vec<&str>, Vec<i64>) = group_senders.into_iter().unzip();
    let (k_conv, k_from, k_cmid) = split3(keys.into_iter());
    let none = || Ok::<_, Error>(Vec::new());
    let ((), group_rows, pair_rows, member_rows, big_rows, sent_rows) = tokio::try_join!(
        biased;
        async {
            client
                .batch_execute("BEGIN")
                .await
                .map_err(db("starting a batch"))
        },
        async {
            if groups.is_empty() {
                return none();
            }
            client
                .query(&st.lock_groups, &[&groups])
                .await
                .map_err(db("locking the batch's groups"))
        },
        async {
            if pair_ids.is_empty() {
                return none();
            }
            client
                .query(
                    &st.lock_pairs,
                    &[&pair_ids, &pair_member_conv, &pair_member_mid],
                )
                .await
                .map_err(db("locking the batch's conversations"))
        },
        async {
            if groups.is_empty() {
                return none();
            }
            client
                .query(&st.group_members, &[&groups])
                .await
                .map_err(db("reading the batch's members"))
        },
        async {
            if s_conv.is_empty() {
                return none();
            }
            client
                .query(&st.big_senders, &[&s_conv, &s_mid])
                .await
                .map_err(db("reading the batch's big groups"))
        },
        async {
            client
                .query(&st.earlier_sends, &[&k_conv, &k_from, &k_cmid])
                .await
                .map_err(db("looking up earlier sends"))
        },
    )?;
    let mut max_seq: HashMap<String, i64> = HashMap::new();
    for row in group_rows.iter().chain(&pair_rows) {
        max_seq.insert(get(row, 0)?, get(row, 1)?);
    }
    let mut members: HashMap<String, Vec<i64>> = pairs
        .into_iter()
        .map(|(conv, mids)| (conv.to_owned(), mids))
        .collect();
    for row in &member_rows {
        members.entry(get(row, 0)?).or_default().push(get(row, 1)?);
    }
    for mids in members.values_mut() {
        mids.sort_unstable();
    }
    // Big group -> those of its senders in the batch that are members.
    let mut big: HashMap<String, BTreeSet<i64>> = HashMap::new();
    for row in &big_rows {
        let senders = big.entry(get(row, 0)?).or_default();
        if get::<bool>(row, 2)? {
            senders.insert(get(row, 1)?);
        }
    }
    let mut stored: HashMap<(String, i64, String), Message> = HashMap::new();
    for row in &sent_rows {
        let message = message_at(row, 0)?;
        stored.insert(
            (message.conv.to_string(), message.from, message.cmid.clone()),
            message,
        );
    }

    // 2. Decide each send in the batch's order.
    let mut decisions = decide(plan, &mut max_seq, &members, &big, &stored, holds)?;

    // 3. The rows, and the commit.
    let mut inbox_counts: BTreeMap<i64, i64> = BTreeMap::new();
    for decision in &decisions {
        if let Decision::Stored { recipients, .. } = decision {
            for mid in recipients {
                *inbox_counts.entry(*mid).or_default() += 1;
            }
        }
    }
    let mut m = MessageRows::default();
    let mut inbox = InboxRows::default();
    let mut conv_heads: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    let mut reads: BTreeMap<(&str, i64), i64> = BTreeMap::new();
    let mut outbox = InboxRows::default();
    let mut remaining = inbox_counts.clone();
    for (p, decision) in plan.iter().zip(decisions.iter()) {
        let Decision::Stored {
            message,
            recipients,
            remote,
            sender_member,
            ..
        } = decision
        else {
            continue;
        };
        let seq = i64::try_from(message.seq).map_err(|e| Error::unavailable("a seq", e))?;
        m.conv.push(p.conv.as_str());
        m.seq.push(seq);
        m.id.push(p.id_db);
        m.sender.push(p.draft.from);
        m.cmid.push(p.draft.cmid.as_str());
        m.kind.push(p.draft.kind);
        m.body.push(p.draft.body.as_str());
        m.ts.push(p.ts);
        for mid in recipients {
            let left = remaining.entry(*mid).or_default();
            *left -= 1;
            inbox.mid.push(*mid);
            inbox.back.push(*left);
            inbox.conv.push(p.conv.as_str());
            inbox.seq.push(seq);
        }
        for mid in remote {
            outbox.mid.push(*mid);
            outbox.conv.push(p.conv.as_str());
            outbox.seq.push(seq);
        }
        conv_heads.insert(p.conv.as_str(), (seq, p.ts));
        if *sender_member {
            let read = reads.entry((p.conv.as_str(), p.draft.from)).or_default();
            *read = (*read).max(seq);
        }
    }
    let (counted_mids, counts): (Vec<i64>, Vec<i64>) =
        inbox_counts.iter().map(|(mid, n)| (*mid, *n)).unzip();
    let (h_conv, h_seq, h_ts) = split3(conv_heads.iter().map(|(c, (s, t))| (*c, *s, *t)));
    let (r_conv, r_mid, r_seq) = split3(reads.iter().map(|((c, mid), s)| (*c, *mid, *s)));
    progress.committing = true;
    let (owner_rows, ..) = tokio::try_join!(
        biased;
        async {
            if counted_mids.is_empty() {
                return none();
            }
            client
                .query(
                    &st.append_inboxes,
                    &[
                        &counted_mids,
                        &counts,
                        &inbox.mid,
                        &inbox.back,
                        &inbox.conv,
                        &inbox.seq,
                    ],
                )
                .await
                .map_err(db("storing the batch's inbox entries"))
        },
        async {
            if m.conv.is_empty() {
                return Ok(0);
            }
            client
                .execute(
                    &st.insert_messages,
                    &[
                        &m.conv, &m.seq, &m.id, &m.sender, &m.cmid, &m.kind, &m.body, &m.ts,
                    ],
                )
                .await
                .map_err(db("storing the batch's messages"))
        },
        async {
            if h_conv.is_empty() {
                return Ok(0);
            }
            client
                .execute(&st.move_convs, &[&h_conv, &h_seq, &h_ts])
                .await
                .map_err(db("moving the batch's conversations"))
        },
        async {
            if r_conv.is_empty() {
                return Ok(0);
            }
            client
                .execute(&st.move_reads, &[&r_conv, &r_mid, &r_seq])
                .await
                .map_err(db("moving the senders' read positions"))
        },
        async {
            if outbox.mid.is_empty() {
                return Ok(0);
            }
            client
                .execute(
                    &st.outbox,
                    &[&outbox.conv, &outbox.seq, &outbox.mid, &super::now_ms()],
                )
                .await
                .map_err(db("storing the batch's outbox"))
        },
        async {
            client
                .batch_execute("COMMIT")
                .await
                .map_err(db("committing a batch"))
        },
    )?;

    // 4. Each stored send's inbox entries, numbered from the owners' new
    // ends.
    let mut next_sync: HashMap<i64, i64> = HashMap::with_capacity(owner_rows.len());
    for row in &owner_rows {
        let mid: i64 = get(row, 0)?;
        let max_sync: i64 = get(row, 1)?;
        let count = inbox_counts.get(&mid).copied().unwrap_or(0);
        next_sync.insert(mid, max_sync - count + 1);
    }
    for decision in &mut decisions {
        let Decision::Stored {
            recipients, inbox, ..
        } = decision
        else {
            continue;
        };
        for mid in recipients.iter() {
            let Some(sync) = next_sync.get_mut(mid) else {
                return Err(Error::Unavailable(crate::StoreFailure::bare(
                    "an inbox owner's row was not returned",
                )));
            };
            inbox.push(InboxEntry {
                mid: *mid,
                sync: from_db("a sync", *sync)?,
            });
            *sync += 1;
        }
    }
    Ok(decisions)
}

/// Decides each send of the batch in its order: a duplicate of an earlier
/// send (stored before, or earlier in this batch), refused, or stored with
/// the conversation's next seq (`max_seq` moves along).
/// `members` holds the members of the pairs and of the groups that are
/// not big; `big` each big group's senders that are members.
fn decide(
    plan: &[Planned],
    max_seq: &mut HashMap<String, i64>,
    members: &HashMap<String, Vec<i64>>,
    big: &HashMap<String, BTreeSet<i64>>,
    stored: &HashMap<(String, i64, String), Message>,
    holds: &(dyn Fn(i64) -> bool + Sync),
) -> Result<Vec<Decision>> {
    let mut decisions: Vec<Decision> = Vec::with_capacity(plan.len());
    let mut accepted: HashMap<(&str, i64, &str), usize> = HashMap::new();
    let no_members: Vec<i64> = Vec::new();
    for p in plan {
        let key = (p.conv.as_str(), p.draft.from, p.draft.cmid.as_str());
        let big_senders = big.get(&p.conv);
        let is_big = big_senders.is_some();
        if let Some(message) = stored.get(&(p.conv.clone(), p.draft.from, p.draft.cmid.clone())) {
            decisions.push(Decision::Duplicate {
                message: message.clone(),
                big: is_big,
            });
            continue;
        }
        if let Some(&earlier) = accepted.get(&key)
            && let Some(Decision::Stored { message, .. }) = decisions.get(earlier)
        {
            decisions.push(Decision::Duplicate {
                message: message.clone(),
                big: is_big,
            });
            continue;
        }
        let Some(seq) = max_seq.get_mut(&p.conv) else {
            // A group without a conversation row: no such group.
            decisions.push(Decision::Refused(if p.draft.system {
                Error::NoSuchGroup {
                    conv: p.draft.conv.clone(),
                }
            } else {
                Error::NotMember {
                    conv: p.draft.conv.clone(),
                    mid: p.draft.from,
                }
            }));
            continue;
        };
        let (recipients, is_member) = match big_senders {
            // Read diffusion: no inbox owners.
            Some(senders) => (&no_members, senders.contains(&p.draft.from)),
            None => {
                let recipients = members.get(&p.conv).unwrap_or(&no_members);
                (recipients, recipients.binary_search(&p.draft.from).is_ok())
            }
        };
        if matches!(p.draft.conv, ConvId::Group(_)) && !p.draft.system && !is_member {
            decisions.push(Decision::Refused(Error::NotMember {
                conv: p.draft.conv.clone(),
                mid: p.draft.from,
            }));
            continue;
        }
        *seq = seq
            .checked_add(1)
            .ok_or_else(|| Error::invalid("conv", "the conversation has run out of seqs"))?;
        accepted.insert(key, decisions.len());
        decisions.push(Decision::Stored {
            message: Message {
                conv: p.draft.conv.clone(),
                seq: from_db("a seq", *seq)?,
                id: p.id,
                from: p.draft.from,
                cmid: p.draft.cmid.clone(),
                kind: p.draft.kind,
                body: p.draft.body.clone(),
                ts: p.ts,
            },
            recipients: recipients
                .iter()
                .copied()
                .filter(|&mid| holds(mid))
                .collect(),
            remote: recipients
                .iter()
                .copied()
                .filter(|&mid| !holds(mid))
                .collect(),
            inbox: Vec::new(),
            sender_member: is_member,
            big: is_big,
        });
    }
    Ok(decisions)
}

/// The batch's messages as one array per column.
#[derive(Default)]
struct MessageRows<'a> {
    conv: Vec<&'a str>,
    seq: Vec<i64>,
    id: Vec<i64>,
    sender: Vec<i64>,
    cmid: Vec<&'a str>,
    kind: Vec<i32>,
    body: Vec<&'a str>,
    ts: Vec<i64>,
}

/// The batch's inbox entries as one array per column, each numbered
/// back from its owner's new end.
#[derive(Default)]
struct InboxRows<'a> {
    mid: Vec<i64>,
    back: Vec<i64>,
    conv: Vec<&'a str>,
    seq: Vec<i64>,
}

fn split3<A, B, C>(rows: impl Iterator<Item = (A, B, C)>) -> (Vec<A>, Vec<B>, Vec<C>) {
    let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
    for (x, y, z) in rows {
        a.push(x);
        b.push(y);
        c.push(z);
    }
    (a, b, c)
}
