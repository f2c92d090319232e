//! Shared helpers of courier's benchmarks (`cargo bench`, harness = false): topics on the
//! in-memory broker and courier configurations against it (through `courier::testing`, as
//! the tests get theirs), backlog production, progress tracking, CPU/RSS sampling and the
//! printed table; [`http`] holds a plain HTTP/1.1 keep-alive client for the load generator.
//!
//! Every figure is measured in the same run as its baseline, so results are reported as
//! ratios. Smoke mode (`COURIER_BENCH_SMOKE=1` or `--smoke`) runs every scenario on a few
//! thousand messages, to keep the benchmarks compiling and running in CI; it asserts
//! nothing about performance.
#![allow(dead_code)] // each bench binary uses a different subset

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use courier::config::Config;
use courier::testing::env::BENCH;
use courier::testing::{unique, Kafka, Names, ServiceEnv};
use courier::transport::DevBroker;
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;

pub mod http;

/// Partitions of every benchmark topic.
pub const PARTITIONS: i32 = 12;
/// Size of every benchmark payload, bytes.
pub const PAYLOAD_BYTES: usize = 100;

/// Whether this is a smoke run: `COURIER_BENCH_SMOKE=1` or a `--smoke` argument.
pub fn smoke() -> bool {
    std::env::var("COURIER_BENCH_SMOKE").is_ok_and(|v| !v.is_empty() && v != "0")
        || std::env::args().any(|a| a == "--smoke")
}

/// Whether scenario group `name` runs: all of them unless `COURIER_BENCH_ONLY` lists names
/// (comma-separated), for investigating one figure at a time. Smoke runs everything.
pub fn runs(name: &str) -> bool {
    match std::env::var("COURIER_BENCH_ONLY") {
        Ok(only) if !smoke() && !only.trim().is_empty() => {
            only.split(',').any(|n| n.trim() == name)
        }
        _ => true,
    }
}

/// `full` in a full run, `smoke` in a smoke run.
pub fn size(full: u64, smoke_size: u64) -> u64 {
    if smoke() {
        smoke_size
    } else {
        full
    }
}

/// The 1-minute load average, as printed in the table.
pub fn load_avg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// CPU time (user + system, every thread) this process has used so far, seconds. Linux
/// reports it in clock ticks of 1/100 s (`USER_HZ`).
pub fn cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // The command name (field 2) may hold spaces: count fields after its closing paren.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line: 11 and 12 counted after the paren.
    (ticks(11) + ticks(12)) / 100.0
}

/// Process CPU time over a span of a scenario.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    cpu: f64,
}

impl Usage {
    /// Starts measuring.
    pub fn start() -> Usage {
        Usage { cpu: cpu_secs() }
    }

    /// CPU microseconds per message of `msgs` since [`Usage::start`] (every thread of the
    /// process, the in-process broker included).
    pub fn cpu_us_per_msg(&self, msgs: u64) -> f64 {
        (cpu_secs() - self.cpu) * 1e6 / msgs.max(1) as f64
    }
}

/// Bytes the broker at `bootstrap` has sent over its connections that are open now
/// (`bytes_sent` of `ss -ti`): taken while a consumer is still connected, that is what it
/// fetched, so comparing it with the baseline's shows data fetched more than once.
/// `None` when `ss` is not available.
pub fn broker_sent_bytes(bootstrap: &str) -> Option<u64> {
    let port = bootstrap.rsplit(':').next()?;
    let filter = format!("( sport = :{port} )");
    let out = std::process::Command::new("ss")
        .args(["-tinH", "state", "established", &filter])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Some(
        text.split_whitespace()
            .filter_map(|t| t.strip_prefix("bytes_sent:"))
            .filter_map(|v| v.parse::<u64>().ok())
            .sum(),
    )
}

/// Formats a byte count as MiB, or `?` when unknown.
pub fn mib(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "?".into(), |b| format!("{:.0}", b as f64 / 1048576.0))
}

/// The resident set size of process `pid` (`"self"` for this one), KiB.
pub fn rss_kib(pid: &str) -> Option<u64> {
    courier::testing::proc_status_kib(pid, "VmRSS")
}

/// A fresh source topic `{stem}-{id}` with its retry chain and DLQ on `broker`, all with
/// [`PARTITIONS`] partitions.
///
/// # Errors
/// When the mock cluster refuses a topic.
pub fn create_topics(broker: &DevBroker, stem: &str) -> anyhow::Result<Names> {
    let names = Names::new(stem);
    names
        .create_on(broker, PARTITIONS)
        .with_context(|| format!("creating the topics of {}", names.source))?;
    Ok(names)
}

