//! How WebSocket connections end: the close status says why (1001 when the
//! comet drains, 1002 for a protocol error, 1003 for text, 1009 for a
//! message too big, 1008 for a refused auth), a client's close frame is
//! echoed, and a bad upgrade request gets an HTTP error status.

mod support;

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use rim_comet::WS_PATH;
use rim_proto::{Frame, Op};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn connect(comet: &TestComet) -> Ws {
    let url = format!("ws://{}{WS_PATH}", comet.ws);
    tokio_tungstenite::connect_async(&url).await.unwrap().0
}

/// Connects and authenticates as `key`.
async fn authed(comet: &TestComet, key: &str) -> Ws {
    let mut ws = connect(comet).await;
    let auth = Frame::new(Op::AUTH, 1, token(1, key, "", &[]).to_body());
    ws.send(Message::Binary(auth.to_bytes().unwrap()))
        .await
        .unwrap();
    match within(Duration::from_secs(5), ws.next()).await {
        Some(Ok(Message::Binary(reply))) => {
            assert_eq!(reply[8..12], Op::AUTH_REPLY.0.to_be_bytes())
        }
        other => panic!("expected the auth reply, got {other:?}"),
    }
    ws
}

/// Reads until the server's close frame and returns it; fails on a reset
/// or EOF without one (what a browser reports as 1006).
async fn close_frame(ws: &mut Ws) -> CloseFrame {
    within(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(frame)))) => return frame,
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
async fn a_drain_closes_with_1001_going_away() {
    let comet = start(test_config(), ScriptedLogic::default()).await;
    let mut ws = authed(&comet, "draining").await;
    comet.shutdown.trigger();
    let frame = close_frame(&mut ws).await;
    assert_eq!(frame.code, CloseCode::Away, "{frame:?}");
    comet.stop().await;
}

#[tokio::test]
async fn a_client_close_frame_is_echoed() {
    let comet = start(test_config(), ScriptedLogic::default()).await;
    // After auth, and before it.
    for authenticated in [true, false] {
        let mut ws = if authenticated {
            authed(&comet, "leaving").await
        } else {
            connect(&comet).await
        };
        ws.send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        })))
        .await
        .unwrap();
        let echo = close_frame(&mut ws).await;
        assert_eq!(
            echo.code,
            CloseCode::Normal,
            "authenticated: {authenticated}"
        );
        // The server then closes the TCP connection.
        let end = within(Duration::from_secs(5), ws.next()).await;
        assert!(
            matches!(end, None | Some(Err(tungstenite::Error::ConnectionClosed))),
            "{end:?}"
        );
    }
    comet.stop().await;
}

#[tokio::test]
async fn protocol_errors_close_with_their_status() {
    let comet = start(test_config(), ScriptedLogic::default()).await;

    // A message over the frame limit (4096-byte body): 1009.
    let mut ws = authed(&comet, "big").await;
    let big = Frame::new(Op(2000), 1, vec![0u8; 4097]);
    let mut bytes = BytesMut::new();
    bytes.put_i32(16 + 4097);
    bytes.put_i16(16);
    bytes.put_i16(1);
    bytes.put_i32(big.op.0);
    bytes.put_i32(1);
    bytes.put_slice(&big.body);
    ws.send(Message::Binary(bytes.freeze())).await.unwrap();
    assert_eq!(close_frame(&mut ws).await.code, CloseCode::Size);

    // A bad frame header (header_len 99): 1002.
    let mut ws = authed(&comet, "garbage").await;
    let mut garbage = BytesMut::new();
    garbage.put_i32(16);
    garbage.put_i16(99);
    garbage.put_i16(1);
    garbage.put_i32(2);
    garbage.put_i32(1);
    ws.send(Message::Binary(garbage.freeze())).await.unwrap();
    assert_eq!(close_frame(&mut ws).await.code, CloseCode::Protocol);

    // A bad room through op 12: 1002 with the reason.
    let mut ws = authed(&comet, "mover").await;
    let change = Frame::new(Op::CHANGE_ROOM, 2, Bytes::from("a".repeat(300)));
    ws.send(Message::Binary(change.to_bytes().unwrap()))
        .await
        .unwrap();
    let frame = close_frame(&mut ws).await;
    assert_eq!(frame.code, CloseCode::Protocol);
    assert_eq!(frame.reason.as_str(), "room id of 300 bytes exceeds 256");

    // A text message: 1003.
    let mut ws = authed(&comet, "texter").await;
    ws.send(Message::Text("hello".into())).await.unwrap();
    assert_eq!(close_frame(&mut ws).await.code, CloseCode::Unsupported);

    // A refused auth: 1008.
    let mut ws = connect(&comet).await;
    let auth = Frame::new(Op::AUTH, 1, Bytes::from_static(b"not json"));
    ws.send(Message::Binary(auth.to_bytes().unwrap()))
        .await
        .unwrap();
    let frame = close_frame(&mut ws).await;
    assert_eq!(
        (frame.code, frame.reason.as_str()),
        (CloseCode::Policy, "auth refused")
    );
    comet.stop().await;
}

/// Sends a raw request to the WebSocket listener and returns the answer's
/// status line.
async fn status_line(comet: &TestComet, request: &str) -> String {
    let mut stream = TcpStream::connect(comet.ws).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    within(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    answer.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn a_bad_upgrade_gets_an_http_error_status() {
    let comet = start(test_config(), ScriptedLogic::default()).await;
    let missing_key = "GET /sub HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
                       Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n";
    assert_eq!(
        status_line(&comet, missing_key).await,
        "HTTP/1.1 400 Bad Request"
    );
    let not_an_upgrade = "GET /sub HTTP/1.1\r\nHost: localhost\r\n\r\n";
    assert_eq!(
        status_line(&comet, not_an_upgrade).await,
        "HTTP/1.1 400 Bad Request"
    );
    assert_eq!(
        status_line(&comet, "hello\r\n\r\n").await,
        "HTTP/1.1 400 Bad Request"
    );
    let wrong_path = "GET /nope HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
                      Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                      Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    assert_eq!(
        status_line(&comet, wrong_path).await,
        "HTTP/1.1 404 Not Found"
    );
    // A good upgrade still works, with a frame right behind the request.
    let good = "GET /sub HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
                Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let mut stream = TcpStream::connect(comet.ws).await.unwrap();
    let mut request = good.as_bytes().to_vec();
    // A masked binary WebSocket message carrying an Auth frame.
    let auth = Frame::new(Op::AUTH, 5, token(1, "pipelined", "", &[]).to_body())
        .to_bytes()
        .unwrap();
    let mask = [1u8, 2, 3, 4];
    request.push(0x82);
    request.push(0x80 | 126);
    request.extend_from_slice(&(auth.len() as u16).to_be_bytes());
    request.extend_from_slice(&mask);
    request.extend(auth.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    stream.write_all(&request).await.unwrap();
    let ws = WebSocketStream::from_raw_socket(
        stream,
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    );
    // Skip the 101 answer's head before speaking WebSocket.
    let mut ws = within(Duration::from_secs(5), async {
        let mut stream = ws.await.into_inner();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        WebSocketStream::from_raw_socket(
            stream,
            tokio_tungstenite::tungstenite::protocol::Role::Client,
            None,
        )
        .await
    })
    .await;
    match within(Duration::from_secs(5), ws.next()).await {
        Some(Ok(Message::Binary(reply))) => {
            assert_eq!(reply[8..12], Op::AUTH_REPLY.0.to_be_bytes())
        }
        other => panic!("expected the auth reply, got {other:?}"),
    }
    comet.stop().await;
}
