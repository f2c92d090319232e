//! The event generator (`courier producer --generate`): seed-style events of the
//! orders/payments/notifications flow at a steady rate, for load tests and demos.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, RngExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::model::RecordBatch;
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

/// The random parts of one generated event, drawn in a fixed order, so that its JSON value
/// ([`Draw::to_value`]) and its published bytes ([`Draw::write_json`]) describe one event.
#[derive(Debug, Clone, PartialEq)]
struct Draw<'a> {
    kind: &'a str,
    n: u64,
    customer: u32,
    /// Drawn for `order_created` and `payment_received`.
    amount: f64,
    /// `items` of `order_created`.
    items: i32,
    /// `method` of `payment_received` or `channel` of `notification_sent`.
    choice: &'static str,
}

impl<'a> Draw<'a> {
    fn new(kind: &'a str, n: u64, rng: &mut impl Rng) -> Draw<'a> {
        let customer = rng.random_range(0..1000);
        let (mut amount, mut items, mut choice) = (0.0, 0, "");
        match kind {
            "order_created" => {
                amount = f64::from(rng.random_range(100..100_000)) / 100.0;
                items = rng.random_range(1..6);
            }
            "payment_received" => {
                amount = f64::from(rng.random_range(100..100_000)) / 100.0;
                choice = pick(&["card", "transfer", "wallet"], rng);
            }
            _ => choice = pick(&["email", "sms", "push"], rng),
        }
        Draw {
            kind,
            n,
            customer,
            amount,
            items,
            choice,
        }
    }

    /// The event as a JSON value, `time` as given (an RFC 3339 date-time): what
    /// [`Draw::write_json`] writes, as a value (for the tests that check it).
    #[cfg(test)]
    fn to_value(&self, time: &str) -> serde_json::Value {
        use serde_json::json;
        let (n, order) = (self.n, format!("ord-{:06}", self.n / 3));
        let customer = format!("cust-{:04}", self.customer);
        let data = match self.kind {
            "order_created" => {
                json!({"order_id": order, "customer_id": customer, "amount": self.amount, "currency": "EUR", "items": self.items})
            }
            "payment_received" => {
                json!({"payment_id": format!("pay-{n:06}"), "order_id": order, "amount": self.amount, "method": self.choice})
            }
            _ => {
                json!({"notification_id": format!("ntf-{n:06}"), "customer_id": customer, "channel": self.choice, "template": "order_update"})
            }
        };
        json!({"type": self.kind, "source": "courier-generator", "time": time, "key": order, "data": data})
    }

    /// Writes the event's key (`key`, the order id) into `out`, replacing what it held.
    fn write_key(&self, out: &mut String) {
        use std::fmt::Write;
        out.clear();
        let _ = write!(out, "ord-{:06}", self.n / 3);
    }

    /// Appends the published value of this event with `id` to `out`: the bytes `serde_json`
    /// writes for the envelope of [`Draw::to_value`] with the `id` filled in (checked by a
    /// test), without building the value.
    fn write_json(&self, out: &mut Vec<u8>, time: &str, id: &str) {
        use std::io::Write;
        let n = self.n;
        let order = n / 3;
        // Writing into a Vec cannot fail, and every string written here is plain ASCII
        // except `kind`, `time` and `id`, which are written as JSON strings.
        out.extend_from_slice(b"{\"type\":");
        let _ = serde_json::to_writer(&mut *out, &self.kind);
        out.extend_from_slice(b",\"source\":\"courier-generator\",\"time\":");
        let _ = serde_json::to_writer(&mut *out, time);
        let _ = write!(out, ",\"key\":\"ord-{order:06}\",\"data\":{{");
        match self.kind {
            "order_created" => {
                let _ = write!(
                    out,
                    "\"order_id\":\"ord-{order:06}\",\"customer_id\":\"cust-{:04}\",\"amount\":",
                    self.customer
                );
                let _ = serde_json::to_writer(&mut *out, &self.amount);
                let _ = write!(out, ",\"currency\":\"EUR\",\"items\":{}", self.items);
            }
            "payment_received" => {
                let _ = write!(
                    out,
                    "\"payment_id\":\"pay-{n:06}\",\"order_id\":\"ord-{order:06}\",\"amount\":"
                );
                let _ = serde_json::to_writer(&mut *out, &self.amount);
                let _ = write!(out, ",\"method\":\"{}\"", self.choice);
            }
            _ => {
                let _ = write!(
                    out,
                    "\"notification_id\":\"ntf-{n:06}\",\"customer_id\":\"cust-{:04}\",\"channel\":\"{}\",\"template\":\"order_update\"",
                    self.customer, self.choice
                );
            }
        }
        out.extend_from_slice(b"},\"id\":");
        let _ = serde_json::to_writer(&mut *out, id);
        out.push(b'}');
    }
}

/// The current time as RFC 3339, the `time` of generated events.
fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// One seed-style event of type `kind`, number `n`, as a JSON value.
#[cfg(test)]
pub fn make_event(kind: &str, n: u64, rng: &mut impl Rng) -> serde_json::Value {
    Draw::new(kind, n, rng).to_value(&now_rfc3339())
}

/// Most events published in one batch: the generator publishes whatever its rate allows in
/// a tick (10 ms) in batches of at most this many (and of at most `max_pending`).
const MAX_CHUNK: usize = 1000;

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
    };
    let max_chunk = MAX_CHUNK.min(max_pending);
    'outer: loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        budget += per_tick;
        while budget >= 1.0 {
            let left = cfg
                .count
                .map_or(u64::MAX, |c| c.saturating_sub(events.made));
            if left == 0 {
                break 'outer;
            }
            // Whole events only: the fraction carries over to the next tick.
            let chunk = (budget as u64).min(left).min(max_chunk as u64) as usize;
            budget -= chunk as f64;
            let permits = tokio::select! {
                _ = shutdown.cancelled() => break 'outer,
                p = pending.clone().acquire_many_owned(chunk as u32) => p.expect("the semaphore is never closed"),
            };
            sink.spawn_publish(events.next_batch(chunk), permits);
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
    topic: String,
    types: Vec<String>,
    duplicate_share: f64,
    /// Events made so far (counted by `--count`).
    made: u64,
    recent_ids: Vec<uuid::Uuid>,
}

