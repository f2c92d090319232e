//! The event generator (`courier producer --generate`): seed-style events of the
//! orders/payments/notifications flow at a steady rate, for load tests and demos.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, RngExt};
use serde_json::json;
use tokio::sync::Semaphore;
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

/// Parses `--types`: a comma-separated subset of [`EVENT_TYPES`].
///
/// # Errors
/// Names the unknown type and lists the known ones.
pub fn parse_types(s: &str) -> Result<Vec<String>, String> {
    let types: Vec<String> = s
        .split(',')
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .collect();
    if types.is_empty() {
        return Err(format!(
            "--types: expected one or more of {}",
            EVENT_TYPES.join(",")
        ));
    }
    for t in &types {
        if !EVENT_TYPES.contains(&t.as_str()) {
            return Err(format!(
                "--types={s}: unknown type `{t}`; expected one or more of {}",
                EVENT_TYPES.join(",")
            ));
        }
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
    let pending = Arc::new(Semaphore::new(cfg.max_pending.max(1)));
    let tick = Duration::from_millis(10);
    let per_tick = cfg.rate.max(0.001) * tick.as_secs_f64();
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut budget = 0.0f64;
    let mut n: u64 = 0;
    let mut recent_ids: Vec<String> = Vec::with_capacity(1024);
    let types = if cfg.types.is_empty() {
        EVENT_TYPES.iter().map(|s| s.to_string()).collect()
    } else {
        cfg.types.clone()
    };
    'outer: loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        budget += per_tick;
        while budget >= 1.0 {
            if cfg.count.is_some_and(|c| n >= c) {
                break 'outer;
            }
            budget -= 1.0;
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break 'outer,
                p = pending.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            };
            let (value, duplicate) = {
                let mut rng = rand::rng();
                let mut v = make_event(&types[(n as usize) % types.len()], n, &mut rng);
                let dup =
                    !recent_ids.is_empty() && rng.random_bool(cfg.duplicate_share.clamp(0.0, 1.0));
                if dup {
                    v["id"] = json!(recent_ids[rng.random_range(0..recent_ids.len())]);
                }
                (v, dup)
            };
            n += 1;
            // Generated events are always valid envelopes.
            let Ok(env) = Envelope::from_value(value) else {
                continue;
            };
            if !duplicate {
                if recent_ids.len() < 1024 {
                    recent_ids.push(env.id.clone())
                } else {
                    recent_ids[(n as usize) % 1024] = env.id.clone()
                }
            }
            stats.sent.fetch_add(1, Ordering::Relaxed);
            let (publisher, ledger, stats, topic) = (
                publisher.clone(),
                ledger.clone(),
                stats.clone(),
                cfg.topic.clone(),
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
    // Wait for every started publish to finish.
    let _ = pending.acquire_many(cfg.max_pending.max(1) as u32).await;
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
