//! One message's way through a worker lane: dedupe claim → processor → outcome routing
//! (ok; retryable → next retry topic; fatal or exhausted → DLQ). A retry or DLQ publish is
//! retried with back-off until the broker acknowledges it, so the message is finished only
//! once it is safely on its next topic.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

use crate::config::RetryConfig;
use crate::model::{failure_record, now_ms, Delivery, ErrorKind, FailureHop};
use crate::observability::Metrics;
use crate::service::dedupe::{Claim, DedupeStore};
use crate::service::processor::{ProcessError, Processor};
use crate::service::publish::Publisher;

/// How a message finished.
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
    /// Not finished: shutdown cut its retry/DLQ publish short. Its offset stays
    /// uncommitted, so it is consumed again after a restart.
    Abandoned,
}

impl Outcome {
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
}

/// Everything a lane needs, shared by all lanes.
pub struct WorkerContext {
    /// The processor.
    pub processor: Arc<dyn Processor>,
    /// Publishes retry and DLQ records.
    pub publisher: Arc<dyn Publisher>,
    /// The dedupe store.
    pub dedupe: Arc<dyn DedupeStore>,
    /// The retry chain.
    pub retry: RetryConfig,
    /// Retry levels before the DLQ.
    pub retry_max: u32,
    /// This consumer's group (written to `courier-consumer-group`).
    pub group: String,
    /// Metrics.
    pub metrics: Metrics,
    /// Cancelled when shutdown's drain deadline passes: pending publishes give up.
    pub abort: CancellationToken,
    /// Back-off of retry/DLQ publishes: first and longest delay.
    pub publish_backoff: (Duration, Duration),
}

impl std::fmt::Debug for WorkerContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerContext")
            .field("group", &self.group)
            .finish()
    }
}

/// A message handed to a lane.
#[derive(Debug)]
pub struct Job {
    /// The message.
    pub delivery: Delivery,
    /// Retry level of the topic it came from (0 for a source topic).
    pub level: u32,
    /// Its due time, for a retry message that had one.
    pub due_at_ms: Option<i64>,
}

impl WorkerContext {
    /// Handles one message to its outcome.
    pub async fn handle(&self, job: &Job) -> Outcome {
        let d = &job.delivery;
        let id = d.message_id();
        let claimed = match id {
            Some(id) => {
                let replayed = d.courier_headers().replayed_at_ms;
                match self.dedupe.claim(id, replayed) {
                    Claim::Acquired => true,
                    Claim::Duplicate | Claim::InProgress => {
                        tracing::info!(message_id = id, topic = %d.topic, partition = d.partition, offset = d.offset, "Skipped a duplicate message.");
                        return Outcome::Duplicate;
                    }
                }
            }
            None => {
                self.metrics.messages_without_id.inc();
                false
            }
        };
        if let Some(due) = job.due_at_ms {
            let late_ms = (now_ms() - due).max(0);
            self.metrics.retry_lateness.observe(late_ms as f64 / 1000.0);
        }
        let started = Instant::now();
        let result = self.processor.process(d).await;
        self.metrics
            .processing_duration
            .observe(started.elapsed().as_secs_f64());
        if let Some(ts) = d.timestamp_ms {
            let e2e = (now_ms() - ts).max(0) as f64 / 1000.0;
            self.metrics.end_to_end_latency.observe(e2e);
        }
        match result {
            Ok(()) => {
                if let (true, Some(id)) = (claimed, id) {
                    self.dedupe.complete(id, now_ms());
                }
                Outcome::Ok
            }
            Err(err) => {
                if let (true, Some(id)) = (claimed, id) {
                    self.dedupe.release(id);
                }
                self.route_failure(job, &err).await
            }
        }
    }

    /// Publishes a failed message to its next hop and waits for the acknowledgement.
    async fn route_failure(&self, job: &Job, err: &ProcessError) -> Outcome {
        let d = &job.delivery;
        let prior = d.courier_headers().attempt.unwrap_or(job.level);
        let attempt = prior.max(job.level).saturating_add(1);
        let next_level = job.level + 1;
        let now = now_ms();
        let (topic, kind, due, outcome) = match err {
            ProcessError::Retryable { retry_after, .. } if next_level <= self.retry_max => {
                let delay = self
                    .retry
                    .delay(next_level)
                    .max(retry_after.unwrap_or_default());
                (
                    self.retry.topic(next_level),
                    ErrorKind::Retryable,
                    Some(now + delay.as_millis() as i64),
                    Outcome::Retried(next_level),
                )
            }
            ProcessError::Retryable { .. } => (
                self.retry.dlq_topic.clone(),
                ErrorKind::Exhausted,
                None,
                Outcome::DeadLettered,
            ),
            ProcessError::Fatal(_) => (
                self.retry.dlq_topic.clone(),
                ErrorKind::Fatal,
                None,
                Outcome::DeadLettered,
            ),
        };
        let record = failure_record(
            d,
            &FailureHop {
                topic: &topic,
                attempt,
                due_at_ms: due,
                group: &self.group,
                kind,
                message: err.reason(),
                failed_at_ms: now,
            },
        );
        let message_id = d.message_id().unwrap_or("");
        match outcome {
            Outcome::Retried(level) => {
                tracing::warn!(message_id, topic = %d.topic, partition = d.partition, offset = d.offset, attempt, retry_topic = %topic, retry_level = level, due_at_ms = due.unwrap_or_default(), error = err.reason(), "Processing failed; the message goes to a retry topic.")
            }
            _ => {
                tracing::error!(message_id, topic = %d.topic, partition = d.partition, offset = d.offset, attempt, dlq_topic = %topic, error_kind = kind.as_str(), error = err.reason(), "Processing failed; the message goes to the dead-letter topic.")
            }
        }
        if self.publish_until_acked(record).await {
            outcome
        } else {
            Outcome::Abandoned
        }
    }

    /// Publishes `record`, retrying with back-off until acknowledged. Returns false only if
    /// shutdown's abort fired first.
    async fn publish_until_acked(&self, record: crate::model::OutgoingRecord) -> bool {
        let (first, longest) = self.publish_backoff;
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(first)
            .with_max_delay(longest)
            .with_jitter()
            .without_max_times()
            .build();
        loop {
            let attempt = tokio::select! {
                biased;
                _ = self.abort.cancelled() => return false,
                r = self.publisher.publish(record.clone()) => r,
            };
            match attempt {
                Ok(_) => return true,
                Err(e) => {
                    let wait = backoff.next().unwrap_or(longest);
                    tracing::warn!(topic = %record.topic, error = %e, retry_in_ms = wait.as_millis() as u64, "A retry/DLQ publish failed; it will be retried and holds the commit point.");
                    tokio::select! {
                        _ = self.abort.cancelled() => return false,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }
}
