//! The raw SQLite baseline of the IM benchmarks: the rows rim's SQLite store
//! writes for a 1:1 SEND, inserted by a plain program in batched durable
//! transactions, as fast as it can — no sockets, no lookups, no dedup, no
//! pushes. rim's send rate is reported as a share of this one.
//!
//! The file is created by rim-im's own `SqliteStore::open` (so the schema is
//! rim's, exactly), then written through a separate connection with the
//! store's pragmas (WAL, `synchronous` FULL unless asked otherwise). Per
//! message, the same rows as rim's writer: the `messages` row, the
//! conversation's `convs` counter, one `users` counter and one `inbox` row
//! for each of the two users, the sender's read position in `members`
//! (and the two `members` rows with a conversation's first message).
//! Sequences and inbox counters are kept in memory instead of being read
//! back, which is what makes it raw.
//!
//! The same writer fills a history file before rim is started on it
//! (`im-history`): rim then reads rows it would have written itself.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, ensure};
use rim_im::{IdGenerator, MAX_NODE, SqliteOptions, SqliteStore};
use rusqlite::{Connection, TransactionBehavior, params};
use serde::Serialize;

/// Rows written per message after a conversation's first: messages, convs,
/// two users, two inbox, the sender's members row.
pub const ROWS_PER_MESSAGE: u64 = 7;

/// What to write.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The 1:1 conversations as (sender, recipient); message `i` goes to
    /// conversation `i % len`, from its sender.
    pub pairs: Vec<(i64, i64)>,
    /// Messages in all.
    pub messages: u64,
    /// Messages per transaction (one commit, one fsync with FULL).
    pub batch: u64,
    /// Body length in bytes.
    pub body_bytes: usize,
    /// `synchronous` = FULL (else NORMAL).
    pub full_sync: bool,
    /// Stop after this many seconds even if not all messages are written.
    pub max_secs: f64,
}

/// What the raw writer did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Outcome {
    /// Messages committed.
    pub messages: u64,
    /// Rows written (inserts and updates), members rows included.
    pub rows: u64,
    /// Commits.
    pub commits: u64,
    /// Messages per commit.
    pub batch: u64,
    /// Seconds from the first BEGIN to the last COMMIT.
    pub secs: f64,
    /// Messages per second.
    pub msgs_per_sec: f64,
    /// Rows per second.
    pub rows_per_sec: f64,
    /// Commits (fsyncs with FULL) per second.
    pub commits_per_sec: f64,
    /// CPU seconds of this process over the run (the writer is all it does).
    pub cpu_seconds: f64,
    /// Bytes this process wrote to storage over the run (`/proc/self/io`).
    pub write_bytes: Option<u64>,
    /// `journal_mode` and `synchronous` as SQLite reported them.
    pub journal_mode: String,
    /// 2 = FULL, 1 = NORMAL.
    pub synchronous: i64,
    /// File size after the run (main file + WAL), bytes.
    pub file_bytes: u64,
}

/// [`write`] on a blocking thread, printing the messages written so far
/// about once a second after `label`.
pub async fn write_reporting(
    path: PathBuf,
    plan: Plan,
    label: &'static str,
) -> anyhow::Result<Outcome> {
    tokio::task::spawn_blocking(move || {
        let mut last = Instant::now();
        write(&path, &plan, |n| {
            if last.elapsed() >= std::time::Duration::from_secs(1) {
                last = Instant::now();
                eprintln!("  {label} {n} messages");
            }
        })
    })
    .await
    .context("raw writer task")?
}

