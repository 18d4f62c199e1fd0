//! How frames move over one client connection: raw TCP or WebSocket.
//!
//! Both read with a cancel-safe `read_frame` (the connection loop selects on
//! it) and write a batch of encoded frames with one flush. Raw TCP also
//! offers a [`DirectWriter`], with which pushers write a frame straight to
//! the socket when the connection task has nothing to write.

use std::borrow::Cow;
use std::future::Future;
use std::io::{self, IoSlice};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use rim_proto::{Frame, FrameCodec, FrameError, HEADER_LEN, Op};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::codec::Decoder;

/// Bytes requested from the socket per read; grows only while a frame is partial.
const READ_CHUNK: usize = 512;

/// Most slices handed to one `writev` (Linux IOV_MAX is 1024).
const MAX_IOV: usize = 256;

/// Why reading from a connection failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    /// The client sent a malformed or oversized frame.
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    /// WebSocket protocol violation or transport error.
    #[error("websocket: {0}")]
    WebSocket(#[from] tungstenite::Error),
    /// A text WebSocket message (rim speaks binary frames only).
    #[error("text websocket messages are not supported")]
    Text,
    /// The socket failed.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
}

impl ReadError {
    /// Returns whether the client broke the protocol (as opposed to the
    /// network failing).
    pub(crate) fn is_protocol_violation(&self) -> bool {
        match self {
            ReadError::Frame(FrameError::Io(_)) | ReadError::Io(_) => false,
            ReadError::Frame(_) | ReadError::Text => true,
            ReadError::WebSocket(e) => matches!(
                e,
                tungstenite::Error::Protocol(_)
                    | tungstenite::Error::Capacity(_)
                    | tungstenite::Error::Utf8(_)
            ),
        }
    }
}

/// Longest close reason a WebSocket close frame carries (125-byte control
/// payload minus the 2-byte code).
const MAX_CLOSE_REASON: usize = 123;

/// Why the comet ends a connection, as a WebSocket close frame states it;
/// TCP clients only see the socket close.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Goodbye {
    /// The close status.
    pub(crate) code: CloseCode,
    /// Why, in the comet's words (never the client's text).
    pub(crate) reason: Cow<'static, str>,
}

impl Goodbye {
    /// 1000: a normal close. When the client closed first, its close frame
    /// is echoed instead.
    pub(crate) fn normal(reason: &'static str) -> Goodbye {
        Goodbye::new(CloseCode::Normal, reason)
    }

    /// 1001: the comet is going away (draining); clients should reconnect.
    pub(crate) fn going_away() -> Goodbye {
        Goodbye::new(CloseCode::Away, "comet draining")
    }

    /// 1002: the client broke the protocol.
    pub(crate) fn protocol(reason: impl Into<Cow<'static, str>>) -> Goodbye {
        Goodbye::new(CloseCode::Protocol, reason)
    }

    /// 1008: the comet refuses the client (auth, kick, replacement, slowness).
    pub(crate) fn policy(reason: impl Into<Cow<'static, str>>) -> Goodbye {
        Goodbye::new(CloseCode::Policy, reason)
    }

    fn new(code: CloseCode, reason: impl Into<Cow<'static, str>>) -> Goodbye {
        Goodbye {
            code,
            reason: reason.into(),
        }
    }

    /// Returns the close that answers a failed read.
    pub(crate) fn for_read(err: &ReadError) -> Goodbye {
        match err {
            ReadError::Frame(FrameError::BodyTooLarge { .. })
            | ReadError::WebSocket(tungstenite::Error::Capacity(_)) => {
                Goodbye::new(CloseCode::Size, "message too big")
            }
            ReadError::Text => Goodbye::new(
                CloseCode::Unsupported,
                "text messages are not supported: send binary frames",
            ),
            ReadError::Frame(FrameError::Io(_)) | ReadError::Io(_) => {
                Goodbye::normal("read failed")
            }
            ReadError::Frame(_) => Goodbye::protocol("bad frame"),
            ReadError::WebSocket(_) => Goodbye::protocol("websocket protocol error"),
        }
    }

    /// Returns the close frame, its reason cut to what fits.
    fn frame(&self) -> CloseFrame {
        let mut end = self.reason.len().min(MAX_CLOSE_REASON);
        while !self.reason.is_char_boundary(end) {
            end -= 1;
        }
        CloseFrame {
            code: self.code,
            reason: self.reason[..end].to_owned().into(),
        }
    }
}

