//! Delivery: pushes by key, room broadcasts, broadcast to all, op-9 batches,
//! slow consumers, and the same operations through the gRPC service.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use rim_client::Client;
use rim_comet::TransportKind;
use rim_config::CometConfig;
use rim_proto::api::{CometApi, RemoteComet};
use rim_proto::pb::comet::v1 as pb;
use rim_proto::{BatchBuilder, Frame, Op};
use support::*;

const MARK: i32 = 9999;

/// Connects `n` clients alternating TCP and WebSocket, keys `{prefix}{i}`.
async fn clients(
    comet: &TestComet,
    prefix: &str,
    n: usize,
    room: &str,
    accepts: &[i32],
) -> Vec<Client> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(
            comet
                .client(
                    KINDS[i % 2],
                    token(i as i64, &format!("{prefix}{i}"), room, accepts),
                )
                .await,
        );
    }
    out
}

#[tokio::test]
async fn a_key_push_reaches_exactly_those_keys() {
    let comet = start(test_config(), ScriptedLogic::default()).await;
    let mut all = clients(&comet, "k", 6, "", &[1000, MARK]).await;
    let d = comet
        .push_keys(&["k0", "k3", "k4", "nobody"], 1000, "hi")
        .await;
    assert_eq!(
        (d.delivered, d.missing, d.filtered, d.dropped),
        (3, 1, 0, 0)
    );
    for (i, client) in all.iter_mut().enumerate() {
        if [0, 3, 4].contains(&i) {
            let frame = next(client).await;
            assert_eq!((frame.op, &frame.body[..]), (Op(1000), &b"hi"[..]), "k{i}");
        }
        assert_nothing_before_marker(&comet, client, &format!("k{i}")).await;
    }
    comet.stop().await;
}

#[tokio::test]
async fn each_key_can_get_its_own_body_in_one_call() {
    let comet = start(test_config(), ScriptedLogic::default()).await;
    let mut all = clients(&comet, "each", 3, "", &[21, MARK]).await;
    let d = comet
        .comet
        .push_msg(pb::PushMsgRequest {
            keys: vec!["each0".into(), "each2".into(), "nobody".into()],
            proto_op: 21,
            proto: Some(proto(21, "")),
            bodies: vec![
                Bytes::from("for 0"),
                Bytes::from("for 2"),
                Bytes::from("lost"),
            ],
        })
        .await
        .unwrap();
    assert_eq!((d.delivered, d.missing), (2, 1));
    for (i, client) in all.iter_mut().enumerate() {
        if i != 1 {
            let frame = next(client).await;
            assert_eq!(frame.op, Op(21));
            assert_eq!(frame.body, Bytes::from(format!("for {i}")), "each{i}");
        }
        assert_nothing_before_marker(&comet, client, &format!("each{i}")).await;
    }
    // Bodies must pair with keys.
    let err = comet
        .comet
        .push_msg(pb::PushMsgRequest {
            keys: vec!["each0".into(), "each1".into()],
            proto_op: 21,
            proto: Some(proto(21, "")),
            bodies: vec![Bytes::from("one")],
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, rim_proto::api::RpcError::InvalidArgument(_)),
        "{err}"
    );
    comet.stop().await;
}

#[tokio::test]
async fn a_room_broadcast_reaches_exactly_the_room() {
    let comet = start(test_config(), ScriptedLogic::default()).await;
    let mut inside = clients(&comet, "in", 6, "live://7", &[MARK]).await;
    let mut outside = clients(&comet, "out", 4, "live://8", &[MARK]).await;
    let d = comet.push_room("live://7", 1000, "room msg").await;
    assert_eq!(d.delivered, 6);
    for (i, client) in inside.iter_mut().enumerate() {
        assert_eq!(next(client).await.body, Bytes::from("room msg"));
        assert_nothing_before_marker(&comet, client, &format!("in{i}")).await;
    }
    for (i, client) in outside.iter_mut().enumerate() {
        assert_nothing_before_marker(&comet, client, &format!("out{i}")).await;
    }
    assert_eq!(
        comet.comet.rooms().await.unwrap(),
        vec!["live://7".to_string(), "live://8".to_string()]
    );
    comet.stop().await;
}

