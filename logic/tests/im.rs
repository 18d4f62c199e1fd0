//! The IM service over a real SQLite store, the in-memory router and the
//! in-process queue: what it queues for the recipients' connections, and
//! the SENDs its rate limits refuse.

use std::sync::Arc;
use std::time::Duration;

use rim_config::{ImConfig, LogicConfig};
use rim_im::{ConvId, Draft, IdGenerator, Page, Reader, SqliteOptions, SqliteStore};
use rim_logic::{Comets, HttpClient, Im, Logic};
use rim_proto::Op;
use rim_proto::api::LogicApi;
use rim_proto::im::{Body, Code, Msg, Notify, SendReply, SendRequest};
use rim_proto::pb::frame::v1::Proto;
use rim_proto::pb::logic::v1::{ConnectRequest, HeartbeatRequest, ReceiveRequest};
use rim_queue::{Consumer, MemoryConsumer, PushMsg, PushType, memory_queue};
use rim_router::{MemoryRouter, Router};

struct Setup {
    im: Im,
    queued: MemoryConsumer,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    setup_with(ImConfig::standalone()).await
}

async fn setup_with(config: ImConfig) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let ids = Arc::new(IdGenerator::new(1).unwrap());
    let store = SqliteStore::open(&dir.path().join("im.sqlite3"), SqliteOptions::new(ids)).unwrap();
    let router = MemoryRouter::new(Duration::from_secs(30));
    let lease = Duration::from_secs(60);
    router
        .add(1, "alice-phone", "comet-1", lease)
        .await
        .unwrap();
    router
        .add(1, "alice-laptop", "comet-2", lease)
        .await
        .unwrap();
    router.add(2, "bob-phone", "comet-2", lease).await.unwrap();
    let (producer, queue) = memory_queue(1024, 1 << 20);
    let im = Im::new(
        Arc::new(store),
        Arc::new(router),
        Arc::new(producer),
        &config,
    );
    Setup {
        im,
        queued: queue.consumer(64).unwrap(),
        _dir: dir,
    }
}

async fn next(queued: &mut MemoryConsumer) -> PushMsg {
    let delivery = tokio::time::timeout(Duration::from_secs(5), queued.recv())
        .await
        .expect("a queued frame within 5 s")
        .unwrap()
        .expect("queue open");
    delivery.receipt.handled();
    delivery.msg
}

fn draft(cmid: &str) -> Draft {
    Draft::new(
        ConvId::peer(1, 2).unwrap(),
        1,
        cmid.into(),
        0,
        "hi".into(),
        4000,
    )
    .unwrap()
}

/// (op, comet, key, sync) of each connection's frame in the next `n` queue
/// messages, sorted.
async fn drain(queued: &mut MemoryConsumer, n: usize) -> Vec<(i32, String, String, u64)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let msg = next(queued).await;
        let bodies = if msg.bodies.is_empty() {
            vec![msg.msg.clone(); msg.keys.len()]
        } else {
            assert_eq!(msg.bodies.len(), msg.keys.len(), "a body per key");
            msg.bodies.clone()
        };
        for (key, body) in msg.keys.iter().zip(bodies) {
            let sync = if msg.operation == Op::IM_MSG.0 {
                Msg::decode(&body).unwrap().sync.unwrap()
            } else {
                match Notify::decode(&body).unwrap() {
                    Notify::Sync { sync } => sync,
                    other => panic!("unexpected {other:?}"),
                }
            };
            out.push((msg.operation, msg.server.clone(), key.clone(), sync));
        }
    }
    out.sort();
    out
}

fn frame(op: Op, comet: &str, key: &str, sync: u64) -> (i32, String, String, u64) {
    (op.0, comet.into(), key.into(), sync)
}

#[tokio::test]
async fn a_message_goes_to_every_other_device_with_its_users_sync() {
    let mut s = setup().await;
    let sent = s.im.send(draft("c-1"), Some("alice-phone")).await.unwrap();
    assert_eq!((sent.message.seq, sent.duplicate), (1, false));
    // Both other devices are on comet-2: one queue message for the comet.
    assert_eq!(
        drain(&mut s.queued, 1).await,
        [
            frame(Op::IM_MSG, "comet-2", "alice-laptop", 1),
            frame(Op::IM_MSG, "comet-2", "bob-phone", 1),
        ],
        "not to the sending connection"
    );
}

