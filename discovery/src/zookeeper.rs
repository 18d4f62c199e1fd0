//! ZooKeeper discovery: ephemeral registrations at `{root}/comets/{id}` and
//! `{root}/logics/{id}`, watched views of each kind, and a supervisor that
//! replaces an ended session and restores every registration on it.
//!
//! Three kinds of task share one [`Shared`]:
//! - the supervisor (one per discovery) owns the session: it follows the
//!   client's state, re-asserts the registrations after every reconnection
//!   and every refresh interval (the session timeout, 1 to 30 s), and on
//!   expiry opens a new session (retrying with backoff), restores the
//!   registrations on it, then hands it to the views;
//! - a view task per watched kind re-reads the kind's directory (children
//!   plus each child's data, all with one-shot watches) on every watch event
//!   and on every new session;
//! - callers' `register`/`update`/`deregister` write through the current
//!   session, serialised per registration by its slot lock.
//!
//! All of them stop when the [`ZkDiscovery`] is dropped.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures::FutureExt;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use parking_lot::Mutex;
use tokio::sync::{Mutex as AsyncMutex, watch};
use tokio::time::{Instant, MissedTickBehavior, timeout};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, info, warn};
use zookeeper_client as zk;

use crate::node::{check_id, now_ms};
use crate::{Discovery, Error, Kind, NodeInfo, Registration, Result};

/// Bound for one ZooKeeper request (or a short sequence of them).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// First retry delay after a failure; doubled up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest retry delay.
const BACKOFF_MAX: Duration = Duration::from_secs(3);
/// Attempts at making a node hold our data before giving up until the next
/// refresh (each attempt loses only to a concurrent writer of the same path).
const WRITE_ATTEMPTS: usize = 5;

const PERSISTENT: zk::CreateOptions<'static> =
    zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
const EPHEMERAL: zk::CreateOptions<'static> =
    zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());

/// Discovery through ZooKeeper: registrations are ephemeral nodes carrying
/// [`NodeInfo`] as JSON, views follow them with watches.
///
/// Dropping it stops its tasks and closes its session, which removes its
/// nodes at once.
pub struct ZkDiscovery {
    shared: Arc<Shared>,
    _stop: DropGuard,
}

impl std::fmt::Debug for ZkDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZkDiscovery")
            .field("connect", &self.shared.connect)
            .field("base", &self.shared.base)
            .field("session", &self.session_id())
            .finish()
    }
}

impl ZkDiscovery {
    /// Opens a session to `connect` (`host:port[,host:port...][/chroot]`),
    /// creates `{root}/comets` and `{root}/logics` if missing, and starts the
    /// task that keeps the session.
    pub async fn connect(
        connect: &str,
        root: &str,
        session_timeout: Duration,
    ) -> Result<Arc<ZkDiscovery>> {
        if connect.trim().is_empty() {
            return Err(Error::Invalid("zookeeper connect string is empty".into()));
        }
        if !root.starts_with('/') || (root.len() > 1 && root.ends_with('/')) {
            return Err(Error::Invalid(format!(
                "zookeeper root {root:?} must be an absolute path without a trailing slash"
            )));
        }
        if session_timeout.is_zero() {
            return Err(Error::Invalid("zookeeper session timeout is zero".into()));
        }
        let cancel = CancellationToken::new();
        let shared = Arc::new(Shared {
            connect: connect.trim().to_owned(),
            base: root.trim_end_matches('/').to_owned(),
            session_timeout,
            session_tx: watch::Sender::new(Session::default()),
            registrations: Mutex::new(HashMap::new()),
            orphans: Mutex::new(Vec::new()),
            views: Mutex::new(HashMap::new()),
            cancel: cancel.clone(),
        });
        let client = shared.first_session().await?;
        info!(
            zk.connect = %shared.connect,
            zk.session = %client.session_id(),
            "zookeeper session established"
        );
        shared.publish(Some(client.clone()), true);
        tokio::spawn(supervise(Arc::clone(&shared), client));
        Ok(Arc::new(ZkDiscovery {
            shared,
            _stop: cancel.drop_guard(),
        }))
    }

