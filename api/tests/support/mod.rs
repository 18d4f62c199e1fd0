//! The test harness for rim-api's black-box HTTP tests: the real API served
//! on 127.0.0.1:0 over a real in-memory router, a real in-memory queue (whose
//! consumer the test keeps, to see what was enqueued), a real `Logic` (the
//! API sees it through its `LogicFacade`, as in production) and a comet
//! directory of fakes that record kicks and return scripted stats.
//!
//! Every wait is bounded: HTTP calls by the client's timeout, queue reads
//! and raw-socket reads by `tokio::time::timeout`.

// Each test binary uses a different part of the harness.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use rim_api::Api;
use rim_config::{
    ApiConfig, Cidr, ImConfig, LogicConfig, NodesConfig, RegionCidr, RouterBackend, RouterConfig,
};
use rim_im::{
    ConvId, ConvSummary, Draft, Group, GroupSpec, IdGenerator, MembersChanged, MembersPage,
    MessageStore, Page, PullPage, ReadPos, Reader, Sent, SqliteOptions, SqliteStore, SyncPage,
};
use rim_logic::{CometNode, Comets, HttpClient, Im, Logic, LogicFacade};
use rim_proto::api::{CometApi, LogicApi, RpcError, RpcResult};
use rim_proto::pb::comet::v1 as comet;
use rim_proto::pb::logic::v1 as logic;
use rim_queue::{Consumer, MemoryConsumer, MemoryProducer, Producer, PushMsg};
use rim_router::{Router, ServerReport};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Upper bound of any single wait in these tests.
pub const WAIT: Duration = Duration::from_secs(10);

/// How long the queue must stay silent to count as drained. Messages are
/// enqueued before the HTTP answer is sent, so by the time a test drains
/// they are already in the channel; this only bounds the final empty read.
const DRAIN_QUIET: Duration = Duration::from_millis(100);

/// The admin token of harnesses built with [`Setup::admin_token`] in tests.
pub const TOKEN: &str = "s3cret-admin-token";

// ---------------------------------------------------------------------------
// Fake comet
// ---------------------------------------------------------------------------

/// A comet that records kick calls and answers scripted stats.
pub struct FakeComet {
    kicks: Mutex<Vec<Vec<String>>>,
    stats: Mutex<RpcResult<comet::StatsReply>>,
    kick_error: Mutex<Option<RpcError>>,
}

impl FakeComet {
    /// A comet answering `stats`.
    pub fn new(stats: comet::StatsReply) -> Arc<FakeComet> {
        Arc::new(FakeComet {
            kicks: Mutex::new(Vec::new()),
            stats: Mutex::new(Ok(stats)),
            kick_error: Mutex::new(None),
        })
    }

    /// Makes `stats` fail from now on.
    pub fn fail_stats(&self, reason: &str) {
        *self.stats.lock() = Err(RpcError::Unavailable(reason.to_owned()));
    }

    /// Makes `kick` fail from now on.
    pub fn fail_kicks(&self, reason: &str) {
        *self.kick_error.lock() = Some(RpcError::Unavailable(reason.to_owned()));
    }

    /// Every kick call so far, each call's keys sorted.
    pub fn kicks(&self) -> Vec<Vec<String>> {
        self.kicks.lock().clone()
    }
}

#[async_trait]
impl CometApi for FakeComet {
    async fn push_msg(&self, _req: comet::PushMsgRequest) -> RpcResult<comet::Delivery> {
        Err(RpcError::Internal(
            "the api must not push to comets directly".into(),
        ))
    }

    async fn broadcast(&self, _req: comet::BroadcastRequest) -> RpcResult<comet::Delivery> {
        Err(RpcError::Internal(
            "the api must not broadcast to comets directly".into(),
        ))
    }

    async fn broadcast_room(
        &self,
        _req: comet::BroadcastRoomRequest,
    ) -> RpcResult<comet::Delivery> {
        Err(RpcError::Internal(
            "the api must not push to rooms directly".into(),
        ))
    }

