//! `courier dlq inspect|replay`: look at the dead-letter topic, fix the cause, send chosen
//! messages back to their original topic.
//!
//! **inspect** reads the DLQ from the beginning up to the high watermarks snapshotted at the
//! start, assigning the partitions under a throwaway group id that never joins a group and
//! never commits, so looking never changes anything.
//!
//! **replay** reads the DLQ from its own consumer group's committed offsets (default
//! `{KAFKA_CONSUMER_GROUP_ID}-dlq-replay-{hash of the selection flags}`), publishes each
//! selected message to its `courier-original-topic` (key, payload and user headers byte for
//! byte, courier headers dropped, a fresh `courier-replayed-at-ms`), and once the broker
//! acknowledged the publish, synchronously commits the group's offsets past it (and past the
//! unselected messages read before it). A re-run of the same command resumes after the last
//! commit; a different selection uses a different group and starts afresh.
//!
//! **Why not a transaction.** A transactional producer (`send_offsets_to_transaction`)
//! would make publish and commit atomic, but librdkafka's mock cluster, which the dev
//! broker and every test run on, accepts the transactional calls without storing the
//! transaction's offsets or hiding aborted records, so that path could not be tested and
//! would silently lose progress there. **The remaining window:** if the process dies (or
//! the commit fails) after the broker acknowledged a publish and before the commit
//! completed, that one message (at most one: publishes are sequential) is replayed again by
//! the next run. A failed commit stops the run with an error naming the message. The
//! consumer's dedupe does not hide such a second copy, since it carries a newer
//! `courier-replayed-at-ms`. Two replays with the same group must not run at once (the
//! group has no members, so nothing fences them).

use std::io::Write;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::model::now_ms;
use crate::observability::Metrics;
use crate::service::dlq::{
    collect_inspect, format_age, replay_group, replay_loop, DlqEntry, DlqFilter, FilterArgs,
    InspectReport, ReadEvent, ReplayError, ReplayEvent, ReplayPlan, ReplayReport, ReplayTarget,
    Selection,
};
use crate::transport::dlq::{open, ReadMode};
use crate::transport::KafkaPublisher;

/// The selection flags shared by inspect and replay.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct FilterFlags {
    /// Only these error kinds: retryable, fatal or exhausted (repeatable or comma-separated).
    #[arg(long = "error-kind", value_name = "KIND", value_delimiter = ',')]
    pub error_kind: Vec<String>,
    /// Only messages that failed within this duration (e.g. 1h) or since this RFC 3339
    /// timestamp (e.g. 2024-05-01T12:00:00Z).
    #[arg(long, value_name = "DURATION|TIMESTAMP")]
    pub since: Option<String>,
    /// Only the message with this message-id (repeatable).
    #[arg(long = "id", value_name = "ID")]
    pub id: Vec<String>,
}

impl FilterFlags {
    /// The flags as the service layer takes them.
    pub fn args(&self) -> FilterArgs {
        FilterArgs {
            error_kinds: self.error_kind.clone(),
            since: self.since.clone(),
            ids: self.id.clone(),
        }
    }
}

/// `courier dlq` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct DlqArgs {
    /// inspect or replay.
    #[command(subcommand)]
    pub action: DlqAction,
}

impl DlqArgs {
    /// Whether the action stops cleanly on SIGTERM/SIGINT: a replay finishes the message in
    /// hand and commits; an inspect only reads, so a signal ends it at once.
    pub fn stops_on_signals(&self) -> bool {
        matches!(self.action, DlqAction::Replay { .. })
    }
}

/// `courier dlq` actions.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DlqAction {
    /// List dead-lettered messages with a summary (reads only; commits nothing).
    Inspect {
        /// Which messages.
        #[command(flatten)]
        filter: FilterFlags,
        /// List at most N messages (the summary still counts all).
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// One JSON document (entries and summary) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Publish chosen DLQ messages to their original topic again.
    Replay {
        /// Which messages.
        #[command(flatten)]
        filter: FilterFlags,
        /// Replay every message of the DLQ (instead of filters).
        #[arg(long, conflicts_with_all = ["error_kind", "since", "id"])]
        all: bool,
        /// List what would be replayed; publish and commit nothing.
        #[arg(long)]
        dry_run: bool,
        /// At most N messages per second.
        #[arg(long, value_name = "N")]
        rate: Option<f64>,
        /// The progress group (default: {KAFKA_CONSUMER_GROUP_ID}-dlq-replay-{hash of the
        /// selection flags}).
        #[arg(long, value_name = "NAME")]
        group: Option<String>,
    },
}

/// Options of [`inspect`].
#[derive(Debug, Clone, Default)]
pub struct InspectOptions {
    /// Which messages.
    pub filter: FilterFlags,
    /// List at most this many.
    pub limit: Option<usize>,
    /// Print JSON instead of a table.
    pub json: bool,
}

