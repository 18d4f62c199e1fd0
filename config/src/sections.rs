//! The config sections. Each is a `[section]` table in TOML and a
//! `RIM_<SECTION>__<KEY>` prefix in the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Cidr, ConfigError, Result};

pub(crate) fn addr(s: &str) -> SocketAddr {
    // Only called on literals below; a typo there fails every config test.
    s.parse()
        .unwrap_or_else(|_| panic!("bad built-in address {s}"))
}

pub(crate) fn positive(key: &str, value: Duration) -> Result<()> {
    if value.is_zero() {
        return Err(ConfigError::invalid(key, "must be greater than zero"));
    }
    Ok(())
}

pub(crate) fn in_range(key: &str, value: u64, min: u64, max: u64) -> Result<()> {
    if value < min || value > max {
        return Err(ConfigError::invalid(
            key,
            format!("must be between {min} and {max}, got {value}"),
        ));
    }
    Ok(())
}

/// Checks an optional public host name: empty, or a DNS name without a
/// scheme, port or path (clients add those).
fn host_name_or_empty(key: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Ok(());
    }
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if value.len() > 253 || !value.split('.').all(label_ok) {
        return Err(ConfigError::invalid(
            key,
            format!(
                "{value:?} is not a host name (no scheme, port or path: e.g. comet-1.example.com)"
            ),
        ));
    }
    Ok(())
}

/// Checks a bearer token: not empty, and only visible ASCII, so that it
/// travels unchanged in an HTTP header or gRPC metadata.
pub(crate) fn secret(key: &str, value: &str) -> Result<()> {
    not_blank(key, value)?;
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::invalid(
            key,
            "must be visible ASCII without spaces (it is sent as Authorization: Bearer <token>)",
        ));
    }
    Ok(())
}

pub(crate) fn not_blank(key: &str, value: &str) -> Result<()> {
    if value.trim().is_empty() {
        return Err(ConfigError::invalid(key, "must not be empty"));
    }
    Ok(())
}

/// `[node]`: who this process is in the cluster.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Unique id of this node; empty = the host name.
    pub id: String,
    /// Region this node serves (comets) or runs in (logic, job).
    pub region: String,
    /// Zone inside the region.
    pub zone: String,
    /// Relative weight for client node selection (comets).
    pub weight: u32,
    /// Listen backlog of every listener of this process (clients, gRPC, the
    /// HTTP API, metrics); the kernel caps it at net.core.somaxconn.
    pub listen_backlog: u32,
    /// Shared secret of the cluster's internal gRPC: the comet and logic
    /// gRPC servers refuse calls without `authorization: Bearer <token>`,
    /// and every rim client of them sends it; unset = no check (refused at
    /// startup when a gRPC server binds a non-loopback address, unless
    /// `allow_unauthenticated`).
    #[serde(default)]
    pub grpc_token: Option<String>,
    /// Lets a role whose HTTP API or gRPC binds a non-loopback address start
    /// without the tokens that protect it (it logs a warning naming what is
    /// open); for networks that are private by other means.
    pub allow_unauthenticated: bool,
    /// PEM certificate chain of this node's gRPC server (comet 3109, logic
    /// 3119), also presented by its gRPC clients to servers that require
    /// one; with `tls_key`. Set = the gRPC server speaks only TLS.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates the cluster's gRPC certificates are signed by.
    /// Set = this node's gRPC clients (comet → logic, job and logic →
    /// comet) dial with TLS and trust only servers this CA signed.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// Mutual TLS: this node's gRPC server refuses clients without a
    /// certificate signed by `tls_ca`; needs `tls_ca`, `tls_cert` and `tls_key`.
    pub tls_client_auth: bool,
    /// Threads of the process's async runtime; 0 = one per CPU core. Fewer
    /// threads wake each other less: a logic or job that needs at most a
    /// core, or roles sharing a host, spend less CPU per push with 1
    /// (docs/benchmarks.md, "CPU per push").
    pub worker_threads: u32,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            id: String::new(),
            region: "default".into(),
            zone: "default".into(),
            weight: 10,
            listen_backlog: 1024,
            grpc_token: None,
            allow_unauthenticated: false,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            tls_client_auth: false,
            worker_threads: 0,
        }
    }
}

impl NodeConfig {
    pub(crate) fn validate(&mut self) -> Result<()> {
        if self.id.trim().is_empty() {
            self.id = host_name();
        }
        not_blank("node.region", &self.region)?;
        not_blank("node.zone", &self.zone)?;
        in_range("node.weight", u64::from(self.weight), 1, 1 << 20)?;
        in_range(
            "node.worker_threads",
            u64::from(self.worker_threads),
            0,
            1024,
        )?;
        in_range(
            "node.listen_backlog",
            u64::from(self.listen_backlog),
            1,
            1 << 16,
        )?;
        if let Some(token) = &self.grpc_token {
            secret("node.grpc_token", token)?;
        }
        self.validate_tls()
    }