/// A validated courier configuration against `bootstrap` and `topics`: the benchmark
/// preset, a consumer group of its own (every scenario reads the backlog from its start),
/// and `extra` over them.
///
/// # Errors
/// When the configuration is invalid.
pub fn config(bootstrap: &str, topics: &Names, extra: &[(&str, &str)]) -> anyhow::Result<Config> {
    ServiceEnv::against(bootstrap, topics)
        .set("KAFKA_CONSUMER_GROUP_ID", unique("courier"))
        .with(BENCH)
        .with(extra)
        .try_config()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// A JSON object of exactly [`PAYLOAD_BYTES`] bytes with string `id` and `type` (what the
/// `log` processor accepts), padded with a `data` string.
pub fn payload(id: &str) -> Vec<u8> {
    let head = format!(r#"{{"id":"{id}","type":"bench","data":""#);
    let pad = PAYLOAD_BYTES.saturating_sub(head.len() + 2);
    let mut out = head.into_bytes();
    out.extend(std::iter::repeat_n(b'x', pad));
    out.extend_from_slice(b"\"}");
    out
}

/// Produces `n` messages to `topic` as fast as the broker takes them: 100-byte payloads,
/// distinct keys `k{i}`, a `message-id` header `{run}-{i}`. Large batches (linger 20 ms),
/// because the mock broker answers a fetch with one record batch per partition.
///
/// # Errors
/// When a delivery fails.
pub async fn produce_backlog(bootstrap: &str, topic: &str, n: u64) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "20")
        .set(
            "batch.num.messages",
            std::env::var("COURIER_BENCH_BATCH").unwrap_or_else(|_| "100000".into()),
        )
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .set("acks", "1")
        .create()
        .context("backlog producer")?;
    let run = unique("m");
    // An experiment knob: keyless messages are spread round-robin over courier's lanes.
    let keyless = std::env::var_os("COURIER_BENCH_KEYLESS").is_some();
    let mut window = FuturesUnordered::new();
    for i in 0..n {
        if window.len() >= 50_000 {
            if let Some(r) = window.next().await {
                check_delivery(r)?;
            }
        }
        let id = format!("{run}-{i}");
        let key = format!("k{i}");
        let value = payload(&id);
        let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic)
            .payload(value.as_slice())
            .headers(OwnedHeaders::new().insert(Header {
                key: "message-id",
                value: Some(id.as_str()),
            }));
        if !keyless {
            record = record.key(key.as_str());
        }
        match producer.send_result(record) {
            Ok(f) => window.push(f),
            Err((e, _)) => bail!("queuing a backlog message failed: {e}"),
        }
    }
    while let Some(r) = window.next().await {
        check_delivery(r)?;
    }
    Ok(())
}

/// Turns one delivery result into an error when it failed.
pub fn check_delivery(
    r: Result<
        rdkafka::producer::future_producer::OwnedDeliveryResult,
        futures::channel::oneshot::Canceled,
    >,
) -> anyhow::Result<()> {
    match r {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => bail!("delivery failed: {e}"),
        Err(_) => bail!("the producer dropped a delivery"),
    }
}

/// Messages the broker still holds in `topic` (high minus low watermark over every
/// partition): the mock cluster keeps only the newest messages of each partition.
///
/// # Errors
/// When the watermarks cannot be read.
pub fn retained(bootstrap: &str, topic: &str) -> anyhow::Result<u64> {
    let watermarks = Kafka::new(bootstrap, PARTITIONS)
        .watermarks(topic)
        .with_context(|| format!("watermarks of {topic}"))?;
    Ok(watermarks
        .iter()
        .map(|(low, high)| (high - low).max(0) as u64)
        .sum())
}

/// Counts finished messages, and when the first started and the last (the `expected`-th)
/// finished, plus the instants at which 10% and 90% of `expected` had finished (the
/// steady-state window). It reads the clock only at those milestones, so that it adds
/// almost nothing to the per-message cost it measures.
#[derive(Debug)]
pub struct Tracker {
    base: Instant,
    expected: u64,
    count: AtomicU64,
    first_ns: AtomicU64,
    last_ns: AtomicU64,
    p10_ns: AtomicU64,
    p90_ns: AtomicU64,
}

impl Tracker {
    /// A tracker that waits for `expected` messages.
    pub fn new(expected: u64) -> Arc<Tracker> {
        Arc::new(Tracker {
            base: Instant::now(),
            expected,
            count: AtomicU64::new(0),
            first_ns: AtomicU64::new(u64::MAX),
            last_ns: AtomicU64::new(0),
            p10_ns: AtomicU64::new(0),
            p90_ns: AtomicU64::new(0),
        })
    }

    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    /// Marks the start of a message's processing (only the first one reads the clock).
    pub fn start(&self) {
        if self.first_ns.load(Ordering::Relaxed) == u64::MAX {
            self.first_ns.fetch_min(self.now_ns(), Ordering::Relaxed);
        }
    }

