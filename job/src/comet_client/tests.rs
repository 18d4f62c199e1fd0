//! The delivery lane's push batching against a scripted comet: pushes
//! queued behind a held call go as one `PushMsgs` in order, other calls
//! split batches, each push gets its own outcome, retries and the caps.

use std::sync::atomic::AtomicU32;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use rim_proto::api::{PushBatchReply, RpcResult};
use rim_proto::pb::frame::v1::Proto;
use tokio::sync::Semaphore;

use super::*;

/// Records every RPC as it arrives ("push k0", "pushes k1,k2", "room r",
/// with " failed" when scripted to fail), then waits for a permit of
/// `gate` before answering, so that calls queue up behind it.
struct Scripted {
    rpcs: Mutex<Vec<String>>,
    arrived: Notify,
    gate: Semaphore,
    /// RPCs still to fail as unavailable (counted on arrival).
    fail: AtomicU32,
    /// Refuses every PushMsgs whole (a comet without the RPC).
    no_batches: AtomicBool,
}

impl Scripted {
    /// A comet that answers at once.
    fn open() -> Arc<Scripted> {
        let comet = Scripted::held();
        comet.gate.add_permits(Semaphore::MAX_PERMITS);
        comet
    }

    /// A comet that answers only once the test adds permits.
    fn held() -> Arc<Scripted> {
        Arc::new(Scripted {
            rpcs: Mutex::new(Vec::new()),
            arrived: Notify::new(),
            gate: Semaphore::new(0),
            fail: AtomicU32::new(0),
            no_batches: AtomicBool::new(false),
        })
    }

    fn rpcs(&self) -> Vec<String> {
        self.rpcs.lock().clone()
    }

    /// Records `rpc`; fails it when scripted to, else waits for the gate.
    async fn answer(&self, rpc: String) -> RpcResult<()> {
        let failing = self
            .fail
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let rpc = if failing { rpc + " failed" } else { rpc };
        self.rpcs.lock().push(rpc);
        self.arrived.notify_one();
        if failing {
            return Err(RpcError::Unavailable("scripted failure".into()));
        }
        self.gate.acquire().await.unwrap().forget();
        Ok(())
    }

    /// Waits (bounded) until `n` RPCs have arrived.
    async fn arrived(&self, n: usize) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while self.rpcs.lock().len() < n {
                self.arrived.notified().await;
            }
        })
        .await
        .expect("the calls reached the comet");
    }
}

/// A push without a frame is what the comet refuses as invalid.
fn valid(req: &pb::PushMsgRequest) -> RpcResult<pb::Delivery> {
    match req.proto {
        Some(_) => Ok(pb::Delivery {
            delivered: req.keys.len() as u64,
            ..pb::Delivery::default()
        }),
        None => Err(RpcError::InvalidArgument("proto is missing".into())),
    }
}

#[async_trait]
impl CometApi for Scripted {
    async fn push_msg(&self, req: pb::PushMsgRequest) -> RpcResult<pb::Delivery> {
        self.answer(format!("push {}", req.keys.join(","))).await?;
        valid(&req)
    }
    async fn push_msgs(&self, req: pb::PushMsgsRequest) -> RpcResult<pb::PushMsgsReply> {
        let keys: Vec<String> = req.pushes.iter().map(|p| p.keys.join(",")).collect();
        if self.no_batches.load(Ordering::SeqCst) {
            self.rpcs
                .lock()
                .push(format!("pushes {} refused", keys.join(",")));
            return Err(RpcError::Internal("Unimplemented: no PushMsgs".into()));
        }
        self.answer(format!("pushes {}", keys.join(","))).await?;
        let mut reply = PushBatchReply::default();
        for (index, push) in req.pushes.iter().enumerate() {
            reply.add(index, valid(push))?;
        }
        Ok(reply.finish())
    }
    async fn broadcast(&self, _: pb::BroadcastRequest) -> RpcResult<pb::Delivery> {
        self.answer("broadcast".into()).await?;
        Ok(pb::Delivery::default())
    }
    async fn broadcast_room(&self, req: pb::BroadcastRoomRequest) -> RpcResult<pb::Delivery> {
        self.answer(format!("room {}", req.room_id)).await?;
        Ok(pb::Delivery::default())
    }
    async fn broadcast_group(&self, req: pb::BroadcastGroupRequest) -> RpcResult<pb::Delivery> {
        self.answer(format!("group {}", req.group)).await?;
        Ok(pb::Delivery::default())
    }
    async fn change_group(&self, req: pb::ChangeGroupRequest) -> RpcResult<pb::ChangeGroupReply> {
        self.answer(format!("change_group {}", req.group)).await?;
        Ok(pb::ChangeGroupReply::default())
    }
    async fn rooms(&self) -> RpcResult<Vec<String>> {
        Ok(Vec::new())
    }
    async fn kick(&self, _: Vec<String>) -> RpcResult<u64> {
        Ok(0)
    }
    async fn stats(&self) -> RpcResult<pb::StatsReply> {
        Ok(pb::StatsReply::default())
    }
}