    /// The `node.tls_*` keys: a whole pair, readable files, a CA wherever a
    /// certificate is (every node of a cluster speaks TLS or none does),
    /// and everything mutual TLS needs.
    fn validate_tls(&self) -> Result<()> {
        pem_pair(
            ("node.tls_cert", &self.tls_cert),
            ("node.tls_key", &self.tls_key),
        )?;
        if let Some(ca) = &self.tls_ca {
            readable_file("node.tls_ca", ca)?;
        }
        if self.tls_cert.is_some() && self.tls_ca.is_none() {
            return Err(ConfigError::invalid(
                "node.tls_ca",
                "required with node.tls_cert: this node's grpc clients verify their peers against it (a cluster's grpc is tls on every node or on none)",
            ));
        }
        if self.tls_client_auth && self.tls_cert.is_none() {
            return Err(ConfigError::invalid(
                "node.tls_client_auth",
                "needs node.tls_cert, node.tls_key and node.tls_ca (the server's certificate and the ca its clients' certificates are checked against)",
            ));
        }
        Ok(())
    }

    /// For a role that serves gRPC in a cluster (comet, logic): with
    /// `node.tls_ca` set its peers dial it with TLS, so it must serve TLS.
    pub(crate) fn validate_grpc_server_tls(&self) -> Result<()> {
        if self.tls_ca.is_some() && self.tls_cert.is_none() {
            return Err(ConfigError::invalid(
                "node.tls_cert",
                "required with node.tls_ca on a role that serves grpc: its peers dial it with tls",
            ));
        }
        Ok(())
    }
}

/// Checks a certificate/key pair of keys: both set or neither, each a
/// readable file.
fn pem_pair(
    (cert_key, cert): (&str, &Option<PathBuf>),
    (key_key, key): (&str, &Option<PathBuf>),
) -> Result<()> {
    match (cert, key) {
        (Some(_), None) => Err(ConfigError::invalid(
            key_key,
            format!("{cert_key} is set but {key_key} is not"),
        )),
        (None, Some(_)) => Err(ConfigError::invalid(
            cert_key,
            format!("{key_key} is set but {cert_key} is not"),
        )),
        (Some(cert), Some(key)) => {
            readable_file(cert_key, cert)?;
            readable_file(key_key, key)
        }
        (None, None) => Ok(()),
    }
}

/// Checks that `path` is a file (the process reads it at start).
fn readable_file(key: &str, path: &std::path::Path) -> Result<()> {
    if !path.is_file() {
        return Err(ConfigError::invalid(
            key,
            format!("{} is not a readable file", path.display()),
        ));
    }
    Ok(())
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "rim".to_owned())
}

/// `[comet]`: the edge server's listeners, limits and timers.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CometConfig {
    /// Raw TCP listeners (goim port 3101); empty = none.
    #[serde(default, deserialize_with = "crate::serde_list::deserialize")]
    pub tcp_bind: Vec<SocketAddr>,
    /// WebSocket listeners, upgrade path `/sub` (goim port 3102); empty = none.
    #[serde(default, deserialize_with = "crate::serde_list::deserialize")]
    pub ws_bind: Vec<SocketAddr>,
    /// Secure WebSocket listeners (goim port 3103); bound only when
    /// `tls_cert` and `tls_key` are set.
    #[serde(default, deserialize_with = "crate::serde_list::deserialize")]
    pub wss_bind: Vec<SocketAddr>,
    /// PEM certificate chain for WSS.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for WSS.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// The comet gRPC service (goim port 3109).
    pub grpc_bind: SocketAddr,
    /// Public host name web clients reach this comet's WebSocket listeners
    /// by, advertised in discovery and returned by `/goim/nodes/weighted`
    /// for `platform=web` (it should match the WSS certificate); empty =
    /// the host of the advertised WebSocket address.
    #[serde(default)]
    pub public_domain: String,
    /// Session shards keyed by connection key.
    pub buckets: usize,
    /// Largest body a client frame may carry, in bytes.
    pub max_body: usize,
    /// Time a new connection has to authenticate.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Most connections this comet holds.
    pub max_connections: usize,
    /// Most connections from one client IP address.
    pub max_connections_per_ip: usize,
    /// Frames each connection's outbound queue holds before pushes to it drop.
    pub write_queue: usize,
    /// How long a connection's outbound queue may stay full before the
    /// connection is closed as a slow consumer.
    #[serde(with = "humantime_serde")]
    pub slow_consumer_timeout: Duration,
    /// Least time between two presence-lease renewals of one connection.
    #[serde(with = "humantime_serde")]
    pub presence_renew: Duration,
    /// How often room counts are reported to logic.
    #[serde(with = "humantime_serde")]
    pub room_report_interval: Duration,
    /// On SIGTERM, clients are closed spread over this window.
    #[serde(with = "humantime_serde")]
    pub drain_window: Duration,
}

