//! One message's way through a worker lane: dedupe claim → processor → outcome routing
//! (ok; retryable → next retry topic; fatal or exhausted → DLQ). A retry or DLQ publish is
//! retried with back-off until the broker acknowledges it, so the message is finished only
//! once it is safely on its next topic. Faults stay inside one message (DESIGN.md,
//! guarantee 9): a panicking processor is a fatal failure, and a publish that fails for a
//! reason that will not heal by itself holds the message visibly (see [`Readiness::hold`]).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

use crate::config::RetryConfig;
pub use crate::model::Outcome;
use crate::model::{failure_record, now_ms, Delivery, ErrorKind, FailureHop};
use crate::observability::events::{
    At, DuplicateSkipped, HeldMessageForwarded, HopPublishFailed, MessageHeld, Processed,
    ProcessorPanicked, RetryStarted, SentToDlq, SentToRetry, TooLargeToForward, WithoutId,
};
use crate::observability::Metrics;
use crate::observability::Readiness;
use crate::service::circuit::{Breaker, Suspect, Verdict};
use crate::service::dedupe::{Claim, DedupeStore};
use crate::service::limits::Limits;
use crate::service::processor::{ProcessError, Processor};
use crate::service::publish::{PublishFailure, Publisher};

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
    /// The longest delay a retry may get, `retry_after` included: below the due-time
    /// horizon the pipeline trusts, so a retry is never treated as due early.
    pub max_retry_delay: Duration,
    /// Where messages that cannot move on are reported.
    pub holds: Arc<Readiness>,
    /// The circuit breaker around the processor.
    pub breaker: Arc<Breaker>,
    /// Concurrency and rate limits toward the processor's endpoint.
    pub limits: Limits,
    /// Cancelled when shutdown starts draining: messages the circuit holds give up (left
    /// uncommitted) instead of waiting for the drain deadline.
    pub stop_holding: CancellationToken,
}

impl std::fmt::Debug for WorkerContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerContext")
            .field("group", &self.group)
            .finish()
    }
}

/// How a retry/DLQ publish ended.
enum HopResult {
    Acked,
    Aborted,
    TooLarge,
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

/// What dedupe said about a message.
enum Claimed {
    /// This lane owns the id until it completes or releases it.
    Yes,
    /// No usable `message-id`: processed without dedupe.
    NoId,
    /// Processed already (or being processed): skip.
    Duplicate,
}

/// Where handling a message stands once the processor had its say.
#[derive(Debug)]
pub enum Step {
    /// Finished (or given up, unfinished).
    Done(Outcome),
    /// Failed: it goes to its next hop (a retry topic or the DLQ) with [`WorkerContext::forward`],
    /// and is finished once the broker acknowledges it. The worker lane does not wait for
    /// that: the message stays in flight (its offset tracked, so the commit point holds at
    /// it) while the lane takes its next message.
    Forward(Forward),
    /// Failed while the circuit is closed, without opening it: per-message, or the start
    /// of an outage? [`WorkerContext::finish`] waits for the breaker to tell (see
    /// [`Breaker::settle`]), off the lane like a [`Step::Forward`].
    Suspect(Suspected),
}

/// A failure waiting for the breaker's verdict.
#[derive(Debug)]
pub struct Suspected {
    suspect: Suspect,
    err: ProcessError,
    failed_ms: i64,
}

/// A failed message's next hop, ready to publish.
#[derive(Debug)]
pub struct Forward {
    record: crate::model::OutgoingRecord,
    attempt: u32,
    kind: ErrorKind,
    reason: String,
    outcome: Outcome,
}

impl WorkerContext {
    /// Handles one message to its outcome, its retry or DLQ publish included. While the
    /// circuit breaker holds it, the lane waits and calls again; a hold ends early, with
    /// the message unfinished (left uncommitted), when `revoked` (its partition) or
    /// `stop_holding` (shutdown) fires.
    pub async fn handle(&self, job: &Job, revoked: &CancellationToken) -> Outcome {
        let step = self.process(job, revoked).await;
        self.finish(job, step, revoked).await
    }

