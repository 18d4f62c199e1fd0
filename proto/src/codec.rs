use bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::frame::{DEFAULT_MAX_BODY, HEADER_LEN, Header};
use crate::{Frame, FrameError};

/// Decodes and encodes client frames, on a TCP stream (as a tokio-util
/// codec) or one WebSocket binary message at a time.
///
/// The decoder checks the header before it trusts a length: a frame whose
/// body would exceed `max_body` is an error, and the read buffer never grows
/// beyond one maximal frame on account of a length field.
#[derive(Clone, Copy, Debug)]
pub struct FrameCodec {
    max_body: usize,
}

impl FrameCodec {
    /// Creates a codec that accepts bodies of at most `max_body` bytes.
    pub fn new(max_body: usize) -> Self {
        FrameCodec { max_body }
    }

    /// Returns the body limit in force.
    pub fn max_body(&self) -> usize {
        self.max_body
    }

    /// Decodes one WebSocket binary message, which must hold exactly one frame.
    ///
    /// The body is a slice of `msg`: no copy.
    pub fn decode_message(&self, msg: Bytes) -> Result<Frame, FrameError> {
        let header = Header::parse(&msg).ok_or_else(|| FrameError::Truncated {
            missing: HEADER_LEN.saturating_sub(msg.len()),
        })?;
        let body_len = header.body_len(self.max_body)?;
        let total = HEADER_LEN + body_len;
        match msg.len() {
            len if len < total => Err(FrameError::Truncated {
                missing: total - len,
            }),
            len if len > total => Err(FrameError::TrailingBytes(len - total)),
            _ => Ok(header.into_frame(msg.slice(HEADER_LEN..))),
        }
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(DEFAULT_MAX_BODY)
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let Some(header) = Header::parse(src) else {
            return Ok(None);
        };
        let body_len = header.body_len(self.max_body)?;
        let total = HEADER_LEN + body_len;
        if src.len() < total {
            // Bounded by max_body: the length was checked above.
            src.reserve(total - src.len());
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        let body = src.split_to(body_len).freeze();
        Ok(Some(header.into_frame(body)))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => {
                let needed = Header::parse(src)
                    .and_then(|h| h.body_len(self.max_body).ok())
                    .map_or(HEADER_LEN, |body_len| HEADER_LEN + body_len);
                Err(FrameError::Truncated {
                    missing: needed.saturating_sub(src.len()),
                })
            }
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        frame.encode_into(dst)
    }
}

impl Encoder<&Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        frame.encode_into(dst)
    }
}

#[cfg(test)]
mod tests;
