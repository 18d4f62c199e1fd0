//! The job's delivery against scripted comets: routing by type, room
//! batching (the fixed rule by count and by time, the adaptive rule against
//! a comet that holds its answers), order, retries, and gone comets.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rim_config::{JobConfig, RoomFlushRule};
use rim_job::{Job, Outcome};
use rim_proto::api::{CometApi, RpcError, RpcResult};
use rim_proto::pb::comet::v1 as pb;
use rim_proto::{Frame, Op};
use rim_queue::{Consumer, Producer, PushMsg, PushType};

/// Records every call; fails the first `fail_first` calls as unavailable.
#[derive(Default)]
struct FakeComet {
    calls: Mutex<Vec<String>>,
    fail_first: AtomicU32,
    /// The rooms it says it hosts.
    hosted: Mutex<Vec<String>>,
    /// While set, listing its rooms fails.
    rooms_down: std::sync::atomic::AtomicBool,
}

impl FakeComet {
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    fn record(&self, call: String) -> RpcResult<pb::Delivery> {
        if self.fail_first.load(Ordering::SeqCst) > 0 {
            self.fail_first.fetch_sub(1, Ordering::SeqCst);
            return Err(RpcError::Unavailable("scripted failure".into()));
        }
        self.calls.lock().unwrap().push(call);
        Ok(pb::Delivery {
            delivered: 1,
            ..pb::Delivery::default()
        })
    }
}

fn bodies(proto: &rim_proto::pb::frame::v1::Proto) -> Vec<String> {
    let frame = Frame::try_from(proto.clone()).unwrap();
    if frame.is_batch() {
        frame
            .batch_frames()
            .map(|f| String::from_utf8_lossy(&f.unwrap().body).into_owned())
            .collect()
    } else {
        vec![String::from_utf8_lossy(&frame.body).into_owned()]
    }
}

#[async_trait]
impl CometApi for FakeComet {
    async fn push_msg(&self, req: pb::PushMsgRequest) -> RpcResult<pb::Delivery> {
        let proto = req.proto.unwrap();
        self.record(format!(
            "push {} op={} {}",
            req.keys.join(","),
            req.proto_op,
            bodies(&proto).join("|")
        ))
    }
    async fn broadcast(&self, req: pb::BroadcastRequest) -> RpcResult<pb::Delivery> {
        let proto = req.proto.unwrap();
        self.record(format!(
            "all op={} speed={} {}",
            req.proto_op,
            req.speed,
            bodies(&proto).join("|")
        ))
    }
    async fn broadcast_room(&self, req: pb::BroadcastRoomRequest) -> RpcResult<pb::Delivery> {
        let proto = req.proto.unwrap();
        let batch = if proto.op == Op::RAW.0 {
            "batch"
        } else {
            "single"
        };
        self.record(format!(
            "room {} {batch} {}",
            req.room_id,
            bodies(&proto).join("|")
        ))
    }
    async fn broadcast_group(&self, req: pb::BroadcastGroupRequest) -> RpcResult<pb::Delivery> {
        let proto = req.proto.unwrap();
        self.record(format!(
            "group {} op={} {}",
            req.group,
            req.proto_op,
            bodies(&proto).join("|")
        ))
    }
    async fn change_group(&self, req: pb::ChangeGroupRequest) -> RpcResult<pb::ChangeGroupReply> {
        let verb = if req.leave { "leave" } else { "join" };
        self.record(format!("{verb} {} {}", req.group, req.keys.join(",")))?;
        Ok(pb::ChangeGroupReply::default())
    }
    async fn rooms(&self) -> RpcResult<Vec<String>> {
        if self.rooms_down.load(Ordering::SeqCst) {
            return Err(RpcError::Unavailable("rooms unknown (test)".into()));
        }
        Ok(self.hosted.lock().unwrap().clone())
    }
    async fn kick(&self, _keys: Vec<String>) -> RpcResult<u64> {
        Ok(0)
    }
    async fn stats(&self) -> RpcResult<pb::StatsReply> {
        Ok(pb::StatsReply::default())
    }
}

fn push(server: &str, keys: &[&str], body: &str) -> PushMsg {
    PushMsg {
        r#type: PushType::Push as i32,
        operation: 1000,
        server: server.into(),
        keys: keys.iter().map(|k| k.to_string()).collect(),
        msg: Bytes::copy_from_slice(body.as_bytes()),
        ..PushMsg::default()
    }
}

fn room(room: &str, body: &str) -> PushMsg {
    PushMsg {
        r#type: PushType::Room as i32,
        operation: 1000,
        room: room.into(),
        msg: Bytes::copy_from_slice(body.as_bytes()),
        ..PushMsg::default()
    }
}

