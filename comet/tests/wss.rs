//! WSS end to end: a self-signed certificate made at test time, a comet
//! serving WebSocket over TLS, and a rustls client speaking goim frames.

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use rim_config::CometConfig;
use rim_proto::{Frame, FrameCodec, Op};
use support::*;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(5);

type Wss = WebSocketStream<TlsStream<TcpStream>>;

/// A self-signed certificate for `localhost` and 127.0.0.1, as PEM files.
struct Tls {
    _dir: TempDir,
    cert: PathBuf,
    key: PathBuf,
    der: CertificateDer<'static>,
}

fn self_signed() -> Tls {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("certificate generated");
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    Tls {
        _dir: dir,
        cert,
        key,
        der: certified.cert.der().clone(),
    }
}

fn tls_config(tls: &Tls) -> CometConfig {
    CometConfig {
        tls_cert: Some(tls.cert.clone()),
        tls_key: Some(tls.key.clone()),
        ..test_config()
    }
}

/// Starts a comet with one WSS listener on 127.0.0.1:0; returns its address.
async fn start_wss(config: CometConfig) -> (TestComet, std::net::SocketAddr) {
    let wss = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = wss.local_addr().unwrap();
    (
        start_with(config, ScriptedLogic::default(), vec![wss]).await,
        addr,
    )
}

/// TCP, then TLS trusting only `tls`'s certificate, then the WebSocket
/// upgrade on `/sub`.
async fn connect_wss(addr: std::net::SocketAddr, tls: &Tls) -> Wss {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(tls.der.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = TlsConnector::from(Arc::new(config));
    let tcp = within(WAIT, TcpStream::connect(addr)).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let stream = within(WAIT, connector.connect(name, tcp))
        .await
        .expect("tls handshake succeeds");
    let (ws, response) = within(
        WAIT,
        tokio_tungstenite::client_async("wss://localhost/sub", stream),
    )
    .await
    .expect("websocket upgrade succeeds");
    assert_eq!(response.status(), 101);
    ws
}

async fn send(ws: &mut Wss, frame: Frame) {
    within(WAIT, ws.send(Message::Binary(frame.to_bytes().unwrap())))
        .await
        .expect("send succeeds");
}

/// Returns the next goim frame (failing after 5 s or on anything but a
/// binary message).
async fn recv(ws: &mut Wss) -> Frame {
    loop {
        let msg = within(WAIT, ws.next())
            .await
            .expect("connection open")
            .expect("read succeeds");
        match msg {
            Message::Binary(bytes) => {
                return FrameCodec::default()
                    .decode_message(bytes)
                    .expect("one well-formed frame");
            }
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected websocket message: {other:?}"),
        }
    }
}

#[tokio::test]
async fn wss_client_authenticates_receives_a_push_and_heartbeats() {
    let tls = self_signed();
    let (comet, addr) = start_wss(tls_config(&tls)).await;
    let mut ws = connect_wss(addr, &tls).await;

    send(
        &mut ws,
        Frame::new(
            Op::AUTH,
            41,
            token(7, "wss-key", "live://1", &[1000]).to_body(),
        ),
    )
    .await;
    let reply = recv(&mut ws).await;
    assert_eq!((reply.op, reply.seq), (Op::AUTH_REPLY, 41));

    let delivery = comet.push_keys(&["wss-key"], 1000, "over tls").await;
    assert_eq!((delivery.delivered, delivery.missing), (1, 0));
    // Every WebSocket push is an op-9 frame, as goim sends it.
    let pushed = recv(&mut ws).await;
    assert_eq!(pushed.op, Op::RAW);
    let inner: Vec<Frame> = pushed.batch_frames().map(Result::unwrap).collect();
    assert_eq!(inner.len(), 1);
    assert_eq!(
        (inner[0].op, &inner[0].body[..]),
        (Op(1000), &b"over tls"[..])
    );

    send(&mut ws, Frame::new(Op::HEARTBEAT, 42, Bytes::new())).await;
    let reply = recv(&mut ws).await;
    assert_eq!((reply.op, reply.seq), (Op::HEARTBEAT_REPLY, 42));

    // /metrics tells WSS apart from plain WebSocket.
    let mut registry = rim_metrics::Registry::default();
    comet.comet.register_metrics(&mut registry);
    let text = rim_metrics::encode(&registry);
    for line in [
        "rim_comet_connections{transport=\"wss\"} 1",
        "rim_comet_connections{transport=\"ws\"} 0",
        "rim_comet_frames_in_total{transport=\"wss\"} 2",
        "rim_comet_frames_in_total{transport=\"ws\"} 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line:?} missing in\n{text}"
        );
    }

    within(WAIT, ws.close(None)).await.unwrap();
    eventually(WAIT, || comet.logic.disconnects_of("wss-key") == 1).await;
    comet.stop().await;
}

