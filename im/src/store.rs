//! The message store boundary (im.md, Storage): what logic asks of the
//! store, whichever backend keeps the rows. Every backend passes the one
//! behaviour suite in im/tests/suite.
//!
//! The rules every backend keeps:
//! - A send is one durable step: the message, its seq, the inbox entry of
//!   every member (the sender's included when a member) and the sender's
//!   read position commit together or not at all, and `send` returns only
//!   once the commit is durable per the backend's settings. A failure
//!   returns [`Error::Unavailable`](crate::Error::Unavailable) and stores nothing.
//! - A big group (read diffusion, im.md "Big groups"; [`Group::big`]) gets
//!   no inbox entries: a send to it stores the message, its seq and the
//!   sender's read position, and touches no member's rows but the sender's
//!   (its membership and its read position), so its cost does not grow
//!   with the group. Members follow its seq themselves and PULL; their
//!   conversation list still shows it (max_seq, read_seq, unread, last),
//!   and [`MessageStore::big_groups`] tells which of a user's groups are
//!   big. A group once big stays big.
//! - A conversation's seq is 1, 2, 3, … with no hole and no reuse: it is
//!   assigned inside the transaction that stores the message, so a rolled
//!   back or crashed send gives its number back.
//! - `(conv, from, cmid)` is unique: a resend returns the first send's
//!   message with `duplicate: true` and stores nothing.
//! - Each user's inbox `sync` is dense 1, 2, 3, … in commit order.
//! - Writes are batched (group commit): concurrent sends share one commit.
//! - Retention ([`MessageStore::prune`]) removes a conversation's oldest
//!   messages only: everything below its `min_seq` is gone, everything from
//!   it up to `max_seq` is kept. A user's inbox loses the entries before the
//!   first one whose message is kept (`min_sync`); an entry further on whose
//!   message a conversation's cap removed is skipped by SYNC. A read below
//!   what is kept answers `reset` rather than a page with holes.

use async_trait::async_trait;

use crate::conv::ConvId;
use crate::error::Result;
use crate::id::MessageId;
use crate::message::Draft;

/// The most inbox entries one SYNC returns (im.md: L ≤ 200).
pub const MAX_SYNC_LIMIT: u32 = 200;
/// The inbox entries a SYNC returns when it names no limit.
pub const DEFAULT_SYNC_LIMIT: u32 = 100;
/// The most messages one PULL or history page returns (im.md: ≤ 100).
pub const MAX_PULL_LIMIT: u32 = 100;
/// The most conversations one listing returns.
pub const MAX_CONVERSATIONS_LIMIT: u32 = 500;
/// The most members one page of a group's members returns.
pub const MAX_MEMBERS_LIMIT: u32 = 1000;
/// The most big groups one [`MessageStore::big_groups`] call returns.
pub const MAX_BIG_GROUPS_LIMIT: u32 = 1000;

/// Clamps a requested page size to `1..=max`; 0 means `default`.
pub fn clamp_limit(limit: u32, default: u32, max: u32) -> u32 {
    if limit == 0 { default } else { limit.min(max) }
}

/// A stored message (im.md, Model).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The conversation.
    pub conv: ConvId,
    /// Its place in the conversation: 1, 2, 3, … without holes.
    pub seq: u64,
    /// Globally unique, time-ordered.
    pub id: MessageId,
    /// The sender's mid.
    pub from: i64,
    /// The sender's client message id.
    pub cmid: String,
    /// The business's content type (`type` on the wire; 0 = text).
    pub kind: i32,
    /// The content.
    pub body: String,
    /// When the server accepted it, unix milliseconds (the id's time).
    pub ts: i64,
}

/// One user's inbox entry: "message `seq` of `conv` concerns `mid`".
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InboxEntry {
    /// The user.
    pub mid: i64,
    /// The entry's place in the user's inbox: 1, 2, 3, … without holes.
    pub sync: u64,
}

/// The outcome of a send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sent {
    /// The stored message (for a duplicate, the first send's).
    pub message: Message,
    /// True when `(conv, from, cmid)` was already stored: nothing new was
    /// stored and `inbox` is empty.
    pub duplicate: bool,
    /// The new inbox entry of every member, the sender's included when it
    /// is a member, ordered by mid; empty for a big group.
    pub inbox: Vec<InboxEntry>,
    /// True when the conversation is a big group (read diffusion): the
    /// message, its seq and the sender's read position were stored, and no
    /// inbox entry (`inbox` is empty); its members learn of it by a push
    /// to the group and PULL. A duplicate says it too.
    pub big: bool,
    /// Members whose inbox lives on another primary of a sharded store and
    /// whose entry is not appended yet (that primary was unreachable): the
    /// message's primary keeps them in its outbox and
    /// [`MessageStore::relay`] appends them later. Empty on a single
    /// store, and once every entry is in `inbox`.
    pub pending: Vec<i64>,
}

