//! The admin endpoints, black box: the bearer token, rooms, one room,
//! broadcast to a room, kick and comets' stats.

mod support;

use rim_queue::PushType;
use serde_json::{Value, json};
use support::{Setup, TOKEN};

/// Every admin endpoint, as (method is POST, path).
const ENDPOINTS: [(bool, &str); 6] = [
    (false, "/admin/rooms"),
    (false, "/admin/room?room=live://1"),
    (true, "/admin/room/broadcast?room=live://1&operation=1000"),
    (true, "/admin/kick?mid=1"),
    (true, "/admin/kick?key=k1"),
    (false, "/admin/comets"),
];

fn room_ids(data: &Value) -> Vec<(String, i64)> {
    data["rooms"]
        .as_array()
        .unwrap_or_else(|| panic!("no rooms in {data}"))
        .iter()
        .map(|r| {
            (
                r["room_id"].as_str().unwrap_or_default().to_owned(),
                r["count"].as_i64().unwrap_or(-1),
            )
        })
        .collect()
}

fn pairs(list: &[(&str, i64)]) -> Vec<(String, i64)> {
    list.iter().map(|(r, n)| ((*r).to_owned(), *n)).collect()
}

// ---------------------------------------------------------------------------
// The token
// ---------------------------------------------------------------------------

#[tokio::test]
async fn admin_endpoints_need_the_bearer_token() {
    let mut h = Setup::new().admin_token().start().await;
    h.connect("comet-a", 1, "k1").await;

    for (post, path) in ENDPOINTS {
        let url = h.url(path);
        let request = |auth: Option<&str>| {
            let builder = if post {
                h.http.post(&url).body("x")
            } else {
                h.http.get(&url)
            };
            match auth {
                Some(value) => builder.header("Authorization", value),
                None => builder,
            }
        };
        h.send(request(None))
            .await
            .error(401, -401, &["Authorization"]);
        h.send(request(Some("Bearer wrong-token")))
            .await
            .error(401, -401, &[]);
        h.send(request(Some(&format!("Bearer {TOKEN}x"))))
            .await
            .error(401, -401, &[]);
        h.send(request(Some(&format!("Basic {TOKEN}"))))
            .await
            .error(401, -401, &[]);
        h.send(request(Some(TOKEN))).await.error(401, -401, &[]);
        let answer = h.send(request(Some(&format!("Bearer {TOKEN}")))).await;
        assert_eq!(answer.status, 200, "{path} with the token: {answer:?}");
    }

    // Refused calls had no effect: one broadcast and two kicks went through,
    // all with the token.
    let msgs = h.drain().await;
    assert_eq!(
        msgs.len(),
        1,
        "only the authorized broadcast may be enqueued: {msgs:?}"
    );
    assert_eq!(
        h.fakes["comet-a"].kicks(),
        [vec!["k1".to_string()], vec!["k1".to_string()]]
    );
}

/// Issue #16, part 1: with no Authorization header, `POST
/// /admin/kick?mid=4242` kicked the user. With `api.admin_token` set it is
/// refused with 401 and kicks nobody; the push token does not open it.
#[tokio::test]
async fn the_issues_kick_without_authorization_is_refused() {
    let h = Setup::new()
        .admin_token()
        .api(|api| api.push_token = Some("push-only".into()))
        .start()
        .await;
    h.connect("comet-a", 4242, "k4242").await;
    h.post("/admin/kick?mid=4242", "")
        .await
        .error(401, -401, &["Authorization: Bearer"]);
    let push_token = h
        .http
        .post(h.url("/admin/kick?mid=4242"))
        .bearer_auth("push-only");
    h.send(push_token)
        .await
        .error(401, -401, &["does not match"]);
    assert!(
        h.fakes["comet-a"].kicks().is_empty(),
        "refused kicks had an effect"
    );
    let answer = h.admin_post("/admin/kick?mid=4242", "").await;
    assert_eq!(answer.ok(), &json!({ "kicked": 1 }));
    assert_eq!(h.fakes["comet-a"].kicks(), [vec!["k4242".to_string()]]);
}

#[tokio::test]
async fn admin_endpoints_are_open_without_a_configured_token() {
    let mut h = Setup::new().start().await;
    h.connect("comet-a", 1, "k1").await;
    for (post, path) in ENDPOINTS {
        let answer = if post {
            h.post(path, "x").await
        } else {
            h.get(path).await
        };
        assert_eq!(answer.status, 200, "{path}: {answer:?}");
        assert_eq!(answer.body["code"], 0, "{path}: {answer:?}");
    }
    assert_eq!(h.drain().await.len(), 1);
}

