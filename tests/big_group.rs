//! Big groups (im.md, read diffusion) end to end: one logic, two comets and
//! one job, every role its own `rim` process, on the real ZooKeeper, Redis,
//! Kafka-protocol broker and PostgreSQL deploy/test.sh starts.
//!
//! A 10,000-member group, 2,000 members online over the two comets, 200
//! messages a second offered for 10 s: every message is stored with a
//! dense seq and no inbox entry; no client is pushed more than the group's
//! cap (`im.big_group_rate`, 40 a second) plus NOTIFY truncated; after
//! PULLing, every client holds every message. Before the load, a member
//! added while online gets the group's messages through the channel, and a
//! removed one stops getting them.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rim_client::{AuthToken, Client, ImEvent};
use rim_proto::im::{Code, Notify, PullRequest};
use serde_json::json;
use support::exposition::scrape;
use support::{Proc, service, shipped_config};

const CONV: &str = "g:big";
const MEMBERS: i64 = 10_000;
const ONLINE: i64 = 2_000;
const RATE: u64 = 200;
const SECONDS: u64 = 10;
/// `im.big_group_rate` (the shipped default) and the burst the job allows.
const CAP: u64 = 40;
const BURST: u64 = CAP / 4;

struct Roles {
    logic: Proc,
    http: SocketAddr,
    comets: Vec<(Proc, SocketAddr, SocketAddr)>,
    job: Proc,
}

async fn start(run: &str) -> Roles {
    let (zk, redis, kafka) = (
        service("RIM_TEST_ZK"),
        service("RIM_TEST_REDIS"),
        service("RIM_TEST_KAFKA"),
    );
    let topic = format!("rim-big-{run}");
    support::create_topic(&kafka, &topic).await;
    let common = |id: String| -> Vec<(&'static str, String)> {
        vec![
            ("RIM_NODE__ID", id),
            ("RIM_NODE__REGION", "r1".into()),
            ("RIM_DISCOVERY__BACKEND", "zookeeper".into()),
            ("RIM_DISCOVERY__ZOOKEEPER", zk.clone()),
            ("RIM_DISCOVERY__ROOT", format!("/rim-big-{run}")),
            ("RIM_QUEUE__BROKERS", kafka.clone()),
            ("RIM_QUEUE__TOPIC", topic.clone()),
        ]
    };
    let store = support::postgres_schema(&format!("rim_big_{run}")).await;
    let mut env = common(format!("logic-{run}"));
    env.extend([
        ("RIM_LOGIC__GRPC_BIND", "127.0.0.1:0".to_string()),
        ("RIM_API__HTTP_BIND", "127.0.0.1:0".into()),
        ("RIM_LOGIC__AUTH__POLICY", "none".into()),
        ("RIM_ROUTER__REDIS", redis.clone()),
        ("RIM_IM__STORE", "postgres".into()),
        ("RIM_IM__POSTGRES", store),
        // The test's sends come from one address.
        ("RIM_IM__API_WRITE_RATE", "0".into()),
    ]);
    let mut logic = Proc::start(&["logic", "--config", &shipped_config("logic")], &env);
    let http = logic.addr_after("http api serving");
    let mut comets = Vec::new();
    for name in ["1", "2"] {
        let mut env = common(format!("comet-{name}-{run}"));
        env.extend([
            ("RIM_COMET__TCP_BIND", "127.0.0.1:0".to_string()),
            ("RIM_COMET__WS_BIND", "127.0.0.1:0".into()),
            ("RIM_COMET__GRPC_BIND", "127.0.0.1:0".into()),
            ("RIM_COMET__DRAIN_WINDOW", "200ms".into()),
        ]);
        let mut comet = Proc::start(&["comet", "--config", &shipped_config("comet")], &env);
        let tcp = comet.addr_after("accepting clients listener=\"tcp\"");
        let metrics = comet.addr_after("metrics serving");
        comets.push((comet, tcp, metrics));
    }
    let mut env = common(format!("job-{run}"));
    env.push(("RIM_JOB__GROUP", format!("rim-job-{run}")));
    let job = Proc::start(&["job", "--config", &shipped_config("job")], &env);
    Roles {
        logic,
        http,
        comets,
        job,
    }
}