/// Inbox entries appended late by [`MessageStore::relay`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Relayed {
    /// The entries appended (owner, sync), whose owners' devices have not
    /// been told.
    pub appended: Vec<InboxEntry>,
    /// More was waiting than one call handles.
    pub more: bool,
}

/// A message as found in a user's inbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Synced {
    /// The inbox entry's place.
    pub sync: u64,
    /// The message.
    pub message: Message,
}

/// A page of a user's inbox (SYNC_REPLY).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncPage {
    /// Entries after the requested sync, oldest first, dense.
    pub entries: Vec<Synced>,
    /// Where the device continues: the last entry's sync, or when the page
    /// is empty the requested sync capped at the user's latest entry.
    pub sync: u64,
    /// True when entries after `sync` exist.
    pub more: bool,
    /// True when some of what was asked for is no longer retained (the
    /// requested sync is below the user's oldest entry, or an entry's
    /// message was pruned): reload conversations, continue from `sync`.
    pub reset: bool,
}

/// Which page of a conversation's history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Page {
    /// Messages with a seq below this one, newest first.
    Before(u64),
    /// Messages with a seq above this one, oldest first.
    After(u64),
    /// The newest messages, newest first.
    Latest,
}

/// A page of a conversation's history (PULL_REPLY).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PullPage {
    /// The messages, in the page's order.
    pub messages: Vec<Message>,
    /// The conversation's latest seq (0 when empty).
    pub max_seq: u64,
    /// The oldest seq still retained (1 while nothing was pruned).
    pub min_seq: u64,
    /// True when the request asked for messages below `min_seq`: the page
    /// then holds the oldest retained messages, from `min_seq` up.
    pub reset: bool,
}

/// What retention keeps (`im.retention_days`, `im.max_messages_per_conv`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// Messages accepted before this Unix time (ms) go; `None` keeps them
    /// whatever their age.
    pub before_ms: Option<u64>,
    /// Each conversation keeps at most its latest this many; `None` keeps
    /// them all.
    pub max_per_conv: Option<u64>,
}

impl Retention {
    /// Whether anything is ever pruned.
    pub fn prunes(&self) -> bool {
        self.before_ms.is_some() || self.max_per_conv.is_some()
    }
}

/// What one pruning step removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Messages removed.
    pub messages: u64,
    /// Inbox entries removed.
    pub inbox: u64,
    /// The step stopped at its budget, or its sweeps over conversations
    /// and users have not reached their end: another one has work now.
    pub more: bool,
}

/// Where a backend's pruning sweeps continue from between steps.
#[derive(Clone, Debug)]
pub(crate) struct PruneCursor {
    /// The last conversation checked against the per-conversation cap.
    pub(crate) conv: String,
    /// The last user whose inbox was swept.
    pub(crate) mid: i64,
}

impl Default for PruneCursor {
    fn default() -> PruneCursor {
        PruneCursor {
            conv: String::new(),
            mid: i64::MIN,
        }
    }
}

/// Conversations checked against the cap, and users whose inboxes are
/// swept, per pruning step at most.
pub(crate) const PRUNE_SWEEP: u32 = 200;

/// The spending of one pruning step: both backends decide by it what to
/// remove, and run the removals it answers.
pub(crate) struct PruneStep {
    budget: u64,
    /// What the step removed so far.
    pub(crate) pruned: Pruned,
}

/// What to do with one swept user's inbox.
pub(crate) enum InboxCut {
    /// Nothing before its first retained entry.
    Keep,
    /// Remove the entries below `upto`; `all` when that is everything
    /// before the first retained entry.
    Cut { upto: u64, all: bool },
    /// The budget is spent: stop the sweep before this user.
    Stop,
}

impl PruneStep {
    pub(crate) fn new(budget: u64) -> PruneStep {
        PruneStep {
            budget,
            pruned: Pruned::default(),
        }
    }

    fn left(&self) -> u64 {
        self.budget
            .saturating_sub(self.pruned.messages + self.pruned.inbox)
    }

    /// Notes that the age query found `found` expired messages: as many as
    /// the budget means there may be more.
    pub(crate) fn expired_found(&mut self, found: u64) {
        self.pruned.more |= found >= self.budget;
    }

