//! The per-comet delivery client: two lanes per comet, each a task making
//! its calls in the order they were queued — PUSH, ROOM and the big groups'
//! calls in one (so order holds per key, per room and per group), BROADCAST
//! in the other, so that a broadcast
//! to every connection (paced, or just large) never holds a unicast or room
//! message back. Calls are retried with backoff while the comet fails
//! transiently, and a breaker spaces attempts to a comet that keeps failing.
//! A call completes when the comet accepted it, when it was refused as
//! invalid, or when the comet is gone from discovery.
//!
//! Pushes queued back to back go as one `PushMsgs` call: when the lane
//! takes a push it also takes the pushes already queued behind it (never
//! waiting for more; the batch grows only while the comet's previous answer
//! was pending), up to [`BATCH_PUSHES`] or [`BATCH_BYTES`], stopping at the
//! first other call so the lane's order holds. A push found alone goes as
//! `PushMsg`. A batch is retried whole (at least once, as a single call);
//! each push completes with its own outcome, a push the comet refused as
//! invalid as `Rejected`. A batch refused whole (a comet without
//! `PushMsgs`, or one with lower bounds) is sent again one push at a time.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use prost::Message as _;
use rim_proto::api::{CometApi, PUSH_BATCH_MAX_BYTES, PUSH_BATCH_MAX_PUSHES, RpcError};
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
/// The most pushes sent in one `PushMsgs` call.
const BATCH_PUSHES: usize = 256;
/// The most encoded bytes of pushes in one `PushMsgs` call; a larger push
/// goes alone as `PushMsg`.
const BATCH_BYTES: usize = 1 << 20;
// A comet refuses a batch over its bounds: the job stays well inside them.
const _: () = assert!(BATCH_PUSHES <= PUSH_BATCH_MAX_PUSHES && BATCH_BYTES <= PUSH_BATCH_MAX_BYTES);

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

/// What the lane sends in one call: a call alone, or the pushes queued
/// back to back, as one `PushMsgs`.
enum Work {
    One(Call, oneshot::Sender<Outcome>),
    /// Two or more pushes, in queue order; `done[i]` waits for `pushes[i]`.
    Pushes(pb::PushMsgsRequest, Vec<oneshot::Sender<Outcome>>),
}

impl Work {
    fn name(&self) -> &'static str {
        match self {
            Work::One(call, _) => call.name(),
            Work::Pushes(..) => "push_batch",
        }
    }
}

/// Makes the work that starts with `first`: a push takes the pushes queued
/// right behind it, without waiting for more, up to [`BATCH_PUSHES`] and
/// [`BATCH_BYTES`]. The first call that is not a push, or that would go
/// over a cap, is left in `held` to start the next work, so the lane's
/// order is unchanged.
fn gather(first: Queued, rx: &mut mpsc::Receiver<Queued>, held: &mut Option<Queued>) -> Work {
    let Queued { call, done } = first;
    let Call::Push(first) = call else {
        return Work::One(call, done);
    };
    let mut bytes = first.encoded_len();
    let mut pushes = Vec::new();
    let mut dones = Vec::new();
    while pushes.len() + 1 < BATCH_PUSHES {
        // Only what is already queued: the batch is as big as the comet's
        // last answer was slow, and nothing waits to fill it.
        let Ok(next) = rx.try_recv() else { break };
        match next {
            Queued {
                call: Call::Push(push),
                done,
            } => {
                let len = push.encoded_len();
                if bytes + len > BATCH_BYTES {
                    *held = Some(Queued {
                        call: Call::Push(push),
                        done,
                    });
                    break;
                }
                bytes += len;
                pushes.push(push);
                dones.push(done);
            }
            other => {
                *held = Some(other);
                break;
            }
        }
    }
    if pushes.is_empty() {
        return Work::One(Call::Push(first), done);
    }
    pushes.insert(0, first);
    dones.insert(0, done);
    Work::Pushes(pb::PushMsgsRequest { pushes }, dones)
}

/// Makes one attempt at `work`; answers the indexes of a batch's pushes
/// the comet refused as invalid (none for a call alone).
async fn attempt(comet: &Comet, work: &Work) -> Result<Vec<u32>, RpcError> {
    let api = comet.api.as_ref();
    let started = Instant::now();
    let result = match work {
        Work::One(call, _) => match call {
            Call::Push(req) => api.push_msg(req.clone()).await.map(drop),
            Call::Room(req) => api.broadcast_room(req.clone()).await.map(drop),
            Call::Broadcast(req) => api.broadcast(req.clone()).await.map(drop),
            Call::Group(req) => api.broadcast_group(req.clone()).await.map(drop),
            Call::ChangeGroup(req) => api.change_group(req.clone()).await.map(drop),
        }
        .map(|()| Vec::new()),
        Work::Pushes(req, _) => api.push_msgs(req.clone()).await.map(|reply| {
            let mut refused: Vec<u32> = reply.refused.iter().map(|r| r.index).collect();
            for r in &reply.refused {
                tracing::warn!(comet = %comet.id, index = r.index, reason = %r.reason, "comet refused a push of a batch as invalid; dropped");
            }
            // Sorted and unique: the lane walks them once, in step with the
            // pushes.
            refused.sort_unstable();
            refused.dedup();
            refused
        }),
    };
    comet
        .metrics
        .rpc(&comet.id, work.name(), started.elapsed(), result.is_err());
    result
}

