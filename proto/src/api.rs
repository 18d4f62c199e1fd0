//! The internal services as Rust traits, each with a gRPC server adapter and
//! a remote implementation over a tonic channel. A role calls the trait; a
//! process wires in either the local implementation (another role's struct
//! in the same process) or the remote one.

use std::sync::Arc;

use async_trait::async_trait;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::pb::comet::v1 as comet;
use crate::pb::logic::v1 as logic;

/// Why a call to another role failed.
///
/// It is what crosses the wire: a gRPC status carries a code and a message
/// only, so each variant holds the message (a local cause is formatted into
/// it where the error is made). [`RpcError::code`] is the one mapping to a
/// tonic status; the HTTP API has its own errors.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RpcError {
    /// The caller's credentials (e.g. a client token) were refused.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The request itself is wrong; retrying it cannot help.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The callee (or something it needs) is unreachable or overloaded; a
    /// retry later may succeed.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The callee failed; a bug or an unexpected state.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Result of a call to another role.
pub type RpcResult<T> = Result<T, RpcError>;

impl RpcError {
    /// Returns the gRPC status code for this error (the one mapping to tonic).
    pub fn code(&self) -> tonic::Code {
        match self {
            RpcError::Unauthenticated(_) => tonic::Code::Unauthenticated,
            RpcError::InvalidArgument(_) => tonic::Code::InvalidArgument,
            RpcError::Unavailable(_) => tonic::Code::Unavailable,
            RpcError::Internal(_) => tonic::Code::Internal,
        }
    }

    /// Returns whether retrying the same call may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, RpcError::Unavailable(_))
    }
}

impl From<RpcError> for Status {
    fn from(err: RpcError) -> Self {
        let code = err.code();
        let message = match err {
            RpcError::Unauthenticated(m)
            | RpcError::InvalidArgument(m)
            | RpcError::Unavailable(m)
            | RpcError::Internal(m) => m,
        };
        Status::new(code, message)
    }
}

impl From<Status> for RpcError {
    fn from(status: Status) -> Self {
        let message = status.message().to_owned();
        match status.code() {
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                RpcError::Unauthenticated(message)
            }
            tonic::Code::InvalidArgument
            | tonic::Code::OutOfRange
            | tonic::Code::FailedPrecondition => RpcError::InvalidArgument(message),
            tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::ResourceExhausted
            | tonic::Code::Aborted
            | tonic::Code::Cancelled => RpcError::Unavailable(message),
            code => RpcError::Internal(format!("{code:?}: {message}")),
        }
    }
}

/// Returns whether a secret given by a caller equals the expected one,
/// comparing every byte without an early exit, so that the time taken does
/// not reveal how much of a guess was right (only whether its length was).
/// The one comparison of bearer tokens, for the HTTP API and gRPC alike.
pub fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The metadata key that carries the cluster's gRPC token.
const AUTHORIZATION: &str = "authorization";

/// What a gRPC client sends with every call: `authorization: Bearer
/// <node.grpc_token>` when a token is set (marked sensitive so that it is
/// never printed), nothing otherwise.
#[derive(Clone, Debug, Default)]
struct SendToken(Option<AsciiMetadataValue>);

impl SendToken {
    fn new(token: Option<&str>) -> RpcResult<SendToken> {
        let Some(token) = token else {
            return Ok(SendToken(None));
        };
        let mut value: AsciiMetadataValue = format!("Bearer {token}").parse().map_err(|_| {
            RpcError::InvalidArgument(
                "node.grpc_token: not valid in gRPC metadata (visible ASCII only)".into(),
            )
        })?;
        value.set_sensitive(true);
        Ok(SendToken(Some(value)))
    }

    /// Wraps `message` in a request carrying the token, when there is one.
    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(token) = &self.0 {
            request.metadata_mut().insert(AUTHORIZATION, token.clone());
        }
        request
    }
}

/// A gRPC server's check of the cluster's shared token (`node.grpc_token`):
/// with a token set, every call must carry `authorization: Bearer <token>`
/// or is refused as `Unauthenticated`; without one, every call passes.
#[derive(Clone, Default)]
pub struct RequireToken {
    expected: Option<Arc<str>>,
}