    async fn broadcast_group(
        &self,
        _req: comet::BroadcastGroupRequest,
    ) -> RpcResult<comet::Delivery> {
        Err(RpcError::Internal(
            "the api must not push to groups directly".into(),
        ))
    }

    async fn change_group(
        &self,
        _req: comet::ChangeGroupRequest,
    ) -> RpcResult<comet::ChangeGroupReply> {
        Err(RpcError::Internal(
            "the api must not change group channels directly".into(),
        ))
    }

    async fn rooms(&self) -> RpcResult<Vec<String>> {
        Ok(Vec::new())
    }

    async fn kick(&self, mut keys: Vec<String>) -> RpcResult<u64> {
        if let Some(err) = self.kick_error.lock().clone() {
            return Err(err);
        }
        keys.sort();
        let n = keys.len() as u64;
        self.kicks.lock().push(keys);
        Ok(n)
    }

    async fn stats(&self) -> RpcResult<comet::StatsReply> {
        self.stats.lock().clone()
    }
}

/// Stats with the given connection and IP counts.
pub fn stats(id: &str, tcp: u64, ws: u64, ips: u64) -> comet::StatsReply {
    comet::StatsReply {
        server_id: id.into(),
        tcp_connections: tcp,
        ws_connections: ws,
        ip_count: ips,
        ..comet::StatsReply::default()
    }
}

/// The two comets every harness has unless told otherwise:
/// `comet-a` (region eu, weight 10, tcp+ws, no wss) and `comet-b` (region
/// us, weight 30, tcp+ws+wss). With no region both are ranked by weight, so
/// `comet-b` comes first; a client in eu must get `comet-a` first.
pub fn default_comets() -> Vec<(CometNode, Arc<FakeComet>)> {
    let mut a_stats = stats("comet-a", 3, 2, 4);
    a_stats.room_counts = HashMap::from([("live://1".to_string(), 5), ("live://2".to_string(), 1)]);
    a_stats.dropped_frames = 7;
    a_stats.slow_consumer_closes = 1;
    a_stats.bad_frames = 2;
    vec![
        (
            CometNode {
                id: "comet-a".into(),
                region: "eu".into(),
                weight: 10,
                tcp: "a.example:3101".into(),
                ws: "a.example:3102".into(),
                wss: String::new(),
                grpc: "10.0.0.1:3109".into(),
                ..CometNode::default()
            },
            FakeComet::new(a_stats),
        ),
        (
            CometNode {
                id: "comet-b".into(),
                region: "us".into(),
                weight: 30,
                tcp: "b.example:4101".into(),
                ws: "b.example:4102".into(),
                wss: "b.example:4103".into(),
                grpc: "10.0.0.2:3109".into(),
                ..CometNode::default()
            },
            FakeComet::new(stats("comet-b", 10, 0, 7)),
        ),
    ]
}

// ---------------------------------------------------------------------------
// Failing router and producers
// ---------------------------------------------------------------------------

/// A router whose backend is down: every call fails as unavailable.
pub struct DownRouter;

fn down<T>() -> rim_router::Result<T> {
    Err(rim_router::Error::Unavailable(
        "redis is down (test)".into(),
    ))
}

