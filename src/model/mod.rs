//! The event envelope, every header name, and the owned message types that cross the
//! transport/service boundary. Nothing here knows about rdkafka.

use std::fmt;

mod batch;
mod envelope;
mod inline;
pub mod trace;

pub use batch::{RecordBatch, RecordRef};
pub use envelope::{events_to_batch, Envelope, EnvelopeError, MAX_ENVELOPE_FIELD_BYTES};
pub use inline::InlineBytes;
pub use trace::{TraceContext, TraceParent, HEADER_TRACEPARENT, HEADER_TRACESTATE};

/// The dedupe key, written by the producer and kept on every hop.
pub const HEADER_MESSAGE_ID: &str = "message-id";
/// Failed attempts so far (1 on the first retry).
pub const HEADER_ATTEMPT: &str = "courier-attempt";
/// Epoch milliseconds before which a retry message must not be processed.
pub const HEADER_DUE_AT_MS: &str = "courier-due-at-ms";
/// Topic where the message was first consumed.
pub const HEADER_ORIGINAL_TOPIC: &str = "courier-original-topic";
/// Partition where the message was first consumed.
pub const HEADER_ORIGINAL_PARTITION: &str = "courier-original-partition";
/// Offset where the message was first consumed.
pub const HEADER_ORIGINAL_OFFSET: &str = "courier-original-offset";
/// Kafka timestamp of the message where it was first consumed.
pub const HEADER_ORIGINAL_TIMESTAMP_MS: &str = "courier-original-timestamp-ms";
/// The consumer group whose retry chain this message belongs to.
pub const HEADER_CONSUMER_GROUP: &str = "courier-consumer-group";
/// `retryable`, `fatal` or `exhausted`.
pub const HEADER_ERROR_KIND: &str = "courier-error-kind";
/// The last error, UTF-8, at most [`MAX_ERROR_MESSAGE_BYTES`].
pub const HEADER_ERROR_MESSAGE: &str = "courier-error-message";
/// Epoch milliseconds of the last failure.
pub const HEADER_FAILED_AT_MS: &str = "courier-failed-at-ms";
/// Set by `courier dlq replay`: dedupe lets a replayed message through once.
pub const HEADER_REPLAYED_AT_MS: &str = "courier-replayed-at-ms";
/// The media type of a record's value; set to [`CLOUDEVENTS_CONTENT_TYPE`] on records
/// ingested as structured-mode CloudEvents (the Kafka protocol binding's header name).
pub const HEADER_CONTENT_TYPE: &str = "content-type";
/// The media type of a structured-mode CloudEvent.
pub const CLOUDEVENTS_CONTENT_TYPE: &str = "application/cloudevents+json";
/// A binary-mode CloudEvent's `id` (Kafka protocol binding): the dedupe key of a record
/// that has no `message-id`.
pub const HEADER_CE_ID: &str = "ce_id";

/// Every header courier owns starts with this prefix; they are replaced on each hop.
pub const COURIER_HEADER_PREFIX: &str = "courier-";
/// The longest error message written to `courier-error-message`.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 512;
/// A courier header value longer than this is treated as malformed (absent).
pub const MAX_COURIER_HEADER_BYTES: usize = 1024;

/// A header name as it came from the broker: the Kafka protocol allows any bytes, so it is
/// kept byte for byte (a name that is not UTF-8 is forwarded unchanged, never a crash).
///
/// A name of up to 30 bytes (every header courier reads or writes, and most others) is
/// held inline, without an allocation of its own (see [`InlineBytes`]). Equality, order
/// and hashing are those of the bytes.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HeaderKey(InlineBytes<INLINE_NAME>);

/// The longest name held inline.
const INLINE_NAME: usize = 30;

impl HeaderKey {
    /// The name's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// The name as text, if it is UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(self.as_bytes()).ok()
    }

    /// Whether the name starts with `prefix`.
    pub fn starts_with(&self, prefix: &str) -> bool {
        self.as_bytes().starts_with(prefix.as_bytes())
    }
}