/// Options of [`replay`].
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// Which messages (unless `all`).
    pub filter: FilterFlags,
    /// Every message.
    pub all: bool,
    /// Publish and commit nothing.
    pub dry_run: bool,
    /// At most this many publishes per second.
    pub rate: Option<f64>,
    /// Progress group override.
    pub group: Option<String>,
}

/// `courier dlq inspect|replay`, to stdout; a replay stops cleanly when `shutdown` is
/// cancelled.
///
/// # Errors
/// Bad flags, an unreachable broker, a failed publish or commit, or an interrupted replay
/// (so scripts see it did not finish).
pub async fn run(config: Config, args: DlqArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match args.action {
        DlqAction::Inspect {
            filter,
            limit,
            json,
        } => {
            let opts = InspectOptions {
                filter,
                limit,
                json,
            };
            inspect(&config, &opts, &mut out).await?;
        }
        DlqAction::Replay {
            filter,
            all,
            dry_run,
            rate,
            group,
        } => {
            let opts = ReplayOptions {
                filter,
                all,
                dry_run,
                rate,
                group,
            };
            let report = replay(&config, &opts, shutdown, &mut out).await?;
            if report.interrupted {
                anyhow::bail!("the replay was interrupted; run the same command again to resume");
            }
        }
    }
    Ok(())
}

/// `courier dlq inspect`: lists the matching DLQ messages and a summary to `out`, reading
/// without joining a group or committing anything.
///
/// # Errors
/// A bad filter flag, a missing DLQ topic, an unreachable broker, or a write error.
pub async fn inspect(
    config: &Config,
    opts: &InspectOptions,
    out: &mut impl Write,
) -> anyhow::Result<InspectReport> {
    let now = now_ms();
    let filter = DlqFilter::parse(&opts.filter.args(), now)?;
    let topic = config.retry.dlq_topic.clone();
    let (reader, mut events) = open(config, ReadMode::Snapshot).await?;
    let collected = collect_inspect(&mut events, &topic, &filter, opts.limit, now).await;
    drop(events);
    reader.close().await;
    let report = collected?;
    if opts.json {
        serde_json::to_writer_pretty(&mut *out, &report.to_json())?;
        writeln!(out)?;
    } else {
        write_inspect(out, &report)?;
    }
    Ok(report)
}

