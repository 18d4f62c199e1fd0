//! The IM service over a real SQLite store, the in-memory router and the
//! in-process queue: what it queues for the recipients' connections.

use std::sync::Arc;
use std::time::Duration;

use rim_config::ImConfig;
use rim_im::{ConvId, Draft, IdGenerator, SqliteOptions, SqliteStore};
use rim_logic::Im;
use rim_proto::Op;
use rim_proto::im::{Body, Msg, Notify};
use rim_queue::{Consumer, MemoryConsumer, PushMsg, memory_queue};
use rim_router::{MemoryRouter, Router};

struct Setup {
    im: Im,
    queued: MemoryConsumer,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
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
        &ImConfig::standalone(),
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
