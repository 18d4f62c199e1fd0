//! The message store's behaviour suite (store.rs, im.md Storage), run over
//! every backend (tests/sqlite.rs, tests/postgres.rs): dense seqs under
//! concurrent senders, dedup under concurrent resends, dense inboxes,
//! history pages with their clamps, monotonic read positions, conversation
//! lists, membership, store failures as code 5 that store nothing, group
//! commit, durability across a reopen, and big groups (read diffusion,
//! [`big`]).
//!
//! Each case takes a backend on a fresh, empty store. Cases that send
//! concurrently want a multi-thread runtime:
//! `#[tokio::test(flavor = "multi_thread", worker_threads = 4)]`.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rim_im::{
    Code, ConvId, DEFAULT_SYNC_LIMIT, Draft, Error, GroupSpec, InboxEntry, MAX_PULL_LIMIT,
    MAX_SYNC_LIMIT, Message, MessageStore, Page, Reader, Retention, Sent, Synced,
};
use tokio::task::JoinSet;

mod big;

pub use big::*;

/// The longest any one step of a case may take.
const WAIT: Duration = Duration::from_secs(120);

/// A backend under test, on its own empty data.
#[async_trait]
pub trait Backend: Send + Sync {
    /// Opens a store on this backend's data (empty at first).
    async fn open(&self) -> Arc<dyn MessageStore>;

    /// Opens a new store instance on the same data, as a restarted process
    /// would (the suite drops the previous instance first).
    async fn reopen(&self) -> Arc<dyn MessageStore>;

    /// Whether a user's inbox lists one conversation's messages in seq
    /// order. A sharded store appends a user's entries for messages stored
    /// on another primary as the sends complete, so concurrent sends to
    /// one conversation may land in either order: dense and each once, but
    /// the client orders by seq.
    fn inbox_follows_seq(&self) -> bool {
        true
    }

    /// Makes the store's writes fail with `Error::Unavailable`, within a
    /// short store timeout the backend configured, until the guard drops
    /// (SQLite: another connection holding `BEGIN EXCLUSIVE`).
    async fn block_writes(&self) -> Box<dyn Send>;
}

/// Parses a conversation id.
pub fn conv(text: &str) -> ConvId {
    text.parse().expect("a valid conversation id")
}

/// A user's send.
pub fn draft(conv: &ConvId, from: i64, cmid: &str, body: &str) -> Draft {
    Draft::new(conv.clone(), from, cmid.into(), 0, body.into(), 4000).expect("a valid draft")
}

/// Bounds one step of a case.
async fn bounded<T>(what: &str, step: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, step)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {WAIT:?}"))
}

async fn send(store: &Arc<dyn MessageStore>, draft: Draft) -> Sent {
    bounded("a send", store.send(draft))
        .await
        .expect("the store accepts the send")
}

/// Creates group `gid` (limit `max_members`) with `mids` as members.
async fn group(
    store: &Arc<dyn MessageStore>,
    gid: &str,
    max_members: u32,
    mids: impl IntoIterator<Item = i64>,
) -> ConvId {
    let conv = ConvId::group(gid).expect("a valid gid");
    let spec = GroupSpec {
        name: gid.into(),
        max_members,
        big: false,
    };
    store.put_group(&conv, spec).await.expect("group created");
    let mids: Vec<i64> = mids.into_iter().collect();
    store
        .change_members(&conv, &mids, &[])
        .await
        .expect("members added");
    conv
}

/// Returns the whole history of `conv`, oldest first, page by page.
async fn history(store: &Arc<dyn MessageStore>, conv: &ConvId) -> Vec<Message> {
    let mut all = Vec::new();
    loop {
        let after = all.last().map_or(0, |m: &Message| m.seq);
        let page = bounded(
            "a pull",
            store.pull(conv, Reader::Business, Page::After(after), 0),
        )
        .await
        .expect("history");
        if page.messages.is_empty() {
            return all;
        }
        all.extend(page.messages);
    }
}

/// Returns `mid`'s whole inbox, page by page, checking `more` on the way.
async fn inbox(store: &Arc<dyn MessageStore>, mid: i64) -> Vec<Synced> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = bounded("a sync", store.sync(mid, after, MAX_SYNC_LIMIT))
            .await
            .expect("inbox");
        all.extend(page.entries);
        after = page.sync;
        if !page.more {
            return all;
        }
    }
}

/// Sends `per_sender` messages to `conv` from each of `senders`, each
/// sender's one after another and the senders concurrently; returns each
/// sender's outcomes in its send order.
async fn send_concurrently(
    store: &Arc<dyn MessageStore>,
    conv: impl Fn(i64) -> ConvId,
    senders: impl IntoIterator<Item = i64>,
    per_sender: usize,
) -> BTreeMap<i64, Vec<Sent>> {
    let mut tasks = JoinSet::new();
    for from in senders {
        let (store, conv) = (store.clone(), conv(from));
        tasks.spawn(async move {
            let mut sent = Vec::with_capacity(per_sender);
            for i in 0..per_sender {
                let body = format!("{from}:{i}");
                sent.push(send(&store, draft(&conv, from, &format!("c{i}"), &body)).await);
            }
            (from, sent)
        });
    }
    bounded("concurrent sends", async {
        let mut all = BTreeMap::new();
        while let Some(done) = tasks.join_next().await {
            let (from, sent) = done.expect("a sender task");
            all.insert(from, sent);
        }
        all
    })
    .await
}

