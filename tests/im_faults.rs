//! The IM fault suite (issue #13 part 8): chat load from many devices while
//! processes are killed with SIGKILL, then proof that nothing acknowledged
//! was lost or doubled.
//!
//! The load driver ([`load`]) runs users with two devices each; every
//! device sends its share of messages (1:1 to users near it on a ring, a
//! few to itself, 30% to its groups), keeps the one it has not had a
//! SEND_REPLY for and resends it with the same cmid after a reply timeout, a
//! lost connection or code 5 (after code 3, once its `retry_ms` passed),
//! reconnects with bounded backoff (its home
//! address first, then the others the test currently offers), ACKs its
//! contiguous inbox prefix, and SYNCs from the end of that prefix after
//! every reconnect and every NOTIFY sync. [`verify`] then reads the store
//! back over the wire from fresh connections (SYNC every inbox from 0, PULL
//! every conversation from 1), checks the invariants against what every
//! device was acknowledged and received, and the test compares those rows
//! with the store's own tables (the SQLite file, the PostgreSQL databases).
//! The cluster run stores on two PostgreSQL primaries (the sharded store)
//! and restarts one of them mid-run: inbox entries that could not reach it
//! are relayed from the outbox, and the test waits for the outboxes to
//! drain. Duplicates on the wire are counted and printed, never asserted
//! away.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rim_client::{AuthToken, Client};
use rim_proto::im::{
    Ack, Body, Code, Msg, Notify, PullReply, PullRequest, Request, SendRequest, SyncReply,
    SyncRequest,
};
use rim_proto::{Frame, Op};

/// How a test's load looks.
#[derive(Clone, Debug)]
struct Plan {
    /// Mids are `first_mid..first_mid + users`.
    first_mid: i64,
    users: i64,
    devices_per_user: usize,
    /// Messages over all devices.
    messages: usize,
    /// Each user talks 1:1 with the next `partners` users on a ring (and
    /// they with it), so conversations get long enough for concurrent
    /// senders to race for their seqs.
    partners: i64,
    /// One send in this many goes to the sender's own conversation `p:a:a`.
    self_every: usize,
    /// Percent of sends that go to one of the sender's groups
    /// ([`Plan::groups`], created over HTTP before the run; 0 = 1:1 only).
    group_percent: usize,
    seed: u64,
}

impl Plan {
    fn mids(&self) -> impl Iterator<Item = i64> + '_ {
        self.first_mid..self.first_mid + self.users
    }

    /// The groups a group send picks from: blocks of ten consecutive users,
    /// and the same blocks shifted by five, so each user is in two groups
    /// that overlap two others.
    fn groups(&self) -> Vec<(String, Vec<i64>)> {
        let blocks = self.users / 10;
        let mut groups = Vec::new();
        for (family, shift) in [("a", 0), ("b", 5)] {
            for g in 0..blocks {
                let members = (0..10)
                    .map(|i| self.first_mid + (g * 10 + shift + i) % self.users)
                    .collect();
                groups.push((format!("g:faults-{}-{family}{g}", self.first_mid), members));
            }
        }
        groups
    }

    /// The members of a conversation the load can produce.
    fn members(&self, conv: &str) -> Vec<i64> {
        if let Some(pair) = conv.strip_prefix("p:") {
            let (a, b) = pair.split_once(':').expect("p:<a>:<b>");
            let (a, b): (i64, i64) = (a.parse().unwrap(), b.parse().unwrap());
            if a == b { vec![a] } else { vec![a, b] }
        } else {
            self.groups()
                .into_iter()
                .find(|(g, _)| g == conv)
                .map(|(_, members)| members)
                .unwrap_or_else(|| panic!("a conversation the load never sends to: {conv}"))
        }
    }
}

/// Creates the plan's groups through the HTTP API at `api` (im.md: PUT
/// /im/v1/groups/{gid}, POST /im/v1/groups/{gid}/members) when the plan
/// sends to groups.
async fn create_groups(api: SocketAddr, plan: &Plan) {
    if plan.group_percent == 0 {
        return;
    }
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    for (conv, members) in plan.groups() {
        let gid = conv.strip_prefix("g:").expect("a group conversation");
        let base = format!("http://{api}/im/v1/groups/{gid}");
        let answer: serde_json::Value = http
            .put(&base)
            .json(&serde_json::json!({"name": gid, "max_members": members.len()}))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .unwrap_or_else(|e| panic!("PUT {base}: {e}"))
            .json()
            .await
            .unwrap_or_else(|e| panic!("PUT {base}: not JSON: {e}"));
        assert_eq!(answer["code"], 0, "PUT {base}: {answer}");
        let url = format!("{base}/members");
        support::post_ok(
            &http,
            &url,
            &serde_json::json!({"add": members}).to_string(),
        )
        .await;
    }
}

/// Now in unix milliseconds (the server's `ts` clock: same host).
fn unix_ms() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.map_or(0, |d| d.as_millis() as i64)
}

/// A small deterministic generator (splitmix64): reproducible loads
/// without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What the driver shares with the test while it runs.
#[derive(Clone)]
struct Run {
    /// Where devices (re)connect: comet TCP addresses, replaced by the test
    /// when it restarts a process on new ports.
    targets: Arc<Mutex<Vec<SocketAddr>>>,
    /// Sends acknowledged with code 0 so far (the test kills by progress).
    acked: Arc<AtomicUsize>,
    /// Devices still in their send phase.
    sending: Arc<AtomicUsize>,
    /// Set by the test after the final quiet period: devices do their final
    /// SYNC and return.
    finish: Arc<AtomicBool>,
    /// Every loop of every device ends by then.
    deadline: Instant,
}

impl Run {
    fn new(targets: Vec<SocketAddr>, limit: Duration) -> Run {
        Run {
            targets: Arc::new(Mutex::new(targets)),
            acked: Arc::default(),
            sending: Arc::default(),
            finish: Arc::default(),
            deadline: Instant::now() + limit,
        }
    }

    fn set_targets(&self, targets: Vec<SocketAddr>) {
        *self.targets.lock().unwrap() = targets;
    }

    fn target(&self, n: usize) -> SocketAddr {
        let targets = self.targets.lock().unwrap();
        targets[n % targets.len()]
    }

    fn over(&self) -> bool {
        Instant::now() >= self.deadline
    }
}

/// A message a device acknowledged to itself: its cmid got code 0.
#[derive(Clone, Debug)]
struct Acked {
    cmid: String,
    conv: String,
    seq: u64,
    id: String,
}