    /// Takes a message from where [`WorkerContext::process`] left it to its outcome: waits
    /// for a suspect's verdict (calling again when the circuit held it) and publishes a
    /// failed message's next hop.
    pub async fn finish(&self, job: &Job, mut step: Step, revoked: &CancellationToken) -> Outcome {
        loop {
            step = match step {
                Step::Done(outcome) => return outcome,
                Step::Forward(hop) => return self.forward(&job.delivery, hop).await,
                Step::Suspect(s) => self.settle(job, s, revoked).await,
            };
        }
    }

    /// Handles one message up to its outcome or, when it failed, up to the record of its
    /// next hop (see [`Step::Forward`]) or the breaker's doubt (see [`Step::Suspect`]):
    /// what [`WorkerContext::handle`] does on the lane.
    pub async fn process(&self, job: &Job, revoked: &CancellationToken) -> Step {
        if let Some(due) = job.due_at_ms {
            let late_ms = now_ms().saturating_sub(due).max(0);
            self.metrics.emit(RetryStarted {
                late: Duration::from_millis(late_ms as u64),
            });
        }
        self.attempt(job, revoked).await
    }

    /// Waits for the breaker's verdict on a suspect failure: routed as usual once the
    /// endpoint answered another call after it; called again (once the circuit lets it)
    /// when the circuit opened after it. Gives up, unfinished, on a revoke or shutdown.
    async fn settle(&self, job: &Job, s: Suspected, revoked: &CancellationToken) -> Step {
        let verdict = tokio::select! {
            biased;
            v = self.breaker.settle(s.suspect) => v,
            _ = revoked.cancelled() => return Step::Done(Outcome::Abandoned),
            _ = self.stop_holding.cancelled() => return Step::Done(Outcome::Abandoned),
        };
        match verdict {
            Verdict::Hold => self.attempt(job, revoked).await,
            _ => Step::Forward(self.route_failure(job, &s.err, s.failed_ms)),
        }
    }

    /// Calls the processor for one message (again while the circuit holds it) up to its
    /// outcome, its next hop or the breaker's doubt.
    async fn attempt(&self, job: &Job, revoked: &CancellationToken) -> Step {
        let d = &job.delivery;
        let id = d.message_id();
        loop {
            // Biased toward going ahead: a closed circuit and free limits never lose a
            // message to a revoke or shutdown that is draining. A closed circuit (and no
            // limit) lets the call through without a wait.
            let pass = match self.breaker.try_admit() {
                Some(pass) => pass,
                None => tokio::select! {
                    biased;
                    pass = self.breaker.admit() => pass,
                    _ = revoked.cancelled() => return Step::Done(Outcome::Abandoned),
                    _ = self.stop_holding.cancelled() => return Step::Done(Outcome::Abandoned),
                },
            }
            .retry(job.level > 0);
            let claimed = match self.claim(d, id) {
                Claimed::Duplicate => return Step::Done(Outcome::Duplicate),
                c => c,
            };
            let (result, done_ms) = {
                let _permit = match self.limits.try_unlimited() {
                    Some(permit) => permit,
                    None => tokio::select! {
                        biased;
                        permit = self.limits.acquire() => permit,
                        _ = revoked.cancelled() => return Step::Done(self.release(id, claimed, Outcome::Abandoned)),
                        _ = self.stop_holding.cancelled() => return Step::Done(self.release(id, claimed, Outcome::Abandoned)),
                    },
                };
                self.call(d).await
            };
            let verdict = self.breaker.record(pass, &result);
            match result {
                Ok(()) => {
                    if let (Claimed::Yes, Some(id)) = (claimed, id) {
                        self.dedupe.complete(id, done_ms);
                    }
                    return Step::Done(Outcome::Ok);
                }
                Err(err) => {
                    self.release(id, claimed, Outcome::Abandoned);
                    match verdict {
                        Verdict::Route => {
                            return Step::Forward(self.route_failure(job, &err, done_ms))
                        }
                        Verdict::Suspect(suspect) => {
                            return Step::Suspect(Suspected {
                                suspect,
                                err,
                                failed_ms: done_ms,
                            })
                        }
                        // Held by the circuit: wait for it and call again, same message.
                        Verdict::Hold => {}
                    }
                }
            }
        }
    }

