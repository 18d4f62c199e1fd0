//! The room aggregator: messages to one room are merged into one op-9 batch,
//! flushed when it holds `room_batch` messages or its oldest message has
//! waited `room_flush`, whichever comes first. A flushed room is retired
//! (forgotten) — only after its batch was handed to the comets, so retiring
//! an idle room loses nothing. Flushed batches go to every comet, in flush
//! order, and each batch's messages are told when all comets handled it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Weak};
use std::time::Duration;

use rim_proto::pb::comet::v1 as pb;
use rim_proto::{BatchBuilder, Frame};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::comet_client::Call;
use crate::comets::Comets;
use crate::metrics::JobMetrics;
use crate::ticket::wait_all;

/// Messages queued to the aggregator before dispatchers wait.
const QUEUE: usize = 4096;

/// A message for a room, and who to tell when its batch was delivered.
pub(crate) struct RoomMessage {
    pub(crate) room: String,
    pub(crate) frame: Frame,
    pub(crate) done: oneshot::Sender<crate::Outcome>,
}

/// A batch ready to broadcast, with the messages it carries.
struct Flush {
    room: String,
    frame: Frame,
    dones: Vec<oneshot::Sender<crate::Outcome>>,
}

struct Pending {
    batch: BatchBuilder,
    /// The one message of a batch of one is sent as is, not wrapped.
    single: Option<Frame>,
    dones: Vec<oneshot::Sender<crate::Outcome>>,
    /// Tells this batch's deadline from a later batch's of the same room.
    generation: u64,
}

impl Pending {
    fn into_flush(self, room: String) -> Flush {
        let frame = match (self.dones.len(), self.single) {
            (1, Some(frame)) => frame,
            _ => self.batch.finish(),
        };
        Flush {
            room,
            frame,
            dones: self.dones,
        }
    }
}

/// Starts the aggregator and the task that delivers its flushed batches to
/// `comets` (in order per room) until the comet set is gone.
pub(crate) fn spawn(
    batch_size: usize,
    max_wait: Duration,
    comets: Weak<Comets>,
    metrics: Arc<JobMetrics>,
) -> mpsc::Sender<RoomMessage> {
    let (in_tx, in_rx) = mpsc::channel(QUEUE);
    let (out_tx, out_rx) = mpsc::channel(QUEUE);
    tokio::spawn(run(batch_size.max(1), max_wait, in_rx, out_tx));
    tokio::spawn(deliver_flushes(comets, metrics, out_rx));
    in_tx
}

/// Sends each flushed batch to every comet, in flush order, and tells the
/// batch's messages when all comets have handled it.
async fn deliver_flushes(
    comets: Weak<Comets>,
    metrics: Arc<JobMetrics>,
    mut flushes: mpsc::Receiver<Flush>,
) {
    while let Some(Flush { room, frame, dones }) = flushes.recv().await {
        let Some(clients) = comets.upgrade().map(|c| c.all()) else {
            return;
        };
        metrics.room_batch(dones.len());
        let mut rxs = Vec::with_capacity(clients.len());
        for (_, client) in clients {
            let call = Call::Room(pb::BroadcastRoomRequest {
                room_id: room.clone(),
                proto: Some(frame.clone().into()),
            });
            rxs.push(client.call(call).await);
        }
        let ticket = wait_all(rxs);
        tokio::spawn(async move {
            let outcome = ticket.await;
            for done in dones {
                let _ = done.send(outcome);
            }
        });
    }
}

async fn run(
    batch_size: usize,
    max_wait: Duration,
    mut rx: mpsc::Receiver<RoomMessage>,
    out: mpsc::Sender<Flush>,
) {
    let mut rooms: HashMap<String, Pending> = HashMap::new();
    // Deadlines in the order batches were opened: with one max_wait for all
    // rooms, that is also deadline order.
    let mut deadlines: VecDeque<(Instant, String, u64)> = VecDeque::new();
    let mut generation: u64 = 0;
    loop {
        let next_deadline = deadlines.front().map(|(at, _, _)| *at);
        let message = tokio::select! {
            message = rx.recv() => message,
            () = async {
                match next_deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                let now = Instant::now();
                while let Some((at, room, generation)) = deadlines.front().cloned() {
                    if at > now {
                        break;
                    }
                    deadlines.pop_front();
                    if rooms.get(&room).is_some_and(|p| p.generation == generation)
                        && let Some(pending) = rooms.remove(&room)
                        && out.send(pending.into_flush(room)).await.is_err()
                    {
                        return;
                    }
                }
                continue;
            }
        };
        let Some(RoomMessage { room, frame, done }) = message else {
            // Producers gone: flush everything held, then stop.
            for (room, pending) in rooms.drain() {
                let _ = out.send(pending.into_flush(room)).await;
            }
            return;
        };
        let pending = rooms.entry(room.clone()).or_insert_with(|| {
            generation += 1;
            deadlines.push_back((Instant::now() + max_wait, room.clone(), generation));
            Pending {
                batch: BatchBuilder::new(),
                single: None,
                dones: Vec::new(),
                generation,
            }
        });
        if pending.dones.is_empty() {
            pending.single = Some(frame.clone());
        }
        // Encoding a frame built from a queue message cannot exceed the
        // wire limit (the api bounds bodies); should it, the message is
        // reported rejected rather than lost silently.
        if pending.batch.push(&frame).is_err() {
            let _ = done.send(crate::Outcome::Rejected);
            continue;
        }
        pending.dones.push(done);
        if pending.dones.len() >= batch_size
            && let Some(pending) = rooms.remove(&room)
            && out.send(pending.into_flush(room)).await.is_err()
        {
            return;
        }
    }
}
