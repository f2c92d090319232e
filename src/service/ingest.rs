//! The producer's ingest logic, free of HTTP: a batch of events is validated as a whole
//! before anything is published, published with every acknowledgement awaited, and its
//! failures classified by what the client can do about them. The ledger of what was
//! published is the producer's shutdown summary. `api` is the HTTP adapter over this.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::Value;

use crate::model::{Ack, Envelope, EnvelopeError, RecordBatch, TraceContext};
use crate::service::publish::{PublishError, PublishFailure, Publisher};

/// What was published per topic and partition, and what failed by reason: the producer's
/// shutdown summary. Kept per topic, so that recording a result allocates nothing once its
/// topic and partition were seen.
#[derive(Debug, Default)]
pub struct Ledger {
    published: Mutex<BTreeMap<String, BTreeMap<i32, u64>>>,
    failed: Mutex<BTreeMap<String, BTreeMap<&'static str, u64>>>,
}

impl Ledger {
    /// Records one publish result.
    pub fn record(&self, topic: &str, result: &Result<Ack, PublishError>) {
        self.record_all(topic, std::slice::from_ref(result));
    }

    /// Records the results of publishes to `topic`, under one lock.
    pub fn record_all(&self, topic: &str, results: &[Result<Ack, PublishError>]) {
        let mut published = self.published.lock();
        let per_partition = entry(&mut published, topic);
        let mut failures = 0;
        for r in results {
            match r {
                Ok(ack) => *per_partition.entry(ack.partition).or_default() += 1,
                Err(_) => failures += 1,
            }
        }
        drop(published);
        if failures > 0 {
            let mut failed = self.failed.lock();
            let per_reason = entry(&mut failed, topic);
            for e in results.iter().filter_map(|r| r.as_ref().err()) {
                *per_reason.entry(e.kind.label()).or_default() += 1;
            }
        }
    }

    /// Published counts by (topic, partition).
    pub fn published(&self) -> BTreeMap<(String, i32), u64> {
        flatten(&self.published.lock())
    }

    /// Failure counts by (topic, reason).
    pub fn failed(&self) -> BTreeMap<(String, &'static str), u64> {
        flatten(&self.failed.lock())
    }

    /// Total published.
    pub fn total_published(&self) -> u64 {
        self.published
            .lock()
            .values()
            .flat_map(|p| p.values())
            .sum()
    }

    /// Logs the summary, one line per topic and partition and per failure reason.
    pub fn log_summary(&self) {
        for ((topic, partition), n) in self.published() {
            tracing::info!(
                topic,
                partition,
                published = n,
                "Published to this partition."
            );
        }
        for ((topic, reason), n) in self.failed() {
            tracing::warn!(
                topic,
                reason,
                failed = n,
                "Publishes failed for this reason."
            );
        }
        tracing::info!(published = self.total_published(), "Producer summary.");
    }
}

/// The counts of `topic` in `map`, created empty when it has none (the topic is copied only
/// then).
fn entry<'a, K: Ord>(
    map: &'a mut BTreeMap<String, BTreeMap<K, u64>>,
    topic: &str,
) -> &'a mut BTreeMap<K, u64> {
    if !map.contains_key(topic) {
        map.insert(topic.to_owned(), BTreeMap::new());
    }
    map.get_mut(topic).expect("inserted above")
}

/// `map` keyed by (topic, inner key).
fn flatten<K: Ord + Copy>(map: &BTreeMap<String, BTreeMap<K, u64>>) -> BTreeMap<(String, K), u64> {
    map.iter()
        .flat_map(|(topic, inner)| inner.iter().map(|(k, n)| ((topic.clone(), *k), *n)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// One event of a batch that failed validation: its index in the batch and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidEvent {
    /// Position in the batch (0 for a single event object).
    pub index: usize,
    /// What is wrong with it.
    pub error: EnvelopeError,
}

/// Why a batch was refused before anything was published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// An empty array.
    #[error("the batch is empty")]
    Empty,
    /// More events than one request may carry.
    #[error("a batch holds at most {max} events (HTTP_MAX_BATCH_EVENTS); this one has {len}")]
    TooMany {
        /// The limit.
        max: usize,
        /// Events in this batch.
        len: usize,
    },
    /// Neither an event object nor an array.
    #[error("the body must be an event object or an array of events")]
    NotEvents,
    /// At least one event is invalid (every one of them is listed, never only the first).
    #[error("invalid event: {}; nothing was published", first_error(.0))]
    Invalid(Vec<InvalidEvent>),
}

fn first_error(invalid: &[InvalidEvent]) -> String {
    invalid
        .first()
        .map_or_else(|| "invalid event".to_owned(), |e| e.error.to_string())
}

/// Validates a request's JSON: one event object or a non-empty array of at most
/// `max_events`, every event a valid envelope (a missing `id` is filled in).
///
/// # Errors
/// [`BatchError`]; with [`BatchError::Invalid`], every invalid event with its index.
pub fn validate_batch(value: Value, max_events: usize) -> Result<Vec<Envelope>, BatchError> {
    let items = match value {
        Value::Array(items) if items.is_empty() => return Err(BatchError::Empty),
        Value::Array(items) if items.len() > max_events => {
            return Err(BatchError::TooMany {
                max: max_events,
                len: items.len(),
            })
        }
        Value::Array(items) => items,
        Value::Object(_) => vec![value],
        _ => return Err(BatchError::NotEvents),
    };
    let mut envelopes = Vec::with_capacity(items.len());
    let mut invalid = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        match Envelope::from_value(item) {
            Ok(e) => envelopes.push(e),
            Err(error) => invalid.push(InvalidEvent { index, error }),
        }
    }
    if invalid.is_empty() {
        Ok(envelopes)
    } else {
        Err(BatchError::Invalid(invalid))
    }
}

