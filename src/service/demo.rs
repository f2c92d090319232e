//! The demo processor, and the demo's accounting: live counts and the summary whose
//! numbers must add up.
//!
//! `courier demo` needs failures to show the retry chain and the DLQ, and they must be
//! reproducible: a message re-delivered (a retry, a replay, a restart) must meet the same
//! fate, or the flow would look random. So the fate of a message is a pure function of its
//! `message-id` (a hash of it), and how far a transient failure has got is read from the
//! message's own `courier-attempt` header rather than from memory in this process.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use crate::config::{Config, RetryConfig};
use crate::model::Delivery;
use crate::observability::Metrics;
use crate::service::pipeline::ConsumerSummary;
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
    pub fn validate(&self) -> Result<(), String> {
        check_share("--transient-share", self.transient_share)?;
        check_share("--permanent-share", self.permanent_share)?;
        let sum = self.transient_share + self.permanent_share;
        if sum > 1.0 + f64::EPSILON {
            return Err(format!(
                "--transient-share={} plus --permanent-share={} is {sum}: expected at most 1",
                self.transient_share, self.permanent_share
            ));
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

/// Checks that a share is a number from 0 to 1, naming `flag` when it is not.
///
/// # Errors
/// `{flag}={value}: expected a number from 0 to 1`.
pub fn check_share(flag: &str, value: f64) -> Result<(), String> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(format!("{flag}={value}: expected a number from 0 to 1"))
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
}

/// The processor of `courier demo`: fails a configured share of messages, deterministically
/// by `message-id`, so the retry topics and the DLQ have something to show.
#[derive(Debug)]
pub struct DemoProcessor {
    plan: FailurePlan,
    retry_max: u32,
    counts: ProcessorCounts,
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
        }
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

/// The topics of the demo's accounting: which are sources, which are retry levels, and
/// the DLQ.
#[derive(Debug, Clone)]
pub struct DemoTopics {
    /// The source topics (what the demo produces to and consumes).
    pub sources: Vec<String>,
    /// The retry chain.
    pub retry: RetryConfig,
    /// Retry levels before the DLQ.
    pub retry_max: u32,
    /// Partitions per topic.
    pub partitions: i32,
}

impl DemoTopics {
    /// The topics of `config`.
    pub fn from_config(config: &Config) -> Self {
        DemoTopics {
            sources: config.consumer.topics.clone(),
            retry: config.retry.clone(),
            retry_max: config.consumer.retry_max,
            partitions: config.kafka.topic_partitions,
        }
    }

    /// The retry level of `topic` (0 for a source topic or anything else).
    pub fn level(&self, topic: &str) -> u32 {
        self.retry.level_of(topic, self.retry_max).unwrap_or(0)
    }

    /// Every retry level's delay added up: the longest a message can spend waiting in the
    /// chain, which bounds the demo's drain.
    pub fn chain_delay(&self) -> Duration {
        (1..=self.retry_max).map(|n| self.retry.delay(n)).sum()
    }
}

/// Live counts of a demo run, read from the metrics registry that the producer and the
/// consumer share (so the progress line and `/metrics` never disagree).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LiveCounts {
    /// Acknowledged publishes to the source topics.
    pub produced: u64,
    /// Messages processed successfully.
    pub ok: u64,
    /// Messages skipped as duplicates.
    pub duplicates: u64,
    /// Messages finished by a DLQ publish.
    pub dead_lettered: u64,
    /// Acknowledged publishes to each retry level (index 0 is level 1).
    pub retried: Vec<u64>,
    /// `courier_consumer_lag` summed over every partition.
    pub lag: i64,
}

impl LiveCounts {
    /// Reads the counts out of `metrics`.
    pub fn read(metrics: &Metrics, topics: &DemoTopics) -> Self {
        let mut c = LiveCounts {
            retried: vec![0; topics.retry_max as usize],
            ..LiveCounts::default()
        };
        for family in metrics.registry().gather() {
            for m in family.get_metric() {
                let label = |name: &str| {
                    m.get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map_or("", |l| l.value())
                };
                let count = m.get_counter().get_value() as u64;
                match family.name() {
                    "courier_messages_published_total" => {
                        c.add_published(label("topic"), count, topics)
                    }
                    "courier_messages_processed_total" => match label("outcome") {
                        "ok" => c.ok += count,
                        "duplicate" => c.duplicates += count,
                        "dlq" => c.dead_lettered += count,
                        _ => {}
                    },
                    "courier_consumer_lag" => c.lag += m.get_gauge().get_value() as i64,
                    _ => {}
                }
            }
        }
        c
    }

