//! Assignments and revocations in the pipeline (DESIGN.md, guarantee 7). A revoke closes the
//! partition's gate (work queued for it is never started), drains what is running, bounded
//! by the shutdown timeout, and answers with the commit points; what it abandons stays
//! uncommitted for the next owner. Every revoke names the generation it is about, so a late
//! answer never touches a later assignment of the same partition.

use std::sync::mpsc::SyncSender;

use tokio::time::Instant;

use crate::service::source::{Epoch, Tp};

use super::partition::{retry_level, Part};
use super::{deadline_after, State};

/// A revoke the pipeline is draining.
pub(super) struct PendingRevoke {
    /// The partitions and the generation each had when the revoke came.
    partitions: Vec<(Tp, Epoch)>,
    reply: SyncSender<Vec<(Tp, i64)>>,
    pub(super) deadline: Instant,
}

fn names<'a>(tps: impl IntoIterator<Item = &'a Tp>) -> Vec<String> {
    tps.into_iter().map(Tp::to_string).collect()
}

impl State {
    pub(super) fn on_assigned(&mut self, list: Vec<(Tp, Epoch)>) {
        tracing::info!(partitions = ?names(list.iter().map(|(tp, _)| tp)), "Partitions assigned.");
        for (tp, generation) in list {
            let level = retry_level(&self.ctx.retry.topic_prefix, &tp.topic);
            let counters = self
                .topic_counters
                .entry(tp.topic.clone())
                .or_insert_with(|| self.ctx.metrics.topic_counters(&tp.topic))
                .clone();
            let part = Part::new(tp.clone(), generation, level, counters);
            if let Some(old) = self.parts.insert(tp, part) {
                // An earlier assignment whose revoke was not answered in time: it stays
                // closed, and its late completions no longer count here.
                old.gate.close();
                self.retire(old);
            }
        }
        self.pause_dirty = true;
    }

    pub(super) fn on_revoked(
        &mut self,
        partitions: Vec<Tp>,
        lost: bool,
        reply: SyncSender<Vec<(Tp, i64)>>,
    ) {
        if self.revoke.is_some() {
            self.finish_revoke();
        }
        let mut list = Vec::new();
        for tp in partitions {
            if let Some(p) = self.parts.get_mut(&tp) {
                p.revoking = true;
                p.gate.close();
                list.push((tp, p.generation));
            }
        }
        self.pending.retain(|(d, _)| {
            !list
                .iter()
                .any(|(tp, _)| tp.topic == d.topic && tp.partition == d.partition)
        });
        self.revoke = Some(PendingRevoke {
            partitions: list,
            reply,
            deadline: deadline_after(self.cfg.shutdown_timeout),
        });
        if lost {
            // Another member owns them already: nothing to wait for, nothing to commit.
            self.finish_revoke_with(false);
        }
    }

    /// Finishes the pending revoke once nothing started for its partitions is running.
    pub(super) fn maybe_finish_revoke(&mut self) {
        let Some(r) = &self.revoke else { return };
        let drained = r.partitions.iter().all(|(tp, g)| {
            self.parts
                .get(tp)
                .filter(|p| p.generation == *g)
                .is_none_or(|p| p.gate.running() == 0)
        });
        if drained {
            self.finish_revoke();
        }
    }

    /// Drops the revoked partitions' state and answers with their commit points.
    pub(super) fn finish_revoke(&mut self) {
        self.finish_revoke_with(true);
    }

    fn finish_revoke_with(&mut self, commit: bool) {
        let Some(r) = self.revoke.take() else { return };
        let mut offsets = Vec::new();
        let mut abandoned = 0;
        for (tp, generation) in &r.partitions {
            // Assigned again meanwhile: that is a new assignment's state, left alone.
            let ours = self.parts.get(tp).map(|p| p.generation) == Some(*generation);
            let Some(p) = ours.then(|| self.parts.remove(tp)).flatten() else {
                continue;
            };
            if commit {
                if let Some(o) = p.offsets.commit_point() {
                    offsets.push((tp.clone(), o));
                }
            }
            abandoned += p.offsets.in_flight();
            self.retire(p);
        }
        tracing::info!(partitions = ?names(r.partitions.iter().map(|(tp, _)| tp)), committing = offsets.len(), left_uncommitted = abandoned, "Partitions revoked.");
        let _ = r.reply.send(offsets);
        self.pause_dirty = true;
    }

    /// Moves a partition's counts into the summary.
    pub(super) fn retire(&mut self, p: Part) {
        self.summary
            .entry((*p.tp).clone())
            .or_default()
            .add(&p.stats);
    }
}
