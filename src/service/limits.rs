//! Limits toward the processor's endpoint, whatever the backlog: at most
//! `PROCESSOR_MAX_CONCURRENCY` calls at once, and at most `PROCESSOR_MAX_RATE` calls per
//! second (a token bucket from `governor`, with a burst of a tenth of a second's worth).

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The limits of one consumer process.
#[derive(Debug, Default)]
pub struct Limits {
    concurrency: Option<Arc<Semaphore>>,
    rate: Option<DefaultDirectRateLimiter>,
}

/// What a call holds while it runs.
#[derive(Debug)]
pub struct Permit {
    _held: Option<OwnedSemaphorePermit>,
}

impl Limits {
    /// `max_concurrency` calls at once (0: no limit beyond the worker lanes) and
    /// `max_rate` calls per second (0: no limit).
    pub fn new(max_concurrency: usize, max_rate: f64) -> Self {
        let concurrency = (max_concurrency > 0).then(|| Arc::new(Semaphore::new(max_concurrency)));
        let rate = (max_rate > 0.0 && max_rate.is_finite()).then(|| {
            let period = Duration::from_secs_f64(1.0 / max_rate).max(Duration::from_nanos(1));
            let burst =
                NonZeroU32::new((max_rate / 10.0).ceil().clamp(1.0, f64::from(u32::MAX)) as u32)
                    .unwrap_or(NonZeroU32::MIN);
            let quota = Quota::with_period(period)
                .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
                .allow_burst(burst);
            RateLimiter::direct(quota)
        });
        Limits { concurrency, rate }
    }

    /// A permit at once when no limit is set (the default), without a wait; `None` when a
    /// limit is set, and the caller then awaits [`Limits::acquire`].
    pub fn try_unlimited(&self) -> Option<Permit> {
        (self.concurrency.is_none() && self.rate.is_none()).then_some(Permit { _held: None })
    }

    /// Waits until a call may start.
    pub async fn acquire(&self) -> Permit {
        let permit = match &self.concurrency {
            // The semaphore is never closed.
            Some(s) => s.clone().acquire_owned().await.ok(),
            None => None,
        };
        if let Some(rate) = &self.rate {
            rate.until_ready().await;
        }
        Permit { _held: permit }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn no_limits_let_everything_through_at_once() {
        let l = Limits::new(0, 0.0);
        for _ in 0..10_000 {
            drop(l.acquire().await);
        }
    }

    #[tokio::test]
    async fn concurrency_is_bounded_by_the_permits() {
        let l = Arc::new(Limits::new(2, 0.0));
        let a = l.acquire().await;
        let _b = l.acquire().await;
        let third = {
            let l = l.clone();
            tokio::spawn(async move { l.acquire().await })
        };
        tokio::task::yield_now().await;
        assert!(!third.is_finished(), "a third call waits");
        drop(a);
        tokio::time::timeout(Duration::from_secs(1), third)
            .await
            .expect("starts once a call ends")
            .expect("task");
    }
}