impl Default for CometConfig {
    fn default() -> Self {
        CometConfig {
            tcp_bind: vec![addr("0.0.0.0:3101")],
            ws_bind: vec![addr("0.0.0.0:3102")],
            wss_bind: vec![addr("0.0.0.0:3103")],
            tls_cert: None,
            tls_key: None,
            grpc_bind: addr("0.0.0.0:3109"),
            public_domain: String::new(),
            buckets: 32,
            max_body: 4096,
            handshake_timeout: Duration::from_secs(5),
            max_connections: 1_000_000,
            max_connections_per_ip: 10_000,
            write_queue: 64,
            slow_consumer_timeout: Duration::from_secs(10),
            presence_renew: Duration::from_secs(600),
            room_report_interval: Duration::from_secs(10),
            drain_window: Duration::from_secs(10),
        }
    }
}

impl CometConfig {
    /// Returns whether secure WebSocket listeners are configured.
    pub fn wss_enabled(&self) -> bool {
        self.tls_cert.is_some() && self.tls_key.is_some() && !self.wss_bind.is_empty()
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.tcp_bind.is_empty() && self.ws_bind.is_empty() && !self.wss_enabled() {
            return Err(ConfigError::invalid(
                "comet.tcp_bind",
                "no client listener: set tcp_bind, ws_bind or wss_bind with tls_cert and tls_key",
            ));
        }
        pem_pair(
            ("comet.tls_cert", &self.tls_cert),
            ("comet.tls_key", &self.tls_key),
        )?;
        host_name_or_empty("comet.public_domain", &self.public_domain)?;
        in_range("comet.buckets", self.buckets as u64, 1, 4096)?;
        in_range("comet.max_body", self.max_body as u64, 16, 16 << 20)?;
        positive("comet.handshake_timeout", self.handshake_timeout)?;
        in_range(
            "comet.max_connections",
            self.max_connections as u64,
            1,
            100_000_000,
        )?;
        in_range(
            "comet.max_connections_per_ip",
            self.max_connections_per_ip as u64,
            1,
            100_000_000,
        )?;
        in_range("comet.write_queue", self.write_queue as u64, 1, 65_536)?;
        positive("comet.slow_consumer_timeout", self.slow_consumer_timeout)?;
        positive("comet.presence_renew", self.presence_renew)?;
        positive("comet.room_report_interval", self.room_report_interval)
    }
}

/// `[logic]`: the logic service.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogicConfig {
    /// The logic gRPC service (goim port 3119).
    pub grpc_bind: SocketAddr,
    /// Heartbeat interval clients are told to keep.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Missed heartbeats after which a comet closes a connection.
    pub heartbeat_max: u32,
    /// Lifetime of a presence entry in the router without renewal.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// URL upstream client frames are POSTed to; empty = they are acknowledged,
    /// dropped and counted (`rim_logic_upstream_frames_total{result="no_webhook"}`).
    pub receive_webhook: String,
    /// How long the upstream webhook may take.
    #[serde(with = "humantime_serde")]
    pub receive_timeout: Duration,
    /// URL presence events (a user online with its first device, offline
    /// with its last) are POSTed to; empty = no events.
    pub presence_webhook: String,
    /// How long a user must stay without devices before it is announced
    /// offline; a reconnect within it announces nothing.
    #[serde(with = "humantime_serde")]
    pub presence_debounce: Duration,
    /// How long one POST of a presence event may take.
    #[serde(with = "humantime_serde")]
    pub presence_timeout: Duration,
    /// POSTs of one presence event before it is dropped (and counted).
    pub presence_attempts: u32,
    /// Presence events waiting for the webhook; when full, new ones are
    /// dropped (and counted).
    pub presence_queue: usize,
    /// How client tokens are verified.
    pub auth: AuthConfig,
    /// Node selection for clients.
    pub nodes: NodesConfig,
}

impl Default for LogicConfig {
    fn default() -> Self {
        LogicConfig {
            grpc_bind: addr("0.0.0.0:3119"),
            heartbeat: Duration::from_secs(240),
            heartbeat_max: 2,
            lease: Duration::from_secs(1800),
            receive_webhook: String::new(),
            receive_timeout: Duration::from_secs(2),
            presence_webhook: String::new(),
            presence_debounce: Duration::from_secs(5),
            presence_timeout: Duration::from_secs(2),
            presence_attempts: 5,
            presence_queue: 10_000,
            auth: AuthConfig::default(),
            nodes: NodesConfig::default(),
        }
    }
}

impl LogicConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        positive("logic.heartbeat", self.heartbeat)?;
        in_range("logic.heartbeat_max", u64::from(self.heartbeat_max), 1, 100)?;
        positive("logic.lease", self.lease)?;
        if self.lease <= self.heartbeat {
            return Err(ConfigError::invalid(
                "logic.lease",
                "must be longer than logic.heartbeat, or idle sessions expire",
            ));
        }
        if !self.receive_webhook.is_empty() {
            http_url("logic.receive_webhook", &self.receive_webhook)?;
        }
        positive("logic.receive_timeout", self.receive_timeout)?;
        if !self.presence_webhook.is_empty() {
            http_url("logic.presence_webhook", &self.presence_webhook)?;
        }
        if self.presence_debounce > Duration::from_secs(3600) {
            return Err(ConfigError::invalid(
                "logic.presence_debounce",
                "must be at most 1h",
            ));
        }
        positive("logic.presence_timeout", self.presence_timeout)?;
        in_range(
            "logic.presence_attempts",
            u64::from(self.presence_attempts),
            1,
            20,
        )?;
        in_range(
            "logic.presence_queue",
            self.presence_queue as u64,
            1,
            1_000_000,
        )?;
        self.auth.validate()?;
        self.nodes.validate()
    }
}

