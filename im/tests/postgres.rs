//! The PostgreSQL message store against a real server (deploy/test.sh runs
//! one and sets RIM_TEST_POSTGRES): the behaviour suite, and what only
//! PostgreSQL has (several stores on one database, migrations, lost
//! connections). Each test works in a schema of its own, created here and
//! dropped at its end.

mod suite;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use rim_im::{
    ConvId, Draft, Error, GroupSpec, IdGenerator, MessageStore, Page, PostgresOptions,
    PostgresStore, Reader, ShardMap, ShardedStore,
};
use suite::Backend;

/// Bound on any one test step that talks to the server.
const STEP: Duration = Duration::from_secs(60);

fn base_url() -> String {
    match std::env::var("RIM_TEST_POSTGRES") {
        Ok(url) if !url.trim().is_empty() => url.trim().to_owned(),
        _ => panic!("RIM_TEST_POSTGRES is not set: run deploy/test.sh"),
    }
}

/// A node number per store, so two stores of one test never issue one id.
fn next_node() -> u16 {
    static NODE: AtomicU16 = AtomicU16::new(1);
    NODE.fetch_add(1, Ordering::Relaxed) % 1000
}

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {STEP:?}: {what}"))
}

/// A schema of the test database for one test.
struct Schema {
    name: String,
    url: String,
    admin: tokio_postgres::Client,
}

/// The second primary deploy/test.sh starts (RIM_TEST_POSTGRES_2), for the
/// sharded store; without it, the sharded tests put both primaries on the
/// first server (still two databases' worth of schemas, one server).
fn second_url() -> String {
    match std::env::var("RIM_TEST_POSTGRES_2") {
        Ok(url) if !url.trim().is_empty() => url.trim().to_owned(),
        _ => base_url(),
    }
}

impl Schema {
    async fn new() -> Schema {
        Schema::on(base_url()).await
    }

    /// A schema on the server of `base`.
    async fn on(base: String) -> Schema {
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let name = format!(
            "rim_t_{}_{}_{}",
            std::process::id(),
            nanos % 1_000_000_000,
            COUNT.fetch_add(1, Ordering::Relaxed)
        );
        let admin = session(&base).await;
        admin
            .batch_execute(&format!("CREATE SCHEMA {name}"))
            .await
            .unwrap();
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}options=-csearch_path%3D{name}");
        Schema { name, url, admin }
    }

    fn options(&self) -> PostgresOptions {
        PostgresOptions::new(
            self.url.clone(),
            Arc::new(IdGenerator::new(next_node()).unwrap()),
        )
    }

    async fn store(&self) -> PostgresStore {
        within("connecting a store", PostgresStore::connect(self.options()))
            .await
            .unwrap()
    }

    /// A plain session in this schema.
    async fn session(&self) -> tokio_postgres::Client {
        session(&self.url).await
    }

    async fn remove(self) {
        self.admin
            .batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name))
            .await
            .unwrap();
    }
}

async fn session(url: &str) -> tokio_postgres::Client {
    let (client, connection) = within(
        "connecting to RIM_TEST_POSTGRES",
        tokio_postgres::connect(url, tokio_postgres::NoTls),
    )
    .await
    .unwrap_or_else(|e| panic!("cannot connect to PostgreSQL at RIM_TEST_POSTGRES={url}: {e}"));
    tokio::spawn(connection);
    client
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

fn group(gid: &str) -> ConvId {
    ConvId::group(gid).unwrap()
}

/// Every message of `conv`, oldest first, by pages of 100.
async fn history(store: &dyn MessageStore, conv: &ConvId) -> Vec<rim_im::Message> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = store
            .pull(conv, Reader::Business, Page::After(after), 100)
            .await
            .unwrap();
        let Some(last) = page.messages.last() else {
            return all;
        };
        after = last.seq;
        all.extend(page.messages);
    }
}

/// Every inbox entry of `mid`, by pages of 200.
async fn inbox(store: &dyn MessageStore, mid: i64) -> Vec<(u64, ConvId, u64)> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = store.sync(mid, after, 200).await.unwrap();
        all.extend(
            page.entries
                .iter()
                .map(|e| (e.sync, e.message.conv.clone(), e.message.seq)),
        );
        assert_eq!(page.sync, all.last().map_or(after, |e| e.0));
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

/// A group `gid` with members `mids`.
async fn make_group(store: &dyn MessageStore, gid: &str, mids: &[i64]) -> ConvId {
    let conv = group(gid);
    let spec = GroupSpec {
        name: gid.into(),
        max_members: 500,
        big: false,
    };
    assert!(store.put_group(&conv, spec).await.unwrap().created);
    store.change_members(&conv, mids, &[]).await.unwrap();
    conv
}

/// The store timeout of the suite's stores: short, so that the blocked
/// writes case fails fast, yet far above what a batch waits for another's
/// row locks on a busy machine.
const SUITE_TIMEOUT: Duration = Duration::from_secs(1);

/// The suite's backend: stores on one schema of their own.
struct Postgres {
    schema: Schema,
}

impl Postgres {
    async fn new() -> Postgres {
        Postgres {
            schema: Schema::new().await,
        }
    }

