//! Presence events: a user goes online with its first connection and
//! offline when its last one has been gone for `logic.presence_debounce`;
//! each transition is POSTed to `logic.presence_webhook`.
//!
//! Connects and disconnects only enqueue a check of the user (`try_send` on
//! a bounded channel: they never wait for the router or the webhook). One
//! task runs the checks: a connect's at once, a disconnect's after the
//! debounce (the debounce is one constant, so a FIFO holds them in due
//! order). A check asks the router to settle the user
//! ([`Router::settle_presence`]): an atomic compare of the live connections
//! with the state last announced, on the router's shared state, so with
//! many logics exactly one of them wins each transition; a user who
//! reconnected within the debounce is online as announced, and nothing
//! happens. The same task settles, every sweep, the users the router lists
//! as due ([`Router::presence_due`]): announced online but with every lease
//! ended, i.e. sessions that ended without a disconnect (a comet crash).
//!
//! Won transitions go through a second bounded queue to one sender task
//! that POSTs them in order, retrying with exponential backoff up to
//! `logic.presence_attempts`; a full queue or a last failed attempt drops the
//! event and counts it. It does not keep the online map (rim-router).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use rim_config::LogicConfig;
use rim_metrics::{Counter, Family, Registry};
use rim_router::{Router, Transition};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::webhook::HttpClient;

/// Checks waiting to run; a connect or disconnect finding it full drops its
/// check (counted as `checks_full`): the user is settled again at its next
/// connect or disconnect, or by the sweep once its leases end.
const CHECKS: usize = 65_536;

/// Settles in flight at once (router calls).
const SETTLE_CONCURRENCY: usize = 32;

/// Users taken from the router's due list per sweep.
const SWEEP_BATCH: usize = 1_000;

/// Bounds of the time between two sweeps (the debounce, clamped).
const SWEEP_MIN: Duration = Duration::from_secs(1);
const SWEEP_MAX: Duration = Duration::from_secs(30);

/// Wait before the first retry of a POST; doubled for each next one.
const BACKOFF_FIRST: Duration = Duration::from_millis(200);

/// Longest wait between two POSTs of one event.
const BACKOFF_MAX: Duration = Duration::from_secs(10);

type Labels = [(&'static str, &'static str); 1];

/// Presence-event counters, registered as `rim_logic_presence_*`.
#[derive(Clone, Debug, Default)]
pub(crate) struct PresenceMetrics {
    events: Family<Labels, Counter>,
    delivered: Counter,
    retries: Counter,
    dropped: Family<Labels, Counter>,
}

impl PresenceMetrics {
    fn new() -> Self {
        let metrics = PresenceMetrics::default();
        for state in ["online", "offline"] {
            let _ = metrics.events.get_or_create(&[("state", state)]);
        }
        for reason in ["queue_full", "failed", "checks_full"] {
            let _ = metrics.dropped.get_or_create(&[("reason", reason)]);
        }
        metrics
    }

    /// Counts one dropped event or check.
    fn dropped(&self, reason: &'static str) {
        self.dropped.get_or_create(&[("reason", reason)]).inc();
    }

    /// Registers the counters in `registry`.
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "rim_logic_presence_events",
            "Presence transitions this logic won and queued for logic.presence_webhook, by state",
            self.events.clone(),
        );
        registry.register(
            "rim_logic_presence_delivered",
            "Presence events the webhook answered with 2xx",
            self.delivered.clone(),
        );
        registry.register(
            "rim_logic_presence_retries",
            "POSTs of presence events repeated after a failed one",
            self.retries.clone(),
        );
        registry.register(
            "rim_logic_presence_dropped",
            "Presence events or checks dropped, by reason: queue_full (logic.presence_queue full), failed (every attempt failed), checks_full (the check queue was full)",
            self.dropped.clone(),
        );
    }
}

/// The JSON body POSTed to the presence webhook.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct Event {
    /// The user.
    mid: i64,
    /// `online` or `offline`.
    state: &'static str,
    /// The user's transition number (1, 2, ...): orders and deduplicates
    /// events of one user across logics and retries.
    seq: u64,
    /// When the transition was decided, unix milliseconds.
    ts: i64,
    /// Live connections at that time (0 when offline).
    devices: u32,
    /// When a connection of the user was last added, renewed or removed,
    /// unix milliseconds.
    last_seen: i64,
}

