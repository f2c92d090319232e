//! Producer throughput against the in-memory broker (DevBroker), release build. Every
//! scenario publishes to 12 partitions with courier's producer properties (acks=all,
//! idempotence, linger 5 ms), each record carrying a UUIDv7 `message-id` header:
//!
//! 1. Baselines: a bare rdkafka `BaseProducer` whose delivery callback counts the
//!    acknowledgements (the least a producer with these properties can do), and a bare
//!    `FutureProducer` with a bounded window of delivery futures.
//! 2. courier's publish path as ingest runs it, without HTTP: a request body of 100 events
//!    (JSON, as a client sends it) read by `model::events_to_batch` (validation, a UUIDv7
//!    `message-id` per event, each event written into the batch), the request's trace
//!    context on every record, and `Publisher::publish_all` with its deadline (one wait for
//!    every acknowledgement): the calls of `service::ingest::publish_records` (its ledger,
//!    one lock per call, is left out).
//! 3. courier's single-record path, `KafkaPublisher::publish` per envelope (what retry and
//!    DLQ publishing use).
//! 4. courier's HTTP ingest (`courier::app::producer::start`) driven over loopback by an
//!    in-process load generator on its own thread (plain HTTP/1.1 keep-alive connections),
//!    with batched (100 events per request; on 100 connections that is the baselines' window
//!    of 10,000 events in flight) and single-event requests. A client waits for each answer
//!    and an answer for the acknowledgement, so each row is bounded by its events in flight
//!    over the acknowledgement latency (linger 5 ms included). Their CPU per request leaves
//!    out the load generator's thread (the in-process broker stays in).
//!
//! Each of these runs `COURIER_BENCH_ROUNDS` times (3; 1 in smoke runs), the scenarios in
//! turn, and every ratio divides by the baselines of its own round; the summary gives the
//! minimum, median and maximum over the rounds. `COURIER_BENCH_ONLY=base,future,batch,single,http`
//! runs only those scenarios (for profiling; a ratio needs its baseline).
//!
//! Run: `cargo bench --bench producer_throughput`; smoke: `COURIER_BENCH_SMOKE=1 cargo
//! bench --bench producer_throughput`.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use common::http::HttpConn;
use common::{Row, Usage};
use courier::model::{events_to_batch, Envelope, TraceContext};
use courier::observability::Metrics;
use courier::service::Publisher;
use courier::transport::settings::{client_config, ClientRole};
use courier::transport::{DevBroker, KafkaPublisher};
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, FutureProducer, FutureRecord, Producer, ProducerContext,
    ThreadedProducer,
};
use rdkafka::ClientContext;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Records (or publishes) awaiting acknowledgement at most, in every scenario.
const WINDOW: usize = 10_000;
/// Events per `publish_batch` call in the publish-path scenario, as in a 100-event request.
const PER_CALL: usize = 100;

/// Whether scenario `name` runs (`COURIER_BENCH_ONLY` unset, or naming it).
fn wanted(name: &str) -> bool {
    std::env::var("COURIER_BENCH_ONLY")
        .map_or(true, |only| only.split(',').any(|s| s.trim() == name))
}

/// How long a new producer gets before a scenario starts its clock: librdkafka's idempotent
/// producer holds the records sent in its first milliseconds until its producer-id timer
/// fires (500 ms), which would land on whichever scenario sends first.
const SETTLE: Duration = Duration::from_millis(50);

/// Waits [`SETTLE`] (blocking: on the sending thread or in a scenario before it is timed).
fn settle() {
    std::thread::sleep(SETTLE);
}

/// The `data` padding that makes a published envelope [`common::PAYLOAD_BYTES`] long once
/// the producer adds its 36-character UUIDv7 `id`.
fn envelope_padding(key: &str) -> String {
    let probe =
        json!({"type": "bench", "key": key, "data": "", "id": uuid::Uuid::nil().to_string()});
    let len = probe.to_string().len();
    "x".repeat(common::PAYLOAD_BYTES.saturating_sub(len))
}

/// One event as a client sends it: the input of courier's publish path.
fn event(i: u64, pad: &str) -> serde_json::Value {
    json!({"type": "bench", "key": format!("k{i:08}"), "data": pad})
}

/// CPU time (user + system) of the calling thread so far, seconds (`/proc/thread-self`,
/// clock ticks of 1/100 s).
fn thread_cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/thread-self/stat") else {
        return 0.0;
    };
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<f64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    (fields.get(11).unwrap_or(&0.0) + fields.get(12).unwrap_or(&0.0)) / 100.0
}

