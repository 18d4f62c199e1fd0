//! The connection lifecycle over TCP and WebSocket: auth, heartbeat, rooms,
//! sub/unsub, key replacement, limits, bad input and drain.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use rim_client::Client;
use rim_comet::{TransportKind, WS_PATH};
use rim_config::CometConfig;
use rim_proto::api::CometApi;
use rim_proto::{Frame, Op};
use support::*;
use tokio_tungstenite::tungstenite::Message;

const MARK: i32 = 9999;

#[tokio::test]
async fn auth_succeeds_with_the_request_seq_and_frames_before_it_are_skipped() {
    let comet = start(test_config(), ScriptedLogic::default()).await;
    for kind in KINDS {
        let mut client = comet.raw(kind).await;
        // A frame before Auth is skipped, not answered.
        client
            .send(Frame::new(Op::HEARTBEAT, 41, Bytes::new()))
            .await
            .unwrap();
        client
            .send(Frame::new(Op::AUTH, 42, token(1, "k1", "", &[]).to_body()))
            .await
            .unwrap();
        let reply = next(&mut client).await;
        assert_eq!(
            (reply.op, reply.seq, reply.body.len()),
            (Op::AUTH_REPLY, 42, 0),
            "{kind:?}"
        );
    }
    comet.stop().await;
}

#[tokio::test]
async fn a_refused_token_closes_the_connection() {
    let comet = start(test_config(), ScriptedLogic::default()).await;
    for kind in KINDS {
        let mut client = comet.raw(kind).await;
        let err = client.auth(&token(-1, "bad", "", &[])).await.unwrap_err();
        assert!(matches!(err, rim_client::Error::Closed), "{kind:?}: {err}");
        let mut client = comet.raw(kind).await;
        client
            .send_raw(
                Frame::new(Op::AUTH, 1, &b"not json"[..])
                    .to_bytes()
                    .unwrap(),
            )
            .await
            .unwrap();
        within(
            Duration::from_secs(5),
            client.closed_within(Duration::from_secs(5)),
        )
        .await
        .unwrap();
    }
    let stats = comet.comet.stats().await.unwrap();
    assert_eq!(stats.tcp_connections + stats.ws_connections, 0);
    comet.stop().await;
}

#[tokio::test]
async fn a_connection_without_auth_is_closed_after_the_handshake_timeout() {
    let comet = start(test_config(), ScriptedLogic::default()).await;
    for kind in KINDS {
        let mut client = comet.raw(kind).await;
        client
            .closed_within(Duration::from_secs(5))
            .await
            .expect("closed by the server");
    }
    eventually(Duration::from_secs(5), || comet.comet.connections() == 0).await;
    comet.stop().await;
}

