//! The per-comet delivery client: two lanes per comet, each a task making
//! its calls in the order they were queued — PUSH, ROOM and the big groups'
//! calls in one (so order holds per key, per room and per group), BROADCAST
//! in the other, so that a broadcast
//! to every connection (paced, or just large) never holds a unicast or room
//! message back. Calls are retried with backoff while the comet fails
//! transiently, and a breaker spaces attempts to a comet that keeps failing.
//! A call completes when the comet accepted it, when it was refused as
//! invalid, or when the comet is gone from discovery.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rim_proto::api::{CometApi, RpcError};
use rim_proto::pb::comet::v1 as pb;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::metrics::JobMetrics;

/// Calls queued for one comet before dispatchers wait (backpressure up to the
/// queue consumer).
const QUEUE: usize = 1024;
/// First retry delay; doubles up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// Longest wait between two attempts (also the breaker's open period).
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Consecutive failures after which the breaker opens and logs it.
const BREAKER_THRESHOLD: u32 = 5;

/// A delivery call to a comet.
#[derive(Clone, Debug)]
pub(crate) enum Call {
    Push(pb::PushMsgRequest),
    Room(pb::BroadcastRoomRequest),
    Broadcast(pb::BroadcastRequest),
    Group(pb::BroadcastGroupRequest),
    ChangeGroup(pb::ChangeGroupRequest),
}

/// How a call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The comet took it.
    Delivered,
    /// The comet refused it as invalid; retrying cannot help.
    Rejected,
    /// The comet left discovery before taking it.
    Gone,
}

struct Queued {
    call: Call,
    done: oneshot::Sender<Outcome>,
}

/// The handle to a comet's delivery lanes.
pub(crate) struct CometClient {
    comet: Arc<Comet>,
    /// PUSH, ROOM and the groups' calls, in order.
    messages: Lane,
    /// BROADCAST, in order.
    broadcasts: Lane,
    gone: Arc<AtomicBool>,
}

/// One ordered queue of calls and the task working through it.
struct Lane {
    /// Full = the dispatcher waits (backpressure).
    tx: mpsc::Sender<Queued>,
    /// Cuts a retry wait short when the comet is retired.
    wake: Arc<Notify>,
}

impl Lane {
    fn spawn(comet: Arc<Comet>, gone: &Arc<AtomicBool>) -> Lane {
        let (tx, rx) = mpsc::channel(QUEUE);
        let wake = Arc::new(Notify::new());
        tokio::spawn(run(comet, rx, Arc::clone(gone), Arc::clone(&wake)));
        Lane { tx, wake }
    }
}

impl CometClient {
    /// Starts the delivery lanes of one comet.
    pub(crate) fn spawn(
        id: String,
        api: Arc<dyn CometApi>,
        metrics: Arc<JobMetrics>,
    ) -> CometClient {
        let gone = Arc::new(AtomicBool::new(false));
        metrics.comet_added(&id);
        let comet = Arc::new(Comet { id, api, metrics });
        CometClient {
            messages: Lane::spawn(Arc::clone(&comet), &gone),
            broadcasts: Lane::spawn(Arc::clone(&comet), &gone),
            comet,
            gone,
        }
    }

    /// Queues a call on its lane; the receiver completes with its outcome.
    pub(crate) async fn call(&self, call: Call) -> oneshot::Receiver<Outcome> {
        let lane = match call {
            Call::Broadcast(_) => &self.broadcasts,
            Call::Push(_) | Call::Room(_) | Call::Group(_) | Call::ChangeGroup(_) => &self.messages,
        };
        let (done, outcome) = oneshot::channel();
        if let Err(mpsc::error::SendError(queued)) = lane.tx.send(Queued { call, done }).await {
            let _ = queued.done.send(Outcome::Gone);
        }
        outcome
    }

    /// The comet's API, for calls outside the delivery lanes (its rooms).
    pub(crate) fn api(&self) -> Arc<dyn CometApi> {
        Arc::clone(&self.comet.api)
    }

    /// Marks the comet gone: queued and future calls complete as `Gone`.
    pub(crate) fn retire(&self) {
        self.gone.store(true, Ordering::Release);
        self.messages.wake.notify_one();
        self.broadcasts.wake.notify_one();
    }
}

/// The comet a client calls, and where its calls are counted.
struct Comet {
    id: String,
    api: Arc<dyn CometApi>,
    metrics: Arc<JobMetrics>,
}

impl Call {
    fn name(&self) -> &'static str {
        match self {
            Call::Push(_) => "push",
            Call::Room(_) => "room",
            Call::Broadcast(_) => "broadcast",
            Call::Group(_) => "group",
            Call::ChangeGroup(_) => "change_group",
        }
    }
}

async fn attempt(comet: &Comet, call: &Call) -> Result<(), RpcError> {
    let api = comet.api.as_ref();
    let started = Instant::now();
    let result = match call {
        Call::Push(req) => api.push_msg(req.clone()).await.map(drop),
        Call::Room(req) => api.broadcast_room(req.clone()).await.map(drop),
        Call::Broadcast(req) => api.broadcast(req.clone()).await.map(drop),
        Call::Group(req) => api.broadcast_group(req.clone()).await.map(drop),
        Call::ChangeGroup(req) => api.change_group(req.clone()).await.map(drop),
    };
    comet
        .metrics
        .rpc(&comet.id, call.name(), started.elapsed(), result.is_err());
    result
}

async fn run(
    comet: Arc<Comet>,
    mut rx: mpsc::Receiver<Queued>,
    gone: Arc<AtomicBool>,
    wake: Arc<Notify>,
) {
    let mut failures: u32 = 0;
    while let Some(Queued { call, done }) = rx.recv().await {
        let outcome = loop {
            if gone.load(Ordering::Acquire) {
                break Outcome::Gone;
            }
            match attempt(&comet, &call).await {
                Ok(()) => {
                    if failures >= BREAKER_THRESHOLD {
                        tracing::info!(comet = %comet.id, "comet answers again; breaker closed");
                    }
                    failures = 0;
                    break Outcome::Delivered;
                }
                Err(err) if err.is_transient() => {
                    failures += 1;
                    if failures == BREAKER_THRESHOLD {
                        tracing::warn!(comet = %comet.id, reason = %err, "comet keeps failing; breaker open, retrying every {MAX_BACKOFF:?}");
                    }
                    let backoff = if failures >= BREAKER_THRESHOLD {
                        MAX_BACKOFF
                    } else {
                        (FIRST_BACKOFF * 2u32.saturating_pow(failures - 1)).min(MAX_BACKOFF)
                    };
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = wake.notified() => {}
                    }
                }
                Err(err) => {
                    tracing::warn!(comet = %comet.id, reason = %err, "comet refused a delivery as invalid; dropped");
                    break Outcome::Rejected;
                }
            }
        };
        let _ = done.send(outcome);
    }
}
