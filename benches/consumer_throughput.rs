//! Consumer throughput against the in-memory broker (DevBroker), release build:
//!
//! 1. courier's full consumer pipeline (`courier::app::consumer::start`: driver, dedupe,
//!    worker lanes, a no-op processor, manual commits) against a bare rdkafka
//!    `StreamConsumer` loop that stores offsets for auto-commit, over the same retained
//!    messages of one topic, each with its own consumer group. Target: ratio >= 0.8.
//! 2. Worker-pool scaling: a processor that awaits 5 ms per message, for 1 to 256 workers
//!    (and 1024, to find where the broker side saturates) against the ideal
//!    `workers / 5 ms`. Target: >= 90% of ideal until saturation.
//!
//! Every row also shows the process's CPU time per message and the bytes it read from
//! its sockets (fetch responses), against the same figures of the baseline.
//!
//! Run: `cargo bench --bench consumer_throughput`; smoke: `COURIER_BENCH_SMOKE=1 cargo bench
//! --bench consumer_throughput`. `COURIER_BENCH_EXPERIMENT` runs one courier configuration
//! only (see [`experiment`]).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use common::{Row, Tracker, Usage};
use courier::model::Delivery;
use courier::service::{ProcessError, Processor};
use courier::testing::Names;
use courier::transport::settings::{properties, ClientRole};
use courier::transport::DevBroker;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::ClientConfig;

/// The `log` processor without the logging: returns Ok at once.
struct NoopProcessor {
    tracker: Arc<Tracker>,
}

#[async_trait]
impl Processor for NoopProcessor {
    async fn process(&self, _delivery: &Delivery) -> Result<(), ProcessError> {
        self.tracker.start();
        self.tracker.done();
        Ok(())
    }
}

/// Awaits a fixed time per message (a tokio sleep) and sums the time actually slept.
struct SleepProcessor {
    tracker: Arc<Tracker>,
    sleep: Duration,
    slept_ns: AtomicU64,
}

#[async_trait]
impl Processor for SleepProcessor {
    async fn process(&self, _delivery: &Delivery) -> Result<(), ProcessError> {
        self.tracker.start();
        let t = Instant::now();
        tokio::time::sleep(self.sleep).await;
        self.slept_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.tracker.done();
        Ok(())
    }
}

