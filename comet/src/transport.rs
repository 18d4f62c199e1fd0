//! How frames move over one client connection: raw TCP or WebSocket.
//!
//! Both read with a cancel-safe `read_frame` (the connection loop selects on
//! it) and write a batch of encoded frames with one flush.

use std::future::Future;
use std::io::{self, IoSlice};

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use rim_proto::{Frame, FrameCodec, FrameError, HEADER_LEN, Op};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
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

/// A client connection that carries goim frames.
pub(crate) trait Transport: Send + 'static {
    /// Reads the next frame; `None` when the client closed cleanly. Cancel-safe.
    fn read_frame(&mut self) -> impl Future<Output = Result<Option<Frame>, ReadError>> + Send;

    /// Writes encoded frames (an op-9 batch as the transport wants it) and
    /// flushes; returns the frame bytes written (without WebSocket framing).
    fn write_frames(&mut self, frames: &[Bytes]) -> impl Future<Output = io::Result<usize>> + Send;

    /// Closes the connection politely (WebSocket close frame, TCP FIN).
    fn close(&mut self) -> impl Future<Output = ()> + Send;
}

fn is_batch(frame: &[u8]) -> bool {
    frame.len() >= HEADER_LEN && frame[8..12] == Op::RAW.0.to_be_bytes()
}

/// goim frames back to back on a TCP stream.
pub(crate) struct TcpTransport {
    stream: TcpStream,
    /// Empty and unallocated while no partial frame is pending, so an idle
    /// connection holds no read buffer.
    buf: BytesMut,
    codec: FrameCodec,
}

impl TcpTransport {
    pub(crate) fn new(stream: TcpStream, max_body: usize) -> Self {
        TcpTransport {
            stream,
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

    async fn write_frames(&mut self, frames: &[Bytes]) -> io::Result<usize> {
        // An op-9 batch goes out as its inner frames: its body already is
        // those frames back to back.
        let parts: Vec<&[u8]> = frames
            .iter()
            .map(|f| {
                if is_batch(f) {
                    &f[HEADER_LEN..]
                } else {
                    &f[..]
                }
            })
            .filter(|p| !p.is_empty())
            .collect();
        let total = parts.iter().map(|p| p.len()).sum();
        for chunk in parts.chunks(MAX_IOV) {
            let mut slices: Vec<IoSlice<'_>> = chunk.iter().map(|p| IoSlice::new(p)).collect();
            let mut slices = &mut slices[..];
            while !slices.is_empty() {
                let n = self.stream.write_vectored(slices).await?;
                if n == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                IoSlice::advance_slices(&mut slices, n);
            }
        }
        Ok(total)
    }

    async fn close(&mut self) {
        let _ = self.stream.shutdown().await;
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
                Some(Ok(Message::Close(_))) => return Ok(None),
            }
        }
    }

    async fn write_frames(&mut self, frames: &[Bytes]) -> io::Result<usize> {
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

    async fn close(&mut self) {
        let _ = self.ws.close(None).await;
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
    fn only_op_9_frames_are_batches() {
        let batch = Frame::new(Op::RAW, 0, Bytes::new()).to_bytes().unwrap();
        let push = Frame::new(Op(1000), 0, Bytes::new()).to_bytes().unwrap();
        assert!(is_batch(&batch));
        assert!(!is_batch(&push));
        assert!(!is_batch(&[0u8; 4]));
    }
}
