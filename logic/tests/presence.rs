//! Presence events as a business sees them: the logic service over the
//! in-memory router, POSTing to a small in-test webhook.
//!
//! No test measures time. Absence of an event is shown by order instead:
//! checks run in the order they were made (one debounce for all), on a
//! single-threaded runtime, and events are POSTed in order, so once the
//! event of a later "marker" user arrives every earlier check has run.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use bytes::Bytes;
use parking_lot::Mutex;
use rim_config::LogicConfig;
use rim_logic::{Comets, HttpClient, Logic, LogicFacade};
use rim_proto::api::LogicApi;
use rim_proto::pb::logic::v1 as pb;
use rim_router::{MemoryRouter, RedisOptions, RedisRouter, Router};
use serde_json::Value;
use tokio::sync::{mpsc, watch};

/// Bound on waiting for one event (it normally comes within a debounce).
const WAIT: Duration = Duration::from_secs(20);

/// What the webhook does with a POST.
#[derive(Clone)]
struct Hook {
    events_tx: mpsc::UnboundedSender<Value>,
    /// Requests wait until this is true.
    open: watch::Receiver<bool>,
    status: StatusCode,
    hits: Arc<Mutex<u32>>,
}

async fn receive(State(hook): State<Hook>, Json(event): Json<Value>) -> StatusCode {
    let mut open = hook.open.clone();
    let _ = open.wait_for(|open| *open).await;
    *hook.hits.lock() += 1;
    let _ = hook.events_tx.send(event);
    hook.status
}

struct Webhook {
    url: String,
    events_rx: mpsc::UnboundedReceiver<Value>,
    open_tx: watch::Sender<bool>,
    hits: Arc<Mutex<u32>>,
}

/// Starts a webhook answering `status`, open (answering at once) or not.
async fn webhook(status: StatusCode, open: bool) -> Webhook {
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (open_tx, open_rx) = watch::channel(open);
    let hits = Arc::new(Mutex::new(0));
    let hook = Hook {
        events_tx,
        open: open_rx,
        status,
        hits: Arc::clone(&hits),
    };
    let app = axum::Router::new()
        .route("/presence", post(receive))
        .with_state(hook);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/presence", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Webhook {
        url,
        events_rx,
        open_tx,
        hits,
    }
}

impl Webhook {
    /// The next event POSTed, within [`WAIT`].
    async fn next(&mut self) -> Value {
        tokio::time::timeout(WAIT, self.events_rx.recv())
            .await
            .expect("a presence event within the wait")
            .expect("webhook running")
    }

    /// Asserts that the next event is `state` for `mid`, and returns it.
    async fn expect(&mut self, mid: i64, state: &str) -> Value {
        let event = self.next().await;
        assert_eq!(
            (event["mid"].as_i64(), event["state"].as_str()),
            (Some(mid), Some(state)),
            "{event}"
        );
        event
    }
}

fn config(url: &str, debounce: Duration) -> LogicConfig {
    LogicConfig {
        presence_webhook: url.to_owned(),
        presence_debounce: debounce,
        ..LogicConfig::default()
    }
}

fn logic(config: &LogicConfig) -> (Logic, Arc<dyn Router>) {
    let router: Arc<dyn Router> = Arc::new(MemoryRouter::new(Duration::from_secs(30)));
    let logic = Logic::new(
        config,
        Arc::clone(&router),
        Arc::new(Comets::new()),
        HttpClient::new().unwrap(),
    );
    (logic, router)
}