fn assert_code<T: std::fmt::Debug>(result: Result<T, Error>, code: Code, what: &str) -> Error {
    let err = result.expect_err(what);
    assert_eq!(err.code(), code, "{what}: {err}");
    err
}

/// (a) 50 members send 20 messages each at once: seqs are exactly 1..=1000,
/// ids unique, each sender's messages in its order, every member's inbox
/// exactly 1..=1000 in seq order.
pub async fn seq_is_dense_under_concurrent_senders<B: Backend>(backend: &B) {
    let store = backend.open().await;
    let g = group(&store, "dense", 50, 1..=50).await;
    let sent = send_concurrently(&store, |_| g.clone(), 1..=50, 20).await;

    let mut seqs = Vec::new();
    let mut ids = HashSet::new();
    for (from, sent) in &sent {
        let own: Vec<u64> = sent.iter().map(|s| s.message.seq).collect();
        assert!(
            own.windows(2).all(|w| w[0] < w[1]),
            "{from}'s messages keep its send order: {own:?}"
        );
        for s in sent {
            assert!(!s.duplicate);
            assert_eq!(s.inbox.len(), 50, "an inbox entry per member");
            assert!(ids.insert(s.message.id), "ids are unique");
        }
        seqs.extend(own);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=1000).collect::<Vec<u64>>());

    let stored = history(&store, &g).await;
    assert_eq!(
        stored.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=1000).collect::<Vec<u64>>()
    );
    for mid in 1..=50 {
        let entries = inbox(&store, mid).await;
        let got: Vec<(u64, u64)> = entries.iter().map(|e| (e.sync, e.message.seq)).collect();
        let want: Vec<(u64, u64)> = (1..=1000).map(|n| (n, n)).collect();
        if backend.inbox_follows_seq() {
            assert_eq!(got, want, "{mid}'s inbox is dense and in seq order");
        } else {
            let syncs: Vec<u64> = got.iter().map(|(sync, _)| *sync).collect();
            let mut seqs: Vec<u64> = got.iter().map(|(_, seq)| *seq).collect();
            seqs.sort_unstable();
            assert_eq!(
                syncs,
                (1..=1000).collect::<Vec<_>>(),
                "{mid}'s inbox is dense"
            );
            assert_eq!(
                seqs,
                (1..=1000).collect::<Vec<_>>(),
                "{mid}'s inbox has each message once"
            );
        }
    }
    let page = store
        .pull(&g, Reader::Member(7), Page::Latest, 1)
        .await
        .expect("pull");
    assert_eq!(page.max_seq, 1000);
    let list = store.conversations(7, 0).await.expect("conversations");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].max_seq, 1000);
}

/// (b) 20 concurrent sends of one cmid store one message; the same cmid from
/// another sender or in another conversation is another message; a resend
/// after a reopen is still a duplicate.
pub async fn dedup_holds_under_concurrent_resends<B: Backend>(backend: &B) {
    let store = backend.open().await;
    let c = ConvId::peer(1, 2).expect("conv");
    let mut tasks = JoinSet::new();
    for _ in 0..20 {
        let (store, c) = (store.clone(), c.clone());
        tasks.spawn(async move { send(&store, draft(&c, 1, "same", "hello")).await });
    }
    let mut all = Vec::new();
    bounded("concurrent resends", async {
        while let Some(sent) = tasks.join_next().await {
            all.push(sent.expect("a sender task"));
        }
    })
    .await;
    assert_eq!(all.iter().filter(|s| !s.duplicate).count(), 1, "one stored");
    let first = all.iter().find(|s| !s.duplicate).expect("the first send");
    assert_eq!(first.inbox.len(), 2);
    for sent in &all {
        assert_eq!(
            sent.message, first.message,
            "every resend answers the first"
        );
        if sent.duplicate {
            assert!(sent.inbox.is_empty());
        }
    }
    assert_eq!(first.message.seq, 1);
    assert_eq!(history(&store, &c).await.len(), 1);
    for mid in [1, 2] {
        assert_eq!(inbox(&store, mid).await.len(), 1, "{mid} has one entry");
    }

    let other = send(&store, draft(&c, 2, "same", "hi")).await;
    assert!(!other.duplicate, "the same cmid from the other user is new");
    assert_eq!(other.message.seq, 2);
    let g = group(&store, "dedup", 10, [1, 2]).await;
    let elsewhere = send(&store, draft(&g, 1, "same", "hello")).await;
    assert!(!elsewhere.duplicate, "the same cmid in another conv is new");
    assert_eq!(elsewhere.message.seq, 1);

    drop(store);
    let store = backend.reopen().await;
    let again = send(&store, draft(&c, 1, "same", "changed")).await;
    assert!(again.duplicate, "still a duplicate after a reopen");
    assert_eq!(again.message, first.message);
    let page = store
        .pull(&c, Reader::Business, Page::Latest, 0)
        .await
        .expect("pull");
    assert_eq!(page.max_seq, 2);
}

