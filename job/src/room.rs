//! The aggregator: messages to one room, or to one big group's channel, are
//! merged into one op-9 batch, flushed when it holds `room_batch` messages
//! or its oldest message has waited `room_flush`, whichever comes first. A
//! flushed target is retired (forgotten) — only after its batch was handed
//! to the comets, so retiring an idle one loses nothing. Flushed batches go
//! to every comet, in flush order, and each batch's messages are told when
//! all comets handled it.
//!
//! A big group's messages are capped at the rate its queue messages carry
//! (`im.big_group_rate`, im.md read diffusion): a governor limiter per
//! group lets that many through a second (bursts of a quarter second's
//! worth); the rest are thinned — stored, but not pushed. The group's
//! members are then told the group's latest seq by a NOTIFY truncated in
//! the next batch, at most one per group per [`NOTIFY_EVERY`]: while a group
//! stays over its cap, a pending notice goes out with the first flush a
//! second after the last one (alone, when no message is flushed then), so
//! the last thinned seq is always told. Every message of a group goes
//! through one job (the queue partitions by group), so the cap holds for
//! the region.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::num::NonZeroU32;
use std::sync::{Arc, Weak};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rim_proto::im::{Body, Notify};
use rim_proto::pb::comet::v1 as pb;
use rim_proto::{BatchBuilder, Frame, Op};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::comet_client::Call;
use crate::comets::Comets;
use crate::metrics::JobMetrics;
use crate::routes::RoomRoutes;
use crate::ticket::{ready, wait_all};

/// Messages queued to the aggregator before dispatchers wait.
const QUEUE: usize = 4096;

/// The least time between two NOTIFY truncated of one group.
pub(crate) const NOTIFY_EVERY: Duration = Duration::from_secs(1);

/// How long a group's cap state outlives its last message.
const CAP_IDLE: Duration = Duration::from_secs(10);

/// Where a batch goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Target {
    /// Every member of a room (`type://id`).
    Room(String),
    /// The delivery channel of a big group (its conv id, `g:<gid>`).
    Group(String),
}

/// A big group's message: its seq and the group's cap.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GroupSeq {
    pub(crate) seq: u64,
    /// Messages a second; 0 = no cap.
    pub(crate) rate: u32,
}

/// A message for a room or group, and who to tell when its batch was
/// delivered.
pub(crate) struct RoomMessage {
    pub(crate) target: Target,
    pub(crate) frame: Frame,
    /// Set for a big group's message.
    pub(crate) group: Option<GroupSeq>,
    pub(crate) done: oneshot::Sender<crate::Outcome>,
}

/// A batch ready to broadcast, with the messages it carries.
struct Flush {
    target: Target,
    frame: Frame,
    dones: Vec<oneshot::Sender<crate::Outcome>>,
}

struct Pending {
    batch: BatchBuilder,
    /// The one message of a batch of one is sent as is, not wrapped.
    single: Option<Frame>,
    /// Frames in the batch.
    frames: usize,
    dones: Vec<oneshot::Sender<crate::Outcome>>,
    /// Tells this batch's deadline from a later batch's of the same target.
    generation: u64,
}

impl Pending {
    fn new(generation: u64) -> Pending {
        Pending {
            batch: BatchBuilder::new(),
            single: None,
            frames: 0,
            dones: Vec::new(),
            generation,
        }
    }

    /// Adds a frame; false (nothing added) when it cannot be encoded.
    fn push(&mut self, frame: &Frame) -> bool {
        if self.batch.push(frame).is_err() {
            return false;
        }
        self.single = (self.frames == 0).then(|| frame.clone());
        self.frames += 1;
        true
    }

    fn into_flush(self, target: Target) -> Flush {
        let frame = match (self.frames, self.single) {
            (1, Some(frame)) => frame,
            _ => self.batch.finish(),
        };
        Flush {
            target,
            frame,
            dones: self.dones,
        }
    }
}

/// A big group's cap: its limiter and the truncation it still owes.
struct Cap {
    rate: u32,
    limiter: DefaultDirectRateLimiter,
    /// The latest thinned seq its members were not told yet.
    owed: Option<u64>,
    /// The thinned messages whose notice is owed: told when it is delivered.
    owed_dones: Vec<oneshot::Sender<crate::Outcome>>,
    notified_at: Option<Instant>,
    /// A NOTIFY-only flush is scheduled.
    timer_set: bool,
    last_used: Instant,
}

impl Cap {
    fn new(rate: NonZeroU32, now: Instant) -> Cap {
        let burst = NonZeroU32::new(rate.get() / 4).unwrap_or(NonZeroU32::MIN);
        Cap {
            rate: rate.get(),
            limiter: RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)),
            owed: None,
            owed_dones: Vec::new(),
            notified_at: None,
            timer_set: false,
            last_used: now,
        }
    }

    /// When the owed notice may go out.
    fn notify_at(&self) -> Option<Instant> {
        self.owed?;
        Some(
            self.notified_at
                .map_or(Instant::now(), |at| at + NOTIFY_EVERY),
        )
    }
}

