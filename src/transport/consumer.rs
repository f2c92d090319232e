//! The consumer driver: a `BaseConsumer` polled on its own thread, so rebalance callbacks can
//! wait for the async pipeline to drain a revoked partition without blocking the runtime.
//! Each Kafka message becomes an owned [`Delivery`] tagged with its partition's fetch epoch.
//! Pause, resume, seek and commit requests from the pipeline are coalesced in a small shared
//! state (bounded by the number of partitions) and applied between polls; each names the
//! partition's generation, and a request about an assignment that is gone is dropped.
//! Commits are asynchronous on the interval and synchronous on revoke and on close.
//!
//! Rebalances (DESIGN.md, guarantees 3 and 7): with `cooperative-sticky` (the default) only
//! the partitions that change owner are revoked and assigned (`incremental_unassign` and
//! `incremental_assign`); the eager strategies revoke everything. Every newly assigned
//! partition is resumed at once, because librdkafka keeps an application pause across
//! unassign/assign: a retry partition paused while it waited would otherwise stay paused
//! for good when it came back to the same member.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::model::Delivery;
use crate::observability::{Metrics, Readiness};
use crate::service::source::{DeliveryBatch, DriverControl, DriverEvent, Epoch, Tp};
use crate::transport::context::ErrorLimiter;
use crate::transport::settings::{client_config, ClientRole};

/// Messages taken from librdkafka per poll round and sent to the pipeline as one batch.
const MAX_BATCH: usize = 256;
/// Bytes per batch at most (one message always fits): with the bounded hand-over this
/// caps what waits between librdkafka and the pipeline, however large the records.
const MAX_BATCH_BYTES: usize = 1 << 20;
/// How long one poll waits: also the latency of applying pause/resume/seek requests.
const POLL_WAIT: Duration = Duration::from_millis(10);

/// One assignment of a partition: its generation and current fetch epoch.
#[derive(Debug, Clone, Copy)]
struct Assigned {
    generation: Epoch,
    fetch_epoch: Epoch,
}

#[derive(Default)]
struct Commands {
    pause: BTreeMap<Tp, (Epoch, bool)>,
    seek: BTreeMap<Tp, (Epoch, i64, Epoch)>,
    commit: BTreeMap<Tp, (Epoch, i64)>,
    close: Option<Vec<(Tp, Epoch, i64)>>,
}

impl Commands {
    fn forget(&mut self, tp: &Tp) {
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
struct FailedCommits {
    /// The generation each partition's last commit was issued under.
    issued: HashMap<Tp, Epoch>,
    retry: BTreeMap<Tp, (Epoch, i64)>,
    last_retry: Option<std::time::Instant>,
}

/// How often failed commits are tried again.
const COMMIT_RETRY: Duration = Duration::from_secs(1);

struct Shared {
    commands: Mutex<Commands>,
    assigned: Mutex<HashMap<Tp, Assigned>>,
    failed: Mutex<FailedCommits>,
    next_epoch: AtomicU64,
    closing: AtomicBool,
}

impl Shared {
    fn new_epoch(&self) -> Epoch {
        self.next_epoch.fetch_add(1, Ordering::SeqCst)
    }

    /// Whether `generation` is the live assignment of `tp`.
    fn is_live(&self, tp: &Tp, generation: Epoch) -> bool {
        self.assigned
            .lock()
            .get(tp)
            .is_some_and(|a| a.generation == generation)
    }

    /// Commits to issue now: the requested ones, plus failed ones due for another try; all
    /// of live assignments only.
    fn commits_to_issue(&self, requested: BTreeMap<Tp, (Epoch, i64)>) -> Vec<(Tp, i64)> {
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
    fn requeue(&self, offsets: Vec<(Tp, i64)>) {
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
    fn commit_failed(&self, tpl: &TopicPartitionList, all: bool) {
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
                let slot = failed.retry.entry(tp).or_insert((g, o));
                slot.1 = slot.1.max(o);
            }
        }
    }

    /// The offsets of live assignments only.
    fn live_offsets(&self, offsets: impl IntoIterator<Item = (Tp, Epoch, i64)>) -> Vec<(Tp, i64)> {
        let assigned = self.assigned.lock();
        offsets
            .into_iter()
            .filter(|(tp, g, _)| assigned.get(tp).is_some_and(|a| a.generation == *g))
            .map(|(tp, _, o)| (tp, o))
            .collect()
    }
}

struct DriverContext {
    shared: Arc<Shared>,
    events: mpsc::Sender<DriverEvent>,
    metrics: Metrics,
    readiness: Arc<Readiness>,
    revoke_wait: Duration,
    errors: ErrorLimiter,
}

impl ClientContext for DriverContext {
    fn error(&self, error: KafkaError, reason: &str) {
        self.errors.report(&error, reason);
    }

    fn stats(&self, statistics: Statistics) {
        let assigned = self.shared.assigned.lock();
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if *partition < 0 || !assigned.contains_key(&Tp::new(topic.as_str(), *partition)) {
                    continue;
                }
                if p.consumer_lag >= 0 {
                    self.metrics
                        .consumer_lag
                        .with_label_values(&[topic.as_str(), &partition.to_string()])
                        .set(p.consumer_lag);
                }
            }
        }
    }
}

