//! The consumer driver: a `BaseConsumer` polled on its own thread, so rebalance callbacks can
//! wait for the async pipeline to drain a revoked partition without blocking the runtime.
//! Each Kafka message becomes an owned [`Delivery`] tagged with its partition's epoch.
//! Pause, resume, seek and commit requests from the pipeline are coalesced in a small shared
//! state (bounded by the number of partitions) and applied between polls; commits are
//! asynchronous on the interval and synchronous on revoke and on close.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::model::Delivery;
use crate::observability::{Metrics, Readiness};
use crate::service::source::{ConsumerControl, Control, DeliveryBatch, Epoch, Tp};
use crate::transport::context::ErrorLimiter;
use crate::transport::settings::{client_config, ClientRole};

/// Messages taken from librdkafka per poll round and sent to the pipeline as one batch.
const MAX_BATCH: usize = 256;
/// How long one poll waits: also the latency of applying pause/resume/seek requests.
const POLL_WAIT: Duration = Duration::from_millis(10);

#[derive(Default)]
struct Commands {
    pause: BTreeMap<Tp, bool>,
    seek: BTreeMap<Tp, (i64, Epoch)>,
    commit: BTreeMap<Tp, i64>,
    close: Option<Vec<(Tp, i64)>>,
}

struct Shared {
    commands: Mutex<Commands>,
    epochs: Mutex<HashMap<Tp, Epoch>>,
    next_epoch: AtomicU64,
    closing: AtomicBool,
}

impl Shared {
    fn new_epoch(&self) -> Epoch {
        self.next_epoch.fetch_add(1, Ordering::SeqCst)
    }
}

