//! The events of a message's way through the consumer: one type per event, which both logs
//! (a full sentence with structured fields) and counts, in the style of vector's
//! `internal_events` (STYLE.md, 8). `service/` emits them through [`Metrics::emit`] and never
//! touches a Prometheus type, and the wording and counting of an event live in one place.
//!
//! Per-message events log under the target `courier::message`, so an operator can quiet
//! them alone: `LOG_LEVEL=info,courier::message=warn`.

use std::time::Duration;

use prometheus::IntCounter;

use super::Metrics;
use crate::model::{Delivery, Outcome};

/// The log target of per-message events.
pub const MESSAGE_TARGET: &str = "courier::message";

/// Something that happened, to log and count.
pub trait Event {
    /// Logs and counts this event.
    fn emit(self, metrics: &Metrics);
}

impl Metrics {
    /// Logs and counts `event`.
    pub fn emit(&self, event: impl Event) {
        event.emit(self);
    }

    /// The counters of one topic, resolved once instead of per message.
    pub fn topic_counters(&self, topic: &str) -> TopicCounters {
        TopicCounters {
            received: self.messages_received.with_label_values(&[topic]),
            finished: Outcome::FINISHED.map(|o| {
                self.messages_processed
                    .with_label_values(&[topic, o.label()])
            }),
        }
    }
}

/// `courier_messages_received_total` and `courier_messages_processed_total` of one topic.
#[derive(Clone)]
pub struct TopicCounters {
    received: IntCounter,
    finished: [IntCounter; Outcome::FINISHED.len()],
}

impl std::fmt::Debug for TopicCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TopicCounters")
    }
}

impl TopicCounters {
    /// A message of this topic was taken for processing.
    pub fn received(&self) {
        self.received.inc();
    }

    /// A message of this topic finished with `outcome` (an unfinished one is not counted).
    pub fn finished(&self, outcome: Outcome) {
        if let Some(i) = outcome.finished_index() {
            self.finished[i].inc();
        }
    }
}

/// Where a message is, for log fields.
#[derive(Debug, Clone, Copy)]
pub struct At<'a> {
    /// Its `message-id`, or empty.
    pub message_id: &'a str,
    /// The trace id of its `traceparent` header (32 hex digits), or empty.
    pub trace_id: &'a str,
    /// Topic.
    pub topic: &'a str,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

impl<'a> At<'a> {
    /// Where `d` is. Its ids are borrowed from its headers (the trace id is checked and
    /// sliced out of `traceparent`, no allocation), so building one per log line is cheap.
    pub fn of(d: &'a Delivery) -> Self {
        At {
            message_id: d.message_id().unwrap_or(""),
            trace_id: d.trace_id().unwrap_or(""),
            topic: &d.topic,
            partition: d.partition,
            offset: d.offset,
        }
    }
}

/// A message finished on a partition this consumer no longer owns (revoked meanwhile).
#[derive(Debug)]
pub struct FinishedAfterRevoke<'a> {
    /// Its topic.
    pub topic: &'a str,
    /// How it finished.
    pub outcome: Outcome,
}

impl Event for FinishedAfterRevoke<'_> {
    fn emit(self, m: &Metrics) {
        m.topic_counters(self.topic).finished(self.outcome);
    }
}

/// A duplicate `message-id` was skipped.
#[derive(Debug)]
pub struct DuplicateSkipped<'a>(pub At<'a>);

impl Event for DuplicateSkipped<'_> {
    fn emit(self, _: &Metrics) {
        let a = self.0;
        tracing::info!(target: MESSAGE_TARGET, message_id = a.message_id, trace_id = a.trace_id, topic = a.topic, partition = a.partition, offset = a.offset, "Skipped a duplicate message.");
    }
}

/// Another consumer group's retry message was skipped.
#[derive(Debug)]
pub struct ForeignRetrySkipped<'a>(pub At<'a>);

impl Event for ForeignRetrySkipped<'_> {
    fn emit(self, _: &Metrics) {
        let a = self.0;
        tracing::debug!(target: MESSAGE_TARGET, trace_id = a.trace_id, topic = a.topic, partition = a.partition, offset = a.offset, "Skipped another consumer group's retry message.");
    }
}

/// A message without a usable `message-id` is processed without dedupe.
#[derive(Debug)]
pub struct WithoutId;

impl Event for WithoutId {
    fn emit(self, m: &Metrics) {
        m.messages_without_id.inc();
    }
}

