//! One client connection from accept to close: handshake (Auth within the
//! handshake timeout), registration in its bucket, the read/write loop, and
//! cleanup that reports the disconnect to logic exactly once.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rim_proto::api::RpcError;
use rim_proto::pb::logic::v1 as logic;
use rim_proto::{Frame, Op};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::comet::{ConnSlot, Inner};
use crate::im;
use crate::limits::{check_accepts, check_room, parse_ops, parse_room};
use crate::session::{CloseReason, Session};
use crate::stats::{self, Wire};
use crate::transport::{Goodbye, ReadError, Transport};

/// Heartbeat interval when logic does not say (goim's 4 minutes).
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(240);

/// How long a call to logic made on behalf of one connection may take.
const LOGIC_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a polite close may take before the socket is just dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Why the read/write loop ended.
#[derive(Debug)]
enum End {
    ClientClosed,
    HeartbeatTimeout,
    Closed(CloseReason),
    Read(ReadError),
    Write(std::io::Error),
    Protocol(String),
}

/// Serves one accepted connection until it closes.
///
/// The task lives as long as the connection, and its future's size is paid
/// by every idle connection: the one-off phases (handshake, connect,
/// disconnect) run boxed, so the task itself holds only the read/write loop.
pub(crate) async fn serve<T: Transport>(
    inner: Arc<Inner>,
    mut transport: T,
    id: u64,
    peer: SocketAddr,
    wire: Wire,
    slot: ConnSlot,
    drain: CancellationToken,
) {
    let admitted = Box::pin(admit(&inner, &mut transport, id, peer, wire, &drain)).await;
    let Admitted {
        session,
        idle_limit,
        auth_reply,
        send_limit,
    } = match admitted {
        Ok(admitted) => admitted,
        Err(goodbye) => {
            close(&mut transport, goodbye).await;
            return;
        }
    };
    if let Some(writer) = transport.direct_writer() {
        session.attach_direct(writer);
    }
    let end = run(
        &inner,
        &mut transport,
        &session,
        wire,
        idle_limit,
        auth_reply,
        send_limit,
    )
    .await;
    // From here on only this task touches the socket: no push writes to a
    // connection that is closing, and the close below owns the stream.
    session.detach_direct();
    Box::pin(finish(
        &inner,
        &mut transport,
        &session,
        wire,
        end,
        idle_limit,
    ))
    .await;
    drop(slot);
}

/// An authenticated, registered connection.
struct Admitted {
    session: Arc<Session>,
    idle_limit: Duration,
    auth_reply: Bytes,
    /// The connection's SEND limit, on logic's terms.
    send_limit: im::SendLimit,
}

