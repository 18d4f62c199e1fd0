//! `rim standalone` as a process: clients over TCP and WebSocket, every push
//! endpoint through the in-process queue and job, exact recipients.

mod support;

use std::time::Duration;

use bytes::Bytes;
use rim_client::{AuthToken, Client};
use rim_proto::Op;
use support::{get_json, next_push, post_ok, start_standalone};

const END: &str = "end-of-test";

#[tokio::test(flavor = "multi_thread")]
async fn standalone_delivers_every_kind_of_push_to_exactly_its_recipients() {
    let mut rim = start_standalone(
        "standalone-test",
        &[("RIM_COMET__ROOM_REPORT_INTERVAL", "200ms")],
    );
    let tcp = rim.addr_after("accepting clients listener=\"tcp\"");
    let ws = rim.addr_after("accepting clients listener=\"ws\"");
    let api = rim.addr_after("http api serving");

    let token = |mid: i64, key: &str, room: &str| AuthToken {
        mid,
        key: key.into(),
        room_id: room.into(),
        platform: "test".into(),
        accepts: vec![1000],
    };
    // User 1 has two devices (a over TCP, c over WebSocket); user 2 one (b).
    let mut a = Client::connect_tcp(tcp).await.unwrap();
    a.auth(&token(1, "a", "live://1000")).await.unwrap();
    let mut b = Client::connect_ws(&format!("ws://{ws}/sub")).await.unwrap();
    b.auth(&token(2, "b", "live://1000")).await.unwrap();
    let mut c = Client::connect_ws(&format!("ws://{ws}/sub")).await.unwrap();
    c.auth(&token(1, "c", "live://2000")).await.unwrap();

    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let answer = post_ok(
        &http,
        &format!("http://{api}/goim/push/keys?operation=1000&keys=a"),
        "to-a",
    )
    .await;
    assert_eq!(answer["data"]["connections"], 1);
    assert_eq!(next_push(&mut a).await, "to-a");

    let answer = post_ok(
        &http,
        &format!("http://{api}/goim/push/mids?operation=1000&mids=1"),
        "to-user-1",
    )
    .await;
    assert_eq!(answer["data"]["connections"], 2);
    assert_eq!(next_push(&mut a).await, "to-user-1");
    assert_eq!(next_push(&mut c).await, "to-user-1");

    post_ok(
        &http,
        &format!("http://{api}/goim/push/room?operation=1000&type=live&room=1000"),
        "to-room",
    )
    .await;
    assert_eq!(next_push(&mut a).await, "to-room");
    assert_eq!(next_push(&mut b).await, "to-room");

    post_ok(
        &http,
        &format!("http://{api}/goim/push/all?operation=1000"),
        "to-all",
    )
    .await;
    for client in [&mut a, &mut b, &mut c] {
        assert_eq!(next_push(client).await, "to-all");
    }

    // Room counts reach the API and heartbeats.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let top = get_json(
            &http,
            &format!("http://{api}/goim/online/top?type=live&limit=5"),
        )
        .await;
        if top["data"]
            == serde_json::json!([{"room_id": "1000", "count": 2}, {"room_id": "2000", "count": 1}])
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "online top never settled: {top}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(a.heartbeat().await.unwrap(), 2);

    // Nothing else arrived anywhere: the next frame each client sees is the end marker.
    post_ok(
        &http,
        &format!("http://{api}/goim/push/all?operation=1000"),
        END,
    )
    .await;
    for client in [&mut a, &mut b, &mut c] {
        assert_eq!(next_push(client).await, END);
    }
    // An upstream frame is acknowledged (logged by logic without a webhook).
    a.send_upstream(Op(2000), Bytes::from("up")).await.unwrap();

    rim.stop();
}

/// Auth policy `none` (standalone's default, for the demo) says at startup
/// what it allows and how to switch (issue #16, 11).
#[tokio::test(flavor = "multi_thread")]
async fn auth_policy_none_is_announced_with_what_it_allows() {
    let mut rim = start_standalone("auth-none-test", &[]);
    rim.addr_after("http api serving");
    let log = rim.log();
    let warning = log
        .lines()
        .find(|l| l.contains("logic.auth.policy is none"))
        .unwrap_or_else(|| panic!("no auth policy warning in:\n{log}"));
    assert!(warning.contains("WARN"), "{warning}");
    for words in [
        "any client may claim any user id and any connection key",
        "take over another client's connection",
        "logic.auth.policy = \"jwt\"",
    ] {
        assert!(warning.contains(words), "{words:?} missing in {warning}");
    }
    rim.stop();
}
