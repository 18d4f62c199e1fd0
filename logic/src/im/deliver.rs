//! Pushing IM frames to users' connections after the store committed:
//! MSG (op 21) with each recipient's own inbox entry, NOTIFY (op 27). They
//! go through the push queue like any push: one PUSH message per comet,
//! carrying each connection's own body (its user's inbox sync), so the job
//! makes one call per comet and the comet's accepts filter keeps them from
//! connections that did not ask for IM ops.
//!
//! A delivery is best effort on top of the store: when the router or the
//! queue fails, the message is already durable and the devices get it by
//! SYNC (the ack-timeout NOTIFY sync, a sync gap in a later MSG, or the
//! SYNC a client sends on reconnect). Deliveries run in the background on
//! `LANES` lanes: the frames of one conversation (of one user, for NOTIFY)
//! always take the same lane and are queued in the order they were handed
//! over — a sender's messages reach the queue in seq order — while other
//! conversations go on beside them. A full lane slows new sends' replies
//! rather than growing without bound. Every MSG queued to a connection is
//! remembered for the ack timeout (acks.rs), checked by a background loop.
//!
//! A big group's message (read diffusion) is one GROUP queue message for
//! the whole group: the job merges it into the group's batches, caps the
//! group's rate (`im.big_group_rate`, carried as the message's speed) and
//! sends each batch once per comet, where the group's delivery channel
//! holds its members' connections. Membership changes of a big group
//! become GROUP_JOIN / GROUP_LEAVE messages for the comets that host the
//! members' connections, on the group's lane, so they keep their order with
//! the group's messages.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rim_im::{ConvId, Sent};
use rim_proto::Op;
use rim_proto::im::{Body, Notify};
use rim_queue::{Producer, PushMsg, PushType};
use rim_router::Router;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::acks::{Pending, Tracker};
use super::metrics::ImMetrics;
use super::wire;

/// Delivery lanes: conversations delivered concurrently.
const LANES: usize = 64;

/// Deliveries a lane holds before new ones wait.
const LANE_CAPACITY: usize = 256;

/// How long a connection's ack position outlives its last ACK in the
/// router (it also ends with the session).
pub(crate) const ACK_TTL: Duration = Duration::from_secs(3600);

/// Users looked up in the router at once for a channel change.
const CHANNEL_LOOKUP: usize = 1000;

/// Hands IM frames to the push queue. Clones share the lanes.
#[derive(Clone)]
pub(crate) struct Deliverer {
    shared: Arc<Shared>,
    lanes: Vec<mpsc::Sender<Work>>,
    /// `im.big_group_rate`: the cap a big group's messages carry.
    big_group_rate: u32,
}

/// What a lane does, in order.
enum Work {
    /// Frames to users' connections.
    Frames(Frames),
    /// A big group's message for its channel.
    Group(PushMsg),
    /// Users' connections join or leave a big group's channel.
    Channel {
        conv: String,
        mids: Vec<i64>,
        leave: bool,
    },
}

/// What the deliveries and the ack-timeout loop share.
struct Shared {
    router: Arc<dyn Router>,
    queue: Arc<dyn Producer>,
    metrics: Arc<ImMetrics>,
    tracker: Tracker,
}

/// One frame body per user (with the inbox entry it carries, for MSG), and
/// a connection that must not get it.
struct Frames {
    op: Op,
    bodies: BTreeMap<i64, (Bytes, Option<u64>)>,
    except_key: Option<String>,
}

impl Deliverer {
    /// Creates the deliverer and starts its ack-timeout loop on the current
    /// runtime (it ends when the deliverer is dropped).
    pub(crate) fn new(
        router: Arc<dyn Router>,
        queue: Arc<dyn Producer>,
        metrics: Arc<ImMetrics>,
        ack_timeout: Duration,
        big_group_rate: u32,
    ) -> Deliverer {
        let shared = Arc::new(Shared {
            router,
            queue,
            metrics,
            tracker: Tracker::new(ack_timeout),
        });
        tokio::spawn(check_acks(Arc::downgrade(&shared)));
        let lanes = (0..LANES)
            .map(|_| {
                let (tx, mut rx) = mpsc::channel::<Work>(LANE_CAPACITY);
                let shared = Arc::clone(&shared);
                // Ends when the deliverer (every sender) is dropped.
                tokio::spawn(async move {
                    while let Some(work) = rx.recv().await {
                        match work {
                            Work::Frames(frames) => shared.deliver(frames).await,
                            Work::Group(msg) => {
                                shared.queue_send(msg, "group").await;
                            }
                            Work::Channel { conv, mids, leave } => {
                                shared.change_channel(&conv, &mids, leave).await;
                            }
                        }
                    }
                });
                tx
            })
            .collect();
        Deliverer {
            shared,
            lanes,
            big_group_rate,
        }
    }

