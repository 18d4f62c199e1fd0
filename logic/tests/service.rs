//! The logic service as comets see it (the local `LogicApi`): presence in
//! the router, key assignment, leases, room totals, upstream frames.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::http::StatusCode;
use axum::routing::post;
use bytes::Bytes;
use rim_config::{LogicConfig, RouterBackend, RouterConfig};
use rim_logic::{Comets, HttpClient, Logic};
use rim_proto::api::{LogicApi, RpcError};
use rim_proto::pb::frame::v1::Proto;
use rim_proto::pb::logic::v1 as pb;
use rim_router::Router;

async fn logic_with(config: LogicConfig) -> (Logic, Arc<dyn Router>) {
    let router = rim_router::connect(&RouterConfig {
        backend: RouterBackend::Memory,
        online_max_age: Duration::from_secs(30),
        ..RouterConfig::default()
    })
    .await
    .unwrap();
    let logic = Logic::new(
        &config,
        Arc::clone(&router),
        Arc::new(Comets::new()),
        HttpClient::new().unwrap(),
    );
    (logic, router)
}

fn connect(server: &str, token: &str) -> pb::ConnectRequest {
    pb::ConnectRequest {
        server: server.into(),
        cookie: String::new(),
        token: Bytes::copy_from_slice(token.as_bytes()),
        client_ip: "127.0.0.1".into(),
    }
}

#[tokio::test]
async fn connect_records_presence_and_returns_the_session_terms() {
    let (logic, router) = logic_with(LogicConfig::default()).await;
    let reply = logic
        .connect(connect(
            "comet-a",
            r#"{"mid":42,"key":"k1","room_id":"live://1","accepts":[1000,1001]}"#,
        ))
        .await
        .unwrap();
    assert_eq!(
        (reply.mid, reply.key.as_str(), reply.room_id.as_str()),
        (42, "k1", "live://1")
    );
    assert_eq!(reply.accepts, vec![1000, 1001]);
    assert_eq!((reply.heartbeat_ms, reply.heartbeat_max), (240_000, 2));
    assert_eq!(
        router.servers_of_keys(&["k1".into()]).await.unwrap(),
        vec![Some("comet-a".to_string())]
    );
    let by_server = router.keys_by_server(&[42]).await.unwrap();
    assert_eq!(
        by_server,
        HashMap::from([("comet-a".to_string(), vec!["k1".to_string()])])
    );
}