/// (c) Each user's inbox is dense in commit order, holds only its
/// conversations (its own sends included), and pages with `more`.
pub async fn inbox_sync_is_dense_per_user<B: Backend>(backend: &B) {
    let store = backend.open().await;
    let (a, b, c, d) = (1, 2, 3, 4);
    let ab = ConvId::peer(a, b).expect("conv");
    let ac = ConvId::peer(a, c).expect("conv");
    let bd = ConvId::peer(b, d).expect("conv");
    let g = group(&store, "acd", 10, [a, c, d]).await;
    let rounds = [
        (ab.clone(), a),
        (ab.clone(), b),
        (ac.clone(), c),
        (g.clone(), d),
        (g.clone(), a),
        (bd.clone(), b),
    ];
    let mut want: BTreeMap<i64, Vec<(ConvId, u64)>> = BTreeMap::new();
    for i in 0..60 {
        for (conv, from) in &rounds {
            let sent = send(&store, draft(conv, *from, &format!("m{i}"), "x")).await;
            for entry in &sent.inbox {
                let list = want.entry(entry.mid).or_default();
                list.push((conv.clone(), sent.message.seq));
                assert_eq!(
                    entry.sync as usize,
                    list.len(),
                    "the next sync of {}",
                    entry.mid
                );
            }
        }
    }
    let members = |conv: &ConvId| -> Vec<i64> {
        if *conv == g {
            vec![a, c, d]
        } else if let ConvId::Peer { low, high } = conv {
            vec![*low, *high]
        } else {
            unreachable!()
        }
    };
    // Rebuild what each user should see from the sends alone.
    let mut expected: BTreeMap<i64, Vec<(ConvId, u64)>> = BTreeMap::new();
    let mut seqs: BTreeMap<ConvId, u64> = BTreeMap::new();
    for _ in 0..60 {
        for (conv, _) in &rounds {
            let seq = seqs.entry(conv.clone()).or_default();
            *seq += 1;
            for mid in members(conv) {
                expected.entry(mid).or_default().push((conv.clone(), *seq));
            }
        }
    }
    assert_eq!(want, expected, "the sends' inbox entries");
    for mid in [a, b, c, d] {
        let got = inbox(&store, mid).await;
        assert_eq!(
            got.iter().map(|e| e.sync).collect::<Vec<_>>(),
            (1..=got.len() as u64).collect::<Vec<_>>(),
            "{mid}'s syncs are dense"
        );
        let got: Vec<(ConvId, u64)> = got
            .into_iter()
            .map(|e| (e.message.conv, e.message.seq))
            .collect();
        assert_eq!(got, expected[&mid], "{mid}'s inbox in commit order");
    }
    let total_a = expected[&a].len() as u64;
    assert_eq!(total_a, 300, "A's own sends are in A's inbox too");
    // The heads in one read, in the order asked, 0 for a user without an
    // inbox.
    let heads = store
        .inbox_heads(&[d, 99, a, b, c, a])
        .await
        .expect("heads");
    let len = |mid: i64| expected[&mid].len() as u64;
    assert_eq!(heads, vec![len(d), 0, len(a), len(b), len(c), len(a)]);
    assert!(store.inbox_heads(&[]).await.expect("no heads").is_empty());
    assert_eq!(expected[&b].len(), 180);

    // Paging with a small limit: more until the last page.
    let mut after = 0;
    let mut pages = 0;
    loop {
        let page = store.sync(a, after, 7).await.expect("sync");
        pages += 1;
        assert!(page.entries.len() <= 7);
        assert_eq!(page.entries.first().map(|e| e.sync), Some(after + 1));
        after = page.sync;
        assert_eq!(page.more, after < total_a, "more at {after}");
        if !page.more {
            break;
        }
    }
    assert_eq!((after, pages), (total_a, total_a.div_ceil(7)));

    let beyond = store.sync(a, total_a + 50, 10).await.expect("sync");
    assert!(beyond.entries.is_empty());
    assert_eq!(beyond.sync, total_a, "capped at the latest entry");
    assert!(!beyond.more);
    assert_code(
        store.sync(a, u64::MAX, 10).await,
        Code::BadRequest,
        "a sync past what the store can hold",
    );
    let nobody = store.sync(99, 5, 10).await.expect("sync");
    assert_eq!(
        (nobody.entries.len(), nobody.sync, nobody.more),
        (0, 0, false)
    );

    let default = store.sync(a, 0, 0).await.expect("sync");
    assert_eq!(default.entries.len(), DEFAULT_SYNC_LIMIT as usize);
    assert!(default.more);
    let capped = store.sync(a, 0, 1000).await.expect("sync");
    assert_eq!(capped.entries.len(), MAX_SYNC_LIMIT as usize);
    assert_eq!(capped.sync, u64::from(MAX_SYNC_LIMIT));

    // A user talking to themselves is one member with one entry a message.
    let own = ConvId::peer(7, 7).expect("conv");
    let sent = send(&store, draft(&own, 7, "note", "to self")).await;
    assert_eq!(sent.inbox, vec![InboxEntry { mid: 7, sync: 1 }]);
    assert_eq!(inbox(&store, 7).await.len(), 1);
    let list = store.conversations(7, 0).await.expect("conversations");
    assert_eq!(list.len(), 1);
    assert_eq!(
        (list[0].max_seq, list[0].read_seq, list[0].unread),
        (1, 1, 0)
    );
}

