//! The per-partition offset tracker: the commit point is the lowest unfinished offset.
//!
//! Messages of a partition finish out of order (key-hash lanes, retries, DLQ publishes), but a
//! partition's committed offset may only pass a message once it is finished (DESIGN.md,
//! "Guarantees" 2). The tracker keeps the in-flight offsets and reports the commit point.

use std::collections::VecDeque;

/// Offsets of one partition that are in flight; the commit point is the lowest unfinished offset.
#[derive(Debug, Default, Clone)]
pub struct PartitionOffsets {
    /// Offsets received and not finished yet, ascending, each once. Offsets arrive in
    /// increasing order and mostly finish near the front, so both ends are cheap.
    in_flight: VecDeque<i64>,
    /// The highest offset ever started, so the commit point can pass it when all finished.
    highest_started: Option<i64>,
    /// The last commit point marked as committed.
    committed: Option<i64>,
}

impl PartitionOffsets {
    /// An empty tracker, for a newly assigned partition.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `offset` was received and is now in flight. Offsets arrive in increasing order per partition (gaps allowed, e.g. compaction or transaction markers).
    ///
    /// An offset delivered again (e.g. after a seek back) is tracked again, which holds the
    /// commit point at it until it is finished anew.
    pub fn start(&mut self, offset: i64) {
        if self.in_flight.back().is_none_or(|&last| last < offset) {
            self.in_flight.push_back(offset);
        } else if let Err(at) = self.in_flight.binary_search(&offset) {
            self.in_flight.insert(at, offset);
        }
        self.highest_started = Some(self.highest_started.map_or(offset, |h| h.max(offset)));
    }

    /// Records that `offset` is finished (ok, retried, dead-lettered, duplicate or skipped). Finishing an offset that is not in flight is ignored (returns false).
    pub fn finish(&mut self, offset: i64) -> bool {
        if self.in_flight.front() == Some(&offset) {
            self.in_flight.pop_front();
            return true;
        }
        match self.in_flight.binary_search(&offset) {
            Ok(at) => self.in_flight.remove(at).is_some(),
            Err(_) => false,
        }
    }

    /// The offset to commit (the next message to consume): the lowest in-flight offset, or the highest started offset + 1 when none is in flight; None if nothing was ever started.
    pub fn commit_point(&self) -> Option<i64> {
        self.in_flight
            .front()
            .copied()
            .or_else(|| self.highest_started.map(|h| h + 1))
    }

    /// Messages in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Marks `offset` as committed; `needs_commit()` is true while commit_point() is ahead of the last committed point.
    ///
    /// A lower offset than the last marked one is ignored: it is a late acknowledgement of an
    /// older commit.
    pub fn mark_committed(&mut self, offset: i64) {
        self.committed = Some(self.committed.map_or(offset, |c| c.max(offset)));
    }