/// What a deadline is for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Due {
    /// Flush this generation of the target's batch.
    Flush(Target, u64),
    /// Tell a group's owed truncation.
    Notify(String),
}

/// Starts the aggregator and the task that delivers its flushed batches to
/// `comets` (in order per target) until the comet set is gone.
pub(crate) fn spawn(
    batch_size: usize,
    max_wait: Duration,
    comets: Weak<Comets>,
    routes: Arc<RoomRoutes>,
    metrics: Arc<JobMetrics>,
) -> mpsc::Sender<RoomMessage> {
    let (in_tx, in_rx) = mpsc::channel(QUEUE);
    let (out_tx, out_rx) = mpsc::channel(QUEUE);
    let aggregator = Aggregator {
        batch_size: batch_size.max(1),
        max_wait,
        out: out_tx,
        pending: HashMap::new(),
        caps: HashMap::new(),
        deadlines: BinaryHeap::new(),
        generation: 0,
        last_prune: Instant::now(),
        metrics: Arc::clone(&metrics),
    };
    tokio::spawn(aggregator.run(in_rx));
    tokio::spawn(deliver_flushes(comets, routes, metrics, out_rx));
    in_tx
}

/// Sends each flushed batch to every comet (a room's: every comet that
/// hosts the room, see routes.rs), in flush order, and tells the batch's
/// messages when all those comets have handled it.
async fn deliver_flushes(
    comets: Weak<Comets>,
    routes: Arc<RoomRoutes>,
    metrics: Arc<JobMetrics>,
    mut flushes: mpsc::Receiver<Flush>,
) {
    while let Some(Flush {
        target,
        frame,
        dones,
    }) = flushes.recv().await
    {
        let Some(clients) = comets.upgrade().map(|c| c.all()) else {
            return;
        };
        metrics.room_batch(dones.len());
        let proto: rim_proto::pb::frame::v1::Proto = frame.into();
        let routed = routes.applies(clients.len());
        let mut rxs = Vec::with_capacity(clients.len());
        for (id, client) in clients {
            let call = match &target {
                Target::Room(room) if routed && !routes.hosts(&id, room) => {
                    metrics.room_call(false);
                    continue;
                }
                Target::Room(room) => Call::Room(pb::BroadcastRoomRequest {
                    room_id: room.clone(),
                    proto: Some(proto.clone()),
                }),
                Target::Group(group) => Call::Group(pb::BroadcastGroupRequest {
                    group: group.clone(),
                    proto_op: Op::IM_MSG.0,
                    proto: Some(proto.clone()),
                }),
            };
            if matches!(target, Target::Room(_)) {
                metrics.room_call(true);
            }
            rxs.push(client.call(call).await);
        }
        // No comet hosts the room: nobody to deliver to.
        let ticket = if rxs.is_empty() {
            ready(crate::Outcome::Delivered)
        } else {
            wait_all(rxs)
        };
        tokio::spawn(async move {
            let outcome = ticket.await;
            for done in dones {
                let _ = done.send(outcome);
            }
        });
    }
}

struct Aggregator {
    batch_size: usize,
    max_wait: Duration,
    out: mpsc::Sender<Flush>,
    pending: HashMap<Target, Pending>,
    caps: HashMap<String, Cap>,
    deadlines: BinaryHeap<Reverse<(Instant, Due)>>,
    generation: u64,
    last_prune: Instant,
    metrics: Arc<JobMetrics>,
}

/// The output is gone: the job is shutting down.
struct Closed;