impl fmt::Debug for HeaderKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for HeaderKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(self.as_bytes()))
    }
}

impl From<&str> for HeaderKey {
    fn from(s: &str) -> Self {
        HeaderKey::from(s.as_bytes())
    }
}

impl From<String> for HeaderKey {
    fn from(s: String) -> Self {
        HeaderKey::from(s.into_bytes())
    }
}

impl From<&[u8]> for HeaderKey {
    fn from(b: &[u8]) -> Self {
        HeaderKey(InlineBytes::from(b))
    }
}

impl From<Vec<u8>> for HeaderKey {
    fn from(b: Vec<u8>) -> Self {
        HeaderKey(InlineBytes::from(b))
    }
}

impl PartialEq<str> for HeaderKey {
    fn eq(&self, other: &str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl PartialEq<&str> for HeaderKey {
    fn eq(&self, other: &&str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

/// Kafka message headers in their original order. A value may be null (`None`).
pub type Headers = Vec<(HeaderKey, Option<Vec<u8>>)>;

/// One Kafka message, owned, as the service layer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Topic it was read from.
    pub topic: String,
    /// Partition it was read from.
    pub partition: i32,
    /// Offset within the partition.
    pub offset: i64,
    /// Message key, byte for byte.
    pub key: Option<Vec<u8>>,
    /// Message value, byte for byte.
    pub payload: Option<Vec<u8>>,
    /// All headers, user and courier, in order.
    pub headers: Headers,
    /// Kafka timestamp (create or log-append time), epoch milliseconds.
    pub timestamp_ms: Option<i64>,
}

impl Delivery {
    /// The first value of header `name`, if present and non-null.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        header_value(&self.headers, name)
    }

    /// The first value of the header whose name is exactly these bytes.
    pub fn header_raw(&self, name: &[u8]) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k.as_bytes() == name)
            .and_then(|(_, v)| v.as_deref())
    }

    /// The dedupe key: the `message-id` header as UTF-8 text, if present, non-empty and
    /// valid; else a binary-mode CloudEvent's `ce_id` header, likewise.
    pub fn message_id(&self) -> Option<&str> {
        let text = |name| {
            self.header(name)
                .and_then(|v| std::str::from_utf8(v).ok())
                .filter(|s| !s.is_empty())
        };
        text(HEADER_MESSAGE_ID).or_else(|| text(HEADER_CE_ID))
    }

    /// The trace id of its `traceparent` header (32 hex digits, borrowed), if valid.
    pub fn trace_id(&self) -> Option<&str> {
        trace::trace_id_of(&self.headers)
    }

    /// Its `courier-replayed-at-ms` header alone, as [`CourierHeaders::parse`] reads it (a
    /// malformed value is absent), without parsing the other courier headers: dedupe looks
    /// at it for every message.
    pub fn replayed_at_ms(&self) -> Option<i64> {
        let raw = self.header(HEADER_REPLAYED_AT_MS)?;
        if raw.len() > 32 {
            return None;
        }
        std::str::from_utf8(raw)
            .ok()?
            .trim()
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
    }

    /// The courier headers of this message, parsed leniently.
    pub fn courier_headers(&self) -> CourierHeaders {
        CourierHeaders::parse(&self.headers)
    }

    /// What the message holds in memory, roughly: key, payload, header names and values.
    /// The in-flight byte bound (`KAFKA_CONSUMER_MAX_IN_FLIGHT_BYTES`) counts this.
    pub fn size_bytes(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_bytes().len() + v.as_ref().map_or(0, Vec::len))
            .sum();
        self.key.as_ref().map_or(0, Vec::len) + self.payload.as_ref().map_or(0, Vec::len) + headers
    }
}

/// The first value of header `name` in `headers`, if present and non-null.
pub fn header_value<'a>(headers: &'a Headers, name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| v.as_deref())
}

