//! Dead-letter topic operations, free of rdkafka: what a DLQ entry says, the filter that the
//! `courier dlq` flags describe, the replay record, the inspect summary and the replay loop.
//!
//! The transport layer (`transport::dlq`) reads the DLQ up to a snapshot of its high
//! watermarks and feeds [`ReadEvent`]s through a bounded channel; this module decides what
//! each message means and what happens to it, so the decisions are unit-tested without a
//! broker.
//!
//! Replay records its progress with [`ProgressStore::commit`] synchronously after every
//! acknowledged publish (see `app::dlq` for why this and not a transaction, and for the
//! remaining window).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::parse_duration;
use crate::model::{
    Ack, CourierHeaders, Delivery, ErrorKind, Headers, OutgoingRecord, COURIER_HEADER_PREFIX,
    HEADER_REPLAYED_AT_MS,
};
use crate::service::publish::{PublishError, Publisher};

/// Label used in summaries for a missing error kind or original topic.
pub const UNKNOWN: &str = "(unknown)";
/// While only non-matching messages go by, progress is committed after this many of them,
/// so an interrupted replay of a large DLQ does not read them all again.
const SKIPPED_COMMIT_EVERY: u64 = 1000;

/// What the transport's DLQ reader sends: messages up to the snapshot end, then `End`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadEvent {
    /// One DLQ message.
    Message(Delivery),
    /// Every partition reached the high watermark snapshotted at the start.
    End,
    /// Reading failed; nothing more follows.
    Failed(String),
}

/// One dead-lettered message as an operator sees it: where it is in the DLQ, where it came
/// from, and why it failed. Built leniently: a malformed courier header is absent here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DlqEntry {
    /// DLQ partition.
    pub dlq_partition: i32,
    /// DLQ offset.
    pub dlq_offset: i64,
    /// The `message-id` header.
    pub id: Option<String>,
    /// `courier-original-topic`: where a replay sends it.
    pub original_topic: Option<String>,
    /// `courier-original-partition`.
    pub original_partition: Option<i32>,
    /// `courier-original-offset`.
    pub original_offset: Option<i64>,
    /// `courier-attempt`: failed attempts.
    pub attempts: Option<u32>,
    /// `courier-error-kind`.
    pub error_kind: Option<ErrorKind>,
    /// `courier-error-message`.
    pub error_message: Option<String>,
    /// `courier-failed-at-ms`.
    pub failed_at_ms: Option<i64>,
    /// `courier-consumer-group`: whose retry chain dead-lettered it.
    pub consumer_group: Option<String>,
    /// `courier-replayed-at-ms`, when the message had been replayed before.
    pub replayed_at_ms: Option<i64>,
    /// Courier headers that were present but malformed.
    pub malformed: Vec<&'static str>,
}

impl DlqEntry {
    /// Reads the entry out of a DLQ message; malformed courier headers are logged and
    /// treated as absent, as DESIGN.md requires, so one bad message never stops a listing.
    pub fn from_delivery(d: &Delivery) -> Self {
        let h = CourierHeaders::parse(&d.headers);
        if !h.malformed.is_empty() {
            tracing::warn!(partition = d.partition, offset = d.offset, headers = ?h.malformed, "A dead-lettered message has malformed courier headers; they are treated as absent.");
        }
        DlqEntry {
            dlq_partition: d.partition,
            dlq_offset: d.offset,
            id: d.message_id().map(str::to_owned),
            original_topic: h.original_topic,
            original_partition: h.original_partition,
            original_offset: h.original_offset,
            attempts: h.attempt,
            error_kind: h.error_kind,
            error_message: h.error_message,
            failed_at_ms: h.failed_at_ms,
            consumer_group: h.consumer_group,
            replayed_at_ms: h.replayed_at_ms,
            malformed: h.malformed,
        }
    }

    /// Milliseconds since the last failure, if the failure time is known.
    pub fn age_ms(&self, now_ms: i64) -> Option<i64> {
        self.failed_at_ms.map(|f| (now_ms - f).max(0))
    }

    /// The error kind as written in summaries.
    pub fn kind_label(&self) -> &str {
        self.error_kind.map_or(UNKNOWN, ErrorKind::as_str)
    }

    /// `topic/partition@offset` of the original message, as far as it is known.
    pub fn original_label(&self) -> String {
        let topic = self.original_topic.as_deref().unwrap_or(UNKNOWN);
        let part = self
            .original_partition
            .map_or_else(|| "?".to_owned(), |p| p.to_string());
        let off = self
            .original_offset
            .map_or_else(|| "?".to_owned(), |o| o.to_string());
        format!("{topic}/{part}@{off}")
    }

