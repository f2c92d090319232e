//! Reading the DLQ without group membership, and the replay progress group.
//!
//! [`open`] snapshots the high watermark of every DLQ partition, assigns the partitions
//! (never subscribes, so no group is joined and no rebalance happens) from a start offset,
//! and reads up to the snapshot on a dedicated thread, sending [`ReadEvent`]s through a
//! bounded channel. New messages arriving meanwhile are left for the next run.
//!
//! - [`ReadMode::Snapshot`] (inspect): the consumer's `group.id` is a fresh random name
//!   (librdkafka needs one to assign partitions) that is never joined or committed to, so no
//!   group appears on the broker; it reads from the low watermark.
//! - [`ReadMode::Group`] (replay): the consumer has the replay group's id, only to read and
//!   commit that group's offsets; it starts at the committed offsets (the low watermark when
//!   there are none, or when retention removed them). [`KafkaProgress`] commits
//!   synchronously.
//!
//! Every librdkafka call here blocks, so it runs on the reader thread or in
//! `spawn_blocking`, never on an async worker thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::service::dlq::{ProgressError, ProgressStore, ReadEvent};
use crate::transport::consumer::to_delivery;
use crate::transport::settings::{client_config, ClientRole};

/// Metadata, watermark and committed-offset requests wait at most this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The reader gives up when no partition made progress for this long.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one poll waits; also how quickly the reader notices a stop request.
const POLL_WAIT: Duration = Duration::from_millis(100);
/// Events buffered between the reader thread and the caller.
const CHANNEL_CAPACITY: usize = 64;

/// Why the DLQ reader could not start. The messages are the client's own, or name the
/// missing topic.
#[derive(Debug, thiserror::Error)]
pub enum DlqReadError {
    /// The DLQ topic does not exist (or has no partitions).
    #[error("the DLQ topic {topic} (KAFKA_DLQ_TOPIC) does not exist or has no partitions")]
    NoTopic {
        /// `KAFKA_DLQ_TOPIC`.
        topic: String,
    },
    /// The consumer could not be created, or the broker did not answer the metadata,
    /// watermark or committed-offset requests (or the assignment) in time.
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    /// The blocking task that asks the broker did not complete.
    #[error(transparent)]
    Task(#[from] tokio::task::JoinError),
    /// The reader thread could not be started.
    #[error(transparent)]
    Thread(#[from] std::io::Error),
}

/// How the DLQ is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadMode {
    /// From the beginning, with a throwaway group id that is never committed to.
    Snapshot,
    /// From this group's committed offsets; the group's offsets may be committed.
    Group(String),
}

/// One partition's part of the snapshot: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionRange {
    /// Partition.
    pub partition: i32,
    /// First offset to read.
    pub start: i64,
    /// High watermark at the start: the first offset not read.
    pub end: i64,
    /// Whether `start` came from the group's committed offset.
    pub resumed: bool,
}

/// A running DLQ reader. [`DlqReader::close`] stops it and releases the consumer off the
/// async runtime.
pub struct DlqReader {
    consumer: Arc<BaseConsumer>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// What is read, per partition.
    pub ranges: Vec<PartitionRange>,
}

impl std::fmt::Debug for DlqReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DlqReader")
            .field("ranges", &self.ranges)
            .finish()
    }
}

/// Opens a reader of `config`'s DLQ topic.
///
/// # Errors
/// [`DlqReadError`]: the consumer cannot be created, the topic does not exist, or the
/// broker does not answer the watermark or committed-offset requests in time.
pub async fn open(
    config: &Config,
    mode: ReadMode,
) -> Result<(DlqReader, mpsc::Receiver<ReadEvent>), DlqReadError> {
    let topic = config.retry.dlq_topic.clone();
    let mut cc = client_config(config, ClientRole::Consumer);
    cc.set("enable.partition.eof", "true");
    cc.set("enable.auto.commit", "false");
    cc.set("enable.auto.offset.store", "false");
    match &mode {
        ReadMode::Snapshot => {
            // librdkafka needs a group id to assign partitions; a fresh one that is never
            // committed to (auto-commit off, no commit calls, no subscription) leaves no
            // trace on the broker and cannot collide with a real group.
            let id = uuid::Uuid::new_v4().simple().to_string();
            cc.set("group.id", format!("courier-dlq-inspect-{id}"));
            cc.remove("group.instance.id");
        }
        ReadMode::Group(g) => {
            cc.set("group.id", g);
            cc.remove("group.instance.id");
        }
    }
    let consumer: Arc<BaseConsumer> = Arc::new(cc.create()?);
    let c = consumer.clone();
    let t = topic.clone();
    let ranges = tokio::task::spawn_blocking(move || plan_ranges(&c, &t, &mode)).await??;
    let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
    let stop = Arc::new(AtomicBool::new(false));
    let (c, s, r) = (consumer.clone(), stop.clone(), ranges.clone());
    let thread = std::thread::Builder::new()
        .name("courier-dlq-reader".into())
        .spawn(move || read_loop(&c, &topic, r, &s, &tx))?;
    Ok((
        DlqReader {
            consumer,
            stop,
            thread: Some(thread),
            ranges,
        },
        rx,
    ))
}

impl DlqReader {
    /// The replay group's progress store (only meaningful in [`ReadMode::Group`]).
    pub fn progress(&self, topic: &str) -> KafkaProgress {
        KafkaProgress {
            consumer: self.consumer.clone(),
            topic: topic.to_owned(),
        }
    }

