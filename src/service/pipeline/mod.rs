//! The consumer pipeline: one task that takes deliveries from the driver, passes each
//! through its partition's retry gate (`partition`), bounds what is in flight in messages
//! and bytes (pausing fetches when the bound holds), dispatches to key-hash worker lanes
//! (`lanes`), tracks finished offsets per partition, commits the lowest unfinished one, and
//! follows the group's assignments and revokes (`rebalance`). See DESIGN.md, guarantees 1
//! to 7.

mod lanes;
mod partition;
mod rebalance;
mod summary;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::model::Outcome;
use crate::model::{now_ms, Delivery};
use crate::observability::events::{
    At, FinishedAfterRevoke, ForeignRetrySkipped, PipelineState, TopicCounters,
};
use crate::service::circuit::CircuitState;
use crate::service::source::{DeliveryBatch, DriverControl, DriverEvent, Epoch, Tp};
use crate::service::worker::{Job, WorkerContext};

use lanes::{Completion, LaneJob};
use partition::{Admit, GateRules, Part};
use rebalance::PendingRevoke;
pub use summary::{ConsumerSummary, PartitionCounts};

/// Pipeline sizing and deadlines.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Worker lanes.
    pub workers: usize,
    /// Messages in flight at most.
    pub max_in_flight: usize,
    /// Bytes (key, payload, headers) in flight at most; one larger message is still taken
    /// when nothing else is in flight.
    pub max_in_flight_bytes: usize,
    /// Commit cadence.
    pub commit_interval: Duration,
    /// How long shutdown and revoke wait for in-flight messages.
    pub shutdown_timeout: Duration,
    /// How long the in-flight bound must hold before the assigned partitions are paused
    /// (`KAFKA_CONSUMER_PAUSE_AFTER_MS`). The bound itself never depends on it.
    pub pause_after: Duration,
    /// A due time further ahead than this is treated as malformed (due now), so a bogus
    /// header cannot stall a partition.
    pub max_due_ahead: Duration,
}

/// `now + d`, or a year from now when that does not fit (time arithmetic never panics).
pub(crate) fn deadline_after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(86_400 * 365)))
        .unwrap_or(now)
}

struct State {
    cfg: PipelineConfig,
    ctx: Arc<WorkerContext>,
    control: Arc<dyn DriverControl>,
    lanes: Vec<mpsc::Sender<Vec<LaneJob>>>,
    /// Jobs accepted for each lane and not handed over yet: one hand-over per lane and
    /// round of `accept_pending`, not one per message.
    lane_batches: Vec<Vec<LaneJob>>,
    parts: HashMap<Tp, Part, foldhash::fast::RandomState>,
    /// The partition of the last accepted delivery: deliveries come in runs of one
    /// partition, so most look-ups reuse it instead of building a `Tp`.
    last_tp: Option<Arc<Tp>>,
    in_flight: usize,
    in_flight_bytes: usize,
    backpressure: bool,
    saturated_since: Option<Instant>,
    draining: bool,
    pause_dirty: bool,
    pending: VecDeque<(Delivery, Epoch)>,
    /// Deliveries the pipeline is done with, to hand back to the driver (see `spend`).
    spent: DeliveryBatch,
    revoke: Option<PendingRevoke>,
    summary: ConsumerSummary,
    topic_counters: HashMap<String, TopicCounters>,
    round_robin: usize,
    /// When every commit point was last sent, moved or not (see [`REASSERT_COMMITS`]).
    last_reassert: Instant,
}

/// How often every owned partition's commit point is committed again even though it did
/// not move, as Kafka's own auto-commit does. A commit the broker refused during a
/// rebalance, or a late commit of an older owner that overwrote it, is then repaired
/// within this time instead of waiting for the partition's next message.
pub(crate) const REASSERT_COMMITS: Duration = Duration::from_secs(5);

/// Spent deliveries handed back to the driver at once.
const RECYCLE_BATCH: usize = 256;

/// Completions taken per turn of the pipeline's loop at most.
const COMPLETIONS_PER_TURN: usize = 512;

