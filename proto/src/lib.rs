//! rim-proto owns rim's wire contracts: the goim-compatible client frame and
//! its codec (TCP stream and WebSocket message forms, op-9 batches), and the
//! protobuf messages and gRPC services generated from `proto/rim/*.proto`
//! (comet service, logic service, queue message).
//!
//! [`api`] holds the Rust face of the two internal services: the `LogicApi`
//! and `CometApi` traits, their gRPC server adapters, and their remote (tonic
//! client) implementations, so that comet, logic and job depend on the
//! contract rather than on each other.
//!
//! [`im`] holds the JSON bodies of rim's IM ops (18–27): what a client
//! sends and what the server answers or pushes.
//!
//! It does not own transports: sockets, WebSocket upgrades and gRPC servers
//! live in the roles that use these types.

pub mod api;
mod batch;
mod codec;
mod error;
mod frame;
pub mod im;

pub use batch::{BatchBuilder, BatchFrames};
pub use codec::FrameCodec;
pub use error::FrameError;
pub use frame::{DEFAULT_MAX_BODY, Frame, HEADER_LEN, Op, PROTOCOL_VERSION};

/// Code generated from the .proto contracts; module paths mirror the
/// protobuf packages (`rim.<name>.v1`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    /// `rim.frame.v1`: the client frame as a message.
    pub mod frame {
        /// Version 1 of the frame package.
        pub mod v1 {
            tonic::include_proto!("rim.frame.v1");
        }
    }
    /// `rim.comet.v1`: the comet's gRPC service.
    pub mod comet {
        /// Version 1 of the comet package.
        pub mod v1 {
            tonic::include_proto!("rim.comet.v1");
        }
    }
    /// `rim.logic.v1`: the logic's gRPC service.
    pub mod logic {
        /// Version 1 of the logic package.
        pub mod v1 {
            tonic::include_proto!("rim.logic.v1");
        }
    }
    /// `rim.queue.v1`: the push message carried by the queue.
    pub mod queue {
        /// Version 1 of the queue package.
        pub mod v1 {
            tonic::include_proto!("rim.queue.v1");
        }
    }
}

impl From<Frame> for pb::frame::v1::Proto {
    fn from(frame: Frame) -> Self {
        Self {
            ver: i32::from(frame.ver),
            op: frame.op.0,
            seq: frame.seq,
            body: frame.body,
        }
    }
}

impl TryFrom<pb::frame::v1::Proto> for Frame {
    type Error = FrameError;

    /// Converts a protobuf frame, rejecting a version outside the 16-bit wire field.
    fn try_from(proto: pb::frame::v1::Proto) -> Result<Self, FrameError> {
        let ver = i16::try_from(proto.ver).map_err(|_| FrameError::BadVersion(proto.ver))?;
        Ok(Frame {
            ver,
            op: Op(proto.op),
            seq: proto.seq,
            body: proto.body,
        })
    }
}
