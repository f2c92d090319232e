//! A librdkafka client context that keeps the logs readable: librdkafka reports a global
//! error (e.g. `AllBrokersDown`) for every failed connection attempt, which during an
//! outage would flood the log. Each error kind is logged at most once per interval, with
//! the count of repeats it stood for; the health checker and `/readyz` carry the state.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::ClientContext;

/// At most one log line per error kind per this interval.
pub const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Rate-limits librdkafka's global errors by kind.
#[derive(Debug, Default)]
pub struct ErrorLimiter {
    /// Per kind: when it was last logged (never, at first) and the repeats since.
    seen: Mutex<HashMap<String, (Option<Instant>, u64)>>,
}

impl ErrorLimiter {
    /// Logs `error` unless one of its kind was logged within [`ERROR_LOG_INTERVAL`].
    pub fn report(&self, error: &KafkaError, reason: &str) {
        let kind = match error.rdkafka_error_code() {
            Some(code) => format!("{code:?}"),
            None => "other".to_owned(),
        };
        let repeats = {
            let mut seen = self.seen.lock();
            let now = Instant::now();
            // No `Instant` arithmetic: `now - interval` panics on a host up for less than
            // the interval, and this runs inside librdkafka's `extern "C"` callback.
            let entry = seen.entry(kind.clone()).or_insert((None, 0));
            if entry
                .0
                .is_some_and(|last| now.saturating_duration_since(last) < ERROR_LOG_INTERVAL)
            {
                entry.1 += 1;
                return;
            }
            let repeats = entry.1;
            *entry = (Some(now), 0);
            repeats
        };
        let transient = matches!(
            error.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::AllBrokersDown
                    | RDKafkaErrorCode::BrokerTransportFailure
                    | RDKafkaErrorCode::Resolve
                    | RDKafkaErrorCode::RequestTimedOut
                    | RDKafkaErrorCode::OperationTimedOut
            )
        );
        if transient {
            tracing::warn!(
                kind,
                repeats_suppressed = repeats,
                reason,
                "librdkafka reports a connection problem."
            );
        } else {
            tracing::error!(
                kind,
                repeats_suppressed = repeats,
                reason,
                "librdkafka reports an error."
            );
        }
    }
}

/// The client context of courier's producers and admin clients.
#[derive(Debug, Default)]
pub struct CourierContext {
    errors: ErrorLimiter,
}

impl ClientContext for CourierContext {
    fn error(&self, error: KafkaError, reason: &str) {
        self.errors.report(&error, reason);
    }
}

/// The health checker's probe client is a group-less consumer.
impl rdkafka::consumer::ConsumerContext for CourierContext {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_within_the_interval_are_counted_not_logged() {
        let l = ErrorLimiter::default();
        let e = KafkaError::Global(RDKafkaErrorCode::AllBrokersDown);
        l.report(&e, "first");
        for _ in 0..5 {
            l.report(&e, "again");
        }
        let other = KafkaError::Global(RDKafkaErrorCode::Resolve);
        l.report(&other, "a different kind is logged");
        let seen = l.seen.lock();
        assert_eq!(seen["AllBrokersDown"].1, 5);
        assert_eq!(seen["Resolve"].1, 0);
    }
}