/// One (conv, seq) a device received, pushed or synced.
#[derive(Clone, Debug)]
struct Received {
    id: String,
    sync: u64,
    /// How many times it arrived (more than once: a duplicate on the wire).
    times: u32,
}

/// What one device did and saw.
#[derive(Debug, Default)]
struct DeviceReport {
    mid: i64,
    key: String,
    planned: usize,
    acked: Vec<Acked>,
    received: HashMap<(String, u64), Received>,
    /// SENDs written again for a cmid already written once.
    resends: usize,
    /// Resends answered with a message stored before the resend was
    /// written (its `ts` is older): an earlier attempt had committed, and
    /// the resend was deduplicated.
    deduplicated: usize,
    /// Code 5 replies (SEND or SYNC).
    unavailable: usize,
    /// Code 3 replies (a SEND over `im.send_rate_per_conn` or
    /// `im.send_rate_per_user`), resent after their `retry_ms`.
    limited: usize,
    /// Requests without a reply in time.
    timeouts: usize,
    /// Connections made after the first.
    reconnects: usize,
    /// Where each connection went, in order.
    connected_to: Vec<SocketAddr>,
    pushed: usize,
    synced: usize,
    /// Pushed MSGs for an entry this device already had (by SYNC or an
    /// earlier push: a queue redelivery, or a push slower than a SYNC).
    pushed_again: usize,
    /// Entries whose first arrival was a push (the rest came first by SYNC).
    first_by_push: usize,
    notify_syncs: usize,
}

impl DeviceReport {
    /// Entries received more than once, by push or SYNC (a SYNC from the
    /// contiguous prefix reads again what was pushed past a gap).
    fn duplicates(&self) -> usize {
        self.received.values().map(|r| r.times as usize - 1).sum()
    }
}

/// Why a request got no usable answer.
#[derive(Debug)]
enum Failure {
    /// The connection is gone (closed, reset, or not there).
    Lost,
    /// No reply within [`load::REPLY_WAIT`]; the connection is dropped.
    Timeout,
    /// Code 5.
    Unavailable,
}

/// The target of one send.
#[derive(Clone, Debug)]
enum Target {
    User(i64),
    Group(String),
}

mod load {
    use super::*;

    /// How long a request waits for its reply before the device gives up on
    /// the connection (longer than comet's call timeout to logic).
    pub const REPLY_WAIT: Duration = Duration::from_secs(12);
    const CONNECT_WAIT: Duration = Duration::from_secs(5);
    const MAX_BACKOFF: Duration = Duration::from_secs(1);
    /// Connection attempts of a patient device to its home target (`index %
    /// targets`) before it tries the others: with the backoff, about 0.75 s.
    const HOME_TRIES: usize = 4;
    /// SYNC pages one catch-up may read (200 entries each).
    const MAX_SYNC_PAGES: usize = 1000;

    pub struct Device {
        index: usize,
        run: Run,
        token: AuthToken,
        client: Option<Client>,
        header_seq: i32,
        /// Every inbox entry 1..=contiguous has been received.
        contiguous: u64,
        /// Received inbox entries by sync, to find the contiguous prefix and
        /// catch an entry that changes meaning.
        syncs: BTreeMap<u64, (String, u64)>,
        need_sync: bool,
        outgoing: std::collections::VecDeque<(String, Target)>,
        report: DeviceReport,
    }

    /// Spawns every device of the plan; each returns its report.
    pub fn spawn(plan: &Plan, run: &Run, tag: &str) -> Vec<tokio::task::JoinHandle<DeviceReport>> {
        let groups = plan.groups();
        let devices = plan.users as usize * plan.devices_per_user;
        let mut rng = Rng(plan.seed);
        let mut shares: Vec<Vec<(String, Target)>> = vec![Vec::new(); devices];
        for n in 0..plan.messages {
            let device = rng.below(devices as u64) as usize;
            let user = (device / plan.devices_per_user) as i64;
            let mid = plan.first_mid + user;
            let target = if plan.group_percent > 0
                && !groups.is_empty()
                && (rng.below(100) as usize) < plan.group_percent
            {
                let mine: Vec<&(String, Vec<i64>)> =
                    groups.iter().filter(|(_, m)| m.contains(&mid)).collect();
                match mine.as_slice() {
                    [] => Target::User(mid),
                    some => Target::Group(some[rng.below(some.len() as u64) as usize].0.clone()),
                }
            } else if n % plan.self_every == 0 {
                Target::User(mid)
            } else {
                // One of the `partners` users on either side of it on the ring.
                let step = 1 + rng.below(plan.partners as u64) as i64;
                let other = if rng.below(2) == 0 {
                    user + step
                } else {
                    user - step
                };
                Target::User(plan.first_mid + other.rem_euclid(plan.users))
            };
            let cmid = format!("{tag}-{device}-{n}");
            shares[device].push((cmid, target));
        }
        run.sending.store(devices, Ordering::SeqCst);
        shares
            .into_iter()
            .enumerate()
            .map(|(index, share)| {
                let mid = plan.first_mid + (index / plan.devices_per_user) as i64;
                let key = format!("{tag}-{mid}-d{}", index % plan.devices_per_user);
                let device = Device {
                    index,
                    run: run.clone(),
                    token: AuthToken {
                        mid,
                        key: key.clone(),
                        accepts: vec![21, 27],
                        ..AuthToken::default()
                    },
                    client: None,
                    header_seq: 0,
                    contiguous: 0,
                    syncs: BTreeMap::new(),
                    need_sync: false,
                    report: DeviceReport {
                        mid,
                        key,
                        planned: share.len(),
                        ..DeviceReport::default()
                    },
                    outgoing: share.into(),
                };
                tokio::spawn(device.run())
            })
            .collect()
    }

    impl Device {
        async fn run(mut self) -> DeviceReport {
            self.send_all().await;
            self.run.sending.fetch_sub(1, Ordering::SeqCst);
            self.listen().await;
            self.final_sync().await;
            self.report
        }