#[async_trait]
impl Router for DownRouter {
    async fn add_device(
        &self,
        _mid: i64,
        _key: &str,
        _server: &str,
        _platform: &str,
        _lease: Duration,
    ) -> rim_router::Result<()> {
        down()
    }
    async fn remove(&self, _mid: i64, _key: &str, _server: &str) -> rim_router::Result<bool> {
        down()
    }
    async fn renew(
        &self,
        _mid: i64,
        _key: &str,
        _server: &str,
        _lease: Duration,
    ) -> rim_router::Result<bool> {
        down()
    }
    async fn devices(&self, _mids: &[i64]) -> rim_router::Result<Vec<rim_router::Device>> {
        down()
    }
    async fn set_acked(
        &self,
        _mid: i64,
        _key: &str,
        _sync: u64,
        _lease: Duration,
    ) -> rim_router::Result<()> {
        down()
    }
    async fn acked(&self, _mid: i64, _keys: &[String]) -> rim_router::Result<Vec<u64>> {
        down()
    }
    async fn servers_of_keys(&self, _keys: &[String]) -> rim_router::Result<Vec<Option<String>>> {
        down()
    }
    async fn keys_by_server(
        &self,
        _mids: &[i64],
    ) -> rim_router::Result<HashMap<String, Vec<String>>> {
        down()
    }
    async fn set_room_counts(
        &self,
        _server: &str,
        _counts: &HashMap<String, i32>,
    ) -> rim_router::Result<()> {
        down()
    }
    async fn room_counts(&self) -> rim_router::Result<HashMap<String, i64>> {
        down()
    }
    async fn server_reports(&self) -> rim_router::Result<HashMap<String, ServerReport>> {
        down()
    }
    async fn ping(&self) -> rim_router::Result<()> {
        down()
    }
    async fn presence(&self, _mid: i64) -> rim_router::Result<rim_router::Presence> {
        down()
    }
    async fn settle_presence(
        &self,
        _mid: i64,
    ) -> rim_router::Result<Option<rim_router::Transition>> {
        down()
    }
    async fn presence_due(&self, _limit: usize) -> rim_router::Result<Vec<i64>> {
        down()
    }
}

/// A message store that is down: every call fails as unavailable.
pub struct DownStore;

fn store_down<T>() -> rim_im::Result<T> {
    Err(rim_im::Error::unavailable(
        "the message store is down (test)",
        std::io::Error::other("connection refused"),
    ))
}

#[async_trait]
impl MessageStore for DownStore {
    async fn send(&self, _draft: Draft) -> rim_im::Result<Sent> {
        store_down()
    }
    async fn sync(&self, _mid: i64, _after: u64, _limit: u32) -> rim_im::Result<SyncPage> {
        store_down()
    }
    async fn inbox_heads(&self, _mids: &[i64]) -> rim_im::Result<Vec<u64>> {
        store_down()
    }
    async fn prune(
        &self,
        _retention: &rim_im::Retention,
        _budget: u32,
    ) -> rim_im::Result<rim_im::Pruned> {
        store_down()
    }
    async fn pull(
        &self,
        _conv: &ConvId,
        _reader: Reader,
        _page: Page,
        _limit: u32,
    ) -> rim_im::Result<PullPage> {
        store_down()
    }
    async fn read(&self, _conv: &ConvId, _mid: i64, _seq: u64) -> rim_im::Result<ReadPos> {
        store_down()
    }
    async fn conversations(&self, _mid: i64, _limit: u32) -> rim_im::Result<Vec<ConvSummary>> {
        store_down()
    }
    async fn put_group(&self, _conv: &ConvId, _spec: GroupSpec) -> rim_im::Result<Group> {
        store_down()
    }
    async fn change_members(
        &self,
        _conv: &ConvId,
        _add: &[i64],
        _remove: &[i64],
    ) -> rim_im::Result<MembersChanged> {
        store_down()
    }
    async fn members(
        &self,
        _conv: &ConvId,
        _after: Option<i64>,
        _limit: u32,
    ) -> rim_im::Result<MembersPage> {
        store_down()
    }
    async fn group(&self, _conv: &ConvId) -> rim_im::Result<Group> {
        store_down()
    }
    async fn big_groups(&self, _mid: i64, _limit: u32) -> rim_im::Result<Vec<ConvId>> {
        store_down()
    }
    fn commits(&self) -> u64 {
        0
    }
}

/// A producer that refuses every message for one comet and passes the
/// others to the in-memory queue.
pub struct FailFor {
    pub inner: MemoryProducer,
    pub server: String,
}

