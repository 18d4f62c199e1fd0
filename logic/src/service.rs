//! The logic service: the local `LogicApi` that comets call (directly in
//! standalone, over gRPC otherwise). What the HTTP API asks of it is in
//! `facade`.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use rim_config::LogicConfig;
use rim_proto::api::{LogicApi, RpcError, RpcResult};
use rim_proto::pb::logic::v1 as pb;
use rim_router::Router;

use crate::auth::{AuthError, Authenticator};
use crate::comets::Comets;
use crate::facade::{LogicFacade, NodeQuery};
use crate::im::Im;
use crate::metrics::LogicMetrics;
use crate::nodes::NodeSelector;
use crate::presence::{PresenceEvents, PresenceOptions};
use crate::webhook::HttpClient;

/// Longest platform name kept per connection, in bytes; a longer one (it
/// comes from the token) is cut at a character boundary.
const MAX_PLATFORM: usize = 64;

/// Auth, presence, online counts, upstream frames and node selection.
pub struct Logic {
    heartbeat: Duration,
    heartbeat_max: u32,
    lease: Duration,
    router: Arc<dyn Router>,
    auth: Authenticator,
    http: HttpClient,
    receive_webhook: Option<String>,
    receive_timeout: Duration,
    comets: Arc<Comets>,
    selector: NodeSelector,
    metrics: LogicMetrics,
    im: Option<Arc<Im>>,
    presence: Option<PresenceEvents>,
}

impl std::fmt::Debug for Logic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logic")
            .field("comets", &self.comets)
            .finish_non_exhaustive()
    }
}

/// The body POSTed to the upstream receive webhook.
#[derive(serde::Serialize)]
struct Upstream<'a> {
    mid: i64,
    key: &'a str,
    op: i32,
    seq: i32,
    /// Base64 of the frame body.
    body: String,
}

fn router_error(err: rim_router::Error) -> RpcError {
    RpcError::Unavailable(format!("router: {err}"))
}

impl Logic {
    /// Counts a failed router call and maps it to "unavailable".
    fn router_failed(&self, op: &'static str) -> impl FnOnce(rim_router::Error) -> RpcError + '_ {
        move |err| {
            self.metrics.router_error(op);
            router_error(err)
        }
    }
}

impl Logic {
    /// Creates the service over a router and a comet directory.
    pub fn new(
        config: &LogicConfig,
        router: Arc<dyn Router>,
        comets: Arc<Comets>,
        http: HttpClient,
    ) -> Logic {
        if config.receive_webhook.is_empty() {
            tracing::info!(
                "logic.receive_webhook is empty: upstream client frames are acknowledged and dropped, counted in rim_logic_upstream_frames{{result=\"no_webhook\"}}"
            );
        }
        let metrics = LogicMetrics::default();
        let presence = match PresenceOptions::from_config(config) {
            Some(options) if tokio::runtime::Handle::try_current().is_ok() => {
                Some(PresenceEvents::start(
                    options,
                    Arc::clone(&router),
                    http.clone(),
                    metrics.router_errors.clone(),
                ))
            }
            Some(_) => {
                tracing::warn!(
                    "logic.presence_webhook is set but logic was built outside a runtime: no presence events"
                );
                None
            }
            None => None,
        };
        Logic {
            heartbeat: config.heartbeat,
            heartbeat_max: config.heartbeat_max,
            lease: config.lease,
            router,
            auth: Authenticator::new(&config.auth, http.clone()),
            http,
            receive_webhook: (!config.receive_webhook.is_empty())
                .then(|| config.receive_webhook.clone()),
            receive_timeout: config.receive_timeout,
            comets,
            selector: NodeSelector::new(
                config.nodes.clone(),
                config.heartbeat,
                config.heartbeat_max,
            ),
            metrics,
            im: None,
            presence,
        }
    }

    /// Serves the IM ops (18–27) from `im`; without it they are refused
    /// with code 2 (IM off).
    pub fn with_im(self, im: Arc<Im>) -> Logic {
        Logic {
            im: Some(im),
            ..self
        }
    }

    /// Returns the IM service, if this logic has one.
    pub fn im(&self) -> Option<&Arc<Im>> {
        self.im.as_ref()
    }

