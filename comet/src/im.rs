//! What a comet knows of the IM layer (im.md, Client ops): which ops are
//! requests for logic (SEND 18, ACK 20, SYNC 22, PULL 24, READ 26), which
//! are pushes from the server (19, 21, 23, 25, 27: a client never sends
//! them), and the reply op of a request. Pushed IM frames (MSG 21, NOTIFY
//! 27) reach only connections whose accepts list them, like any push; the
//! bodies are logic's business.

use std::num::NonZeroU32;
use std::time::Duration;

use bytes::Bytes;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rim_proto::Op;
use rim_proto::im::{Body, Code, SendReply, SendRequest};

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

/// A connection's SEND limit, on the terms logic gave at auth
/// (`im.send_rate_per_conn`, `im.send_burst_per_conn`): a SEND over it is
/// answered here with code 3, so a flooding client costs logic nothing.
/// Logic checks the same terms again (and the per-user ones). The limiter
/// is made on the connection's first SEND: connections that never send
/// carry only the terms.
pub(crate) struct SendLimit {
    quota: Option<Quota>,
    limiter: Option<DefaultDirectRateLimiter>,
}

impl SendLimit {
    /// The limit of `rate` SENDs a second with `burst` at once; no limit
    /// when either is 0.
    pub(crate) fn new(rate: u32, burst: u32) -> SendLimit {
        let quota = NonZeroU32::new(rate)
            .zip(NonZeroU32::new(burst))
            .map(|(rate, burst)| Quota::per_second(rate).allow_burst(burst));
        SendLimit {
            quota,
            limiter: None,
        }
    }

    /// Takes one SEND; returns how long to wait when it is over the limit.
    pub(crate) fn take(&mut self) -> Option<Duration> {
        let quota = self.quota?;
        let limiter = self
            .limiter
            .get_or_insert_with(|| RateLimiter::direct(quota));
        limiter
            .check()
            .err()
            .map(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

/// The SEND_REPLY of a SEND over its connection's limit: code 3 with
/// `retry_ms` (rounded up, at least 1) and the request's cmid when it can
/// be read; nothing was stored.
pub(crate) fn limited_reply(request: &[u8], retry: Duration) -> Bytes {
    let retry_ms = u64::try_from(retry.as_nanos().div_ceil(1_000_000))
        .unwrap_or(u64::MAX)
        .max(1);
    let cmid = SendRequest::decode(request)
        .map(|request| request.cmid)
        .unwrap_or_default();
    let mut reply = SendReply::refused(
        Code::RATE_LIMITED,
        format!("rate limited (im.send_rate_per_conn): retry in {retry_ms} ms"),
        cmid,
    );
    reply.retry_ms = Some(retry_ms);
    reply.encode()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_gets_its_burst_then_code_3_with_the_wait() {
        let mut limit = SendLimit::new(2, 3);
        for _ in 0..3 {
            assert_eq!(limit.take(), None, "within the burst");
        }
        let wait = limit.take().expect("over the burst");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        let body = limited_reply(br#"{"cmid":"c-9","to":2,"body":"x"}"#, wait);
        let reply = SendReply::decode(&body).unwrap();
        assert_eq!(
            (reply.code, reply.cmid.as_str()),
            (Code::RATE_LIMITED, "c-9")
        );
        assert!(reply.retry_ms.unwrap() >= 1);
        // Unreadable requests still get their code 3, without a cmid.
        let reply = SendReply::decode(&limited_reply(b"not json", wait)).unwrap();
        assert_eq!((reply.code, reply.cmid.as_str()), (Code::RATE_LIMITED, ""));
        let mut off = SendLimit::new(0, 40);
        assert!((0..1000).all(|_| off.take().is_none()), "0 = no limit");
    }

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