        /// Sends every planned message until each is acknowledged (or the
        /// run's deadline passes).
        async fn send_all(&mut self) {
            let mut attempts = 0usize;
            let mut backoff = Duration::from_millis(50);
            while let Some((cmid, target)) = self.outgoing.front().cloned() {
                if self.run.over() {
                    return;
                }
                if self.client.is_none() && !self.connect().await {
                    return;
                }
                if self.need_sync {
                    match self.catch_up().await {
                        Ok(()) | Err(Failure::Unavailable) => {}
                        Err(Failure::Lost | Failure::Timeout) => continue,
                    }
                }
                let request = match &target {
                    Target::User(to) => SendRequest {
                        cmid: cmid.clone(),
                        to: Some(*to),
                        body: format!("{cmid} from {}", self.token.mid),
                        ..SendRequest::default()
                    },
                    Target::Group(conv) => SendRequest {
                        cmid: cmid.clone(),
                        conv: Some(conv.clone()),
                        body: format!("{cmid} from {}", self.token.mid),
                        ..SendRequest::default()
                    },
                };
                if attempts > 0 {
                    self.report.resends += 1;
                }
                attempts += 1;
                let written_ms = unix_ms();
                match self.exchange(&request).await {
                    Ok(reply) if reply.code == Code::OK => {
                        if attempts > 1 && reply.ts < written_ms {
                            self.report.deduplicated += 1;
                        }
                        assert_eq!(reply.cmid, cmid, "a SEND_REPLY for another cmid");
                        self.report.acked.push(Acked {
                            cmid,
                            conv: reply.conv,
                            seq: reply.seq,
                            id: reply.id,
                        });
                        self.outgoing.pop_front();
                        self.run.acked.fetch_add(1, Ordering::SeqCst);
                        attempts = 0;
                        backoff = Duration::from_millis(50);
                    }
                    Ok(reply) if reply.code == Code::UNAVAILABLE => {
                        self.report.unavailable += 1;
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                    // Nothing was stored: resend the same cmid after the
                    // wait the reply names, as a client should.
                    Ok(reply) if reply.code == Code::RATE_LIMITED => {
                        self.report.limited += 1;
                        let wait = reply.retry_ms.unwrap_or(1000).min(10_000);
                        tokio::time::sleep(Duration::from_millis(wait)).await;
                    }
                    Ok(reply) => panic!("{}: SEND {cmid} refused: {reply:?}", self.token.key),
                    Err(_) => {}
                }
            }
        }

        /// Reads pushes (and SYNCs when told to) until the test says the
        /// run is over.
        async fn listen(&mut self) {
            while !self.run.finish.load(Ordering::SeqCst) && !self.run.over() {
                if self.client.is_none() && !self.connect().await {
                    return;
                }
                if self.need_sync && self.catch_up().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                let Some(client) = self.client.as_mut() else {
                    continue;
                };
                match tokio::time::timeout(Duration::from_millis(200), client.next_frame()).await {
                    Err(_) => {}
                    Ok(Ok(Some(frame))) => self.on_push(frame).await,
                    Ok(Ok(None) | Err(_)) => self.client = None,
                }
            }
        }

        /// SYNCs from the contiguous prefix to the end of the inbox,
        /// reconnecting as needed (bounded by the run's deadline).
        async fn final_sync(&mut self) {
            while !self.run.over() {
                if self.client.is_none() && !self.connect().await {
                    return;
                }
                match self.catch_up().await {
                    Ok(()) => return,
                    Err(Failure::Unavailable) => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(_) => {}
                }
            }
        }

        /// Connects and authenticates to one of the run's targets, trying
        /// them in turn with bounded backoff until the run's deadline.
        async fn connect(&mut self) -> bool {
            let mut backoff = Duration::from_millis(50);
            let mut attempt = 0;
            let first = self.report.reconnects == 0 && self.header_seq == 0;
            while !self.run.over() {
                // Home first (its comet may be back in a moment, on a new
                // address the test puts in its place), then the others:
                // half of the devices fail over at once, half wait a while.
                let home_tries = if (self.index / 2).is_multiple_of(2) {
                    1
                } else {
                    HOME_TRIES
                };
                let addr = if attempt < home_tries {
                    self.run.target(self.index)
                } else {
                    self.run.target(self.index + attempt)
                };
                attempt += 1;
                let token = &self.token;
                let connected = tokio::time::timeout(CONNECT_WAIT, async move {
                    let mut client = Client::connect_tcp(addr).await?;
                    client.auth(token).await?;
                    Ok::<Client, rim_client::Error>(client)
                })
                .await;
                if let Ok(Ok(client)) = connected {
                    self.client = Some(client);
                    self.report.connected_to.push(addr);
                    if !first {
                        self.report.reconnects += 1;
                    }
                    // Anything may have been missed while away.
                    self.need_sync = true;
                    return true;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            false
        }

        /// Reads the inbox from the contiguous prefix until `more` is false.
        async fn catch_up(&mut self) -> Result<(), Failure> {
            for _ in 0..MAX_SYNC_PAGES {
                let request = SyncRequest {
                    sync: self.contiguous,
                    limit: 200,
                };
                let reply = self.exchange(&request).await?;
                if reply.code == Code::UNAVAILABLE {
                    self.report.unavailable += 1;
                    return Err(Failure::Unavailable);
                }
                assert_eq!(reply.code, Code::OK, "{}: SYNC: {reply:?}", self.token.key);
                assert!(
                    !reply.reset,
                    "{}: SYNC reset without retention",
                    self.token.key
                );
                let before = self.contiguous;
                for msg in reply.msgs {
                    self.record(msg, false);
                }
                self.ack_if_moved(before).await;
                if !reply.more {
                    self.need_sync = false;
                    return Ok(());
                }
            }
            panic!(
                "{}: inbox not caught up after {MAX_SYNC_PAGES} SYNC pages (at {})",
                self.token.key, self.contiguous
            );
        }

        /// Sends one request and reads frames until its reply (handling the
        /// pushes that come first); drops the connection on failure.
        async fn exchange<R: Request>(&mut self, request: &R) -> Result<R::Reply, Failure> {
            self.header_seq = self.header_seq.wrapping_add(1);
            let seq = self.header_seq;
            let Some(client) = self.client.as_mut() else {
                return Err(Failure::Lost);
            };
            if client.send(request.to_frame(seq)).await.is_err() {
                self.client = None;
                return Err(Failure::Lost);
            }
            let deadline = tokio::time::Instant::now() + REPLY_WAIT;
            loop {
                let Some(client) = self.client.as_mut() else {
                    return Err(Failure::Lost);
                };
                match tokio::time::timeout_at(deadline, client.next_frame()).await {
                    Err(_) => {
                        self.report.timeouts += 1;
                        self.client = None;
                        return Err(Failure::Timeout);
                    }
                    Ok(Ok(None) | Err(_)) => {
                        self.client = None;
                        return Err(Failure::Lost);
                    }
                    Ok(Ok(Some(frame))) if frame.op == R::Reply::OP && frame.seq == seq => {
                        return Ok(R::Reply::decode(&frame.body).unwrap_or_else(|e| {
                            panic!("{}: undecodable reply {frame:?}: {e}", self.token.key)
                        }));
                    }
                    Ok(Ok(Some(frame))) => self.on_push(frame).await,
                }
            }
        }

        /// Handles a frame that is not the awaited reply: MSG is recorded
        /// (and acked when the contiguous prefix moves), NOTIFY sync asks
        /// for a SYNC; replies to abandoned requests are ignored.
        async fn on_push(&mut self, frame: Frame) {
            match frame.op {
                Op::IM_MSG => {
                    let msg = Msg::decode(&frame.body)
                        .unwrap_or_else(|e| panic!("{}: bad MSG: {e}", self.token.key));
                    let before = self.contiguous;
                    self.record(msg, true);
                    self.ack_if_moved(before).await;
                }
                Op::IM_NOTIFY => {
                    if let Ok(Notify::Sync { sync }) = Notify::decode(&frame.body)
                        && sync > self.contiguous
                    {
                        self.report.notify_syncs += 1;
                        self.need_sync = true;
                    }
                }
                _ => {}
            }
        }

        fn record(&mut self, msg: Msg, pushed: bool) {
            let key = &self.token.key;
            let sync = msg
                .sync
                .unwrap_or_else(|| panic!("{key}: MSG without sync: {msg:?}"));
            if pushed {
                self.report.pushed += 1;
            } else {
                self.report.synced += 1;
            }
            let at = (msg.conv.clone(), msg.seq);
            if let Some(seen) = self.syncs.get(&sync) {
                assert_eq!(seen, &at, "{key}: inbox entry {sync} changed meaning");
            }
            self.syncs.insert(sync, at.clone());
            let entry = self.report.received.entry(at).or_insert(Received {
                id: msg.id.clone(),
                sync,
                times: 0,
            });
            assert_eq!(
                (&entry.id, entry.sync),
                (&msg.id, sync),
                "{key}: ({}, {}) arrived with another id or sync",
                msg.conv,
                msg.seq
            );
            entry.times += 1;
            match (pushed, entry.times) {
                (true, 1) => self.report.first_by_push += 1,
                (true, _) => self.report.pushed_again += 1,
                (false, _) => {}
            }
            while self.syncs.contains_key(&(self.contiguous + 1)) {
                self.contiguous += 1;
            }
        }

        async fn ack_if_moved(&mut self, before: u64) {
            if self.contiguous == before {
                return;
            }
            let ack = Ack {
                sync: self.contiguous,
            };
            self.header_seq = self.header_seq.wrapping_add(1);
            let frame = ack.to_frame(self.header_seq);
            if let Some(client) = self.client.as_mut()
                && client.send(frame).await.is_err()
            {
                self.client = None;
            }
        }
    }
}

/// Run figures, printed by each test.
#[derive(Debug, Default)]
struct Figures {
    planned: usize,
    acknowledged: usize,
    stored: usize,
    conversations: usize,
    resends: usize,
    deduplicated: usize,
    unavailable: usize,
    limited: usize,
    timeouts: usize,
    reconnects: usize,
    notify_syncs: usize,
    pushed: usize,
    synced: usize,
    duplicates: usize,
    pushed_again: usize,
    distinct_received: usize,
    first_by_push: usize,
}

/// Sends a request on a verifier's connection and returns its reply,
/// skipping pushes; code 5 is retried (bounded), anything else but 0 fails.
async fn ask<R: Request>(client: &mut Client, seq: &mut i32, request: &R) -> R::Reply
where
    R::Reply: std::fmt::Debug,
{
    for _ in 0..50 {
        *seq += 1;
        client
            .send(request.to_frame(*seq))
            .await
            .expect("verifier send");
        let deadline = tokio::time::Instant::now() + load::REPLY_WAIT;
        let frame = loop {
            let frame = tokio::time::timeout_at(deadline, client.next_frame())
                .await
                .expect("a verifier reply in time")
                .expect("verifier read")
                .expect("verifier connection open");
            if frame.op == R::Reply::OP && frame.seq == *seq {
                break frame;
            }
        };
        let body = serde_json::from_slice::<serde_json::Value>(&frame.body).unwrap();
        if body["code"] == 5 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        assert_eq!(body["code"], 0, "verifier request refused: {body}");
        return R::Reply::decode(&frame.body).unwrap();
    }
    panic!("the store stayed unavailable to the verifier");
}

/// One user's inbox, SYNCed from 0 by a fresh connection: entries in sync
/// order, and the messages of the conversations this user verifies (those
/// where it is the smallest member), PULLed from seq 1.
async fn read_back(
    addr: SocketAddr,
    mid: i64,
    tag: &str,
    convs: Vec<String>,
) -> (Vec<(u64, String, u64, String)>, Vec<(String, PullReply)>) {
    let mut client = Client::connect_tcp(addr).await.expect("verifier connects");
    client
        .auth(&AuthToken {
            mid,
            key: format!("{tag}-verify-{mid}"),
            accepts: vec![21, 27],
            ..AuthToken::default()
        })
        .await
        .expect("verifier auth");
    let mut seq = 0;
    let mut inbox = Vec::new();
    let mut from = 0;
    loop {
        let reply: SyncReply = ask(
            &mut client,
            &mut seq,
            &SyncRequest {
                sync: from,
                limit: 200,
            },
        )
        .await;
        assert!(!reply.reset);
        for m in reply.msgs {
            inbox.push((
                m.sync.expect("inbox entries have a sync"),
                m.conv,
                m.seq,
                m.id,
            ));
        }
        if !reply.more {
            break;
        }
        assert!(reply.sync > from, "SYNC from {from} of {mid} does not move");
        from = reply.sync;
    }
    let mut pages = Vec::new();
    for conv in convs {
        let mut after = 0;
        let mut all = PullReply::default();
        loop {
            let page: PullReply = ask(
                &mut client,
                &mut seq,
                &PullRequest {
                    conv: conv.clone(),
                    after: Some(after),
                    limit: 100,
                    ..PullRequest::default()
                },
            )
            .await;
            assert!(!page.reset, "{conv}: PULL reset without retention");
            all.max_seq = page.max_seq;
            all.min_seq = page.min_seq;
            let last = page.msgs.last().map(|m| m.seq);
            all.msgs.extend(page.msgs);
            match last {
                Some(last) if last < page.max_seq => {
                    assert!(last > after, "{conv}: PULL after {after} does not move");
                    after = last;
                }
                _ => break,
            }
        }
        pages.push((conv, all));
    }
    (inbox, pages)
}

/// Every row of the store's `messages` (conv, seq, sender, cmid, id) and
/// `inbox` (mid, sync, conv, seq) tables; the SQLite and PostgreSQL
/// schemas name them alike.
#[derive(Debug, Default, PartialEq)]
struct Rows {
    messages: BTreeSet<(String, u64, i64, String, String)>,
    inbox: BTreeSet<(i64, u64, String, u64)>,
}

impl Rows {
    /// Fails unless the rows read from the store's tables are exactly
    /// those read over the wire (nothing hidden from PULL or SYNC).
    fn assert_same_as(&self, wire: &Rows, store: &str) {
        let messages: Vec<_> = self
            .messages
            .symmetric_difference(&wire.messages)
            .take(5)
            .collect();
        let inbox: Vec<_> = self
            .inbox
            .symmetric_difference(&wire.inbox)
            .take(5)
            .collect();
        assert!(
            messages.is_empty() && inbox.is_empty(),
            "the {store} tables and the wire disagree ({} vs {} messages, {} vs {} inbox entries); \
             first differences: {messages:?} {inbox:?}",
            self.messages.len(),
            wire.messages.len(),
            self.inbox.len(),
            wire.inbox.len()
        );
    }
}

/// Reads every message and inbox row of a SQLite store file.
fn sqlite_rows(path: &str) -> Rows {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap_or_else(|e| panic!("opening {path}: {e}"));
    let mut rows = Rows::default();
    let mut stmt = conn
        .prepare("SELECT conv, seq, sender, cmid, id FROM messages")
        .unwrap();
    let messages = stmt
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get::<_, i64>(1)? as u64,
                r.get(2)?,
                r.get(3)?,
                r.get::<_, i64>(4)?.to_string(),
            ))
        })
        .unwrap();
    rows.messages = messages.map(Result::unwrap).collect();
    let mut stmt = conn
        .prepare("SELECT mid, sync, conv, seq FROM inbox")
        .unwrap();
    let inbox = stmt
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get::<_, i64>(1)? as u64,
                r.get(2)?,
                r.get::<_, i64>(3)? as u64,
            ))
        })
        .unwrap();
    rows.inbox = inbox.map(Result::unwrap).collect();
    rows
}

