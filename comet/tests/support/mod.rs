//! A comet on 127.0.0.1 port 0 with a scripted logic, for black-box tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rim_client::{AuthToken, Client};
use rim_comet::{Comet, Listeners, TransportKind, WS_PATH};
use rim_config::{CometConfig, NodeConfig};
use rim_proto::api::{CometApi, LogicApi, RpcError, RpcResult};
use rim_proto::pb::comet::v1 as pb;
use rim_proto::pb::frame::v1::Proto;
use rim_proto::pb::logic::v1 as logic;
use rim_proto::{Frame, Op};
use rim_shutdown::Shutdown;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A logic that trusts goim JSON tokens, refuses mid < 0, and records calls.
#[derive(Default)]
pub struct ScriptedLogic {
    pub heartbeat_ms: u64,
    pub heartbeat_max: u32,
    /// The per-connection IM SEND terms Connect answers (0 = no limit).
    pub im_send_rate: u32,
    pub im_send_burst: u32,
    pub disconnects: Mutex<Vec<(i64, String)>>,
    pub received: Mutex<Vec<(String, i32, Bytes)>>,
    pub heartbeats: AtomicU64,
    pub renewals: AtomicU64,
    /// Cluster-wide counts RenewOnline answers with.
    pub online: Mutex<HashMap<String, i32>>,
    pub generated: AtomicU64,
    /// While set, Connect fails as unavailable (logic down).
    pub down: std::sync::atomic::AtomicBool,
    /// While set, Receive fails as unavailable.
    pub receive_down: std::sync::atomic::AtomicBool,
    /// The big groups of each mid, answered by Connect and by a Heartbeat
    /// that asks.
    pub groups: Mutex<HashMap<i64, Vec<String>>>,
}

#[derive(Deserialize)]
struct Token {
    mid: i64,
    #[serde(default)]
    key: String,
    #[serde(default)]
    room_id: String,
    #[serde(default)]
    accepts: Vec<i32>,
}

impl ScriptedLogic {
    pub fn groups_of(&self, mid: i64) -> Vec<String> {
        self.groups
            .lock()
            .unwrap()
            .get(&mid)
            .cloned()
            .unwrap_or_default()
    }

    pub fn disconnects_of(&self, key: &str) -> usize {
        self.disconnects
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, k)| k == key)
            .count()
    }
}

#[async_trait]
impl LogicApi for ScriptedLogic {
    async fn connect(&self, req: logic::ConnectRequest) -> RpcResult<logic::ConnectReply> {
        if self.down.load(Ordering::Acquire) {
            return Err(RpcError::Unavailable("logic is down (test)".into()));
        }
        let token: Token = serde_json::from_slice(&req.token)
            .map_err(|e| RpcError::Unauthenticated(format!("bad token: {e}")))?;
        if token.mid < 0 {
            return Err(RpcError::Unauthenticated("token refused".into()));
        }
        let key = if token.key.is_empty() {
            format!("gen-{}", self.generated.fetch_add(1, Ordering::Relaxed))
        } else {
            token.key
        };
        Ok(logic::ConnectReply {
            mid: token.mid,
            key,
            room_id: token.room_id,
            accepts: token.accepts,
            heartbeat_ms: if self.heartbeat_ms == 0 {
                60_000
            } else {
                self.heartbeat_ms
            },
            heartbeat_max: if self.heartbeat_max == 0 {
                2
            } else {
                self.heartbeat_max
            },
            im_send_rate: self.im_send_rate,
            im_send_burst: self.im_send_burst,
            groups: self.groups_of(token.mid),
        })
    }

    async fn disconnect(&self, req: logic::DisconnectRequest) -> RpcResult<bool> {
        self.disconnects.lock().unwrap().push((req.mid, req.key));
        Ok(true)
    }

    async fn heartbeat(&self, req: logic::HeartbeatRequest) -> RpcResult<logic::HeartbeatReply> {
        self.heartbeats.fetch_add(1, Ordering::Relaxed);
        Ok(logic::HeartbeatReply {
            groups_known: req.groups,
            groups: if req.groups {
                self.groups_of(req.mid)
            } else {
                Vec::new()
            },
        })
    }

