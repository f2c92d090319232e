//! Producer throughput against the in-memory broker (DevBroker), release build:
//!
//! 1. Baseline: a bare rdkafka `FutureProducer` loop with courier's producer properties
//!    (acks=all, idempotence, linger 5 ms), keeping a bounded window of delivery futures;
//!    each record carries a UUIDv7 `message-id` header, as courier's do.
//! 2. courier's publish path: `Envelope` building (validation, a UUIDv7 `message-id`,
//!    JSON serialisation) and `KafkaPublisher::publish` with its delivery tracking, same
//!    window.
//! 3. courier's HTTP ingest (`courier::app::producer::start`) driven over loopback by an
//!    in-process load generator on its own thread (plain HTTP/1.1 keep-alive connections),
//!    with batched (100 events per request) and single-event requests.
//!
//! Run: `cargo bench --bench producer_throughput`; smoke: `COURIER_BENCH_SMOKE=1 cargo
//! bench --bench producer_throughput`.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use common::http::HttpConn;
use common::{Row, Usage};
use courier::model::Envelope;
use courier::observability::Metrics;
use courier::service::Publisher;
use courier::testing::Names;
use courier::transport::settings::{client_config, ClientRole};
use courier::transport::{DevBroker, KafkaPublisher};
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Delivery futures (or publishes) awaiting acknowledgement at most.
const WINDOW: usize = 10_000;

/// The `data` padding that makes a published envelope [`common::PAYLOAD_BYTES`] long once
/// the producer adds its 36-character UUIDv7 `id`.
fn envelope_padding(key: &str) -> String {
    let probe =
        json!({"type": "bench", "key": key, "data": "", "id": uuid::Uuid::nil().to_string()});
    let len = probe.to_string().len();
    "x".repeat(common::PAYLOAD_BYTES.saturating_sub(len))
}

/// The baseline: `FutureProducer::send_result` with a bounded window of delivery futures.
async fn raw_producer(
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
        ratio: "1.00".into(),
        note: format!(
            "window {WINDOW}; courier's producer properties; UUIDv7 message-id header; CPU {:.1} µs/msg",
            usage.cpu_us_per_msg(n)
        ),
        load,
    })
}

/// courier's publish path: envelope, message id, `KafkaPublisher::publish`, same window.
async fn courier_publish(
    config: &courier::config::Config,
    topic: &str,
    n: u64,
    base: f64,
) -> anyhow::Result<Row> {
    let load = common::load_avg();
    let publisher = KafkaPublisher::new(config, Metrics::new())?;
    let pad = envelope_padding("k00000000");
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
        let event = json!({"type": "bench", "key": format!("k{i:08}"), "data": pad});
        let envelope = Envelope::from_value(event).map_err(|e| anyhow::anyhow!("{e}"))?;
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
        scenario: "courier Envelope + KafkaPublisher::publish".into(),
        msgs: n,
        secs,
        rate: n as f64 / secs,
        ratio: format!("{:.2}", n as f64 / secs / base),
        note: format!(
            "window {WINDOW}; UUIDv7 message-id header; CPU {:.1} µs/msg",
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
                .map(|i| json!({"type": "bench", "key": format!("k{:08}", (b * per_request + i) % 100_000_000), "data": pad}))
                .collect();
            if per_request == 1 {
                events[0].to_string().into_bytes()
            } else {
                serde_json::Value::Array(events).to_string().into_bytes()
            }
        })
        .collect()
}

/// Drives `requests` POSTs of `per_request` events over `conns` keep-alive connections from
/// a current-thread runtime on its own OS thread (like a separate client process).
/// Returns the events acknowledged and the time from the first request to the last answer.
fn load_generator(
    addr: std::net::SocketAddr,
    per_request: usize,
    requests: u64,
    conns: usize,
) -> anyhow::Result<(u64, Duration)> {
    let handle = std::thread::spawn(move || -> anyhow::Result<(u64, Duration)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let next = Arc::new(AtomicU64::new(0));
            let bodies = Arc::new(bodies(per_request, 64));
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
            Ok((acked, started.elapsed()))
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
async fn http_ingest(bootstrap: &str, topics: &Names, base: f64) -> anyhow::Result<Vec<Row>> {
    let config = common::config(bootstrap, topics, &[])?;
    let shutdown = CancellationToken::new();
    let producer =
        courier::app::producer::start(config, Default::default(), shutdown.clone()).await?;
    wait_ready(producer.ops_addr).await?;
    let addr = producer.http_addr;
    let cases: [(usize, u64, usize); 3] = [
        (100, common::size(3_000, 30), 16),
        (1, common::size(30_000, 500), 64),
        (1, common::size(60_000, 500), 256),
    ];
    let mut rows = Vec::new();
    for (per_request, requests, conns) in cases {
        let load = common::load_avg();
        let usage = Usage::start();
        let (acked, took) =
            tokio::task::spawn_blocking(move || load_generator(addr, per_request, requests, conns))
                .await??;
        let rate = acked as f64 / took.as_secs_f64();
        rows.push(Row {
            scenario: format!(
                "courier HTTP ingest, {per_request} event(s)/request, {conns} connections"
            ),
            msgs: acked,
            secs: took.as_secs_f64(),
            rate,
            ratio: format!("{:.2}", rate / base),
            note: format!(
                "{:.0} requests/s; answer after the broker's ack; CPU {:.1} µs/msg incl. the load generator",
                requests as f64 / took.as_secs_f64(),
                usage.cpu_us_per_msg(acked)
            ),
            load,
        });
    }
    shutdown.cancel();
    let unflushed = producer.done.await?;
    if unflushed > 0 {
        bail!("{unflushed} messages unflushed at shutdown");
    }
    Ok(rows)
}

/// Runs every scenario and prints the table.
async fn run() -> anyhow::Result<()> {
    let broker = DevBroker::start()?;
    let bootstrap = broker.bootstrap_servers();
    let topics = common::create_topics(&broker, "bench-produce")?;
    let config = common::config(&bootstrap, &topics, &[])?;
    let n = common::size(500_000, 5_000);
    let mut rows = Vec::new();
    let raw = raw_producer(&config, &topics.source, n).await?;
    let base = raw.rate;
    rows.push(raw);
    rows.push(courier_publish(&config, &topics.source, n, base).await?);
    rows.extend(http_ingest(&bootstrap, &topics, base).await?);
    common::print_table(
        &format!(
            "Producer: courier vs raw rdkafka ({} B payloads, {} partitions, acks=all, idempotent, linger 5 ms)",
            common::PAYLOAD_BYTES,
            common::PARTITIONS
        ),
        &rows,
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    common::main_with("producer_throughput", run())
}