/// A client connection that carries goim frames.
pub(crate) trait Transport: Send + 'static {
    /// Reads the next frame; `None` when the client closed cleanly. Cancel-safe.
    fn read_frame(&mut self) -> impl Future<Output = Result<Option<Frame>, ReadError>> + Send;

    /// Writes encoded frames (an op-9 batch as the transport wants it) and
    /// flushes; returns the frame bytes written (without WebSocket framing).
    ///
    /// `head_sent` wire bytes of the first frame are on the socket already
    /// (a [`DirectWriter`] began it): only its rest is written, and the
    /// bytes returned count that frame whole, so that each frame's bytes
    /// are counted once, by whoever finishes it. Always 0 for a transport
    /// without a direct writer.
    fn write_frames(
        &mut self,
        head_sent: usize,
        frames: &[Bytes],
    ) -> impl Future<Output = io::Result<usize>> + Send;

    /// Returns a writer that other tasks may use to write frames straight
    /// to the socket, if this transport has one (raw TCP does; TLS and
    /// WebSocket, whose writes go through a stateful encoder, do not).
    fn direct_writer(&self) -> Option<DirectWriter> {
        None
    }

    /// Closes the connection politely: a WebSocket close frame saying why
    /// (or the echo of the client's), then the socket's FIN.
    fn close(&mut self, goodbye: Goodbye) -> impl Future<Output = ()> + Send;
}

fn is_batch(frame: &[u8]) -> bool {
    frame.len() >= HEADER_LEN && frame[8..12] == Op::RAW.0.to_be_bytes()
}

/// Returns a frame's form on a TCP stream: an op-9 batch goes out as its
/// inner frames (its body already is those frames back to back), anything
/// else as it is.
fn tcp_wire(frame: &[u8]) -> &[u8] {
    if is_batch(frame) {
        &frame[HEADER_LEN..]
    } else {
        frame
    }
}

/// Writes frames to a raw TCP socket from outside the connection task,
/// without waiting. Shares the socket with the connection's
/// [`TcpTransport`]; the session's outbox decides who may write when.
#[derive(Clone, Debug)]
pub(crate) struct DirectWriter(Arc<TcpStream>);

/// What one direct write put on the socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Sent {
    /// Wire bytes the socket took.
    pub(crate) bytes: usize,
    /// The frame's wire length.
    wire_len: usize,
}

impl Sent {
    /// Returns whether the whole frame went out.
    pub(crate) fn is_whole(&self) -> bool {
        self.bytes == self.wire_len
    }
}

impl DirectWriter {
    /// Writes as much of `frame`'s TCP wire form as the socket takes now,
    /// in one nonblocking syscall; a full socket buffer is 0 bytes sent,
    /// not an error.
    pub(crate) fn write_now(&self, frame: &[u8]) -> io::Result<Sent> {
        let wire = tcp_wire(frame);
        let wire_len = wire.len();
        if wire_len == 0 {
            return Ok(Sent { bytes: 0, wire_len });
        }
        match self.0.try_write(wire) {
            Ok(bytes) => Ok(Sent { bytes, wire_len }),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Sent { bytes: 0, wire_len }),
            Err(e) => Err(e),
        }
    }
}

/// goim frames back to back on a TCP stream.
pub(crate) struct TcpTransport {
    /// Shared with the session's [`DirectWriter`] while the connection is
    /// open; the connection task holds the only other reference once the
    /// session lets go of it, before the close.
    stream: Arc<TcpStream>,
    /// Empty and unallocated while no partial frame is pending, so an idle
    /// connection holds no read buffer.
    buf: BytesMut,
    codec: FrameCodec,
}

impl TcpTransport {
    pub(crate) fn new(stream: TcpStream, max_body: usize) -> Self {
        TcpTransport {
            stream: Arc::new(stream),
            buf: BytesMut::new(),
            codec: FrameCodec::new(max_body),
        }
    }
}