fn http_url(key: &str, url: &str) -> Result<()> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| {
            ConfigError::invalid(key, format!("{url:?} is not an http:// or https:// URL"))
        })?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(ConfigError::invalid(key, format!("{url:?} has no host")));
    }
    Ok(())
}

/// How logic verifies the token in a client's Auth frame.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthPolicy {
    /// Trusts the token JSON as goim does (insecure; logged at startup).
    None,
    /// The token is an HS256 JWT whose verified claims give mid, room and accepts.
    Jwt,
    /// The token is POSTed to a business URL that accepts or refuses it.
    Webhook,
}

/// `[logic.auth]`: client token verification.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Which policy verifies tokens.
    pub policy: AuthPolicy,
    /// HS256 secret shared with the business that signs tokens (jwt; at least 32 bytes).
    pub jwt_secret: String,
    /// Required `iss` claim; empty = not checked.
    pub jwt_issuer: String,
    /// Required `aud` claim; empty = not checked.
    pub jwt_audience: String,
    /// Clock skew tolerated on `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub jwt_leeway: Duration,
    /// URL the token is POSTed to (webhook).
    pub webhook_url: String,
    /// How long the auth webhook may take.
    #[serde(with = "humantime_serde")]
    pub webhook_timeout: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            policy: AuthPolicy::None,
            jwt_secret: String::new(),
            jwt_issuer: String::new(),
            jwt_audience: String::new(),
            jwt_leeway: Duration::from_secs(30),
            webhook_url: String::new(),
            webhook_timeout: Duration::from_secs(2),
        }
    }
}

impl AuthConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        match self.policy {
            AuthPolicy::None => {}
            AuthPolicy::Jwt => {
                if self.jwt_secret.len() < 32 {
                    return Err(ConfigError::invalid(
                        "logic.auth.jwt_secret",
                        "must be set to at least 32 bytes when logic.auth.policy is jwt",
                    ));
                }
            }
            AuthPolicy::Webhook => http_url("logic.auth.webhook_url", &self.webhook_url)?,
        }
        positive("logic.auth.webhook_timeout", self.webhook_timeout)
    }
}

/// One row of the client-IP → region table.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegionCidr {
    /// Client network, e.g. `10.20.0.0/16`.
    pub cidr: Cidr,
    /// Region of the clients in it.
    pub region: String,
}

/// `[logic.nodes]`: which comets clients are told to connect to.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodesConfig {
    /// Domain returned to clients (goim's `domain` field).
    pub domain: String,
    /// Most comet addresses returned to one client.
    pub max_nodes: usize,
    /// Client network → region; the longest matching prefix wins.
    #[serde(default)]
    pub regions: Vec<RegionCidr>,
}

impl Default for NodesConfig {
    fn default() -> Self {
        NodesConfig {
            domain: String::new(),
            max_nodes: 5,
            regions: Vec::new(),
        }
    }
}

impl NodesConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        in_range("logic.nodes.max_nodes", self.max_nodes as u64, 1, 100)?;
        for (i, row) in self.regions.iter().enumerate() {
            not_blank(&format!("logic.nodes.regions[{i}].region"), &row.region)?;
        }
        Ok(())
    }
}

/// `[api]`: the HTTP push and admin API.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// The HTTP listener (goim port 3111).
    pub http_bind: SocketAddr,
    /// Largest push body accepted, in bytes; larger requests get 413.
    pub max_body: usize,
    /// Bearer token required by the admin endpoints (`/admin/*`); unset =
    /// no check (refused at startup when `http_bind` is not a loopback
    /// address, unless `node.allow_unauthenticated`).
    #[serde(default)]
    pub admin_token: Option<String>,
    /// Bearer token required by the push endpoints (`/goim/push/*`); unset
    /// = no check (refused at startup when `http_bind` is not a loopback
    /// address, unless `node.allow_unauthenticated`).
    #[serde(default)]
    pub push_token: Option<String>,
    /// Longest a connection may take to send a complete request head,
    /// counted from connect for the first request and from the first byte
    /// of each later one (between requests `keep_alive_timeout` applies);
    /// then it is closed.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Longest a request's body may take to arrive in full; a slower
    /// request is answered 408 and its connection closed.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// A connection with no request in progress and no bytes read or
    /// written for this long is closed.
    #[serde(with = "humantime_serde")]
    pub keep_alive_timeout: Duration,
    /// Most HTTP API connections served at once; over it, new connections
    /// are not accepted (they wait in the listen backlog) until one closes.
    pub max_connections: usize,
    /// On shutdown, how long open connections may finish the requests they
    /// are in; connections still open then are closed.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// PEM certificate chain of the HTTP API; with `tls_key`. Set = the API
    /// speaks only HTTPS on `http_bind`.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            http_bind: addr("0.0.0.0:3111"),
            max_body: 64 * 1024,
            admin_token: None,
            push_token: None,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(30),
            max_connections: 1024,
            drain_timeout: Duration::from_secs(5),
            tls_cert: None,
            tls_key: None,
        }
    }
}