impl Roles {
    fn stop(self) {
        self.job.stop();
        for (comet, _, _) in self.comets {
            comet.stop();
        }
        self.logic.stop();
    }
}

async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    body: serde_json::Value,
) -> serde_json::Value {
    let mut request = http.request(method, &url);
    if !body.is_null() {
        request = request.json(&body);
    }
    let answer: serde_json::Value = request.send().await.unwrap().json().await.unwrap();
    assert_eq!(answer["code"], 0, "{url}: {answer}");
    answer["data"].clone()
}

/// Sends one message to the group as `from`; returns its seq.
async fn send(http: &reqwest::Client, api: SocketAddr, from: i64, cmid: &str) -> u64 {
    let body = json!({ "from": from, "conv": CONV, "cmid": cmid, "body": format!("body {cmid}") });
    let data = call(
        http,
        reqwest::Method::POST,
        format!("http://{api}/im/v1/messages"),
        body,
    )
    .await;
    data["seq"].as_u64().unwrap()
}

async fn members(http: &reqwest::Client, api: SocketAddr, add: &[i64], remove: &[i64]) {
    call(
        http,
        reqwest::Method::POST,
        format!("http://{api}/im/v1/groups/big/members"),
        json!({ "add": add, "remove": remove }),
    )
    .await;
}

async fn connect(addr: SocketAddr, mid: i64, run: &str) -> Client {
    let mut client = Client::connect_tcp(addr).await.unwrap();
    let token = AuthToken {
        mid,
        key: format!("m{mid}-{run}"),
        ..AuthToken::default()
    }
    .accepting_im();
    client.auth(&token).await.unwrap();
    client
}

/// The next MSG of the group (its seq), skipping anything else, within `limit`.
async fn next_msg(client: &mut Client, limit: Duration) -> Option<u64> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let event = tokio::time::timeout_at(deadline, client.next_im())
            .await
            .ok()?;
        if let Some(ImEvent::Msg(msg)) = event.unwrap() {
            assert!(msg.sync.is_none(), "a big group's MSG has no inbox sync");
            return Some(msg.seq);
        }
    }
}

/// Sums a gauge over the comets.
async fn channel_seats(http: &reqwest::Client, roles: &Roles) -> f64 {
    let mut seats = 0.0;
    for (_, _, metrics) in &roles.comets {
        let m = scrape(http, *metrics).await;
        seats += m.get("rim_comet_group_channel_seats", &[]).unwrap_or(0.0);
    }
    seats
}

/// What one client saw during the load.
#[derive(Default)]
struct Seen {
    /// seq → (id, when it arrived).
    msgs: BTreeMap<u64, (String, Instant)>,
    notices: Vec<u64>,
}

impl Seen {
    /// When the messages after `base` arrived, in order.
    fn arrivals(&self, base: u64) -> Vec<Instant> {
        let mut at: Vec<Instant> = self
            .msgs
            .range(base + 1..)
            .map(|(_, (_, at))| *at)
            .collect();
        at.sort_unstable();
        at
    }
}