/// (d) History pages newest first before a seq, oldest first after one,
/// with their limits clamped; only members read them.
pub async fn history_pages_both_ways_with_clamps<B: Backend>(backend: &B) {
    let store = backend.open().await;
    let c = ConvId::peer(1, 2).expect("conv");
    let sent = send_concurrently(&store, |_| c.clone(), [1, 2], 125).await;
    let bodies: BTreeMap<u64, String> = sent
        .values()
        .flatten()
        .map(|s| (s.message.seq, s.message.body.clone()))
        .collect();
    assert_eq!(bodies.len(), 250);

    let seqs = |page: &rim_im::PullPage| page.messages.iter().map(|m| m.seq).collect::<Vec<_>>();
    let pull = |page: Page, limit: u32| {
        let (store, c) = (store.clone(), c.clone());
        async move {
            store
                .pull(&c, Reader::Member(1), page, limit)
                .await
                .expect("pull")
        }
    };
    let latest = pull(Page::Latest, 0).await;
    assert_eq!(seqs(&latest), (151..=250).rev().collect::<Vec<u64>>());
    assert_eq!(
        (latest.max_seq, latest.min_seq, latest.reset),
        (250, 1, false)
    );
    for m in &latest.messages {
        assert_eq!(m.body, bodies[&m.seq]);
        assert_eq!(m.conv, c);
    }
    let before = pull(Page::Before(151), 100).await;
    assert_eq!(seqs(&before), (51..=150).rev().collect::<Vec<u64>>());
    let oldest = pull(Page::After(0), 10).await;
    assert_eq!(seqs(&oldest), (1..=10).collect::<Vec<u64>>());
    let tail = pull(Page::After(245), 0).await;
    assert_eq!(seqs(&tail), (246..=250).collect::<Vec<u64>>());
    assert!(pull(Page::Before(1), 10).await.messages.is_empty());
    assert!(pull(Page::After(250), 10).await.messages.is_empty());
    let clamped = pull(Page::Latest, 1000).await;
    assert_eq!(clamped.messages.len(), MAX_PULL_LIMIT as usize);
    let first_page = pull(Page::Before(51), 1000).await;
    assert_eq!(seqs(&first_page), (1..=50).rev().collect::<Vec<u64>>());
    assert_eq!((first_page.max_seq, first_page.min_seq), (250, 1));

    let err = assert_code(
        store.pull(&c, Reader::Member(3), Page::Latest, 0).await,
        Code::NotAllowed,
        "a non-member reads",
    );
    assert!(matches!(err, Error::NotMember { mid: 3, .. }), "{err:?}");
    let business = store
        .pull(&c, Reader::Business, Page::After(0), 5)
        .await
        .expect("a business reads");
    assert_eq!(seqs(&business), vec![1, 2, 3, 4, 5]);

    let never = ConvId::peer(5, 6).expect("conv");
    let empty = store
        .pull(&never, Reader::Member(5), Page::Latest, 0)
        .await
        .expect("an empty conversation");
    assert!(empty.messages.is_empty());
    assert_eq!(empty.max_seq, 0);

    let g = group(&store, "hist", 10, [1]).await;
    assert_code(
        store.pull(&g, Reader::Member(2), Page::Latest, 0).await,
        Code::NotAllowed,
        "a non-member reads a group",
    );
    assert_code(
        store
            .pull(&c, Reader::Member(1), Page::After(u64::MAX), 0)
            .await,
        Code::BadRequest,
        "a seq past what the store can hold",
    );
}

/// (e) READ only moves forward, is capped at the latest seq, and is for
/// members; a send moves its sender's position.
pub async fn read_position_is_monotonic<B: Backend>(backend: &B) {
    let store = backend.open().await;
    let c = ConvId::peer(1, 2).expect("conv");
    for i in 0..20 {
        send(&store, draft(&c, 2, &format!("r{i}"), "x")).await;
    }
    let read = |seq: u64| {
        let (store, c) = (store.clone(), c.clone());
        async move { store.read(&c, 1, seq).await.expect("read") }
    };
    let pos = read(5).await;
    assert_eq!((pos.read_seq, pos.max_seq, pos.advanced), (5, 20, true));
    let pos = read(3).await;
    assert_eq!((pos.read_seq, pos.max_seq, pos.advanced), (5, 20, false));
    let pos = read(10_000).await;
    assert_eq!((pos.read_seq, pos.max_seq, pos.advanced), (20, 20, true));
    let pos = read(20).await;
    assert_eq!((pos.read_seq, pos.advanced), (20, false));

    assert_code(
        store.read(&c, 3, 1).await,
        Code::NotAllowed,
        "a non-member reads",
    );
    assert_code(
        store.read(&c, 1, u64::MAX).await,
        Code::BadRequest,
        "a seq past what the store can hold",
    );

    let list = store.conversations(2, 0).await.expect("conversations");
    assert_eq!(
        (list[0].read_seq, list[0].unread),
        (20, 0),
        "the sender has read what it sent"
    );
    for i in 0..5 {
        send(&store, draft(&c, 2, &format!("s{i}"), "x")).await;
    }
    let list = store.conversations(1, 0).await.expect("conversations");
    assert_eq!(
        (list[0].max_seq, list[0].read_seq, list[0].unread),
        (25, 20, 5)
    );
    let mine = send(&store, draft(&c, 1, "own", "x")).await;
    assert_eq!(mine.message.seq, 26);
    let list = store.conversations(1, 0).await.expect("conversations");
    assert_eq!((list[0].read_seq, list[0].unread), (26, 0));

    let g = group(&store, "reads", 10, [1, 2]).await;
    send(&store, draft(&g, 2, "g", "x")).await;
    let pos = store.read(&g, 1, 1).await.expect("a member reads");
    assert_eq!((pos.read_seq, pos.advanced), (1, true));
    assert_code(
        store.read(&g, 3, 1).await,
        Code::NotAllowed,
        "a non-member reads a group",
    );
}

