//! Message ids (im.md, Model): globally unique 64-bit ids, ordered by time,
//! snowflake-like — 41 bits of milliseconds since 2026-01-01 UTC (69
//! years), 10 bits of node (each process that accepts messages has its
//! own), 12 bits of sequence within the millisecond. JSON carries them as
//! decimal strings (JavaScript numbers lose bits above 2^53).
//!
//! A generator's ids strictly increase. It never sleeps: past 4096 ids in
//! one millisecond, or when the clock steps back, it runs ahead of the
//! clock on the last millisecond it used until the clock catches up. Ids
//! stay unique across restarts as long as the clock does not step back by
//! more than the restart took; the store's unique key on the id refuses
//! anything else rather than storing a duplicate.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use crate::error::{Error, Result};

/// 2026-01-01T00:00:00Z in Unix milliseconds.
const EPOCH_MS: u64 = 1_767_225_600_000;
const NODE_BITS: u32 = 10;
const SEQ_BITS: u32 = 12;
const MAX_SEQ: u64 = (1 << SEQ_BITS) - 1;
const MAX_MS: u64 = (1 << 41) - 1;

/// The largest node number (`im` node ids are 0..=MAX_NODE).
pub const MAX_NODE: u16 = (1 << NODE_BITS) - 1;

/// A message id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(u64);

impl MessageId {
    /// Wraps a stored id.
    pub fn from_u64(id: u64) -> MessageId {
        MessageId(id)
    }

    /// Returns the id as a number (for the store).
    pub fn as_u64(self) -> u64 {
        self.0
    }

    /// Returns the lowest id of Unix time `unix_ms`: every id issued at an
    /// earlier millisecond is below it.
    pub fn first_at(unix_ms: u64) -> MessageId {
        let ms = unix_ms.saturating_sub(EPOCH_MS).min(MAX_MS);
        MessageId(ms << (NODE_BITS + SEQ_BITS))
    }

    /// Returns the Unix time in ms the id was issued at (or ran ahead to).
    pub fn unix_ms(self) -> u64 {
        (self.0 >> (NODE_BITS + SEQ_BITS)) + EPOCH_MS
    }

    /// Returns the node that issued the id.
    pub fn node(self) -> u16 {
        // Masked to NODE_BITS: fits.
        ((self.0 >> SEQ_BITS) & u64::from(MAX_NODE)) as u16
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl serde::Serialize for MessageId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Issues message ids for one node.
#[derive(Debug)]
pub struct IdGenerator {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    node: u64,
    /// Milliseconds since the epoch last used.
    at: u64,
    /// The last sequence number used in `at`.
    seq: u64,
}

impl IdGenerator {
    /// Creates the generator of node `node` (0..=MAX_NODE).
    pub fn new(node: u16) -> Result<IdGenerator> {
        if node > MAX_NODE {
            return Err(Error::invalid(
                "im node",
                format!("a node number is 0..={MAX_NODE}, got {node}"),
            ));
        }
        Ok(IdGenerator {
            state: Mutex::new(State {
                node: u64::from(node),
                at: 0,
                seq: MAX_SEQ,
            }),
        })
    }

    /// Returns the node the ids are issued from.
    pub fn node(&self) -> u16 {
        // Only ever set from a u16 up to MAX_NODE.
        self.state.lock().node as u16
    }

    /// Issues later ids from `node` (up to MAX_NODE); they stay above every
    /// id issued before: the next one starts a new millisecond.
    pub(crate) fn set_node(&self, node: u16) {
        let mut state = self.state.lock();
        state.node = u64::from(node.min(MAX_NODE));
        state.seq = MAX_SEQ;
    }

    /// Issues the next id now.
    pub fn next(&self) -> MessageId {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.next_at(now)
    }

    /// Issues the next id as if the clock read `unix_ms`.
    pub fn next_at(&self, unix_ms: u64) -> MessageId {
        let ms = unix_ms.saturating_sub(EPOCH_MS).min(MAX_MS);
        let mut state = self.state.lock();
        if ms > state.at {
            (state.at, state.seq) = (ms, 0);
        } else if state.seq < MAX_SEQ {
            state.seq += 1;
        } else {
            // This millisecond is used up (or the clock stepped back):
            // borrow the next one.
            (state.at, state.seq) = ((state.at + 1).min(MAX_MS), 0);
        }
        MessageId((state.at << (NODE_BITS + SEQ_BITS)) | (state.node << SEQ_BITS) | state.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = EPOCH_MS + 1_000_000;

    #[test]
    fn ids_carry_time_and_node_and_increase() {
        let ids = IdGenerator::new(5).unwrap();
        let a = ids.next_at(T);
        let b = ids.next_at(T);
        let c = ids.next_at(T + 1);
        assert!(a < b && b < c);
        assert_eq!((a.unix_ms(), a.node()), (T, 5));
        assert_eq!(c.unix_ms(), T + 1);
        // JSON carries the id as a decimal string.
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            format!("\"{}\"", a.as_u64())
        );
    }

    #[test]
    fn a_busy_millisecond_and_a_clock_stepping_back_keep_ids_increasing() {
        let ids = IdGenerator::new(MAX_NODE).unwrap();
        let mut prev = ids.next_at(T);
        for _ in 0..10_000 {
            let id = ids.next_at(T);
            assert!(id > prev);
            prev = id;
        }
        assert!(prev.unix_ms() > T, "ran ahead after 4096 in one ms");
        // The clock steps back a minute: still increasing.
        let back = ids.next_at(T - 60_000);
        assert!(back > prev);
    }

    #[test]
    fn two_nodes_never_collide() {
        let (a, b) = (IdGenerator::new(1).unwrap(), IdGenerator::new(2).unwrap());
        let mut seen = std::collections::HashSet::new();
        for i in 0..5_000 {
            assert!(seen.insert(a.next_at(T + i / 3)));
            assert!(seen.insert(b.next_at(T + i / 3)));
        }
    }

    #[test]
    fn the_first_id_of_a_millisecond_is_above_every_earlier_one() {
        let (a, b) = (
            IdGenerator::new(MAX_NODE).unwrap(),
            IdGenerator::new(0).unwrap(),
        );
        let earlier = a.next_at(T - 1);
        let first = MessageId::first_at(T);
        assert!(earlier < first && first <= b.next_at(T));
        assert_eq!(first.unix_ms(), T);
    }

    #[test]
    fn a_new_node_keeps_ids_increasing() {
        let ids = IdGenerator::new(900).unwrap();
        let before = ids.next_at(T);
        ids.set_node(3);
        let after = ids.next_at(T);
        assert!(after > before, "a lower node in the same millisecond");
        assert_eq!((after.node(), ids.node()), (3, 3));
    }

    #[test]
    fn node_numbers_are_bounded() {
        assert!(IdGenerator::new(MAX_NODE + 1).is_err());
    }
}
