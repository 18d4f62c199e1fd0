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

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rim_im::Sent;
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

/// Hands IM frames to the push queue.
pub(crate) struct Deliverer {
    shared: Arc<Shared>,
    lanes: Vec<mpsc::Sender<Frames>>,
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
                let (tx, mut rx) = mpsc::channel::<Frames>(LANE_CAPACITY);
                let shared = Arc::clone(&shared);
                // Ends when the deliverer (every sender) is dropped.
                tokio::spawn(async move {
                    while let Some(frames) = rx.recv().await {
                        shared.deliver(frames).await;
                    }
                });
                tx
            })
            .collect();
        Deliverer { shared, lanes }
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
    async fn hand_over(&self, order: &impl Hash, frames: Frames) {
        if frames.bodies.is_empty() {
            return;
        }
        let mut hasher = DefaultHasher::new();
        order.hash(&mut hasher);
        // The modulo keeps the index below LANES.
        let lane = (hasher.finish() % LANES as u64) as usize;
        if self.lanes[lane].send(frames).await.is_err() {
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
        let accepted_unix_nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
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
        match self.queue.send(msg).await {
            Ok(()) => {
                self.metrics.delivery("queued");
                true
            }
            Err(err) => {
                self.metrics.delivery("queue_failed");
                tracing::warn!(%err, server, "IM delivery: queue write failed; devices catch up by SYNC");
                false
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