#[tokio::test]
async fn a_group_broadcast_reaches_the_channel_members_that_accept_msg() {
    let logic = ScriptedLogic::default();
    logic.groups.lock().unwrap().extend([
        (1, vec!["g:big".to_string(), "g:other".to_string()]),
        (2, vec!["g:big".to_string()]),
        (3, vec!["g:other".to_string()]),
    ]);
    let comet = start(test_config(), logic).await;
    let im = [21, 27, MARK];
    let mut a = comet.client(KINDS[0], token(1, "a", "", &im)).await;
    let mut b = comet.client(KINDS[1], token(2, "b", "", &im)).await;
    let mut c = comet.client(KINDS[0], token(3, "c", "", &im)).await;
    // In the channel, but a goim client that never asked for IM ops.
    let mut plain = comet.client(KINDS[1], token(2, "plain", "", &[MARK])).await;

    let broadcast = |body: &'static str| {
        comet.comet.broadcast_group(pb::BroadcastGroupRequest {
            group: "g:big".into(),
            proto_op: 21,
            proto: Some(proto(21, body)),
        })
    };
    let d = broadcast("one").await.unwrap();
    assert_eq!((d.delivered, d.filtered), (2, 1));
    for (client, key) in [(&mut a, "a"), (&mut b, "b")] {
        assert_eq!(next(client).await.body, Bytes::from("one"));
        assert_nothing_before_marker(&comet, client, key).await;
    }
    assert_nothing_before_marker(&comet, &mut c, "c").await;
    assert_nothing_before_marker(&comet, &mut plain, "plain").await;

    // b leaves, c joins; a key not here is counted missing.
    let change = |keys: &[&str], leave: bool| {
        comet.comet.change_group(pb::ChangeGroupRequest {
            group: "g:big".into(),
            keys: keys.iter().map(|k| k.to_string()).collect(),
            leave,
        })
    };
    let left = change(&["b", "gone"], true).await.unwrap();
    assert_eq!((left.changed, left.missing), (1, 1));
    let joined = change(&["c", "a"], false).await.unwrap();
    assert_eq!((joined.changed, joined.missing), (1, 0), "a was in already");
    let d = broadcast("two").await.unwrap();
    assert_eq!(d.delivered, 2);
    for (client, key) in [(&mut a, "a"), (&mut c, "c")] {
        assert_eq!(next(client).await.body, Bytes::from("two"));
        assert_nothing_before_marker(&comet, client, key).await;
    }
    assert_nothing_before_marker(&comet, &mut b, "b").await;

    // An empty group is refused, not a broadcast to nobody.
    let err = comet
        .comet
        .broadcast_group(pb::BroadcastGroupRequest {
            group: String::new(),
            proto_op: 21,
            proto: Some(proto(21, "x")),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, rim_proto::api::RpcError::InvalidArgument(_)),
        "{err}"
    );
    comet.stop().await;
}

#[tokio::test]
async fn a_renewal_repairs_the_group_channels_of_an_im_connection() {
    let logic = ScriptedLogic::default();
    logic
        .groups
        .lock()
        .unwrap()
        .insert(1, vec!["g:old".to_string()]);
    let config = CometConfig {
        presence_renew: Duration::from_millis(1),
        ..test_config()
    };
    let comet = start(config, logic).await;
    let mut a = comet.client(KINDS[0], token(1, "a", "", &[21, MARK])).await;
    // Logic's view changed while a join and a leave were lost.
    comet
        .logic
        .groups
        .lock()
        .unwrap()
        .insert(1, vec!["g:new".to_string()]);
    // A heartbeat once presence_renew has passed renews the lease, and
    // its reply is written after the renewal's answer was applied.
    tokio::time::sleep(Duration::from_millis(20)).await;
    a.heartbeat().await.unwrap();
    let reach = |group: &'static str| {
        comet.comet.broadcast_group(pb::BroadcastGroupRequest {
            group: group.into(),
            proto_op: 21,
            proto: Some(proto(21, group)),
        })
    };
    assert_eq!(reach("g:old").await.unwrap().delivered, 0);
    assert_eq!(reach("g:new").await.unwrap().delivered, 1);
    assert_eq!(next(&mut a).await.body, Bytes::from("g:new"));
    comet.stop().await;
}

