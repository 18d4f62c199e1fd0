//! Commit-after-delivery: which positions of each partition were handled,
//! and how far each partition may be committed (the handled prefix).

use std::collections::{BTreeMap, HashMap};

/// Handled positions per partition.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    partitions: HashMap<i32, PartitionState>,
}

#[derive(Debug, Default)]
struct PartitionState {
    /// Bumped when the partition is (re)assigned, so completions of a
    /// previous ownership are ignored.
    epoch: u64,
    /// offset → handled?
    pending: BTreeMap<i64, bool>,
    /// Next offset to commit (Kafka commits "the next offset to read").
    committed: Option<i64>,
}

/// Where a message sits: partition, offset, and the ownership epoch it was
/// handed out in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Position {
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) epoch: u64,
}

impl Tracker {
    /// Records a message handed out, not yet handled.
    pub(crate) fn start(&mut self, partition: i32, offset: i64) -> Position {
        let state = self.partitions.entry(partition).or_default();
        state.pending.insert(offset, false);
        Position {
            partition,
            offset,
            epoch: state.epoch,
        }
    }

    /// Records a message handled (ignored if its partition was revoked since).
    pub(crate) fn done(&mut self, at: Position) {
        if let Some(state) = self.partitions.get_mut(&at.partition)
            && state.epoch == at.epoch
            && let Some(handled) = state.pending.get_mut(&at.offset)
        {
            *handled = true;
        }
    }

    /// Drops the handled prefix of each partition (of `only`, when given)
    /// and returns the next offset to read of each partition that moved.
    pub(crate) fn committable(&mut self, only: Option<&[i32]>) -> Vec<(i32, i64)> {
        let mut moved = Vec::new();
        for (&partition, state) in &mut self.partitions {
            if only.is_some_and(|only| !only.contains(&partition)) {
                continue;
            }
            let mut next = None;
            while let Some((&offset, &handled)) = state.pending.first_key_value() {
                if !handled {
                    break;
                }
                state.pending.pop_first();
                next = Some(offset + 1);
            }
            if let Some(next) = next
                && state.committed != Some(next)
            {
                state.committed = Some(next);
                moved.push((partition, next));
            }
        }
        moved.sort_unstable();
        moved
    }

    /// Forgets a partition given up: its pending completions no longer count.
    pub(crate) fn revoke(&mut self, partition: i32) {
        if let Some(state) = self.partitions.get_mut(&partition) {
            state.pending.clear();
            state.committed = None;
            state.epoch += 1;
        }
    }

    /// Returns the number of messages handed out and not yet committed.
    pub(crate) fn outstanding(&self) -> usize {
        self.partitions.values().map(|s| s.pending.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_handled_prefix_of_a_partition_is_committed() {
        let mut tracker = Tracker::default();
        let a = tracker.start(0, 10);
        let b = tracker.start(0, 11);
        let c = tracker.start(0, 12);
        tracker.done(b);
        assert!(
            tracker.committable(None).is_empty(),
            "10 is not handled yet"
        );
        tracker.done(a);
        assert_eq!(tracker.committable(None), vec![(0, 12)]);
        assert!(tracker.committable(None).is_empty(), "nothing new");
        tracker.done(c);
        assert_eq!(tracker.committable(None), vec![(0, 13)]);
        assert_eq!(tracker.outstanding(), 0);
    }

    #[test]
    fn completions_from_before_a_revocation_are_ignored() {
        let mut tracker = Tracker::default();
        let old = tracker.start(3, 5);
        tracker.revoke(3);
        let new = tracker.start(3, 5);
        assert_ne!(old, new);
        tracker.done(old);
        assert!(tracker.committable(None).is_empty());
        tracker.done(new);
        assert_eq!(tracker.committable(Some(&[3])), vec![(3, 6)]);
    }

    #[test]
    fn committing_some_partitions_leaves_the_others() {
        let mut tracker = Tracker::default();
        let a = tracker.start(0, 1);
        let b = tracker.start(1, 7);
        tracker.done(a);
        tracker.done(b);
        assert_eq!(tracker.committable(Some(&[1])), vec![(1, 8)]);
        assert_eq!(tracker.committable(None), vec![(0, 2)]);
    }
}