/// Authenticates the connection through logic and registers its session.
async fn admit<T: Transport>(
    inner: &Arc<Inner>,
    transport: &mut T,
    id: u64,
    peer: SocketAddr,
    wire: Wire,
    drain: &CancellationToken,
) -> Result<Admitted, Goodbye> {
    let auth = handshake(inner, transport, id, wire, drain).await?;
    let req = logic::ConnectRequest {
        server: inner.id.clone(),
        cookie: String::new(),
        token: auth.body.clone(),
        client_ip: peer.ip().to_string(),
    };
    let reply = match tokio::time::timeout(LOGIC_CALL_TIMEOUT, inner.logic.connect(req)).await {
        Ok(Ok(reply)) if !reply.key.is_empty() => reply,
        Ok(Ok(_)) => {
            tracing::warn!("logic accepted the token but assigned no key; closing");
            stats::incr(&inner.stats.auth_failed);
            return Err(Goodbye::normal("auth failed"));
        }
        // Per connection and at the client's will: debug, counted by
        // rim_comet_auth. The reason may quote the client: escaped.
        Ok(Err(err @ RpcError::Unauthenticated(_))) => {
            tracing::debug!(reason = ?err.to_string(), "auth refused; closing");
            stats::incr(&inner.stats.auth_refused);
            return Err(Goodbye::policy("auth refused"));
        }
        // Every connecting client fails while logic is down: one line per
        // 10 s, counted by rim_comet_auth{result="failed"}.
        Ok(Err(err)) => {
            if let Some(failures) = inner.auth_failures_log.event(inner.now_ms()) {
                tracing::warn!(reason = ?err.to_string(), failures, "auth failed: logic answered with an error; closing (one line per 10 s)");
            }
            stats::incr(&inner.stats.auth_failed);
            return Err(Goodbye::normal("auth failed"));
        }
        Err(_) => {
            if let Some(failures) = inner.auth_failures_log.event(inner.now_ms()) {
                tracing::warn!(
                    failures,
                    "auth failed: logic did not answer connect in time; closing (one line per 10 s)"
                );
            }
            stats::incr(&inner.stats.auth_failed);
            return Err(Goodbye::normal("auth failed"));
        }
    };
    // The connection task's span (see the listener) learns who it serves;
    // a &str field is written escaped (Debug) by the log formatter.
    tracing::Span::current()
        .record("mid", reply.mid)
        .record("key", reply.key.as_str());
    // What logic granted goes through the checks ChangeRoom and Sub use.
    let checked = check_room(&reply.room_id).and_then(|()| check_accepts(&reply.accepts));
    let accepts = match checked {
        Ok(accepts) => accepts,
        Err(reason) => {
            tracing::debug!(%reason, "auth refused; closing");
            stats::incr(&inner.stats.auth_refused);
            // Logic has recorded the connection: take it back.
            Box::pin(report_disconnect(inner, reply.mid, &reply.key)).await;
            return Err(Goodbye::policy(reason));
        }
    };
    stats::incr(&inner.stats.auth_ok);

    let session = Arc::new(Session::new(
        id,
        &reply.key,
        reply.mid,
        peer.ip(),
        accepts,
        inner.config.write_queue,
    ));
    let room = (!reply.room_id.is_empty()).then(|| reply.room_id.clone().into_boxed_str());
    let bucket = inner.bucket(&session.key);
    if let Some(old) = bucket.put(&session, room) {
        old.close(CloseReason::Replaced);
    }
    // The big groups' delivery channels (im.md, read diffusion).
    bucket.join_channels(&session, reply.groups.iter().map(String::as_str));
    inner.opened(wire);
    if drain.is_cancelled() {
        // Registered after the drain sweep passed this bucket.
        session.close(CloseReason::Drain);
    }
    tracing::debug!(key = ?session.key, mid = session.mid, room = ?session.room(), "authenticated");

    let heartbeat = match reply.heartbeat_ms {
        0 => DEFAULT_HEARTBEAT,
        ms => Duration::from_millis(ms),
    };
    Ok(Admitted {
        session,
        idle_limit: heartbeat * reply.heartbeat_max.max(1),
        auth_reply: encode(Frame::new(Op::AUTH_REPLY, auth.seq, Bytes::new())),
        send_limit: im::SendLimit::new(reply.im_send_rate, reply.im_send_burst),
    })
}

/// Logs why the connection ended, closes it, unregisters the session and
/// reports the disconnect to logic.
async fn finish<T: Transport>(
    inner: &Inner,
    transport: &mut T,
    session: &Session,
    wire: Wire,
    end: End,
    idle_limit: Duration,
) {
    // Error texts are written with Debug: a tungstenite error may quote
    // what the client sent.
    let goodbye = match end {
        End::ClientClosed => {
            tracing::debug!("client closed");
            Goodbye::normal("bye")
        }
        End::HeartbeatTimeout => {
            tracing::debug!(idle = ?idle_limit, "no heartbeat; closing");
            Goodbye::normal("no heartbeat")
        }
        End::Closed(reason) => {
            tracing::debug!(reason = reason.as_str(), "closing");
            match reason {
                CloseReason::Drain => Goodbye::going_away(),
                other => Goodbye::policy(other.as_str()),
            }
        }
        End::Read(err) => {
            if err.is_protocol_violation() {
                stats::incr(&inner.stats.bad_frames);
                tracing::debug!(reason = ?err.to_string(), "protocol violation; closing");
            } else {
                tracing::debug!(reason = ?err.to_string(), "read failed");
            }
            Goodbye::for_read(&err)
        }
        End::Write(err) => {
            tracing::debug!(reason = ?err.to_string(), "write failed");
            Goodbye::normal("write failed")
        }
        End::Protocol(reason) => {
            stats::incr(&inner.stats.bad_frames);
            tracing::debug!(%reason, "protocol violation; closing");
            Goodbye::protocol(reason)
        }
    };
    close(transport, goodbye).await;

    let current = inner.bucket(&session.key).remove(session);
    inner.closed(wire);
    // A replaced session's key lives on in its successor: reporting it
    // would take the successor offline.
    if current {
        report_disconnect(inner, session.mid, &session.key).await;
    }
}