fn tps_of(tpl: &TopicPartitionList) -> Vec<Tp> {
    tpl.elements()
        .iter()
        .map(|e| Tp::new(e.topic(), e.partition()))
        .collect()
}

fn tpl_of(offsets: &[(Tp, i64)]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for (tp, o) in offsets {
        // Adding an absolute offset to a fresh list cannot fail.
        let _ = tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*o));
    }
    tpl
}

fn names(tps: &[Tp]) -> Vec<String> {
    tps.iter().map(Tp::to_string).collect()
}

impl DriverContext {
    /// New partitions: assign them, resume them (no pause of an earlier assignment may
    /// survive), give each a new generation and tell the pipeline.
    fn on_assign(
        &self,
        consumer: &BaseConsumer<Self>,
        tpl: &TopicPartitionList,
        cooperative: bool,
    ) {
        let assigned = if cooperative {
            consumer.incremental_assign(tpl)
        } else {
            consumer.assign(tpl)
        };
        if let Err(e) = assigned {
            tracing::error!(error = %e, partitions = ?names(&tps_of(tpl)), "Taking an assignment failed; not ready until the next one.");
            self.readiness.set_group_joined(false);
            return;
        }
        if tpl.count() > 0 {
            if let Err(e) = consumer.resume(tpl) {
                tracing::warn!(error = %e, "Resuming newly assigned partitions failed.");
            }
        }
        let list: Vec<(Tp, Epoch)> = {
            let mut assigned = self.shared.assigned.lock();
            if !cooperative {
                assigned.clear();
            }
            let mut commands = self.shared.commands.lock();
            tps_of(tpl)
                .into_iter()
                .map(|tp| {
                    let e = self.shared.new_epoch();
                    commands.forget(&tp);
                    assigned.insert(
                        tp.clone(),
                        Assigned {
                            generation: e,
                            fetch_epoch: e,
                        },
                    );
                    (tp, e)
                })
                .collect()
        };
        self.readiness.set_group_joined(true);
        self.count_partitions("assigned", list.len());
        if !list.is_empty() {
            let _ = self.events.blocking_send(DriverEvent::Assigned(list));
        }
    }

    /// Partitions leaving: let the pipeline drain them (bounded), commit what it finished
    /// unless the assignment was lost, forget them, and let them go.
    fn on_revoke(
        &self,
        consumer: &BaseConsumer<Self>,
        tpl: &TopicPartitionList,
        cooperative: bool,
    ) {
        let partitions = tps_of(tpl);
        let lost = consumer.assignment_lost();
        if lost {
            // The group moved on without us (e.g. after a broker outage): not consuming
            // until the next assignment, and nothing of these may be committed.
            self.readiness.set_group_joined(false);
        }
        if !self.shared.closing.load(Ordering::SeqCst) && !partitions.is_empty() {
            self.handshake(consumer, &partitions, lost);
        }
        self.forget(&partitions);
        self.count_partitions(if lost { "lost" } else { "revoked" }, partitions.len());
        let released = if cooperative {
            consumer.incremental_unassign(tpl)
        } else {
            consumer.unassign()
        };
        if let Err(e) = released {
            tracing::warn!(error = %e, "Releasing revoked partitions failed.");
        }
    }