impl std::fmt::Debug for RequireToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequireToken")
            .field("set", &self.expected.is_some())
            .finish()
    }
}

impl RequireToken {
    /// Checks calls against `token`; `None` lets every call through.
    pub fn new(token: Option<&str>) -> RequireToken {
        RequireToken {
            expected: token.map(Arc::from),
        }
    }
}

impl Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        let given = request
            .metadata()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(token) if same_secret(token.as_bytes(), expected.as_bytes()) => Ok(request),
            Some(_) => Err(Status::unauthenticated(
                "the grpc token does not match node.grpc_token",
            )),
            None => Err(Status::unauthenticated(
                "grpc calls need authorization: Bearer <node.grpc_token>",
            )),
        }
    }
}

/// What a comet asks of logic (protocol.md §3, logic service).
#[async_trait]
pub trait LogicApi: Send + Sync + 'static {
    /// Authenticates a connection's token and records it as online.
    async fn connect(&self, req: logic::ConnectRequest) -> RpcResult<logic::ConnectReply>;
    /// Records that a connection ended; returns whether it was known.
    async fn disconnect(&self, req: logic::DisconnectRequest) -> RpcResult<bool>;
    /// Renews a connection's presence lease; when asked, answers the
    /// user's big groups.
    async fn heartbeat(&self, req: logic::HeartbeatRequest) -> RpcResult<logic::HeartbeatReply>;
    /// Stores a comet's room counts and returns the cluster-wide counts.
    async fn renew_online(
        &self,
        req: logic::RenewOnlineRequest,
    ) -> RpcResult<logic::RenewOnlineReply>;
    /// Hands an upstream client frame to logic: an IM request (ops 18–27)
    /// is handled there and may answer frames for the connection; any other
    /// op goes to the business.
    async fn receive(&self, req: logic::ReceiveRequest) -> RpcResult<logic::ReceiveReply>;
    /// Selects comets for a client.
    async fn nodes(&self, req: logic::NodesRequest) -> RpcResult<logic::NodesReply>;
}

/// The most pushes one `PushMsgs` call may carry; a comet refuses a larger
/// batch whole as `InvalidArgument`. The job sends at most a quarter of it,
/// so that a later job may send more without a comet refusing it.
pub const PUSH_BATCH_MAX_PUSHES: usize = 1024;

/// The most encoded bytes (the pushes' protobuf lengths summed) one
/// `PushMsgs` call may carry; a comet refuses a larger batch whole as
/// `InvalidArgument`. It is also tonic's default limit on a decoded message.
pub const PUSH_BATCH_MAX_BYTES: usize = 4 << 20;

/// Refuses a `PushMsgs` batch over [`PUSH_BATCH_MAX_PUSHES`] or
/// [`PUSH_BATCH_MAX_BYTES`], before any push of it is applied.
pub fn check_push_batch(req: &comet::PushMsgsRequest) -> RpcResult<()> {
    use prost::Message as _;
    if req.pushes.len() > PUSH_BATCH_MAX_PUSHES {
        return Err(RpcError::InvalidArgument(format!(
            "push batch of {} pushes: the most is {PUSH_BATCH_MAX_PUSHES}",
            req.pushes.len()
        )));
    }
    let bytes: usize = req.pushes.iter().map(|push| push.encoded_len()).sum();
    if bytes > PUSH_BATCH_MAX_BYTES {
        return Err(RpcError::InvalidArgument(format!(
            "push batch of {bytes} bytes: the most is {PUSH_BATCH_MAX_BYTES}"
        )));
    }
    Ok(())
}

/// A `PushMsgs` reply built one push's result at a time.
#[derive(Debug, Default)]
pub struct PushBatchReply {
    reply: comet::PushMsgsReply,
    total: comet::Delivery,
}

