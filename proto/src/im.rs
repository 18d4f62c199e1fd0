//! The JSON bodies of rim's IM ops 18–27 (im.md, "Client ops"), shared by
//! the server (logic answers them) and by rim-client.
//!
//! Field names, op numbers and codes are the contract: they are spelled here
//! exactly as im.md spells them. Decoding ignores unknown fields (a newer
//! client or server may add some), fills optional fields with their defaults,
//! and refuses a body that is not a JSON object or lacks a required field
//! (serde's "missing field" error names it); the server answers either with
//! [`Code::BAD_REQUEST`]. Decoding never panics, whatever the bytes
//! (serde_json also caps nesting depth).
//!
//! What is omitted when serializing, so that a refusal is small and a
//! success is complete:
//! - `error` is omitted when empty (every `code` 0 reply);
//! - `retry_ms` is omitted unless set (only with [`Code::RATE_LIMITED`]);
//! - in [`SendReply`], `conv`, `id` are omitted when empty and `seq`, `ts`
//!   when 0: a stored message always has them, a refusal never does, so a
//!   refusal is `{"code", "error", "cmid"}` plus `conv` when known;
//! - in [`Msg`], `sync` is omitted when `None` (big groups, PULL pages);
//! - [`SendRequest`]'s `to` and `conv` are omitted when `None`.
//!
//! Every other field is always written, so a reply's `msgs`, `more` and
//! `reset` are always there for a client to read.

use std::fmt;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{Frame, Op};

/// A reply's `code` (im.md): 0 ok, 1 bad request, 2 not allowed, 3 rate
/// limited, 4 too large, 5 unavailable.
///
/// A newtype rather than an enum so that any code a newer server sends
/// still decodes; [`Code::name`] says whether it is one this version knows.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Code(pub i32);

impl Code {
    /// Done.
    pub const OK: Code = Code(0);
    /// The request is malformed (a missing or bad field); resending it
    /// cannot help.
    pub const BAD_REQUEST: Code = Code(1);
    /// Not a member of the conversation, or not allowed.
    pub const NOT_ALLOWED: Code = Code(2);
    /// Over a rate limit: retry after the reply's `retry_ms`.
    pub const RATE_LIMITED: Code = Code(3);
    /// Over a size limit.
    pub const TOO_LARGE: Code = Code(4);
    /// The store or the queue is down: nothing was stored; resend later
    /// (a SEND with the same cmid).
    pub const UNAVAILABLE: Code = Code(5);

    /// Returns whether this is code 0.
    pub fn is_ok(self) -> bool {
        self == Code::OK
    }

    /// Returns the name of a code this version knows.
    pub fn name(self) -> Option<&'static str> {
        const NAMES: [&str; 6] = [
            "ok",
            "bad_request",
            "not_allowed",
            "rate_limited",
            "too_large",
            "unavailable",
        ];
        usize::try_from(self.0)
            .ok()
            .and_then(|i| NAMES.get(i).copied())
    }
}

impl From<i32> for Code {
    fn from(code: i32) -> Code {
        Code(code)
    }
}

impl From<Code> for i32 {
    fn from(code: Code) -> i32 {
        code.0
    }
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{}({name})", self.0),
            None => write!(f, "{}", self.0),
        }
    }
}

mod sealed {
    pub trait Sealed {}
}

/// A JSON body of one IM op: knows its op and encodes and decodes itself.
///
/// Implemented only by this module's types (sealed), which hold nothing but
/// strings, numbers, booleans, options and vectors of them: encoding them
/// cannot fail.
pub trait Body: Serialize + DeserializeOwned + sealed::Sealed {
    /// The op whose frames carry this body.
    const OP: Op;

