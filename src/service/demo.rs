//! The demo processor: fails a chosen share of messages so that `courier demo` has retries,
//! dead letters and duplicates to show. (The demo's presentation, its progress line and
//! summary, is in `app::demo`.)
//!
//! The failures must be reproducible: a message re-delivered (a retry, a replay, a restart)
//! must meet the same fate, or the flow would look random. So the fate of a message is a
//! pure function of its `message-id` (a hash of it), and how far a transient failure has
//! got is read from the message's own `courier-attempt` header rather than from memory in
//! this process.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;

use async_trait::async_trait;

use crate::model::Delivery;
use crate::service::processor::{ProcessError, Processor};

/// What share of messages fails, and how; the rest succeeds at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FailurePlan {
    /// Share (0..=1) of messages that fail once or twice, then succeed on a retry.
    pub transient_share: f64,
    /// Share (0..=1) of messages that never succeed: half of them fail fatally (straight to
    /// the DLQ), the other half keep failing retryably until every retry level is spent.
    pub permanent_share: f64,
}

impl FailurePlan {
    /// Checks the shares, naming the command-line flag of a bad one, so the demo can stop
    /// before it starts anything.
    ///
    /// # Errors
    /// A share outside 0..=1 (or not a number), or failure shares adding up to more than 1.
    pub fn validate(&self) -> Result<(), ShareError> {
        check_share("--transient-share", self.transient_share)?;
        check_share("--permanent-share", self.permanent_share)?;
        let sum = self.transient_share + self.permanent_share;
        if sum > 1.0 + f64::EPSILON {
            return Err(ShareError::OverOne {
                transient: self.transient_share,
                permanent: self.permanent_share,
                sum,
            });
        }
        Ok(())
    }

    /// The fate of the message whose identity is `id` (its `message-id`); the same id
    /// always gets the same fate, in any process.
    pub fn fate(&self, id: &[u8]) -> Fate {
        let h = stable_hash(id);
        // The top 53 bits pick the band; two low bits pick the variant within it.
        let u = (h >> 11) as f64 / (1u64 << 53) as f64;
        if u < self.transient_share {
            Fate::Transient {
                failures: 1 + (h & 1) as u32,
            }
        } else if u < self.transient_share + self.permanent_share {
            if h & 2 == 0 {
                Fate::Fatal
            } else {
                Fate::Exhausted
            }
        } else {
            Fate::Succeeds
        }
    }
}

/// A share the demo cannot use, naming its command-line flag.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ShareError {
    /// Not a number from 0 to 1.
    #[error("{flag}={value}: expected a number from 0 to 1")]
    OutOfRange {
        /// The flag, e.g. `--transient-share`.
        flag: &'static str,
        /// The value given.
        value: f64,
    },
    /// The failure shares add up to more than 1.
    #[error("--transient-share={transient} plus --permanent-share={permanent} is {sum}: expected at most 1")]
    OverOne {
        /// `--transient-share`.
        transient: f64,
        /// `--permanent-share`.
        permanent: f64,
        /// Their sum.
        sum: f64,
    },
}

/// Checks that a share is a number from 0 to 1, naming `flag` when it is not.
///
/// # Errors
/// [`ShareError::OutOfRange`].
pub fn check_share(flag: &'static str, value: f64) -> Result<(), ShareError> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(ShareError::OutOfRange { flag, value })
    }
}

/// What the demo processor does with one message, decided by the hash of its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Processed at the first attempt.
    Succeeds,
    /// Fails retryably this many times (1 or 2), then succeeds on a retry.
    Transient {
        /// Failed attempts before the success.
        failures: u32,
    },
    /// Fails fatally: straight to the DLQ (`courier-error-kind: fatal`).
    Fatal,
    /// Fails retryably every time: through every retry level into the DLQ
    /// (`courier-error-kind: exhausted`).
    Exhausted,
}

/// Live counts of the demo processor's calls, for the demo's summary and for tests.
#[derive(Debug, Default)]
pub struct ProcessorCounts {
    /// Calls of the processor (every attempt of every message).
    pub calls: AtomicU64,
    /// Attempts that succeeded.
    pub ok: AtomicU64,
    /// Retryable failures of messages that will succeed later.
    pub transient_failures: AtomicU64,
    /// Fatal failures (each sends its message to the DLQ).
    pub fatal: AtomicU64,
    /// Retryable failures of messages that never succeed.
    pub exhausting_failures: AtomicU64,
    /// Calls refused because the endpoint was down (`courier demo --outage`).
    pub outage_refusals: AtomicU64,
}