/// A bare `StreamConsumer` loop: receive, store the offset (auto-commit commits stored
/// offsets), count. It uses courier's own consumer properties (fetch sizes, prefetch
/// queue, fetch wait) apart from the commit mode, so only the pipeline differs.
async fn raw_consumer(config: &courier::config::Config, expected: u64) -> anyhow::Result<Row> {
    let load = common::load_avg();
    let usage = Usage::start();
    let (props, _) = properties(config, ClientRole::Consumer);
    let mut cc = ClientConfig::new();
    for (k, v) in props {
        cc.set(k, v);
    }
    cc.set("group.id", courier::testing::unique("raw"))
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false");
    let consumer: StreamConsumer = cc.create().context("raw consumer")?;
    consumer.subscribe(&[config.consumer.topics[0].as_str()])?;
    let tracker = Tracker::new(expected);
    let timeout = Duration::from_secs(60) + Duration::from_micros(expected * 50);
    let drain = async {
        while tracker.count() < expected {
            let m = consumer.recv().await?;
            tracker.start();
            consumer.store_offset_from_message(&m)?;
            tracker.done();
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(timeout, drain)
        .await
        .with_context(|| {
            format!(
                "raw consumer: {} of {expected} in {timeout:?}",
                tracker.count()
            )
        })??;
    let cpu = usage.cpu_us_per_msg(expected);
    let sent = common::broker_sent_bytes(&config.kafka.brokers);
    // Closing leaves the group synchronously: off the runtime's worker threads.
    tokio::task::spawn_blocking(move || drop(consumer)).await?;
    Ok(Row {
        scenario: "raw rdkafka StreamConsumer (baseline)".into(),
        msgs: expected,
        secs: tracker.elapsed().as_secs_f64(),
        rate: tracker.rate(),
        ratio: "1.00".into(),
        note: format!(
            "store_offset_from_message + auto-commit; CPU {cpu:.1} µs/msg; fetched {} MiB",
            common::mib(sent)
        ),
        load,
    })
}

/// Runs courier's full pipeline (`courier::app::consumer::start`) with `processor` over
/// `expected` messages, with `extra` settings over its defaults (8 workers, 1000 in
/// flight, dedupe on, commits every second).
async fn courier_consumer(
    bootstrap: &str,
    topics: &Names,
    extra: &[(&str, &str)],
    processor: Arc<dyn Processor>,
    tracker: &Tracker,
    timeout: Duration,
) -> anyhow::Result<(f64, Option<u64>)> {
    let usage = Usage::start();
    let config = common::config(bootstrap, topics, extra)?;
    let sent = common::run_courier_consumer(config, processor, tracker, timeout).await?;
    Ok((usage.cpu_us_per_msg(tracker.count()), sent))
}

/// The no-op pipeline rows, one per (name, settings over courier's defaults).
async fn pipeline_rows(
    bootstrap: &str,
    topics: &Names,
    expected: u64,
    raw_rate: f64,
    variants: &[(&str, &[(&str, &str)])],
) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &(name, extra) in variants {
        let load = common::load_avg();
        let tracker = Tracker::new(expected);
        let processor = Arc::new(NoopProcessor {
            tracker: tracker.clone(),
        });
        let timeout = Duration::from_secs(60) + Duration::from_micros(expected * 50);
        let (cpu, sent) =
            courier_consumer(bootstrap, topics, extra, processor, &tracker, timeout).await?;
        rows.push(Row {
            scenario: name.into(),
            msgs: expected,
            secs: tracker.elapsed().as_secs_f64(),
            rate: tracker.rate(),
            ratio: format!("{:.2} (>= 0.80)", tracker.rate() / raw_rate),
            note: format!(
                "dedupe on, no-op processor, manual commits; CPU {cpu:.1} µs/msg; fetched {} MiB",
                common::mib(sent)
            ),
            load,
        });
    }
    Ok(rows)
}

/// One worker-pool scaling measurement: `workers` lanes, a processor awaiting `sleep`.
async fn scale_once(
    bootstrap: &str,
    topics: &Names,
    workers: usize,
    in_flight: usize,
    sleep: Duration,
    expected: u64,
) -> anyhow::Result<Row> {
    let load = common::load_avg();
    let ideal = workers as f64 / sleep.as_secs_f64();
    let tracker = Tracker::new(expected);
    let processor = Arc::new(SleepProcessor {
        tracker: tracker.clone(),
        sleep,
        slept_ns: AtomicU64::new(0),
    });
    let extra = [
        ("KAFKA_CONSUMER_WORKERS", workers.to_string()),
        ("KAFKA_CONSUMER_MAX_IN_FLIGHT", in_flight.to_string()),
        ("KAFKA_CONSUMER_SHUTDOWN_TIMEOUT_MS", "2000".to_owned()),
    ];
    let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let timeout = Duration::from_secs(60) + Duration::from_secs_f64(expected as f64 / ideal * 3.0);
    let (cpu, sent) = courier_consumer(
        bootstrap,
        topics,
        &extra,
        processor.clone(),
        &tracker,
        timeout,
    )
    .await?;
    let finished = tracker.count().max(1);
    let mean_sleep = processor.slept_ns.load(Ordering::Relaxed) as f64 / finished as f64 / 1e9;
    let (rate, steady) = (tracker.rate(), tracker.steady_rate());
    Ok(Row {
        scenario: format!("{} ms processor, {workers} workers", sleep.as_millis()),
        msgs: expected,
        secs: tracker.elapsed().as_secs_f64(),
        rate,
        ratio: format!(
            "{:.2} of {:.0}/s; steady {:.2}; steady vs measured sleep {:.2} (>= 0.90)",
            rate / ideal,
            ideal,
            steady / ideal,
            steady / (workers as f64 / mean_sleep)
        ),
        note: format!(
            "max_in_flight {in_flight}; steady (10%..90%) {steady:.0}/s; mean sleep {:.2} ms; CPU {cpu:.1} µs/msg; fetched {} MiB",
            mean_sleep * 1e3,
            common::mib(sent)
        ),
        load,
    })
}

/// Worker-pool scaling with a 5 ms processor: about 4 s of ideal work per configuration.
async fn scaling(bootstrap: &str, topics: &Names, retained: u64) -> anyhow::Result<Vec<Row>> {
    const SLEEP: Duration = Duration::from_millis(5);
    let secs = common::size(4, 1) as f64;
    // Smoke runs two sizes only: every group join costs the mock broker's 3 s initial
    // rebalance delay.
    let workers_list: &[usize] = if common::smoke() {
        &[8, 256]
    } else {
        &[1, 8, 64, 256, 1024]
    };
    let mut rows = Vec::new();
    for &workers in workers_list {
        let ideal = workers as f64 / SLEEP.as_secs_f64();
        let expected = ((ideal * secs) as u64).clamp(100, retained);
        let in_flight = (workers * 32).max(256);
        rows.push(scale_once(bootstrap, topics, workers, in_flight, SLEEP, expected).await?);
    }
    // Diagnostic, not a supported setting: an in-flight bound the run never reaches, so
    // the pause/resume back-pressure never engages (memory is then bounded only by the
    // backlog). The difference to the rows above is what the back-pressure costs.
    let diagnostics: &[usize] = if common::smoke() { &[] } else { &[64, 256] };
    for &workers in diagnostics {
        let ideal = workers as f64 / SLEEP.as_secs_f64();
        let expected = ((ideal * secs) as u64).clamp(100, retained);
        let mut row = scale_once(bootstrap, topics, workers, 1_000_000, SLEEP, expected).await?;
        row.scenario = format!("diagnostic: {}, bound never reached", row.scenario);
        rows.push(row);
    }
    Ok(rows)
}

/// `COURIER_BENCH_EXPERIMENT="KAFKA_CONSUMER_WORKERS=2 KAFKA_CONSUMER_MAX_IN_FLIGHT=5000"`:
/// runs only courier's pipeline with these settings over the backlog, to try tunings;
/// `COURIER_BENCH_SLEEP_MS=N` makes its processor await N ms per message and
/// `COURIER_BENCH_MSGS=N` stops after N messages.
async fn experiment(
    bootstrap: &str,
    topics: &Names,
    retained: u64,
    spec: &str,
) -> anyhow::Result<()> {
    let pairs: Vec<(&str, &str)> = spec
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .collect();
    let env_u64 = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let expected = env_u64("COURIER_BENCH_MSGS").map_or(retained, |n| n.min(retained));
    let row = match env_u64("COURIER_BENCH_SLEEP_MS") {
        Some(ms) => {
            let workers = pairs
                .iter()
                .find(|(k, _)| *k == "KAFKA_CONSUMER_WORKERS")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(8);
            let in_flight = pairs
                .iter()
                .find(|(k, _)| *k == "KAFKA_CONSUMER_MAX_IN_FLIGHT")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(1000);
            let sleep = Duration::from_millis(ms);
            scale_once(bootstrap, topics, workers, in_flight, sleep, expected).await?
        }
        None => {
            let variants: &[(&str, &[(&str, &str)])] = &[("courier pipeline", &pairs)];
            let mut rows = pipeline_rows(bootstrap, topics, expected, f64::NAN, variants).await?;
            rows.remove(0)
        }
    };
    common::print_table(&format!("experiment: {spec}"), &[row]);
    Ok(())
}

/// Produces the backlog and runs every scenario.
async fn run() -> anyhow::Result<()> {
    let broker = DevBroker::start()?;
    let bootstrap = broker.bootstrap_servers();
    let topics = common::create_topics(&broker, "bench")?;
    let produce = common::size(1_000_000, 5_000);
    let t = Instant::now();
    common::produce_backlog(&bootstrap, &topics.source, produce).await?;
    let retained = common::retained(&bootstrap, &topics.source)?;
    eprintln!(
        "produced {produce} messages in {:.1} s; the broker retains {retained}",
        t.elapsed().as_secs_f64()
    );
    if let Ok(spec) = std::env::var("COURIER_BENCH_EXPERIMENT") {
        if let Ok(level) = std::env::var("COURIER_BENCH_LOG") {
            let log = courier::config::LogConfig {
                level,
                format: courier::config::LogFormat::Pretty,
            };
            courier::observability::logging::init(&log, std::io::stderr);
        }
        return experiment(&bootstrap, &topics, retained, &spec).await;
    }
    let base_cfg = common::config(&bootstrap, &topics, &[])?;
    let raw = raw_consumer(&base_cfg, retained).await?;
    let raw_rate = raw.rate;
    let mut rows = vec![raw];
    let variants: &[(&str, &[(&str, &str)])] = &[(
        "courier pipeline, defaults (8 workers, 1000 in flight)",
        &[],
    )];
    rows.extend(pipeline_rows(&bootstrap, &topics, retained, raw_rate, variants).await?);
    common::print_table(
        &format!(
            "Consumer: courier pipeline vs raw rdkafka ({retained} retained messages of {produce}, {} partitions, {} B payloads)",
            common::PARTITIONS,
            common::PAYLOAD_BYTES
        ),
        &rows,
    );
    let rows = scaling(&bootstrap, &topics, retained).await?;
    common::print_table(
        "Worker-pool scaling (processor awaits 5 ms; ideal = workers / 5 ms)",
        &rows,
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    common::main_with("consumer_throughput", run())
}