/// Tells logic the connection of `key` is gone.
async fn report_disconnect(inner: &Inner, mid: i64, key: &str) {
    let req = logic::DisconnectRequest {
        mid,
        key: key.to_owned(),
        server: inner.id.clone(),
    };
    match tokio::time::timeout(LOGIC_CALL_TIMEOUT, inner.logic.disconnect(req)).await {
        Ok(Ok(_)) => {}
        Ok(Err(err)) => {
            tracing::warn!(reason = ?err.to_string(), "disconnect not recorded by logic; the lease will expire")
        }
        Err(_) => {
            tracing::warn!("logic did not answer disconnect in time; the lease will expire")
        }
    }
}

/// Waits for the Auth frame, skipping anything before it.
async fn handshake<T: Transport>(
    inner: &Inner,
    transport: &mut T,
    id: u64,
    wire: Wire,
    drain: &CancellationToken,
) -> Result<Frame, Goodbye> {
    let wait = async {
        loop {
            let read = transport.read_frame().await;
            if let Ok(Some(frame)) = &read {
                inner.stats.traffic.read(id, wire, frame_len(frame));
            }
            match read {
                Ok(Some(frame)) if frame.op == Op::AUTH => return Ok(frame),
                Ok(Some(frame)) => tracing::debug!(op = %frame.op, "frame before auth skipped"),
                Ok(None) => return Err(Goodbye::normal("bye")),
                Err(err) => {
                    if err.is_protocol_violation() {
                        stats::incr(&inner.stats.bad_frames);
                    }
                    tracing::debug!(reason = ?err.to_string(), "closed before auth");
                    return Err(Goodbye::for_read(&err));
                }
            }
        }
    };
    tokio::select! {
        auth = tokio::time::timeout(inner.config.handshake_timeout, wait) => match auth {
            Ok(auth) => auth,
            Err(_) => {
                stats::incr(&inner.stats.handshake_timeouts);
                tracing::debug!("no auth within the handshake timeout; closing");
                Err(Goodbye::policy("no auth within the handshake timeout"))
            }
        },
        () = drain.cancelled() => Err(Goodbye::going_away()),
    }
}

async fn close<T: Transport>(transport: &mut T, goodbye: Goodbye) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, transport.close(goodbye)).await;
}

