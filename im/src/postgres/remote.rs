//! What a [`ShardedStore`](crate::ShardedStore) asks of one primary beyond
//! the [`MessageStore`](crate::MessageStore) calls: inbox entries appended
//! for messages stored on another primary (idempotently), the outbox of
//! entries still to append elsewhere, an inbox page without its messages,
//! and messages by key.

use std::collections::{BTreeMap, HashMap};

use crate::conv::ConvId;
use crate::error::Result;
use crate::store::{InboxEntry, Message};

use super::{
    MESSAGE_COLUMNS, PostgresStore, Shared, conv_from_db, db, from_db, get, inbox_page, limit_db,
    message_at, to_db,
};

/// A message's inbox entry still to append on another primary.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Owed {
    pub(crate) conv: ConvId,
    pub(crate) seq: u64,
    pub(crate) mid: i64,
}

/// A page of one user's inbox: the entries' keys, not their messages.
pub(crate) struct InboxKeys {
    /// (sync, conv, seq), oldest first, at most the limit asked for.
    pub(crate) entries: Vec<(u64, ConvId, u64)>,
    /// More entries follow.
    pub(crate) more: bool,
    /// The user's latest entry (0 without any).
    pub(crate) latest: u64,
    /// The user's oldest retained entry (1 while nothing was pruned).
    pub(crate) oldest: u64,
}

impl PostgresStore {
    /// Appends `mid`'s entry for each `(mid, conv, seq)` whose message is
    /// stored on another primary, unless it was appended before; returns
    /// every one's entry (new or earlier), in the order given. One
    /// transaction that locks the owners' rows in mid order (as the send
    /// batches do), so concurrent appends of one entry — the send that
    /// stored it and a relay — add it once.
    pub(crate) async fn append_remote(&self, owed: &[Owed]) -> Result<Vec<InboxEntry>> {
        if owed.is_empty() {
            return Ok(Vec::new());
        }
        let mids: Vec<i64> = owed.iter().map(|o| o.mid).collect();
        let convs: Vec<String> = owed.iter().map(|o| o.conv.to_string()).collect();
        let seqs = owed
            .iter()
            .map(|o| to_db("seq", o.seq))
            .collect::<Result<Vec<i64>>>()?;
        let shared = &self.shared;
        let entries = with_client!(shared, "appending inbox entries", |client| {
            let tx = client
                .transaction()
                .await
                .map_err(db("starting an inbox append"))?;
            // The owners' rows, created or locked, in mid order.
            let lock = tx
                .prepare_cached(
                    "INSERT INTO users (mid, max_sync) \
                     SELECT mid, 0 FROM unnest($1::BIGINT[]) AS t(mid) GROUP BY mid ORDER BY mid \
                     ON CONFLICT (mid) DO UPDATE SET max_sync = users.max_sync \
                     RETURNING mid, max_sync",
                )
                .await
                .map_err(db("preparing an inbox append"))?;
            let mut max_sync: BTreeMap<i64, i64> = BTreeMap::new();
            for row in tx
                .query(&lock, &[&mids])
                .await
                .map_err(db("locking inbox owners"))?
            {
                max_sync.insert(get(&row, 0)?, get(&row, 1)?);
            }
            // Under the locks: what earlier appends already added.
            let earlier = tx
                .prepare_cached(
                    "SELECT r.mid, r.conv, r.seq, r.sync FROM inbox_remote r \
                     JOIN unnest($1::BIGINT[], $2::TEXT[], $3::BIGINT[]) AS t(mid, conv, seq) \
                     ON r.mid = t.mid AND r.conv = t.conv AND r.seq = t.seq",
                )
                .await
                .map_err(db("preparing an inbox append"))?;
            let mut found: HashMap<(i64, String, i64), i64> = HashMap::new();
            for row in tx
                .query(&earlier, &[&mids, &convs, &seqs])
                .await
                .map_err(db("reading earlier appends"))?
            {
                found.insert((get(&row, 0)?, get(&row, 1)?, get(&row, 2)?), get(&row, 3)?);
            }
            let mut syncs = Vec::with_capacity(owed.len());
            let (mut n_mid, mut n_conv, mut n_seq, mut n_sync) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for ((mid, conv), seq) in mids.iter().zip(&convs).zip(&seqs) {
                let key = (*mid, conv.clone(), *seq);
                if let Some(sync) = found.get(&key) {
                    syncs.push(*sync);
                    continue;
                }
                let Some(head) = max_sync.get_mut(mid) else {
                    return Err(crate::Error::Unavailable(crate::StoreFailure::bare(
                        "an inbox owner's row was not returned",
                    )));
                };
                *head += 1;
                syncs.push(*head);
                found.insert(key, *head);
                n_mid.push(*mid);
                n_conv.push(conv.as_str());
                n_seq.push(*seq);
                n_sync.push(*head);
            }
            if !n_mid.is_empty() {
                let (heads_mid, heads_sync): (Vec<i64>, Vec<i64>) =
                    max_sync.iter().map(|(m, s)| (*m, *s)).unzip();
                let insert = tx
                    .prepare_cached(
                        "WITH i AS (INSERT INTO inbox (mid, sync, conv, seq) \
                         SELECT * FROM unnest($1::BIGINT[], $2::BIGINT[], $3::TEXT[], $4::BIGINT[])), \
                         r AS (INSERT INTO inbox_remote (mid, sync, conv, seq) \
                         SELECT * FROM unnest($1::BIGINT[], $2::BIGINT[], $3::TEXT[], $4::BIGINT[])) \
                         UPDATE users u SET max_sync = t.max_sync \
                         FROM unnest($5::BIGINT[], $6::BIGINT[]) AS t(mid, max_sync) \
                         WHERE u.mid = t.mid",
                    )
                    .await
                    .map_err(db("preparing an inbox append"))?;
                tx.execute(
                    &insert,
                    &[&n_mid, &n_sync, &n_conv, &n_seq, &heads_mid, &heads_sync],
                )
                .await
                .map_err(db("appending inbox entries"))?;
            }
            tx.commit()
                .await
                .map_err(db("committing an inbox append"))?;
            Ok(syncs)
        })?;
        self.shared.committed();
        owed.iter()
            .zip(entries)
            .map(|(o, sync)| {
                Ok(InboxEntry {
                    mid: o.mid,
                    sync: from_db("a sync", sync)?,
                })
            })
            .collect()
    }

