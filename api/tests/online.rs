//! The goim online and nodes endpoints, health, readiness and the envelope
//! of unknown paths, black box.

mod support;

use std::sync::Arc;

use rim_logic::CometNode;
use serde_json::{Value, json};
use support::{DownRouter, FakeComet, Setup, stats};

async fn with_rooms() -> support::Harness {
    let h = Setup::new().start().await;
    h.report_rooms(
        "comet-a",
        &[("live://1", 2), ("live://2", 1), ("chat://9", 50)],
    )
    .await;
    h.report_rooms("comet-b", &[("live://1", 3), ("live://3", 4)])
        .await;
    h
}

// ---------------------------------------------------------------------------
// /goim/online/*
// ---------------------------------------------------------------------------

#[tokio::test]
async fn online_top_lists_the_most_populated_rooms_of_a_type() {
    let h = with_rooms().await;

    let answer = h.get("/goim/online/top?type=live&limit=2").await;
    assert_eq!(
        answer.ok(),
        &json!([{ "room_id": "1", "count": 5 }, { "room_id": "3", "count": 4 }])
    );

    let answer = h.get("/goim/online/top?type=live&limit=10").await;
    assert_eq!(
        answer.ok(),
        &json!([{ "room_id": "1", "count": 5 }, { "room_id": "3", "count": 4 }, { "room_id": "2", "count": 1 }]),
        "other types (chat://9) must not appear"
    );

    let answer = h.get("/goim/online/top?type=chat&limit=5").await;
    assert_eq!(answer.ok(), &json!([{ "room_id": "9", "count": 50 }]));

    let answer = h.get("/goim/online/top?type=none&limit=5").await;
    assert_eq!(answer.ok(), &json!([]));
}

#[tokio::test]
async fn online_top_refuses_bad_parameters() {
    let h = with_rooms().await;
    h.get("/goim/online/top?limit=2").await.bad_param("type");
    h.get("/goim/online/top?type=live").await.bad_param("limit");
    h.get("/goim/online/top?type=live&limit=0")
        .await
        .bad_param("limit");
    h.get("/goim/online/top?type=live&limit=-1")
        .await
        .bad_param("limit");
    h.get("/goim/online/top?type=live&limit=many")
        .await
        .bad_param("limit");
}

#[tokio::test]
async fn online_room_counts_each_asked_room() {
    let h = with_rooms().await;

    let answer = h.get("/goim/online/room?type=live&rooms=1&rooms=2").await;
    assert_eq!(answer.ok(), &json!({ "1": 5, "2": 1 }));

    let answer = h.get("/goim/online/room?type=live&rooms=1&rooms=404").await;
    assert_eq!(answer.ok(), &json!({ "1": 5, "404": 0 }));

    // The type is part of the room: chat://1 is not live://1.
    let answer = h.get("/goim/online/room?type=chat&rooms=1&rooms=9").await;
    assert_eq!(answer.ok(), &json!({ "1": 0, "9": 50 }));
}

#[tokio::test]
async fn online_room_refuses_bad_parameters() {
    let h = with_rooms().await;
    h.get("/goim/online/room?rooms=1").await.bad_param("type");
    h.get("/goim/online/room?type=live")
        .await
        .bad_param("rooms");
    h.get("/goim/online/room?type=live&rooms=")
        .await
        .bad_param("rooms");
}

#[tokio::test]
async fn online_total_sums_the_comets_last_stats() {
    let h = Setup::new().start().await;

    let answer = h.get("/goim/online/total").await;
    assert_eq!(
        answer.ok(),
        &json!({ "ip_count": 0, "conn_count": 0 }),
        "nothing refreshed yet"
    );

    h.comets.refresh_load().await;
    let answer = h.get("/goim/online/total").await;
    // comet-a: 3 tcp + 2 ws, 4 ips; comet-b: 10 tcp, 7 ips.
    assert_eq!(answer.ok(), &json!({ "ip_count": 11, "conn_count": 15 }));
}