/// (f) A user's conversations, most recent message first, with the latest
/// message and unread counts; a removed member no longer lists the group.
pub async fn conversations_list_most_recent_first<B: Backend>(backend: &B) {
    let store = backend.open().await;
    let (ab, ac) = (
        ConvId::peer(1, 2).expect("conv"),
        ConvId::peer(1, 3).expect("conv"),
    );
    let g = group(&store, "list", 10, [1, 4]).await;
    let fresh = store.conversations(1, 0).await.expect("conversations");
    assert_eq!(fresh.len(), 1, "a group without messages is listed");
    assert_eq!(
        (&fresh[0].conv, fresh[0].max_seq, &fresh[0].last),
        (&g, 0, &None)
    );

    // Message times are in milliseconds: space the sends so the order is
    // the send order, not a tie.
    let pause = || tokio::time::sleep(Duration::from_millis(5));
    pause().await;
    send(&store, draft(&ac, 3, "1", "from 3")).await;
    pause().await;
    send(&store, draft(&g, 4, "1", "from 4")).await;
    pause().await;
    send(&store, draft(&ab, 2, "1", "from 2")).await;
    let list = store.conversations(1, 0).await.expect("conversations");
    let order: Vec<&ConvId> = list.iter().map(|s| &s.conv).collect();
    assert_eq!(order, vec![&ab, &g, &ac]);
    for line in &list {
        assert_eq!((line.max_seq, line.read_seq, line.unread), (1, 0, 1));
    }
    assert_eq!(
        list[0].last.as_ref().map(|m| (m.from, m.body.as_str())),
        Some((2, "from 2"))
    );

    pause().await;
    send(&store, draft(&ac, 3, "2", "again")).await;
    let list = store.conversations(1, 2).await.expect("conversations");
    let order: Vec<&ConvId> = list.iter().map(|s| &s.conv).collect();
    assert_eq!(order, vec![&ac, &ab], "limit 2, newest first");
    assert_eq!(
        list[0].last.as_ref().map(|m| (m.seq, m.body.as_str())),
        Some((2, "again"))
    );
    assert_eq!(list[0].unread, 2);

    store.change_members(&g, &[], &[1]).await.expect("removed");
    let list = store.conversations(1, 0).await.expect("conversations");
    assert!(
        list.iter().all(|s| s.conv != g),
        "no longer lists the group"
    );
    assert_eq!(list.len(), 2);
    let four = store.conversations(4, 0).await.expect("conversations");
    assert_eq!(four.len(), 1);
    assert!(store.conversations(99, 0).await.expect("nobody").is_empty());
}