    fn handshake(&self, consumer: &BaseConsumer<Self>, partitions: &[Tp], lost: bool) {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let sent = self.events.blocking_send(DriverEvent::Revoked {
            partitions: partitions.to_vec(),
            lost,
            reply: tx,
        });
        if sent.is_err() {
            return;
        }
        match rx.recv_timeout(self.revoke_wait) {
            Ok(offsets) if !offsets.is_empty() && !lost => {
                if let Err(e) = consumer.commit(&tpl_of(&offsets), CommitMode::Sync) {
                    tracing::warn!(error = %e, "The commit on revoke failed; the next owner starts from the last committed offsets.");
                }
            }
            Ok(_) => {}
            Err(_) => {
                tracing::warn!(partitions = ?names(partitions), "The pipeline did not answer the revoke in time; nothing more is committed for these partitions.")
            }
        }
    }

    fn count_partitions(&self, kind: &str, n: usize) {
        self.metrics
            .rebalance_partitions
            .with_label_values(&[kind])
            .inc_by(n as u64);
        let owned = self.shared.assigned.lock().len();
        self.metrics.assigned_partitions.set(owned as i64);
    }

    fn forget(&self, partitions: &[Tp]) {
        let mut assigned = self.shared.assigned.lock();
        let mut commands = self.shared.commands.lock();
        for tp in partitions {
            assigned.remove(tp);
            commands.forget(tp);
            let _ = self
                .metrics
                .consumer_lag
                .remove_label_values(&[&tp.topic, &tp.partition.to_string()]);
        }
    }

    /// A failed rebalance: librdkafka expects the whole assignment to be dropped.
    fn on_rebalance_error(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        cooperative: bool,
    ) {
        let code: rdkafka::error::RDKafkaErrorCode = err.into();
        tracing::warn!(error = %code, "Rebalance error; not ready until the next assignment.");
        self.readiness.set_group_joined(false);
        let current: Vec<Tp> = self.shared.assigned.lock().keys().cloned().collect();
        if !self.shared.closing.load(Ordering::SeqCst) && !current.is_empty() {
            self.handshake(consumer, &current, true);
        }
        self.forget(&current);
        self.count_partitions("lost", current.len());
        let released = if cooperative {
            consumer
                .assignment()
                .and_then(|a| consumer.incremental_unassign(&a))
        } else {
            consumer.unassign()
        };
        if let Err(e) = released {
            tracing::warn!(error = %e, "Dropping the assignment after a rebalance error failed.");
        }
    }
}

impl ConsumerContext for DriverContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.on_assign(consumer, tpl, cooperative)
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.on_revoke(consumer, tpl, cooperative)
            }
            other => self.on_rebalance_error(consumer, other, cooperative),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(KafkaError::ConsumerCommit(rdkafka::error::RDKafkaErrorCode::NoOffset)) = result
        {
            return;
        }
        // librdkafka may report partition errors (a rebalance in progress, a generation that
        // just changed) with a successful request: look at every partition.
        let failed = offsets.elements().iter().any(|e| e.error().is_err());
        match (&result, failed) {
            (Ok(()), false) => self.metrics.commits.with_label_values(&["ok"]).inc(),
            _ => {
                self.metrics.commits.with_label_values(&["error"]).inc();
                let error = match &result {
                    Err(e) => e.to_string(),
                    Ok(()) => offsets
                        .elements()
                        .iter()
                        .find_map(|e| e.error().err())
                        .map(|e| e.to_string())
                        .unwrap_or_default(),
                };
                tracing::warn!(error, "An offset commit failed (usually during a rebalance); it is tried again while this member owns the partitions.");
                self.shared.commit_failed(offsets, result.is_err());
            }
        }
    }
}

/// The pipeline's handle on the driver.
pub struct KafkaDriverControl {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for KafkaDriverControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KafkaDriverControl")
    }
}

impl DriverControl for KafkaDriverControl {
    fn pause(&self, tp: &Tp, generation: Epoch) {
        let mut commands = self.shared.commands.lock();
        commands.pause.insert(tp.clone(), (generation, true));
    }

    fn resume(&self, tp: &Tp, generation: Epoch) {
        let mut commands = self.shared.commands.lock();
        commands.pause.insert(tp.clone(), (generation, false));
    }

    fn seek(&self, tp: &Tp, generation: Epoch, offset: i64) -> Epoch {
        let e = self.shared.new_epoch();
        // Pause in the same request: a seek applied before its pause would let the driver
        // deliver (and librdkafka count as consumed) messages the pipeline drops while the
        // partition waits, and the resume would then continue after them.
        let mut commands = self.shared.commands.lock();
        commands.pause.insert(tp.clone(), (generation, true));
        commands.seek.insert(tp.clone(), (generation, offset, e));
        e
    }