/// The processor of `courier demo`: fails a configured share of messages, deterministically
/// by `message-id`, so the retry topics and the DLQ have something to show.
#[derive(Debug)]
pub struct DemoProcessor {
    plan: FailurePlan,
    retry_max: u32,
    counts: ProcessorCounts,
    /// While set, every call fails as an unreachable endpoint would (`--outage`).
    down: AtomicBool,
    /// Ids whose last call was refused by the outage: once every message is finished, the
    /// ones left were routed on because of it (to the DLQ: the retry chain would have
    /// called them again).
    refused_last: Mutex<HashSet<Vec<u8>>>,
}

impl DemoProcessor {
    /// A processor following `plan`. A transient failure never needs more retries than
    /// `retry_max` (the configured levels), so a transient message always succeeds in the
    /// end; with `retry_max` 0 there is nothing to retry and transient messages succeed at
    /// once.
    pub fn new(plan: FailurePlan, retry_max: u32) -> Self {
        DemoProcessor {
            plan,
            retry_max,
            counts: ProcessorCounts::default(),
            down: AtomicBool::new(false),
            refused_last: Mutex::new(HashSet::new()),
        }
    }

    /// Takes the demo's endpoint down or brings it back (`courier demo --outage`).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Whether the endpoint is down.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    /// Messages whose last call the outage refused: after a complete drain, those the
    /// outage sent on (none while the circuit breaker holds them).
    pub fn routed_by_outage(&self) -> u64 {
        self.refused_last.lock().len() as u64
    }

    /// The live counts.
    pub fn counts(&self) -> &ProcessorCounts {
        &self.counts
    }

    /// The fate of `delivery`: by its `message-id`, else by its payload (a message
    /// produced without an id is still classified the same way on every delivery).
    pub fn fate_of(&self, delivery: &Delivery) -> Fate {
        let id = delivery
            .message_id()
            .map(str::as_bytes)
            .or(delivery.payload.as_deref())
            .unwrap_or_default();
        self.plan.fate(id)
    }

    /// What this attempt of `delivery` returns; `Ok(())` or the injected error.
    fn decide(&self, delivery: &Delivery) -> Result<(), ProcessError> {
        // `courier-attempt` counts the failed attempts so far (absent at the first one).
        let failed_so_far = delivery.courier_headers().attempt.unwrap_or(0);
        match self.fate_of(delivery) {
            Fate::Succeeds => Ok(()),
            Fate::Transient { failures } => {
                let failures = failures.min(self.retry_max);
                if failed_so_far < failures {
                    self.counts
                        .transient_failures
                        .fetch_add(1, Ordering::Relaxed);
                    Err(ProcessError::retryable(format!(
                        "demo: transient failure {} of {failures}; a retry will succeed",
                        failed_so_far + 1
                    )))
                } else {
                    Ok(())
                }
            }
            Fate::Fatal => {
                self.counts.fatal.fetch_add(1, Ordering::Relaxed);
                Err(ProcessError::fatal(
                    "demo: a permanent failure (chosen by the hash of the message-id); no retry can help",
                ))
            }
            Fate::Exhausted => {
                self.counts
                    .exhausting_failures
                    .fetch_add(1, Ordering::Relaxed);
                Err(ProcessError::retryable(
                    "demo: a failure that never clears; the message ends in the DLQ once every retry level is spent",
                ))
            }
        }
    }
}

#[async_trait]
impl Processor for DemoProcessor {
    async fn process(&self, delivery: &Delivery) -> Result<(), ProcessError> {
        self.counts.calls.fetch_add(1, Ordering::Relaxed);
        let id = delivery
            .message_id()
            .unwrap_or_default()
            .as_bytes()
            .to_vec();
        if self.down.load(Ordering::SeqCst) {
            self.counts.outage_refusals.fetch_add(1, Ordering::Relaxed);
            self.refused_last.lock().insert(id);
            return Err(ProcessError::unreachable(
                "demo: the endpoint is down (--outage); connection refused",
            ));
        }
        self.refused_last.lock().remove(&id);
        let result = self.decide(delivery);
        if result.is_ok() {
            self.counts.ok.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(message_id = delivery.message_id().unwrap_or(""), topic = %delivery.topic, "The demo processor accepted a message.");
        }
        result
    }
}