/// Runs the pipeline until `shutdown` is cancelled (or the driver stops), then drains
/// in-flight messages up to the shutdown timeout, commits, and closes the driver.
pub async fn run(
    cfg: PipelineConfig,
    ctx: Arc<WorkerContext>,
    control: Arc<dyn DriverControl>,
    mut events: mpsc::Receiver<DriverEvent>,
    mut deliveries: mpsc::Receiver<DeliveryBatch>,
    shutdown: CancellationToken,
) -> ConsumerSummary {
    let (done_tx, mut done_rx) = mpsc::channel::<Completion>(cfg.max_in_flight + 1);
    let mut completions = Vec::with_capacity(COMPLETIONS_PER_TURN);
    // A lane never holds more than the in-flight bound (in batches of at least one job), so
    // `try_send` to it cannot fail.
    let lanes = lanes::spawn(cfg.workers, cfg.max_in_flight + 1, &ctx, &done_tx);
    drop(done_tx);
    let mut st = State::new(cfg.clone(), ctx.clone(), control, lanes);
    let mut commit_tick = tokio::time::interval(cfg.commit_interval);
    commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let far = deadline_after(Duration::from_secs(86_400 * 365));
    let mut drain_deadline = far;
    let mut events_closed = false;
    let mut done_closed = false;
    let mut circuit = ctx.breaker.subscribe();
    loop {
        st.accept_pending();
        st.apply_pauses();
        if st.draining && st.in_flight == 0 {
            break;
        }
        let can_read = !st.draining && st.pending.is_empty() && st.has_room();
        // Only a deadline that is set reads the clock (every branch's future is built on
        // every turn, enabled or not).
        let due_at = st.next_due().map(|due| {
            deadline_after(Duration::from_millis(
                due.saturating_sub(now_ms()).max(0) as u64
            ))
        });
        let revoke_deadline = st.revoke.as_ref().map(|r| r.deadline);
        let pressure_at = st.backpressure_deadline();
        let probe_at = ctx.breaker.next_deadline();
        tokio::select! {
            biased;
            _ = shutdown.cancelled(), if !st.draining => {
                tracing::info!(in_flight = st.in_flight, "Shutting down: draining in-flight messages.");
                st.start_draining();
                drain_deadline = deadline_after(cfg.shutdown_timeout);
            }
            ev = events.recv(), if !events_closed => match ev {
                Some(DriverEvent::Assigned(list)) => st.on_assigned(list),
                Some(DriverEvent::Revoked { partitions, lost, reply }) => st.on_revoked(partitions, lost, reply),
                None => {
                    events_closed = true;
                    if !st.draining {
                        tracing::warn!("The consumer driver stopped; draining.");
                        st.start_draining();
                        drain_deadline = deadline_after(cfg.shutdown_timeout);
                    }
                }
            },
            n = done_rx.recv_many(&mut completions, COMPLETIONS_PER_TURN), if !done_closed => {
                done_closed = n == 0;
                for c in completions.drain(..) {
                    st.on_completion(c);
                }
            }
            _ = tokio::time::sleep_until(revoke_deadline.unwrap_or(far)), if revoke_deadline.is_some() => {
                tracing::warn!("Revoke timed out waiting for running messages; committing what is finished, the rest stays uncommitted for the next owner.");
                st.finish_revoke();
            }
            _ = tokio::time::sleep_until(due_at.unwrap_or(far)), if due_at.is_some() => st.wake_due(),
            _ = tokio::time::sleep_until(pressure_at.unwrap_or(far)), if pressure_at.is_some() => {}
            Ok(()) = circuit.changed() => st.pause_dirty = true,
            _ = tokio::time::sleep_until(probe_at.unwrap_or(far)), if probe_at.is_some() => ctx.breaker.tick(),
            _ = commit_tick.tick() => st.commit(),
            _ = tokio::time::sleep_until(drain_deadline), if st.draining => {
                tracing::warn!(in_flight = st.in_flight, "Shutdown timeout: unfinished messages stay uncommitted and are consumed again after a restart.");
                break;
            }
            batch = deliveries.recv(), if can_read => match batch {
                Some(b) => st.take_batch(b),
                None if !st.draining => {
                    st.start_draining();
                    drain_deadline = deadline_after(cfg.shutdown_timeout);
                }
                None => {}
            },
        }
        st.maybe_finish_revoke();
    }
    ctx.abort.cancel();
    // The driver may be blocked handing over a batch or a revoke: let go of both streams
    // before asking it to close.
    drop(deliveries);
    drop(events);
    st.finish(&mut done_rx).await
}

