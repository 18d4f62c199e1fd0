use bytes::{Bytes, BytesMut};

use crate::frame::{HEADER_LEN, Header};
use crate::{Frame, FrameError, Op};

/// Builds an op-9 batch: one frame whose body is a concatenation of
/// complete frames.
#[derive(Debug, Default)]
pub struct BatchBuilder {
    body: BytesMut,
    count: usize,
}

impl BatchBuilder {
    /// Creates an empty batch.
    pub fn new() -> Self {
        BatchBuilder::default()
    }

    /// Creates an empty batch with room for `bytes` of inner frames.
    pub fn with_capacity(bytes: usize) -> Self {
        BatchBuilder {
            body: BytesMut::with_capacity(bytes),
            count: 0,
        }
    }

    /// Appends one frame to the batch.
    pub fn push(&mut self, frame: &Frame) -> Result<(), FrameError> {
        frame.encode_into(&mut self.body)?;
        self.count += 1;
        Ok(())
    }

    /// Returns how many frames the batch holds.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Returns whether the batch holds no frame.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Returns the size of the batch's body so far.
    pub fn body_len(&self) -> usize {
        self.body.len()
    }

    /// Finishes the batch as an op-9 frame (seq 0).
    pub fn finish(self) -> Frame {
        Frame::new(Op::RAW, 0, self.body.freeze())
    }
}

impl Frame {
    /// Iterates the frames inside an op-9 batch body. Inner bodies are
    /// slices of this frame's body: no copy.
    pub fn batch_frames(&self) -> BatchFrames {
        BatchFrames {
            rest: self.body.clone(),
        }
    }
}

/// Iterator over the inner frames of an op-9 batch.
///
/// A malformed inner frame yields one error and ends the iteration.
#[derive(Clone, Debug)]
pub struct BatchFrames {
    rest: Bytes,
}

impl Iterator for BatchFrames {
    type Item = Result<Frame, FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let item = self.next_frame();
        if item.is_err() {
            self.rest = Bytes::new();
        }
        Some(item)
    }
}

impl BatchFrames {
    fn next_frame(&mut self) -> Result<Frame, FrameError> {
        let header = Header::parse(&self.rest).ok_or_else(|| FrameError::Truncated {
            missing: HEADER_LEN.saturating_sub(self.rest.len()),
        })?;
        // An inner frame can be no longer than what is left of the batch.
        let available = self.rest.len() - HEADER_LEN;
        let body_len = header.body_len(usize::MAX).and_then(|len| {
            if len > available {
                Err(FrameError::Truncated {
                    missing: len - available,
                })
            } else {
                Ok(len)
            }
        })?;
        let frame_bytes = self.rest.split_to(HEADER_LEN + body_len);
        Ok(header.into_frame(frame_bytes.slice(HEADER_LEN..)))
    }
}
