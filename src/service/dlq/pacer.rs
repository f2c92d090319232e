//! The replay rate: publishes spaced evenly, never in bursts.

use std::time::{Duration, Instant};

/// `start + n / rate`, so a slow moment is not followed by a burst above the average.
#[derive(Debug, Clone)]
pub struct Pacer {
    interval: Option<Duration>,
    start: Option<Instant>,
    sent: u32,
}

impl Pacer {
    /// A pacer for `rate` messages per second (`None`: unlimited).
    pub fn new(rate: Option<f64>) -> Self {
        Pacer {
            interval: rate
                .filter(|r| *r > 0.0 && r.is_finite())
                .map(|r| Duration::from_secs_f64(1.0 / r)),
            start: None,
            sent: 0,
        }
    }

    /// How long to wait before the next publish at `now`; counts that publish.
    pub fn next_delay(&mut self, now: Instant) -> Duration {
        let Some(interval) = self.interval else {
            return Duration::ZERO;
        };
        let start = *self.start.get_or_insert(now);
        let due = start + interval.saturating_mul(self.sent);
        self.sent = self.sent.saturating_add(1);
        due.saturating_duration_since(now)
    }
}