// ---------------------------------------------------------------------------
// /admin/rooms and /admin/room
// ---------------------------------------------------------------------------

async fn with_rooms() -> support::Harness {
    let h = Setup::new().admin_token().start().await;
    h.report_rooms(
        "comet-a",
        &[
            ("live://1", 2),
            ("live://2", 1),
            ("chat://9", 50),
            ("live://4", 3),
        ],
    )
    .await;
    h.report_rooms("comet-b", &[("live://1", 3), ("live://3", 4)])
        .await;
    // Totals: chat://9 50, live://1 5, live://3 4, live://4 3, live://2 1.
    h
}

#[tokio::test]
async fn admin_rooms_pages_and_sorts() {
    let h = with_rooms().await;

    // Default: by count, descending, page 1 of 50.
    let data = h.admin_get("/admin/rooms").await.ok().clone();
    assert_eq!(
        (
            data["total"].clone(),
            data["page"].clone(),
            data["size"].clone()
        ),
        (json!(5), json!(1), json!(50))
    );
    assert_eq!(
        room_ids(&data),
        pairs(&[
            ("chat://9", 50),
            ("live://1", 5),
            ("live://3", 4),
            ("live://4", 3),
            ("live://2", 1)
        ])
    );

    // Pages of 2.
    let data = h.admin_get("/admin/rooms?page=2&size=2").await.ok().clone();
    assert_eq!(
        (
            data["total"].clone(),
            data["page"].clone(),
            data["size"].clone()
        ),
        (json!(5), json!(2), json!(2))
    );
    assert_eq!(room_ids(&data), pairs(&[("live://3", 4), ("live://4", 3)]));
    let data = h.admin_get("/admin/rooms?page=3&size=2").await.ok().clone();
    assert_eq!(room_ids(&data), pairs(&[("live://2", 1)]));
    let data = h.admin_get("/admin/rooms?page=4&size=2").await.ok().clone();
    assert_eq!(room_ids(&data), pairs(&[]));
    assert_eq!(data["total"], 5);

    // By count, ascending.
    let data = h
        .admin_get("/admin/rooms?order=asc&size=2")
        .await
        .ok()
        .clone();
    assert_eq!(room_ids(&data), pairs(&[("live://2", 1), ("live://4", 3)]));

    // By room: ascending by default, or descending.
    let data = h.admin_get("/admin/rooms?sort=room").await.ok().clone();
    assert_eq!(
        room_ids(&data),
        pairs(&[
            ("chat://9", 50),
            ("live://1", 5),
            ("live://2", 1),
            ("live://3", 4),
            ("live://4", 3)
        ])
    );
    let data = h
        .admin_get("/admin/rooms?sort=room&order=desc&size=2")
        .await
        .ok()
        .clone();
    assert_eq!(room_ids(&data), pairs(&[("live://4", 3), ("live://3", 4)]));
}

#[tokio::test]
async fn admin_rooms_refuses_bad_paging_and_sorting() {
    let h = with_rooms().await;
    h.admin_get("/admin/rooms?page=0").await.bad_param("page");
    h.admin_get("/admin/rooms?page=-1").await.bad_param("page");
    h.admin_get("/admin/rooms?page=x").await.bad_param("page");
    h.admin_get("/admin/rooms?size=0").await.bad_param("size");
    h.admin_get("/admin/rooms?size=1001")
        .await
        .bad_param("size");
    h.admin_get("/admin/rooms?size=ten").await.bad_param("size");
    h.admin_get("/admin/rooms?sort=members")
        .await
        .bad_param("sort");
    h.admin_get("/admin/rooms?order=up")
        .await
        .bad_param("order");
    h.admin_get("/admin/rooms?sort=room&order=sideways")
        .await
        .bad_param("order");
}

#[tokio::test]
async fn admin_room_counts_a_room_per_comet() {
    let h = with_rooms().await;
    let data = h.admin_get("/admin/room?room=live://1").await.ok().clone();
    assert_eq!(
        data,
        json!({ "room_id": "live://1", "count": 5, "comets": { "comet-a": 2, "comet-b": 3 } })
    );

    let data = h.admin_get("/admin/room?room=live://3").await.ok().clone();
    assert_eq!(
        data,
        json!({ "room_id": "live://3", "count": 4, "comets": { "comet-b": 4 } })
    );

    let data = h
        .admin_get("/admin/room?room=live://404")
        .await
        .ok()
        .clone();
    assert_eq!(
        data,
        json!({ "room_id": "live://404", "count": 0, "comets": {} })
    );

    h.admin_get("/admin/room").await.bad_param("room");
    h.admin_get("/admin/room?room=").await.bad_param("room");
}