/// FNV-1a with a SplitMix64 finish: stable across processes, platforms and Rust versions
/// (unlike `DefaultHasher`), and well mixed even for ids that differ only in their tail.
fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{HEADER_ATTEMPT, HEADER_MESSAGE_ID};

    const PLAN: FailurePlan = FailurePlan {
        transient_share: 0.2,
        permanent_share: 0.1,
    };

    fn delivery(id: &str, attempt: Option<u32>) -> Delivery {
        let mut headers = vec![(HEADER_MESSAGE_ID.into(), Some(id.as_bytes().to_vec()))];
        if let Some(a) = attempt {
            headers.push((HEADER_ATTEMPT.into(), Some(a.to_string().into_bytes())));
        }
        Delivery {
            topic: "events".into(),
            partition: 0,
            offset: 0,
            key: None,
            payload: Some(b"{}".to_vec()),
            headers,
            timestamp_ms: None,
        }
    }

    fn id_with(plan: FailurePlan, want: impl Fn(Fate) -> bool) -> String {
        (0..10_000)
            .map(|i| format!("evt-{i}"))
            .find(|id| want(plan.fate(id.as_bytes())))
            .expect("some id has the wanted fate")
    }

    /// Runs `id` through the processor the way the retry chain would: each failure
    /// bumps `courier-attempt`, up to `retry_max` retries. Returns the results in order.
    async fn chain(p: &DemoProcessor, id: &str, retry_max: u32) -> Vec<Result<(), ProcessError>> {
        let mut out = Vec::new();
        for attempt in 0..=retry_max {
            let at = (attempt > 0).then_some(attempt);
            let r = p.process(&delivery(id, at)).await;
            let stop = !matches!(r, Err(ProcessError::Retryable { .. }));
            out.push(r);
            if stop {
                break;
            }
        }
        out
    }

    #[test]
    fn the_fate_is_a_function_of_the_id() {
        for i in 0..1000 {
            let id = format!("evt-{i}");
            assert_eq!(PLAN.fate(id.as_bytes()), PLAN.fate(id.as_bytes()));
        }
        // A fixed value, so a change of the hash (and of every demo's numbers) is noticed.
        assert_eq!(stable_hash(b"evt-1"), 0xb08a_34cf_f25e_60bf);
        assert_ne!(stable_hash(b"evt-1"), stable_hash(b"evt-2"));
    }

    #[test]
    fn shares_are_close_to_the_plan() {
        let n = 20_000;
        let (mut transient, mut fatal, mut exhausted, mut ok) = (0, 0, 0, 0);
        let mut failures = [0; 3];
        for _ in 0..n {
            match PLAN.fate(uuid::Uuid::now_v7().to_string().as_bytes()) {
                Fate::Transient { failures: f } => {
                    transient += 1;
                    failures[f as usize] += 1;
                }
                Fate::Fatal => fatal += 1,
                Fate::Exhausted => exhausted += 1,
                Fate::Succeeds => ok += 1,
            }
        }
        let share = |k: i32| f64::from(k) / f64::from(n);
        assert!(
            (share(transient) - 0.2).abs() < 0.02,
            "transient {transient}"
        );
        assert!((share(fatal + exhausted) - 0.1).abs() < 0.02);
        assert!(
            fatal > 0 && exhausted > 0,
            "both kinds of permanent failure"
        );
        assert!(failures[1] > 0 && failures[2] > 0, "one and two failures");
        assert!((share(ok) - 0.7).abs() < 0.02);
    }

    #[test]
    fn extreme_shares() {
        let none = FailurePlan {
            transient_share: 0.0,
            permanent_share: 0.0,
        };
        let all_transient = FailurePlan {
            transient_share: 1.0,
            permanent_share: 0.0,
        };
        let all_permanent = FailurePlan {
            transient_share: 0.0,
            permanent_share: 1.0,
        };
        for i in 0..500 {
            let id = format!("x-{i}");
            assert_eq!(none.fate(id.as_bytes()), Fate::Succeeds);
            assert!(matches!(
                all_transient.fate(id.as_bytes()),
                Fate::Transient { .. }
            ));
            assert!(matches!(
                all_permanent.fate(id.as_bytes()),
                Fate::Fatal | Fate::Exhausted
            ));
        }
    }

    #[test]
    fn shares_are_validated_with_the_flag_name() {
        assert!(PLAN.validate().is_ok());
        let e = FailurePlan {
            transient_share: 1.5,
            permanent_share: 0.0,
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("--transient-share=1.5:"), "{e}");
        let e = FailurePlan {
            transient_share: 0.0,
            permanent_share: f64::NAN,
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("--permanent-share=NaN:"), "{e}");
        let e = FailurePlan {
            transient_share: 0.6,
            permanent_share: 0.5,
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("expected at most 1"), "{e}");
        assert!(FailurePlan {
            transient_share: 0.7,
            permanent_share: 0.3
        }
        .validate()
        .is_ok());
        assert!(check_share("--duplicate-share", -0.1).is_err());
    }

    #[tokio::test]
    async fn transient_messages_succeed_after_their_failures() {
        for failures in [1, 2] {
            let id = id_with(PLAN, |f| f == Fate::Transient { failures });
            let p = DemoProcessor::new(PLAN, 3);
            let results = chain(&p, &id, 3).await;
            assert_eq!(results.len() as u32, failures + 1, "{results:?}");
            assert!(results[..failures as usize]
                .iter()
                .all(|r| matches!(r, Err(ProcessError::Retryable { .. }))));
            assert_eq!(results.last(), Some(&Ok(())));
            // The same attempt of the same message behaves the same (a re-delivery).
            let again = chain(&p, &id, 3).await;
            assert_eq!(again, results);
            assert_eq!(
                p.counts().transient_failures.load(Ordering::Relaxed),
                u64::from(2 * failures)
            );
        }
    }

    #[tokio::test]
    async fn transient_failures_never_outlast_the_retry_levels() {
        let id = id_with(PLAN, |f| f == Fate::Transient { failures: 2 });
        let p = DemoProcessor::new(PLAN, 1);
        assert_eq!(chain(&p, &id, 1).await.last(), Some(&Ok(())));
        let p = DemoProcessor::new(PLAN, 0);
        assert_eq!(chain(&p, &id, 0).await, vec![Ok(())]);
    }

    #[tokio::test]
    async fn permanent_messages_never_succeed() {
        let fatal = id_with(PLAN, |f| f == Fate::Fatal);
        let exhausted = id_with(PLAN, |f| f == Fate::Exhausted);
        let p = DemoProcessor::new(PLAN, 3);
        let r = chain(&p, &fatal, 3).await;
        assert!(
            matches!(r.as_slice(), [Err(ProcessError::Fatal(_))]),
            "{r:?}"
        );
        let r = chain(&p, &exhausted, 3).await;
        assert_eq!(r.len(), 4, "the first attempt and three retries");
        assert!(r
            .iter()
            .all(|r| matches!(r, Err(ProcessError::Retryable { .. }))));
        let c = p.counts();
        assert_eq!(c.calls.load(Ordering::Relaxed), 5);
        assert_eq!(c.fatal.load(Ordering::Relaxed), 1);
        assert_eq!(c.exhausting_failures.load(Ordering::Relaxed), 4);
        assert_eq!(c.ok.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn counts_add_up_over_many_messages() {
        let p = DemoProcessor::new(PLAN, 3);
        let mut ok_messages = 0;
        for i in 0..2000 {
            let results = chain(&p, &format!("m-{i}"), 3).await;
            ok_messages += u64::from(results.last() == Some(&Ok(())));
        }
        let c = p.counts();
        assert_eq!(c.ok.load(Ordering::Relaxed), ok_messages);
        let calls = c.calls.load(Ordering::Relaxed);
        let parts = c.ok.load(Ordering::Relaxed)
            + c.transient_failures.load(Ordering::Relaxed)
            + c.fatal.load(Ordering::Relaxed)
            + c.exhausting_failures.load(Ordering::Relaxed);
        assert_eq!(calls, parts);
        assert!(ok_messages > 1600 && ok_messages < 1900, "{ok_messages}");
    }

    #[tokio::test]
    async fn a_message_without_id_is_classified_by_its_payload() {
        let p = DemoProcessor::new(PLAN, 3);
        let mut d = delivery("x", None);
        d.headers.clear();
        let fate = p.fate_of(&d);
        assert_eq!(fate, PLAN.fate(b"{}"));
        assert_eq!(p.fate_of(&d), fate);
    }
}