#[tokio::test]
async fn a_resend_hints_every_device_to_sync_instead_of_pushing_again() {
    let mut s = setup().await;
    s.im.send(draft("c-1"), Some("alice-phone")).await.unwrap();
    drain(&mut s.queued, 1).await;
    // The first send's MSG frames may never have left (its logic died after
    // the commit): the resend makes sure the devices know there is more.
    let again = s.im.send(draft("c-1"), Some("alice-phone")).await.unwrap();
    assert!(again.duplicate);
    // One NOTIFY per user (each user's own latest sync).
    assert_eq!(
        drain(&mut s.queued, 2).await,
        [
            frame(Op::IM_NOTIFY, "comet-2", "alice-laptop", 1),
            frame(Op::IM_NOTIFY, "comet-2", "bob-phone", 1),
        ]
    );
}

#[tokio::test]
async fn users_on_one_comet_get_their_own_sync_in_one_queue_message() {
    let mut s = setup().await;
    // Bob has an earlier entry (from user 3), so his sync runs ahead.
    let earlier = Draft::new(
        ConvId::peer(3, 2).unwrap(),
        3,
        "e-1".into(),
        0,
        "yo".into(),
        4000,
    );
    s.im.send(earlier.unwrap(), None).await.unwrap();
    drain(&mut s.queued, 1).await;
    s.im.send(draft("c-1"), Some("alice-phone")).await.unwrap();
    let msg = next(&mut s.queued).await;
    assert_eq!((msg.server.as_str(), msg.keys.len()), ("comet-2", 2));
    let syncs: Vec<(String, u64)> = msg
        .keys
        .iter()
        .zip(&msg.bodies)
        .map(|(key, body)| (key.clone(), Msg::decode(body).unwrap().sync.unwrap()))
        .collect();
    let mut syncs = syncs;
    syncs.sort();
    assert_eq!(
        syncs,
        [("alice-laptop".to_owned(), 1), ("bob-phone".to_owned(), 2)]
    );
}

/// Logic serving IM with these SEND limits (per connection, per user) as
/// comets see it: client frames in, replies out.
async fn limited(per_conn: (u32, u32), per_user: (u32, u32)) -> (Logic, tempfile::TempDir) {
    let s = setup_with(ImConfig {
        send_rate_per_conn: per_conn.0,
        send_burst_per_conn: per_conn.1,
        send_rate_per_user: per_user.0,
        send_burst_per_user: per_user.1,
        ..ImConfig::standalone()
    })
    .await;
    let router = rim_router::connect(&rim_config::RouterConfig::default())
        .await
        .unwrap();
    let logic = Logic::new(
        &LogicConfig::default(),
        router,
        Arc::new(Comets::new()),
        HttpClient::new().unwrap(),
    )
    .with_im(Arc::new(s.im));
    (logic, s._dir)
}

/// Sends `cmid` from connection `key` of user `mid` to user `to` (op 18)
/// and returns the SEND_REPLY.
async fn client_send(logic: &Logic, mid: i64, key: &str, to: i64, cmid: &str) -> SendReply {
    let req = SendRequest {
        cmid: cmid.into(),
        to: Some(to),
        body: format!("text of {cmid}"),
        ..SendRequest::default()
    };
    let reply = logic
        .receive(ReceiveRequest {
            mid,
            key: key.into(),
            proto: Some(Proto {
                ver: 1,
                op: Op::IM_SEND.0,
                seq: 9,
                body: req.encode(),
            }),
        })
        .await
        .unwrap();
    let [frame] = &reply.replies[..] else {
        panic!("one reply, got {:?}", reply.replies);
    };
    assert_eq!((frame.op, frame.seq), (Op::IM_SEND_REPLY.0, 9));
    SendReply::decode(&frame.body).unwrap()
}

/// The cmids stored in `conv`, oldest first.
async fn stored(logic: &Logic, conv: ConvId) -> Vec<String> {
    let im = logic.im().unwrap();
    let page = im
        .pull(&conv, Reader::Business, Page::After(0), 100)
        .await
        .unwrap();
    page.msgs.into_iter().map(|m| m.cmid).collect()
}

fn assert_limited(reply: &SendReply, cmid: &str) {
    assert_eq!(reply.code, Code::RATE_LIMITED, "{reply:?}");
    assert_eq!(reply.cmid, cmid);
    assert!(reply.retry_ms.is_some_and(|ms| ms > 0), "{reply:?}");
    assert_eq!((reply.seq, reply.id.as_str()), (0, ""), "nothing stored");
}