impl PushBatchReply {
    /// Adds the result of the push at `index`: its counts, or its refusal
    /// as invalid (listed, the batch goes on); any other error is handed
    /// back, failing the whole call.
    pub fn add(&mut self, index: usize, result: RpcResult<comet::Delivery>) -> RpcResult<()> {
        match result {
            Ok(delivery) => {
                let total = &mut self.total;
                total.delivered += delivery.delivered;
                total.filtered += delivery.filtered;
                total.missing += delivery.missing;
                total.dropped += delivery.dropped;
                Ok(())
            }
            Err(RpcError::InvalidArgument(reason)) => {
                self.reply.refused.push(comet::RefusedPush {
                    // A checked batch has at most PUSH_BATCH_MAX_PUSHES pushes.
                    index: u32::try_from(index).unwrap_or(u32::MAX),
                    reason,
                });
                Ok(())
            }
            Err(err) => Err(err),
        }
    }

    /// Returns the reply: the summed counts and the refused pushes.
    pub fn finish(mut self) -> comet::PushMsgsReply {
        self.reply.delivery = Some(self.total);
        self.reply
    }
}

/// What the job (and admin endpoints) ask of a comet (protocol.md §3, comet service).
#[async_trait]
pub trait CometApi: Send + Sync + 'static {
    /// Delivers a frame to connections by key, filtered by their accepted ops.
    async fn push_msg(&self, req: comet::PushMsgRequest) -> RpcResult<comet::Delivery>;
    /// Applies a batch of pushes in order, each as [`CometApi::push_msg`]:
    /// a push refused as invalid is listed in the reply's `refused` and the
    /// others still go; any other error fails the whole call (the caller
    /// retries it all). A batch over [`check_push_batch`]'s bounds is
    /// refused whole.
    ///
    /// The default does exactly that with `push_msg`, so that an in-process
    /// comet or a test fake needs nothing more; [`RemoteComet`] overrides
    /// it with the one `PushMsgs` RPC.
    async fn push_msgs(&self, req: comet::PushMsgsRequest) -> RpcResult<comet::PushMsgsReply> {
        check_push_batch(&req)?;
        let mut reply = PushBatchReply::default();
        for (index, push) in req.pushes.into_iter().enumerate() {
            reply.add(index, self.push_msg(push).await)?;
        }
        Ok(reply.finish())
    }
    /// Delivers a frame to every connection accepting the op, paced.
    async fn broadcast(&self, req: comet::BroadcastRequest) -> RpcResult<comet::Delivery>;
    /// Delivers a frame to every member of a room.
    async fn broadcast_room(&self, req: comet::BroadcastRoomRequest) -> RpcResult<comet::Delivery>;
    /// Delivers a frame to the connections in a big group's channel that
    /// accept the op.
    async fn broadcast_group(
        &self,
        req: comet::BroadcastGroupRequest,
    ) -> RpcResult<comet::Delivery>;
    /// Adds connections to, or removes them from, a big group's channel.
    async fn change_group(
        &self,
        req: comet::ChangeGroupRequest,
    ) -> RpcResult<comet::ChangeGroupReply>;
    /// Lists the rooms with members on the comet.
    async fn rooms(&self) -> RpcResult<Vec<String>>;
    /// Closes connections by key; returns how many were found.
    async fn kick(&self, keys: Vec<String>) -> RpcResult<u64>;
    /// Reports the comet's counters.
    async fn stats(&self) -> RpcResult<comet::StatsReply>;
}

/// `LogicApi` over gRPC: a tonic client on a (possibly load-balanced) channel.
#[derive(Clone, Debug)]
pub struct RemoteLogic {
    client: logic::logic_client::LogicClient<Channel>,
    /// Sent with every call.
    token: SendToken,
}

impl RemoteLogic {
    /// Wraps a channel to one logic or a balanced set of them.
    pub fn new(channel: Channel) -> Self {
        RemoteLogic {
            client: logic::logic_client::LogicClient::new(channel),
            token: SendToken::default(),
        }
    }

    /// Sends `token` (the cluster's `node.grpc_token`) with every call;
    /// `None` sends none.
    pub fn with_token(mut self, token: Option<&str>) -> RpcResult<Self> {
        self.token = SendToken::new(token)?;
        Ok(self)
    }
}