    /// Forgets the outbox rows of messages (conv, seq) whose every entry
    /// was appended on its primary.
    pub(crate) async fn clear_outbox(&self, done: &[(ConvId, u64)]) -> Result<()> {
        if done.is_empty() {
            return Ok(());
        }
        let convs: Vec<String> = done.iter().map(|(conv, _)| conv.to_string()).collect();
        let seqs = done
            .iter()
            .map(|(_, seq)| to_db("seq", *seq))
            .collect::<Result<Vec<i64>>>()?;
        with_client!(self.shared, "clearing the outbox", |client| {
            let clear = client
                .prepare_cached(
                    "DELETE FROM inbox_outbox o USING \
                     unnest($1::TEXT[], $2::BIGINT[]) AS t(conv, seq) \
                     WHERE o.conv = t.conv AND o.seq = t.seq",
                )
                .await
                .map_err(db("preparing an outbox clear"))?;
            client
                .execute(&clear, &[&convs, &seqs])
                .await
                .map_err(db("clearing the outbox"))?;
            Ok(())
        })
    }

    /// The entries of the outbox rows written before `before_ms` (older
    /// ones first), at most `limit` rows: what sends did not append
    /// themselves.
    pub(crate) async fn outbox_due(&self, before_ms: i64, limit: u32) -> Result<Vec<Owed>> {
        let limit = limit_db(limit.max(1));
        with_client!(self.shared, "reading the outbox", |client| {
            let due = client
                .prepare_cached(
                    "SELECT o.conv, o.seq, m FROM (SELECT conv, seq, mids FROM inbox_outbox \
                     WHERE at < $1 ORDER BY at LIMIT $2) o, unnest(o.mids) AS m",
                )
                .await
                .map_err(db("preparing an outbox read"))?;
            client
                .query(&due, &[&before_ms, &limit])
                .await
                .map_err(db("reading the outbox"))?
                .iter()
                .map(|row| {
                    Ok(Owed {
                        conv: conv_from_db(get(row, 0)?)?,
                        seq: from_db("a seq", get(row, 1)?)?,
                        mid: get(row, 2)?,
                    })
                })
                .collect()
        })
    }

