//! Big groups (read diffusion, im.md "Big groups"): no inbox entries, the
//! sender's rows only, the conversation list and READ as for any group, a
//! sticky mode, and `big_groups`; small groups and pairs beside them in the
//! same batches keep their inbox entries.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use rim_im::{Code, ConvId, Error, GroupSpec, MAX_BIG_GROUPS_LIMIT, MessageStore, Page, Reader};
use tokio::task::JoinSet;

use super::{
    Backend, assert_code, bounded, conv, draft, group, history, inbox, send, send_concurrently,
};

/// Creates big group `gid` with `mids` as members.
async fn big_group(
    store: &Arc<dyn MessageStore>,
    gid: &str,
    mids: impl IntoIterator<Item = i64>,
) -> ConvId {
    let conv = ConvId::group(gid).expect("a valid gid");
    let spec = GroupSpec {
        name: gid.into(),
        max_members: 100_000,
        big: true,
    };
    let made = store.put_group(&conv, spec).await.expect("group created");
    assert!(made.big && made.created, "{made:?}");
    let mids: Vec<i64> = mids.into_iter().collect();
    store
        .change_members(&conv, &mids, &[])
        .await
        .expect("members added");
    conv
}

/// (k) 8 members send 50 messages each at once to a big group of 20:
/// seqs exactly 1..=400, every send `big` with no inbox entry, nobody's
/// inbox (the senders' included) holds anything, and the conversation
/// list shows the group with its seq, each one's read position and the
/// latest message.
pub async fn big_group_sends_write_no_inbox_entries<B: Backend>(backend: &B) {
    let store = backend.open().await;
    let g = big_group(&store, "crowd", 1..=20).await;
    let sent = send_concurrently(&store, |_| g.clone(), 1..=8, 50).await;

    let mut seqs = Vec::new();
    for (from, sent) in &sent {
        let own: Vec<u64> = sent.iter().map(|s| s.message.seq).collect();
        assert!(
            own.windows(2).all(|w| w[0] < w[1]),
            "{from}'s messages keep its send order: {own:?}"
        );
        for s in sent {
            assert!(s.big, "a send to a big group says so");
            assert!(!s.duplicate);
            assert!(s.inbox.is_empty(), "no inbox entry: {:?}", s.inbox);
        }
        seqs.extend(own);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=400).collect::<Vec<u64>>(), "dense seqs");
    let stored = history(&store, &g).await;
    assert_eq!(
        stored.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=400).collect::<Vec<u64>>()
    );

    for mid in 1..=20 {
        assert!(inbox(&store, mid).await.is_empty(), "{mid}'s SYNC is empty");
    }
    let heads = store
        .inbox_heads(&(1..=20).collect::<Vec<_>>())
        .await
        .expect("heads");
    assert_eq!(heads, vec![0; 20], "no inbox moved");

    let last = stored.last().expect("the latest message").clone();
    // A sender has read up to its own latest message.
    for (from, sent) in &sent {
        let list = store.conversations(*from, 0).await.expect("conversations");
        assert_eq!(list.len(), 1, "{from} lists the group");
        let own = sent.last().expect("sent").message.seq;
        assert_eq!(
            (&list[0].conv, list[0].max_seq, list[0].read_seq),
            (&g, 400, own)
        );
        assert_eq!(list[0].unread, 400 - own);
        assert_eq!(list[0].last.as_ref(), Some(&last));
    }
    // A member that never sent has read nothing.
    let list = store.conversations(15, 0).await.expect("conversations");
    assert_eq!(list.len(), 1);
    assert_eq!(
        (
            &list[0].conv,
            list[0].max_seq,
            list[0].read_seq,
            list[0].unread
        ),
        (&g, 400, 0, 400)
    );
    assert_eq!(list[0].last.as_ref(), Some(&last));
    let page = store
        .pull(&g, Reader::Member(15), Page::After(390), 0)
        .await
        .expect("a member pulls");
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (391..=400).collect::<Vec<u64>>()
    );
    assert_eq!(page.max_seq, 400);
}

