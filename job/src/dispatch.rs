//! The dispatcher: plans each queue message by its type — PUSH to the named
//! comet, ROOM and GROUP (a big group's message) through the aggregator,
//! GROUP_JOIN and GROUP_LEAVE to the named comet, BROADCAST to every comet
//! with the pace divided among them — and queues the calls on the comets'
//! delivery clients, in the order messages are given.

use std::sync::Arc;

use rim_config::JobConfig;
use rim_proto::pb::comet::v1 as pb;
use rim_proto::pb::frame::v1::Proto;
use rim_proto::{Frame, Op};
use rim_queue::{PushMsg, PushType};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::Outcome;
use crate::comet_client::Call;
use crate::comets::{CometHandle, Comets};
use crate::metrics::JobMetrics;
use crate::room::{self, GroupSeq, RoomMessage, Target};
use crate::routes::{self, RoomRoutes};
use crate::ticket::{Ticket, ready, wait, wait_all};

/// Delivers push messages to one region's comets.
#[derive(Clone)]
pub struct Job {
    comets: Arc<Comets>,
    routes: Arc<RoomRoutes>,
    routes_every: std::time::Duration,
    rooms: mpsc::Sender<RoomMessage>,
    pub(crate) metrics: Arc<JobMetrics>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("comets", &self.comet_ids())
            .finish()
    }
}

impl Job {
    /// Creates a job with no comets yet (see [`Job::set_comets`]).
    pub fn new(config: &JobConfig) -> Job {
        let comets = Arc::new(Comets::default());
        let metrics = Arc::new(JobMetrics::default());
        let every = config.room_routes_interval;
        let routes = Arc::new(RoomRoutes::new(
            !every.is_zero(),
            config.room_routes_min_comets,
        ));
        if !every.is_zero() {
            tokio::spawn(routes::poll(
                Arc::clone(&routes),
                Arc::downgrade(&comets),
                every,
            ));
        }
        let rooms = room::spawn(
            room::Batching {
                rule: config.room_flush_rule,
                batch_size: config.room_batch,
                max_wait: config.room_flush,
            },
            Arc::downgrade(&comets),
            Arc::clone(&routes),
            Arc::clone(&metrics),
        );
        Job {
            comets,
            routes,
            routes_every: every,
            rooms,
            metrics,
        }
    }

    /// Asks every comet for its rooms now (the background poll does it
    /// every `job.room_routes_interval`); room batches go only to the
    /// comets that host the room from then on.
    pub async fn refresh_room_routes(&self) {
        let limit = if self.routes_every.is_zero() {
            std::time::Duration::from_secs(1)
        } else {
            self.routes_every
        };
        self.routes.refresh(&self.comets, limit).await;
    }

    /// Replaces the set of comets this job delivers to: new ones get a
    /// delivery client, missing ones are retired (their pending calls end as
    /// Gone).
    pub fn set_comets(&self, comets: Vec<CometHandle>) {
        self.comets.replace(comets, &self.metrics);
    }

    /// Registers the job's metrics (`rim_job_*`) in `registry`.
    pub fn register_metrics(&self, registry: &mut rim_metrics::Registry) {
        self.metrics.register(registry);
    }