    /// The entry as a JSON object for `--json`; `now_ms` fixes the age.
    pub fn to_json(&self, now_ms: i64) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "dlq_partition": self.dlq_partition,
            "dlq_offset": self.dlq_offset,
            "original_topic": self.original_topic,
            "original_partition": self.original_partition,
            "original_offset": self.original_offset,
            "attempts": self.attempts,
            "error_kind": self.error_kind.map(ErrorKind::as_str),
            "error_message": self.error_message,
            "failed_at_ms": self.failed_at_ms,
            "age_ms": self.age_ms(now_ms),
            "consumer_group": self.consumer_group,
            "replayed_at_ms": self.replayed_at_ms,
            "malformed_headers": self.malformed,
        })
    }
}

/// A compact age such as `45s`, `12m30s`, `3h05m` or `2d04h`, for listings.
pub fn format_age(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// A command-line flag with a value it does not accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{flag}={value}: expected {expected}")]
pub struct FilterError {
    /// The flag, e.g. `--error-kind`.
    pub flag: &'static str,
    /// The value given.
    pub value: String,
    /// What is accepted.
    pub expected: &'static str,
}

/// The filter flags as typed, before parsing; also what the replay group's hash is over.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilterArgs {
    /// `--error-kind` values.
    pub error_kinds: Vec<String>,
    /// `--since` value.
    pub since: Option<String>,
    /// `--id` values.
    pub ids: Vec<String>,
}

impl FilterArgs {
    /// Whether no filter flag was given.
    pub fn is_empty(&self) -> bool {
        self.error_kinds.is_empty() && self.since.is_none() && self.ids.is_empty()
    }
}

/// Which DLQ messages an operation is about. Every given criterion must hold; several
/// kinds or ids are alternatives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DlqFilter {
    kinds: BTreeSet<&'static str>,
    since_ms: Option<i64>,
    ids: BTreeSet<String>,
}

const KIND_EXPECTED: &str = "retryable, fatal or exhausted";
const SINCE_EXPECTED: &str =
    "a duration such as 30m or 1h, or an RFC 3339 timestamp such as 2024-05-01T12:00:00Z";

impl DlqFilter {
    /// Parses the flags; `now_ms` anchors a relative `--since`.
    ///
    /// # Errors
    /// A [`FilterError`] naming the flag, the value and what is accepted.
    pub fn parse(args: &FilterArgs, now_ms: i64) -> Result<Self, FilterError> {
        let mut kinds = BTreeSet::new();
        for raw in &args.error_kinds {
            let kind =
                ErrorKind::parse(raw.trim().to_ascii_lowercase().as_str()).ok_or_else(|| {
                    FilterError {
                        flag: "--error-kind",
                        value: raw.clone(),
                        expected: KIND_EXPECTED,
                    }
                })?;
            kinds.insert(kind.as_str());
        }
        let since_ms = args
            .since
            .as_deref()
            .map(|s| parse_since(s, now_ms))
            .transpose()?;
        let mut ids = BTreeSet::new();
        for id in &args.ids {
            if id.is_empty() {
                return Err(FilterError {
                    flag: "--id",
                    value: String::new(),
                    expected: "a non-empty message id",
                });
            }
            ids.insert(id.clone());
        }
        Ok(DlqFilter {
            kinds,
            since_ms,
            ids,
        })
    }

    /// Whether `entry` passes every criterion. With `--since`, a message without a failure
    /// time does not match (its age is unknown).
    pub fn matches(&self, entry: &DlqEntry) -> bool {
        let kind_ok = self.kinds.is_empty()
            || entry
                .error_kind
                .is_some_and(|k| self.kinds.contains(k.as_str()));
        let since_ok = self
            .since_ms
            .is_none_or(|cut| entry.failed_at_ms.is_some_and(|f| f >= cut));
        let id_ok = self.ids.is_empty() || entry.id.as_ref().is_some_and(|i| self.ids.contains(i));
        kind_ok && since_ok && id_ok
    }

    /// The cutoff of `--since`, epoch milliseconds.
    pub fn since_ms(&self) -> Option<i64> {
        self.since_ms
    }
}

/// `--since`: a duration back from `now_ms`, or an RFC 3339 timestamp.
fn parse_since(raw: &str, now_ms: i64) -> Result<i64, FilterError> {
    let s = raw.trim();
    if let Ok(d) = parse_duration(s) {
        let back = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        return Ok(now_ms.saturating_sub(back).max(0));
    }
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
        .map_err(|_| FilterError {
            flag: "--since",
            value: raw.to_owned(),
            expected: SINCE_EXPECTED,
        })
}

/// What a replay is about: everything (`--all`), or what a filter matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// `--all`.
    All,
    /// Filter flags.
    Filter(DlqFilter),
}

/// Why the replay selection flags were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectionError {
    /// A filter flag has a bad value.
    #[error(transparent)]
    Flag(#[from] FilterError),
    /// Neither `--all` nor a filter.
    #[error("replay needs --all, or a filter (--error-kind, --since, --id) to choose messages")]
    NothingChosen,
    /// Both `--all` and a filter.
    #[error("--all cannot be combined with a filter (--error-kind, --since, --id)")]
    AllWithFilter,
}

