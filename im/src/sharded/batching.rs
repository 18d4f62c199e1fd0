//! Group commit for the sharded store's cross-primary work: the inbox
//! entries concurrent sends owe one primary are appended by one
//! transaction there, and the outbox rows of one primary are cleared by one
//! statement — as the send batcher stores concurrent sends in one
//! transaction. One batcher per primary and kind: it takes whatever is
//! queued (up to a bound, without waiting for more) once a slot is free;
//! while every slot is busy, work gathers and the next batch takes it all.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::conv::ConvId;
use crate::error::{Error, Result};
use crate::postgres::{Owed, PostgresStore};
use crate::store::InboxEntry;

/// Appends (or clears) one batch may carry at most, in entries.
const MAX_ROWS: usize = 4096;

/// Batches of appends in flight on one primary at once.
const APPENDS_IN_FLIGHT: usize = 4;

/// Sends' requests waiting for a batch before new ones wait.
const QUEUE: usize = 4096;

/// One send's (or relay's) entries for one primary, and where the entries
/// go once appended.
struct AppendJob {
    owed: Vec<Owed>,
    reply: oneshot::Sender<Result<Vec<InboxEntry>>>,
}

/// Appends the inbox entries owed to one primary, batched.
pub(super) struct Appender {
    tx: mpsc::Sender<AppendJob>,
}

impl Appender {
    /// Starts the batcher of `shard`; each batch waits at most `wait` for
    /// the primary before every send in it is told it failed.
    pub(super) fn spawn(shard: Arc<PostgresStore>, wait: Duration) -> Appender {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run_appends(shard, rx, wait));
        Appender { tx }
    }

    /// Appends `owed` (entries of this primary's users) with whatever else
    /// is queued; the entries come back in the order given.
    pub(super) async fn append(&self, owed: Vec<Owed>) -> Result<Vec<InboxEntry>> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(AppendJob { owed, reply })
            .await
            .map_err(|_| stopped("the append batcher has stopped"))?;
        rx.await
            .map_err(|_| stopped("the append batcher dropped a batch"))?
    }
}

fn stopped(what: &'static str) -> Error {
    Error::Unavailable(crate::StoreFailure::bare(what))
}

async fn run_appends(shard: Arc<PostgresStore>, mut rx: mpsc::Receiver<AppendJob>, wait: Duration) {
    let slots = Arc::new(Semaphore::new(APPENDS_IN_FLIGHT));
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let mut rows = first.owed.len();
        let mut jobs = vec![first];
        while rows < MAX_ROWS {
            match rx.try_recv() {
                Ok(job) => {
                    rows += job.owed.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let shard = Arc::clone(&shard);
        tokio::spawn(async move {
            let all: Vec<Owed> = jobs.iter().flat_map(|j| j.owed.iter().cloned()).collect();
            // Dropped past the wait: its transaction rolls back.
            let appended = tokio::time::timeout(wait, shard.append_remote(&all))
                .await
                .unwrap_or_else(|elapsed| {
                    Err(Error::unavailable("appending on another primary", elapsed))
                });
            drop(slot);
            match appended {
                Ok(entries) => {
                    let mut entries = entries.into_iter();
                    for job in jobs {
                        let mine = entries.by_ref().take(job.owed.len()).collect();
                        let _ = job.reply.send(Ok(mine));
                    }
                }
                Err(err) => {
                    let failure = err.to_string();
                    let mut err = Some(err);
                    for job in jobs {
                        let answer = err.take().unwrap_or_else(|| {
                            Error::Unavailable(crate::StoreFailure::bare(failure.clone()))
                        });
                        let _ = job.reply.send(Err(answer));
                    }
                }
            }
        });
    }
}

/// Clears appended entries from one primary's outbox, batched, in the
/// background: a clear that fails (or is never made) leaves rows the relay
/// appends again, which adds nothing.
pub(super) struct Clearer {
    tx: mpsc::Sender<Vec<(ConvId, u64)>>,
}

impl Clearer {
    pub(super) fn spawn(shard: Arc<PostgresStore>) -> Clearer {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run_clears(shard, rx));
        Clearer { tx }
    }

    /// Queues the outbox rows of messages `done` for clearing; when the
    /// queue is full they stay for the relay.
    pub(super) fn clear(&self, done: Vec<(ConvId, u64)>) {
        if !done.is_empty() {
            let _ = self.tx.try_send(done);
        }
    }
}

async fn run_clears(shard: Arc<PostgresStore>, mut rx: mpsc::Receiver<Vec<(ConvId, u64)>>) {
    while let Some(mut done) = rx.recv().await {
        while done.len() < MAX_ROWS {
            match rx.try_recv() {
                Ok(more) => done.extend(more),
                Err(_) => break,
            }
        }
        if let Err(err) = shard.clear_outbox(&done).await {
            tracing::warn!(%err, entries = done.len(), "outbox not cleared; the relay finds its entries appended");
        }
    }
}