    fn commit(&self, offsets: Vec<(Tp, Epoch, i64)>) {
        let mut commands = self.shared.commands.lock();
        for (tp, g, o) in offsets {
            commands.commit.insert(tp, (g, o));
        }
    }

    fn close(&self, offsets: Vec<(Tp, Epoch, i64)>) {
        self.shared.commands.lock().close = Some(offsets);
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

/// What [`start`] returns: the control handle and the two event streams.
pub struct Driver {
    /// Pause/resume/seek/commit/close.
    pub control: Arc<KafkaDriverControl>,
    /// Rebalance events.
    pub events: mpsc::Receiver<DriverEvent>,
    /// Delivery batches.
    pub deliveries: mpsc::Receiver<DeliveryBatch>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Driver")
    }
}

/// Creates the consumer, subscribes to the source and retry topics, and starts polling.
///
/// # Errors
/// When librdkafka rejects the configuration or the subscription.
pub fn start(
    config: &Config,
    metrics: Metrics,
    readiness: Arc<Readiness>,
) -> Result<Driver, KafkaError> {
    let shared = Arc::new(Shared {
        commands: Mutex::new(Commands::default()),
        assigned: Mutex::new(HashMap::new()),
        failed: Mutex::new(FailedCommits::default()),
        next_epoch: AtomicU64::new(1),
        closing: AtomicBool::new(false),
    });
    let (events_tx, events) = mpsc::channel(16);
    let (deliveries_tx, deliveries) = mpsc::channel::<DeliveryBatch>(4);
    let ctx = DriverContext {
        shared: shared.clone(),
        events: events_tx,
        metrics,
        readiness,
        revoke_wait: config.consumer.shutdown_timeout + Duration::from_secs(5),
        errors: ErrorLimiter::default(),
    };
    let consumer: BaseConsumer<DriverContext> =
        client_config(config, ClientRole::Consumer).create_with_context(ctx)?;
    let topics = subscription(&config.consumer.topics, &config.retry.topic_prefix);
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&refs)?;
    let thread_shared = shared.clone();
    let thread = std::thread::Builder::new()
        .name("courier-consumer".into())
        .spawn(move || poll_loop(consumer, thread_shared, deliveries_tx))
        .map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
    Ok(Driver {
        control: Arc::new(KafkaDriverControl {
            shared,
            thread: Mutex::new(Some(thread)),
        }),
        events,
        deliveries,
    })
}

/// An owned [`Delivery`] from a Kafka message: key, payload and headers byte for byte.
pub fn to_delivery(m: &BorrowedMessage<'_>) -> Delivery {
    let headers = m
        .headers()
        .map(crate::transport::headers::read)
        .unwrap_or_default();
    Delivery {
        topic: m.topic().to_owned(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec),
        headers,
        timestamp_ms: m.timestamp().to_millis(),
    }
}

