//! Why an IM request is refused, and the reply code a client sees for it.

/// A reply's `code` (im.md): what the client should do about a refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[repr(i32)]
pub enum Code {
    /// Done.
    Ok = 0,
    /// The request is malformed; resending it cannot help.
    BadRequest = 1,
    /// The sender is not a member or not allowed.
    NotAllowed = 2,
    /// Over a rate limit; retry after the reply's `retry_ms`.
    RateLimited = 3,
    /// Over a size limit.
    TooLarge = 4,
    /// The store or the queue is down: nothing was stored; resend later with
    /// the same cmid.
    Unavailable = 5,
}

/// Why an IM request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A field is missing or malformed.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The request field, as the client names it (`conv`, `cmid`, ...).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A field is over its size limit.
    #[error("{field} is {len} bytes, over the limit of {limit}")]
    TooLarge {
        /// The request field.
        field: &'static str,
        /// Its size in bytes.
        len: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// The user is not a member of the conversation.
    #[error("{mid} is not a member of {conv}")]
    NotMember {
        /// The conversation.
        conv: crate::ConvId,
        /// The user.
        mid: i64,
    },
}

impl Error {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Error {
        Error::Invalid {
            field,
            reason: reason.into(),
        }
    }

    /// Returns the reply code a client gets for this refusal.
    pub fn code(&self) -> Code {
        match self {
            Error::Invalid { .. } => Code::BadRequest,
            Error::TooLarge { .. } => Code::TooLarge,
            Error::NotMember { .. } => Code::NotAllowed,
        }
    }
}

/// Result of an IM operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;
