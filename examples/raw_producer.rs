//! The baseline of `courier producer --generate`, as a process of its own: a bare
//! librdkafka `BaseProducer` that writes N events of the generator's shape (the three seed
//! event types in turn, `{"type","source","time","key","data",…,"id"}`, keyed by their
//! order id, each with a UUIDv7 `message-id` header) and exits once every one of them is
//! acknowledged. It uses exactly courier's producer properties, read from the same
//! environment (`courier::transport::settings::client_config`: acks=all,
//! enable.idempotence=true, linger.ms=5, …), keeps at most 10,000 events unacknowledged (as
//! the generator does) and polls the delivery reports on its one thread (`BaseProducer::poll`):
//! the least a producer with those guarantees can do.
//!
//! ```sh
//! courier dev-broker > /tmp/bootstrap &          # prints the bootstrap address
//! export KAFKA_BROKERS=$(head -1 /tmp/bootstrap) LOG_LEVEL=warn HTTP_ADDR=127.0.0.1:0 OPS_ADDR=127.0.0.1:0
//! cargo build --release --example raw_producer
//! target/release/examples/raw_producer 300000
//! courier producer --generate --rate 100000000 --count 300000   # what it is compared with
//! ```

use std::io::Write;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::{bail, Context};
use courier::transport::settings::{client_config, ClientRole};
use rand::RngExt;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;

/// Events unacknowledged at most (the generator's `DEFAULT_MAX_PENDING`).
const WINDOW: u64 = 10_000;
/// Events that share one `time` (the generator reads the clock once per batch of 1000).
const PER_TIME: u64 = 1000;
const TYPES: [&str; 3] = ["order_created", "payment_received", "notification_sent"];

/// Counts the delivery reports, which `BaseProducer::poll` runs on the sending thread.
#[derive(Default)]
struct Counting {
    acked: AtomicU64,
    failed: AtomicU64,
}

impl Counting {
    fn done(&self) -> u64 {
        self.acked.load(Relaxed) + self.failed.load(Relaxed)
    }
}

impl ClientContext for Counting {}

impl ProducerContext for Counting {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let counter = if result.is_ok() {
            &self.acked
        } else {
            &self.failed
        };
        counter.fetch_add(1, Relaxed);
    }
}

/// Polls the delivery reports until fewer than `window` of the `sent` events are
/// unacknowledged. rdkafka's `BaseProducer::poll` runs reports until its timeout has
/// passed, so each poll is short.
fn wait_below(producer: &BaseProducer<Counting>, sent: u64, window: u64) {
    while sent - producer.context().done() >= window {
        producer.poll(Duration::from_millis(1));
    }
}

/// Appends event `n` of type `kind` with `id` to `out`, the generator's shape.
fn write_event(out: &mut Vec<u8>, n: u64, kind: &str, time: &str, id: &str) {
    let mut rng = rand::rng();
    let order = n / 3;
    let customer: u32 = rng.random_range(0..1000);
    let _ = write!(
        out,
        r#"{{"type":"{kind}","source":"courier-generator","time":"{time}","key":"ord-{order:06}","data":{{"#
    );
    let amount = f64::from(rng.random_range(100..100_000)) / 100.0;
    match kind {
        "order_created" => {
            let items: i32 = rng.random_range(1..6);
            let _ = write!(
                out,
                r#""order_id":"ord-{order:06}","customer_id":"cust-{customer:04}","amount":{amount:?},"currency":"EUR","items":{items}"#
            );
        }
        "payment_received" => {
            let method = ["card", "transfer", "wallet"][rng.random_range(0..3)];
            let _ = write!(
                out,
                r#""payment_id":"pay-{n:06}","order_id":"ord-{order:06}","amount":{amount:?},"method":"{method}""#
            );
        }
        _ => {
            let channel = ["email", "sms", "push"][rng.random_range(0..3)];
            let _ = write!(
                out,
                r#""notification_id":"ntf-{n:06}","customer_id":"cust-{customer:04}","channel":"{channel}","template":"order_update""#
            );
        }
    }
    let _ = write!(out, r#"}},"id":"{id}"}}"#);
}

fn main() -> anyhow::Result<()> {
    let n: u64 = match std::env::args().nth(1) {
        Some(a) => a
            .parse()
            .context("the first argument is the number of events")?,
        None => 300_000,
    };
    let config = courier::config::Config::load(None).map_err(|e| anyhow::anyhow!("{e}"))?;
    let topic = config.producer.topic.clone();
    let producer: BaseProducer<Counting> = client_config(&config, ClientRole::Producer)
        .create_with_context(Counting::default())
        .context("creating the producer")?;
    // librdkafka's idempotent producer holds records sent in its first milliseconds until
    // its producer-id timer fires (500 ms); courier's own start-up (ops server, router,
    // health checker) takes about this long before its first send, so neither pays it.
    std::thread::sleep(Duration::from_millis(50));
    let (mut value, mut key, mut time) = (Vec::with_capacity(512), String::new(), String::new());
    let mut text = uuid::Uuid::encode_buffer();
    for i in 0..n {
        wait_below(&producer, i, WINDOW);
        if i % 1000 == 0 {
            // Runs the delivery reports that came in meanwhile, as a producer loop does.
            producer.poll(Duration::ZERO);
        }
        if i % PER_TIME == 0 {
            time = time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .context("formatting the time")?;
        }
        let id: &str = uuid::Uuid::now_v7().hyphenated().encode_lower(&mut text);
        value.clear();
        write_event(&mut value, i, TYPES[(i % 3) as usize], &time, id);
        key.clear();
        std::fmt::Write::write_fmt(&mut key, format_args!("ord-{:06}", i / 3))?;
        let mut record = BaseRecord::to(&topic)
            .key(key.as_str())
            .payload(value.as_slice())
            .headers(OwnedHeaders::new_with_capacity(1).insert(Header {
                key: "message-id",
                value: Some(id.as_bytes()),
            }));
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((e, back)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                    record = back;
                    // The queue drains as acknowledgements come in.
                    wait_below(&producer, i, (i - producer.context().done()).max(1));
                }
                Err((e, _)) => bail!("send failed: {e}"),
            }
        }
    }
    wait_below(&producer, n, 1);
    let failed = producer.context().failed.load(Relaxed);
    if failed > 0 {
        bail!("{failed} of {n} events were not acknowledged");
    }
    Ok(())
}
