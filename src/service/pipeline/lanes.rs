//! Worker lanes: each lane handles its jobs one after another, so one key's messages are
//! processed in order (a key always hashes to the same lane). A lane starts a job only
//! through its partition's [`Gate`]: once the partition is revoked, jobs still queued for
//! it are never started (DESIGN.md, guarantee 7), and the revoke waits only for the jobs
//! that did start. A lane survives anything a job does, panics included.

use std::hash::{Hash, Hasher};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::FutureExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::model::Outcome;
use crate::observability::events::{At, HandlingPanicked};
use crate::service::source::{Epoch, Tp};
use crate::service::worker::{Job, WorkerContext};

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
    pub(super) offset: i64,
    pub(super) bytes: usize,
    /// The gate the job entered: the pipeline leaves it once the completion is recorded.
    pub(super) entered: Option<Arc<Gate>>,
    pub(super) outcome: Outcome,
}

/// Starts `workers` lanes; each queue holds at most `capacity` jobs.
pub(super) fn spawn(
    workers: usize,
    capacity: usize,
    ctx: &Arc<WorkerContext>,
    done: &mpsc::Sender<Completion>,
) -> Vec<mpsc::Sender<LaneJob>> {
    (0..workers)
        .map(|_| {
            let (tx, rx) = mpsc::channel::<LaneJob>(capacity);
            tokio::spawn(run_lane(rx, ctx.clone(), done.clone()));
            tx
        })
        .collect()
}

async fn run_lane(
    mut rx: mpsc::Receiver<LaneJob>,
    ctx: Arc<WorkerContext>,
    done: mpsc::Sender<Completion>,
) {
    while let Some(lj) = rx.recv().await {
        let entered = lj.gate.enter();
        let outcome = if entered {
            handle(&ctx, &lj).await
        } else {
            Outcome::Abandoned
        };
        let c = Completion {
            tp: lj.tp,
            generation: lj.generation,
            offset: lj.job.delivery.offset,
            bytes: lj.bytes,
            entered: entered.then_some(lj.gate),
            outcome,
        };
        if done.send(c).await.is_err() {
            break;
        }
    }
}

/// Handles one job; a panic outside the processor (which `WorkerContext::handle` already
/// turns into a fatal failure) is a bug: the message stays unfinished, so its partition's
/// commit point holds at it, and readiness says so.
async fn handle(ctx: &WorkerContext, lj: &LaneJob) -> Outcome {
    match AssertUnwindSafe(ctx.handle(&lj.job, lj.gate.revoked()))
        .catch_unwind()
        .await
    {
        Ok(outcome) => outcome,
        Err(panic) => {
            let d = &lj.job.delivery;
            let reason = format!(
                "handling the message panicked: {}",
                crate::service::worker::panic_message(&*panic)
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
    }
}

/// The lane of a message: by key hash, so one key stays in order; keyless messages spread.
pub(super) fn lane_of(key: Option<&[u8]>, lanes: usize, round_robin: &mut usize) -> usize {
    match key {
        Some(k) => {
            // `DefaultHasher::new()` has fixed keys: a key maps to the same lane for the run.
            let mut h = std::collections::hash_map::DefaultHasher::new();
            k.hash(&mut h);
            (h.finish() % lanes as u64) as usize
        }
        None => {
            *round_robin = round_robin.wrapping_add(1);
            *round_robin % lanes
        }
    }
}
