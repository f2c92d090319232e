//! The driver's shared state: what the pipeline asked for (coalesced per partition, bounded
//! by the partition count), the live assignments with their generations and fetch epochs,
//! and commits that failed and are tried again. Applied between polls by `apply_commands`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::rebalance::DriverContext;
use crate::service::source::{DeliveryBatch, Epoch, Tp};

/// One assignment of a partition: its generation and current fetch epoch.
#[derive(Debug, Clone, Copy)]
pub(super) struct Assigned {
    pub(super) generation: Epoch,
    pub(super) fetch_epoch: Epoch,
}

/// The live assignments. Every change (through `DerefMut`) bumps the version, so the poll
/// loop can keep its last look-up until something changed (see `poll_batch`).
#[derive(Default)]
pub(super) struct Assignments {
    map: HashMap<Tp, Assigned>,
    version: u64,
}

impl std::ops::Deref for Assignments {
    type Target = HashMap<Tp, Assigned>;

    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl std::ops::DerefMut for Assignments {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.version = self.version.wrapping_add(1);
        &mut self.map
    }
}

impl Assignments {
    /// Bumped by every change.
    pub(super) fn version(&self) -> u64 {
        self.version
    }
}

#[derive(Default)]
pub(super) struct Commands {
    pub(super) pause: BTreeMap<Tp, (Epoch, bool)>,
    pub(super) seek: BTreeMap<Tp, (Epoch, i64, Epoch)>,
    pub(super) commit: BTreeMap<Tp, (Epoch, i64)>,
    pub(super) close: Option<Vec<(Tp, Epoch, i64)>>,
}

impl Commands {
    pub(super) fn forget(&mut self, tp: &Tp) {
        self.pause.remove(tp);
        self.seek.remove(tp);
        self.commit.remove(tp);
    }
}

/// Commits that failed (a rebalance in progress, a generation that just changed): tried
/// again, at most every [`COMMIT_RETRY`], while the same assignment holds the partition.
/// Otherwise a partition whose commit point stopped moving would stay uncommitted until
/// the next owner re-read it.
#[derive(Default)]
pub(super) struct FailedCommits {
    /// The generation each partition's last commit was issued under.
    pub(super) issued: HashMap<Tp, Epoch>,
    pub(super) retry: BTreeMap<Tp, (Epoch, i64)>,
    pub(super) last_retry: Option<std::time::Instant>,
}

/// How often failed commits are tried again.
pub(super) const COMMIT_RETRY: Duration = Duration::from_secs(1);

pub(super) struct Shared {
    pub(super) commands: Mutex<Commands>,
    /// Deliveries and batch buffers the pipeline handed back, freed and reused by the poll
    /// loop (see `DriverControl::recycle`).
    pub(super) recycled: Mutex<Vec<DeliveryBatch>>,
    pub(super) assigned: Mutex<Assignments>,
    pub(super) failed: Mutex<FailedCommits>,
    pub(super) next_epoch: AtomicU64,
    pub(super) closing: AtomicBool,
}

impl Shared {
    pub(super) fn new_epoch(&self) -> Epoch {
        self.next_epoch.fetch_add(1, Ordering::SeqCst)
    }

    /// Whether `generation` is the live assignment of `tp`.
    pub(super) fn is_live(&self, tp: &Tp, generation: Epoch) -> bool {
        self.assigned
            .lock()
            .get(tp)
            .is_some_and(|a| a.generation == generation)
    }

    /// Commits to issue now: the requested ones, plus failed ones due for another try; all
    /// of live assignments only.
    pub(super) fn commits_to_issue(&self, requested: BTreeMap<Tp, (Epoch, i64)>) -> Vec<(Tp, i64)> {
        let mut failed = self.failed.lock();
        let mut all = requested;
        let due = failed
            .last_retry
            .is_none_or(|t| t.elapsed() >= COMMIT_RETRY);
        if due && !failed.retry.is_empty() {
            failed.last_retry = Some(std::time::Instant::now());
            for (tp, c) in std::mem::take(&mut failed.retry) {
                all.entry(tp).or_insert(c);
            }
        }
        let live: Vec<(Tp, Epoch, i64)> = {
            let assigned = self.assigned.lock();
            all.into_iter()
                .filter(|(tp, (g, _))| assigned.get(tp).is_some_and(|a| a.generation == *g))
                .map(|(tp, (g, o))| (tp, g, o))
                .collect()
        };
        for (tp, g, _) in &live {
            failed.issued.insert(tp.clone(), *g);
        }
        live.into_iter().map(|(tp, _, o)| (tp, o)).collect()
    }