impl ApiConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        pem_pair(
            ("api.tls_cert", &self.tls_cert),
            ("api.tls_key", &self.tls_key),
        )?;
        in_range("api.max_body", self.max_body as u64, 1, 16 << 20)?;
        positive("api.header_read_timeout", self.header_read_timeout)?;
        positive("api.body_read_timeout", self.body_read_timeout)?;
        positive("api.keep_alive_timeout", self.keep_alive_timeout)?;
        positive("api.drain_timeout", self.drain_timeout)?;
        in_range(
            "api.max_connections",
            self.max_connections as u64,
            1,
            1_000_000,
        )?;
        if let Some(token) = &self.admin_token {
            secret("api.admin_token", token)?;
        }
        if let Some(token) = &self.push_token {
            secret("api.push_token", token)?;
        }
        Ok(())
    }
}

/// Where the online map lives.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RouterBackend {
    /// In this process (standalone, or a single logic).
    Memory,
    /// In Redis (single node or cluster), shared by every logic.
    Redis,
}

/// `[router]`: the online map.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    /// Where the online map lives.
    pub backend: RouterBackend,
    /// Redis URLs; one = a single Redis, several = the seeds of a Redis Cluster.
    #[serde(default, deserialize_with = "crate::serde_list::deserialize")]
    pub redis: Vec<String>,
    /// Room counts a comet reported longer ago than this are ignored.
    #[serde(with = "humantime_serde")]
    pub online_max_age: Duration,
    /// PEM file of the CA certificates that sign the Redis servers'
    /// certificates, for `rediss://` URLs; unset = the system's roots.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            backend: RouterBackend::Memory,
            redis: vec!["redis://127.0.0.1:6379".into()],
            online_max_age: Duration::from_secs(30),
            tls_ca: None,
        }
    }
}

impl RouterConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        if self.backend == RouterBackend::Redis {
            if self.redis.is_empty() {
                return Err(ConfigError::invalid(
                    "router.redis",
                    "backend is redis but no URL is set",
                ));
            }
            for url in &self.redis {
                if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                    return Err(ConfigError::invalid(
                        "router.redis",
                        format!("{url:?} is not a redis:// or rediss:// URL"),
                    ));
                }
            }
            let tls_urls = self
                .redis
                .iter()
                .filter(|url| url.starts_with("rediss://"))
                .count();
            if tls_urls != 0 && tls_urls != self.redis.len() {
                return Err(ConfigError::invalid(
                    "router.redis",
                    "mixes redis:// and rediss:// URLs: the nodes of one Redis Cluster all use TLS or none does",
                ));
            }
            if let Some(ca) = &self.tls_ca {
                if tls_urls == 0 {
                    return Err(ConfigError::invalid(
                        "router.tls_ca",
                        "is set but no URL in router.redis is rediss://",
                    ));
                }
                if !ca.is_file() {
                    return Err(ConfigError::invalid(
                        "router.tls_ca",
                        format!("{} is not a readable file", ca.display()),
                    ));
                }
            }
        }
        positive("router.online_max_age", self.online_max_age)
    }
}

/// Which queue carries push messages from api to job.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QueueBackend {
    /// A bounded in-process queue (standalone).
    Memory,
    /// Kafka (any Kafka-protocol broker).
    Kafka,
}