/// The lane's retry state: consecutive failures of the comet.
struct Breaker {
    failures: u32,
}

impl Breaker {
    /// Attempts `work` until the comet takes it (the refused indexes), it
    /// is refused whole as invalid, or the comet is gone.
    async fn deliver(
        &mut self,
        comet: &Comet,
        work: &Work,
        gone: &AtomicBool,
        wake: &Notify,
    ) -> Result<Vec<u32>, Outcome> {
        loop {
            if gone.load(Ordering::Acquire) {
                return Err(Outcome::Gone);
            }
            match attempt(comet, work).await {
                Ok(refused) => {
                    if self.failures >= BREAKER_THRESHOLD {
                        tracing::info!(comet = %comet.id, "comet answers again; breaker closed");
                    }
                    self.failures = 0;
                    return Ok(refused);
                }
                Err(err) if err.is_transient() => {
                    self.failures += 1;
                    if self.failures == BREAKER_THRESHOLD {
                        tracing::warn!(comet = %comet.id, reason = %err, "comet keeps failing; breaker open, retrying every {MAX_BACKOFF:?}");
                    }
                    let backoff = if self.failures >= BREAKER_THRESHOLD {
                        MAX_BACKOFF
                    } else {
                        (FIRST_BACKOFF * 2u32.saturating_pow(self.failures - 1)).min(MAX_BACKOFF)
                    };
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = wake.notified() => {}
                    }
                }
                Err(err) => {
                    match work {
                        Work::One(..) => {
                            tracing::warn!(comet = %comet.id, reason = %err, "comet refused a delivery as invalid; dropped")
                        }
                        Work::Pushes(..) => {
                            tracing::warn!(comet = %comet.id, reason = %err, "comet refused a push batch whole; sending its pushes one by one")
                        }
                    }
                    return Err(Outcome::Rejected);
                }
            }
        }
    }
}

async fn run(
    comet: Arc<Comet>,
    mut rx: mpsc::Receiver<Queued>,
    gone: Arc<AtomicBool>,
    wake: Arc<Notify>,
) {
    let mut breaker = Breaker { failures: 0 };
    // A call taken from the queue that did not fit the batch before it: it
    // starts the next work.
    let mut held: Option<Queued> = None;
    // A batch's pushes to send one by one (the comet refused the batch
    // whole, e.g. a comet without PushMsgs): they go before `held`.
    let mut alone: VecDeque<Work> = VecDeque::new();
    loop {
        let work = match alone.pop_front() {
            Some(work) => work,
            None => {
                let first = match held.take() {
                    Some(queued) => queued,
                    None => match rx.recv().await {
                        Some(queued) => queued,
                        None => break,
                    },
                };
                let work = gather(first, &mut rx, &mut held);
                match &work {
                    Work::One(Call::Push(_), _) => comet.metrics.push_batch(1),
                    Work::Pushes(req, _) => comet.metrics.push_batch(req.pushes.len()),
                    Work::One(..) => {}
                }
                work
            }
        };
        let result = breaker.deliver(&comet, &work, &gone, &wake).await;
        match (work, result) {
            (Work::One(_, done), result) => {
                let _ = done.send(result.map_or_else(|outcome| outcome, |_| Outcome::Delivered));
            }
            (Work::Pushes(_, dones), Ok(refused)) => {
                let mut refused = refused.into_iter().peekable();
                for (index, done) in (0u32..).zip(dones) {
                    let outcome = if refused.next_if_eq(&index).is_some() {
                        Outcome::Rejected
                    } else {
                        Outcome::Delivered
                    };
                    let _ = done.send(outcome);
                }
            }
            (Work::Pushes(req, dones), Err(Outcome::Rejected)) => {
                // Each push gets its own answer from PushMsg.
                for (push, done) in req.pushes.into_iter().zip(dones).rev() {
                    alone.push_front(Work::One(Call::Push(push), done));
                }
            }
            (Work::Pushes(_, dones), Err(outcome)) => {
                for done in dones {
                    let _ = done.send(outcome);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
