//! Consumer throughput against the in-memory broker (DevBroker), release build:
//!
//! 1. courier's full consumer pipeline (`courier::app::consumer::start`: driver, dedupe,
//!    worker lanes, a no-op processor, manual commits) against two bare rdkafka loops that
//!    store each offset for auto-commit, with courier's own consumer properties (fetch
//!    sizes, prefetch queue, `fetch.queue.backoff.ms`): a `BaseConsumer` polled on a thread
//!    (the least the same guarantees need) and a `StreamConsumer` on the runtime. All read
//!    the same retained messages of one topic, each with its own consumer group, in turn,
//!    `COURIER_BENCH_REPEAT` times (3; 1 in smoke); the ratios of each turn are against the
//!    baselines of that turn, and a summary gives min / median / max. Targets: ratio >= 0.8
//!    against the `BaseConsumer`, CPU <= 1.2 µs per message.
//! 2. Worker-pool scaling: a processor that awaits 5 ms per message, for 1 to 256 workers
//!    (and 1024, to find where the broker side saturates) against the ideal
//!    `workers / 5 ms`. Target: >= 90% of ideal until saturation.
//!
//! Every row also shows the process's CPU time per message and the bytes it read from
//! its sockets (fetch responses), against the same figures of the baseline.
//!
//! Run: `cargo bench --bench consumer_throughput` (`COURIER_BENCH_ONLY=compare` or
//! `scaling` runs one of the two groups); smoke: `COURIER_BENCH_SMOKE=1 cargo bench
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
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
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

/// The raw consumers' client configuration: courier's own consumer properties (fetch sizes,
/// prefetch queue, fetch wait, fetch back-off) apart from the commit mode, so only the
/// pipeline differs: offsets are stored one by one and auto-committed.
fn raw_config(config: &courier::config::Config) -> ClientConfig {
    let (props, _) = properties(config, ClientRole::Consumer);
    let mut cc = ClientConfig::new();
    for (k, v) in props {
        cc.set(k, v);
    }
    cc.set("group.id", courier::testing::unique("raw"))
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false");
    cc
}

/// The two raw baselines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Raw {
    /// A `BaseConsumer` polled on its own thread: the least the guarantees need.
    Base,
    /// A `StreamConsumer` on the tokio runtime.
    Stream,
}

impl Raw {
    fn name(self) -> &'static str {
        match self {
            Raw::Base => "raw rdkafka BaseConsumer (baseline)",
            Raw::Stream => "raw rdkafka StreamConsumer (baseline)",
        }
    }
}

/// A bare consumer loop over `expected` messages: receive, store the offset (auto-commit
/// commits stored offsets), count.
async fn raw_consumer(
    config: &courier::config::Config,
    expected: u64,
    kind: Raw,
) -> anyhow::Result<Measured> {
    let load = common::load_avg();
    let usage = Usage::start();
    let topic = config.consumer.topics[0].clone();
    let tracker = Tracker::new(expected);
    let timeout = Duration::from_secs(60) + Duration::from_micros(expected * 50);
    let sent = match kind {
        Raw::Base => {
            let consumer: BaseConsumer = raw_config(config).create().context("raw consumer")?;
            consumer.subscribe(&[topic.as_str()])?;
            let t = tracker.clone();
            let bootstrap = config.kafka.brokers.clone();
            tokio::task::spawn_blocking(move || {
                let deadline = Instant::now() + timeout;
                while t.count() < expected {
                    if Instant::now() > deadline {
                        anyhow::bail!("raw consumer: {} of {expected} in {timeout:?}", t.count());
                    }
                    match consumer.poll(Duration::from_millis(100)) {
                        Some(Ok(m)) => {
                            t.start();
                            consumer.store_offset_from_message(&m)?;
                            t.done();
                        }
                        Some(Err(e)) => anyhow::bail!("raw consumer: {e}"),
                        None => {}
                    }
                }
                let sent = common::broker_sent_bytes(&bootstrap);
                drop(consumer);
                Ok(sent)
            })
            .await??
        }
        Raw::Stream => {
            let consumer: StreamConsumer = raw_config(config).create().context("raw consumer")?;
            consumer.subscribe(&[topic.as_str()])?;
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
            let sent = common::broker_sent_bytes(&config.kafka.brokers);
            // Closing leaves the group synchronously: off the runtime's worker threads.
            tokio::task::spawn_blocking(move || drop(consumer)).await?;
            sent
        }
    };
    // CPU up to the last message (the close is not counted); the group join is.
    let cpu = usage.cpu_us_per_msg(expected);
    Ok(Measured::of(&tracker, cpu, sent, load))
}

/// One measured drain.
#[derive(Debug, Clone)]
struct Measured {
    rate: f64,
    secs: f64,
    cpu: f64,
    fetched: Option<u64>,
    load: String,
}