impl Selection {
    /// Replay refuses to guess: it needs `--all` or at least one filter, and not both.
    ///
    /// # Errors
    /// A [`SelectionError`] when neither or both are given, or a filter value is bad.
    pub fn parse(all: bool, args: &FilterArgs, now_ms: i64) -> Result<Self, SelectionError> {
        match (all, args.is_empty()) {
            (true, true) => Ok(Selection::All),
            (true, false) => Err(SelectionError::AllWithFilter),
            (false, true) => Err(SelectionError::NothingChosen),
            (false, false) => Ok(Selection::Filter(DlqFilter::parse(args, now_ms)?)),
        }
    }

    /// Whether `entry` is selected.
    pub fn matches(&self, entry: &DlqEntry) -> bool {
        match self {
            Selection::All => true,
            Selection::Filter(f) => f.matches(entry),
        }
    }
}

/// A short hash of the selection flags, stable across runs and builds (FNV-1a 64 over a
/// normalised text), so that re-running the same replay command finds its progress group
/// while a different filter starts fresh. Order and repetition of values do not matter.
pub fn selection_fingerprint(all: bool, args: &FilterArgs) -> String {
    let norm = |v: &[String], lower: bool| -> Vec<String> {
        let set: BTreeSet<String> = v
            .iter()
            .map(|s| {
                let t = s.trim();
                if lower {
                    t.to_ascii_lowercase()
                } else {
                    t.to_owned()
                }
            })
            .collect();
        set.into_iter().collect()
    };
    let text = if all {
        "all".to_owned()
    } else {
        // Ids are joined with a NUL byte, which Kafka header text of an id cannot be
        // confused with in practice; kinds never contain it.
        format!(
            "kinds={}\nsince={}\nids={}",
            norm(&args.error_kinds, true).join(","),
            args.since.as_deref().map(str::trim).unwrap_or(""),
            norm(&args.ids, false).join("\0"),
        )
    };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")[..8].to_owned()
}

/// The default replay progress group: `{group}-dlq-replay-{fingerprint}`.
pub fn replay_group(consumer_group: &str, all: bool, args: &FilterArgs) -> String {
    format!(
        "{consumer_group}-dlq-replay-{}",
        selection_fingerprint(all, args)
    )
}

/// Why a DLQ message cannot be replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the message has no valid courier-original-topic header")]
pub struct Unreplayable;

/// The record that replays a DLQ message: to its original topic, with its key, payload and
/// user headers byte for byte, every courier header dropped (so the attempt count starts
/// again) and a fresh `courier-replayed-at-ms`, which lets it through dedupe once.
/// The partition is left to the partitioner, so the key decides it as it did originally.
///
/// # Errors
/// [`Unreplayable`] when the original topic is unknown.
pub fn replay_record(d: &Delivery, now_ms: i64) -> Result<OutgoingRecord, Unreplayable> {
    let topic = CourierHeaders::parse(&d.headers)
        .original_topic
        .ok_or(Unreplayable)?;
    let mut headers: Headers = d
        .headers
        .iter()
        .filter(|(k, _)| !k.starts_with(COURIER_HEADER_PREFIX))
        .cloned()
        .collect();
    headers.push((
        HEADER_REPLAYED_AT_MS.into(),
        Some(now_ms.to_string().into_bytes()),
    ));
    Ok(OutgoingRecord {
        topic,
        partition: None,
        key: d.key.clone(),
        payload: d.payload.clone(),
        headers,
    })
}

/// Counts of what an inspect saw: all DLQ messages read, and the matching ones by error
/// kind and by original topic (a `--limit` shortens the listing, never these counts).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Messages read from the DLQ.
    pub scanned: u64,
    /// Messages that matched the filter.
    pub matched: u64,
    /// Matching messages per error kind.
    pub by_error_kind: BTreeMap<String, u64>,
    /// Matching messages per original topic.
    pub by_original_topic: BTreeMap<String, u64>,
}

impl Summary {
    /// Counts one message read.
    pub fn count(&mut self, entry: &DlqEntry, matched: bool) {
        self.scanned += 1;
        if !matched {
            return;
        }
        self.matched += 1;
        *self
            .by_error_kind
            .entry(entry.kind_label().to_owned())
            .or_default() += 1;
        let topic = entry.original_topic.as_deref().unwrap_or(UNKNOWN);
        *self.by_original_topic.entry(topic.to_owned()).or_default() += 1;
    }
}

/// The outcome of `courier dlq inspect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InspectReport {
    /// The DLQ topic.
    pub topic: String,
    /// When the listing was made (ages are relative to it), epoch milliseconds.
    pub now_ms: i64,
    /// Matching entries in DLQ order (partition, offset), at most `--limit` of them.
    pub entries: Vec<DlqEntry>,
    /// Counts over every matching message.
    pub summary: Summary,
}

