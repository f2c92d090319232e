//! The boundary between the service layer and whatever publishes records (Kafka in
//! production, a mock in unit tests).

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{FuturesUnordered, StreamExt};

use crate::model::{Ack, OutgoingRecord, RecordBatch};

/// Why a publish failed, classified by what the caller can do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishFailure {
    /// The local send queue is full: back off and retry.
    QueueFull,
    /// No acknowledgement in time (delivery timeout or request deadline).
    Timeout,
    /// No broker reachable.
    BrokerDown,
    /// The broker refused the record as too large: retrying will not help.
    MessageTooLarge,
    /// The topic does not exist (it may be being created).
    UnknownTopic,
    /// The record named a partition the topic does not have.
    UnknownPartition,
    /// Not authorized for the topic.
    Unauthorized,
    /// The producer hit a fatal error and must be recreated.
    Fatal,
    /// Anything else.
    Other,
}

impl PublishFailure {
    /// The `reason` label of `courier_publish_failures_total`.
    pub fn label(self) -> &'static str {
        match self {
            PublishFailure::QueueFull => "queue_full",
            PublishFailure::Timeout => "timeout",
            PublishFailure::BrokerDown => "broker_down",
            PublishFailure::MessageTooLarge => "message_too_large",
            PublishFailure::UnknownTopic => "unknown_topic",
            PublishFailure::UnknownPartition => "unknown_partition",
            PublishFailure::Unauthorized => "unauthorized",
            PublishFailure::Fatal => "fatal",
            PublishFailure::Other => "other",
        }
    }

    /// Whether the failure goes away without anyone acting: a full queue, a timeout, a
    /// broker that is down or a producer the health checker recreates. The others (no such
    /// topic or partition, no authorization, too large) need an operator, so a message they
    /// hold is made visible.
    pub fn heals_by_itself(self) -> bool {
        !matches!(
            self,
            PublishFailure::MessageTooLarge
                | PublishFailure::Unauthorized
                | PublishFailure::UnknownPartition
                | PublishFailure::UnknownTopic
        )
    }

    /// Whether the same publish may succeed later.
    pub fn is_transient(self) -> bool {
        !matches!(
            self,
            PublishFailure::MessageTooLarge
                | PublishFailure::Unauthorized
                | PublishFailure::UnknownPartition
        )
    }
}

/// A failed publish.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("publish failed ({}): {message}", .kind.label())]
pub struct PublishError {
    /// Classification.
    pub kind: PublishFailure,
    /// The client's message.
    pub message: String,
}

/// The outcome of each record of a [`Publisher::publish_all`], in batch order: `None` for a
/// record with no outcome by the deadline (it may still be delivered later).
pub type BatchResults = Vec<Option<Result<Ack, PublishError>>>;

/// Publishes one record and resolves once the broker has acknowledged it.
#[async_trait]
pub trait Publisher: Send + Sync + 'static {
    /// Publishes `record`; `Ok` only after the broker's acknowledgement.
    ///
    /// # Errors
    /// A classified [`PublishError`].
    async fn publish(&self, record: OutgoingRecord) -> Result<Ack, PublishError>;

    /// Waits up to `timeout` for queued records to be delivered; returns how many are still
    /// queued.
    async fn flush(&self, timeout: Duration) -> usize;

    /// Publishes every record of `batch` at once and waits for their acknowledgements, until
    /// `deadline` at most (`None`: until each one is acknowledged or has failed). Each record
    /// is published once; `Ok` only after the broker's acknowledgement. The default publishes
    /// each record with [`Publisher::publish`]; the Kafka publisher overrides it to wait for
    /// the whole batch at once.
    async fn publish_all(&self, batch: &RecordBatch, deadline: Option<Duration>) -> BatchResults {
        publish_each(self, batch, deadline).await
    }
}

/// [`Publisher::publish_all`] by one [`Publisher::publish`] per record, all at once, under one
/// deadline.
pub async fn publish_each<P: Publisher + ?Sized>(
    publisher: &P,
    batch: &RecordBatch,
    deadline: Option<Duration>,
) -> BatchResults {
    let mut results: BatchResults = vec![None; batch.len()];
    let mut pending: FuturesUnordered<_> = batch
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let record = r.to_record();
            async move { (i, publisher.publish(record).await) }
        })
        .collect();
    let all = async {
        while let Some((i, result)) = pending.next().await {
            results[i] = Some(result);
        }
    };
    match deadline {
        Some(d) => {
            let _ = tokio::time::timeout(d, all).await;
        }
        None => all.await,
    }
    results
}

#[cfg(test)]
mockall::mock! {
    /// A scripted [`Publisher`] for unit tests: `publish` and `flush` are mocked, and
    /// `publish_all` is the trait's default, so a batch goes through the scripted `publish`.
    pub Publisher {}
    #[async_trait]
    impl Publisher for Publisher {
        async fn publish(&self, record: OutgoingRecord) -> Result<Ack, PublishError>;
        async fn flush(&self, timeout: Duration) -> usize;
    }
}