#[tokio::test]
async fn broadcast_reaches_every_accepting_connection() {
    let comet = start(test_config(), ScriptedLogic::default()).await;
    let mut yes = clients(&comet, "y", 4, "", &[1000, MARK]).await;
    let mut no = clients(&comet, "n", 2, "", &[MARK]).await;
    let d = comet
        .comet
        .broadcast(pb::BroadcastRequest {
            proto_op: 1000,
            proto: Some(proto(1000, "all")),
            speed: 0,
        })
        .await
        .unwrap();
    assert_eq!((d.delivered, d.filtered), (4, 2));
    for client in &mut yes {
        assert_eq!(next(client).await.body, Bytes::from("all"));
    }
    for (i, client) in no.iter_mut().enumerate() {
        assert_nothing_before_marker(&comet, client, &format!("n{i}")).await;
    }
    comet.stop().await;
}

#[tokio::test]
async fn a_paced_broadcast_answers_at_once_and_spreads_deliveries_over_time() {
    let comet = start(
        CometConfig {
            buckets: 4,
            ..test_config()
        },
        ScriptedLogic::default(),
    )
    .await;
    let mut all = clients(&comet, "p", 8, "", &[1000]).await;
    let started = Instant::now();
    for body in ["slow", "then this"] {
        let d = within(
            Duration::from_secs(5),
            comet.comet.broadcast(pb::BroadcastRequest {
                proto_op: 1000,
                proto: Some(proto(1000, body)),
                speed: 40,
            }),
        )
        .await
        .unwrap();
        // Queued for the pacer: the RPC does not wait for the pacing (a
        // paced broadcast slower than the caller's deadline would be retried).
        assert!(d.paced, "{d:?}");
        assert_eq!(d.delivered, 0);
    }
    for client in &mut all {
        assert_eq!(&next(client).await.body[..], b"slow");
        assert_eq!(&next(client).await.body[..], b"then this");
    }
    // The first broadcast's 8 deliveries at 40/s take at least 0.2 s before
    // the second one starts; behaviour, not a benchmark.
    assert!(
        started.elapsed() >= Duration::from_millis(190),
        "{:?}",
        started.elapsed()
    );
    comet.stop().await;
}

/// Paced broadcasts run one after the other, in the order they came.
#[tokio::test]
async fn paced_broadcasts_keep_their_order() {
    let comet = start(test_config(), ScriptedLogic::default()).await;
    let mut all = clients(&comet, "o", 4, "", &[1000]).await;
    for body in ["first", "second", "third"] {
        let d = comet
            .comet
            .broadcast(pb::BroadcastRequest {
                proto_op: 1000,
                proto: Some(proto(1000, body)),
                speed: 1000,
            })
            .await
            .unwrap();
        assert!(d.paced);
    }
    for client in &mut all {
        for body in ["first", "second", "third"] {
            assert_eq!(&next(client).await.body[..], body.as_bytes());
        }
    }
    comet.stop().await;
}

fn batch(ops_bodies: &[(i32, &str)]) -> Frame {
    let mut builder = BatchBuilder::new();
    for (op, body) in ops_bodies {
        builder
            .push(&Frame::new(
                Op(*op),
                0,
                Bytes::copy_from_slice(body.as_bytes()),
            ))
            .unwrap();
    }
    builder.finish()
}