impl From<Transition> for Event {
    fn from(t: Transition) -> Self {
        Event {
            mid: t.mid,
            state: t.state.as_str(),
            seq: t.seq,
            ts: t.at_unix_ms,
            devices: t.devices,
            last_seen: t.last_seen_unix_ms,
        }
    }
}

/// How presence events are produced and delivered.
#[derive(Clone, Debug)]
pub(crate) struct PresenceOptions {
    /// Where events are POSTed.
    pub(crate) webhook: String,
    /// Time without devices before offline is announced.
    pub(crate) debounce: Duration,
    /// Deadline of one POST.
    pub(crate) timeout: Duration,
    /// POSTs per event.
    pub(crate) attempts: u32,
    /// Capacity of the event queue.
    pub(crate) queue: usize,
    /// Wait before the first retry.
    pub(crate) backoff: Duration,
}

impl PresenceOptions {
    /// Reads the options from `[logic]`; None when no webhook is set.
    pub(crate) fn from_config(config: &LogicConfig) -> Option<Self> {
        (!config.presence_webhook.is_empty()).then(|| PresenceOptions {
            webhook: config.presence_webhook.clone(),
            debounce: config.presence_debounce,
            timeout: config.presence_timeout,
            attempts: config.presence_attempts.max(1),
            queue: config.presence_queue.max(1),
            backoff: BACKOFF_FIRST,
        })
    }
}

/// A user to settle at `at`.
#[derive(Clone, Copy, Debug)]
struct Check {
    mid: i64,
    at: Instant,
}

/// The presence-event pipeline of one logic; dropping it stops its tasks
/// (the sender first POSTs what is already queued).
#[derive(Debug)]
pub(crate) struct PresenceEvents {
    checks_tx: mpsc::Sender<Check>,
    debounce: Duration,
    metrics: PresenceMetrics,
    _stop: DropGuard,
}

impl PresenceEvents {
    /// Starts the checker and sender tasks on the current runtime.
    pub(crate) fn start(
        options: PresenceOptions,
        router: Arc<dyn Router>,
        http: HttpClient,
        router_errors: Family<Labels, Counter>,
    ) -> Self {
        let metrics = PresenceMetrics::new();
        let (checks_tx, checks_rx) = mpsc::channel(CHECKS);
        let (events_tx, events_rx) = mpsc::channel(options.queue);
        let stop = CancellationToken::new();
        let checker = Checker {
            router,
            events_tx,
            metrics: metrics.clone(),
            router_errors,
            sweep_every: options.debounce.clamp(SWEEP_MIN, SWEEP_MAX),
        };
        tokio::spawn(checker.run(checks_rx, stop.clone()));
        let sender = Sender {
            http,
            metrics: metrics.clone(),
            options: options.clone(),
        };
        tokio::spawn(sender.run(events_rx));
        PresenceEvents {
            checks_tx,
            debounce: options.debounce,
            metrics,
            _stop: stop.drop_guard(),
        }
    }

    /// Notes that `mid` connected: settled at once (online if it was offline).
    pub(crate) fn connected(&self, mid: i64) {
        self.check(Check {
            mid,
            at: Instant::now(),
        });
    }

    /// Notes that a connection of `mid` ended: settled after the debounce
    /// (offline if it has none left by then).
    pub(crate) fn disconnected(&self, mid: i64) {
        self.check(Check {
            mid,
            at: Instant::now() + self.debounce,
        });
    }

    fn check(&self, check: Check) {
        if self.checks_tx.try_send(check).is_err() {
            self.metrics.dropped("checks_full");
        }
    }

    /// Registers the `rim_logic_presence_*` metrics.
    pub(crate) fn register_metrics(&self, registry: &mut Registry) {
        self.metrics.register(registry);
    }
}