#[tokio::test]
async fn a_connection_over_its_burst_is_refused_and_its_resend_is_stored_once() {
    // 20 per second: a cell every 50 ms, 3 at once.
    let (logic, _dir) = limited((20, 3), (0, 0)).await;
    for cmid in ["c-0", "c-1", "c-2"] {
        let reply = client_send(&logic, 1, "alice-phone", 2, cmid).await;
        assert_eq!(reply.code, Code::OK, "{reply:?}");
        assert_eq!(reply.retry_ms, None);
    }
    let refused = client_send(&logic, 1, "alice-phone", 2, "c-3").await;
    assert_limited(&refused, "c-3");
    assert!(
        refused.error.contains("im.send_rate_per_conn"),
        "{refused:?}"
    );
    assert_limited(
        &client_send(&logic, 1, "alice-phone", 2, "c-4").await,
        "c-4",
    );
    let conv = ConvId::peer(1, 2).unwrap();
    assert_eq!(stored(&logic, conv.clone()).await, ["c-0", "c-1", "c-2"]);

    // After the wait the reply names, the same cmid goes through, once.
    let wait = refused.retry_ms.unwrap();
    assert!(wait <= 1000, "a cell of 20/s is at most 50 ms away: {wait}");
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let resent = client_send(&logic, 1, "alice-phone", 2, "c-3").await;
    assert_eq!((resent.code, resent.seq), (Code::OK, 4), "{resent:?}");
    // A duplicate resend (its reply lost) answers the same seq, storing
    // nothing — once the limit lets it in (the cell `resent` took may be
    // more than the first wait away), waiting as each refusal says.
    let mut again = client_send(&logic, 1, "alice-phone", 2, "c-3").await;
    for _ in 0..20 {
        let Some(wait) = again.retry_ms.filter(|_| again.code == Code::RATE_LIMITED) else {
            break;
        };
        tokio::time::sleep(Duration::from_millis(wait)).await;
        again = client_send(&logic, 1, "alice-phone", 2, "c-3").await;
    }
    assert_eq!(
        (again.code, again.seq, &again.id),
        (Code::OK, 4, &resent.id)
    );
    assert_eq!(stored(&logic, conv).await, ["c-0", "c-1", "c-2", "c-3"]);
}

#[tokio::test]
async fn one_users_limit_leaves_other_users_alone() {
    let (logic, _dir) = limited((1, 2), (0, 0)).await;
    for cmid in ["a-0", "a-1"] {
        assert_eq!(
            client_send(&logic, 1, "alice-phone", 2, cmid).await.code,
            Code::OK
        );
    }
    assert_limited(
        &client_send(&logic, 1, "alice-phone", 2, "a-2").await,
        "a-2",
    );
    for cmid in ["b-0", "b-1"] {
        let reply = client_send(&logic, 2, "bob-phone", 1, cmid).await;
        assert_eq!(reply.code, Code::OK, "{reply:?}");
    }
    assert_eq!(
        stored(&logic, ConvId::peer(1, 2).unwrap()).await,
        ["a-0", "a-1", "b-0", "b-1"]
    );
}

#[tokio::test]
async fn the_user_limit_spans_the_users_devices() {
    // No per-connection limit: each device alone is under the user's.
    let (logic, _dir) = limited((0, 0), (1, 3)).await;
    for (key, cmid) in [
        ("alice-phone", "p-0"),
        ("alice-laptop", "l-0"),
        ("alice-phone", "p-1"),
    ] {
        assert_eq!(client_send(&logic, 1, key, 2, cmid).await.code, Code::OK);
    }
    for (key, cmid) in [("alice-laptop", "l-1"), ("alice-phone", "p-2")] {
        let reply = client_send(&logic, 1, key, 2, cmid).await;
        assert_limited(&reply, cmid);
        assert!(reply.error.contains("im.send_rate_per_user"), "{reply:?}");
    }
    assert_eq!(
        client_send(&logic, 2, "bob-phone", 1, "b-0").await.code,
        Code::OK
    );
    assert_eq!(
        stored(&logic, ConvId::peer(1, 2).unwrap()).await,
        ["p-0", "l-0", "p-1", "b-0"]
    );
}

// ---------------------------------------------------------------------------
// Big groups (read diffusion)
// ---------------------------------------------------------------------------