    /// Returns the id of the current ZooKeeper session, or `None` while a
    /// new one is being established.
    pub fn session_id(&self) -> Option<i64> {
        self.shared.current().map(|client| client.session_id().0)
    }
}

#[async_trait]
impl Discovery for ZkDiscovery {
    async fn register(&self, kind: Kind, mut info: NodeInfo) -> Result<Registration> {
        check_id(&info.id)?;
        info.updated = now_ms();
        let key = (kind, info.id.clone());
        let slot = Arc::new(AsyncMutex::new(Slot {
            path: self.shared.path(kind, &info.id),
            data: to_json(&info)?,
            removed: false,
        }));
        {
            let mut registrations = self.shared.registrations.lock();
            if registrations.contains_key(&key) {
                return Err(Error::Invalid(format!(
                    "{kind} {:?} is already registered by this discovery",
                    info.id
                )));
            }
            registrations.insert(key.clone(), Arc::clone(&slot));
        }
        let registration = ZkRegistration {
            shared: Arc::clone(&self.shared),
            key,
            slot,
            live: true,
        };
        let written = {
            let slot = registration.slot.lock().await;
            self.shared.write(&slot).await
        };
        match written {
            Ok(()) => {
                info!(zk.path = %self.shared.path(kind, &info.id), "registered");
                Ok(Registration::zookeeper(registration))
            }
            Err(e) => {
                // Best effort: the refresh task may have written it meanwhile.
                let _ = registration.deregister().await;
                Err(e)
            }
        }
    }

    async fn watch(&self, kind: Kind) -> Result<watch::Receiver<Vec<NodeInfo>>> {
        let (nodes_rx, mut ready_rx) = {
            let mut views = self.shared.views.lock();
            let view = views.entry(kind).or_insert_with(|| {
                let nodes_tx = watch::Sender::new(Vec::new());
                let (ready_tx, ready_rx) = watch::channel(false);
                tokio::spawn(follow_view(
                    Arc::clone(&self.shared),
                    kind,
                    nodes_tx.clone(),
                    ready_tx,
                ));
                View { nodes_tx, ready_rx }
            });
            (view.nodes_tx.subscribe(), view.ready_rx.clone())
        };
        let dir = self.shared.dir(kind);
        match timeout(REQUEST_TIMEOUT * 2, ready_rx.wait_for(|ready| *ready)).await {
            Ok(Ok(_)) => {
                let mut nodes_rx = nodes_rx;
                nodes_rx.mark_unchanged();
                Ok(nodes_rx)
            }
            Ok(Err(_)) => Err(Error::Unavailable(format!(
                "watching {dir}: the discovery is shutting down"
            ))),
            Err(_) => Err(Error::Unavailable(format!(
                "watching {dir}: zookeeper did not answer within {:?}",
                REQUEST_TIMEOUT * 2
            ))),
        }
    }
}

/// A registration's key: one per kind and id in a discovery.
type Key = (Kind, String);
/// A registration's slot, shared by its handle and the refresh.
type SlotRef = Arc<AsyncMutex<Slot>>;
/// Armed one-shot watchers, each resolving to the event that fired it.
type Watchers = FuturesUnordered<BoxFuture<'static, zk::WatchedEvent>>;

/// State shared by a discovery's tasks and registrations.
struct Shared {
    /// The ZooKeeper connect string.
    connect: String,
    /// The root without a trailing slash ("" for "/").
    base: String,
    session_timeout: Duration,
    /// The current session; `client` is `None` while a new one is opened.
    session_tx: watch::Sender<Session>,
    /// Live registrations, by kind and id.
    registrations: Mutex<HashMap<Key, SlotRef>>,
    /// Nodes whose deregistration failed (connection lost); every refresh
    /// retries them, so they do not outlive their registration for the
    /// whole session.
    orphans: Mutex<Vec<(Key, String)>>,
    /// Watched kinds, each followed by one view task.
    views: Mutex<HashMap<Kind, View>>,
    /// Stops the supervisor and the view tasks.
    cancel: CancellationToken,
}