/// `[queue]`: the push queue between api and job.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Which queue carries push messages.
    pub backend: QueueBackend,
    /// Kafka bootstrap servers, `host:port`.
    #[serde(default, deserialize_with = "crate::serde_list::deserialize")]
    pub brokers: Vec<String>,
    /// Kafka topic.
    pub topic: String,
    /// Messages the in-process queue holds before producers wait.
    pub capacity: usize,
    /// Bytes of push messages (encoded) this process holds for the queue
    /// before producers wait and then get 503 (in-process queue: waiting and
    /// in flight in the job), or before the job's consumer stops reading
    /// (Kafka: in flight).
    pub max_bytes: usize,
    /// The longest the job's Kafka fetch waits for data (`fetch.wait.max.ms`):
    /// Kafka answers as soon as data arrives; a broker that holds a fetch
    /// for part of it (tansu) adds that to push latency.
    #[serde(with = "humantime_serde")]
    pub fetch_wait: Duration,
    /// How long the Kafka producer gathers messages into one request
    /// (`linger.ms`): longer means fewer, larger produce requests — less CPU
    /// in rim and the broker per message — and that much more latency.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// Produce requests the Kafka producer keeps in flight per broker
    /// (`max.in.flight.requests.per.connection`, 1..=5 with idempotence).
    /// 1 sends a message at once when nothing is in flight and gathers the
    /// ones that come meanwhile into the next request: batches grow with
    /// the load and the broker's answer time, without a fixed wait.
    pub produce_in_flight: u32,
    /// Extra librdkafka properties of the Kafka producer (logic) and
    /// consumer (job), for TLS and SASL only: `security.protocol`, `ssl.*`,
    /// `sasl.*` and `enable.ssl.certificate.verification`. A key may be
    /// written with `_` for `.` (`ssl_ca_location`), which is how an
    /// environment variable names it (`RIM_QUEUE__KAFKA__SASL_PASSWORD`).
    #[serde(default)]
    pub kafka: std::collections::BTreeMap<String, String>,
    /// How long the job's consumer group waits for a silent member before
    /// it gives the member's partitions to others (`session.timeout.ms`).
    /// Apache Kafka refuses values outside its `group.min.session.timeout.ms`
    /// (6 s) .. `group.max.session.timeout.ms` (30 min).
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// How often the job's consumer tells the group coordinator it is alive
    /// (`heartbeat.interval.ms`); below `session_timeout`, usually a third.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Whether the job joins its consumer group as a static member
    /// (`group.instance.id`, KIP-345): on Apache Kafka a job restarted
    /// within `session_timeout` gets its partitions back at once, without a
    /// rebalance. Turn it off on tansu (the test broker), which holds every
    /// static member's JoinGroup and SyncGroup for 3 s (docs/operations.md).
    pub static_membership: bool,
    /// The static member id when `static_membership` is on; empty = the
    /// node id (`node.id`). Unique per group: two live jobs with the same id
    /// fence each other.
    pub group_instance_id: String,
    /// How the group spreads partitions over its jobs
    /// (`partition.assignment.strategy`): `range`, `roundrobin` (eager: a
    /// rebalance revokes every partition first) or `cooperative-sticky`
    /// (only the partitions that move are revoked). Every job of a group
    /// must use the same one.
    pub assignment_strategy: AssignmentStrategy,
}

/// How a Kafka consumer group spreads partitions over its members
/// (librdkafka's `partition.assignment.strategy`).
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum AssignmentStrategy {
    /// Eager: each member gets a contiguous range of each topic's partitions.
    Range,
    /// Eager: partitions dealt out one by one.
    Roundrobin,
    /// Incremental (KIP-429): a rebalance revokes only what moves.
    CooperativeSticky,
}

impl AssignmentStrategy {
    /// The librdkafka name.
    pub fn as_str(self) -> &'static str {
        match self {
            AssignmentStrategy::Range => "range",
            AssignmentStrategy::Roundrobin => "roundrobin",
            AssignmentStrategy::CooperativeSticky => "cooperative-sticky",
        }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            backend: QueueBackend::Memory,
            brokers: vec!["127.0.0.1:9092".into()],
            topic: "rim-push".into(),
            capacity: 65_536,
            max_bytes: 64 << 20,
            fetch_wait: Duration::from_millis(5),
            linger: Duration::from_millis(1),
            produce_in_flight: 1,
            kafka: std::collections::BTreeMap::new(),
            session_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(1),
            static_membership: true,
            group_instance_id: String::new(),
            assignment_strategy: AssignmentStrategy::CooperativeSticky,
        }
    }
}

