//! The goim push endpoints, black box: what each enqueues, what it answers,
//! and how it fails (bad parameters, oversized bodies, queue and router
//! outages).

mod support;

use std::sync::Arc;

use rim_queue::PushType;
use serde_json::json;
use support::{DownRouter, FailFor, Setup, assert_recent, chunked_post};

// ---------------------------------------------------------------------------
// The push token
// ---------------------------------------------------------------------------

const PUSH_TOKEN: &str = "s3cret-push-token";

/// Issue #16, part 1: `/goim/push/all` reached every client from anyone.
/// With `api.push_token` set, every push endpoint refuses a request without
/// `Authorization: Bearer <push token>` (401, code -401) and enqueues
/// nothing; the admin token does not open them.
#[tokio::test]
async fn push_endpoints_need_the_push_token_when_it_is_set() {
    let mut h = Setup::new()
        .admin_token()
        .api(|api| api.push_token = Some(PUSH_TOKEN.into()))
        .start()
        .await;
    h.connect("comet-a", 1, "k1").await;
    // The request, without any Authorization header.
    h.post("/goim/push/all?operation=1000", "hello all")
        .await
        .error(401, -401, &["push endpoints need Authorization: Bearer"]);
    let paths = [
        "/goim/push/keys?operation=1000&keys=k1",
        "/goim/push/mids?operation=1000&mids=1",
        "/goim/push/room?operation=1000&type=live&room=1",
        "/goim/push/all?operation=1000",
    ];
    for path in paths {
        let url = h.url(path);
        h.post(path, "x").await.error(401, -401, &["Authorization"]);
        for wrong in [
            format!("Bearer {PUSH_TOKEN}x"),
            format!("Bearer {}", support::TOKEN),
            format!("Basic {PUSH_TOKEN}"),
            PUSH_TOKEN.to_string(),
        ] {
            let request = h.http.post(&url).header("Authorization", wrong).body("x");
            h.send(request).await.error(401, -401, &[]);
        }
    }
    assert!(h.drain().await.is_empty(), "a refused push was enqueued");
    for path in paths {
        let request = h.http.post(h.url(path)).bearer_auth(PUSH_TOKEN).body("x");
        let answer = h.send(request).await;
        assert_eq!(answer.status, 200, "{path} with the token: {answer:?}");
    }
    assert_eq!(h.drain().await.len(), paths.len());
    // Other endpoints are not behind the push token.
    assert_eq!(h.get("/goim/online/total").await.status, 200);
}

// ---------------------------------------------------------------------------
// /goim/push/keys
// ---------------------------------------------------------------------------