#[derive(Clone, Default)]
struct Session {
    /// Bumped on every change, so a task can tell a new session from the one it used.
    generation: u64,
    client: Option<zk::Client>,
    /// False while the registrations are being restored on a new session:
    /// writers use it already, views wait, so that they do not show our own
    /// nodes missing.
    restored: bool,
}

struct View {
    nodes_tx: watch::Sender<Vec<NodeInfo>>,
    /// Turns true once the first read is published.
    ready_rx: watch::Receiver<bool>,
}

/// One registration's latest data; its lock serialises every write of it.
struct Slot {
    path: String,
    data: Vec<u8>,
    /// Set when deregistered; the refresh skips it from then on.
    removed: bool,
}

impl Shared {
    fn dir(&self, kind: Kind) -> String {
        format!("{}/{}", self.base, kind.dir())
    }

    fn path(&self, kind: Kind, id: &str) -> String {
        format!("{}/{}/{id}", self.base, kind.dir())
    }

    fn connect_timeout(&self) -> Duration {
        self.session_timeout + Duration::from_secs(2)
    }

    fn current(&self) -> Option<zk::Client> {
        self.session_tx.borrow().client.clone()
    }

    fn publish(&self, client: Option<zk::Client>, restored: bool) {
        self.session_tx.send_modify(|session| {
            session.generation += 1;
            session.client = client;
            session.restored = restored;
        });
    }

