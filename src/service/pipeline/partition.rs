//! One assigned partition in the pipeline, and its retry gate: what happens to a delivery
//! before it may go to a lane. A retry message that is not due yet makes the partition wait
//! (seek back to it, pause, resume when due), so no worker sleeps and other partitions keep
//! flowing; another group's retry message is skipped (DESIGN.md, guarantees 2 and 3).

use std::sync::Arc;

use crate::model::Delivery;
use crate::service::offsets::PartitionOffsets;
use crate::service::source::{DriverControl, Epoch, Tp};

use super::lanes::Gate;
use super::summary::PartitionCounts;
use crate::observability::events::{
    At, DueTimeBeyondHorizon, MalformedCourierHeaders, TopicCounters,
};
use crate::observability::Metrics;

/// One assignment of a partition.
pub(super) struct Part {
    pub(super) tp: Arc<Tp>,
    pub(super) counters: TopicCounters,
    pub(super) stats: PartitionCounts,
    /// Which assignment this is; every request to the driver names it.
    pub(super) generation: Epoch,
    /// Deliveries fetched under another epoch (before a seek) are dropped.
    pub(super) fetch_epoch: Epoch,
    /// Retry level of its topic (0 for a source topic).
    pub(super) level: u32,
    pub(super) offsets: PartitionOffsets,
    /// Due time of the retry message it waits for.
    pub(super) waiting_until: Option<i64>,
    /// The offset the partition was seeked back to while it waits.
    pub(super) waiting_at: Option<i64>,
    /// After the wait: the offset the next delivery must have.
    pub(super) expecting: Option<Expect>,
    pub(super) revoking: bool,
    pub(super) paused: bool,
    pub(super) gate: Arc<Gate>,
}

/// How long after a resume the awaited retry message must have arrived before the seek to
/// it is repeated (doubling, a few times at most).
const RESUME_CHECK_MS: i64 = 2_000;
/// Repeats of the seek before the awaited message is taken to be gone (e.g. deleted by
/// retention), and the partition goes on from where librdkafka is.
const RESUME_CHECK_ATTEMPTS: u32 = 5;

/// A resumed partition's awaited message. The seek that waited for it is repeated when a
/// later message arrives first or none arrives in time: librdkafka can lose a seek to a
/// partition that it pauses itself while a cooperative rebalance is scheduled, and the
/// awaited retry would then be skipped, or never fetched when it is the partition's last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Expect {
    pub(super) offset: i64,
    pub(super) check_at_ms: i64,
    pub(super) attempts: u32,
}

/// What the retry gate decided for a delivery.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Admit {
    /// Fetched before a seek, under an earlier assignment, or while revoking: not ours.
    Drop,
    /// A retry message not due yet: the partition now waits for it.
    Wait,
    /// A later message came before the awaited one: the seek was repeated (the partition is
    /// paused by it and must be resumed).
    Reseek,
    /// Another consumer group's retry message: finished without processing.
    Skip,
    /// To a lane, with the message's due time if it had one.
    Dispatch { due_at_ms: Option<i64> },
}

/// Where the gate gets the time and what it may trust.
pub(super) struct GateRules<'a> {
    /// This consumer's group.
    pub(super) group: &'a str,
    /// Epoch milliseconds now.
    pub(super) now_ms: i64,
    /// Where events go.
    pub(super) metrics: &'a Metrics,
    /// A due time beyond this is treated as malformed (due now).
    pub(super) horizon_ms: i64,
}

impl Part {
    pub(super) fn new(tp: Tp, generation: Epoch, level: u32, counters: TopicCounters) -> Self {
        Part {
            tp: Arc::new(tp),
            counters,
            stats: PartitionCounts::default(),
            generation,
            fetch_epoch: generation,
            level,
            offsets: PartitionOffsets::new(),
            waiting_until: None,
            waiting_at: None,
            expecting: None,
            revoking: false,
            paused: false,
            gate: Arc::new(Gate::default()),
        }
    }