async fn connect(logic: &Logic, mid: i64, key: &str, platform: &str) {
    let token = format!(r#"{{"mid":{mid},"key":"{key}","platform":"{platform}"}}"#);
    let req = pb::ConnectRequest {
        server: "comet-1".into(),
        cookie: String::new(),
        token: Bytes::from(token),
        client_ip: "127.0.0.1".into(),
    };
    logic.connect(req).await.unwrap();
}

async fn disconnect(logic: &Logic, mid: i64, key: &str) {
    let req = pb::DisconnectRequest {
        mid,
        key: key.into(),
        server: "comet-1".into(),
    };
    assert!(
        logic.disconnect(req).await.unwrap(),
        "{mid} {key} was online"
    );
}

/// Connects and disconnects a marker user and waits for its offline event:
/// every check made before has run by then.
async fn marker(logic: &Logic, hook: &mut Webhook, mid: i64) {
    connect(logic, mid, &format!("marker-{mid}"), "test").await;
    hook.expect(mid, "online").await;
    disconnect(logic, mid, &format!("marker-{mid}")).await;
    hook.expect(mid, "offline").await;
}

/// Reads one sample of the logic's exposition (0 when absent).
fn sample(logic: &Logic, name: &str) -> u64 {
    let mut registry = rim_metrics::Registry::default();
    logic.register_metrics(&mut registry);
    let text = rim_metrics::encode(&registry);
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn flapping_reconnects_announce_nothing_and_a_real_disconnect_one_offline() {
    let mut hook = webhook(StatusCode::NO_CONTENT, true).await;
    let (logic, _router) = logic(&config(&hook.url, Duration::from_secs(2)));

    connect(&logic, 1, "phone", "ios").await;
    let online = hook.expect(1, "online").await;
    assert_eq!(
        (online["seq"].as_u64(), online["devices"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(online["ts"].as_i64().unwrap() >= online["last_seen"].as_i64().unwrap());

    // Each reconnect comes well within the debounce of its disconnect.
    for _ in 0..5 {
        disconnect(&logic, 1, "phone").await;
        connect(&logic, 1, "phone", "ios").await;
    }
    marker(&logic, &mut hook, 100).await;

    disconnect(&logic, 1, "phone").await;
    let offline = hook.expect(1, "offline").await;
    assert_eq!(
        (offline["seq"].as_u64(), offline["devices"].as_u64()),
        (Some(2), Some(0))
    );

    // Exactly one: nothing more for user 1 before a later marker's events.
    marker(&logic, &mut hook, 101).await;
    assert!(hook.events_rx.try_recv().is_err());
    // The webhook saw the event just before its answer reached logic.
    let deadline = tokio::time::Instant::now() + WAIT;
    while sample(&logic, "rim_logic_presence_delivered_total") < 6 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "deliveries not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sample(&logic, "rim_logic_presence_delivered_total"), 6);
    assert_eq!(
        sample(&logic, "rim_logic_presence_events_total{state=\"offline\"}"),
        3
    );
}

#[tokio::test]
async fn two_devices_go_offline_only_when_both_are_gone() {
    let mut hook = webhook(StatusCode::OK, true).await;
    let (logic, _router) = logic(&config(&hook.url, Duration::from_millis(300)));

    connect(&logic, 2, "phone", "ios").await;
    connect(&logic, 2, "laptop", "web").await;
    hook.expect(2, "online").await;

    disconnect(&logic, 2, "phone").await;
    marker(&logic, &mut hook, 200).await;

    disconnect(&logic, 2, "laptop").await;
    let offline = hook.expect(2, "offline").await;
    assert_eq!(offline["seq"].as_u64(), Some(2));
    marker(&logic, &mut hook, 201).await;
    assert!(hook.events_rx.try_recv().is_err());
}

#[tokio::test]
async fn a_failing_webhook_is_retried_then_dropped_and_connects_never_wait() {
    // The webhook holds every request until the gate opens, then fails it.
    let mut hook = webhook(StatusCode::INTERNAL_SERVER_ERROR, false).await;
    let config = LogicConfig {
        presence_attempts: 3,
        presence_queue: 1,
        presence_timeout: Duration::from_secs(60),
        ..config(&hook.url, Duration::ZERO)
    };
    let (logic, _router) = logic(&config);

    // 50 users connect while the first event's POST hangs: none waits for it.
    let connects = async {
        for mid in 1..=50 {
            connect(&logic, mid, &format!("k{mid}"), "ios").await;
        }
    };
    tokio::time::timeout(WAIT, connects)
        .await
        .expect("connects finish while the webhook hangs");
    // One event is being POSTed (or waits), one waits in the queue; the
    // rest are dropped as they are decided.
    let queued = || sample(&logic, "rim_logic_presence_events_total{state=\"online\"}");
    let full = || {
        sample(
            &logic,
            "rim_logic_presence_dropped_total{reason=\"queue_full\"}",
        )
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while queued() + full() < 50 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "transitions not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(full() >= 48, "{} dropped", full());

    hook.open_tx.send(true).unwrap();
    let queued = queued();
    while sample(
        &logic,
        "rim_logic_presence_dropped_total{reason=\"failed\"}",
    ) < queued
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "failures not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every queued event was POSTed three times: two retries each.
    assert_eq!(*hook.hits.lock(), 3 * queued as u32);
    assert_eq!(
        sample(&logic, "rim_logic_presence_retries_total"),
        2 * queued
    );
    assert_eq!(sample(&logic, "rim_logic_presence_delivered_total"), 0);
    while hook.events_rx.try_recv().is_ok() {}

    // The pipeline still works: a later connect is announced (and fails).
    connect(&logic, 99, "k99", "ios").await;
    assert_eq!(hook.next().await["mid"].as_i64(), Some(99));
}

#[tokio::test]
async fn a_session_that_ends_without_a_disconnect_is_announced_offline() {
    let mut hook = webhook(StatusCode::OK, true).await;
    let config = LogicConfig {
        heartbeat: Duration::from_millis(100),
        lease: Duration::from_millis(300),
        ..config(&hook.url, Duration::from_millis(100))
    };
    let (logic, router) = logic(&config);
    connect(&logic, 3, "phone", "ios").await;
    hook.expect(3, "online").await;
    // The comet "crashes": no disconnect, no renewal. The lease ends and
    // the sweep finds the user.
    let offline = hook.expect(3, "offline").await;
    assert_eq!(
        (offline["seq"].as_u64(), offline["devices"].as_u64()),
        (Some(2), Some(0))
    );
    assert!(router.presence(3).await.unwrap().devices.is_empty());
}

#[tokio::test]
async fn the_presence_query_shows_devices_and_last_seen() {
    let (logic, _router) = logic(&LogicConfig::default());
    assert_eq!(logic.presence(4).await.unwrap().last_seen_unix_ms, None);
    connect(&logic, 4, "phone", "ios").await;
    connect(&logic, 4, "laptop", "web").await;
    let presence = logic.presence(4).await.unwrap();
    let mut devices: Vec<(String, String, String)> = presence
        .devices
        .iter()
        .map(|d| (d.key.clone(), d.platform.clone(), d.server.clone()))
        .collect();
    devices.sort();
    let owned = |k: &str, p: &str| (k.to_owned(), p.to_owned(), "comet-1".to_owned());
    assert_eq!(devices, [owned("laptop", "web"), owned("phone", "ios")]);
    assert!(presence.devices.iter().all(|d| d.since_unix_ms > 0));
    disconnect(&logic, 4, "phone").await;
    disconnect(&logic, 4, "laptop").await;
    let presence = logic.presence(4).await.unwrap();
    assert!(presence.devices.is_empty());
    assert!(presence.last_seen_unix_ms.is_some());
}

#[tokio::test]
async fn two_logics_over_one_router_announce_each_transition_once() {
    two_logics_announce_once(Arc::new(MemoryRouter::new(Duration::from_secs(30)))).await;
}

#[tokio::test]
#[ignore = "needs Redis: run deploy/test.sh"]
async fn two_logics_over_one_redis_announce_each_transition_once() {
    let url = match std::env::var("RIM_TEST_REDIS") {
        Ok(url) if !url.trim().is_empty() => url.trim().to_owned(),
        _ => panic!("RIM_TEST_REDIS is not set: run deploy/test.sh"),
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let prefix = format!("rimtest-presence-{}-{nanos}", std::process::id());
    let options = RedisOptions::new(Duration::from_secs(30)).with_prefix(prefix);
    let router = RedisRouter::connect(std::slice::from_ref(&url), options)
        .await
        .unwrap_or_else(|e| panic!("cannot reach Redis at RIM_TEST_REDIS={url}: {e}"));
    two_logics_announce_once(Arc::new(router)).await;
}

/// Two logics share `router`; a user's devices connect and leave through
/// both, and each transition is announced once.
async fn two_logics_announce_once(router: Arc<dyn Router>) {
    let mut hook = webhook(StatusCode::OK, true).await;
    let config = config(&hook.url, Duration::from_millis(300));
    let new_logic = || {
        Logic::new(
            &config,
            Arc::clone(&router),
            Arc::new(Comets::new()),
            HttpClient::new().unwrap(),
        )
    };
    let (a, b) = (new_logic(), new_logic());

    // The user's devices connect through different logics; both settle it.
    connect(&a, 5, "phone", "ios").await;
    connect(&b, 5, "laptop", "web").await;
    hook.expect(5, "online").await;
    disconnect(&a, 5, "phone").await;
    disconnect(&b, 5, "laptop").await;
    hook.expect(5, "offline").await;
    // Every check of either logic has run once its marker is announced.
    marker(&a, &mut hook, 500).await;
    marker(&b, &mut hook, 501).await;
    assert!(hook.events_rx.try_recv().is_err());
    let events = |state: &str| {
        let name = format!("rim_logic_presence_events_total{{state=\"{state}\"}}");
        sample(&a, &name) + sample(&b, &name)
    };
    assert_eq!((events("online"), events("offline")), (3, 3));
}