#[async_trait]
impl LogicApi for RemoteLogic {
    async fn connect(&self, req: logic::ConnectRequest) -> RpcResult<logic::ConnectReply> {
        Ok(self
            .client
            .clone()
            .connect(self.token.request(req))
            .await?
            .into_inner())
    }

    async fn disconnect(&self, req: logic::DisconnectRequest) -> RpcResult<bool> {
        Ok(self
            .client
            .clone()
            .disconnect(self.token.request(req))
            .await?
            .into_inner()
            .known)
    }

    async fn heartbeat(&self, req: logic::HeartbeatRequest) -> RpcResult<logic::HeartbeatReply> {
        Ok(self
            .client
            .clone()
            .heartbeat(self.token.request(req))
            .await?
            .into_inner())
    }

    async fn renew_online(
        &self,
        req: logic::RenewOnlineRequest,
    ) -> RpcResult<logic::RenewOnlineReply> {
        Ok(self
            .client
            .clone()
            .renew_online(self.token.request(req))
            .await?
            .into_inner())
    }

    async fn receive(&self, req: logic::ReceiveRequest) -> RpcResult<logic::ReceiveReply> {
        Ok(self
            .client
            .clone()
            .receive(self.token.request(req))
            .await?
            .into_inner())
    }

    async fn nodes(&self, req: logic::NodesRequest) -> RpcResult<logic::NodesReply> {
        Ok(self
            .client
            .clone()
            .nodes(self.token.request(req))
            .await?
            .into_inner())
    }
}

/// `CometApi` over gRPC: a tonic client to one comet.
#[derive(Clone, Debug)]
pub struct RemoteComet {
    client: comet::comet_client::CometClient<Channel>,
    /// Sent with every call.
    token: SendToken,
}

impl RemoteComet {
    /// Wraps a channel to one comet.
    pub fn new(channel: Channel) -> Self {
        RemoteComet {
            client: comet::comet_client::CometClient::new(channel),
            token: SendToken::default(),
        }
    }

    /// Sends `token` (the cluster's `node.grpc_token`) with every call;
    /// `None` sends none.
    pub fn with_token(mut self, token: Option<&str>) -> RpcResult<Self> {
        self.token = SendToken::new(token)?;
        Ok(self)
    }

    /// Creates a plaintext client for the comet at `addr` (`host:port`)
    /// that connects on first use, so a comet that is down does not stop
    /// its caller.
    pub fn connect_lazy(addr: &str) -> RpcResult<Self> {
        Self::connect_lazy_with_tls(addr, &rim_tls::GrpcTls::plaintext())
    }

    /// Like [`RemoteComet::connect_lazy`], over TLS when `tls` says so
    /// (`node.tls_ca`, presenting `node.tls_cert` to a comet that asks).
    pub fn connect_lazy_with_tls(addr: &str, tls: &rim_tls::GrpcTls) -> RpcResult<Self> {
        let endpoint = tls
            .endpoint(addr)
            .map_err(|e| RpcError::InvalidArgument(format!("bad comet address {addr:?}: {e}")))?
            .connect_timeout(std::time::Duration::from_secs(3))
            .timeout(std::time::Duration::from_secs(30));
        Ok(RemoteComet::new(endpoint.connect_lazy()))
    }
}

#[async_trait]
impl CometApi for RemoteComet {
    async fn push_msg(&self, req: comet::PushMsgRequest) -> RpcResult<comet::Delivery> {
        let reply = self
            .client
            .clone()
            .push_msg(self.token.request(req))
            .await?
            .into_inner();
        Ok(reply.delivery.unwrap_or_default())
    }

    async fn push_msgs(&self, req: comet::PushMsgsRequest) -> RpcResult<comet::PushMsgsReply> {
        Ok(self
            .client
            .clone()
            .push_msgs(self.token.request(req))
            .await?
            .into_inner())
    }

    async fn broadcast(&self, req: comet::BroadcastRequest) -> RpcResult<comet::Delivery> {
        let reply = self
            .client
            .clone()
            .broadcast(self.token.request(req))
            .await?
            .into_inner();
        Ok(reply.delivery.unwrap_or_default())
    }

