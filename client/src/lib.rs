//! rim-client is a client of the goim frame protocol that rim speaks, over
//! raw TCP or WebSocket: connect, authenticate, heartbeat, change room,
//! subscribe, and receive pushed frames with op-9 batches unpacked; and the
//! IM ops (send, ack, sync, pull, read) with replies matched by header seq
//! and pushed MSG and NOTIFY frames decoded as [`ImEvent`]s.
//!
//! It serves rim's tests and load tools; it is not a production SDK (no
//! reconnect policy, no node selection).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use rim_proto::{Frame, FrameCodec, FrameError, Op};
use serde::Serialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::codec::Framed;

mod im;

pub use im::ImEvent;

/// Largest frame body the client accepts from a server (batches can be big).
pub const MAX_SERVER_BODY: usize = 16 << 20;

/// How long a request waits for its reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server sent a malformed frame.
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    /// WebSocket failure.
    #[error("websocket: {0}")]
    WebSocket(#[from] tungstenite::Error),
    /// Socket failure.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The server closed the connection.
    #[error("connection closed by the server")]
    Closed,
    /// No reply in time.
    #[error("no {0} reply within {REPLY_TIMEOUT:?}")]
    Timeout(&'static str),
    /// The server sent something the protocol does not allow.
    #[error("protocol: {0}")]
    Protocol(String),
    /// No reply to an IM request within the caller's timeout.
    #[error("no {op} reply to seq {seq} within {timeout:?}")]
    ReplyTimeout {
        /// The reply op waited for.
        op: Op,
        /// The request's header seq.
        seq: i32,
        /// How long the caller waited.
        timeout: Duration,
    },
    /// A frame's JSON body did not decode as its op's body.
    #[error("bad body of op {op}: {source}")]
    Body {
        /// The frame's op.
        op: Op,
        /// Why it did not decode.
        #[source]
        source: serde_json::Error,
    },
}

/// Result of a client operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The JSON token goim clients send in their Auth frame.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AuthToken {
    /// User id.
    pub mid: i64,
    /// Connection key; empty = let the server assign one.
    pub key: String,
    /// Room to join, `type://id`; empty = none.
    pub room_id: String,
    /// Client platform, e.g. `web`, `android`.
    pub platform: String,
    /// Business ops this connection accepts.
    pub accepts: Vec<i32>,
}

impl AuthToken {
    /// Returns the token as the Auth frame body.
    pub fn to_body(&self) -> Bytes {
        // Serializing plain fields to JSON cannot fail.
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }
}

enum Conn {
    Tcp(Framed<TcpStream, FrameCodec>),
    Ws(Box<WebSocketStream<MaybeTlsStream<TcpStream>>>),
}

/// One client connection.
pub struct Client {
    conn: Conn,
    /// Frames received while waiting for a reply, and inner frames of batches.
    pending: VecDeque<Frame>,
    unpack_batches: bool,
    seq: i32,
}

impl Client {
    /// Connects over raw TCP.
    pub async fn connect_tcp(addr: SocketAddr) -> Result<Client> {
        Ok(Client::tcp(TcpStream::connect(addr).await?))
    }

