//! The ingest event envelope (DESIGN.md, "Event envelope"): validated once at ingest, and
//! published as JSON with its `id` in the `message-id` header.
//!
//! A structured-mode CloudEvent (an object with `specversion`) is accepted as an envelope
//! too: `specversion` must be `1.0` and `id`, `source` and `type` are required (CloudEvents
//! 1.0, "Required Attributes"); its key is the `partitionkey` extension (the Kafka protocol
//! binding's), else `key`, else its `id`. It is published unchanged with the header
//! `content-type: application/cloudevents+json`.

use serde_json::{Map, Value};

mod fast;
pub use fast::events_to_batch;

use super::{
    OutgoingRecord, RecordBatch, CLOUDEVENTS_CONTENT_TYPE, HEADER_CONTENT_TYPE, HEADER_MESSAGE_ID,
};

/// Why an ingest envelope was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// The event is not a JSON object.
    #[error("an event must be a JSON object")]
    NotAnObject,
    /// `type` is missing.
    #[error("field `type` is required")]
    MissingType,
    /// A CloudEvent lacks a required attribute (`id`, `source` or `type`).
    #[error("CloudEvent attribute `{0}` is required")]
    MissingAttribute(&'static str),
    /// A field has the wrong JSON type or an invalid value.
    #[error("field `{field}` {problem}")]
    InvalidField {
        /// Field name.
        field: &'static str,
        /// What is wrong with it.
        problem: &'static str,
    },
}

/// Longest accepted `id`, `type` or `key`, in bytes.
pub const MAX_ENVELOPE_FIELD_BYTES: usize = 256;

/// A validated ingest event: the published JSON value and where it goes.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// The event id (`message-id` header).
    pub id: String,
    /// The event type.
    pub event_type: String,
    /// The partition key (its `key`, else its id).
    pub key: String,
    /// Explicit partition, if the event named one.
    pub partition: Option<i32>,
    /// The full envelope object as published (with `id` filled in).
    pub body: Map<String, Value>,
    /// Whether it is a structured-mode CloudEvent (published with its content type).
    pub cloudevent: bool,
}

impl Envelope {
    /// Validates one event of an ingest request. Fills in a UUIDv7 `id` when absent.
    ///
    /// # Errors
    /// [`EnvelopeError`] naming the field that is missing or wrong.
    pub fn from_value(value: Value) -> Result<Self, EnvelopeError> {
        let Value::Object(mut body) = value else {
            return Err(EnvelopeError::NotAnObject);
        };
        let checked = check(&body)?;
        let event_type = checked.event_type.to_owned();
        let given_key = checked.key.map(str::to_owned);
        let (partition, cloudevent) = (checked.partition, checked.cloudevent);
        let id = match checked.id {
            Some(id) => id.to_owned(),
            None => {
                let id = new_id();
                body.insert("id".into(), Value::String(id.clone()));
                id
            }
        };
        // An empty key is a key: it is kept, not replaced by the id.
        let key = given_key.unwrap_or_else(|| id.clone());
        Ok(Envelope {
            id,
            event_type,
            key,
            partition,
            body,
            cloudevent,
        })
    }

    /// Adds the record that publishes this event to `batch`: the same key, value and headers
    /// as [`Envelope::to_record`], written into the batch's buffer.
    pub fn push_to(&self, batch: &mut RecordBatch) {
        batch.push(Some(self.key.as_bytes()), &self.id, self.partition, |buf| {
            self.write_json(buf)
        });
        if self.cloudevent {
            batch.push_header(HEADER_CONTENT_TYPE, CLOUDEVENTS_CONTENT_TYPE.as_bytes());
        }
    }

    /// Appends the published value, the envelope as JSON, to `buf`.
    pub fn write_json(&self, buf: &mut Vec<u8>) {
        let start = buf.len();
        // Serializing a Map of Values into a Vec cannot fail; were it to, nothing is kept.
        if serde_json::to_writer(&mut *buf, &self.body).is_err() {
            buf.truncate(start);
        }
    }

    /// The record that publishes this event to `topic`.
    pub fn to_record(&self, topic: &str) -> OutgoingRecord {
        OutgoingRecord {
            topic: topic.to_owned(),
            partition: self.partition,
            key: Some(self.key.clone().into_bytes()),
            // Serializing a Map of Values cannot fail.
            payload: Some(serde_json::to_vec(&self.body).unwrap_or_default()),
            headers: if self.cloudevent {
                vec![
                    (HEADER_MESSAGE_ID.into(), Some(self.id.clone().into_bytes())),
                    (
                        HEADER_CONTENT_TYPE.into(),
                        Some(CLOUDEVENTS_CONTENT_TYPE.as_bytes().to_vec()),
                    ),
                ]
            } else {
                vec![(HEADER_MESSAGE_ID.into(), Some(self.id.clone().into_bytes()))]
            },
        }
    }
}

/// A new event id: a UUIDv7, lower-case and hyphenated.
fn new_id() -> String {
    let mut text = uuid::Uuid::encode_buffer();
    new_id_in(&mut text).to_owned()
}

/// A new event id as [`new_id`] gives it, written into `text` (no allocation).
fn new_id_in(text: &mut [u8]) -> &str {
    uuid::Uuid::now_v7().hyphenated().encode_lower(text)
}

/// Where validation reads an envelope's top-level fields: its JSON object, or the fields
/// the one-pass parser ([`fast`]) kept. Both paths validate with the same code.
pub(super) trait Fields {
    /// Top-level field `name`, if present (a JSON `null` is present).
    fn get(&self, name: &str) -> Option<Field<'_>>;
}