/// (l) In a big group: a resend answers the first send, `big` too; a
/// non-member is refused; a system send is stored; READ moves a member's
/// position; a new member starts at the latest seq; history is for
/// members.
pub async fn big_group_dedup_refusals_reads_and_members<B: Backend>(backend: &B) {
    let store = backend.open().await;
    let g = big_group(&store, "town", [1, 2, 3]).await;
    let first = send(&store, draft(&g, 1, "same", "hello")).await;
    assert!(first.big && !first.duplicate && first.inbox.is_empty());
    assert_eq!(first.message.seq, 1);
    let again = send(&store, draft(&g, 1, "same", "changed")).await;
    assert!(again.duplicate, "a resend is a duplicate");
    assert!(again.big, "a duplicate says big too");
    assert!(again.inbox.is_empty());
    assert_eq!(again.message, first.message);
    // Resends racing one another: one message.
    let mut tasks = JoinSet::new();
    for _ in 0..10 {
        let (store, g) = (store.clone(), g.clone());
        tasks.spawn(async move { send(&store, draft(&g, 2, "race", "x")).await });
    }
    let mut racing = Vec::new();
    bounded("concurrent resends", async {
        while let Some(sent) = tasks.join_next().await {
            racing.push(sent.expect("a sender task"));
        }
    })
    .await;
    assert_eq!(racing.iter().filter(|s| !s.duplicate).count(), 1);
    assert!(racing.iter().all(|s| s.big && s.message.seq == 2));

    let err = assert_code(
        store.send(draft(&g, 9, "out", "x")).await,
        Code::NotAllowed,
        "a non-member sends to a big group",
    );
    assert!(matches!(err, Error::NotMember { mid: 9, .. }), "{err:?}");
    let system = send(&store, draft(&g, 9, "sys", "notice").system()).await;
    assert!(system.big && system.inbox.is_empty() && !system.duplicate);
    assert_eq!(system.message.seq, 3);
    assert!(inbox(&store, 9).await.is_empty());
    assert!(
        store.conversations(9, 0).await.expect("list").is_empty(),
        "a system sender is not made a member"
    );

    // READ: forward only, capped, members only.
    let pos = store.read(&g, 3, 2).await.expect("a member reads");
    assert_eq!((pos.read_seq, pos.max_seq, pos.advanced), (2, 3, true));
    let pos = store.read(&g, 3, 1).await.expect("a member reads");
    assert_eq!((pos.read_seq, pos.advanced), (2, false));
    let pos = store.read(&g, 3, 99).await.expect("a member reads");
    assert_eq!((pos.read_seq, pos.advanced), (3, true));
    assert_code(
        store.read(&g, 9, 1).await,
        Code::NotAllowed,
        "a non-member reads a big group",
    );
    let list = store.conversations(3, 0).await.expect("conversations");
    assert_eq!(
        (list[0].max_seq, list[0].read_seq, list[0].unread),
        (3, 3, 0)
    );
    let list = store.conversations(1, 0).await.expect("conversations");
    assert_eq!(
        (list[0].max_seq, list[0].read_seq, list[0].unread),
        (3, 1, 2),
        "1 read up to its own send"
    );
    assert_eq!(list[0].last.as_ref().map(|m| m.cmid.as_str()), Some("sys"));

    assert_code(
        store.pull(&g, Reader::Member(9), Page::Latest, 0).await,
        Code::NotAllowed,
        "a non-member pulls a big group",
    );
    // Membership changes as for any group; a new member starts at the
    // latest seq.
    let changed = store.change_members(&g, &[4], &[2]).await.expect("changed");
    assert_eq!(
        (changed.added, changed.removed, changed.members),
        (vec![4], vec![2], 3)
    );
    let list = store.conversations(4, 0).await.expect("conversations");
    assert_eq!(
        (list[0].max_seq, list[0].read_seq, list[0].unread),
        (3, 3, 0)
    );
    assert!(store.conversations(2, 0).await.expect("list").is_empty());
    assert_code(
        store.send(draft(&g, 2, "gone", "x")).await,
        Code::NotAllowed,
        "a removed member sends",
    );
    let sent = send(&store, draft(&g, 4, "new", "x")).await;
    assert!(sent.big && sent.inbox.is_empty());
    assert_eq!(sent.message.seq, 4);
    let page = store.members(&g, None, 0).await.expect("members");
    assert_eq!(page.mids, vec![1, 3, 4]);
    assert_eq!(
        store.big_groups(4, 0).await.expect("big groups"),
        vec![g.clone()]
    );
    assert!(store.big_groups(2, 0).await.expect("big groups").is_empty());
}

