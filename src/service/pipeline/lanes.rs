//! Worker lanes: each lane handles its jobs one after another, so one key's messages are
//! processed in order (a key always hashes to the same lane). A lane starts a job only
//! through its partition's [`Gate`]: once the partition is revoked, jobs still queued for
//! it are never started (DESIGN.md, guarantee 7), and the revoke waits only for the jobs
//! that did start. A lane survives anything a job does, panics included.

use std::hash::BuildHasher;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::FutureExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::model::{Delivery, Outcome};
use crate::observability::events::{At, HandlingPanicked};
use crate::service::source::{Epoch, Tp};
use crate::service::worker::{Job, Step, WorkerContext};

const CLOSED: u64 = 1 << 63;

/// The door of one partition assignment to the lanes: counts the jobs running for it, and
/// once closed (revoked) lets no new job start and tells held ones to give up.
#[derive(Debug, Default)]
pub(super) struct Gate(AtomicU64, CancellationToken);

impl Gate {
    /// A lane is about to start a job: `false` once the partition is revoked.
    pub(super) fn enter(&self) -> bool {
        let mut cur = self.0.load(Ordering::Acquire);
        loop {
            if cur & CLOSED != 0 {
                return false;
            }
            match self
                .0
                .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    /// A started job's completion was recorded by the pipeline.
    pub(super) fn leave(&self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }

    /// The partition is revoked: no job starts from now on.
    pub(super) fn close(&self) {
        self.0.fetch_or(CLOSED, Ordering::AcqRel);
        self.1.cancel();
    }

    /// Cancelled once the partition is revoked.
    pub(super) fn revoked(&self) -> &CancellationToken {
        &self.1
    }

    /// Jobs started and not yet recorded as complete.
    pub(super) fn running(&self) -> u64 {
        self.0.load(Ordering::Acquire) & !CLOSED
    }
}

/// A message on its way to a lane.
pub(super) struct LaneJob {
    pub(super) tp: Arc<Tp>,
    pub(super) generation: Epoch,
    pub(super) gate: Arc<Gate>,
    pub(super) bytes: usize,
    pub(super) job: Job,
}

/// What a lane reports for each job it took.
pub(super) struct Completion {
    pub(super) tp: Arc<Tp>,
    pub(super) generation: Epoch,
    /// The message, back to the pipeline (which hands it back to the driver to free).
    pub(super) delivery: Delivery,
    pub(super) bytes: usize,
    /// The gate the job entered: the pipeline leaves it once the completion is recorded.
    pub(super) entered: Option<Arc<Gate>>,
    pub(super) outcome: Outcome,
}

/// Starts `workers` lanes; each queue holds at most `capacity` batches of jobs.
pub(super) fn spawn(
    workers: usize,
    capacity: usize,
    ctx: &Arc<WorkerContext>,
    done: &mpsc::Sender<Completion>,
) -> Vec<mpsc::Sender<Vec<LaneJob>>> {
    (0..workers)
        .map(|_| {
            let (tx, rx) = mpsc::channel::<Vec<LaneJob>>(capacity);
            tokio::spawn(run_lane(rx, ctx.clone(), done.clone()));
            tx
        })
        .collect()
}

/// A lane: takes its jobs in batches (one hand-over per batch), handles each in turn, and
/// reports each completion as soon as it has it. A failed message's retry or DLQ publish
/// (and, before it, the circuit breaker's verdict on a suspect failure) runs in a task of
/// its own, which reports the completion once the broker acknowledged it, so the lane goes
/// on meanwhile; its partition's commit point holds at the message
/// until then (it is in flight), so what is committed and when does not change.
async fn run_lane(
    mut rx: mpsc::Receiver<Vec<LaneJob>>,
    ctx: Arc<WorkerContext>,
    done: mpsc::Sender<Completion>,
) {
    while let Some(batch) = rx.recv().await {
        for lj in batch {
            let entered = lj.gate.enter();
            let step = if entered {
                handle(&ctx, &lj).await
            } else {
                Step::Done(Outcome::Abandoned)
            };
            match step {
                Step::Done(outcome) => {
                    if done.send(completion(lj, entered, outcome)).await.is_err() {
                        return;
                    }
                }
                step => {
                    let (ctx, done) = (ctx.clone(), done.clone());
                    tokio::spawn(async move {
                        let outcome = finish(&ctx, &lj, step).await;
                        let _ = done.send(completion(lj, true, outcome)).await;
                    });
                }
            }
        }
    }
}

fn completion(lj: LaneJob, entered: bool, outcome: Outcome) -> Completion {
    Completion {
        tp: lj.tp,
        generation: lj.generation,
        delivery: lj.job.delivery,
        bytes: lj.bytes,
        entered: entered.then_some(lj.gate),
        outcome,
    }
}

/// Handles one job up to its outcome or its next hop; a panic outside the processor (which
/// `WorkerContext::process` already turns into a fatal failure) is a bug: the message
/// stays unfinished, so its partition's commit point holds at it, and readiness says so.
async fn handle(ctx: &WorkerContext, lj: &LaneJob) -> Step {
    match AssertUnwindSafe(ctx.process(&lj.job, lj.gate.revoked()))
        .catch_unwind()
        .await
    {
        Ok(step) => step,
        Err(panic) => Step::Done(panicked(ctx, lj, &*panic)),
    }
}

/// Takes a failed job off the lane to its outcome (the breaker's verdict on a suspect, the
/// publish of its next hop); a panic is handled as in [`handle`].
async fn finish(ctx: &WorkerContext, lj: &LaneJob, step: Step) -> Outcome {
    match AssertUnwindSafe(ctx.finish(&lj.job, step, lj.gate.revoked()))
        .catch_unwind()
        .await
    {
        Ok(outcome) => outcome,
        Err(panic) => panicked(ctx, lj, &*panic),
    }
}

fn panicked(ctx: &WorkerContext, lj: &LaneJob, panic: &(dyn std::any::Any + Send)) -> Outcome {
    let d = &lj.job.delivery;
    let reason = format!(
        "handling the message panicked: {}",
        crate::service::worker::panic_message(panic)
    );
    ctx.metrics.emit(HandlingPanicked {
        at: At::of(d),
        reason: &reason,
    });
    ctx.holds.hold(
        &format!("{}/{}@{}", d.topic, d.partition, d.offset),
        &reason,
    );
    Outcome::Abandoned
}

/// The hasher of keys to lanes (foldhash, fixed seed).
const LANE_HASH: foldhash::fast::FixedState =
    foldhash::fast::FixedState::with_seed(0x0063_6f75_7269_6572);

/// The lane of a message: by key hash, so one key stays in order; keyless messages spread.
pub(super) fn lane_of(key: Option<&[u8]>, lanes: usize, round_robin: &mut usize) -> usize {
    match key {
        Some(k) => {
            // A fixed seed: a key maps to the same lane for the run (and across runs).
            (LANE_HASH.hash_one(k) % lanes as u64) as usize
        }
        None => {
            *round_robin = round_robin.wrapping_add(1);
            *round_robin % lanes
        }
    }
}
