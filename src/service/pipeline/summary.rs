//! What the pipeline did, per topic and partition: the shutdown summary.

use std::collections::BTreeMap;

use crate::model::Outcome;
use crate::service::source::Tp;

/// Per-partition counts for the shutdown summary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionCounts {
    /// Messages accepted for processing.
    pub received: u64,
    /// Processed successfully.
    pub ok: u64,
    /// Sent to a retry topic.
    pub retried: u64,
    /// Sent to the DLQ.
    pub dead_lettered: u64,
    /// Skipped as duplicates.
    pub duplicates: u64,
    /// Skipped as other groups' retries.
    pub skipped: u64,
    /// Left unfinished at shutdown or revoke (consumed again by the next owner).
    pub abandoned: u64,
}

/// What the pipeline did, per topic and partition.
pub type ConsumerSummary = BTreeMap<Tp, PartitionCounts>;

impl PartitionCounts {
    pub(super) fn count(&mut self, o: Outcome) {
        match o {
            Outcome::Ok => self.ok += 1,
            Outcome::Retried(_) => self.retried += 1,
            Outcome::DeadLettered => self.dead_lettered += 1,
            Outcome::Duplicate => self.duplicates += 1,
            Outcome::Skipped => self.skipped += 1,
            Outcome::Abandoned => self.abandoned += 1,
        }
    }

    pub(super) fn add(&mut self, o: &PartitionCounts) {
        self.received += o.received;
        self.ok += o.ok;
        self.retried += o.retried;
        self.dead_lettered += o.dead_lettered;
        self.duplicates += o.duplicates;
        self.skipped += o.skipped;
        self.abandoned += o.abandoned;
    }
}

/// Logs the consumer summary and one line per partition.
pub(super) fn log(summary: &ConsumerSummary) {
    let sum = |f: fn(&PartitionCounts) -> u64| summary.values().map(f).sum::<u64>();
    tracing::info!(
        partitions = summary.len(),
        received = sum(|s| s.received),
        ok = sum(|s| s.ok),
        retried = sum(|s| s.retried),
        dead_lettered = sum(|s| s.dead_lettered),
        duplicates = sum(|s| s.duplicates),
        skipped = sum(|s| s.skipped),
        abandoned = sum(|s| s.abandoned),
        "Consumer summary."
    );
    for (tp, s) in summary {
        tracing::info!(topic = %tp.topic, partition = tp.partition, received = s.received, ok = s.ok, retried = s.retried, dead_lettered = s.dead_lettered, duplicates = s.duplicates, skipped = s.skipped, abandoned = s.abandoned, "Partition summary.");
    }
}