impl Transport for TcpTransport {
    async fn read_frame(&mut self) -> Result<Option<Frame>, ReadError> {
        loop {
            if let Some(frame) = self.codec.decode(&mut self.buf)? {
                if self.buf.is_empty() {
                    self.buf = BytesMut::new();
                }
                return Ok(Some(frame));
            }
            // Wait for data before allocating anything to read it into.
            self.stream.readable().await?;
            if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
                self.buf.reserve(READ_CHUNK);
            }
            match self.stream.try_read_buf(&mut self.buf) {
                Ok(0) => {
                    return match self.codec.decode_eof(&mut self.buf)? {
                        Some(frame) => Ok(Some(frame)),
                        None => Ok(None),
                    };
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn write_frames(&mut self, head_sent: usize, frames: &[Bytes]) -> io::Result<usize> {
        let mut parts: Vec<&[u8]> = frames.iter().map(|f| tcp_wire(f)).collect();
        let total = parts.iter().map(|p| p.len()).sum();
        if let Some(first) = parts.first_mut() {
            *first = first.get(head_sent..).unwrap_or_default();
        }
        parts.retain(|p| !p.is_empty());
        for chunk in parts.chunks(MAX_IOV) {
            let mut slices: Vec<IoSlice<'_>> = chunk.iter().map(|p| IoSlice::new(p)).collect();
            let mut slices = &mut slices[..];
            while !slices.is_empty() {
                // The socket is shared with the direct writer, so it is
                // written through `&TcpStream`: try, and wait for room
                // only when it is full.
                let n = match self.stream.try_write_vectored(slices) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.stream.writable().await?;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                IoSlice::advance_slices(&mut slices, n);
            }
        }
        Ok(total)
    }

    fn direct_writer(&self) -> Option<DirectWriter> {
        Some(DirectWriter(Arc::clone(&self.stream)))
    }

    async fn close(&mut self, _goodbye: Goodbye) {
        // The session let go of its direct writer when the connection
        // ended, so the stream is this transport's alone; were it not, the
        // socket would close (without an explicit FIN first) when the last
        // reference goes.
        if let Some(stream) = Arc::get_mut(&mut self.stream) {
            let _ = stream.shutdown().await;
        }
    }
}

/// One goim frame per binary WebSocket message.
pub(crate) struct WsTransport<S> {
    ws: WebSocketStream<S>,
    codec: FrameCodec,
}

impl<S> WsTransport<S> {
    pub(crate) fn new(ws: WebSocketStream<S>, max_body: usize) -> Self {
        WsTransport {
            ws,
            codec: FrameCodec::new(max_body),
        }
    }
}

impl<S> Transport for WsTransport<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async fn read_frame(&mut self) -> Result<Option<Frame>, ReadError> {
        loop {
            match self.ws.next().await {
                None => return Ok(None),
                Some(Err(
                    tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed,
                )) => return Ok(None),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::Binary(msg))) => return Ok(Some(self.codec.decode_message(msg)?)),
                Some(Ok(Message::Text(_))) => return Err(ReadError::Text),
                // tungstenite queued the pong; send it now rather than with
                // the next push.
                Some(Ok(Message::Ping(_))) => self.ws.flush().await?,
                Some(Ok(Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(frame))) => {
                    // The client's reason is its own text: logged escaped.
                    if let Some(frame) = frame {
                        tracing::debug!(code = u16::from(frame.code), reason = ?frame.reason.as_str(), "client sent a close frame");
                    }
                    return Ok(None);
                }
            }
        }
    }

    async fn write_frames(&mut self, head_sent: usize, frames: &[Bytes]) -> io::Result<usize> {
        // No direct writer: nothing is ever begun outside this task.
        debug_assert_eq!(head_sent, 0);
        let mut total = 0;
        for frame in frames {
            total += frame.len();
            self.ws
                .feed(Message::Binary(frame.clone()))
                .await
                .map_err(ws_io_error)?;
        }
        self.ws.flush().await.map_err(ws_io_error)?;
        Ok(total)
    }

    async fn close(&mut self, goodbye: Goodbye) {
        // After the client's close frame tungstenite has queued its echo: a
        // flush sends it (a close frame of ours would be refused as a send
        // after closing). Otherwise the flush sends nothing.
        let _ = self.ws.flush().await;
        let _ = self.ws.close(Some(goodbye.frame())).await;
        // Flush what TLS may still buffer, then close_notify and FIN.
        let _ = self.ws.get_mut().shutdown().await;
    }
}

fn ws_io_error(err: tungstenite::Error) -> io::Error {
    match err {
        tungstenite::Error::Io(e) => e,
        other => io::Error::other(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_close_reason_is_cut_to_fit_on_a_char_boundary() {
        let goodbye = Goodbye::protocol("é".repeat(100));
        let frame = goodbye.frame();
        assert_eq!(frame.code, CloseCode::Protocol);
        assert_eq!(frame.reason.len(), 122);
        assert_eq!(Goodbye::going_away().frame().code, CloseCode::Away);
    }

    #[test]
    fn only_op_9_frames_are_batches() {
        let batch = Frame::new(Op::RAW, 0, Bytes::new()).to_bytes().unwrap();
        let push = Frame::new(Op(1000), 0, Bytes::new()).to_bytes().unwrap();
        assert!(is_batch(&batch));
        assert!(!is_batch(&push));
        assert!(!is_batch(&[0u8; 4]));
    }
}