/// (m) The mode is sticky: a big group put again as not big stays big, a
/// small group put as big becomes big for good; `big_groups` lists the big
/// groups a user is in (not its small groups, pairs or others' groups),
/// ascending by conversation id, within its limit.
pub async fn big_mode_is_sticky_and_big_groups_lists_a_users<B: Backend>(backend: &B) {
    let store = backend.open().await;
    let spec = |big: bool| GroupSpec {
        name: "n".into(),
        max_members: 1000,
        big,
    };
    let g = conv("g:stick");
    let made = store.put_group(&g, spec(true)).await.expect("created");
    assert!(made.big && made.created);
    let again = store.put_group(&g, spec(false)).await.expect("updated");
    assert!(again.big && !again.created, "still big: {again:?}");
    assert!(store.group(&g).await.expect("group").big);

    let s = conv("g:small");
    let made = store.put_group(&s, spec(false)).await.expect("created");
    assert!(!made.big);
    assert!(!store.group(&s).await.expect("group").big);
    store.change_members(&s, &[5, 6], &[]).await.expect("added");
    let sent = send(&store, draft(&s, 5, "before", "x")).await;
    assert!(!sent.big);
    assert_eq!(
        sent.inbox.iter().map(|e| e.mid).collect::<Vec<_>>(),
        vec![5, 6]
    );
    let flipped = store.put_group(&s, spec(true)).await.expect("updated");
    assert!(flipped.big && flipped.members == 2);
    let back = store.put_group(&s, spec(false)).await.expect("updated");
    assert!(back.big, "never back to inbox diffusion");
    let sent = send(&store, draft(&s, 6, "after", "x")).await;
    assert!(sent.big && sent.inbox.is_empty());
    assert_eq!(sent.message.seq, 2);
    let resent = send(&store, draft(&s, 5, "before", "x")).await;
    assert!(
        resent.duplicate && resent.big,
        "a resend answers as the group is now"
    );
    assert_eq!(
        inbox(&store, 6).await.len(),
        1,
        "the entry from before stays"
    );

    // User 5: big groups b-1, B-3 (ids in byte order: "g:B-3" < "g:b-1"),
    // z-2, stick and small (flipped); a small group and a pair; big groups
    // it is not in.
    let mut mine = vec![g.clone(), s.clone()];
    for gid in ["b-1", "z-2", "B-3"] {
        mine.push(big_group(&store, gid, [4, 5, 7]).await);
    }
    big_group(&store, "other", [4, 7]).await;
    group(&store, "plain", 10, [5, 7]).await;
    let gone = big_group(&store, "left", [5]).await;
    store.change_members(&gone, &[], &[5]).await.expect("left");
    store.change_members(&g, &[5], &[]).await.expect("added");
    let pair = ConvId::peer(5, 8).expect("conv");
    send(&store, draft(&pair, 8, "hi", "x")).await;
    mine.sort();

    let listed = store.big_groups(5, 0).await.expect("big groups");
    assert_eq!(listed, mine, "5's big groups, ascending");
    assert_eq!(
        listed.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["g:B-3", "g:b-1", "g:small", "g:stick", "g:z-2"]
    );
    assert_eq!(
        store.big_groups(5, 2).await.expect("big groups"),
        mine[..2].to_vec(),
        "the limit"
    );
    assert_eq!(
        store.big_groups(5, u32::MAX).await.expect("big groups"),
        mine,
        "a limit above {MAX_BIG_GROUPS_LIMIT} is clamped"
    );
    assert_eq!(
        store.big_groups(7, 0).await.expect("big groups"),
        ["g:B-3", "g:b-1", "g:other", "g:z-2"].map(conv).to_vec()
    );
    assert_eq!(
        store.big_groups(6, 0).await.expect("big groups"),
        vec![s.clone()]
    );
    assert!(store.big_groups(8, 0).await.expect("big groups").is_empty());
    assert!(
        store
            .big_groups(99, 0)
            .await
            .expect("big groups")
            .is_empty()
    );
}

