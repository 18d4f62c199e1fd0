use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

use crate::FrameError;

/// Length of the fixed frame header: pack_len(4) header_len(2) ver(2) op(4) seq(4).
pub const HEADER_LEN: usize = 16;

/// Protocol version servers write in every frame.
pub const PROTOCOL_VERSION: i16 = 1;

/// Default limit on a client frame's body (goim's limit: 4096 bytes).
pub const DEFAULT_MAX_BODY: usize = 4096;

/// Largest body a frame can carry at all: pack_len is an int32.
const MAX_WIRE_BODY: usize = i32::MAX as usize - HEADER_LEN;

/// An operation code (protocol.md §1). Business ops are >= 1000 by convention.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Op(pub i32);

impl Op {
    /// Reserved, unused by goim.
    pub const HANDSHAKE: Op = Op(0);
    /// Reserved, unused by goim.
    pub const HANDSHAKE_REPLY: Op = Op(1);
    /// Client heartbeat, empty body.
    pub const HEARTBEAT: Op = Op(2);
    /// Heartbeat reply; body = int32 online count of the connection's room.
    pub const HEARTBEAT_REPLY: Op = Op(3);
    /// Upstream message (reserved in goim).
    pub const SEND_MSG: Op = Op(4);
    /// Upstream message reply (reserved in goim).
    pub const SEND_MSG_REPLY: Op = Op(5);
    /// Disconnect notice (reserved in goim).
    pub const DISCONNECT_REPLY: Op = Op(6);
    /// First client frame; body = auth token.
    pub const AUTH: Op = Op(7);
    /// Auth accepted; same seq as the Auth frame, empty body.
    pub const AUTH_REPLY: Op = Op(8);
    /// Batch: body is a concatenation of complete frames.
    pub const RAW: Op = Op(9);
    /// Internal marker, never on the wire.
    pub const PROTO_READY: Op = Op(10);
    /// Internal marker, never on the wire.
    pub const PROTO_FINISH: Op = Op(11);
    /// Change room; body = new room id, empty = leave.
    pub const CHANGE_ROOM: Op = Op(12);
    /// Change room reply.
    pub const CHANGE_ROOM_REPLY: Op = Op(13);
    /// Subscribe to ops; body = comma-separated op list.
    pub const SUB: Op = Op(14);
    /// Subscribe reply.
    pub const SUB_REPLY: Op = Op(15);
    /// Unsubscribe from ops; body = comma-separated op list.
    pub const UNSUB: Op = Op(16);
    /// Unsubscribe reply.
    pub const UNSUB_REPLY: Op = Op(17);

    /// IM SEND (c→s): a message to store; body [`im::SendRequest`](crate::im::SendRequest).
    pub const IM_SEND: Op = Op(18);
    /// IM SEND_REPLY (s→c), echoing the SEND's seq; body [`im::SendReply`](crate::im::SendReply).
    pub const IM_SEND_REPLY: Op = Op(19);
    /// IM ACK (c→s), no reply; body [`im::Ack`](crate::im::Ack).
    pub const IM_ACK: Op = Op(20);
    /// IM MSG (s→c, pushed, may be inside op-9 batches); body [`im::Msg`](crate::im::Msg).
    pub const IM_MSG: Op = Op(21);
    /// IM SYNC (c→s): inbox entries after a sync; body [`im::SyncRequest`](crate::im::SyncRequest).
    pub const IM_SYNC: Op = Op(22);
    /// IM SYNC_REPLY (s→c), echoing the SYNC's seq; body [`im::SyncReply`](crate::im::SyncReply).
    pub const IM_SYNC_REPLY: Op = Op(23);
    /// IM PULL (c→s): a page of a conversation; body [`im::PullRequest`](crate::im::PullRequest).
    pub const IM_PULL: Op = Op(24);
    /// IM PULL_REPLY (s→c), echoing the PULL's seq; body [`im::PullReply`](crate::im::PullReply).
    pub const IM_PULL_REPLY: Op = Op(25);
    /// IM READ (c→s), no reply; body [`im::ReadRequest`](crate::im::ReadRequest).
    pub const IM_READ: Op = Op(26);
    /// IM NOTIFY (s→c, pushed); body [`im::Notify`](crate::im::Notify).
    pub const IM_NOTIFY: Op = Op(27);

    /// Every op goim names (0–17), in numeric order; rim's IM ops are in
    /// [`Op::IM`].
    pub const KNOWN: [Op; 18] = [
        Op::HANDSHAKE,
        Op::HANDSHAKE_REPLY,
        Op::HEARTBEAT,
        Op::HEARTBEAT_REPLY,
        Op::SEND_MSG,
        Op::SEND_MSG_REPLY,
        Op::DISCONNECT_REPLY,
        Op::AUTH,
        Op::AUTH_REPLY,
        Op::RAW,
        Op::PROTO_READY,
        Op::PROTO_FINISH,
        Op::CHANGE_ROOM,
        Op::CHANGE_ROOM_REPLY,
        Op::SUB,
        Op::SUB_REPLY,
        Op::UNSUB,
        Op::UNSUB_REPLY,
    ];

    /// rim's IM ops (18–27, im.md "Client ops"), in numeric order.
    pub const IM: [Op; 10] = [
        Op::IM_SEND,
        Op::IM_SEND_REPLY,
        Op::IM_ACK,
        Op::IM_MSG,
        Op::IM_SYNC,
        Op::IM_SYNC_REPLY,
        Op::IM_PULL,
        Op::IM_PULL_REPLY,
        Op::IM_READ,
        Op::IM_NOTIFY,
    ];

    /// The IM ops a server pushes unasked (MSG, NOTIFY): a connection gets
    /// them only if its Auth `accepts` lists them.
    pub const IM_PUSHED: [Op; 2] = [Op::IM_MSG, Op::IM_NOTIFY];