    /// Whether the commit point moved past the last committed point, so a commit is due.
    pub fn needs_commit(&self) -> bool {
        match (self.commit_point(), self.committed) {
            (Some(point), Some(committed)) => point > committed,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn nothing_started_has_no_commit_point() {
        let offsets = PartitionOffsets::new();
        assert_eq!(offsets.commit_point(), None);
        assert_eq!(offsets.in_flight(), 0);
        assert!(!offsets.needs_commit());
    }

    #[test]
    fn in_order_completion_advances_one_by_one() {
        let mut offsets = PartitionOffsets::new();
        for offset in 10..13 {
            offsets.start(offset);
        }
        assert_eq!(offsets.commit_point(), Some(10));
        assert_eq!(offsets.in_flight(), 3);
        for offset in 10..13 {
            assert!(offsets.finish(offset));
            assert_eq!(offsets.commit_point(), Some(offset + 1));
        }
        assert_eq!(offsets.in_flight(), 0);
    }

    #[test]
    fn out_of_order_completion_holds_the_lowest_unfinished() {
        let mut offsets = PartitionOffsets::new();
        for offset in 4..7 {
            offsets.start(offset);
        }
        assert!(offsets.finish(5));
        assert!(offsets.finish(6));
        assert_eq!(offsets.commit_point(), Some(4));
        assert!(offsets.finish(4));
        assert_eq!(offsets.commit_point(), Some(7));
    }

    #[test]
    fn finishing_an_offset_not_in_flight_is_ignored() {
        let mut offsets = PartitionOffsets::new();
        offsets.start(1);
        assert!(!offsets.finish(0));
        assert!(offsets.finish(1));
        assert!(!offsets.finish(1));
        assert_eq!(offsets.commit_point(), Some(2));
    }

    #[test]
    fn gaps_are_skipped() {
        let mut offsets = PartitionOffsets::new();
        offsets.start(3);
        offsets.start(8);
        offsets.start(20);
        assert!(offsets.finish(3));
        assert_eq!(offsets.commit_point(), Some(8));
        assert!(offsets.finish(20));
        assert_eq!(offsets.commit_point(), Some(8));
        assert!(offsets.finish(8));
        assert_eq!(offsets.commit_point(), Some(21));
    }

    #[test]
    fn needs_commit_follows_the_commit_point() {
        let mut offsets = PartitionOffsets::new();
        offsets.start(0);
        offsets.start(1);
        // The first commit point is due even though nothing is finished yet.
        assert!(offsets.needs_commit());
        offsets.mark_committed(0);
        assert!(!offsets.needs_commit());
        assert!(offsets.finish(1));
        assert!(!offsets.needs_commit());
        assert!(offsets.finish(0));
        assert!(offsets.needs_commit());
        offsets.mark_committed(2);
        assert!(!offsets.needs_commit());
        // A late acknowledgement of an older commit does not move the mark back.
        offsets.mark_committed(1);
        assert!(!offsets.needs_commit());
        offsets.start(5);
        assert!(offsets.needs_commit());
        offsets.mark_committed(5);
        assert!(offsets.finish(5));
        assert!(offsets.needs_commit());
    }

    #[test]
    fn a_redelivered_offset_holds_the_commit_point_again() {
        let mut offsets = PartitionOffsets::new();
        offsets.start(1);
        offsets.start(2);
        assert!(offsets.finish(1));
        offsets.start(2);
        assert_eq!(offsets.in_flight(), 1);
        assert!(offsets.finish(2));
        assert_eq!(offsets.commit_point(), Some(3));
    }

    #[test]
    fn an_offset_delivered_again_below_the_highest_is_tracked_in_order() {
        let mut offsets = PartitionOffsets::new();
        offsets.start(5);
        offsets.start(7);
        offsets.start(6);
        offsets.start(7);
        assert_eq!(offsets.in_flight(), 3);
        assert!(offsets.finish(7));
        assert!(offsets.finish(5));
        assert_eq!(offsets.commit_point(), Some(6));
        assert!(offsets.finish(6));
        assert_eq!(offsets.commit_point(), Some(8));
    }

    /// Strictly increasing offsets with gaps, and the same offsets in a random finishing order.
    fn started_and_finish_order() -> impl Strategy<Value = (Vec<i64>, Vec<i64>)> {
        (0_i64..1_000, proptest::collection::vec(1_i64..4, 1..100)).prop_flat_map(
            |(base, steps)| {
                let started: Vec<i64> = steps
                    .iter()
                    .scan(base, |offset, step| {
                        *offset += step;
                        Some(*offset)
                    })
                    .collect();
                (Just(started.clone()), Just(started).prop_shuffle())
            },
        )
    }

    proptest! {
        #[test]
        fn commit_point_never_passes_an_unfinished_offset(
            (started, order) in started_and_finish_order(),
        ) {
            let mut offsets = PartitionOffsets::new();
            for &offset in &started {
                offsets.start(offset);
            }
            let mut unfinished: BTreeSet<i64> = started.iter().copied().collect();
            for offset in order {
                prop_assert!(offsets.finish(offset));
                unfinished.remove(&offset);
                let point = offsets.commit_point();
                prop_assert!(point.is_some());
                prop_assert!(unfinished.iter().all(|&u| point.is_some_and(|p| p <= u)));
                prop_assert_eq!(offsets.in_flight(), unfinished.len());
            }
            let max = started.iter().copied().max();
            prop_assert_eq!(offsets.commit_point(), max.map(|m| m + 1));
        }
    }
}
