//! `courier dlq replay`: each selected message published to its original topic, and the
//! replay group's offsets committed past it once the broker acknowledged the publish.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Instant;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::model::{Ack, Delivery};
use crate::service::publish::{PublishError, Publisher};

use super::{closed_early, replay_record, DlqEntry, Pacer, ReadEvent, ReadFailed, Selection};

/// While only non-matching messages go by, progress is committed after this many of them,
/// so an interrupted replay of a large DLQ does not read them all again.
const SKIPPED_COMMIT_EVERY: u64 = 1000;

/// Where replay records which DLQ messages it is done with: the replay group's committed
/// offsets. A trait so the replay loop is tested without a broker.
#[cfg_attr(test, mockall::automock)]
#[async_trait]
pub trait ProgressStore: Send + Sync {
    /// Commits `(partition, next offset)` of the DLQ for the replay group and returns once
    /// the broker confirmed it.
    ///
    /// # Errors
    /// The client's error when the commit failed.
    async fn commit(&self, offsets: Vec<(i32, i64)>) -> Result<(), ProgressError>;
}

/// Committing replay progress failed: the client's error, as it says it.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ProgressError(Box<dyn std::error::Error + Send + Sync>);

impl ProgressError {
    /// Wraps the client's error (or a message, for tests).
    pub fn new(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        ProgressError(error.into())
    }
}

/// What a non-dry-run replay publishes with and records progress in.
#[derive(Clone, Copy)]
pub struct ReplayTarget<'a> {
    /// Publishes replay records (resolves on the broker's acknowledgement).
    pub publisher: &'a dyn Publisher,
    /// The replay group's offsets.
    pub progress: &'a dyn ProgressStore,
}

impl fmt::Debug for ReplayTarget<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReplayTarget")
    }
}

/// How a replay runs.
#[derive(Debug, Clone)]
pub struct ReplayPlan {
    /// Which messages.
    pub selection: Selection,
    /// At most this many publishes per second.
    pub rate: Option<f64>,
}

/// What happened to one selected message, for the caller to print or log.
#[derive(Debug)]
pub enum ReplayEvent<'a> {
    /// Published (and its progress committed); `ack` is where it landed.
    Replayed {
        /// The DLQ entry.
        entry: &'a DlqEntry,
        /// Target topic.
        topic: &'a str,
        /// Where the broker stored it.
        ack: Ack,
    },
    /// Dry run: it would be published to `topic`.
    WouldReplay {
        /// The DLQ entry.
        entry: &'a DlqEntry,
        /// Target topic.
        topic: &'a str,
    },
    /// Selected but without an original topic: counted, not published.
    Unreplayable {
        /// The DLQ entry.
        entry: &'a DlqEntry,
    },
}

/// The outcome of a replay (or a dry run of one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Whether nothing was published or committed.
    pub dry_run: bool,
    /// DLQ messages read in this run (the group's earlier progress is not read again).
    pub scanned: u64,
    /// Published and acknowledged (in a dry run: would be).
    pub replayed: u64,
    /// Not matching the selection.
    pub skipped: u64,
    /// Matching but without an original topic.
    pub unreplayable: u64,
    /// Replayed per target topic.
    pub per_topic: BTreeMap<String, u64>,
    /// Whether the run was cancelled before the end of the snapshot.
    pub interrupted: bool,
}

/// Why a replay stopped with an error. Everything counted in `report` is done and
/// recorded; re-running the same command resumes after it.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Reading the DLQ failed.
    #[error(transparent)]
    Read(#[from] ReadFailed),
    /// A publish failed (after librdkafka's own retries).
    #[error("publishing DLQ message {partition}@{offset} to {topic} failed: {error}")]
    Publish {
        /// DLQ partition.
        partition: i32,
        /// DLQ offset.
        offset: i64,
        /// Target topic.
        topic: String,
        /// The classified failure.
        error: PublishError,
    },
    /// Committing progress failed. When `published` is set, that message was published but
    /// not recorded, so a re-run replays it again.
    #[error("committing replay progress failed ({error}); {}", published.as_ref().map_or_else(|| "nothing was published since the last commit".to_owned(), |p| format!("DLQ message {p} was published but not recorded, so a re-run replays it again")))]
    Commit {
        /// The client's error.
        error: ProgressError,
        /// `partition@offset (id)` of the published, unrecorded message.
        published: Option<String>,
    },
}

/// Offsets read past but not committed yet, per DLQ partition.
#[derive(Debug, Default)]
struct Pending {
    next: BTreeMap<i32, i64>,
    skipped_since_commit: u64,
}

impl Pending {
    fn advance(&mut self, d: &Delivery) {
        self.next.insert(d.partition, d.offset + 1);
    }