#[tokio::test]
async fn heartbeat_replies_carry_the_room_count_local_then_cluster_wide() {
    let comet = start(test_config(), ScriptedLogic::default()).await;
    for kind in KINDS {
        let room = format!("live://{kind:?}");
        let mut a = comet
            .client(kind, token(1, &format!("a-{kind:?}"), &room, &[]))
            .await;
        let mut b = comet
            .client(kind, token(2, &format!("b-{kind:?}"), &room, &[]))
            .await;
        assert_eq!(a.heartbeat().await.unwrap(), 2, "{kind:?}");
        b.change_room("").await.unwrap();
        assert_eq!(a.heartbeat().await.unwrap(), 1, "{kind:?}");
        assert_eq!(b.heartbeat().await.unwrap(), 0, "{kind:?}: no room");
    }
    // Once logic reports a cluster-wide count, heartbeats carry it.
    comet
        .logic
        .online
        .lock()
        .unwrap()
        .insert("live://Tcp".into(), 1000);
    let mut c = comet
        .client(TransportKind::Tcp, token(3, "c", "live://Tcp", &[]))
        .await;
    within(Duration::from_secs(5), async {
        while c.heartbeat().await.unwrap() != 1000 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    comet.stop().await;
}

#[tokio::test]
async fn no_heartbeat_for_heartbeat_times_max_closes_the_connection() {
    let logic = ScriptedLogic {
        heartbeat_ms: 150,
        heartbeat_max: 2,
        ..ScriptedLogic::default()
    };
    let comet = start(test_config(), logic).await;
    for kind in KINDS {
        let mut quiet = comet
            .client(kind, token(1, &format!("quiet-{kind:?}"), "", &[]))
            .await;
        let mut alive = comet
            .client(kind, token(2, &format!("alive-{kind:?}"), "", &[]))
            .await;
        // Heartbeats keep a connection open well past the limit (300 ms).
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            alive
                .heartbeat()
                .await
                .expect("heartbeating connection stays open");
        }
        quiet
            .closed_within(Duration::from_secs(5))
            .await
            .expect("quiet connection closed");
        assert_eq!(comet.logic.disconnects_of(&format!("quiet-{kind:?}")), 1);
    }
    comet.stop().await;
}

#[tokio::test]
async fn presence_is_renewed_at_most_once_per_interval() {
    let config = CometConfig {
        presence_renew: Duration::from_millis(300),
        ..test_config()
    };
    let comet = start(config, ScriptedLogic::default()).await;
    let mut client = comet
        .client(TransportKind::Tcp, token(1, "k", "", &[]))
        .await;
    for _ in 0..20 {
        client.heartbeat().await.unwrap();
    }
    assert_eq!(
        comet
            .logic
            .heartbeats
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    for _ in 0..20 {
        client.heartbeat().await.unwrap();
    }
    assert_eq!(
        comet
            .logic
            .heartbeats
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    comet.stop().await;
}

#[tokio::test]
async fn change_room_moves_the_connection_between_room_broadcasts() {
    let comet = start(test_config(), ScriptedLogic::default()).await;
    for kind in KINDS {
        let key = format!("mover-{kind:?}");
        let (r1, r2) = (format!("chat://1-{kind:?}"), format!("chat://2-{kind:?}"));
        let mut client = comet.client(kind, token(1, &key, &r1, &[MARK])).await;
        assert_eq!(comet.push_room(&r1, 1000, "in r1").await.delivered, 1);
        assert_eq!(next(&mut client).await.body, Bytes::from("in r1"));
        client.change_room(&r2).await.unwrap();
        assert_eq!(comet.push_room(&r1, 1000, "r1 again").await.delivered, 0);
        assert_eq!(comet.push_room(&r2, 1000, "in r2").await.delivered, 1);
        assert_eq!(next(&mut client).await.body, Bytes::from("in r2"));
        client.change_room("").await.unwrap();
        assert_eq!(comet.push_room(&r2, 1000, "gone").await.delivered, 0);
        assert_nothing_before_marker(&comet, &mut client, &key).await;
    }
    comet.stop().await;
}

#[tokio::test]
async fn sub_and_unsub_filter_key_pushes_but_not_room_pushes() {
    let comet = start(test_config(), ScriptedLogic::default()).await;
    for kind in KINDS {
        let key = format!("sub-{kind:?}");
        let room = format!("live://sub-{kind:?}");
        let mut client = comet
            .client(kind, token(1, &key, &room, &[1000, MARK]))
            .await;

        let d = comet.push_keys(&[&key], 1001, "not accepted").await;
        assert_eq!((d.delivered, d.filtered), (0, 1));
        client.sub(&[1001]).await.unwrap();
        assert_eq!(
            comet.push_keys(&[&key], 1001, "accepted").await.delivered,
            1
        );
        assert_eq!(next(&mut client).await.body, Bytes::from("accepted"));

        client.unsub(&[1000, 1001]).await.unwrap();
        assert_eq!(
            comet.push_keys(&[&key], 1000, "no longer").await.filtered,
            1
        );
        // Room broadcasts ignore the accepted ops.
        assert_eq!(comet.push_room(&room, 1000, "room push").await.delivered, 1);
        assert_eq!(next(&mut client).await.body, Bytes::from("room push"));
        assert_nothing_before_marker(&comet, &mut client, &key).await;
    }
    comet.stop().await;
}

#[tokio::test]
async fn a_second_connection_with_the_same_key_replaces_the_first() {
    let comet = start(test_config(), ScriptedLogic::default()).await;
    for kind in KINDS {
        let key = format!("dup-{kind:?}");
        let room = format!("live://dup-{kind:?}");
        let mut first = comet.client(kind, token(1, &key, &room, &[1000])).await;
        let mut second = comet.client(kind, token(1, &key, &room, &[1000])).await;
        first
            .closed_within(Duration::from_secs(5))
            .await
            .expect("replaced connection closed");

        let d = comet.push_keys(&[&key], 1000, "to the newest").await;
        assert_eq!(d.delivered, 1);
        assert_eq!(next(&mut second).await.body, Bytes::from("to the newest"));
        assert_eq!(second.heartbeat().await.unwrap(), 1, "one member, not two");
        // The replaced connection's end is not reported: the key is still online.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(comet.logic.disconnects_of(&key), 0);
        drop(second);
        eventually(Duration::from_secs(5), || {
            comet.logic.disconnects_of(&key) == 1
        })
        .await;
    }
    comet.stop().await;
}

#[tokio::test]
async fn a_client_close_reaches_logic_exactly_once() {
    let comet = start(test_config(), ScriptedLogic::default()).await;
    for kind in KINDS {
        let key = format!("bye-{kind:?}");
        let client = comet.client(kind, token(5, &key, "live://x", &[])).await;
        drop(client);
        eventually(Duration::from_secs(5), || {
            comet.logic.disconnects_of(&key) == 1
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(comet.logic.disconnects.lock().unwrap().len(), 2);
    let stats = comet.comet.stats().await.unwrap();
    assert_eq!(stats.tcp_connections + stats.ws_connections, 0);
    assert!(stats.room_counts.is_empty());
    comet.stop().await;
}

#[tokio::test]
async fn other_ops_go_to_logic_and_are_acknowledged() {
    let comet = start(test_config(), ScriptedLogic::default()).await;
    for kind in KINDS {
        let mut client = comet
            .client(kind, token(1, &format!("up-{kind:?}"), "", &[]))
            .await;
        client
            .send_upstream(Op(2000), Bytes::from("hello"))
            .await
            .unwrap();
    }
    let received = comet.logic.received.lock().unwrap().clone();
    assert_eq!(received.len(), 2);
    assert_eq!((received[0].1, &received[0].2[..]), (2000, &b"hello"[..]));
    comet.stop().await;
}

#[tokio::test]
async fn sends_over_the_connections_limit_are_answered_by_the_comet_with_code_3() {
    let logic = ScriptedLogic {
        im_send_rate: 1,
        im_send_burst: 2,
        ..ScriptedLogic::default()
    };
    let comet = start(test_config(), logic).await;
    let mut client = comet.client(KINDS[0], token(1, "limited", "", &[])).await;
    for seq in 1..=5 {
        let body = format!(r#"{{"cmid":"c-{seq}","to":2,"body":"x"}}"#);
        client
            .send(Frame::new(Op(18), seq, Bytes::from(body)))
            .await
            .unwrap();
    }
    let mut limited = Vec::new();
    for seq in 1..=5 {
        let reply = next_non_heartbeat(&mut client).await;
        assert_eq!((reply.op, reply.seq), (Op(19), seq), "in order");
        if !reply.body.starts_with(b"re:") {
            let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
            assert_eq!(body["code"], 3, "{body}");
            assert!(body["retry_ms"].as_u64().unwrap() >= 1, "{body}");
            assert_eq!(body["cmid"], format!("c-{seq}"));
            limited.push(seq);
        }
    }
    assert_eq!(
        limited,
        [3, 4, 5],
        "the burst of 2 went to logic, the rest did not"
    );
    let sends = comet
        .logic
        .received
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, op, _)| *op == 18)
        .count();
    assert_eq!(sends, 2, "logic saw only the SENDs within the limit");
    // Other IM requests are not counted against it.
    client
        .send(Frame::new(Op(22), 9, Bytes::from("s")))
        .await
        .unwrap();
    let reply = next_non_heartbeat(&mut client).await;
    assert_eq!(
        (reply.op, reply.seq, &reply.body[..3]),
        (Op(23), 9, &b"re:"[..])
    );
    comet.stop().await;
}

#[tokio::test]
async fn im_requests_get_logics_reply_and_no_echo() {
    let comet = start(test_config(), ScriptedLogic::default()).await;
    for kind in KINDS {
        let mut client = comet
            .client(kind, token(1, &format!("im-{kind:?}"), "", &[]))
            .await;
        // SEND (18) is answered by logic's SEND_REPLY (19) with the seq.
        client
            .send(Frame::new(Op(18), 41, Bytes::from("{}")))
            .await
            .unwrap();
        let reply = next_non_heartbeat(&mut client).await;
        assert_eq!(
            (reply.op, reply.seq, &reply.body[..]),
            (Op(19), 41, &b"re:{}"[..])
        );
        // ACK (20) and READ (26) have no reply; a client sending a server
        // op (21) is ignored; the next request is answered in order.
        for op in [20, 26, 21] {
            client
                .send(Frame::new(Op(op), 42, Bytes::from("{}")))
                .await
                .unwrap();
        }
        client
            .send(Frame::new(Op(22), 43, Bytes::from("s")))
            .await
            .unwrap();
        let reply = next_non_heartbeat(&mut client).await;
        assert_eq!(
            (reply.op, reply.seq),
            (Op(23), 43),
            "no echo of 20, 26 or 21"
        );
        // With logic unreachable, the client still gets its reply op: code 5.
        comet.logic.receive_down.store(true, Ordering::Release);
        client
            .send(Frame::new(Op(24), 44, Bytes::from("{}")))
            .await
            .unwrap();
        let reply = next_non_heartbeat(&mut client).await;
        assert_eq!((reply.op, reply.seq), (Op(25), 44));
        let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(body["code"], 5);
        comet.logic.receive_down.store(false, Ordering::Release);
    }
    let ops: Vec<i32> = comet
        .logic
        .received
        .lock()
        .unwrap()
        .iter()
        .map(|(_, op, _)| *op)
        .collect();
    assert_eq!(
        ops,
        [18, 20, 26, 22, 18, 20, 26, 22],
        "21 never reaches logic"
    );
    comet.stop().await;
}

async fn next_non_heartbeat(client: &mut Client) -> Frame {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), client.next_frame())
            .await
            .expect("a reply within 5 s")
            .unwrap()
            .expect("connection open");
        if frame.op != Op::HEARTBEAT_REPLY {
            return frame;
        }
    }
}

#[tokio::test]
async fn garbage_closes_only_the_sender() {
    let comet = start(test_config(), ScriptedLogic::default()).await;
    for kind in KINDS {
        let mut good = comet
            .client(kind, token(1, &format!("good-{kind:?}"), "live://g", &[]))
            .await;
        let mut bad = comet
            .client(kind, token(2, &format!("bad-{kind:?}"), "live://g", &[]))
            .await;
        let mut garbage = BytesMut::new();
        garbage.put_i32(20);
        garbage.put_i16(99); // header_len must be 16
        garbage.put_bytes(0xAB, 14);
        bad.send_raw(garbage.freeze()).await.unwrap();
        bad.closed_within(Duration::from_secs(5))
            .await
            .expect("sender closed");
        assert_eq!(good.heartbeat().await.unwrap(), 1, "{kind:?}");
    }
    // An oversized frame is refused the same way.
    let mut big = comet
        .client(TransportKind::Tcp, token(3, "big", "", &[]))
        .await;
    big.send(Frame::new(Op(2000), 1, vec![0u8; 4097]))
        .await
        .unwrap();
    big.closed_within(Duration::from_secs(5))
        .await
        .expect("oversized sender closed");
    assert!(comet.comet.stats().await.unwrap().bad_frames >= 3);
    comet.stop().await;
}

#[tokio::test]
async fn websocket_text_wrong_path_and_ping_are_handled() {
    let comet = start(test_config(), ScriptedLogic::default()).await;
    // Wrong path: refused at the upgrade.
    let err = tokio_tungstenite::connect_async(format!("ws://{}/nope", comet.ws))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");

    // Ping is answered with pong, before and after auth.
    let url = format!("ws://{}{WS_PATH}", comet.ws);
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    ws.send(Message::Ping(Bytes::from("p1"))).await.unwrap();
    let pong = within(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pong, Message::Pong(Bytes::from("p1")));

    // A text message is a protocol error.
    ws.send(Message::Text("hello".into())).await.unwrap();
    let end = within(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    });
    end.await;
    comet.stop().await;
}

#[tokio::test]
async fn connections_over_the_per_ip_limit_are_refused() {
    let config = CometConfig {
        max_connections_per_ip: 2,
        ..test_config()
    };
    let comet = start(config, ScriptedLogic::default()).await;
    let _a = comet
        .client(TransportKind::Tcp, token(1, "a", "", &[]))
        .await;
    let _b = comet
        .client(TransportKind::Ws, token(2, "b", "", &[]))
        .await;
    let mut c = Client::connect_tcp(comet.tcp).await.unwrap();
    assert!(
        c.auth(&token(3, "c", "", &[])).await.is_err(),
        "third connection refused"
    );
    drop(_a);
    eventually(Duration::from_secs(5), || comet.comet.connections() == 1).await;
    let _d = comet
        .client(TransportKind::Tcp, token(4, "d", "", &[]))
        .await;
    comet.stop().await;
}

#[tokio::test]
async fn drain_closes_every_client_and_stops() {
    let comet = start(test_config(), ScriptedLogic::default()).await;
    let mut clients = Vec::new();
    for i in 0..10 {
        let kind = KINDS[i % 2];
        clients.push(
            comet
                .client(kind, token(i as i64, &format!("d{i}"), "live://d", &[]))
                .await,
        );
    }
    let (tcp, logic) = (comet.tcp, comet.logic.clone());
    comet.stop().await;
    for client in &mut clients {
        client
            .closed_within(Duration::from_secs(5))
            .await
            .expect("drained");
    }
    assert_eq!(logic.disconnects.lock().unwrap().len(), 10);
    // No longer accepting.
    assert!(Client::connect_tcp(tcp).await.is_err());
}
