//! A [`MessageStore`] spread over several PostgreSQL primaries (im.md,
//! Storage: scale-out). Each primary is a [`PostgresStore`] with the whole
//! schema; the [`ShardMap`] says which one holds what:
//!
//! - a conversation's rows — its counter, messages, members, group
//!   settings — live on the primary of the conversation's bucket, so a
//!   send, a PULL, a READ and every group call go to that one primary, and
//!   a conversation's seq stays dense in one transaction there;
//! - a user's inbox and its sync counter live on the primary of the
//!   user's bucket, so each user's sync stays dense on that primary.
//!
//! A send commits the message, the inbox entries of the members whose
//! inbox is on the same primary, and — in the same transaction — an
//! outbox row for each member whose inbox is elsewhere. Right after the
//! commit the store appends those entries on their primaries and clears
//! the outbox rows. An append is idempotent (each late entry is recorded
//! under its (mid, conv, seq) key on the member's primary, found again by
//! a repeated append), so if the process dies between the commit and the
//! append, or a primary is unreachable then, [`MessageStore::relay`] —
//! which every logic runs in the background — appends the entries later
//! from the outbox: never lost, never doubled, and no distributed
//! transaction.
//!
//! Reads that span users' conversations (a user's conversation list, its
//! big groups) ask every primary and merge; SYNC reads the inbox on the
//! user's primary and the messages on theirs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures::future::join_all;

mod batching;

use self::batching::{Appender, Clearer};
use crate::conv::ConvId;
use crate::error::{Error, Result};
use crate::message::Draft;
use crate::postgres::{InboxKeys, Owed, PostgresOptions, PostgresStore};
use crate::shard::ShardMap;
use crate::store::{
    ConvSummary, DEFAULT_SYNC_LIMIT, Group, GroupSpec, InboxCut, InboxEntry, MAX_BIG_GROUPS_LIMIT,
    MAX_SYNC_LIMIT, MembersChanged, MembersPage, Message, MessageStore, PRUNE_SWEEP, Page,
    PruneStep, Pruned, PullPage, ReadPos, Reader, Relayed, Retention, Sent, SyncPage, Synced,
    clamp_limit,
};

/// How old an outbox row must be before the relay appends it: a send
/// appends its own entries within milliseconds, so the relay only finds
/// the ones a send could not.
const RELAY_AFTER: Duration = Duration::from_secs(2);

/// How long a send waits for another primary to append its members'
/// entries before it answers and leaves them to the relay: a slow or
/// unreachable primary delays the sender's acknowledgement at most this
/// much.
const APPEND_WAIT: Duration = Duration::from_secs(1);

/// A message store over several PostgreSQL primaries.
pub struct ShardedStore {
    shards: Vec<Arc<PostgresStore>>,
    map: Arc<ShardMap>,
    /// Per primary: appends its users' entries owed by sends elsewhere.
    appenders: Vec<Appender>,
    /// Per primary: clears its outbox of what was appended.
    clearers: Vec<Clearer>,
    /// Per primary: the last user whose inbox retention swept.
    inbox_cursors: parking_lot::Mutex<Vec<i64>>,
}

impl std::fmt::Debug for ShardedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedStore")
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

impl ShardedStore {
    /// Connects to every primary (`primaries[i]` is primary `i` of `map`),
    /// in order. The first decides the message-id node (see
    /// [`PostgresOptions::ids`]); the others must be able to lock the same
    /// one, or the store does not open.
    pub async fn connect(primaries: Vec<PostgresOptions>, map: ShardMap) -> Result<ShardedStore> {
        if primaries.len() != map.shards() {
            return Err(Error::invalid(
                "shards",
                format!(
                    "{} primaries for a map of {}",
                    primaries.len(),
                    map.shards()
                ),
            ));
        }
        let map = Arc::new(map);
        let mut shards = Vec::with_capacity(primaries.len());
        for (i, mut options) in primaries.into_iter().enumerate() {
            options.shard = Some((Arc::clone(&map), i));
            if i > 0 {
                options.exact_node = true;
            }
            shards.push(Arc::new(PostgresStore::connect(options).await?));
        }
        Ok(ShardedStore {
            inbox_cursors: parking_lot::Mutex::new(vec![i64::MIN; shards.len()]),
            appenders: shards
                .iter()
                .map(|shard| Appender::spawn(Arc::clone(shard), APPEND_WAIT))
                .collect(),
            clearers: shards
                .iter()
                .map(|shard| Clearer::spawn(Arc::clone(shard)))
                .collect(),
            shards,
            map,
        })
    }