#[tokio::test]
async fn plain_tcp_garbage_on_the_wss_port_is_closed() {
    let tls = self_signed();
    // A handshake timeout far beyond the wait below: the close must come
    // from the TLS layer refusing the bytes, not from the timer.
    let config = CometConfig {
        handshake_timeout: Duration::from_secs(60),
        ..tls_config(&tls)
    };
    let (comet, addr) = start_wss(config).await;

    let mut tcp = within(WAIT, TcpStream::connect(addr)).await.unwrap();
    within(
        WAIT,
        tcp.write_all(b"GET /sub HTTP/1.1\r\nHost: localhost\r\n\r\n"),
    )
    .await
    .unwrap();
    // Read until EOF or a reset; a TLS alert may come first.
    let mut seen = Vec::new();
    let end = within(WAIT, async {
        let mut buf = [0u8; 1024];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => seen.extend_from_slice(&buf[..n]),
                Err(err) => return Err(err),
            }
        }
    })
    .await;
    if let Err(err) = end {
        assert!(
            matches!(
                err.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
            "unexpected read error: {err}"
        );
    }
    assert!(
        !seen.windows(4).any(|w| w == b"HTTP"),
        "a plain client got an HTTP answer: {:?}",
        String::from_utf8_lossy(&seen)
    );

    // The listener still serves TLS clients afterwards.
    let mut ws = connect_wss(addr, &tls).await;
    send(
        &mut ws,
        Frame::new(Op::AUTH, 1, token(8, "after-garbage", "", &[]).to_body()),
    )
    .await;
    assert_eq!(recv(&mut ws).await.op, Op::AUTH_REPLY);
    comet.stop().await;
}

#[tokio::test]
async fn a_cert_file_without_a_certificate_fails_to_start() {
    let tls = self_signed();
    let empty = tls.cert.with_file_name("empty.pem");
    std::fs::write(&empty, "").unwrap();
    // An empty file, and a PEM file holding only a key.
    for cert in [empty, tls.key.clone()] {
        let config = CometConfig {
            tls_cert: Some(cert.clone()),
            ..tls_config(&tls)
        };
        let (comet, _addr) = start_wss(config).await;
        let ended = within(WAIT, comet.task)
            .await
            .expect("run task not panicked");
        match ended {
            Err(rim_comet::Error::Tls(rim_comet::TlsError::NoCertificate { path })) => {
                assert_eq!(path, cert, "the error names the certificate file")
            }
            other => panic!("{cert:?}: expected a TLS error, got {other:?}"),
        }
    }
}

/// Reads until the server's close frame and returns its code; fails on a
/// reset or EOF without one.
async fn close_code(
    ws: &mut Wss,
) -> tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode {
    within(WAIT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(frame)))) => return frame.code,
                Some(Ok(Message::Close(None))) => panic!("close frame without a status"),
                Some(Ok(_)) => {}
                Some(Err(err)) => panic!("no close frame, the connection ended with: {err}"),
                None => panic!("no close frame, the connection ended"),
            }
        }
    })
    .await
}

#[tokio::test]
async fn over_tls_a_client_close_is_echoed_and_a_drain_says_going_away() {
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    let tls = self_signed();
    let (comet, addr) = start_wss(tls_config(&tls)).await;
    let auth = |key: &str| Frame::new(Op::AUTH, 1, token(1, key, "", &[]).to_body());

    // The echo sits in TLS's buffer until the comet flushes it.
    let mut leaving = connect_wss(addr, &tls).await;
    send(&mut leaving, auth("leaving")).await;
    assert_eq!(recv(&mut leaving).await.op, Op::AUTH_REPLY);
    within(
        WAIT,
        leaving.send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        }))),
    )
    .await
    .unwrap();
    assert_eq!(close_code(&mut leaving).await, CloseCode::Normal);

    let mut staying = connect_wss(addr, &tls).await;
    send(&mut staying, auth("staying")).await;
    assert_eq!(recv(&mut staying).await.op, Op::AUTH_REPLY);
    comet.shutdown.trigger();
    assert_eq!(close_code(&mut staying).await, CloseCode::Away);
    comet.stop().await;
}
