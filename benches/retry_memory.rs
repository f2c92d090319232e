//! Retry timing and consumer memory against the in-memory broker (DevBroker), release build:
//!
//! 1. Retry timing: every message fails once (retryable) and goes through `{prefix}-1` with
//!    a 1 s back-off; its second attempt records how late it ran (processed-at minus the
//!    `courier-due-at-ms` header). Prints p50/p99/max and fails if any ran early. Two
//!    shapes: a steady stream the consumer keeps up with (the retry scheduling itself),
//!    and a burst of all messages at once (retries also queue behind first attempts).
//! 2. Memory: a child process (this binary with `--memory-child`) runs courier's consumer
//!    with a 1 ms processor over a large backlog and samples its own VmRSS from
//!    /proc/self/status during the drain; the broker stays in the parent, so the figures
//!    are the consumer's alone. RSS at 10%, 50% and 90% of the drain and the peak should
//!    stay flat, not grow with the backlog; a second drain of a smaller backlog shows it.
//!
//! Run: `cargo bench --bench retry_memory` (`COURIER_BENCH_ONLY=steady,burst,memory`
//! picks scenarios, `COURIER_BENCH_EXTRA="K=V ..."` adds courier settings to the retry
//! scenarios, `COURIER_BENCH_LOG=info` prints courier's logs); smoke: `COURIER_BENCH_SMOKE=1 cargo bench
//! --bench retry_memory`.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_trait::async_trait;
use common::{Row, Tracker};
use courier::model::{Delivery, HEADER_DUE_AT_MS};
use courier::service::{ProcessError, Processor};
use courier::testing::Names;
use courier::transport::DevBroker;
use parking_lot::Mutex;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

/// Fails every message id once (retryable); on its second attempt records how late it ran
/// against its `courier-due-at-ms`, in microseconds. Ids starting with `warmup` succeed at
/// once and only signal that the consumer has joined its group.
struct FailOnce {
    seen: Mutex<HashSet<String>>,
    lateness_us: Mutex<Vec<i64>>,
    missing_due: AtomicU64,
    warmed_up: AtomicU64,
    tracker: Arc<Tracker>,
}

impl FailOnce {
    fn new(tracker: Arc<Tracker>) -> Arc<FailOnce> {
        Arc::new(FailOnce {
            seen: Mutex::new(HashSet::new()),
            lateness_us: Mutex::new(Vec::new()),
            missing_due: AtomicU64::new(0),
            warmed_up: AtomicU64::new(0),
            tracker,
        })
    }
}

/// Wall-clock microseconds since the epoch (the due time is wall-clock milliseconds).
fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[async_trait]
impl Processor for FailOnce {
    async fn process(&self, d: &Delivery) -> Result<(), ProcessError> {
        let now = now_us();
        let id = d.message_id().unwrap_or_default().to_owned();
        if id.starts_with("warmup") {
            self.warmed_up.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        if self.seen.lock().insert(id) {
            return Err(ProcessError::retryable("the first attempt fails"));
        }
        let due_ms = d
            .header(HEADER_DUE_AT_MS)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<i64>().ok());
        match due_ms {
            Some(due) => self.lateness_us.lock().push(now - due * 1000),
            None => {
                self.missing_due.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.tracker.start();
        self.tracker.done();
        Ok(())
    }
}

/// Produces `n` messages (ids `{prefix}-{i}`, distinct keys, 100-byte payloads) at about
/// `rate` per second, in 10 ms steps, with the producer settings courier uses (linger 5 ms).
async fn produce_paced(
    bootstrap: &str,
    topic: &str,
    n: u64,
    rate: u64,
    prefix: &str,
) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .create()
        .context("paced producer")?;
    let per_tick = (rate / 100).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut pending = Vec::new();
    let mut i = 0;
    while i < n {
        tick.tick().await;
        for _ in 0..per_tick.min(n - i) {
            let id = format!("{prefix}-{i}");
            let key = format!("k{i}");
            let value = common::payload(&id);
            let record: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic)
                .key(key.as_str())
                .payload(value.as_slice())
                .headers(OwnedHeaders::new().insert(Header {
                    key: "message-id",
                    value: Some(id.as_str()),
                }));
            match producer.send_result(record) {
                Ok(f) => pending.push(f),
                Err((e, _)) => bail!("queuing a message failed: {e}"),
            }
            i += 1;
        }
    }
    for f in pending {
        common::check_delivery(f.await)?;
    }
    Ok(())
}

