//! The client's IM ops against a fake server on 127.0.0.1 that speaks raw
//! frames: what goes on the wire, and how replies are matched by header seq
//! while pushed frames are kept.

use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use rim_client::{AuthToken, Client, Error, ImEvent};
use rim_proto::im::{
    Body, Code, Msg, Notify, PullReply, PullRequest, SendReply, SendRequest, SyncReply, SyncRequest,
};
use rim_proto::{BatchBuilder, Frame, FrameCodec, Op};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;

/// A bound on every wait, so that a broken test fails instead of hanging.
const WAIT: Duration = Duration::from_secs(10);

type Server = Framed<TcpStream, FrameCodec>;

/// Connects a client to a fresh fake server and returns both ends.
async fn pair() -> (Client, Server) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (client, accepted) = tokio::join!(Client::connect_tcp(addr), listener.accept());
    let (stream, _) = accepted.unwrap();
    (client.unwrap(), Framed::new(stream, FrameCodec::default()))
}

/// Reads the next frame the client sent.
async fn received(server: &mut Server) -> Frame {
    tokio::time::timeout(WAIT, server.next())
        .await
        .expect("a frame from the client in time")
        .expect("the client is connected")
        .expect("a well-formed frame")
}

/// Reads the client's next IM event, bounded so that a lost frame fails
/// the test rather than hanging it.
async fn next_im(client: &mut Client) -> Option<ImEvent> {
    tokio::time::timeout(WAIT, client.next_im())
        .await
        .expect("an IM event in time")
        .expect("a well-formed IM frame")
}

fn body_json(frame: &Frame) -> Value {
    serde_json::from_slice(&frame.body).expect("a JSON body")
}

fn msg(seq: u64) -> Msg {
    Msg {
        conv: "p:1:2".into(),
        seq,
        id: format!("{}", 9_000 + seq),
        from: 2,
        cmid: format!("m{seq}"),
        kind: 0,
        body: format!("message {seq}"),
        ts: 1_765_000_000_000,
        sync: Some(seq + 10),
    }
}

fn send_reply(cmid: &str, seq: u64) -> SendReply {
    SendReply {
        code: Code::OK,
        cmid: cmid.into(),
        conv: "p:1:2".into(),
        seq,
        id: format!("{}", 5_000 + seq),
        ts: 1_765_000_000_001,
        ..SendReply::default()
    }
}

fn batch(frames: &[Frame]) -> Frame {
    let mut builder = BatchBuilder::new();
    for frame in frames {
        builder.push(frame).unwrap();
    }
    builder.finish()
}

#[tokio::test]
async fn a_send_goes_out_as_op_18_and_its_reply_is_found_past_pushes() {
    let (mut client, mut server) = pair().await;
    let req = SendRequest {
        cmid: "c-1".into(),
        to: Some(2),
        conv: None,
        kind: 0,
        body: "hello".into(),
    };
    let seq = client.send_im(&req).await.unwrap();

    let frame = received(&mut server).await;
    assert_eq!((frame.op, frame.seq), (Op(18), seq));
    assert_eq!(
        body_json(&frame),
        json!({"cmid": "c-1", "to": 2, "type": 0, "body": "hello"})
    );

    // Before the reply: a MSG, then a batch holding a NOTIFY, another
    // request's reply and a MSG; then the reply itself.
    let other_reply = send_reply("c-0", 1);
    let mine = send_reply("c-1", 2);
    let notify = Notify::Sync { sync: 30 };
    server.send(msg(1).to_frame(0)).await.unwrap();
    server
        .send(batch(&[
            notify.to_frame(0),
            other_reply.to_frame(seq + 100),
            msg(2).to_frame(0),
        ]))
        .await
        .unwrap();
    server.send(mine.to_frame(seq)).await.unwrap();

    let reply = client.reply_to::<SendRequest>(seq, WAIT).await.unwrap();
    assert_eq!(reply, mine);

    let mut kept = Vec::new();
    for _ in 0..4 {
        kept.push(next_im(&mut client).await.unwrap());
    }
    assert_eq!(
        kept,
        [
            ImEvent::Msg(msg(1)),
            ImEvent::Notify(notify),
            ImEvent::SendReply {
                seq: seq + 100,
                reply: other_reply
            },
            ImEvent::Msg(msg(2)),
        ],
        "every other frame is kept, in arrival order"
    );
}

#[tokio::test]
async fn request_waits_for_a_reply_inside_a_batch() {
    let (mut client, mut server) = pair().await;
    let page = SyncReply {
        code: Code::OK,
        msgs: vec![msg(1), msg(2)],
        sync: 12,
        more: true,
        ..SyncReply::default()
    };
    let expected = page.clone();
    let fake = async move {
        let frame = received(&mut server).await;
        assert_eq!(frame.op, Op(22));
        assert_eq!(body_json(&frame), json!({"sync": 10, "limit": 2}));
        server
            .send(batch(&[msg(3).to_frame(0), page.to_frame(frame.seq)]))
            .await
            .unwrap();
        server
            .send(
                Notify::Presence {
                    mid: 4,
                    online: true,
                }
                .to_frame(0),
            )
            .await
            .unwrap();
        server
    };
    let asking = client.request(&SyncRequest { sync: 10, limit: 2 }, WAIT);
    let (reply, _server) = tokio::join!(asking, fake);
    assert_eq!(reply.unwrap(), expected);
    assert_eq!(
        next_im(&mut client).await,
        Some(ImEvent::Msg(msg(3))),
        "the MSG batched before the reply is kept"
    );
    assert_eq!(
        next_im(&mut client).await,
        Some(ImEvent::Notify(Notify::Presence {
            mid: 4,
            online: true
        }))
    );
}