    /// Connects over raw TCP from a chosen local address (to spread load
    /// tests over 127.0.0.0/8 source addresses).
    pub async fn connect_tcp_from(addr: SocketAddr, local: SocketAddr) -> Result<Client> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.bind(local)?;
        Ok(Client::tcp(socket.connect(addr).await?))
    }

    fn tcp(stream: TcpStream) -> Client {
        let _ = stream.set_nodelay(true);
        Client::new(Conn::Tcp(Framed::new(
            stream,
            FrameCodec::new(MAX_SERVER_BODY),
        )))
    }

    /// Connects over WebSocket, e.g. `ws://127.0.0.1:3102/sub`; returns once
    /// the server has answered the upgrade.
    pub async fn connect_ws(url: &str) -> Result<Client> {
        let (ws, _) = tokio_tungstenite::connect_async(url).await?;
        Ok(Client::new(Conn::Ws(Box::new(ws))))
    }

    fn new(conn: Conn) -> Client {
        Client {
            conn,
            pending: VecDeque::new(),
            unpack_batches: true,
            seq: 0,
        }
    }

    /// Chooses whether `next_frame` unpacks op-9 batches (the default) or
    /// returns them whole.
    pub fn unpack_batches(&mut self, unpack: bool) {
        self.unpack_batches = unpack;
    }

    fn next_seq(&mut self) -> i32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends one frame as is.
    pub async fn send(&mut self, frame: Frame) -> Result<()> {
        match &mut self.conn {
            Conn::Tcp(framed) => framed.send(frame).await?,
            Conn::Ws(ws) => ws.send(Message::Binary(frame.to_bytes()?)).await?,
        }
        Ok(())
    }

    /// Sends raw bytes (TCP) or one raw binary message (WebSocket), for
    /// testing how servers treat malformed input.
    pub async fn send_raw(&mut self, bytes: Bytes) -> Result<()> {
        match &mut self.conn {
            Conn::Tcp(framed) => {
                use tokio::io::AsyncWriteExt;
                framed.get_mut().write_all(&bytes).await?;
            }
            Conn::Ws(ws) => ws.send(Message::Binary(bytes)).await?,
        }
        Ok(())
    }

    /// Reads the next frame off the wire; `None` when the server closed.
    async fn recv(&mut self) -> Result<Option<Frame>> {
        loop {
            match &mut self.conn {
                Conn::Tcp(framed) => return framed.next().await.transpose().map_err(Into::into),
                Conn::Ws(ws) => match ws.next().await {
                    None => return Ok(None),
                    Some(Err(
                        tungstenite::Error::ConnectionClosed | tungstenite::Error::Protocol(_),
                    )) => {
                        return Ok(None);
                    }
                    Some(Err(tungstenite::Error::Io(e)))
                        if e.kind() == std::io::ErrorKind::ConnectionReset =>
                    {
                        return Ok(None);
                    }
                    Some(Err(e)) => return Err(e.into()),
                    Some(Ok(Message::Binary(msg))) => {
                        return Ok(Some(FrameCodec::new(MAX_SERVER_BODY).decode_message(msg)?));
                    }
                    Some(Ok(Message::Close(_))) => return Ok(None),
                    Some(Ok(Message::Text(_))) => {
                        return Err(Error::Protocol("text message".into()));
                    }
                    Some(Ok(_)) => {}
                },
            }
        }
    }

    /// Returns the next frame the server sent, with batches unpacked unless
    /// disabled; `None` when the server closed the connection.
    pub async fn next_frame(&mut self) -> Result<Option<Frame>> {
        if let Some(frame) = self.pending.pop_front() {
            return Ok(Some(frame));
        }
        let Some(frame) = self.recv().await? else {
            return Ok(None);
        };
        if frame.is_batch() && self.unpack_batches {
            for inner in frame.batch_frames() {
                self.pending.push_back(inner?);
            }
            return Ok(self.pending.pop_front());
        }
        Ok(Some(frame))
    }

    /// Waits for the reply with `op` and `seq`, keeping other frames for
    /// `next_frame`.
    async fn reply(&mut self, op: Op, seq: i32, what: &'static str) -> Result<Frame> {
        let wait = async {
            let mut held = Vec::new();
            let found = loop {
                match self.recv().await? {
                    None => break Err(Error::Closed),
                    Some(frame) if frame.op == op && frame.seq == seq => break Ok(frame),
                    Some(frame) => held.push(frame),
                }
            };
            for frame in held {
                if frame.is_batch() && self.unpack_batches {
                    for inner in frame.batch_frames() {
                        self.pending.push_back(inner?);
                    }
                } else {
                    self.pending.push_back(frame);
                }
            }
            found
        };
        tokio::time::timeout(REPLY_TIMEOUT, wait)
            .await
            .map_err(|_| Error::Timeout(what))?
    }

    /// Authenticates with a goim JSON token.
    pub async fn auth(&mut self, token: &AuthToken) -> Result<()> {
        self.auth_raw(token.to_body()).await
    }

    /// Authenticates with any token body (e.g. a signed token).
    pub async fn auth_raw(&mut self, body: Bytes) -> Result<()> {
        let seq = self.next_seq();
        self.send(Frame::new(Op::AUTH, seq, body)).await?;
        self.reply(Op::AUTH_REPLY, seq, "auth").await.map(drop)
    }

    /// Sends a heartbeat and returns the room online count from the reply.
    pub async fn heartbeat(&mut self) -> Result<i32> {
        let seq = self.next_seq();
        self.send(Frame::new(Op::HEARTBEAT, seq, Bytes::new()))
            .await?;
        let reply = self.reply(Op::HEARTBEAT_REPLY, seq, "heartbeat").await?;
        let count: [u8; 4] = reply.body[..].try_into().map_err(|_| {
            Error::Protocol(format!(
                "heartbeat reply body of {} bytes",
                reply.body.len()
            ))
        })?;
        Ok(i32::from_be_bytes(count))
    }

    /// Moves to another room (empty = leave).
    pub async fn change_room(&mut self, room: &str) -> Result<()> {
        let seq = self.next_seq();
        self.send(Frame::new(
            Op::CHANGE_ROOM,
            seq,
            Bytes::copy_from_slice(room.as_bytes()),
        ))
        .await?;
        self.reply(Op::CHANGE_ROOM_REPLY, seq, "change room")
            .await
            .map(drop)
    }

    /// Accepts pushes with these ops too.
    pub async fn sub(&mut self, ops: &[i32]) -> Result<()> {
        self.ops_request(Op::SUB, Op::SUB_REPLY, ops, "sub").await
    }

    /// Stops accepting pushes with these ops.
    pub async fn unsub(&mut self, ops: &[i32]) -> Result<()> {
        self.ops_request(Op::UNSUB, Op::UNSUB_REPLY, ops, "unsub")
            .await
    }

    async fn ops_request(
        &mut self,
        op: Op,
        reply: Op,
        ops: &[i32],
        what: &'static str,
    ) -> Result<()> {
        let seq = self.next_seq();
        let body: Vec<String> = ops.iter().map(i32::to_string).collect();
        self.send(Frame::new(op, seq, body.join(",").into_bytes()))
            .await?;
        self.reply(reply, seq, what).await.map(drop)
    }

    /// Sends an upstream frame with a business op and waits for its ack.
    pub async fn send_upstream(&mut self, op: Op, body: Bytes) -> Result<()> {
        let seq = self.next_seq();
        self.send(Frame::new(op, seq, body)).await?;
        self.reply(op, seq, "upstream ack").await.map(drop)
    }

    /// Waits until the server closes the connection, discarding frames;
    /// errors on timeout.
    pub async fn closed_within(&mut self, limit: Duration) -> Result<()> {
        tokio::time::timeout(limit, async {
            loop {
                match self.next_frame().await {
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => return,
                }
            }
        })
        .await
        .map_err(|_| Error::Timeout("close"))
    }
}
