//! Retention on PostgreSQL: one bounded pruning step (store.rs, "Retention").
//!
//! Each removal is one statement that deletes the rows and moves the floor
//! together (a data-modifying WITH), so a crash between the two cannot
//! leave rows gone while the floor still claims them, and each locks one
//! counter row only (a conversation's or a user's), so it cannot deadlock
//! with the send batches. Several processes may prune at once: deletes of
//! gone rows find nothing, and floors only move up.

use std::collections::BTreeMap;

use crate::error::Result;
use crate::id::MessageId;
use crate::store::{InboxCut, PRUNE_SWEEP, PruneCursor, PruneStep, Pruned, Retention};

use super::{Object, db, from_db, get, to_db};

/// Runs one step of at most `budget` removed rows, continuing the sweeps
/// from `cursor`.
pub(super) async fn step(
    client: &Object,
    retention: &Retention,
    budget: u64,
    cursor: &mut PruneCursor,
    inboxes: bool,
) -> Result<Pruned> {
    let mut step = PruneStep::new(budget);
    if !retention.prunes() {
        return Ok(step.pruned);
    }
    let budget_db = to_db("budget", budget)?;
    // conv -> its newest expired seq (when the age limit reaches it).
    let mut expired: BTreeMap<String, Option<u64>> = BTreeMap::new();
    if let Some(before_ms) = retention.before_ms {
        let cut = to_db("a message id", MessageId::first_at(before_ms).as_u64())?;
        let oldest = client
            .prepare_cached(
                "SELECT conv, max(seq), count(*) FROM \
                 (SELECT conv, seq FROM messages WHERE id < $1 ORDER BY id LIMIT $2) t \
                 GROUP BY conv",
            )
            .await
            .map_err(db("preparing a retention step"))?;
        let mut found = 0;
        for row in client
            .query(&oldest, &[&cut, &budget_db])
            .await
            .map_err(db("finding expired messages"))?
        {
            expired.insert(get(&row, 0)?, Some(from_db("a seq", get(&row, 1)?)?));
            found += from_db("a count", get(&row, 2)?)?;
        }
        step.expired_found(found);
    }
    // conv -> (max_seq, min_seq).
    let mut bounds: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    if retention.max_per_conv.is_some() {
        let sweep = client
            .prepare_cached(
                "SELECT conv, max_seq, min_seq FROM convs WHERE conv > $1 ORDER BY conv LIMIT $2",
            )
            .await
            .map_err(db("preparing a retention step"))?;
        let rows = client
            .query(&sweep, &[&cursor.conv, &i64::from(PRUNE_SWEEP)])
            .await
            .map_err(db("sweeping conversations"))?;
        cursor.conv = match rows.last() {
            Some(row) if rows.len() >= PRUNE_SWEEP as usize => get(row, 0)?,
            _ => String::new(),
        };
        step.swept(cursor.conv.is_empty());
        for row in &rows {
            let conv: String = get(row, 0)?;
            bounds.insert(
                conv.clone(),
                (
                    from_db("a seq", get(row, 1)?)?,
                    from_db("a seq", get(row, 2)?)?,
                ),
            );
            expired.entry(conv).or_insert(None);
        }
    }
    let unknown: Vec<&str> = expired
        .keys()
        .filter(|conv| !bounds.contains_key(*conv))
        .map(String::as_str)
        .collect();
    if !unknown.is_empty() {
        let read = client
            .prepare_cached("SELECT conv, max_seq, min_seq FROM convs WHERE conv = ANY($1)")
            .await
            .map_err(db("preparing a retention step"))?;
        for row in client
            .query(&read, &[&unknown])
            .await
            .map_err(db("reading conversations' bounds"))?
        {
            bounds.insert(
                get(&row, 0)?,
                (
                    from_db("a seq", get(&row, 1)?)?,
                    from_db("a seq", get(&row, 2)?)?,
                ),
            );
        }
    }

    let cut_messages = client
        .prepare_cached(
            "WITH d AS (DELETE FROM messages WHERE conv = $1 AND seq < $2 RETURNING 1), \
             c AS (UPDATE convs SET min_seq = GREATEST(min_seq, $2) WHERE conv = $1) \
             SELECT count(*) FROM d",
        )
        .await
        .map_err(db("preparing a retention step"))?;
    for (conv, newest_expired) in &expired {
        let Some(&(max_seq, min_seq)) = bounds.get(conv) else {
            continue;
        };
        let Some(upto) = step.conv_upto(retention, max_seq, min_seq, *newest_expired) else {
            continue;
        };
        let row = client
            .query_one(&cut_messages, &[conv, &to_db("a seq", upto)?])
            .await
            .map_err(db("removing expired messages"))?;
        step.removed_messages(from_db("a count", get(&row, 0)?)?);
    }

    // Inboxes: each swept user's entries before the first one whose
    // message is still there. A primary of a sharded store cannot tell
    // (the messages may be on another one): it keeps them.
    if !inboxes {
        return Ok(step.pruned);
    }
    let sweep = client
        .prepare_cached(
            "SELECT u.mid, u.min_sync, coalesce(k.sync, u.max_sync + 1) FROM users u \
             LEFT JOIN LATERAL (SELECT i.sync FROM inbox i WHERE i.mid = u.mid \
             AND i.sync >= u.min_sync AND EXISTS \
             (SELECT 1 FROM messages m WHERE m.conv = i.conv AND m.seq = i.seq) \
             ORDER BY i.sync LIMIT 1) k ON true \
             WHERE u.mid > $1 ORDER BY u.mid LIMIT $2",
        )
        .await
        .map_err(db("preparing a retention step"))?;
    let cut_inbox = client
        .prepare_cached(
            "WITH d AS (DELETE FROM inbox WHERE mid = $1 AND sync < $2 RETURNING 1), \
             u AS (UPDATE users SET min_sync = GREATEST(min_sync, $2) WHERE mid = $1) \
             SELECT count(*) FROM d",
        )
        .await
        .map_err(db("preparing a retention step"))?;
    let users = client
        .query(&sweep, &[&cursor.mid, &i64::from(PRUNE_SWEEP)])
        .await
        .map_err(db("sweeping inboxes"))?;
    let mut swept_all = users.len() < PRUNE_SWEEP as usize;
    for row in &users {
        let mid: i64 = get(row, 0)?;
        let min_sync = from_db("a sync", get(row, 1)?)?;
        let first_kept = from_db("a sync", get(row, 2)?)?;
        match step.inbox_cut(min_sync, first_kept) {
            InboxCut::Keep => {}
            InboxCut::Stop => {
                swept_all = false;
                break;
            }
            InboxCut::Cut { upto, all } => {
                let row = client
                    .query_one(&cut_inbox, &[&mid, &to_db("a sync", upto)?])
                    .await
                    .map_err(db("removing inbox entries"))?;
                step.removed_inbox(from_db("a count", get(&row, 0)?)?);
                if !all {
                    // This user has more: the next step starts with it.
                    swept_all = false;
                    break;
                }
            }
        }
        cursor.mid = mid;
    }
    if swept_all {
        cursor.mid = i64::MIN;
    }
    step.swept(swept_all);
    Ok(step.pruned)
}