impl State {
    fn new(
        cfg: PipelineConfig,
        ctx: Arc<WorkerContext>,
        control: Arc<dyn DriverControl>,
        lanes: Vec<mpsc::Sender<Vec<LaneJob>>>,
    ) -> Self {
        State {
            cfg,
            ctx,
            control,
            lane_batches: (0..lanes.len()).map(|_| Vec::new()).collect(),
            lanes,
            parts: HashMap::default(),
            last_tp: None,
            in_flight: 0,
            in_flight_bytes: 0,
            backpressure: false,
            saturated_since: None,
            draining: false,
            pause_dirty: false,
            pending: VecDeque::new(),
            spent: Vec::new(),
            revoke: None,
            summary: ConsumerSummary::new(),
            topic_counters: HashMap::new(),
            round_robin: 0,
            last_reassert: Instant::now(),
        }
    }

    fn start_draining(&mut self) {
        self.draining = true;
        // Messages the circuit holds give up now (uncommitted), not at the drain deadline.
        self.ctx.stop_holding.cancel();
        self.pending.clear();
        self.pause_dirty = true;
    }

    /// Whether another message may go in flight: below both bounds (a message larger than
    /// the byte bound is still taken when nothing else is in flight).
    fn has_room(&self) -> bool {
        self.in_flight < self.cfg.max_in_flight
            && self.in_flight_bytes < self.cfg.max_in_flight_bytes
    }

    fn fits(&self, bytes: usize) -> bool {
        self.in_flight == 0
            || (self.in_flight < self.cfg.max_in_flight
                && self.in_flight_bytes.saturating_add(bytes) <= self.cfg.max_in_flight_bytes)
    }

    fn accept_pending(&mut self) {
        // One clock read per round: a time read a little early can only make a retry wait
        // longer, never run before its due time.
        let now = (!self.pending.is_empty()).then(now_ms).unwrap_or_default();
        while !self.draining {
            let Some((d, _)) = self.pending.front() else {
                break;
            };
            if !self.fits(d.size_bytes()) {
                break;
            }
            let Some((d, epoch)) = self.pending.pop_front() else {
                break;
            };
            self.accept(d, epoch, now);
        }
        self.hand_over();
        // The bounds hold because no delivery is taken beyond them. Pausing the partitions
        // on top of that keeps the driver polling (callbacks, group liveness) during
        // sustained saturation; a pause makes librdkafka drop what it prefetched, so a
        // momentary peak must not trigger it.
        let now = Instant::now();
        let saturated = !self.pending.is_empty() || !self.has_room();
        let relieved = self.in_flight <= self.cfg.max_in_flight / 2
            && self.in_flight_bytes <= self.cfg.max_in_flight_bytes / 2;
        if saturated && !self.draining {
            let since = *self.saturated_since.get_or_insert(now);
            if !self.backpressure && now.saturating_duration_since(since) >= self.cfg.pause_after {
                self.backpressure = true;
                self.pause_dirty = true;
            }
        } else if relieved {
            self.saturated_since = None;
            if self.backpressure {
                self.backpressure = false;
                self.pause_dirty = true;
            }
        }
        self.ctx.metrics.emit(PipelineState {
            in_flight: Some(self.in_flight),
            ..PipelineState::default()
        });
    }

    /// When a sustained saturation should turn into paused partitions, if it may.
    fn backpressure_deadline(&self) -> Option<Instant> {
        match (self.backpressure, self.saturated_since) {
            (false, Some(since)) => since.checked_add(self.cfg.pause_after),
            _ => None,
        }
    }