/// A record to publish: what the service layer hands to a [`crate::service::Publisher`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingRecord {
    /// Destination topic.
    pub topic: String,
    /// Explicit partition; `None` lets the partitioner choose by key.
    pub partition: Option<i32>,
    /// Message key.
    pub key: Option<Vec<u8>>,
    /// Message value.
    pub payload: Option<Vec<u8>>,
    /// Headers, in order.
    pub headers: Headers,
}

/// Where the broker stored a published record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Partition the record landed in.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
}

/// Why a message failed, as written to `courier-error-kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Failed, will be retried.
    Retryable,
    /// Failed permanently; sent to the DLQ at once.
    Fatal,
    /// Failed on every retry level; sent to the DLQ.
    Exhausted,
}

impl ErrorKind {
    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Retryable => "retryable",
            ErrorKind::Fatal => "fatal",
            ErrorKind::Exhausted => "exhausted",
        }
    }

    /// Parses a header value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "retryable" => Some(ErrorKind::Retryable),
            "fatal" => Some(ErrorKind::Fatal),
            "exhausted" => Some(ErrorKind::Exhausted),
            _ => None,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a message's handling ended: the vocabulary of the pipeline, its summary and its
/// metrics (`courier_messages_processed_total{outcome}`), mapped to labels in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Processed successfully.
    Ok,
    /// Published to the retry topic of this level.
    Retried(u32),
    /// Published to the DLQ.
    DeadLettered,
    /// A duplicate `message-id`: skipped.
    Duplicate,
    /// A retry message of another consumer group: skipped.
    Skipped,
    /// Not finished: shutdown or a revoke cut it short, or it was never started. Its offset
    /// stays uncommitted, so it is consumed again (after a restart, or by the next owner).
    Abandoned,
}

impl Outcome {
    /// The outcomes that finish a message, in label order.
    pub const FINISHED: [Outcome; 5] = [
        Outcome::Ok,
        Outcome::Retried(1),
        Outcome::DeadLettered,
        Outcome::Duplicate,
        Outcome::Skipped,
    ];

    /// The `outcome` label of `courier_messages_processed_total`.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Retried(_) => "retry",
            Outcome::DeadLettered => "dlq",
            Outcome::Duplicate => "duplicate",
            Outcome::Skipped => "skipped",
            Outcome::Abandoned => "abandoned",
        }
    }

    /// Its place in [`Outcome::FINISHED`]; `None` for an unfinished message.
    pub fn finished_index(self) -> Option<usize> {
        match self {
            Outcome::Ok => Some(0),
            Outcome::Retried(_) => Some(1),
            Outcome::DeadLettered => Some(2),
            Outcome::Duplicate => Some(3),
            Outcome::Skipped => Some(4),
            Outcome::Abandoned => None,
        }
    }
}

/// courier's headers of one message. A malformed value (not UTF-8, not a number, too long)
/// is treated as absent and its name listed in `malformed`, never an error.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CourierHeaders {
    /// `courier-attempt`.
    pub attempt: Option<u32>,
    /// `courier-due-at-ms`.
    pub due_at_ms: Option<i64>,
    /// `courier-original-topic`.
    pub original_topic: Option<String>,
    /// `courier-original-partition`.
    pub original_partition: Option<i32>,
    /// `courier-original-offset`.
    pub original_offset: Option<i64>,
    /// `courier-original-timestamp-ms`.
    pub original_timestamp_ms: Option<i64>,
    /// `courier-consumer-group`.
    pub consumer_group: Option<String>,
    /// `courier-error-kind`.
    pub error_kind: Option<ErrorKind>,
    /// `courier-error-message`.
    pub error_message: Option<String>,
    /// `courier-failed-at-ms`.
    pub failed_at_ms: Option<i64>,
    /// `courier-replayed-at-ms`.
    pub replayed_at_ms: Option<i64>,
    /// Names of courier headers whose values were present but malformed.
    pub malformed: Vec<&'static str>,
}