/// (n) Sends to pairs, small groups and big groups at once share batches:
/// each pair and small group message has an inbox entry per member and
/// nothing else does; every inbox stays dense and every seq too.
pub async fn mixed_batches_give_each_conversation_its_inbox_entries<B: Backend>(backend: &B) {
    const USERS: i64 = 12;
    const ROUNDS: usize = 20;
    let store = backend.open().await;
    let big = big_group(&store, "mixed-big", 1..=USERS).await;
    let small = group(&store, "mixed-small", 10, [1, 2, 3, 4, 5, 6]).await;
    let members = |conv: &ConvId| -> Vec<i64> {
        if *conv == small {
            vec![1, 2, 3, 4, 5, 6]
        } else if let ConvId::Peer { low, high } = conv {
            vec![*low, *high]
        } else {
            unreachable!("{conv}")
        }
    };
    let partner = |mid: i64| if mid % 2 == 1 { mid + 1 } else { mid - 1 };
    let before = store.commits();
    let mut tasks = JoinSet::new();
    for from in 1..=USERS {
        let (store, big, small) = (store.clone(), big.clone(), small.clone());
        let pair = ConvId::peer(from, partner(from)).expect("conv");
        tasks.spawn(async move {
            let mut sent = Vec::new();
            for round in 0..ROUNDS {
                sent.push(send(&store, draft(&big, from, &format!("b{round}"), "x")).await);
                if from <= 6 {
                    sent.push(send(&store, draft(&small, from, &format!("s{round}"), "x")).await);
                }
                sent.push(send(&store, draft(&pair, from, &format!("p{round}"), "x")).await);
            }
            sent
        });
    }
    let mut all = Vec::new();
    bounded("mixed sends", async {
        while let Some(sent) = tasks.join_next().await {
            all.extend(sent.expect("a sender task"));
        }
    })
    .await;
    let commits = store.commits() - before;
    eprintln!("mixed: {} sends in {commits} commits", all.len());

    // Each user's expected entries, from the acknowledged sends.
    let mut want: BTreeMap<i64, BTreeSet<(ConvId, u64)>> = BTreeMap::new();
    let mut per_conv: BTreeMap<ConvId, Vec<u64>> = BTreeMap::new();
    for s in &all {
        assert!(!s.duplicate);
        per_conv
            .entry(s.message.conv.clone())
            .or_default()
            .push(s.message.seq);
        if s.message.conv == big {
            assert!(s.big && s.inbox.is_empty(), "big: {s:?}");
            continue;
        }
        assert!(!s.big, "not big: {s:?}");
        let to: Vec<i64> = s.inbox.iter().map(|e| e.mid).collect();
        assert_eq!(to, members(&s.message.conv), "{}", s.message.conv);
        for e in &s.inbox {
            want.entry(e.mid)
                .or_default()
                .insert((s.message.conv.clone(), s.message.seq));
        }
    }
    for (conv, seqs) in &mut per_conv {
        seqs.sort_unstable();
        let n = seqs.len() as u64;
        assert_eq!(*seqs, (1..=n).collect::<Vec<u64>>(), "{conv}'s seqs");
    }
    assert_eq!(per_conv[&big].len(), USERS as usize * ROUNDS);
    for mid in 1..=USERS {
        let got = inbox(&store, mid).await;
        assert_eq!(
            got.iter().map(|e| e.sync).collect::<Vec<_>>(),
            (1..=got.len() as u64).collect::<Vec<_>>(),
            "{mid}'s syncs are dense"
        );
        let got: BTreeSet<(ConvId, u64)> = got
            .into_iter()
            .map(|e| (e.message.conv, e.message.seq))
            .collect();
        assert_eq!(
            got, want[&mid],
            "{mid}'s inbox: its pair and small group only"
        );
        let expected = ROUNDS * 2 + if mid <= 6 { ROUNDS * 6 } else { 0 };
        assert_eq!(got.len(), expected, "{mid}'s entries");
        let list = store.conversations(mid, 0).await.expect("conversations");
        let line = list.iter().find(|l| l.conv == big).expect("the big group");
        assert_eq!(line.max_seq, USERS as u64 * ROUNDS as u64);
    }
}
