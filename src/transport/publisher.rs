//! The Kafka publisher: a librdkafka producer behind the service layer's [`Publisher`] trait.
//! A producer that hit a fatal error (e.g. a fatal idempotent-producer error) is replaced by
//! a fresh one the next time the health checker looks.
//!
//! Acknowledgements are gathered per call, not per record: every record of a
//! [`Publisher::publish_all`] (one for [`Publisher::publish`]) carries a [`Ticket`] to its
//! slot in one shared [`Pending`] state. librdkafka's delivery report, on the producer's
//! polling thread, writes the record's outcome into its slot, and the last one wakes the
//! waiting task: no channel, future or allocation per record, and one wake-up per call.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::task::AtomicWaker;
use parking_lot::RwLock;
use prometheus::{Histogram, IntCounter, IntCounterVec};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedHeaders, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::util::IntoOpaque;
use rdkafka::{ClientConfig, ClientContext};

use crate::config::Config;
use crate::model::{Ack, OutgoingRecord, RecordBatch};
use crate::observability::Metrics;
use crate::service::publish::{BatchResults, PublishError, PublishFailure, Publisher};
use crate::transport::context::CourierContext;
use crate::transport::settings::{client_config, ClientRole};

/// The producer: librdkafka's, with a polling thread that runs the delivery reports.
type KafkaProducer = ThreadedProducer<PublishContext>;

/// Publishes records to Kafka and counts the outcome per topic.
pub struct KafkaPublisher {
    producer: RwLock<Arc<KafkaProducer>>,
    client_config: ClientConfig,
    metrics: Metrics,
}

impl std::fmt::Debug for KafkaPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KafkaPublisher")
    }
}

impl KafkaPublisher {
    /// A publisher with the producer settings of `config`.
    ///
    /// # Errors
    /// When librdkafka rejects the configuration.
    pub fn new(config: &Config, metrics: Metrics) -> Result<Self, KafkaError> {
        let client_config = client_config(config, ClientRole::Producer);
        let producer = create(&client_config, &metrics)?;
        Ok(KafkaPublisher {
            producer: RwLock::new(Arc::new(producer)),
            client_config,
            metrics,
        })
    }

    fn current(&self) -> Arc<KafkaProducer> {
        self.producer.read().clone()
    }

    /// Replaces the producer if it hit a fatal error. Returns the error that caused it.
    /// Records queued in the old producer fail and are retried by their callers.
    pub fn recreate_if_fatal(&self) -> Option<String> {
        let (code, reason) = self.current().client().fatal_error()?;
        let reason = format!("{code:?}: {reason}");
        match create(&self.client_config, &self.metrics) {
            Ok(fresh) => {
                *self.producer.write() = Arc::new(fresh);
                tracing::error!(error = %reason, "The producer hit a fatal error and was recreated.");
            }
            Err(e) => {
                tracing::error!(error = %reason, recreate_error = %e, "The producer hit a fatal error and could not be recreated.");
            }
        }
        Some(reason)
    }

    /// Raises a fatal error in the current producer, as a broker-side fatal idempotence error
    /// would: for tests of the recovery path.
    #[doc(hidden)]
    pub fn inject_fatal_error_for_tests(&self) {
        let producer = self.current();
        let reason = std::ffi::CString::new("injected by a test").expect("static text has no NUL");
        // SAFETY: the pointer is the live client of `producer`, which this scope keeps alive;
        // librdkafka copies the reason string.
        unsafe {
            rdkafka::bindings::rd_kafka_test_fatal_error(
                producer.client().native_ptr(),
                rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
                reason.as_ptr(),
            );
        }
    }

    /// Messages queued or awaiting acknowledgement.
    pub fn in_flight(&self) -> i32 {
        self.current().in_flight_count()
    }

    /// The shared state of one call publishing `len` records to `topic`.
    fn pending(&self, topic: &str, len: usize) -> Arc<Pending> {
        Pending::new(
            topic,
            len,
            self.metrics.messages_published.with_label_values(&[topic]),
        )
    }