    /// Where to cut a conversation now: its messages below the returned
    /// seq go. `expired` is its newest message past the age limit, if any;
    /// `None` when nothing is to go, or the budget is spent (then `more`).
    pub(crate) fn conv_upto(
        &mut self,
        retention: &Retention,
        max_seq: u64,
        min_seq: u64,
        expired: Option<u64>,
    ) -> Option<u64> {
        let by_age = expired.map_or(0, |seq| seq + 1);
        let by_cap = retention
            .max_per_conv
            .map_or(0, |keep| (max_seq + 1).saturating_sub(keep));
        let floor = by_age.max(by_cap);
        if floor <= min_seq {
            return None;
        }
        let left = self.left();
        if left == 0 {
            self.pruned.more = true;
            return None;
        }
        let upto = floor.min(min_seq.saturating_add(left));
        self.pruned.more |= upto < floor;
        Some(upto)
    }

    /// Counts messages removed.
    pub(crate) fn removed_messages(&mut self, removed: u64) {
        self.pruned.messages += removed;
    }

    /// What to do with a user whose oldest entry is `min_sync` and whose
    /// first entry with a retained message is `first_kept`.
    pub(crate) fn inbox_cut(&mut self, min_sync: u64, first_kept: u64) -> InboxCut {
        if first_kept <= min_sync {
            return InboxCut::Keep;
        }
        let left = self.left();
        if left == 0 {
            self.pruned.more = true;
            return InboxCut::Stop;
        }
        let upto = first_kept.min(min_sync.saturating_add(left));
        let all = upto == first_kept;
        self.pruned.more |= !all;
        InboxCut::Cut { upto, all }
    }

    /// Counts inbox entries removed.
    pub(crate) fn removed_inbox(&mut self, removed: u64) {
        self.pruned.inbox += removed;
    }

    /// Notes whether a sweep reached its end in this step.
    pub(crate) fn swept(&mut self, to_the_end: bool) {
        self.pruned.more |= !to_the_end;
    }
}

/// Who asks for a conversation's history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reader {
    /// A user: must be a member of the conversation.
    Member(i64),
    /// A business server through the HTTP API: no membership check.
    Business,
}

/// A member's read position after a READ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadPos {
    /// The member's read seq (never decreases; never above `max_seq`).
    pub read_seq: u64,
    /// The conversation's latest seq.
    pub max_seq: u64,
    /// True when this READ moved the position.
    pub advanced: bool,
}

/// One line of a user's conversation list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvSummary {
    /// The conversation.
    pub conv: ConvId,
    /// Its latest seq.
    pub max_seq: u64,
    /// The user's read position.
    pub read_seq: u64,
    /// `max_seq - read_seq`.
    pub unread: u64,
    /// The latest message, if any.
    pub last: Option<Message>,
}

/// A group's settings as the business sets them (PUT /im/v1/groups/{gid}).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupSpec {
    /// Display name.
    pub name: String,
    /// The most members the group may have.
    pub max_members: u32,
    /// Read diffusion: the caller sets it when `max_members` is above
    /// `im.big_group_members`. It is sticky: once a group is stored big,
    /// a later `false` leaves it big (see [`Group::big`]).
    pub big: bool,
}

/// A group as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// The group's conversation.
    pub conv: ConvId,
    /// Display name.
    pub name: String,
    /// The most members it may have.
    pub max_members: u32,
    /// How many members it has.
    pub members: u32,
    /// True when the group is big (read diffusion): its messages get no
    /// inbox entries. Never goes back to false: the devices of a big
    /// group's members track it by PULL, and inbox entries that started
    /// again after a flip back would begin at an arbitrary seq, leaving
    /// before them a stretch of the group no inbox ever carried (nor would
    /// a device know to stop pulling).
    pub big: bool,
    /// True when this call created it.
    pub created: bool,
}

/// The outcome of a membership change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MembersChanged {
    /// Mids that became members (already members are not listed), ascending.
    pub added: Vec<i64>,
    /// Mids that stopped being members (non-members are not listed), ascending.
    pub removed: Vec<i64>,
    /// The member count after the change.
    pub members: u32,
}

/// A page of a group's members.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MembersPage {
    /// Member mids, ascending.
    pub mids: Vec<i64>,
    /// The cursor of the next page (the last mid here), if there are more.
    pub next: Option<i64>,
}

