//! The HTTP API of `rim standalone` as a process, hardened (issue #16):
//! a push with an op the client protocol reserves reaches no client, and
//! SIGTERM ends the process within its drain deadline whatever HTTP clients
//! hold.

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use rim_client::{AuthToken, Client};
use support::{Proc, next_push, post_ok};

fn standalone(extra: &[(&'static str, &str)]) -> Proc {
    support::start_standalone("http-api-test", extra)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_push_with_a_reserved_op_reaches_no_client_and_its_stream_stays_usable() {
    let mut rim = standalone(&[]);
    let tcp = rim.addr_after("accepting clients listener=\"tcp\"");
    let api = rim.addr_after("http api serving");

    let mut client = Client::connect_tcp(tcp).await.unwrap();
    client
        .auth(&AuthToken {
            mid: 7,
            key: "a".into(),
            room_id: "live://1".into(),
            platform: "test".into(),
            accepts: vec![1000],
        })
        .await
        .unwrap();

    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    // The input: op 9 with a body that looks like a frame's start.
    let body: &[u8] = b"\x00\x00\x00\x05garbage";
    for op in [9, 0, 2, 3, 7, 8, -1, 17, 18, 27] {
        for path in [
            format!("/goim/push/mids?operation={op}&mids=7"),
            format!("/goim/push/keys?operation={op}&keys=a"),
            format!("/goim/push/room?operation={op}&type=live&room=1"),
            format!("/goim/push/all?operation={op}"),
            format!("/admin/room/broadcast?room=live://1&operation={op}"),
        ] {
            let answer = http
                .post(format!("http://{api}{path}"))
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 400, "POST {path}");
            let answer: serde_json::Value = answer.json().await.unwrap();
            assert_eq!(answer["code"], -400, "POST {path}: {answer}");
            assert!(
                answer["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("\"operation\"")),
                "POST {path}: {answer}"
            );
        }
    }

    // Nothing reached the client: the next frame it reads is the next
    // business push, and its stream still works both ways.
    post_ok(
        &http,
        &format!("http://{api}/goim/push/keys?operation=1000&keys=a"),
        "after",
    )
    .await;
    assert_eq!(next_push(&mut client).await, "after");
    tokio::time::timeout(Duration::from_secs(30), client.heartbeat())
        .await
        .expect("a heartbeat reply within 30 s")
        .expect("the stream is usable");
    rim.stop();
}

#[test]
fn sigterm_ends_the_process_within_the_drain_deadline_whatever_http_clients_hold() {
    // The issue: with 3 connections holding a partial HTTP request, the
    // process stayed alive 40-283 s after SIGTERM. Timeouts that would end
    // those connections on their own are set far beyond the test.
    let mut rim = standalone(&[
        ("RIM_API__DRAIN_TIMEOUT", "1s"),
        ("RIM_API__HEADER_READ_TIMEOUT", "600s"),
        ("RIM_API__BODY_READ_TIMEOUT", "600s"),
        ("RIM_API__KEEP_ALIVE_TIMEOUT", "600s"),
    ]);
    let api = rim.addr_after("http api serving");
    let partial: [&[u8]; 3] = [
        b"GET /healthz HTTP/1.1\r\nHost: rim",
        b"POST /goim/push/all?operation=1000 HTTP/1.1\r\nHost: rim.test\r\nContent-Length: 10\r\n\r\n12345",
        b"POST /goim/push/keys?oper",
    ];
    let mut held = Vec::new();
    for request in partial {
        let mut stream = TcpStream::connect(api).expect("connect");
        stream.write_all(request).expect("write");
        held.push(stream);
    }
    // Let the server read them, so every connection is mid-request.
    std::thread::sleep(Duration::from_millis(300));
    // Drain deadline 1 s (+ the comet's 100 ms drain window, + up to 5 s
    // for leftover tasks): 15 s is a generous bound.
    rim.stop_within(Duration::from_secs(15));
    drop(held);
}