/// Retry timing over `n` retried messages with a 1 s back-off. `steady`: the consumer
/// joins first (a warm-up message), then messages arrive at a steady rate it keeps up
/// with, so lateness shows the retry scheduling itself. Otherwise a burst: all `n` are
/// in the topic before the consumer starts, so retries also queue behind the first
/// attempts, each of which waits for its retry publish to be acknowledged.
async fn retry_timing(broker: &DevBroker, steady: bool) -> anyhow::Result<Row> {
    let load = common::load_avg();
    let bootstrap = broker.bootstrap_servers();
    let topics = common::create_topics(broker, "bench-retry")?;
    let n = common::size(10_000, 500);
    let rate = common::size(1_000, 500);
    let workers = if steady { "32" } else { "8" };
    let mut settings = vec![
        ("KAFKA_RETRY_BACKOFF", "1s"),
        ("KAFKA_CONSUMER_WORKERS", workers),
        // Every first attempt fails, so the circuit breaker would (rightly) open and hold
        // messages instead of retrying them: this scenario times the retry scheduling, as
        // before the breaker existed.
        ("PROCESSOR_CIRCUIT", "off"),
    ];
    // `COURIER_BENCH_EXTRA="RDKAFKA_FETCH_WAIT_MAX_MS=50"`: settings over these, for
    // investigating what bounds the lateness.
    let extra = std::env::var("COURIER_BENCH_EXTRA").unwrap_or_default();
    settings.extend(extra.split_whitespace().filter_map(|kv| kv.split_once('=')));
    let config = common::config(&bootstrap, &topics, &settings)?;
    let tracker = Tracker::new(n);
    let processor = FailOnce::new(tracker.clone());
    if !steady {
        common::produce_backlog(&bootstrap, &topics.source, n).await?;
    }
    let started = Instant::now();
    let consumer = {
        let (processor, tracker) = (processor.clone(), tracker.clone());
        tokio::spawn(async move {
            let timeout = Duration::from_secs(180);
            common::run_courier_consumer(config, processor, &tracker, timeout).await
        })
    };
    if steady {
        produce_paced(&bootstrap, &topics.source, 1, 1, "warmup").await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while processor.warmed_up.load(Ordering::Relaxed) == 0 {
            if Instant::now() > deadline || consumer.is_finished() {
                bail!("the consumer did not take the warm-up message");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        produce_paced(&bootstrap, &topics.source, n, rate, "steady").await?;
    }
    consumer.await??;
    let secs = started.elapsed().as_secs_f64();
    let missing = processor.missing_due.load(Ordering::Relaxed);
    let mut late = std::mem::take(&mut *processor.lateness_us.lock());
    late.sort_unstable();
    let early = late.iter().filter(|&&l| l < 0).count();
    let ms = |us: i64| us as f64 / 1000.0;
    let p50 = ms(common::percentile(&late, 50.0));
    let p99 = ms(common::percentile(&late, 99.0));
    let max = ms(late.last().copied().unwrap_or(0));
    let mut what = if steady {
        format!("steady {rate}/s stream, {workers} workers")
    } else {
        format!("burst of {n} at once, {workers} workers (default)")
    };
    if !extra.trim().is_empty() {
        what = format!("{what}, {}", extra.trim());
    }
    println!("retry lateness ({what}) over {} retried messages: p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms; early: {early}; without a due time: {missing}", late.len());
    if early > 0 || missing > 0 {
        bail!("{early} retries ran before their due time and {missing} had no due time");
    }
    Ok(Row {
        scenario: format!("retry lateness, 1 s back-off, every message fails once: {what}"),
        msgs: late.len() as u64,
        secs,
        rate: late.len() as f64 / secs,
        ratio: format!("p50 {p50:.1} ms / p99 {p99:.1} ms / max {max:.1} ms"),
        note: format!("early: {early} (must be 0); secs and msgs/s: the whole run"),
        load,
    })
}

/// What the memory child reports, KiB.
#[derive(Debug, Default)]
struct MemoryReport {
    before: u64,
    at10: u64,
    at50: u64,
    at90: u64,
    peak: u64,
    msgs: u64,
    secs: f64,
}

/// The child: drains `expected` messages with a 1 ms processor while sampling VmRSS every
/// 20 ms, then prints one `MEMORY` line for the parent.
fn memory_child(args: &[String]) -> anyhow::Result<()> {
    let [bootstrap, source, prefix, dlq, expected, workers] = args else {
        bail!("usage: --memory-child BOOTSTRAP SOURCE PREFIX DLQ EXPECTED WORKERS");
    };
    // The group is the configuration's own (see `common::config`).
    let topics = Names {
        source: source.clone(),
        prefix: prefix.clone(),
        dlq: dlq.clone(),
        group: String::new(),
    };
    let expected: u64 = expected.parse()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let before = common::rss_kib("self").unwrap_or(0);
    let config = common::config(bootstrap, &topics, &[("KAFKA_CONSUMER_WORKERS", workers)])?;
    let tracker = Tracker::new(expected);
    let sampler_tracker = tracker.clone();
    let sampler = std::thread::spawn(move || {
        let mut samples = Vec::new();
        while sampler_tracker.count() < expected {
            samples.push((
                sampler_tracker.count(),
                common::rss_kib("self").unwrap_or(0),
            ));
            std::thread::sleep(Duration::from_millis(20));
        }
        samples
    });
    let processor = Arc::new(SlowProcessor {
        tracker: tracker.clone(),
    });
    rt.block_on(common::run_courier_consumer(
        config,
        processor,
        &tracker,
        Duration::from_secs(600),
    ))?;
    let samples = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("the sampler panicked"))?;
    let at = |pct: u64| {
        samples
            .iter()
            .find(|(c, _)| *c >= expected * pct / 100)
            .map_or(0, |(_, r)| *r)
    };
    let peak = samples.iter().map(|(_, r)| *r).max().unwrap_or(0);
    println!(
        "MEMORY {before} {} {} {} {peak} {expected} {:.3}",
        at(10),
        at(50),
        at(90),
        tracker.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Awaits 1 ms per message.
struct SlowProcessor {
    tracker: Arc<Tracker>,
}

#[async_trait]
impl Processor for SlowProcessor {
    async fn process(&self, _d: &Delivery) -> Result<(), ProcessError> {
        self.tracker.start();
        tokio::time::sleep(Duration::from_millis(1)).await;
        self.tracker.done();
        Ok(())
    }
}

/// Produces the backlog, runs the child over it and reads its report.
async fn memory(broker: &DevBroker, produce: u64) -> anyhow::Result<Row> {
    let load = common::load_avg();
    let bootstrap = broker.bootstrap_servers();
    let topics = common::create_topics(broker, "bench-memory")?;
    common::produce_backlog(&bootstrap, &topics.source, produce).await?;
    let retained = common::retained(&bootstrap, &topics.source)?;
    let workers = "32";
    let exe = std::env::current_exe()?;
    let args = [
        "--memory-child".to_owned(),
        bootstrap,
        topics.source.clone(),
        topics.prefix.clone(),
        topics.dlq.clone(),
        retained.to_string(),
        workers.to_owned(),
    ];
    let out =
        tokio::task::spawn_blocking(move || std::process::Command::new(exe).args(args).output())
            .await?
            .context("running the memory child")?;
    if !out.status.success() {
        bail!(
            "the memory child failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("MEMORY "))
        .context("the memory child printed no report")?;
    let v: Vec<f64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let [before, at10, at50, at90, peak, msgs, secs] = v[..] else {
        bail!("malformed memory report: {line}");
    };
    let r = MemoryReport {
        before: before as u64,
        at10: at10 as u64,
        at50: at50 as u64,
        at90: at90 as u64,
        peak: peak as u64,
        msgs: msgs as u64,
        secs,
    };
    let mib = |k: u64| k as f64 / 1024.0;
    Ok(Row {
        scenario: format!("consumer RSS draining {} retained of {produce} (1 ms processor, {workers} workers, 1000 in flight)", r.msgs),
        msgs: r.msgs,
        secs: r.secs,
        rate: r.msgs as f64 / r.secs.max(1e-9),
        ratio: format!(
            "10% {:.1} / 50% {:.1} / 90% {:.1} / peak {:.1} MiB",
            mib(r.at10),
            mib(r.at50),
            mib(r.at90),
            mib(r.peak)
        ),
        note: format!(
            "before start {:.1} MiB; growth 10%→90% {:+.1} MiB",
            mib(r.before),
            mib(r.at90) - mib(r.at10)
        ),
        load,
    })
}

/// Runs both scenarios and prints the table.
async fn run() -> anyhow::Result<()> {
    // `COURIER_BENCH_LOG=info` (or a filter such as `courier=debug`): courier's logs on
    // stderr, for investigating.
    if let Ok(level) = std::env::var("COURIER_BENCH_LOG") {
        let log = courier::config::LogConfig {
            level,
            format: courier::config::LogFormat::Pretty,
        };
        courier::observability::logging::init(&log, std::io::stderr);
    }
    let broker = DevBroker::start()?;
    let mut rows = Vec::new();
    if common::runs("steady") {
        rows.push(retry_timing(&broker, true).await?);
    }
    if common::runs("burst") {
        rows.push(retry_timing(&broker, false).await?);
    }
    if common::runs("memory") {
        rows.push(memory(&broker, common::size(1_000_000, 5_000)).await?);
        if !common::smoke() {
            // The same drain over a quarter of the backlog: the peak should not follow it.
            rows.push(memory(&broker, 100_000).await?);
        }
    }
    common::print_table("Retry timing and consumer memory", &rows);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--memory-child") {
        return memory_child(&args[i + 1..]);
    }
    common::main_with("retry_memory", run())
}