    fn conv_shard(&self, conv: &ConvId) -> &PostgresStore {
        &self.shards[self.map.conv_shard(conv)]
    }

    /// Appends `owed` on the members' primaries (batched with other
    /// sends' there) and has them cleared from the outbox of `from` — in
    /// the background, or before returning when `clear_now`; returns the
    /// entries appended and the members whose entries could not be (they
    /// stay in the outbox for the relay).
    async fn append(
        &self,
        from: usize,
        owed: Vec<Owed>,
        clear_now: bool,
    ) -> (Vec<InboxEntry>, Vec<i64>) {
        let mut by_shard: BTreeMap<usize, Vec<Owed>> = BTreeMap::new();
        for o in owed {
            by_shard
                .entry(self.map.mid_shard(o.mid))
                .or_default()
                .push(o);
        }
        let appends = by_shard
            .into_iter()
            .map(|(to, owed)| async move { (self.appenders[to].append(owed.clone()).await, owed) });
        let mut entries = Vec::new();
        let mut failed = Vec::new();
        // Each message's outbox row goes once every entry of it is in.
        let mut done: BTreeMap<(String, u64), (ConvId, bool)> = BTreeMap::new();
        for (appended, owed) in join_all(appends).await {
            let ok = appended.is_ok();
            for o in &owed {
                let key = (o.conv.to_string(), o.seq);
                let entry = done.entry(key).or_insert_with(|| (o.conv.clone(), true));
                entry.1 &= ok;
            }
            match appended {
                Ok(appended) => entries.extend(appended),
                Err(err) => {
                    tracing::warn!(%err, entries = owed.len(), "inbox entries not appended on their primary; the relay appends them later");
                    failed.extend(owed.iter().map(|o| o.mid));
                }
            }
        }
        let done: Vec<(ConvId, u64)> = done
            .into_iter()
            .filter(|(_, (_, all_in))| *all_in)
            .map(|((_, seq), (conv, _))| (conv, seq))
            .collect();
        if !clear_now {
            self.clearers[from].clear(done);
        } else if let Err(err) = self.shards[from].clear_outbox(&done).await {
            // Appended: a later relay finds them appended and adds nothing.
            tracing::warn!(%err, "outbox not cleared; the relay finds its entries appended");
        }
        (entries, failed)
    }
}

impl ShardedStore {
    /// One step of the inbox sweep on primary `at`: each swept user's
    /// entries before the first one whose message is still kept go.
    async fn prune_inboxes(&self, at: usize, budget: u64) -> Result<Pruned> {
        let mut step = PruneStep::new(budget);
        let cursor = self.inbox_cursors.lock()[at];
        let shard = &self.shards[at];
        let users = shard.inbox_users(cursor, PRUNE_SWEEP).await?;
        let mut swept_all = users.len() < PRUNE_SWEEP as usize;
        let mut last = cursor;
        for (mid, min_sync, max_sync) in users {
            let first_kept = self.first_kept(at, mid, min_sync, max_sync).await?;
            match step.inbox_cut(min_sync, first_kept) {
                InboxCut::Keep => {}
                InboxCut::Stop => {
                    swept_all = false;
                    break;
                }
                InboxCut::Cut { upto, all } => {
                    step.removed_inbox(shard.cut_inbox(mid, upto).await?);
                    if !all {
                        // This user has more: the next step starts with it.
                        swept_all = false;
                        break;
                    }
                }
            }
            last = mid;
        }
        self.inbox_cursors.lock()[at] = if swept_all { i64::MIN } else { last };
        step.swept(swept_all);
        Ok(step.pruned)
    }