/// The authenticated read/write loop.
async fn run<T: Transport>(
    inner: &Inner,
    transport: &mut T,
    session: &Arc<Session>,
    wire: Wire,
    idle_limit: Duration,
    auth_reply: Bytes,
    mut send_limit: im::SendLimit,
) -> End {
    // Replies this connection owes its client; written before queued pushes
    // (only the rest of a push a direct write began goes before them).
    let mut replies: Vec<Bytes> = vec![auth_reply];
    let deadline = tokio::time::sleep(idle_limit);
    tokio::pin!(deadline);
    let mut last_renew = Instant::now();
    loop {
        if let Some(reason) = session.close_reason() {
            return End::Closed(reason);
        }
        // Pushers write directly again only once this finds nothing to
        // write: after a write the loop comes back here to look.
        let taken = session.take_for_write(!replies.is_empty());
        if !replies.is_empty() || !taken.frames.is_empty() {
            let frames = in_order(std::mem::take(&mut replies), taken.frames, taken.head_sent);
            let head_sent = taken.head_sent;
            if let Some(end) =
                Box::pin(write(inner, transport, session, wire, head_sent, &frames)).await
            {
                return end;
            }
            continue;
        }

        let frame = tokio::select! {
            biased;
            () = session.woken() => continue,
            () = &mut deadline => return End::HeartbeatTimeout,
            read = transport.read_frame() => match read {
                Ok(Some(frame)) => frame,
                Ok(None) => return End::ClientClosed,
                Err(err) => return End::Read(err),
            },
        };
        // Whatever this frame asks may be answered: from now until the
        // answer is written, pushes queue behind it.
        session.hold_direct();
        inner
            .stats
            .traffic
            .read(session.id, wire, frame_len(&frame));
        match frame.op {
            Op::HEARTBEAT => {
                deadline.as_mut().reset(Instant::now() + idle_limit);
                let online = inner.room_online(session.room().as_deref());
                replies.push(encode(Frame::new(
                    Op::HEARTBEAT_REPLY,
                    frame.seq,
                    Bytes::copy_from_slice(&online.to_be_bytes()),
                )));
                if last_renew.elapsed() >= inner.config.presence_renew {
                    last_renew = Instant::now();
                    Box::pin(renew(inner, session)).await;
                }
            }
            Op::CHANGE_ROOM => {
                let room = match parse_room(&frame.body) {
                    Ok(room) => room,
                    Err(reason) => return End::Protocol(reason),
                };
                inner.bucket(&session.key).change_room(session, room);
                replies.push(encode(Frame::new(
                    Op::CHANGE_ROOM_REPLY,
                    frame.seq,
                    frame.body,
                )));
            }
            Op::SUB | Op::UNSUB => {
                let ops = match parse_ops(&frame.body) {
                    Ok(ops) => ops,
                    Err(reason) => return End::Protocol(reason),
                };
                let reply_op = if frame.op == Op::SUB {
                    if let Err(reason) = session.watch(&ops) {
                        return End::Protocol(reason);
                    }
                    Op::SUB_REPLY
                } else {
                    session.unwatch(&ops);
                    Op::UNSUB_REPLY
                };
                replies.push(encode(Frame::new(reply_op, frame.seq, frame.body)));
            }
            Op::AUTH => tracing::debug!("auth frame on an authenticated connection ignored"),
            op if im::is_request(op) => {
                if op == Op::IM_SEND
                    && let Some(wait) = send_limit.take()
                {
                    // Over the connection's limit: answered here, logic
                    // never sees it.
                    stats::incr(&inner.stats.upstream_limited);
                    let body = im::limited_reply(&frame.body, wait);
                    replies.push(encode(Frame::new(Op::IM_SEND_REPLY, frame.seq, body)));
                } else {
                    replies.extend(Box::pin(im_request(inner, session, frame)).await);
                }
            }
            op if im::is_push(op) => {
                tracing::debug!(op = op.0, "server-to-client IM op from a client ignored");
            }
            op => {
                let ack = encode(Frame::new(op, frame.seq, Bytes::new()));
                Box::pin(receive(inner, session, frame)).await;
                replies.push(ack);
            }
        }
    }
}

/// Writes frames within the slow-consumer timeout; a close requested
/// meanwhile (kick, replacement, drain) abandons the write at once.
async fn write<T: Transport>(
    inner: &Inner,
    transport: &mut T,
    session: &Session,
    wire: Wire,
    head_sent: usize,
    frames: &[Bytes],
) -> Option<End> {
    let write = tokio::time::timeout(
        inner.config.slow_consumer_timeout,
        transport.write_frames(head_sent, frames),
    );
    tokio::pin!(write);
    loop {
        tokio::select! {
            written = &mut write => return match written {
                Ok(Ok(bytes)) => {
                    inner.stats.traffic.written(session.id, wire, frames.len(), bytes);
                    None
                }
                Ok(Err(err)) => Some(End::Write(err)),
                Err(_) => {
                    if session.close(CloseReason::SlowConsumer) {
                        stats::incr(&inner.stats.slow_consumer_closes);
                    }
                    Some(End::Closed(CloseReason::SlowConsumer))
                }
            },
            // Frames queued meanwhile are picked up after this write.
            () = session.woken() => {
                if let Some(reason) = session.close_reason() {
                    return Some(End::Closed(reason));
                }
            }
        }
    }
}

/// Orders what the task writes: the rest of a push a direct write began
/// (it is on the wire in part: nothing may come between), then the replies
/// owed, then the other queued pushes.
fn in_order(replies: Vec<Bytes>, mut queued: VecDeque<Bytes>, head_sent: usize) -> Vec<Bytes> {
    if replies.is_empty() && head_sent == 0 {
        return Vec::from(queued);
    }
    let mut frames = Vec::with_capacity(replies.len() + queued.len());
    if head_sent > 0
        && let Some(begun) = queued.pop_front()
    {
        frames.push(begun);
    }
    frames.extend(replies);
    frames.extend(queued);
    frames
}