    fn claim(&self, d: &Delivery, id: Option<&str>) -> Claimed {
        let Some(id) = id else {
            self.metrics.emit(WithoutId);
            return Claimed::NoId;
        };
        match self.dedupe.claim(id, d.replayed_at_ms()) {
            Claim::Acquired => Claimed::Yes,
            Claim::Duplicate | Claim::InProgress => {
                self.metrics.emit(DuplicateSkipped(at(d)));
                Claimed::Duplicate
            }
        }
    }

    /// Gives a claimed id back (the message did not finish successfully); returns `outcome`.
    fn release(&self, id: Option<&str>, claimed: Claimed, outcome: Outcome) -> Outcome {
        if let (Claimed::Yes, Some(id)) = (claimed, id) {
            self.dedupe.release(id);
        }
        outcome
    }

    /// One processor call; a panic is a fatal failure. Also returns the wall clock when it
    /// ended, epoch milliseconds (read once, for the metrics and the dedupe entry).
    async fn call(&self, d: &Delivery) -> (Result<(), ProcessError>, i64) {
        let started = Instant::now();
        let result = match AssertUnwindSafe(self.processor.process(d))
            .catch_unwind()
            .await
        {
            Ok(result) => result,
            Err(panic) => {
                let reason = format!("the processor panicked: {}", panic_message(&*panic));
                self.metrics.emit(ProcessorPanicked {
                    at: at(d),
                    reason: &reason,
                });
                Err(ProcessError::Fatal(reason))
            }
        };
        let took = started.elapsed();
        let done_ms = now_ms();
        self.metrics.emit(Processed {
            took,
            end_to_end: d
                .timestamp_ms
                .map(|ts| Duration::from_millis(done_ms.saturating_sub(ts).max(0) as u64)),
        });
        (result, done_ms)
    }

    /// The delay of retry `level`: its configured delay, or a processor's `retry_after` when
    /// longer, clamped to [`WorkerContext::max_retry_delay`].
    pub fn retry_delay(&self, level: u32, retry_after: Option<Duration>) -> Duration {
        let configured = self.retry.delay(level);
        configured.max(retry_after.unwrap_or_default().min(self.max_retry_delay))
    }

