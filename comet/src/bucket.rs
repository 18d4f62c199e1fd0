//! A shard of the comet's sessions, keyed by connection key, with the rooms
//! of those sessions and the big groups' delivery channels they are in.
//! Rooms and channels are split across buckets like sessions are, so a
//! broadcast takes each bucket's lock for that bucket's members only.
//!
//! A session is in at most one room (goim's model) but in any number of
//! channels: one per big group its user is a member of (im.md, read
//! diffusion). Only sessions in some channel cost a channel entry.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::session::Session;

/// One shard of sessions and their rooms.
#[derive(Debug, Default)]
pub(crate) struct Bucket {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Sessions by connection key; the key is the session's own (no copy).
    sessions: HashSet<ByKey>,
    /// room → session id → session. Members share the room name with this
    /// map's key.
    rooms: HashMap<Arc<str>, HashMap<u64, Arc<Session>>>,
    /// big group channel → session id → session.
    channels: HashMap<Arc<str>, HashMap<u64, Arc<Session>>>,
    /// session id → the channels it is in (sessions in none are absent).
    joined: HashMap<u64, Vec<Arc<str>>>,
}

/// A session hashed and compared by its connection key, so the set needs no
/// second copy of every key (one allocation less per connection).
#[derive(Debug)]
struct ByKey(Arc<Session>);

impl Hash for ByKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Same hash as the `str` it borrows as (Borrow's contract).
        self.0.key.hash(state);
    }
}

impl PartialEq for ByKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.key == other.0.key
    }
}

impl Eq for ByKey {}

impl Borrow<str> for ByKey {
    fn borrow(&self) -> &str {
        &self.0.key
    }
}

impl Inner {
    fn leave_room(&mut self, session: &Session) {
        if let Some(room) = session.room() {
            if let Some(members) = self.rooms.get_mut(&*room) {
                members.remove(&session.id);
                if members.is_empty() {
                    self.rooms.remove(&*room);
                }
            }
            session.set_room(None);
        }
    }

    fn join_room(&mut self, session: &Arc<Session>, room: Box<str>) {
        // Members of a room share one copy of its name.
        let room = match self.rooms.get_key_value(&*room) {
            Some((name, _)) => Arc::clone(name),
            None => Arc::from(room),
        };
        self.rooms
            .entry(Arc::clone(&room))
            .or_default()
            .insert(session.id, Arc::clone(session));
        session.set_room(Some(room));
    }

    /// Puts a session in a channel; false when it already was.
    fn join_channel(&mut self, session: &Arc<Session>, group: &str) -> bool {
        let name = match self.channels.get_key_value(group) {
            Some((name, _)) => Arc::clone(name),
            None => Arc::from(group),
        };
        let members = self.channels.entry(Arc::clone(&name)).or_default();
        if members.insert(session.id, Arc::clone(session)).is_some() {
            return false;
        }
        self.joined.entry(session.id).or_default().push(name);
        true
    }

    /// Takes a session out of a channel; false when it was not in it.
    fn leave_channel(&mut self, session: &Session, group: &str) -> bool {
        let Some(members) = self.channels.get_mut(group) else {
            return false;
        };
        if members.remove(&session.id).is_none() {
            return false;
        }
        if members.is_empty() {
            self.channels.remove(group);
        }
        if let Some(groups) = self.joined.get_mut(&session.id) {
            groups.retain(|name| &**name != group);
            if groups.is_empty() {
                self.joined.remove(&session.id);
            }
        }
        true
    }

    /// Takes a session out of every channel.
    fn leave_channels(&mut self, session: &Session) {
        for group in self.joined.remove(&session.id).unwrap_or_default() {
            if let Some(members) = self.channels.get_mut(&group) {
                members.remove(&session.id);
                if members.is_empty() {
                    self.channels.remove(&group);
                }
            }
        }
    }

    fn is_current(&self, session: &Session) -> bool {
        self.sessions
            .get(&*session.key)
            .is_some_and(|current| current.0.id == session.id)
    }
}

impl Bucket {
    /// Adds a session, in `room` if given; returns the session it replaced
    /// (same key), which has been taken out of its room.
    pub(crate) fn put(
        &self,
        session: &Arc<Session>,
        room: Option<Box<str>>,
    ) -> Option<Arc<Session>> {
        let mut inner = self.inner.lock();
        let replaced = inner
            .sessions
            .replace(ByKey(Arc::clone(session)))
            .map(|old| old.0);
        if let Some(old) = &replaced {
            inner.leave_room(old);
            inner.leave_channels(old);
        }
        if let Some(room) = room {
            inner.join_room(session, room);
        }
        replaced
    }