    /// Records a device's cumulative ACK (kept in the router, where every
    /// logic's ack-timeout check reads it).
    pub(crate) async fn ack(&self, mid: i64, key: &str, sync: u64) -> rim_router::Result<()> {
        self.shared.router.set_acked(mid, key, sync, ACK_TTL).await
    }

    /// Pushes a stored message as MSG to every connection of every member
    /// with an inbox entry, except the connection that sent it.
    pub(crate) async fn message(&self, sent: &Sent, except_key: Option<&str>) {
        let bodies = sent
            .inbox
            .iter()
            .map(|entry| {
                let body = wire::msg(&sent.message, Some(entry.sync)).encode();
                (entry.mid, (body, Some(entry.sync)))
            })
            .collect();
        let frames = Frames {
            op: Op::IM_MSG,
            bodies,
            except_key: except_key.map(str::to_owned),
        };
        self.hand_over(&sent.message.conv, frames).await;
    }

    /// Pushes a big group's stored message (MSG without an inbox sync) to
    /// the group's channel on every comet, within the group's cap.
    pub(crate) async fn group_message(&self, sent: &Sent) {
        let conv = sent.message.conv.to_string();
        let msg = PushMsg {
            r#type: PushType::Group as i32,
            operation: Op::IM_MSG.0,
            room: conv.clone(),
            msg: wire::msg(&sent.message, None).encode(),
            seq: sent.message.seq,
            speed: i32::try_from(self.big_group_rate).unwrap_or(i32::MAX),
            accepted_unix_nanos: unix_nanos(),
            ..PushMsg::default()
        };
        self.enqueue(&conv, Work::Group(msg)).await;
    }

    /// Puts the connections of `mids` in big group `conv`'s delivery
    /// channel (`leave`: takes them out) on the comets that host them.
    pub(crate) async fn channel(&self, conv: &ConvId, mids: Vec<i64>, leave: bool) {
        if mids.is_empty() {
            return;
        }
        let conv = conv.to_string();
        let work = Work::Channel {
            conv: conv.clone(),
            mids,
            leave,
        };
        self.enqueue(&conv, work).await;
    }

    /// Pushes a NOTIFY to every connection of `mid` except `except_key`.
    pub(crate) async fn notify(&self, mid: i64, notify: &Notify, except_key: Option<&str>) {
        let frames = Frames {
            op: Op::IM_NOTIFY,
            bodies: BTreeMap::from([(mid, (notify.encode(), None))]),
            except_key: except_key.map(str::to_owned),
        };
        self.hand_over(&mid, frames).await;
    }

    /// Queues frames on the lane of `order` (what must keep its order).
    async fn hand_over(&self, order: &(impl Hash + ?Sized), frames: Frames) {
        if frames.bodies.is_empty() {
            return;
        }
        self.enqueue(order, Work::Frames(frames)).await;
    }

    /// Queues work on the lane of `order`.
    async fn enqueue(&self, order: &(impl Hash + ?Sized), work: Work) {
        let mut hasher = DefaultHasher::new();
        order.hash(&mut hasher);
        // The modulo keeps the index below LANES.
        let lane = (hasher.finish() % LANES as u64) as usize;
        if self.lanes[lane].send(work).await.is_err() {
            // Only when the runtime is shutting down: devices catch up by SYNC.
            self.shared.metrics.delivery("dropped");
        }
    }
}

impl Shared {
    async fn deliver(&self, frames: Frames) {
        let mids: Vec<i64> = frames.bodies.keys().copied().collect();
        let devices = match self.router.devices(&mids).await {
            Ok(devices) => devices,
            Err(err) => {
                self.metrics.delivery("router_failed");
                tracing::warn!(%err, users = mids.len(), "IM delivery: router lookup failed; devices catch up by SYNC");
                return;
            }
        };
        // comet -> (user, connection) on that comet.
        let mut targets: BTreeMap<String, Vec<(i64, String)>> = BTreeMap::new();
        for device in devices {
            if frames.except_key.as_deref() == Some(device.key.as_str()) {
                continue;
            }
            targets
                .entry(device.server)
                .or_default()
                .push((device.mid, device.key));
        }
        // One queue message per comet, each connection with its user's body.
        for (server, connections) in targets {
            let mut keys = Vec::with_capacity(connections.len());
            let mut bodies = Vec::with_capacity(connections.len());
            let mut tracked = Vec::new();
            for (mid, key) in connections {
                let Some((body, sync)) = frames.bodies.get(&mid) else {
                    continue;
                };
                if let Some(sync) = *sync {
                    tracked.push((mid, key.clone(), sync));
                }
                keys.push(key);
                bodies.push(body.clone());
            }
            let now = Instant::now();
            if self.push(frames.op, &server, keys, bodies).await {
                for (mid, key, sync) in tracked {
                    if !self.tracker.pushed(mid, &key, &server, sync, now) {
                        self.metrics.delivery("untracked");
                    }
                }
            }
        }
    }

