//! The comet's shared state and its delivery operations (the `CometApi`).

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use rim_config::{CometConfig, NodeConfig};
use rim_proto::api::{CometApi, LogicApi, PushBatchReply, RpcError, RpcResult, check_push_batch};
use rim_proto::pb::comet::v1 as pb;
use rim_proto::pb::frame::v1::Proto;
use rim_proto::{BatchBuilder, Frame};
use tracing::Instrument;

use crate::bucket::Bucket;
use crate::log_limit::LogLimit;
use crate::pacer::{Paced, Pacer};
use crate::session::{Pushed, Session};
use crate::stats::{self, Rpc, Stats, Wire, WritePath};

/// The comet: sessions in buckets, limits, counters and the logic it reports to.
///
/// Cloning is cheap and shares the state.
#[derive(Clone)]
pub struct Comet {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) id: String,
    pub(crate) region: String,
    /// The cluster's gRPC token (`node.grpc_token`) the gRPC service
    /// requires; `None` = no check.
    pub(crate) grpc_token: Option<String>,
    /// The gRPC service's TLS files (`node.tls_*`), read when it starts.
    pub(crate) grpc_tls: rim_tls::GrpcTlsFiles,
    pub(crate) config: CometConfig,
    pub(crate) logic: Arc<dyn LogicApi>,
    pub(crate) stats: Stats,
    buckets: Box<[Bucket]>,
    hasher: std::collections::hash_map::RandomState,
    /// Cluster-wide room counts from the last RenewOnline.
    online: RwLock<HashMap<String, i32>>,
    started: Instant,
    next_session_id: AtomicU64,
    connections: AtomicU64,
    per_ip: Mutex<HashMap<IpAddr, u32>>,
    pub(crate) draining: AtomicBool,
    /// Paced broadcasts, started on the first one.
    pacer: OnceLock<Pacer>,
    /// Auth failures caused by logic (down or slow): one log line per 10 s.
    pub(crate) auth_failures_log: LogLimit,
}

impl std::fmt::Debug for Comet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Comet")
            .field("id", &self.inner.id)
            .finish_non_exhaustive()
    }
}

/// A held connection slot; frees itself (global and per-IP) when dropped.
pub(crate) struct ConnSlot {
    inner: Arc<Inner>,
    ip: IpAddr,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.inner.connections.fetch_sub(1, Ordering::AcqRel);
        let mut per_ip = self.inner.per_ip.lock();
        if let Some(count) = per_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// Counts of one delivery, summed over recipients.
#[derive(Default)]
pub(crate) struct Tally {
    pub(crate) delivery: pb::Delivery,
    slow_closes: u64,
    /// Deliveries by path: direct, partial, queued (see [`WritePath`]).
    paths: [u64; 3],
    /// Wire bytes the pushing task wrote itself (whole direct writes).
    direct_bytes: u64,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        let (d, o) = (&mut self.delivery, other.delivery);
        d.delivered += o.delivered;
        d.filtered += o.filtered;
        d.missing += o.missing;
        d.dropped += o.dropped;
        self.slow_closes += other.slow_closes;
        for (path, n) in self.paths.iter_mut().zip(other.paths) {
            *path += n;
        }
        self.direct_bytes += other.direct_bytes;
    }

    fn record(&mut self, pushed: Pushed) {
        match pushed {
            Pushed::Queued => {
                self.delivery.delivered += 1;
                self.paths[WritePath::Queued as usize] += 1;
            }
            Pushed::Partial => {
                self.delivery.delivered += 1;
                self.paths[WritePath::Partial as usize] += 1;
            }
            Pushed::Written { bytes } => {
                self.delivery.delivered += 1;
                self.paths[WritePath::Direct as usize] += 1;
                self.direct_bytes += bytes as u64;
            }
            Pushed::Dropped => self.delivery.dropped += 1,
            Pushed::DroppedAndClosed => {
                self.delivery.dropped += 1;
                self.slow_closes += 1;
            }
        }
    }
}

/// Members one task pushes a room's (or channel's) frame to before the
/// rest is split over the runtime's workers: a push to an idle connection
/// is a socket write on the pushing task, and one big room's writes should
/// use every core, as the connection tasks' writes did.
const FAN_OUT_CHUNK: usize = 1024;

