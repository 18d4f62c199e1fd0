//! The aggregator: messages to one room, or to one big group's channel, are
//! merged into one op-9 batch. When a batch goes is `job.room_flush_rule`'s
//! (see [`flush_now`]):
//!
//! - adaptive (the default), self-clocked like Nagle's algorithm: a message
//!   to a target with no batch in flight (handed to the comets and not yet
//!   answered by every one of them) goes at once, alone (a batch of one is
//!   the frame itself). While one is in flight the target's messages
//!   gather, and the gathered batch goes when the target has no batch in
//!   flight any more, when it holds `room_batch` messages (a full batch goes
//!   at once, even with others in flight), or when its oldest message has
//!   waited `room_flush`, whichever comes first. A quiet room never waits;
//!   a busy one merges what arrives during its fan-out, so batches grow
//!   with the load and `room_flush` only bounds the wait when a comet is
//!   slow or failing. An answer includes the time the call waited in the
//!   comet's lane behind other targets' calls, so a backed-up comet gets
//!   bigger batches.
//! - fixed: a batch goes when it holds `room_batch` messages or its oldest
//!   message has waited `room_flush`.
//!
//! A target with nothing gathered and no batch in flight is retired
//! (forgotten) — only after its batch was handed to the comets, so retiring
//! an idle one loses nothing, and the aggregator holds state only for the
//! targets with messages in the last moments. Flushed batches go to every
//! comet, in flush order (each comet's lane keeps that order, whatever is in
//! flight), and each batch's messages are told when all comets handled it.
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
use rim_config::RoomFlushRule;
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

/// Messages queued to the aggregator before dispatchers wait; also the
/// flushed batches queued for delivery before the aggregator waits, and the
/// answered batches queued back to it before their answer tasks wait (the
/// aggregator drains those first, and they are few: one per batch whose
/// calls were queued on the comets' bounded lanes).
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

/// Whether a target's gathered batch goes now (the `room_flush` deadline
/// aside): when it is full, or, with the adaptive rule, as soon as none of
/// the target's batches is in flight.
pub(crate) fn flush_now(
    rule: RoomFlushRule,
    gathered: usize,
    batch_size: usize,
    in_flight: u32,
) -> bool {
    gathered >= batch_size || (rule == RoomFlushRule::Adaptive && gathered > 0 && in_flight == 0)
}

/// A batch ready to broadcast, with the messages it carries.
struct Flush {
    target: Target,
    frame: Frame,
    dones: Vec<oneshot::Sender<crate::Outcome>>,
}

/// What the aggregator holds for one target; retired when idle.
#[derive(Default)]
struct Slot {
    /// The batch being gathered.
    pending: Option<Pending>,
    /// Batches handed to delivery and not yet answered by every comet they
    /// were sent to (adaptive rule only; 0 with the fixed rule).
    in_flight: u32,
}

impl Slot {
    fn idle(&self) -> bool {
        self.pending.is_none() && self.in_flight == 0
    }
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

/// How the aggregator batches: `job.room_flush_rule`, `job.room_batch`,
/// `job.room_flush`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Batching {
    pub(crate) rule: RoomFlushRule,
    pub(crate) batch_size: usize,
    pub(crate) max_wait: Duration,
}

/// Starts the aggregator and the task that delivers its flushed batches to
/// `comets` (in order per target) until the comet set is gone.
pub(crate) fn spawn(
    batching: Batching,
    comets: Weak<Comets>,
    routes: Arc<RoomRoutes>,
    metrics: Arc<JobMetrics>,
) -> mpsc::Sender<RoomMessage> {
    let (in_tx, in_rx) = mpsc::channel(QUEUE);
    let (out_tx, out_rx) = mpsc::channel(QUEUE);
    let (answered_tx, answered_rx) = mpsc::channel(QUEUE);
    // Only the adaptive rule waits for answers.
    let answered_tx = (batching.rule == RoomFlushRule::Adaptive).then_some(answered_tx);
    let aggregator = Aggregator::new(batching, out_tx, Arc::clone(&metrics));
    tokio::spawn(aggregator.run(in_rx, answered_rx));
    tokio::spawn(deliver_flushes(
        comets,
        routes,
        metrics,
        out_rx,
        answered_tx,
    ));
    in_tx
}

/// Sends each flushed batch to every comet (a room's: every comet that
/// hosts the room, see routes.rs), in flush order, and tells the batch's
/// messages when all those comets have handled it — and then the
/// aggregator, through `answered`, when given (the adaptive rule).
async fn deliver_flushes(
    comets: Weak<Comets>,
    routes: Arc<RoomRoutes>,
    metrics: Arc<JobMetrics>,
    mut flushes: mpsc::Receiver<Flush>,
    answered: Option<mpsc::Sender<Target>>,
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
        let answered = answered.clone().map(|tx| (tx, target));
        tokio::spawn(async move {
            let outcome = ticket.await;
            for done in dones {
                let _ = done.send(outcome);
            }
            if let Some((tx, target)) = answered {
                // Gone only when the aggregator stopped.
                let _ = tx.send(target).await;
            }
        });
    }
}

struct Aggregator {
    rule: RoomFlushRule,
    batch_size: usize,
    max_wait: Duration,
    out: mpsc::Sender<Flush>,
    /// The targets with a batch gathering or in flight.
    targets: HashMap<Target, Slot>,
    caps: HashMap<String, Cap>,
    deadlines: BinaryHeap<Reverse<(Instant, Due)>>,
    generation: u64,
    last_prune: Instant,
    metrics: Arc<JobMetrics>,
}