/// The baseline's delivery callback: counts acknowledgements and failures.
#[derive(Default)]
struct Counting {
    acked: AtomicU64,
    failed: AtomicU64,
    /// Set while the sending thread waits for the window to open.
    waiting: AtomicBool,
    lock: Mutex<()>,
    opened: Condvar,
}

impl Counting {
    fn done(&self) -> u64 {
        self.acked.load(Ordering::SeqCst) + self.failed.load(Ordering::SeqCst)
    }

    /// Blocks until fewer than `window` of the `sent` records are unacknowledged.
    fn wait_below(&self, sent: u64, window: u64) {
        while sent - self.done() >= window {
            let guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.waiting.store(true, Ordering::SeqCst);
            if sent - self.done() >= window {
                // The delivery callback wakes it; the timeout is only a safety net.
                let _ = self.opened.wait_timeout(guard, Duration::from_millis(10));
            }
            self.waiting.store(false, Ordering::SeqCst);
        }
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
        counter.fetch_add(1, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) {
            let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.opened.notify_one();
        }
    }
}

/// The strict baseline: `BaseProducer::send` on one thread, the delivery reports run by the
/// polling thread of rdkafka's `ThreadedProducer` (a `BaseProducer` polled on its own
/// thread); the sender waits whenever [`WINDOW`] records are unacknowledged (or the queue is
/// full).
fn raw_base_producer(config: &courier::config::Config, topic: &str, n: u64) -> anyhow::Result<Row> {
    let load = common::load_avg();
    let producer: ThreadedProducer<Counting> = client_config(config, ClientRole::Producer)
        .create_with_context(Counting::default())
        .context("raw producer")?;
    let payloads: Vec<Vec<u8>> = (0..1024)
        .map(|i| common::payload(&format!("p{i}")))
        .collect();
    settle();
    let usage = Usage::start();
    let started = Instant::now();
    let mut key = String::new();
    let mut text = uuid::Uuid::encode_buffer();
    for i in 0..n {
        producer.context().wait_below(i, WINDOW as u64);
        key.clear();
        std::fmt::Write::write_fmt(&mut key, format_args!("k{i:08}"))?;
        let id: &str = uuid::Uuid::now_v7().hyphenated().encode_lower(&mut text);
        let mut record = BaseRecord::to(topic)
            .key(key.as_str())
            .payload(payloads[i as usize % payloads.len()].as_slice())
            .headers(OwnedHeaders::new_with_capacity(1).insert(Header {
                key: "message-id",
                value: Some(id.as_bytes()),
            }));
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((e, back))
                    if e.rdkafka_error_code()
                        == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) =>
                {
                    record = back;
                    // The queue drains as acknowledgements come in.
                    producer
                        .context()
                        .wait_below(i, (i - producer.context().done()).max(1));
                }
                Err((e, _)) => bail!("send failed: {e}"),
            }
        }
    }
    producer.context().wait_below(n, 1);
    let secs = started.elapsed().as_secs_f64();
    let failed = producer.context().failed.load(Ordering::Relaxed);
    if failed > 0 {
        bail!("{failed} deliveries failed");
    }
    Ok(Row {
        scenario: "raw rdkafka BaseProducer + delivery callback (baseline)".into(),
        msgs: n,
        secs,
        rate: n as f64 / secs,
        ratio: "1.00".into(),
        note: format!(
            "window {WINDOW}; courier's producer properties; UUIDv7 message-id header; CPU {:.1} µs/msg",
            usage.cpu_us_per_msg(n)
        ),
        load,
    })
}

/// The second baseline: `FutureProducer::send_result` with a bounded window of delivery
/// futures.
async fn raw_future_producer(
    config: &courier::config::Config,
    topic: &str,
    n: u64,
) -> anyhow::Result<Row> {
    let load = common::load_avg();
    let producer: FutureProducer = client_config(config, ClientRole::Producer)
        .create()
        .context("raw producer")?;
    let payloads: Vec<Vec<u8>> = (0..1024)
        .map(|i| common::payload(&format!("p{i}")))
        .collect();
    settle();
    let usage = Usage::start();
    let started = Instant::now();
    let mut window = FuturesUnordered::new();
    for i in 0..n {
        if window.len() >= WINDOW {
            if let Some(r) = window.next().await {
                common::check_delivery(r)?;
            }
        }
        let key = format!("k{i:08}");
        // A UUIDv7 `message-id` header per record, as courier writes one.
        let id = uuid::Uuid::now_v7().to_string();
        let record: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic)
            .key(key.as_str())
            .payload(payloads[i as usize % payloads.len()].as_slice())
            .headers(OwnedHeaders::new_with_capacity(1).insert(Header {
                key: "message-id",
                value: Some(id.as_bytes()),
            }));
        match producer.send_result(record) {
            Ok(f) => window.push(f),
            Err((e, _)) => bail!("send failed: {e}"),
        }
    }
    while let Some(r) = window.next().await {
        common::check_delivery(r)?;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(Row {
        scenario: "raw rdkafka FutureProducer (baseline)".into(),
        msgs: n,
        secs,
        rate: n as f64 / secs,
        ratio: "-".into(),
        note: format!(
            "window {WINDOW}; courier's producer properties; UUIDv7 message-id header; CPU {:.1} µs/msg",
            usage.cpu_us_per_msg(n)
        ),
        load,
    })
}