    async fn broadcast_room(&self, req: comet::BroadcastRoomRequest) -> RpcResult<comet::Delivery> {
        let reply = self
            .client
            .clone()
            .broadcast_room(self.token.request(req))
            .await?
            .into_inner();
        Ok(reply.delivery.unwrap_or_default())
    }

    async fn broadcast_group(
        &self,
        req: comet::BroadcastGroupRequest,
    ) -> RpcResult<comet::Delivery> {
        let reply = self
            .client
            .clone()
            .broadcast_group(self.token.request(req))
            .await?
            .into_inner();
        Ok(reply.delivery.unwrap_or_default())
    }

    async fn change_group(
        &self,
        req: comet::ChangeGroupRequest,
    ) -> RpcResult<comet::ChangeGroupReply> {
        Ok(self
            .client
            .clone()
            .change_group(self.token.request(req))
            .await?
            .into_inner())
    }

    async fn rooms(&self) -> RpcResult<Vec<String>> {
        let reply = self
            .client
            .clone()
            .rooms(self.token.request(comet::RoomsRequest {}))
            .await?;
        Ok(reply.into_inner().rooms)
    }

    async fn kick(&self, keys: Vec<String>) -> RpcResult<u64> {
        let reply = self
            .client
            .clone()
            .kick(self.token.request(comet::KickRequest { keys }))
            .await?;
        Ok(reply.into_inner().kicked)
    }

    async fn stats(&self) -> RpcResult<comet::StatsReply> {
        Ok(self
            .client
            .clone()
            .stats(self.token.request(comet::StatsRequest {}))
            .await?
            .into_inner())
    }
}

/// Serves any `LogicApi` as the logic gRPC service.
#[derive(Debug)]
pub struct LogicGrpc<T>(pub Arc<T>);

impl<T: LogicApi> LogicGrpc<T> {
    /// Returns the tonic service, ready to add to a server.
    pub fn into_service(self) -> logic::logic_server::LogicServer<Self> {
        logic::logic_server::LogicServer::new(self)
    }

    /// Returns the tonic service refusing calls without `token` (the
    /// cluster's `node.grpc_token`) as `Unauthenticated`; `None` = no check.
    pub fn into_guarded_service(
        self,
        token: Option<&str>,
    ) -> InterceptedService<logic::logic_server::LogicServer<Self>, RequireToken> {
        logic::logic_server::LogicServer::with_interceptor(self, RequireToken::new(token))
    }
}

#[async_trait]
impl<T: LogicApi> logic::logic_server::Logic for LogicGrpc<T> {
    async fn connect(
        &self,
        req: Request<logic::ConnectRequest>,
    ) -> Result<Response<logic::ConnectReply>, Status> {
        Ok(Response::new(self.0.connect(req.into_inner()).await?))
    }

    async fn disconnect(
        &self,
        req: Request<logic::DisconnectRequest>,
    ) -> Result<Response<logic::DisconnectReply>, Status> {
        let known = self.0.disconnect(req.into_inner()).await?;
        Ok(Response::new(logic::DisconnectReply { known }))
    }

    async fn heartbeat(
        &self,
        req: Request<logic::HeartbeatRequest>,
    ) -> Result<Response<logic::HeartbeatReply>, Status> {
        Ok(Response::new(self.0.heartbeat(req.into_inner()).await?))
    }

    async fn renew_online(
        &self,
        req: Request<logic::RenewOnlineRequest>,
    ) -> Result<Response<logic::RenewOnlineReply>, Status> {
        Ok(Response::new(self.0.renew_online(req.into_inner()).await?))
    }

    async fn receive(
        &self,
        req: Request<logic::ReceiveRequest>,
    ) -> Result<Response<logic::ReceiveReply>, Status> {
        Ok(Response::new(self.0.receive(req.into_inner()).await?))
    }

    async fn nodes(
        &self,
        req: Request<logic::NodesRequest>,
    ) -> Result<Response<logic::NodesReply>, Status> {
        Ok(Response::new(self.0.nodes(req.into_inner()).await?))
    }
}

/// Serves any `CometApi` as the comet gRPC service.
#[derive(Debug)]
pub struct CometGrpc<T>(pub Arc<T>);