#[tokio::test]
async fn a_batch_arrives_as_frames_over_tcp_and_as_one_message_over_websocket() {
    let comet = start(test_config(), ScriptedLogic::default()).await;
    let mut tcp = comet
        .client(TransportKind::Tcp, token(1, "t", "live://b", &[]))
        .await;
    let mut ws = comet
        .client(TransportKind::Ws, token(2, "w", "live://b", &[]))
        .await;
    tcp.unpack_batches(false);
    ws.unpack_batches(false);
    let batch = batch(&[(1000, "one"), (1001, "two"), (1002, "three")]);
    let d = comet
        .comet
        .broadcast_room(pb::BroadcastRoomRequest {
            room_id: "live://b".into(),
            proto: Some(batch.clone().into()),
        })
        .await
        .unwrap();
    assert_eq!(d.delivered, 2);

    for (op, body) in [(1000, "one"), (1001, "two"), (1002, "three")] {
        let frame = next(&mut tcp).await;
        assert_eq!((frame.op, &frame.body[..]), (Op(op), body.as_bytes()));
    }
    let whole = next(&mut ws).await;
    assert_eq!(whole.op, Op::RAW);
    assert_eq!(whole.body, batch.body);
    comet.stop().await;
}

/// goim's job wraps every push, even a single one, in an op-9 frame: a
/// WebSocket client sees one op-9 message per push, a TCP client the plain frame.
#[tokio::test]
async fn every_push_reaches_websocket_as_an_op_9_message_and_tcp_as_a_plain_frame() {
    let comet = start(test_config(), ScriptedLogic::default()).await;
    let mut tcp = comet
        .client(TransportKind::Tcp, token(1, "t", "live://w", &[1000]))
        .await;
    let mut ws = comet
        .client(TransportKind::Ws, token(2, "w", "live://w", &[1000]))
        .await;
    tcp.unpack_batches(false);
    ws.unpack_batches(false);

    assert_eq!(comet.push_keys(&["t", "w"], 1000, "key").await.delivered, 2);
    assert_eq!(comet.push_room("live://w", 1001, "room").await.delivered, 2);
    let all = comet
        .comet
        .broadcast(pb::BroadcastRequest {
            proto_op: 1000,
            proto: Some(proto(1000, "all")),
            speed: 0,
        })
        .await
        .unwrap();
    assert_eq!(all.delivered, 2);

    for (op, body) in [(1000, "key"), (1001, "room"), (1000, "all")] {
        let plain = next(&mut tcp).await;
        assert_eq!((plain.op, &plain.body[..]), (Op(op), body.as_bytes()));

        let message = next(&mut ws).await;
        assert_eq!((message.op, message.seq), (Op::RAW, 0), "{body}");
        let inner: Vec<Frame> = message.batch_frames().map(Result::unwrap).collect();
        assert_eq!(inner.len(), 1, "{body}");
        assert_eq!((inner[0].op, &inner[0].body[..]), (Op(op), body.as_bytes()));
    }
    // Replies are not pushes: they stay plain frames.
    assert_eq!(ws.heartbeat().await.unwrap(), 2);
    comet.stop().await;
}