impl Aggregator {
    async fn run(mut self, mut rx: mpsc::Receiver<RoomMessage>) {
        loop {
            let next = self.deadlines.peek().map(|Reverse((at, _))| *at);
            let message = tokio::select! {
                message = rx.recv() => message,
                () = async {
                    match next {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    if self.fire_due(Instant::now()).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            let Some(message) = message else {
                // Producers gone: flush everything held, then stop.
                let held: Vec<(Target, Pending)> = self.pending.drain().collect();
                for (target, pending) in held {
                    let _ = self.flush(target, pending).await;
                }
                return;
            };
            if self.take(message).await.is_err() {
                return;
            }
        }
    }

    /// Runs the deadlines that are due.
    async fn fire_due(&mut self, now: Instant) -> Result<(), Closed> {
        while let Some(Reverse((at, _))) = self.deadlines.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, due))) = self.deadlines.pop() else {
                break;
            };
            match due {
                Due::Flush(target, generation) => {
                    if self
                        .pending
                        .get(&target)
                        .is_some_and(|p| p.generation == generation)
                        && let Some(pending) = self.pending.remove(&target)
                    {
                        self.flush(target, pending).await?;
                    }
                }
                Due::Notify(group) => {
                    if let Some(cap) = self.caps.get_mut(&group) {
                        cap.timer_set = false;
                    }
                    // The group's batch takes the notice with it; alone
                    // when nothing is pending.
                    let target = Target::Group(group);
                    let pending = self.pending.remove(&target).unwrap_or_else(|| {
                        self.generation += 1;
                        Pending::new(self.generation)
                    });
                    self.flush(target, pending).await?;
                }
            }
        }
        Ok(())
    }

    /// Takes one message into its target's batch.
    async fn take(&mut self, message: RoomMessage) -> Result<(), Closed> {
        let RoomMessage {
            target,
            frame,
            group,
            done,
        } = message;
        let now = Instant::now();
        self.prune_caps(now);
        if let (Target::Group(name), Some(group)) = (&target, group)
            && !self.admit(name, group, now)
        {
            self.metrics.group_thinned();
            if let Some(cap) = self.caps.get_mut(name) {
                cap.owed = Some(cap.owed.map_or(group.seq, |owed| owed.max(group.seq)));
                cap.owed_dones.push(done);
            }
            self.schedule_notice(name);
            return Ok(());
        }
        let pending = match self.pending.get_mut(&target) {
            Some(pending) => pending,
            None => {
                self.generation += 1;
                self.deadlines.push(Reverse((
                    now + self.max_wait,
                    Due::Flush(target.clone(), self.generation),
                )));
                self.pending
                    .entry(target.clone())
                    .or_insert(Pending::new(self.generation))
            }
        };
        // Encoding a frame built from a queue message cannot exceed the
        // wire limit (the api bounds bodies); should it, the message is
        // reported rejected rather than lost silently.
        if !pending.push(&frame) {
            let _ = done.send(crate::Outcome::Rejected);
            return Ok(());
        }
        pending.dones.push(done);
        if pending.frames >= self.batch_size
            && let Some(pending) = self.pending.remove(&target)
        {
            self.flush(target, pending).await?;
        }
        Ok(())
    }

    /// Whether a big group's message is within its cap (always, without one).
    fn admit(&mut self, group: &str, message: GroupSeq, now: Instant) -> bool {
        let Some(rate) = NonZeroU32::new(message.rate) else {
            return true;
        };
        let cap = match self.caps.get_mut(group) {
            Some(cap) if cap.rate == rate.get() => cap,
            _ => {
                // New, or its rate changed (a logic with another config).
                let mut cap = Cap::new(rate, now);
                if let Some(old) = self.caps.remove(group) {
                    cap.owed = old.owed;
                    cap.owed_dones = old.owed_dones;
                    cap.notified_at = old.notified_at;
                    cap.timer_set = old.timer_set;
                }
                self.caps.entry(group.to_owned()).or_insert(cap)
            }
        };
        cap.last_used = now;
        cap.limiter.check().is_ok()
    }

    /// Makes sure a group's owed notice goes out when it may, even if no
    /// message of the group comes to carry it.
    fn schedule_notice(&mut self, group: &str) {
        let Some(cap) = self.caps.get_mut(group) else {
            return;
        };
        let Some(at) = cap.notify_at() else {
            return;
        };
        if cap.timer_set {
            return;
        }
        cap.timer_set = true;
        // Not sooner than a batch would wait: a thinned burst's notice
        // rides with the batch of its admitted messages.
        let at = at.max(Instant::now() + self.max_wait);
        self.deadlines
            .push(Reverse((at, Due::Notify(group.to_owned()))));
    }

    /// Hands a batch to the delivery task; a group's batch carries the
    /// group's owed NOTIFY truncated when one may go out.
    async fn flush(&mut self, target: Target, mut pending: Pending) -> Result<(), Closed> {
        if let Target::Group(group) = &target
            && let Some(cap) = self.caps.get_mut(group)
            && let Some(at) = cap.notify_at()
        {
            let now = Instant::now();
            if at <= now
                && let Some(max_seq) = cap.owed
            {
                let notice = Notify::Truncated {
                    conv: group.clone(),
                    max_seq,
                }
                .to_frame(0);
                if pending.push(&notice) {
                    cap.owed = None;
                    cap.notified_at = Some(now);
                    pending.dones.append(&mut cap.owed_dones);
                    self.metrics.group_truncated();
                }
            }
            let group = group.clone();
            self.schedule_notice(&group);
        }
        if pending.frames == 0 {
            // Nothing to send (a notice not due yet); its messages' notice
            // is still owed and scheduled.
            for done in pending.dones {
                let _ = done.send(crate::Outcome::Delivered);
            }
            return Ok(());
        }
        self.out
            .send(pending.into_flush(target))
            .await
            .map_err(|_| Closed)
    }

    /// Forgets the caps of groups idle for a while, at most every
    /// [`CAP_IDLE`] (a group's limiter then starts full again).
    fn prune_caps(&mut self, now: Instant) {
        if now.duration_since(self.last_prune) < CAP_IDLE {
            return;
        }
        self.last_prune = now;
        self.caps
            .retain(|_, cap| cap.owed.is_some() || now.duration_since(cap.last_used) < CAP_IDLE);
    }
}