fn write_inspect(out: &mut impl Write, report: &InspectReport) -> std::io::Result<()> {
    write_table(out, &report.entries, report.now_ms)?;
    let s = &report.summary;
    writeln!(
        out,
        "\n{} of {} messages in {} match; {} listed.",
        s.matched,
        s.scanned,
        report.topic,
        report.entries.len()
    )?;
    let counts = |m: &std::collections::BTreeMap<String, u64>| {
        m.iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    writeln!(out, "by error kind: {}", counts(&s.by_error_kind))?;
    writeln!(out, "by original topic: {}", counts(&s.by_original_topic))
}

const TABLE_HEAD: [&str; 6] = ["ID", "ORIGINAL", "ATTEMPTS", "KIND", "AGE", "ERROR"];

/// The table cells of one entry: id, original position, attempts, kind, age, error.
fn cells(e: &DlqEntry, now: i64) -> [String; 6] {
    [
        e.id.clone().unwrap_or_else(|| "-".into()),
        e.original_label(),
        e.attempts.map_or_else(|| "-".into(), |a| a.to_string()),
        e.kind_label().to_owned(),
        e.age_ms(now).map_or_else(|| "-".into(), format_age),
        e.error_message
            .clone()
            .unwrap_or_default()
            .replace('\n', " "),
    ]
}

/// One table line; the last column (the error) is not padded.
fn table_line(cells: [&str; 6], width: &[usize; 6]) -> String {
    let mut s = String::new();
    for (c, w) in cells.iter().zip(width).take(5) {
        s.push_str(&format!("{c:<w$}  "));
    }
    s.push_str(cells[5]);
    s
}

/// Writes entries as a table whose columns fit the widest cell.
fn write_table(out: &mut impl Write, entries: &[DlqEntry], now: i64) -> std::io::Result<()> {
    let rows: Vec<[String; 6]> = entries.iter().map(|e| cells(e, now)).collect();
    let mut width = TABLE_HEAD.map(str::len);
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    writeln!(out, "{}", table_line(TABLE_HEAD, &width))?;
    for r in &rows {
        writeln!(
            out,
            "{}",
            table_line(r.each_ref().map(String::as_str), &width)
        )?;
    }
    Ok(())
}

/// Column widths of a streamed table (a dry run lists as it reads, so memory stays flat
/// however large the DLQ); a longer cell just shifts its line.
const STREAM_WIDTH: [usize; 6] = [36, 32, 8, 9, 7, 0];

/// `courier dlq replay`: publishes the selected DLQ messages to their original topics (see
/// the module documentation for progress and its guarantee) and prints a report to `out`.
/// A dry run lists what would be replayed. Cancelling `shutdown` stops between messages.
///
/// # Errors
/// Neither `--all` nor a filter, a bad flag, an unreachable broker, a failed publish or
/// commit (what was done before is recorded; re-running resumes).
pub async fn replay(
    config: &Config,
    opts: &ReplayOptions,
    shutdown: CancellationToken,
    out: &mut impl Write,
) -> anyhow::Result<ReplayReport> {
    let (plan, group) = replay_plan(config, opts)?;
    let topic = config.retry.dlq_topic.clone();
    let (reader, mut events) = open(config, ReadMode::Group(group.clone())).await?;
    let start = if reader.resumed() {
        "resuming from its committed offsets"
    } else {
        "starting from the beginning"
    };
    let mode = if opts.dry_run {
        "Dry run of replaying"
    } else {
        "Replaying"
    };
    writeln!(out, "{mode} {topic} with progress group {group}, {start}.")?;
    tracing::info!(topic = %topic, group = %group, dry_run = opts.dry_run, "The DLQ replay starts.");
    let mut report = ReplayReport::default();
    let result = if opts.dry_run {
        dry_run(&mut events, &plan, &shutdown, &mut report, out).await?
    } else {
        let publisher = KafkaPublisher::new(config, Metrics::default())
            .context("creating the replay producer")?;
        let progress = reader.progress(&topic);
        let target = ReplayTarget {
            publisher: &publisher,
            progress: &progress,
        };
        let (sd, rep) = (&shutdown, &mut report);
        replay_loop(&mut events, &plan, Some(target), sd, rep, log_event).await
    };
    drop(events);
    reader.close().await;
    write_replay_report(out, &report)?;
    result?;
    Ok(report)
}

/// Validates the replay flags and picks the progress group.
fn replay_plan(config: &Config, opts: &ReplayOptions) -> anyhow::Result<(ReplayPlan, String)> {
    let args = opts.filter.args();
    let selection = Selection::parse(opts.all, &args, now_ms())?;
    if let Some(r) = opts.rate {
        if !(r > 0.0 && r.is_finite()) {
            anyhow::bail!("--rate={r}: expected a positive number of messages per second");
        }
    }
    let group = opts
        .group
        .clone()
        .unwrap_or_else(|| replay_group(&config.consumer.group_id, opts.all, &args));
    if group == config.consumer.group_id || group.trim().is_empty() {
        anyhow::bail!(
            "--group={group}: expected a group of its own, not KAFKA_CONSUMER_GROUP_ID (the service's group)"
        );
    }
    let plan = ReplayPlan {
        selection,
        rate: opts.rate,
    };
    Ok((plan, group))
}

/// A dry run: lists each message that would be replayed as it is read.
/// The outer error is a failed write to `out`; the inner one is the loop's.
async fn dry_run(
    events: &mut tokio::sync::mpsc::Receiver<ReadEvent>,
    plan: &ReplayPlan,
    shutdown: &CancellationToken,
    report: &mut ReplayReport,
    out: &mut impl Write,
) -> std::io::Result<Result<(), ReplayError>> {
    writeln!(out, "{}", table_line(TABLE_HEAD, &STREAM_WIDTH))?;
    let now = now_ms();
    let mut write_err = None;
    let r = replay_loop(events, plan, None, shutdown, report, |ev| {
        if let ReplayEvent::WouldReplay { entry, .. } = ev {
            let c = cells(entry, now);
            let line = table_line(c.each_ref().map(String::as_str), &STREAM_WIDTH);
            if let Err(e) = writeln!(out, "{line}") {
                write_err.get_or_insert(e);
            }
        }
    })
    .await;
    match write_err {
        Some(e) => Err(e),
        None => Ok(r),
    }
}

fn log_event(ev: ReplayEvent<'_>) {
    match ev {
        ReplayEvent::Replayed { entry, topic, ack } => tracing::info!(
            message_id = entry.id.as_deref().unwrap_or(""),
            dlq_partition = entry.dlq_partition,
            dlq_offset = entry.dlq_offset,
            topic,
            partition = ack.partition,
            offset = ack.offset,
            "Replayed a dead-lettered message to its original topic."
        ),
        ReplayEvent::Unreplayable { entry } => tracing::warn!(
            message_id = entry.id.as_deref().unwrap_or(""),
            dlq_partition = entry.dlq_partition,
            dlq_offset = entry.dlq_offset,
            "A selected DLQ message has no courier-original-topic header and was not replayed."
        ),
        ReplayEvent::WouldReplay { .. } => {}
    }
}

fn write_replay_report(out: &mut impl Write, r: &ReplayReport) -> std::io::Result<()> {
    let verb = if r.dry_run {
        "would replay"
    } else {
        "replayed"
    };
    writeln!(out, "\n{verb}: {}", r.replayed)?;
    writeln!(out, "skipped (not matching): {}", r.skipped)?;
    writeln!(
        out,
        "unreplayable (no courier-original-topic): {}",
        r.unreplayable
    )?;
    for (topic, n) in &r.per_topic {
        writeln!(out, "  to {topic}: {n}")?;
    }
    if r.interrupted {
        writeln!(
            out,
            "Interrupted before the end of the DLQ; run the same command again to resume."
        )?;
    }
    Ok(())
}