impl CourierHeaders {
    /// Parses the courier headers out of `headers`, leniently.
    pub fn parse(headers: &Headers) -> Self {
        let mut out = CourierHeaders::default();
        let mut text = |name: &'static str, max: usize| -> Option<String> {
            let raw = header_value(headers, name)?;
            match std::str::from_utf8(raw) {
                Ok(s) if raw.len() <= max => Some(s.to_owned()),
                _ => {
                    out.malformed.push(name);
                    None
                }
            }
        };
        let attempt = text(HEADER_ATTEMPT, 32);
        let due = text(HEADER_DUE_AT_MS, 32);
        let otopic = text(HEADER_ORIGINAL_TOPIC, 255);
        let opart = text(HEADER_ORIGINAL_PARTITION, 32);
        let ooff = text(HEADER_ORIGINAL_OFFSET, 32);
        let ots = text(HEADER_ORIGINAL_TIMESTAMP_MS, 32);
        let group = text(HEADER_CONSUMER_GROUP, 255);
        let kind = text(HEADER_ERROR_KIND, 32);
        let emsg = text(HEADER_ERROR_MESSAGE, MAX_COURIER_HEADER_BYTES);
        let failed = text(HEADER_FAILED_AT_MS, 32);
        let replayed = text(HEADER_REPLAYED_AT_MS, 32);
        let mut num = |name: &'static str, v: Option<String>| -> Option<i64> {
            let v = v?;
            match v.trim().parse::<i64>() {
                Ok(n) if n >= 0 => Some(n),
                _ => {
                    out.malformed.push(name);
                    None
                }
            }
        };
        out.attempt = num(HEADER_ATTEMPT, attempt).and_then(|n| u32::try_from(n).ok());
        out.due_at_ms = num(HEADER_DUE_AT_MS, due);
        out.original_partition =
            num(HEADER_ORIGINAL_PARTITION, opart).and_then(|n| i32::try_from(n).ok());
        out.original_offset = num(HEADER_ORIGINAL_OFFSET, ooff);
        out.original_timestamp_ms = num(HEADER_ORIGINAL_TIMESTAMP_MS, ots);
        out.failed_at_ms = num(HEADER_FAILED_AT_MS, failed);
        out.replayed_at_ms = num(HEADER_REPLAYED_AT_MS, replayed);
        out.original_topic = otopic.filter(|s| !s.is_empty());
        out.consumer_group = group.filter(|s| !s.is_empty());
        out.error_message = emsg;
        out.error_kind = match kind {
            Some(k) => {
                let parsed = ErrorKind::parse(&k);
                if parsed.is_none() {
                    out.malformed.push(HEADER_ERROR_KIND);
                }
                parsed
            }
            None => None,
        };
        out
    }
}

/// What a failed message's next hop (retry topic or DLQ) carries in courier headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureHop<'a> {
    /// Destination topic (a retry topic or the DLQ).
    pub topic: &'a str,
    /// Failed attempts so far, including this one.
    pub attempt: u32,
    /// Due time for a retry hop; `None` on the DLQ.
    pub due_at_ms: Option<i64>,
    /// The consumer group whose chain this is.
    pub group: &'a str,
    /// Why it failed.
    pub kind: ErrorKind,
    /// The error text (truncated to [`MAX_ERROR_MESSAGE_BYTES`]).
    pub message: &'a str,
    /// When it failed, epoch milliseconds.
    pub failed_at_ms: i64,
}