#[async_trait]
impl Producer for FailFor {
    async fn send(&self, msg: PushMsg) -> rim_queue::Result<()> {
        if msg.server == self.server {
            return Err(rim_queue::Error::Closed(
                "the broker refused the message (test)",
            ));
        }
        self.inner.send(msg).await
    }

    async fn ping(&self) -> rim_queue::Result<()> {
        self.inner.ping().await
    }
}

// ---------------------------------------------------------------------------
// Setup and harness
// ---------------------------------------------------------------------------

type WrapProducer = Box<dyn FnOnce(MemoryProducer) -> Arc<dyn Producer>>;

/// How to build a harness.
pub struct Setup {
    max_body: usize,
    admin_token: Option<String>,
    regions: Vec<(String, String)>,
    router: Option<Arc<dyn Router>>,
    producer: Option<WrapProducer>,
    comets: Vec<(CometNode, Arc<FakeComet>)>,
    domain: String,
    /// `queue.capacity` and `queue.max_bytes` of the in-process queue.
    queue: (usize, usize),
    api: ApiConfig,
    /// `[im]`: the API's IM token and group limit, the service's limits.
    im: ImConfig,
    /// The message store behind logic's IM service, if any.
    im_store: ImStore,
}

/// Which message store a harness serves IM from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ImStore {
    /// None: IM is off.
    Off,
    /// A real SQLite store in a temporary directory.
    Sqlite,
    /// [`DownStore`].
    Down,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            max_body: 64 * 1024,
            admin_token: None,
            regions: Vec::new(),
            router: None,
            producer: None,
            comets: default_comets(),
            domain: "im.example".into(),
            queue: (64, 64 << 20),
            api: ApiConfig::default(),
            im: ImConfig::default(),
            im_store: ImStore::Off,
        }
    }
}

impl Setup {
    pub fn new() -> Setup {
        Setup::default()
    }

    /// The in-process queue's `queue.capacity` and `queue.max_bytes`.
    pub fn queue(mut self, capacity: usize, max_bytes: usize) -> Setup {
        self.queue = (capacity, max_bytes);
        self
    }

    /// Sets `api.max_body`.
    pub fn max_body(mut self, max_body: usize) -> Setup {
        self.max_body = max_body;
        self
    }

    /// Changes the `[api]` section (bind address, body limit and admin
    /// token come from the other setters).
    pub fn api(mut self, change: impl FnOnce(&mut ApiConfig)) -> Setup {
        change(&mut self.api);
        self
    }

    /// Serves IM (logic's IM service) over a real SQLite store in a
    /// temporary directory.
    pub fn im_store(mut self) -> Setup {
        self.im_store = ImStore::Sqlite;
        self
    }

    /// Serves IM over a store that is down ([`DownStore`]).
    pub fn im_store_down(mut self) -> Setup {
        self.im_store = ImStore::Down;
        self
    }

    /// Changes the `[im]` section.
    pub fn im(mut self, change: impl FnOnce(&mut ImConfig)) -> Setup {
        change(&mut self.im);
        self
    }

    /// Sets `api.admin_token` to [`TOKEN`].
    pub fn admin_token(mut self) -> Setup {
        self.admin_token = Some(TOKEN.into());
        self
    }

    /// Adds a `logic.nodes.regions` row.
    pub fn region(mut self, cidr: &str, region: &str) -> Setup {
        self.regions.push((cidr.into(), region.into()));
        self
    }

    /// Uses this router instead of a fresh in-memory one.
    pub fn router(mut self, router: Arc<dyn Router>) -> Setup {
        self.router = Some(router);
        self
    }

    /// Wraps the in-memory producer.
    pub fn producer(
        mut self,
        wrap: impl FnOnce(MemoryProducer) -> Arc<dyn Producer> + 'static,
    ) -> Setup {
        self.producer = Some(Box::new(wrap));
        self
    }