#[tokio::test]
async fn push_keys_enqueues_one_push_per_comet_with_its_keys() {
    let mut h = Setup::new().start().await;
    h.connect("comet-a", 1, "k1").await;
    h.connect("comet-b", 2, "k2").await;
    h.connect("comet-a", 3, "k3").await;

    let answer = h
        .post(
            "/goim/push/keys?operation=1000&keys=k1&keys=k2&keys=k3",
            "hello keys",
        )
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(
        answer.body,
        json!({ "code": 0, "message": "", "data": { "connections": 3, "comets": 2 } })
    );

    let msgs = h.drain_by_server().await;
    assert_eq!(msgs.len(), 2, "one message per comet: {msgs:?}");
    let (a, b) = (&msgs[0], &msgs[1]);
    assert_eq!(a.server, "comet-a");
    assert_eq!(a.keys, ["k1", "k3"]);
    assert_eq!(b.server, "comet-b");
    assert_eq!(b.keys, ["k2"]);
    for msg in &msgs {
        assert_eq!(msg.r#type(), PushType::Push);
        assert_eq!(msg.operation, 1000);
        assert_eq!(&msg.msg[..], b"hello keys");
        assert_eq!((msg.room.as_str(), msg.speed), ("", 0));
        assert_recent(msg);
    }
}

#[tokio::test]
async fn push_keys_skips_unknown_keys_and_enqueues_nothing_for_none_known() {
    let mut h = Setup::new().start().await;
    h.connect("comet-b", 2, "k2").await;

    let answer = h
        .post("/goim/push/keys?operation=1000&keys=nobody&keys=ghost", "x")
        .await;
    assert_eq!(answer.ok(), &json!({ "connections": 0, "comets": 0 }));
    assert!(
        h.drain().await.is_empty(),
        "nothing may be enqueued for unknown keys"
    );

    let answer = h
        .post("/goim/push/keys?operation=1000&keys=nobody&keys=k2", "x")
        .await;
    assert_eq!(answer.ok(), &json!({ "connections": 1, "comets": 1 }));
    let msgs = h.drain().await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(
        (msgs[0].server.as_str(), msgs[0].keys.clone()),
        ("comet-b", vec!["k2".to_string()])
    );
}

#[tokio::test]
async fn push_keys_sends_a_key_listed_twice_once() {
    let mut h = Setup::new().start().await;
    h.connect("comet-a", 1, "k1").await;

    let answer = h
        .post("/goim/push/keys?operation=1000&keys=k1&keys=k1", "x")
        .await;
    assert_eq!(
        answer.ok(),
        &json!({ "connections": 1, "comets": 1 }),
        "one connection, listed twice"
    );
    let msgs = h.drain().await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(
        msgs[0].keys,
        ["k1"],
        "the connection would get the message twice"
    );
}

#[tokio::test]
async fn push_keys_refuses_missing_or_bad_parameters_naming_them() {
    let mut h = Setup::new().start().await;
    h.connect("comet-a", 1, "k1").await;

    h.post("/goim/push/keys?keys=k1", "x")
        .await
        .bad_param("operation");
    h.post("/goim/push/keys?operation=&keys=k1", "x")
        .await
        .bad_param("operation");
    h.post("/goim/push/keys?operation=abc&keys=k1", "x")
        .await
        .bad_param("operation");
    h.post("/goim/push/keys?operation=1.5&keys=k1", "x")
        .await
        .bad_param("operation");
    h.post("/goim/push/keys?operation=99999999999&keys=k1", "x")
        .await
        .bad_param("operation");
    h.post("/goim/push/keys?operation=1000", "x")
        .await
        .bad_param("keys");
    h.post("/goim/push/keys?operation=1000&keys=", "x")
        .await
        .bad_param("keys");
    h.post("/goim/push/keys", "x").await.error(400, -400, &[]);
    assert!(
        h.drain().await.is_empty(),
        "a refused push must enqueue nothing"
    );
}

#[tokio::test]
async fn push_body_over_max_body_is_413_and_at_max_body_is_accepted() {
    let mut h = Setup::new().max_body(64).start().await;
    h.connect("comet-a", 1, "k1").await;

    // Content-Length says too much.
    let answer = h
        .post("/goim/push/keys?operation=1000&keys=k1", vec![b'x'; 65])
        .await;
    answer.error(413, -400, &["64"]);
    assert!(h.drain().await.is_empty());

    // Exactly the limit is fine.
    let answer = h
        .post("/goim/push/keys?operation=1000&keys=k1", vec![b'y'; 64])
        .await;
    assert_eq!(answer.ok(), &json!({ "connections": 1, "comets": 1 }));
    let msgs = h.drain().await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(&msgs[0].msg[..], &[b'y'; 64][..]);

    // Every push endpoint applies the limit.
    for path in [
        "/goim/push/mids?operation=1000&mids=1",
        "/goim/push/room?operation=1000&type=live&room=1",
        "/goim/push/all?operation=1000",
    ] {
        h.post(path, vec![b'x'; 1000]).await.error(413, -400, &[]);
    }
    assert!(h.drain().await.is_empty());
}

/// Issue #16, part 2: `POST /goim/push/mids?operation=9&mids=N` with body
/// `\x00\x00\x00\x05garbage` was answered 200 and the client got raw bytes
/// without a frame header; ops 0, 2, 3, 7, 8 and -1 reached clients as fake
/// heartbeat and auth replies. Every op the client protocol reserves (goim's
/// 0–17, the IM's 18–27, negatives) is refused on every push endpoint.
#[tokio::test]
async fn every_push_endpoint_refuses_the_ops_the_client_protocol_reserves() {
    let mut h = Setup::new().admin_token().start().await;
    h.connect("comet-a", 1, "k1").await;
    let body: &[u8] = b"\x00\x00\x00\x05garbage";

    // The exact request of the issue.
    h.post("/goim/push/mids?operation=9&mids=1", body)
        .await
        .error(400, -400, &["\"operation\"", "reserved"]);

    let reserved = (0..=27).chain([-1, i32::MIN]);
    for op in reserved {
        for path in [
            format!("/goim/push/keys?operation={op}&keys=k1"),
            format!("/goim/push/mids?operation={op}&mids=1"),
            format!("/goim/push/room?operation={op}&type=live&room=1"),
            format!("/goim/push/all?operation={op}"),
        ] {
            h.post(&path, body)
                .await
                .error(400, -400, &["\"operation\""]);
        }
        h.admin_post(
            &format!("/admin/room/broadcast?room=live://1&operation={op}"),
            body,
        )
        .await
        .error(400, -400, &["\"operation\""]);
    }
    assert!(
        h.drain().await.is_empty(),
        "a push with a reserved op must enqueue nothing"
    );

    // The first op after the reserved ones is a business op.
    let answer = h.post("/goim/push/mids?operation=28&mids=1", body).await;
    assert_eq!(answer.ok(), &json!({ "connections": 1, "comets": 1 }));
    let msgs = h.drain().await;
    assert_eq!(msgs.len(), 1);
    assert_eq!((msgs[0].operation, &msgs[0].msg[..]), (28, body));
}

#[tokio::test]
async fn a_chunked_body_over_max_body_is_413() {
    let mut h = Setup::new().max_body(64).start().await;
    h.connect("comet-a", 1, "k1").await;

    let answer = h
        .raw(&chunked_post(
            "/goim/push/keys?operation=1000&keys=k1",
            &[b'x'; 200],
        ))
        .await;
    answer.error(413, -400, &["64"]);
    assert!(h.drain().await.is_empty());

    // The same request under the limit goes through (the raw client works).
    let answer = h
        .raw(&chunked_post(
            "/goim/push/keys?operation=1000&keys=k1",
            &[b'z'; 40],
        ))
        .await;
    assert_eq!(
        answer.ok(),
        &json!({ "connections": 1, "comets": 1 }),
        "{}",
        answer.raw
    );
    let msgs = h.drain().await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(&msgs[0].msg[..], &[b'z'; 40][..]);
}

// ---------------------------------------------------------------------------
// /goim/push/mids
// ---------------------------------------------------------------------------

#[tokio::test]
async fn push_mids_groups_every_device_of_each_user_by_comet() {
    let mut h = Setup::new().start().await;
    h.connect("comet-a", 7, "d1").await;
    h.connect("comet-b", 7, "d2").await;
    h.connect("comet-a", 7, "d3").await;
    h.connect("comet-b", 8, "e1").await;
    h.connect("comet-a", 9, "other-user").await;

    let answer = h
        .post(
            "/goim/push/mids?operation=1001&mids=7&mids=8&mids=404",
            "hi users",
        )
        .await;
    assert_eq!(answer.ok(), &json!({ "connections": 4, "comets": 2 }));

    let msgs = h.drain_by_server().await;
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    let sorted = |keys: &[String]| {
        let mut keys = keys.to_vec();
        keys.sort();
        keys
    };
    assert_eq!(msgs[0].server, "comet-a");
    assert_eq!(sorted(&msgs[0].keys), ["d1", "d3"]);
    assert_eq!(msgs[1].server, "comet-b");
    assert_eq!(sorted(&msgs[1].keys), ["d2", "e1"]);
    for msg in &msgs {
        assert_eq!(msg.r#type(), PushType::Push);
        assert_eq!(msg.operation, 1001);
        assert_eq!(&msg.msg[..], b"hi users");
        assert_recent(msg);
    }

    // Unknown users: nobody to push to, nothing enqueued.
    let answer = h.post("/goim/push/mids?operation=1001&mids=404", "x").await;
    assert_eq!(answer.ok(), &json!({ "connections": 0, "comets": 0 }));
    assert!(h.drain().await.is_empty());
}

#[tokio::test]
async fn push_mids_refuses_bad_mids_naming_them() {
    let mut h = Setup::new().start().await;
    h.connect("comet-a", 1, "k1").await;

    h.post("/goim/push/mids?operation=1000&mids=1&mids=x", "x")
        .await
        .bad_param("mids");
    h.post("/goim/push/mids?operation=1000&mids=1.5", "x")
        .await
        .bad_param("mids");
    h.post("/goim/push/mids?operation=1000", "x")
        .await
        .bad_param("mids");
    h.post("/goim/push/mids?mids=1", "x")
        .await
        .bad_param("operation");
    assert!(h.drain().await.is_empty());
}

// ---------------------------------------------------------------------------
// /goim/push/room
// ---------------------------------------------------------------------------

#[tokio::test]
async fn push_room_enqueues_one_room_message_for_type_and_room() {
    let mut h = Setup::new().start().await;
    h.report_rooms("comet-a", &[("live://1", 2), ("live://2", 9)])
        .await;
    h.report_rooms("comet-b", &[("live://1", 3)]).await;

    let answer = h
        .post(
            "/goim/push/room?operation=1002&type=live&room=1",
            "room body",
        )
        .await;
    let data = answer.ok();
    assert_eq!(
        (&data["room"], &data["comets"], &data["connections"]),
        (&json!("live://1"), &json!(2), &json!(5)),
        "{data}"
    );
    assert_report_age(data);

    let msgs = h.drain().await;
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    let msg = &msgs[0];
    assert_eq!(msg.r#type(), PushType::Room);
    assert_eq!(msg.room, "live://1");
    assert_eq!(msg.operation, 1002);
    assert_eq!(&msg.msg[..], b"room body");
    assert!(msg.keys.is_empty() && msg.server.is_empty(), "{msg:?}");
    assert_recent(msg);

    // A room nobody is in is still pushed (members may join before delivery);
    // every comet reported, so its 0 is known, with its age.
    let answer = h
        .post("/goim/push/room?operation=1002&type=live&room=77", "x")
        .await;
    let data = answer.ok();
    assert_eq!(
        (&data["room"], &data["comets"], &data["connections"]),
        (&json!("live://77"), &json!(2), &json!(0)),
        "{data}"
    );
    assert_report_age(data);
    assert_eq!(h.drain().await.len(), 1);
}

/// Asserts that a push answer says how old its connection count is.
#[track_caller]
fn assert_report_age(data: &serde_json::Value) {
    assert!(
        data["connections_age_ms"].is_u64(),
        "no connections_age_ms in {data}"
    );
}

#[tokio::test]
async fn push_room_leaves_the_count_out_until_every_comet_has_reported() {
    let mut h = Setup::new().start().await;
    // Before any report the members are unknown: no count that reads as nobody.
    let answer = h
        .post("/goim/push/room?operation=1000&type=live&room=1", "x")
        .await;
    assert_eq!(
        answer.ok(),
        &json!({ "room": "live://1", "comets": 2 }),
        "both comets are targeted, their members are not known"
    );
    // comet-b has not reported yet: a partial sum would undercount.
    h.report_rooms("comet-a", &[("live://1", 2)]).await;
    let answer = h
        .post("/goim/push/room?operation=1000&type=live&room=1", "x")
        .await;
    assert_eq!(answer.ok(), &json!({ "room": "live://1", "comets": 2 }));
    h.report_rooms("comet-b", &[]).await;
    let answer = h
        .post("/goim/push/room?operation=1000&type=live&room=1", "x")
        .await;
    assert_eq!(answer.ok()["connections"], 2, "{:?}", answer.body);
    assert_eq!(h.drain().await.len(), 3, "every room push was enqueued");
}

#[tokio::test]
async fn push_room_refuses_missing_type_or_room() {
    let mut h = Setup::new().start().await;
    h.post("/goim/push/room?operation=1000&room=1", "x")
        .await
        .bad_param("type");
    h.post("/goim/push/room?operation=1000&type=&room=1", "x")
        .await
        .bad_param("type");
    h.post("/goim/push/room?operation=1000&type=live", "x")
        .await
        .bad_param("room");
    h.post("/goim/push/room?operation=1000&type=live&room=", "x")
        .await
        .bad_param("room");
    h.post("/goim/push/room?type=live&room=1", "x")
        .await
        .bad_param("operation");
    assert!(h.drain().await.is_empty());
}

// ---------------------------------------------------------------------------
// /goim/push/all
// ---------------------------------------------------------------------------

#[tokio::test]
async fn push_all_enqueues_a_broadcast_with_its_speed() {
    let mut h = Setup::new().start().await;
    h.comets.refresh_load().await;

    let answer = h
        .post("/goim/push/all?operation=1003&speed=250", "to everyone")
        .await;
    // comet-a: 3 tcp + 2 ws; comet-b: 10 tcp.
    let data = answer.ok();
    assert_eq!(
        (&data["connections"], &data["comets"]),
        (&json!(15), &json!(2)),
        "{data}"
    );
    assert_report_age(data);
    let msgs = h.drain().await;
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    let msg = &msgs[0];
    assert_eq!(msg.r#type(), PushType::Broadcast);
    assert_eq!((msg.operation, msg.speed), (1003, 250));
    assert_eq!(&msg.msg[..], b"to everyone");
    assert!(
        msg.keys.is_empty() && msg.server.is_empty() && msg.room.is_empty(),
        "{msg:?}"
    );
    assert_recent(msg);

    // No speed = unlimited.
    h.post("/goim/push/all?operation=1003", "x").await.ok();
    let msgs = h.drain().await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].speed, 0);
}

#[tokio::test]
async fn push_all_refuses_a_negative_or_non_integer_speed() {
    let mut h = Setup::new().start().await;
    h.post("/goim/push/all?operation=1000&speed=-1", "x")
        .await
        .bad_param("speed");
    h.post("/goim/push/all?operation=1000&speed=fast", "x")
        .await
        .bad_param("speed");
    h.post("/goim/push/all?operation=1000&speed=1.5", "x")
        .await
        .bad_param("speed");
    h.post("/goim/push/all?speed=10", "x")
        .await
        .bad_param("operation");
    assert!(h.drain().await.is_empty());
}

// ---------------------------------------------------------------------------
// Queue and router outages
// ---------------------------------------------------------------------------

#[tokio::test]
async fn every_push_answers_503_when_the_queue_is_unavailable() {
    let mut h = Setup::new().start().await;
    h.connect("comet-a", 1, "k1").await;
    h.connect("comet-b", 2, "k2").await;
    h.drop_consumer();

    let answer = h
        .post("/goim/push/keys?operation=1000&keys=k1&keys=k2", "x")
        .await;
    answer.error(
        503,
        -500,
        &["not enqueued", "comet-a", "comet-b", "enqueued 0 of 2"],
    );

    let answer = h.post("/goim/push/mids?operation=1000&mids=1", "x").await;
    answer.error(503, -500, &["not enqueued", "comet-a"]);

    let answer = h
        .post("/goim/push/room?operation=1000&type=live&room=1", "x")
        .await;
    answer.error(503, -500, &["not enqueued", "live://1"]);

    let answer = h.post("/goim/push/all?operation=1000", "x").await;
    answer.error(503, -500, &["broadcast", "not enqueued"]);
}

#[tokio::test]
async fn a_partly_failed_push_names_the_comet_whose_message_was_not_enqueued() {
    let mut h = Setup::new()
        .producer(|memory| {
            Arc::new(FailFor {
                inner: memory,
                server: "comet-b".into(),
            })
        })
        .start()
        .await;
    h.connect("comet-a", 1, "k1").await;
    h.connect("comet-b", 2, "k2").await;
    h.connect("comet-b", 3, "k3").await;

    let answer = h
        .post(
            "/goim/push/keys?operation=1000&keys=k1&keys=k2&keys=k3",
            "x",
        )
        .await;
    answer.error(503, -500, &["enqueued 1 of 2", "comet-b", "2 connections"]);
    let message = answer.body["message"].as_str().unwrap_or_default();
    assert!(
        !message.contains("comet-a"),
        "comet-a's message was enqueued: {message:?}"
    );

    // What could be enqueued was.
    let msgs = h.drain().await;
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert_eq!(
        (msgs[0].server.as_str(), msgs[0].keys.clone()),
        ("comet-a", vec!["k1".to_string()])
    );
}

#[tokio::test]
async fn push_all_leaves_the_count_out_until_the_comets_load_is_known() {
    let mut h = Setup::new().start().await;
    // No stats refresh yet: the comets are targeted, their connections unknown.
    let answer = h.post("/goim/push/all?operation=1000", "x").await;
    assert_eq!(answer.ok(), &json!({ "comets": 2 }));
    assert_eq!(h.drain().await.len(), 1);
}

#[tokio::test]
async fn pushes_by_key_or_user_answer_503_when_the_router_is_down() {
    let mut h = Setup::new().router(Arc::new(DownRouter)).start().await;

    let answer = h.post("/goim/push/keys?operation=1000&keys=k1", "x").await;
    answer.error(503, -500, &["router", "nothing was enqueued"]);
    let answer = h.post("/goim/push/mids?operation=1000&mids=1", "x").await;
    answer.error(503, -500, &["router", "nothing was enqueued"]);
    assert!(h.drain().await.is_empty());
}

#[tokio::test]
async fn room_and_broadcast_pushes_do_not_need_the_router() {
    let mut h = Setup::new().router(Arc::new(DownRouter)).start().await;

    // The room push is enqueued; only its (best-effort) member count is
    // lost, and left out rather than given as 0.
    let answer = h
        .post("/goim/push/room?operation=1000&type=live&room=1", "x")
        .await;
    assert_eq!(answer.ok(), &json!({ "room": "live://1", "comets": 2 }));
    h.post("/goim/push/all?operation=1000", "x").await.ok();
    let msgs = h.drain().await;
    let kinds: Vec<PushType> = msgs.iter().map(|m| m.r#type()).collect();
    assert_eq!(kinds, [PushType::Room, PushType::Broadcast]);
}

/// 3000 room pushes of 64 KiB (issue #16, 6): the in-process queue holds at
/// most `queue.max_bytes` (64 MiB by default) of messages not yet handled,
/// then answers 503 naming the limit, instead of growing without bound.
#[tokio::test]
async fn pushes_over_the_queue_byte_limit_answer_503_naming_it() {
    let limit = rim_config::QueueConfig::default().max_bytes;
    assert_eq!(limit, 64 << 20, "the documented default");
    // A job that does not keep up: the test's consumer reads nothing yet.
    let mut h = Setup::new().queue(100_000, limit).start().await;
    let body = vec![b'x'; 64 << 10];
    let mut accepted = 0usize;
    let mut refused = None;
    for _ in 0..3000 {
        let answer = h
            .post(
                "/goim/push/room?operation=1000&type=live&room=big",
                body.clone(),
            )
            .await;
        if answer.status == 200 {
            accepted += 1;
        } else {
            refused = Some(answer);
            break;
        }
    }
    let refused = refused.expect("3000 pushes of 64 KiB all fit in 64 MiB");
    refused.error(503, -500, &["queue.max_bytes"]);
    assert!(
        accepted * (64 << 10) <= limit && accepted >= limit / (65 << 10),
        "{accepted} pushes of 64 KiB accepted under a {limit}-byte limit"
    );
    // Once the job handled what was queued, pushes are accepted again.
    assert_eq!(h.drain().await.len(), accepted);
    h.post(
        "/goim/push/room?operation=1000&type=live&room=big",
        body.clone(),
    )
    .await
    .ok();
}