    /// Registers logic's metrics (`rim_logic_*`) in `registry`.
    pub fn register_metrics(&self, registry: &mut rim_metrics::Registry) {
        self.metrics.register(registry, Arc::clone(&self.comets));
        if let Some(presence) = &self.presence {
            presence.register_metrics(registry);
        }
        if let Some(im) = &self.im {
            im.register_metrics(registry);
        }
    }

    /// Returns the big groups of `mid` (their delivery channels); None
    /// without IM or when the store cannot say (logged: the connection
    /// keeps the channels it has until a later renewal).
    async fn big_groups(&self, mid: i64) -> Option<Vec<String>> {
        let im = self.im.as_ref()?;
        match im.big_groups(mid).await {
            Ok(groups) => Some(groups),
            Err(err) => {
                tracing::warn!(%err, mid, "big groups unknown (store); channels repaired at a later renewal");
                None
            }
        }
    }

    /// Returns the online map.
    pub(crate) fn router(&self) -> &Arc<dyn Router> {
        &self.router
    }

    /// Returns the comet directory.
    pub(crate) fn directory(&self) -> &Comets {
        &self.comets
    }

    /// Returns the node selector.
    pub(crate) fn selector(&self) -> &NodeSelector {
        &self.selector
    }
}

/// Returns the longest prefix of `text` of at most `max` bytes that ends on a
/// character boundary.
fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let end = (0..=max)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    &text[..end]
}

fn require(field: &str, value: &str) -> RpcResult<()> {
    if value.is_empty() {
        return Err(RpcError::InvalidArgument(format!("{field} is empty")));
    }
    Ok(())
}

#[async_trait]
impl LogicApi for Logic {
    async fn connect(&self, req: pb::ConnectRequest) -> RpcResult<pb::ConnectReply> {
        require("server", &req.server)?;
        let identity = self
            .auth
            .authenticate(&req.token, &req.client_ip)
            .await
            .map_err(|e| match e {
                AuthError::Refused(reason) => {
                    self.metrics.connect("refused");
                    RpcError::Unauthenticated(reason)
                }
                AuthError::Unavailable(reason) => {
                    self.metrics.connect("failed");
                    RpcError::Unavailable(format!("auth: {reason}"))
                }
            })?;
        let key = if identity.key.is_empty() {
            uuid::Uuid::new_v4().to_string()
        } else {
            identity.key
        };
        let platform = cut(&identity.platform, MAX_PLATFORM);
        self.router
            .add_device(identity.mid, &key, &req.server, platform, self.lease)
            .await
            .map_err(|err| {
                self.metrics.connect("failed");
                self.router_failed("add")(err)
            })?;
        self.metrics.connect("ok");
        if let Some(presence) = &self.presence {
            presence.connected(identity.mid);
        }
        // The comet enforces the per-connection SEND limit first.
        let (im_send_rate, im_send_burst) = self
            .im
            .as_ref()
            .and_then(|im| im.connection_send_limit())
            .map_or((0, 0), |limit| (limit.rate.get(), limit.burst.get()));
        // An IM connection joins its user's big groups' delivery channels.
        let groups = if identity.accepts.contains(&rim_proto::Op::IM_MSG.0) {
            self.big_groups(identity.mid).await.unwrap_or_default()
        } else {
            Vec::new()
        };
        // The key and the server id come from the client and the caller: escaped.
        tracing::debug!(mid = identity.mid, key = ?key, server = ?req.server, "connected");
        Ok(pb::ConnectReply {
            mid: identity.mid,
            key,
            room_id: identity.room_id,
            accepts: identity.accepts,
            heartbeat_ms: self.heartbeat.as_millis() as u64,
            heartbeat_max: self.heartbeat_max,
            im_send_rate,
            im_send_burst,
            groups,
        })
    }

    async fn disconnect(&self, req: pb::DisconnectRequest) -> RpcResult<bool> {
        require("server", &req.server)?;
        require("key", &req.key)?;
        self.metrics.disconnects.inc();
        let removed = self
            .router
            .remove(req.mid, &req.key, &req.server)
            .await
            .map_err(self.router_failed("remove"))?;
        if let Some(presence) = &self.presence {
            presence.disconnected(req.mid);
        }
        Ok(removed)
    }

