//! The event generator (`courier producer --generate`): seed-style events of the
//! orders/payments/notifications flow at a steady rate, for load tests and demos.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, RngExt};
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::model::Envelope;
use crate::service::ingest::Ledger;
use crate::service::publish::Publisher;

/// The event types the generator knows.
pub const EVENT_TYPES: &[&str] = &["order_created", "payment_received", "notification_sent"];

/// How many generated events may await the broker's acknowledgement at once unless a caller
/// chooses otherwise: enough to keep the producer's batches full at any rate the generator
/// is used for, while bounding the memory of a run against a slow or unreachable broker.
pub const DEFAULT_MAX_PENDING: usize = 10_000;

/// Generator settings.
#[derive(Debug, Clone)]
pub struct GeneratorConfig {
    /// Topic to publish to.
    pub topic: String,
    /// Events per second.
    pub rate: f64,
    /// Stop after this many events (`None`: until shutdown).
    pub count: Option<u64>,
    /// Event types to cycle through (a subset of [`EVENT_TYPES`]).
    pub types: Vec<String>,
    /// Share of events (0.0..=1.0) re-sent with an earlier event's id, to show dedupe.
    pub duplicate_share: f64,
    /// Publishes awaiting acknowledgement at most.
    pub max_pending: usize,
}

/// Live counts of a generator run.
#[derive(Debug, Default)]
pub struct GeneratorStats {
    /// Events handed to the publisher.
    pub sent: AtomicU64,
    /// Acknowledged by the broker.
    pub acked: AtomicU64,
    /// Failed (after the publisher's own retries).
    pub failed: AtomicU64,
    /// Acknowledged events that re-used an earlier id.
    pub duplicates: AtomicU64,
}

/// A `--types` value the generator cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TypesError {
    /// No type named.
    #[error("--types: expected one or more of {}", EVENT_TYPES.join(","))]
    Empty,
    /// A type the generator does not know.
    #[error("--types={given}: unknown type `{unknown}`; expected one or more of {}", EVENT_TYPES.join(","))]
    Unknown {
        /// The whole flag value.
        given: String,
        /// The first unknown type in it.
        unknown: String,
    },
}

/// Parses `--types`: a comma-separated subset of [`EVENT_TYPES`].
///
/// # Errors
/// [`TypesError`], naming the unknown type and listing the known ones.
pub fn parse_types(s: &str) -> Result<Vec<String>, TypesError> {
    let types: Vec<String> = s
        .split(',')
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .collect();
    if types.is_empty() {
        return Err(TypesError::Empty);
    }
    if let Some(t) = types.iter().find(|t| !EVENT_TYPES.contains(&t.as_str())) {
        return Err(TypesError::Unknown {
            given: s.to_owned(),
            unknown: t.clone(),
        });
    }
    Ok(types)
}

fn pick(options: &[&'static str], rng: &mut impl Rng) -> &'static str {
    options[rng.random_range(0..options.len())]
}

/// One seed-style event of type `kind`, number `n`.
pub fn make_event(kind: &str, n: u64, rng: &mut impl Rng) -> serde_json::Value {
    let order = format!("ord-{:06}", n / 3);
    let customer = format!("cust-{:04}", rng.random_range(0..1000));
    let data = match kind {
        "order_created" => {
            json!({"order_id": order, "customer_id": customer, "amount": (rng.random_range(100..100_000) as f64) / 100.0, "currency": "EUR", "items": rng.random_range(1..6)})
        }
        "payment_received" => {
            json!({"payment_id": format!("pay-{n:06}"), "order_id": order, "amount": (rng.random_range(100..100_000) as f64) / 100.0, "method": pick(&["card", "transfer", "wallet"], rng)})
        }
        _ => {
            json!({"notification_id": format!("ntf-{n:06}"), "customer_id": customer, "channel": pick(&["email", "sms", "push"], rng), "template": "order_update"})
        }
    };
    let time = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    json!({"type": kind, "source": "courier-generator", "time": time, "key": order, "data": data})
}

/// Runs the generator until `count` events are acknowledged or failed, or `shutdown`.
/// Waits for every publish it started before returning.
pub async fn run(
    cfg: GeneratorConfig,
    publisher: Arc<dyn Publisher>,
    ledger: Arc<Ledger>,
    stats: Arc<GeneratorStats>,
    shutdown: CancellationToken,
) {
    let max_pending = cfg.max_pending.max(1);
    let pending = Arc::new(Semaphore::new(max_pending));
    let tick = Duration::from_millis(10);
    let per_tick = cfg.rate.max(0.001) * tick.as_secs_f64();
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut budget = 0.0f64;
    let mut events = Events::new(&cfg);
    let sink = Sink {
        publisher,
        ledger,
        stats,
        topic: cfg.topic.clone(),
    };
    'outer: loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        budget += per_tick;
        while budget >= 1.0 {
            if cfg.count.is_some_and(|c| events.made >= c) {
                break 'outer;
            }
            budget -= 1.0;
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break 'outer,
                p = pending.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            };
            if let Some((env, duplicate)) = events.next() {
                sink.spawn_publish(env, duplicate, permit);
            }
        }
    }
    // Wait for every started publish to finish.
    let _ = pending.acquire_many(max_pending as u32).await;
}