#[tokio::test]
async fn pipelined_replies_are_matched_in_any_order() {
    let (mut client, mut server) = pair().await;
    let first = client
        .pull(&PullRequest {
            conv: "g:a".into(),
            before: Some(9),
            after: None,
            limit: 3,
        })
        .await
        .unwrap();
    let second = client
        .pull(&PullRequest {
            conv: "g:b".into(),
            before: None,
            after: Some(0),
            limit: 0,
        })
        .await
        .unwrap();
    assert_ne!(first, second);

    let a = received(&mut server).await;
    let b = received(&mut server).await;
    assert_eq!((a.op, a.seq, b.op, b.seq), (Op(24), first, Op(24), second));
    assert_eq!(
        body_json(&a),
        json!({"conv": "g:a", "before": 9, "limit": 3})
    );
    assert_eq!(
        body_json(&b),
        json!({"conv": "g:b", "after": 0, "limit": 0})
    );

    let reply = |conv: &str| PullReply {
        code: Code::OK,
        conv: conv.into(),
        max_seq: 9,
        min_seq: 1,
        ..PullReply::default()
    };
    // Answered in the other order, with a MSG between.
    server.send(reply("g:b").to_frame(second)).await.unwrap();
    server.send(msg(5).to_frame(0)).await.unwrap();
    server.send(reply("g:a").to_frame(first)).await.unwrap();

    let got_a = client.reply_to::<PullRequest>(first, WAIT).await.unwrap();
    assert_eq!(got_a.conv, "g:a");
    let got_b = client.reply_to::<PullRequest>(second, WAIT).await.unwrap();
    assert_eq!(got_b.conv, "g:b", "found among the frames already kept");
    assert_eq!(next_im(&mut client).await, Some(ImEvent::Msg(msg(5))));
}

#[tokio::test]
async fn ack_and_read_go_out_with_their_ops_and_bodies() {
    let (mut client, mut server) = pair().await;
    client.ack(41).await.unwrap();
    client.read("p:1:2", 7).await.unwrap();
    let sync_seq = client.sync(41, 0).await.unwrap();

    let ack = received(&mut server).await;
    let read = received(&mut server).await;
    let sync = received(&mut server).await;
    assert_eq!((ack.op, body_json(&ack)), (Op(20), json!({"sync": 41})));
    assert_eq!(
        (read.op, body_json(&read)),
        (Op(26), json!({"conv": "p:1:2", "seq": 7}))
    );
    assert_eq!(
        (sync.op, sync.seq, body_json(&sync)),
        (Op(22), sync_seq, json!({"sync": 41, "limit": 0}))
    );
    assert!(
        ack.seq < read.seq && read.seq < sync.seq,
        "each frame takes the next seq"
    );
}

#[tokio::test]
async fn a_missing_reply_times_out_and_loses_no_push() {
    let (mut client, mut server) = pair().await;
    server.send(msg(1).to_frame(0)).await.unwrap();
    let err = client
        .request(
            &SyncRequest { sync: 0, limit: 0 },
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::ReplyTimeout { op, .. } if op == Op::IM_SYNC_REPLY),
        "{err}"
    );
    assert_eq!(received(&mut server).await.op, Op::IM_SYNC);
    assert_eq!(next_im(&mut client).await, Some(ImEvent::Msg(msg(1))));
}

#[tokio::test]
async fn a_bad_body_is_an_error_naming_its_op_and_other_ops_are_skipped() {
    let (mut client, mut server) = pair().await;
    server
        .send(Frame::new(
            Op(1000),
            0,
            Bytes::from_static(b"business push"),
        ))
        .await
        .unwrap();
    server
        .send(Frame::new(
            Op::IM_MSG,
            0,
            Bytes::from_static(b"{\"conv\":1}"),
        ))
        .await
        .unwrap();
    let err = tokio::time::timeout(WAIT, client.next_im())
        .await
        .expect("an answer in time")
        .unwrap_err();
    assert!(
        matches!(err, Error::Body { op, .. } if op == Op::IM_MSG),
        "{err}"
    );

    let push = Frame::new(Op(1000), 0, Bytes::from_static(b"x"));
    assert_eq!(ImEvent::from_frame(&push).unwrap(), None);
    let client_op = Frame::new(Op::IM_SEND, 1, Bytes::from_static(b"{}"));
    assert_eq!(ImEvent::from_frame(&client_op).unwrap(), None);
    drop(server);
    assert_eq!(next_im(&mut client).await, None, "closed by the server");
}

#[test]
fn an_auth_token_can_accept_the_pushed_im_ops() {
    let token = AuthToken {
        mid: 1,
        accepts: vec![1000, 21],
        ..AuthToken::default()
    }
    .accepting_im()
    .accepting_im();
    let body: Value = serde_json::from_slice(&token.to_body()).unwrap();
    assert_eq!(body["accepts"], json!([1000, 21, 27]));
}