    async fn renew_online(
        &self,
        _req: logic::RenewOnlineRequest,
    ) -> RpcResult<logic::RenewOnlineReply> {
        self.renewals.fetch_add(1, Ordering::Relaxed);
        Ok(logic::RenewOnlineReply {
            all_room_count: self.online.lock().unwrap().clone(),
        })
    }

    /// Records the frame; an IM request with a reply op (18, 22, 24) is
    /// answered with op + 1, its seq, and `re:` + its body.
    async fn receive(&self, req: logic::ReceiveRequest) -> RpcResult<logic::ReceiveReply> {
        if self.receive_down.load(Ordering::Acquire) {
            return Err(RpcError::Unavailable("logic is down (test)".into()));
        }
        let proto = req.proto.unwrap_or_default();
        self.received
            .lock()
            .unwrap()
            .push((req.key, proto.op, proto.body.clone()));
        let replies = match proto.op {
            18 | 22 | 24 => vec![Proto {
                ver: 1,
                op: proto.op + 1,
                seq: proto.seq,
                body: [&b"re:"[..], &proto.body].concat().into(),
            }],
            _ => Vec::new(),
        };
        Ok(logic::ReceiveReply { replies })
    }

    async fn nodes(&self, _req: logic::NodesRequest) -> RpcResult<logic::NodesReply> {
        Err(RpcError::Internal("not scripted".into()))
    }
}

/// A running comet.
pub struct TestComet {
    pub comet: Comet,
    pub logic: Arc<ScriptedLogic>,
    pub tcp: SocketAddr,
    pub ws: SocketAddr,
    pub grpc: SocketAddr,
    pub shutdown: Shutdown,
    pub task: JoinHandle<rim_comet::Result<()>>,
}

/// Config with short timers suited to tests.
pub fn test_config() -> CometConfig {
    CometConfig {
        handshake_timeout: Duration::from_millis(500),
        room_report_interval: Duration::from_millis(100),
        drain_window: Duration::from_millis(200),
        ..CometConfig::default()
    }
}

pub async fn start(config: CometConfig, logic: ScriptedLogic) -> TestComet {
    start_with(config, logic, vec![]).await
}

/// Like [`start`], and also serves WSS on the given listeners (the config
/// must then name `tls_cert` and `tls_key`).
pub async fn start_with(
    config: CometConfig,
    logic: ScriptedLogic,
    wss: Vec<TcpListener>,
) -> TestComet {
    start_node(None, config, logic, wss).await
}

/// Like [`start`], with `node.grpc_token` set to `token`.
#[allow(dead_code)] // Not every test binary uses every helper.
pub async fn start_with_grpc_token(
    token: &str,
    config: CometConfig,
    logic: ScriptedLogic,
) -> TestComet {
    start_node(Some(token.into()), config, logic, vec![]).await
}

async fn start_node(
    grpc_token: Option<String>,
    config: CometConfig,
    logic: ScriptedLogic,
    wss: Vec<TcpListener>,
) -> TestComet {
    let node = NodeConfig {
        id: "comet-test".into(),
        grpc_token,
        ..NodeConfig::default()
    };
    start_as(node, config, logic, wss).await
}

/// Like [`start`], as the node `node` describes (id, token, gRPC TLS).
pub async fn start_as(
    node: NodeConfig,
    config: CometConfig,
    logic: ScriptedLogic,
    wss: Vec<TcpListener>,
) -> TestComet {
    let logic = Arc::new(logic);
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    start_parts(node, config, Arc::clone(&logic), logic, tcp, wss).await
}

/// Like [`start`], with `logic` answering the comet (it may wrap
/// `scripted`, which the test then reads as usual) and raw TCP clients
/// accepted on `tcp` (a listener with socket options of the test's choice).
pub async fn start_custom(
    config: CometConfig,
    scripted: Arc<ScriptedLogic>,
    logic: Arc<dyn LogicApi>,
    tcp: TcpListener,
) -> TestComet {
    let node = NodeConfig {
        id: "comet-test".into(),
        ..NodeConfig::default()
    };
    start_parts(node, config, scripted, logic, tcp, vec![]).await
}

