//! A shard of the comet's sessions, keyed by connection key, with the rooms
//! of those sessions. Rooms are split across buckets like sessions are, so a
//! room broadcast takes each bucket's lock for that bucket's members only.

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

    /// Returns the session connected with `key`.
    pub(crate) fn get(&self, key: &str) -> Option<Arc<Session>> {
        self.inner
            .lock()
            .sessions
            .get(key)
            .map(|found| Arc::clone(&found.0))
    }

    /// Calls `f` for every member of `room` in this bucket, under the lock:
    /// `f` must not block.
    pub(crate) fn for_each_member(&self, room: &str, mut f: impl FnMut(&Session)) {
        let inner = self.inner.lock();
        if let Some(members) = inner.rooms.get(room) {
            members.values().for_each(|s| f(s));
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
    fn members_share_one_copy_of_the_room_name() {
        let bucket = Bucket::default();
        let (a, b) = (session(1, "a"), session(2, "b"));
        bucket.put(&a, Some("live://1".into()));
        bucket.put(&b, None);
        assert!(bucket.change_room(&b, Some("live://1".into())));
        let (room_a, room_b) = (a.room().unwrap(), b.room().unwrap());
        assert!(Arc::ptr_eq(&room_a, &room_b));
        let mut members = Vec::new();
        bucket.for_each_member("live://1", |s| members.push(s.id));
        members.sort_unstable();
        assert_eq!(members, [1, 2]);
        // Keys are found by value, not by the session that holds them.
        assert_eq!(bucket.get(&String::from("b")).unwrap().id, 2);
        assert_eq!(bucket.sessions().len(), 2);
    }
}
