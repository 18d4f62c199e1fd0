//! Paced broadcasts (a BROADCAST with a speed) run in the background, one
//! at a time in arrival order: the RPC that asks for one answers as soon as
//! it is queued, as goim's comet does. Neither the job's broadcast lane nor
//! an RPC deadline waits for the pacing — a paced broadcast can take minutes,
//! and one slower than the job's 30 s RPC deadline used to be retried and
//! started again from the first bucket, forever.
//!
//! At most [`QUEUE`] broadcasts wait; more are refused as unavailable and
//! the job retries them with backoff. A draining comet stops pacing and
//! drops what waits (its clients are being closed).

use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rim_proto::api::{RpcError, RpcResult};
use tokio::sync::mpsc;

use crate::comet::{Inner, Tally};
use crate::stats::Rpc;

/// Paced broadcasts waiting before new ones are refused.
pub(crate) const QUEUE: usize = 64;

/// One paced broadcast: the encoded frame, the op clients must accept, and
/// deliveries per second across the comet.
pub(crate) struct Paced {
    pub(crate) op: i32,
    pub(crate) frame: Bytes,
    pub(crate) speed: u64,
}

/// The queue of paced broadcasts and the task working through it.
pub(crate) struct Pacer {
    /// Full = the broadcast is refused as unavailable (the job retries).
    tx: mpsc::Sender<Paced>,
}

impl Pacer {
    /// Starts the pacing task for the comet behind `inner`; it ends when
    /// the comet is dropped.
    pub(crate) fn spawn(inner: Weak<Inner>) -> Pacer {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(inner, rx));
        Pacer { tx }
    }

    /// Queues a paced broadcast.
    pub(crate) fn submit(&self, paced: Paced) -> RpcResult<()> {
        self.tx.try_send(paced).map_err(|err| match err {
            mpsc::error::TrySendError::Full(_) => RpcError::Unavailable(format!(
                "{QUEUE} paced broadcasts are already waiting on this comet"
            )),
            mpsc::error::TrySendError::Closed(_) => {
                RpcError::Unavailable("the comet is shutting down".into())
            }
        })
    }
}

async fn run(inner: Weak<Inner>, mut rx: mpsc::Receiver<Paced>) {
    while let Some(paced) = rx.recv().await {
        if !pace(&inner, &paced).await {
            return;
        }
    }
}

/// Delivers one broadcast a bucket at a time, sleeping after each bucket
/// for as long as its deliveries take at `speed`. Returns false once the
/// comet is gone or draining.
async fn pace(inner: &Weak<Inner>, paced: &Paced) -> bool {
    let started = Instant::now();
    let mut tally = Tally::default();
    let mut bucket = 0;
    loop {
        let Some(comet) = inner.upgrade() else {
            return false;
        };
        if comet.draining.load(Ordering::Acquire) {
            tracing::info!("comet draining: paced broadcast stopped");
            return false;
        }
        let Some(current) = comet.buckets().get(bucket) else {
            comet.count(Rpc::Broadcast, started, &tally);
            return true;
        };
        let before = tally.delivery.delivered;
        comet.broadcast_bucket(current, paced.op, &paced.frame, &mut tally);
        drop(comet);
        let sent = tally.delivery.delivered - before;
        if sent > 0 {
            tokio::time::sleep(Duration::from_secs_f64(sent as f64 / paced.speed as f64)).await;
        }
        bucket += 1;
    }
}
