//! rim-job owns delivery from the queue to the comets: turning each push
//! message into calls on the region's comets — PUSH to the named comet,
//! ROOM through a per-room aggregator into op-9 batches, BROADCAST to every
//! comet with the speed divided among them — through one ordered worker per
//! comet, and reporting when each message is fully handled so that a queue
//! consumer commits only what was delivered (at-least-once).
//!
//! It does not plan pushes (rim-api) and does not know sockets (rim-comet).

mod kafka;
mod metrics;
mod room;
mod worker;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rim_config::JobConfig;
use rim_proto::api::CometApi;
use rim_proto::pb::comet::v1 as pb;
use rim_proto::pb::frame::v1::Proto;
use rim_proto::{Frame, Op};
use rim_queue::{MemoryConsumer, PushMsg, PushType};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use crate::kafka::{ConsumeError, consume_kafka};
use crate::metrics::JobMetrics;
use crate::room::{Flush, RoomMessage};
pub use crate::worker::Outcome;
use crate::worker::{Call, Worker};

/// Messages handed to comets but not yet confirmed, per consumer, before it
/// stops reading (bounds memory when comets are slow).
const MAX_IN_FLIGHT: usize = 8192;

/// Delivers push messages to one region's comets.
#[derive(Clone)]
pub struct Job {
    inner: Arc<Inner>,
}

struct Inner {
    workers: RwLock<HashMap<String, Arc<Worker>>>,
    rooms: mpsc::Sender<RoomMessage>,
    metrics: Arc<JobMetrics>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("comets", &self.comet_ids())
            .finish()
    }
}

/// A comet this job delivers to: its node id and its client.
pub type CometHandle = (String, Arc<dyn CometApi>);

/// Completes when a message is fully handled.
pub type Ticket = futures::future::BoxFuture<'static, Outcome>;

fn ready(outcome: Outcome) -> Ticket {
    Box::pin(std::future::ready(outcome))
}

fn wait(rx: oneshot::Receiver<Outcome>) -> Ticket {
    // A dropped sender means the worker or aggregator stopped: the message
    // was not delivered, and the comet set is going away.
    Box::pin(async move { rx.await.unwrap_or(Outcome::Gone) })
}

/// Waits for several calls: Delivered if any comet took it, else the first outcome.
fn wait_all(rxs: Vec<oneshot::Receiver<Outcome>>) -> Ticket {
    Box::pin(async move {
        let outcomes = futures::future::join_all(rxs).await;
        let outcomes: Vec<Outcome> = outcomes
            .into_iter()
            .map(|o| o.unwrap_or(Outcome::Gone))
            .collect();
        if outcomes.contains(&Outcome::Delivered) {
            Outcome::Delivered
        } else {
            outcomes.first().copied().unwrap_or(Outcome::Gone)
        }
    })
}

impl Job {
    /// Creates a job with no comets yet (see [`Job::set_comets`]).
    pub fn new(config: &JobConfig) -> Job {
        let (rooms, flushes) = room::spawn(config.room_batch, config.room_flush);
        let job = Job {
            inner: Arc::new(Inner {
                workers: RwLock::new(HashMap::new()),
                rooms,
                metrics: Arc::new(JobMetrics::default()),
            }),
        };
        tokio::spawn(broadcast_flushes(Arc::downgrade(&job.inner), flushes));
        job
    }

    /// Replaces the set of comets this job delivers to: new ones get a
    /// worker, missing ones are retired (their pending calls end as Gone).
    pub fn set_comets(&self, comets: Vec<CometHandle>) {
        let mut workers = self
            .inner
            .workers
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let keep: HashMap<String, Arc<dyn CometApi>> = comets.into_iter().collect();
        workers.retain(|id, worker| {
            let stays = keep.contains_key(id);
            if !stays {
                worker.retire();
            }
            stays
        });
        for (id, api) in keep {
            workers.entry(id.clone()).or_insert_with(|| {
                Arc::new(Worker::spawn(id, api, Arc::clone(&self.inner.metrics)))
            });
        }
    }

    /// Registers the job's metrics (`rim_job_*`) in `registry`.
    pub fn register_metrics(&self, registry: &mut rim_metrics::Registry) {
        self.inner.metrics.register(registry);
    }