/// Generated events on their way to the broker: the records, and each one's id and whether
/// it re-uses an earlier id.
struct Chunk {
    batch: RecordBatch,
    ids: Vec<(uuid::Uuid, bool)>,
}

impl Events {
    fn new(cfg: &GeneratorConfig) -> Self {
        let types = if cfg.types.is_empty() {
            EVENT_TYPES.iter().map(|s| s.to_string()).collect()
        } else {
            cfg.types.clone()
        };
        Events {
            topic: cfg.topic.clone(),
            types,
            duplicate_share: cfg.duplicate_share.clamp(0.0, 1.0),
            made: 0,
            recent_ids: Vec::with_capacity(RECENT_IDS),
        }
    }

    /// The next `len` events, written straight into one batch. They share one `time` (read
    /// once per batch, which spans at most one tick).
    fn next_batch(&mut self, len: usize) -> Chunk {
        let time = now_rfc3339();
        let mut rng = rand::rng();
        let mut batch = RecordBatch::with_capacity(&self.topic, len, len * 320);
        let mut ids = Vec::with_capacity(len);
        let mut text = uuid::Uuid::encode_buffer();
        let mut key = String::with_capacity(16);
        for _ in 0..len {
            let n = self.made;
            let draw = Draw::new(&self.types[(n as usize) % self.types.len()], n, &mut rng);
            let duplicate = !self.recent_ids.is_empty() && rng.random_bool(self.duplicate_share);
            let id = if duplicate {
                self.recent_ids[rng.random_range(0..self.recent_ids.len())]
            } else {
                uuid::Uuid::now_v7()
            };
            self.made += 1;
            if !duplicate {
                if self.recent_ids.len() < RECENT_IDS {
                    self.recent_ids.push(id);
                } else {
                    self.recent_ids[(self.made as usize) % RECENT_IDS] = id;
                }
            }
            let id_text: &str = id.hyphenated().encode_lower(&mut text);
            draw.write_key(&mut key);
            batch.push(Some(key.as_bytes()), id_text, None, |buf| {
                draw.write_json(buf, &time, id_text)
            });
            ids.push((id, duplicate));
        }
        Chunk { batch, ids }
    }
}

/// Where generated events go, and what counts them.
struct Sink {
    publisher: Arc<dyn Publisher>,
    ledger: Arc<Ledger>,
    stats: Arc<GeneratorStats>,
}

impl Sink {
    /// Publishes `chunk` on a task of its own, which holds `permits` (one per event) until
    /// the broker answered for every event.
    fn spawn_publish(&self, chunk: Chunk, permits: OwnedSemaphorePermit) {
        let n = chunk.ids.len() as u64;
        self.stats.sent.fetch_add(n, Ordering::Relaxed);
        let (publisher, ledger, stats) = (
            self.publisher.clone(),
            self.ledger.clone(),
            self.stats.clone(),
        );
        tokio::spawn(async move {
            let results: Vec<_> = publisher
                .publish_all(&chunk.batch, None)
                .await
                .into_iter()
                .map(|r| r.expect("without a deadline every record has an outcome"))
                .collect();
            let topic = chunk.batch.topic();
            ledger.record_all(topic, &results);
            let (mut acked, mut duplicates, mut failed) = (0, 0, 0);
            for ((id, duplicate), res) in chunk.ids.iter().zip(&results) {
                match res {
                    Ok(_) => {
                        acked += 1;
                        duplicates += u64::from(*duplicate);
                    }
                    Err(e) => {
                        failed += 1;
                        tracing::warn!(message_id = %id, topic, error = %e, "A generated event was not published.");
                    }
                }
            }
            stats.acked.fetch_add(acked, Ordering::Relaxed);
            stats.duplicates.fetch_add(duplicates, Ordering::Relaxed);
            stats.failed.fetch_add(failed, Ordering::Relaxed);
            drop(permits);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Ack, Envelope};
    use crate::service::publish::MockPublisher;
    use serde_json::json;

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

    #[test]
    fn the_published_bytes_are_the_envelope_of_the_event() {
        let mut rng = rand::rng();
        let time = now_rfc3339();
        for n in 0..300u64 {
            let draw = Draw::new(EVENT_TYPES[n as usize % 3], n * 7919, &mut rng);
            let id = uuid::Uuid::now_v7().to_string();
            let mut value = draw.to_value(&time);
            value["id"] = json!(id);
            let env = Envelope::from_value(value).unwrap();
            let mut out = Vec::new();
            draw.write_json(&mut out, &time, &id);
            let want = env.to_record("t").payload.unwrap();
            assert_eq!(String::from_utf8(out), String::from_utf8(want));
            let mut key = String::new();
            draw.write_key(&mut key);
            assert_eq!(key, env.key);
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