// ---------------------------------------------------------------------------
// /admin/room/broadcast
// ---------------------------------------------------------------------------

#[tokio::test]
async fn admin_broadcast_enqueues_a_room_message() {
    let mut h = with_rooms().await;
    let answer = h
        .admin_post(
            "/admin/room/broadcast?room=live://1&operation=1000",
            "from admin",
        )
        .await;
    // The same answer as a room push: every comet reported, so the count
    // is known, with the age of the oldest report.
    let data = answer.ok();
    assert_eq!(
        (&data["room"], &data["comets"], &data["connections"]),
        (&json!("live://1"), &json!(2), &json!(5)),
        "{data}"
    );
    assert!(data["connections_age_ms"].is_u64(), "{data}");

    let msgs = h.drain().await;
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    let msg = &msgs[0];
    assert_eq!(msg.r#type(), PushType::Room);
    assert_eq!((msg.room.as_str(), msg.operation), ("live://1", 1000));
    assert_eq!(&msg.msg[..], b"from admin");
    assert!(msg.keys.is_empty() && msg.server.is_empty(), "{msg:?}");
    support::assert_recent(msg);

    // Percent-encoded room ids work too.
    h.admin_post(
        "/admin/room/broadcast?room=live%3A%2F%2F2&operation=1000",
        "x",
    )
    .await
    .ok();
    assert_eq!(h.drain().await[0].room, "live://2");
}

#[tokio::test]
async fn admin_broadcast_refuses_bad_parameters() {
    let mut h = with_rooms().await;
    h.admin_post("/admin/room/broadcast?room=1&operation=1000", "x")
        .await
        .bad_param("room");
    h.admin_post("/admin/room/broadcast?operation=1000", "x")
        .await
        .bad_param("room");
    h.admin_post("/admin/room/broadcast?room=live://1", "x")
        .await
        .bad_param("operation");
    h.admin_post("/admin/room/broadcast?room=live://1&operation=x", "x")
        .await
        .bad_param("operation");
    assert!(h.drain().await.is_empty());
}

#[tokio::test]
async fn admin_broadcast_answers_503_when_the_queue_is_unavailable() {
    let mut h = with_rooms().await;
    h.drop_consumer();
    h.admin_post("/admin/room/broadcast?room=live://1&operation=1000", "x")
        .await
        .error(503, -500, &["live://1", "not enqueued"]);
}

#[tokio::test]
async fn admin_broadcast_applies_max_body() {
    let mut h = Setup::new().admin_token().max_body(16).start().await;
    h.admin_post(
        "/admin/room/broadcast?room=live://1&operation=1000",
        vec![b'x'; 17],
    )
    .await
    .error(413, -400, &[]);
    assert!(h.drain().await.is_empty());
}

// ---------------------------------------------------------------------------
// /admin/kick
// ---------------------------------------------------------------------------

#[tokio::test]
async fn admin_kick_by_mid_kicks_exactly_that_users_keys_on_each_comet() {
    let h = Setup::new().admin_token().start().await;
    h.connect("comet-a", 5, "u5-a1").await;
    h.connect("comet-a", 5, "u5-a2").await;
    h.connect("comet-b", 5, "u5-b1").await;
    h.connect("comet-a", 6, "u6-a1").await;

    let answer = h.admin_post("/admin/kick?mid=5", "").await;
    assert_eq!(answer.ok(), &json!({ "kicked": 3 }));
    assert_eq!(
        h.fakes["comet-a"].kicks(),
        [vec!["u5-a1".to_string(), "u5-a2".to_string()]]
    );
    assert_eq!(h.fakes["comet-b"].kicks(), [vec!["u5-b1".to_string()]]);

    // A user with no connection: nothing to kick, no comet called.
    let answer = h.admin_post("/admin/kick?mid=404", "").await;
    assert_eq!(answer.ok(), &json!({ "kicked": 0 }));
    assert_eq!(h.fakes["comet-a"].kicks().len(), 1);
    assert_eq!(h.fakes["comet-b"].kicks().len(), 1);
}

#[tokio::test]
async fn admin_kick_by_key_kicks_that_key_on_its_comet() {
    let h = Setup::new().admin_token().start().await;
    h.connect("comet-a", 5, "u5-a1").await;
    h.connect("comet-b", 5, "u5-b1").await;

    let answer = h.admin_post("/admin/kick?key=u5-b1", "").await;
    assert_eq!(answer.ok(), &json!({ "kicked": 1 }));
    assert!(h.fakes["comet-a"].kicks().is_empty());
    assert_eq!(h.fakes["comet-b"].kicks(), [vec!["u5-b1".to_string()]]);

    let answer = h.admin_post("/admin/kick?key=unknown", "").await;
    assert_eq!(answer.ok(), &json!({ "kicked": 0 }));
    assert_eq!(h.fakes["comet-b"].kicks().len(), 1);
}

#[tokio::test]
async fn admin_kick_needs_exactly_one_of_mid_or_key() {
    let h = Setup::new().admin_token().start().await;
    h.connect("comet-a", 5, "k5").await;

    h.admin_post("/admin/kick", "")
        .await
        .error(400, -400, &["\"mid\"", "\"key\""]);
    h.admin_post("/admin/kick?mid=5&key=k5", "")
        .await
        .error(400, -400, &["\"mid\"", "\"key\""]);
    h.admin_post("/admin/kick?mid=abc", "")
        .await
        .bad_param("mid");
    h.admin_post("/admin/kick?mid=", "").await.bad_param("mid");
    h.admin_post("/admin/kick?key=", "").await.bad_param("key");
    assert!(
        h.fakes["comet-a"].kicks().is_empty(),
        "a refused kick must call no comet"
    );
}

#[tokio::test]
async fn admin_kick_names_a_comet_that_failed() {
    let h = Setup::new().admin_token().start().await;
    h.connect("comet-a", 5, "a1").await;
    h.connect("comet-b", 5, "b1").await;
    h.fakes["comet-b"].fail_kicks("comet-b is draining");

    let answer = h.admin_post("/admin/kick?mid=5", "").await;
    answer.error(503, -500, &["kicked 1", "comet-b", "draining"]);
    assert_eq!(h.fakes["comet-a"].kicks(), [vec!["a1".to_string()]]);
}

// ---------------------------------------------------------------------------
// /admin/comets
// ---------------------------------------------------------------------------

#[tokio::test]
async fn admin_comets_shows_each_comets_stats_or_its_error() {
    let h = Setup::new().admin_token().start().await;
    h.fakes["comet-b"].fail_stats("connection refused");

    let data = h.admin_get("/admin/comets").await.ok().clone();
    let list = data
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {data}"));
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["node"]["id"], "comet-a");
    assert_eq!(list[0]["node"]["region"], "eu");
    assert_eq!(
        list[0]["stats"],
        json!({
            "tcp_connections": 3,
            "ws_connections": 2,
            "ip_count": 4,
            "rooms": 2,
            "dropped_frames": 7,
            "slow_consumer_closes": 1,
            "bad_frames": 2,
        })
    );
    assert_eq!(list[1]["node"]["id"], "comet-b");
    let error = list[1]["stats"]["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error in {}", list[1]));
    assert!(error.contains("connection refused"), "{error}");
}