struct DriverContext {
    shared: Arc<Shared>,
    events: mpsc::Sender<Control>,
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
        let assigned = self.shared.epochs.lock();
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

impl ConsumerContext for DriverContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        if consumer.assignment_lost() {
            // The group moved on without us (e.g. after a broker outage): not consuming
            // until the next assignment.
            self.readiness.set_group_joined(false);
        }
        let partitions = tps_of(tpl);
        if !self.shared.closing.load(Ordering::SeqCst) {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let sent = self.events.blocking_send(Control::Revoked {
                partitions: partitions.clone(),
                reply: tx,
            });
            if sent.is_ok() {
                match rx.recv_timeout(self.revoke_wait) {
                    Ok(offsets) if !offsets.is_empty() => {
                        if let Err(e) = consumer.commit(&tpl_of(&offsets), CommitMode::Sync) {
                            tracing::warn!(error = %e, "The commit on revoke failed; the next owner starts from the last committed offsets.");
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tracing::warn!("The pipeline did not answer the revoke in time; nothing more is committed."),
                }
            }
        }
        let mut epochs = self.shared.epochs.lock();
        let mut commands = self.shared.commands.lock();
        for tp in &partitions {
            epochs.remove(tp);
            commands.pause.remove(tp);
            commands.seek.remove(tp);
            commands.commit.remove(tp);
            let _ = self
                .metrics
                .consumer_lag
                .remove_label_values(&[&tp.topic, &tp.partition.to_string()]);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let list: Vec<(Tp, Epoch)> = {
                    let mut epochs = self.shared.epochs.lock();
                    tps_of(tpl)
                        .into_iter()
                        .map(|tp| {
                            let e = self.shared.new_epoch();
                            epochs.insert(tp.clone(), e);
                            (tp, e)
                        })
                        .collect()
                };
                self.readiness.set_group_joined(true);
                let _ = self.events.blocking_send(Control::Assigned(list));
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => {
                self.readiness.set_group_joined(false);
                tracing::warn!(error = %e, "Rebalance error; not ready until the next assignment.");
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        match result {
            Ok(()) => self.metrics.commits.with_label_values(&["ok"]).inc(),
            Err(KafkaError::ConsumerCommit(rdkafka::error::RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                self.metrics.commits.with_label_values(&["error"]).inc();
                tracing::warn!(error = %e, "An offset commit failed; a later commit covers it.");
            }
        }
    }
}

/// The pipeline's handle on the driver.
pub struct KafkaConsumerControl {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for KafkaConsumerControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KafkaConsumerControl")
    }
}

impl ConsumerControl for KafkaConsumerControl {
    fn pause(&self, tp: &Tp) {
        self.shared.commands.lock().pause.insert(tp.clone(), true);
    }

    fn resume(&self, tp: &Tp) {
        self.shared.commands.lock().pause.insert(tp.clone(), false);
    }

    fn seek(&self, tp: &Tp, offset: i64) -> Epoch {
        let e = self.shared.new_epoch();
        // Pause in the same request: a seek applied before its pause would let the driver
        // deliver (and librdkafka count as consumed) messages the pipeline drops while the
        // partition waits, and the resume would then continue after them.
        let mut commands = self.shared.commands.lock();
        commands.pause.insert(tp.clone(), true);
        commands.seek.insert(tp.clone(), (offset, e));
        e
    }

    fn commit(&self, offsets: Vec<(Tp, i64)>) {
        self.shared.commands.lock().commit.extend(offsets);
    }

    fn close(&self, offsets: Vec<(Tp, i64)>) {
        self.shared.commands.lock().close = Some(offsets);
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

/// What [`start`] returns: the control handle and the two event streams.
pub struct Driver {
    /// Pause/resume/seek/commit/close.
    pub control: Arc<KafkaConsumerControl>,
    /// Rebalance events.
    pub events: mpsc::Receiver<Control>,
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
        epochs: Mutex::new(HashMap::new()),
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
    let mut topics: Vec<String> = config.consumer.topics.clone();
    topics.extend((1..=config.consumer.retry_max).map(|n| config.retry.topic(n)));
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&refs)?;
    let thread_shared = shared.clone();
    let thread = std::thread::Builder::new()
        .name("courier-consumer".into())
        .spawn(move || poll_loop(consumer, thread_shared, deliveries_tx))
        .map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
    Ok(Driver {
        control: Arc::new(KafkaConsumerControl {
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

/// Applies pending requests; returns the final offsets when close was requested.
fn apply_commands(
    consumer: &BaseConsumer<DriverContext>,
    shared: &Shared,
) -> Option<Vec<(Tp, i64)>> {
    let cmds = std::mem::take(&mut *shared.commands.lock());
    let (mut pause, mut resume) = (TopicPartitionList::new(), TopicPartitionList::new());
    for (tp, p) in &cmds.pause {
        if *p {
            pause.add_partition(&tp.topic, tp.partition)
        } else {
            resume.add_partition(&tp.topic, tp.partition)
        };
    }
    if pause.count() > 0 {
        if let Err(e) = consumer.pause(&pause) {
            tracing::warn!(error = %e, "Pausing partitions failed.");
        }
    }
    let mut failed = Vec::new();
    for (tp, (offset, epoch)) in &cmds.seek {
        if !shared.epochs.lock().contains_key(tp) {
            continue;
        }
        match consumer.seek(
            &tp.topic,
            tp.partition,
            Offset::Offset(*offset),
            Duration::from_secs(5),
        ) {
            Ok(()) => {
                shared.epochs.lock().insert(tp.clone(), *epoch);
            }
            Err(e) => {
                // Until the seek succeeds, deliveries keep the old epoch and are dropped by
                // the pipeline (they are fetched again after the seek): try again next round.
                tracing::warn!(topic = %tp.topic, partition = tp.partition, offset, error = %e, "Seek failed; retrying.");
                failed.push((tp.clone(), (*offset, *epoch)));
            }
        }
    }
    if !failed.is_empty() {
        let mut commands = shared.commands.lock();
        for (tp, seek) in failed {
            commands.seek.entry(tp).or_insert(seek);
        }
    }
    if resume.count() > 0 {
        if let Err(e) = consumer.resume(&resume) {
            tracing::warn!(error = %e, "Resuming partitions failed.");
        }
    }
    if !cmds.commit.is_empty() {
        let offsets: Vec<(Tp, i64)> = cmds.commit.into_iter().collect();
        if let Err(e) = consumer.commit(&tpl_of(&offsets), CommitMode::Async) {
            tracing::warn!(error = %e, "Queuing an offset commit failed.");
        }
    }
    cmds.close
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
            if !offsets.is_empty() {
                if let Err(e) = consumer.commit(&tpl_of(&offsets), CommitMode::Sync) {
                    tracing::warn!(error = %e, "The final commit failed; the next owner starts from the last committed offsets.");
                }
            }
            shared.closing.store(true, Ordering::SeqCst);
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
        let mut batch: DeliveryBatch = Vec::new();
        let mut wait = POLL_WAIT;
        while batch.len() < MAX_BATCH {
            match consumer.poll(wait) {
                Some(Ok(m)) => {
                    let tp_epoch = shared
                        .epochs
                        .lock()
                        .get(&Tp::new(m.topic(), m.partition()))
                        .copied();
                    if let Some(epoch) = tp_epoch {
                        batch.push((to_delivery(&m), epoch));
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
        if (!batch.is_empty() && deliveries.blocking_send(batch).is_err()) || deliveries.is_closed()
        {
            pipeline_gone = Some(std::time::Instant::now());
        }
    }
    drop(consumer);
}