/// Pushes `frame` to every member (only to those accepting `op`, when
/// given); a big list is split over the runtime's workers.
async fn fan_out(
    members: Vec<Arc<Session>>,
    frame: Bytes,
    op: Option<i32>,
    now: u64,
    slow: u64,
) -> Tally {
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    if workers < 2 || members.len() <= FAN_OUT_CHUNK {
        return push_each(&members, &frame, op, now, slow);
    }
    let chunk = members.len().div_ceil(workers).max(FAN_OUT_CHUNK);
    let members = Arc::new(members);
    let mut others = Vec::new();
    let mut start = chunk;
    while start < members.len() {
        let end = (start + chunk).min(members.len());
        let (members, frame) = (Arc::clone(&members), frame.clone());
        others.push(tokio::spawn(async move {
            push_each(&members[start..end], &frame, op, now, slow)
        }));
        start = end;
    }
    let mut tally = push_each(&members[..chunk], &frame, op, now, slow);
    for other in others {
        match other.await {
            Ok(part) => tally.merge(part),
            // Pushing does not panic; should it, the other parts still went.
            Err(err) => tracing::error!(reason = %err, "a fan-out part failed"),
        }
    }
    tally
}

fn push_each(
    members: &[Arc<Session>],
    frame: &Bytes,
    op: Option<i32>,
    now: u64,
    slow: u64,
) -> Tally {
    let mut tally = Tally::default();
    for session in members {
        if op.is_none_or(|op| session.accepts(op)) {
            tally.record(session.push(frame, now, slow));
        } else {
            tally.delivery.filtered += 1;
        }
    }
    tally
}

impl Comet {
    /// Creates a comet that reports to `logic`.
    pub fn new(node: &NodeConfig, config: CometConfig, logic: Arc<dyn LogicApi>) -> Comet {
        let buckets = (0..config.buckets).map(|_| Bucket::default()).collect();
        Comet {
            inner: Arc::new(Inner {
                id: node.id.clone(),
                region: node.region.clone(),
                grpc_token: node.grpc_token.clone(),
                grpc_tls: rim_tls::GrpcTlsFiles::of(node),
                config,
                logic,
                stats: Stats::default(),
                buckets,
                hasher: Default::default(),
                online: RwLock::new(HashMap::new()),
                started: Instant::now(),
                next_session_id: AtomicU64::new(1),
                connections: AtomicU64::new(0),
                per_ip: Mutex::new(HashMap::new()),
                draining: AtomicBool::new(false),
                pacer: OnceLock::new(),
                auth_failures_log: LogLimit::new(10_000),
            }),
        }
    }

    /// Returns this comet's node id.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Returns how many connections are open (authenticated or not).
    pub fn connections(&self) -> u64 {
        self.inner.sockets()
    }
}

impl Inner {
    /// Returns how many sockets hold a connection slot.
    pub(crate) fn sockets(&self) -> u64 {
        self.connections.load(Ordering::Acquire)
    }

    pub(crate) fn bucket(&self, key: &str) -> &Bucket {
        // buckets is never empty: config validation keeps it in 1..=4096.
        &self.buckets[(self.hasher.hash_one(key) % self.buckets.len() as u64) as usize]
    }

    pub(crate) fn buckets(&self) -> &[Bucket] {
        &self.buckets
    }

    /// Milliseconds since the comet started (the slow-consumer clock).
    pub(crate) fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub(crate) fn slow_ms(&self) -> u64 {
        self.config.slow_consumer_timeout.as_millis() as u64
    }