fn client(comet: &Arc<Scripted>) -> (CometClient, Arc<JobMetrics>) {
    let metrics = Arc::new(JobMetrics::default());
    let api = Arc::clone(comet) as Arc<dyn CometApi>;
    (
        CometClient::spawn("c1".into(), api, Arc::clone(&metrics)),
        metrics,
    )
}

fn push_sized(key: &str, body: usize) -> Call {
    Call::Push(pb::PushMsgRequest {
        keys: vec![key.into()],
        proto_op: 1000,
        proto: Some(Proto {
            ver: 1,
            op: 1000,
            seq: 0,
            body: Bytes::from(vec![b'x'; body]),
        }),
        bodies: Vec::new(),
    })
}

fn push(key: &str) -> Call {
    push_sized(key, 8)
}

/// A push the comet refuses as invalid.
fn invalid(key: &str) -> Call {
    Call::Push(pb::PushMsgRequest {
        keys: vec![key.into()],
        proto_op: 1000,
        proto: None,
        bodies: Vec::new(),
    })
}

fn room(name: &str) -> Call {
    Call::Room(pb::BroadcastRoomRequest {
        room_id: name.into(),
        proto: None,
    })
}

/// Queues `calls` in order; returns their outcome receivers.
async fn queue(
    client: &CometClient,
    calls: impl IntoIterator<Item = Call>,
) -> Vec<oneshot::Receiver<Outcome>> {
    let mut outcomes = Vec::new();
    for call in calls {
        outcomes.push(client.call(call).await);
    }
    outcomes
}

async fn outcomes(receivers: Vec<oneshot::Receiver<Outcome>>) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    for rx in receivers {
        let outcome = tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .expect("the call completes")
            .expect("the lane answers");
        outcomes.push(outcome);
    }
    outcomes
}

/// Queues `first`, waits until the comet holds it, then queues `behind`:
/// everything behind is in the lane's queue before the comet answers.
async fn behind_held(
    comet: &Arc<Scripted>,
    client: &CometClient,
    first: Call,
    behind: Vec<Call>,
) -> Vec<Outcome> {
    let mut receivers = queue(client, [first]).await;
    comet.arrived(1).await;
    receivers.extend(queue(client, behind).await);
    comet.gate.add_permits(Semaphore::MAX_PERMITS);
    outcomes(receivers).await
}

#[tokio::test]
async fn pushes_queued_behind_a_held_call_go_as_one_batch_in_order() {
    let comet = Scripted::held();
    let (client, metrics) = client(&comet);
    let behind = (1..=5).map(|i| push(&format!("k{i}"))).collect();
    let outcomes = behind_held(&comet, &client, push("k0"), behind).await;
    assert_eq!(outcomes, vec![Outcome::Delivered; 6]);
    assert_eq!(comet.rpcs(), vec!["push k0", "pushes k1,k2,k3,k4,k5"]);

    let mut registry = rim_metrics::Registry::default();
    metrics.register(&mut registry);
    let text = rim_metrics::encode(&registry);
    for line in [
        "rim_job_push_batch_pushes_count 2",
        "rim_job_push_batch_pushes_sum 6.0",
        "rim_job_comet_rpc_duration_seconds_count{rpc=\"push_batch\"} 1",
        "rim_job_comet_rpc_duration_seconds_count{rpc=\"push\"} 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line:?} missing in\n{text}"
        );
    }
}

#[tokio::test]
async fn a_push_alone_goes_as_push_msg() {
    let comet = Scripted::open();
    let (client, _) = client(&comet);
    let outcome = outcomes(queue(&client, [push("k")]).await).await;
    assert_eq!(outcome, vec![Outcome::Delivered]);
    assert_eq!(comet.rpcs(), vec!["push k"]);
}

#[tokio::test]
async fn another_call_between_pushes_splits_the_batch_and_keeps_the_order() {
    let comet = Scripted::held();
    let (client, _) = client(&comet);
    let behind = vec![
        push("k1"),
        push("k2"),
        room("live://1"),
        push("k3"),
        push("k4"),
        Call::ChangeGroup(pb::ChangeGroupRequest {
            group: "g:1".into(),
            keys: vec!["k5".into()],
            leave: false,
        }),
        push("k5"),
    ];
    let outcomes = behind_held(&comet, &client, room("live://0"), behind).await;
    assert_eq!(outcomes, vec![Outcome::Delivered; 8]);
    assert_eq!(
        comet.rpcs(),
        vec![
            "room live://0",
            "pushes k1,k2",
            "room live://1",
            "pushes k3,k4",
            "change_group g:1",
            "push k5",
        ]
    );
}

#[tokio::test]
async fn a_push_refused_as_invalid_in_a_batch_is_rejected_alone() {
    let comet = Scripted::held();
    let (client, _) = client(&comet);
    let behind = vec![push("k1"), invalid("bad"), push("k3"), invalid("worse")];
    let outcomes = behind_held(&comet, &client, push("k0"), behind).await;
    assert_eq!(
        outcomes,
        vec![
            Outcome::Delivered,
            Outcome::Delivered,
            Outcome::Rejected,
            Outcome::Delivered,
            Outcome::Rejected,
        ]
    );
    assert_eq!(comet.rpcs(), vec!["push k0", "pushes k1,bad,k3,worse"]);
}