/// The subscription: the source topics by name, and every retry topic `{prefix}-N` by a
/// pattern, so retry topics above `KAFKA_CONSUMER_RETRY_MAX` (left from a larger setting)
/// are still drained instead of stranded.
fn subscription(sources: &[String], retry_prefix: &str) -> Vec<String> {
    let mut topics = sources.to_vec();
    let mut pattern = String::from("^");
    for c in retry_prefix.chars() {
        // Topic names hold [a-zA-Z0-9._-]: only `.` means something in a pattern.
        if c == '.' {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push_str("-[0-9]+$");
    topics.push(pattern);
    topics
}

/// Commits `offsets` without waiting, with the result reported to
/// [`ConsumerContext::commit_callback`]. rdkafka's `commit(.., CommitMode::Async)` leaves the
/// result unreported (librdkafka reports a manual asynchronous commit only to an
/// `offset_commit_cb` or a reply queue, and rdkafka sets neither), so a failed commit would
/// go unseen and never be retried: the reply goes to the consumer queue instead, which
/// `poll` serves as an offset-commit event.
fn commit_async(consumer: &BaseConsumer<DriverContext>, offsets: &TopicPartitionList) {
    use rdkafka::bindings as rdsys;
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

fn partition_list(tps: &[Tp]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for tp in tps {
        tpl.add_partition(&tp.topic, tp.partition);
    }
    tpl
}

/// Applies pending requests about live assignments (anything about an assignment that is
/// gone is dropped); returns the final offsets when close was requested.
fn apply_commands(
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
        }
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

/// One poll round: up to [`MAX_BATCH`] messages or [`MAX_BATCH_BYTES`], each tagged with its
/// partition's fetch epoch (messages of partitions not assigned are dropped: they are
/// fetched again by their owner).
fn poll_batch(consumer: &BaseConsumer<DriverContext>, shared: &Shared) -> DeliveryBatch {
    let mut batch: DeliveryBatch = Vec::new();
    let mut bytes = 0;
    let mut wait = POLL_WAIT;
    while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
        match consumer.poll(wait) {
            Some(Ok(m)) => {
                let epoch = shared
                    .assigned
                    .lock()
                    .get(&Tp::new(m.topic(), m.partition()))
                    .map(|a| a.fetch_epoch);
                if let Some(epoch) = epoch {
                    let d = to_delivery(&m);
                    bytes += d.size_bytes();
                    batch.push((d, epoch));
                }
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "Consumer error.");
                break;
            }
            None => break,
        }
        wait = Duration::ZERO;
    }
    batch
}

/// How long the final commit may wait for a rebalance in progress to finish.
const FINAL_COMMIT_PATIENCE: Duration = Duration::from_secs(5);

/// The final commit on close, synchronous. A rolling deploy often stops a member while the
/// group rebalances, and the broker then refuses the commit (rebalance in progress, or a
/// generation that just changed): the driver keeps serving librdkafka (the rebalance
/// completes; fetched messages are dropped, never processed) and commits again what it
/// still owns, for at most [`FINAL_COMMIT_PATIENCE`]. What is not committed in the end is
/// processed again by the next owner.
fn final_commit(
    consumer: &BaseConsumer<DriverContext>,
    shared: &Shared,
    mut offsets: Vec<(Tp, i64)>,
) {
    use rdkafka::error::RDKafkaErrorCode as C;
    let deadline = std::time::Instant::now() + FINAL_COMMIT_PATIENCE;
    while !offsets.is_empty() {
        let err = match consumer.commit(&tpl_of(&offsets), CommitMode::Sync) {
            Ok(()) => return,
            Err(e) => e,
        };
        let passing = matches!(
            err.rdkafka_error_code(),
            Some(
                C::RebalanceInProgress
                    | C::IllegalGeneration
                    | C::UnknownMemberId
                    | C::NotCoordinator
                    | C::CoordinatorLoadInProgress
                    | C::RequestTimedOut
            )
        );
        if !passing || std::time::Instant::now() >= deadline {
            tracing::warn!(error = %err, "The final commit failed; the next owner starts from the last committed offsets.");
            return;
        }
        let until = std::time::Instant::now() + Duration::from_millis(200);
        while std::time::Instant::now() < until {
            let _ = consumer.poll(Duration::from_millis(50));
        }
        let assigned = shared.assigned.lock();
        offsets.retain(|(tp, _)| assigned.contains_key(tp));
    }
}

fn poll_loop(
    consumer: BaseConsumer<DriverContext>,
    shared: Arc<Shared>,
    deliveries: mpsc::Sender<DeliveryBatch>,
) {
    // Set when the pipeline stopped taking deliveries: a close request should follow at once;
    // without one (the pipeline crashed or was aborted) the driver leaves the group without
    // committing anything more, so another member takes over from the last commit.
    let mut pipeline_gone: Option<std::time::Instant> = None;
    loop {
        if let Some(offsets) = apply_commands(&consumer, &shared) {
            shared.closing.store(true, Ordering::SeqCst);
            final_commit(&consumer, &shared, offsets);
            // Dropping the consumer closes it: librdkafka revokes (our callback skips the
            // handshake while closing), then sends LeaveGroup.
            break;
        }
        if let Some(since) = pipeline_gone {
            if since.elapsed() > Duration::from_secs(2) {
                tracing::warn!("The pipeline stopped without closing the consumer; leaving the group without a final commit.");
                shared.closing.store(true, Ordering::SeqCst);
                break;
            }
            std::thread::sleep(POLL_WAIT);
            continue;
        }
        let batch = poll_batch(&consumer, &shared);
        if (!batch.is_empty() && deliveries.blocking_send(batch).is_err()) || deliveries.is_closed()
        {
            pipeline_gone = Some(std::time::Instant::now());
        }
    }
    drop(consumer);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_topics_are_subscribed_by_pattern() {
        let s = subscription(&["events".into(), "orders".into()], "my.app-retry");
        assert_eq!(s, vec!["events", "orders", "^my\\.app-retry-[0-9]+$"]);
    }
}
