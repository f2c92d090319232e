//! The Kafka publisher: a `FutureProducer` behind the service layer's [`Publisher`] trait.
//! A producer that hit a fatal error (e.g. a fatal idempotent-producer error) is replaced by
//! a fresh one the next time the health checker looks.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::RwLock;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;

use crate::config::Config;
use crate::model::{Ack, OutgoingRecord};
use crate::observability::Metrics;
use crate::service::publish::{PublishError, PublishFailure, Publisher};
use crate::transport::context::CourierContext;
use crate::transport::settings::{client_config, ClientRole};

/// Publishes records to Kafka and counts the outcome per topic.
pub struct KafkaPublisher {
    producer: RwLock<Arc<FutureProducer<CourierContext>>>,
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
        let producer: FutureProducer<CourierContext> =
            client_config.create_with_context(CourierContext::default())?;
        Ok(KafkaPublisher {
            producer: RwLock::new(Arc::new(producer)),
            client_config,
            metrics,
        })
    }

    fn current(&self) -> Arc<FutureProducer<CourierContext>> {
        self.producer.read().clone()
    }

    /// Replaces the producer if it hit a fatal error. Returns the error that caused it.
    /// Records queued in the old producer fail with [`PublishFailure::Fatal`] and are retried
    /// by their callers.
    pub fn recreate_if_fatal(&self) -> Option<String> {
        let (code, reason) = self.current().client().fatal_error()?;
        let reason = format!("{code:?}: {reason}");
        match self
            .client_config
            .create_with_context::<_, FutureProducer<CourierContext>>(CourierContext::default())
        {
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

#[async_trait]
impl Publisher for KafkaPublisher {
    async fn publish(&self, record: OutgoingRecord) -> Result<Ack, PublishError> {
        let producer = self.current();
        let mut fr: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&record.topic)
            .headers(crate::transport::headers::write(&record.headers));
        if let Some(k) = &record.key {
            fr = fr.key(k.as_slice());
        }
        if let Some(p) = &record.payload {
            fr = fr.payload(p.as_slice());
        }
        if let Some(p) = record.partition {
            fr = fr.partition(p);
        }
        let fail = |kind: PublishFailure, message: String| {
            self.metrics
                .publish_failures
                .with_label_values(&[&record.topic, kind.label()])
                .inc();
            PublishError { kind, message }
        };
        let started = std::time::Instant::now();
        let future = match producer.send_result(fr) {
            Ok(f) => f,
            Err((e, _)) => return Err(fail(classify(&e), e.to_string())),
        };
        match future.await {
            Ok(Ok(d)) => {
                self.metrics
                    .publish_duration
                    .observe(started.elapsed().as_secs_f64());
                self.metrics
                    .messages_published
                    .with_label_values(&[&record.topic])
                    .inc();
                Ok(Ack {
                    partition: d.partition,
                    offset: d.offset,
                })
            }
            Ok(Err((e, _))) => Err(fail(classify(&e), e.to_string())),
            Err(_) => Err(fail(
                PublishFailure::Fatal,
                "the producer was dropped before the delivery report".into(),
            )),
        }
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
}