    /// Hands the accepted jobs over to their lanes, one batch per lane.
    fn hand_over(&mut self) {
        for (lane, batch) in self.lanes.iter().zip(self.lane_batches.iter_mut()) {
            if batch.is_empty() {
                continue;
            }
            if let Err(e) = lane.try_send(std::mem::take(batch)) {
                // Unreachable while the bound holds; never drop silently.
                tracing::error!(error = %e, "A worker lane refused messages; they stay uncommitted.");
            }
        }
    }

    fn accept(&mut self, d: Delivery, epoch: Epoch, now: i64) {
        // Deliveries come in runs of one partition: the last one's `Tp` is reused.
        let same = self
            .last_tp
            .as_ref()
            .is_some_and(|tp| tp.partition == d.partition && tp.topic == d.topic);
        if !same {
            self.last_tp = Some(Arc::new(Tp::new(d.topic.clone(), d.partition)));
        }
        let Some(part) = self
            .last_tp
            .as_deref()
            .and_then(|tp| self.parts.get_mut(tp))
        else {
            // Not assigned (any more): its owner fetches it.
            self.spend(d);
            return;
        };
        let rules = GateRules {
            group: &self.ctx.group,
            now_ms: now,
            metrics: &self.ctx.metrics,
            horizon_ms: now.saturating_add(
                i64::try_from(self.cfg.max_due_ahead.as_millis()).unwrap_or(i64::MAX),
            ),
        };
        let due_at_ms = match part.admit(&d, epoch, &rules, self.control.as_ref()) {
            Admit::Drop => {
                self.spend(d);
                return;
            }
            Admit::Wait | Admit::Reseek => {
                self.pause_dirty = true;
                self.spend(d);
                return;
            }
            Admit::Skip => {
                self.ctx.metrics.emit(ForeignRetrySkipped(At::of(&d)));
                part.offsets.start(d.offset);
                part.counters.received();
                part.stats.received += 1;
                let (tp, generation) = (part.tp.clone(), part.generation);
                self.in_flight += 1;
                self.on_completion(Completion {
                    tp,
                    generation,
                    delivery: d,
                    bytes: 0,
                    entered: None,
                    outcome: Outcome::Skipped,
                });
                return;
            }
            Admit::Dispatch { due_at_ms } => due_at_ms,
        };
        let bytes = d.size_bytes();
        part.offsets.start(d.offset);
        part.counters.received();
        part.stats.received += 1;
        self.in_flight += 1;
        self.in_flight_bytes += bytes;
        let job = LaneJob {
            tp: part.tp.clone(),
            generation: part.generation,
            gate: part.gate.clone(),
            bytes,
            job: Job {
                level: part.level,
                due_at_ms,
                delivery: d,
            },
        };
        let lane = lanes::lane_of(
            job.job.delivery.key.as_deref(),
            self.lanes.len(),
            &mut self.round_robin,
        );
        self.lane_batches[lane].push(job);
    }

