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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

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
        recipients: Vec<i64>,
        inbox: Vec<InboxEntry>,
    },
    /// Already stored (before, or earlier in this batch).
    Duplicate(Message),
    /// Refused; the rest of the batch goes on.
    Refused(Error),
}

/// Stores one batch and answers each of its sends.
async fn write(shared: &Shared, jobs: Vec<Job>) {
    let mut plan = Vec::with_capacity(jobs.len());
    let mut replies = Vec::with_capacity(jobs.len());
    for job in jobs {
        let id = shared.ids.next();
        let planned = i64::try_from(id.as_u64())
            .map_err(|e| Error::unavailable("a message id over 63 bits", e))
            .and_then(|id_db| {
                let ts = i64::try_from(id.unix_ms())
                    .map_err(|e| Error::unavailable("a message time over 63 bits", e))?;
                Ok((id_db, ts))
            });
        match planned {
            Ok((id_db, ts)) => {
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
        let client = match shared.client("storing sends").await {
            Ok(client) => client,
            Err(e) => break Err(e),
        };
        let mut client = client;
        let mut committing = false;
        let outcome =
            tokio::time::timeout(shared.bound(), store(&mut client, &plan, &mut committing)).await;
        match shared.settle("storing sends", client, outcome) {
            Ok(decisions) => break Ok(decisions),
            Err(e) if attempt < shared.attempts && retryable(&e, committing) => continue,
            Err(e) => break Err(e),
        }
    };
    match outcome {
        Ok(decisions) => {
            shared.committed();
            for (decision, reply_tx) in decisions.into_iter().zip(replies) {
                let answer = match decision {
                    Decision::Stored { message, inbox, .. } => Ok(Sent {
                        message,
                        duplicate: false,
                        inbox,
                    }),
                    Decision::Duplicate(message) => Ok(Sent {
                        message,
                        duplicate: true,
                        inbox: Vec::new(),
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

/// Runs one attempt at storing `plan` in one transaction; `committing`
/// turns true once the commit has been asked for (its outcome is then
/// unknown on a lost connection).
async fn store(
    client: &mut Object,
    plan: &[Planned],
    committing: &mut bool,
) -> Result<Vec<Decision>> {
    let tx = client.transaction().await.map_err(db("starting a batch"))?;

    // 1. The conversations' rows, in byte order: groups ("g:…") exist
    // already (put_group creates them) and are locked as they are; pairs
    // ("p:…") are created on their first message.
    let mut groups = BTreeSet::new();
    let mut pairs = BTreeSet::new();
    for p in plan {
        match p.draft.conv {
            ConvId::Group(_) => groups.insert(p.conv.as_str()),
            ConvId::Peer { .. } => pairs.insert(p.conv.as_str()),
        };
    }
    let mut max_seq: HashMap<String, i64> = HashMap::new();
    if !groups.is_empty() {
        let lock = tx
            .prepare_cached(
                "SELECT conv, max_seq FROM convs WHERE conv = ANY($1) \
                 ORDER BY conv COLLATE \"C\" FOR UPDATE",
            )
            .await
            .map_err(db("preparing a batch"))?;
        let groups: Vec<&str> = groups.into_iter().collect();
        for row in tx
            .query(&lock, &[&groups])
            .await
            .map_err(db("locking the batch's groups"))?
        {
            max_seq.insert(get(&row, 0)?, get(&row, 1)?);
        }
    }
    if !pairs.is_empty() {
        let lock = tx
            .prepare_cached(
                "INSERT INTO convs (conv, max_seq, last_ts) \
                 SELECT conv, 0, 0 FROM unnest($1::TEXT[]) AS t(conv) ORDER BY conv COLLATE \"C\" \
                 ON CONFLICT (conv) DO UPDATE SET max_seq = convs.max_seq \
                 RETURNING conv, max_seq",
            )
            .await
            .map_err(db("preparing a batch"))?;
        let pairs: Vec<&str> = pairs.into_iter().collect();
        let mut new_convs = Vec::new();
        let mut new_mids = Vec::new();
        for row in tx
            .query(&lock, &[&pairs])
            .await
            .map_err(db("locking the batch's conversations"))?
        {
            let conv: String = get(&row, 0)?;
            let seq: i64 = get(&row, 1)?;
            if seq == 0 {
                // A new pair: both users become members (one for p:7:7);
                // members of a pair are never removed, so this is once.
                if let Ok(ConvId::Peer { low, high }) = conv.parse::<ConvId>() {
                    new_convs.push(conv.clone());
                    new_mids.push(low);
                    if high != low {
                        new_convs.push(conv.clone());
                        new_mids.push(high);
                    }
                }
            }
            max_seq.insert(conv, seq);
        }
        if !new_convs.is_empty() {
            let insert = tx
                .prepare_cached(
                    "INSERT INTO members (conv, mid, read_seq) \
                     SELECT conv, mid, 0 FROM unnest($1::TEXT[], $2::BIGINT[]) AS t(conv, mid) \
                     ON CONFLICT DO NOTHING",
                )
                .await
                .map_err(db("preparing a batch"))?;
            tx.execute(&insert, &[&new_convs, &new_mids])
                .await
                .map_err(db("adding a conversation's members"))?;
        }
    }

    // 2. Members and earlier sends, read under the conversation locks.
    let convs: Vec<&str> = max_seq.keys().map(String::as_str).collect();
    let mut members: HashMap<String, Vec<i64>> = HashMap::new();
    if !convs.is_empty() {
        let select = tx
            .prepare_cached("SELECT conv, mid FROM members WHERE conv = ANY($1)")
            .await
            .map_err(db("preparing a batch"))?;
        for row in tx
            .query(&select, &[&convs])
            .await
            .map_err(db("reading the batch's members"))?
        {
            members
                .entry(get(&row, 0)?)
                .or_default()
                .push(get(&row, 1)?);
        }
        for mids in members.values_mut() {
            mids.sort_unstable();
        }
    }
    let mut stored: HashMap<(String, i64, String), Message> = HashMap::new();
    {
        let mut keys = BTreeSet::new();
        for p in plan
            .iter()
            .filter(|p| max_seq.get(&p.conv).is_some_and(|s| *s > 0))
        {
            keys.insert((p.conv.as_str(), p.draft.from, p.draft.cmid.as_str()));
        }
        if !keys.is_empty() {
            let (mut k_conv, mut k_from, mut k_cmid) = (Vec::new(), Vec::new(), Vec::new());
            for (conv, from, cmid) in keys {
                k_conv.push(conv);
                k_from.push(from);
                k_cmid.push(cmid);
            }
            let select = tx
                .prepare_cached(&format!(
                    "SELECT {MESSAGE_COLUMNS} FROM messages m \
                     JOIN unnest($1::TEXT[], $2::BIGINT[], $3::TEXT[]) AS t(conv, sender, cmid) \
                     ON m.conv = t.conv AND m.sender = t.sender AND m.cmid = t.cmid"
                ))
                .await
                .map_err(db("preparing a batch"))?;
            for row in tx
                .query(&select, &[&k_conv, &k_from, &k_cmid])
                .await
                .map_err(db("looking up earlier sends"))?
            {
                let message = message_at(&row, 0)?;
                stored.insert(
                    (message.conv.to_string(), message.from, message.cmid.clone()),
                    message,
                );
            }
        }
    }

    // 3. Decide each send in the batch's order.
    let mut decisions: Vec<Decision> = Vec::with_capacity(plan.len());
    let mut accepted: HashMap<(&str, i64, &str), usize> = HashMap::new();
    let mut inbox_counts: BTreeMap<i64, i64> = BTreeMap::new();
    let no_members: Vec<i64> = Vec::new();
    for p in plan {
        let key = (p.conv.as_str(), p.draft.from, p.draft.cmid.as_str());
        if let Some(message) = stored.get(&(p.conv.clone(), p.draft.from, p.draft.cmid.clone())) {
            decisions.push(Decision::Duplicate(message.clone()));
            continue;
        }
        if let Some(&earlier) = accepted.get(&key)
            && let Some(Decision::Stored { message, .. }) = decisions.get(earlier)
        {
            decisions.push(Decision::Duplicate(message.clone()));
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
        let recipients = members.get(&p.conv).unwrap_or(&no_members);
        let is_member = recipients.binary_search(&p.draft.from).is_ok();
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
        for mid in recipients {
            *inbox_counts.entry(*mid).or_default() += 1;
        }
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
            recipients: recipients.clone(),
            inbox: Vec::new(),
        });
    }

    // 4. The inbox owners' rows, in mid order: each takes its count of
    // new entries in the same statement that locks it.
    let mut next_sync: HashMap<i64, i64> = HashMap::new();
    if !inbox_counts.is_empty() {
        let (mids, counts): (Vec<i64>, Vec<i64>) =
            inbox_counts.iter().map(|(m, n)| (*m, *n)).unzip();
        let lock = tx
            .prepare_cached(
                "INSERT INTO users (mid, max_sync) \
                 SELECT mid, n FROM unnest($1::BIGINT[], $2::BIGINT[]) AS t(mid, n) ORDER BY mid \
                 ON CONFLICT (mid) DO UPDATE SET max_sync = users.max_sync + EXCLUDED.max_sync \
                 RETURNING mid, max_sync",
            )
            .await
            .map_err(db("preparing a batch"))?;
        for row in tx
            .query(&lock, &[&mids, &counts])
            .await
            .map_err(db("locking the batch's inboxes"))?
        {
            let mid: i64 = get(&row, 0)?;
            let max_sync: i64 = get(&row, 1)?;
            let count = inbox_counts.get(&mid).copied().unwrap_or(0);
            next_sync.insert(mid, max_sync - count + 1);
        }
    }

    // 5. The rows, a handful of statements for the whole batch.
    let mut m = MessageRows::default();
    let mut inbox = InboxRows::default();
    let mut conv_heads: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    let mut reads: BTreeMap<(&str, i64), i64> = BTreeMap::new();
    for (p, decision) in plan.iter().zip(decisions.iter_mut()) {
        let Decision::Stored {
            message,
            recipients,
            inbox: entries,
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
        for mid in recipients.iter() {
            let Some(sync) = next_sync.get_mut(mid) else {
                return Err(Error::Unavailable(crate::StoreFailure::bare(
                    "an inbox owner's row was not locked",
                )));
            };
            entries.push(InboxEntry {
                mid: *mid,
                sync: from_db("a sync", *sync)?,
            });
            inbox.mid.push(*mid);
            inbox.sync.push(*sync);
            inbox.conv.push(p.conv.as_str());
            inbox.seq.push(seq);
            *sync += 1;
        }
        conv_heads.insert(p.conv.as_str(), (seq, p.ts));
        if recipients.binary_search(&p.draft.from).is_ok() {
            let read = reads.entry((p.conv.as_str(), p.draft.from)).or_default();
            *read = (*read).max(seq);
        }
    }
    if !m.conv.is_empty() {
        let insert_messages = tx
            .prepare_cached(
                "INSERT INTO messages (conv, seq, id, sender, cmid, kind, body, ts) \
                 SELECT * FROM unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[], \
                 $5::TEXT[], $6::INT[], $7::TEXT[], $8::BIGINT[])",
            )
            .await
            .map_err(db("preparing a batch"))?;
        let insert_inbox = tx
            .prepare_cached(
                "INSERT INTO inbox (mid, sync, conv, seq) \
                 SELECT * FROM unnest($1::BIGINT[], $2::BIGINT[], $3::TEXT[], $4::BIGINT[])",
            )
            .await
            .map_err(db("preparing a batch"))?;
        let update_convs = tx
            .prepare_cached(
                "UPDATE convs c SET max_seq = t.max_seq, last_ts = t.last_ts \
                 FROM unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[]) AS t(conv, max_seq, last_ts) \
                 WHERE c.conv = t.conv",
            )
            .await
            .map_err(db("preparing a batch"))?;
        let update_reads = tx
            .prepare_cached(
                "UPDATE members m SET read_seq = GREATEST(m.read_seq, t.seq) \
                 FROM unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[]) AS t(conv, mid, seq) \
                 WHERE m.conv = t.conv AND m.mid = t.mid",
            )
            .await
            .map_err(db("preparing a batch"))?;
        let (h_conv, h_seq, h_ts) = split3(conv_heads.iter().map(|(c, (s, t))| (*c, *s, *t)));
        let (r_conv, r_mid, r_seq) = split3(reads.iter().map(|((c, mid), s)| (*c, *mid, *s)));
        // Independent statements of one transaction: pipelined on the
        // connection rather than one round trip each.
        tokio::try_join!(
            async {
                tx.execute(
                    &insert_messages,
                    &[
                        &m.conv, &m.seq, &m.id, &m.sender, &m.cmid, &m.kind, &m.body, &m.ts,
                    ],
                )
                .await
                .map_err(db("storing the batch's messages"))
            },
            async {
                if inbox.mid.is_empty() {
                    return Ok(0);
                }
                tx.execute(
                    &insert_inbox,
                    &[&inbox.mid, &inbox.sync, &inbox.conv, &inbox.seq],
                )
                .await
                .map_err(db("storing the batch's inbox entries"))
            },
            async {
                tx.execute(&update_convs, &[&h_conv, &h_seq, &h_ts])
                    .await
                    .map_err(db("moving the batch's conversations"))
            },
            async {
                if r_conv.is_empty() {
                    return Ok(0);
                }
                tx.execute(&update_reads, &[&r_conv, &r_mid, &r_seq])
                    .await
                    .map_err(db("moving the senders' read positions"))
            },
        )?;
    }
    *committing = true;
    tx.commit().await.map_err(db("committing a batch"))?;
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

/// The batch's inbox entries as one array per column.
#[derive(Default)]
struct InboxRows<'a> {
    mid: Vec<i64>,
    sync: Vec<i64>,
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