    pub(crate) fn next_session_id(&self) -> u64 {
        self.next_session_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Takes a connection slot unless a global or per-IP limit is reached.
    pub(crate) fn try_admit(self: &Arc<Self>, ip: IpAddr) -> Option<ConnSlot> {
        if self.draining.load(Ordering::Acquire) {
            return None;
        }
        let mut per_ip = self.per_ip.lock();
        let count = per_ip.entry(ip).or_insert(0);
        if *count as usize >= self.config.max_connections_per_ip {
            if *count == 0 {
                per_ip.remove(&ip);
            }
            return None;
        }
        if self.connections.fetch_add(1, Ordering::AcqRel) as usize >= self.config.max_connections {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            if *count == 0 {
                per_ip.remove(&ip);
            }
            return None;
        }
        *count += 1;
        Some(ConnSlot {
            inner: Arc::clone(self),
            ip,
        })
    }

    /// Returns the online count heartbeat replies carry for `room`:
    /// cluster-wide when logic reported it, else this comet's own.
    pub(crate) fn room_online(&self, room: Option<&str>) -> i32 {
        let Some(room) = room else { return 0 };
        if let Some(&count) = self.online.read().get(room) {
            return count;
        }
        let local: usize = self.buckets.iter().map(|b| b.room_len(room)).sum();
        i32::try_from(local).unwrap_or(i32::MAX)
    }

    /// Returns how many channel seats (sessions × big groups) the comet holds.
    pub(crate) fn channel_seats(&self) -> u64 {
        self.buckets.iter().map(|b| b.channel_seats() as u64).sum()
    }

    /// Returns this comet's member count per room.
    pub(crate) fn room_counts(&self) -> HashMap<String, u64> {
        let mut counts = HashMap::new();
        for bucket in self.buckets.iter() {
            bucket.add_room_counts(&mut counts);
        }
        counts
    }

    /// Replaces the cluster-wide room counts.
    pub(crate) fn set_online(&self, counts: HashMap<String, i32>) {
        *self.online.write() = counts;
    }

    /// Counts one push RPC: its recipients, drops and slow-consumer closes.
    pub(crate) fn count(&self, rpc: Rpc, started: Instant, tally: &Tally) {
        let s = &self.stats;
        let d = &tally.delivery;
        stats::add(&s.dropped_frames, d.dropped);
        stats::add(&s.slow_consumer_closes, tally.slow_closes);
        for (counter, &n) in s.push_writes.iter().zip(&tally.paths) {
            stats::add(counter, n);
        }
        // Whole direct writes are counted here, once per RPC, as the
        // connection tasks count theirs (only raw TCP has direct writes);
        // the shard is the RPC's, not a connection's.
        let direct = tally.paths[WritePath::Direct as usize];
        if direct > 0 {
            s.traffic.written(
                d.delivered,
                Wire::Tcp,
                direct as usize,
                tally.direct_bytes as usize,
            );
        }
        for (counter, n) in s
            .recipients
            .iter()
            .zip([d.delivered, d.filtered, d.missing, d.dropped])
        {
            stats::add(counter, n);
        }
        s.rpc(rpc, started.elapsed());
        tracing::debug!(
            delivered = d.delivered,
            filtered = d.filtered,
            missing = d.missing,
            dropped = d.dropped,
            "push handled"
        );
    }

    pub(crate) fn push_one(&self, session: &Session, frame: &Bytes) -> Pushed {
        session.push(frame, self.now_ms(), self.slow_ms())
    }
}

impl Inner {
    /// Queues `frame` on every session of `bucket` that accepts `op`.
    pub(crate) fn broadcast_bucket(
        &self,
        bucket: &Bucket,
        op: i32,
        frame: &Bytes,
        tally: &mut Tally,
    ) {
        for session in bucket.sessions() {
            if session.accepts(op) {
                tally.record(self.push_one(&session, frame));
            } else {
                tally.delivery.filtered += 1;
            }
        }
    }
}

impl Comet {
    /// Broadcasts to every session: at once without a speed; with one,
    /// queued for the [pacer](crate::pacer), answering `paced` at once.
    async fn broadcast_all(&self, req: pb::BroadcastRequest) -> RpcResult<pb::Delivery> {
        let started = Instant::now();
        let frame = encode(req.proto)?;
        let inner = &self.inner;
        let speed = u64::try_from(req.speed).unwrap_or(0);
        if speed > 0 {
            let pacer = inner
                .pacer
                .get_or_init(|| Pacer::spawn(Arc::downgrade(&self.inner)));
            pacer.submit(Paced {
                op: req.proto_op,
                frame,
                speed,
            })?;
            return Ok(pb::Delivery {
                paced: true,
                ..pb::Delivery::default()
            });
        }
        let mut tally = Tally::default();
        for bucket in inner.buckets() {
            inner.broadcast_bucket(bucket, req.proto_op, &frame, &mut tally);
        }
        inner.count(Rpc::Broadcast, started, &tally);
        Ok(tally.delivery)
    }
}

/// Encodes a push once; every recipient shares the bytes.
///
/// A push that is not already an op-9 batch goes out as a batch of one, as
/// goim's job wraps every push: a WebSocket client receives every push as
/// one op-9 message, while a TCP client receives the inner frame alone (the
/// TCP transport writes a batch's inner frames), exactly as before.
fn encode(proto: Option<Proto>) -> RpcResult<Bytes> {
    let proto = proto.ok_or_else(|| RpcError::InvalidArgument("proto is missing".into()))?;
    let frame = Frame::try_from(proto).map_err(|e| RpcError::InvalidArgument(e.to_string()))?;
    let batch = if frame.is_batch() {
        frame
    } else {
        let mut batch = BatchBuilder::with_capacity(frame.encoded_len());
        batch
            .push(&frame)
            .map_err(|e| RpcError::InvalidArgument(e.to_string()))?;
        batch.finish()
    };
    batch
        .to_bytes()
        .map_err(|e| RpcError::InvalidArgument(e.to_string()))
}

impl Comet {
    /// Delivers one push (PushMsg, or one push of a PushMsgs batch).
    fn push(&self, req: pb::PushMsgRequest) -> RpcResult<pb::Delivery> {
        let started = Instant::now();
        let span = tracing::debug_span!(
            "push_rpc",
            rpc = "push",
            op = req.proto_op,
            keys = req.keys.len()
        );
        let _entered = span.enter();
        // One frame for every key, or (bodies set) one per key.
        let shared = if req.bodies.is_empty() {
            Some(encode(req.proto.clone())?)
        } else if req.bodies.len() != req.keys.len() {
            return Err(RpcError::InvalidArgument(format!(
                "{} bodies for {} keys",
                req.bodies.len(),
                req.keys.len()
            )));
        } else {
            None
        };
        let inner = &self.inner;
        let mut tally = Tally::default();
        for (i, key) in req.keys.iter().enumerate() {
            match inner.bucket(key).get(key) {
                None => tally.delivery.missing += 1,
                Some(session) if !session.accepts(req.proto_op) => tally.delivery.filtered += 1,
                Some(session) => {
                    let frame = match &shared {
                        Some(frame) => frame.clone(),
                        None => encode(req.proto.clone().map(|proto| Proto {
                            body: req.bodies[i].clone(),
                            ..proto
                        }))?,
                    };
                    tally.record(inner.push_one(&session, &frame));
                }
            }
        }
        inner.count(Rpc::Push, started, &tally);
        Ok(tally.delivery)
    }
}

#[async_trait]
impl CometApi for Comet {
    async fn push_msg(&self, req: pb::PushMsgRequest) -> RpcResult<pb::Delivery> {
        self.push(req)
    }