    /// Keeps offsets whose commit could not even be queued for another try.
    pub(super) fn requeue(&self, offsets: Vec<(Tp, i64)>) {
        let mut failed = self.failed.lock();
        let assigned = self.assigned.lock();
        for (tp, o) in offsets {
            if let Some(a) = assigned.get(&tp) {
                let slot = failed.retry.entry(tp).or_insert((a.generation, o));
                slot.1 = slot.1.max(o);
            }
        }
    }

    /// Keeps the failed offsets of `tpl` for another try, where the assignment that issued
    /// them still holds the partition.
    pub(super) fn commit_failed(&self, tpl: &TopicPartitionList, all: bool) {
        let mut failed = self.failed.lock();
        let assigned = self.assigned.lock();
        for e in tpl.elements().iter().filter(|e| all || e.error().is_err()) {
            let Offset::Offset(o) = e.offset() else {
                continue;
            };
            let tp = Tp::new(e.topic(), e.partition());
            let Some(g) = failed.issued.get(&tp).copied() else {
                continue;
            };
            if assigned.get(&tp).is_some_and(|a| a.generation == g) {
                tracing::debug!(partition = %tp, offset = o, "A failed commit is kept for another try.");
                let slot = failed.retry.entry(tp).or_insert((g, o));
                slot.1 = slot.1.max(o);
            } else {
                tracing::debug!(partition = %tp, offset = o, "A failed commit of an assignment that is gone is dropped.");
            }
        }
    }

    /// The offsets of live assignments only.
    pub(super) fn live_offsets(
        &self,
        offsets: impl IntoIterator<Item = (Tp, Epoch, i64)>,
    ) -> Vec<(Tp, i64)> {
        let assigned = self.assigned.lock();
        offsets
            .into_iter()
            .filter(|(tp, g, _)| assigned.get(tp).is_some_and(|a| a.generation == *g))
            .map(|(tp, _, o)| (tp, o))
            .collect()
    }
}

pub(super) fn tps_of(tpl: &TopicPartitionList) -> Vec<Tp> {
    tpl.elements()
        .iter()
        .map(|e| Tp::new(e.topic(), e.partition()))
        .collect()
}

pub(super) fn tpl_of(offsets: &[(Tp, i64)]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for (tp, o) in offsets {
        // Adding an absolute offset to a fresh list cannot fail.
        let _ = tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*o));
    }
    tpl
}

pub(super) fn names(tps: &[Tp]) -> Vec<String> {
    tps.iter().map(Tp::to_string).collect()
}

/// Commits `offsets` without waiting, with the result reported to
/// [`ConsumerContext::commit_callback`]. rdkafka's `commit(.., CommitMode::Async)` leaves the
/// result unreported (librdkafka reports a manual asynchronous commit only to an
/// `offset_commit_cb` or a reply queue, and rdkafka sets neither), so a failed commit would
/// go unseen and never be retried: the reply goes to the consumer queue instead, which
/// `poll` serves as an offset-commit event.
pub(super) fn commit_async(consumer: &BaseConsumer<DriverContext>, offsets: &TopicPartitionList) {
    use rdkafka::bindings as rdsys;
    tracing::debug!(offsets = ?offsets_of(offsets), "Committing offsets.");
    let rk = consumer.client().native_ptr();
    // SAFETY: `rk` is the live client of `consumer`; the queue reference is released below
    // (librdkafka keeps its own for the reply); `offsets` is copied by librdkafka.
    let err = unsafe {
        let queue = rdsys::rd_kafka_queue_get_consumer(rk);
        let err =
            rdsys::rd_kafka_commit_queue(rk, offsets.ptr(), queue, None, std::ptr::null_mut());
        rdsys::rd_kafka_queue_destroy(queue);
        err
    };
    if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        let code: rdkafka::error::RDKafkaErrorCode = err.into();
        tracing::warn!(error = %code, "Queuing an offset commit failed; it is tried again.");
        let mut commits = Vec::new();
        for e in offsets.elements() {
            if let Offset::Offset(o) = e.offset() {
                commits.push((Tp::new(e.topic(), e.partition()), o));
            }
        }
        consumer.context().shared.requeue(commits);
    }
}