/// courier's publish path as ingest runs it: request bodies of [`PER_CALL`] events, each
/// read and published as `service::ingest::publish_records` does, [`WINDOW`] events in
/// flight at most.
async fn courier_publish_batches(
    config: &courier::config::Config,
    topic: &str,
    n: u64,
) -> anyhow::Result<Row> {
    let load = common::load_avg();
    let publisher: Arc<dyn Publisher> = Arc::new(KafkaPublisher::new(config, Metrics::new())?);
    let bodies = bodies(PER_CALL, 64);
    let deadline = Duration::from_secs(30);
    settle();
    let usage = Usage::start();
    let started = Instant::now();
    let mut window = FuturesUnordered::new();
    let mut failed = 0;
    let mut i = 0u64;
    while i < n {
        if window.len() >= WINDOW / PER_CALL {
            if let Some(f) = window.next().await {
                failed += f;
            }
        }
        let body = &bodies[(i / PER_CALL as u64) as usize % bodies.len()];
        let mut batch = events_to_batch(body, topic, PER_CALL)
            .context("the one-pass reader refused a valid body")?;
        i += batch.len() as u64;
        let publisher = &publisher;
        window.push(async move {
            // Each call is one request: a new trace, on every record.
            let trace = TraceContext::new_root();
            batch.set_common_headers(trace.headers().collect());
            let results = publisher.publish_all(&batch, Some(deadline)).await;
            results.iter().filter(|r| !matches!(r, Some(Ok(_)))).count()
        });
    }
    while let Some(f) = window.next().await {
        failed += f;
    }
    let secs = started.elapsed().as_secs_f64();
    if failed > 0 {
        bail!("{failed} publishes failed");
    }
    Ok(Row {
        scenario: format!(
            "courier publish path: events_to_batch + publish_all, {PER_CALL} events per call"
        ),
        msgs: n,
        secs,
        rate: n as f64 / secs,
        ratio: String::new(),
        note: format!(
            "window {WINDOW}; message-id and traceparent headers; CPU {:.1} µs/msg",
            usage.cpu_us_per_msg(n)
        ),
        load,
    })
}

/// courier's single-record path: an envelope and `KafkaPublisher::publish` per event, same
/// window.
async fn courier_publish_single(
    config: &courier::config::Config,
    topic: &str,
    n: u64,
) -> anyhow::Result<Row> {
    let load = common::load_avg();
    let publisher = KafkaPublisher::new(config, Metrics::new())?;
    let pad = envelope_padding("k00000000");
    settle();
    let usage = Usage::start();
    let started = Instant::now();
    let mut window = FuturesUnordered::new();
    let mut failed = 0u64;
    for i in 0..n {
        if window.len() >= WINDOW {
            if let Some(Err(_)) = window.next().await {
                failed += 1;
            }
        }
        let envelope = Envelope::from_value(event(i, &pad)).map_err(|e| anyhow::anyhow!("{e}"))?;
        window.push(publisher.publish(envelope.to_record(topic)));
    }
    while let Some(r) = window.next().await {
        failed += u64::from(r.is_err());
    }
    let secs = started.elapsed().as_secs_f64();
    if failed > 0 {
        bail!("{failed} publishes failed");
    }
    Ok(Row {
        scenario: "courier single record: Envelope + KafkaPublisher::publish".into(),
        msgs: n,
        secs,
        rate: n as f64 / secs,
        ratio: String::new(),
        note: format!(
            "window {WINDOW}; message-id header; CPU {:.1} µs/msg",
            usage.cpu_us_per_msg(n)
        ),
        load,
    })
}

/// Request bodies of `per_request` events each, with distinct keys.
fn bodies(per_request: usize, count: usize) -> Vec<Vec<u8>> {
    let pad = envelope_padding("k00000000");
    (0..count)
        .map(|b| {
            let events: Vec<serde_json::Value> = (0..per_request)
                .map(|i| event(((b * per_request + i) % 100_000_000) as u64, &pad))
                .collect();
            if per_request == 1 {
                events[0].to_string().into_bytes()
            } else {
                serde_json::Value::Array(events).to_string().into_bytes()
            }
        })
        .collect()
}