    /// Sets `logic.nodes.domain` (goim's default domain; `im.example` unless told).
    pub fn nodes_domain(mut self, domain: &str) -> Setup {
        self.domain = domain.into();
        self
    }

    /// Replaces the comet directory.
    pub fn comets(mut self, comets: Vec<(CometNode, Arc<FakeComet>)>) -> Setup {
        self.comets = comets;
        self
    }

    /// Builds everything and serves the API on 127.0.0.1:0.
    pub async fn start(self) -> Harness {
        // Installs rustls' default crypto provider, which the reqwest client
        // below also needs (rustls-no-provider).
        let webhooks = HttpClient::new().expect("http client");
        let router = match self.router {
            Some(router) => router,
            None => rim_router::connect(&RouterConfig {
                backend: RouterBackend::Memory,
                online_max_age: Duration::from_secs(60),
                ..RouterConfig::default()
            })
            .await
            .expect("memory router"),
        };
        let comets = Arc::new(Comets::new());
        let mut fakes = BTreeMap::new();
        for (node, fake) in self.comets {
            fakes.insert(node.id.clone(), Arc::clone(&fake));
            comets.insert(node, fake);
        }
        let config = LogicConfig {
            nodes: NodesConfig {
                domain: self.domain,
                max_nodes: 5,
                regions: self
                    .regions
                    .iter()
                    .map(|(cidr, region)| RegionCidr {
                        cidr: cidr.parse::<Cidr>().expect("cidr"),
                        region: region.clone(),
                    })
                    .collect(),
            },
            ..LogicConfig::default()
        };
        let (memory, queue) = rim_queue::memory_queue(self.queue.0, self.queue.1);
        // The queue itself is not kept: dropping the consumer closes it.
        let consumer = queue.consumer(64).expect("the queue's consumer");
        let producer: Arc<dyn Producer> = match self.producer {
            Some(wrap) => wrap(memory),
            None => Arc::new(memory),
        };
        let mut logic = Logic::new(&config, Arc::clone(&router), Arc::clone(&comets), webhooks);
        let mut im_dir = None;
        let store: Option<Arc<dyn MessageStore>> = match self.im_store {
            ImStore::Off => None,
            ImStore::Down => Some(Arc::new(DownStore)),
            ImStore::Sqlite => {
                let dir = tempfile::tempdir().expect("temporary directory");
                let ids = Arc::new(IdGenerator::new(1).expect("id generator"));
                let path = dir.path().join("im.sqlite3");
                let store =
                    SqliteStore::open(&path, SqliteOptions::new(ids)).expect("sqlite store");
                im_dir = Some(dir);
                Some(Arc::new(store))
            }
        };
        if let Some(store) = store {
            let im = Im::new(store, Arc::clone(&router), Arc::clone(&producer), &self.im);
            logic = logic.with_im(Arc::new(im));
        }
        let logic = Arc::new(logic);
        let api_config = ApiConfig {
            http_bind: "127.0.0.1:0".parse().expect("addr"),
            max_body: self.max_body,
            admin_token: self.admin_token,
            ..self.api
        };
        // The API sees logic only through its facade.
        let facade: Arc<dyn LogicFacade> = Arc::clone(&logic) as _;
        let api = Api::new(&api_config, &self.im, facade, producer);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let stop = CancellationToken::new();
        // GET /metrics answers the API's own metrics.
        let mut registry = rim_metrics::Registry::default();
        api.register_metrics(&mut registry);
        // HTTPS when the setup set api.tls_cert and api.tls_key.
        let tls = rim_api::tls_acceptor(&api_config).expect("api tls settings");
        let server = tokio::spawn(rim_api::serve_with_metrics(
            api,
            Arc::new(registry),
            listener,
            tls,
            stop.clone(),
        ));
        let http = reqwest::Client::builder()
            .timeout(WAIT)
            .no_proxy()
            .build()
            .expect("reqwest client");
        Harness {
            addr,
            http,
            logic,
            router,
            comets,
            fakes,
            consumer: Some(consumer),
            stop,
            server: Some(server),
            _im_dir: im_dir,
        }
    }
}

