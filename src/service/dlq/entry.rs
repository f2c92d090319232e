//! One dead-lettered message as an operator sees it, and the record that replays it.

use crate::model::{
    CourierHeaders, Delivery, ErrorKind, Headers, OutgoingRecord, COURIER_HEADER_PREFIX,
    HEADER_REPLAYED_AT_MS,
};

use super::UNKNOWN;

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