    /// Hands one record to librdkafka; a record it refuses at once (a full queue, a fatal
    /// producer) gets its failure in its slot right away.
    fn send(&self, producer: &KafkaProducer, record: BaseRecord<'_, [u8], [u8], Ticket>) {
        if let Err((e, record)) = producer.send(record) {
            let kind = classify(&e);
            count_failure(&self.metrics.publish_failures, record.topic, kind);
            record.delivery_opaque.complete(Err(PublishError {
                kind,
                message: e.to_string(),
            }));
        }
    }
}

/// A producer with courier's context on `client_config`.
fn create(client_config: &ClientConfig, metrics: &Metrics) -> Result<KafkaProducer, KafkaError> {
    client_config.create_with_context(PublishContext {
        base: CourierContext::default(),
        duration: metrics.publish_duration.clone(),
        failures: metrics.publish_failures.clone(),
    })
}

/// Classifies a librdkafka error by what the caller can do.
pub fn classify(err: &KafkaError) -> PublishFailure {
    let code = match err {
        KafkaError::MessageProduction(code) => Some(*code),
        other => other.rdkafka_error_code(),
    };
    match code {
        Some(RDKafkaErrorCode::QueueFull) => PublishFailure::QueueFull,
        Some(
            RDKafkaErrorCode::MessageTimedOut
            | RDKafkaErrorCode::RequestTimedOut
            | RDKafkaErrorCode::OperationTimedOut,
        ) => PublishFailure::Timeout,
        Some(
            RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::BrokerNotAvailable
            | RDKafkaErrorCode::NetworkException,
        ) => PublishFailure::BrokerDown,
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize) => {
            PublishFailure::MessageTooLarge
        }
        Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
            PublishFailure::UnknownTopic
        }
        Some(RDKafkaErrorCode::UnknownPartition) => PublishFailure::UnknownPartition,
        Some(
            RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::Authentication,
        ) => PublishFailure::Unauthorized,
        Some(RDKafkaErrorCode::Fatal) => PublishFailure::Fatal,
        _ => PublishFailure::Other,
    }
}

fn count_failure(failures: &IntCounterVec, topic: &str, kind: PublishFailure) {
    failures.with_label_values(&[topic, kind.label()]).inc();
}

#[async_trait]
impl Publisher for KafkaPublisher {
    async fn publish(&self, record: OutgoingRecord) -> Result<Ack, PublishError> {
        let producer = self.current();
        let pending = self.pending(&record.topic, 1);
        let mut base = BaseRecord::with_opaque_to(&record.topic, Ticket::new(&pending, 0))
            .headers(crate::transport::headers::write(&record.headers));
        base.key = record.key.as_deref();
        base.payload = record.payload.as_deref();
        base.partition = record.partition;
        self.send(&producer, base);
        drop(producer);
        Completion(&pending).await;
        pending
            .outcome(0)
            .expect("every slot has an outcome once the batch is complete")
    }

    async fn flush(&self, timeout: Duration) -> usize {
        let producer = self.current();
        tokio::task::spawn_blocking(move || {
            let _ = producer.flush(timeout);
            producer.in_flight_count().max(0) as usize
        })
        .await
        .unwrap_or(0)
    }

    async fn publish_all(&self, batch: &RecordBatch, deadline: Option<Duration>) -> BatchResults {
        let producer = self.current();
        let pending = self.pending(batch.topic(), batch.len());
        for (i, r) in batch.iter().enumerate() {
            let mut base = BaseRecord::with_opaque_to(r.topic(), Ticket::new(&pending, i))
                .payload(r.payload())
                .headers(native_headers(r.header_count(), r.headers()));
            base.key = r.key();
            base.partition = r.partition();
            self.send(&producer, base);
        }
        drop(producer);
        match deadline {
            Some(d) => {
                let _ = tokio::time::timeout(d, Completion(&pending)).await;
            }
            None => Completion(&pending).await,
        }
        (0..pending.slots.len())
            .map(|i| pending.outcome(i))
            .collect()
    }
}