    /// Encodes the body as JSON.
    fn encode(&self) -> Bytes {
        // Cannot fail for these types: no maps with non-string keys, no
        // custom Serialize that errors (see the trait's doc).
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// Decodes a body, which must be a JSON object (serde would also take
    /// an array of the fields in order; the contract does not); unknown
    /// fields are ignored, a missing required field is an error naming it.
    /// Never panics.
    fn decode(body: &[u8]) -> Result<Self, serde_json::Error> {
        let first = body
            .iter()
            .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
        if first.is_some_and(|b| *b != b'{') {
            return Err(serde::de::Error::custom("a body must be a JSON object"));
        }
        serde_json::from_slice(body)
    }

    /// Builds the frame carrying this body with header seq `seq` (a
    /// request's own seq, or the request's seq echoed by a reply).
    fn to_frame(&self, seq: i32) -> Frame {
        Frame::new(Self::OP, seq, self.encode())
    }
}

/// A client request that the server answers with a reply op echoing its
/// header seq (SEND, SYNC, PULL).
pub trait Request: Body {
    /// The reply's body type; its op is `Self::Reply::OP`.
    type Reply: Body;
}

macro_rules! body {
    ($ty:ty, $op:expr) => {
        impl sealed::Sealed for $ty {}
        impl Body for $ty {
            const OP: Op = $op;
        }
    };
}

body!(SendRequest, Op::IM_SEND);
body!(SendReply, Op::IM_SEND_REPLY);
body!(Ack, Op::IM_ACK);
body!(Msg, Op::IM_MSG);
body!(SyncRequest, Op::IM_SYNC);
body!(SyncReply, Op::IM_SYNC_REPLY);
body!(PullRequest, Op::IM_PULL);
body!(PullReply, Op::IM_PULL_REPLY);
body!(ReadRequest, Op::IM_READ);
body!(Notify, Op::IM_NOTIFY);

impl Request for SendRequest {
    type Reply = SendReply;
}

impl Request for SyncRequest {
    type Reply = SyncReply;
}

impl Request for PullRequest {
    type Reply = PullReply;
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

fn is_zero_i64(n: &i64) -> bool {
    *n == 0
}

/// SEND (op 18): a message to a user (`to`, 1:1) or to a conversation
/// (`conv`, a group). Required: `cmid`; exactly one of `to` and `conv` is
/// the server's to check.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendRequest {
    /// The sender's client message id (1–64 characters); a resend with the
    /// same cmid gets the first send's seq and id.
    pub cmid: String,
    /// The other user of a 1:1 conversation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<i64>,
    /// The conversation, `g:<gid>` (a `p:<a>:<b>` is the server's to accept
    /// or not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conv: Option<String>,
    /// The business's content type (`type` on the wire; default 0 = text).
    #[serde(rename = "type", default)]
    pub kind: i32,
    /// The content (default empty).
    #[serde(default)]
    pub body: String,
}

/// SEND_REPLY (op 19), echoing the SEND's header seq.
///
/// On success (`code` 0) every field is set: the message is durable. On a
/// refusal only `code`, `error`, `cmid` and (when known) `conv` mean
/// anything; the others are zero or empty and are not written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendReply {
    /// 0 when the message is stored.
    pub code: Code,
    /// Why it was refused; empty (and omitted) on success.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// Milliseconds to wait before resending; set only with code 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_ms: Option<u64>,
    /// The request's cmid (empty when the request had none).
    #[serde(default)]
    pub cmid: String,
    /// The conversation (empty and omitted when unknown).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub conv: String,
    /// The message's seq in the conversation (0 and omitted on refusal).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub seq: u64,
    /// The message's 64-bit id as a decimal string (empty and omitted on
    /// refusal).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// The server's accept time, unix ms (0 and omitted on refusal).
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub ts: i64,
}

impl SendReply {
    /// A refusal of the send with `cmid` (empty when unknown); set `conv`
    /// and `retry_ms` on the result when they apply.
    pub fn refused(code: Code, error: impl Into<String>, cmid: impl Into<String>) -> SendReply {
        SendReply {
            code,
            error: error.into(),
            cmid: cmid.into(),
            ..SendReply::default()
        }
    }
}

/// ACK (op 20, no reply): this device has every inbox entry up to `sync`
/// (cumulative).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The last inbox entry the device has.
    pub sync: u64,
}

/// A message (im.md, Model), as pushed in MSG (op 21) and listed in
/// SYNC_REPLY and PULL_REPLY.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Msg {
    /// The conversation, `p:<a>:<b>` or `g:<gid>`.
    pub conv: String,
    /// Its place in the conversation: 1, 2, 3, … without holes.
    pub seq: u64,
    /// Its globally unique 64-bit id as a decimal string.
    pub id: String,
    /// The sender's mid.
    pub from: i64,
    /// The sender's client message id.
    pub cmid: String,
    /// The business's content type (`type` on the wire; 0 = text).
    #[serde(rename = "type", default)]
    pub kind: i32,
    /// The content.
    #[serde(default)]
    pub body: String,
    /// The server's accept time, unix ms.
    pub ts: i64,
    /// The recipient's inbox entry for this message: set in MSG and
    /// SYNC_REPLY, absent (`None`) for big groups and in PULL_REPLY.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<u64>,
}