impl InspectReport {
    /// The `--json` document: entries and summary.
    pub fn to_json(&self) -> serde_json::Value {
        let entries: Vec<serde_json::Value> = self
            .entries
            .iter()
            .map(|e| e.to_json(self.now_ms))
            .collect();
        serde_json::json!({
            "topic": self.topic,
            "now_ms": self.now_ms,
            "entries": entries,
            "summary": {
                "scanned": self.summary.scanned,
                "matched": self.summary.matched,
                "listed": self.entries.len(),
                "by_error_kind": self.summary.by_error_kind,
                "by_original_topic": self.summary.by_original_topic,
            },
        })
    }
}

/// The DLQ reader stopped before the end of its snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("reading the DLQ failed: {0}")]
pub struct ReadFailed(pub String);

fn closed_early() -> ReadFailed {
    ReadFailed("the reader stopped before the end of the snapshot".into())
}

/// Reads every event of `events` and builds the inspect report: every message counted,
/// matching ones listed in DLQ order, the first `limit` kept (memory stays bounded by it).
///
/// # Errors
/// [`ReadFailed`] when the reader failed or stopped early.
pub async fn collect_inspect(
    events: &mut mpsc::Receiver<ReadEvent>,
    topic: &str,
    filter: &DlqFilter,
    limit: Option<usize>,
    now_ms: i64,
) -> Result<InspectReport, ReadFailed> {
    let mut listed: BTreeMap<(i32, i64), DlqEntry> = BTreeMap::new();
    let mut summary = Summary::default();
    loop {
        match events.recv().await {
            Some(ReadEvent::Message(d)) => {
                let entry = DlqEntry::from_delivery(&d);
                let matched = filter.matches(&entry);
                summary.count(&entry, matched);
                if matched && limit != Some(0) {
                    listed.insert((entry.dlq_partition, entry.dlq_offset), entry);
                    if limit.is_some_and(|n| listed.len() > n) {
                        listed.pop_last();
                    }
                }
            }
            Some(ReadEvent::End) => break,
            Some(ReadEvent::Failed(e)) => return Err(ReadFailed(e)),
            None => return Err(closed_early()),
        }
    }
    Ok(InspectReport {
        topic: topic.to_owned(),
        now_ms,
        entries: listed.into_values().collect(),
        summary,
    })
}

/// Where replay records which DLQ messages it is done with: the replay group's committed
/// offsets. A trait so the replay loop is tested without a broker.
#[cfg_attr(test, mockall::automock)]
#[async_trait]
pub trait ProgressStore: Send + Sync {
    /// Commits `(partition, next offset)` of the DLQ for the replay group and returns once
    /// the broker confirmed it.
    ///
    /// # Errors
    /// The client's message when the commit failed.
    async fn commit(&self, offsets: Vec<(i32, i64)>) -> Result<(), String>;
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
        /// The client's message.
        error: String,
        /// `partition@offset (id)` of the published, unrecorded message.
        published: Option<String>,
    },
}

/// Spaces publishes to at most `rate` per second: the n-th is not sent before
/// `start + n / rate`, so a slow moment is not followed by a burst above the average.
#[derive(Debug, Clone)]
pub struct Pacer {
    interval: Option<Duration>,
    start: Option<Instant>,
    sent: u32,
}

impl Pacer {
    /// A pacer for `rate` messages per second (`None`: unlimited).
    pub fn new(rate: Option<f64>) -> Self {
        Pacer {
            interval: rate
                .filter(|r| *r > 0.0 && r.is_finite())
                .map(|r| Duration::from_secs_f64(1.0 / r)),
            start: None,
            sent: 0,
        }
    }