/// The records that publish `envelopes` to `topic`, in order.
pub fn records_of(topic: &str, envelopes: &[Envelope]) -> RecordBatch {
    let bytes: usize = envelopes
        .iter()
        .map(|e| 128 + e.key.len() + e.id.len())
        .sum();
    let mut batch = RecordBatch::with_capacity(topic, envelopes.len(), bytes);
    for env in envelopes {
        env.push_to(&mut batch);
    }
    batch
}

/// Publishes every envelope to `topic` at once and waits for the acknowledgements, as
/// [`publish_records`] does with [`records_of`] them (the API itself goes through
/// `model::events_to_batch` first, so only the tests start from envelopes).
#[cfg(test)]
pub async fn publish_batch(
    publisher: &Arc<dyn Publisher>,
    topic: &str,
    envelopes: &[Envelope],
    trace: &TraceContext,
    deadline: Duration,
    ledger: &Ledger,
) -> Vec<Result<Ack, PublishError>> {
    let mut batch = records_of(topic, envelopes);
    publish_records(publisher, &mut batch, trace, deadline, ledger).await
}

/// Publishes every record of `batch` at once and waits for the acknowledgements, until
/// `deadline` at most (a [`PublishFailure::Timeout`] for an event not acknowledged by then).
/// Every record carries the request's trace context `trace` as `traceparent`/`tracestate`
/// headers (with the `otel` feature, the context of its own `publish` span, a child of
/// `trace`). Records the results in `ledger` and logs each failure. Results are in the order
/// of the batch.
pub async fn publish_records(
    publisher: &Arc<dyn Publisher>,
    batch: &mut RecordBatch,
    trace: &TraceContext,
    deadline: Duration,
    ledger: &Ledger,
) -> Vec<Result<Ack, PublishError>> {
    // Without the `otel` feature every record carries the request's own context: written
    // once for the whole batch. With it, each record carries its `publish` span's.
    let per_record = cfg!(feature = "otel");
    let spans: Vec<crate::otel::Span> = (0..batch.len())
        .map(|i| {
            let span = crate::otel::publish_span(trace, batch.topic(), batch.get(i).message_id());
            if per_record {
                batch.extend_headers_of(i, span.context_or(trace).headers());
            }
            span
        })
        .collect();
    if !per_record {
        batch.set_common_headers(trace.headers().collect());
    }
    let results: Vec<Result<Ack, PublishError>> = publisher
        .publish_all(batch, Some(deadline))
        .await
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(PublishError {
                    kind: PublishFailure::Timeout,
                    message: format!(
                        "no acknowledgement within {} ms (HTTP_REQUEST_TIMEOUT_MS)",
                        deadline.as_millis()
                    ),
                })
            })
        })
        .collect();
    for (span, res) in spans.into_iter().zip(&results) {
        span.end(res.as_ref().err().map(|e| e.message.as_str()));
    }
    let topic = batch.topic();
    ledger.record_all(topic, &results);
    if results.iter().any(Result::is_err) {
        let trace_id = trace.parent.trace_id_hex();
        for (record, res) in batch.iter().zip(&results) {
            if let Err(e) = res {
                tracing::warn!(message_id = %record.message_id(), trace_id, topic, reason = e.kind.label(), error = %e.message, "An event was not published.");
            }
        }
    }
    results
}

/// What a published batch amounts to for the client, decided by its worst failure: one
/// that retrying cannot fix (the last such one) wins over one that may pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Every event was acknowledged.
    Published,
    /// An event names a partition the topic does not have: the client must change it.
    UnknownPartition,
    /// The broker refused an event as too large: the client must change it.
    TooLarge,
    /// `failed` events were not published (the others were): a retry may succeed, or an
    /// operator must act.
    NotPublished {
        /// How many events failed.
        failed: usize,
    },
}