/// (g) Groups: create and update, add and remove members, the member limit
/// (nothing changes past it), who may send, where inbox entries go, paged
/// members, and system sends.
pub async fn membership_add_remove_and_limits<B: Backend>(backend: &B) {
    let store = backend.open().await;
    let g = conv("g:m");
    let spec = |name: &str, max_members| GroupSpec {
        name: name.into(),
        max_members,
        big: false,
    };
    let made = store.put_group(&g, spec("m", 3)).await.expect("created");
    assert_eq!(
        (
            made.name.as_str(),
            made.max_members,
            made.members,
            made.created
        ),
        ("m", 3, 0, true)
    );
    let updated = store.put_group(&g, spec("m2", 4)).await.expect("updated");
    assert_eq!(
        (updated.name.as_str(), updated.max_members, updated.created),
        ("m2", 4, false)
    );
    let stored = store.group(&g).await.expect("group");
    assert_eq!(
        (
            stored.name.as_str(),
            stored.max_members,
            stored.members,
            stored.created
        ),
        ("m2", 4, 0, false)
    );

    let changed = store
        .change_members(&g, &[2, 1, 2], &[])
        .await
        .expect("added");
    assert_eq!(
        (changed.added, changed.removed, changed.members),
        (vec![1, 2], vec![], 2)
    );
    let changed = store
        .change_members(&g, &[3, 2], &[1, 9])
        .await
        .expect("changed");
    assert_eq!(
        (changed.added, changed.removed, changed.members),
        (vec![3], vec![1], 2)
    );
    let changed = store.change_members(&g, &[2], &[2]).await.expect("both");
    assert_eq!(changed.members, 2, "a mid in both lists stays a member");

    let sent = send(&store, draft(&g, 2, "a", "x")).await;
    assert_eq!(sent.message.seq, 1);
    let to: Vec<i64> = sent.inbox.iter().map(|e| e.mid).collect();
    assert_eq!(to, vec![2, 3], "entries for the members at send time");
    assert_code(
        store.send(draft(&g, 1, "b", "x")).await,
        Code::NotAllowed,
        "a removed member sends",
    );
    assert!(
        inbox(&store, 1).await.is_empty(),
        "1 left before any message"
    );

    let err = assert_code(
        store.change_members(&g, &[5, 6, 7], &[]).await,
        Code::TooLarge,
        "past the member limit",
    );
    assert!(
        matches!(
            err,
            Error::GroupFull {
                members: 5,
                limit: 4,
                ..
            }
        ),
        "{err:?}"
    );
    let page = store.members(&g, None, 0).await.expect("members");
    assert_eq!(page.mids, vec![2, 3], "nothing changed");
    assert_eq!(store.group(&g).await.expect("group").members, 2);

    send(&store, draft(&g, 3, "c", "x")).await;
    let changed = store.change_members(&g, &[4], &[]).await.expect("added");
    assert_eq!(changed.added, vec![4]);
    let four = store.conversations(4, 0).await.expect("conversations");
    assert_eq!(
        (four[0].max_seq, four[0].read_seq, four[0].unread),
        (2, 2, 0),
        "a new member starts at the latest seq"
    );
    let sent = send(&store, draft(&g, 4, "d", "x")).await;
    assert_eq!(
        sent.inbox.iter().map(|e| e.mid).collect::<Vec<_>>(),
        vec![2, 3, 4]
    );

    // A system send from a non-member is stored; the non-member gets no
    // inbox entry.
    let system = store
        .send(draft(&g, 99, "sys", "notice").system())
        .await
        .expect("a system send");
    assert_eq!(system.message.seq, 4);
    assert_eq!(
        system.inbox.iter().map(|e| e.mid).collect::<Vec<_>>(),
        vec![2, 3, 4]
    );
    assert!(inbox(&store, 99).await.is_empty());

    let none = conv("g:none");
    let err = assert_code(
        store.send(draft(&none, 1, "a", "x")).await,
        Code::NotAllowed,
        "a send to a group that does not exist",
    );
    assert!(matches!(err, Error::NotMember { mid: 1, .. }), "{err:?}");
    assert_code(
        store.send(draft(&none, 1, "a", "x").system()).await,
        Code::NotAllowed,
        "a system send to a group that does not exist",
    );
    for (what, result) in [
        (
            "change_members",
            store.change_members(&none, &[1], &[]).await.map(|_| ()),
        ),
        ("members", store.members(&none, None, 0).await.map(|_| ())),
        ("group", store.group(&none).await.map(|_| ())),
    ] {
        let err = result.expect_err(what);
        assert!(matches!(err, Error::NoSuchGroup { .. }), "{what}: {err:?}");
    }

    let big = group(&store, "paged", 9, 1..=9).await;
    let mut pages = Vec::new();
    let mut after = None;
    loop {
        let page = store.members(&big, after, 3).await.expect("members");
        pages.push(page.mids.clone());
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(pages, vec![vec![1, 2, 3], vec![4, 5, 6], vec![7, 8, 9]]);
    let rest = store.members(&big, Some(7), 0).await.expect("members");
    assert_eq!((rest.mids, rest.next), (vec![8, 9], None));
}

/// (h) With writes failing, sends, READs and membership changes answer
/// code 5 and store nothing; afterwards the same cmid is a new message with
/// the next seq.
pub async fn a_store_error_is_code_5_and_stores_nothing<B: Backend>(backend: &B) {
    let store = backend.open().await;
    let c = ConvId::peer(1, 2).expect("conv");
    send(&store, draft(&c, 1, "a", "x")).await;
    let g = group(&store, "blocked", 10, [1, 2]).await;

    let guard = backend.block_writes().await;
    let err = assert_code(
        bounded("a blocked send", store.send(draft(&c, 1, "b", "x"))).await,
        Code::Unavailable,
        "a send with writes blocked",
    );
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    assert_code(
        bounded("a blocked read", store.read(&c, 2, 1)).await,
        Code::Unavailable,
        "a READ with writes blocked",
    );
    assert_code(
        bounded("a blocked change", store.change_members(&g, &[3], &[])).await,
        Code::Unavailable,
        "a membership change with writes blocked",
    );
    drop(guard);

    let sent = send(&store, draft(&c, 1, "b", "x")).await;
    assert!(!sent.duplicate, "the failed attempt stored nothing");
    assert_eq!(sent.message.seq, 2, "no hole");
    let seqs: Vec<u64> = history(&store, &c).await.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![1, 2]);
    for mid in [1, 2] {
        let got: Vec<(u64, u64)> = inbox(&store, mid)
            .await
            .iter()
            .map(|e| (e.sync, e.message.seq))
            .collect();
        assert_eq!(got, vec![(1, 1), (2, 2)], "{mid}'s inbox");
    }
    let list = store.conversations(2, 0).await.expect("conversations");
    let line = list.iter().find(|s| s.conv == c).expect("listed");
    assert_eq!(line.read_seq, 0, "the failed READ moved nothing");
    let page = store.members(&g, None, 0).await.expect("members");
    assert_eq!(page.mids, vec![1, 2], "the failed change changed nothing");
}

/// (i) Concurrent sends share commits. Returns how many commits 1000
/// concurrent sends took.
pub async fn concurrent_sends_share_commits<B: Backend>(backend: &B) -> u64 {
    let store = backend.open().await;
    let before = store.commits();
    let sent = send_concurrently(
        &store,
        |from| ConvId::peer(from, from + 100).expect("conv"),
        1..=50,
        20,
    )
    .await;
    let commits = store.commits() - before;
    for (from, sent) in &sent {
        let seqs: Vec<u64> = sent.iter().map(|s| s.message.seq).collect();
        assert_eq!(
            seqs,
            (1..=20).collect::<Vec<u64>>(),
            "{from}'s conversation"
        );
    }
    assert!(commits >= 1, "the sends were committed");
    assert!(
        commits < 1000,
        "1000 concurrent sends took {commits} commits: no group commit"
    );
    commits
}