/// Runs the checks and the sweeps, and queues the transitions it wins.
struct Checker {
    router: Arc<dyn Router>,
    events_tx: mpsc::Sender<Event>,
    metrics: PresenceMetrics,
    router_errors: Family<Labels, Counter>,
    sweep_every: Duration,
}

impl Checker {
    async fn run(self, mut checks_rx: mpsc::Receiver<Check>, stop: CancellationToken) {
        let this = Arc::new(self);
        // Due in arrival order: every delayed check waits the same debounce.
        let mut later: VecDeque<Check> = VecDeque::new();
        let mut settling = JoinSet::new();
        let mut sweep = tokio::time::interval(this.sweep_every);
        sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let next = later.front().map(|check| check.at);
            let mut due = Vec::new();
            tokio::select! {
                () = stop.cancelled() => break,
                check = checks_rx.recv() => match check {
                    None => break,
                    Some(check) if check.at <= Instant::now() => due.push(check.mid),
                    Some(check) if later.len() < CHECKS => later.push_back(check),
                    Some(_) => this.metrics.dropped("checks_full"),
                },
                () = sleep_until(next), if next.is_some() => {
                    let now = Instant::now();
                    while let Some(check) = later.front().filter(|c| c.at <= now) {
                        due.push(check.mid);
                        later.pop_front();
                    }
                }
                _ = sweep.tick() => match this.router.presence_due(SWEEP_BATCH).await {
                    Ok(mids) => due = mids,
                    Err(err) => {
                        this.router_errors.get_or_create(&[("op", "presence_due")]).inc();
                        tracing::debug!(error = %err, "presence sweep failed");
                    }
                },
                Some(_) = settling.join_next(), if !settling.is_empty() => {}
            }
            for mid in due {
                while settling.len() >= SETTLE_CONCURRENCY {
                    let _ = settling.join_next().await;
                }
                let this = Arc::clone(&this);
                settling.spawn(async move { this.settle(mid).await });
            }
        }
        // What is in flight finishes; delayed checks are dropped with the
        // logic (the router's due list catches their users' leases).
        while settling.join_next().await.is_some() {}
    }

    /// Settles one user and queues the transition it wins, if any.
    async fn settle(&self, mid: i64) {
        match self.router.settle_presence(mid).await {
            Ok(Some(transition)) => {
                let event = Event::from(transition);
                let state = event.state;
                match self.events_tx.try_send(event) {
                    Ok(()) => {
                        self.metrics.events.get_or_create(&[("state", state)]).inc();
                    }
                    Err(_) => self.metrics.dropped("queue_full"),
                }
            }
            Ok(None) => {}
            Err(err) => {
                self.router_errors
                    .get_or_create(&[("op", "settle_presence")])
                    .inc();
                tracing::debug!(mid, error = %err, "presence settle failed");
            }
        }
    }
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// POSTs the queued events one at a time, in order.
struct Sender {
    http: HttpClient,
    metrics: PresenceMetrics,
    options: PresenceOptions,
}

impl Sender {
    async fn run(self, mut events_rx: mpsc::Receiver<Event>) {
        while let Some(event) = events_rx.recv().await {
            self.deliver(&event).await;
        }
    }

    /// POSTs one event until a 2xx answer or the last attempt.
    async fn deliver(&self, event: &Event) {
        let mut backoff = self.options.backoff;
        for attempt in 1..=self.options.attempts {
            if attempt > 1 {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                self.metrics.retries.inc();
            }
            let failure = match self
                .http
                .post_json(&self.options.webhook, event, self.options.timeout)
                .await
            {
                Ok((status, _)) if (200..300).contains(&status) => {
                    self.metrics.delivered.inc();
                    return;
                }
                Ok((status, _)) => format!("answered HTTP {status}"),
                Err(err) => err.to_string(),
            };
            tracing::debug!(mid = event.mid, seq = event.seq, attempt, reason = %failure, "presence webhook failed");
            if attempt == self.options.attempts {
                self.metrics.dropped("failed");
                tracing::warn!(mid = event.mid, seq = event.seq, state = event.state, reason = %failure, "presence event dropped after {attempt} attempts");
            }
        }
    }
}