/// A big group's message `seq`, capped at `rate` a second.
fn group(conv: &str, seq: u64, rate: i32) -> PushMsg {
    PushMsg {
        r#type: PushType::Group as i32,
        operation: Op::IM_MSG.0,
        room: conv.into(),
        speed: rate,
        seq,
        msg: Bytes::from(format!("m{seq}")),
        ..PushMsg::default()
    }
}

/// A job with the default (adaptive) flush rule.
fn job_with(batch: usize, flush: Duration, comets: &[(&str, Arc<FakeComet>)]) -> Job {
    job_ruled(RoomFlushRule::Adaptive, batch, flush, comets)
}

fn job_ruled<C: CometApi + 'static>(
    rule: RoomFlushRule,
    batch: usize,
    flush: Duration,
    comets: &[(&str, Arc<C>)],
) -> Job {
    let job = Job::new(&JobConfig {
        group: "g".into(),
        room_batch: batch,
        room_flush: flush,
        room_flush_rule: rule,
        // No background polls: paused-time tests see only their own timers.
        room_routes_interval: Duration::ZERO,
        ..JobConfig::default()
    });
    job.set_comets(
        comets
            .iter()
            .map(|(id, c)| (id.to_string(), Arc::clone(c) as Arc<dyn CometApi>))
            .collect(),
    );
    job
}

async fn done(ticket: rim_job::Ticket) -> Outcome {
    tokio::time::timeout(Duration::from_secs(10), ticket)
        .await
        .expect("ticket completes")
}

#[tokio::test]
async fn a_push_goes_to_the_named_comet_only() {
    let (a, b) = (
        Arc::new(FakeComet::default()),
        Arc::new(FakeComet::default()),
    );
    let job = job_with(
        20,
        Duration::from_millis(50),
        &[("a", a.clone()), ("b", b.clone())],
    );
    assert_eq!(
        done(job.deliver(push("a", &["k1", "k2"], "hi")).await).await,
        Outcome::Delivered
    );
    assert_eq!(a.calls(), vec!["push k1,k2 op=1000 hi"]);
    assert!(b.calls().is_empty());
    // A comet of another region (or gone): nothing to deliver here.
    assert_eq!(
        done(job.deliver(push("elsewhere", &["k"], "x")).await).await,
        Outcome::Gone
    );
}

#[tokio::test]
async fn room_messages_are_batched_by_count_in_order_on_every_comet() {
    let (a, b) = (
        Arc::new(FakeComet::default()),
        Arc::new(FakeComet::default()),
    );
    let job = job_ruled(
        RoomFlushRule::Fixed,
        3,
        Duration::from_secs(60),
        &[("a", a.clone()), ("b", b.clone())],
    );
    let mut tickets = Vec::new();
    for i in 0..6 {
        tickets.push(job.deliver(room("live://1", &format!("m{i}"))).await);
    }
    for ticket in tickets {
        assert_eq!(done(ticket).await, Outcome::Delivered);
    }
    let expected = vec![
        "room live://1 batch m0|m1|m2",
        "room live://1 batch m3|m4|m5",
    ];
    assert_eq!(a.calls(), expected);
    assert_eq!(b.calls(), expected);
}

#[tokio::test]
async fn a_room_batch_is_flushed_after_the_wait_even_if_not_full_and_nothing_is_lost() {
    let a = Arc::new(FakeComet::default());
    let job = job_ruled(
        RoomFlushRule::Fixed,
        20,
        Duration::from_millis(50),
        &[("a", a.clone())],
    );
    let one = job.deliver(room("live://quiet", "only")).await;
    let two = job.deliver(room("live://busy", "x")).await;
    let three = job.deliver(room("live://busy", "y")).await;
    for ticket in [one, two, three] {
        assert_eq!(done(ticket).await, Outcome::Delivered);
    }
    let mut calls = a.calls();
    calls.sort();
    assert_eq!(
        calls,
        vec![
            "room live://busy batch x|y",
            "room live://quiet single only"
        ]
    );
    // The room was retired after its flush; a later message starts a new batch.
    assert_eq!(
        done(job.deliver(room("live://quiet", "again")).await).await,
        Outcome::Delivered
    );
    assert!(
        a.calls()
            .contains(&"room live://quiet single again".to_string())
    );
}