/// Creates `path` with rim's schema (it must not exist yet) and writes
/// `plan` into it; `progress` is called after each commit with the messages
/// written so far.
pub fn write(path: &Path, plan: &Plan, mut progress: impl FnMut(u64)) -> anyhow::Result<Outcome> {
    ensure!(
        !path.exists(),
        "{} exists: the raw writer starts from a fresh file",
        path.display()
    );
    ensure!(!plan.pairs.is_empty(), "no conversation to write");
    ensure!(plan.batch > 0, "the batch size must be at least 1");
    // rim's own code creates the schema, then lets the file go.
    let ids = Arc::new(IdGenerator::new(MAX_NODE).context("id generator")?);
    drop(
        SqliteStore::open(path, SqliteOptions::new(Arc::clone(&ids)))
            .with_context(|| format!("creating {} with rim's schema", path.display()))?,
    );

    let mut conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
    let journal_mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    conn.pragma_update(None, "synchronous", if plan.full_sync { 2 } else { 1 })?;
    let synchronous: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0))?;

    let body: String = "x".repeat(plan.body_bytes);
    let convs: Vec<(String, i64, i64)> = plan
        .pairs
        .iter()
        .map(|&(from, to)| (format!("p:{}:{}", from.min(to), from.max(to)), from, to))
        .collect();
    let mut seqs = vec![0i64; convs.len()];
    let mut syncs: HashMap<i64, i64> = HashMap::new();
    let cpu_before = crate::procstat::cpu_seconds(std::process::id()).unwrap_or(0.0);
    let written_before = crate::procstat::write_bytes(std::process::id());
    let started = Instant::now();
    let mut out = Outcome {
        journal_mode,
        synchronous,
        batch: plan.batch,
        ..Outcome::default()
    };
    while out.messages < plan.messages && started.elapsed().as_secs_f64() < plan.max_secs {
        let end = (out.messages + plan.batch).min(plan.messages);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut members = tx.prepare_cached(
                "INSERT INTO members (conv, mid, read_seq) VALUES (?1, ?2, 0), (?1, ?3, 0) \
                 ON CONFLICT DO NOTHING",
            )?;
            let mut conv_up = tx.prepare_cached(
                "INSERT INTO convs (conv, max_seq, last_ts) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (conv) DO UPDATE SET max_seq = excluded.max_seq, \
                 last_ts = excluded.last_ts",
            )?;
            let mut message = tx.prepare_cached(
                "INSERT INTO messages (conv, seq, id, sender, cmid, kind, body, ts) \
                 VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6, ?7)",
            )?;
            let mut user = tx.prepare_cached(
                "INSERT INTO users (mid, max_sync) VALUES (?1, ?2) \
                 ON CONFLICT (mid) DO UPDATE SET max_sync = excluded.max_sync",
            )?;
            let mut inbox = tx.prepare_cached(
                "INSERT INTO inbox (mid, sync, conv, seq) VALUES (?1, ?2, ?3, ?4)",
            )?;
            let mut read = tx.prepare_cached(
                "UPDATE members SET read_seq = ?3 WHERE conv = ?1 AND mid = ?2 AND read_seq < ?3",
            )?;
            for i in out.messages..end {
                let c = usize::try_from(i % convs.len() as u64).unwrap_or(0);
                let (conv, from, to) = &convs[c];
                let (low, high) = ((*from).min(*to), (*from).max(*to));
                seqs[c] += 1;
                let seq = seqs[c];
                if seq == 1 {
                    out.rows += members.execute(params![conv, low, high])? as u64;
                }
                let id = ids.next();
                let stored_id = i64::try_from(id.as_u64()).context("message id overflows")?;
                let ts = i64::try_from(id.unix_ms()).context("timestamp overflows")?;
                conv_up.execute(params![conv, seq, ts])?;
                message.execute(params![
                    conv,
                    seq,
                    stored_id,
                    from,
                    format!("r{i}"),
                    body,
                    ts
                ])?;
                for mid in [low, high] {
                    let sync = syncs.entry(mid).or_insert(0);
                    *sync += 1;
                    user.execute(params![mid, *sync])?;
                    inbox.execute(params![mid, *sync, conv, seq])?;
                }
                read.execute(params![conv, from, seq])?;
                out.rows += ROWS_PER_MESSAGE;
            }
        }
        tx.commit()?;
        out.commits += 1;
        out.messages = end;
        progress(out.messages);
    }
    out.secs = started.elapsed().as_secs_f64();
    out.cpu_seconds =
        crate::procstat::cpu_seconds(std::process::id()).unwrap_or(cpu_before) - cpu_before;
    if out.secs > 0.0 {
        out.msgs_per_sec = out.messages as f64 / out.secs;
        out.rows_per_sec = out.rows as f64 / out.secs;
        out.commits_per_sec = out.commits as f64 / out.secs;
    }
    drop(conn);
    out.write_bytes = crate::procstat::write_bytes(std::process::id())
        .zip(written_before)
        .map(|(after, before)| after.saturating_sub(before));
    out.file_bytes = file_bytes(path);
    Ok(out)
}

/// Size of a SQLite file with its WAL, bytes (0 when unreadable).
pub fn file_bytes(path: &Path) -> u64 {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    [path.as_os_str().to_owned(), wal]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The raw rows are rim's rows: rim's store opens the file afterwards
    /// and pages through it, sequences dense, inboxes dense on both sides.
    #[tokio::test]
    async fn raw_rows_read_back_through_rims_store() {
        use rim_im::{ConvId, Draft, MessageStore, Page, Reader};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raw.sqlite3");
        let plan = Plan {
            pairs: vec![(1, 2), (4, 3)],
            messages: 11,
            batch: 4,
            body_bytes: 10,
            full_sync: false,
            max_secs: 60.0,
        };
        let mut seen = Vec::new();
        let out = write(&path, &plan, |n| seen.push(n)).unwrap();
        assert_eq!(seen, [4, 8, 11]);
        assert_eq!((out.messages, out.commits), (11, 3));
        assert_eq!(out.rows, 11 * ROWS_PER_MESSAGE + 4);
        assert_eq!((out.journal_mode.as_str(), out.synchronous), ("wal", 1));

        let ids = Arc::new(IdGenerator::new(1).unwrap());
        let store = SqliteStore::open(&path, SqliteOptions::new(ids)).unwrap();
        let conv: ConvId = "p:3:4".parse().unwrap();
        let page = store
            .pull(&conv, Reader::Member(3), Page::Latest, 100)
            .await
            .unwrap();
        assert_eq!(page.max_seq, 5);
        let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, [5, 4, 3, 2, 1]);
        assert!(page.messages.iter().all(|m| m.from == 4));
        for (mid, entries) in [(1, 6), (2, 6), (3, 5), (4, 5)] {
            let synced = store.sync(mid, 0, 100).await.unwrap();
            let syncs: Vec<u64> = synced.entries.iter().map(|e| e.sync).collect();
            assert_eq!(syncs, (1..=entries).collect::<Vec<u64>>(), "mid {mid}");
            assert!(!synced.more);
        }
        // rim continues the sequences where the raw rows stopped.
        let sent = store
            .send(Draft::new(conv.clone(), 3, "c-1".into(), 0, "hi".into(), 100).unwrap())
            .await
            .unwrap();
        assert_eq!(sent.message.seq, 6);
        let inbox: Vec<(i64, u64)> = sent.inbox.iter().map(|e| (e.mid, e.sync)).collect();
        assert_eq!(inbox, [(3, 6), (4, 6)]);
    }
}
