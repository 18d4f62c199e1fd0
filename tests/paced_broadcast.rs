//! A paced broadcast holds nothing else back (issue #16, 5): with 200
//! clients, `POST /goim/push/all?operation=1000&speed=1` takes minutes to
//! reach everyone, and a push to one key sent right after it must still
//! arrive at once — before, it waited behind the broadcast in the job's one
//! queue per comet (30 s and more).

mod support;

use std::time::Duration;

use rim_client::{AuthToken, Client};
use support::{post_ok, start_standalone};

const CLIENTS: usize = 200;

fn token(mid: i64, key: &str) -> AuthToken {
    AuthToken {
        mid,
        key: key.into(),
        room_id: "live://paced".into(),
        platform: "test".into(),
        accepts: vec![1000],
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paced_broadcast_does_not_hold_a_push_back() {
    let mut rim = start_standalone("paced-test", &[]);
    let tcp = rim.addr_after("accepting clients listener=\"tcp\"");
    let api = rim.addr_after("http api serving");

    let mut crowd = Vec::with_capacity(CLIENTS);
    for i in 0..CLIENTS {
        let mut client = Client::connect_tcp(tcp).await.expect("connect");
        client
            .auth(&token(i as i64 + 1, &format!("crowd-{i}")))
            .await
            .expect("auth");
        crowd.push(client);
    }
    let mut target = Client::connect_tcp(tcp).await.expect("connect");
    target.auth(&token(10_000, "target")).await.expect("auth");

    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    // 201 deliveries at 1 per second: over three minutes to reach everyone.
    post_ok(
        &http,
        &format!("http://{api}/goim/push/all?operation=1000&speed=1"),
        "slowly, to everyone",
    )
    .await;
    post_ok(
        &http,
        &format!("http://{api}/goim/push/keys?operation=1000&keys=target"),
        "right after",
    )
    .await;
    // The target may get the broadcast first if its bucket comes early.
    let arrived = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let frame = target
                .next_frame()
                .await
                .expect("read")
                .expect("connection open");
            if &frame.body[..] == b"right after" {
                return;
            }
            assert_eq!(&frame.body[..], b"slowly, to everyone");
        }
    })
    .await;
    assert!(
        arrived.is_ok(),
        "the push waited behind the paced broadcast; log:\n{}",
        rim.log()
    );
    // A draining comet stops pacing: shutdown is not held by the broadcast.
    rim.stop();
    drop(crowd);
}
