//! The IM ops (im.md, "Client ops") on a [`Client`]: typed requests, replies
//! matched by header seq, and pushed MSG and NOTIFY frames decoded as
//! [`ImEvent`]s.
//!
//! Nothing read while waiting for a reply is dropped: every other frame
//! (inner frames of op-9 batches included) is kept, in arrival order, for
//! [`Client::next_frame`] and [`Client::next_im`].

use std::time::Duration;

use rim_proto::im::{
    Ack, Body, Msg, Notify, PullReply, PullRequest, ReadRequest, Request, SendReply, SendRequest,
    SyncReply, SyncRequest,
};
use rim_proto::{Frame, Op};

use crate::{AuthToken, Client, Error, Result};

/// An IM frame the server sent (ops 19, 21, 23, 25, 27), decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImEvent {
    /// SEND_REPLY to the SEND whose header seq was `seq`.
    SendReply {
        /// The SEND's header seq.
        seq: i32,
        /// The reply.
        reply: SendReply,
    },
    /// A pushed message.
    Msg(Msg),
    /// SYNC_REPLY to the SYNC whose header seq was `seq`.
    SyncReply {
        /// The SYNC's header seq.
        seq: i32,
        /// The reply.
        reply: SyncReply,
    },
    /// PULL_REPLY to the PULL whose header seq was `seq`.
    PullReply {
        /// The PULL's header seq.
        seq: i32,
        /// The reply.
        reply: PullReply,
    },
    /// A pushed notice.
    Notify(Notify),
}

impl ImEvent {
    /// Decodes a frame the server sent: `Ok(None)` when its op is not one
    /// the server sends in IM (goim ops, business pushes, an undecoded op-9
    /// batch, a client-to-server IM op); an error when its body does not
    /// decode.
    pub fn from_frame(frame: &Frame) -> Result<Option<ImEvent>> {
        let event = match frame.op {
            Op::IM_SEND_REPLY => ImEvent::SendReply {
                seq: frame.seq,
                reply: decode(frame)?,
            },
            Op::IM_MSG => ImEvent::Msg(decode(frame)?),
            Op::IM_SYNC_REPLY => ImEvent::SyncReply {
                seq: frame.seq,
                reply: decode(frame)?,
            },
            Op::IM_PULL_REPLY => ImEvent::PullReply {
                seq: frame.seq,
                reply: decode(frame)?,
            },
            Op::IM_NOTIFY => ImEvent::Notify(decode(frame)?),
            _ => return Ok(None),
        };
        Ok(Some(event))
    }
}

/// Decodes a frame's body as `B`, naming the op when it does not.
fn decode<B: Body>(frame: &Frame) -> Result<B> {
    B::decode(&frame.body).map_err(|source| Error::Body {
        op: frame.op,
        source,
    })
}

impl AuthToken {
    /// Adds the pushed IM ops (MSG 21, NOTIFY 27) to `accepts`, without
    /// which the server pushes no IM frame to this connection.
    pub fn accepting_im(mut self) -> AuthToken {
        for op in Op::IM_PUSHED {
            if !self.accepts.contains(&op.0) {
                self.accepts.push(op.0);
            }
        }
        self
    }
}

impl Client {
    /// Sends one IM body with the next header seq and returns that seq (the
    /// one its reply, if the op has one, echoes).
    pub async fn send_body<B: Body>(&mut self, body: &B) -> Result<i32> {
        let seq = self.next_seq();
        self.send(body.to_frame(seq)).await?;
        Ok(seq)
    }

    /// Sends a SEND (op 18) and returns its header seq; the SEND_REPLY comes
    /// later (see [`Client::reply_to`], [`Client::next_im`]).
    pub async fn send_im(&mut self, req: &SendRequest) -> Result<i32> {
        self.send_body(req).await
    }

    /// Sends an ACK (op 20): this device has every inbox entry up to `sync`.
    pub async fn ack(&mut self, sync: u64) -> Result<()> {
        self.send_body(&Ack { sync }).await.map(drop)
    }

    /// Sends a SYNC (op 22) for the inbox entries after `after` (at most
    /// `limit`, 0 = the server's default) and returns its header seq.
    pub async fn sync(&mut self, after: u64, limit: u32) -> Result<i32> {
        self.send_body(&SyncRequest { sync: after, limit }).await
    }

    /// Sends a PULL (op 24) and returns its header seq.
    pub async fn pull(&mut self, req: &PullRequest) -> Result<i32> {
        self.send_body(req).await
    }

    /// Sends a READ (op 26): the user has read `conv` up to `seq`.
    pub async fn read(&mut self, conv: &str, seq: u64) -> Result<()> {
        let read = ReadRequest {
            conv: conv.to_owned(),
            seq,
        };
        self.send_body(&read).await.map(drop)
    }

    /// Sends a SEND, SYNC or PULL and waits at most `timeout` for its reply
    /// (the reply op with the request's header seq), keeping every other
    /// frame for later reads. A refusal is a reply: check its `code`.
    pub async fn request<R: Request>(&mut self, req: &R, timeout: Duration) -> Result<R::Reply> {
        let seq = self.send_body(req).await?;
        self.reply_to::<R>(seq, timeout).await
    }

    /// Waits at most `timeout` for the reply to the request of type `R`
    /// sent with header seq `seq`, whether it is already buffered or still
    /// to come, keeping every other frame for later reads.
    pub async fn reply_to<R: Request>(&mut self, seq: i32, timeout: Duration) -> Result<R::Reply> {
        let op = <R::Reply as Body>::OP;
        let frame = tokio::time::timeout(timeout, self.wait_for(op, seq))
            .await
            .map_err(|_| Error::ReplyTimeout { op, seq, timeout })??;
        decode(&frame)
    }

    /// Returns the next IM frame the server sent, decoded; other frames are
    /// read and discarded (use [`Client::next_frame`] with
    /// [`ImEvent::from_frame`] to see them). `None` when the server closed
    /// the connection.
    pub async fn next_im(&mut self) -> Result<Option<ImEvent>> {
        loop {
            let Some(frame) = self.next_frame().await? else {
                return Ok(None);
            };
            if let Some(event) = ImEvent::from_frame(&frame)? {
                return Ok(Some(event));
            }
        }
    }

    /// Finds the frame with `op` and `seq`: first among the frames already
    /// kept, then on the wire, inside op-9 batches too. Every other frame
    /// read is kept as it arrives, so a timeout dropping this future loses
    /// nothing. A batch holding the frame is kept unpacked even when
    /// unpacking is off.
    async fn wait_for(&mut self, op: Op, seq: i32) -> Result<Frame> {
        let wanted = |frame: &Frame| frame.op == op && frame.seq == seq;
        if let Some(frame) = self
            .pending
            .iter()
            .position(wanted)
            .and_then(|at| self.pending.remove(at))
        {
            return Ok(frame);
        }
        loop {
            let frame = self.recv().await?.ok_or(Error::Closed)?;
            if wanted(&frame) {
                return Ok(frame);
            }
            if !frame.is_batch() {
                self.pending.push_back(frame);
                continue;
            }
            let mut inner = frame.batch_frames().collect::<Result<Vec<_>, _>>()?;
            match inner.iter().position(wanted) {
                Some(at) => {
                    let found = inner.remove(at);
                    self.pending.extend(inner);
                    return Ok(found);
                }
                None if self.unpack_batches => self.pending.extend(inner),
                None => self.pending.push_back(frame),
            }
        }
    }
}