impl QueueConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        if self.backend == QueueBackend::Kafka && self.brokers.is_empty() {
            return Err(ConfigError::invalid(
                "queue.brokers",
                "backend is kafka but no broker is set",
            ));
        }
        not_blank("queue.topic", &self.topic)?;
        in_range("queue.capacity", self.capacity as u64, 1, 16 << 20)?;
        in_range("queue.max_bytes", self.max_bytes as u64, 1 << 16, 1 << 40)?;
        positive("queue.fetch_wait", self.fetch_wait)?;
        in_range(
            "queue.fetch_wait",
            self.fetch_wait.as_millis().try_into().unwrap_or(u64::MAX),
            1,
            300_000,
        )?;
        in_range(
            "queue.linger",
            self.linger.as_millis().try_into().unwrap_or(u64::MAX),
            0,
            1_000,
        )?;
        in_range(
            "queue.produce_in_flight",
            u64::from(self.produce_in_flight),
            1,
            5,
        )?;
        // librdkafka wants max.poll.interval.ms (300 s) >= session.timeout.ms.
        in_range(
            "queue.session_timeout",
            self.session_timeout
                .as_millis()
                .try_into()
                .unwrap_or(u64::MAX),
            1_000,
            300_000,
        )?;
        in_range(
            "queue.heartbeat_interval",
            self.heartbeat_interval
                .as_millis()
                .try_into()
                .unwrap_or(u64::MAX),
            100,
            3_600_000,
        )?;
        if self.heartbeat_interval >= self.session_timeout {
            return Err(ConfigError::invalid(
                "queue.heartbeat_interval",
                format!(
                    "must be below queue.session_timeout ({:?}), got {:?}",
                    self.session_timeout, self.heartbeat_interval
                ),
            ));
        }
        if !self.group_instance_id.is_empty() {
            group_instance_id("queue.group_instance_id", &self.group_instance_id)?;
        }
        for (name, value) in self.kafka_properties() {
            let key = format!("queue.kafka.{name}");
            let known = name == "security.protocol"
                || name == "enable.ssl.certificate.verification"
                || name.starts_with("ssl.")
                || name.starts_with("sasl.");
            if !known {
                return Err(ConfigError::invalid(
                    &key,
                    "not passed to Kafka: queue.kafka takes security.protocol, ssl.*, sasl.* and enable.ssl.certificate.verification only",
                ));
            }
            not_blank(&key, &value)?;
            if name == "security.protocol"
                && !["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"]
                    .contains(&value.to_ascii_lowercase().as_str())
            {
                return Err(ConfigError::invalid(
                    &key,
                    format!("{value:?} is not plaintext, ssl, sasl_plaintext or sasl_ssl"),
                ));
            }
        }
        Ok(())
    }

    /// The `queue.kafka` properties under librdkafka's names (`_` in a key
    /// read as `.`), for the producer and the consumer.
    pub fn kafka_properties(&self) -> Vec<(String, String)> {
        self.kafka
            .iter()
            .map(|(name, value)| (name.replace('_', "."), value.clone()))
            .collect()
    }

    /// The static group member id the job joins with: `None` without
    /// static membership, else `group_instance_id` or the node id.
    pub fn group_instance(&self, node: &NodeConfig) -> Option<String> {
        self.static_membership.then(|| {
            if self.group_instance_id.is_empty() {
                node.id.clone()
            } else {
                self.group_instance_id.clone()
            }
        })
    }

    /// Checks the static member id a job derives from its node id.
    pub(crate) fn validate_group_instance(&self, node: &NodeConfig) -> Result<()> {
        match self.group_instance(node) {
            Some(id) if self.group_instance_id.is_empty() => {
                group_instance_id("node.id (the job's queue.group_instance_id)", &id)
            }
            _ => Ok(()),
        }
    }
}

/// Kafka's rule for a `group.instance.id`: 1 to 249 of `[A-Za-z0-9._-]`.
fn group_instance_id(key: &str, id: &str) -> Result<()> {
    if id.is_empty()
        || id.len() > 249
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(ConfigError::invalid(
            key,
            format!("a Kafka group instance id is 1 to 249 of A-Z a-z 0-9 . _ -, got {id:?}"),
        ));
    }
    Ok(())
}

/// When the job's aggregator sends a room's (or a big group's) batch
/// before it is full (`job.room_flush_rule`).
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RoomFlushRule {
    /// Self-clocked, like Nagle's: a message to a room with no batch in
    /// flight (sent and not yet answered by every comet) goes at once;
    /// while one is in flight the room's messages gather and go when it is
    /// answered, when the batch is full, or at `job.room_flush`, whichever
    /// comes first.
    Adaptive,
    /// A fixed window: a batch goes when it is full or when its oldest
    /// message has waited `job.room_flush` (goim merges for up to 1 s).
    Fixed,
}

impl<'de> Deserialize<'de> for RoomFlushRule {
    /// Reads `adaptive` or `fixed`; anything else is refused with both
    /// choices named (loading adds the key).
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        match name.as_str() {
            "adaptive" => Ok(RoomFlushRule::Adaptive),
            "fixed" => Ok(RoomFlushRule::Fixed),
            _ => Err(serde::de::Error::custom(format!(
                "must be \"adaptive\" or \"fixed\", got {name:?}"
            ))),
        }
    }
}

/// `[job]`: the queue consumer that fans pushes out to comets.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// Kafka consumer group; empty = `rim-job-<node.region>`.
    pub group: String,
    /// A room's batch is flushed when it holds this many messages.
    pub room_batch: usize,
    /// ... or when its oldest message has waited this long (with the
    /// adaptive rule: at the latest).
    #[serde(with = "humantime_serde")]
    pub room_flush: Duration,
    /// When a room's (or big group's) batch that is neither full nor due
    /// goes out: adaptive (self-clocked) or fixed (the window only).
    pub room_flush_rule: RoomFlushRule,
    /// How often the job asks the comets which rooms they host, to send a
    /// room's batches only to those; 0 = every room to every comet.
    #[serde(with = "humantime_serde")]
    pub room_routes_interval: Duration,
    /// Room routing applies once the region has at least this many comets
    /// (with fewer, every comet gets every room: little to save, and no
    /// routing delay for a room's first member on a comet).
    pub room_routes_min_comets: usize,
}

