//! Failover of the PostgreSQL message store: a primary with a synchronous
//! streaming standby, both private servers of this test (rim-testkit, from
//! Debian's `postgresql` binaries, which deploy/test.sh installs), and a
//! store connected through the address list of both. Mid-run the primary
//! is lost (SIGKILL to every one of its processes) and the standby
//! promoted; the senders resend what was not acknowledged with the same
//! cmid. Nothing acknowledged may be lost, and no seq may be skipped or
//! given twice.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rim_im::{
    ConvId, Draft, Error, GroupSpec, IdGenerator, Message, MessageStore, Page, PostgresOptions,
    PostgresStore, Reader,
};
use rim_testkit::PostgresServer;

/// Bound on any one test step.
const STEP: Duration = Duration::from_secs(60);
/// The store timeout: short, so sends during the outage fail fast.
const STORE_TIMEOUT: Duration = Duration::from_secs(2);
/// Messages each sender sends.
const EACH: u64 = 300;
/// Acknowledged sends (of all senders) before the primary is lost.
const BEFORE_KILL: u64 = 200;
/// The longest one message may take to be acknowledged, resends included.
const PER_MESSAGE: Duration = Duration::from_secs(120);
/// The pause between two resends of one message.
const RESEND_PAUSE: Duration = Duration::from_millis(50);
/// The group's members; senders 5 and 6 write to it.
const MEMBERS: [i64; 6] = [1, 2, 3, 4, 5, 6];

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {STEP:?}: {what}"))
}

fn draft(conv: &ConvId, from: i64, cmid: &str) -> Draft {
    Draft::new(
        conv.clone(),
        from,
        cmid.to_owned(),
        0,
        format!("{from} says {cmid}"),
        4000,
    )
    .unwrap()
}

/// Every message of `conv`, oldest first, by pages of 100.
async fn history(store: &dyn MessageStore, conv: &ConvId) -> Vec<Message> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = within(
            "a history page",
            store.pull(conv, Reader::Business, Page::After(after), 100),
        )
        .await
        .unwrap();
        let Some(last) = page.messages.last() else {
            return all;
        };
        after = last.seq;
        all.extend(page.messages);
    }
}

/// Every inbox entry of `mid` as (sync, conv, seq), by pages of 200.
async fn inbox(store: &dyn MessageStore, mid: i64) -> Vec<(u64, ConvId, u64)> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = within("an inbox page", store.sync(mid, after, 200))
            .await
            .unwrap();
        all.extend(
            page.entries
                .iter()
                .map(|e| (e.sync, e.message.conv.clone(), e.message.seq)),
        );
        after = page.sync;
        if !page.more {
            return all;
        }
    }
}

fn assert_dense(seqs: impl IntoIterator<Item = u64>, n: u64, what: &str) {
    let seqs: Vec<u64> = seqs.into_iter().collect();
    assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "{what}");
}

/// What the senders share with the test.
#[derive(Default)]
struct Run {
    /// Sends acknowledged so far (duplicates included).
    acked: AtomicU64,
    /// Set once the standby was promoted.
    promoted: AtomicBool,
    /// Sends acknowledged after the promotion.
    acked_after_promote: AtomicU64,
    /// `Unavailable` answers the senders got (each followed by a resend).
    unavailable: AtomicU64,
    /// Resends answered `duplicate`: stored before, by a send whose answer
    /// was lost with the primary.
    duplicates: AtomicU64,
}

/// An acknowledged send: the message the store answered with.
type Acked = (String, Message);

/// Sends `EACH` messages from `from` to `conv`, each until acknowledged,
/// resending the same cmid after `Unavailable`.
async fn sender(
    store: Arc<PostgresStore>,
    run: Arc<Run>,
    conv: ConvId,
    from: i64,
    tag: &'static str,
) -> Vec<Acked> {
    let mut acked = Vec::new();
    for i in 0..EACH {
        let cmid = format!("{tag}-{i}");
        let deadline = Instant::now() + PER_MESSAGE;
        let sent = loop {
            match store.send(draft(&conv, from, &cmid)).await {
                Ok(sent) => break sent,
                Err(Error::Unavailable(failure)) => {
                    run.unavailable.fetch_add(1, Ordering::Relaxed);
                    assert!(
                        Instant::now() < deadline,
                        "{cmid} not acknowledged within {PER_MESSAGE:?}: {failure}"
                    );
                    tokio::time::sleep(RESEND_PAUSE).await;
                }
                Err(e) => panic!("{cmid}: {e:?}"),
            }
        };
        // Read before counting: an ack counted as after the promotion
        // came after it was set.
        let promoted = run.promoted.load(Ordering::SeqCst);
        run.acked.fetch_add(1, Ordering::SeqCst);
        if promoted {
            run.acked_after_promote.fetch_add(1, Ordering::SeqCst);
        }
        if sent.duplicate {
            run.duplicates.fetch_add(1, Ordering::Relaxed);
        }
        assert_eq!(
            (sent.message.from, sent.message.cmid.as_str()),
            (from, cmid.as_str())
        );
        acked.push((cmid, sent.message));
    }
    acked
}