/// (type, comet, keys) of a channel change.
fn channel_change(msg: &PushMsg) -> (PushType, String, Vec<String>) {
    assert_eq!(msg.room, "g:big");
    (msg.r#type(), msg.server.clone(), msg.keys.clone())
}

fn keys(keys: &[&str]) -> Vec<String> {
    keys.iter().map(|k| k.to_string()).collect()
}

/// A big group's message is one GROUP queue message for the whole group
/// (its seq, the cap, MSG without a sync), and membership changes become
/// channel joins and leaves for the comets hosting the members.
#[tokio::test]
async fn a_big_groups_message_is_one_group_queue_message_and_members_follow_its_channel() {
    let mut s = setup_with(ImConfig {
        big_group_members: 2,
        big_group_rate: 7,
        ..ImConfig::standalone()
    })
    .await;
    let conv = ConvId::group("big").unwrap();
    let small = s.im.put_group(&conv, "B".into(), 2).await.unwrap();
    assert!(!small.big);
    let big = s.im.put_group(&conv, "B".into(), 10).await.unwrap();
    assert!(big.big, "above im.big_group_members");

    s.im.change_members(&conv, &[1, 2], &[]).await.unwrap();
    let mut joins = vec![
        channel_change(&next(&mut s.queued).await),
        channel_change(&next(&mut s.queued).await),
    ];
    joins.sort();
    assert_eq!(
        joins,
        [
            (
                PushType::GroupJoin,
                "comet-1".into(),
                keys(&["alice-phone"])
            ),
            (
                PushType::GroupJoin,
                "comet-2".into(),
                keys(&["alice-laptop", "bob-phone"])
            ),
        ]
    );

    let draft = Draft::new(conv.clone(), 1, "g-1".into(), 0, "hello".into(), 4000).unwrap();
    let sent = s.im.send(draft.clone(), Some("alice-phone")).await.unwrap();
    assert!(sent.big && sent.inbox.is_empty());
    let msg = next(&mut s.queued).await;
    assert_eq!(
        (
            msg.r#type(),
            msg.room.as_str(),
            msg.seq,
            msg.speed,
            msg.operation
        ),
        (PushType::Group, "g:big", 1, 7, Op::IM_MSG.0)
    );
    let body = Msg::decode(&msg.msg).unwrap();
    assert_eq!(
        (body.seq, body.sync, body.body.as_str()),
        (1, None, "hello")
    );
    // A resend pushes the stored message again (its first push may be lost).
    let again = s.im.send(draft, Some("alice-phone")).await.unwrap();
    assert!(again.duplicate);
    let msg = next(&mut s.queued).await;
    assert_eq!((msg.r#type(), msg.seq), (PushType::Group, 1));

    s.im.change_members(&conv, &[], &[2]).await.unwrap();
    assert_eq!(
        channel_change(&next(&mut s.queued).await),
        (PushType::GroupLeave, "comet-2".into(), keys(&["bob-phone"]))
    );
    // Nothing else was queued: no per-member frames.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), s.queued.recv())
            .await
            .is_err()
    );
}

/// An IM connection learns its user's big groups at connect and at each
/// renewal that asks; a plain push connection is not asked about them.
#[tokio::test]
async fn connect_and_renewal_tell_an_im_connection_its_big_groups() {
    let s = setup_with(ImConfig {
        big_group_members: 2,
        ..ImConfig::standalone()
    })
    .await;
    let conv = ConvId::group("big").unwrap();
    s.im.put_group(&conv, "B".into(), 10).await.unwrap();
    s.im.change_members(&conv, &[5], &[]).await.unwrap();
    let small = ConvId::group("small").unwrap();
    s.im.put_group(&small, "S".into(), 2).await.unwrap();
    s.im.change_members(&small, &[5], &[]).await.unwrap();
    let router = rim_router::connect(&rim_config::RouterConfig::default())
        .await
        .unwrap();
    let logic = Logic::new(
        &LogicConfig::default(),
        router,
        Arc::new(Comets::new()),
        HttpClient::new().unwrap(),
    )
    .with_im(Arc::new(s.im));
    let connect = |token: &str| ConnectRequest {
        server: "comet-1".into(),
        token: bytes::Bytes::copy_from_slice(token.as_bytes()),
        client_ip: "127.0.0.1".into(),
        ..ConnectRequest::default()
    };
    let im = logic
        .connect(connect(r#"{"mid":5,"key":"im","accepts":[21,27]}"#))
        .await
        .unwrap();
    assert_eq!(im.groups, ["g:big"]);
    let plain = logic
        .connect(connect(r#"{"mid":5,"key":"plain","accepts":[1000]}"#))
        .await
        .unwrap();
    assert!(plain.groups.is_empty());

    let beat = |groups: bool| HeartbeatRequest {
        mid: 5,
        key: "im".into(),
        server: "comet-1".into(),
        groups,
    };
    let renewed = logic.heartbeat(beat(true)).await.unwrap();
    assert!(renewed.groups_known);
    assert_eq!(renewed.groups, ["g:big"]);
    let unasked = logic.heartbeat(beat(false)).await.unwrap();
    assert!(!unasked.groups_known && unasked.groups.is_empty());
}