    /// Returns the ids of the comets this job delivers to.
    pub fn comet_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.comets.all().into_iter().map(|(id, _)| id).collect();
        ids.sort();
        ids
    }

    /// Hands one message to the comets. Calls are queued in the order
    /// messages are given, per comet; the ticket completes when the message
    /// is fully handled (delivered, refused as invalid, or its comet gone),
    /// and is counted in the job's metrics then.
    pub async fn deliver(&self, msg: PushMsg) -> Ticket {
        let (kind, accepted) = (msg.r#type(), msg.accepted_unix_nanos);
        let metrics = Arc::clone(&self.metrics);
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
        match msg.r#type() {
            PushType::Push => self.push(msg).await,
            PushType::Room => self.room(msg).await,
            PushType::Broadcast => self.broadcast(msg).await,
            PushType::Group => self.group(msg).await,
            PushType::GroupJoin | PushType::GroupLeave => self.change_group(msg).await,
            PushType::Unspecified => {
                tracing::warn!("push message without a type dropped");
                ready(Outcome::Rejected)
            }
        }
    }

    /// PUSH: the keys on the one comet the api planned them for.
    async fn push(&self, msg: PushMsg) -> Ticket {
        // Not one of this region's comets, or gone: nothing to do here.
        let Some(client) = self.comets.get(&msg.server) else {
            return ready(Outcome::Gone);
        };
        let call = Call::Push(pb::PushMsgRequest {
            proto_op: msg.operation,
            proto: Some(proto(&msg)),
            keys: msg.keys,
            bodies: msg.bodies,
        });
        wait(client.call(call).await)
    }

    /// ROOM: merged with the room's other messages by the aggregator, which
    /// completes the ticket once the batch reached the comets.
    async fn room(&self, msg: PushMsg) -> Ticket {
        let frame = Frame::new(Op(msg.operation), 0, msg.msg);
        self.aggregate(Target::Room(msg.room), frame, None).await
    }

    /// GROUP: like a room's, to the group's delivery channel on every
    /// comet, within the group's cap (`speed` messages a second).
    async fn group(&self, msg: PushMsg) -> Ticket {
        if msg.room.is_empty() {
            tracing::warn!("group message without a group dropped");
            return ready(Outcome::Rejected);
        }
        let group = GroupSeq {
            seq: msg.seq,
            rate: u32::try_from(msg.speed).unwrap_or(0),
        };
        let frame = Frame::new(Op(msg.operation), 0, msg.msg);
        self.aggregate(Target::Group(msg.room), frame, Some(group))
            .await
    }

    async fn aggregate(&self, target: Target, frame: Frame, group: Option<GroupSeq>) -> Ticket {
        let (done, rx) = oneshot::channel();
        let message = RoomMessage {
            target,
            frame,
            group,
            done,
        };
        if self.rooms.send(message).await.is_err() {
            return ready(Outcome::Gone);
        }
        wait(rx)
    }

    /// GROUP_JOIN, GROUP_LEAVE: the keys on the one comet that hosts them.
    async fn change_group(&self, msg: PushMsg) -> Ticket {
        if msg.room.is_empty() {
            tracing::warn!("group channel change without a group dropped");
            return ready(Outcome::Rejected);
        }
        let Some(client) = self.comets.get(&msg.server) else {
            return ready(Outcome::Gone);
        };
        let leave = msg.r#type() == PushType::GroupLeave;
        let call = Call::ChangeGroup(pb::ChangeGroupRequest {
            group: msg.room,
            keys: msg.keys,
            leave,
        });
        wait(client.call(call).await)
    }

    /// BROADCAST: every comet, the requested pace divided among them.
    async fn broadcast(&self, msg: PushMsg) -> Ticket {
        let clients = self.comets.all();
        if clients.is_empty() {
            return ready(Outcome::Gone);
        }
        // The requested pace is for the whole region.
        let n = i32::try_from(clients.len()).unwrap_or(i32::MAX);
        let speed = if msg.speed > 0 {
            (msg.speed + n - 1) / n
        } else {
            0
        };
        let proto = proto(&msg);
        let mut rxs = Vec::with_capacity(clients.len());
        for (_, client) in clients {
            let call = Call::Broadcast(pb::BroadcastRequest {
                proto_op: msg.operation,
                proto: Some(proto.clone()),
                speed,
            });
            rxs.push(client.call(call).await);
        }
        wait_all(rxs)
    }
}

/// The client frame a message carries.
fn proto(msg: &PushMsg) -> Proto {
    Proto {
        ver: 1,
        op: msg.operation,
        seq: 0,
        body: msg.msg.clone(),
    }
}