/// A retry message starts processing this long after its due time.
#[derive(Debug)]
pub struct RetryStarted {
    /// Processing start minus due time (zero when on time).
    pub late: Duration,
}

impl Event for RetryStarted {
    fn emit(self, m: &Metrics) {
        m.retry_lateness.observe(self.late.as_secs_f64());
    }
}

/// The processor finished one call.
#[derive(Debug)]
pub struct Processed {
    /// How long the call took.
    pub took: Duration,
    /// From the message's Kafka timestamp to now, when it had one.
    pub end_to_end: Option<Duration>,
}

impl Event for Processed {
    fn emit(self, m: &Metrics) {
        m.processing_duration.observe(self.took.as_secs_f64());
        if let Some(e2e) = self.end_to_end {
            m.end_to_end_latency.observe(e2e.as_secs_f64());
        }
    }
}

/// The processor panicked: the message is a fatal failure.
#[derive(Debug)]
pub struct ProcessorPanicked<'a> {
    /// The message.
    pub at: At<'a>,
    /// What the panic said.
    pub reason: &'a str,
}

impl Event for ProcessorPanicked<'_> {
    fn emit(self, _: &Metrics) {
        let a = self.at;
        tracing::error!(target: MESSAGE_TARGET, message_id = a.message_id, trace_id = a.trace_id, topic = a.topic, partition = a.partition, offset = a.offset, error = self.reason, "The processor panicked; the message is a fatal failure.");
    }
}

/// A failed message goes to a retry topic.
#[derive(Debug)]
pub struct SentToRetry<'a> {
    /// The message.
    pub at: At<'a>,
    /// Failed attempts so far.
    pub attempt: u32,
    /// The retry topic.
    pub retry_topic: &'a str,
    /// Its level.
    pub level: u32,
    /// When it is due, epoch milliseconds.
    pub due_at_ms: i64,
    /// Why it failed.
    pub error: &'a str,
}

impl Event for SentToRetry<'_> {
    fn emit(self, _: &Metrics) {
        let a = self.at;
        tracing::warn!(target: MESSAGE_TARGET, message_id = a.message_id, trace_id = a.trace_id, topic = a.topic, partition = a.partition, offset = a.offset, attempt = self.attempt, retry_topic = self.retry_topic, retry_level = self.level, due_at_ms = self.due_at_ms, error = self.error, "Processing failed; the message goes to a retry topic.");
    }
}

/// A failed message goes to the dead-letter topic.
#[derive(Debug)]
pub struct SentToDlq<'a> {
    /// The message.
    pub at: At<'a>,
    /// Failed attempts so far.
    pub attempt: u32,
    /// The DLQ topic.
    pub dlq_topic: &'a str,
    /// `fatal` or `exhausted`.
    pub error_kind: &'a str,
    /// Why it failed.
    pub error: &'a str,
}

impl Event for SentToDlq<'_> {
    fn emit(self, _: &Metrics) {
        let a = self.at;
        tracing::error!(target: MESSAGE_TARGET, message_id = a.message_id, trace_id = a.trace_id, topic = a.topic, partition = a.partition, offset = a.offset, attempt = self.attempt, dlq_topic = self.dlq_topic, error_kind = self.error_kind, error = self.error, "Processing failed; the message goes to the dead-letter topic.");
    }
}

/// A failed message is too large to forward: its DLQ entry points to the original.
#[derive(Debug)]
pub struct TooLargeToForward<'a> {
    /// The message.
    pub at: At<'a>,
    /// Its payload size.
    pub payload_bytes: usize,
}

impl Event for TooLargeToForward<'_> {
    fn emit(self, _: &Metrics) {
        let a = self.at;
        tracing::error!(target: MESSAGE_TARGET, message_id = a.message_id, trace_id = a.trace_id, topic = a.topic, partition = a.partition, offset = a.offset, payload_bytes = self.payload_bytes, "A failed message is too large to forward; its DLQ entry points to the original.");
    }
}

/// A retry or DLQ publish failed for a reason that heals by itself; it is tried again.
#[derive(Debug)]
pub struct HopPublishFailed<'a> {
    /// The retry or DLQ topic.
    pub destination: &'a str,
    /// The publish error.
    pub error: &'a str,
    /// When it is tried again.
    pub retry_in: Duration,
}

impl Event for HopPublishFailed<'_> {
    fn emit(self, _: &Metrics) {
        tracing::warn!(target: MESSAGE_TARGET, topic = self.destination, error = self.error, retry_in_ms = self.retry_in.as_millis() as u64, "A retry/DLQ publish failed; it will be retried and holds the commit point.");
    }
}