impl Measured {
    /// The drain `tracker` followed, with its CPU per message and bytes fetched.
    fn of(tracker: &Tracker, cpu: f64, fetched: Option<u64>, load: String) -> Self {
        Measured {
            rate: tracker.rate(),
            secs: tracker.elapsed().as_secs_f64(),
            cpu,
            fetched,
            load,
        }
    }
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

/// courier's pipeline with a no-op processor over `expected` messages, with `extra` over
/// its defaults.
async fn pipeline_once(
    bootstrap: &str,
    topics: &Names,
    expected: u64,
    extra: &[(&str, &str)],
) -> anyhow::Result<Measured> {
    let load = common::load_avg();
    let tracker = Tracker::new(expected);
    let processor = Arc::new(NoopProcessor {
        tracker: tracker.clone(),
    });
    let timeout = Duration::from_secs(60) + Duration::from_micros(expected * 50);
    let (cpu, sent) =
        courier_consumer(bootstrap, topics, extra, processor, &tracker, timeout).await?;
    Ok(Measured::of(&tracker, cpu, sent, load))
}

/// The note of a pipeline row.
fn pipeline_note(m: &Measured) -> String {
    format!(
        "dedupe on, no-op processor, manual commits; CPU {:.2} µs/msg (target <= 1.2); fetched {} MiB",
        m.cpu,
        common::mib(m.fetched)
    )
}

/// The note of a baseline row.
fn raw_note(m: &Measured) -> String {
    format!(
        "store_offset_from_message + auto-commit; CPU {:.2} µs/msg; fetched {} MiB",
        m.cpu,
        common::mib(m.fetched)
    )
}

/// `min / median / max` of `values`.
fn spread(values: &[f64], digits: usize) -> String {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return "-".into();
    }
    format!(
        "{:.digits$} / {:.digits$} / {:.digits$}",
        v[0],
        v[v.len() / 2],
        v[v.len() - 1]
    )
}

/// The consumer comparison: each turn drains the retained set with the `BaseConsumer`, the
/// `StreamConsumer` and courier's pipeline (defaults), in that order; ratios are against
/// the same turn's baselines. Prints every turn's rows, then the summary.
async fn compare(
    bootstrap: &str,
    topics: &Names,
    retained: u64,
    produce: u64,
) -> anyhow::Result<()> {
    let repeat = std::env::var("COURIER_BENCH_REPEAT")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(if common::smoke() { 1 } else { 3 })
        .max(1);
    let base_cfg = common::config(bootstrap, topics, &[])?;
    let mut rows = Vec::new();
    let (mut base, mut stream, mut pipe) = (Vec::new(), Vec::new(), Vec::new());
    for turn in 1..=repeat {
        let b = raw_consumer(&base_cfg, retained, Raw::Base).await?;
        let s = raw_consumer(&base_cfg, retained, Raw::Stream).await?;
        let c = pipeline_once(bootstrap, topics, retained, &[]).await?;
        for (kind, m) in [(Raw::Base, &b), (Raw::Stream, &s)] {
            rows.push(Row {
                scenario: format!("turn {turn}: {}", kind.name()),
                msgs: retained,
                secs: m.secs,
                rate: m.rate,
                ratio: "1.00".into(),
                note: raw_note(m),
                load: m.load.clone(),
            });
        }
        rows.push(Row {
            scenario: format!(
                "turn {turn}: courier pipeline, defaults (8 workers, 1000 in flight)"
            ),
            msgs: retained,
            secs: c.secs,
            rate: c.rate,
            ratio: format!(
                "{:.2} of BaseConsumer (>= 0.80); {:.2} of StreamConsumer",
                c.rate / b.rate,
                c.rate / s.rate
            ),
            note: pipeline_note(&c),
            load: c.load.clone(),
        });
        base.push(b);
        stream.push(s);
        pipe.push(c);
    }
    common::print_table(
        &format!(
            "Consumer: courier pipeline vs raw rdkafka ({retained} retained messages of {produce}, {} partitions, {} B payloads)",
            common::PARTITIONS,
            common::PAYLOAD_BYTES
        ),
        &rows,
    );
    let rates = |v: &[Measured]| v.iter().map(|m| m.rate / 1000.0).collect::<Vec<_>>();
    let cpus = |v: &[Measured]| v.iter().map(|m| m.cpu).collect::<Vec<_>>();
    let ratio = |of: &[Measured]| {
        pipe.iter()
            .zip(of)
            .map(|(c, r)| c.rate / r.rate)
            .collect::<Vec<_>>()
    };
    println!("## Consumer summary over {repeat} turn(s): min / median / max");
    println!();
    println!("| figure | courier pipeline | BaseConsumer | StreamConsumer |");
    println!("|---|---|---|---|");
    println!(
        "| thousand msgs/s | {} | {} | {} |",
        spread(&rates(&pipe), 0),
        spread(&rates(&base), 0),
        spread(&rates(&stream), 0)
    );
    println!(
        "| CPU µs/msg (target <= 1.2 for courier) | {} | {} | {} |",
        spread(&cpus(&pipe), 2),
        spread(&cpus(&base), 2),
        spread(&cpus(&stream), 2)
    );
    println!(
        "| courier's ratio, same turn (target >= 0.80 of BaseConsumer) | - | {} | {} |",
        spread(&ratio(&base), 2),
        spread(&ratio(&stream), 2)
    );
    println!();
    Ok(())
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
            let m = pipeline_once(bootstrap, topics, expected, &pairs).await?;
            Row {
                scenario: "courier pipeline".into(),
                msgs: expected,
                secs: m.secs,
                rate: m.rate,
                ratio: "-".into(),
                note: pipeline_note(&m),
                load: m.load,
            }
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
    if common::runs("compare") {
        compare(&bootstrap, &topics, retained, produce).await?;
    }
    if common::runs("scaling") {
        let rows = scaling(&bootstrap, &topics, retained).await?;
        common::print_table(
            "Worker-pool scaling (processor awaits 5 ms; ideal = workers / 5 ms)",
            &rows,
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    common::main_with("consumer_throughput", run())
}