#[tokio::test]
async fn a_stuck_reader_is_dropped_and_closed_without_slowing_the_others() {
    let config = CometConfig {
        write_queue: 8,
        slow_consumer_timeout: Duration::from_millis(300),
        ..test_config()
    };
    let comet = start(config, ScriptedLogic::default()).await;
    // Never reads after auth.
    let _stuck = comet
        .client(TransportKind::Tcp, token(1, "stuck", "live://s", &[]))
        .await;
    let mut readers = clients(&comet, "r", 2, "live://s", &[]).await;
    let body = "x".repeat(4000);
    let mut sent = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    // Push in rounds the readers keep up with, until the stuck one is closed.
    while comet.comet.stats().await.unwrap().slow_consumer_closes == 0 {
        assert!(
            Instant::now() < deadline,
            "stuck reader never closed after {sent} pushes"
        );
        for _ in 0..8 {
            comet.push_room("live://s", 1000, &body).await;
            sent += 1;
        }
        for reader in &mut readers {
            for _ in 0..8 {
                assert_eq!(next(reader).await.body.len(), 4000);
            }
        }
    }
    within(Duration::from_secs(5), async {
        while comet
            .comet
            .stats()
            .await
            .unwrap()
            .room_counts
            .get("live://s")
            != Some(&2)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // The readers got every message: nothing was dropped for them.
    comet.push_room("live://s", 1000, "after").await;
    for reader in &mut readers {
        assert_eq!(next(reader).await.body, Bytes::from("after"));
    }
    comet.stop().await;
}

#[tokio::test]
async fn the_grpc_service_pushes_kicks_and_reports() {
    let comet = start(test_config(), ScriptedLogic::default()).await;
    let mut a = comet
        .client(TransportKind::Tcp, token(1, "ga", "live://g", &[1000]))
        .await;
    let mut b = comet
        .client(TransportKind::Ws, token(2, "gb", "live://g", &[1000]))
        .await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", comet.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let remote = RemoteComet::new(channel);

    let d = remote
        .push_msg(pb::PushMsgRequest {
            keys: vec!["ga".into()],
            proto_op: 1000,
            proto: Some(proto(1000, "via grpc")),
            bodies: Vec::new(),
        })
        .await
        .unwrap();
    assert_eq!(d.delivered, 1);
    assert_eq!(next(&mut a).await.body, Bytes::from("via grpc"));

    let d = remote
        .broadcast_room(pb::BroadcastRoomRequest {
            room_id: "live://g".into(),
            proto: Some(proto(1001, "room")),
        })
        .await
        .unwrap();
    assert_eq!(d.delivered, 2);
    assert_eq!(next(&mut a).await.body, Bytes::from("room"));
    assert_eq!(next(&mut b).await.body, Bytes::from("room"));

    assert_eq!(remote.rooms().await.unwrap(), vec!["live://g".to_string()]);
    let stats = remote.stats().await.unwrap();
    assert_eq!(
        (
            stats.server_id.as_str(),
            stats.tcp_connections,
            stats.ws_connections
        ),
        ("comet-test", 1, 1)
    );
    assert_eq!(stats.room_counts.get("live://g"), Some(&2));
    assert_eq!(stats.ip_count, 1);

    assert_eq!(
        remote
            .kick(vec!["gb".into(), "nobody".into()])
            .await
            .unwrap(),
        1
    );
    b.closed_within(Duration::from_secs(5))
        .await
        .expect("kicked");

    // A push without a frame is a client error, not a crash.
    let err = remote
        .push_msg(pb::PushMsgRequest {
            keys: vec!["ga".into()],
            proto_op: 1000,
            proto: None,
            bodies: Vec::new(),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, rim_proto::api::RpcError::InvalidArgument(_)),
        "{err}"
    );
    comet.stop().await;
}

/// Issue #16, part 1: comet gRPC Kick and Broadcast worked from any peer.
/// With `node.grpc_token` set, a call without the token (or with another)
/// is refused as Unauthenticated and has no effect; with it, it works.
#[tokio::test]
async fn grpc_kick_and_broadcast_need_the_grpc_token_when_it_is_set() {
    const GRPC_TOKEN: &str = "s3cret-grpc-token";
    let comet = start_with_grpc_token(GRPC_TOKEN, test_config(), ScriptedLogic::default()).await;
    let mut a = comet
        .client(TransportKind::Tcp, token(1, "ta", "", &[1000]))
        .await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", comet.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let broadcast = || pb::BroadcastRequest {
        proto_op: 1000,
        proto: Some(proto(1000, "to all")),
        speed: 0,
    };
    let unauthenticated = |err: rim_proto::api::RpcError| {
        assert!(
            matches!(err, rim_proto::api::RpcError::Unauthenticated(_)),
            "{err}"
        );
    };
    for remote in [
        RemoteComet::new(channel.clone()),
        RemoteComet::new(channel.clone())
            .with_token(Some("wrong-token"))
            .unwrap(),
    ] {
        unauthenticated(remote.kick(vec!["ta".into()]).await.unwrap_err());
        unauthenticated(remote.broadcast(broadcast()).await.unwrap_err());
        unauthenticated(remote.stats().await.unwrap_err());
    }
    // A raw tonic client without any metadata: the code itself.
    let status = pb::comet_client::CometClient::new(channel.clone())
        .kick(pb::KickRequest {
            keys: vec!["ta".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert_eq!(
        comet.comet.connections(),
        1,
        "a refused kick closed a client"
    );

    let remote = RemoteComet::new(channel)
        .with_token(Some(GRPC_TOKEN))
        .unwrap();
    let d = remote.broadcast(broadcast()).await.unwrap();
    assert_eq!(d.delivered, 1);
    assert_eq!(next(&mut a).await.body, Bytes::from("to all"));
    assert_eq!(remote.kick(vec!["ta".into()]).await.unwrap(), 1);
    a.closed_within(Duration::from_secs(5))
        .await
        .expect("kicked");
    comet.stop().await;
}

#[tokio::test]
async fn many_keys_in_one_push_all_arrive_once() {
    let comet = start(test_config(), ScriptedLogic::default()).await;
    let mut all = clients(&comet, "m", 20, "", &[1000]).await;
    let keys: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    for round in 0..5 {
        let d = comet
            .comet
            .push_msg(pb::PushMsgRequest {
                keys: keys.clone(),
                proto_op: 1000,
                proto: Some(proto(1000, &format!("round {round}"))),
                bodies: Vec::new(),
            })
            .await
            .unwrap();
        assert_eq!(d.delivered, 20);
    }
    for client in &mut all {
        for round in 0..5 {
            assert_eq!(
                next(client).await.body,
                Bytes::from(format!("round {round}")),
                "in order"
            );
        }
    }
    comet.stop().await;
}

/// Issue #15: PushMsgs over gRPC (behind the token check) applies each push
/// in order exactly as PushMsg (accepts filter, per-recipient bodies), and
/// refuses an invalid push alone while the others are delivered.
#[tokio::test]
async fn push_msgs_delivers_each_push_in_order_and_refuses_invalid_ones_alone() {
    const GRPC_TOKEN: &str = "batch-token";
    let comet = start_with_grpc_token(GRPC_TOKEN, test_config(), ScriptedLogic::default()).await;
    let mut all = clients(&comet, "b", 4, "", &[1000, MARK]).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", comet.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let push = |keys: &[&str], op: i32, body: &str| pb::PushMsgRequest {
        keys: keys.iter().map(|k| k.to_string()).collect(),
        proto_op: op,
        proto: Some(proto(op, body)),
        bodies: Vec::new(),
    };
    let batch = pb::PushMsgsRequest {
        pushes: vec![
            push(&["b0"], 1000, "one"),
            push(&["b1"], 1000, "two"),
            // No frame: refused alone.
            pb::PushMsgRequest {
                proto: None,
                ..push(&["b0"], 1000, "")
            },
            push(&["b0", "b1", "nobody"], 1000, "three"),
            // Bodies that do not pair with keys: refused alone.
            pb::PushMsgRequest {
                bodies: vec![Bytes::from("lonely")],
                ..push(&["b2", "b3"], 1000, "")
            },
            // b2 does not accept op 1001.
            push(&["b2"], 1001, "filtered"),
            pb::PushMsgRequest {
                bodies: vec![Bytes::from("for b2"), Bytes::from("for b3")],
                ..push(&["b2", "b3"], 1000, "")
            },
            push(&["b0"], 1000, "four"),
        ],
    };
    let err = RemoteComet::new(channel.clone())
        .push_msgs(batch.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(err, rim_proto::api::RpcError::Unauthenticated(_)),
        "{err}"
    );
    let remote = RemoteComet::new(channel)
        .with_token(Some(GRPC_TOKEN))
        .unwrap();
    let reply = remote.push_msgs(batch).await.unwrap();
    let refused: Vec<u32> = reply.refused.iter().map(|r| r.index).collect();
    assert_eq!(refused, vec![2, 4], "{:?}", reply.refused);
    assert!(
        reply.refused[1].reason.contains("bodies"),
        "{:?}",
        reply.refused
    );
    let d = reply.delivery.unwrap();
    assert_eq!(
        (d.delivered, d.filtered, d.missing, d.dropped),
        (7, 1, 1, 0)
    );
    let expected: [&[&str]; 4] = [
        &["one", "three", "four"],
        &["two", "three"],
        &["for b2"],
        &["for b3"],
    ];
    for (i, (client, bodies)) in all.iter_mut().zip(expected).enumerate() {
        for body in bodies {
            let frame = next(client).await;
            assert_eq!(
                (frame.op, &frame.body[..]),
                (Op(1000), body.as_bytes()),
                "b{i}"
            );
        }
        assert_nothing_before_marker(&comet, client, &format!("b{i}")).await;
    }
    comet.stop().await;
}

/// Issue #15: a PushMsgs batch over the comet's bounds (count or bytes) is
/// refused whole as InvalidArgument before any push of it is applied.
#[tokio::test]
async fn push_msgs_over_the_bounds_are_refused_whole() {
    use rim_proto::api::{PUSH_BATCH_MAX_BYTES, PUSH_BATCH_MAX_PUSHES, RpcError};
    let comet = start(test_config(), ScriptedLogic::default()).await;
    let mut client = comet
        .client(TransportKind::Tcp, token(1, "over", "", &[1000, MARK]))
        .await;
    let push = |body: Bytes| pb::PushMsgRequest {
        keys: vec!["over".into()],
        proto_op: 1000,
        proto: Some(Frame::new(Op(1000), 0, body).into()),
        bodies: Vec::new(),
    };
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", comet.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let remote = RemoteComet::new(channel);
    // One push too many, over gRPC: the code crosses the wire.
    let too_many = pb::PushMsgsRequest {
        pushes: vec![push(Bytes::from("x")); PUSH_BATCH_MAX_PUSHES + 1],
    };
    let err = remote.push_msgs(too_many.clone()).await.unwrap_err();
    assert!(matches!(err, RpcError::InvalidArgument(_)), "{err}");
    let err = comet.comet.push_msgs(too_many).await.unwrap_err();
    assert!(matches!(err, RpcError::InvalidArgument(_)), "{err}");
    // Too many bytes (in process: tonic's own 4 MiB decode limit would
    // refuse it over gRPC before the comet saw it).
    let big = Bytes::from(vec![b'x'; PUSH_BATCH_MAX_BYTES / 4]);
    let too_big = pb::PushMsgsRequest {
        pushes: vec![push(big); 4],
    };
    let err = comet.comet.push_msgs(too_big).await.unwrap_err();
    assert!(matches!(err, RpcError::InvalidArgument(_)), "{err}");
    // None of the refused pushes reached the client.
    assert_nothing_before_marker(&comet, &mut client, "over").await;
    // At the bound it goes.
    let at_bound = pb::PushMsgsRequest {
        pushes: vec![push(Bytes::from("x")); PUSH_BATCH_MAX_PUSHES],
    };
    let reply = remote.push_msgs(at_bound).await.unwrap();
    assert!(reply.refused.is_empty(), "{:?}", reply.refused);
    let d = reply.delivery.unwrap();
    assert_eq!(d.delivered + d.dropped, PUSH_BATCH_MAX_PUSHES as u64);
    comet.stop().await;
}