#[tokio::test]
async fn group_messages_are_merged_to_the_group_channel_on_every_comet() {
    let (a, b) = (
        Arc::new(FakeComet::default()),
        Arc::new(FakeComet::default()),
    );
    let job = job_ruled(
        RoomFlushRule::Fixed,
        3,
        Duration::from_secs(60),
        &[("a", a.clone()), ("b", b.clone())],
    );
    let mut tickets = Vec::new();
    for seq in 1..=6 {
        tickets.push(job.deliver(group("g:big", seq, 0)).await);
    }
    for ticket in tickets {
        assert_eq!(done(ticket).await, Outcome::Delivered);
    }
    let expected = vec!["group g:big op=21 m1|m2|m3", "group g:big op=21 m4|m5|m6"];
    assert_eq!(a.calls(), expected);
    assert_eq!(b.calls(), expected);
}

/// Over its cap a group's messages are thinned, and the channel is told
/// the latest seq by NOTIFY truncated; every message's ticket completes.
#[tokio::test]
async fn a_group_over_its_cap_is_thinned_and_told_the_latest_seq() {
    for rule in [RoomFlushRule::Adaptive, RoomFlushRule::Fixed] {
        group_over_its_cap_is_thinned(rule).await;
    }
}

async fn group_over_its_cap_is_thinned(rule: RoomFlushRule) {
    let a = Arc::new(FakeComet::default());
    let job = job_ruled(rule, 100, Duration::from_millis(50), &[("a", a.clone())]);
    let mut tickets = Vec::new();
    // 200 messages at once to a group capped at 40 a second (bursts of 10).
    for seq in 1..=200 {
        tickets.push(job.deliver(group("g:hot", seq, 40)).await);
    }
    for ticket in tickets {
        assert_eq!(done(ticket).await, Outcome::Delivered);
    }
    let frames: Vec<String> = a
        .calls()
        .iter()
        .flat_map(|call| {
            let body = call.strip_prefix("group g:hot op=21 ").unwrap().to_owned();
            body.split('|').map(str::to_owned).collect::<Vec<_>>()
        })
        .collect();
    let (notices, msgs): (Vec<&String>, Vec<&String>) =
        frames.iter().partition(|f| f.contains("truncated"));
    // The burst went through in order; the rest was thinned (a few more
    // may pass while the test runs: 40 a second).
    assert!(msgs.len() >= 10 && msgs.len() < 30, "{rule:?}: {msgs:?}");
    for (i, m) in msgs.iter().take(10).enumerate() {
        assert_eq!(**m, format!("m{}", i + 1), "{rule:?}");
    }
    assert!(
        !notices.is_empty() && notices.len() <= 2,
        "{rule:?}: {notices:?}"
    );
    let last: serde_json::Value = serde_json::from_str(notices.last().unwrap()).unwrap();
    assert_eq!(
        last,
        serde_json::json!({"kind": "truncated", "conv": "g:hot", "max_seq": 200})
    );
}

/// A group without a cap (speed 0) loses nothing, and a group's channel
/// changes go to the one comet named.
#[tokio::test]
async fn channel_changes_go_to_the_named_comet() {
    let (a, b) = (
        Arc::new(FakeComet::default()),
        Arc::new(FakeComet::default()),
    );
    let job = job_with(
        20,
        Duration::from_millis(20),
        &[("a", a.clone()), ("b", b.clone())],
    );
    let change = |kind: PushType, server: &str, keys: &[&str]| PushMsg {
        r#type: kind as i32,
        server: server.into(),
        room: "g:big".into(),
        keys: keys.iter().map(|k| k.to_string()).collect(),
        ..PushMsg::default()
    };
    let join = job
        .deliver(change(PushType::GroupJoin, "b", &["k1", "k2"]))
        .await;
    let leave = job
        .deliver(change(PushType::GroupLeave, "b", &["k1"]))
        .await;
    let elsewhere = job
        .deliver(change(PushType::GroupJoin, "zz", &["k3"]))
        .await;
    assert_eq!(done(join).await, Outcome::Delivered);
    assert_eq!(done(leave).await, Outcome::Delivered);
    assert_eq!(done(elsewhere).await, Outcome::Gone);
    assert!(a.calls().is_empty());
    assert_eq!(b.calls(), vec!["join g:big k1,k2", "leave g:big k1"]);
    let mut nameless = change(PushType::GroupJoin, "b", &["k1"]);
    nameless.room.clear();
    assert_eq!(done(job.deliver(nameless).await).await, Outcome::Rejected);
}