/// Builds the record that carries `delivery` to its next hop: the original key, payload and
/// user headers byte for byte, courier's headers replaced (never appended). The
/// `courier-original-*` headers are kept from an earlier hop, or set from `delivery` at
/// the first failure; `courier-replayed-at-ms` is kept.
pub fn failure_record(delivery: &Delivery, hop: &FailureHop<'_>) -> OutgoingRecord {
    let old = delivery.courier_headers();
    let mut headers: Headers = delivery
        .headers
        .iter()
        .filter(|(k, _)| !k.starts_with(COURIER_HEADER_PREFIX))
        .cloned()
        .collect();
    let mut put = |k: &str, v: String| headers.push((k.into(), Some(v.into_bytes())));
    put(HEADER_ATTEMPT, hop.attempt.to_string());
    if let Some(due) = hop.due_at_ms {
        put(HEADER_DUE_AT_MS, due.to_string());
    }
    // The original position is a unit: keep it only when the earlier hop recorded it whole.
    let original = match (
        old.original_topic.clone(),
        old.original_partition,
        old.original_offset,
    ) {
        (Some(t), Some(p), Some(o)) => (t, p, o, old.original_timestamp_ms),
        _ => (
            delivery.topic.clone(),
            delivery.partition,
            delivery.offset,
            delivery.timestamp_ms,
        ),
    };
    put(HEADER_ORIGINAL_TOPIC, original.0);
    put(HEADER_ORIGINAL_PARTITION, original.1.to_string());
    put(HEADER_ORIGINAL_OFFSET, original.2.to_string());
    if let Some(ts) = original.3 {
        put(HEADER_ORIGINAL_TIMESTAMP_MS, ts.to_string());
    }
    put(HEADER_CONSUMER_GROUP, hop.group.to_owned());
    put(HEADER_ERROR_KIND, hop.kind.as_str().to_owned());
    put(
        HEADER_ERROR_MESSAGE,
        truncate_utf8(hop.message, MAX_ERROR_MESSAGE_BYTES).to_owned(),
    );
    put(HEADER_FAILED_AT_MS, hop.failed_at_ms.to_string());
    if let Some(r) = old.replayed_at_ms {
        put(HEADER_REPLAYED_AT_MS, r.to_string());
    }
    OutgoingRecord {
        topic: hop.topic.to_owned(),
        partition: None,
        key: delivery.key.clone(),
        payload: delivery.payload.clone(),
        headers,
    }
}

