//! The API's connections are bounded (issue #16, parts 3 and 4): silent,
//! slow-header, short-body and idle keep-alive connections are closed, no
//! more than `api.max_connections` are served at once, and shutdown ends
//! within `api.drain_timeout` whatever the clients hold. Timeouts are set to
//! 1 s and every wait is bounded at 10 s (a generous margin, not a timing
//! assertion).

mod support;

use std::time::Duration;

use serde_json::json;
use support::Setup;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

/// A bound on every wait for the server to act: 10 × the 1 s timeouts.
const BOUND: Duration = Duration::from_secs(10);

/// Long enough never to fire during a test.
const NEVER: Duration = Duration::from_secs(600);

/// Reads until the server closes the connection (EOF or reset) and returns
/// what it sent; fails if it is still open after [`BOUND`].
async fn closed_by_server(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let read = timeout(BOUND, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the server kept the connection open for {BOUND:?}; it sent {:?}",
        String::from_utf8_lossy(&got)
    );
    got
}

/// Reads one whole answer to `GET /healthz` (its JSON body ends the answer).
async fn read_health(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).ends_with('}') {
        let n = timeout(BOUND, stream.read(&mut buf))
            .await
            .expect("an answer within the bound")
            .expect("read");
        assert!(
            n > 0,
            "closed before answering: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

const HEALTH: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: rim.test\r\n\r\n";

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed() {
    // The issue: 300 connections that sent nothing stayed open past 65 s.
    let h = Setup::new()
        .api(|api| {
            api.header_read_timeout = Duration::from_secs(1);
            api.keep_alive_timeout = NEVER;
        })
        .start()
        .await;
    let mut silent = Vec::new();
    for _ in 0..300 {
        silent.push(TcpStream::connect(h.addr).await.expect("connect"));
    }
    for stream in &mut silent {
        let sent = closed_by_server(stream).await;
        // hyper may say 408 before closing; it must not answer anything else.
        let sent = String::from_utf8_lossy(&sent);
        assert!(
            sent.is_empty() || sent.starts_with("HTTP/1.1 408"),
            "{sent}"
        );
    }
    // The server still serves, and counted the closes (and the connection
    // of this request, open).
    assert_eq!(h.get("/healthz").await.ok(), &json!("ok"));
    let metrics = h.get("/metrics").await.raw;
    assert!(
        metrics.contains("rim_api_connections_closed_total{reason=\"header_timeout\"} 300"),
        "{metrics}"
    );
    assert!(metrics.contains("rim_api_connections 1"), "{metrics}");
}

#[tokio::test]
async fn headers_sent_one_byte_at_a_time_are_timed_out() {
    // The issue: headers sent one byte every 10 s were never timed out.
    // Here one byte every 200 ms against a 1 s header-read timeout: the
    // whole head would take 8 s.
    let h = Setup::new()
        .api(|api| {
            api.header_read_timeout = Duration::from_secs(1);
            api.keep_alive_timeout = NEVER;
        })
        .start()
        .await;
    let mut stream = TcpStream::connect(h.addr).await.expect("connect");
    let head = b"POST /goim/push/all?operation=1000 HTTP/1.1\r\nHost: rim.test\r\n\r\n";
    let started = Instant::now();
    let mut refused = false;
    for byte in head.iter().take(40) {
        if stream.write_all(&[*byte]).await.is_err() {
            refused = true;
            break;
        }
        let mut buf = [0u8; 256];
        match timeout(Duration::from_millis(200), stream.read(&mut buf)).await {
            Err(_) => {}
            // Closed (possibly after a 408): what the test waits for.
            Ok(_) => {
                refused = true;
                break;
            }
        }
        assert!(
            started.elapsed() < BOUND,
            "still reading headers after {BOUND:?}"
        );
    }
    if !refused {
        closed_by_server(&mut stream).await;
    }
}

#[tokio::test]
async fn a_body_shorter_than_its_content_length_times_out() {
    // The issue: a 10-byte Content-Length with 5 bytes sent was never timed out.
    let mut h = Setup::new()
        .api(|api| {
            api.body_read_timeout = Duration::from_secs(1);
            api.header_read_timeout = NEVER;
            api.keep_alive_timeout = NEVER;
        })
        .start()
        .await;
    h.connect("comet-a", 1, "k1").await;
    let mut stream = TcpStream::connect(h.addr).await.expect("connect");
    stream
        .write_all(
            b"POST /goim/push/keys?operation=1000&keys=k1 HTTP/1.1\r\nHost: rim.test\r\nContent-Length: 10\r\n\r\n12345",
        )
        .await
        .expect("write");
    let answer = String::from_utf8_lossy(&closed_by_server(&mut stream).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("api.body_read_timeout"), "{answer}");
    assert!(answer.contains("\"code\":-400"), "{answer}");
    assert!(
        h.drain().await.is_empty(),
        "a cut body must enqueue nothing"
    );
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let h = Setup::new()
        .api(|api| {
            api.keep_alive_timeout = Duration::from_secs(1);
            api.header_read_timeout = NEVER;
        })
        .start()
        .await;
    let mut stream = TcpStream::connect(h.addr).await.expect("connect");
    stream.write_all(HEALTH).await.expect("write");
    let answer = read_health(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Kept alive, then idle: closed without a word.
    let after = closed_by_server(&mut stream).await;
    assert!(after.is_empty(), "{:?}", String::from_utf8_lossy(&after));
    let metrics = h.get("/metrics").await.raw;
    assert!(
        metrics.contains("rim_api_connections_closed_total{reason=\"idle\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn between_requests_the_keep_alive_timeout_applies_not_the_header_timeout() {
    let h = Setup::new()
        .api(|api| {
            api.header_read_timeout = Duration::from_secs(1);
            api.keep_alive_timeout = NEVER;
        })
        .start()
        .await;
    let mut stream = TcpStream::connect(h.addr).await.expect("connect");
    stream.write_all(HEALTH).await.expect("write");
    assert!(read_health(&mut stream).await.starts_with("HTTP/1.1 200"));
    // Idle for twice the header timeout: still open.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stream.write_all(HEALTH).await.expect("write");
    assert!(read_health(&mut stream).await.starts_with("HTTP/1.1 200"));
    // A later head that does not complete is timed out from its first byte.
    stream.write_all(b"GET /heal").await.expect("write");
    closed_by_server(&mut stream).await;
}

#[tokio::test]
async fn no_more_than_max_connections_are_served_at_once() {
    let h = Setup::new()
        .api(|api| {
            api.max_connections = 2;
            api.header_read_timeout = NEVER;
            api.keep_alive_timeout = NEVER;
        })
        .start()
        .await;
    // Two connections served (each answered once) and kept alive.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(h.addr).await.expect("connect");
        stream.write_all(HEALTH).await.expect("write");
        assert!(read_health(&mut stream).await.starts_with("HTTP/1.1 200"));
        held.push(stream);
    }
    // A third waits in the backlog: connected by the kernel, not answered.
    let mut third = TcpStream::connect(h.addr).await.expect("connect");
    third.write_all(HEALTH).await.expect("write");
    let mut buf = [0u8; 256];
    let early = timeout(Duration::from_secs(1), third.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "a third connection was served over api.max_connections = 2: {early:?}"
    );
    // One held connection closes: the third is served.
    drop(held.pop());
    let answer = read_health(&mut third).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn shutdown_ends_within_the_drain_timeout_whatever_clients_hold() {
    // The issue: with 3 connections holding a partial request, shutdown
    // waited until the clients left.
    let h = Setup::new()
        .api(|api| {
            api.drain_timeout = Duration::from_secs(1);
            api.header_read_timeout = NEVER;
            api.body_read_timeout = NEVER;
            api.keep_alive_timeout = NEVER;
        })
        .start()
        .await;
    h.connect("comet-a", 1, "k1").await;
    let partial: [&[u8]; 3] = [
        b"GET /healthz HTTP/1.1\r\nHost: rim",
        b"POST /goim/push/keys?operation=1000&keys=k1 HTTP/1.1\r\nHost: rim.test\r\nContent-Length: 10\r\n\r\n12345",
        b"POST /goim/push/all?op",
    ];
    let mut held = Vec::new();
    for request in partial {
        let mut stream = TcpStream::connect(h.addr).await.expect("connect");
        stream.write_all(request).await.expect("write");
        held.push(stream);
    }
    // Let the server read what was sent, so every connection is mid-request.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopped = timeout(BOUND, h.shutdown()).await;
    assert!(stopped.is_ok(), "shutdown still waiting after {BOUND:?}");
    for stream in &mut held {
        closed_by_server(stream).await;
    }
}