/// Where IM state lives. Implementations are cheap to share (`Arc`) and
/// safe to call concurrently; every method either completes or returns an
/// error having changed nothing.
#[async_trait]
pub trait MessageStore: Send + Sync + 'static {
    /// Stores a message (see the module's rules). A group send by a user
    /// who is not a member, or to a group that does not exist, is refused
    /// with [`Error::NotMember`](crate::Error::NotMember) unless the draft is a system send; a
    /// 1:1 conversation's two users are its members (created on its first
    /// message). The sender's read position moves to the new seq. A big
    /// group's message gets no inbox entries ([`Sent::big`]).
    async fn send(&self, draft: Draft) -> Result<Sent>;

    /// Returns `mid`'s inbox entries after `after`, oldest first, at most
    /// `limit` (clamped with [`clamp_limit`] to `DEFAULT_SYNC_LIMIT` /
    /// `MAX_SYNC_LIMIT`).
    async fn sync(&self, mid: i64, after: u64, limit: u32) -> Result<SyncPage>;

    /// Returns each user's latest inbox entry (0 for a user without
    /// one), in the order of `mids`, in one read whatever their number.
    async fn inbox_heads(&self, mids: &[i64]) -> Result<Vec<u64>>;

    /// Removes, in one step of at most `budget` rows, what `retention` no
    /// longer keeps: the oldest messages of conversations (moving their
    /// `min_seq`) and the inbox entries before each user's first retained
    /// one (moving their `min_sync`). Short transactions; sends go on
    /// beside it, and several processes may prune one store at once.
    async fn prune(&self, retention: &Retention, budget: u32) -> Result<Pruned>;

    /// Returns a page of `conv`'s history, at most `limit` messages
    /// (clamped to `1..=MAX_PULL_LIMIT`, 0 meaning the max). A member
    /// reader of a conversation it is not in gets [`Error::NotMember`](crate::Error::NotMember); a
    /// conversation without messages gives an empty page with `max_seq` 0.
    async fn pull(&self, conv: &ConvId, reader: Reader, page: Page, limit: u32)
    -> Result<PullPage>;

    /// Moves `mid`'s read position in `conv` to `seq` (capped at the
    /// conversation's latest seq) if that is ahead of it; a non-member gets
    /// [`Error::NotMember`](crate::Error::NotMember).
    async fn read(&self, conv: &ConvId, mid: i64, seq: u64) -> Result<ReadPos>;

    /// Returns `mid`'s conversations, the most recent message first (ties
    /// by conversation id), at most `limit` (clamped to
    /// `1..=MAX_CONVERSATIONS_LIMIT`, 0 meaning the max).
    async fn conversations(&self, mid: i64, limit: u32) -> Result<Vec<ConvSummary>>;

    /// Creates group `conv` or updates its name and member limit; the
    /// stored group is big when it already was or `spec.big` is set (a
    /// group never goes back to inbox diffusion). `conv` must be a group
    /// id.
    async fn put_group(&self, conv: &ConvId, spec: GroupSpec) -> Result<Group>;

    /// Adds and removes members of group `conv` (removals first, then
    /// additions); a mid in both lists ends up a member. Refused with
    /// [`Error::NoSuchGroup`](crate::Error::NoSuchGroup) if it does not exist and with
    /// [`Error::GroupFull`](crate::Error::GroupFull) if the result would exceed its member limit
    /// (nothing changes then). A new member's read position starts at the
    /// group's latest seq.
    async fn change_members(
        &self,
        conv: &ConvId,
        add: &[i64],
        remove: &[i64],
    ) -> Result<MembersChanged>;

    /// Returns a page of group `conv`'s members with mids above `after`,
    /// ascending, at most `limit` (clamped to `1..=MAX_MEMBERS_LIMIT`, 0
    /// meaning the max); [`Error::NoSuchGroup`](crate::Error::NoSuchGroup) if it does not exist.
    async fn members(&self, conv: &ConvId, after: Option<i64>, limit: u32) -> Result<MembersPage>;

    /// Returns the group's settings, or [`Error::NoSuchGroup`](crate::Error::NoSuchGroup).
    async fn group(&self, conv: &ConvId) -> Result<Group>;

    /// Returns the big groups `mid` is a member of, ascending by
    /// conversation id, at most `limit` (clamped to
    /// `1..=MAX_BIG_GROUPS_LIMIT`, 0 meaning the max), in one indexed read
    /// (logic asks at every connect and presence renewal).
    async fn big_groups(&self, mid: i64, limit: u32) -> Result<Vec<ConvId>>;

    /// Appends the inbox entries a sharded store's sends left pending
    /// (their members' primary was unreachable, or the process died
    /// between the message's commit and the append), at most `budget`
    /// messages' worth; idempotent, so every logic may run it. A single
    /// store has nothing pending.
    async fn relay(&self, _budget: u32) -> Result<Relayed> {
        Ok(Relayed::default())
    }

    /// Durable commits so far (group commit: fewer than the writes they carried); for metrics and the suite.
    fn commits(&self) -> u64;
}