/// A message cannot be forwarded and holds its partition until the cause is fixed (the
/// `courier_held_messages` gauge and `/readyz` come from the readiness state).
#[derive(Debug)]
pub struct MessageHeld<'a> {
    /// The message.
    pub at: At<'a>,
    /// Where it should go.
    pub destination: &'a str,
    /// Why it cannot.
    pub error: &'a str,
}

impl Event for MessageHeld<'_> {
    fn emit(self, _: &Metrics) {
        let a = self.at;
        tracing::error!(target: MESSAGE_TARGET, message_id = a.message_id, trace_id = a.trace_id, topic = a.topic, partition = a.partition, offset = a.offset, destination = self.destination, error = self.error, "A message cannot be forwarded and holds its partition until the cause is fixed; courier keeps trying.");
    }
}

/// A held message was forwarded at last.
#[derive(Debug)]
pub struct HeldMessageForwarded<'a> {
    /// The message.
    pub at: At<'a>,
    /// Where it went.
    pub destination: &'a str,
}

impl Event for HeldMessageForwarded<'_> {
    fn emit(self, _: &Metrics) {
        let a = self.at;
        tracing::info!(target: MESSAGE_TARGET, message_id = a.message_id, trace_id = a.trace_id, topic = a.topic, partition = a.partition, offset = a.offset, destination = self.destination, "A held message was forwarded; its partition moves on.");
    }
}

/// Handling a message panicked outside the processor (a bug): it stays unfinished.
#[derive(Debug)]
pub struct HandlingPanicked<'a> {
    /// The message.
    pub at: At<'a>,
    /// What the panic said.
    pub reason: &'a str,
}

impl Event for HandlingPanicked<'_> {
    fn emit(self, _: &Metrics) {
        let a = self.at;
        tracing::error!(target: MESSAGE_TARGET, message_id = a.message_id, trace_id = a.trace_id, topic = a.topic, partition = a.partition, offset = a.offset, error = self.reason, "A message could not be handled; it holds its partition until a restart.");
    }
}

/// A retry message's courier headers are malformed and treated as absent.
#[derive(Debug)]
pub struct MalformedCourierHeaders<'a> {
    /// The message.
    pub at: At<'a>,
    /// Which headers.
    pub headers: &'a [&'static str],
}

impl Event for MalformedCourierHeaders<'_> {
    fn emit(self, _: &Metrics) {
        let a = self.at;
        tracing::warn!(target: MESSAGE_TARGET, trace_id = a.trace_id, topic = a.topic, partition = a.partition, offset = a.offset, headers = ?self.headers, "Malformed courier headers are treated as absent.");
    }
}

/// A retry message's due time is beyond any configured delay: treated as due now.
#[derive(Debug)]
pub struct DueTimeBeyondHorizon<'a> {
    /// The message.
    pub at: At<'a>,
    /// Its due time, epoch milliseconds.
    pub due_at_ms: i64,
}

impl Event for DueTimeBeyondHorizon<'_> {
    fn emit(self, _: &Metrics) {
        let a = self.at;
        tracing::warn!(target: MESSAGE_TARGET, trace_id = a.trace_id, topic = a.topic, partition = a.partition, offset = a.offset, due_at_ms = self.due_at_ms, "A due time beyond any configured delay is treated as due now.");
    }
}

/// The pipeline's gauges: messages in flight, paused partitions, dedupe entries.
#[derive(Debug, Default)]
pub struct PipelineState {
    /// `courier_in_flight`.
    pub in_flight: Option<usize>,
    /// `courier_paused_partitions`.
    pub paused_partitions: Option<usize>,
    /// `courier_dedupe_entries`.
    pub dedupe_entries: Option<usize>,
}

impl Event for PipelineState {
    fn emit(self, m: &Metrics) {
        if let Some(n) = self.in_flight {
            m.in_flight.set(n as i64);
        }
        if let Some(n) = self.paused_partitions {
            m.paused_partitions.set(n as i64);
        }
        if let Some(n) = self.dedupe_entries {
            m.dedupe_entries.set(n as i64);
        }
    }
}

/// The circuit breaker's state; `courier_circuit_state` is its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Calls go through.
    Closed,
    /// No call goes out; fetching is paused.
    Open,
    /// One probe call goes out.
    HalfOpen,
}

impl CircuitState {
    /// The `to` label of `courier_circuit_transitions_total`.
    pub fn label(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }

