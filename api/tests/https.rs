//! The HTTP API over TLS (`api.tls_cert`, `api.tls_key`), with a
//! certificate generated in the test: a client trusting its CA gets answers
//! over HTTPS; a plaintext request gets no HTTP answer, and a client that
//! does not trust the certificate does not complete the handshake.

mod support;

use std::time::Duration;

use rim_testkit::{TestCa, read_to_close};
use support::Setup;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::rustls::pki_types::ServerName;

/// A bound on every exchange with the server.
const BOUND: Duration = Duration::from_secs(10);

const REQUEST: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";

#[tokio::test]
async fn the_api_answers_over_tls_and_refuses_plaintext_and_untrusting_clients() {
    let ca = TestCa::new("api ca");
    let files = ca.issue("api");
    let api = Setup::new()
        .api(|config| {
            config.tls_cert = Some(files.cert.clone());
            config.tls_key = Some(files.key.clone());
        })
        .start()
        .await;

    // HTTPS with the CA: an answer.
    let tcp = TcpStream::connect(api.addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = timeout(BOUND, ca.client().connect(name.clone(), tcp))
        .await
        .expect("handshake in time")
        .expect("the handshake succeeds with the CA");
    tls.write_all(REQUEST).await.unwrap();
    let answer = read_to_close(&mut tls, BOUND).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"ok\""), "{answer}");

    // Plain HTTP on the same port: no HTTP answer, the connection is closed.
    let mut plain = TcpStream::connect(api.addr).await.unwrap();
    plain.write_all(REQUEST).await.unwrap();
    let answer = read_to_close(&mut plain, BOUND).await;
    assert!(
        !answer.contains("HTTP/1.1"),
        "plaintext got an answer: {answer}"
    );

    // A client trusting another CA refuses the server's certificate.
    let other = TestCa::new("other ca");
    let tcp = TcpStream::connect(api.addr).await.unwrap();
    let refused = timeout(BOUND, other.client().connect(name, tcp))
        .await
        .expect("handshake ends in time");
    assert!(
        refused.is_err(),
        "a certificate from an unknown CA was accepted"
    );

    // The failed handshakes are counted (the server may count a moment
    // after the client saw the close: look again, a bounded number of times).
    let mut counted = 0.0;
    for _ in 0..100 {
        let tcp = TcpStream::connect(api.addr).await.unwrap();
        let mut tls = ca
            .client()
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        tls.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let metrics = read_to_close(&mut tls, BOUND).await;
        counted = metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix("rim_api_connections_closed_total{reason=\"tls_handshake\"} ")
            })
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if counted >= 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        counted >= 2.0,
        "plaintext and untrusting handshakes counted: {counted}"
    );
}