/// A librdkafka header list with `headers`, names and values byte for byte (as
/// `transport::headers::write`, from borrowed parts).
fn native_headers<'a>(
    count: usize,
    headers: impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)>,
) -> OwnedHeaders {
    let owned = OwnedHeaders::new_with_capacity(count);
    let native =
        owned.as_borrowed() as *const BorrowedHeaders as *mut rdkafka::types::RDKafkaHeaders;
    for (name, value) in headers {
        let (value_ptr, value_len) = match value {
            Some(v) => (v.as_ptr().cast::<std::ffi::c_void>(), v.len() as isize),
            None => (std::ptr::null(), 0),
        };
        // SAFETY: `native` is the header list `owned` owns and keeps alive; librdkafka copies
        // `name.len()` bytes of the name and `value_len` bytes of the value. A list created by
        // `rd_kafka_headers_new` is writable, so adding cannot fail.
        unsafe {
            rdkafka::bindings::rd_kafka_header_add(
                native,
                name.as_ptr().cast::<std::ffi::c_char>(),
                name.len() as isize,
                value_ptr,
                value_len,
            );
        }
    }
    owned
}

/// The producer's context: the rate-limited error log of [`CourierContext`], and the
/// delivery reports that fill the [`Pending`] slots.
struct PublishContext {
    base: CourierContext,
    duration: Histogram,
    failures: IntCounterVec,
}

impl ClientContext for PublishContext {
    fn error(&self, error: KafkaError, reason: &str) {
        self.base.error(error, reason);
    }
}

impl ProducerContext for PublishContext {
    type DeliveryOpaque = Ticket;

    fn delivery(&self, result: &DeliveryResult<'_>, ticket: Ticket) {
        let pending = ticket.pending();
        let outcome = match result {
            Ok(m) => {
                self.duration
                    .observe(pending.started.elapsed().as_secs_f64());
                pending.published.inc();
                Ok(Ack {
                    partition: m.partition(),
                    offset: m.offset(),
                })
            }
            Err((e, _)) => {
                let kind = classify(e);
                count_failure(&self.failures, &pending.topic, kind);
                Err(PublishError {
                    kind,
                    message: e.to_string(),
                })
            }
        };
        ticket.complete(outcome);
    }
}

/// What one publishing call waits for: a slot per record, and how many are still open.
struct Pending {
    topic: String,
    started: Instant,
    published: IntCounter,
    remaining: AtomicUsize,
    waker: AtomicWaker,
    slots: Box<[Slot]>,
}

/// One record's outcome, and the way back to its [`Pending`].
struct Slot {
    pending: *const Pending,
    outcome: OnceLock<Result<Ack, PublishError>>,
}

// SAFETY: `pending` is only dereferenced by a `Ticket`, which holds a strong count of the
// `Arc<Pending>` it points into; everything else in a slot is `Send + Sync`.
unsafe impl Send for Slot {}
// SAFETY: as above.
unsafe impl Sync for Slot {}

impl Pending {
    fn new(topic: &str, len: usize, published: IntCounter) -> Arc<Pending> {
        let mut pending = Arc::new(Pending {
            topic: topic.to_owned(),
            started: Instant::now(),
            published,
            remaining: AtomicUsize::new(len),
            waker: AtomicWaker::new(),
            slots: (0..len)
                .map(|_| Slot {
                    pending: std::ptr::null(),
                    outcome: OnceLock::new(),
                })
                .collect(),
        });
        let ptr = Arc::as_ptr(&pending);
        let unique = Arc::get_mut(&mut pending).expect("a new Arc has no other reference");
        for slot in unique.slots.iter_mut() {
            slot.pending = ptr;
        }
        pending
    }

    fn is_complete(&self) -> bool {
        self.remaining.load(Ordering::Acquire) == 0
    }

    /// Record `i`'s outcome: `None` while it has none. A record whose ticket was dropped
    /// without one (librdkafka let go of it unreported) failed.
    fn outcome(&self, i: usize) -> Option<Result<Ack, PublishError>> {
        match self.slots[i].outcome.get() {
            Some(o) => Some(o.clone()),
            None if self.is_complete() => Some(Err(PublishError {
                kind: PublishFailure::Fatal,
                message: "the producer was dropped before the delivery report".into(),
            })),
            None => None,
        }
    }
}

/// Resolves once every record of a [`Pending`] has its outcome.
struct Completion<'a>(&'a Pending);