#[tokio::test]
async fn a_client_without_a_key_gets_a_fresh_uuid() {
    let (logic, _router) = logic_with(LogicConfig::default()).await;
    let a = logic.connect(connect("c", r#"{"mid":1}"#)).await.unwrap();
    let b = logic.connect(connect("c", r#"{"mid":1}"#)).await.unwrap();
    assert_ne!(a.key, b.key);
    assert!(uuid::Uuid::parse_str(&a.key).is_ok(), "{}", a.key);
}

#[tokio::test]
async fn a_refused_token_is_unauthenticated_and_records_nothing() {
    let (logic, router) = logic_with(LogicConfig::default()).await;
    let err = logic.connect(connect("c", "not json")).await.unwrap_err();
    assert!(matches!(err, RpcError::Unauthenticated(_)), "{err}");
    assert!(router.keys_by_server(&[1]).await.unwrap().is_empty());
    let err = logic
        .connect(connect("", r#"{"mid":1}"#))
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::InvalidArgument(_)), "{err}");
}

#[tokio::test]
async fn disconnect_removes_only_the_owners_session() {
    let (logic, router) = logic_with(LogicConfig::default()).await;
    logic
        .connect(connect("old", r#"{"mid":7,"key":"k"}"#))
        .await
        .unwrap();
    // The key reconnected to another comet before the old comet reported.
    logic
        .connect(connect("new", r#"{"mid":7,"key":"k"}"#))
        .await
        .unwrap();
    let stale = logic
        .disconnect(pb::DisconnectRequest {
            mid: 7,
            key: "k".into(),
            server: "old".into(),
        })
        .await
        .unwrap();
    assert!(!stale);
    assert_eq!(
        router.servers_of_keys(&["k".into()]).await.unwrap(),
        vec![Some("new".to_string())]
    );
    let known = logic
        .disconnect(pb::DisconnectRequest {
            mid: 7,
            key: "k".into(),
            server: "new".into(),
        })
        .await
        .unwrap();
    assert!(known);
    assert_eq!(
        router.servers_of_keys(&["k".into()]).await.unwrap(),
        vec![None]
    );
}

#[tokio::test]
async fn heartbeat_renews_the_lease_and_restores_an_expired_entry() {
    let config = LogicConfig {
        heartbeat: Duration::from_millis(100),
        lease: Duration::from_millis(300),
        ..LogicConfig::default()
    };
    let (logic, router) = logic_with(config).await;
    logic
        .connect(connect("c", r#"{"mid":3,"key":"hb"}"#))
        .await
        .unwrap();
    let beat = || pb::HeartbeatRequest {
        mid: 3,
        key: "hb".into(),
        server: "c".into(),
        groups: true,
    };
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let reply = logic.heartbeat(beat()).await.unwrap();
        assert!(!reply.groups_known, "no IM here: no big groups to tell");
    }
    assert_eq!(
        router.servers_of_keys(&["hb".into()]).await.unwrap(),
        vec![Some("c".to_string())]
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        router.servers_of_keys(&["hb".into()]).await.unwrap(),
        vec![None],
        "expired"
    );
    logic.heartbeat(beat()).await.unwrap();
    assert_eq!(
        router.servers_of_keys(&["hb".into()]).await.unwrap(),
        vec![Some("c".to_string())],
        "restored"
    );
}

#[tokio::test]
async fn renew_online_returns_cluster_wide_room_totals() {
    let (logic, _router) = logic_with(LogicConfig::default()).await;
    let report = |server: &str, rooms: &[(&str, i32)]| pb::RenewOnlineRequest {
        server: server.into(),
        room_count: rooms.iter().map(|(r, n)| (r.to_string(), *n)).collect(),
    };
    logic
        .renew_online(report("a", &[("live://1", 3), ("live://2", 1)]))
        .await
        .unwrap();
    let totals = logic
        .renew_online(report("b", &[("live://1", 4)]))
        .await
        .unwrap()
        .all_room_count;
    assert_eq!(
        totals,
        HashMap::from([("live://1".to_string(), 7), ("live://2".to_string(), 1)])
    );
    // A comet's new report replaces its old one.
    let totals = logic
        .renew_online(report("a", &[]))
        .await
        .unwrap()
        .all_room_count;
    assert_eq!(totals, HashMap::from([("live://1".to_string(), 4)]));
}

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<serde_json::Value>>>);

async fn webhook_server(status: StatusCode) -> (String, Seen) {
    let seen = Seen::default();
    let app = axum::Router::new()
        .route(
            "/upstream",
            post(
                move |axum::extract::State(seen): axum::extract::State<Seen>,
                      Json(body): Json<serde_json::Value>| async move {
                    seen.0.lock().unwrap().push(body);
                    status
                },
            ),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/upstream", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

fn upstream(body: &'static [u8]) -> pb::ReceiveRequest {
    pb::ReceiveRequest {
        mid: 9,
        key: "up".into(),
        proto: Some(Proto {
            ver: 1,
            op: 2000,
            seq: 5,
            body: Bytes::from_static(body),
        }),
    }
}

#[tokio::test]
async fn upstream_frames_are_posted_to_the_receive_webhook() {
    let (url, seen) = webhook_server(StatusCode::OK).await;
    let (logic, _router) = logic_with(LogicConfig {
        receive_webhook: url,
        ..LogicConfig::default()
    })
    .await;
    logic.receive(upstream(b"hello")).await.unwrap();
    let seen = seen.0.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["mid"], 9);
    assert_eq!(seen[0]["key"], "up");
    assert_eq!(seen[0]["op"], 2000);
    assert_eq!(seen[0]["body"], "aGVsbG8=");
}

#[tokio::test]
async fn a_failing_receive_webhook_is_reported() {
    let (url, _seen) = webhook_server(StatusCode::INTERNAL_SERVER_ERROR).await;
    let (logic, _router) = logic_with(LogicConfig {
        receive_webhook: url,
        ..LogicConfig::default()
    })
    .await;
    let err = logic.receive(upstream(b"x")).await.unwrap_err();
    assert!(matches!(err, RpcError::Unavailable(_)), "{err}");
    // Without a webhook, frames are logged and accepted.
    let (logic, _router) = logic_with(LogicConfig::default()).await;
    logic.receive(upstream(b"x")).await.unwrap();
}
