//! Between the IM domain (rim-im) and the JSON bodies clients see
//! (rim_proto::im): messages, reply codes and the requests' fields.

use rim_im::{ConvId, Message};
use rim_proto::im::{Code, Msg};

/// Returns the wire form of a stored message (the JSON of MSG and of
/// history pages), with the recipient's inbox entry (`None` in history pages).
pub fn msg(message: &Message, sync: Option<u64>) -> Msg {
    Msg {
        conv: message.conv.to_string(),
        seq: message.seq,
        id: message.id.to_string(),
        from: message.from,
        cmid: message.cmid.clone(),
        kind: message.kind,
        body: message.body.clone(),
        ts: message.ts,
        sync,
    }
}

/// Why a request was refused, as its reply says it.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) code: Code,
    pub(crate) error: String,
}

impl Refusal {
    /// A malformed request (code 1).
    pub(crate) fn bad(error: impl Into<String>) -> Refusal {
        Refusal {
            code: Code::BAD_REQUEST,
            error: error.into(),
        }
    }

    /// A body that does not decode as the op's JSON (code 1, naming the
    /// field serde names).
    pub(crate) fn undecodable(op: &str, err: &serde_json::Error) -> Refusal {
        Refusal::bad(format!("bad {op} body: {err}"))
    }
}

impl From<rim_im::Error> for Refusal {
    fn from(err: rim_im::Error) -> Refusal {
        Refusal {
            code: Code(err.code() as i32),
            error: err.to_string(),
        }
    }
}

/// Parses a conversation id a client sent.
pub(crate) fn conv(text: &str) -> Result<ConvId, Refusal> {
    text.parse::<ConvId>().map_err(Refusal::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_domain_refusal_keeps_its_code() {
        let invalid = conv("x:1").unwrap_err();
        assert_eq!(invalid.code, Code::BAD_REQUEST);
        assert!(invalid.error.contains("conv"), "{}", invalid.error);
        let unavailable: Refusal =
            rim_im::Error::unavailable("storing a message", std::io::Error::other("disk")).into();
        assert_eq!(unavailable.code, Code::UNAVAILABLE);
        let not_member: Refusal = rim_im::Error::NotMember {
            conv: ConvId::group("g1").unwrap(),
            mid: 3,
        }
        .into();
        assert_eq!(not_member.code, Code::NOT_ALLOWED);
    }
}