/// SYNC (op 22): the inbox entries after `sync`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRequest {
    /// The last inbox entry the device has (0 = from the start).
    pub sync: u64,
    /// The most entries to return (≤ 200); 0 or absent = the server's
    /// default, 100.
    #[serde(default)]
    pub limit: u32,
}

/// SYNC_REPLY (op 23), echoing the SYNC's header seq.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncReply {
    /// 0 when `msgs` is a page of the inbox.
    pub code: Code,
    /// Why it was refused; empty (and omitted) on success.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// Milliseconds to wait before retrying; set only with code 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_ms: Option<u64>,
    /// The entries after the requested sync, oldest first, each with its
    /// `sync`.
    #[serde(default)]
    pub msgs: Vec<Msg>,
    /// Where the device continues (and what it ACKs once it has `msgs`).
    #[serde(default)]
    pub sync: u64,
    /// True when entries after `sync` exist: SYNC again.
    #[serde(default)]
    pub more: bool,
    /// True when the requested sync is below what is retained: reload
    /// conversations, then continue from `sync`.
    #[serde(default)]
    pub reset: bool,
}

/// PULL (op 24): a page of one conversation's history. `before` gives the
/// messages below a seq, newest first; `after` those above it, oldest
/// first; neither the newest page; both is a bad request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullRequest {
    /// The conversation.
    pub conv: String,
    /// Messages with a seq below this one, newest first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<u64>,
    /// Messages with a seq above this one, oldest first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<u64>,
    /// The most messages to return (≤ 100); 0 or absent = the server's
    /// default.
    #[serde(default)]
    pub limit: u32,
}

/// PULL_REPLY (op 25), echoing the PULL's header seq.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullReply {
    /// 0 when `msgs` is a page of the conversation.
    pub code: Code,
    /// Why it was refused; empty (and omitted) on success.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// Milliseconds to wait before retrying; set only with code 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_ms: Option<u64>,
    /// The conversation asked for.
    #[serde(default)]
    pub conv: String,
    /// The page, in the request's order (no `sync` on them).
    #[serde(default)]
    pub msgs: Vec<Msg>,
    /// The conversation's latest seq (0 when empty).
    #[serde(default)]
    pub max_seq: u64,
    /// The oldest seq still retained.
    #[serde(default)]
    pub min_seq: u64,
    /// True when the request reached below `min_seq`: the page starts at
    /// `min_seq`.
    #[serde(default)]
    pub reset: bool,
}

/// READ (op 26, no reply): the user has read `conv` up to `seq`; the user's
/// other devices get [`Notify::Read`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadRequest {
    /// The conversation.
    pub conv: String,
    /// The seq read up to.
    pub seq: u64,
}

/// NOTIFY (op 27), pushed: `{"kind": "...", …}` with the fields of its kind.
///
/// A kind this version does not know decodes as [`Notify::Other`] (its
/// fields dropped), so a newer server cannot break an older client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Notify {
    /// `kind: "read"`: another device of the user read `conv` up to `seq`.
    Read {
        /// The conversation.
        conv: String,
        /// The user's new read position.
        seq: u64,
    },
    /// `kind: "sync"`: there are inbox entries for this device up to
    /// `sync`: SYNC now.
    Sync {
        /// The user's latest inbox entry.
        sync: u64,
    },
    /// `kind: "truncated"`: some of a big group's messages were not pushed;
    /// PULL up to `max_seq`.
    Truncated {
        /// The group's conversation.
        conv: String,
        /// The group's latest seq.
        max_seq: u64,
    },
    /// `kind: "presence"`: a user came online or went offline.
    Presence {
        /// The user.
        mid: i64,
        /// Whether the user has a connection now.
        online: bool,
    },
    /// A kind this version does not know (decoding only; encodes as
    /// `{"kind": "other"}`).
    #[serde(other)]
    Other,
}

#[cfg(test)]
mod tests;