    fn add_published(&mut self, topic: &str, count: u64, topics: &DemoTopics) {
        if topics.sources.iter().any(|t| t == topic) {
            self.produced += count;
        } else if let Some(n) = (topics.level(topic) as usize)
            .checked_sub(1)
            .and_then(|i| self.retried.get_mut(i))
        {
            *n += count;
        }
    }

    /// Messages finished for good: ok, duplicate or dead-lettered.
    pub fn finished(&self) -> u64 {
        self.ok + self.duplicates + self.dead_lettered
    }

    /// Produced messages not finished yet (in flight, or waiting in the retry chain).
    pub fn pending(&self) -> u64 {
        self.produced.saturating_sub(self.finished())
    }

    /// One progress line, within about 80 columns for four-digit counts.
    pub fn line(&self, elapsed: Duration) -> String {
        let retried: Vec<String> = self.retried.iter().map(u64::to_string).collect();
        format!(
            "{:>6.1}s produced {} ok {} retried {} dlq {} dup {} pending {} lag {}",
            elapsed.as_secs_f64(),
            self.produced,
            self.ok,
            retried.join("/"),
            self.dead_lettered,
            self.duplicates,
            self.pending(),
            self.lag
        )
    }
}

/// How the demo's drain ended: only a complete drain can add up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainEnd {
    /// Every produced message was finished.
    Complete,
    /// The user stopped waiting (Ctrl-C).
    Interrupted,
    /// The wait hit its limit (the retry chain's delays plus slack).
    TimedOut,
    /// The consumer stopped by itself.
    ConsumerStopped,
}

impl std::fmt::Display for DrainEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DrainEnd::Complete => "the drain finished every message",
            DrainEnd::Interrupted => "the drain was interrupted",
            DrainEnd::TimedOut => "the drain hit its time limit",
            DrainEnd::ConsumerStopped => "the consumer stopped by itself",
        })
    }
}

/// The outcome of a demo run: the numbers of its summary table.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoSummary {
    /// Messages acknowledged on the source topics (generated and sent to the ingest API).
    pub produced: u64,
    /// Of `produced`, the generator's.
    pub generated: u64,
    /// Generated events that re-used an earlier id.
    pub resent_ids: u64,
    /// Messages processed successfully (each counted once, at its successful attempt).
    pub ok: u64,
    /// Of `ok`, those that succeeded on a retry topic.
    pub ok_after_retry: u64,
    /// Messages skipped because their `message-id` was already processed (or in progress).
    pub duplicates: u64,
    /// Messages published to the DLQ.
    pub dead_lettered: u64,
    /// Of `dead_lettered`, the processor's fatal failures (the rest exhausted the retries).
    pub fatal: u64,
    /// Messages sent to each retry level: index 0 is `{prefix}-1`.
    pub retried: Vec<u64>,
    /// Messages left unfinished when the consumer stopped (consumed again after a restart).
    pub abandoned: u64,
    /// Processor calls (every attempt of every message).
    pub processor_calls: u64,
    /// How long events were generated.
    pub ran_for: Duration,
    /// How long the drain took.
    pub drained_in: Duration,
    /// How the drain ended.
    pub drain: DrainEnd,
    /// The `/metrics` URL served during the run.
    pub metrics_url: String,
    /// The ingest API's address.
    pub ingest_addr: SocketAddr,
}

impl DemoSummary {
    /// Whether every produced message is accounted for exactly once: ok, duplicate or DLQ.
    pub fn adds_up(&self) -> bool {
        self.produced == self.ok + self.duplicates + self.dead_lettered
    }

