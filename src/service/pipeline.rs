//! The consumer pipeline: one task that takes deliveries from the driver, holds back retry
//! messages that are not yet due (seek back, pause, resume when due), skips other groups'
//! retries, bounds the messages in flight (pausing fetches above the bound), dispatches the
//! rest to key-hash worker lanes, tracks finished offsets per partition and commits the
//! lowest unfinished one. See DESIGN.md, guarantees 1 to 7.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::model::{now_ms, Delivery};
use crate::service::offsets::PartitionOffsets;
use crate::service::source::{ConsumerControl, Control, DeliveryBatch, Epoch, Tp};
use crate::service::worker::{Job, Outcome, WorkerContext};

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
    /// How long the in-flight bound must hold before the assigned partitions are paused
    /// (`KAFKA_CONSUMER_PAUSE_AFTER_MS`). The bound itself never depends on it.
    pub pause_after: Duration,
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

/// Metric handles of one topic, resolved once instead of per message.
struct TopicMeters {
    received: IntCounter,
    processed: [IntCounter; 5],
}

impl TopicMeters {
    fn new(metrics: &crate::observability::Metrics, topic: &str) -> Self {
        let p = |o: Outcome| {
            metrics
                .messages_processed
                .with_label_values(&[topic, o.label()])
        };
        TopicMeters {
            received: metrics.messages_received.with_label_values(&[topic]),
            processed: [
                p(Outcome::Ok),
                p(Outcome::Retried(1)),
                p(Outcome::DeadLettered),
                p(Outcome::Duplicate),
                p(Outcome::Skipped),
            ],
        }
    }

    fn processed(&self, o: Outcome) -> Option<&IntCounter> {
        match o {
            Outcome::Ok => Some(&self.processed[0]),
            Outcome::Retried(_) => Some(&self.processed[1]),
            Outcome::DeadLettered => Some(&self.processed[2]),
            Outcome::Duplicate => Some(&self.processed[3]),
            Outcome::Skipped => Some(&self.processed[4]),
            Outcome::Abandoned => None,
        }
    }
}

impl PartitionSummary {
    fn count(&mut self, o: Outcome) {
        match o {
            Outcome::Ok => self.ok += 1,
            Outcome::Retried(_) => self.retried += 1,
            Outcome::DeadLettered => self.dead_lettered += 1,
            Outcome::Duplicate => self.duplicates += 1,
            Outcome::Skipped => self.skipped += 1,
            Outcome::Abandoned => self.abandoned += 1,
        }
    }

    fn add(&mut self, o: &PartitionSummary) {
        self.received += o.received;
        self.ok += o.ok;
        self.retried += o.retried;
        self.dead_lettered += o.dead_lettered;
        self.duplicates += o.duplicates;
        self.skipped += o.skipped;
        self.abandoned += o.abandoned;
    }
}

struct Part {
    tp: Arc<Tp>,
    meters: Arc<TopicMeters>,
    stats: PartitionSummary,
    generation: Epoch,
    fetch_epoch: Epoch,
    level: u32,
    offsets: PartitionOffsets,
    waiting_until: Option<i64>,
    /// The offset the partition was seeked back to while it waits.
    waiting_at: Option<i64>,
    revoking: bool,
    paused: bool,
}

struct LaneJob {
    tp: Arc<Tp>,
    generation: Epoch,
    job: Job,
}

