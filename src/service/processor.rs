//! The `Processor` trait and the built-in processors.

use std::time::Duration;

use async_trait::async_trait;

use crate::model::Delivery;

/// Why processing failed, which decides where the message goes next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProcessError {
    /// May succeed later: the message goes to the next retry topic (or the DLQ when the
    /// levels are exhausted). `retry_after` is a lower bound for the next due time, e.g.
    /// from an HTTP `Retry-After` header.
    #[error("retryable: {reason}")]
    Retryable {
        /// What went wrong.
        reason: String,
        /// Do not retry sooner than this.
        retry_after: Option<Duration>,
        /// The endpoint could not be reached (connection error or timeout): a run of these
        /// opens the circuit breaker sooner than other failures do.
        unreachable: bool,
    },
    /// Will never succeed: the message goes to the DLQ at once.
    #[error("fatal: {0}")]
    Fatal(String),
}

impl ProcessError {
    /// A retryable error without a `retry_after` hint.
    pub fn retryable(reason: impl Into<String>) -> Self {
        ProcessError::Retryable {
            reason: reason.into(),
            retry_after: None,
            unreachable: false,
        }
    }

    /// A retryable error because the endpoint could not be reached (connection error or
    /// timeout).
    pub fn unreachable(reason: impl Into<String>) -> Self {
        ProcessError::Retryable {
            reason: reason.into(),
            retry_after: None,
            unreachable: true,
        }
    }

    /// A fatal error.
    pub fn fatal(reason: impl Into<String>) -> Self {
        ProcessError::Fatal(reason.into())
    }

    /// The error text without the kind prefix.
    pub fn reason(&self) -> &str {
        match self {
            ProcessError::Retryable { reason, .. } | ProcessError::Fatal(reason) => reason,
        }
    }
}

/// Processes one message. Implementations must be safe to call concurrently from many
/// worker lanes; one key's messages are never processed concurrently.
#[cfg_attr(test, mockall::automock)]
#[async_trait]
pub trait Processor: Send + Sync + 'static {
    /// Processes `delivery`.
    ///
    /// # Errors
    /// [`ProcessError::Retryable`] or [`ProcessError::Fatal`].
    async fn process(&self, delivery: &Delivery) -> Result<(), ProcessError>;
}
