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

mod rebalance;
mod state;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use tokio::sync::mpsc;

use crate::config::{AssignmentStrategy, Config};
use crate::model::Delivery;
use crate::observability::{Metrics, Readiness};
use crate::service::source::{DeliveryBatch, DriverControl, DriverEvent, Epoch, Tp};

use crate::transport::context::ErrorLimiter;
use crate::transport::settings::{client_config, ClientRole};
use rebalance::DriverContext;
use state::{apply_commands, tpl_of, Assignments, Commands, FailedCommits, Shared};

/// Messages taken from librdkafka per poll round and sent to the pipeline as one batch.
const MAX_BATCH: usize = 256;
/// Bytes per batch at most (one message always fits): with the bounded hand-over this
/// caps what waits between librdkafka and the pipeline, however large the records.
const MAX_BATCH_BYTES: usize = 1 << 20;
/// How long one poll waits: also the latency of applying pause/resume/seek requests.
const POLL_WAIT: Duration = Duration::from_millis(10);

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

    fn recycle(&self, spent: DeliveryBatch) {
        self.shared.recycled.lock().push(spent);
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
        recycled: Mutex::new(Vec::new()),
        assigned: Mutex::new(Assignments::default()),
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
        revoke_wait: config
            .consumer
            .shutdown_timeout
            .saturating_add(Duration::from_secs(5)),
        cooperative: config.consumer.assignment_strategy == AssignmentStrategy::CooperativeSticky,
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

/// The poll loop's last look-up of a partition's fetch epoch: messages come in runs of one
/// partition, so most need neither a new `Tp` nor a map look-up. Valid while the
/// assignments' version is the same.
struct EpochMemo {
    tp: Tp,
    version: u64,
    epoch: Option<Epoch>,
}

impl EpochMemo {
    /// The fetch epoch of `topic`/`partition`, if it is assigned.
    fn epoch(&mut self, shared: &Shared, topic: &str, partition: i32) -> Option<Epoch> {
        let assigned = shared.assigned.lock();
        let same = self.version == assigned.version()
            && self.tp.partition == partition
            && self.tp.topic == topic;
        if !same {
            if self.tp.topic != topic {
                self.tp.topic = topic.to_owned();
            }
            self.tp.partition = partition;
            self.version = assigned.version();
            self.epoch = assigned.get(&self.tp).map(|a| a.fetch_epoch);
        }
        self.epoch
    }
}

/// One poll round: up to [`MAX_BATCH`] messages or [`MAX_BATCH_BYTES`], each tagged with its
/// partition's fetch epoch (messages of partitions not assigned are dropped: they are
/// fetched again by their owner).
fn poll_batch(
    consumer: &BaseConsumer<DriverContext>,
    shared: &Shared,
    memo: &mut EpochMemo,
    mut batch: DeliveryBatch,
) -> DeliveryBatch {
    let mut bytes = 0;
    let mut wait = POLL_WAIT;
    while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
        match consumer.poll(wait) {
            Some(Ok(m)) => match memo.epoch(shared, m.topic(), m.partition()) {
                Some(epoch) => {
                    let d = to_delivery(&m);
                    bytes += d.size_bytes();
                    batch.push((d, epoch));
                }
                None => tracing::debug!(
                    topic = m.topic(),
                    partition = m.partition(),
                    offset = m.offset(),
                    "Dropped a message of a partition that is not assigned."
                ),
            },
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

/// Emptied batch buffers the poll loop keeps for reuse at most.
const SPARE_BATCHES: usize = 8;

/// Frees what the pipeline handed back (on this thread, which allocated it) and keeps a few
/// emptied buffers for the next batches.
fn reclaim(shared: &Shared, spare: &mut Vec<DeliveryBatch>) {
    let returned = std::mem::take(&mut *shared.recycled.lock());
    for mut batch in returned {
        batch.clear();
        if spare.len() < SPARE_BATCHES && batch.capacity() >= MAX_BATCH {
            spare.push(batch);
        }
    }
}

/// How often the driver checks that librdkafka's assignment and the pipeline's agree.
const RECONCILE_EVERY: Duration = Duration::from_secs(5);

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
            Ok(()) => {
                tracing::debug!(offsets = ?offsets, "The final commit succeeded.");
                return;
            }
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
    let mut last_check = std::time::Instant::now();
    let mut spare: Vec<DeliveryBatch> = Vec::new();
    let mut memo = EpochMemo {
        tp: Tp::new(String::new(), -1),
        version: u64::MAX,
        epoch: None,
    };
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
        if last_check.elapsed() >= RECONCILE_EVERY {
            last_check = std::time::Instant::now();
            consumer.context().reconcile(&consumer);
        }
        reclaim(&shared, &mut spare);
        let buffer = spare.pop().unwrap_or_else(|| Vec::with_capacity(MAX_BATCH));
        let batch = poll_batch(&consumer, &shared, &mut memo, buffer);
        if batch.is_empty() {
            spare.push(batch);
        } else if deliveries.blocking_send(batch).is_err() {
            pipeline_gone = Some(std::time::Instant::now());
        }
        if deliveries.is_closed() {
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
