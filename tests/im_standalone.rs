//! The IM layer end to end in `rim standalone` (SQLite store, in-process
//! queue and job): SEND answered after the commit, MSG to the recipient and
//! to the sender's other devices, dedup of a resend, SYNC for a device that
//! was offline, PULL, READ with NOTIFY to the other devices, refusals with
//! their codes on an open connection, goim clients untouched, history
//! kept across a restart on the same file, and a business's send and read
//! through the HTTP API /im/v1 reaching the devices.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use rim_client::{AuthToken, Client};
use rim_proto::im::{
    Body, Code, Msg, Notify, PullReply, PullRequest, ReadRequest, SendReply, SendRequest,
    SyncReply, SyncRequest,
};
use rim_proto::{Frame, Op};
use support::{fresh_sqlite_path, next_push, post_ok, start_standalone};

const WAIT: Duration = Duration::from_secs(10);

async fn device(tcp: SocketAddr, mid: i64, key: &str, accepts: &[i32]) -> Client {
    let mut client = Client::connect_tcp(tcp).await.unwrap();
    client
        .auth(&AuthToken {
            mid,
            key: key.into(),
            accepts: accepts.to_vec(),
            ..AuthToken::default()
        })
        .await
        .unwrap();
    client
}

async fn chat_device(tcp: SocketAddr, mid: i64, key: &str) -> Client {
    device(tcp, mid, key, &[21, 27]).await
}

/// The next frame other than a heartbeat reply, within WAIT.
async fn next(client: &mut Client) -> Frame {
    loop {
        let frame = tokio::time::timeout(WAIT, client.next_frame())
            .await
            .expect("a frame in time")
            .expect("read")
            .expect("connection open");
        if frame.op != Op::HEARTBEAT_REPLY {
            return frame;
        }
    }
}

/// Sends a request and returns the reply frame, which must echo its seq.
async fn ask<R: Body>(client: &mut Client, frame: Frame) -> R {
    let seq = frame.seq;
    client.send(frame).await.unwrap();
    let reply = next(client).await;
    assert_eq!((reply.op, reply.seq), (R::OP, seq), "reply op and seq");
    R::decode(&reply.body).unwrap()
}

fn send_to(to: i64, cmid: &str, body: &str) -> SendRequest {
    SendRequest {
        cmid: cmid.into(),
        to: Some(to),
        body: body.into(),
        ..SendRequest::default()
    }
}

async fn next_msg(client: &mut Client) -> Msg {
    let frame = next(client).await;
    assert_eq!(frame.op, Op::IM_MSG, "{frame:?}");
    Msg::decode(&frame.body).unwrap()
}