/// Reads every message and inbox row of a PostgreSQL store.
async fn postgres_rows(url: &str) -> Rows {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    tokio::spawn(connection);
    let mut rows = Rows::default();
    for r in client
        .query("SELECT conv, seq, sender, cmid, id FROM messages", &[])
        .await
        .unwrap()
    {
        let (seq, id): (i64, i64) = (r.get(1), r.get(4));
        rows.messages
            .insert((r.get(0), seq as u64, r.get(2), r.get(3), id.to_string()));
    }
    for r in client
        .query("SELECT mid, sync, conv, seq FROM inbox", &[])
        .await
        .unwrap()
    {
        let (sync, seq): (i64, i64) = (r.get(1), r.get(3));
        rows.inbox
            .insert((r.get(0), sync as u64, r.get(2), seq as u64));
    }
    rows
}

/// Reads the store back over the wire and checks every invariant against
/// what the devices were acknowledged and received; returns the figures
/// and the rows read (for a comparison with the store's tables).
async fn verify(
    addr: SocketAddr,
    plan: &Plan,
    tag: &str,
    reports: &[DeviceReport],
) -> (Figures, Rows) {
    let mut figures = Figures {
        planned: reports.iter().map(|r| r.planned).sum(),
        acknowledged: reports.iter().map(|r| r.acked.len()).sum(),
        resends: reports.iter().map(|r| r.resends).sum(),
        deduplicated: reports.iter().map(|r| r.deduplicated).sum(),
        unavailable: reports.iter().map(|r| r.unavailable).sum(),
        limited: reports.iter().map(|r| r.limited).sum(),
        timeouts: reports.iter().map(|r| r.timeouts).sum(),
        reconnects: reports.iter().map(|r| r.reconnects).sum(),
        notify_syncs: reports.iter().map(|r| r.notify_syncs).sum(),
        pushed: reports.iter().map(|r| r.pushed).sum(),
        synced: reports.iter().map(|r| r.synced).sum(),
        duplicates: reports.iter().map(DeviceReport::duplicates).sum(),
        pushed_again: reports.iter().map(|r| r.pushed_again).sum(),
        distinct_received: reports.iter().map(|r| r.received.len()).sum(),
        first_by_push: reports.iter().map(|r| r.first_by_push).sum(),
        ..Figures::default()
    };
    // Every conversation acknowledged, verified by its smallest member.
    let mut convs: BTreeMap<i64, HashSet<String>> = BTreeMap::new();
    for acked in reports.iter().flat_map(|r| &r.acked) {
        let first = *plan.members(&acked.conv).iter().min().unwrap();
        convs.entry(first).or_default().insert(acked.conv.clone());
    }
    let readers: Vec<_> = plan
        .mids()
        .map(|mid| {
            let mine = convs.remove(&mid).unwrap_or_default().into_iter().collect();
            let tag = tag.to_owned();
            tokio::spawn(async move { (mid, read_back(addr, mid, &tag, mine).await) })
        })
        .collect();
    let mut inboxes: HashMap<i64, Vec<(u64, String, u64, String)>> = HashMap::new();
    // (conv, seq) → the stored message.
    let mut stored: HashMap<(String, u64), Msg> = HashMap::new();
    for reader in readers {
        let (mid, (inbox, pages)) = reader.await.expect("a verifier task");
        inboxes.insert(mid, inbox);
        for (conv, all) in pages {
            // Seq exactly 1..max: no hole, no duplicate.
            let seqs: Vec<u64> = all.msgs.iter().map(|m| m.seq).collect();
            let dense: Vec<u64> = (1..=all.max_seq).collect();
            assert_eq!(
                seqs, dense,
                "{conv}: seqs are not exactly 1..={}",
                all.max_seq
            );
            // (from, cmid) at most once per conversation.
            let mut cmids = HashSet::new();
            for m in &all.msgs {
                assert!(
                    cmids.insert((m.from, m.cmid.clone())),
                    "{conv}: ({}, {}) stored twice",
                    m.from,
                    m.cmid
                );
            }
            figures.conversations += 1;
            for m in all.msgs {
                stored.insert((conv.clone(), m.seq), m);
            }
        }
    }
    figures.stored = stored.len();
    let mut ids = HashSet::new();
    for m in stored.values() {
        assert!(ids.insert(m.id.clone()), "id {} stored twice", m.id);
    }
    // Every acknowledged cmid maps to exactly one stored (conv, seq) with
    // the id it was acknowledged with.
    let mut by_cmid: HashMap<(i64, &str), &Acked> = HashMap::new();
    for report in reports {
        for acked in &report.acked {
            assert!(
                by_cmid.insert((report.mid, &acked.cmid), acked).is_none(),
                "cmid {} acknowledged twice",
                acked.cmid
            );
            let msg = stored
                .get(&(acked.conv.clone(), acked.seq))
                .unwrap_or_else(|| panic!("acknowledged {acked:?} is not stored"));
            assert_eq!(
                (msg.from, msg.cmid.as_str(), msg.id.as_str()),
                (report.mid, acked.cmid.as_str(), acked.id.as_str()),
                "acknowledged {acked:?} is stored as another message"
            );
        }
    }
    // Nothing is stored that no device was acknowledged (every planned send
    // was acknowledged, so a stored message without an ack is a double).
    for ((conv, seq), m) in &stored {
        assert!(
            by_cmid.contains_key(&(m.from, m.cmid.as_str())),
            "({conv}, {seq}) from {} with cmid {} is stored but was never acknowledged",
            m.from,
            m.cmid
        );
    }
    // Inboxes: dense syncs; each stored message exactly once in the inbox
    // of each of its members, and nothing else.
    let mut expected: HashMap<i64, HashSet<(String, u64)>> = HashMap::new();
    for (conv, seq) in stored.keys() {
        for member in plan.members(conv) {
            expected
                .entry(member)
                .or_default()
                .insert((conv.clone(), *seq));
        }
    }
    for (mid, inbox) in &inboxes {
        let syncs: Vec<u64> = inbox.iter().map(|e| e.0).collect();
        let dense: Vec<u64> = (1..=inbox.len() as u64).collect();
        assert_eq!(syncs, dense, "inbox of {mid} is not dense");
        let mut entries = HashSet::new();
        for (sync, conv, seq, id) in inbox {
            assert!(
                entries.insert((conv.clone(), *seq)),
                "inbox of {mid} holds ({conv}, {seq}) twice (again at {sync})"
            );
            let msg = stored
                .get(&(conv.clone(), *seq))
                .unwrap_or_else(|| panic!("inbox of {mid}: ({conv}, {seq}) is not stored"));
            assert_eq!(
                &msg.id, id,
                "inbox of {mid}: ({conv}, {seq}) has another id"
            );
        }
        let want = expected.remove(mid).unwrap_or_default();
        assert_eq!(entries.len(), want.len(), "inbox of {mid}: wrong entries");
        assert_eq!(entries, want, "inbox of {mid}: wrong entries");
    }
    // Every device received (pushed + synced) exactly its user's inbox.
    for report in reports {
        let inbox = &inboxes[&report.mid];
        let want: HashMap<(String, u64), (u64, &str)> = inbox
            .iter()
            .map(|(sync, conv, seq, id)| ((conv.clone(), *seq), (*sync, id.as_str())))
            .collect();
        let got: HashMap<(String, u64), (u64, &str)> = report
            .received
            .iter()
            .map(|(at, r)| (at.clone(), (r.sync, r.id.as_str())))
            .collect();
        if got != want {
            let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
            let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
            panic!(
                "device {} received another set than its inbox ({} entries): {} missing {:?}, {} extra {:?}",
                report.key,
                want.len(),
                missing.len(),
                &missing[..missing.len().min(5)],
                extra.len(),
                &extra[..extra.len().min(5)]
            );
        }
    }
    assert_eq!(
        figures.acknowledged, figures.planned,
        "not every send was acknowledged before the run's deadline"
    );
    let rows = Rows {
        messages: stored
            .values()
            .map(|m| (m.conv.clone(), m.seq, m.from, m.cmid.clone(), m.id.clone()))
            .collect(),
        inbox: inboxes
            .iter()
            .flat_map(|(mid, inbox)| {
                inbox
                    .iter()
                    .map(|(sync, conv, seq, _)| (*mid, *sync, conv.clone(), *seq))
            })
            .collect(),
    };
    (figures, rows)
}