/// `topic/partition@offset` per element, for logs.
pub(super) fn offsets_of(tpl: &TopicPartitionList) -> Vec<String> {
    tpl.elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => format!("{}/{}@{o}", e.topic(), e.partition()),
            other => format!("{}/{}@{other:?}", e.topic(), e.partition()),
        })
        .collect()
}

fn partition_list(tps: &[Tp]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for tp in tps {
        tpl.add_partition(&tp.topic, tp.partition);
    }
    tpl
}

/// Applies pending requests about live assignments (anything about an assignment that is
/// gone is dropped); returns the final offsets when close was requested.
pub(super) fn apply_commands(
    consumer: &BaseConsumer<DriverContext>,
    shared: &Shared,
) -> Option<Vec<(Tp, i64)>> {
    let cmds = std::mem::take(&mut *shared.commands.lock());
    let (mut pause, mut resume) = (Vec::new(), Vec::new());
    for (tp, (g, p)) in cmds.pause {
        if shared.is_live(&tp, g) {
            if p {
                pause.push(tp)
            } else {
                resume.push(tp)
            }
        } else {
            tracing::debug!(partition = %tp, generation = g, pause = p, "Dropped a pause/resume request of an assignment that is gone.");
        }
    }
    if !pause.is_empty() || !resume.is_empty() || !cmds.seek.is_empty() {
        tracing::debug!(pause = ?names(&pause), resume = ?names(&resume), seek = ?cmds.seek.iter().map(|(tp, (g, o, e))| format!("{tp}@{o} g{g} e{e}")).collect::<Vec<_>>(), "Applying fetch requests.");
    }
    if !pause.is_empty() {
        if let Err(e) = consumer.pause(&partition_list(&pause)) {
            tracing::warn!(error = %e, "Pausing partitions failed.");
        }
    }
    let mut failed = Vec::new();
    for (tp, (g, offset, epoch)) in cmds.seek {
        if !shared.is_live(&tp, g) {
            continue;
        }
        match consumer.seek(
            &tp.topic,
            tp.partition,
            Offset::Offset(offset),
            Duration::from_secs(5),
        ) {
            Ok(()) => {
                if let Some(a) = shared.assigned.lock().get_mut(&tp) {
                    if a.generation == g {
                        a.fetch_epoch = epoch;
                    }
                }
            }
            Err(e) => {
                // Until the seek succeeds, deliveries keep the old epoch and are dropped by
                // the pipeline (they are fetched again after the seek): try again next round.
                tracing::warn!(topic = %tp.topic, partition = tp.partition, offset, error = %e, "Seek failed; retrying.");
                failed.push((tp, (g, offset, epoch)));
            }
        }
    }
    if !failed.is_empty() {
        let mut commands = shared.commands.lock();
        for (tp, seek) in failed {
            commands.seek.entry(tp).or_insert(seek);
        }
    }
    if !resume.is_empty() {
        if let Err(e) = consumer.resume(&partition_list(&resume)) {
            tracing::warn!(error = %e, "Resuming partitions failed.");
        }
    }
    let commits = shared.commits_to_issue(cmds.commit);
    if !commits.is_empty() {
        commit_async(consumer, &tpl_of(&commits));
    }
    cmds.close.map(|offsets| shared.live_offsets(offsets))
}