    /// The record that carries a failed message to its next hop (`now` is when it failed,
    /// epoch milliseconds), and the event that says where it goes.
    fn route_failure(&self, job: &Job, err: &ProcessError, now: i64) -> Forward {
        let d = &job.delivery;
        let prior = d.courier_headers().attempt.unwrap_or(job.level);
        let attempt = prior.max(job.level).saturating_add(1);
        let next_level = job.level + 1;
        let (topic, kind, due, outcome) = match err {
            ProcessError::Retryable { retry_after, .. } if next_level <= self.retry_max => {
                let delay = self.retry_delay(next_level, *retry_after);
                let delay_ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
                (
                    self.retry.topic(next_level),
                    ErrorKind::Retryable,
                    Some(now.saturating_add(delay_ms)),
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
        match outcome {
            Outcome::Retried(level) => self.metrics.emit(SentToRetry {
                at: at(d),
                attempt,
                retry_topic: &topic,
                level,
                due_at_ms: due.unwrap_or_default(),
                error: err.reason(),
            }),
            _ => self.metrics.emit(SentToDlq {
                at: at(d),
                attempt,
                dlq_topic: &topic,
                error_kind: kind.as_str(),
                error: err.reason(),
            }),
        }
        Forward {
            record,
            attempt,
            kind,
            reason: err.reason().to_owned(),
            outcome,
        }
    }

    /// Publishes a failed message `d` to its next hop and waits for the acknowledgement
    /// (retried with back-off; see [`WorkerContext::publish_until_acked`]).
    pub async fn forward(&self, d: &Delivery, hop: Forward) -> Outcome {
        match self.publish_until_acked(d, hop.record, false).await {
            HopResult::Acked => hop.outcome,
            HopResult::Aborted => Outcome::Abandoned,
            HopResult::TooLarge => {
                self.dead_letter_pointer(d, hop.attempt, hop.kind, &hop.reason)
                    .await
            }
        }
    }

    /// The broker refused the record as too large for any topic: dead-letter a pointer to
    /// the original instead (its key and `message-id`, no payload, the error message naming
    /// where the original stays), so the partition moves on and nothing vanishes unseen.
    async fn dead_letter_pointer(
        &self,
        d: &Delivery,
        attempt: u32,
        kind: ErrorKind,
        reason: &str,
    ) -> Outcome {
        let size = d.payload.as_ref().map_or(0, Vec::len);
        let message = format!(
            "payload of {size} bytes too large to forward; the original stays at {}/{}@{} (last error: {reason})",
            d.topic, d.partition, d.offset
        );
        let mut slim = d.clone();
        slim.payload = None;
        slim.headers.retain(|(k, _)| {
            k == crate::model::HEADER_MESSAGE_ID
                || k.starts_with(crate::model::COURIER_HEADER_PREFIX)
        });
        let kind = if kind == ErrorKind::Retryable {
            ErrorKind::Fatal
        } else {
            kind
        };
        let mut record = failure_record(
            &slim,
            &FailureHop {
                topic: &self.retry.dlq_topic,
                attempt,
                due_at_ms: None,
                group: &self.group,
                kind,
                message: &message,
                failed_at_ms: now_ms(),
            },
        );
        self.metrics.emit(TooLargeToForward {
            at: at(d),
            payload_bytes: size,
        });
        match self.publish_until_acked(d, record.clone(), false).await {
            HopResult::Acked => Outcome::DeadLettered,
            HopResult::Aborted => Outcome::Abandoned,
            HopResult::TooLarge => {
                // Even the headers are too large: keep only the courier headers. If the DLQ
                // refuses even that, the message holds its partition visibly until the DLQ
                // takes it (or shutdown leaves it uncommitted for the next start).
                record.key = None;
                record
                    .headers
                    .retain(|(k, _)| k.starts_with(crate::model::COURIER_HEADER_PREFIX));
                match self.publish_until_acked(d, record, true).await {
                    HopResult::Acked => Outcome::DeadLettered,
                    _ => Outcome::Abandoned,
                }
            }
        }
    }

    /// Publishes `record`, retrying with back-off until acknowledged. Gives up only when
    /// shutdown's abort fires, or, unless `too_large_is_final`, when the broker refuses the
    /// record as too large (the caller then forwards a smaller one). A failure that will not
    /// heal by itself holds `d` visibly (readiness, metric, an error log naming it) until the
    /// publish succeeds.
    async fn publish_until_acked(
        &self,
        d: &Delivery,
        record: crate::model::OutgoingRecord,
        too_large_is_final: bool,
    ) -> HopResult {
        let (first, longest) = self.publish_backoff;
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(first)
            .with_max_delay(longest)
            .with_jitter()
            .without_max_times()
            .build();
        let key = format!("{}/{}@{}", d.topic, d.partition, d.offset);
        let mut held = false;
        let delivered = loop {
            let attempt = tokio::select! {
                biased;
                _ = self.abort.cancelled() => break HopResult::Aborted,
                r = self.publisher.publish(record.clone()) => r,
            };
            let e = match attempt {
                Ok(_) => break HopResult::Acked,
                Err(e) if e.kind == PublishFailure::MessageTooLarge && !too_large_is_final => {
                    break HopResult::TooLarge
                }
                Err(e) => e,
            };
            let wait = backoff.next().unwrap_or(longest);
            if e.kind.heals_by_itself() {
                self.metrics.emit(HopPublishFailed {
                    destination: &record.topic,
                    error: &e.to_string(),
                    retry_in: wait,
                });
            } else if !held {
                held = true;
                let reason = format!("its publish to {} fails: {e}", record.topic);
                self.metrics.emit(MessageHeld {
                    at: at(d),
                    destination: &record.topic,
                    error: &e.to_string(),
                });
                self.holds.hold(&key, &reason);
            }
            tokio::select! {
                _ = self.abort.cancelled() => break HopResult::Aborted,
                _ = tokio::time::sleep(wait) => {}
            }
        };
        if held {
            self.holds.release(&key);
            if matches!(delivered, HopResult::Acked) {
                self.metrics.emit(HeldMessageForwarded {
                    at: at(d),
                    destination: &record.topic,
                });
            }
        }
        delivered
    }
}

/// Where `d` is, for events.
fn at(d: &Delivery) -> At<'_> {
    At::of(d)
}

/// The text of a panic payload.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Ack, CourierHeaders, HEADER_MESSAGE_ID};
    use crate::observability::Readiness;
    use crate::service::circuit::CircuitSettings;
    use crate::service::dedupe::MemoryDedupe;
    use crate::service::processor::MockProcessor;
    use crate::service::publish::{MockPublisher, PublishError};
    use parking_lot::Mutex;

    fn ctx(processor: MockProcessor, publisher: MockPublisher) -> WorkerContext {
        ctx_with(processor, publisher, Readiness::new(Metrics::new(), false))
    }

    fn ctx_with(
        processor: MockProcessor,
        publisher: MockPublisher,
        holds: Arc<Readiness>,
    ) -> WorkerContext {
        WorkerContext {
            processor: Arc::new(processor),
            publisher: Arc::new(publisher),
            dedupe: Arc::new(MemoryDedupe::new(Duration::from_secs(60), 100)),
            retry: RetryConfig {
                topic_prefix: "ev-retry".into(),
                backoff: vec![Duration::from_secs(1)],
                dlq_topic: "ev-dlq".into(),
            },
            retry_max: 2,
            group: "g".into(),
            metrics: Metrics::new(),
            abort: CancellationToken::new(),
            publish_backoff: (Duration::from_millis(1), Duration::from_millis(5)),
            max_retry_delay: Duration::from_secs(3600),
            holds,
            breaker: Breaker::new(CircuitSettings::off(), Metrics::new()),
            limits: Limits::default(),
            stop_holding: CancellationToken::new(),
        }
    }

    /// `job(10)` being handled on a context whose readiness reports holds (and nothing else).
    struct Held {
        ctx: Arc<WorkerContext>,
        metrics: Metrics,
        readiness: Arc<Readiness>,
        handled: tokio::task::JoinHandle<Outcome>,
    }

    impl Held {
        fn start(processor: MockProcessor, publisher: MockPublisher) -> Held {
            let metrics = Metrics::new();
            let readiness = Readiness::new(metrics.clone(), false);
            readiness.broker_ok();
            let ctx = Arc::new(ctx_with(processor, publisher, readiness.clone()));
            let worker = ctx.clone();
            let handled =
                tokio::spawn(
                    async move { worker.handle(&job(10), &CancellationToken::new()).await },
                );
            Held {
                ctx,
                metrics,
                readiness,
                handled,
            }
        }

        /// Waits up to 5 s for `done`.
        async fn wait(&self, what: &str, done: impl Fn() -> bool) {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !done() {
                assert!(Instant::now() < deadline, "{what}");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }

    /// A breaker that opens at half of at least `min_calls` calls in 10 s.
    fn breaker(min_calls: u32) -> Arc<Breaker> {
        Breaker::new(
            CircuitSettings {
                enabled: true,
                failure_ratio: 0.5,
                min_calls,
                window: Duration::from_secs(10),
                open_for: (Duration::from_secs(1), Duration::from_secs(1)),
            },
            Metrics::new(),
        )
    }

    /// `n` calls of other messages (ids `warm-*`, offsets 100…) that succeed while `down`
    /// is false: traffic in the breaker's window.
    async fn answer_calls(ctx: &WorkerContext, n: u32, down: &std::sync::atomic::AtomicBool) {
        assert!(!down.load(std::sync::atomic::Ordering::SeqCst));
        for i in 0..n {
            let mut j = job(10);
            j.delivery.offset = 100 + i64::from(i);
            j.delivery.headers[0].1 = Some(format!("warm-{i}").into_bytes());
            assert_eq!(ctx.handle(&j, &CancellationToken::new()).await, Outcome::Ok);
        }
    }

    fn job(payload_len: usize) -> Job {
        Job {
            delivery: Delivery {
                topic: "ev".into(),
                partition: 1,
                offset: 7,
                key: Some(b"k".to_vec()),
                payload: Some(vec![b'x'; payload_len]),
                headers: vec![
                    (HEADER_MESSAGE_ID.into(), Some(b"m1".to_vec())),
                    ("big".into(), Some(vec![0; 1000])),
                ],
                timestamp_ms: Some(1),
            },
            level: 0,
            due_at_ms: None,
        }
    }

    #[tokio::test]
    async fn a_record_too_large_to_forward_is_dead_lettered_as_a_pointer() {
        let mut processor = MockProcessor::new();
        processor
            .expect_process()
            .returning(|_| Err(ProcessError::retryable("down")));
        let sent = Arc::new(Mutex::new(Vec::new()));
        let seen = sent.clone();
        let mut publisher = MockPublisher::new();
        publisher.expect_publish().times(2).returning(move |r| {
            seen.lock().push(r.clone());
            if r.payload.is_some() {
                Err(PublishError {
                    kind: PublishFailure::MessageTooLarge,
                    message: "too large".into(),
                })
            } else {
                Ok(Ack {
                    partition: 0,
                    offset: 0,
                })
            }
        });
        let outcome = ctx(processor, publisher)
            .handle(&job(2_000_000), &CancellationToken::new())
            .await;
        assert_eq!(outcome, Outcome::DeadLettered);
        let sent = sent.lock();
        assert_eq!(sent[0].topic, "ev-retry-1", "first the normal hop");
        let pointer = &sent[1];
        assert_eq!(pointer.topic, "ev-dlq");
        assert_eq!(pointer.key.as_deref(), Some(b"k".as_slice()));
        assert!(
            !pointer.headers.iter().any(|(k, _)| k == "big"),
            "user headers dropped"
        );
        let h = CourierHeaders::parse(&pointer.headers);
        assert_eq!(h.error_kind, Some(ErrorKind::Fatal));
        assert!(h.error_message.unwrap().contains(
            "payload of 2000000 bytes too large to forward; the original stays at ev/1@7"
        ));
        assert_eq!(
            crate::model::header_value(&pointer.headers, HEADER_MESSAGE_ID),
            Some(b"m1".as_slice())
        );
    }

    #[tokio::test]
    async fn a_transient_publish_failure_is_retried_until_acked() {
        let mut processor = MockProcessor::new();
        processor
            .expect_process()
            .returning(|_| Err(ProcessError::fatal("bad")));
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = calls.clone();
        let mut publisher = MockPublisher::new();
        publisher.expect_publish().times(4).returning(move |r| {
            assert_eq!(r.topic, "ev-dlq");
            if c.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 3 {
                Err(PublishError {
                    kind: PublishFailure::BrokerDown,
                    message: "down".into(),
                })
            } else {
                Ok(Ack {
                    partition: 0,
                    offset: 0,
                })
            }
        });
        assert_eq!(
            ctx(processor, publisher)
                .handle(&job(10), &CancellationToken::new())
                .await,
            Outcome::DeadLettered
        );
    }

    /// A publish that fails for a reason that will not heal by itself (here the DLQ topic
    /// does not exist yet) holds the message visibly: readiness says which message and why,
    /// the gauge counts it, and it is never given up; once the topic exists, it moves on.
    #[tokio::test]
    async fn a_publish_that_will_not_heal_holds_the_message_visibly_until_it_succeeds() {
        let mut processor = MockProcessor::new();
        processor
            .expect_process()
            .returning(|_| Err(ProcessError::fatal("bad")));
        let created = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (c, a) = (created.clone(), attempts.clone());
        let mut publisher = MockPublisher::new();
        publisher.expect_publish().returning(move |_| {
            a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if c.load(std::sync::atomic::Ordering::SeqCst) {
                Ok(Ack {
                    partition: 0,
                    offset: 0,
                })
            } else {
                Err(PublishError {
                    kind: PublishFailure::UnknownTopic,
                    message: "Broker: Unknown topic or partition".into(),
                })
            }
        });
        let held = Held::start(processor, publisher);
        let (metrics, readiness) = (&held.metrics, &held.readiness);
        held.wait("the publish is retried", || {
            attempts.load(std::sync::atomic::Ordering::SeqCst) >= 5
        })
        .await;
        let handled = held.handled;
        let reason = readiness
            .check()
            .expect_err("not ready while a message is held");
        assert!(
            reason.contains("1 message(s) cannot be forwarded"),
            "{reason}"
        );
        assert!(reason.contains("ev/1@7"), "{reason}");
        assert!(reason.contains("ev-dlq"), "{reason}");
        assert_eq!(metrics.held_messages.get(), 1);
        assert!(
            !handled.is_finished(),
            "never given up while the consumer runs"
        );
        created.store(true, std::sync::atomic::Ordering::SeqCst);
        let outcome = tokio::time::timeout(Duration::from_secs(5), handled)
            .await
            .expect("moves on once the topic exists")
            .expect("task");
        assert_eq!(outcome, Outcome::DeadLettered);
        assert_eq!(readiness.check(), Ok(()));
        assert_eq!(metrics.held_messages.get(), 0);
    }

    /// A record the DLQ refuses even as a bare pointer is not abandoned: it holds its
    /// partition visibly, and shutdown leaves it uncommitted.
    #[tokio::test]
    async fn a_message_that_cannot_be_forwarded_anywhere_holds_until_shutdown() {
        let mut processor = MockProcessor::new();
        processor
            .expect_process()
            .returning(|_| Err(ProcessError::fatal("bad")));
        let mut publisher = MockPublisher::new();
        publisher.expect_publish().returning(|_| {
            Err(PublishError {
                kind: PublishFailure::MessageTooLarge,
                message: "too large".into(),
            })
        });
        let held = Held::start(processor, publisher);
        let (metrics, readiness, ctx) = (&held.metrics, &held.readiness, &held.ctx);
        held.wait("the message is held visibly", || {
            metrics.held_messages.get() > 0
        })
        .await;
        let handled = held.handled;
        assert!(readiness.check().unwrap_err().contains("ev/1@7"));
        assert!(!handled.is_finished());
        ctx.abort.cancel();
        let outcome = handled.await.expect("task");
        assert_eq!(
            outcome,
            Outcome::Abandoned,
            "left uncommitted for the next start"
        );
        assert_eq!(metrics.held_messages.get(), 0);
    }

    /// The start of an outage, through the worker: the first failure does not open the
    /// circuit and is not routed either; the second opens it; both messages are called again
    /// once the endpoint is back, and nothing reaches a retry topic or the DLQ.
    #[tokio::test(start_paused = true)]
    async fn failures_at_the_start_of_an_outage_are_held_not_routed() {
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d = down.clone();
        let mut processor = MockProcessor::new();
        processor.expect_process().returning(move |_| {
            if d.load(std::sync::atomic::Ordering::SeqCst) {
                Err(ProcessError::retryable("HTTP 503"))
            } else {
                Ok(())
            }
        });
        let mut publisher = MockPublisher::new();
        publisher.expect_publish().never();
        let mut ctx = ctx(processor, publisher);
        ctx.breaker = breaker(3);
        let ctx = Arc::new(ctx);
        let revoked = CancellationToken::new();
        answer_calls(&ctx, 2, &down).await;
        down.store(true, std::sync::atomic::Ordering::SeqCst);
        let first = job(10);
        let step = ctx.process(&first, &revoked).await;
        assert!(matches!(step, Step::Suspect(_)), "{step:?}");
        let settling = {
            let (ctx, revoked) = (ctx.clone(), revoked.clone());
            tokio::spawn(async move { ctx.finish(&first, step, &revoked).await })
        };
        let mut second = job(10);
        second.delivery.offset = 8;
        second.delivery.headers[0].1 = Some(b"m2".to_vec());
        let held = {
            let (ctx, revoked) = (ctx.clone(), revoked.clone());
            tokio::spawn(async move { ctx.handle(&second, &revoked).await })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            ctx.breaker.state(),
            crate::service::circuit::CircuitState::Open
        );
        assert!(!settling.is_finished() && !held.is_finished(), "both held");
        down.store(false, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(settling.await.unwrap(), Outcome::Ok);
        assert_eq!(held.await.unwrap(), Outcome::Ok);
    }

    /// A per-message failure while the endpoint answers other calls is routed as soon as
    /// another call is answered.
    #[tokio::test(start_paused = true)]
    async fn a_per_message_failure_is_routed_once_another_call_is_answered() {
        let mut processor = MockProcessor::new();
        processor.expect_process().returning(|d| {
            if d.offset == 7 && d.message_id() == Some("m1") {
                Err(ProcessError::retryable("HTTP 500"))
            } else {
                Ok(())
            }
        });
        let sent = Arc::new(Mutex::new(Vec::new()));
        let seen = sent.clone();
        let mut publisher = MockPublisher::new();
        publisher.expect_publish().returning(move |r| {
            seen.lock().push(r.topic);
            Ok(Ack {
                partition: 0,
                offset: 0,
            })
        });
        let mut ctx = ctx(processor, publisher);
        ctx.breaker = breaker(20);
        let ctx = Arc::new(ctx);
        let revoked = CancellationToken::new();
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
        answer_calls(&ctx, 20, &healthy).await;
        let failing = {
            let (ctx, revoked) = (ctx.clone(), revoked.clone());
            tokio::spawn(async move {
                let outcome = ctx.handle(&job(10), &revoked).await;
                (outcome, tokio::time::Instant::now())
            })
        };
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            !failing.is_finished(),
            "undecided until another call is answered (or the 0.5 s quiet gap passes)"
        );
        let answered = tokio::time::Instant::now();
        let mut other = job(10);
        other.delivery.offset = 8;
        other.delivery.headers[0].1 = Some(b"m2".to_vec());
        assert_eq!(ctx.handle(&other, &revoked).await, Outcome::Ok);
        let (outcome, at) = failing.await.unwrap();
        assert_eq!(outcome, Outcome::Retried(1));
        assert_eq!(at, answered, "at once");
        assert_eq!(*sent.lock(), vec!["ev-retry-1".to_owned()]);
    }

    #[test]
    fn retry_after_is_a_lower_bound_clamped_to_the_horizon() {
        let ctx = ctx(MockProcessor::new(), MockPublisher::new());
        assert_eq!(ctx.retry_delay(1, None), Duration::from_secs(1));
        assert_eq!(
            ctx.retry_delay(1, Some(Duration::from_secs(30))),
            Duration::from_secs(30)
        );
        assert_eq!(
            ctx.retry_delay(1, Some(Duration::from_millis(10))),
            Duration::from_secs(1)
        );
        assert_eq!(
            ctx.retry_delay(1, Some(Duration::from_secs(86_400 * 365))),
            Duration::from_secs(3600),
            "beyond the horizon the pipeline would treat it as due now: clamped"
        );
        assert_eq!(
            ctx.retry_delay(1, Some(Duration::MAX)),
            Duration::from_secs(3600)
        );
    }

    /// A processor that panics: a fatal failure, dead-lettered, its dedupe claim released
    /// (a later copy of the id is claimed anew, not skipped as in progress).
    #[tokio::test]
    async fn a_panicking_processor_is_fatal_and_releases_its_dedupe_claim() {
        struct Panics;
        #[async_trait::async_trait]
        impl Processor for Panics {
            async fn process(&self, _: &Delivery) -> Result<(), ProcessError> {
                panic!("boom")
            }
        }
        let sent = Arc::new(Mutex::new(Vec::new()));
        let seen = sent.clone();
        let mut publisher = MockPublisher::new();
        publisher.expect_publish().returning(move |r| {
            seen.lock().push(r);
            Ok(Ack {
                partition: 0,
                offset: 0,
            })
        });
        let mut ctx = ctx(MockProcessor::new(), publisher);
        ctx.processor = Arc::new(Panics);
        assert_eq!(
            ctx.handle(&job(10), &CancellationToken::new()).await,
            Outcome::DeadLettered
        );
        let h = CourierHeaders::parse(&sent.lock()[0].headers);
        assert_eq!(h.error_kind, Some(ErrorKind::Fatal));
        assert_eq!(
            h.error_message.as_deref(),
            Some("the processor panicked: boom")
        );
        assert_eq!(
            ctx.dedupe.claim("m1", None),
            Claim::Acquired,
            "the claim was released"
        );
    }
}