    /// Applies each push as `push_msg` does (its span, its counts), without
    /// a future per push.
    async fn push_msgs(&self, req: pb::PushMsgsRequest) -> RpcResult<pb::PushMsgsReply> {
        check_push_batch(&req)?;
        let mut reply = PushBatchReply::default();
        for (index, push) in req.pushes.into_iter().enumerate() {
            reply.add(index, self.push(push))?;
        }
        Ok(reply.finish())
    }

    async fn broadcast(&self, req: pb::BroadcastRequest) -> RpcResult<pb::Delivery> {
        let span = tracing::debug_span!(
            "push_rpc",
            rpc = "broadcast",
            op = req.proto_op,
            speed = req.speed
        );
        self.broadcast_all(req).instrument(span).await
    }

    async fn broadcast_room(&self, req: pb::BroadcastRoomRequest) -> RpcResult<pb::Delivery> {
        let started = Instant::now();
        let op = req.proto.as_ref().map_or(0, |p| p.op);
        // The room id is the pusher's text: escaped.
        let span = tracing::debug_span!("push_rpc", rpc = "room", op, room = ?req.room_id);
        if req.room_id.is_empty() {
            return Err(RpcError::InvalidArgument("room_id is empty".into()));
        }
        let frame = encode(req.proto)?;
        let inner = &self.inner;
        // Members are pushed to outside the bucket's lock: a push may be a
        // socket write.
        let mut members = Vec::new();
        for bucket in inner.buckets() {
            bucket.members_into(&req.room_id, &mut members);
        }
        let tally = fan_out(members, frame, None, inner.now_ms(), inner.slow_ms())
            .instrument(span)
            .await;
        inner.count(Rpc::Room, started, &tally);
        Ok(tally.delivery)
    }

    async fn broadcast_group(&self, req: pb::BroadcastGroupRequest) -> RpcResult<pb::Delivery> {
        let started = Instant::now();
        let span =
            tracing::debug_span!("push_rpc", rpc = "group", op = req.proto_op, group = ?req.group);
        if req.group.is_empty() {
            return Err(RpcError::InvalidArgument("group is empty".into()));
        }
        let frame = encode(req.proto)?;
        let inner = &self.inner;
        let mut members = Vec::new();
        for bucket in inner.buckets() {
            bucket.channel_into(&req.group, &mut members);
        }
        let op = Some(req.proto_op);
        let tally = fan_out(members, frame, op, inner.now_ms(), inner.slow_ms())
            .instrument(span)
            .await;
        inner.count(Rpc::Group, started, &tally);
        Ok(tally.delivery)
    }