    /// Queues one frame per connection `keys[i]` of comet `server` with
    /// body `bodies[i]` (one shared body when they are all the same);
    /// returns whether the queue took it.
    async fn push(&self, op: Op, server: &str, keys: Vec<String>, mut bodies: Vec<Bytes>) -> bool {
        if keys.is_empty() {
            return true;
        }
        let accepted_unix_nanos = unix_nanos();
        let shared = bodies.windows(2).all(|pair| pair[0] == pair[1]);
        let msg = if shared {
            bodies.truncate(1);
            bodies.pop().unwrap_or_default()
        } else {
            Bytes::new()
        };
        let msg = PushMsg {
            r#type: PushType::Push as i32,
            operation: op.0,
            server: server.to_owned(),
            keys,
            msg,
            bodies: if shared { Vec::new() } else { bodies },
            accepted_unix_nanos,
            ..PushMsg::default()
        };
        self.queue_send(msg, "push").await
    }

    /// Writes one message to the queue; returns whether it took it.
    async fn queue_send(&self, msg: PushMsg, what: &'static str) -> bool {
        let server = msg.server.clone();
        match self.queue.send(msg).await {
            Ok(()) => {
                self.metrics.delivery("queued");
                true
            }
            Err(err) => {
                self.metrics.delivery("queue_failed");
                tracing::warn!(%err, server, what, "IM delivery: queue write failed; devices catch up by SYNC or PULL");
                false
            }
        }
    }

    /// Looks up the connections of `mids` and queues one GROUP_JOIN (or
    /// GROUP_LEAVE) per comet hosting some. A failure is logged: the
    /// comets repair a connection's channels at its next presence renewal.
    async fn change_channel(&self, conv: &str, mids: &[i64], leave: bool) {
        let kind = if leave {
            PushType::GroupLeave
        } else {
            PushType::GroupJoin
        };
        for chunk in mids.chunks(CHANNEL_LOOKUP) {
            let devices = match self.router.devices(chunk).await {
                Ok(devices) => devices,
                Err(err) => {
                    self.metrics.delivery("router_failed");
                    tracing::warn!(%err, conv, users = chunk.len(), "IM group channel change: router lookup failed; repaired at the connections' next renewal");
                    continue;
                }
            };
            let mut by_comet: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for device in devices {
                by_comet.entry(device.server).or_default().push(device.key);
            }
            for (server, keys) in by_comet {
                let msg = PushMsg {
                    r#type: kind as i32,
                    server,
                    room: conv.to_owned(),
                    keys,
                    accepted_unix_nanos: unix_nanos(),
                    ..PushMsg::default()
                };
                self.queue_send(msg, "channel").await;
            }
        }
    }

    /// Tells the connections whose pushes timed out unacked to SYNC.
    async fn notify_unacked(&self, due: Vec<(String, Pending)>) {
        let mut by_user: HashMap<i64, Vec<(String, Pending)>> = HashMap::new();
        for (key, pending) in due {
            by_user.entry(pending.mid).or_default().push((key, pending));
        }
        for (mid, entries) in by_user {
            let keys: Vec<String> = entries.iter().map(|(key, _)| key.clone()).collect();
            let checked = tokio::try_join!(
                self.router.acked(mid, &keys),
                self.router.servers_of_keys(&keys)
            );
            let (acked, servers) = match checked {
                Ok(found) => found,
                Err(err) => {
                    tracing::warn!(%err, mid, "IM ack check: router unavailable; skipped");
                    continue;
                }
            };
            for (((key, pending), acked), server) in entries.into_iter().zip(acked).zip(servers) {
                // Acked meanwhile, or gone (a reconnect SYNCs anyway).
                if acked >= pending.sync || server.as_deref() != Some(pending.server.as_str()) {
                    continue;
                }
                let notify = Notify::Sync { sync: pending.sync };
                self.metrics.delivery("ack_timeout_notify");
                self.push(
                    Op::IM_NOTIFY,
                    &pending.server,
                    vec![key],
                    vec![notify.encode()],
                )
                .await;
            }
        }
    }
}

/// Now, unix nanoseconds (the queue message's accept time).
fn unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// Checks the pushes whose ack timeout passed, until the deliverer is gone.
async fn check_acks(shared: Weak<Shared>) {
    let tick = match shared.upgrade() {
        Some(shared) => shared.tracker.tick(),
        None => return,
    };
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let due = shared.tracker.due(Instant::now());
        if !due.is_empty() {
            shared.notify_unacked(due).await;
        }
    }
}