    async fn flush(
        &mut self,
        target: Option<ReplayTarget<'_>>,
        published: Option<String>,
    ) -> Result<(), ReplayError> {
        self.skipped_since_commit = 0;
        let (Some(t), false) = (target, self.next.is_empty()) else {
            return Ok(());
        };
        let offsets: Vec<(i32, i64)> = std::mem::take(&mut self.next).into_iter().collect();
        t.progress
            .commit(offsets)
            .await
            .map_err(|error| ReplayError::Commit { error, published })
    }
}

/// Replays the selected messages of `events` (the DLQ from the replay group's committed
/// offsets to the snapshot end). With a `target`, each selected message is published and
/// then, once acknowledged, the group's offsets are committed past it (and past the
/// unselected messages before it); without one (dry run) nothing is published or
/// committed. Cancelling `shutdown` stops between messages and commits what is done.
///
/// # Errors
/// [`ReplayError`]; `report` then holds what was done before it.
pub async fn replay_loop<F>(
    events: &mut mpsc::Receiver<ReadEvent>,
    plan: &ReplayPlan,
    target: Option<ReplayTarget<'_>>,
    shutdown: &CancellationToken,
    report: &mut ReplayReport,
    mut observe: F,
) -> Result<(), ReplayError>
where
    F: FnMut(ReplayEvent<'_>),
{
    report.dry_run = target.is_none();
    let mut pacer = Pacer::new(plan.rate);
    let mut pending = Pending::default();
    loop {
        let event = tokio::select! {
            biased;
            _ = shutdown.cancelled() => None,
            ev = events.recv() => Some(ev),
        };
        let d = match event {
            None => {
                report.interrupted = true;
                break;
            }
            Some(Some(ReadEvent::Message(d))) => d,
            Some(Some(ReadEvent::End)) => break,
            Some(Some(ReadEvent::Failed(e))) => {
                pending.flush(target, None).await?;
                return Err(ReadFailed(e).into());
            }
            Some(None) => {
                pending.flush(target, None).await?;
                return Err(closed_early().into());
            }
        };
        let step = replay_one(&d, plan, target, &mut pacer, shutdown, report, &mut observe);
        match step.await {
            Ok(Step::Cancelled) => {
                report.interrupted = true;
                break;
            }
            Ok(Step::Done) => {
                pending.advance(&d);
                pending.skipped_since_commit += 1;
                if pending.skipped_since_commit >= SKIPPED_COMMIT_EVERY {
                    pending.flush(target, None).await?;
                }
            }
            Ok(Step::Published(label)) => {
                pending.advance(&d);
                pending.flush(target, Some(label)).await?;
            }
            Err(e) => {
                pending.flush(target, None).await?;
                return Err(e);
            }
        }
    }
    pending.flush(target, None).await
}

/// What [`replay_one`] did with a message.
#[derive(Debug)]
enum Step {
    /// Nothing to publish (not selected, unreplayable, or a dry run): done with it.
    Done,
    /// Published and acknowledged: its progress must be committed now; the label names it.
    Published(String),
    /// Cancelled while waiting for the rate limit, before publishing it.
    Cancelled,
}

/// Handles one DLQ message: matches it, and publishes it when selected (after the pacer's
/// wait, which cancellation cuts short).
async fn replay_one<F>(
    d: &Delivery,
    plan: &ReplayPlan,
    target: Option<ReplayTarget<'_>>,
    pacer: &mut Pacer,
    shutdown: &CancellationToken,
    report: &mut ReplayReport,
    observe: &mut F,
) -> Result<Step, ReplayError>
where
    F: FnMut(ReplayEvent<'_>),
{
    report.scanned += 1;
    let entry = DlqEntry::from_delivery(d);
    if !plan.selection.matches(&entry) {
        report.skipped += 1;
        return Ok(Step::Done);
    }
    let Ok(record) = replay_record(d, crate::model::now_ms()) else {
        report.unreplayable += 1;
        observe(ReplayEvent::Unreplayable { entry: &entry });
        return Ok(Step::Done);
    };
    let topic = record.topic.clone();
    let Some(t) = target else {
        report.replayed += 1;
        *report.per_topic.entry(topic.clone()).or_default() += 1;
        observe(ReplayEvent::WouldReplay {
            entry: &entry,
            topic: &topic,
        });
        return Ok(Step::Done);
    };
    let wait = pacer.next_delay(Instant::now());
    if !wait.is_zero() {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(Step::Cancelled),
            _ = tokio::time::sleep(wait) => {}
        }
    }
    let ack = t
        .publisher
        .publish(record)
        .await
        .map_err(|error| ReplayError::Publish {
            partition: d.partition,
            offset: d.offset,
            topic: topic.clone(),
            error,
        })?;
    report.replayed += 1;
    *report.per_topic.entry(topic.clone()).or_default() += 1;
    observe(ReplayEvent::Replayed {
        entry: &entry,
        topic: &topic,
        ack,
    });
    Ok(Step::Published(format!(
        "{}@{} ({})",
        d.partition,
        d.offset,
        entry.id.as_deref().unwrap_or("no message-id")
    )))
}
