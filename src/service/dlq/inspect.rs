//! `courier dlq inspect`: every message of the snapshot counted, the matching ones listed.

use std::collections::BTreeMap;

use tokio::sync::mpsc;

use super::{closed_early, DlqEntry, DlqFilter, ReadEvent, ReadFailed, UNKNOWN};

/// Counts of what an inspect saw: all DLQ messages read, and the matching ones by error
/// kind and by original topic (a `--limit` shortens the listing, never these counts).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DlqCounts {
    /// Messages read from the DLQ.
    pub scanned: u64,
    /// Messages that matched the filter.
    pub matched: u64,
    /// Matching messages per error kind.
    pub by_error_kind: BTreeMap<String, u64>,
    /// Matching messages per original topic.
    pub by_original_topic: BTreeMap<String, u64>,
}

impl DlqCounts {
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
    pub summary: DlqCounts,
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
    let mut summary = DlqCounts::default();
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