    async fn heartbeat(&self, req: pb::HeartbeatRequest) -> RpcResult<pb::HeartbeatReply> {
        require("server", &req.server)?;
        require("key", &req.key)?;
        self.metrics.renewals.inc();
        let renewed = self
            .router
            .renew(req.mid, &req.key, &req.server, self.lease)
            .await
            .map_err(self.router_failed("renew"))?;
        if !renewed {
            // The entry expired (e.g. the router lost it): the connection is
            // alive on this server, so record it again — unless the key has
            // moved to another server meanwhile.
            let owner = self
                .router
                .servers_of_keys(std::slice::from_ref(&req.key))
                .await
                .map_err(self.router_failed("lookup"))?;
            if owner.first().is_none_or(Option::is_none) {
                self.router
                    .add(req.mid, &req.key, &req.server, self.lease)
                    .await
                    .map_err(self.router_failed("add"))?;
                if let Some(presence) = &self.presence {
                    presence.connected(req.mid);
                }
            }
        }
        let groups = if req.groups {
            self.big_groups(req.mid).await
        } else {
            None
        };
        Ok(pb::HeartbeatReply {
            groups_known: groups.is_some(),
            groups: groups.unwrap_or_default(),
        })
    }

    async fn renew_online(&self, req: pb::RenewOnlineRequest) -> RpcResult<pb::RenewOnlineReply> {
        require("server", &req.server)?;
        self.router
            .set_room_counts(&req.server, &req.room_count)
            .await
            .map_err(self.router_failed("set_room_counts"))?;
        let all = self
            .router
            .room_counts()
            .await
            .map_err(self.router_failed("room_counts"))?;
        Ok(pb::RenewOnlineReply {
            all_room_count: all
                .into_iter()
                .map(|(room, n)| (room, i32::try_from(n).unwrap_or(i32::MAX)))
                .collect(),
        })
    }

    async fn receive(&self, req: pb::ReceiveRequest) -> RpcResult<pb::ReceiveReply> {
        let proto = req.proto.unwrap_or_default();
        if rim_proto::Op(proto.op).is_im() {
            let replies = match &self.im {
                Some(im) => im.request(req.mid, &req.key, proto).await,
                None => crate::im::off_reply(&proto),
            };
            return Ok(pb::ReceiveReply { replies });
        }
        let Some(url) = &self.receive_webhook else {
            // Per frame and at the client's will: a debug line and a counter
            // (the startup line said where these frames go).
            self.metrics.upstream("no_webhook");
            tracing::debug!(mid = req.mid, key = ?req.key, op = proto.op, len = proto.body.len(), "upstream frame dropped: no receive webhook configured");
            return Ok(pb::ReceiveReply::default());
        };
        let body = Upstream {
            mid: req.mid,
            key: &req.key,
            op: proto.op,
            seq: proto.seq,
            body: base64::engine::general_purpose::STANDARD.encode(&proto.body),
        };
        let result = match self.http.post_json(url, &body, self.receive_timeout).await {
            Ok((status, _)) if (200..300).contains(&status) => Ok(pb::ReceiveReply::default()),
            Ok((status, _)) => Err(RpcError::Unavailable(format!(
                "receive webhook answered HTTP {status}"
            ))),
            Err(err) => Err(RpcError::Unavailable(format!("receive webhook: {err}"))),
        };
        self.metrics.upstream(if result.is_ok() {
            "forwarded"
        } else {
            "failed"
        });
        result
    }

    async fn nodes(&self, req: pb::NodesRequest) -> RpcResult<pb::NodesReply> {
        let query = NodeQuery {
            platform: &req.platform,
            region: Some(&req.region),
            client_ip: req.client_ip.parse::<IpAddr>().ok(),
        };
        Ok(self.select_nodes(query).reply)
    }
}

#[cfg(test)]
mod tests {
    use super::cut;

    #[test]
    fn platforms_are_cut_on_a_character_boundary() {
        assert_eq!(cut("ios", 64), "ios");
        assert_eq!(cut("abcdef", 3), "abc");
        // "é" is two bytes: a cut inside it keeps the character out.
        assert_eq!(cut("aé", 2), "a");
        assert_eq!(cut("éé", 1), "");
    }
}
