//! The consumer pipeline: one task that takes deliveries from the driver, holds back retry
//! messages that are not yet due (seek back, pause, resume when due), skips other groups'
//! retries, bounds the messages in flight (pausing fetches above the bound), dispatches the
//! rest to key-hash worker lanes, tracks finished offsets per partition and commits the
//! lowest unfinished one. See DESIGN.md, guarantees 1 to 7.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::model::{now_ms, Delivery};
use crate::service::offsets::PartitionOffsets;
use crate::service::source::{ConsumerControl, Control, DeliveryBatch, Epoch, Tp};
use crate::service::worker::{Job, Outcome, WorkerContext};

/// How long the in-flight bound must stay reached before the assigned partitions are paused.
pub const BACKPRESSURE_GRACE: Duration = Duration::from_millis(500);

/// Pipeline sizing and deadlines.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Worker lanes.
    pub workers: usize,
    /// Messages in flight at most.
    pub max_in_flight: usize,
    /// Commit cadence.
    pub commit_interval: Duration,
    /// How long shutdown and revoke wait for in-flight messages.
    pub shutdown_timeout: Duration,
    /// A due time further ahead than this is treated as malformed (due now), so a bogus
    /// header cannot stall a partition.
    pub max_due_ahead: Duration,
}

/// Per-partition counts for the shutdown summary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionSummary {
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
    /// Left unfinished at shutdown (consumed again after a restart).
    pub abandoned: u64,
}

/// What the pipeline did, per topic and partition.
pub type Summary = BTreeMap<Tp, PartitionSummary>;

struct Part {
    generation: Epoch,
    fetch_epoch: Epoch,
    level: u32,
    offsets: PartitionOffsets,
    waiting_until: Option<i64>,
    revoking: bool,
    paused: bool,
}

struct LaneJob {
    tp: Tp,
    generation: Epoch,
    job: Job,
}

struct Completion {
    tp: Tp,
    generation: Epoch,
    offset: i64,
    outcome: Outcome,
}

struct PendingRevoke {
    partitions: Vec<Tp>,
    reply: std::sync::mpsc::SyncSender<Vec<(Tp, i64)>>,
    deadline: Instant,
}

struct State {
    cfg: PipelineConfig,
    ctx: Arc<WorkerContext>,
    control: Arc<dyn ConsumerControl>,
    lanes: Vec<mpsc::Sender<LaneJob>>,
    parts: HashMap<Tp, Part>,
    in_flight: usize,
    backpressure: bool,
    saturated_since: Option<Instant>,
    draining: bool,
    pause_dirty: bool,
    pending: VecDeque<(Delivery, Epoch)>,
    revoke: Option<PendingRevoke>,
    summary: Summary,
    round_robin: usize,
}