#[tokio::test]
async fn admin_kick_names_a_comet_missing_from_the_directory() {
    let h = Setup::new().admin_token().start().await;
    // The router knows a session on a comet logic has no client for.
    h.connect("comet-gone", 5, "g1").await;
    h.connect("comet-a", 5, "a1").await;

    let answer = h.admin_post("/admin/kick?mid=5", "").await;
    answer.error(503, -500, &["kicked 1", "comet-gone"]);
    assert_eq!(h.fakes["comet-a"].kicks(), [vec!["a1".to_string()]]);
}

#[tokio::test]
async fn admin_reads_answer_503_when_the_router_is_down() {
    let h = Setup::new()
        .admin_token()
        .router(std::sync::Arc::new(support::DownRouter))
        .start()
        .await;
    h.admin_get("/admin/rooms")
        .await
        .error(503, -500, &["router"]);
    h.admin_get("/admin/room?room=live://1")
        .await
        .error(503, -500, &["router"]);
    h.admin_post("/admin/kick?mid=1", "")
        .await
        .error(503, -500, &["router"]);
    h.admin_post("/admin/kick?key=k1", "")
        .await
        .error(503, -500, &["router"]);
    assert!(h.fakes.values().all(|f| f.kicks().is_empty()));
    // Comets' stats do not need the router.
    assert_eq!(
        h.admin_get("/admin/comets")
            .await
            .ok()
            .as_array()
            .map(Vec::len),
        Some(2)
    );
}