    /// The value of `courier_circuit_state`: 0 closed, 1 open, 2 half-open.
    pub fn number(self) -> i64 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::Open => 1,
            CircuitState::HalfOpen => 2,
        }
    }
}

/// The circuit breaker changed state: one log line with the reason and the last error.
#[derive(Debug)]
pub struct CircuitTransition<'a> {
    /// From.
    pub from: CircuitState,
    /// To.
    pub to: CircuitState,
    /// Why.
    pub reason: &'a str,
    /// The last retryable error the processor returned.
    pub last_error: &'a str,
}

impl CircuitTransition<'static> {
    /// The state a breaker starts in (sets the gauge, logs nothing, counts nothing).
    pub fn initial() -> Self {
        CircuitTransition {
            from: CircuitState::Closed,
            to: CircuitState::Closed,
            reason: "",
            last_error: "",
        }
    }
}

impl Event for CircuitTransition<'_> {
    fn emit(self, m: &Metrics) {
        m.circuit_state.set(self.to.number());
        if self.from == self.to {
            return;
        }
        m.circuit_transitions
            .with_label_values(&[self.to.label()])
            .inc();
        let (from, to, reason, last_error) = (
            self.from.label(),
            self.to.label(),
            self.reason,
            self.last_error,
        );
        match self.to {
            CircuitState::Open => tracing::warn!(from, to, reason, last_error, "The processor's circuit opened: fetching is paused and failing messages are held, not retried or dead-lettered."),
            CircuitState::HalfOpen => tracing::info!(from, to, reason, "The processor's circuit is half-open: one message goes out as a probe."),
            CircuitState::Closed => tracing::info!(from, to, reason, "The processor's circuit closed: held messages go out again and fetching resumes."),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_counters_count_each_finished_outcome_under_its_label() {
        let m = Metrics::new();
        let c = m.topic_counters("ev");
        c.received();
        for o in [
            Outcome::Ok,
            Outcome::Retried(2),
            Outcome::DeadLettered,
            Outcome::Duplicate,
            Outcome::Skipped,
            Outcome::Abandoned,
        ] {
            c.finished(o);
        }
        let text = m.render();
        assert!(text.contains("courier_messages_received_total{topic=\"ev\"} 1"));
        for label in ["ok", "retry", "dlq", "duplicate", "skipped"] {
            assert!(
                text.contains(&format!(
                    "courier_messages_processed_total{{outcome=\"{label}\",topic=\"ev\"}} 1"
                )),
                "{label}: {text}"
            );
        }
        assert!(
            !text.contains("abandoned"),
            "unfinished messages are not counted"
        );
    }

    /// A `Write` into a shared buffer, for capturing log output.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<parking_lot::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn message_log_lines_carry_the_trace_id() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || writer.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let traced = Delivery {
            topic: "ev".into(),
            partition: 1,
            offset: 7,
            key: None,
            payload: None,
            headers: vec![
                ("message-id".into(), Some(b"m-1".to_vec())),
                (
                    "traceparent".into(),
                    Some(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_vec()),
                ),
            ],
            timestamp_ms: None,
        };
        let at = At::of(&traced);
        assert_eq!(at.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        let m = Metrics::new();
        m.emit(SentToDlq {
            at,
            attempt: 1,
            dlq_topic: "dlq",
            error_kind: "fatal",
            error: "bad",
        });
        m.emit(ForeignRetrySkipped(at));
        m.emit(DueTimeBeyondHorizon { at, due_at_ms: 1 });
        let out = String::from_utf8(captured.0.lock().clone()).unwrap();
        assert_eq!(out.lines().count(), 3, "{out}");
        for line in out.lines() {
            assert!(
                line.contains(r#""trace_id":"4bf92f3577b34da6a3ce929d0e0e4736""#),
                "{line}"
            );
        }
        let untraced = Delivery {
            headers: vec![("traceparent".into(), Some(b"garbage".to_vec()))],
            ..traced
        };
        assert_eq!(At::of(&untraced).trace_id, "");
    }

    #[test]
    fn pipeline_state_sets_only_what_it_names() {
        let m = Metrics::new();
        m.emit(PipelineState {
            in_flight: Some(3),
            paused_partitions: Some(2),
            dedupe_entries: Some(9),
        });
        m.emit(PipelineState {
            in_flight: Some(1),
            ..PipelineState::default()
        });
        assert_eq!(
            (
                m.in_flight.get(),
                m.paused_partitions.get(),
                m.dedupe_entries.get()
            ),
            (1, 2, 9)
        );
    }
}