/// The longest prefix of `s` that is at most `max` bytes and ends on a char boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Epoch milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::envelope::invalid;
    use super::*;
    use serde_json::json;

    fn delivery(headers: Headers) -> Delivery {
        Delivery {
            topic: "events".into(),
            partition: 2,
            offset: 41,
            key: Some(b"k\xff".to_vec()),
            payload: Some(b"\x00payload".to_vec()),
            headers,
            timestamp_ms: Some(1_700_000_000_000),
        }
    }

    fn h(k: &str, v: &str) -> (HeaderKey, Option<Vec<u8>>) {
        (k.into(), Some(v.as_bytes().to_vec()))
    }

    #[test]
    fn envelope_fills_id_and_defaults_key_to_id() {
        let env = Envelope::from_value(json!({"type": "order_created", "data": {"a": 1}})).unwrap();
        assert_eq!(env.key, env.id);
        assert_eq!(uuid::Uuid::parse_str(&env.id).unwrap().get_version_num(), 7);
        assert_eq!(env.body["id"], json!(env.id));
        let rec = env.to_record("events");
        assert_eq!(rec.headers, vec![h(HEADER_MESSAGE_ID, &env.id)]);
        assert_eq!(rec.key.as_deref(), Some(env.id.as_bytes()));
    }

    #[test]
    fn envelope_keeps_given_id_key_partition() {
        let env = Envelope::from_value(
            json!({"id": "a1", "type": "t", "key": "cust-7", "partition": 3, "timestamp": "2024-01-02T03:04:05Z"}),
        )
        .unwrap();
        assert_eq!(
            (env.id.as_str(), env.key.as_str(), env.partition),
            ("a1", "cust-7", Some(3))
        );
    }

    #[test]
    fn envelope_rejects_bad_fields() {
        let cases = [
            (json!([1]), EnvelopeError::NotAnObject),
            (json!({"id": "x"}), EnvelopeError::MissingType),
            (json!({"type": 5}), invalid("type", "must be a string")),
            (json!({"type": ""}), invalid("type", "is empty")),
            (
                json!({"type": "t", "id": 5}),
                invalid("id", "must be a string"),
            ),
            (
                json!({"type": "t", "key": []}),
                invalid("key", "must be a string"),
            ),
            (
                json!({"type": "t", "time": "yesterday"}),
                invalid("time", "must be an RFC 3339 date-time"),
            ),
            (
                json!({"type": "t", "partition": -1}),
                invalid("partition", "must be a non-negative integer"),
            ),
            (
                json!({"type": "t", "source": 1}),
                invalid("source", "must be a string"),
            ),
        ];
        for (value, want) in cases {
            assert_eq!(
                Envelope::from_value(value.clone()).unwrap_err(),
                want,
                "{value}"
            );
        }
    }

    #[test]
    fn a_structured_cloudevent_is_an_envelope_with_its_content_type() {
        let ce = json!({
            "specversion": "1.0", "id": "ce-1", "type": "com.example.order", "source": "/orders",
            "time": "2024-01-02T03:04:05Z", "partitionkey": "cust-9", "data": {"n": 1}
        });
        let env = Envelope::from_value(ce.clone()).unwrap();
        assert!(env.cloudevent);
        assert_eq!((env.id.as_str(), env.key.as_str()), ("ce-1", "cust-9"));
        assert_eq!(env.event_type, "com.example.order");
        let rec = env.to_record("events");
        assert_eq!(
            rec.headers,
            vec![
                h(HEADER_MESSAGE_ID, "ce-1"),
                h(HEADER_CONTENT_TYPE, CLOUDEVENTS_CONTENT_TYPE)
            ]
        );
        let published: serde_json::Value = serde_json::from_slice(&rec.payload.unwrap()).unwrap();
        assert_eq!(published, ce, "published unchanged");
        let plain = Envelope::from_value(json!({"type": "t"})).unwrap();
        assert!(!plain
            .to_record("e")
            .headers
            .iter()
            .any(|(k, _)| k == HEADER_CONTENT_TYPE));
    }

    #[test]
    fn a_cloudevent_needs_version_1_0_and_its_required_attributes() {
        let base = json!({"specversion": "1.0", "id": "i", "type": "t", "source": "/s"});
        let with = |k: &str, v: serde_json::Value| {
            let mut o = base.clone();
            if v.is_null() {
                o.as_object_mut().unwrap().remove(k);
            } else {
                o[k] = v;
            }
            o
        };
        let cases = [
            (
                with("specversion", json!("0.3")),
                invalid("specversion", "must be \"1.0\""),
            ),
            (
                with("specversion", json!(1.0)),
                invalid("specversion", "must be \"1.0\""),
            ),
            (
                with("id", json!(null)),
                EnvelopeError::MissingAttribute("id"),
            ),
            (
                with("type", json!(null)),
                EnvelopeError::MissingAttribute("type"),
            ),
            (
                with("source", json!(null)),
                EnvelopeError::MissingAttribute("source"),
            ),
            (with("source", json!("")), invalid("source", "is empty")),
            (with("id", json!("")), invalid("id", "is empty")),
            (
                with("time", json!("noon")),
                invalid("time", "must be an RFC 3339 date-time"),
            ),
        ];
        for (value, want) in cases {
            assert_eq!(
                Envelope::from_value(value.clone()).unwrap_err(),
                want,
                "{value}"
            );
        }
        assert!(Envelope::from_value(base).is_ok());
    }

    #[test]
    fn courier_headers_malformed_values_are_absent() {
        let d = delivery(vec![
            h(HEADER_ATTEMPT, "two"),
            h(HEADER_DUE_AT_MS, "253402300799000"),
            (HEADER_CONSUMER_GROUP.into(), Some(vec![0xff, 0xfe])),
            h(HEADER_ERROR_KIND, "weird"),
            h(HEADER_ORIGINAL_OFFSET, "-4"),
        ]);
        let c = d.courier_headers();
        assert_eq!(c.attempt, None);
        assert_eq!(c.due_at_ms, Some(253_402_300_799_000));
        assert_eq!(c.consumer_group, None);
        assert_eq!(c.error_kind, None);
        assert_eq!(c.original_offset, None);
        assert_eq!(c.malformed.len(), 4, "{:?}", c.malformed);
    }

    #[test]
    fn failure_record_keeps_user_data_and_replaces_courier_headers() {
        let d = delivery(vec![
            h("traceparent", "00-abc"),
            h(HEADER_MESSAGE_ID, "m1"),
            h(HEADER_ATTEMPT, "1"),
            h(HEADER_ORIGINAL_TOPIC, "orders"),
            h(HEADER_ORIGINAL_PARTITION, "7"),
            h(HEADER_ORIGINAL_OFFSET, "99"),
            h("courier-unknown", "x"),
            ("null-header".into(), None),
        ]);
        let long = "é".repeat(400);
        let rec = failure_record(
            &d,
            &FailureHop {
                topic: "events-retry-2",
                attempt: 2,
                due_at_ms: Some(5000),
                group: "g",
                kind: ErrorKind::Retryable,
                message: &long,
                failed_at_ms: 4000,
            },
        );
        assert_eq!(rec.key, d.key);
        assert_eq!(rec.payload, d.payload);
        assert_eq!(
            &rec.headers[..3],
            &[
                h("traceparent", "00-abc"),
                h(HEADER_MESSAGE_ID, "m1"),
                ("null-header".into(), None)
            ]
        );
        let ch = CourierHeaders::parse(&rec.headers);
        assert_eq!(ch.attempt, Some(2));
        assert_eq!(ch.due_at_ms, Some(5000));
        assert_eq!(ch.original_topic.as_deref(), Some("orders"));
        assert_eq!(ch.original_partition, Some(7));
        assert_eq!(ch.original_offset, Some(99));
        assert_eq!(ch.consumer_group.as_deref(), Some("g"));
        assert!(ch.error_message.unwrap().len() <= MAX_ERROR_MESSAGE_BYTES);
        let attempts = rec
            .headers
            .iter()
            .filter(|(k, _)| k == HEADER_ATTEMPT)
            .count();
        assert_eq!(attempts, 1, "courier headers are replaced, not appended");
        assert!(!rec.headers.iter().any(|(k, _)| k == "courier-unknown"));
    }

    #[test]
    fn failure_record_sets_original_position_on_first_failure() {
        let d = delivery(vec![h(HEADER_MESSAGE_ID, "m1")]);
        let rec = failure_record(
            &d,
            &FailureHop {
                topic: "events-dlq",
                attempt: 1,
                due_at_ms: None,
                group: "g",
                kind: ErrorKind::Fatal,
                message: "bad",
                failed_at_ms: 1,
            },
        );
        let ch = CourierHeaders::parse(&rec.headers);
        assert_eq!(ch.original_topic.as_deref(), Some("events"));
        assert_eq!(
            (ch.original_partition, ch.original_offset),
            (Some(2), Some(41))
        );
        assert_eq!(ch.original_timestamp_ms, Some(1_700_000_000_000));
        assert_eq!(ch.due_at_ms, None);
        assert_eq!(ch.error_kind, Some(ErrorKind::Fatal));
    }

    #[test]
    fn trace_context_survives_retry_and_dlq_hops_byte_for_byte() {
        let parent = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_vec();
        let state = b"congo=t61rcWkgMzE".to_vec();
        let mut d = delivery(vec![
            (HEADER_TRACEPARENT.into(), Some(parent.clone())),
            (HEADER_TRACESTATE.into(), Some(state.clone())),
            h(HEADER_MESSAGE_ID, "m1"),
        ]);
        for (topic, kind) in [
            ("events-retry-1", ErrorKind::Retryable),
            ("events-retry-2", ErrorKind::Retryable),
            ("events-dlq", ErrorKind::Exhausted),
        ] {
            let hop = FailureHop {
                topic,
                attempt: 1,
                due_at_ms: None,
                group: "g",
                kind,
                message: "failed",
                failed_at_ms: 1,
            };
            let rec = failure_record(&d, &hop);
            assert_eq!(
                header_value(&rec.headers, HEADER_TRACEPARENT),
                Some(&parent[..])
            );
            assert_eq!(
                header_value(&rec.headers, HEADER_TRACESTATE),
                Some(&state[..])
            );
            d = Delivery {
                topic: rec.topic,
                headers: rec.headers,
                ..d
            };
        }
        assert_eq!(d.trace_id(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
    }

    #[test]
    fn header_keys_compare_hash_and_order_by_their_bytes_inline_or_not() {
        use std::collections::hash_map::DefaultHasher;
        use std::hash::{Hash, Hasher};
        let hash = |k: &HeaderKey| {
            let mut h = DefaultHasher::new();
            k.hash(&mut h);
            h.finish()
        };
        let long = "x".repeat(INLINE_NAME + 1);
        for name in ["", "message-id", &"y".repeat(INLINE_NAME), &long] {
            let from_str = HeaderKey::from(name);
            let from_vec = HeaderKey::from(name.as_bytes().to_vec());
            assert_eq!(from_str, from_vec);
            assert_eq!(from_str.as_bytes(), name.as_bytes());
            assert_eq!(hash(&from_str), hash(&from_vec));
            assert_eq!(from_str, name);
            assert_eq!(from_str.to_string(), name);
        }
        let (a, ab) = (HeaderKey::from("a"), HeaderKey::from("ab"));
        assert!(a < ab);
        let (long_key, x) = (HeaderKey::from(long.as_str()), HeaderKey::from("x"));
        assert!(long_key > x);
        assert_eq!(HeaderKey::default().as_bytes(), b"");
        assert_eq!(HeaderKey::from(b"k\xff".as_slice()).as_str(), None);
        assert!(HeaderKey::from(long.as_str()).starts_with("xx"));
    }

    #[test]
    fn replayed_at_ms_reads_that_header_as_the_full_parse_does() {
        for value in ["1700", " 1700 ", "-1", "x", "", &"9".repeat(33)] {
            let d = delivery(vec![h(HEADER_REPLAYED_AT_MS, value)]);
            assert_eq!(
                d.replayed_at_ms(),
                d.courier_headers().replayed_at_ms,
                "{value:?}"
            );
        }
        let d = delivery(vec![(HEADER_REPLAYED_AT_MS.into(), Some(vec![0xff]))]);
        assert_eq!(d.replayed_at_ms(), None);
        assert_eq!(delivery(vec![]).replayed_at_ms(), None);
        assert_eq!(
            delivery(vec![h(HEADER_REPLAYED_AT_MS, "42")]).replayed_at_ms(),
            Some(42)
        );
    }

    #[test]
    fn message_id_falls_back_to_a_binary_cloudevent_id() {
        assert_eq!(
            delivery(vec![h(HEADER_CE_ID, "ce-1")]).message_id(),
            Some("ce-1")
        );
        let both = delivery(vec![h(HEADER_CE_ID, "ce-1"), h(HEADER_MESSAGE_ID, "m-1")]);
        assert_eq!(both.message_id(), Some("m-1"), "message-id wins");
        let empty = delivery(vec![h(HEADER_MESSAGE_ID, ""), h(HEADER_CE_ID, "ce-2")]);
        assert_eq!(empty.message_id(), Some("ce-2"));
        assert_eq!(delivery(vec![h(HEADER_CE_ID, "")]).message_id(), None);
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate_utf8("aé", 2), "a");
        assert_eq!(truncate_utf8("abc", 5), "abc");
    }
}
