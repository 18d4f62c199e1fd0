//! Presence events end to end: `rim standalone` as a process, clients over
//! TCP, a webhook served by the test, and the presence query.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use rim_client::{AuthToken, Client};
use serde_json::Value;
use support::{get_json, start_standalone};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// Bound on waiting for one event.
const WAIT: Duration = Duration::from_secs(20);

/// Serves POSTs on a loopback port, answering 204 and handing each JSON
/// body over; returns the webhook's URL and the bodies.
async fn webhook() -> (String, mpsc::UnboundedReceiver<Value>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let events_tx = events_tx.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(socket);
                // One request after another on a kept-alive connection.
                loop {
                    let mut length = 0;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let line = line.trim_end();
                        if line.is_empty() {
                            break;
                        }
                        if let Some((name, value)) = line.split_once(':')
                            && name.eq_ignore_ascii_case("content-length")
                        {
                            length = value.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).await.unwrap();
                    let _ = events_tx.send(serde_json::from_slice(&body).unwrap());
                    let answer = b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n";
                    if reader.get_mut().write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (format!("http://{addr}/presence"), events_rx)
}

async fn next(events_rx: &mut mpsc::UnboundedReceiver<Value>) -> Value {
    tokio::time::timeout(WAIT, events_rx.recv())
        .await
        .expect("a presence event within the wait")
        .expect("webhook running")
}

async fn device(tcp: SocketAddr, mid: i64, key: &str) -> Client {
    let mut client = Client::connect_tcp(tcp).await.unwrap();
    let token = AuthToken {
        mid,
        key: key.into(),
        room_id: String::new(),
        platform: "android".into(),
        accepts: vec![1000],
    };
    client.auth(&token).await.unwrap();
    client
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_goes_online_and_offline_once_through_a_real_comet() {
    let (url, mut events_rx) = webhook().await;
    let mut rim = start_standalone(
        "presence-test",
        &[
            ("RIM_LOGIC__PRESENCE_WEBHOOK", url.as_str()),
            ("RIM_LOGIC__PRESENCE_DEBOUNCE", "300ms"),
        ],
    );
    let tcp = rim.addr_after("accepting clients listener=\"tcp\"");
    let api = rim.addr_after("http api serving");

    let phone = device(tcp, 7, "phone").await;
    let online = next(&mut events_rx).await;
    assert_eq!(
        (&online["mid"], &online["state"], &online["seq"]),
        (&Value::from(7), &Value::from("online"), &Value::from(1))
    );
    let laptop = device(tcp, 7, "laptop").await;

    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let presence = get_json(&http, &format!("http://{api}/im/v1/users/7/presence")).await;
    let data = &presence["data"];
    assert_eq!(data["online"], true, "{presence}");
    let mut keys: Vec<&str> = data["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            assert_eq!(d["platform"], "android", "{d}");
            assert_eq!(d["comet"], "presence-test", "{d}");
            d["key"].as_str().unwrap()
        })
        .collect();
    keys.sort();
    assert_eq!(keys, ["laptop", "phone"]);

    // The comet reports each close to logic; offline comes after the last.
    drop(phone);
    drop(laptop);
    let offline = next(&mut events_rx).await;
    assert_eq!(
        (&offline["mid"], &offline["state"], &offline["seq"]),
        (&Value::from(7), &Value::from("offline"), &Value::from(2))
    );
    assert_eq!(offline["devices"], 0);
    let presence = get_json(&http, &format!("http://{api}/im/v1/users/7/presence")).await;
    assert_eq!(presence["data"]["devices"], serde_json::json!([]));
    assert!(presence["data"]["last_seen"].as_i64().unwrap() > 0);

    // A marker user's pair arrives next: user 7 had exactly one of each.
    let marker = device(tcp, 8, "marker").await;
    assert_eq!(next(&mut events_rx).await["mid"], 8);
    drop(marker);
    let last = next(&mut events_rx).await;
    assert_eq!(
        (&last["mid"], &last["state"]),
        (&Value::from(8), &Value::from("offline"))
    );
    rim.stop();
}