    async fn connect(&self) -> Arc<dyn MessageStore> {
        let mut options = self.schema.options();
        options.timeout = SUITE_TIMEOUT;
        Arc::new(
            within("connecting a store", PostgresStore::connect(options))
                .await
                .unwrap(),
        )
    }
}

#[async_trait]
impl Backend for Postgres {
    async fn open(&self) -> Arc<dyn MessageStore> {
        self.connect().await
    }

    async fn reopen(&self) -> Arc<dyn MessageStore> {
        self.connect().await
    }

    async fn block_writes(&self) -> Box<dyn Send> {
        // EXCLUSIVE lets reads through and holds every write (row locks
        // included) until the session ends with the guard.
        let session = self.schema.session().await;
        session
            .batch_execute(
                "BEGIN; LOCK TABLE convs, groups, members, messages, users, inbox IN EXCLUSIVE MODE",
            )
            .await
            .unwrap();
        Box::new(session)
    }
}

/// The suite's backend sharded: two primaries (a schema on each of the two
/// servers deploy/test.sh starts), buckets split evenly, so most
/// conversations have members whose inbox is on the other primary.
struct Sharded {
    schemas: [Schema; 2],
}

impl Sharded {
    async fn new() -> Sharded {
        Sharded {
            schemas: [Schema::new().await, Schema::on(second_url()).await],
        }
    }

    async fn connect(&self) -> Arc<dyn MessageStore> {
        let ids = Arc::new(IdGenerator::new(next_node()).unwrap());
        let primaries = self
            .schemas
            .iter()
            .map(|schema| {
                let mut options = PostgresOptions::new(schema.url.clone(), Arc::clone(&ids));
                options.timeout = SUITE_TIMEOUT;
                options
            })
            .collect();
        let store = ShardedStore::connect(primaries, ShardMap::even(2).unwrap());
        Arc::new(within("connecting a sharded store", store).await.unwrap())
    }

    async fn remove(self) {
        for schema in self.schemas {
            schema.remove().await;
        }
    }
}

#[async_trait]
impl Backend for Sharded {
    fn inbox_follows_seq(&self) -> bool {
        false
    }

    async fn open(&self) -> Arc<dyn MessageStore> {
        self.connect().await
    }

    async fn reopen(&self) -> Arc<dyn MessageStore> {
        self.connect().await
    }

    async fn block_writes(&self) -> Box<dyn Send> {
        let mut sessions = Vec::new();
        for schema in &self.schemas {
            let session = schema.session().await;
            session
                .batch_execute(
                    "BEGIN; LOCK TABLE convs, groups, members, messages, users, inbox IN EXCLUSIVE MODE",
                )
                .await
                .unwrap();
            sessions.push(session);
        }
        Box::new(sessions)
    }
}

/// Each suite case twice: on one primary, and (in `sharded`) on two.
macro_rules! suite_cases {
    ($($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            #[ignore = "needs PostgreSQL: run deploy/test.sh"]
            async fn $case() {
                let backend = Postgres::new().await;
                suite::$case(&backend).await;
                backend.schema.remove().await;
            }
        )*
        mod sharded {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                #[ignore = "needs PostgreSQL: run deploy/test.sh"]
                async fn $case() {
                    let backend = Sharded::new().await;
                    suite::$case(&backend).await;
                    backend.remove().await;
                }
            )*
        }
    };
}

