//! One load-generator client connection over raw TCP or WebSocket, bound to
//! a chosen source address: connect (WebSocket: wait for the 101), Auth,
//! heartbeat, and read pushed frames with op-9 batches unpacked.
//!
//! rim-client's `Client` cannot bind a WebSocket's source address; this is
//! the small part of it a load generator needs, with small buffers so that
//! 15,000 clients fit comfortably in one process.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clap::ValueEnum;
use futures::{SinkExt, StreamExt};
use rim_proto::{Frame, FrameCodec, Op};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::codec::Framed;

/// Largest frame body accepted from a server (batches can be big).
const MAX_SERVER_BODY: usize = 16 << 20;

/// How clients connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// goim's raw TCP protocol.
    Tcp,
    /// WebSocket on `/sub`.
    Ws,
}

impl Transport {
    /// The name used on the command line and in child commands.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Ws => "ws",
        }
    }

    /// Parses `tcp` or `ws`.
    pub fn parse(s: &str) -> Option<Transport> {
        match s {
            "tcp" => Some(Transport::Tcp),
            "ws" => Some(Transport::Ws),
            _ => None,
        }
    }
}

enum Inner {
    Tcp(Framed<TcpStream, FrameCodec>),
    Ws(Box<WebSocketStream<TcpStream>>),
}

/// One client connection.
pub struct Conn {
    inner: Inner,
    /// Inner frames of a batch not returned yet.
    pending: VecDeque<Frame>,
}

impl Conn {
    /// Connects to `target` from `source` (port 0); over WebSocket, returns
    /// once the server answered the upgrade with 101.
    pub async fn connect(
        transport: Transport,
        target: SocketAddr,
        source: Option<SocketAddr>,
    ) -> anyhow::Result<Conn> {
        let socket = if target.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(source) = source {
            socket.bind(source)?;
        }
        let stream = socket.connect(target).await?;
        stream.set_nodelay(true)?;
        let inner = match transport {
            Transport::Tcp => Inner::Tcp(Framed::with_capacity(
                stream,
                FrameCodec::new(MAX_SERVER_BODY),
                512,
            )),
            Transport::Ws => {
                let config = WebSocketConfig::default()
                    .read_buffer_size(4096)
                    .write_buffer_size(0)
                    .max_message_size(Some(MAX_SERVER_BODY));
                let (ws, _) = tokio_tungstenite::client_async_with_config(
                    format!("ws://{target}/sub"),
                    stream,
                    Some(config),
                )
                .await?;
                Inner::Ws(Box::new(ws))
            }
        };
        Ok(Conn {
            inner,
            pending: VecDeque::new(),
        })
    }

    /// Sends one frame.
    pub async fn send(&mut self, frame: Frame) -> anyhow::Result<()> {
        match &mut self.inner {
            Inner::Tcp(framed) => framed.send(frame).await?,
            Inner::Ws(ws) => ws.send(Message::Binary(frame.to_bytes()?)).await?,
        }
        Ok(())
    }

    /// Sends a heartbeat (its reply comes back through `next_frame`).
    pub async fn heartbeat(&mut self) -> anyhow::Result<()> {
        self.send(Frame::new(Op::HEARTBEAT, 0, Bytes::new())).await
    }

    async fn read(&mut self) -> anyhow::Result<Option<Frame>> {
        loop {
            match &mut self.inner {
                Inner::Tcp(framed) => return Ok(framed.next().await.transpose()?),
                Inner::Ws(ws) => match ws.next().await {
                    None | Some(Ok(Message::Close(_))) => return Ok(None),
                    Some(Err(err)) => return Err(err.into()),
                    Some(Ok(Message::Binary(msg))) => {
                        return Ok(Some(FrameCodec::new(MAX_SERVER_BODY).decode_message(msg)?));
                    }
                    Some(Ok(Message::Text(_))) => anyhow::bail!("text message from the server"),
                    Some(Ok(_)) => {}
                },
            }
        }
    }

    /// The next frame, batches unpacked; `None` when the server closed.
    /// Cancel-safe: a partial frame stays buffered.
    pub async fn next_frame(&mut self) -> anyhow::Result<Option<Frame>> {
        if let Some(frame) = self.pending.pop_front() {
            return Ok(Some(frame));
        }
        let Some(frame) = self.read().await? else {
            return Ok(None);
        };
        if frame.is_batch() {
            for inner in frame.batch_frames() {
                self.pending.push_back(inner?);
            }
            return Ok(self.pending.pop_front());
        }
        Ok(Some(frame))
    }

    /// Authenticates with a token body and waits (at most `limit`) for the
    /// reply; frames before it are dropped (nothing is pushed to a client
    /// before its Auth reply).
    pub async fn auth(&mut self, token: Bytes, limit: Duration) -> anyhow::Result<()> {
        self.send(Frame::new(Op::AUTH, 1, token)).await?;
        tokio::time::timeout(limit, async {
            // Bounded by the timeout around it.
            loop {
                match self.read().await? {
                    None => anyhow::bail!("closed by the server before the auth reply"),
                    Some(f) if f.op == Op::AUTH_REPLY => return Ok(()),
                    Some(_) => {}
                }
            }
        })
        .await
        .map_err(|_| anyhow::anyhow!("no auth reply within {limit:?}"))?
    }
}

/// The goim JSON token the `none` auth policy (and the baseline) accept.
pub fn token(mid: u64, key: &str, room: &str, op: i32) -> Bytes {
    let token = serde_json::json!({
        "mid": mid,
        "key": key,
        "room_id": room,
        "platform": "bench",
        "accepts": [op],
    });
    Bytes::from(token.to_string())
}

/// Parses a push body `"<send nanos> <seq>[ padding]"`.
pub fn parse_body(body: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(body).ok()?;
    let mut parts = text.split_ascii_whitespace();
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// A push body `"<send nanos> <seq>"` padded with spaces to `len` bytes.
pub fn body(sent_nanos: u64, seq: u64, len: usize) -> Bytes {
    let mut s = format!("{sent_nanos} {seq}");
    if s.len() < len {
        s.extend(std::iter::repeat_n(' ', len - s.len()));
    }
    Bytes::from(s)
}

/// CLOCK_REALTIME in nanoseconds (comparable across processes).
pub fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_round_trip_with_padding() {
        let b = body(1_700_000_000_000_000_000, 42, 64);
        assert_eq!(b.len(), 64);
        assert_eq!(parse_body(&b), Some((1_700_000_000_000_000_000, 42)));
        assert_eq!(body(1, 2, 0).as_ref(), b"1 2");
        assert_eq!(parse_body(b"hello"), None);
        assert_eq!(parse_body(b"1 x"), None);
        assert_eq!(parse_body(&[0xff, 0xfe]), None);
    }

    #[test]
    fn tokens_are_goim_json() {
        let t: serde_json::Value =
            serde_json::from_slice(&token(7, "k", "live://1", 1000)).unwrap();
        assert_eq!(t["mid"], 7);
        assert_eq!(t["room_id"], "live://1");
        assert_eq!(t["accepts"][0], 1000);
        assert_eq!(Transport::parse("ws"), Some(Transport::Ws));
        assert_eq!(Transport::parse("udp"), None);
    }
}