/// The output is gone: the job is shutting down.
struct Closed;

impl Aggregator {
    fn new(batching: Batching, out: mpsc::Sender<Flush>, metrics: Arc<JobMetrics>) -> Aggregator {
        Aggregator {
            rule: batching.rule,
            batch_size: batching.batch_size.max(1),
            max_wait: batching.max_wait,
            out,
            targets: HashMap::new(),
            caps: HashMap::new(),
            deadlines: BinaryHeap::new(),
            generation: 0,
            last_prune: Instant::now(),
            metrics,
        }
    }

    async fn run(
        mut self,
        mut rx: mpsc::Receiver<RoomMessage>,
        mut answered_rx: mpsc::Receiver<Target>,
    ) {
        let adaptive = self.rule == RoomFlushRule::Adaptive;
        loop {
            let next = self.deadlines.peek().map(|Reverse((at, _))| *at);
            // Answers first: a gathered batch goes before the messages
            // after it are looked at; then deadlines, so that a steady
            // stream of messages cannot hold a due batch back.
            let message = tokio::select! {
                biased;
                Some(target) = answered_rx.recv(), if adaptive => {
                    if self.answered(target).await.is_err() {
                        return;
                    }
                    continue;
                }
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
                message = rx.recv() => message,
            };
            let Some(message) = message else {
                // Producers gone: flush everything held, then stop.
                let held: Vec<(Target, Pending)> = self
                    .targets
                    .drain()
                    .filter_map(|(target, slot)| Some((target, slot.pending?)))
                    .collect();
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

    /// One of the target's batches was answered by every comet it went to:
    /// its gathered batch goes if none is in flight any more.
    async fn answered(&mut self, target: Target) -> Result<(), Closed> {
        let Some(slot) = self.targets.get_mut(&target) else {
            return Ok(());
        };
        slot.in_flight = slot.in_flight.saturating_sub(1);
        let gathered = slot.pending.as_ref().map_or(0, |p| p.frames);
        if flush_now(self.rule, gathered, self.batch_size, slot.in_flight)
            && let Some(pending) = slot.pending.take()
        {
            return self.send(target, pending).await;
        }
        self.retire_if_idle(&target);
        Ok(())
    }

    /// Flushes a target's batch, counts it in flight (adaptive rule) and
    /// retires the target if that left it idle.
    async fn send(&mut self, target: Target, pending: Pending) -> Result<(), Closed> {
        let sent = self.flush(target.clone(), pending).await?;
        if sent && self.rule == RoomFlushRule::Adaptive {
            // Also for a group's notice sent alone (no slot before).
            self.targets.entry(target.clone()).or_default().in_flight += 1;
        }
        self.retire_if_idle(&target);
        Ok(())
    }

    /// Forgets a target with nothing gathered and nothing in flight.
    fn retire_if_idle(&mut self, target: &Target) {
        if self.targets.get(target).is_some_and(Slot::idle) {
            self.targets.remove(target);
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
                    if let Some(slot) = self.targets.get_mut(&target)
                        && slot
                            .pending
                            .as_ref()
                            .is_some_and(|p| p.generation == generation)
                        && let Some(pending) = slot.pending.take()
                    {
                        self.send(target, pending).await?;
                    }
                }
                Due::Notify(group) => {
                    if let Some(cap) = self.caps.get_mut(&group) {
                        cap.timer_set = false;
                    }
                    // The group's batch takes the notice with it; alone
                    // when nothing is pending.
                    let target = Target::Group(group);
                    let held = self
                        .targets
                        .get_mut(&target)
                        .and_then(|slot| slot.pending.take());
                    let pending = held.unwrap_or_else(|| {
                        self.generation += 1;
                        Pending::new(self.generation)
                    });
                    self.send(target, pending).await?;
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
        let slot = self.targets.entry(target.clone()).or_default();
        let in_flight = slot.in_flight;
        let pending = match &mut slot.pending {
            Some(pending) => pending,
            None => {
                self.generation += 1;
                // A message that goes at once needs no deadline.
                if !flush_now(self.rule, 1, self.batch_size, in_flight) {
                    self.deadlines.push(Reverse((
                        now + self.max_wait,
                        Due::Flush(target.clone(), self.generation),
                    )));
                }
                slot.pending.insert(Pending::new(self.generation))
            }
        };
        // Encoding a frame built from a queue message cannot exceed the
        // wire limit (the api bounds bodies); should it, the message is
        // reported rejected rather than lost silently.
        if !pending.push(&frame) {
            let _ = done.send(crate::Outcome::Rejected);
            if pending.frames == 0 {
                slot.pending = None;
                self.retire_if_idle(&target);
            }
            return Ok(());
        }
        pending.dones.push(done);
        if flush_now(self.rule, pending.frames, self.batch_size, in_flight)
            && let Some(pending) = slot.pending.take()
        {
            self.send(target, pending).await?;
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
    /// group's owed NOTIFY truncated when one may go out. True when a batch
    /// went (false: nothing to send).
    async fn flush(&mut self, target: Target, mut pending: Pending) -> Result<bool, Closed> {
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
            return Ok(false);
        }
        self.out
            .send(pending.into_flush(target))
            .await
            .map_err(|_| Closed)?;
        Ok(true)
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

#[cfg(test)]
mod tests;