/// Waits, bounded, until `ready`.
async fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + STEP;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Debian's postgresql server binaries: run deploy/test.sh"]
async fn acknowledged_messages_survive_losing_the_primary() {
    let started = Instant::now();
    let primary = tokio::task::block_in_place(PostgresServer::start_new);
    let standby = tokio::task::block_in_place(|| primary.start_sync_standby());
    // The standby first: every connection must skip it while it is read
    // only, and land on it once promoted.
    let url = format!(
        "postgres://rim@127.0.0.1:{},127.0.0.1:{}/rim?target_session_attrs=read-write",
        standby.port(),
        primary.port()
    );
    let node = 11;
    let options = PostgresOptions {
        timeout: STORE_TIMEOUT,
        exact_node: true,
        ..PostgresOptions::new(url.clone(), Arc::new(IdGenerator::new(node).unwrap()))
    };
    let store = Arc::new(
        within(
            "connecting through the address list",
            PostgresStore::connect(options),
        )
        .await
        .unwrap(),
    );
    let team = ConvId::group("team").unwrap();
    let spec = GroupSpec {
        name: "team".into(),
        max_members: 50,
        big: false,
    };
    within("creating the group", store.put_group(&team, spec))
        .await
        .unwrap();
    within("adding members", store.change_members(&team, &MEMBERS, &[]))
        .await
        .unwrap();
    let pair12 = ConvId::peer(1, 2).unwrap();
    let pair34 = ConvId::peer(3, 4).unwrap();

    let run = Arc::new(Run::default());
    let plan = [
        (pair12.clone(), 1, "a"),
        (pair34.clone(), 3, "b"),
        (team.clone(), 5, "c"),
        (team.clone(), 6, "d"),
    ];
    let senders: Vec<_> = plan
        .iter()
        .map(|(conv, from, tag)| {
            tokio::spawn(sender(store.clone(), run.clone(), conv.clone(), *from, tag))
        })
        .collect();

    wait_until("sends before the kill", || {
        run.acked.load(Ordering::SeqCst) >= BEFORE_KILL
    })
    .await;
    tokio::task::block_in_place(|| primary.kill());
    let acked_at_kill = run.acked.load(Ordering::SeqCst);
    println!(
        "primary killed at {acked_at_kill} acknowledged, {:?} in",
        started.elapsed()
    );

    // No host takes writes now: a send is refused, and stores nothing.
    let probe = draft(&pair12, 2, "probe");
    let asked = Instant::now();
    let refused = within("a send during the outage", store.send(probe.clone())).await;
    match refused {
        Err(Error::Unavailable(failure)) => println!(
            "a send with no primary, answered in {:?}: {failure}",
            asked.elapsed()
        ),
        other => panic!("a send with no primary: {other:?}"),
    }

    let promote_started = Instant::now();
    tokio::task::block_in_place(|| standby.promote());
    run.promoted.store(true, Ordering::SeqCst);
    println!(
        "standby promoted in {:?}, at {} acknowledged",
        promote_started.elapsed(),
        run.acked.load(Ordering::SeqCst)
    );
    // The probe was never stored: its resend stores it now.
    let deadline = Instant::now() + STEP;
    let probe_sent = loop {
        match store.send(probe.clone()).await {
            Ok(sent) => break sent,
            Err(Error::Unavailable(failure)) if Instant::now() < deadline => {
                let _ = failure;
                tokio::time::sleep(RESEND_PAUSE).await;
            }
            Err(e) => panic!("the probe after the promotion: {e:?}"),
        }
    };
    assert!(!probe_sent.duplicate, "the refused probe was stored");

    let mut acked: Vec<Acked> = Vec::new();
    for task in senders {
        acked.extend(within("a sender", task).await.unwrap());
    }
    acked.push(("probe".into(), probe_sent.message.clone()));
    let after_promote = run.acked_after_promote.load(Ordering::SeqCst);
    println!(
        "{} acknowledged ({acked_at_kill} before the kill, {after_promote} after the promotion), \
         {} unavailable answers resent, {} resends found stored, {:?} in all",
        acked.len(),
        run.unavailable.load(Ordering::Relaxed),
        run.duplicates.load(Ordering::Relaxed),
        started.elapsed()
    );
    assert!(
        acked_at_kill >= BEFORE_KILL,
        "sends acknowledged by the first primary"
    );
    assert!(
        after_promote > 0,
        "sends acknowledged by the promoted standby"
    );

    // Read back from the promoted server alone, by a store of its own.
    assert_eq!(standby.psql("SELECT pg_is_in_recovery()"), "f");
    let reader = within(
        "connecting to the promoted standby",
        PostgresStore::connect(PostgresOptions::new(
            standby.url(),
            Arc::new(IdGenerator::new(node + 1).unwrap()),
        )),
    )
    .await
    .unwrap();
    let mut stored: BTreeMap<ConvId, Vec<Message>> = BTreeMap::new();
    for conv in [&pair12, &pair34, &team] {
        let messages = history(&reader, conv).await;
        let n = messages.len() as u64;
        assert_dense(messages.iter().map(|m| m.seq), n, "a conversation's seqs");
        let keys: BTreeSet<(i64, &str)> =
            messages.iter().map(|m| (m.from, m.cmid.as_str())).collect();
        assert_eq!(keys.len(), messages.len(), "each cmid stored once");
        stored.insert(conv.clone(), messages);
    }
    // Every acknowledged message is there, as acknowledged; nothing else is.
    for (cmid, message) in &acked {
        let found = stored[&message.conv]
            .iter()
            .find(|m| m.from == message.from && &m.cmid == cmid);
        assert_eq!(found, Some(message), "acknowledged {cmid}");
    }
    let total: usize = stored.values().map(Vec::len).sum();
    assert_eq!(total, acked.len(), "only acknowledged messages are stored");
    let ids: BTreeSet<u64> = stored.values().flatten().map(|m| m.id.as_u64()).collect();
    assert_eq!(ids.len(), total, "message ids are unique");
    // Each member's inbox: dense, one entry per message of its
    // conversations, every one of those conversations' seqs once.
    for mid in MEMBERS {
        let entries = inbox(&reader, mid).await;
        assert_dense(
            entries.iter().map(|e| e.0),
            entries.len() as u64,
            "an inbox",
        );
        let mut per_conv: BTreeMap<ConvId, Vec<u64>> = BTreeMap::new();
        for (_, conv, seq) in entries {
            per_conv.entry(conv).or_default().push(seq);
        }
        let mut expected = vec![team.clone()];
        expected.extend(
            [&pair12, &pair34]
                .into_iter()
                .filter(|pair| pair.is_peer_of(mid))
                .cloned(),
        );
        expected.sort();
        assert_eq!(
            per_conv.keys().cloned().collect::<Vec<_>>(),
            expected,
            "the conversations in {mid}'s inbox"
        );
        for (conv, seqs) in per_conv {
            let n = stored[&conv].len() as u64;
            assert_dense(seqs, n, "a conversation seen from an inbox");
        }
    }
    // The failover store's message-id node is held on the promoted server.
    let holders = standby.psql(&format!(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
         AND objsubid = 2 AND objid = {node}"
    ));
    assert_eq!(holders, "1", "node {node} held on the promoted server");
    println!("failover test: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Debian's postgresql server binaries: run deploy/test.sh"]
async fn nothing_is_acknowledged_while_the_synchronous_standby_is_down() {
    let primary = tokio::task::block_in_place(PostgresServer::start_new);
    let standby = tokio::task::block_in_place(|| primary.start_sync_standby());
    let options = PostgresOptions {
        timeout: STORE_TIMEOUT,
        ..PostgresOptions::new(primary.url(), Arc::new(IdGenerator::new(21).unwrap()))
    };
    let store = within("connecting", PostgresStore::connect(options))
        .await
        .unwrap();
    let pair = ConvId::peer(1, 2).unwrap();
    let first = within("a send", store.send(draft(&pair, 1, "before")))
        .await
        .unwrap();
    assert_eq!(first.message.seq, 1);

    tokio::task::block_in_place(|| standby.stop_immediate());
    // The commit waits for the standby, so the send is not acknowledged.
    let waiting = within(
        "a send without the standby",
        store.send(draft(&pair, 1, "waiting")),
    )
    .await;
    assert!(
        matches!(waiting, Err(Error::Unavailable(_))),
        "a send while the synchronous standby is down: {waiting:?}"
    );
    assert_ne!(
        primary.psql("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'"),
        "0",
        "its commit waits in the primary for the standby"
    );

    tokio::task::block_in_place(|| {
        standby.start_again();
        primary.wait_sync(&standby);
    });
    // With the standby back the waiting commit completes: the resend
    // with the same cmid finds it, with the seq it was given.
    let deadline = Instant::now() + STEP;
    let resent = loop {
        match store.send(draft(&pair, 1, "waiting")).await {
            Ok(sent) => break sent,
            Err(Error::Unavailable(failure)) if Instant::now() < deadline => {
                let _ = failure;
                tokio::time::sleep(RESEND_PAUSE).await;
            }
            Err(e) => panic!("the resend with the standby back: {e:?}"),
        }
    };
    assert!(resent.duplicate, "the waiting commit completed");
    assert_eq!(resent.message.seq, 2);
    let stored = history(&store, &pair).await;
    assert_dense(stored.iter().map(|m| m.seq), 2, "the pair's seqs");
}