/// A served API and the components behind it.
pub struct Harness {
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    pub logic: Arc<Logic>,
    pub router: Arc<dyn Router>,
    pub comets: Arc<Comets>,
    pub fakes: BTreeMap<String, Arc<FakeComet>>,
    consumer: Option<MemoryConsumer>,
    stop: CancellationToken,
    server: Option<JoinHandle<std::io::Result<()>>>,
    /// The SQLite store's directory, removed when the harness is dropped.
    _im_dir: Option<tempfile::TempDir>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// An HTTP answer: status and the JSON body (`Value::Null` if not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub content_type: String,
    pub body: Value,
    pub raw: String,
}

impl Answer {
    /// Asserts a successful envelope and returns its data.
    #[track_caller]
    pub fn ok(&self) -> &Value {
        assert_eq!(self.status, 200, "expected 200, got {self:?}");
        assert!(
            self.content_type.starts_with("application/json"),
            "{self:?}"
        );
        assert_eq!(self.body["code"], 0, "{self:?}");
        assert_eq!(self.body["message"], "", "{self:?}");
        &self.body["data"]
    }

    /// Asserts an error envelope with this HTTP status and code whose
    /// message contains every one of `words`.
    #[track_caller]
    pub fn error(&self, status: u16, code: i64, words: &[&str]) {
        assert_eq!(self.status, status, "expected HTTP {status}, got {self:?}");
        assert!(
            self.content_type.starts_with("application/json"),
            "{self:?}"
        );
        assert_eq!(self.body["code"], code, "{self:?}");
        assert!(self.body["data"].is_null(), "{self:?}");
        let message = self.body["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no message in {self:?}"));
        for word in words {
            assert!(
                message.contains(word),
                "message {message:?} does not mention {word:?}"
            );
        }
    }

    /// Shorthand for a 400 naming `param`.
    #[track_caller]
    pub fn bad_param(&self, param: &str) {
        self.error(400, -400, &[&format!("\"{param}\"")]);
    }
}

impl Harness {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Sends a request and reads the answer.
    pub async fn send(&self, request: reqwest::RequestBuilder) -> Answer {
        let response = request.send().await.expect("http request");
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let raw = response.text().await.expect("http body");
        let body = serde_json::from_str(&raw).unwrap_or(Value::Null);
        Answer {
            status,
            content_type,
            body,
            raw,
        }
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send(self.http.get(self.url(path))).await
    }

    pub async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> Answer {
        self.send(self.http.post(self.url(path)).body(body)).await
    }

    /// GET with `Authorization: Bearer <token>`.
    pub async fn admin_get(&self, path: &str) -> Answer {
        self.send(self.http.get(self.url(path)).bearer_auth(TOKEN))
            .await
    }

    /// POST with `Authorization: Bearer <token>`.
    pub async fn admin_post(&self, path: &str, body: impl Into<reqwest::Body>) -> Answer {
        self.send(self.http.post(self.url(path)).bearer_auth(TOKEN).body(body))
            .await
    }

    /// Connects a session through logic (auth policy `none`, goim's JSON token).
    pub async fn connect(&self, server: &str, mid: i64, key: &str) {
        self.connect_accepting(server, mid, key, &[1000]).await;
    }

    /// Connects a session that accepts the pushed ops `accepts`.
    pub async fn connect_accepting(&self, server: &str, mid: i64, key: &str, accepts: &[i32]) {
        let token = serde_json::json!({ "mid": mid, "key": key, "room_id": "", "platform": "web", "accepts": accepts });
        let reply = self
            .logic
            .connect(logic::ConnectRequest {
                server: server.into(),
                cookie: String::new(),
                token: Bytes::from(token.to_string()),
                client_ip: "192.0.2.10".into(),
            })
            .await
            .expect("logic connect");
        assert_eq!((reply.mid, reply.key.as_str()), (mid, key));
    }