/// Four comets hosting rooms as they say; the job's routes refreshed.
async fn routed(every: Duration, hosted: [&[&str]; 4]) -> (Job, Vec<Arc<FakeComet>>) {
    let comets: Vec<Arc<FakeComet>> = hosted
        .iter()
        .map(|rooms| {
            let comet = FakeComet::default();
            *comet.hosted.lock().unwrap() = rooms.iter().map(|r| r.to_string()).collect();
            Arc::new(comet)
        })
        .collect();
    let job = Job::new(&JobConfig {
        group: "g".into(),
        room_batch: 1,
        room_flush: Duration::from_millis(5),
        room_routes_interval: every,
        ..JobConfig::default()
    });
    job.set_comets(
        ["a", "b", "c", "d"]
            .iter()
            .zip(&comets)
            .map(|(id, c)| (id.to_string(), Arc::clone(c) as Arc<dyn CometApi>))
            .collect(),
    );
    job.refresh_room_routes().await;
    (job, comets)
}

/// With routing (four comets or more), a room's batches go to the comets
/// hosting it, and to any whose rooms are not known; none is lost for a
/// room nobody hosts.
#[tokio::test]
async fn room_batches_go_only_to_the_comets_hosting_the_room() {
    let (job, comets) = routed(
        Duration::from_secs(60),
        [&["live://1"], &["live://1", "live://2"], &[], &["live://9"]],
    )
    .await;
    comets[3].rooms_down.store(true, Ordering::SeqCst);
    job.refresh_room_routes().await;
    for (name, body) in [
        ("live://1", "one"),
        ("live://2", "two"),
        ("live://3", "three"),
    ] {
        assert_eq!(
            done(job.deliver(room(name, body)).await).await,
            Outcome::Delivered
        );
    }
    let got = |i: usize| comets[i].calls();
    assert_eq!(got(0), ["room live://1 single one"]);
    assert_eq!(
        got(1),
        ["room live://1 single one", "room live://2 single two"]
    );
    assert!(got(2).is_empty(), "c hosts none of them: {:?}", got(2));
    assert_eq!(
        got(3),
        [
            "room live://1 single one",
            "room live://2 single two",
            "room live://3 single three"
        ],
        "d's rooms are unknown: it gets every room"
    );
}

/// A room's first member on a comet gets the room's batches from the
/// job's next poll of the comets on: within one interval (plus an answer).
#[tokio::test]
async fn a_room_joined_on_another_comet_is_routed_there_within_the_poll_interval() {
    let every = Duration::from_millis(100);
    let (job, comets) = routed(every, [&["live://1"], &[], &[], &[]]).await;
    assert_eq!(
        done(job.deliver(room("live://1", "before")).await).await,
        Outcome::Delivered
    );
    assert!(comets[2].calls().is_empty());
    // A client joins live://1 on c.
    comets[2].hosted.lock().unwrap().push("live://1".into());
    let joined = tokio::time::Instant::now();
    let mut sent = 0;
    while comets[2].calls().is_empty() {
        assert!(
            joined.elapsed() < every * 50,
            "c never got live://1's batches after its member joined"
        );
        sent += 1;
        done(job.deliver(room("live://1", &format!("m{sent}"))).await).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "routed to the new host {:?} after the join (poll every {every:?})",
        joined.elapsed()
    );
    assert!(comets[1].calls().is_empty(), "b still hosts nothing");
}

#[tokio::test]
async fn broadcast_reaches_every_comet_with_the_speed_divided() {
    let (a, b) = (
        Arc::new(FakeComet::default()),
        Arc::new(FakeComet::default()),
    );
    let job = job_with(
        20,
        Duration::from_millis(50),
        &[("a", a.clone()), ("b", b.clone())],
    );
    let msg = PushMsg {
        r#type: PushType::Broadcast as i32,
        operation: 1001,
        speed: 1001,
        msg: Bytes::from("all"),
        ..PushMsg::default()
    };
    assert_eq!(done(job.deliver(msg).await).await, Outcome::Delivered);
    assert_eq!(a.calls(), vec!["all op=1001 speed=501 all"]);
    assert_eq!(b.calls(), vec!["all op=1001 speed=501 all"]);
}

#[tokio::test]
async fn transient_failures_are_retried_in_order() {
    let a = Arc::new(FakeComet::default());
    a.fail_first.store(3, Ordering::SeqCst);
    let job = job_with(20, Duration::from_millis(50), &[("a", a.clone())]);
    let first = job.deliver(push("a", &["k"], "1")).await;
    let second = job.deliver(push("a", &["k"], "2")).await;
    assert_eq!(done(first).await, Outcome::Delivered);
    assert_eq!(done(second).await, Outcome::Delivered);
    assert_eq!(a.calls(), vec!["push k op=1000 1", "push k op=1000 2"]);
}