impl Default for JobConfig {
    fn default() -> Self {
        JobConfig {
            group: String::new(),
            room_batch: 20,
            room_flush: Duration::from_millis(50),
            room_flush_rule: RoomFlushRule::Adaptive,
            room_routes_interval: Duration::from_secs(1),
            room_routes_min_comets: 4,
        }
    }
}

impl JobConfig {
    pub(crate) fn validate(&mut self, node: &NodeConfig) -> Result<()> {
        if self.group.trim().is_empty() {
            self.group = format!("rim-job-{}", node.region);
        }
        in_range("job.room_batch", self.room_batch as u64, 1, 10_000)?;
        in_range(
            "job.room_routes_min_comets",
            self.room_routes_min_comets as u64,
            1,
            100_000,
        )?;
        positive("job.room_flush", self.room_flush)
    }
}

/// `[metrics]`: where a role serves Prometheus metrics on a listener of its
/// own (`rim comet`, `rim job`; `rim standalone` serves `GET /metrics` on
/// `api.http_bind`, and also here when set; logic only on `api.http_bind`).
/// The default, empty, is no listener of its own.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Listener for `GET /metrics`, `host:port`; empty = not served.
    pub bind: String,
}

impl MetricsConfig {
    /// The comet's default: port 3108, next to its gRPC port.
    pub fn comet() -> MetricsConfig {
        MetricsConfig {
            bind: "0.0.0.0:3108".into(),
        }
    }

    /// The job's default: port 3128.
    pub fn job() -> MetricsConfig {
        MetricsConfig {
            bind: "0.0.0.0:3128".into(),
        }
    }

    /// Returns the address to serve metrics on; `None` when disabled.
    /// Only valid after `validate`, which checks that it parses.
    pub fn bind_addr(&self) -> Option<SocketAddr> {
        let bind = self.bind.trim();
        if bind.is_empty() {
            return None;
        }
        bind.parse().ok()
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bind = self.bind.trim();
        if !bind.is_empty() && bind.parse::<SocketAddr>().is_err() {
            return Err(ConfigError::invalid(
                "metrics.bind",
                format!("{bind:?} is not a socket address (host:port), nor \"\" to disable"),
            ));
        }
        Ok(())
    }
}

/// How roles find each other.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DiscoveryBackend {
    /// The fixed lists in this section.
    Static,
    /// Ephemeral nodes and watches in ZooKeeper.
    Zookeeper,
}

/// A comet listed in static discovery.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StaticComet {
    /// The comet's `node.id`.
    pub id: String,
    /// The comet's region.
    #[serde(default = "default_region")]
    pub region: String,
    /// The comet's gRPC address, `host:port`.
    pub grpc: String,
    /// Client TCP address, `host:port`, given to clients; empty = none.
    #[serde(default)]
    pub tcp: String,
    /// Client WebSocket address, `host:port`; empty = none.
    #[serde(default)]
    pub ws: String,
    /// Client WSS address, `host:port`; empty = none.
    #[serde(default)]
    pub wss: String,
    /// Public host name web clients reach the comet's WebSocket listeners
    /// by (its `comet.public_domain`); empty = the host of `ws` / `wss`.
    #[serde(default)]
    pub domain: String,
    /// Relative weight in node selection.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    10
}

fn default_region() -> String {
    "default".into()
}

/// `[discovery]`: how comets, logics and jobs find each other.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// Where the cluster's membership comes from.
    pub backend: DiscoveryBackend,
    /// ZooKeeper connect string, `host:port[,host:port...]`.
    pub zookeeper: String,
    /// ZooKeeper path under which rim registers.
    pub root: String,
    /// ZooKeeper session timeout.
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// Static discovery: logic gRPC addresses, `host:port`.
    #[serde(default, deserialize_with = "crate::serde_list::deserialize")]
    pub logics: Vec<String>,
    /// Static discovery: the comets.
    #[serde(default)]
    pub comets: Vec<StaticComet>,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            backend: DiscoveryBackend::Static,
            zookeeper: "127.0.0.1:2181".into(),
            root: "/rim".into(),
            session_timeout: Duration::from_secs(10),
            logics: vec!["127.0.0.1:3119".into()],
            comets: Vec::new(),
        }
    }
}

impl DiscoveryConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        if self.backend == DiscoveryBackend::Zookeeper {
            not_blank("discovery.zookeeper", &self.zookeeper)?;
        }
        if !self.root.starts_with('/') || (self.root.len() > 1 && self.root.ends_with('/')) {
            return Err(ConfigError::invalid(
                "discovery.root",
                format!(
                    "{:?} must be an absolute ZooKeeper path without a trailing slash",
                    self.root
                ),
            ));
        }
        positive("discovery.session_timeout", self.session_timeout)?;
        for (i, comet) in self.comets.iter().enumerate() {
            not_blank(&format!("discovery.comets[{i}].id"), &comet.id)?;
            not_blank(&format!("discovery.comets[{i}].grpc"), &comet.grpc)?;
            host_name_or_empty(&format!("discovery.comets[{i}].domain"), &comet.domain)?;
        }
        Ok(())
    }
}
