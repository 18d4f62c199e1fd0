//! `rim standalone` started with TLS (issue #15, part 5), certificates
//! generated here: the HTTP API answers over HTTPS and not in plaintext,
//! and the comet gRPC with mutual TLS answers a caller with a certificate
//! from `node.tls_ca` and refuses one without.

mod support;

use std::time::Duration;

use rim_proto::api::{CometApi, RemoteComet};
use rim_testkit::{TestCa, read_to_close};
use rim_tls::{GrpcTls, GrpcTlsFiles};
use support::start_standalone;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::rustls::pki_types::ServerName;

const BOUND: Duration = Duration::from_secs(20);

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";

#[tokio::test]
async fn standalone_serves_https_and_mutual_tls_grpc() {
    let ca = TestCa::new("standalone ca");
    let api = ca.issue("api");
    let node = ca.issue("node");
    let path = |p: &std::path::Path| p.display().to_string();
    let mut rim = start_standalone(
        "tls-test",
        &[
            ("RIM_API__TLS_CERT", &path(&api.cert)),
            ("RIM_API__TLS_KEY", &path(&api.key)),
            ("RIM_NODE__TLS_CERT", &path(&node.cert)),
            ("RIM_NODE__TLS_KEY", &path(&node.key)),
            ("RIM_NODE__TLS_CA", &path(&ca.ca())),
            ("RIM_NODE__TLS_CLIENT_AUTH", "true"),
        ],
    );
    let http = rim.addr_after("http api serving");
    let grpc = rim.addr_after("grpc=Some(").to_string();

    // HTTPS with the CA answers.
    let tcp = TcpStream::connect(http).await.unwrap();
    let mut tls = timeout(
        BOUND,
        ca.client()
            .connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .expect("handshake in time")
    .expect("the API's certificate is trusted through the CA");
    tls.write_all(HEALTHZ).await.unwrap();
    let answer = read_to_close(&mut tls, BOUND).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // Plain HTTP gets no answer.
    let mut plain = TcpStream::connect(http).await.unwrap();
    plain.write_all(HEALTHZ).await.unwrap();
    let answer = read_to_close(&mut plain, BOUND).await;
    assert!(!answer.contains("HTTP/1.1"), "{answer}");

    // The comet gRPC: a caller with a certificate from the CA gets through.
    let caller = ca.issue("caller");
    let member = GrpcTls::load(&GrpcTlsFiles {
        cert: Some(caller.cert),
        key: Some(caller.key),
        ca: Some(ca.ca()),
        client_auth: false,
    })
    .unwrap();
    let comet = RemoteComet::connect_lazy_with_tls(&grpc, &member).unwrap();
    let stats = timeout(BOUND, comet.stats())
        .await
        .expect("in time")
        .unwrap();
    assert_eq!(stats.server_id, "tls-test");
    // The gRPC server's graceful stop waits for its connections to close,
    // and `rim.stop()` blocks this test's runtime, which would keep the
    // client from answering the server's GOAWAY: close the clients first.
    drop(comet);

    // Without a certificate: refused.
    let outsider = GrpcTls::load(&GrpcTlsFiles {
        ca: Some(ca.ca()),
        ..GrpcTlsFiles::default()
    })
    .unwrap();
    let comet = RemoteComet::connect_lazy_with_tls(&grpc, &outsider).unwrap();
    let refused = timeout(BOUND, comet.stats()).await.expect("in time");
    assert!(
        refused.is_err(),
        "a caller without a certificate got through"
    );
    drop(comet);
    rim.stop();
}