impl BatchOutcome {
    /// Classifies the results of [`publish_batch`].
    pub fn of(results: &[Result<Ack, PublishError>]) -> Self {
        let mut worst: Option<PublishFailure> = None;
        let mut failed = 0;
        for e in results.iter().filter_map(|r| r.as_ref().err()) {
            failed += 1;
            if worst.is_none() || !e.kind.is_transient() {
                worst = Some(e.kind);
            }
        }
        match worst {
            None => BatchOutcome::Published,
            Some(PublishFailure::UnknownPartition) => BatchOutcome::UnknownPartition,
            Some(PublishFailure::MessageTooLarge) => BatchOutcome::TooLarge,
            Some(_) => BatchOutcome::NotPublished { failed },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn failed(kind: PublishFailure) -> Result<Ack, PublishError> {
        Err(PublishError {
            kind,
            message: kind.label().into(),
        })
    }

    const OK: Result<Ack, PublishError> = Ok(Ack {
        partition: 0,
        offset: 0,
    });

    #[test]
    fn a_batch_is_validated_as_a_whole() {
        assert_eq!(validate_batch(json!([]), 3), Err(BatchError::Empty));
        assert_eq!(validate_batch(json!(42), 3), Err(BatchError::NotEvents));
        let four = json!([{"type": "a"}, {"type": "a"}, {"type": "a"}, {"type": "a"}]);
        assert_eq!(
            validate_batch(four, 3),
            Err(BatchError::TooMany { max: 3, len: 4 })
        );
        assert_eq!(validate_batch(json!({"type": "a"}), 3).unwrap().len(), 1);
        let e = validate_batch(json!([{"type": "a"}, {"type": 1}, {}]), 3).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid event: field `type` must be a string; nothing was published"
        );
        let BatchError::Invalid(invalid) = e else {
            panic!("{e:?}")
        };
        let indexes: Vec<usize> = invalid.iter().map(|i| i.index).collect();
        assert_eq!(indexes, vec![1, 2]);
    }

    #[tokio::test]
    async fn every_record_of_a_batch_carries_the_trace_context() {
        use crate::model::{HEADER_TRACEPARENT, HEADER_TRACESTATE};
        use crate::service::publish::MockPublisher;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut mock = MockPublisher::new();
        let sink = seen.clone();
        mock.expect_publish().times(2).returning(move |r| {
            sink.lock().push(r);
            Ok(Ack {
                partition: 0,
                offset: 0,
            })
        });
        let publisher: Arc<dyn Publisher> = Arc::new(mock);
        let envelopes = validate_batch(json!([{"type": "a"}, {"type": "b"}]), 3).unwrap();
        let trace = TraceContext::from_values(
            Some(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some(b"congo=t61rcWkgMzE"),
        )
        .unwrap();
        let ledger = Ledger::default();
        let results = publish_batch(
            &publisher,
            "t",
            &envelopes,
            &trace,
            Duration::from_secs(1),
            &ledger,
        )
        .await;
        assert!(results.iter().all(Result::is_ok));
        for record in seen.lock().iter() {
            let got = TraceContext::from_headers(&record.headers).expect("a valid traceparent");
            assert_eq!(got.parent.trace_id, trace.parent.trace_id);
            assert_eq!(got.state, trace.state);
            let count = |name: &str| record.headers.iter().filter(|(k, _)| k == name).count();
            assert_eq!(
                (count(HEADER_TRACEPARENT), count(HEADER_TRACESTATE)),
                (1, 1)
            );
        }
    }

    #[test]
    fn the_worst_failure_decides_the_outcome() {
        use PublishFailure::*;
        assert_eq!(BatchOutcome::of(&[OK, OK]), BatchOutcome::Published);
        assert_eq!(
            BatchOutcome::of(&[OK, failed(QueueFull), failed(Timeout)]),
            BatchOutcome::NotPublished { failed: 2 }
        );
        assert_eq!(
            BatchOutcome::of(&[failed(QueueFull), failed(UnknownPartition)]),
            BatchOutcome::UnknownPartition
        );
        assert_eq!(
            BatchOutcome::of(&[failed(UnknownPartition), failed(QueueFull)]),
            BatchOutcome::UnknownPartition,
            "a transient failure never hides a client error"
        );
        assert_eq!(
            BatchOutcome::of(&[failed(UnknownPartition), failed(MessageTooLarge)]),
            BatchOutcome::TooLarge,
            "of two client errors, the last one"
        );
        assert_eq!(
            BatchOutcome::of(&[failed(Unauthorized), OK]),
            BatchOutcome::NotPublished { failed: 1 }
        );
    }
}