/// What one load-generator run saw.
struct LoadRun {
    acked: u64,
    took: Duration,
    /// CPU time of the load generator's own thread, seconds.
    cpu_secs: f64,
}

/// Drives `requests` POSTs of `per_request` events over `conns` keep-alive connections from
/// a current-thread runtime on its own OS thread (like a separate client process).
fn load_generator(
    addr: std::net::SocketAddr,
    per_request: usize,
    requests: u64,
    conns: usize,
) -> anyhow::Result<LoadRun> {
    let handle = std::thread::spawn(move || -> anyhow::Result<LoadRun> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let bodies = Arc::new(bodies(per_request, 64));
        let cpu = thread_cpu_secs();
        let (acked, took) = rt.block_on(async move {
            let next = Arc::new(AtomicU64::new(0));
            let mut conn_list = Vec::new();
            for _ in 0..conns {
                conn_list.push(HttpConn::connect(addr).await?);
            }
            let started = Instant::now();
            let tasks: Vec<_> = conn_list
                .into_iter()
                .map(|mut conn| {
                    let (next, bodies) = (next.clone(), bodies.clone());
                    tokio::spawn(async move {
                        let mut ok = 0u64;
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= requests {
                                return anyhow::Ok(ok);
                            }
                            let body = &bodies[i as usize % bodies.len()];
                            let (status, answer) = conn.request("POST", "/v1/events", body).await?;
                            if status != 200 {
                                bail!("status {status}: {}", String::from_utf8_lossy(&answer));
                            }
                            ok += per_request as u64;
                        }
                    })
                })
                .collect();
            let mut acked = 0;
            for t in tasks {
                acked += t.await??;
            }
            anyhow::Ok((acked, started.elapsed()))
        })?;
        Ok(LoadRun {
            acked,
            took,
            cpu_secs: thread_cpu_secs() - cpu,
        })
    });
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("the load generator panicked"))?
}

/// Waits until the producer's `/readyz` answers 200 (the broker probe succeeded).
async fn wait_ready(ops: std::net::SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut c = HttpConn::connect(ops).await?;
        if c.request("GET", "/readyz", b"").await?.0 == 200 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the producer did not become ready");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The HTTP ingest path, one row per (events per request, connections).
async fn http_ingest(addr: std::net::SocketAddr) -> anyhow::Result<Vec<Row>> {
    // A client waits for each answer, and an answer waits for the broker's acknowledgement
    // (linger 5 ms included): events in flight are (connections × events per request), so
    // each row is bounded by that over the acknowledgement latency. 100 connections of 100
    // events have the baselines' window of 10,000 in flight.
    let cases: [(usize, u64, usize); 4] = [
        (100, common::size(3_000, 30), 16),
        (100, common::size(10_000, 30), 100),
        (1, common::size(30_000, 500), 64),
        (1, common::size(60_000, 500), 256),
    ];
    let mut rows = Vec::new();
    for (per_request, requests, conns) in cases {
        let load = common::load_avg();
        let usage = Usage::start();
        let cpu = common::cpu_secs();
        let run =
            tokio::task::spawn_blocking(move || load_generator(addr, per_request, requests, conns))
                .await??;
        let courier_cpu = common::cpu_secs() - cpu - run.cpu_secs;
        let rate = run.acked as f64 / run.took.as_secs_f64();
        rows.push(Row {
            scenario: format!(
                "courier HTTP ingest, {per_request} event(s)/request, {conns} connections"
            ),
            msgs: run.acked,
            secs: run.took.as_secs_f64(),
            rate,
            ratio: String::new(),
            note: format!(
                "{:.0} requests/s; answer after the broker's ack; CPU {:.1} µs/request without the load generator ({:.1} µs/msg with it)",
                requests as f64 / run.took.as_secs_f64(),
                courier_cpu * 1e6 / requests as f64,
                usage.cpu_us_per_msg(run.acked)
            ),
            load,
        });
    }
    Ok(rows)
}

/// One scenario's figures over the rounds: its name, then per round its rate, its ratio to
/// the BaseProducer and its ratio to the FutureProducer.
type Spreads = (String, Vec<f64>, Vec<f64>, Vec<f64>);

/// min / median / max of `values`, formatted with `digits` decimals.
fn spread(values: &mut [f64], digits: usize) -> String {
    values.sort_by(f64::total_cmp);
    match values {
        [] => "-".into(),
        [one] => format!("{one:.digits$}"),
        _ => format!(
            "{:.digits$} / {:.digits$} / {:.digits$}",
            values[0],
            values[values.len() / 2],
            values[values.len() - 1]
        ),
    }
}

/// The ratio target of a scenario, by its name.
fn target(scenario: &str) -> &'static str {
    if scenario.starts_with("courier publish path") {
        " (>= 0.80)"
    } else if scenario.contains("100 event(s)/request, 100 connections") {
        " (>= 0.50)"
    } else {
        ""
    }
}