/// (j) Everything acknowledged before a reopen is there after it, and seqs
/// and syncs go on densely.
pub async fn acknowledged_writes_survive_a_reopen<B: Backend>(backend: &B) {
    let store = backend.open().await;
    let c = ConvId::peer(1, 2).expect("conv");
    let g = group(&store, "durable", 10, [1, 2, 3]).await;
    for i in 0..10 {
        send(
            &store,
            draft(&c, 1 + i % 2, &format!("p{i}"), &format!("p{i}")),
        )
        .await;
        send(
            &store,
            draft(&g, 1 + i % 3, &format!("g{i}"), &format!("g{i}")),
        )
        .await;
    }
    store.read(&c, 2, 7).await.expect("read");
    store.read(&g, 3, 4).await.expect("read");
    store.change_members(&g, &[4], &[3]).await.expect("changed");

    let snapshot = |store: Arc<dyn MessageStore>| {
        let (c, g) = (c.clone(), g.clone());
        async move {
            let mut lists = Vec::new();
            let mut inboxes = Vec::new();
            for mid in 1..=4 {
                lists.push(store.conversations(mid, 0).await.expect("conversations"));
                inboxes.push(inbox(&store, mid).await);
            }
            (
                history(&store, &c).await,
                history(&store, &g).await,
                lists,
                inboxes,
                store.group(&g).await.expect("group"),
                store.members(&g, None, 0).await.expect("members"),
            )
        }
    };
    let before = snapshot(store.clone()).await;
    assert_eq!((before.0.len(), before.1.len()), (10, 10));
    drop(store);

    let store = backend.reopen().await;
    let after = snapshot(store.clone()).await;
    assert_eq!(before, after, "the same state after a reopen");

    let next = send(&store, draft(&c, 2, "after", "x")).await;
    assert_eq!(next.message.seq, 11);
    let syncs: BTreeMap<i64, u64> = next.inbox.iter().map(|e| (e.mid, e.sync)).collect();
    let last = |mid: usize| before.3[mid - 1].last().map_or(0, |e| e.sync);
    assert_eq!(syncs, BTreeMap::from([(1, last(1) + 1), (2, last(2) + 1)]));
    let next = send(&store, draft(&g, 4, "after", "x")).await;
    assert_eq!(next.message.seq, 11);
    assert_eq!(
        next.inbox.iter().map(|e| e.mid).collect::<Vec<_>>(),
        vec![1, 2, 4]
    );
    let four = store.conversations(4, 0).await.expect("conversations");
    assert_eq!(four[0].read_seq, 11, "4 joined at 10 and sent 11");
}

/// Prunes with `retention` in steps of `budget` rows until a step says
/// nothing more is to go; returns the rows removed.
async fn prune_all(
    store: &Arc<dyn MessageStore>,
    retention: &Retention,
    budget: u32,
) -> (u64, u64) {
    let (mut messages, mut inbox) = (0, 0);
    for _ in 0..1000 {
        let step = bounded("a pruning step", store.prune(retention, budget))
            .await
            .expect("pruned");
        assert!(
            step.messages + step.inbox <= u64::from(budget),
            "a step keeps to its budget: {step:?}"
        );
        messages += step.messages;
        inbox += step.inbox;
        if !step.more {
            return (messages, inbox);
        }
    }
    panic!("pruning never finished");
}

async fn pull(store: &Arc<dyn MessageStore>, conv: &ConvId, page: Page) -> rim_im::PullPage {
    bounded("a pull", store.pull(conv, Reader::Business, page, 100))
        .await
        .expect("pulled")
}

fn seqs(messages: &[Message]) -> Vec<u64> {
    messages.iter().map(|m| m.seq).collect()
}