#[tokio::test]
async fn calls_to_a_retired_comet_end_as_gone() {
    let a = Arc::new(FakeComet::default());
    a.fail_first.store(u32::MAX, Ordering::SeqCst);
    let job = job_with(20, Duration::from_millis(50), &[("a", a.clone())]);
    let ticket = job.deliver(push("a", &["k"], "stuck")).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    job.set_comets(vec![]);
    assert_eq!(done(ticket).await, Outcome::Gone);
    assert!(job.comet_ids().is_empty());
}

#[tokio::test]
async fn a_message_without_a_type_is_rejected() {
    let job = job_with(20, Duration::from_millis(50), &[]);
    assert_eq!(
        done(job.deliver(PushMsg::default()).await).await,
        Outcome::Rejected
    );
}

/// The one consume loop over the in-process queue: every message is
/// delivered, then committed, so a later consumer of the queue gets nothing.
#[tokio::test]
async fn the_consume_loop_delivers_then_commits() {
    let comet = Arc::new(FakeComet::default());
    let job = job_with(20, Duration::from_millis(5), &[("c1", Arc::clone(&comet))]);
    let (producer, queue) = rim_queue::memory_queue(64, 64 << 20);
    for i in 0..5 {
        producer
            .send(push("c1", &["k1"], &format!("m{i}")))
            .await
            .unwrap();
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let consumer = queue.consumer(8).unwrap();
    let consuming = tokio::spawn(rim_job::consume(job, consumer, stop.clone()));
    tokio::time::timeout(Duration::from_secs(10), async {
        while comet.calls().len() < 5 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("all five delivered");
    stop.cancel();
    consuming.await.unwrap().unwrap();
    let expected: Vec<String> = (0..5).map(|i| format!("push k1 op=1000 m{i}")).collect();
    assert_eq!(comet.calls(), expected);

    let mut next = queue.consumer(8).unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(200), next.recv())
            .await
            .is_err(),
        "a delivered message was handed out again"
    );
}

/// A consume loop that dies while its comet keeps failing (nothing was
/// delivered) leaves every message to the next consumer, in order.
#[tokio::test]
async fn a_consume_loop_killed_before_delivery_loses_nothing() {
    let comet = Arc::new(FakeComet::default());
    comet.fail_first.store(u32::MAX, Ordering::SeqCst);
    let job = job_with(20, Duration::from_millis(5), &[("c1", Arc::clone(&comet))]);
    let (producer, queue) = rim_queue::memory_queue(64, 64 << 20);
    for i in 0..3 {
        producer
            .send(push("c1", &["k1"], &format!("m{i}")))
            .await
            .unwrap();
    }
    let consumer = queue.consumer(8).unwrap();
    let lag = consumer.lag();
    let consuming = tokio::spawn(rim_job::consume(
        job,
        consumer,
        tokio_util::sync::CancellationToken::new(),
    ));
    tokio::time::timeout(Duration::from_secs(10), async {
        while lag.read() != vec![("memory".to_owned(), 0)] {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the loop took the messages");
    consuming.abort();
    let _ = consuming.await;

    let mut next = queue.consumer(8).unwrap();
    for i in 0..3 {
        let delivery = tokio::time::timeout(Duration::from_secs(5), next.recv())
            .await
            .expect("redelivered")
            .unwrap()
            .unwrap();
        assert_eq!(delivery.msg.msg, Bytes::from(format!("m{i}")));
        delivery.receipt.handled();
    }
    assert!(comet.calls().is_empty());
}

/// A comet whose broadcasts wait until the test releases them (a paced
/// broadcast to many connections), and that answers pushes at once.
struct HeldBroadcasts {
    inner: FakeComet,
    started: tokio::sync::Notify,
    release: tokio::sync::Semaphore,
}

impl Default for HeldBroadcasts {
    fn default() -> Self {
        HeldBroadcasts {
            inner: FakeComet::default(),
            started: tokio::sync::Notify::new(),
            release: tokio::sync::Semaphore::new(0),
        }
    }
}

#[async_trait]
impl CometApi for HeldBroadcasts {
    async fn push_msg(&self, req: pb::PushMsgRequest) -> RpcResult<pb::Delivery> {
        self.inner.push_msg(req).await
    }
    async fn broadcast(&self, req: pb::BroadcastRequest) -> RpcResult<pb::Delivery> {
        self.started.notify_one();
        let _permit = self.release.acquire().await.unwrap();
        self.inner.broadcast(req).await
    }
    async fn broadcast_room(&self, req: pb::BroadcastRoomRequest) -> RpcResult<pb::Delivery> {
        self.inner.broadcast_room(req).await
    }
    async fn broadcast_group(&self, req: pb::BroadcastGroupRequest) -> RpcResult<pb::Delivery> {
        self.inner.broadcast_group(req).await
    }
    async fn change_group(&self, req: pb::ChangeGroupRequest) -> RpcResult<pb::ChangeGroupReply> {
        self.inner.change_group(req).await
    }
    async fn rooms(&self) -> RpcResult<Vec<String>> {
        Ok(vec![])
    }
    async fn kick(&self, _keys: Vec<String>) -> RpcResult<u64> {
        Ok(0)
    }
    async fn stats(&self) -> RpcResult<pb::StatsReply> {
        Ok(pb::StatsReply::default())
    }
}

/// A broadcast the comet is still working through (paced) holds neither
/// pushes nor room messages back: they have their own lane.
#[tokio::test]
async fn a_broadcast_in_progress_holds_no_push_or_room_message_back() {
    let comet = Arc::new(HeldBroadcasts::default());
    let job = Job::new(&JobConfig {
        group: "g".into(),
        room_batch: 1,
        room_flush: Duration::from_millis(5),
        ..JobConfig::default()
    });
    job.set_comets(vec![("c1".into(), Arc::clone(&comet) as Arc<dyn CometApi>)]);
    let all = PushMsg {
        r#type: PushType::Broadcast as i32,
        operation: 1000,
        speed: 1,
        msg: Bytes::from("to everyone, slowly"),
        ..PushMsg::default()
    };
    let mut broadcast = job.deliver(all).await;
    tokio::time::timeout(Duration::from_secs(10), comet.started.notified())
        .await
        .expect("the broadcast reached the comet");

    let pushed = job.deliver(push("c1", &["k1"], "after")).await;
    assert_eq!(done(pushed).await, Outcome::Delivered);
    let roomed = job.deliver(room("live://1", "room after")).await;
    assert_eq!(done(roomed).await, Outcome::Delivered);
    assert!(
        futures::poll!(&mut broadcast).is_pending(),
        "the broadcast ended before it was released; nothing was tested"
    );

    comet.release.add_permits(1);
    assert_eq!(done(broadcast).await, Outcome::Delivered);
    assert_eq!(
        comet.inner.calls(),
        vec![
            "push k1 op=1000 after",
            "room live://1 single room after",
            "all op=1000 speed=1 to everyone, slowly",
        ]
    );
}

/// Offered steadily above its cap, a group is pushed at most its cap a
/// second (plus one burst) over the whole run.
#[tokio::test]
async fn a_group_offered_steadily_above_its_cap_is_pushed_at_the_cap() {
    for rule in [RoomFlushRule::Adaptive, RoomFlushRule::Fixed] {
        group_offered_steadily_above_its_cap(rule).await;
    }
}

async fn group_offered_steadily_above_its_cap(rule: RoomFlushRule) {
    let a = Arc::new(FakeComet::default());
    let job = job_ruled(rule, 100, Duration::from_millis(50), &[("a", a.clone())]);
    let started = tokio::time::Instant::now();
    let mut tickets = Vec::new();
    // 200 a second for 2 s, capped at 40.
    for seq in 1..=400u64 {
        tokio::time::sleep_until(started + Duration::from_millis(seq * 5)).await;
        tickets.push(job.deliver(group("g:steady", seq, 40)).await);
    }
    let offered = started.elapsed();
    for ticket in tickets {
        assert_eq!(done(ticket).await, Outcome::Delivered);
    }
    let msgs = a
        .calls()
        .iter()
        .flat_map(|call| call.split('|').map(str::to_owned).collect::<Vec<_>>())
        .filter(|frame| !frame.contains("truncated"))
        .count();
    let allowed = (40.0 * offered.as_secs_f64()) as usize + 10 + 1;
    println!("{rule:?}: {msgs} pushed of 400 offered in {offered:?} (allowed {allowed})");
    assert!(
        msgs <= allowed,
        "{rule:?}: {msgs} pushed in {offered:?}, over {allowed}"
    );
    assert!(msgs >= 40, "{rule:?}: {msgs} pushed: the cap, not a stop");
}

/// A comet that takes each room call at once (recorded as it arrives) but
/// answers it only when the test releases it, in order: a big room's
/// fan-out taking a while.
struct HeldRooms {
    inner: FakeComet,
    release: tokio::sync::Semaphore,
}

impl Default for HeldRooms {
    fn default() -> Self {
        HeldRooms {
            inner: FakeComet::default(),
            release: tokio::sync::Semaphore::new(0),
        }
    }
}

#[async_trait]
impl CometApi for HeldRooms {
    async fn push_msg(&self, req: pb::PushMsgRequest) -> RpcResult<pb::Delivery> {
        self.inner.push_msg(req).await
    }
    async fn broadcast(&self, req: pb::BroadcastRequest) -> RpcResult<pb::Delivery> {
        self.inner.broadcast(req).await
    }
    async fn broadcast_room(&self, req: pb::BroadcastRoomRequest) -> RpcResult<pb::Delivery> {
        let answer = self.inner.broadcast_room(req).await;
        self.release.acquire().await.unwrap().forget();
        answer
    }
    async fn broadcast_group(&self, req: pb::BroadcastGroupRequest) -> RpcResult<pb::Delivery> {
        self.inner.broadcast_group(req).await
    }
    async fn change_group(&self, req: pb::ChangeGroupRequest) -> RpcResult<pb::ChangeGroupReply> {
        self.inner.change_group(req).await
    }
    async fn rooms(&self) -> RpcResult<Vec<String>> {
        Ok(vec![])
    }
    async fn kick(&self, _keys: Vec<String>) -> RpcResult<u64> {
        Ok(0)
    }
    async fn stats(&self) -> RpcResult<pb::StatsReply> {
        Ok(pb::StatsReply::default())
    }
}

const HOUR: Duration = Duration::from_secs(3600);

/// With paused time, returns once every task is waiting (the clock only
/// moves when nothing can run), having moved the clock by 1 ms.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

/// At a low rate each room message goes out alone, at once: its ticket
/// completes although the room's flush window is an hour (the wait for the
/// ticket is bounded by 10 s).
#[tokio::test(start_paused = true)]
async fn adaptive_room_messages_at_a_low_rate_go_alone_without_waiting() {
    let a = Arc::new(FakeComet::default());
    let job = job_ruled(RoomFlushRule::Adaptive, 20, HOUR, &[("a", a.clone())]);
    for i in 0..3 {
        let ticket = job.deliver(room("live://1", &format!("m{i}"))).await;
        assert_eq!(done(ticket).await, Outcome::Delivered);
    }
    assert_eq!(
        a.calls(),
        [
            "room live://1 single m0",
            "room live://1 single m1",
            "room live://1 single m2"
        ]
    );
}

/// While a comet holds the answer to a room's batch, the room's next
/// messages gather — on every comet, though the other one answered — and
/// go as one batch when the last comet answers.
#[tokio::test(start_paused = true)]
async fn adaptive_room_messages_gather_until_every_comet_answered_the_batch_in_flight() {
    let (a, b) = (
        Arc::new(HeldRooms::default()),
        Arc::new(HeldRooms::default()),
    );
    b.release.add_permits(1000);
    let job = job_ruled(
        RoomFlushRule::Adaptive,
        20,
        HOUR,
        &[("a", a.clone()), ("b", b.clone())],
    );
    let mut tickets = vec![job.deliver(room("live://1", "m1")).await];
    settle().await;
    assert_eq!(a.inner.calls(), ["room live://1 single m1"]);
    for body in ["m2", "m3", "m4"] {
        tickets.push(job.deliver(room("live://1", body)).await);
    }
    settle().await;
    assert_eq!(a.inner.calls(), ["room live://1 single m1"]);
    assert_eq!(
        b.inner.calls(),
        ["room live://1 single m1"],
        "b answered, but a has not: m2..m4 gather"
    );
    a.release.add_permits(1);
    settle().await;
    let expected = ["room live://1 single m1", "room live://1 batch m2|m3|m4"];
    assert_eq!(a.inner.calls(), expected);
    assert_eq!(b.inner.calls(), expected);
    a.release.add_permits(1000);
    for ticket in tickets {
        assert_eq!(done(ticket).await, Outcome::Delivered);
    }
    // Nothing in flight any more: the next message goes alone again.
    let ticket = job.deliver(room("live://1", "m5")).await;
    assert_eq!(done(ticket).await, Outcome::Delivered);
    assert_eq!(
        a.inner.calls().last().map(String::as_str),
        Some("room live://1 single m5")
    );
}

/// When the answer does not come, the gathered batch goes once its oldest
/// message has waited room_flush; a message after it gathers again.
#[tokio::test(start_paused = true)]
async fn adaptive_gathering_waits_at_most_room_flush() {
    let a = Arc::new(HeldRooms::default());
    let job = job_ruled(
        RoomFlushRule::Adaptive,
        20,
        Duration::from_millis(50),
        &[("a", a.clone())],
    );
    let mut tickets = vec![job.deliver(room("live://1", "m1")).await];
    settle().await;
    for body in ["m2", "m3"] {
        tickets.push(job.deliver(room("live://1", body)).await);
    }
    // m1 still unanswered: m2|m3 go at 50 ms, queued behind m1.
    tokio::time::sleep(Duration::from_millis(100)).await;
    tickets.push(job.deliver(room("live://1", "m4")).await);
    settle().await;
    // m1 answered; m2|m3 is in flight (held), so m4 keeps gathering.
    a.release.add_permits(1);
    settle().await;
    assert_eq!(
        a.inner.calls(),
        ["room live://1 single m1", "room live://1 batch m2|m3"]
    );
    a.release.add_permits(1000);
    for ticket in tickets {
        assert_eq!(done(ticket).await, Outcome::Delivered);
    }
    assert_eq!(
        a.inner.calls(),
        [
            "room live://1 single m1",
            "room live://1 batch m2|m3",
            "room live://1 single m4"
        ]
    );
}

/// A comet that holds its first push until the test releases it, and
/// records each PushMsgs as "batch <keys>".
struct HeldPushes {
    inner: FakeComet,
    arrived: tokio::sync::Notify,
    release: tokio::sync::Semaphore,
}

#[async_trait]
impl CometApi for HeldPushes {
    async fn push_msg(&self, req: pb::PushMsgRequest) -> RpcResult<pb::Delivery> {
        let answer = self.inner.push_msg(req).await;
        self.arrived.notify_one();
        let _permit = self.release.acquire().await.unwrap();
        answer
    }
    async fn push_msgs(&self, req: pb::PushMsgsRequest) -> RpcResult<pb::PushMsgsReply> {
        let keys: Vec<String> = req.pushes.iter().map(|p| p.keys.join(",")).collect();
        self.inner.record(format!("batch {}", keys.join(" ")))?;
        let mut reply = rim_proto::api::PushBatchReply::default();
        for (index, push) in req.pushes.into_iter().enumerate() {
            reply.add(index, self.inner.push_msg(push).await)?;
        }
        Ok(reply.finish())
    }
    async fn broadcast(&self, req: pb::BroadcastRequest) -> RpcResult<pb::Delivery> {
        self.inner.broadcast(req).await
    }
    async fn broadcast_room(&self, req: pb::BroadcastRoomRequest) -> RpcResult<pb::Delivery> {
        self.inner.broadcast_room(req).await
    }
    async fn broadcast_group(&self, req: pb::BroadcastGroupRequest) -> RpcResult<pb::Delivery> {
        self.inner.broadcast_group(req).await
    }
    async fn change_group(&self, req: pb::ChangeGroupRequest) -> RpcResult<pb::ChangeGroupReply> {
        self.inner.change_group(req).await
    }
    async fn rooms(&self) -> RpcResult<Vec<String>> {
        Ok(vec![])
    }
    async fn kick(&self, _keys: Vec<String>) -> RpcResult<u64> {
        Ok(0)
    }
    async fn stats(&self) -> RpcResult<pb::StatsReply> {
        Ok(pb::StatsReply::default())
    }
}

/// Issue #15: the pushes handed to the job while a comet is answering an
/// earlier one reach it in one PushMsgs, in order; a join between them
/// splits the batch.
#[tokio::test]
async fn pushes_handed_out_while_the_comet_answers_go_as_one_batch_in_order() {
    let comet = Arc::new(HeldPushes {
        inner: FakeComet::default(),
        arrived: tokio::sync::Notify::new(),
        release: tokio::sync::Semaphore::new(0),
    });
    let job = job_ruled(
        RoomFlushRule::Adaptive,
        20,
        Duration::from_millis(50),
        &[("a", comet.clone())],
    );
    let mut tickets = vec![job.deliver(push("a", &["k0"], "0")).await];
    tokio::time::timeout(Duration::from_secs(10), comet.arrived.notified())
        .await
        .expect("the first push reached the comet");
    for i in 1..=3 {
        tickets.push(job.deliver(push("a", &["k"], &i.to_string())).await);
    }
    let join = PushMsg {
        r#type: PushType::GroupJoin as i32,
        server: "a".into(),
        room: "g:1".into(),
        keys: vec!["k".into()],
        ..PushMsg::default()
    };
    tickets.push(job.deliver(join).await);
    for i in 4..=5 {
        tickets.push(job.deliver(push("a", &["k"], &i.to_string())).await);
    }
    comet
        .release
        .add_permits(tokio::sync::Semaphore::MAX_PERMITS);
    for ticket in tickets {
        assert_eq!(done(ticket).await, Outcome::Delivered);
    }
    assert_eq!(
        comet.inner.calls(),
        vec![
            "push k0 op=1000 0",
            "batch k k k",
            "push k op=1000 1",
            "push k op=1000 2",
            "push k op=1000 3",
            "join g:1 k",
            "batch k k",
            "push k op=1000 4",
            "push k op=1000 5",
        ]
    );
}