/// A top-level field's value as validation sees it: what it needs of a JSON value, borrowed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Field<'a> {
    Null,
    Str(&'a str),
    Num(&'a serde_json::Number),
    /// A boolean, an array or an object.
    Other,
}

impl<'a> Field<'a> {
    fn of(value: &'a Value) -> Self {
        match value {
            Value::Null => Field::Null,
            Value::String(s) => Field::Str(s),
            Value::Number(n) => Field::Num(n),
            Value::Bool(_) | Value::Array(_) | Value::Object(_) => Field::Other,
        }
    }
}

impl Fields for Map<String, Value> {
    fn get(&self, name: &str) -> Option<Field<'_>> {
        Map::get(self, name).map(Field::of)
    }
}

/// What validating an envelope found.
pub(super) struct Checked<'a> {
    event_type: &'a str,
    /// The given id; `None` when absent or null (one is generated). Always set for a
    /// CloudEvent.
    id: Option<&'a str>,
    /// The given key (`partitionkey` first for a CloudEvent); `None`: the id is the key.
    key: Option<&'a str>,
    partition: Option<i32>,
    cloudevent: bool,
}

/// Validates an envelope's fields: a structured-mode CloudEvent when it has `specversion`,
/// else a plain envelope (see the module documentation).
fn check(body: &impl Fields) -> Result<Checked<'_>, EnvelopeError> {
    if body.get("specversion").is_some() {
        return check_cloudevent(body);
    }
    let event_type = short_string(body, "type", false)?.ok_or(EnvelopeError::MissingType)?;
    let id = short_string(body, "id", false)?;
    let key = short_string(body, "key", true)?;
    if matches!(body.get("source"), Some(Field::Num(_) | Field::Other)) {
        return Err(invalid("source", "must be a string"));
    }
    for field in ["time", "timestamp"] {
        check_time(body, field)?;
    }
    let partition = partition(body)?;
    Ok(Checked {
        event_type,
        id,
        key,
        partition,
        cloudevent: false,
    })
}

/// Validates a structured-mode CloudEvent (see the module documentation).
fn check_cloudevent(body: &impl Fields) -> Result<Checked<'_>, EnvelopeError> {
    if body.get("specversion") != Some(Field::Str("1.0")) {
        return Err(invalid("specversion", "must be \"1.0\""));
    }
    let required = |name: &'static str| -> Result<&str, EnvelopeError> {
        short_string(body, name, false)?.ok_or(EnvelopeError::MissingAttribute(name))
    };
    let id = required("id")?;
    let event_type = required("type")?;
    if matches!(body.get("source"), None | Some(Field::Null)) {
        return Err(EnvelopeError::MissingAttribute("source"));
    }
    match body.get("source") {
        Some(Field::Str(s)) if !s.is_empty() => {}
        Some(Field::Str(_)) => return Err(invalid("source", "is empty")),
        _ => return Err(invalid("source", "must be a string")),
    }
    check_time(body, "time")?;
    let key = match short_string(body, "partitionkey", true)? {
        Some(k) => Some(k),
        None => short_string(body, "key", true)?,
    };
    let partition = partition(body)?;
    Ok(Checked {
        event_type,
        id: Some(id),
        key,
        partition,
        cloudevent: true,
    })
}

/// The string `field` of an envelope, at most [`MAX_ENVELOPE_FIELD_BYTES`] long (and not
/// empty unless `empty_ok`); `None` when absent or null.
fn short_string<'a>(
    body: &'a impl Fields,
    field: &'static str,
    empty_ok: bool,
) -> Result<Option<&'a str>, EnvelopeError> {
    match body.get(field) {
        None | Some(Field::Null) => Ok(None),
        Some(Field::Str(s)) if s.is_empty() && !empty_ok => Err(invalid(field, "is empty")),
        Some(Field::Str(s)) if s.len() > MAX_ENVELOPE_FIELD_BYTES => {
            Err(invalid(field, "is longer than 256 bytes"))
        }
        Some(Field::Str(s)) => Ok(Some(s)),
        Some(_) => Err(invalid(field, "must be a string")),
    }
}

/// `field` (`time` or `timestamp`), when present, is an RFC 3339 date-time string.
fn check_time(body: &impl Fields, field: &'static str) -> Result<(), EnvelopeError> {
    match body.get(field) {
        None | Some(Field::Null) => Ok(()),
        Some(Field::Str(s)) => {
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .map(drop)
                .map_err(|_| invalid(field, "must be an RFC 3339 date-time"))
        }
        Some(_) => Err(invalid(field, "must be an RFC 3339 date-time string")),
    }
}

/// The explicit `partition` of an envelope, a non-negative `i32`, if it names one.
fn partition(body: &impl Fields) -> Result<Option<i32>, EnvelopeError> {
    let refused = || invalid("partition", "must be a non-negative integer");
    match body.get("partition") {
        None | Some(Field::Null) => Ok(None),
        Some(Field::Num(n)) => match n.as_i64() {
            Some(p) if (0..=i64::from(i32::MAX)).contains(&p) => Ok(Some(p as i32)),
            _ => Err(refused()),
        },
        Some(_) => Err(refused()),
    }
}

pub(super) fn invalid(field: &'static str, problem: &'static str) -> EnvelopeError {
    EnvelopeError::InvalidField { field, problem }
}
