//! Dead-letter topic operations, free of rdkafka: what a DLQ entry says, the filter that the
//! `courier dlq` flags describe, the replay record, the inspect counts and the replay loop.
//!
//! The transport layer (`transport::dlq`) reads the DLQ up to a snapshot of its high
//! watermarks and feeds [`ReadEvent`]s through a bounded channel; this module decides what
//! each message means and what happens to it, so the decisions are unit-tested without a
//! broker.
//!
//! Replay records its progress with [`ProgressStore::commit`] synchronously after every
//! acknowledged publish (see `app::dlq` for why this and not a transaction, and for the
//! remaining window).
//!
//! Parts: `entry` (what one DLQ message says, and the record that replays it), `filter`
//! (the selection flags), `inspect` (the listing and its counts), `replay` (the loop and
//! its progress) and `pacer` (the replay rate).

mod entry;
mod filter;
mod inspect;
mod pacer;
mod replay;
#[cfg(test)]
mod tests;

use crate::model::Delivery;

pub use entry::{format_age, replay_record, DlqEntry, Unreplayable};
pub use filter::{
    replay_group, selection_fingerprint, DlqFilter, FilterArgs, FilterError, Selection,
    SelectionError,
};
pub use inspect::{collect_inspect, DlqCounts, InspectReport};
pub use pacer::Pacer;
#[cfg(test)]
pub use replay::MockProgressStore;
pub use replay::{
    replay_loop, ProgressError, ProgressStore, ReplayError, ReplayEvent, ReplayPlan, ReplayReport,
    ReplayTarget,
};

/// Label used in summaries for a missing error kind or original topic.
pub const UNKNOWN: &str = "(unknown)";

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

/// The DLQ reader stopped before the end of its snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("reading the DLQ failed: {0}")]
pub struct ReadFailed(pub String);

fn closed_early() -> ReadFailed {
    ReadFailed("the reader stopped before the end of the snapshot".into())
}