    fn on_completion(&mut self, c: Completion) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.in_flight_bytes = self.in_flight_bytes.saturating_sub(c.bytes);
        if let Some(gate) = &c.entered {
            gate.leave();
        }
        match self.parts.get_mut(&*c.tp) {
            Some(part) if part.generation == c.generation => {
                part.stats.count(c.outcome);
                part.counters.finished(c.outcome);
                if c.outcome != Outcome::Abandoned {
                    part.offsets.finish(c.delivery.offset);
                }
            }
            // The partition was revoked meanwhile: count it, nothing to commit.
            _ => {
                self.summary
                    .entry((*c.tp).clone())
                    .or_default()
                    .count(c.outcome);
                self.ctx.metrics.emit(FinishedAfterRevoke {
                    topic: &c.tp.topic,
                    outcome: c.outcome,
                });
            }
        }
        self.spend(c.delivery);
    }

    /// A delivery the pipeline is done with: back to the driver in batches (see
    /// [`DriverControl::recycle`]).
    fn spend(&mut self, d: Delivery) {
        self.spent.push((d, 0));
        if self.spent.len() >= RECYCLE_BATCH {
            self.control.recycle(std::mem::take(&mut self.spent));
        }
    }

    /// A batch from the driver: its deliveries wait in `pending`, its emptied buffer
    /// collects spent deliveries or goes back to the driver.
    fn take_batch(&mut self, mut batch: DeliveryBatch) {
        self.pending.extend(batch.drain(..));
        if self.spent.capacity() == 0 {
            self.spent = batch;
        } else {
            self.control.recycle(batch);
        }
    }

    fn next_due(&self) -> Option<i64> {
        self.parts
            .values()
            .flat_map(|p| [p.waiting_until, p.expecting.map(|e| e.check_at_ms)])
            .flatten()
            .min()
    }

    fn wake_due(&mut self) {
        let now = now_ms();
        for p in self.parts.values_mut() {
            if p.waiting_until.is_some_and(|d| d <= now) {
                tracing::debug!(partition = %p.tp, generation = p.generation, offset = ?p.waiting_at, "A waiting retry is due: the partition resumes.");
                p.end_wait(now);
                self.pause_dirty = true;
            } else if !p.revoking && p.check_expected(now, self.control.as_ref()) {
                self.pause_dirty = true;
            }
        }
    }

    fn apply_pauses(&mut self) {
        if !self.pause_dirty {
            return;
        }
        self.pause_dirty = false;
        // An open circuit pauses every partition: nothing would be processed meanwhile.
        let pipeline_wide =
            self.backpressure || self.draining || self.ctx.breaker.state() == CircuitState::Open;
        let mut paused = 0;
        for (tp, p) in self.parts.iter_mut().filter(|(_, p)| !p.revoking) {
            let want = p.wants_pause(pipeline_wide);
            if want != p.paused {
                tracing::debug!(partition = %tp, generation = p.generation, pause = want, "Pausing or resuming a partition.");
                if want {
                    self.control.pause(tp, p.generation);
                } else {
                    self.control.resume(tp, p.generation);
                }
                p.paused = want;
            }
            paused += usize::from(p.paused);
        }
        self.ctx.metrics.emit(PipelineState {
            paused_partitions: Some(paused),
            ..PipelineState::default()
        });
    }

    /// The commit point of every partition that is not being revoked.
    fn commit_points(&self) -> Vec<(Tp, Epoch, i64)> {
        self.parts
            .iter()
            .filter(|(_, p)| !p.revoking)
            .filter_map(|(tp, p)| {
                p.offsets
                    .commit_point()
                    .map(|o| (tp.clone(), p.generation, o))
            })
            .collect()
    }

    fn commit(&mut self) {
        let mut offsets = Vec::new();
        let reassert = self.last_reassert.elapsed() >= REASSERT_COMMITS;
        if reassert {
            self.last_reassert = Instant::now();
        }
        for (tp, p) in self.parts.iter_mut().filter(|(_, p)| !p.revoking) {
            if reassert || p.offsets.needs_commit() {
                if let Some(o) = p.offsets.commit_point() {
                    p.offsets.mark_committed(o);
                    offsets.push((tp.clone(), p.generation, o));
                }
            }
        }
        if !offsets.is_empty() {
            self.control.commit(offsets);
        }
        self.ctx.metrics.emit(PipelineState {
            in_flight: Some(self.in_flight),
            dedupe_entries: Some(self.ctx.dedupe.len()),
            ..PipelineState::default()
        });
    }

    async fn finish(mut self, done_rx: &mut mpsc::Receiver<Completion>) -> ConsumerSummary {
        // Record whatever finished in the meantime, without waiting.
        while let Ok(c) = done_rx.try_recv() {
            self.on_completion(c);
        }
        self.finish_revoke();
        let offsets = self.commit_points();
        self.lanes.clear();
        let parts: Vec<Part> = self.parts.drain().map(|(_, p)| p).collect();
        for p in parts {
            self.retire(p);
        }
        let control = self.control.clone();
        let _ = tokio::task::spawn_blocking(move || control.close(offsets)).await;
        self.ctx.metrics.emit(PipelineState {
            in_flight: Some(0),
            ..PipelineState::default()
        });
        summary::log(&self.summary);
        self.summary
    }
}