/// Runs the pipeline until `shutdown` is cancelled (or the driver stops), then drains
/// in-flight messages up to the shutdown timeout, commits, and closes the driver.
pub async fn run(
    cfg: PipelineConfig,
    ctx: Arc<WorkerContext>,
    control: Arc<dyn ConsumerControl>,
    mut events: mpsc::Receiver<Control>,
    mut deliveries: mpsc::Receiver<DeliveryBatch>,
    shutdown: CancellationToken,
) -> Summary {
    let (done_tx, mut done_rx) = mpsc::channel::<Completion>(cfg.max_in_flight + 1);
    let lanes = spawn_lanes(&cfg, &ctx, &done_tx);
    drop(done_tx);
    let mut st = State {
        cfg: cfg.clone(),
        ctx: ctx.clone(),
        control: control.clone(),
        lanes,
        parts: HashMap::new(),
        in_flight: 0,
        backpressure: false,
        saturated_since: None,
        draining: false,
        pause_dirty: false,
        pending: VecDeque::new(),
        revoke: None,
        summary: Summary::new(),
        round_robin: 0,
    };
    let mut commit_tick = tokio::time::interval(cfg.commit_interval);
    commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let far = Instant::now() + Duration::from_secs(86_400 * 365);
    let mut drain_deadline = far;
    let mut events_closed = false;
    loop {
        st.accept_pending();
        st.apply_pauses();
        if st.draining && st.in_flight == 0 {
            break;
        }
        let can_read = !st.draining && st.pending.is_empty() && st.in_flight < cfg.max_in_flight;
        let due_in = st
            .next_due()
            .map(|due| Duration::from_millis((due - now_ms()).max(0) as u64));
        let revoke_deadline = st.revoke.as_ref().map(|r| r.deadline);
        let pressure_at = st.backpressure_deadline();
        tokio::select! {
            biased;
            _ = shutdown.cancelled(), if !st.draining => {
                tracing::info!(in_flight = st.in_flight, "Shutting down: draining in-flight messages.");
                st.start_draining();
                drain_deadline = Instant::now() + cfg.shutdown_timeout;
            }
            ev = events.recv(), if !events_closed => match ev {
                Some(c) => st.on_control(c),
                None => {
                    events_closed = true;
                    if !st.draining {
                        tracing::warn!("The consumer driver stopped; draining.");
                        st.start_draining();
                        drain_deadline = Instant::now() + cfg.shutdown_timeout;
                    }
                }
            },
            Some(c) = done_rx.recv() => st.on_completion(c),
            _ = tokio::time::sleep_until(revoke_deadline.unwrap_or(far)), if revoke_deadline.is_some() => {
                tracing::warn!("Revoke timed out waiting for in-flight messages; committing what is finished.");
                st.finish_revoke();
            }
            _ = tokio::time::sleep(due_in.unwrap_or_default()), if due_in.is_some() => st.wake_due(),
            _ = tokio::time::sleep_until(pressure_at.unwrap_or(far)), if pressure_at.is_some() => {}
            _ = commit_tick.tick() => st.commit(),
            _ = tokio::time::sleep_until(drain_deadline), if st.draining => {
                tracing::warn!(in_flight = st.in_flight, "Shutdown timeout: unfinished messages stay uncommitted and are consumed again after a restart.");
                break;
            }
            batch = deliveries.recv(), if can_read => match batch {
                Some(b) => st.pending.extend(b),
                None if !st.draining => {
                    st.start_draining();
                    drain_deadline = Instant::now() + cfg.shutdown_timeout;
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

fn spawn_lanes(
    cfg: &PipelineConfig,
    ctx: &Arc<WorkerContext>,
    done: &mpsc::Sender<Completion>,
) -> Vec<mpsc::Sender<LaneJob>> {
    (0..cfg.workers)
        .map(|_| {
            // A lane never holds more than the in-flight bound, so `try_send` cannot fail.
            let (tx, mut rx) = mpsc::channel::<LaneJob>(cfg.max_in_flight + 1);
            let ctx = ctx.clone();
            let done = done.clone();
            tokio::spawn(async move {
                while let Some(lj) = rx.recv().await {
                    let outcome = ctx.handle(&lj.job).await;
                    let c = Completion {
                        tp: lj.tp,
                        generation: lj.generation,
                        offset: lj.job.delivery.offset,
                        outcome,
                    };
                    if done.send(c).await.is_err() {
                        break;
                    }
                }
            });
            tx
        })
        .collect()
}

fn lane_of(key: Option<&[u8]>, lanes: usize, round_robin: &mut usize) -> usize {
    match key {
        Some(k) => {
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

impl State {
    fn start_draining(&mut self) {
        self.draining = true;
        self.pending.clear();
        self.pause_dirty = true;
    }

    fn accept_pending(&mut self) {
        while !self.draining && self.in_flight < self.cfg.max_in_flight {
            let Some((d, epoch)) = self.pending.pop_front() else {
                break;
            };
            self.accept(d, epoch);
        }
        // The bound itself holds because no delivery is taken beyond it. Pausing the
        // partitions on top of that keeps the driver polling (callbacks, group liveness)
        // during sustained saturation; a pause makes librdkafka drop what it prefetched, so
        // a momentary peak must not trigger it.
        let now = Instant::now();
        if self.in_flight >= self.cfg.max_in_flight {
            let since = *self.saturated_since.get_or_insert(now);
            if !self.backpressure && now.duration_since(since) >= BACKPRESSURE_GRACE {
                self.backpressure = true;
                self.pause_dirty = true;
            }
        } else if self.in_flight <= self.cfg.max_in_flight / 2 {
            self.saturated_since = None;
            if self.backpressure {
                self.backpressure = false;
                self.pause_dirty = true;
            }
        }
        self.ctx.metrics.in_flight.set(self.in_flight as i64);
    }

    /// When a sustained saturation should turn into paused partitions, if it may.
    fn backpressure_deadline(&self) -> Option<Instant> {
        match (self.backpressure, self.saturated_since) {
            (false, Some(since)) => Some(since + BACKPRESSURE_GRACE),
            _ => None,
        }
    }

    fn accept(&mut self, d: Delivery, epoch: Epoch) {
        let tp = Tp::new(d.topic.clone(), d.partition);
        let Some(part) = self.parts.get_mut(&tp) else {
            return;
        };
        if part.fetch_epoch != epoch || part.revoking || part.waiting_until.is_some() {
            return; // fetched before a seek or from an earlier assignment
        }
        let mut due_at_ms = None;
        let mut skip = false;
        if part.level > 0 {
            let h = d.courier_headers();
            if !h.malformed.is_empty() {
                tracing::warn!(topic = %d.topic, partition = d.partition, offset = d.offset, headers = ?h.malformed, "Malformed courier headers are treated as absent.");
            }
            skip = h
                .consumer_group
                .as_deref()
                .is_some_and(|g| g != self.ctx.group);
            let now = now_ms();
            let horizon = now + self.cfg.max_due_ahead.as_millis() as i64;
            match h.due_at_ms {
                Some(due) if !skip && due > horizon => {
                    tracing::warn!(topic = %d.topic, partition = d.partition, offset = d.offset, due_at_ms = due, "A due time beyond any configured delay is treated as due now.");
                }
                Some(due) if !skip && due > now => {
                    part.fetch_epoch = self.control.seek(&tp, d.offset);
                    part.waiting_until = Some(due);
                    self.pause_dirty = true;
                    return;
                }
                other => due_at_ms = other,
            }
        }
        part.offsets.start(d.offset);
        self.in_flight += 1;
        self.ctx
            .metrics
            .messages_received
            .with_label_values(&[&d.topic])
            .inc();
        self.summary.entry(tp.clone()).or_default().received += 1;
        let generation = part.generation;
        if skip {
            tracing::debug!(topic = %d.topic, partition = d.partition, offset = d.offset, "Skipped another consumer group's retry message.");
            self.on_completion(Completion {
                tp,
                generation,
                offset: d.offset,
                outcome: Outcome::Skipped,
            });
            return;
        }
        let level = part.level;
        let lane = lane_of(d.key.as_deref(), self.lanes.len(), &mut self.round_robin);
        let job = LaneJob {
            tp,
            generation,
            job: Job {
                delivery: d,
                level,
                due_at_ms,
            },
        };
        if let Err(e) = self.lanes[lane].try_send(job) {
            // Unreachable while the bound holds; never drop silently.
            tracing::error!(error = %e, "A worker lane refused a message; it stays uncommitted.");
        }
    }

    fn on_completion(&mut self, c: Completion) {
        self.in_flight = self.in_flight.saturating_sub(1);
        let s = self.summary.entry(c.tp.clone()).or_default();
        match c.outcome {
            Outcome::Ok => s.ok += 1,
            Outcome::Retried(_) => s.retried += 1,
            Outcome::DeadLettered => s.dead_lettered += 1,
            Outcome::Duplicate => s.duplicates += 1,
            Outcome::Skipped => s.skipped += 1,
            Outcome::Abandoned => {
                s.abandoned += 1;
                return;
            }
        }
        self.ctx
            .metrics
            .messages_processed
            .with_label_values(&[&c.tp.topic, c.outcome.label()])
            .inc();
        if let Some(part) = self.parts.get_mut(&c.tp) {
            if part.generation == c.generation {
                part.offsets.finish(c.offset);
            }
        }
    }

    fn on_control(&mut self, c: Control) {
        match c {
            Control::Assigned(list) => {
                let names: Vec<String> = list.iter().map(|(tp, _)| tp.to_string()).collect();
                tracing::info!(partitions = ?names, "Partitions assigned.");
                for (tp, epoch) in list {
                    let level = self
                        .ctx
                        .retry
                        .level_of(&tp.topic, self.ctx.retry_max)
                        .unwrap_or(0);
                    self.parts.insert(
                        tp,
                        Part {
                            generation: epoch,
                            fetch_epoch: epoch,
                            level,
                            offsets: PartitionOffsets::new(),
                            waiting_until: None,
                            revoking: false,
                            paused: false,
                        },
                    );
                }
                self.pause_dirty = true;
            }
            Control::Revoked { partitions, reply } => {
                if self.revoke.is_some() {
                    self.finish_revoke();
                }
                for tp in &partitions {
                    if let Some(p) = self.parts.get_mut(tp) {
                        p.revoking = true;
                    }
                }
                self.pending.retain(|(d, _)| {
                    !partitions
                        .iter()
                        .any(|tp| tp.topic == d.topic && tp.partition == d.partition)
                });
                self.revoke = Some(PendingRevoke {
                    partitions,
                    reply,
                    deadline: Instant::now() + self.cfg.shutdown_timeout,
                });
            }
        }
    }

    fn maybe_finish_revoke(&mut self) {
        let Some(r) = &self.revoke else { return };
        let drained = r.partitions.iter().all(|tp| {
            self.parts
                .get(tp)
                .is_none_or(|p| p.offsets.in_flight() == 0)
        });
        if drained {
            self.finish_revoke();
        }
    }

    fn finish_revoke(&mut self) {
        let Some(r) = self.revoke.take() else { return };
        let mut offsets = Vec::new();
        for tp in &r.partitions {
            if let Some(p) = self.parts.remove(tp) {
                if let Some(o) = p.offsets.commit_point() {
                    offsets.push((tp.clone(), o));
                }
            }
        }
        let names: Vec<String> = r.partitions.iter().map(Tp::to_string).collect();
        tracing::info!(partitions = ?names, committing = offsets.len(), "Partitions revoked.");
        let _ = r.reply.send(offsets);
        self.pause_dirty = true;
    }

    fn next_due(&self) -> Option<i64> {
        self.parts.values().filter_map(|p| p.waiting_until).min()
    }

    fn wake_due(&mut self) {
        let now = now_ms();
        for p in self.parts.values_mut() {
            if p.waiting_until.is_some_and(|d| d <= now) {
                p.waiting_until = None;
                self.pause_dirty = true;
            }
        }
    }

    fn apply_pauses(&mut self) {
        if !self.pause_dirty {
            return;
        }
        self.pause_dirty = false;
        let mut paused = 0;
        for (tp, p) in self.parts.iter_mut() {
            let want = self.backpressure || self.draining || p.waiting_until.is_some();
            if want != p.paused {
                if want {
                    self.control.pause(tp);
                } else {
                    self.control.resume(tp);
                }
                p.paused = want;
            }
            paused += i64::from(p.paused);
        }
        self.ctx.metrics.paused_partitions.set(paused);
    }

    fn commit(&mut self) {
        let mut offsets = Vec::new();
        for (tp, p) in self.parts.iter_mut() {
            if p.offsets.needs_commit() {
                if let Some(o) = p.offsets.commit_point() {
                    p.offsets.mark_committed(o);
                    offsets.push((tp.clone(), o));
                }
            }
        }
        if !offsets.is_empty() {
            self.control.commit(offsets);
        }
        self.ctx
            .metrics
            .dedupe_entries
            .set(self.ctx.dedupe.len() as i64);
        self.ctx.metrics.in_flight.set(self.in_flight as i64);
    }

    async fn finish(mut self, done_rx: &mut mpsc::Receiver<Completion>) -> Summary {
        // Record whatever finished in the meantime, without waiting.
        while let Ok(c) = done_rx.try_recv() {
            self.on_completion(c);
        }
        if let Some(r) = self.revoke.take() {
            self.revoke = Some(r);
            self.finish_revoke();
        }
        let offsets: Vec<(Tp, i64)> = self
            .parts
            .iter()
            .filter_map(|(tp, p)| p.offsets.commit_point().map(|o| (tp.clone(), o)))
            .collect();
        self.lanes.clear();
        let control = self.control.clone();
        let _ = tokio::task::spawn_blocking(move || control.close(offsets)).await;
        self.ctx.metrics.in_flight.set(0);
        let sum = |f: fn(&PartitionSummary) -> u64| self.summary.values().map(f).sum::<u64>();
        tracing::info!(
            partitions = self.summary.len(),
            received = sum(|s| s.received),
            ok = sum(|s| s.ok),
            retried = sum(|s| s.retried),
            dead_lettered = sum(|s| s.dead_lettered),
            duplicates = sum(|s| s.duplicates),
            skipped = sum(|s| s.skipped),
            abandoned = sum(|s| s.abandoned),
            "Consumer summary."
        );
        for (tp, s) in &self.summary {
            tracing::info!(topic = %tp.topic, partition = tp.partition, received = s.received, ok = s.ok, retried = s.retried, dead_lettered = s.dead_lettered, duplicates = s.duplicates, skipped = s.skipped, abandoned = s.abandoned, "Partition summary.");
        }
        self.summary
    }
}