impl<T: CometApi> CometGrpc<T> {
    /// Returns the tonic service, ready to add to a server.
    pub fn into_service(self) -> comet::comet_server::CometServer<Self> {
        comet::comet_server::CometServer::new(self)
    }

    /// Returns the tonic service refusing calls without `token` (the
    /// cluster's `node.grpc_token`) as `Unauthenticated`; `None` = no check.
    pub fn into_guarded_service(
        self,
        token: Option<&str>,
    ) -> InterceptedService<comet::comet_server::CometServer<Self>, RequireToken> {
        comet::comet_server::CometServer::with_interceptor(self, RequireToken::new(token))
    }
}

#[async_trait]
impl<T: CometApi> comet::comet_server::Comet for CometGrpc<T> {
    async fn push_msg(
        &self,
        req: Request<comet::PushMsgRequest>,
    ) -> Result<Response<comet::PushMsgReply>, Status> {
        let delivery = self.0.push_msg(req.into_inner()).await?;
        Ok(Response::new(comet::PushMsgReply {
            delivery: Some(delivery),
        }))
    }

    async fn push_msgs(
        &self,
        req: Request<comet::PushMsgsRequest>,
    ) -> Result<Response<comet::PushMsgsReply>, Status> {
        Ok(Response::new(self.0.push_msgs(req.into_inner()).await?))
    }

    async fn broadcast(
        &self,
        req: Request<comet::BroadcastRequest>,
    ) -> Result<Response<comet::BroadcastReply>, Status> {
        let delivery = self.0.broadcast(req.into_inner()).await?;
        Ok(Response::new(comet::BroadcastReply {
            delivery: Some(delivery),
        }))
    }

    async fn broadcast_room(
        &self,
        req: Request<comet::BroadcastRoomRequest>,
    ) -> Result<Response<comet::BroadcastRoomReply>, Status> {
        let delivery = self.0.broadcast_room(req.into_inner()).await?;
        Ok(Response::new(comet::BroadcastRoomReply {
            delivery: Some(delivery),
        }))
    }

    async fn broadcast_group(
        &self,
        req: Request<comet::BroadcastGroupRequest>,
    ) -> Result<Response<comet::BroadcastGroupReply>, Status> {
        let delivery = self.0.broadcast_group(req.into_inner()).await?;
        Ok(Response::new(comet::BroadcastGroupReply {
            delivery: Some(delivery),
        }))
    }

    async fn change_group(
        &self,
        req: Request<comet::ChangeGroupRequest>,
    ) -> Result<Response<comet::ChangeGroupReply>, Status> {
        Ok(Response::new(self.0.change_group(req.into_inner()).await?))
    }

    async fn rooms(
        &self,
        _req: Request<comet::RoomsRequest>,
    ) -> Result<Response<comet::RoomsReply>, Status> {
        let rooms = self.0.rooms().await?;
        Ok(Response::new(comet::RoomsReply { rooms }))
    }

    async fn kick(
        &self,
        req: Request<comet::KickRequest>,
    ) -> Result<Response<comet::KickReply>, Status> {
        let kicked = self.0.kick(req.into_inner().keys).await?;
        Ok(Response::new(comet::KickReply { kicked }))
    }

