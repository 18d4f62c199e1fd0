//! Sessions without a socket, for benchmarks of the delivery path.
//!
//! A [`DetachedSession`] sits in its bucket and room like a connected one,
//! so `push_msg`, `broadcast_room` and `broadcast` queue frames for it; the
//! caller drains its outbox in place of a connection's write task. Not part
//! of the comet's API: nothing in rim uses it.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use async_trait::async_trait;
use rim_proto::api::{LogicApi, RpcError, RpcResult};
use rim_proto::pb::logic::v1 as logic;

use crate::Comet;
use crate::session::Session;

/// A logic for comets whose sessions are attached directly: it refuses
/// every connect and node request and accepts the rest without effect.
#[doc(hidden)]
#[derive(Debug)]
pub struct NoLogic;

#[async_trait]
impl LogicApi for NoLogic {
    async fn connect(&self, _: logic::ConnectRequest) -> RpcResult<logic::ConnectReply> {
        Err(RpcError::Unavailable("no logic behind this comet".into()))
    }
    async fn disconnect(&self, _: logic::DisconnectRequest) -> RpcResult<bool> {
        Ok(false)
    }
    async fn heartbeat(&self, _: logic::HeartbeatRequest) -> RpcResult<logic::HeartbeatReply> {
        Ok(logic::HeartbeatReply::default())
    }
    async fn renew_online(
        &self,
        _: logic::RenewOnlineRequest,
    ) -> RpcResult<logic::RenewOnlineReply> {
        Ok(logic::RenewOnlineReply::default())
    }
    async fn receive(&self, _: logic::ReceiveRequest) -> RpcResult<logic::ReceiveReply> {
        Ok(logic::ReceiveReply::default())
    }
    async fn nodes(&self, _: logic::NodesRequest) -> RpcResult<logic::NodesReply> {
        Err(RpcError::Unavailable("no logic behind this comet".into()))
    }
}

/// A session in the comet's buckets with no connection behind it.
#[derive(Debug)]
pub struct DetachedSession {
    comet: Comet,
    session: Arc<Session>,
}

impl Comet {
    /// Adds a session with no socket under `key` for user `mid`, in `room`
    /// if given, accepting pushes of the ops in `accepts`; it stays until
    /// the returned handle is dropped. For benchmarks only.
    #[doc(hidden)]
    pub fn attach_detached(
        &self,
        key: &str,
        mid: i64,
        room: Option<&str>,
        accepts: &[i32],
    ) -> DetachedSession {
        let inner = &self.inner;
        let session = Arc::new(Session::new(
            inner.next_session_id(),
            key,
            mid,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            // A benchmark's set: bounded like a client's, truncated rather than refused.
            crate::limits::check_accepts(&accepts[..accepts.len().min(crate::limits::MAX_ACCEPTS)])
                .unwrap_or_default(),
            inner.config.write_queue,
        ));
        inner.bucket(key).put(&session, room.map(Into::into));
        DetachedSession {
            comet: self.clone(),
            session,
        }
    }
}

impl DetachedSession {
    /// Takes every frame queued for this session and returns how many there
    /// were (an op-9 batch counts as one).
    pub fn drain(&self) -> usize {
        self.session.take_queued().len()
    }
}

impl Drop for DetachedSession {
    fn drop(&mut self) {
        self.comet
            .inner
            .bucket(&self.session.key)
            .remove(&self.session);
    }
}