struct Completion {
    tp: Arc<Tp>,
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
    topic_meters: HashMap<String, Arc<TopicMeters>>,
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
        topic_meters: HashMap::new(),
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
            if !self.backpressure && now.duration_since(since) >= self.cfg.pause_after {
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
            (false, Some(since)) => Some(since + self.cfg.pause_after),
            _ => None,
        }
    }

    fn accept(&mut self, d: Delivery, epoch: Epoch) {
        let tp = Tp::new(d.topic.clone(), d.partition);
        let Some(part) = self.parts.get_mut(&tp) else {
            return;
        };
        if part.fetch_epoch != epoch || part.revoking {
            return; // fetched before a seek or from an earlier assignment
        }
        if let Some(offset) = part.waiting_at {
            // A delivery after the seek while the partition waits: librdkafka counted it
            // as consumed, so seek back again or the resume would skip it.
            part.fetch_epoch = self.control.seek(&tp, offset);
            return;
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
                    part.waiting_at = Some(d.offset);
                    self.pause_dirty = true;
                    return;
                }
                other => due_at_ms = other,
            }
        }
        part.offsets.start(d.offset);
        self.in_flight += 1;
        part.meters.received.inc();
        part.stats.received += 1;
        let generation = part.generation;
        let tp = part.tp.clone();
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
        match self.parts.get_mut(&*c.tp) {
            Some(part) if part.generation == c.generation => {
                part.stats.count(c.outcome);
                if let Some(m) = part.meters.processed(c.outcome) {
                    m.inc();
                    part.offsets.finish(c.offset);
                }
            }
            // The partition was revoked meanwhile: count it, nothing to commit.
            _ => {
                self.summary
                    .entry((*c.tp).clone())
                    .or_default()
                    .count(c.outcome);
                if c.outcome != Outcome::Abandoned {
                    self.ctx
                        .metrics
                        .messages_processed
                        .with_label_values(&[&c.tp.topic, c.outcome.label()])
                        .inc();
                }
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
                    let meters = self
                        .topic_meters
                        .entry(tp.topic.clone())
                        .or_insert_with(|| Arc::new(TopicMeters::new(&self.ctx.metrics, &tp.topic)))
                        .clone();
                    let replaced = self.parts.insert(
                        tp.clone(),
                        Part {
                            tp: Arc::new(tp),
                            meters,
                            stats: PartitionSummary::default(),
                            generation: epoch,
                            fetch_epoch: epoch,
                            level,
                            offsets: PartitionOffsets::new(),
                            waiting_until: None,
                            waiting_at: None,
                            revoking: false,
                            paused: false,
                        },
                    );
                    if let Some(old) = replaced {
                        self.summary
                            .entry((*old.tp).clone())
                            .or_default()
                            .add(&old.stats);
                    }
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
                self.summary.entry(tp.clone()).or_default().add(&p.stats);
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
                p.waiting_at = None;
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
        for p in self.parts.values() {
            self.summary
                .entry((*p.tp).clone())
                .or_default()
                .add(&p.stats);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RetryConfig;
    use crate::model::{Headers, HEADER_CONSUMER_GROUP, HEADER_DUE_AT_MS};
    use crate::observability::Metrics;
    use crate::service::dedupe::MemoryDedupe;
    use crate::service::processor::MockProcessor;
    use crate::service::publish::MockPublisher;
    use crate::service::source::MockConsumerControl;
    use parking_lot::Mutex;

    #[derive(Default)]
    struct Calls {
        seeks: Vec<(Tp, i64)>,
        commits: Vec<(Tp, i64)>,
        pauses: Vec<Tp>,
    }

    fn control(calls: &Arc<Mutex<Calls>>) -> MockConsumerControl {
        let mut c = MockConsumerControl::new();
        let (s, m, p) = (calls.clone(), calls.clone(), calls.clone());
        let next = Arc::new(std::sync::atomic::AtomicU64::new(100));
        c.expect_seek().returning(move |tp, o| {
            s.lock().seeks.push((tp.clone(), o));
            next.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        });
        c.expect_commit()
            .returning(move |o| m.lock().commits.extend(o));
        c.expect_pause()
            .returning(move |tp| p.lock().pauses.push(tp.clone()));
        c.expect_resume().returning(|_| ());
        let f = calls.clone();
        c.expect_close()
            .returning(move |o| f.lock().commits.extend(o));
        c
    }

    fn ctx(processor: MockProcessor) -> Arc<WorkerContext> {
        Arc::new(WorkerContext {
            processor: Arc::new(processor),
            publisher: Arc::new(MockPublisher::new()),
            dedupe: Arc::new(MemoryDedupe::new(Duration::from_secs(60), 100)),
            retry: RetryConfig {
                topic_prefix: "ev-retry".into(),
                backoff: vec![Duration::from_secs(60)],
                dlq_topic: "ev-dlq".into(),
            },
            retry_max: 3,
            group: "g".into(),
            metrics: Metrics::new(),
            abort: CancellationToken::new(),
            publish_backoff: (Duration::from_millis(1), Duration::from_millis(10)),
        })
    }

    fn delivery(topic: &str, offset: i64, headers: Headers) -> Delivery {
        Delivery {
            topic: topic.into(),
            partition: 0,
            offset,
            key: Some(b"k".to_vec()),
            payload: Some(b"{}".to_vec()),
            headers,
            timestamp_ms: None,
        }
    }

    fn cfg() -> PipelineConfig {
        PipelineConfig {
            workers: 2,
            max_in_flight: 10,
            commit_interval: Duration::from_millis(20),
            shutdown_timeout: Duration::from_secs(2),
            pause_after: Duration::from_millis(100),
            max_due_ahead: Duration::from_secs(3600),
        }
    }

    #[tokio::test]
    async fn a_retry_not_yet_due_is_held_and_never_committed_past() {
        let calls = Arc::new(Mutex::new(Calls::default()));
        let mut processor = MockProcessor::new();
        processor.expect_process().returning(|_| Ok(()));
        let (ev_tx, ev_rx) = mpsc::channel(4);
        let (d_tx, d_rx) = mpsc::channel(4);
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(run(
            cfg(),
            ctx(processor),
            Arc::new(control(&calls)),
            ev_rx,
            d_rx,
            shutdown.clone(),
        ));
        let tp = Tp::new("ev-retry-1", 0);
        ev_tx
            .send(Control::Assigned(vec![(tp.clone(), 1)]))
            .await
            .unwrap();
        let later = (now_ms() + 60_000).to_string().into_bytes();
        let due_later = vec![
            (HEADER_DUE_AT_MS.into(), Some(later)),
            (HEADER_CONSUMER_GROUP.into(), Some(b"g".to_vec())),
        ];
        // Offsets 0..2 are due (no due header); 3 is not due yet.
        let batch = (0..3)
            .map(|o| (delivery("ev-retry-1", o, vec![]), 1))
            .chain([(delivery("ev-retry-1", 3, due_later.clone()), 1)])
            .collect();
        d_tx.send(batch).await.unwrap();
        // The race: a message fetched after the seek (new epoch 100) while it waits.
        tokio::time::sleep(Duration::from_millis(50)).await;
        d_tx.send(vec![(delivery("ev-retry-1", 4, vec![]), 100)])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        shutdown.cancel();
        let summary = run.await.unwrap();
        let c = calls.lock();
        assert_eq!(
            c.seeks,
            vec![(tp.clone(), 3), (tp.clone(), 3)],
            "seeked back to the waiting offset twice"
        );
        assert!(c.pauses.contains(&tp));
        assert!(
            c.commits.iter().all(|(_, o)| *o <= 3),
            "never committed past offset 3: {:?}",
            c.commits
        );
        assert_eq!(c.commits.last(), Some(&(tp.clone(), 3)));
        assert_eq!(summary[&tp].ok, 3);
    }

    #[tokio::test]
    async fn other_groups_retries_are_skipped_and_committed_past() {
        let calls = Arc::new(Mutex::new(Calls::default()));
        let mut processor = MockProcessor::new();
        processor.expect_process().never();
        let (ev_tx, ev_rx) = mpsc::channel(4);
        let (d_tx, d_rx) = mpsc::channel(4);
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(run(
            cfg(),
            ctx(processor),
            Arc::new(control(&calls)),
            ev_rx,
            d_rx,
            shutdown.clone(),
        ));
        let tp = Tp::new("ev-retry-2", 0);
        ev_tx
            .send(Control::Assigned(vec![(tp.clone(), 1)]))
            .await
            .unwrap();
        let foreign = vec![(HEADER_CONSUMER_GROUP.into(), Some(b"other".to_vec()))];
        d_tx.send(vec![
            (delivery("ev-retry-2", 0, foreign.clone()), 1),
            (delivery("ev-retry-2", 1, foreign), 1),
        ])
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;
        shutdown.cancel();
        let summary = run.await.unwrap();
        assert_eq!(summary[&tp].skipped, 2);
        assert_eq!(calls.lock().commits.last(), Some(&(tp, 2)));
    }
}
