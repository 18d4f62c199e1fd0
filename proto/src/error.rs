use std::io;

/// Why a frame could not be decoded or encoded.
///
/// Every variant is a property of the input; none is a bug in rim. A server
/// that gets one closes that connection only.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The header_len field is not 16.
    #[error("bad header length {0}: must be 16")]
    BadHeaderLen(i16),
    /// The pack_len field is shorter than the header (negative included).
    #[error("bad packet length {0}: must be at least 16")]
    PackLenTooShort(i32),
    /// The body is larger than the configured limit.
    #[error("frame body of {len} bytes exceeds the limit of {max} bytes")]
    BodyTooLarge {
        /// Body length the frame declares (or carries, when encoding).
        len: u64,
        /// The limit in force.
        max: u64,
    },
    /// The input ended inside a frame.
    #[error("frame truncated: {missing} more bytes expected")]
    Truncated {
        /// Bytes the frame still needed.
        missing: usize,
    },
    /// A WebSocket message carried bytes after its one frame.
    #[error("{0} trailing bytes after the frame")]
    TrailingBytes(usize),
    /// A protobuf frame's version does not fit the 16-bit wire field.
    #[error("bad protocol version {0}: must fit in 16 bits")]
    BadVersion(i32),
    /// The underlying stream failed.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}
