//! Ingest answers: an error is a status with a JSON body `{"error": ..., "details": ...}`
//! (503s carry `Retry-After: 1`); a published batch answers with one result per event.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::model::{Ack, RecordBatch};
use crate::service::ingest::{BatchError, BatchOutcome};
use crate::service::PublishError;

/// An error answer: status and a JSON body `{"error": ..., "details": ...}`.
#[derive(Debug)]
pub(super) struct ApiError {
    status: StatusCode,
    message: String,
    details: Option<Value>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": self.message});
        if let Some(d) = self.details {
            body["details"] = d;
        }
        let mut resp = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        resp
    }
}

/// An error answer with `status`.
pub(super) fn error(status: StatusCode, message: &str, details: Option<Value>) -> ApiError {
    ApiError {
        status,
        message: message.to_owned(),
        details,
    }
}

/// A 503: the client may retry (`Retry-After: 1`).
pub(super) fn unavailable(message: &str, details: Option<Value>) -> ApiError {
    error(StatusCode::SERVICE_UNAVAILABLE, message, details)
}

impl From<BatchError> for ApiError {
    fn from(e: BatchError) -> Self {
        let message = e.to_string();
        match e {
            BatchError::TooMany { .. } => error(StatusCode::PAYLOAD_TOO_LARGE, &message, None),
            BatchError::Empty | BatchError::NotEvents => {
                error(StatusCode::BAD_REQUEST, &message, None)
            }
            BatchError::Invalid(invalid) => {
                let details = invalid
                    .iter()
                    .map(|i| json!({"index": i.index, "error": i.error.to_string()}))
                    .collect();
                error(
                    StatusCode::BAD_REQUEST,
                    &message,
                    Some(Value::Array(details)),
                )
            }
        }
    }
}

/// The answer to a published batch: 200 with every event's partition and offset, or the
/// status of its [`BatchOutcome`] with one result per event (published or why not).
pub(super) fn batch_answer(batch: &RecordBatch, results: &[Result<Ack, PublishError>]) -> Response {
    let outcome = BatchOutcome::of(results);
    if outcome == BatchOutcome::Published {
        let acks = results.iter().filter_map(|r| r.as_ref().ok());
        return ([(header::CONTENT_TYPE, JSON)], published_json(batch, acks)).into_response();
    }
    let topic = batch.topic();
    let out: Vec<Value> = batch
        .iter()
        .zip(results)
        .map(|(record, res)| {
            let id = record.message_id();
            match res {
                Ok(ack) => json!({"id": id, "topic": topic, "partition": ack.partition, "offset": ack.offset}),
                Err(e) => json!({"id": id, "topic": topic, "error": e.message, "reason": e.kind.label()}),
            }
        })
        .collect();
    let total = out.len();
    let details = Some(Value::Array(out));
    match outcome {
        BatchOutcome::Published => unreachable!("answered above"),
        BatchOutcome::UnknownPartition => error(
            StatusCode::BAD_REQUEST,
            "an event names a partition the topic does not have; see results",
            details,
        )
        .into_response(),
        BatchOutcome::TooLarge => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the broker refused an event as too large; see results",
            details,
        )
        .into_response(),
        BatchOutcome::NotPublished { failed } => unavailable(
            &format!("{failed} of {total} events were not published; see results (events without an error were published)"),
            details,
        )
        .into_response(),
    }
}

/// The content type of every answer.
const JSON: header::HeaderValue = header::HeaderValue::from_static("application/json");

/// `{"results":[{"id":…,"topic":…,"partition":…,"offset":…},…]}` for a batch whose every event
/// was acknowledged: the bytes `serde_json` writes for the same `json!` value, built in one
/// buffer (the topic escaped once).
fn published_json<'a>(batch: &RecordBatch, acks: impl Iterator<Item = &'a Ack>) -> Vec<u8> {
    let mut quoted_topic = Vec::with_capacity(batch.topic().len() + 2);
    write_json_str(&mut quoted_topic, batch.topic());
    let mut out = Vec::with_capacity(16 + batch.len() * (80 + quoted_topic.len()));
    out.extend_from_slice(b"{\"results\":[");
    for (i, (record, ack)) in batch.iter().zip(acks).enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"id\":");
        write_json_str(&mut out, record.message_id());
        out.extend_from_slice(b",\"topic\":");
        out.extend_from_slice(&quoted_topic);
        // Writing a number into a Vec cannot fail.
        out.extend_from_slice(b",\"partition\":");
        let _ = serde_json::to_writer(&mut out, &ack.partition);
        out.extend_from_slice(b",\"offset\":");
        let _ = serde_json::to_writer(&mut out, &ack.offset);
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    out
}

/// Appends `s` as a JSON string, as `serde_json` writes it: copied as it is when it holds
/// no character `serde_json` escapes (`"`, `\`, U+0000 to U+001F), as generated ids never do.
fn write_json_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Serializing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Envelope;

    #[test]
    fn the_published_answer_is_what_serde_json_writes() {
        let envelopes: Vec<Envelope> = [
            "a",
            "quote\"d\u{e9}\n",
            "c",
            "back\\slash",
            "del\u{7f}\u{2028}\t",
        ]
        .iter()
        .map(|id| Envelope::from_value(json!({"type": "t", "id": id})).unwrap())
        .collect();
        let acks = [
            Ack {
                partition: 0,
                offset: 0,
            },
            Ack {
                partition: 11,
                offset: 1234567890123,
            },
            Ack {
                partition: 2,
                offset: -1,
            },
            Ack {
                partition: i32::MAX,
                offset: i64::MAX,
            },
            Ack {
                partition: 0,
                offset: i64::MIN,
            },
        ];
        let topic = "t\"opic";
        let expected: Vec<Value> = envelopes
            .iter()
            .zip(&acks)
            .map(|(env, ack)| json!({"id": env.id, "topic": topic, "partition": ack.partition, "offset": ack.offset}))
            .collect();
        let expected = serde_json::to_vec(&json!({"results": expected})).unwrap();
        let got = published_json(
            &crate::service::ingest::records_of(topic, &envelopes),
            acks.iter(),
        );
        assert_eq!(
            String::from_utf8(got).unwrap(),
            String::from_utf8(expected).unwrap()
        );
    }
}