suite_cases!(
    seq_is_dense_under_concurrent_senders,
    dedup_holds_under_concurrent_resends,
    inbox_sync_is_dense_per_user,
    retention_cap_keeps_the_newest_and_reads_below_say_reset,
    retention_by_age_removes_what_is_older,
    history_pages_both_ways_with_clamps,
    read_position_is_monotonic,
    conversations_list_most_recent_first,
    membership_add_remove_and_limits,
    a_store_error_is_code_5_and_stores_nothing,
    acknowledged_writes_survive_a_reopen,
    big_group_sends_write_no_inbox_entries,
    big_group_dedup_refusals_reads_and_members,
    big_mode_is_sticky_and_big_groups_lists_a_users,
    mixed_batches_give_each_conversation_its_inbox_entries,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs PostgreSQL: run deploy/test.sh"]
async fn concurrent_sends_share_commits() {
    let backend = Postgres::new().await;
    let commits = suite::concurrent_sends_share_commits(&backend).await;
    eprintln!("postgres: 1000 concurrent sends (50 senders x 20) took {commits} commits");
    backend.schema.remove().await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL: run deploy/test.sh"]
async fn sends_reads_and_groups_work_as_the_trait_says() {
    let schema = Schema::new().await;
    let store = schema.store().await;

    // A 1:1 conversation: both users become members on its first message.
    let pair = ConvId::peer(1, 2).unwrap();
    let first = store.send(draft(&pair, 1, "a")).await.unwrap();
    assert!(!first.duplicate);
    assert_eq!(first.message.seq, 1);
    assert_eq!(first.message.ts, first.message.id.unix_ms() as i64);
    let entries: Vec<(i64, u64)> = first.inbox.iter().map(|e| (e.mid, e.sync)).collect();
    assert_eq!(entries, [(1, 1), (2, 1)]);
    let again = store.send(draft(&pair, 1, "a")).await.unwrap();
    assert!(again.duplicate && again.inbox.is_empty());
    assert_eq!(again.message, first.message);
    let second = store.send(draft(&pair, 2, "a")).await.unwrap();
    assert_eq!((second.message.seq, second.duplicate), (2, false));

    // A user talking to themselves has one inbox entry per message.
    let me = ConvId::peer(7, 7).unwrap();
    let own = store.send(draft(&me, 7, "x")).await.unwrap();
    assert_eq!(own.inbox.len(), 1);

    // Read positions: the sender's moved with its send; monotonic, capped.
    let pos = store.read(&pair, 2, 1).await.unwrap();
    assert_eq!((pos.read_seq, pos.max_seq, pos.advanced), (2, 2, false));
    let pos = store.read(&pair, 1, 99).await.unwrap();
    assert_eq!((pos.read_seq, pos.advanced), (2, true));
    assert!(matches!(
        store.read(&pair, 3, 1).await,
        Err(Error::NotMember { mid: 3, .. })
    ));
    assert!(matches!(
        store.read(&pair, 1, u64::MAX).await,
        Err(Error::Invalid { .. })
    ));

    // History in both directions, clamped limits.
    for i in 3..=10 {
        store.send(draft(&pair, 1, &format!("m{i}"))).await.unwrap();
    }
    let latest = store
        .pull(&pair, Reader::Member(2), Page::Latest, 3)
        .await
        .unwrap();
    let seqs: Vec<u64> = latest.messages.iter().map(|m| m.seq).collect();
    assert_eq!(
        (seqs, latest.max_seq, latest.min_seq),
        (vec![10, 9, 8], 10, 1)
    );
    let before = store
        .pull(&pair, Reader::Member(1), Page::Before(3), 0)
        .await
        .unwrap();
    assert_eq!(
        before.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        [2, 1]
    );
    let after = store
        .pull(&pair, Reader::Business, Page::After(8), 500)
        .await
        .unwrap();
    assert_eq!(
        after.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        [9, 10]
    );
    assert!(matches!(
        store.pull(&pair, Reader::Member(5), Page::Latest, 1).await,
        Err(Error::NotMember { .. })
    ));
    assert!(matches!(
        store
            .pull(&pair, Reader::Business, Page::Before(u64::MAX), 1)
            .await,
        Err(Error::Invalid {
            field: "before",
            ..
        })
    ));
    // A pair without messages: an empty page for its users, nothing to read.
    let quiet = ConvId::peer(8, 9).unwrap();
    for reader in [Reader::Business, Reader::Member(9)] {
        let empty = store.pull(&quiet, reader, Page::Latest, 10).await.unwrap();
        assert_eq!((empty.messages.len(), empty.max_seq), (0, 0));
    }
    let pos = store.read(&quiet, 8, 5).await.unwrap();
    assert_eq!((pos.read_seq, pos.max_seq, pos.advanced), (0, 0, false));
    assert!(matches!(
        store.read(&quiet, 10, 5).await,
        Err(Error::NotMember { .. })
    ));

    // Sync pages: dense, `more`, and a cursor past the end capped.
    let page = store.sync(2, 0, 4).await.unwrap();
    assert_eq!(
        page.entries.iter().map(|e| e.sync).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert!(page.more && page.sync == 4);
    let tail = store.sync(2, 4, 0).await.unwrap();
    assert_eq!((tail.entries.len(), tail.sync, tail.more), (6, 10, false));
    let past = store.sync(2, 50, 10).await.unwrap();
    assert_eq!((past.entries.len(), past.sync, past.more), (0, 10, false));
    assert_eq!(store.sync(404, 3, 10).await.unwrap().sync, 0);

    // Groups: create, update, members, refusals.
    let team = group("team");
    let spec = GroupSpec {
        name: "Team".into(),
        max_members: 3,
        big: false,
    };
    let made = store.put_group(&team, spec.clone()).await.unwrap();
    assert!(made.created && made.members == 0);
    let renamed = store
        .put_group(
            &team,
            GroupSpec {
                name: "The team".into(),
                ..spec
            },
        )
        .await
        .unwrap();
    assert!(!renamed.created && renamed.name == "The team");
    assert!(matches!(
        store.send(draft(&team, 1, "g1")).await,
        Err(Error::NotMember { mid: 1, .. })
    ));
    let changed = store
        .change_members(&team, &[3, 1, 2, 1], &[])
        .await
        .unwrap();
    assert_eq!((changed.added, changed.members), (vec![1, 2, 3], 3));
    assert!(matches!(
        store.change_members(&team, &[4], &[]).await,
        Err(Error::GroupFull {
            members: 4,
            limit: 3,
            ..
        })
    ));
    let sent = store.send(draft(&team, 1, "g1")).await.unwrap();
    assert_eq!(sent.message.seq, 1);
    assert_eq!(
        sent.inbox.iter().map(|e| e.mid).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    // Removals first, then additions; a mid in both stays, untouched.
    let changed = store.change_members(&team, &[4, 2], &[2, 3]).await.unwrap();
    assert_eq!(
        (changed.added, changed.removed, changed.members),
        (vec![4], vec![3], 3)
    );
    let pos = store.read(&team, 4, 0).await.unwrap();
    assert_eq!(
        pos.read_seq, 1,
        "a new member starts at the group's max_seq"
    );
    let page = store.members(&team, None, 2).await.unwrap();
    assert_eq!((page.mids, page.next), (vec![1, 2], Some(2)));
    let page = store.members(&team, Some(2), 2).await.unwrap();
    assert_eq!((page.mids, page.next), (vec![4], None));
    assert_eq!(store.group(&team).await.unwrap().members, 3);
    let nowhere = group("nowhere");
    assert!(matches!(
        store.group(&nowhere).await,
        Err(Error::NoSuchGroup { .. })
    ));
    assert!(matches!(
        store.change_members(&nowhere, &[1], &[]).await,
        Err(Error::NoSuchGroup { .. })
    ));
    assert!(matches!(
        store.send(draft(&nowhere, 1, "x").system()).await,
        Err(Error::NoSuchGroup { .. })
    ));
    assert!(matches!(
        store.send(draft(&nowhere, 1, "x")).await,
        Err(Error::NotMember { .. })
    ));
    // A system sender that is not a member gets no inbox entry.
    let system = store.send(draft(&team, 900, "sys").system()).await.unwrap();
    assert_eq!(
        system.inbox.iter().map(|e| e.mid).collect::<Vec<_>>(),
        [1, 2, 4]
    );

    // Conversation lists: most recent first, unread counts.
    let list = store.conversations(2, 0).await.unwrap();
    let convs: Vec<String> = list.iter().map(|s| s.conv.to_string()).collect();
    assert_eq!(convs, ["g:team", "p:1:2"]);
    assert_eq!(
        (list[0].max_seq, list[0].read_seq, list[0].unread),
        (2, 0, 2)
    );
    assert_eq!(list[0].last.as_ref().unwrap().cmid, "sys");
    assert_eq!(list[1].unread, 8);

    assert!(store.commits() > 0);
    drop(store);
    schema.remove().await;
}

/// 50 senders, 20 messages each, to one group through `stores`: seq 1..1000
/// without a hole, every member's inbox 1..1000, fewer commits than sends.
async fn fifty_senders(stores: Vec<Arc<PostgresStore>>, label: &str) {
    const SENDERS: i64 = 50;
    const EACH: usize = 20;
    let conv = make_group(&*stores[0], "hot", &(1..=SENDERS).collect::<Vec<_>>()).await;
    let before: u64 = stores.iter().map(|s| s.commits()).sum();
    let mut tasks = Vec::new();
    for sender in 1..=SENDERS {
        let store = stores[sender as usize % stores.len()].clone();
        let conv = conv.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..EACH {
                let sent = store
                    .send(draft(&conv, sender, &format!("c{i}")))
                    .await
                    .unwrap();
                assert!(!sent.duplicate);
                assert_eq!(sent.inbox.len(), SENDERS as usize);
                seqs.push(sent.message.seq);
            }
            seqs
        }));
    }
    let mut seqs = BTreeSet::new();
    for task in tasks {
        for seq in within("a sender", task).await.unwrap() {
            assert!(seqs.insert(seq), "seq {seq} given twice");
        }
    }
    let n = SENDERS as u64 * EACH as u64;
    assert_dense(seqs, n, "the seqs acknowledged");
    let stored = history(&*stores[0], &conv).await;
    assert_dense(stored.iter().map(|m| m.seq), n, "the seqs stored");
    for mid in [1, 25, 50] {
        let entries = inbox(&*stores[stores.len() - 1], mid).await;
        assert_dense(entries.iter().map(|e| e.0), n, "an inbox");
        assert!(
            entries.windows(2).all(|w| w[0].2 < w[1].2),
            "inbox in seq order"
        );
    }
    let commits: u64 = stores.iter().map(|s| s.commits()).sum::<u64>() - before;
    println!("{label}: {n} sends in {commits} commits");
    assert!(commits < n, "group commit: {commits} commits for {n} sends");
}

#[tokio::test]
#[ignore = "needs PostgreSQL: run deploy/test.sh"]
async fn two_stores_on_one_database_keep_seq_dense() {
    let schema = Schema::new().await;
    let a = Arc::new(schema.store().await);
    let b = Arc::new(schema.store().await);
    fifty_senders(vec![a, b], "two stores").await;
    schema.remove().await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL: run deploy/test.sh"]
async fn concurrent_resends_store_one_message() {
    let schema = Schema::new().await;
    let stores = [
        Arc::new(schema.store().await),
        Arc::new(schema.store().await),
    ];
    let pair = ConvId::peer(3, 4).unwrap();
    let team = make_group(&*stores[0], "resend", &[3, 4, 5]).await;
    for conv in [pair, team] {
        let mut tasks = Vec::new();
        for i in 0..40 {
            let store = stores[i % 2].clone();
            let conv = conv.clone();
            tasks.push(tokio::spawn(async move {
                store.send(draft(&conv, 3, "same")).await.unwrap()
            }));
        }
        let mut sents = Vec::new();
        for task in tasks {
            sents.push(within("a resend", task).await.unwrap());
        }
        let firsts: Vec<_> = sents.iter().filter(|s| !s.duplicate).collect();
        assert_eq!(
            firsts.len(),
            1,
            "one send stores, the others are duplicates"
        );
        for sent in &sents {
            assert_eq!(sent.message, firsts[0].message);
        }
        assert_eq!(history(&*stores[0], &conv).await.len(), 1);
    }
    // One entry per message in each inbox.
    assert_eq!(inbox(&*stores[1], 3).await.len(), 2);
    assert_eq!(inbox(&*stores[1], 5).await.len(), 1);
    schema.remove().await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL: run deploy/test.sh"]
async fn inboxes_stay_dense_under_crossing_traffic() {
    // 12 users, every pair talking at once and two groups, from two stores:
    // batches lock overlapping sets of conversations and inboxes.
    const USERS: i64 = 12;
    let schema = Schema::new().await;
    let stores = [
        Arc::new(schema.store().await),
        Arc::new(schema.store().await),
    ];
    let odd = make_group(&*stores[0], "odd", &[1, 3, 5, 7, 9, 11]).await;
    let all = make_group(&*stores[1], "all", &(1..=USERS).collect::<Vec<_>>()).await;
    let before = stores[0].commits() + stores[1].commits();
    let mut tasks = Vec::new();
    for from in 1..=USERS {
        let store = stores[from as usize % 2].clone();
        let (odd, all) = (odd.clone(), all.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            for round in 0..3 {
                for to in (1..=USERS).rev() {
                    let conv = ConvId::peer(from, to).unwrap();
                    store
                        .send(draft(&conv, from, &format!("{round}-{to}")))
                        .await
                        .unwrap();
                    n += 1;
                }
                store
                    .send(draft(&all, from, &format!("all-{round}")))
                    .await
                    .unwrap();
                if from % 2 == 1 {
                    store
                        .send(draft(&odd, from, &format!("odd-{round}")))
                        .await
                        .unwrap();
                    n += 1;
                }
                n += 1;
            }
            n
        }));
    }
    let mut sends = 0;
    for task in tasks {
        sends += within("a sender", task).await.unwrap();
    }
    let commits = stores[0].commits() + stores[1].commits() - before;
    println!("crossing traffic, two stores: {sends} sends in {commits} commits");
    assert!(commits < sends);
    // Each user's inbox is dense and holds exactly the messages that
    // concern them, each once.
    for mid in 1..=USERS {
        let entries = inbox(&*stores[mid as usize % 2], mid).await;
        assert_dense(
            entries.iter().map(|e| e.0),
            entries.len() as u64,
            "an inbox",
        );
        let mut per_conv: BTreeMap<ConvId, Vec<u64>> = BTreeMap::new();
        for (_, conv, seq) in &entries {
            per_conv.entry(conv.clone()).or_default().push(*seq);
        }
        for (conv, seqs) in &per_conv {
            let max = history(&*stores[0], conv).await.len() as u64;
            assert_dense(
                seqs.iter().copied(),
                max,
                "a conversation seen from an inbox",
            );
        }
        let expected_convs = USERS as usize + 1 + usize::from(mid % 2 == 1);
        assert_eq!(per_conv.len(), expected_convs, "the conversations of {mid}");
    }
    let pair = history(&*stores[0], &ConvId::peer(2, 5).unwrap()).await;
    assert_eq!(pair.len(), 6, "3 rounds from each side");
    let me = history(&*stores[0], &ConvId::peer(4, 4).unwrap()).await;
    assert_eq!(me.len(), 3);
    schema.remove().await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL: run deploy/test.sh"]
async fn a_newer_schema_is_refused() {
    let schema = Schema::new().await;
    drop(schema.store().await);
    let session = schema.session().await;
    session
        .batch_execute("INSERT INTO rim_im_schema (version) VALUES (99)")
        .await
        .unwrap();
    let err = match within("connecting", PostgresStore::connect(schema.options())).await {
        Ok(_) => panic!("a store opened a database of schema version 99"),
        Err(e) => e,
    };
    let text = err.to_string();
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    assert!(text.contains("99") && text.contains("version 4"), "{text}");
    schema.remove().await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL: run deploy/test.sh"]
async fn a_version_2_database_gets_big_groups_and_keeps_its_groups_small() {
    let schema = Schema::new().await;
    let team = make_group(&schema.store().await, "team", &[1, 2]).await;
    {
        let store = schema.store().await;
        store.send(draft(&team, 1, "a")).await.unwrap();
    }
    // Back to what version 2 wrote.
    let session = schema.session().await;
    session
        .batch_execute(
            "DROP INDEX members_groups_by_mid; ALTER TABLE groups DROP COLUMN big; \
             DROP TABLE inbox_outbox, inbox_remote; \
             DELETE FROM rim_im_schema WHERE version >= 3",
        )
        .await
        .unwrap();
    let store = schema.store().await;
    let versions: Vec<i32> = session
        .query("SELECT version FROM rim_im_schema ORDER BY version", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(versions, [1, 2, 3, 4]);
    let stored = store.group(&team).await.unwrap();
    assert_eq!((stored.members, stored.big), (2, false));
    assert!(store.big_groups(1, 0).await.unwrap().is_empty());
    assert_eq!(inbox(&store, 2).await.len(), 1);
    let sent = store.send(draft(&team, 2, "b")).await.unwrap();
    assert_eq!(
        (sent.message.seq, sent.big, sent.inbox.len()),
        (2, false, 2)
    );
    // The index built over the rows that were there finds them.
    let spec = GroupSpec {
        name: "team".into(),
        max_members: 10_000,
        big: true,
    };
    assert!(store.put_group(&team, spec).await.unwrap().big);
    assert_eq!(store.big_groups(2, 0).await.unwrap(), vec![team.clone()]);
    let sent = store.send(draft(&team, 1, "c")).await.unwrap();
    assert_eq!((sent.message.seq, sent.big, sent.inbox.len()), (3, true, 0));
    drop(store);
    schema.remove().await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL: run deploy/test.sh"]
async fn four_stores_migrate_one_database_at_once() {
    let schema = Schema::new().await;
    let mut connects = Vec::new();
    for _ in 0..4 {
        let options = schema.options();
        connects.push(tokio::spawn(PostgresStore::connect(options)));
    }
    let mut stores = Vec::new();
    for connect in connects {
        stores.push(within("a store migrating", connect).await.unwrap().unwrap());
    }
    let session = schema.session().await;
    let versions: Vec<i32> = session
        .query("SELECT version FROM rim_im_schema ORDER BY version", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(versions, [1, 2, 3, 4], "each version applied once");
    // And they all work.
    let conv = ConvId::peer(1, 2).unwrap();
    for (i, store) in stores.iter().enumerate() {
        let sent = store.send(draft(&conv, 1, &format!("c{i}"))).await.unwrap();
        assert_eq!(sent.message.seq, i as u64 + 1);
    }
    schema.remove().await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL: run deploy/test.sh"]
async fn a_write_blocked_past_the_timeout_is_unavailable_and_stores_nothing() {
    let schema = Schema::new().await;
    let mut options = schema.options();
    options.timeout = Duration::from_millis(300);
    let store = within("connecting", PostgresStore::connect(options))
        .await
        .unwrap();
    let pair = ConvId::peer(1, 2).unwrap();
    store.send(draft(&pair, 1, "before")).await.unwrap();

    let mut blocker = schema.session().await;
    let lock = blocker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let blocked = within("a blocked send", store.send(draft(&pair, 2, "blocked"))).await;
    let err = blocked.expect_err("a send went through a locked table");
    eprintln!("blocked send: {err:?}");
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    assert_eq!(err.code(), rim_im::Code::Unavailable);
    lock.rollback().await.unwrap();

    // Nothing of it was stored: no message, no seq, no inbox entry.
    let page = store
        .pull(&pair, Reader::Business, Page::Latest, 10)
        .await
        .unwrap();
    assert_eq!((page.max_seq, page.messages.len()), (1, 1));
    assert_eq!(store.sync(2, 0, 10).await.unwrap().entries.len(), 1);
    // The same cmid goes through once the table is free, with the next seq.
    let sent = store.send(draft(&pair, 2, "blocked")).await.unwrap();
    assert_eq!((sent.message.seq, sent.duplicate), (2, false));
    schema.remove().await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL: run deploy/test.sh"]
async fn refusals_do_not_fail_the_other_sends_of_their_batch() {
    let schema = Schema::new().await;
    let store = Arc::new(schema.store().await);
    let conv = make_group(&*store, "club", &(1..=20).collect::<Vec<_>>()).await;
    // Members, outsiders, a resend and a body PostgreSQL cannot store, all
    // at once so that they share batches.
    let mut tasks = Vec::new();
    for from in 1..=40i64 {
        let store = store.clone();
        let conv = conv.clone();
        tasks.push(tokio::spawn(async move {
            let mut d = draft(&conv, from.min(30), &format!("c{from}"));
            if from == 35 {
                d.body = "nul \0 inside".into();
            }
            if from > 30 {
                d.cmid = "c1".into();
                d.from = 1;
            }
            (from, store.send(d).await)
        }));
    }
    let mut stored = BTreeSet::new();
    for task in tasks {
        let (from, outcome) = within("a send", task).await.unwrap();
        match from {
            1..=20 => {
                let sent = outcome.unwrap();
                assert!(!sent.duplicate);
                stored.insert(sent.message.seq);
            }
            21..=30 => assert!(
                matches!(outcome, Err(Error::NotMember { .. })),
                "{outcome:?}"
            ),
            35 => assert!(matches!(outcome, Err(Error::Invalid { field: "body", .. }))),
            _ => assert!(outcome.unwrap().duplicate, "a resend of c1"),
        }
    }
    assert_dense(stored, 20, "the members' sends");
    assert_eq!(history(&*store, &conv).await.len(), 20);
    schema.remove().await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL: run deploy/test.sh"]
async fn sends_go_on_after_the_server_drops_every_connection() {
    let schema = Schema::new().await;
    let app = format!("{}_app", schema.name);
    let mut options = schema.options();
    options.url = format!("{}&application_name={app}", schema.url);
    let store = Arc::new(
        within("connecting", PostgresStore::connect(options))
            .await
            .unwrap(),
    );
    let pair = ConvId::peer(1, 2).unwrap();
    // Warm several pooled connections.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (store, pair) = (store.clone(), pair.clone());
        tasks.push(tokio::spawn(async move {
            store
                .send(draft(&pair, 1, &format!("warm{i}")))
                .await
                .unwrap()
        }));
    }
    for task in tasks {
        within("a send", task).await.unwrap();
    }
    let killed: i64 = schema
        .admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .await
        .unwrap()
        .get(0);
    assert!(killed > 0, "the store's connections were found");
    // Every send after it lands: a dead connection is replaced, a batch
    // that met one before its commit runs again on another.
    for i in 0..10 {
        let sent = within("a send", store.send(draft(&pair, 2, &format!("after{i}"))))
            .await
            .unwrap_or_else(|e| panic!("send {i} after the connections dropped: {e:?}"));
        assert_eq!(sent.message.seq, 21 + i);
    }
    schema.remove().await;
}

/// Options for a store in `schema` issuing ids from `node`.
fn node_options(schema: &Schema, node: u16, exact: bool) -> PostgresOptions {
    PostgresOptions {
        exact_node: exact,
        ..PostgresOptions::new(
            schema.url.clone(),
            Arc::new(IdGenerator::new(node).unwrap()),
        )
    }
}

#[tokio::test]
#[ignore = "needs PostgreSQL: run deploy/test.sh"]
async fn stores_on_one_database_issue_ids_from_distinct_nodes() {
    let schema = Schema::new().await;
    let node = next_node();
    let pair = ConvId::peer(1, 2).unwrap();
    let a = within(
        "store a",
        PostgresStore::connect(node_options(&schema, node, false)),
    )
    .await
    .unwrap();
    // The same derived node: b takes the next free one.
    let b = within(
        "store b",
        PostgresStore::connect(node_options(&schema, node, false)),
    )
    .await
    .unwrap();
    let from_a = a.send(draft(&pair, 1, "a")).await.unwrap().message;
    let from_b = b.send(draft(&pair, 2, "b")).await.unwrap().message;
    assert_eq!(from_a.id.node(), node);
    assert_eq!(from_b.id.node(), node + 1);
    // A configured node another store holds is refused, naming it.
    let refused = within(
        "store c",
        PostgresStore::connect(node_options(&schema, node, true)),
    )
    .await
    .err()
    .expect("node held by store a");
    assert!(
        refused.to_string().contains(&format!("node {node}")),
        "{refused}"
    );
    // Dropping a store lets its node go.
    drop(a);
    let deadline = tokio::time::Instant::now() + STEP;
    let c = loop {
        match PostgresStore::connect(node_options(&schema, node, true)).await {
            Ok(store) => break store,
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("node {node} still held after store a was dropped: {e}"),
        }
    };
    let from_c = c.send(draft(&pair, 1, "c")).await.unwrap().message;
    assert_eq!(from_c.id.node(), node);
    assert!(from_c.id > from_a.id && from_c.seq == 3);
    drop((b, c));
    schema.remove().await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL: run deploy/test.sh"]
async fn a_store_takes_its_id_node_back_when_its_holding_connection_is_lost() {
    let schema = Schema::new().await;
    let node = next_node();
    let pair = ConvId::peer(1, 2).unwrap();
    let store = within(
        "a store",
        PostgresStore::connect(node_options(&schema, node, true)),
    )
    .await
    .unwrap();
    store.send(draft(&pair, 1, "before")).await.unwrap();
    // The session holding the node's advisory lock (key 1 is the schema's
    // hash, as an unsigned oid; key 2 the node).
    let holder = "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 \
                  AND objid = $1::int8 AND granted \
                  AND classid::int8 = (hashtext('rim_im_node ' || $2::text)::int8 + 4294967296) % 4294967296";
    let pid: i32 = schema
        .admin
        .query_one(holder, &[&i64::from(node), &schema.name])
        .await
        .unwrap()
        .get(0);
    schema
        .admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    // Sends wait for the node to be held again (well within the store
    // timeout), on a new session, and go on with it.
    for i in 0..5 {
        let sent = within("a send", store.send(draft(&pair, 2, &format!("after{i}"))))
            .await
            .unwrap_or_else(|e| panic!("send {i} after the holder was lost: {e:?}"));
        assert_eq!((sent.message.seq, sent.message.id.node()), (2 + i, node));
    }
    let again: i32 = schema
        .admin
        .query_one(holder, &[&i64::from(node), &schema.name])
        .await
        .unwrap()
        .get(0);
    assert_ne!(again, pid, "held again by a new session");
    assert!(
        PostgresStore::connect(node_options(&schema, node, true))
            .await
            .is_err(),
        "the node is held again"
    );
    drop(store);
    schema.remove().await;
}

/// Pairs (1, m) for m in 2..=n whose conversation is on primary 0 and
/// whose users' inboxes are on primary 1 (user 1's is): every message of
/// them needs appends across primaries.
fn crossing_pairs(map: &ShardMap, n: i64) -> Vec<(ConvId, i64)> {
    assert_eq!(map.mid_shard(1), 1, "user 1's inbox is on primary 1");
    (2..=n)
        .filter_map(|m| {
            let conv = ConvId::peer(1, m).unwrap();
            (map.conv_shard(&conv) == 0 && map.mid_shard(m) == 1).then_some((conv, m))
        })
        .collect()
}

/// A message whose members' inbox is on another primary is stored and
/// acknowledged even when that primary cannot take the append; the store
/// dies with the append undone (dropped: its outbox row is all that is
/// left); a new store's relay appends it later — each entry once, and
/// each user's sync dense.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs PostgreSQL: run deploy/test.sh"]
async fn appends_lost_between_the_commit_and_the_other_primary_are_relayed_once() {
    let backend = Sharded::new().await;
    let map = ShardMap::even(2).unwrap();
    let pairs = crossing_pairs(&map, 60);
    assert!(pairs.len() >= 5, "{} crossing pairs", pairs.len());
    let store = backend.connect().await;
    // Primary 1 takes no writes: the appends fail after the store timeout.
    let blocked = backend.schemas[1].session().await;
    blocked
        .batch_execute("BEGIN; LOCK TABLE users, inbox IN EXCLUSIVE MODE")
        .await
        .unwrap();
    let mut acked = Vec::new();
    for (conv, m) in &pairs {
        let sent = within("a send", store.send(draft(conv, 1, "lost")))
            .await
            .unwrap();
        assert_eq!(sent.pending, [1, *m], "the appends are left pending");
        assert!(sent.inbox.is_empty());
        acked.push((conv.clone(), *m, sent.message.seq));
    }
    drop(store);
    blocked.batch_execute("ROLLBACK").await.unwrap();

    // A new store (another process after a crash) relays them.
    let store = backend.connect().await;
    // The relay leaves rows younger than 2 s to their sends.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let relayed = within("a relay", store.relay(100)).await.unwrap();
    let mut got: Vec<i64> = relayed.appended.iter().map(|e| e.mid).collect();
    got.sort_unstable();
    let mut want: Vec<i64> = acked.iter().map(|(_, m, _)| *m).collect();
    want.extend(std::iter::repeat_n(1, acked.len()));
    want.sort_unstable();
    assert_eq!(got, want);
    assert!(!relayed.more);
    assert!(
        store.relay(100).await.unwrap().appended.is_empty(),
        "done once"
    );
    for (conv, m, seq) in &acked {
        let entries = inbox(&*store, *m).await;
        assert_eq!(entries, [(1, conv.clone(), *seq)], "{m} has its entry once");
    }
    let mut ones = inbox(&*store, 1).await;
    assert_eq!(
        ones.iter().map(|e| e.0).collect::<Vec<_>>(),
        (1..=acked.len() as u64).collect::<Vec<_>>(),
        "1's inbox is dense"
    );
    ones.sort_by_key(|e| e.1.to_string());
    let mut convs: Vec<String> = acked.iter().map(|(c, _, _)| c.to_string()).collect();
    convs.sort();
    assert_eq!(
        ones.iter().map(|e| e.1.to_string()).collect::<Vec<_>>(),
        convs,
        "each of 1's entries once"
    );
    backend.remove().await;
}

/// An append that went through while its outbox row stayed (the clear
/// failed) is relayed again and adds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs PostgreSQL: run deploy/test.sh"]
async fn an_append_done_twice_adds_its_entry_once() {
    let backend = Sharded::new().await;
    let map = ShardMap::even(2).unwrap();
    let pairs = crossing_pairs(&map, 40);
    let store = backend.connect().await;
    let mut sent_to = Vec::new();
    for (conv, m) in &pairs {
        let sent = within("a send", store.send(draft(conv, 1, "twice")))
            .await
            .unwrap();
        assert!(sent.pending.is_empty(), "appended at once");
        sent_to.push((conv.clone(), *m, sent.message.seq));
    }
    // The sends' clears run in the background: wait for them, then put
    // the outbox rows back, as if their clear had failed.
    let session = backend.schemas[0].session().await;
    let owed = || async {
        session
            .query_one("SELECT count(*) FROM inbox_outbox", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    within("the background clears", async {
        while owed().await > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    for (conv, m, seq) in &sent_to {
        session
            .execute(
                "INSERT INTO inbox_outbox (conv, seq, mids, at) VALUES ($1, $2, $3, 0)",
                &[&conv.to_string(), &(*seq as i64), &vec![1i64, *m]],
            )
            .await
            .unwrap();
    }
    let relayed = within("a relay", store.relay(100)).await.unwrap();
    // Each message's row names both users: every entry found appended.
    assert_eq!(relayed.appended.len(), 2 * sent_to.len());
    for (conv, m, seq) in &sent_to {
        let entries = inbox(&*store, *m).await;
        assert_eq!(entries, [(1, conv.clone(), *seq)], "{m}'s entry once");
    }
    assert_eq!(
        inbox(&*store, 1).await.len(),
        sent_to.len(),
        "1's entries once each"
    );
    assert_eq!(owed().await, 0, "the relay cleared them");
    backend.remove().await;
}