    /// The accounting as one line, ending in ✓ when it adds up and ✗ (with why) when not.
    pub fn check_line(&self) -> String {
        let sum = format!(
            "ok {} + duplicates {} + dead-lettered {}",
            self.ok, self.duplicates, self.dead_lettered
        );
        if self.adds_up() {
            return format!("produced {} = {sum} ✓", self.produced);
        }
        let finished = self.ok + self.duplicates + self.dead_lettered;
        let why = if finished < self.produced {
            let cut = match self.drain {
                DrainEnd::Complete => String::new(),
                end => format!(": {end}"),
            };
            format!("{} not finished{cut}", self.produced - finished)
        } else {
            format!("{} finished more than once", finished - self.produced)
        };
        format!("produced {} ≠ {sum} ✗ ({why})", self.produced)
    }

    /// Adds the consumer's per-partition counts (its shutdown summary).
    pub fn add_partitions(&mut self, summary: &ConsumerSummary, topics: &DemoTopics) {
        for (tp, p) in summary {
            let level = topics.level(&tp.topic);
            self.ok += p.ok;
            if level > 0 {
                self.ok_after_retry += p.ok;
            }
            self.duplicates += p.duplicates;
            self.dead_lettered += p.dead_lettered;
            self.abandoned += p.abandoned;
            // A retry from level L goes to level L + 1, at index L.
            if let Some(n) = self.retried.get_mut(level as usize) {
                *n += p.retried;
            }
        }
    }

    /// The rows of the summary table: what, how many, and a note.
    fn rows(&self, topics: &DemoTopics) -> Vec<(String, u64, String)> {
        let row = |what: &str, n: u64, note: String| (what.to_owned(), n, note);
        let via_api = self.produced.saturating_sub(self.generated);
        let sources = topics.sources.join(",");
        let mut rows = vec![
            row(
                "produced",
                self.produced,
                format!(
                    "on {sources} ({} generated, {via_api} via the ingest API)",
                    self.generated
                ),
            ),
            row(
                "processed ok",
                self.ok,
                format!("{} of them on a retry", self.ok_after_retry),
            ),
        ];
        for (i, n) in self.retried.iter().enumerate() {
            let topic = topics.retry.topic(i as u32 + 1);
            rows.push(row(&format!("retried to {topic}"), *n, String::new()));
        }
        let exhausted = self.dead_lettered.saturating_sub(self.fatal);
        let dlq = &topics.retry.dlq_topic;
        rows.push(row(
            "dead-lettered",
            self.dead_lettered,
            format!(
                "on {dlq} ({} fatal, {exhausted} exhausted every retry)",
                self.fatal
            ),
        ));
        rows.push(row(
            "duplicates skipped",
            self.duplicates,
            format!(
                "the generator re-used {} ids; a copy of a failed message is processed again",
                self.resent_ids
            ),
        ));
        rows.push(row(
            "processor calls",
            self.processor_calls,
            "every attempt of every message".into(),
        ));
        if self.abandoned > 0 {
            rows.push(row(
                "left unfinished",
                self.abandoned,
                "uncommitted; consumed again after a restart".into(),
            ));
        }
        rows
    }

    /// Writes the summary table and the accounting line.
    ///
    /// # Errors
    /// When `out` fails.
    pub fn write_table(&self, out: &mut dyn Write, topics: &DemoTopics) -> std::io::Result<()> {
        let cut = if self.drain == DrainEnd::Complete {
            ""
        } else {
            ", cut short"
        };
        let (ran, drained) = (self.ran_for.as_secs_f64(), self.drained_in.as_secs_f64());
        writeln!(
            out,
            "\nSummary (generated for {ran:.1}s, drained in {drained:.1}s{cut})"
        )?;
        for (what, n, note) in self.rows(topics) {
            writeln!(out, "{}", format!("  {what:<26}{n:>7}   {note}").trim_end())?;
        }
        writeln!(out, "\n{}", self.check_line())
    }
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
        .unwrap_err();
        assert!(e.starts_with("--transient-share=1.5:"), "{e}");
        let e = FailurePlan {
            transient_share: 0.0,
            permanent_share: f64::NAN,
        }
        .validate()
        .unwrap_err();
        assert!(e.starts_with("--permanent-share=NaN:"), "{e}");
        let e = FailurePlan {
            transient_share: 0.6,
            permanent_share: 0.5,
        }
        .validate()
        .unwrap_err();
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

    fn topics() -> DemoTopics {
        DemoTopics {
            sources: vec!["events".into()],
            retry: RetryConfig {
                topic_prefix: "events-retry".into(),
                backoff: vec![Duration::from_secs(1), Duration::from_secs(2)],
                dlq_topic: "events-dlq".into(),
            },
            retry_max: 3,
            partitions: 6,
        }
    }