    /// How long to wait before the next publish at `now`; counts that publish.
    pub fn next_delay(&mut self, now: Instant) -> Duration {
        let Some(interval) = self.interval else {
            return Duration::ZERO;
        };
        let start = *self.start.get_or_insert(now);
        let due = start + interval.saturating_mul(self.sent);
        self.sent = self.sent.saturating_add(1);
        due.saturating_duration_since(now)
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{failure_record, FailureHop, HEADER_ATTEMPT, HEADER_ORIGINAL_TOPIC};
    use crate::service::publish::{MockPublisher, PublishFailure};
    use std::sync::{Arc, Mutex};

    const NOW: i64 = 1_700_000_000_000;

    fn source(id: &str) -> Delivery {
        Delivery {
            topic: "events".into(),
            partition: 2,
            offset: 41,
            key: Some(vec![0xff, 0, 1]),
            payload: Some(b"\x00payload\xff".to_vec()),
            headers: vec![
                ("message-id".into(), Some(id.as_bytes().to_vec())),
                ("trace".into(), Some(vec![1, 2, 3])),
                ("null-h".into(), None),
            ],
            timestamp_ms: Some(NOW - 10_000),
        }
    }

    /// A DLQ message as the consumer writes it, at DLQ position `partition@offset`.
    fn dead(id: &str, kind: ErrorKind, failed_at_ms: i64, partition: i32, offset: i64) -> Delivery {
        let rec = failure_record(
            &source(id),
            &FailureHop {
                topic: "events-dlq",
                attempt: 4,
                due_at_ms: None,
                group: "g",
                kind,
                message: "boom",
                failed_at_ms,
            },
        );
        Delivery {
            topic: "events-dlq".into(),
            partition,
            offset,
            key: rec.key,
            payload: rec.payload,
            headers: rec.headers,
            timestamp_ms: Some(failed_at_ms),
        }
    }

    fn args(kinds: &[&str], since: Option<&str>, ids: &[&str]) -> FilterArgs {
        FilterArgs {
            error_kinds: kinds.iter().map(|s| s.to_string()).collect(),
            since: since.map(str::to_owned),
            ids: ids.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn entry_reads_courier_headers() {
        let e = DlqEntry::from_delivery(&dead("a", ErrorKind::Exhausted, NOW - 5_000, 1, 7));
        assert_eq!(e.id.as_deref(), Some("a"));
        assert_eq!((e.dlq_partition, e.dlq_offset), (1, 7));
        assert_eq!(e.original_topic.as_deref(), Some("events"));
        assert_eq!(
            (e.original_partition, e.original_offset),
            (Some(2), Some(41))
        );
        assert_eq!(e.attempts, Some(4));
        assert_eq!(e.error_kind, Some(ErrorKind::Exhausted));
        assert_eq!(e.error_message.as_deref(), Some("boom"));
        assert_eq!(e.consumer_group.as_deref(), Some("g"));
        assert_eq!(e.age_ms(NOW), Some(5_000));
        assert_eq!(e.original_label(), "events/2@41");
        assert!(e.malformed.is_empty());
        let json = e.to_json(NOW);
        assert_eq!(json["error_kind"], "exhausted");
        assert_eq!(json["age_ms"], 5_000);
    }

    #[test]
    fn entry_is_lenient_with_malformed_headers() {
        let mut d = dead("a", ErrorKind::Fatal, NOW, 0, 0);
        for (k, v) in &mut d.headers {
            if k == HEADER_ATTEMPT {
                *v = Some(b"many".to_vec());
            }
            if k == "courier-error-kind" {
                *v = Some(b"weird".to_vec());
            }
        }
        let e = DlqEntry::from_delivery(&d);
        assert_eq!(e.attempts, None);
        assert_eq!(e.error_kind, None);
        assert_eq!(e.kind_label(), UNKNOWN);
        assert_eq!(e.malformed.len(), 2);
        let bare = DlqEntry::from_delivery(&Delivery {
            headers: vec![],
            ..source("x")
        });
        assert_eq!(bare.id, None);
        assert_eq!(bare.age_ms(NOW), None);
        assert_eq!(bare.original_label(), "(unknown)/?@?");
    }

    #[test]
    fn bad_flag_values_name_the_flag_and_what_is_accepted() {
        let err = DlqFilter::parse(&args(&["fatal", "oops"], None, &[]), NOW).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--error-kind=oops: expected retryable, fatal or exhausted"
        );
        let err = DlqFilter::parse(&args(&[], Some("yesterday"), &[]), NOW).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("--since=yesterday: expected a duration"),
            "{err}"
        );
        assert!(err.to_string().contains("RFC 3339"));
        let err = DlqFilter::parse(&args(&[], None, &[""]), NOW).unwrap_err();
        assert_eq!(err.to_string(), "--id=: expected a non-empty message id");
    }

    #[test]
    fn since_accepts_durations_and_timestamps() {
        let f = DlqFilter::parse(&args(&[], Some("1h"), &[]), NOW).unwrap();
        assert_eq!(f.since_ms(), Some(NOW - 3_600_000));
        let f = DlqFilter::parse(&args(&[], Some(" 1m30s "), &[]), NOW).unwrap();
        assert_eq!(f.since_ms(), Some(NOW - 90_000));
        let f = DlqFilter::parse(&args(&[], Some("2023-11-14T22:13:20Z"), &[]), NOW).unwrap();
        assert_eq!(f.since_ms(), Some(1_700_000_000_000));
        let f = DlqFilter::parse(&args(&[], Some("2023-11-14T23:13:20+01:00"), &[]), NOW).unwrap();
        assert_eq!(f.since_ms(), Some(1_700_000_000_000));
    }

    #[test]
    fn filter_criteria_all_hold_alternatives_within_one() {
        let fatal_new = DlqEntry::from_delivery(&dead("a", ErrorKind::Fatal, NOW - 1_000, 0, 0));
        let exh_old =
            DlqEntry::from_delivery(&dead("b", ErrorKind::Exhausted, NOW - 7_200_000, 0, 1));
        let no_time = DlqEntry::from_delivery(&Delivery {
            headers: vec![("message-id".into(), Some(b"c".to_vec()))],
            ..source("c")
        });
        let all = DlqFilter::default();
        assert!(all.matches(&fatal_new) && all.matches(&exh_old) && all.matches(&no_time));
        let kinds = DlqFilter::parse(&args(&["FATAL", "exhausted"], None, &[]), NOW).unwrap();
        assert!(kinds.matches(&fatal_new) && kinds.matches(&exh_old) && !kinds.matches(&no_time));
        let since = DlqFilter::parse(&args(&[], Some("1h"), &[]), NOW).unwrap();
        assert!(since.matches(&fatal_new) && !since.matches(&exh_old) && !since.matches(&no_time));
        let ids = DlqFilter::parse(&args(&[], None, &["b", "c"]), NOW).unwrap();
        assert!(!ids.matches(&fatal_new) && ids.matches(&exh_old) && ids.matches(&no_time));
        let both = DlqFilter::parse(&args(&["fatal"], None, &["b"]), NOW).unwrap();
        assert!(!both.matches(&fatal_new) && !both.matches(&exh_old));
    }

    #[test]
    fn replay_needs_all_or_a_filter_not_both() {
        let none = Selection::parse(false, &FilterArgs::default(), NOW).unwrap_err();
        assert_eq!(none, SelectionError::NothingChosen);
        assert!(
            none.to_string().contains("needs --all, or a filter"),
            "{none}"
        );
        let both = Selection::parse(true, &args(&["fatal"], None, &[]), NOW).unwrap_err();
        assert_eq!(both, SelectionError::AllWithFilter);
        assert_eq!(
            Selection::parse(true, &FilterArgs::default(), NOW).unwrap(),
            Selection::All
        );
        assert!(Selection::parse(false, &args(&["nope"], None, &[]), NOW).is_err());
    }

    #[test]
    fn fingerprint_is_stable_and_order_insensitive() {
        let a = args(&["fatal", "exhausted"], Some("1h"), &["x", "y"]);
        let b = args(&["Exhausted", "fatal", "fatal"], Some("1h "), &["y", "x"]);
        assert_eq!(
            selection_fingerprint(false, &a),
            selection_fingerprint(false, &b)
        );
        assert_ne!(
            selection_fingerprint(false, &a),
            selection_fingerprint(false, &args(&["fatal"], Some("1h"), &["x", "y"]))
        );
        assert_ne!(
            selection_fingerprint(true, &FilterArgs::default()),
            selection_fingerprint(false, &FilterArgs::default())
        );
        // Pinned: a change here silently restarts every interrupted replay.
        assert_eq!(
            selection_fingerprint(true, &FilterArgs::default()),
            "e6f09b19"
        );
        let g = replay_group("orders", true, &FilterArgs::default());
        assert_eq!(g, "orders-dlq-replay-e6f09b19");
    }

    #[test]
    fn replay_record_keeps_user_bytes_and_resets_courier_headers() {
        let d = dead("a", ErrorKind::Fatal, NOW, 0, 3);
        let r = replay_record(&d, NOW + 1).unwrap();
        let orig = source("a");
        assert_eq!(r.topic, "events");
        assert_eq!(r.partition, None);
        assert_eq!(r.key, orig.key);
        assert_eq!(r.payload, orig.payload);
        let mut want = orig.headers.clone();
        want.push((
            HEADER_REPLAYED_AT_MS.into(),
            Some(b"1700000000001".to_vec()),
        ));
        assert_eq!(r.headers, want);
        let mut no_topic = d.clone();
        no_topic.headers.retain(|(k, _)| k != HEADER_ORIGINAL_TOPIC);
        assert_eq!(replay_record(&no_topic, NOW), Err(Unreplayable));
        // An earlier replay's marker is replaced, never appended.
        let mut again = d;
        again
            .headers
            .push((HEADER_REPLAYED_AT_MS.into(), Some(b"5".to_vec())));
        let r = replay_record(&again, NOW).unwrap();
        let marks: Vec<_> = r
            .headers
            .iter()
            .filter(|(k, _)| k == HEADER_REPLAYED_AT_MS)
            .collect();
        assert_eq!(marks.len(), 1);
    }

    #[test]
    fn ages_are_compact() {
        assert_eq!(format_age(-5), "0s");
        assert_eq!(format_age(45_900), "45s");
        assert_eq!(format_age(750_000), "12m30s");
        assert_eq!(format_age(3 * 3_600_000 + 5 * 60_000), "3h05m");
        assert_eq!(format_age(2 * 86_400_000 + 4 * 3_600_000), "2d04h");
    }

    #[test]
    fn pacer_spaces_publishes_without_bursts() {
        let t0 = Instant::now();
        let mut p = Pacer::new(Some(4.0));
        assert_eq!(p.next_delay(t0), Duration::ZERO);
        assert_eq!(p.next_delay(t0), Duration::from_millis(250));
        assert_eq!(
            p.next_delay(t0 + Duration::from_millis(600)),
            Duration::ZERO
        );
        assert_eq!(
            p.next_delay(t0 + Duration::from_millis(600)),
            Duration::from_millis(150)
        );
        let mut unlimited = Pacer::new(None);
        assert_eq!(unlimited.next_delay(t0), Duration::ZERO);
        assert_eq!(unlimited.next_delay(t0), Duration::ZERO);
    }

    async fn feed(events: Vec<ReadEvent>) -> mpsc::Receiver<ReadEvent> {
        let (tx, rx) = mpsc::channel(events.len().max(1));
        for e in events {
            tx.send(e).await.unwrap();
        }
        rx
    }

    fn dlq_fixture() -> Vec<ReadEvent> {
        let mut no_topic = dead("n", ErrorKind::Fatal, NOW - 1_000, 1, 0);
        no_topic.headers.retain(|(k, _)| k != HEADER_ORIGINAL_TOPIC);
        vec![
            ReadEvent::Message(dead("a", ErrorKind::Fatal, NOW - 1_000, 0, 0)),
            ReadEvent::Message(dead("b", ErrorKind::Exhausted, NOW - 1_000, 0, 1)),
            ReadEvent::Message(no_topic),
            ReadEvent::Message(dead("c", ErrorKind::Fatal, NOW - 1_000, 1, 1)),
            ReadEvent::Message(dead("d", ErrorKind::Exhausted, NOW - 1_000, 0, 2)),
            ReadEvent::End,
        ]
    }

    #[tokio::test]
    async fn inspect_counts_everything_and_lists_the_first_n_in_dlq_order() {
        let mut rx = feed(dlq_fixture()).await;
        let filter = DlqFilter::parse(&args(&["fatal"], None, &[]), NOW).unwrap();
        let r = collect_inspect(&mut rx, "events-dlq", &filter, Some(2), NOW)
            .await
            .unwrap();
        let listed: Vec<_> = r.entries.iter().map(|e| e.id.clone().unwrap()).collect();
        assert_eq!(
            listed,
            vec!["a", "n"],
            "partition 0 first, then partition 1"
        );
        assert_eq!(r.summary.scanned, 5);
        assert_eq!(r.summary.matched, 3);
        assert_eq!(r.summary.by_error_kind["fatal"], 3);
        assert_eq!(r.summary.by_original_topic["events"], 2);
        assert_eq!(r.summary.by_original_topic[UNKNOWN], 1);
        let json = r.to_json();
        assert_eq!(json["summary"]["listed"], 2);
        assert_eq!(json["summary"]["matched"], 3);
        let mut cut = feed(vec![ReadEvent::Message(dead(
            "a",
            ErrorKind::Fatal,
            NOW,
            0,
            0,
        ))])
        .await;
        let err = collect_inspect(&mut cut, "t", &DlqFilter::default(), None, NOW).await;
        assert!(err.is_err(), "a reader that stops without End is an error");
    }

    type Commits = Arc<Mutex<Vec<Vec<(i32, i64)>>>>;

    fn progress(commits: &Commits, fail: bool) -> MockProgressStore {
        let mut p = MockProgressStore::new();
        let c = commits.clone();
        p.expect_commit().returning(move |o| {
            c.lock().unwrap().push(o);
            if fail {
                Err("coordinator gone".into())
            } else {
                Ok(())
            }
        });
        p
    }

    fn publisher(
        published: &Arc<Mutex<Vec<OutgoingRecord>>>,
        fail_on: Option<&'static str>,
    ) -> MockPublisher {
        let mut m = MockPublisher::new();
        let p = published.clone();
        m.expect_publish().returning(move |r| {
            let id = r.headers[0].1.clone().unwrap();
            if fail_on.is_some_and(|f| f.as_bytes() == id.as_slice()) {
                return Err(PublishError {
                    kind: PublishFailure::Timeout,
                    message: "timed out".into(),
                });
            }
            p.lock().unwrap().push(r);
            Ok(Ack {
                partition: 0,
                offset: 9,
            })
        });
        m
    }

    fn plan(kinds: &[&str]) -> ReplayPlan {
        ReplayPlan {
            selection: Selection::parse(kinds.is_empty(), &args(kinds, None, &[]), NOW).unwrap(),
            rate: None,
        }
    }

    #[tokio::test]
    async fn replay_publishes_selected_and_commits_after_each_ack() {
        let published = Arc::new(Mutex::new(Vec::new()));
        let commits: Commits = Arc::default();
        let (pb, pr) = (publisher(&published, None), progress(&commits, false));
        let target = ReplayTarget {
            publisher: &pb,
            progress: &pr,
        };
        let mut rx = feed(dlq_fixture()).await;
        let mut report = ReplayReport::default();
        let mut seen = Vec::new();
        replay_loop(
            &mut rx,
            &plan(&["fatal"]),
            Some(target),
            &CancellationToken::new(),
            &mut report,
            |ev| {
                seen.push(
                    format!("{ev:?}")
                        .split_whitespace()
                        .next()
                        .unwrap()
                        .to_owned(),
                )
            },
        )
        .await
        .unwrap();
        let ids: Vec<_> = published
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.headers[0].1.clone().unwrap())
            .collect();
        assert_eq!(ids, vec![b"a".to_vec(), b"c".to_vec()]);
        assert_eq!(
            *commits.lock().unwrap(),
            vec![vec![(0, 1)], vec![(0, 2), (1, 2)], vec![(0, 3)]],
            "past a, then past b (skipped), n (unreplayable) and c, then past d at the end"
        );
        assert_eq!(
            (
                report.scanned,
                report.replayed,
                report.skipped,
                report.unreplayable
            ),
            (5, 2, 2, 1)
        );
        assert_eq!(report.per_topic["events"], 2);
        assert!(!report.dry_run && !report.interrupted);
        assert_eq!(seen, vec!["Replayed", "Unreplayable", "Replayed"]);
    }