    async fn change_group(&self, req: pb::ChangeGroupRequest) -> RpcResult<pb::ChangeGroupReply> {
        if req.group.is_empty() {
            return Err(RpcError::InvalidArgument("group is empty".into()));
        }
        let mut reply = pb::ChangeGroupReply::default();
        for key in &req.keys {
            let bucket = self.inner.bucket(key);
            let Some(session) = bucket.get(key) else {
                reply.missing += 1;
                continue;
            };
            let changed = if req.leave {
                bucket.leave_channel(&session, &req.group)
            } else {
                bucket.join_channels(&session, [req.group.as_str()]) > 0
            };
            reply.changed += u64::from(changed);
        }
        tracing::debug!(group = ?req.group, leave = req.leave, changed = reply.changed, missing = reply.missing, "group channel changed");
        Ok(reply)
    }

    async fn rooms(&self) -> RpcResult<Vec<String>> {
        let mut rooms: Vec<String> = self.inner.room_counts().into_keys().collect();
        rooms.sort_unstable();
        Ok(rooms)
    }

    async fn kick(&self, keys: Vec<String>) -> RpcResult<u64> {
        let mut kicked = 0;
        for key in &keys {
            if let Some(session) = self.inner.bucket(key).get(key) {
                session.close(crate::session::CloseReason::Kicked);
                kicked += 1;
            }
        }
        Ok(kicked)
    }

    async fn stats(&self) -> RpcResult<pb::StatsReply> {
        let inner = &self.inner;
        let s = &inner.stats;
        let mut ips = HashSet::new();
        for bucket in inner.buckets() {
            ips.extend(bucket.sessions().iter().map(|session| session.ip));
        }
        Ok(pb::StatsReply {
            server_id: inner.id.clone(),
            region: inner.region.clone(),
            tcp_connections: stats::get(s.connections(Wire::Tcp)),
            // The Stats RPC has no WSS count: WSS is WebSocket.
            ws_connections: stats::get(s.connections(Wire::Ws))
                + stats::get(s.connections(Wire::Wss)),
            room_counts: inner.room_counts(),
            dropped_frames: stats::get(&s.dropped_frames),
            slow_consumer_closes: stats::get(&s.slow_consumer_closes),
            bad_frames: stats::get(&s.bad_frames),
            ip_count: ips.len() as u64,
        })
    }
}

impl Inner {
    /// Counts a connection on `wire` as open; the gauge is lowered by `closed`.
    pub(crate) fn opened(&self, wire: Wire) {
        stats::incr(self.stats.connections(wire));
    }

    pub(crate) fn closed(&self, wire: Wire) {
        stats::decr(self.stats.connections(wire));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<Arc<Session>> {
        (0..n)
            .map(|i| {
                // Every third member does not accept op 1000.
                let op = if i % 3 == 0 { 1001 } else { 1000 };
                let accepts = crate::limits::check_accepts(&[op]).unwrap_or_default();
                Arc::new(Session::new(
                    i as u64,
                    &format!("k{i}"),
                    i as i64,
                    IpAddr::from([127, 0, 0, 1]),
                    accepts,
                    4,
                ))
            })
            .collect()
    }

    /// A room bigger than one task's share is split over the workers; every
    /// member still gets the frame once and the counts add up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_big_fan_out_reaches_every_member_once() {
        for n in [10, FAN_OUT_CHUNK + 1, 5 * FAN_OUT_CHUNK + 7] {
            let all = members(n);
            let frame = Bytes::from_static(b"frame");
            let tally = fan_out(all.clone(), frame.clone(), None, 1, 10_000).await;
            assert_eq!(tally.delivery.delivered, n as u64, "{n} members");
            assert!(all.iter().all(|s| s.take_queued().len() == 1));

            let tally = fan_out(all.clone(), frame, Some(1000), 1, 10_000).await;
            let accepting = (0..n).filter(|i| i % 3 != 0).count() as u64;
            assert_eq!(tally.delivery.delivered, accepting, "{n} members");
            assert_eq!(tally.delivery.filtered, n as u64 - accepting);
            for (i, s) in all.iter().enumerate() {
                assert_eq!(s.take_queued().len(), usize::from(i % 3 != 0), "member {i}");
            }
        }
    }
}