    /// Opens a new session and creates the kinds' directories.
    async fn open_session(&self) -> Result<zk::Client> {
        let connecting = zk::Client::connector()
            .with_session_timeout(self.session_timeout)
            .with_fail_eagerly()
            .connect(&self.connect);
        let client = match timeout(self.connect_timeout(), connecting).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                return Err(Error::Unavailable(format!(
                    "connecting to zookeeper at {}: {e}",
                    self.connect
                )));
            }
            Err(_) => {
                return Err(Error::Unavailable(format!(
                    "connecting to zookeeper at {}: timed out after {:?}",
                    self.connect,
                    self.connect_timeout()
                )));
            }
        };
        for kind in Kind::ALL {
            let dir = self.dir(kind);
            bounded(format!("creating {dir}"), client.mkdir(&dir, &PERSISTENT)).await?;
        }
        Ok(client)
    }

    /// Opens the first session, retrying with backoff for up to the connect
    /// timeout: a node started together with its ZooKeeper ensemble (compose,
    /// Kubernetes, a restart of both) waits for it instead of exiting at the
    /// first refused connection.
    async fn first_session(&self) -> Result<zk::Client> {
        let deadline = Instant::now() + self.connect_timeout();
        let mut backoff = Backoff::new();
        loop {
            match self.open_session().await {
                Ok(client) => return Ok(client),
                Err(e) => {
                    let delay = backoff.next_delay();
                    if Instant::now() + delay >= deadline {
                        return Err(e);
                    }
                    warn!(error = %e, retry_in = ?delay, "cannot open a zookeeper session yet; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Opens a new session, retrying with backoff; `None` once cancelled.
    async fn reopen_session(&self) -> Option<zk::Client> {
        let mut backoff = Backoff::new();
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return None,
                opened = self.open_session() => match opened {
                    Ok(client) => return Some(client),
                    Err(e) => warn!(error = %e, "cannot open a zookeeper session; retrying"),
                },
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return None,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    /// Writes a registration through the current session.
    async fn write(&self, slot: &Slot) -> Result<()> {
        let client = self.current().ok_or_else(|| {
            Error::Unavailable(format!(
                "registering {}: no zookeeper session; it is written once one is open",
                slot.path
            ))
        })?;
        bounded(
            format!("registering {}", slot.path),
            write_node(&client, &slot.path, &slot.data),
        )
        .await
    }

    /// Re-asserts every registration: re-creates missing nodes, replaces
    /// nodes of other sessions, rewrites stale data.
    async fn refresh(&self, client: &zk::Client) {
        let orphans = std::mem::take(&mut *self.orphans.lock());
        for (key, path) in orphans {
            if self.registrations.lock().contains_key(&key) {
                continue; // registered again: the node is the successor's
            }
            let deleted = bounded(
                format!("deregistering {path}"),
                delete_own_node(client, &path),
            )
            .await;
            match deleted {
                Ok(()) => info!(zk.path = %path, "deregistered"),
                Err(_) => self.orphans.lock().push((key, path)),
            }
        }
        let slots: Vec<_> = self.registrations.lock().values().cloned().collect();
        for slot in slots {
            let slot = slot.lock().await;
            if slot.removed {
                continue;
            }
            let written = bounded(
                format!("registering {}", slot.path),
                write_node(client, &slot.path, &slot.data),
            )
            .await;
            if let Err(e) = written {
                warn!(zk.path = %slot.path, error = %e, "cannot restore a registration; retrying later");
            }
        }
    }

    /// Removes a registration's node unless a newer registration of the
    /// same kind and id has taken it over.
    async fn remove(&self, key: &Key, slot: &AsyncMutex<Slot>) -> Result<()> {
        let mut slot = slot.lock().await;
        slot.removed = true;
        if self.registrations.lock().contains_key(key) {
            // Registered again since: the successor rewrites the node in place.
            return Ok(());
        }
        // With no session the node belongs to an ended one and goes with it.
        let Some(client) = self.current() else {
            return Ok(());
        };
        let deleted = bounded(
            format!("deregistering {}", slot.path),
            delete_own_node(&client, &slot.path),
        )
        .await;
        match deleted {
            Ok(()) => info!(zk.path = %slot.path, "deregistered"),
            Err(_) => self.orphans.lock().push((key.clone(), slot.path.clone())),
        }
        deleted
    }

    fn forget(&self, key: &Key, slot: &SlotRef) {
        let mut registrations = self.registrations.lock();
        if registrations
            .get(key)
            .is_some_and(|current| Arc::ptr_eq(current, slot))
        {
            registrations.remove(key);
        }
    }
}

/// A ZooKeeper registration: the slot the supervisor re-asserts.
pub(crate) struct ZkRegistration {
    shared: Arc<Shared>,
    key: Key,
    slot: SlotRef,
    /// False once deregistered, so that drop does nothing more.
    live: bool,
}

impl std::fmt::Debug for ZkRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZkRegistration")
            .field("kind", &self.key.0)
            .field("id", &self.key.1)
            .finish()
    }
}

impl ZkRegistration {
    pub(crate) async fn update(&self, mut info: NodeInfo) -> Result<()> {
        if info.id != self.key.1 {
            return Err(Error::Invalid(format!(
                "cannot change the id of registered {} {:?} to {:?}",
                self.key.0, self.key.1, info.id
            )));
        }
        info.updated = now_ms();
        let data = to_json(&info)?;
        let mut slot = self.slot.lock().await;
        slot.data = data;
        self.shared.write(&slot).await
    }

    pub(crate) async fn deregister(mut self) -> Result<()> {
        self.live = false;
        self.shared.forget(&self.key, &self.slot);
        self.shared.remove(&self.key, &self.slot).await
    }
}

impl Drop for ZkRegistration {
    fn drop(&mut self) {
        if !self.live {
            return;
        }
        self.shared.forget(&self.key, &self.slot);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // The refresh no longer sees it; the node goes with the session.
            return;
        };
        let shared = Arc::clone(&self.shared);
        let key = self.key.clone();
        let slot = Arc::clone(&self.slot);
        runtime.spawn(async move {
            if let Err(e) = shared.remove(&key, &slot).await {
                warn!(error = %e, "cannot deregister a dropped registration yet; retrying on refresh");
            }
        });
    }
}

/// Keeps the session: follows its state, refreshes the registrations, and
/// replaces it when it ends. Runs until the discovery is dropped.
async fn supervise(shared: Arc<Shared>, mut client: zk::Client) {
    let refresh_every = shared
        .session_timeout
        .clamp(Duration::from_secs(1), Duration::from_secs(30));
    let mut refresh = tokio::time::interval_at(Instant::now() + refresh_every, refresh_every);
    refresh.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut state = client.state_watcher();
    loop {
        let session = client.session_id();
        let changed = tokio::select! {
            _ = shared.cancel.cancelled() => break,
            _ = refresh.tick() => None,
            changed = state.changed() => Some(changed),
        };
        match changed {
            None => {}
            Some(zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly) => {
                info!(zk.session = %session, "reconnected to zookeeper");
            }
            Some(zk::SessionState::Disconnected) => {
                warn!(
                    zk.session = %session,
                    "lost the zookeeper connection; reconnecting within the session"
                );
                continue;
            }
            Some(ended) => {
                warn!(zk.session = %session, state = %ended, "zookeeper session ended; opening a new one");
                shared.publish(None, false);
                let Some(reopened) = shared.reopen_session().await else {
                    break;
                };
                client = reopened;
                state = client.state_watcher();
                info!(zk.session = %client.session_id(), "new zookeeper session; restoring registrations");
                shared.publish(Some(client.clone()), false);
                tokio::select! {
                    _ = shared.cancel.cancelled() => break,
                    () = shared.refresh(&client) => {}
                }
                shared.publish(Some(client.clone()), true);
                continue;
            }
        }
        if !matches!(
            state.peek_state(),
            zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly
        ) {
            // Requests would only queue until the connection is back, which
            // triggers a refresh anyway.
            continue;
        }
        tokio::select! {
            _ = shared.cancel.cancelled() => break,
            () = shared.refresh(&client) => {}
        }
    }
    // Dropping the last client closes the session, which removes our nodes.
    shared.publish(None, false);
    shared.views.lock().clear();
    debug!("zookeeper discovery stopped");
}

/// Keeps one kind's view current until the discovery is dropped: reads the
/// directory with watches, publishes, and re-reads on any event.
async fn follow_view(
    shared: Arc<Shared>,
    kind: Kind,
    nodes_tx: watch::Sender<Vec<NodeInfo>>,
    ready_tx: watch::Sender<bool>,
) {
    let dir = shared.dir(kind);
    let mut session_rx = shared.session_tx.subscribe();
    let mut backoff = Backoff::new();
    // The previous read's watchers, dropped only after the next read has
    // set new ones on the same paths (dropping the last watcher of a path
    // would send the server a request to remove it).
    let mut _armed: Option<Watchers> = None;
    loop {
        let client = tokio::select! {
            _ = shared.cancel.cancelled() => return,
            client = session_rx.wait_for(|session| session.restored && session.client.is_some()) => match client {
                Ok(session) => session.client.clone(),
                Err(_) => return,
            },
        };
        let Some(client) = client else { continue };
        let read = timeout(REQUEST_TIMEOUT, read_view(&client, &dir)).await;
        drop(client);
        match read {
            Ok(Ok((nodes, watchers))) => {
                backoff.reset();
                nodes_tx.send_if_modified(|current| {
                    let changed = *current != nodes;
                    if changed {
                        debug!(zk.path = %dir, nodes = nodes.len(), "view changed");
                        *current = nodes;
                    }
                    changed
                });
                ready_tx.send_replace(true);
                let mut pending: Watchers =
                    watchers.into_iter().map(|w| w.changed().boxed()).collect();
                _armed = None;
                let ended = tokio::select! {
                    _ = shared.cancel.cancelled() => return,
                    _ = session_rx.changed() => false,
                    event = pending.next() => event.is_some_and(|event| {
                        debug!(zk.path = %dir, event = ?event.event_type, path = %event.path, "watch fired");
                        event.event_type == zk::EventType::Session && event.session_state.is_terminated()
                    }),
                };
                if ended {
                    // The session is gone: wait for the supervisor to publish another.
                    tokio::select! {
                        _ = shared.cancel.cancelled() => return,
                        _ = session_rx.changed() => {}
                    }
                }
                _armed = Some(pending);
            }
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("timed out after {REQUEST_TIMEOUT:?}"),
                };
                warn!(zk.path = %dir, error = %error, "cannot read the view; retrying");
                tokio::select! {
                    _ = shared.cancel.cancelled() => return,
                    _ = session_rx.changed() => {}
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
}

/// Reads a kind's directory: the nodes (sorted by id) and the watchers that
/// fire on any change to the set or to a node's data.
async fn read_view(
    client: &zk::Client,
    dir: &str,
) -> Result<(Vec<NodeInfo>, Vec<zk::OneshotWatcher>), zk::Error> {
    let (children, _, dir_watcher) = loop {
        match client.get_and_watch_children(dir).await {
            Ok(listed) => break listed,
            Err(zk::Error::NoNode) => {
                // Deleted by hand: an empty view until it is back.
                if let (None, watcher) = client.check_and_watch_stat(dir).await? {
                    return Ok((Vec::new(), vec![watcher]));
                }
            }
            Err(e) => return Err(e),
        }
    };
    let reads = children.iter().map(|name| {
        let path = format!("{dir}/{name}");
        async move {
            let read = client.get_and_watch_data(&path).await;
            (path, name, read)
        }
    });
    let mut nodes = Vec::with_capacity(children.len());
    let mut watchers = Vec::with_capacity(children.len() + 1);
    watchers.push(dir_watcher);
    for (path, name, read) in futures::future::join_all(reads).await {
        match read {
            Ok((data, _, watcher)) => {
                watchers.push(watcher);
                nodes.extend(parse_node(&path, name, &data));
            }
            // Deleted since the listing; the children watch fires for it.
            Err(zk::Error::NoNode) => {}
            Err(e) => return Err(e),
        }
    }
    nodes.sort_by(|a, b| a.id.cmp(&b.id));
    Ok((nodes, watchers))
}

/// Parses a node's data; bad data is logged and skipped.
fn parse_node(path: &str, name: &str, data: &[u8]) -> Option<NodeInfo> {
    let mut info: NodeInfo = match serde_json::from_slice(data) {
        Ok(info) => info,
        Err(e) => {
            warn!(zk.path = %path, error = %e, "skipping a node whose data is not node JSON");
            return None;
        }
    };
    if info.id.is_empty() {
        info.id = name.to_owned();
    } else if info.id != name {
        warn!(zk.path = %path, id = %info.id, "skipping a node whose JSON id is not its name");
        return None;
    }
    Some(info)
}

/// Makes the ephemeral node at `path` hold `data` and belong to this
/// session: creates it, rewrites it, or replaces another session's node
/// (e.g. our own previous session's, not yet expired).
async fn write_node(client: &zk::Client, path: &str, data: &[u8]) -> Result<(), zk::Error> {
    let own = client.session_id().0;
    for _ in 0..WRITE_ATTEMPTS {
        match client.get_data(path).await {
            Ok((current, stat)) if stat.ephemeral_owner == own => {
                if current == data {
                    return Ok(());
                }
                match client.set_data(path, data, Some(stat.version)).await {
                    Ok(_) => return Ok(()),
                    Err(zk::Error::BadVersion | zk::Error::NoNode) => continue,
                    Err(e) => return Err(e),
                }
            }
            Ok((_, stat)) => {
                warn!(
                    zk.path = %path,
                    owner = %zk::SessionId(stat.ephemeral_owner),
                    "replacing a node of another session"
                );
                match client.delete(path, Some(stat.version)).await {
                    Ok(()) | Err(zk::Error::NoNode | zk::Error::BadVersion) => continue,
                    Err(e) => return Err(e),
                }
            }
            Err(zk::Error::NoNode) => match client.create(path, data, &EPHEMERAL).await {
                Ok(_) => return Ok(()),
                Err(zk::Error::NodeExists) => continue,
                Err(zk::Error::NoNode) => {
                    // The kind's directory was deleted by hand: put it back.
                    if let Some((dir, _)) = path.rsplit_once('/') {
                        client.mkdir(dir, &PERSISTENT).await?;
                    }
                }
                Err(e) => return Err(e),
            },
            Err(e) => return Err(e),
        }
    }
    Err(zk::Error::UnexpectedError(format!(
        "{path} kept changing under {WRITE_ATTEMPTS} attempts to write it"
    )))
}

/// Deletes the node at `path` if this session owns it.
async fn delete_own_node(client: &zk::Client, path: &str) -> Result<(), zk::Error> {
    match client.check_stat(path).await? {
        Some(stat) if stat.ephemeral_owner == client.session_id().0 => {
            match client.delete(path, Some(stat.version)).await {
                // A concurrent write means a successor holds it now.
                Ok(()) | Err(zk::Error::NoNode | zk::Error::BadVersion) => Ok(()),
                Err(e) => Err(e),
            }
        }
        _ => Ok(()),
    }
}

/// Awaits a ZooKeeper request for at most [`REQUEST_TIMEOUT`].
async fn bounded<T>(
    what: String,
    request: impl Future<Output = Result<T, zk::Error>>,
) -> Result<T> {
    match timeout(REQUEST_TIMEOUT, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(Error::Unavailable(format!("zookeeper {what}: {e}"))),
        Err(_) => Err(Error::Unavailable(format!(
            "zookeeper {what}: timed out after {REQUEST_TIMEOUT:?}"
        ))),
    }
}

fn to_json(info: &NodeInfo) -> Result<Vec<u8>> {
    serde_json::to_vec(info).map_err(|e| Error::Invalid(format!("node {:?}: {e}", info.id)))
}

/// Exponential retry delays with jitter, so that many nodes reconnecting
/// after a ZooKeeper restart do not retry in step.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff { next: BACKOFF_MIN }
    }

    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }

    fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (delay * 2).min(BACKOFF_MAX);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        // Up to a quarter more, from the clock's low bits.
        delay + delay / 4 * (nanos % 1000) / 1000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap() {
        let mut backoff = Backoff::new();
        let first = backoff.next_delay();
        assert!(first >= BACKOFF_MIN && first <= BACKOFF_MIN + BACKOFF_MIN / 4);
        for _ in 0..20 {
            assert!(backoff.next_delay() <= BACKOFF_MAX + BACKOFF_MAX / 4);
        }
        backoff.reset();
        assert!(backoff.next_delay() <= BACKOFF_MIN + BACKOFF_MIN / 4);
    }

    #[test]
    fn bad_node_data_is_skipped() {
        assert_eq!(parse_node("/r/comets/a", "a", b"{not json"), None);
        assert_eq!(parse_node("/r/comets/a", "a", br#"{"id":"b"}"#), None);
        let info = parse_node("/r/comets/a", "a", br#"{"weight":3}"#).unwrap();
        assert_eq!((info.id.as_str(), info.weight), ("a", 3));
    }

    #[tokio::test]
    async fn bad_arguments_are_refused_before_connecting() {
        let timeout = Duration::from_secs(1);
        for (connect, root) in [("", "/rim"), ("h:1", "rim"), ("h:1", "/rim/")] {
            let err = ZkDiscovery::connect(connect, root, timeout)
                .await
                .unwrap_err();
            assert!(
                matches!(err, Error::Invalid(_)),
                "{connect:?} {root:?}: {err}"
            );
        }
    }
}