/// How many recent ids the generator remembers to re-send.
const RECENT_IDS: usize = 1024;

/// The generated events in order: the types in turn, a share of them re-using the id of a
/// recent event.
struct Events {
    types: Vec<String>,
    duplicate_share: f64,
    /// Events made so far (counted by `--count`).
    made: u64,
    recent_ids: Vec<String>,
}

impl Events {
    fn new(cfg: &GeneratorConfig) -> Self {
        let types = if cfg.types.is_empty() {
            EVENT_TYPES.iter().map(|s| s.to_string()).collect()
        } else {
            cfg.types.clone()
        };
        Events {
            types,
            duplicate_share: cfg.duplicate_share.clamp(0.0, 1.0),
            made: 0,
            recent_ids: Vec::with_capacity(RECENT_IDS),
        }
    }

    /// The next event, and whether it re-uses an earlier id. Generated events are always
    /// valid envelopes; one that is not would be skipped (`None`), still counted as made.
    fn next(&mut self) -> Option<(Envelope, bool)> {
        let n = self.made;
        let (value, duplicate) = {
            let mut rng = rand::rng();
            let mut v = make_event(&self.types[(n as usize) % self.types.len()], n, &mut rng);
            let dup = !self.recent_ids.is_empty() && rng.random_bool(self.duplicate_share);
            if dup {
                v["id"] = json!(self.recent_ids[rng.random_range(0..self.recent_ids.len())]);
            }
            (v, dup)
        };
        self.made += 1;
        let env = Envelope::from_value(value).ok()?;
        if !duplicate {
            if self.recent_ids.len() < RECENT_IDS {
                self.recent_ids.push(env.id.clone())
            } else {
                self.recent_ids[(self.made as usize) % RECENT_IDS] = env.id.clone()
            }
        }
        Some((env, duplicate))
    }
}

/// Where generated events go, and what counts them.
struct Sink {
    publisher: Arc<dyn Publisher>,
    ledger: Arc<Ledger>,
    stats: Arc<GeneratorStats>,
    topic: String,
}

impl Sink {
    /// Publishes `env` on a task of its own, which holds `permit` until the broker answered.
    fn spawn_publish(&self, env: Envelope, duplicate: bool, permit: OwnedSemaphorePermit) {
        self.stats.sent.fetch_add(1, Ordering::Relaxed);
        let (publisher, ledger, stats, topic) = (
            self.publisher.clone(),
            self.ledger.clone(),
            self.stats.clone(),
            self.topic.clone(),
        );
        tokio::spawn(async move {
            let res = publisher.publish(env.to_record(&topic)).await;
            ledger.record(&topic, &res);
            match &res {
                Ok(_) if duplicate => {
                    stats.acked.fetch_add(1, Ordering::Relaxed);
                    stats.duplicates.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {
                    stats.acked.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(message_id = %env.id, topic, error = %e, "A generated event was not published.");
                }
            }
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Ack;
    use crate::service::publish::MockPublisher;

    #[test]
    fn types_are_validated() {
        assert_eq!(
            parse_types("order_created, payment_received")
                .unwrap()
                .len(),
            2
        );
        assert!(parse_types("order_created,refund")
            .unwrap_err()
            .to_string()
            .contains("unknown type `refund`"));
        assert!(parse_types(" , ").is_err());
    }

    #[test]
    fn events_are_valid_envelopes() {
        let mut rng = rand::rng();
        for (i, t) in EVENT_TYPES.iter().enumerate() {
            let env = Envelope::from_value(make_event(t, i as u64, &mut rng)).unwrap();
            assert_eq!(env.event_type, *t);
        }
    }

    #[tokio::test]
    async fn publishes_count_events_with_duplicates() {
        let mut p = MockPublisher::new();
        p.expect_publish().times(200).returning(|_| {
            Ok(Ack {
                partition: 0,
                offset: 0,
            })
        });
        let stats = Arc::new(GeneratorStats::default());
        let cfg = GeneratorConfig {
            topic: "events".into(),
            rate: 20_000.0,
            count: Some(200),
            types: vec![],
            duplicate_share: 0.2,
            max_pending: 16,
        };
        run(
            cfg,
            Arc::new(p),
            Arc::new(Ledger::default()),
            stats.clone(),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(stats.acked.load(Ordering::Relaxed), 200);
        let dups = stats.duplicates.load(Ordering::Relaxed);
        assert!(
            dups > 5 && dups < 100,
            "about a fifth are duplicates: {dups}"
        );
    }
}
