//! Why an IM request is refused, and the reply code a client sees for it.

use std::borrow::Cow;

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
#[derive(Debug, thiserror::Error)]
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
    /// The group does not exist.
    #[error("no group {conv}")]
    NoSuchGroup {
        /// The group's conversation.
        conv: crate::ConvId,
    },
    /// A membership change would take a group past its member limit.
    #[error("{conv} would have {members} members, over its limit of {limit}")]
    GroupFull {
        /// The group's conversation.
        conv: crate::ConvId,
        /// The member count the change would give.
        members: u64,
        /// The group's limit.
        limit: u32,
    },
    /// The store could not do it (down, timed out, refused): nothing was
    /// stored; the same request may be retried (a send with the same cmid).
    #[error("message store unavailable: {0}")]
    Unavailable(#[source] StoreFailure),
}

/// Why the store failed: the backend's error, kept as the source.
#[derive(Debug, thiserror::Error)]
#[error("{context}")]
pub struct StoreFailure {
    context: Cow<'static, str>,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl StoreFailure {
    /// A failure of `context` (what the store was doing) caused by `source`.
    pub fn new(
        context: impl Into<Cow<'static, str>>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> StoreFailure {
        StoreFailure {
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// A failure of `context` with no underlying error (a closed writer,
    /// a schema the store does not know).
    pub fn bare(context: impl Into<Cow<'static, str>>) -> StoreFailure {
        StoreFailure {
            context: context.into(),
            source: None,
        }
    }
}

impl Error {
    /// The store failed at `context` because of `source`.
    pub fn unavailable(
        context: impl Into<Cow<'static, str>>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Error {
        Error::Unavailable(StoreFailure::new(context, source))
    }

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
            Error::NotMember { .. } | Error::NoSuchGroup { .. } => Code::NotAllowed,
            Error::GroupFull { .. } => Code::TooLarge,
            Error::Unavailable(_) => Code::Unavailable,
        }
    }
}

/// Result of an IM operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;