    /// The retry gate.
    pub(super) fn admit(
        &mut self,
        d: &Delivery,
        epoch: Epoch,
        rules: &GateRules<'_>,
        control: &dyn DriverControl,
    ) -> Admit {
        if self.fetch_epoch != epoch || self.revoking {
            return Admit::Drop;
        }
        if let Some(e) = self.expecting {
            if d.offset > e.offset && e.attempts < RESUME_CHECK_ATTEMPTS {
                self.reseek(e, rules.now_ms, control);
                return Admit::Reseek;
            }
            if d.offset >= e.offset {
                self.expecting = None;
            }
        }
        if let Some(offset) = self.waiting_at {
            // A delivery after the seek while the partition waits: librdkafka counted it
            // as consumed, so seek back again or the resume would skip it.
            self.fetch_epoch = control.seek(&self.tp, self.generation, offset);
            tracing::debug!(partition = %self.tp, generation = self.generation, offset, got = d.offset, epoch = self.fetch_epoch, "A delivery while waiting: seeking back again.");
            return Admit::Drop;
        }
        if self.level == 0 {
            return Admit::Dispatch { due_at_ms: None };
        }
        let h = d.courier_headers();
        let at = At::of(d);
        if !h.malformed.is_empty() {
            rules.metrics.emit(MalformedCourierHeaders {
                at,
                headers: &h.malformed,
            });
        }
        if h.consumer_group
            .as_deref()
            .is_some_and(|g| g != rules.group)
        {
            return Admit::Skip;
        }
        match h.due_at_ms {
            Some(due) if due > rules.horizon_ms => {
                rules
                    .metrics
                    .emit(DueTimeBeyondHorizon { at, due_at_ms: due });
                Admit::Dispatch { due_at_ms: None }
            }
            Some(due) if due > rules.now_ms => {
                self.fetch_epoch = control.seek(&self.tp, self.generation, d.offset);
                tracing::debug!(partition = %self.tp, generation = self.generation, offset = d.offset, due_in_ms = due - rules.now_ms, epoch = self.fetch_epoch, "A retry is not due yet: the partition waits.");
                self.waiting_until = Some(due);
                self.waiting_at = Some(d.offset);
                Admit::Wait
            }
            other => Admit::Dispatch { due_at_ms: other },
        }
    }

    /// The wait is over: resume, and watch that the awaited message comes first.
    pub(super) fn end_wait(&mut self, now_ms: i64) {
        if let Some(offset) = self.waiting_at.take() {
            self.expecting = Some(Expect {
                offset,
                check_at_ms: now_ms.saturating_add(RESUME_CHECK_MS),
                attempts: 0,
            });
        }
        self.waiting_until = None;
    }

    /// The awaited message did not come in time: seek to it again (or, after a few tries,
    /// take it to be gone).
    pub(super) fn check_expected(&mut self, now_ms: i64, control: &dyn DriverControl) -> bool {
        let Some(e) = self.expecting.filter(|e| e.check_at_ms <= now_ms) else {
            return false;
        };
        if self.paused {
            // Nothing can arrive while the partition is paused (back-pressure, an open
            // circuit): look again later, without counting it as a try.
            self.expecting = Some(Expect {
                check_at_ms: now_ms.saturating_add(RESUME_CHECK_MS),
                ..e
            });
            return false;
        }
        if e.attempts >= RESUME_CHECK_ATTEMPTS {
            tracing::warn!(partition = %self.tp, offset = e.offset, "A retry message the partition waited for never came back after its seek; going on from where librdkafka is (was it deleted by retention?).");
            self.expecting = None;
            return false;
        }
        self.reseek(e, now_ms, control);
        true
    }

    fn reseek(&mut self, e: Expect, now_ms: i64, control: &dyn DriverControl) {
        self.fetch_epoch = control.seek(&self.tp, self.generation, e.offset);
        // The seek pauses the partition in the driver; the pipeline resumes it.
        self.paused = true;
        let attempts = e.attempts + 1;
        self.expecting = Some(Expect {
            offset: e.offset,
            check_at_ms: now_ms.saturating_add(RESUME_CHECK_MS << attempts.min(4)),
            attempts,
        });
        tracing::debug!(partition = %self.tp, generation = self.generation, offset = e.offset, attempts, epoch = self.fetch_epoch, "The awaited retry message did not come first after the resume: seeking to it again.");
    }

    /// Whether fetching should be paused, given the pipeline-wide reasons.
    pub(super) fn wants_pause(&self, pipeline_wide: bool) -> bool {
        pipeline_wide || self.waiting_until.is_some()
    }
}

/// The retry level of `topic`: `N` for `{prefix}-N` (any N ≥ 1, also above
/// `KAFKA_CONSUMER_RETRY_MAX`, so a failure there goes to the DLQ as exhausted), else 0.
pub(super) fn retry_level(prefix: &str, topic: &str) -> u32 {
    let Some(rest) = topic.strip_prefix(prefix).and_then(|r| r.strip_prefix('-')) else {
        return 0;
    };
    match rest.parse::<u32>() {
        Ok(n) if n >= 1 && rest.bytes().all(|b| b.is_ascii_digit()) => n,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_levels_above_the_configured_maximum_are_recognised() {
        assert_eq!(retry_level("ev-retry", "ev-retry-1"), 1);
        assert_eq!(retry_level("ev-retry", "ev-retry-7"), 7);
        assert_eq!(retry_level("ev-retry", "ev"), 0);
        assert_eq!(retry_level("ev-retry", "ev-retry-0"), 0);
        assert_eq!(retry_level("ev-retry", "ev-retry-+1"), 0);
        assert_eq!(retry_level("ev-retry", "ev-retry-1x"), 0);
        assert_eq!(retry_level("ev-retry", "ev-retryx-1"), 0);
    }
}