    #[tokio::test]
    async fn dry_run_publishes_and_commits_nothing() {
        let mut rx = feed(dlq_fixture()).await;
        let mut report = ReplayReport::default();
        let mut would = 0;
        replay_loop(
            &mut rx,
            &plan(&[]),
            None,
            &CancellationToken::new(),
            &mut report,
            |ev| {
                if matches!(ev, ReplayEvent::WouldReplay { .. }) {
                    would += 1;
                }
            },
        )
        .await
        .unwrap();
        assert!(report.dry_run);
        assert_eq!((report.replayed, report.unreplayable, would), (4, 1, 4));
    }

    #[tokio::test]
    async fn a_failed_publish_commits_only_what_came_before() {
        let published = Arc::new(Mutex::new(Vec::new()));
        let commits: Commits = Arc::default();
        let (pb, pr) = (publisher(&published, Some("c")), progress(&commits, false));
        let target = ReplayTarget {
            publisher: &pb,
            progress: &pr,
        };
        let mut rx = feed(dlq_fixture()).await;
        let mut report = ReplayReport::default();
        let err = replay_loop(
            &mut rx,
            &plan(&["fatal"]),
            Some(target),
            &CancellationToken::new(),
            &mut report,
            |_| {},
        )
        .await
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("publishing DLQ message 1@1 to events failed"),
            "{err}"
        );
        assert_eq!(
            *commits.lock().unwrap(),
            vec![vec![(0, 1)], vec![(0, 2), (1, 1)]]
        );
        assert_eq!(report.replayed, 1);
    }

    #[tokio::test]
    async fn a_failed_commit_names_the_published_message() {
        let published = Arc::new(Mutex::new(Vec::new()));
        let commits: Commits = Arc::default();
        let (pb, pr) = (publisher(&published, None), progress(&commits, true));
        let target = ReplayTarget {
            publisher: &pb,
            progress: &pr,
        };
        let mut rx = feed(dlq_fixture()).await;
        let mut report = ReplayReport::default();
        let err = replay_loop(
            &mut rx,
            &plan(&["fatal"]),
            Some(target),
            &CancellationToken::new(),
            &mut report,
            |_| {},
        )
        .await
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("coordinator gone")
                && msg.contains("0@0 (a) was published but not recorded"),
            "{msg}"
        );
        assert_eq!(
            published.lock().unwrap().len(),
            1,
            "stops at the first failed commit"
        );
    }

    #[tokio::test]
    async fn cancelling_stops_between_messages_and_cuts_the_rate_wait_short() {
        let published = Arc::new(Mutex::new(Vec::new()));
        let commits: Commits = Arc::default();
        let (pb, pr) = (publisher(&published, None), progress(&commits, false));
        let target = ReplayTarget {
            publisher: &pb,
            progress: &pr,
        };
        let mut rx = feed(dlq_fixture()).await;
        let mut report = ReplayReport::default();
        let token = CancellationToken::new();
        let cancel = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            cancel.cancel();
        });
        // At 0.5/s the second publish is due after 2 s: cancelling at 0.2 s ends the wait.
        let plan = ReplayPlan {
            rate: Some(0.5),
            ..plan(&[])
        };
        let started = Instant::now();
        replay_loop(&mut rx, &plan, Some(target), &token, &mut report, |_| {})
            .await
            .unwrap();
        assert!(started.elapsed() < Duration::from_millis(1900));
        assert!(report.interrupted);
        assert!(report.replayed <= 1);
        assert_eq!(published.lock().unwrap().len() as u64, report.replayed);
        if report.replayed == 1 {
            assert_eq!(*commits.lock().unwrap(), vec![vec![(0, 1)]]);
        }
    }
}
