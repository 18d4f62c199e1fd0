//! Retention on SQLite: one bounded pruning step (store.rs, "Retention"),
//! run by the writer thread like any write, so it commits with its batch
//! and never races a send: a conversation's rows and its floor, a user's
//! entries and theirs, go together.

use std::collections::BTreeMap;

use rusqlite::{Connection, params};

use crate::error::Result;
use crate::id::MessageId;
use crate::store::{InboxCut, PRUNE_SWEEP, PruneCursor, PruneStep, Pruned, Retention};

use super::{failed, from_sql};

/// Runs one step of at most `budget` removed rows, continuing the sweeps
/// from `cursor`.
pub(super) fn step(
    conn: &Connection,
    retention: &Retention,
    budget: u64,
    cursor: &mut PruneCursor,
) -> Result<Pruned> {
    let mut step = PruneStep::new(budget);
    if !retention.prunes() {
        return Ok(step.pruned);
    }
    let budget_sql = i64::try_from(budget).unwrap_or(i64::MAX);
    // conv -> its newest expired seq (when the age limit reaches it).
    let mut expired: BTreeMap<String, Option<u64>> = BTreeMap::new();
    if let Some(before_ms) = retention.before_ms {
        let cut = i64::try_from(MessageId::first_at(before_ms).as_u64()).unwrap_or(i64::MAX);
        let mut found = 0;
        let mut oldest = conn
            .prepare_cached(
                "SELECT conv, max(seq), count(*) FROM \
                 (SELECT conv, seq FROM messages WHERE id < ?1 ORDER BY id LIMIT ?2) \
                 GROUP BY conv",
            )
            .map_err(failed("finding expired messages"))?;
        let mut rows = oldest
            .query(params![cut, budget_sql])
            .map_err(failed("finding expired messages"))?;
        while let Some(row) = rows.next().map_err(failed("finding expired messages"))? {
            let conv: String = row.get(0).map_err(failed("finding expired messages"))?;
            let seq: i64 = row.get(1).map_err(failed("finding expired messages"))?;
            let count: i64 = row.get(2).map_err(failed("finding expired messages"))?;
            expired.insert(conv, Some(from_sql("seq", seq)?));
            found += from_sql("count", count)?;
        }
        step.expired_found(found);
    }
    // conv -> (max_seq, min_seq).
    let mut bounds: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    if retention.max_per_conv.is_some() {
        let mut sweep = conn
            .prepare_cached(
                "SELECT conv, max_seq, min_seq FROM convs WHERE conv > ?1 ORDER BY conv LIMIT ?2",
            )
            .map_err(failed("sweeping conversations"))?;
        let rows = sweep
            .query_map(params![cursor.conv, PRUNE_SWEEP], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, i64>(2)?,
                ))
            })
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(failed("sweeping conversations"))?;
        cursor.conv = match rows.last() {
            Some((conv, ..)) if rows.len() >= PRUNE_SWEEP as usize => conv.clone(),
            _ => String::new(),
        };
        step.swept(cursor.conv.is_empty());
        for (conv, max_seq, min_seq) in rows {
            bounds.insert(
                conv.clone(),
                (from_sql("seq", max_seq)?, from_sql("seq", min_seq)?),
            );
            expired.entry(conv).or_insert(None);
        }
    }

    let mut read_bounds = conn
        .prepare_cached("SELECT max_seq, min_seq FROM convs WHERE conv = ?1")
        .map_err(failed("reading a conversation's bounds"))?;
    for (conv, newest_expired) in &expired {
        let (max_seq, min_seq) = match bounds.get(conv) {
            Some(found) => *found,
            None => {
                let (max_seq, min_seq): (i64, i64) = read_bounds
                    .query_row([conv], |row| Ok((row.get(0)?, row.get(1)?)))
                    .map_err(failed("reading a conversation's bounds"))?;
                (from_sql("seq", max_seq)?, from_sql("seq", min_seq)?)
            }
        };
        let Some(upto) = step.conv_upto(retention, max_seq, min_seq, *newest_expired) else {
            continue;
        };
        let upto = i64::try_from(upto).unwrap_or(i64::MAX);
        let removed = conn
            .prepare_cached("DELETE FROM messages WHERE conv = ?1 AND seq < ?2")
            .and_then(|mut stmt| stmt.execute(params![conv, upto]))
            .map_err(failed("removing expired messages"))?;
        conn.prepare_cached("UPDATE convs SET min_seq = max(min_seq, ?2) WHERE conv = ?1")
            .and_then(|mut stmt| stmt.execute(params![conv, upto]))
            .map_err(failed("moving a conversation's floor"))?;
        step.removed_messages(removed as u64);
    }

    // Inboxes: each swept user's entries before the first one whose
    // message is still there.
    let users = conn
        .prepare_cached(
            "SELECT u.mid, u.min_sync, coalesce((SELECT i.sync FROM inbox i \
             WHERE i.mid = u.mid AND i.sync >= u.min_sync AND EXISTS \
             (SELECT 1 FROM messages m WHERE m.conv = i.conv AND m.seq = i.seq) \
             ORDER BY i.sync LIMIT 1), u.max_sync + 1) \
             FROM users u WHERE u.mid > ?1 ORDER BY u.mid LIMIT ?2",
        )
        .and_then(|mut stmt| {
            stmt.query_map(params![cursor.mid, PRUNE_SWEEP], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, i64>(2)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(failed("sweeping inboxes"))?;
    let mut swept_all = users.len() < PRUNE_SWEEP as usize;
    for (mid, min_sync, first_kept) in users {
        match step.inbox_cut(from_sql("sync", min_sync)?, from_sql("sync", first_kept)?) {
            InboxCut::Keep => {}
            InboxCut::Stop => {
                swept_all = false;
                break;
            }
            InboxCut::Cut { upto, all } => {
                let upto = i64::try_from(upto).unwrap_or(i64::MAX);
                let removed = conn
                    .prepare_cached("DELETE FROM inbox WHERE mid = ?1 AND sync < ?2")
                    .and_then(|mut stmt| stmt.execute(params![mid, upto]))
                    .map_err(failed("removing inbox entries"))?;
                conn.prepare_cached("UPDATE users SET min_sync = max(min_sync, ?2) WHERE mid = ?1")
                    .and_then(|mut stmt| stmt.execute(params![mid, upto]))
                    .map_err(failed("moving an inbox's floor"))?;
                step.removed_inbox(removed as u64);
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