/// Proves `client` got nothing before `marker`, a goim push sent to it now.
async fn nothing_pending(client: &mut Client, api: SocketAddr, key: &str) {
    let http = reqwest::Client::new();
    post_ok(
        &http,
        &format!("http://{api}/goim/push/keys?operation=1000&keys={key}"),
        "marker",
    )
    .await;
    assert_eq!(next_push(client).await, "marker");
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_between_two_users_with_two_devices() {
    let mut rim = start_standalone("im-standalone", &[]);
    let tcp = rim.addr_after("accepting clients listener=\"tcp\"");
    let api = rim.addr_after("http api serving");
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();

    // Alice (1) has two devices, Bob (2) one chat device and one goim client.
    let mut a1 = chat_device(tcp, 1, "a1").await;
    let mut a2 = chat_device(tcp, 1, "a2").await;
    let mut b1 = chat_device(tcp, 2, "b1").await;
    let mut goim = device(tcp, 2, "b-goim", &[1000]).await;

    let reply: SendReply = ask(&mut a1, send_to(2, "c-1", "hi bob").to_frame(7)).await;
    assert_eq!(reply.code, Code::OK, "{reply:?}");
    assert_eq!((reply.conv.as_str(), reply.seq), ("p:1:2", 1));
    assert_eq!(reply.cmid, "c-1");

    // Bob and Alice's other device get MSG with their own inbox entry.
    let to_bob = next_msg(&mut b1).await;
    assert_eq!(
        (to_bob.conv.as_str(), to_bob.seq, to_bob.from, to_bob.sync),
        ("p:1:2", 1, 1, Some(1))
    );
    assert_eq!(
        (to_bob.id.as_str(), to_bob.ts),
        (reply.id.as_str(), reply.ts)
    );
    assert_eq!(to_bob.body, "hi bob");
    let to_a2 = next_msg(&mut a2).await;
    assert_eq!((to_a2.seq, to_a2.sync), (1, Some(1)));

    // A resend of the same cmid is the same message, stored and pushed once;
    // the other devices are told to SYNC (the first send's MSG frames might
    // not have left), not sent the message again.
    let again: SendReply = ask(&mut a1, send_to(2, "c-1", "hi bob").to_frame(8)).await;
    assert_eq!((again.seq, &again.id), (1, &reply.id));
    for device in [&mut b1, &mut a2] {
        let frame = next(device).await;
        assert_eq!(frame.op, Op::IM_NOTIFY);
        assert_eq!(
            Notify::decode(&frame.body).unwrap(),
            Notify::Sync { sync: 1 }
        );
    }
    let reply: SendReply = ask(&mut b1, send_to(1, "c-1", "hi alice").to_frame(1)).await;
    assert_eq!((reply.code, reply.seq), (Code::OK, 2), "{reply:?}");
    let to_a1 = next_msg(&mut a1).await;
    assert_eq!((to_a1.seq, to_a1.sync, to_a1.from), (2, Some(2), 2));
    let to_a2 = next_msg(&mut a2).await;
    assert_eq!(to_a2.seq, 2, "the resend pushed nothing");

    // The goim client saw no IM frame.
    nothing_pending(&mut goim, api, "b-goim").await;

    // A device that was offline catches up by SYNC.
    let mut b2 = chat_device(tcp, 2, "b2").await;
    let sync: SyncReply = ask(&mut b2, SyncRequest { sync: 0, limit: 0 }.to_frame(3)).await;
    assert_eq!(sync.code, Code::OK);
    let seen: Vec<(u64, Option<u64>)> = sync.msgs.iter().map(|m| (m.seq, m.sync)).collect();
    assert_eq!(seen, [(1, Some(1)), (2, Some(2))]);
    assert_eq!((sync.sync, sync.more, sync.reset), (2, false, false));

    // History.
    let pull: PullReply = ask(
        &mut b2,
        PullRequest {
            conv: "p:1:2".into(),
            ..PullRequest::default()
        }
        .to_frame(4),
    )
    .await;
    assert_eq!(pull.code, Code::OK);
    let seqs: Vec<u64> = pull.msgs.iter().map(|m| m.seq).collect();
    assert_eq!((seqs, pull.max_seq, pull.min_seq), (vec![2, 1], 2, 1));

    // READ: the reader's other devices are told, the reader is not. (Bob's
    // own send already moved his read position to 2.)
    let reply: SendReply = ask(&mut a1, send_to(2, "c-2", "read me").to_frame(20)).await;
    assert_eq!(reply.seq, 3);
    assert_eq!(next_msg(&mut b1).await.seq, 3);
    assert_eq!(next_msg(&mut b2).await.seq, 3);
    b1.send(
        ReadRequest {
            conv: "p:1:2".into(),
            seq: 3,
        }
        .to_frame(5),
    )
    .await
    .unwrap();
    let frame = next(&mut b2).await;
    assert_eq!(frame.op, Op::IM_NOTIFY);
    assert_eq!(
        Notify::decode(&frame.body).unwrap(),
        Notify::Read {
            conv: "p:1:2".into(),
            seq: 3
        }
    );

    // Refusals keep the connection open, each with its code.
    let bad: SendReply = ask(&mut a1, Frame::new(Op::IM_SEND, 9, Bytes::from("{}"))).await;
    assert_eq!(bad.code, Code::BAD_REQUEST);
    assert!(bad.error.contains("cmid"), "{}", bad.error);
    let junk: SendReply = ask(&mut a1, Frame::new(Op::IM_SEND, 10, Bytes::from("\u{0}"))).await;
    assert_eq!(junk.code, Code::BAD_REQUEST);
    let group = SendRequest {
        cmid: "g-1".into(),
        conv: Some("g:nobody-here".into()),
        ..SendRequest::default()
    };
    let refused: SendReply = ask(&mut a1, group.to_frame(11)).await;
    assert_eq!(refused.code, Code::NOT_ALLOWED);
    let big = send_to(2, "c-big", &"x".repeat(4001));
    let too_large: SendReply = ask(&mut a1, big.to_frame(12)).await;
    assert_eq!(too_large.code, Code::TOO_LARGE);
    let stranger: PullReply = ask(
        &mut a1,
        PullRequest {
            conv: "p:2:3".into(),
            ..PullRequest::default()
        }
        .to_frame(13),
    )
    .await;
    assert_eq!(stranger.code, Code::NOT_ALLOWED);
    let ok: SendReply = ask(&mut a1, send_to(2, "c-3", "still here").to_frame(14)).await;
    assert_eq!((ok.code, ok.seq), (Code::OK, 4));

    rim.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn history_survives_a_restart_on_the_same_file() {
    let path = fresh_sqlite_path("im-restart");
    let env = [("RIM_IM__SQLITE_PATH", path.as_str())];
    let mut rim = start_standalone("im-restart", &env);
    let tcp = rim.addr_after("accepting clients listener=\"tcp\"");
    let mut a = chat_device(tcp, 5, "a").await;
    for i in 1..=3u64 {
        let reply: SendReply = ask(
            &mut a,
            send_to(6, &format!("m-{i}"), "kept").to_frame(i as i32),
        )
        .await;
        assert_eq!((reply.code, reply.seq), (Code::OK, i));
    }
    rim.crash();

    let mut rim = start_standalone("im-restart", &env);
    let tcp = rim.addr_after("accepting clients listener=\"tcp\"");
    let mut b = chat_device(tcp, 6, "b").await;
    let sync: SyncReply = ask(&mut b, SyncRequest { sync: 0, limit: 0 }.to_frame(1)).await;
    let seqs: Vec<u64> = sync.msgs.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, [1, 2, 3]);
    // The seq continues without a hole, and an old cmid is still known.
    let mut a = chat_device(tcp, 5, "a").await;
    let resend: SendReply = ask(&mut a, send_to(6, "m-2", "kept").to_frame(9)).await;
    assert_eq!(resend.seq, 2);
    let next_one: SendReply = ask(&mut a, send_to(6, "m-4", "new").to_frame(10)).await;
    assert_eq!(next_one.seq, 4);
    rim.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unacked_push_gets_notify_sync_and_an_acked_one_does_not() {
    use rim_proto::im::Ack;

    let mut rim = start_standalone("im-acks", &[("RIM_IM__ACK_TIMEOUT", "300ms")]);
    let tcp = rim.addr_after("accepting clients listener=\"tcp\"");
    let api = rim.addr_after("http api serving");
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let mut sender = chat_device(tcp, 7, "s").await;
    // Two devices of user 8: one acks what it gets, one never does.
    let mut acking = device(tcp, 8, "acking", &[21, 27, 1000]).await;
    let mut silent = chat_device(tcp, 8, "silent").await;
    let mut gone = chat_device(tcp, 8, "gone").await;

    let reply: SendReply = ask(&mut sender, send_to(8, "a-1", "ack me").to_frame(1)).await;
    assert_eq!(reply.code, Code::OK);
    let msg = next_msg(&mut acking).await;
    acking
        .send(
            Ack {
                sync: msg.sync.unwrap(),
            }
            .to_frame(2),
        )
        .await
        .unwrap();
    assert_eq!(next_msg(&mut silent).await.sync, Some(1));
    // A device that leaves without acking is not notified: it SYNCs when
    // it comes back.
    assert_eq!(next_msg(&mut gone).await.sync, Some(1));
    drop(gone);

    // The silent device is told to SYNC (not sent the message again).
    let frame = next(&mut silent).await;
    assert_eq!(frame.op, Op::IM_NOTIFY);
    assert_eq!(
        Notify::decode(&frame.body).unwrap(),
        Notify::Sync { sync: 1 }
    );
    // The acking device got nothing more, well past the timeout, and only
    // the silent one was notified.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    nothing_pending(&mut acking, api, "acking").await;
    let metrics = reqwest::get(format!("http://{api}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let notified = metrics
        .lines()
        .find(|l| l.starts_with("rim_logic_im_deliveries_total{result=\"ack_timeout_notify\"}"))
        .unwrap_or_else(|| panic!("no ack_timeout_notify series in:\n{metrics}"));
    assert!(notified.ends_with(" 1"), "{notified}");
    rim.stop();
}

/// The business's side: a send through POST /im/v1/messages reaches every
/// device of both users as MSG with their inbox sync (the API is none of
/// the sender's devices), a device's SYNC and the HTTP history agree with
/// it, and a read through the API tells the reader's devices.
#[tokio::test(flavor = "multi_thread")]
async fn a_business_send_over_http_reaches_every_device() {
    let mut rim = start_standalone("im-http", &[]);
    let tcp = rim.addr_after("accepting clients listener=\"tcp\"");
    let api = rim.addr_after("http api serving");
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let mut a1 = chat_device(tcp, 1, "a1").await;
    let mut b1 = chat_device(tcp, 2, "b1").await;

    let body = r#"{"from":1,"to":2,"cmid":"h-1","type":7,"body":"from the business"}"#;
    let sent = post_ok(&http, &format!("http://{api}/im/v1/messages"), body).await;
    let sent = &sent["data"];
    assert_eq!((&sent["conv"], &sent["seq"]), (&"p:1:2".into(), &1.into()));
    for device in [&mut b1, &mut a1] {
        let msg = next_msg(device).await;
        assert_eq!(
            (msg.conv.as_str(), msg.seq, msg.from, msg.kind, msg.sync),
            ("p:1:2", 1, 1, 7, Some(1))
        );
        assert_eq!(
            (msg.body.as_str(), msg.cmid.as_str()),
            ("from the business", "h-1")
        );
        assert_eq!(Some(msg.id.as_str()), sent["id"].as_str());
    }
    let sync: SyncReply = ask(&mut b1, SyncRequest { sync: 0, limit: 0 }.to_frame(3)).await;
    assert_eq!(sync.msgs.len(), 1);
    assert_eq!(Some(sync.msgs[0].id.as_str()), sent["id"].as_str());
    // Acked, so that im.ack_timeout sends no NOTIFY sync to b1 meanwhile.
    b1.send(rim_proto::im::Ack { sync: 1 }.to_frame(4))
        .await
        .unwrap();
    let history = support::get_json(
        &http,
        &format!("http://{api}/im/v1/conversations/p:1:2/messages"),
    )
    .await;
    assert_eq!(history["data"]["msgs"][0]["id"], sent["id"], "{history}");
    assert_eq!(history["data"]["max_seq"], 1, "{history}");

    let read = post_ok(
        &http,
        &format!("http://{api}/im/v1/conversations/p:1:2/read"),
        r#"{"mid":2,"seq":1}"#,
    )
    .await;
    assert_eq!(
        read["data"],
        serde_json::json!({ "read_seq": 1, "max_seq": 1 })
    );
    let frame = next(&mut b1).await;
    assert_eq!(frame.op, Op::IM_NOTIFY, "{frame:?}");
    assert_eq!(
        Notify::decode(&frame.body).unwrap(),
        Notify::Read {
            conv: "p:1:2".into(),
            seq: 1
        }
    );
    rim.stop();
}

/// Retention (im.max_messages_per_conv): a device syncing from below what
/// is kept gets `reset` with what is kept, reloads its conversations and
/// goes on from the sync it was given; history below the floor answers
/// `reset` with the page from it.
#[tokio::test(flavor = "multi_thread")]
async fn a_device_below_what_is_retained_gets_reset_reloads_and_continues() {
    let path = fresh_sqlite_path("im-retention");
    let env = [
        ("RIM_IM__SQLITE_PATH", path.as_str()),
        ("RIM_IM__MAX_MESSAGES_PER_CONV", "5"),
        ("RIM_IM__PRUNE_INTERVAL", "100ms"),
        ("RIM_IM__ACK_TIMEOUT", "1h"),
    ];
    let mut rim = start_standalone("im-retention", &env);
    let tcp = rim.addr_after("accepting clients listener=\"tcp\"");
    let api = rim.addr_after("http api serving");
    let mut a = chat_device(tcp, 31, "a").await;
    for i in 1..=12u64 {
        let reply: SendReply = ask(
            &mut a,
            send_to(32, &format!("r-{i}"), "old").to_frame(i as i32),
        )
        .await;
        assert_eq!((reply.code, reply.seq), (Code::OK, i));
    }
    // Bob's device was offline through all of it; the pruner keeps 5.
    let mut b = chat_device(tcp, 32, "b").await;
    let pull = |before| PullRequest {
        conv: "p:31:32".into(),
        before,
        ..PullRequest::default()
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut n = 100;
    let page = loop {
        n += 1;
        let page: PullReply = ask(&mut b, pull(Some(3)).to_frame(n)).await;
        if page.min_seq == 8 || tokio::time::Instant::now() > deadline {
            break page;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((page.code, page.min_seq, page.max_seq), (Code::OK, 8, 12));
    assert!(page.reset, "before 3 is below what is kept");
    let seqs: Vec<u64> = page.msgs.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, [8, 9, 10, 11, 12], "the page from the floor");

    let sync: SyncReply = ask(&mut b, SyncRequest { sync: 0, limit: 0 }.to_frame(200)).await;
    assert!(sync.reset, "entries 1-7 are gone");
    let seqs: Vec<u64> = sync.msgs.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, [8, 9, 10, 11, 12]);
    assert_eq!((sync.sync, sync.more), (12, false));

    // Reload: the conversation list has the conversation at its latest.
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let list =
        support::get_json(&http, &format!("http://{api}/im/v1/users/32/conversations")).await;
    let convs = list["data"].as_array().expect("conversations");
    assert_eq!(convs[0]["conv"], "p:31:32", "{list}");
    assert_eq!(convs[0]["max_seq"], 12);

    // And go on from the sync given: nothing is missing any more.
    let reply: SendReply = ask(&mut a, send_to(32, "r-13", "new").to_frame(13)).await;
    assert_eq!(reply.seq, 13);
    let pushed = next_msg(&mut b).await;
    assert_eq!((pushed.seq, pushed.sync), (13, Some(13)));
    let sync: SyncReply = ask(
        &mut b,
        SyncRequest {
            sync: sync.sync,
            limit: 0,
        }
        .to_frame(201),
    )
    .await;
    assert!(!sync.reset);
    let seqs: Vec<u64> = sync.msgs.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, [13]);
    rim.stop();
}