    /// Reports a comet's room counts through logic.
    pub async fn report_rooms(&self, server: &str, rooms: &[(&str, i32)]) {
        self.logic
            .renew_online(logic::RenewOnlineRequest {
                server: server.into(),
                room_count: rooms.iter().map(|(r, n)| ((*r).to_owned(), *n)).collect(),
            })
            .await
            .expect("logic renew_online");
    }

    /// Returns everything enqueued so far, in queue order.
    pub async fn drain(&mut self) -> Vec<PushMsg> {
        let consumer = self.consumer.as_mut().expect("the consumer was dropped");
        let mut out = Vec::new();
        while let Ok(received) = tokio::time::timeout(DRAIN_QUIET, consumer.recv()).await {
            let Some(delivery) = received.expect("the in-process queue") else {
                break;
            };
            delivery.receipt.handled();
            out.push(delivery.msg);
        }
        out
    }

    /// Waits (at most [`WAIT`]) for the next enqueued message.
    pub async fn next_enqueued(&mut self) -> PushMsg {
        let consumer = self.consumer.as_mut().expect("the consumer was dropped");
        let delivery = tokio::time::timeout(WAIT, consumer.recv())
            .await
            .expect("nothing was enqueued in time")
            .expect("the in-process queue")
            .expect("the queue closed");
        delivery.receipt.handled();
        delivery.msg
    }

    /// Returns everything enqueued so far, sorted by target comet.
    pub async fn drain_by_server(&mut self) -> Vec<PushMsg> {
        let mut msgs = self.drain().await;
        msgs.sort_by(|a, b| a.server.cmp(&b.server));
        msgs
    }

    /// Drops the queue's consumer: the in-memory queue becomes unavailable.
    pub fn drop_consumer(&mut self) {
        self.consumer = None;
    }

    /// Stops the server and waits for it to finish.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(server) = self.server.take() {
            let result = tokio::time::timeout(WAIT, server)
                .await
                .expect("server did not stop in time");
            result.expect("server task").expect("server error");
        }
    }

    /// Sends `request` as is over a fresh TCP connection (which it should
    /// close: send `Connection: close`) and reads the whole answer.
    pub async fn raw(&self, request: &[u8]) -> Answer {
        let mut stream = tokio::time::timeout(WAIT, TcpStream::connect(self.addr))
            .await
            .expect("connect timed out")
            .expect("connect");
        // The server may answer (and stop reading) before the whole body is
        // written; what matters is its answer.
        let _ = tokio::time::timeout(WAIT, stream.write_all(request)).await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
            .await
            .expect("reading the answer timed out");
        let text = String::from_utf8_lossy(&answer).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {text:?}"));
        let (head, body_text) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let content_type = head
            .lines()
            .filter_map(|line| line.split_once(':'))
            .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-type"))
            .map(|(_, value)| value.trim().to_owned())
            .unwrap_or_default();
        let body = serde_json::from_str(body_text).unwrap_or(Value::Null);
        Answer {
            status,
            content_type,
            body,
            raw: text,
        }
    }
}

/// A chunked HTTP/1.1 POST of `body` (in chunks of at most 16 bytes).
pub fn chunked_post(path: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!("POST {path} HTTP/1.1\r\nHost: rim.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").into_bytes();
    for chunk in body.chunks(16) {
        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// Asserts that `msg` was accepted within the last minute.
#[track_caller]
pub fn assert_recent(msg: &PushMsg) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as i64;
    let age = now - msg.accepted_unix_nanos;
    assert!(
        (0..60_000_000_000).contains(&age),
        "accepted_unix_nanos {} is not recent (now {now})",
        msg.accepted_unix_nanos
    );
}
