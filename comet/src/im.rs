//! What a comet knows of the IM layer (im.md, Client ops): which ops are
//! requests for logic (SEND 18, ACK 20, SYNC 22, PULL 24, READ 26), which
//! are pushes from the server (19, 21, 23, 25, 27: a client never sends
//! them), and the reply op of a request. Pushed IM frames (MSG 21, NOTIFY
//! 27) reach only connections whose accepts list them, like any push; the
//! bodies are logic's business.

use rim_proto::Op;

/// Returns whether a client's frame is an IM request for logic.
pub(crate) fn is_request(op: Op) -> bool {
    matches!(
        op,
        Op::IM_SEND | Op::IM_ACK | Op::IM_SYNC | Op::IM_PULL | Op::IM_READ
    )
}

/// Returns whether `op` is an IM op only the server sends.
pub(crate) fn is_push(op: Op) -> bool {
    op.is_im() && !is_request(op)
}

/// Returns the reply op of an IM request that has one (SEND, SYNC, PULL).
pub(crate) fn reply_op(request: Op) -> Option<Op> {
    match request {
        Op::IM_SEND => Some(Op::IM_SEND_REPLY),
        Op::IM_SYNC => Some(Op::IM_SYNC_REPLY),
        Op::IM_PULL => Some(Op::IM_PULL_REPLY),
        _ => None,
    }
}

/// The reply body a client gets when logic cannot take its request: code 5,
/// nothing was stored, resend later.
pub(crate) fn unavailable_body() -> &'static [u8] {
    br#"{"code":5,"error":"unavailable: logic did not take the request; resend later"}"#
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_are_classified_as_im_md_says() {
        let requests: Vec<i32> = (0..40).filter(|&op| is_request(Op(op))).collect();
        assert_eq!(requests, [18, 20, 22, 24, 26]);
        let pushes: Vec<i32> = (0..40).filter(|&op| is_push(Op(op))).collect();
        assert_eq!(pushes, [19, 21, 23, 25, 27]);
        let replies: Vec<(i32, i32)> = (0..40)
            .filter_map(|op| reply_op(Op(op)).map(|reply| (op, reply.0)))
            .collect();
        assert_eq!(replies, [(18, 19), (22, 23), (24, 25)]);
        let body: serde_json::Value = serde_json::from_slice(unavailable_body()).unwrap();
        assert_eq!(body["code"], 5);
    }
}