    fn summary(produced: u64, ok: u64, dup: u64, dlq: u64, drain: DrainEnd) -> DemoSummary {
        DemoSummary {
            produced,
            generated: produced,
            resent_ids: dup,
            ok,
            ok_after_retry: 0,
            duplicates: dup,
            dead_lettered: dlq,
            fatal: 0,
            retried: vec![0; 3],
            abandoned: 0,
            processor_calls: 0,
            ran_for: Duration::ZERO,
            drained_in: Duration::ZERO,
            drain,
            metrics_url: String::new(),
            ingest_addr: "127.0.0.1:8080".parse().unwrap(),
        }
    }

    #[test]
    fn the_check_line_says_whether_and_why() {
        let s = summary(1500, 1310, 75, 115, DrainEnd::Complete);
        assert!(s.adds_up());
        assert_eq!(
            s.check_line(),
            "produced 1500 = ok 1310 + duplicates 75 + dead-lettered 115 ✓"
        );
        let s = summary(1500, 1300, 75, 115, DrainEnd::Interrupted);
        assert!(!s.adds_up());
        assert!(s
            .check_line()
            .ends_with("✗ (10 not finished: the drain was interrupted)"));
        let s = summary(10, 9, 1, 1, DrainEnd::Complete);
        assert!(s.check_line().contains("1 finished more than once"));
    }

    #[test]
    fn live_counts_read_the_shared_metrics() {
        let m = Metrics::new();
        let t = topics();
        m.messages_published
            .with_label_values(&["events"])
            .inc_by(10);
        m.messages_published
            .with_label_values(&["events-retry-2"])
            .inc_by(2);
        m.messages_published
            .with_label_values(&["events-dlq"])
            .inc();
        for (topic, outcome, n) in [
            ("events", "ok", 6),
            ("events-retry-1", "ok", 1),
            ("events", "duplicate", 2),
            ("events-retry-3", "dlq", 1),
            ("events", "retry", 3),
        ] {
            m.messages_processed
                .with_label_values(&[topic, outcome])
                .inc_by(n);
        }
        m.consumer_lag.with_label_values(&["events", "0"]).set(4);
        let c = LiveCounts::read(&m, &t);
        assert_eq!(
            (c.produced, c.ok, c.duplicates, c.dead_lettered, c.lag),
            (10, 7, 2, 1, 4)
        );
        assert_eq!(c.retried, vec![0, 2, 0]);
        assert_eq!((c.finished(), c.pending()), (10, 0));
        let line = c.line(Duration::from_secs(3));
        assert!(
            line.contains("retried 0/2/0 dlq 1 dup 2 pending 0 lag 4"),
            "{line}"
        );
        assert_eq!(t.chain_delay(), Duration::from_secs(5));
    }

    #[test]
    fn the_summary_sums_partitions_by_level() {
        use crate::service::pipeline::PartitionCounts;
        use crate::service::source::Tp;
        let t = topics();
        let mut per = ConsumerSummary::new();
        let p = |ok, retried, dead_lettered, duplicates| PartitionCounts {
            ok,
            retried,
            dead_lettered,
            duplicates,
            ..PartitionCounts::default()
        };
        per.insert(Tp::new("events", 0), p(80, 15, 3, 2));
        per.insert(Tp::new("events", 1), p(10, 5, 0, 0));
        per.insert(Tp::new("events-retry-1", 0), p(12, 8, 0, 0));
        per.insert(Tp::new("events-retry-3", 2), p(0, 0, 2, 0));
        let mut s = summary(0, 0, 0, 0, DrainEnd::Complete);
        s.add_partitions(&per, &t);
        assert_eq!(
            (s.ok, s.ok_after_retry, s.duplicates, s.dead_lettered),
            (102, 12, 2, 5)
        );
        assert_eq!(s.retried, vec![20, 8, 0]);
        s.produced = 109;
        assert!(s.adds_up());
        let mut out = Vec::new();
        s.write_table(&mut out, &t).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("retried to events-retry-1"), "{text}");
        assert!(text.ends_with("dead-lettered 5 ✓\n"), "{text}");
    }
}