#[tokio::test]
async fn a_batch_failing_transiently_is_retried_whole_and_every_push_completes() {
    let comet = Scripted::held();
    let (client, _) = client(&comet);
    let mut receivers = queue(&client, [push("k0")]).await;
    comet.arrived(1).await;
    receivers.extend(queue(&client, [push("k1"), push("k2"), push("k3")]).await);
    // Armed once k0 was taken: the batch's first two attempts fail.
    comet.fail.store(2, Ordering::SeqCst);
    comet.gate.add_permits(Semaphore::MAX_PERMITS);
    assert_eq!(outcomes(receivers).await, vec![Outcome::Delivered; 4]);
    assert_eq!(
        comet.rpcs(),
        vec![
            "push k0",
            "pushes k1,k2,k3 failed",
            "pushes k1,k2,k3 failed",
            "pushes k1,k2,k3",
        ]
    );
}

#[tokio::test]
async fn a_batch_to_a_retired_comet_ends_as_gone() {
    let comet = Scripted::open();
    comet.fail.store(u32::MAX, Ordering::SeqCst);
    let (client, _) = client(&comet);
    let mut receivers = queue(&client, [push("k0")]).await;
    comet.arrived(1).await;
    receivers.extend(queue(&client, [push("k1"), push("k2")]).await);
    client.retire();
    assert_eq!(outcomes(receivers).await, vec![Outcome::Gone; 3]);
    assert!(
        comet.rpcs().iter().all(|rpc| rpc.ends_with("failed")),
        "{:?}",
        comet.rpcs()
    );
}

#[tokio::test]
async fn a_batch_refused_whole_is_sent_again_one_push_at_a_time() {
    let comet = Scripted::held();
    comet.no_batches.store(true, Ordering::SeqCst);
    let (client, _) = client(&comet);
    let behind = vec![push("k1"), invalid("bad"), push("k3"), room("live://1")];
    let outcomes = behind_held(&comet, &client, push("k0"), behind).await;
    assert_eq!(
        outcomes,
        vec![
            Outcome::Delivered,
            Outcome::Delivered,
            Outcome::Rejected,
            Outcome::Delivered,
            Outcome::Delivered,
        ]
    );
    assert_eq!(
        comet.rpcs(),
        vec![
            "push k0",
            "pushes k1,bad,k3 refused",
            "push k1",
            "push bad",
            "push k3",
            "room live://1",
        ]
    );
}

#[tokio::test]
async fn the_count_cap_splits_a_long_run_of_pushes() {
    let comet = Scripted::held();
    let (client, metrics) = client(&comet);
    let behind = (1..=600).map(|i| push(&format!("k{i}"))).collect();
    let outcomes = behind_held(&comet, &client, room("live://0"), behind).await;
    assert_eq!(outcomes, vec![Outcome::Delivered; 601]);
    let rpcs = comet.rpcs();
    let sizes: Vec<usize> = rpcs[1..]
        .iter()
        .map(|rpc| rpc.strip_prefix("pushes ").unwrap().split(',').count())
        .collect();
    assert_eq!(
        sizes,
        vec![BATCH_PUSHES, BATCH_PUSHES, 600 - 2 * BATCH_PUSHES]
    );
    // In order across the batches.
    let keys: Vec<String> = rpcs[1..]
        .iter()
        .flat_map(|rpc| rpc.strip_prefix("pushes ").unwrap().split(','))
        .map(str::to_owned)
        .collect();
    let expected: Vec<String> = (1..=600).map(|i| format!("k{i}")).collect();
    assert_eq!(keys, expected);

    let mut registry = rim_metrics::Registry::default();
    metrics.register(&mut registry);
    let text = rim_metrics::encode(&registry);
    assert!(
        text.lines()
            .any(|l| l == "rim_job_push_batch_pushes_count 3"),
        "{text}"
    );
}

#[tokio::test]
async fn the_byte_cap_splits_big_pushes_and_a_push_over_it_goes_alone() {
    let comet = Scripted::held();
    let (client, _) = client(&comet);
    // Three fit in BATCH_BYTES, four do not.
    let body = BATCH_BYTES / 3 - 1024;
    let mut behind: Vec<Call> = (1..=7)
        .map(|i| push_sized(&format!("b{i}"), body))
        .collect();
    behind.push(push_sized("huge", BATCH_BYTES + 1));
    behind.push(push("s1"));
    behind.push(push("s2"));
    let outcomes = behind_held(&comet, &client, room("live://0"), behind).await;
    assert_eq!(outcomes, vec![Outcome::Delivered; 11]);
    assert_eq!(
        comet.rpcs(),
        vec![
            "room live://0",
            "pushes b1,b2,b3",
            "pushes b4,b5,b6",
            "push b7",
            "push huge",
            "pushes s1,s2",
        ]
    );
}