/// Retention by a per-conversation cap: the oldest messages go, history
/// below the floor answers `reset` with the page from the floor, inboxes
/// lose their leading entries, and SYNC skips (and says so) entries whose
/// message a cap removed further on; sends go on with the next seq.
pub async fn retention_cap_keeps_the_newest_and_reads_below_say_reset<B: Backend>(backend: &B) {
    let store = backend.open().await;
    let (a, b, c) = (11, 12, 13);
    let ab = ConvId::peer(a, b).expect("conv");
    let ac = ConvId::peer(a, c).expect("conv");
    // a's inbox: ab 1-10 (sync 1-10), ac 1 (11), ab 11-20 (12-21), ac 2
    // (22), ab 21-30 (23-32), ac 3 (33).
    for i in 1..=30 {
        send(&store, draft(&ab, a, &format!("ab{i}"), "x")).await;
        if i % 10 == 0 {
            send(&store, draft(&ac, c, &format!("ac{i}"), "x")).await;
        }
    }
    let none = Retention::default();
    assert_eq!(prune_all(&store, &none, 100).await, (0, 0), "no policy");
    let keep10 = Retention {
        before_ms: None,
        max_per_conv: Some(10),
    };
    // ab 1-20; b's entries 1-20 and a's 1-10 (ac 1 is kept, so a's later
    // entries of ab 11-20 stay, skipped by SYNC).
    assert_eq!(prune_all(&store, &keep10, 7).await, (20, 30));
    assert_eq!(
        prune_all(&store, &keep10, 7).await,
        (0, 0),
        "nothing left to go"
    );

    let page = pull(&store, &ab, Page::After(0)).await;
    assert_eq!((page.reset, page.min_seq, page.max_seq), (true, 21, 30));
    assert_eq!(seqs(&page.messages), (21..=30).collect::<Vec<_>>());
    let page = pull(&store, &ab, Page::Before(15)).await;
    assert!(page.reset, "below the floor");
    assert_eq!(
        seqs(&page.messages),
        (21..=30).collect::<Vec<_>>(),
        "from the floor up"
    );
    let page = pull(&store, &ab, Page::Before(25)).await;
    assert!(!page.reset, "reaches the floor without passing it");
    assert_eq!(seqs(&page.messages), vec![24, 23, 22, 21]);
    let page = pull(&store, &ab, Page::Latest).await;
    assert!(!page.reset);
    assert_eq!(page.messages.len(), 10);
    let page = pull(&store, &ac, Page::After(0)).await;
    assert_eq!(
        (page.reset, page.min_seq, page.messages.len()),
        (false, 1, 3)
    );

    // b: everything before its first retained entry went.
    let page = store.sync(b, 0, 200).await.expect("sync");
    assert!(page.reset);
    let got: Vec<u64> = page.entries.iter().map(|e| e.message.seq).collect();
    assert_eq!(got, (21..=30).collect::<Vec<_>>());
    assert_eq!((page.entries[0].sync, page.sync), (21, 30));
    let page = store.sync(b, 20, 200).await.expect("sync");
    assert!(!page.reset, "from the floor on, nothing is missing");
    assert_eq!(page.entries.len(), 10);
    // a: entries 1-10 went; 12-21 (ab 11-20) are skipped, with reset.
    let page = store.sync(a, 0, 200).await.expect("sync");
    assert!(page.reset);
    let got: Vec<(u64, u64)> = page
        .entries
        .iter()
        .map(|e| (e.sync, e.message.seq))
        .collect();
    let mut want = vec![(11, 1), (22, 2)];
    want.extend((23..=32).zip(21..=30));
    want.push((33, 3));
    assert_eq!(got, want);
    assert_eq!((page.sync, page.more), (33, false));
    let page = store.sync(a, 11, 5).await.expect("sync");
    assert!(page.reset, "entries 12-16 lost their messages");
    assert!(page.entries.is_empty());
    assert_eq!(
        (page.sync, page.more),
        (16, true),
        "the cursor moves past them"
    );
    let page = store.sync(a, 21, 200).await.expect("sync");
    assert!(!page.reset);
    assert_eq!(page.entries.len(), 12);

    // Sends go on; the cap keeps holding.
    let next = send(&store, draft(&ab, b, "ab31", "x")).await;
    assert_eq!(next.message.seq, 31);
    assert_eq!(
        prune_all(&store, &keep10, 100).await,
        (1, 1),
        "ab 21, b's entry 21"
    );
    let page = pull(&store, &ab, Page::After(0)).await;
    assert_eq!((page.min_seq, page.messages.len()), (22, 10));
}

/// Retention by age: messages accepted before the limit go, those after
/// stay, whatever the conversation.
pub async fn retention_by_age_removes_what_is_older<B: Backend>(backend: &B) {
    let store = backend.open().await;
    let (a, b) = (21, 22);
    let ab = ConvId::peer(a, b).expect("conv");
    let aa = ConvId::peer(a, a).expect("conv");
    let mut old = Vec::new();
    for i in 0..5 {
        old.push(
            send(&store, draft(&ab, a, &format!("old{i}"), "x"))
                .await
                .message,
        );
        old.push(
            send(&store, draft(&aa, a, &format!("self{i}"), "x"))
                .await
                .message,
        );
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    let limit = old.iter().map(|m| m.id.unix_ms()).max().expect("sent") + 1;
    tokio::time::sleep(Duration::from_millis(5)).await;
    for i in 0..5 {
        let sent = send(&store, draft(&ab, b, &format!("new{i}"), "x")).await;
        assert!(sent.message.id.unix_ms() >= limit);
    }
    let by_age = Retention {
        before_ms: Some(limit),
        max_per_conv: None,
    };
    // 10 messages; inboxes: a 15 (ab 5 + self 5... a's own entries), b 5.
    let (messages, inbox) = prune_all(&store, &by_age, 4).await;
    assert_eq!(messages, 10);
    assert_eq!(inbox, 15, "a's 10 old entries and b's 5");
    let page = pull(&store, &ab, Page::After(0)).await;
    assert_eq!((page.reset, page.min_seq), (true, 6));
    assert_eq!(seqs(&page.messages), vec![6, 7, 8, 9, 10]);
    let page = pull(&store, &aa, Page::Latest).await;
    assert!(page.messages.is_empty());
    assert_eq!((page.min_seq, page.max_seq), (6, 5), "everything went");
    let page = store.sync(a, 0, 200).await.expect("sync");
    assert!(page.reset);
    assert_eq!(page.entries.len(), 5);
    assert_eq!(page.sync, 15);
}