    async fn stats(
        &self,
        _req: Request<comet::StatsRequest>,
    ) -> Result<Response<comet::StatsReply>, Status> {
        Ok(Response::new(self.0.stats().await?))
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    /// Answers pushes by their op: 0 = invalid, 1 = unavailable, else one
    /// delivery per key; records the keys of every push it applies.
    #[derive(Default)]
    struct ByOp(std::sync::Mutex<Vec<String>>);

    #[async_trait]
    impl CometApi for ByOp {
        async fn push_msg(&self, req: comet::PushMsgRequest) -> RpcResult<comet::Delivery> {
            match req.proto_op {
                0 => Err(RpcError::InvalidArgument("op 0".into())),
                1 => Err(RpcError::Unavailable("down".into())),
                _ => {
                    self.0.lock().unwrap().push(req.keys.join(","));
                    Ok(comet::Delivery {
                        delivered: req.keys.len() as u64,
                        ..comet::Delivery::default()
                    })
                }
            }
        }
        async fn broadcast(&self, _: comet::BroadcastRequest) -> RpcResult<comet::Delivery> {
            unreachable!()
        }
        async fn broadcast_room(
            &self,
            _: comet::BroadcastRoomRequest,
        ) -> RpcResult<comet::Delivery> {
            unreachable!()
        }
        async fn broadcast_group(
            &self,
            _: comet::BroadcastGroupRequest,
        ) -> RpcResult<comet::Delivery> {
            unreachable!()
        }
        async fn change_group(
            &self,
            _: comet::ChangeGroupRequest,
        ) -> RpcResult<comet::ChangeGroupReply> {
            unreachable!()
        }
        async fn rooms(&self) -> RpcResult<Vec<String>> {
            unreachable!()
        }
        async fn kick(&self, _: Vec<String>) -> RpcResult<u64> {
            unreachable!()
        }
        async fn stats(&self) -> RpcResult<comet::StatsReply> {
            unreachable!()
        }
    }

    fn push(keys: &[&str], op: i32) -> comet::PushMsgRequest {
        comet::PushMsgRequest {
            keys: keys.iter().map(|k| k.to_string()).collect(),
            proto_op: op,
            ..comet::PushMsgRequest::default()
        }
    }

    #[tokio::test]
    async fn the_default_push_msgs_applies_in_order_and_refuses_invalid_pushes_alone() {
        let comet = ByOp::default();
        let reply = comet
            .push_msgs(comet::PushMsgsRequest {
                pushes: vec![push(&["a"], 5), push(&["x"], 0), push(&["b", "c"], 5)],
            })
            .await
            .unwrap();
        assert_eq!(*comet.0.lock().unwrap(), vec!["a", "b,c"]);
        assert_eq!(reply.delivery.unwrap().delivered, 3);
        assert_eq!(
            reply.refused,
            vec![comet::RefusedPush {
                index: 1,
                reason: "op 0".into()
            }]
        );
        // Any other error fails the whole call.
        let err = comet
            .push_msgs(comet::PushMsgsRequest {
                pushes: vec![push(&["d"], 5), push(&["y"], 1)],
            })
            .await
            .unwrap_err();
        assert!(err.is_transient(), "{err}");
    }

    #[tokio::test]
    async fn batches_over_the_bounds_are_refused_before_any_push() {
        let comet = ByOp::default();
        let err = comet
            .push_msgs(comet::PushMsgsRequest {
                pushes: vec![push(&["k"], 5); PUSH_BATCH_MAX_PUSHES + 1],
            })
            .await
            .unwrap_err();
        assert!(matches!(err, RpcError::InvalidArgument(_)), "{err}");
        let key = "k".repeat(PUSH_BATCH_MAX_BYTES / 2);
        let err = comet
            .push_msgs(comet::PushMsgsRequest {
                pushes: vec![push(&[&key], 5); 2],
            })
            .await
            .unwrap_err();
        assert!(matches!(err, RpcError::InvalidArgument(_)), "{err}");
        assert!(comet.0.lock().unwrap().is_empty());
        let at_bound = comet::PushMsgsRequest {
            pushes: vec![push(&["k"], 5); PUSH_BATCH_MAX_PUSHES],
        };
        assert!(check_push_batch(&at_bound).is_ok());
    }

    #[test]
    fn push_batches_round_trip_through_protobuf() {
        let req = comet::PushMsgsRequest {
            pushes: vec![
                push(&["a", "b"], 1000),
                comet::PushMsgRequest {
                    bodies: vec![bytes::Bytes::from("x")],
                    ..push(&["c"], 21)
                },
            ],
        };
        let decoded = comet::PushMsgsRequest::decode(req.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, req);
        let reply = comet::PushMsgsReply {
            delivery: Some(comet::Delivery {
                delivered: 3,
                missing: 1,
                ..comet::Delivery::default()
            }),
            refused: vec![comet::RefusedPush {
                index: 7,
                reason: "proto is missing".into(),
            }],
        };
        let decoded = comet::PushMsgsReply::decode(reply.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, reply);
    }
}