    /// Returns the ids of the comets this job delivers to.
    pub fn comet_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.workers().into_iter().map(|(id, _)| id).collect();
        ids.sort();
        ids
    }

    fn workers(&self) -> Vec<(String, Arc<Worker>)> {
        let workers = self
            .inner
            .workers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        workers
            .iter()
            .map(|(id, w)| (id.clone(), Arc::clone(w)))
            .collect()
    }

    /// Hands one message to the comets. Calls are queued in the order
    /// messages are given, per comet; the ticket completes when the message
    /// is fully handled (delivered, refused as invalid, or its comet gone),
    /// and is counted in the job's metrics then.
    pub async fn deliver(&self, msg: PushMsg) -> Ticket {
        let (kind, accepted) = (msg.r#type(), msg.accepted_unix_nanos);
        let metrics = Arc::clone(&self.inner.metrics);
        metrics.started();
        let ticket = self.dispatch(msg).await;
        Box::pin(
            async move {
                let outcome = ticket.await;
                metrics.finished(kind, outcome, accepted);
                tracing::debug!(?outcome, "message handled");
                outcome
            }
            .in_current_span(),
        )
    }

    async fn dispatch(&self, msg: PushMsg) -> Ticket {
        let proto = Proto {
            ver: 1,
            op: msg.operation,
            seq: 0,
            body: msg.msg.clone(),
        };
        match msg.r#type() {
            PushType::Push => {
                let worker = self
                    .inner
                    .workers
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get(&msg.server)
                    .cloned();
                // Not one of this region's comets, or gone: nothing to do here.
                let Some(worker) = worker else {
                    return ready(Outcome::Gone);
                };
                let call = Call::Push(pb::PushMsgRequest {
                    keys: msg.keys,
                    proto_op: msg.operation,
                    proto: Some(proto),
                });
                wait(worker.call(call).await)
            }
            PushType::Room => {
                let (done, rx) = oneshot::channel();
                let frame = Frame::new(Op(msg.operation), 0, msg.msg);
                if self
                    .inner
                    .rooms
                    .send(RoomMessage {
                        room: msg.room,
                        frame,
                        done,
                    })
                    .await
                    .is_err()
                {
                    return ready(Outcome::Gone);
                }
                wait(rx)
            }
            PushType::Broadcast => {
                let workers = self.workers();
                if workers.is_empty() {
                    return ready(Outcome::Gone);
                }
                // The requested pace is for the whole region.
                let n = i32::try_from(workers.len()).unwrap_or(i32::MAX);
                let speed = if msg.speed > 0 {
                    (msg.speed + n - 1) / n
                } else {
                    0
                };
                let mut rxs = Vec::with_capacity(workers.len());
                for (_, worker) in workers {
                    let call = Call::Broadcast(pb::BroadcastRequest {
                        proto_op: msg.operation,
                        proto: Some(proto.clone()),
                        speed,
                    });
                    rxs.push(worker.call(call).await);
                }
                wait_all(rxs)
            }
            PushType::Unspecified => {
                tracing::warn!("push message without a type dropped");
                ready(Outcome::Rejected)
            }
        }
    }
}

/// Sends each flushed room batch to every comet, in flush order, and tells
/// the batch's messages when all comets have handled it.
async fn broadcast_flushes(inner: std::sync::Weak<Inner>, mut flushes: mpsc::Receiver<Flush>) {
    while let Some(Flush { room, frame, dones }) = flushes.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        inner.metrics.room_batch(dones.len());
        let workers: Vec<Arc<Worker>> = {
            let workers = inner
                .workers
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            workers.values().cloned().collect()
        };
        drop(inner);
        let mut rxs = Vec::with_capacity(workers.len());
        for worker in workers {
            let call = Call::Room(pb::BroadcastRoomRequest {
                room_id: room.clone(),
                proto: Some(frame.clone().into()),
            });
            rxs.push(worker.call(call).await);
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

/// Consumes the in-process queue until `stop` is cancelled or every
/// producer is gone, keeping at most MAX_IN_FLIGHT messages unconfirmed.
pub async fn consume_memory(job: Job, mut consumer: MemoryConsumer, stop: CancellationToken) {
    job.inner.metrics.watch_memory_queue(consumer.depth());
    let mut in_flight: FuturesUnordered<Ticket> = FuturesUnordered::new();
    loop {
        let room = in_flight.len() < MAX_IN_FLIGHT;
        let busy = !in_flight.is_empty();
        let msg = tokio::select! {
            () = stop.cancelled() => break,
            Some(_) = in_flight.next(), if busy => continue,
            msg = consumer.recv(), if room => match msg {
                Some(msg) => msg,
                None => break,
            },
        };
        let span = tracing::debug_span!(
            "push",
            kind = metrics::kind_label(msg.r#type()),
            push.id = msg.accepted_unix_nanos,
            op = msg.operation,
        );
        let ticket = job.deliver(msg).instrument(span).await;
        in_flight.push(ticket);
    }
    // Let what was handed out finish (bounded by the caller's grace period).
    while in_flight.next().await.is_some() {}
}