    /// Removes a session unless a newer one took its key; returns whether it
    /// was still the current session for its key.
    pub(crate) fn remove(&self, session: &Session) -> bool {
        let mut inner = self.inner.lock();
        if !inner.is_current(session) {
            return false;
        }
        inner.sessions.remove(&*session.key);
        inner.leave_room(session);
        inner.leave_channels(session);
        true
    }

    /// Moves a session to another room (`None` = leave); false when the
    /// session is no longer current.
    pub(crate) fn change_room(&self, session: &Arc<Session>, room: Option<Box<str>>) -> bool {
        let mut inner = self.inner.lock();
        if !inner.is_current(session) {
            return false;
        }
        inner.leave_room(session);
        if let Some(room) = room {
            inner.join_room(session, room);
        }
        true
    }

    /// Puts a current session in the channels of `groups` it is not in yet;
    /// returns how many it joined.
    pub(crate) fn join_channels<'a>(
        &self,
        session: &Arc<Session>,
        groups: impl IntoIterator<Item = &'a str>,
    ) -> usize {
        let mut inner = self.inner.lock();
        if !inner.is_current(session) {
            return 0;
        }
        groups
            .into_iter()
            .filter(|group| inner.join_channel(session, group))
            .count()
    }

    /// Takes a session out of the channel of `group`; false when it was
    /// not in it.
    pub(crate) fn leave_channel(&self, session: &Session, group: &str) -> bool {
        self.inner.lock().leave_channel(session, group)
    }

    /// Makes a current session's channels exactly `groups`; returns how
    /// many it joined and left.
    pub(crate) fn set_channels(&self, session: &Arc<Session>, groups: &[String]) -> (usize, usize) {
        let mut inner = self.inner.lock();
        if !inner.is_current(session) {
            return (0, 0);
        }
        let stale: Vec<Arc<str>> = inner
            .joined
            .get(&session.id)
            .map(|now| {
                now.iter()
                    .filter(|name| !groups.iter().any(|g| g.as_str() == &***name))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let left = stale
            .iter()
            .filter(|group| inner.leave_channel(session, group))
            .count();
        let joined = groups
            .iter()
            .filter(|group| inner.join_channel(session, group))
            .count();
        (joined, left)
    }

    /// Returns how many channel seats this bucket holds (sessions × their
    /// channels).
    pub(crate) fn channel_seats(&self) -> usize {
        self.inner.lock().joined.values().map(Vec::len).sum()
    }

    /// Returns the channels `session` is in, sorted.
    #[cfg(test)]
    pub(crate) fn channels_of(&self, session: &Session) -> Vec<String> {
        let mut groups: Vec<String> = self
            .inner
            .lock()
            .joined
            .get(&session.id)
            .map(|groups| groups.iter().map(|g| g.to_string()).collect())
            .unwrap_or_default();
        groups.sort_unstable();
        groups
    }

    /// Returns the session connected with `key`.
    pub(crate) fn get(&self, key: &str) -> Option<Arc<Session>> {
        self.inner
            .lock()
            .sessions
            .get(key)
            .map(|found| Arc::clone(&found.0))
    }

    /// Appends this bucket's members of `room` to `out`, so that they can
    /// be pushed to without the bucket's lock (a push may write to a
    /// socket).
    pub(crate) fn members_into(&self, room: &str, out: &mut Vec<Arc<Session>>) {
        let inner = self.inner.lock();
        if let Some(members) = inner.rooms.get(room) {
            out.extend(members.values().cloned());
        }
    }

    /// Appends this bucket's members of `group`'s channel to `out` (see
    /// [`members_into`](Self::members_into)).
    pub(crate) fn channel_into(&self, group: &str, out: &mut Vec<Arc<Session>>) {
        let inner = self.inner.lock();
        if let Some(members) = inner.channels.get(group) {
            out.extend(members.values().cloned());
        }
    }

    /// Returns how many members `room` has in this bucket.
    pub(crate) fn room_len(&self, room: &str) -> usize {
        self.inner.lock().rooms.get(room).map_or(0, HashMap::len)
    }

    /// Adds this bucket's member count of every room to `counts`.
    pub(crate) fn add_room_counts(&self, counts: &mut HashMap<String, u64>) {
        let inner = self.inner.lock();
        for (room, members) in &inner.rooms {
            *counts.entry(room.to_string()).or_default() += members.len() as u64;
        }
    }

    /// Returns the sessions, so that long work (paced broadcast, drain) runs
    /// without the lock.
    pub(crate) fn sessions(&self) -> Vec<Arc<Session>> {
        self.inner
            .lock()
            .sessions
            .iter()
            .map(|found| Arc::clone(&found.0))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn session(id: u64, key: &str) -> Arc<Session> {
        Arc::new(Session::new(
            id,
            key,
            1,
            IpAddr::from([127, 0, 0, 1]),
            Vec::new(),
            8,
        ))
    }

    #[test]
    fn a_session_with_the_same_key_replaces_the_old_one_and_its_room_seat() {
        let bucket = Bucket::default();
        let old = session(1, "k");
        assert!(bucket.put(&old, Some("live://1".into())).is_none());
        assert_eq!(bucket.room_len("live://1"), 1);

        let new = session(2, "k");
        let replaced = bucket.put(&new, Some("live://2".into())).unwrap();
        assert_eq!(replaced.id, 1);
        assert_eq!(bucket.room_len("live://1"), 0);
        assert_eq!(bucket.room_len("live://2"), 1);

        // The old session's late cleanup must not remove its successor.
        assert!(!bucket.remove(&old));
        assert_eq!(bucket.get("k").unwrap().id, 2);
        assert!(bucket.remove(&new));
        assert!(bucket.get("k").is_none());
        assert_eq!(bucket.room_len("live://2"), 0);
    }

    #[test]
    fn changing_rooms_moves_the_seat_and_empty_rooms_disappear() {
        let bucket = Bucket::default();
        let s = session(1, "a");
        bucket.put(&s, None);
        assert!(bucket.change_room(&s, Some("chat://x".into())));
        assert_eq!(s.room().as_deref(), Some("chat://x"));
        assert!(bucket.change_room(&s, Some("chat://y".into())));
        let mut counts = HashMap::new();
        bucket.add_room_counts(&mut counts);
        assert_eq!(counts, HashMap::from([("chat://y".to_string(), 1)]));
        assert!(bucket.change_room(&s, None));
        counts.clear();
        bucket.add_room_counts(&mut counts);
        assert!(counts.is_empty());
    }

    #[test]
    fn channels_are_joined_left_replaced_and_emptied_with_the_session() {
        let bucket = Bucket::default();
        let (a, b) = (session(1, "a"), session(2, "b"));
        bucket.put(&a, None);
        bucket.put(&b, None);
        assert_eq!(bucket.join_channels(&a, ["g:1", "g:2", "g:1"]), 2);
        assert_eq!(bucket.join_channels(&b, ["g:1"]), 1);
        let in_channel = |group: &str| {
            let mut sessions = Vec::new();
            bucket.channel_into(group, &mut sessions);
            let mut ids: Vec<u64> = sessions.iter().map(|s| s.id).collect();
            ids.sort_unstable();
            ids
        };
        assert_eq!(in_channel("g:1"), [1, 2]);
        assert_eq!(in_channel("g:2"), [1]);
        assert_eq!(bucket.channel_seats(), 3);

        assert!(bucket.leave_channel(&b, "g:1"));
        assert!(!bucket.leave_channel(&b, "g:1"));
        assert_eq!(in_channel("g:1"), [1]);

        // A renewal's list replaces the set: g:1 stays, g:2 goes, g:3 comes.
        let now = vec!["g:1".to_string(), "g:3".to_string()];
        assert_eq!(bucket.set_channels(&a, &now), (1, 1));
        assert_eq!(bucket.channels_of(&a), ["g:1", "g:3"]);
        assert!(in_channel("g:2").is_empty());

        // A session replaced by its key's successor leaves its channels;
        // the successor joins only what it is told.
        let a2 = session(3, "a");
        bucket.put(&a2, None);
        assert!(in_channel("g:1").is_empty());
        assert_eq!(bucket.join_channels(&a, ["g:9"]), 0, "no longer current");
        assert_eq!(bucket.join_channels(&a2, ["g:1"]), 1);
        assert!(bucket.remove(&a2));
        assert_eq!(bucket.channel_seats(), 0);
        assert!(in_channel("g:1").is_empty());
    }

    #[test]
    fn members_share_one_copy_of_the_room_name() {
        let bucket = Bucket::default();
        let (a, b) = (session(1, "a"), session(2, "b"));
        bucket.put(&a, Some("live://1".into()));
        bucket.put(&b, None);
        assert!(bucket.change_room(&b, Some("live://1".into())));
        let (room_a, room_b) = (a.room().unwrap(), b.room().unwrap());
        assert!(Arc::ptr_eq(&room_a, &room_b));
        let mut sessions = Vec::new();
        bucket.members_into("live://1", &mut sessions);
        let mut members: Vec<u64> = sessions.iter().map(|s| s.id).collect();
        members.sort_unstable();
        assert_eq!(members, [1, 2]);
        // Keys are found by value, not by the session that holds them.
        assert_eq!(bucket.get(&String::from("b")).unwrap().id, 2);
        assert_eq!(bucket.sessions().len(), 2);
    }
}