    /// Whether any partition started from the group's committed offset.
    pub fn resumed(&self) -> bool {
        self.ranges.iter().any(|r| r.resumed)
    }

    /// Stops the reader thread and drops the consumer on a blocking thread (closing a
    /// consumer waits for librdkafka). Drop every [`KafkaProgress`] first.
    pub async fn close(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let thread = self.thread.take();
        let consumer = self.consumer.clone();
        drop(self);
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(t) = thread {
                let _ = t.join();
            }
            drop(consumer);
        })
        .await;
    }
}

impl Drop for DlqReader {
    fn drop(&mut self) {
        // Without `close` the thread still stops soon: it checks the flag on every poll.
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Snapshots the watermarks and assigns every partition that has something to read.
fn plan_ranges(
    consumer: &BaseConsumer,
    topic: &str,
    mode: &ReadMode,
) -> Result<Vec<PartitionRange>, DlqReadError> {
    let md = consumer.fetch_metadata(Some(topic), REQUEST_TIMEOUT)?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(DlqReadError::NoTopic {
            topic: topic.to_owned(),
        });
    }
    let committed = match mode {
        ReadMode::Snapshot => None,
        ReadMode::Group(_) => {
            let mut tpl = TopicPartitionList::new();
            for p in &partitions {
                tpl.add_partition(topic, *p);
            }
            Some(consumer.committed_offsets(tpl, REQUEST_TIMEOUT)?)
        }
    };
    let mut ranges = Vec::with_capacity(partitions.len());
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, REQUEST_TIMEOUT)?;
        let from_group = committed
            .as_ref()
            .and_then(|c| c.find_partition(topic, p))
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
        let start = from_group.map_or(low, |o| o.max(low));
        ranges.push(PartitionRange {
            partition: p,
            start,
            end: high,
            resumed: from_group.is_some(),
        });
    }
    let mut tpl = TopicPartitionList::new();
    for r in ranges.iter().filter(|r| r.start < r.end) {
        tpl.add_partition_offset(topic, r.partition, Offset::Offset(r.start))?;
    }
    consumer.assign(&tpl)?;
    tracing::debug!(topic, ?ranges, "The DLQ reader assigned its snapshot.");
    Ok(ranges)
}

/// Polls until every assigned partition reached its snapshot end, the caller went away or
/// a stop was requested; runs on the reader thread.
fn read_loop(
    consumer: &BaseConsumer,
    topic: &str,
    ranges: Vec<PartitionRange>,
    stop: &AtomicBool,
    tx: &mpsc::Sender<ReadEvent>,
) {
    let mut open: Vec<PartitionRange> = ranges.into_iter().filter(|r| r.start < r.end).collect();
    let mut last_progress = Instant::now();
    while !open.is_empty() {
        if stop.load(Ordering::SeqCst) || tx.is_closed() {
            return;
        }
        if last_progress.elapsed() > STALL_TIMEOUT {
            let left: Vec<i32> = open.iter().map(|r| r.partition).collect();
            let msg = format!(
                "no progress on partitions {left:?} of {topic} for {}s; is the broker reachable?",
                STALL_TIMEOUT.as_secs()
            );
            let _ = tx.blocking_send(ReadEvent::Failed(msg));
            return;
        }
        match consumer.poll(POLL_WAIT) {
            None => {}
            Some(Ok(m)) => {
                last_progress = Instant::now();
                let Some(i) = open.iter().position(|r| r.partition == m.partition()) else {
                    continue;
                };
                let end = open[i].end;
                if m.offset() + 1 >= end {
                    finish(consumer, topic, &mut open, i);
                }
                if m.offset() < end {
                    if tx
                        .blocking_send(ReadEvent::Message(to_delivery(&m)))
                        .is_err()
                    {
                        return;
                    }
                    // Waiting for a slow (rate-limited) caller is not a stall.
                    last_progress = Instant::now();
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                last_progress = Instant::now();
                if let Some(i) = open.iter().position(|r| r.partition == p) {
                    finish(consumer, topic, &mut open, i);
                }
            }
            Some(Err(e)) => {
                tracing::warn!(topic, error = %e, "Reading the DLQ hit an error; the reader keeps trying.");
            }
        }
    }
    let _ = tx.blocking_send(ReadEvent::End);
}

/// Marks `open[i]` done and pauses it, so nothing beyond the snapshot is fetched.
fn finish(consumer: &BaseConsumer, topic: &str, open: &mut Vec<PartitionRange>, i: usize) {
    let r = open.swap_remove(i);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, r.partition);
    if let Err(e) = consumer.pause(&tpl) {
        tracing::debug!(topic, partition = r.partition, error = %e, "Pausing a finished DLQ partition failed; later messages are ignored anyway.");
    }
}

/// Commits the replay group's DLQ offsets synchronously, on a blocking thread.
pub struct KafkaProgress {
    consumer: Arc<BaseConsumer>,
    topic: String,
}

impl std::fmt::Debug for KafkaProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaProgress")
            .field("topic", &self.topic)
            .finish()
    }
}

#[async_trait]
impl ProgressStore for KafkaProgress {
    async fn commit(&self, offsets: Vec<(i32, i64)>) -> Result<(), ProgressError> {
        let mut tpl = TopicPartitionList::new();
        for (p, o) in &offsets {
            tpl.add_partition_offset(&self.topic, *p, Offset::Offset(*o))
                .map_err(ProgressError::new)?;
        }
        let consumer = self.consumer.clone();
        tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync))
            .await
            .map_err(ProgressError::new)?
            .map_err(ProgressError::new)
    }
}
