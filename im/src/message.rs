//! A message to send, checked against the contract's limits before anything
//! is stored (im.md, Model): a `cmid` of 1–64 characters, a body of at most
//! the configured bytes, and for a 1:1 conversation a sender who is one of
//! its two users (group membership is the store's to check).

use crate::conv::ConvId;
use crate::error::{Error, Result};

/// The longest client message id, in characters.
pub const MAX_CMID_LEN: usize = 64;

/// A message as its sender asked for it, valid but not yet stored: it has
/// no seq, id or accept time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Draft {
    /// The conversation.
    pub conv: ConvId,
    /// The sender's mid (a business's system sender included).
    pub from: i64,
    /// The sender's client message id; `(conv, from, cmid)` is unique.
    pub cmid: String,
    /// The business's content type (0 = text).
    pub kind: i32,
    /// The content.
    pub body: String,
    /// Sent by a business server as a system sender (HTTP API): a group's
    /// membership is not checked, and `from` gets an inbox entry only if
    /// it is a member.
    pub system: bool,
}

impl Draft {
    /// Checks a send request: `cmid` 1–64 characters without control
    /// characters, `body` at most `max_body` bytes without NUL, `from` one of a 1:1
    /// conversation's users.
    pub fn new(
        conv: ConvId,
        from: i64,
        cmid: String,
        kind: i32,
        body: String,
        max_body: usize,
    ) -> Result<Draft> {
        let chars = cmid.chars().count();
        if chars == 0 || chars > MAX_CMID_LEN {
            return Err(Error::invalid(
                "cmid",
                format!("a cmid has 1 to {MAX_CMID_LEN} characters, got {chars}"),
            ));
        }
        if cmid.chars().any(char::is_control) {
            return Err(Error::invalid("cmid", "a cmid has no control characters"));
        }
        if body.contains('\0') {
            // PostgreSQL's text cannot hold it: refused alike on every store.
            return Err(Error::invalid("body", "a body has no NUL characters"));
        }
        if body.len() > max_body {
            return Err(Error::TooLarge {
                field: "body",
                len: body.len(),
                limit: max_body,
            });
        }
        if matches!(conv, ConvId::Peer { .. }) && !conv.is_peer_of(from) {
            return Err(Error::NotMember { conv, mid: from });
        }
        Ok(Draft {
            conv,
            from,
            cmid,
            kind,
            body,
            system: false,
        })
    }

    /// Marks this draft as a business server's system send.
    pub fn system(self) -> Draft {
        Draft {
            system: true,
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Code;

    fn draft(conv: &str, from: i64, cmid: &str, body: &str) -> Result<Draft> {
        Draft::new(
            conv.parse().unwrap(),
            from,
            cmid.into(),
            0,
            body.into(),
            4000,
        )
    }

    #[test]
    fn a_valid_send_becomes_a_draft() {
        let d = draft("p:1:2", 2, "c-1", "hello").unwrap();
        assert_eq!(
            (d.from, d.cmid.as_str(), d.body.as_str()),
            (2, "c-1", "hello")
        );
        assert!(draft("g:team", 99, &"x".repeat(MAX_CMID_LEN), "").is_ok());
        assert!(
            draft("p:1:2", 1, "c", &"é".repeat(2000)).is_ok(),
            "4000 bytes"
        );
    }

    #[test]
    fn each_limit_has_its_code() {
        let code = |r: Result<Draft>| r.unwrap_err().code();
        assert_eq!(code(draft("p:1:2", 1, "", "x")), Code::BadRequest);
        assert_eq!(
            code(draft("p:1:2", 1, &"x".repeat(MAX_CMID_LEN + 1), "x")),
            Code::BadRequest
        );
        assert_eq!(code(draft("p:1:2", 1, "a\nb", "x")), Code::BadRequest);
        assert_eq!(code(draft("p:1:2", 1, "c", "a\0b")), Code::BadRequest);
        assert_eq!(
            code(draft("p:1:2", 1, "c", &"é".repeat(2001))),
            Code::TooLarge
        );
        assert_eq!(code(draft("p:1:2", 3, "c", "x")), Code::NotAllowed);
    }
}