/// Runs every scenario `COURIER_BENCH_ROUNDS` times and prints the tables.
async fn run() -> anyhow::Result<()> {
    let broker = DevBroker::start()?;
    let bootstrap = broker.bootstrap_servers();
    let topics = common::create_topics(&broker, "bench-produce")?;
    let config = common::config(&bootstrap, &topics, &[])?;
    let n = common::size(500_000, 5_000);
    let rounds: usize = std::env::var("COURIER_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if common::smoke() { 1 } else { 3 });
    let shutdown = CancellationToken::new();
    let producer = if wanted("http") {
        let p = courier::app::producer::start(
            common::config(&bootstrap, &topics, &[])?,
            Default::default(),
            shutdown.clone(),
        )
        .await?;
        wait_ready(p.ops_addr).await?;
        Some(p)
    } else {
        None
    };
    // A warm-up, not measured: the first producer on a topic of the mock waits for its
    // partitions' leaders; no scenario should pay for that.
    {
        let (c, t) = (config.clone(), topics.source.clone());
        tokio::task::spawn_blocking(move || raw_base_producer(&c, &t, 1_000)).await??;
    }
    // Per scenario: (rate, ratio to the BaseProducer, ratio to the FutureProducer) per round.
    let mut summary: Vec<Spreads> = Vec::new();
    let mut all_rows = Vec::new();
    for round in 1..=rounds {
        let mut rows = Vec::new();
        if wanted("base") {
            let (c, t) = (config.clone(), topics.source.clone());
            rows.push(tokio::task::spawn_blocking(move || raw_base_producer(&c, &t, n)).await??);
        }
        if wanted("future") {
            rows.push(raw_future_producer(&config, &topics.source, n).await?);
        }
        if wanted("batch") {
            rows.push(courier_publish_batches(&config, &topics.source, n).await?);
        }
        if wanted("single") {
            rows.push(courier_publish_single(&config, &topics.source, n).await?);
        }
        if let Some(p) = &producer {
            rows.extend(http_ingest(p.http_addr).await?);
        }
        let base = rows
            .iter()
            .find(|r| r.scenario.contains("BaseProducer"))
            .map(|r| r.rate);
        let future = rows
            .iter()
            .find(|r| r.scenario.contains("FutureProducer"))
            .map(|r| r.rate);
        for r in &mut rows {
            if let Some(b) = base {
                if r.ratio.is_empty() {
                    r.ratio = format!("{:.2}{}", r.rate / b, target(&r.scenario));
                }
            }
            let entry = match summary.iter_mut().find(|(s, ..)| *s == r.scenario) {
                Some(e) => e,
                None => {
                    summary.push((r.scenario.clone(), vec![], vec![], vec![]));
                    summary.last_mut().expect("pushed")
                }
            };
            entry.1.push(r.rate);
            if let Some(b) = base {
                entry.2.push(r.rate / b);
            }
            if let Some(f) = future {
                entry.3.push(r.rate / f);
            }
            r.scenario = format!("round {round}: {}", r.scenario);
        }
        all_rows.extend(rows);
    }
    common::print_table(
        &format!(
            "Producer: courier vs raw rdkafka ({} B payloads, {} partitions, acks=all, idempotent, linger 5 ms), every round",
            common::PAYLOAD_BYTES,
            common::PARTITIONS
        ),
        &all_rows,
    );
    println!("## Producer summary over {rounds} round(s): min / median / max");
    println!();
    println!("| scenario | msgs/s | ratio to BaseProducer (target) | ratio to FutureProducer |");
    println!("|---|---:|---|---|");
    for (scenario, mut rates, mut to_base, mut to_future) in summary {
        println!(
            "| {scenario} | {} | {}{} | {} |",
            spread(&mut rates, 0),
            spread(&mut to_base, 2),
            target(&scenario),
            spread(&mut to_future, 2)
        );
    }
    println!();
    shutdown.cancel();
    if let Some(p) = producer {
        let unflushed = p.done.await?;
        if unflushed > 0 {
            bail!("{unflushed} messages unflushed at shutdown");
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    common::main_with("producer_throughput", run())
}