impl std::future::Future for Completion<'_> {
    type Output = ();

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.is_complete() {
            return Poll::Ready(());
        }
        self.0.waker.register(cx.waker());
        if self.0.is_complete() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// A record's way to its slot, handed to librdkafka as the message's opaque pointer: it
/// holds one strong count of the [`Pending`], so the slot outlives the record. Dropping it
/// closes the slot (with the outcome [`Ticket::complete`] wrote, if any) and wakes the
/// waiting task when it was the last one open.
pub struct Ticket(NonNull<Slot>);

// SAFETY: a ticket is a counted reference to a `Pending`, which is `Send + Sync`.
unsafe impl Send for Ticket {}
// SAFETY: as above.
unsafe impl Sync for Ticket {}

impl Ticket {
    fn new(pending: &Arc<Pending>, index: usize) -> Ticket {
        let slot = NonNull::from(&pending.slots[index]);
        // The count this ticket holds, released by its `Drop`.
        std::mem::forget(Arc::clone(pending));
        Ticket(slot)
    }

    fn slot(&self) -> &Slot {
        // SAFETY: the slot lives inside the `Pending` this ticket holds a count of.
        unsafe { self.0.as_ref() }
    }

    fn pending(&self) -> &Pending {
        // SAFETY: as in `slot`; `pending` points at the `Pending` that owns the slot.
        unsafe { &*self.slot().pending }
    }

    /// Writes the record's outcome and closes its slot.
    fn complete(self, outcome: Result<Ack, PublishError>) {
        let _ = self.slot().outcome.set(outcome);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let ptr = self.slot().pending;
        let pending = self.pending();
        if pending.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            pending.waker.wake();
        }
        // SAFETY: `ptr` came from `Arc::as_ptr` and this ticket owns one strong count of it
        // (taken in `Ticket::new`); nothing of the slot is touched after this.
        unsafe { drop(Arc::from_raw(ptr)) };
    }
}

impl IntoOpaque for Ticket {
    fn into_ptr(self) -> *mut std::ffi::c_void {
        let ptr = self.0.as_ptr().cast();
        std::mem::forget(self);
        ptr
    }

    unsafe fn from_ptr(ptr: *mut std::ffi::c_void) -> Self {
        // SAFETY: the caller passes a pointer made by `into_ptr`, once.
        Ticket(unsafe { NonNull::new_unchecked(ptr.cast()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(len: usize) -> Arc<Pending> {
        Pending::new("t", len, IntCounter::new("c", "c").unwrap())
    }

    #[test]
    fn the_last_ticket_completes_the_call_and_frees_the_state() {
        let p = pending(2);
        let (a, b) = (Ticket::new(&p, 0), Ticket::new(&p, 1));
        assert_eq!(Arc::strong_count(&p), 3);
        a.complete(Ok(Ack {
            partition: 1,
            offset: 7,
        }));
        assert!(!p.is_complete());
        assert_eq!(
            p.outcome(0),
            Some(Ok(Ack {
                partition: 1,
                offset: 7
            }))
        );
        assert_eq!(p.outcome(1), None, "open: no outcome yet");
        // A ticket librdkafka let go of without a report (through the opaque round trip).
        // SAFETY: the pointer was made by `into_ptr` just before, and used once.
        drop(unsafe { Ticket::from_ptr(b.into_ptr()) });
        assert!(p.is_complete());
        assert_eq!(
            p.outcome(1).unwrap().unwrap_err().kind,
            PublishFailure::Fatal
        );
        assert_eq!(
            Arc::strong_count(&p),
            1,
            "the tickets released their counts"
        );
    }

    #[tokio::test]
    async fn completion_wakes_the_waiting_task() {
        let p = pending(1);
        let t = Ticket::new(&p, 0);
        let waiter = {
            let p = p.clone();
            tokio::spawn(async move {
                Completion(&p).await;
                p.is_complete()
            })
        };
        tokio::task::yield_now().await;
        std::thread::spawn(move || {
            t.complete(Ok(Ack {
                partition: 0,
                offset: 0,
            }))
        })
        .join()
        .unwrap();
        let complete = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("woken")
            .unwrap();
        assert!(
            complete,
            "resolved only once the last record has its outcome"
        );
    }
}