/// The most of `arrivals` (sorted) within any one second.
fn busiest_second(arrivals: &[Instant]) -> usize {
    let mut start = 0;
    let mut most = 0;
    for (end, at) in arrivals.iter().enumerate() {
        while at.duration_since(arrivals[start]) >= Duration::from_secs(1) {
            start += 1;
        }
        most = most.max(end + 1 - start);
    }
    most
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs ZooKeeper, Redis, Kafka and PostgreSQL: run deploy/test.sh"]
async fn a_big_group_is_capped_per_client_and_complete_after_pull() {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let run = format!("bg{}", std::process::id());
    let roles = start(&run).await;
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let api = roles.http;
    let created = call(
        &http,
        reqwest::Method::PUT,
        format!("http://{api}/im/v1/groups/big"),
        json!({ "name": "Big", "max_members": MEMBERS + 10 }),
    )
    .await;
    assert_eq!(created["big"], true, "above im.big_group_members");

    // The pipeline is up once a member online gets a message (the job
    // may still be joining its consumer group).
    members(&http, api, &[1], &[]).await;
    let mut member = connect(roles.comets[0].1, 1, &run).await;
    let warm = send(&http, api, 1, "warm-0").await;
    assert_eq!(
        next_msg(&mut member, Duration::from_secs(60)).await,
        Some(warm)
    );

    // Membership takes effect for an online connection: joined, then left.
    let outsider = MEMBERS + 1;
    let mut watcher = connect(roles.comets[1].1, outsider, &run).await;
    members(&http, api, &[outsider], &[]).await;
    let joined_at = Instant::now();
    let first = send(&http, api, 1, "joined").await;
    // The channel join and the message share the group's lane in logic
    // and its queue partition: the message cannot pass the join.
    assert_eq!(
        next_msg(&mut watcher, Duration::from_secs(10)).await,
        Some(first)
    );
    println!(
        "a member added while online got the group's next message {:?} after the add",
        joined_at.elapsed()
    );
    assert_eq!(
        next_msg(&mut member, Duration::from_secs(10)).await,
        Some(first)
    );
    members(&http, api, &[], &[outsider]).await;
    let gone = send(&http, api, 1, "after-leave").await;
    assert_eq!(
        next_msg(&mut member, Duration::from_secs(10)).await,
        Some(gone)
    );
    assert_eq!(
        next_msg(&mut watcher, Duration::from_secs(1)).await,
        None,
        "seq {gone} reached a removed member"
    );
    drop(member);
    drop(watcher);

    // 10,000 members; the first 2,000 come online, half on each comet.
    let all: Vec<i64> = (1..=MEMBERS).collect();
    for chunk in all.chunks(1000) {
        members(&http, api, chunk, &[]).await;
    }
    let mut clients = Vec::new();
    for batch in (1..=ONLINE).collect::<Vec<_>>().chunks(100) {
        let connects = batch.iter().map(|&mid| {
            let comet = roles.comets[(mid % 2) as usize].1;
            let run = run.clone();
            async move { (mid, connect(comet, mid, &run).await) }
        });
        clients.extend(futures::future::join_all(connects).await);
    }
    let seats_at = Instant::now();
    while channel_seats(&http, &roles).await < ONLINE as f64 {
        assert!(
            seats_at.elapsed() < Duration::from_secs(30),
            "connections missing from the channel"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // No inbox entries: read diffusion.
    let inbox = call(
        &http,
        reqwest::Method::GET,
        format!("http://{api}/im/v1/users/5/sync"),
        json!(null),
    )
    .await;
    assert_eq!(inbox["msgs"], json!([]));

    // Readers record everything until told to stop.
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut readers = Vec::new();
    for (mid, mut client) in clients {
        let stop = Arc::clone(&stop);
        readers.push(tokio::spawn(async move {
            let mut seen = Seen::default();
            let stopped = stop.notified();
            tokio::pin!(stopped);
            loop {
                let event = tokio::select! {
                    () = &mut stopped => break,
                    event = client.next_im() => event.unwrap().expect("connection open"),
                };
                let now = Instant::now();
                match event {
                    ImEvent::Msg(msg) => {
                        assert_eq!(msg.conv, CONV);
                        seen.msgs.insert(msg.seq, (msg.id, now));
                    }
                    ImEvent::Notify(Notify::Truncated { conv, max_seq }) => {
                        assert_eq!(conv, CONV);
                        seen.notices.push(max_seq);
                    }
                    _ => {}
                }
            }
            (mid, client, seen)
        }));
    }

    // 200 messages a second for 10 s, each acknowledged (stored) by the API.
    let base = send(&http, api, 2, "warm").await;
    let started = Instant::now();
    let mut sends = Vec::new();
    for i in 0..RATE * SECONDS {
        let due = started + Duration::from_micros(i * 1_000_000 / RATE);
        tokio::time::sleep_until(due.into()).await;
        let http = http.clone();
        sends.push(tokio::spawn(async move {
            send(&http, api, 1 + (i as i64 % MEMBERS), &format!("load-{i}")).await
        }));
    }
    let offered_for = started.elapsed();
    let mut seqs = Vec::new();
    for send in sends {
        seqs.push(send.await.unwrap());
    }
    let acked_for = started.elapsed();
    seqs.sort_unstable();
    let last = base + RATE * SECONDS;
    assert_eq!(
        seqs,
        ((base + 1)..=last).collect::<Vec<_>>(),
        "dense seqs, each once"
    );

    // Every client is told the last seq (a MSG or NOTIFY truncated).
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.notify_waiters();
    let mut seen_all = Vec::new();
    for reader in readers {
        seen_all.push(reader.await.unwrap());
    }
    let mut pushed = Vec::new();
    let mut busiest = Vec::new();
    for (mid, _, seen) in &seen_all {
        let arrivals = seen.arrivals(base);
        let Some(end) = arrivals.last() else {
            panic!("client {mid} got no message at all");
        };
        // The job admitted everything this client got between the first
        // send and the client's last arrival: at most CAP a second over
        // that span plus one burst. (The client's own first-to-last span
        // is no bound: this process, reading 2,000 connections, may take
        // the early frames late.)
        let span = end.duration_since(started).as_secs_f64();
        let allowed = (CAP as f64 * span) as usize + BURST as usize;
        assert!(
            arrivals.len() <= allowed,
            "client {mid} got {} messages in {span:.1} s: over the cap ({allowed})",
            arrivals.len()
        );
        assert!(
            !seen.notices.is_empty(),
            "client {mid} was never told of thinned messages"
        );
        assert!(
            seen.notices.len() as f64 <= span + 2.0,
            "client {mid}: {} NOTIFY truncated in {span:.1} s",
            seen.notices.len()
        );
        busiest.push(busiest_second(&arrivals));
        let told = seen
            .notices
            .iter()
            .max()
            .copied()
            .unwrap_or(0)
            .max(*seen.msgs.keys().last().unwrap_or(&0));
        assert_eq!(told, last, "client {mid} was not told the group's last seq");
        pushed.push(arrivals.len());
    }
    pushed.sort_unstable();
    busiest.sort_unstable();
    println!(
        "{} clients, {} messages offered in {offered_for:?} (all acked after {acked_for:?}): \
         pushed per client min {} median {} max {}; busiest second per client median {} max {} \
         (cap {CAP}/s, burst {BURST})",
        seen_all.len(),
        RATE * SECONDS,
        pushed[0],
        pushed[pushed.len() / 2],
        pushed[pushed.len() - 1],
        busiest[busiest.len() / 2],
        busiest[busiest.len() - 1],
    );

    // PULLing completes every client's view: every seq, the same ids.
    let pull_started = Instant::now();
    let pulls = seen_all
        .into_iter()
        .map(|(mid, mut client, seen)| async move {
            let mut have = BTreeMap::new();
            let mut after = 0;
            loop {
                let req = PullRequest {
                    conv: CONV.into(),
                    after: Some(after),
                    limit: 100,
                    ..PullRequest::default()
                };
                let reply = client.request(&req, Duration::from_secs(30)).await.unwrap();
                assert_eq!(reply.code, Code::OK, "client {mid}: {reply:?}");
                for msg in &reply.msgs {
                    have.insert(msg.seq, msg.id.clone());
                }
                match reply.msgs.last() {
                    Some(msg) if msg.seq < reply.max_seq => after = msg.seq,
                    _ => break,
                }
            }
            assert_eq!(
                have.keys().copied().collect::<Vec<_>>(),
                (1..=last).collect::<Vec<_>>(),
                "client {mid}"
            );
            for (seq, (id, _)) in &seen.msgs {
                assert_eq!(
                    have.get(seq),
                    Some(id),
                    "client {mid}: pushed seq {seq} differs from the stored one"
                );
            }
        });
    futures::stream::iter(pulls)
        .buffer_unordered(250)
        .collect::<Vec<()>>()
        .await;
    println!(
        "every client's view complete after PULL in {:?}",
        pull_started.elapsed()
    );
    roles.stop();
}