    /// A page of `mid`'s inbox after `after`: the entries' keys, at most
    /// `limit`.
    pub(crate) async fn inbox_keys(&self, mid: i64, after: u64, limit: u32) -> Result<InboxKeys> {
        with_client!(self.shared, "reading an inbox", |client| {
            let (rows, more, latest, oldest) = inbox_page(
                client,
                "SELECT sync, conv, seq FROM inbox WHERE mid = $1 AND sync > $2 \
                 ORDER BY sync LIMIT $3",
                mid,
                after,
                limit,
            )
            .await?;
            let entries = rows
                .iter()
                .map(|row| {
                    Ok((
                        from_db("a sync", get(row, 0)?)?,
                        conv_from_db(get(row, 1)?)?,
                        from_db("a seq", get(row, 2)?)?,
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(InboxKeys {
                entries,
                more,
                latest,
                oldest,
            })
        })
    }

    /// The messages stored under `keys` (conv, seq); a key whose message
    /// is not here (pruned) is left out.
    pub(crate) async fn messages_at(&self, keys: &[(ConvId, u64)]) -> Result<Vec<Message>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let convs: Vec<String> = keys.iter().map(|(c, _)| c.to_string()).collect();
        let seqs = keys
            .iter()
            .map(|(_, s)| to_db("seq", *s))
            .collect::<Result<Vec<i64>>>()?;
        with_client!(self.shared, "reading messages", |client| {
            let select = client
                .prepare_cached(&format!(
                    "SELECT {MESSAGE_COLUMNS} FROM unnest($1::TEXT[], $2::BIGINT[]) AS t(conv, seq) \
                     CROSS JOIN LATERAL (SELECT * FROM messages \
                     WHERE conv = t.conv AND seq = t.seq LIMIT 1) m"
                ))
                .await
                .map_err(db("preparing a message read"))?;
            client
                .query(&select, &[&convs, &seqs])
                .await
                .map_err(db("reading messages"))?
                .iter()
                .map(|row| message_at(row, 0))
                .collect()
        })
    }
}

impl PostgresStore {
    /// Users whose inbox is here with a mid above `after`, ascending, at
    /// most `limit`: (mid, oldest retained sync, latest sync).
    pub(crate) async fn inbox_users(&self, after: i64, limit: u32) -> Result<Vec<(i64, u64, u64)>> {
        let limit = limit_db(limit.max(1));
        with_client!(self.shared, "sweeping inboxes", |client| {
            let users = client
                .prepare_cached(
                    "SELECT mid, min_sync, max_sync FROM users WHERE mid > $1 ORDER BY mid LIMIT $2",
                )
                .await
                .map_err(db("preparing an inbox sweep"))?;
            client
                .query(&users, &[&after, &limit])
                .await
                .map_err(db("sweeping inboxes"))?
                .iter()
                .map(|row| {
                    Ok((
                        get(row, 0)?,
                        from_db("a sync", get(row, 1)?)?,
                        from_db("a sync", get(row, 2)?)?,
                    ))
                })
                .collect()
        })
    }

    /// Removes `mid`'s entries below `upto` and moves its floor there, in
    /// one statement (with the records of late appends among them);
    /// returns how many entries went.
    pub(crate) async fn cut_inbox(&self, mid: i64, upto: u64) -> Result<u64> {
        let upto = to_db("a sync", upto)?;
        with_client!(self.shared, "pruning an inbox", |client| {
            let cut = client
                .prepare_cached(
                    "WITH d AS (DELETE FROM inbox WHERE mid = $1 AND sync < $2 RETURNING 1), \
                     r AS (DELETE FROM inbox_remote WHERE mid = $1 AND sync < $2), \
                     u AS (UPDATE users SET min_sync = GREATEST(min_sync, $2) WHERE mid = $1) \
                     SELECT count(*) FROM d",
                )
                .await
                .map_err(db("preparing an inbox prune"))?;
            let row = client
                .query_one(&cut, &[&mid, &upto])
                .await
                .map_err(db("pruning an inbox"))?;
            from_db("a count", get(&row, 0)?)
        })
    }
}