/// Waits (bounded) until `done` holds, checking every 50 ms.
async fn wait_for(what: &str, limit: Duration, done: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn collect(handles: Vec<tokio::task::JoinHandle<DeviceReport>>) -> Vec<DeviceReport> {
    let mut reports = Vec::new();
    for handle in handles {
        reports.push(handle.await.expect("a device task"));
    }
    reports
}

fn print_figures(test: &str, figures: &Figures, took: Duration) {
    println!(
        "{test}: {} messages planned, {} acknowledged, {} stored in {} conversations; \
         {} resends ({} answered from an earlier attempt's commit), {} code-5 replies, {} code-3 replies, {} reply timeouts, {} reconnects, {} NOTIFY sync; \
         received {} pushed + {} synced, {} duplicates on the wire ({} of them pushed again); \
         {} distinct entries received over all devices, {} of them first by push; run time {:.1} s",
        figures.planned,
        figures.acknowledged,
        figures.stored,
        figures.conversations,
        figures.resends,
        figures.deduplicated,
        figures.unavailable,
        figures.limited,
        figures.timeouts,
        figures.reconnects,
        figures.notify_syncs,
        figures.pushed,
        figures.synced,
        figures.duplicates,
        figures.pushed_again,
        figures.distinct_received,
        figures.first_by_push,
        took.as_secs_f64()
    );
}

const ACK_TIMEOUT: &str = "1s";
/// After the last send: longer than the ack timeout, so a device that
/// missed a push is told to SYNC before the final SYNC.
const QUIET: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread")]
async fn standalone_killed_mid_run_loses_nothing_acknowledged() {
    let started = Instant::now();
    let tag = format!("sa{}", std::process::id());
    let path = support::fresh_sqlite_path("im-faults");
    let env = [
        ("RIM_IM__SQLITE_PATH", path.as_str()),
        ("RIM_IM__ACK_TIMEOUT", ACK_TIMEOUT),
    ];
    let mut rim = support::start_standalone("im-faults", &env);
    let tcp = rim.addr_after("accepting clients listener=\"tcp\"");
    let api = rim.addr_after("http api serving");
    let plan = Plan {
        first_mid: 1000,
        users: 50,
        devices_per_user: 2,
        messages: 4000,
        partners: 4,
        self_every: 50,
        group_percent: 30,
        seed: 13,
    };
    create_groups(api, &plan).await;
    let run = Run::new(vec![tcp], Duration::from_secs(240));
    let devices = load::spawn(&plan, &run, &tag);
    for percent in [30, 70] {
        let at = plan.messages * percent / 100;
        wait_for("sends to progress", Duration::from_secs(120), || {
            run.acked.load(Ordering::SeqCst) >= at
        })
        .await;
        rim.crash();
        println!(
            "SIGKILL at {} acknowledged",
            run.acked.load(Ordering::SeqCst)
        );
        rim = support::start_standalone("im-faults", &env);
        let tcp = rim.addr_after("accepting clients listener=\"tcp\"");
        run.set_targets(vec![tcp]);
    }
    wait_for(
        "every device to finish sending",
        Duration::from_secs(180),
        || run.sending.load(Ordering::SeqCst) == 0,
    )
    .await;
    tokio::time::sleep(QUIET).await;
    run.finish.store(true, Ordering::SeqCst);
    let reports = collect(devices).await;
    let (figures, wire) = verify(run.target(0), &plan, &tag, &reports).await;
    print_figures("standalone", &figures, started.elapsed());
    rim.stop();
    sqlite_rows(&path).assert_same_as(&wire, "SQLite");
}

/// The processes of the cluster test: every role its own `rim`.
struct Cluster {
    run: String,
    zk: String,
    kafka: String,
    redis: String,
    topic: String,
    store: String,
    /// (process, client TCP address, metrics address) per comet.
    comets: Vec<(support::Proc, SocketAddr, SocketAddr)>,
    /// (process, HTTP address, which serves its metrics too) per logic.
    logics: Vec<(support::Proc, SocketAddr)>,
    /// (process, metrics address).
    job: Option<(support::Proc, SocketAddr)>,
    http: reqwest::Client,
}

impl Cluster {
    fn common(&self, id: String) -> Vec<(&'static str, String)> {
        vec![
            ("RIM_NODE__ID", id),
            ("RIM_NODE__REGION", "r1".into()),
            ("RIM_DISCOVERY__BACKEND", "zookeeper".into()),
            ("RIM_DISCOVERY__ZOOKEEPER", self.zk.clone()),
            ("RIM_DISCOVERY__ROOT", format!("/rim-imf-{}", self.run)),
            ("RIM_QUEUE__BROKERS", self.kafka.clone()),
            ("RIM_QUEUE__TOPIC", self.topic.clone()),
        ]
    }

    fn start_logic(&self, n: usize) -> (support::Proc, SocketAddr) {
        let mut env = self.common(format!("logic-{n}-{}", self.run));
        env.extend([
            ("RIM_LOGIC__GRPC_BIND", "127.0.0.1:0".to_string()),
            ("RIM_API__HTTP_BIND", "127.0.0.1:0".into()),
            ("RIM_LOGIC__AUTH__POLICY", "none".into()),
            ("RIM_ROUTER__REDIS", self.redis.clone()),
            ("RIM_IM__STORE", "postgres".into()),
            ("RIM_IM__POSTGRES", self.store.clone()),
            ("RIM_IM__NODE", n.to_string()),
            ("RIM_IM__ACK_TIMEOUT", ACK_TIMEOUT.into()),
        ]);
        let mut logic = support::Proc::start(
            &["logic", "--config", &support::shipped_config("logic")],
            &env,
        );
        let http = logic.addr_after("http api serving");
        (logic, http)
    }

    fn start_comet(&self, n: usize) -> (support::Proc, SocketAddr, SocketAddr) {
        let mut env = self.common(format!("comet-{n}-{}", self.run));
        env.extend([
            ("RIM_COMET__TCP_BIND", "127.0.0.1:0".to_string()),
            ("RIM_COMET__WS_BIND", "127.0.0.1:0".into()),
            ("RIM_COMET__GRPC_BIND", "127.0.0.1:0".into()),
            ("RIM_COMET__DRAIN_WINDOW", "200ms".into()),
        ]);
        let mut comet = support::Proc::start(
            &["comet", "--config", &support::shipped_config("comet")],
            &env,
        );
        let tcp = comet.addr_after("accepting clients listener=\"tcp\"");
        let metrics = comet.addr_after("metrics serving");
        (comet, tcp, metrics)
    }

    fn start_job(&self) -> (support::Proc, SocketAddr) {
        let mut env = self.common(format!("job-{}", self.run));
        env.push(("RIM_JOB__GROUP", format!("rim-imf-job-{}", self.run)));
        let mut job =
            support::Proc::start(&["job", "--config", &support::shipped_config("job")], &env);
        let metrics = job.addr_after("metrics serving");
        (job, metrics)
    }

    fn comet_targets(&self) -> Vec<SocketAddr> {
        self.comets.iter().map(|(_, tcp, _)| *tcp).collect()
    }

    /// Prints the push path's counters of the processes running now (those
    /// of killed processes died with them): where MSGs went, not asserted.
    async fn print_push_path(&self) {
        let mut scrapes = Vec::new();
        for (n, (_, http)) in self.logics.iter().enumerate() {
            scrapes.push((format!("logic {n}"), *http, "rim_logic_im_deliveries"));
            scrapes.push((format!("logic {n}"), *http, "rim_logic_im_relayed"));
        }
        for (n, (_, _, metrics)) in self.comets.iter().enumerate() {
            scrapes.push((format!("comet {n}"), *metrics, "rim_comet_dropped_frames"));
            scrapes.push((format!("comet {n}"), *metrics, "rim_comet_push_recipients"));
        }
        if let Some((_, metrics)) = &self.job {
            scrapes.push(("job".into(), *metrics, "rim_job_messages"));
            scrapes.push(("job".into(), *metrics, "rim_job_comet_rpc_errors"));
            scrapes.push(("job".into(), *metrics, "rim_job_consumer_lag"));
            scrapes.push(("job".into(), *metrics, "rim_job_push_latency_seconds_sum"));
            scrapes.push(("job".into(), *metrics, "rim_job_push_latency_seconds_count"));
        }
        for (who, addr, prefix) in scrapes {
            let metrics = support::exposition::scrape(&self.http, addr).await;
            for sample in metrics
                .samples
                .iter()
                .filter(|s| s.name.starts_with(prefix))
            {
                println!(
                    "  {who}: {} {:?} = {}",
                    sample.name, sample.labels, sample.value
                );
            }
        }
    }

    /// Waits (bounded) until every logic lists `comets` comets.
    async fn wait_discovered(&self, comets: usize) {
        for (_, http) in &self.logics {
            let url = format!("http://{http}/goim/nodes/instances");
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let answer = support::get_json(&self.http, &url).await;
                if answer["data"].as_array().is_some_and(|a| a.len() == comets) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "logic at {http} never listed {comets} comets: {answer}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    fn stop(self) {
        if let Some((job, _)) = self.job {
            job.stop();
        }
        for (comet, _, _) in self.comets {
            comet.stop();
        }
        for (logic, _) in self.logics {
            logic.stop();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs ZooKeeper, Redis, Kafka and PostgreSQL: run deploy/test.sh"]
async fn cluster_survives_kills_of_comet_job_logic_and_a_postgres_restart() {
    // The message store is sharded over two primaries; the restart hits
    // one of them.
    let started = Instant::now();
    let run = format!("{}", std::process::id());
    let tag = format!("cl{run}");
    let kafka = support::service("RIM_TEST_KAFKA");
    let topic = format!("rim-imf-{run}");
    support::create_topic(&kafka, &topic).await;
    // PostgreSQL servers of this test's own, so one can be crashed.
    let postgres = tokio::task::block_in_place(rim_testkit::PostgresServer::start_new);
    let other = tokio::task::block_in_place(rim_testkit::PostgresServer::start_new);
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let mut cluster = Cluster {
        run: run.clone(),
        zk: support::service("RIM_TEST_ZK"),
        kafka,
        redis: support::service("RIM_TEST_REDIS"),
        topic,
        store: format!("{},{}", other.url(), postgres.url()),
        comets: Vec::new(),
        logics: Vec::new(),
        job: None,
        http: reqwest::Client::new(),
    };
    for n in 0..2 {
        let logic = cluster.start_logic(n);
        cluster.logics.push(logic);
    }
    for n in 0..2 {
        let comet = cluster.start_comet(n);
        cluster.comets.push(comet);
    }
    cluster.job = Some(cluster.start_job());
    cluster.wait_discovered(2).await;

    let plan = Plan {
        // Mids of this run's own: the presence map in Redis is shared.
        first_mid: i64::from(std::process::id()) * 1000,
        users: 200,
        devices_per_user: 2,
        messages: 20_000,
        partners: 4,
        self_every: 50,
        group_percent: 30,
        seed: 8,
    };
    create_groups(cluster.logics[0].1, &plan).await;
    let run_state = Run::new(cluster.comet_targets(), Duration::from_secs(600));
    let devices = load::spawn(&plan, &run_state, &tag);
    let progress = |percent: usize| {
        let at = plan.messages * percent / 100;
        let acked = run_state.acked.clone();
        async move {
            wait_for("sends to progress", Duration::from_secs(300), || {
                acked.load(Ordering::SeqCst) >= at
            })
            .await;
        }
    };
    let acked = || run_state.acked.load(Ordering::SeqCst);

    progress(15).await;
    let (comet, _, _) = cluster.comets.remove(0);
    comet.crash();
    println!("SIGKILL comet 0 at {} acknowledged", acked());
    // Devices retry their home comet for a while, then fail over to the
    // other; the restarted comet takes the dead one's place in the list.
    let comet = cluster.start_comet(0);
    let restarted = comet.1;
    cluster.comets.insert(0, comet);
    run_state.set_targets(cluster.comet_targets());

    progress(35).await;
    cluster.job.take().expect("the job runs").0.crash();
    println!("SIGKILL job at {} acknowledged", acked());
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.job = Some(cluster.start_job());

    progress(55).await;
    let (logic, _) = cluster.logics.remove(0);
    logic.crash();
    println!("SIGKILL logic 0 at {} acknowledged", acked());
    let logic = cluster.start_logic(0);
    cluster.logics.insert(0, logic);

    progress(75).await;
    tokio::task::block_in_place(|| postgres.stop_immediate());
    println!("PostgreSQL stopped (immediate) at {} acknowledged", acked());
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::block_in_place(|| postgres.start_again());
    println!("PostgreSQL started again at {} acknowledged", acked());

    wait_for(
        "every device to finish sending",
        Duration::from_secs(400),
        || run_state.sending.load(Ordering::SeqCst) == 0,
    )
    .await;
    // Appends that could not reach the restarted primary wait in the
    // outboxes: the logics' relay appends them (the devices are told to
    // SYNC).
    let urls = [other.url(), postgres.url()];
    let drained_at = Instant::now();
    let mut owed = outbox_rows(&urls).await;
    println!("{owed} inbox entries waiting in the outboxes after the last send");
    while owed > 0 {
        assert!(
            drained_at.elapsed() < Duration::from_secs(120),
            "{owed} inbox entries still owed"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        owed = outbox_rows(&urls).await;
    }
    println!("the outboxes drained in {:?}", drained_at.elapsed());
    tokio::time::sleep(QUIET).await;
    run_state.finish.store(true, Ordering::SeqCst);
    let reports = collect(devices).await;
    let (figures, wire) = verify(run_state.target(0), &plan, &tag, &reports).await;
    print_figures("cluster", &figures, started.elapsed());
    let moved: Vec<&SocketAddr> = reports
        .iter()
        .filter_map(|r| r.connected_to.get(1))
        .collect();
    println!(
        "  {} devices reconnected: {} to the restarted comet, {} to the other",
        moved.len(),
        moved.iter().filter(|a| ***a == restarted).count(),
        moved.iter().filter(|a| ***a != restarted).count()
    );
    cluster.print_push_path().await;
    let mut rows = postgres_rows(&postgres.url()).await;
    let theirs = postgres_rows(&other.url()).await;
    rows.messages.extend(theirs.messages);
    rows.inbox.extend(theirs.inbox);
    rows.assert_same_as(&wire, "PostgreSQL (both primaries)");
    cluster.stop();
    drop(postgres);
    drop(other);
}

/// Inbox entries still owed across the primaries of `urls`.
async fn outbox_rows(urls: &[String]) -> i64 {
    let mut owed = 0;
    for url in urls {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
        tokio::spawn(connection);
        let row = client
            .query_one("SELECT count(*) FROM inbox_outbox", &[])
            .await
            .unwrap();
        owed += row.get::<_, i64>(0);
    }
    owed
}