#[tokio::test]
async fn online_counts_answer_503_when_the_router_is_down() {
    let h = Setup::new().router(Arc::new(DownRouter)).start().await;
    h.get("/goim/online/top?type=live&limit=2")
        .await
        .error(503, -500, &["router"]);
    h.get("/goim/online/room?type=live&rooms=1")
        .await
        .error(503, -500, &["router"]);
}

// ---------------------------------------------------------------------------
// /goim/nodes/*
// ---------------------------------------------------------------------------

fn node_ids(data: &Value) -> Vec<String> {
    data["instances"]
        .as_array()
        .unwrap_or_else(|| panic!("no instances in {data}"))
        .iter()
        .map(|i| i["id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn nodes_weighted_has_goims_shape() {
    let h = Setup::new().start().await;

    let answer = h.get("/goim/nodes/weighted?platform=web").await;
    let data = answer.ok();
    // No region: comet-b (weight 30) before comet-a (weight 10); the ports
    // are the first node's.
    assert_eq!(data["domain"], "im.example");
    assert_eq!(
        (
            data["tcp_port"].clone(),
            data["ws_port"].clone(),
            data["wss_port"].clone()
        ),
        (json!(4101), json!(4102), json!(4103))
    );
    assert_eq!(
        (data["heartbeat"].clone(), data["heartbeat_max"].clone()),
        (json!(240), json!(2))
    );
    assert_eq!(data["nodes"], json!(["b.example", "a.example"]));
    assert_eq!(
        data["backoff"],
        json!({ "max_delay": 300, "base_delay": 3, "factor": 1.8, "jitter": 0.3 })
    );
    assert_eq!(node_ids(data), ["comet-b", "comet-a"]);
    assert!(data.get("region").is_none(), "no region: left out, {data}");
}

#[tokio::test]
async fn nodes_weighted_lists_the_clients_region_first() {
    let h = Setup::new()
        .region("10.0.0.0/8", "eu")
        .region("10.9.0.0/16", "us")
        .start()
        .await;

    // Explicit region.
    let data = h
        .get("/goim/nodes/weighted?platform=web&region=eu")
        .await
        .ok()
        .clone();
    assert_eq!(data["nodes"], json!(["a.example", "b.example"]));
    assert_eq!(
        (data["tcp_port"].clone(), data["ws_port"].clone()),
        (json!(3101), json!(3102))
    );
    assert!(
        data.get("wss_port").is_none(),
        "comet-a has no WSS listener: left out like goim, not 0: {data}"
    );
    assert_eq!(data["region"], "eu");

    // The client's IP from X-Forwarded-For, in the eu CIDR.
    let request = h
        .http
        .get(h.url("/goim/nodes/weighted?platform=web"))
        .header("X-Forwarded-For", "10.1.2.3, 192.0.2.1");
    let data = h.send(request).await.ok().clone();
    assert_eq!(node_ids(&data), ["comet-a", "comet-b"]);
    assert_eq!(data["region"], "eu");

    // The longest prefix wins: 10.9/16 is us.
    let request = h
        .http
        .get(h.url("/goim/nodes/weighted?platform=web"))
        .header("X-Forwarded-For", "10.9.0.7");
    let data = h.send(request).await.ok().clone();
    assert_eq!(node_ids(&data), ["comet-b", "comet-a"]);
    assert_eq!(data["region"], "us");

    // An explicit region beats the IP.
    let request = h
        .http
        .get(h.url("/goim/nodes/weighted?region=eu"))
        .header("X-Forwarded-For", "10.9.0.7");
    let data = h.send(request).await.ok().clone();
    assert_eq!(node_ids(&data), ["comet-a", "comet-b"]);

    // X-Real-IP when there is no X-Forwarded-For.
    let request = h
        .http
        .get(h.url("/goim/nodes/weighted"))
        .header("X-Real-IP", "10.1.1.1");
    let data = h.send(request).await.ok().clone();
    assert_eq!(node_ids(&data), ["comet-a", "comet-b"]);

    // An IP in no configured network: no region.
    let request = h
        .http
        .get(h.url("/goim/nodes/weighted"))
        .header("X-Forwarded-For", "192.0.2.1");
    let data = h.send(request).await.ok().clone();
    assert_eq!(node_ids(&data), ["comet-b", "comet-a"]);
    assert!(data.get("region").is_none(), "{data}");
}

/// Comets with distinct TCP and WebSocket hosts: `tcp` only, `ws` (public
/// domain set) and `wss` (no public domain, WSS only).
fn mixed_comets() -> Vec<(CometNode, Arc<FakeComet>)> {
    let node = |id: &str, weight: u32, tcp: &str, ws: &str, wss: &str, domain: &str| CometNode {
        id: id.into(),
        region: "eu".into(),
        weight,
        tcp: tcp.into(),
        ws: ws.into(),
        wss: wss.into(),
        domain: domain.into(),
        grpc: format!("10.0.0.{weight}:3109"),
        ..CometNode::default()
    };
    vec![
        (
            node("tcp", 30, "10.0.0.1:3101", "", "", ""),
            FakeComet::new(stats("tcp", 0, 0, 0)),
        ),
        (
            node(
                "ws",
                20,
                "10.0.0.2:3101",
                "10.0.0.2:3102",
                "10.0.0.2:3103",
                "ws-1.im.example",
            ),
            FakeComet::new(stats("ws", 0, 0, 0)),
        ),
        (
            node("wss", 10, "", "", "wss-1.internal:443", ""),
            FakeComet::new(stats("wss", 0, 0, 0)),
        ),
    ]
}

#[tokio::test]
async fn nodes_weighted_gives_web_clients_websocket_hosts() {
    let h = Setup::new()
        .nodes_domain("")
        .comets(mixed_comets())
        .start()
        .await;

    // A browser: the comets with a WebSocket listener, by public domain when
    // the comet has one, else by the host of its WebSocket address.
    let data = h
        .get("/goim/nodes/weighted?platform=web")
        .await
        .ok()
        .clone();
    assert_eq!(
        node_ids(&data),
        ["ws", "wss"],
        "a TCP-only comet is no use to a browser"
    );
    assert_eq!(data["nodes"], json!(["ws-1.im.example", "wss-1.internal"]));
    assert_eq!(
        (data["ws_port"].clone(), data["wss_port"].clone()),
        (json!(3102), json!(3103))
    );
    // Unset fields are left out, like goim: no domain configured, no region.
    for unset in ["domain", "region"] {
        assert!(data.get(unset).is_none(), "{unset} in {data}");
    }
    assert_eq!(data["instances"][0]["domain"], "ws-1.im.example");
    assert!(data["instances"][1].get("tcp").is_none(), "{data}");

    // An app: TCP hosts first, every comet it can reach.
    let data = h
        .get("/goim/nodes/weighted?platform=android")
        .await
        .ok()
        .clone();
    assert_eq!(node_ids(&data), ["tcp", "ws", "wss"]);
    assert_eq!(
        data["nodes"],
        json!(["10.0.0.1", "10.0.0.2", "wss-1.internal"])
    );
    assert_eq!(data["tcp_port"], 3101);
    assert!(
        data.get("ws_port").is_none() && data.get("wss_port").is_none(),
        "the first comet has TCP only: {data}"
    );
}

#[tokio::test]
async fn nodes_weighted_falls_back_to_the_default_domain_like_goim() {
    // No comet a browser can use: goim answers its default domain.
    let comets = mixed_comets().into_iter().take(1).collect();
    let h = Setup::new().comets(comets).start().await;
    let data = h
        .get("/goim/nodes/weighted?platform=web")
        .await
        .ok()
        .clone();
    assert_eq!(data["nodes"], json!(["im.example"]));
    assert_eq!(data["domain"], "im.example");
    assert!(node_ids(&data).is_empty(), "{data}");
}

#[tokio::test]
async fn nodes_weighted_falls_back_to_the_peer_address() {
    // The test client connects from 127.0.0.1.
    let h = Setup::new().region("127.0.0.0/8", "eu").start().await;
    let data = h.get("/goim/nodes/weighted").await.ok().clone();
    assert_eq!(data["region"], "eu");
    assert_eq!(node_ids(&data), ["comet-a", "comet-b"]);
}

#[tokio::test]
async fn nodes_instances_lists_the_registered_comets() {
    let h = Setup::new().start().await;
    let answer = h.get("/goim/nodes/instances").await;
    let data = answer.ok();
    let list = data
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {data}"));
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["id"], "comet-a");
    assert_eq!(list[0]["region"], "eu");
    assert_eq!(list[0]["weight"], 10);
    assert_eq!(list[0]["tcp"], "a.example:3101");
    assert_eq!(list[0]["ws"], "a.example:3102");
    assert_eq!(list[1]["id"], "comet-b");
    assert_eq!(list[1]["wss"], "b.example:4103");

    h.comets.refresh_load().await;
    let data = h.get("/goim/nodes/instances").await.ok().clone();
    assert_eq!(
        (data[0]["conn_count"].clone(), data[0]["ip_count"].clone()),
        (json!(5), json!(4))
    );
}

// ---------------------------------------------------------------------------
// Health, readiness, unknown paths
// ---------------------------------------------------------------------------

#[tokio::test]
async fn healthz_is_ok() {
    let h = Setup::new().start().await;
    assert_eq!(h.get("/healthz").await.ok(), "ok");
}

#[tokio::test]
async fn readyz_checks_the_router_and_the_queue() {
    let mut h = Setup::new().start().await;
    assert_eq!(h.get("/readyz").await.ok(), "ready");

    h.drop_consumer();
    let answer = h.get("/readyz").await;
    answer.error(503, -500, &["queue"]);
    let message = answer.body["message"].as_str().unwrap_or_default();
    assert!(
        !message.contains("router"),
        "the router is fine: {message:?}"
    );
    // Liveness does not depend on dependencies.
    assert_eq!(h.get("/healthz").await.ok(), "ok");
}

#[tokio::test]
async fn readyz_names_a_router_that_is_down() {
    let h = Setup::new().router(Arc::new(DownRouter)).start().await;
    h.get("/readyz").await.error(503, -500, &["router"]);
}

#[tokio::test]
async fn an_unknown_path_is_404_in_the_envelope() {
    let h = Setup::new().start().await;
    for path in [
        "/nope",
        "/goim/push",
        "/goim/push/keys/extra",
        "/goim/online/unknown",
    ] {
        let answer = h.get(path).await;
        assert_eq!(answer.status, 404, "{path}: {answer:?}");
        assert_eq!(answer.body["code"], -404, "{path}: {answer:?}");
        assert!(
            answer.body["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{path}: {answer:?}"
        );
        assert!(answer.body["data"].is_null(), "{path}: {answer:?}");
    }
}

#[tokio::test]
async fn a_wrong_method_is_405_in_the_envelope() {
    let h = Setup::new().start().await;
    // GET on a push endpoint, POST on a read endpoint, GET on an admin action.
    for answer in [
        h.get("/goim/push/keys?operation=1000&keys=k1").await,
        h.post("/goim/online/total", "").await,
        h.get("/admin/kick?mid=1").await,
    ] {
        assert_eq!(answer.status, 405, "{answer:?}");
        // Every answer keeps goim's envelope (the code is not fixed here:
        // -405 like the fallback's -404, or -400).
        assert!(
            answer.body["code"].as_i64().is_some_and(|c| c < 0),
            "no envelope: {answer:?}"
        );
        assert!(
            answer.body["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{answer:?}"
        );
        assert!(
            answer.body.get("data").is_some_and(Value::is_null),
            "{answer:?}"
        );
    }
}

#[tokio::test]
async fn the_server_stops_when_told() {
    let h = Setup::new().start().await;
    h.get("/healthz").await.ok();
    h.shutdown().await;
}