    /// The first of `mid`'s entries (from `min_sync`) whose message is
    /// still kept on its primary; `max_sync + 1` when none is.
    async fn first_kept(&self, at: usize, mid: i64, min_sync: u64, max_sync: u64) -> Result<u64> {
        let mut after = min_sync.saturating_sub(1);
        loop {
            let page = self.shards[at]
                .inbox_keys(mid, after, MAX_SYNC_LIMIT)
                .await?;
            let kept = self.kept(&page).await?;
            if let Some((sync, _, _)) = page
                .entries
                .iter()
                .find(|(_, conv, seq)| kept.contains(&(conv.to_string(), *seq)))
            {
                return Ok(*sync);
            }
            match page.entries.last() {
                Some((sync, _, _)) if page.more => after = *sync,
                _ => return Ok(max_sync + 1),
            }
        }
    }

    /// Which of a page's entries still have their message.
    async fn kept(&self, page: &InboxKeys) -> Result<HashSet<(String, u64)>> {
        Ok(self.messages_of(page).await?.into_keys().collect())
    }

    /// The messages of an inbox page's entries, read from their primaries
    /// at once, by (conv, seq); pruned ones are missing.
    async fn messages_of(&self, page: &InboxKeys) -> Result<HashMap<(String, u64), Message>> {
        let mut by_shard: BTreeMap<usize, Vec<(ConvId, u64)>> = BTreeMap::new();
        for (_, conv, seq) in &page.entries {
            by_shard
                .entry(self.map.conv_shard(conv))
                .or_default()
                .push((conv.clone(), *seq));
        }
        let reads = by_shard
            .into_iter()
            .map(|(shard, keys)| async move { self.shards[shard].messages_at(&keys).await });
        let mut found = HashMap::new();
        for messages in join_all(reads).await {
            for message in messages? {
                found.insert((message.conv.to_string(), message.seq), message);
            }
        }
        Ok(found)
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[async_trait]
impl MessageStore for ShardedStore {
    async fn send(&self, draft: Draft) -> Result<Sent> {
        let from = self.map.conv_shard(&draft.conv);
        let mut sent = self.shards[from].send(draft).await?;
        if sent.pending.is_empty() {
            return Ok(sent);
        }
        let owed = sent
            .pending
            .iter()
            .map(|&mid| Owed {
                conv: sent.message.conv.clone(),
                seq: sent.message.seq,
                mid,
            })
            .collect();
        let (entries, failed) = self.append(from, owed, false).await;
        sent.inbox.extend(entries);
        sent.inbox.sort_unstable();
        sent.pending = failed;
        Ok(sent)
    }

    async fn sync(&self, mid: i64, after: u64, limit: u32) -> Result<SyncPage> {
        let limit = clamp_limit(limit, DEFAULT_SYNC_LIMIT, MAX_SYNC_LIMIT);
        let page = self.shards[self.map.mid_shard(mid)]
            .inbox_keys(mid, after, limit)
            .await?;
        let mut found = self.messages_of(&page).await?;
        let mut entries = Vec::with_capacity(page.entries.len());
        let mut pruned = false;
        let mut last = None;
        for (sync, conv, seq) in page.entries {
            last = Some(sync);
            match found.remove(&(conv.to_string(), seq)) {
                Some(message) => entries.push(Synced { sync, message }),
                // Retention removed it: skipped, and the device is told.
                None => pruned = true,
            }
        }
        Ok(SyncPage {
            entries,
            sync: last.unwrap_or_else(|| after.min(page.latest)),
            more: page.more,
            reset: pruned || after.saturating_add(1) < page.oldest,
        })
    }

    async fn inbox_heads(&self, mids: &[i64]) -> Result<Vec<u64>> {
        let mut by_shard: BTreeMap<usize, Vec<(usize, i64)>> = BTreeMap::new();
        for (at, &mid) in mids.iter().enumerate() {
            by_shard
                .entry(self.map.mid_shard(mid))
                .or_default()
                .push((at, mid));
        }
        let reads = by_shard.into_iter().map(|(shard, wanted)| async move {
            let sub: Vec<i64> = wanted.iter().map(|(_, mid)| *mid).collect();
            (self.shards[shard].inbox_heads(&sub).await, wanted)
        });
        let mut heads = vec![0; mids.len()];
        for (found, wanted) in join_all(reads).await {
            for ((at, _), head) in wanted.into_iter().zip(found?) {
                heads[at] = head;
            }
        }
        Ok(heads)
    }

    async fn prune(&self, retention: &Retention, budget: u32) -> Result<Pruned> {
        let mut total = Pruned::default();
        let mut left = u64::from(budget);
        // Each primary prunes its conversations (their messages are all
        // there); the inboxes are swept here, where every primary's
        // messages can be seen. One budget for the whole step.
        for shard in &self.shards {
            if left == 0 {
                total.more = true;
                break;
            }
            let pruned = shard
                .prune(retention, u32::try_from(left).unwrap_or(u32::MAX))
                .await?;
            total.messages += pruned.messages;
            total.more |= pruned.more;
            left = left.saturating_sub(pruned.messages);
        }
        if retention.prunes() {
            for at in 0..self.shards.len() {
                if left == 0 {
                    total.more = true;
                    break;
                }
                let pruned = self.prune_inboxes(at, left).await?;
                total.inbox += pruned.inbox;
                total.more |= pruned.more;
                left = left.saturating_sub(pruned.inbox);
            }
        }
        Ok(total)
    }

    async fn pull(
        &self,
        conv: &ConvId,
        reader: Reader,
        page: Page,
        limit: u32,
    ) -> Result<PullPage> {
        self.conv_shard(conv).pull(conv, reader, page, limit).await
    }

    async fn read(&self, conv: &ConvId, mid: i64, seq: u64) -> Result<ReadPos> {
        self.conv_shard(conv).read(conv, mid, seq).await
    }

    async fn conversations(&self, mid: i64, limit: u32) -> Result<Vec<ConvSummary>> {
        let lists = join_all(
            self.shards
                .iter()
                .map(|shard| shard.conversations(mid, limit)),
        )
        .await;
        let mut all = Vec::new();
        for list in lists {
            all.extend(list?);
        }
        // The order a single store gives: the latest message first, then
        // conversation ids in byte order.
        all.sort_by(|a, b| {
            let ts = |c: &ConvSummary| c.last.as_ref().map_or(0, |m| m.ts);
            ts(b)
                .cmp(&ts(a))
                .then_with(|| a.conv.to_string().cmp(&b.conv.to_string()))
        });
        all.truncate(clamp_limit(limit, u32::MAX, crate::MAX_CONVERSATIONS_LIMIT) as usize);
        Ok(all)
    }

    async fn put_group(&self, conv: &ConvId, spec: GroupSpec) -> Result<Group> {
        self.conv_shard(conv).put_group(conv, spec).await
    }

    async fn change_members(
        &self,
        conv: &ConvId,
        add: &[i64],
        remove: &[i64],
    ) -> Result<MembersChanged> {
        self.conv_shard(conv)
            .change_members(conv, add, remove)
            .await
    }

    async fn members(&self, conv: &ConvId, after: Option<i64>, limit: u32) -> Result<MembersPage> {
        self.conv_shard(conv).members(conv, after, limit).await
    }

    async fn group(&self, conv: &ConvId) -> Result<Group> {
        self.conv_shard(conv).group(conv).await
    }

    async fn big_groups(&self, mid: i64, limit: u32) -> Result<Vec<ConvId>> {
        let lists = join_all(self.shards.iter().map(|shard| shard.big_groups(mid, limit))).await;
        let mut all = Vec::new();
        for list in lists {
            all.extend(list?);
        }
        all.sort_by_cached_key(ToString::to_string);
        all.truncate(clamp_limit(limit, MAX_BIG_GROUPS_LIMIT, MAX_BIG_GROUPS_LIMIT) as usize);
        Ok(all)
    }

    async fn relay(&self, budget: u32) -> Result<Relayed> {
        let before = now_ms().saturating_sub(RELAY_AFTER.as_millis() as i64);
        let mut relayed = Relayed::default();
        for (from, shard) in self.shards.iter().enumerate() {
            let due = shard.outbox_due(before, budget).await?;
            let rows: HashSet<(String, u64)> =
                due.iter().map(|o| (o.conv.to_string(), o.seq)).collect();
            relayed.more |= rows.len() >= budget as usize;
            let (entries, failed) = self.append(from, due, true).await;
            relayed.appended.extend(entries);
            relayed.more |= !failed.is_empty();
        }
        Ok(relayed)
    }

    fn commits(&self) -> u64 {
        self.shards.iter().map(|s| s.commits()).sum()
    }
}