    /// Returns whether this is one of rim's IM ops (18–27).
    pub fn is_im(self) -> bool {
        (Op::IM_SEND.0..=Op::IM_NOTIFY.0).contains(&self.0)
    }

    /// Returns the protocol name of a known op (goim's or IM's).
    pub fn name(self) -> Option<&'static str> {
        const NAMES: [&str; 28] = [
            "handshake",
            "handshake_reply",
            "heartbeat",
            "heartbeat_reply",
            "send_msg",
            "send_msg_reply",
            "disconnect_reply",
            "auth",
            "auth_reply",
            "raw",
            "proto_ready",
            "proto_finish",
            "change_room",
            "change_room_reply",
            "sub",
            "sub_reply",
            "unsub",
            "unsub_reply",
            "im_send",
            "im_send_reply",
            "im_ack",
            "im_msg",
            "im_sync",
            "im_sync_reply",
            "im_pull",
            "im_pull_reply",
            "im_read",
            "im_notify",
        ];
        usize::try_from(self.0)
            .ok()
            .and_then(|i| NAMES.get(i).copied())
    }
}

impl fmt::Debug for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{}({name})", self.0),
            None => write!(f, "{}", self.0),
        }
    }
}

/// One client frame: the 16-byte header fields and a body that shares its
/// memory with the buffer it was read from.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    /// Protocol version (servers send 1).
    pub ver: i16,
    /// Operation.
    pub op: Op,
    /// Request sequence, echoed in replies.
    pub seq: i32,
    /// Body bytes.
    pub body: Bytes,
}

impl Frame {
    /// Builds a version-1 frame.
    pub fn new(op: Op, seq: i32, body: impl Into<Bytes>) -> Self {
        Frame {
            ver: PROTOCOL_VERSION,
            op,
            seq,
            body: body.into(),
        }
    }

    /// Returns whether this frame is an op-9 batch of inner frames.
    pub fn is_batch(&self) -> bool {
        self.op == Op::RAW
    }

    /// Returns the frame's length on the wire (header + body).
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.body.len()
    }

    /// Returns the 16-byte header, so a writer can send header and body as
    /// two slices of one vectored write without copying the body.
    pub fn header(&self) -> Result<[u8; HEADER_LEN], FrameError> {
        if self.body.len() > MAX_WIRE_BODY {
            return Err(FrameError::BodyTooLarge {
                len: self.body.len() as u64,
                max: MAX_WIRE_BODY as u64,
            });
        }
        // Fits: checked against MAX_WIRE_BODY just above.
        let pack_len = (HEADER_LEN + self.body.len()) as i32;
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&pack_len.to_be_bytes());
        header[4..6].copy_from_slice(&(HEADER_LEN as i16).to_be_bytes());
        header[6..8].copy_from_slice(&self.ver.to_be_bytes());
        header[8..12].copy_from_slice(&self.op.0.to_be_bytes());
        header[12..16].copy_from_slice(&self.seq.to_be_bytes());
        Ok(header)
    }

    /// Appends the encoded frame to `dst`.
    pub fn encode_into(&self, dst: &mut BytesMut) -> Result<(), FrameError> {
        let header = self.header()?;
        dst.reserve(self.encoded_len());
        dst.put_slice(&header);
        dst.put_slice(&self.body);
        Ok(())
    }

    /// Encodes the frame once into its own buffer, ready to be shared by
    /// every recipient of a push and sent as one WebSocket message.
    pub fn to_bytes(&self) -> Result<Bytes, FrameError> {
        let mut buf = BytesMut::with_capacity(self.encoded_len());
        self.encode_into(&mut buf)?;
        Ok(buf.freeze())
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frame")
            .field("ver", &self.ver)
            .field("op", &self.op)
            .field("seq", &self.seq)
            .field("body_len", &self.body.len())
            .finish()
    }
}

/// The header fields of a frame, parsed but not yet checked.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Header {
    pub(crate) pack_len: i32,
    pub(crate) header_len: i16,
    pub(crate) ver: i16,
    pub(crate) op: i32,
    pub(crate) seq: i32,
}

impl Header {
    /// Parses the first 16 bytes of `buf`; returns `None` when there are fewer.
    pub(crate) fn parse(buf: &[u8]) -> Option<Header> {
        let b: &[u8; HEADER_LEN] = buf.get(..HEADER_LEN)?.try_into().ok()?;
        Some(Header {
            pack_len: i32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            header_len: i16::from_be_bytes([b[4], b[5]]),
            ver: i16::from_be_bytes([b[6], b[7]]),
            op: i32::from_be_bytes([b[8], b[9], b[10], b[11]]),
            seq: i32::from_be_bytes([b[12], b[13], b[14], b[15]]),
        })
    }

    /// Checks the length fields and returns the body length, which is at most `max_body`.
    pub(crate) fn body_len(&self, max_body: usize) -> Result<usize, FrameError> {
        if self.header_len != HEADER_LEN as i16 {
            return Err(FrameError::BadHeaderLen(self.header_len));
        }
        let body_len = usize::try_from(self.pack_len)
            .ok()
            .and_then(|pack_len| pack_len.checked_sub(HEADER_LEN))
            .ok_or(FrameError::PackLenTooShort(self.pack_len))?;
        if body_len > max_body {
            return Err(FrameError::BodyTooLarge {
                len: body_len as u64,
                max: max_body as u64,
            });
        }
        Ok(body_len)
    }

    /// Builds the frame from this header and its body.
    pub(crate) fn into_frame(self, body: Bytes) -> Frame {
        Frame {
            ver: self.ver,
            op: Op(self.op),
            seq: self.seq,
            body,
        }
    }
}