    /// Marks a message finished; returns how many have finished.
    pub fn done(&self) -> u64 {
        let c = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        let (p10, p90) = self.window();
        if c == p10 || c == p90 || c == self.expected {
            let now = self.now_ns();
            if c == p10 {
                self.p10_ns.store(now, Ordering::Relaxed);
            }
            if c == p90 {
                self.p90_ns.store(now, Ordering::Relaxed);
            }
            if c == self.expected {
                self.last_ns.store(now, Ordering::Relaxed);
            }
        }
        c
    }

    /// The counts that open and close the steady-state window.
    fn window(&self) -> (u64, u64) {
        ((self.expected / 10).max(1), (self.expected * 9 / 10).max(1))
    }

    /// Messages finished so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// From the first start to the `expected`-th finish.
    pub fn elapsed(&self) -> Duration {
        let first = self.first_ns.load(Ordering::Relaxed);
        let last = self.last_ns.load(Ordering::Relaxed);
        Duration::from_nanos(last.saturating_sub(first.min(last)))
    }

    /// Messages per second from the first start to the `expected`-th finish.
    pub fn rate(&self) -> f64 {
        self.expected as f64 / self.elapsed().as_secs_f64().max(1e-9)
    }

    /// Messages per second between 10% and 90% of `expected` finished.
    pub fn steady_rate(&self) -> f64 {
        let span = self
            .p90_ns
            .load(Ordering::Relaxed)
            .saturating_sub(self.p10_ns.load(Ordering::Relaxed));
        let (p10, p90) = self.window();
        (p90 - p10) as f64 / (span as f64 / 1e9).max(1e-9)
    }

    /// Waits until `expected` messages finished.
    ///
    /// # Errors
    /// When `timeout` passes first.
    pub async fn wait(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let verbose = std::env::var_os("COURIER_BENCH_VERBOSE").is_some();
        let mut next_report = Instant::now();
        while self.count() < self.expected {
            if verbose && Instant::now() >= next_report {
                eprintln!(
                    "  progress at {:.2} s: {} of {}",
                    self.base.elapsed().as_secs_f64(),
                    self.count(),
                    self.expected
                );
                next_report += Duration::from_millis(100);
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out after {timeout:?}: {} of {} messages finished",
                    self.count(),
                    self.expected
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }
}

/// Starts courier's consumer (`courier::app::consumer::start`) with `processor`, waits
/// until `tracker` saw every expected message, then shuts it down and waits for it.
/// Returns what the broker sent over the open connections (see [`broker_sent_bytes`]).
///
/// # Errors
/// When the consumer cannot start or the messages do not arrive within `timeout`.
pub async fn run_courier_consumer(
    config: Config,
    processor: Arc<dyn courier::service::Processor>,
    tracker: &Tracker,
    timeout: Duration,
) -> anyhow::Result<Option<u64>> {
    let bootstrap = config.kafka.brokers.clone();
    let shutdown = CancellationToken::new();
    let opts = courier::app::consumer::ConsumerOptions {
        processor: Some(processor),
        metrics: None,
    };
    let running = courier::app::consumer::start(config, opts, shutdown.clone()).await?;
    let waited = tracker.wait(timeout).await;
    let sent = broker_sent_bytes(&bootstrap);
    shutdown.cancel();
    running.done.await.context("the consumer task panicked")?;
    waited.map(|()| sent)
}

/// Runs a benchmark's `run` on a multi-threaded runtime and says how long it took.
///
/// # Errors
/// When the runtime cannot start or `run` fails.
pub fn main_with(
    name: &str,
    run: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let t = Instant::now();
    rt.block_on(run)?;
    eprintln!("{name} finished in {:.1} s", t.elapsed().as_secs_f64());
    Ok(())
}

/// The `p`-th percentile (0..=100) of sorted `values`.
pub fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// One line of the printed table.
#[derive(Debug, Clone)]
pub struct Row {
    /// What was measured.
    pub scenario: String,
    /// Messages it covered.
    pub msgs: u64,
    /// Wall time of the measurement.
    pub secs: f64,
    /// Its main figure (msgs/s unless `note` says otherwise).
    pub rate: f64,
    /// Ratio against its baseline or ideal, with the target.
    pub ratio: String,
    /// Anything else worth printing.
    pub note: String,
    /// The 1-minute load average when it started.
    pub load: String,
}

/// Prints `rows` as a Markdown table under `title`.
pub fn print_table(title: &str, rows: &[Row]) {
    println!();
    println!(
        "## {title}{}",
        if smoke() {
            " (smoke: not a measurement)"
        } else {
            ""
        }
    );
    println!();
    println!("| scenario | msgs | secs | msgs/s | ratio (target) | load | note |");
    println!("|---|---:|---:|---:|---|---:|---|");
    for r in rows {
        println!(
            "| {} | {} | {:.2} | {:.0} | {} | {} | {} |",
            r.scenario, r.msgs, r.secs, r.rate, r.ratio, r.load, r.note
        );
    }
    println!();
}
