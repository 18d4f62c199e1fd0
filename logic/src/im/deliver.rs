//! Pushing IM frames to users' connections after the store committed:
//! MSG (op 21) with each recipient's own inbox entry, NOTIFY (op 27). They
//! go through the push queue like any push (PUSH messages, one per comet
//! and user), so the job delivers them and the comet's accepts filter keeps
//! them from connections that did not ask for IM ops.
//!
//! A delivery is best effort on top of the store: when the router or the
//! queue fails, the message is already durable and the devices get it by
//! SYNC (the ack-timeout NOTIFY sync, a sync gap in a later MSG, or the
//! SYNC a client sends on reconnect). Deliveries run in the background,
//! at most `MAX_IN_FLIGHT` at once: a full pipe slows new sends' replies
//! rather than growing without bound.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rim_im::Sent;
use rim_proto::Op;
use rim_proto::im::{Body, Notify};
use rim_queue::{Producer, PushMsg, PushType};
use rim_router::Router;
use tokio::sync::Semaphore;

use super::metrics::ImMetrics;
use super::wire;

/// Deliveries running at once.
const MAX_IN_FLIGHT: usize = 1024;

/// Hands IM frames to the push queue.
pub(crate) struct Deliverer {
    router: Arc<dyn Router>,
    queue: Arc<dyn Producer>,
    permits: Arc<Semaphore>,
    metrics: Arc<ImMetrics>,
}

/// One frame body per user, and a connection that must not get it.
struct Frames {
    op: Op,
    bodies: BTreeMap<i64, Bytes>,
    except_key: Option<String>,
}

impl Deliverer {
    pub(crate) fn new(
        router: Arc<dyn Router>,
        queue: Arc<dyn Producer>,
        metrics: Arc<ImMetrics>,
    ) -> Deliverer {
        Deliverer {
            router,
            queue,
            permits: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            metrics,
        }
    }

    /// Pushes a stored message as MSG to every connection of every member
    /// with an inbox entry, except the connection that sent it.
    pub(crate) async fn message(&self, sent: &Sent, except_key: Option<&str>) {
        let bodies = sent
            .inbox
            .iter()
            .map(|entry| {
                let body = wire::msg(&sent.message, Some(entry.sync)).encode();
                (entry.mid, body)
            })
            .collect();
        self.spawn(Frames {
            op: Op::IM_MSG,
            bodies,
            except_key: except_key.map(str::to_owned),
        })
        .await;
    }

    /// Pushes a NOTIFY to every connection of `mid` except `except_key`.
    pub(crate) async fn notify(&self, mid: i64, notify: &Notify, except_key: Option<&str>) {
        self.spawn(Frames {
            op: Op::IM_NOTIFY,
            bodies: BTreeMap::from([(mid, notify.encode())]),
            except_key: except_key.map(str::to_owned),
        })
        .await;
    }

    async fn spawn(&self, frames: Frames) {
        if frames.bodies.is_empty() {
            return;
        }
        // Waits only when MAX_IN_FLIGHT deliveries are running.
        let Ok(permit) = Arc::clone(&self.permits).acquire_owned().await else {
            return; // never closed
        };
        let router = Arc::clone(&self.router);
        let queue = Arc::clone(&self.queue);
        let metrics = Arc::clone(&self.metrics);
        tokio::spawn(async move {
            deliver(&*router, &*queue, &metrics, frames).await;
            drop(permit);
        });
    }
}

async fn deliver(router: &dyn Router, queue: &dyn Producer, metrics: &ImMetrics, frames: Frames) {
    let mids: Vec<i64> = frames.bodies.keys().copied().collect();
    let devices = match router.devices(&mids).await {
        Ok(devices) => devices,
        Err(err) => {
            metrics.delivery("router_failed");
            tracing::warn!(%err, users = mids.len(), "IM delivery: router lookup failed; devices catch up by SYNC");
            return;
        }
    };
    // (comet, user) -> that user's connections on that comet.
    let mut targets: BTreeMap<(String, i64), Vec<String>> = BTreeMap::new();
    for device in devices {
        if frames.except_key.as_deref() == Some(device.key.as_str()) {
            continue;
        }
        targets
            .entry((device.server, device.mid))
            .or_default()
            .push(device.key);
    }
    let accepted_unix_nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    for ((server, mid), keys) in targets {
        let Some(body) = frames.bodies.get(&mid) else {
            continue;
        };
        let msg = PushMsg {
            r#type: PushType::Push as i32,
            operation: frames.op.0,
            server,
            keys,
            msg: body.clone(),
            accepted_unix_nanos,
            ..PushMsg::default()
        };
        match queue.send(msg).await {
            Ok(()) => metrics.delivery("queued"),
            Err(err) => {
                metrics.delivery("queue_failed");
                tracing::warn!(%err, mid, "IM delivery: queue write failed; devices catch up by SYNC");
            }
        }
    }
}