/// Renews the connection's presence lease; an IM connection also gets its
/// user's big groups back and its delivery channels are made exactly
/// those, repairing a join or leave it missed.
async fn renew(inner: &Inner, session: &Arc<Session>) {
    let req = logic::HeartbeatRequest {
        mid: session.mid,
        key: session.key.to_string(),
        server: inner.id.clone(),
        groups: session.accepts(Op::IM_MSG.0),
    };
    match tokio::time::timeout(LOGIC_CALL_TIMEOUT, inner.logic.heartbeat(req)).await {
        Ok(Ok(reply)) => {
            if reply.groups_known {
                let (joined, left) = inner
                    .bucket(&session.key)
                    .set_channels(session, &reply.groups);
                if joined + left > 0 {
                    tracing::debug!(joined, left, "group channels repaired at renewal");
                }
            }
        }
        Ok(Err(err)) => tracing::warn!(reason = ?err.to_string(), "presence renewal failed"),
        Err(_) => tracing::warn!("presence renewal timed out"),
    }
}

async fn receive(inner: &Inner, session: &Session, frame: Frame) {
    let req = logic::ReceiveRequest {
        mid: session.mid,
        key: session.key.to_string(),
        proto: Some(frame.into()),
    };
    // Per frame and at the client's will: debug lines, and counters.
    match tokio::time::timeout(LOGIC_CALL_TIMEOUT, inner.logic.receive(req)).await {
        Ok(Ok(_)) => stats::incr(&inner.stats.upstream_ok),
        Ok(Err(err)) => {
            stats::incr(&inner.stats.upstream_failed);
            tracing::debug!(reason = ?err.to_string(), "upstream frame not accepted by logic");
        }
        Err(_) => {
            stats::incr(&inner.stats.upstream_failed);
            tracing::debug!("logic did not take the upstream frame in time");
        }
    }
}

/// Hands an IM request to logic and returns the frames it answers (its
/// reply op with the request's seq). When logic cannot be reached the
/// client still gets its reply op, with code 5: nothing was stored, resend
/// later (a SEND with the same cmid is deduplicated).
async fn im_request(inner: &Inner, session: &Session, frame: Frame) -> Vec<Bytes> {
    let (op, seq) = (frame.op, frame.seq);
    let req = logic::ReceiveRequest {
        mid: session.mid,
        key: session.key.to_string(),
        proto: Some(frame.into()),
    };
    let failure = match tokio::time::timeout(LOGIC_CALL_TIMEOUT, inner.logic.receive(req)).await {
        Ok(Ok(reply)) => {
            stats::incr(&inner.stats.upstream_ok);
            return reply
                .replies
                .into_iter()
                .filter_map(|proto| match Frame::try_from(proto) {
                    Ok(frame) => frame.to_bytes().ok(),
                    Err(err) => {
                        tracing::warn!(%err, "logic answered an unusable IM reply frame");
                        None
                    }
                })
                .collect();
        }
        Ok(Err(err)) => err.to_string(),
        Err(_) => "logic did not answer in time".to_owned(),
    };
    stats::incr(&inner.stats.upstream_failed);
    tracing::debug!(op = op.0, reason = ?failure, "IM request not handled by logic");
    im::reply_op(op)
        .map(|reply| encode(Frame::new(reply, seq, im::unavailable_body())))
        .into_iter()
        .collect()
}

/// Returns a frame's size on the wire (header included).
fn frame_len(frame: &Frame) -> usize {
    rim_proto::HEADER_LEN + frame.body.len()
}

/// Encodes a reply; replies are built here with small bodies and cannot
/// exceed the wire limit.
fn encode(frame: Frame) -> Bytes {
    frame.to_bytes().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rest_of_a_begun_push_goes_before_replies_and_replies_before_queued_pushes() {
        let (begun, reply, queued) = (
            Bytes::from_static(b"begun"),
            Bytes::from_static(b"reply"),
            Bytes::from_static(b"queued"),
        );
        let both = || VecDeque::from([begun.clone(), queued.clone()]);
        assert_eq!(
            in_order(vec![reply.clone()], both(), 2),
            [begun.clone(), reply.clone(), queued.clone()]
        );
        // Nothing begun: replies first, as always.
        assert_eq!(
            in_order(vec![reply.clone()], both(), 0),
            [reply.clone(), begun.clone(), queued.clone()]
        );
        assert_eq!(in_order(Vec::new(), both(), 0), [begun, queued]);
    }
}