async fn start_parts(
    node: NodeConfig,
    config: CometConfig,
    scripted: Arc<ScriptedLogic>,
    logic: Arc<dyn LogicApi>,
    tcp: TcpListener,
    wss: Vec<TcpListener>,
) -> TestComet {
    let bind = || TcpListener::bind("127.0.0.1:0");
    let (ws, grpc) = (bind().await.unwrap(), bind().await.unwrap());
    let (tcp_addr, ws_addr, grpc_addr) = (
        tcp.local_addr().unwrap(),
        ws.local_addr().unwrap(),
        grpc.local_addr().unwrap(),
    );
    let comet = Comet::new(&node, config, logic);
    let shutdown = Shutdown::new();
    let listeners = Listeners {
        tcp: vec![tcp],
        ws: vec![ws],
        wss,
        grpc,
    };
    let task = tokio::spawn(comet.clone().run(listeners, shutdown.clone()));
    TestComet {
        comet,
        logic: scripted,
        tcp: tcp_addr,
        ws: ws_addr,
        grpc: grpc_addr,
        shutdown,
        task,
    }
}

impl TestComet {
    /// Opens a connection of `kind` without authenticating.
    pub async fn raw(&self, kind: TransportKind) -> Client {
        match kind {
            TransportKind::Tcp => Client::connect_tcp(self.tcp).await.unwrap(),
            TransportKind::Ws => Client::connect_ws(&format!("ws://{}{WS_PATH}", self.ws))
                .await
                .unwrap(),
        }
    }

    /// Opens and authenticates a connection.
    pub async fn client(&self, kind: TransportKind, token: AuthToken) -> Client {
        let mut client = self.raw(kind).await;
        client.auth(&token).await.expect("auth succeeds");
        client
    }

    pub async fn push_keys(&self, keys: &[&str], op: i32, body: &str) -> pb::Delivery {
        self.comet
            .push_msg(pb::PushMsgRequest {
                keys: keys.iter().map(|k| k.to_string()).collect(),
                proto_op: op,
                proto: Some(proto(op, body)),
                bodies: Vec::new(),
            })
            .await
            .unwrap()
    }

    pub async fn push_room(&self, room: &str, op: i32, body: &str) -> pb::Delivery {
        self.comet
            .broadcast_room(pb::BroadcastRoomRequest {
                room_id: room.into(),
                proto: Some(proto(op, body)),
            })
            .await
            .unwrap()
    }

    /// Triggers shutdown and waits for the comet to finish draining.
    pub async fn stop(self) {
        self.shutdown.trigger();
        within(Duration::from_secs(10), self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

pub fn proto(op: i32, body: &str) -> Proto {
    Frame::new(Op(op), 0, Bytes::copy_from_slice(body.as_bytes())).into()
}

pub fn token(mid: i64, key: &str, room: &str, accepts: &[i32]) -> AuthToken {
    AuthToken {
        mid,
        key: key.into(),
        room_id: room.into(),
        platform: "test".into(),
        accepts: accepts.to_vec(),
    }
}

/// Awaits `fut`, failing the test after `limit`.
pub async fn within<F: std::future::Future>(limit: Duration, fut: F) -> F::Output {
    tokio::time::timeout(limit, fut).await.expect("timed out")
}

/// Returns the next frame the client receives (failing after 5 s).
pub async fn next(client: &mut Client) -> Frame {
    within(Duration::from_secs(5), client.next_frame())
        .await
        .expect("read succeeds")
        .expect("connection open")
}

/// Asserts the client received nothing before `marker`: pushes a marker to
/// the key and checks it is the next frame.
pub async fn assert_nothing_before_marker(comet: &TestComet, client: &mut Client, key: &str) {
    comet.push_keys(&[key], 9999, "marker").await;
    let frame = next(client).await;
    assert_eq!(
        (frame.op, &frame.body[..]),
        (Op(9999), &b"marker"[..]),
        "unexpected frame before the marker"
    );
}

/// Polls `check` every 20 ms until it holds, failing after `limit`.
pub async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) {
    within(limit, async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

pub const KINDS: [TransportKind; 2] = [TransportKind::Tcp, TransportKind::Ws];
