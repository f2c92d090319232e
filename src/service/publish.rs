//! The boundary between the service layer and whatever publishes records (Kafka in
//! production, a mock in unit tests).

use async_trait::async_trait;

use crate::model::{Ack, OutgoingRecord};

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

/// Publishes one record and resolves once the broker has acknowledged it.
#[cfg_attr(test, mockall::automock)]
#[async_trait]
pub trait Publisher: Send + Sync + 'static {
    /// Publishes `record`; `Ok` only after the broker's acknowledgement.
    ///
    /// # Errors
    /// A classified [`PublishError`].
    async fn publish(&self, record: OutgoingRecord) -> Result<Ack, PublishError>;

    /// Waits up to `timeout` for queued records to be delivered; returns how many are still
    /// queued.
    async fn flush(&self, timeout: std::time::Duration) -> usize;
}
