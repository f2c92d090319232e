//! Reliability under broker faults, with the producer and the consumer in this process
//! against a mock cluster: a 10 s broker outage in the middle of a steady stream of POSTs,
//! a slow broker (500 ms round trips), and a soak (`COURIER_SOAK_SECS`, default 20) that
//! samples in-flight messages, this process's RSS and the lag every second.
//!
//! The three tests run one at a time (they measure time and memory of this process).
//! Each prints a `RELIABILITY ...` line with its figures for RELIABILITY.md.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use courier::app::consumer::RunningConsumer;
use courier::app::producer::RunningProducer;
use courier::model::Delivery;
use courier::service::{ProcessError, Processor};
use courier::testing::{
    eventually, eventually_async, http_get, http_request, metric_sum, probe, proc_status_kib,
    start_consumer, start_producer, ScriptedProcessor, Step, TestKafka,
};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

const JSON: Option<&str> = Some("application/json");

/// One test at a time: they measure latency and this process's memory.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Services {
    producer: RunningProducer,
    consumer: RunningConsumer,
    stop_producer: CancellationToken,
    stop_consumer: CancellationToken,
}

impl Services {
    async fn start(k: &TestKafka, processor: Arc<dyn Processor>, extra: &[(&str, &str)]) -> Self {
        let (producer, stop_producer) = start_producer(k.config(extra)).await;
        let (consumer, stop_consumer) = start_consumer(k.config(extra), processor).await;
        let s = Services {
            producer,
            consumer,
            stop_producer,
            stop_consumer,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while s.ready().await != (200, 200) {
            assert!(
                Instant::now() < deadline,
                "services ready: {:?}",
                s.ready().await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        s
    }

    fn events_url(&self) -> String {
        format!("http://{}/v1/events", self.producer.http_addr)
    }

    /// /readyz of (producer, consumer).
    async fn ready(&self) -> (u16, u16) {
        (
            probe(&format!("http://{}/readyz", self.producer.ops_addr)).await,
            probe(&format!("http://{}/readyz", self.consumer.ops_addr)).await,
        )
    }

    /// /healthz of (producer, consumer).
    async fn live(&self) -> (u16, u16) {
        (
            probe(&format!("http://{}/healthz", self.producer.ops_addr)).await,
            probe(&format!("http://{}/healthz", self.consumer.ops_addr)).await,
        )
    }

    /// Stops both; returns their final metrics (producer's read over HTTP, its registry is
    /// its own).
    async fn stop(self) -> (String, String) {
        let producer_metrics = http_get(&format!("http://{}/metrics", self.producer.ops_addr))
            .await
            .1;
        let consumer_metrics = self.consumer.metrics.render();
        self.stop_producer.cancel();
        self.stop_consumer.cancel();
        let t = Duration::from_secs(30);
        tokio::time::timeout(t, self.producer.done)
            .await
            .expect("producer stops in time")
            .expect("producer task");
        tokio::time::timeout(t, self.consumer.done)
            .await
            .expect("consumer stops in time")
            .expect("consumer task");
        (producer_metrics, consumer_metrics)
    }
}

/// One answered (or timed-out) ingest request.
#[derive(Debug, Clone)]
struct Answer {
    ids: Vec<String>,
    /// 0 when no answer came within the client's own deadline.
    status: u16,
    latency: Duration,
    at: Instant,
    body: String,
}

/// A steady stream of POSTs: `posters` loops, each sending a batch of `batch` events every
/// `interval`, until `stop`; every request has a client deadline of `client_timeout`. Ids
/// are `{prefix}{n}`, with `n` taken from `next`.
#[allow(clippy::too_many_arguments)]
fn spawn_load(
    url: String,
    prefix: String,
    next: Arc<AtomicUsize>,
    batch: usize,
    interval: Duration,
    posters: usize,
    client_timeout: Duration,
    stop: CancellationToken,
    answers: Arc<Mutex<Vec<Answer>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..posters)
        .map(|_| {
            let (url, prefix, stop, answers, next) = (
                url.clone(),
                prefix.clone(),
                stop.clone(),
                answers.clone(),
                next.clone(),
            );
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    let first = next.fetch_add(batch, Ordering::SeqCst);
                    let ids: Vec<String> =
                        (first..first + batch).map(|i| format!("{prefix}{i}")).collect();
                    let events: Vec<serde_json::Value> = ids
                        .iter()
                        .map(|id| serde_json::json!({"id": id, "type": "fault_test", "data": {"n": 1}}))
                        .collect();
                    let body = serde_json::to_vec(&events).unwrap();
                    let t0 = Instant::now();
                    let res =
                        tokio::time::timeout(client_timeout, http_request("POST", &url, JSON, &body))
                            .await;
                    let (status, text) = res.unwrap_or((0, String::new()));
                    answers.lock().push(Answer {
                        ids,
                        status,
                        latency: t0.elapsed(),
                        at: t0,
                        body: text,
                    });
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(interval) => {}
                    }
                }
            })
        })
        .collect()
}

/// Polls (producer, consumer) /readyz until `want` for both, up to `timeout`; returns how
/// long it took, or None.
async fn wait_ready(s: &Services, want: u16, timeout: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if s.ready().await == (want, want) {
            return Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_of_10s_mid_stream_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let k = TestKafka::new(3);
    let p = ScriptedProcessor::new();
    let request_timeout = Duration::from_millis(2000);
    let s = Services::start(
        &k,
        p.clone(),
        &[
            ("HTTP_REQUEST_TIMEOUT_MS", "2000"),
            ("KAFKA_CONSUMER_SHUTDOWN_TIMEOUT_MS", "5000"),
        ],
    )
    .await;
    let answers = Arc::new(Mutex::new(Vec::new()));
    let stop_load = CancellationToken::new();
    // The client's own deadline: the request timeout plus a generous margin for a loaded
    // machine. An answer later than this is a hang.
    let client_timeout = request_timeout + Duration::from_secs(5);
    let load = spawn_load(
        s.events_url(),
        "o-".into(),
        Arc::new(AtomicUsize::new(0)),
        5,
        Duration::from_millis(50),
        3,
        client_timeout,
        stop_load.clone(),
        answers.clone(),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ok_before = answers.lock().iter().filter(|a| a.status == 200).count();

    let down_at = Instant::now();
    k.broker.broker_down().unwrap();
    let not_ready_after = wait_ready(&s, 503, Duration::from_secs(9)).await;
    let mut live_during = HashSet::new();
    while down_at.elapsed() < Duration::from_secs(10) {
        let (a, b) = s.live().await;
        live_during.insert(a);
        live_during.insert(b);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let processed_at_up = p.calls();
    k.broker.broker_up().unwrap();
    let up_at = Instant::now();
    let ready_after = wait_ready(&s, 200, Duration::from_secs(40)).await;
    let resumed = eventually(Duration::from_secs(40), || p.calls() > processed_at_up).await;
    let resumed_after = up_at.elapsed();
    // Keep the stream going after recovery until the producer accepts again (its own
    // connection may still be in librdkafka's reconnect back-off), then a little longer.
    let recovered_at = Instant::now();
    let accepting = eventually(Duration::from_secs(20), || {
        answers
            .lock()
            .iter()
            .any(|a| a.status == 200 && a.at >= recovered_at)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_load.cancel();
    for l in load {
        l.await.unwrap();
    }
    let answers = answers.lock().clone();
    let accepted: Vec<&String> = answers
        .iter()
        .filter(|a| a.status == 200)
        .flat_map(|a| &a.ids)
        .collect();
    let all_done = eventually(Duration::from_secs(60), || {
        let ok: HashSet<String> = p.ok_ids().into_iter().collect();
        accepted.iter().all(|id| ok.contains(*id))
    })
    .await;
    let ok_ids = p.ok_ids();
    let ok: HashSet<&String> = ok_ids.iter().collect();
    // Commits caught up too: every source partition committed to its end.
    let ends = k.end_offsets(&k.source);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut committed = k.committed(&k.source);
    while committed != ends && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        committed = k.committed(&k.source);
    }
    let dlq = k.kafka().read_to_end(&k.dlq, Duration::from_secs(10));
    let dlq_ids: HashSet<String> = dlq
        .iter()
        .filter_map(|d| d.message_id().map(str::to_owned))
        .collect();
    let lost: Vec<&&String> = accepted
        .iter()
        .filter(|id| !ok.contains(**id) && !dlq_ids.contains(**id))
        .collect();
    let mut per_id: HashMap<&String, usize> = HashMap::new();
    for id in &ok_ids {
        *per_id.entry(id).or_default() += 1;
    }
    let processed_twice = per_id.values().filter(|n| **n > 1).count();
    let by_status = answers
        .iter()
        .fold(HashMap::<u16, usize>::new(), |mut m, a| {
            *m.entry(a.status).or_default() += 1;
            m
        });
    let max_latency = answers.iter().map(|a| a.latency).max().unwrap_or_default();
    let ok_after_recovery = answers
        .iter()
        .filter(|a| a.status == 200 && a.at >= recovered_at)
        .count();
    let (producer_metrics, consumer_metrics) = s.stop().await;
    println!(
        "RELIABILITY broker-outage: outage_s=10 requests={} answers={:?} events_accepted={} \
         lost={} processed_twice={} max_answer_ms={} not_ready_after_ms={:?} \
         ready_again_after_ms={:?} consumer_resumed_after_ms={} dlq={} \
         publish_failures={} commit_errors={}",
        answers.len(),
        by_status,
        accepted.len(),
        lost.len(),
        processed_twice,
        max_latency.as_millis(),
        not_ready_after.map(|d| d.as_millis()),
        ready_after.map(|d| d.as_millis()),
        resumed_after.as_millis(),
        dlq.len(),
        metric_sum(&producer_metrics, "courier_publish_failures_total", &[]),
        metric_sum(
            &consumer_metrics,
            "courier_commits_total",
            &["result=\"error\""]
        ),
    );

    assert!(ok_before > 0, "the stream flowed before the outage");
    let odd: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.status != 200 && a.status != 503)
        .collect();
    assert!(
        odd.is_empty(),
        "only 200 or 503 (0 = no answer within {client_timeout:?}): {:?}",
        odd.iter()
            .take(5)
            .map(|a| (a.status, a.latency, &a.body))
            .collect::<Vec<_>>()
    );
    for a in answers.iter().filter(|a| a.status == 503) {
        let v: serde_json::Value = serde_json::from_str(&a.body)
            .unwrap_or_else(|_| panic!("a 503 has a JSON body: {}", a.body));
        assert!(v["error"].is_string(), "{}", a.body);
    }
    assert!(
        by_status.get(&503).copied().unwrap_or(0) > 0,
        "the outage was noticed by the ingest API"
    );
    assert!(
        not_ready_after.is_some(),
        "/readyz of both services went 503 during the outage"
    );
    assert_eq!(
        live_during,
        HashSet::from([200]),
        "/healthz stays 200 during the outage"
    );
    assert!(
        ready_after.is_some(),
        "/readyz of both services back to 200 after the outage"
    );
    assert!(resumed, "the consumer resumed after the outage");
    assert!(
        accepting && ok_after_recovery > 0,
        "the producer accepts again after recovery"
    );
    assert!(
        lost.is_empty() && all_done,
        "{} events answered 200 were never processed, e.g. {:?}",
        lost.len(),
        lost.iter().take(10).collect::<Vec<_>>()
    );
    assert_eq!(
        processed_twice, 0,
        "at most one successful processing per message-id within a process"
    );
    assert_eq!(committed, ends, "source partitions committed to their end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_broker_degrades_throughput_but_nothing_fails() {
    let _serial = SERIAL.lock().await;
    let k = TestKafka::new(3);
    let p = ScriptedProcessor::new();
    // A few messages fail once, so retry publishes and retry consumption run slow too.
    for i in (0..400).step_by(40) {
        p.script(&format!("slow-{i}"), vec![Step::Retry("flaky"), Step::Ok]);
        p.script(&format!("fast-{i}"), vec![Step::Retry("flaky"), Step::Ok]);
    }
    // The default probe timeout (2 s), not the harness's 500 ms: a 500 ms round trip is
    // slow, not down.
    let s = Services::start(
        &k,
        p.clone(),
        &[
            ("HEALTH_PROBE_TIMEOUT_MS", "2000"),
            ("KAFKA_RETRY_BACKOFF", "200ms"),
        ],
    )
    .await;
    let mut figures = Vec::new();
    let mut all_answers = Vec::new();
    for (phase, rtt) in [("fast", None), ("slow", Some(Duration::from_millis(500)))] {
        if let Some(rtt) = rtt {
            k.broker.cluster().broker_round_trip_time(1, rtt).unwrap();
        }
        let n = 400;
        let t0 = Instant::now();
        let url = s.events_url();
        let posts = (0..n).step_by(20).map(|first| {
            let url = url.clone();
            async move {
                let events: Vec<serde_json::Value> = (first..first + 20)
                    .map(|i| serde_json::json!({"id": format!("{phase}-{i}"), "type": "t"}))
                    .collect();
                let body = serde_json::to_vec(&events).unwrap();
                let t = Instant::now();
                let (status, text) = http_request("POST", &url, JSON, &body).await;
                (status, text, t.elapsed())
            }
        });
        let answers = futures::future::join_all(posts).await;
        let want: HashSet<String> = (0..n).map(|i| format!("{phase}-{i}")).collect();
        let done = eventually(Duration::from_secs(90), || {
            p.ok_ids().iter().filter(|id| want.contains(*id)).count() == n
        })
        .await;
        let took = t0.elapsed();
        // The group commits to the end of the source and retry topics, under the same
        // round trips (the reads of the committed offsets are slow too).
        let topics = [k.source.clone(), k.retry_topic(1)];
        let committed =
            eventually_async(Duration::from_secs(90), || {
                let k = &k;
                let topics = &topics;
                async move {
                    tokio::task::block_in_place(|| topics.iter().all(|t| k.committed_to_end(t)))
                }
            })
            .await;
        let max_answer = answers.iter().map(|a| a.2).max().unwrap_or_default();
        figures.push(format!(
            "{phase}: rtt_ms={} events={n} all_processed={done} committed_to_end={committed} took_ms={} rate_per_s={:.0} max_answer_ms={}",
            rtt.map_or(0, |d| d.as_millis()),
            took.as_millis(),
            n as f64 / took.as_secs_f64(),
            max_answer.as_millis()
        ));
        all_answers.extend(answers.into_iter().map(|a| (phase, a.0, a.1)));
    }
    k.broker
        .cluster()
        .broker_round_trip_time(1, Duration::ZERO)
        .unwrap();
    let (producer_metrics, consumer_metrics) = s.stop().await;
    let failures = metric_sum(&producer_metrics, "courier_publish_failures_total", &[])
        + metric_sum(&consumer_metrics, "courier_publish_failures_total", &[]);
    let dlq = k.kafka().read_to_end(&k.dlq, Duration::from_secs(10)).len();
    println!(
        "RELIABILITY slow-broker: {} publish_failures={failures} dlq={dlq} retries={}",
        figures.join(" | "),
        metric_sum(
            &consumer_metrics,
            "courier_messages_processed_total",
            &["outcome=\"retry\""]
        )
    );
    let bad: Vec<_> = all_answers.iter().filter(|a| a.1 != 200).collect();
    assert!(bad.is_empty(), "every request answered 200: {bad:?}");
    assert!(
        figures.iter().all(|f| f.contains("all_processed=true")),
        "{figures:?}"
    );
    assert!(
        figures.iter().all(|f| f.contains("committed_to_end=true")),
        "the group committed the source and retry-1 to their ends in both phases: {figures:?}"
    );
    assert_eq!(failures, 0.0, "no publish failures in the metrics");
    assert_eq!(dlq, 0, "nothing dead-lettered");
}

/// Counts successful processings per sequence number (1 byte per message, so a long soak
/// does not grow this process's memory by itself), and how many calls run at once: each
/// takes `work`, so with more worker lanes than the in-flight bound the calls running at
/// once are bounded only by the messages the pipeline lets in.
struct Counting {
    prefix: String,
    counts: Mutex<Vec<u8>>,
    calls: AtomicUsize,
    work: Duration,
    current: AtomicUsize,
    max_concurrent: AtomicUsize,
}

#[async_trait]
impl Processor for Counting {
    async fn process(&self, d: &Delivery) -> Result<(), ProcessError> {
        let now = self.current.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_concurrent.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(self.work).await;
        self.current.fetch_sub(1, Ordering::SeqCst);
        let seq = d
            .message_id()
            .and_then(|id| id.strip_prefix(&self.prefix))
            .and_then(|s| s.parse::<usize>().ok())
            .ok_or_else(|| ProcessError::fatal("not a soak message"))?;
        {
            let mut c = self.counts.lock();
            if c.len() <= seq {
                c.resize(seq + 1, 0);
            }
            c[seq] = c[seq].saturating_add(1);
        }
        self.calls.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_keeps_in_flight_memory_and_lag_bounded() {
    let _serial = SERIAL.lock().await;
    let secs: u64 = std::env::var("COURIER_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
        .max(6);
    let max_in_flight = 100;
    let k = TestKafka::new(4);
    let proc = Arc::new(Counting {
        prefix: "soak-".into(),
        counts: Mutex::new(Vec::new()),
        calls: AtomicUsize::new(0),
        work: Duration::from_millis(10),
        current: AtomicUsize::new(0),
        max_concurrent: AtomicUsize::new(0),
    });
    let s = Services::start(
        &k,
        proc.clone(),
        &[
            ("KAFKA_CONSUMER_MAX_IN_FLIGHT", "100"),
            // Four lanes per message of the bound: the lanes never cap how many calls run
            // at once, the in-flight bound does.
            ("KAFKA_CONSUMER_WORKERS", "400"),
            ("KAFKA_CONSUMER_COMMIT_INTERVAL_MS", "200"),
            // The dedupe store is bounded by its capacity; a small one reaches its bound
            // early in a long soak. (The in-process mock broker also keeps up to 5 MB per
            // partition of this process's memory.)
            ("DEDUPE_CAPACITY", "20000"),
            ("RDKAFKA_STATISTICS_INTERVAL_MS", "1000"),
        ],
    )
    .await;
    let answers = Arc::new(Mutex::new(Vec::new()));
    let stop_load = CancellationToken::new();
    // About 200 events per second: batches of 10 from two posters every 100 ms.
    let next = Arc::new(AtomicUsize::new(0));
    let load = spawn_load(
        s.events_url(),
        "soak-".into(),
        next.clone(),
        10,
        Duration::from_millis(100),
        2,
        Duration::from_secs(15),
        stop_load.clone(),
        answers.clone(),
    );
    // And a burst of 500 events every 5 s, which fills the in-flight bound.
    let bursts = spawn_load(
        s.events_url(),
        "soak-".into(),
        next,
        500,
        Duration::from_secs(5),
        1,
        Duration::from_secs(15),
        stop_load.clone(),
        answers.clone(),
    );
    let metrics = s.consumer.metrics.clone();
    #[derive(Debug, Clone, Copy)]
    struct Sample {
        in_flight: i64,
        rss_kb: u64,
        lag: i64,
        kafka_lag: i64,
    }
    let mut samples: Vec<Sample> = Vec::new();
    let started = Instant::now();
    for _ in 0..secs {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let accepted: usize = answers
            .lock()
            .iter()
            .filter(|a| a.status == 200)
            .map(|a| a.ids.len())
            .sum();
        let text = metrics.render();
        samples.push(Sample {
            in_flight: metrics.in_flight.get(),
            rss_kb: proc_status_kib("self", "VmRSS").unwrap_or(0),
            lag: accepted as i64 - proc.calls.load(Ordering::Relaxed) as i64,
            kafka_lag: metric_sum(&text, "courier_consumer_lag", &[]) as i64,
        });
    }
    stop_load.cancel();
    for l in load.into_iter().chain(bursts) {
        l.await.unwrap();
    }
    let answers = answers.lock().clone();
    let accepted: Vec<usize> = answers
        .iter()
        .filter(|a| a.status == 200)
        .flat_map(|a| a.ids.iter())
        .filter_map(|id| id.strip_prefix("soak-")?.parse().ok())
        .collect();
    let all_done = eventually(Duration::from_secs(60), || {
        let c = proc.counts.lock();
        accepted.iter().all(|&i| c.get(i).copied().unwrap_or(0) > 0)
    })
    .await;
    let lost = {
        let c = proc.counts.lock();
        accepted
            .iter()
            .filter(|&&i| c.get(i).copied().unwrap_or(0) == 0)
            .count()
    };
    let twice = proc.counts.lock().iter().filter(|n| **n > 1).count();
    let dedupe_entries = metrics.dedupe_entries.get();
    let (producer_metrics, consumer_metrics) = s.stop().await;
    let third = (samples.len() / 3).max(1);
    let avg = |xs: &[Sample]| xs.iter().map(|s| s.rss_kb).sum::<u64>() / xs.len().max(1) as u64;
    let rss_first = avg(&samples[..third]);
    let rss_last = avg(&samples[samples.len() - third..]);
    let growth_mb = (rss_last as f64 - rss_first as f64) / 1024.0;
    let max_lag = samples.iter().map(|s| s.lag).max().unwrap_or(0);
    let max_lag_last_third = samples[samples.len() - third..]
        .iter()
        .map(|s| s.lag)
        .max()
        .unwrap_or(0);
    let max_in_flight_seen = proc.max_concurrent.load(Ordering::SeqCst);
    let non_200 = answers.iter().filter(|a| a.status != 200).count();
    println!(
        "soak samples (in_flight, rss_mb, lag, kafka_lag): {:?}",
        samples
            .iter()
            .map(|s| (s.in_flight, s.rss_kb / 1024, s.lag, s.kafka_lag))
            .collect::<Vec<_>>()
    );
    println!(
        "RELIABILITY soak: secs={secs} events_accepted={} rate_per_s={:.0} non_200={non_200} \
         lost={lost} processed_twice={twice} max_concurrent_calls={max_in_flight_seen} (bound \
         {max_in_flight}) rss_first_third_mb={:.1} rss_last_third_mb={:.1} growth_mb={growth_mb:.1} \
         max_lag={max_lag} max_lag_last_third={max_lag_last_third} \
         dedupe_entries={dedupe_entries} publish_failures={}",
        accepted.len(),
        accepted.len() as f64 / started.elapsed().as_secs_f64(),
        rss_first as f64 / 1024.0,
        rss_last as f64 / 1024.0,
        metric_sum(&producer_metrics, "courier_publish_failures_total", &[])
            + metric_sum(&consumer_metrics, "courier_publish_failures_total", &[]),
    );
    assert!(!accepted.is_empty(), "the load flowed");
    assert!(
        max_in_flight_seen <= max_in_flight,
        "{max_in_flight_seen} calls at once exceeded KAFKA_CONSUMER_MAX_IN_FLIGHT={max_in_flight}"
    );
    // The bursts push against the bound: the check above is not vacuous. (Keys spread over
    // the 400 lanes, so messages sharing a lane wait their turn: about 88 of 100 in flight
    // run at once.)
    assert!(
        max_in_flight_seen >= max_in_flight / 2,
        "the bursts filled the bound: at most {max_in_flight_seen} calls at once"
    );
    assert!(
        growth_mb < 50.0,
        "RSS grew {growth_mb:.1} MB between the first and last third"
    );
    // Lag bounded: the consumer keeps up with a steady ~200/s, so the backlog never
    // exceeds what 10 s of load would build up, and at the end it drains completely.
    assert!(
        max_lag_last_third <= 2_000,
        "lag in the last third {max_lag_last_third}"
    );
    assert!(
        lost == 0 && all_done,
        "{lost} accepted events never processed"
    );
    assert_eq!(twice, 0, "no id processed twice within a process");
}

/// A noisy neighbour: two threads spin on the machine's cores while a stream of messages
/// that each fail once goes through the retry chain (the retry partitions seek back, pause
/// and resume all the time). Starved of CPU, the consumer must still process every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_chain_under_cpu_contention_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let stop_hogs = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hogs: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop_hogs.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for i in 0..100_000u64 {
                        x = x.wrapping_mul(31).wrapping_add(i);
                    }
                    std::hint::black_box(x);
                }
            })
        })
        .collect();
    let k = TestKafka::new(6);
    let p = ScriptedProcessor::new();
    let n = 4000;
    let ids: Vec<String> = (0..n).map(|i| format!("cpu-{i}")).collect();
    for id in &ids {
        p.script(id, vec![Step::Retry("once"), Step::Ok]);
    }
    // Every first attempt fails: to the circuit breaker that is an endpoint failing 100% of
    // calls, and it would rightly hold the stream. This test is about the retry chain, so
    // the breaker is off (tests/circuit.rs covers it).
    let (running, stop) = start_consumer(
        k.config(&[
            ("KAFKA_RETRY_BACKOFF", "100ms"),
            ("PROCESSOR_CIRCUIT", "off"),
        ]),
        p.clone(),
    )
    .await;
    let started = Instant::now();
    for chunk in ids.chunks(40) {
        let msgs = chunk
            .iter()
            .enumerate()
            .map(|(i, id)| {
                (
                    Some(format!("key-{}", i % 17).into_bytes()),
                    serde_json::json!({"id": id, "type": "t"})
                        .to_string()
                        .into_bytes(),
                    vec![("message-id".into(), Some(id.clone().into_bytes()))],
                )
            })
            .collect();
        k.produce(&k.source, msgs).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let all_ok = eventually(Duration::from_secs(20), || {
        p.ok_ids().into_iter().collect::<HashSet<_>>().len() >= n
    })
    .await;
    stop_hogs.store(true, Ordering::Relaxed);
    for h in hogs {
        h.join().unwrap();
    }
    let took = started.elapsed();
    let ok: HashSet<String> = p.ok_ids().into_iter().collect();
    let missing: HashSet<&String> = ids.iter().filter(|id| !ok.contains(*id)).collect();
    // Where the unprocessed retry copies are, against the group's committed offsets.
    let r1 = k.retry_topic(1);
    let mut copies: std::collections::BTreeMap<i32, Vec<i64>> = Default::default();
    if !missing.is_empty() {
        for d in k.read_all(&r1, 1, Duration::from_secs(5)) {
            if d.message_id()
                .is_some_and(|id| missing.contains(&id.to_owned()))
            {
                copies.entry(d.partition).or_default().push(d.offset);
            }
        }
    }
    stop.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(30), running.done).await;
    // After the final commit of a clean stop: where the group stands on each topic.
    let committed = k.committed(&r1);
    let ends = k.end_offsets(&r1);
    let source = (k.committed(&k.source), k.end_offsets(&k.source));
    println!(
        "RELIABILITY cpu-contention: messages={n} (each retried once) processed={} lost={} \
         took_ms={}",
        ok.len(),
        missing.len(),
        took.as_millis()
    );
    assert!(
        all_ok && missing.is_empty(),
        "{} messages that went to {r1} were never processed; their unprocessed copies by \
         partition {copies:?}, while the group committed {committed:?} (end {ends:?}): \
         committed past unprocessed messages",
        missing.len()
    );
    stopped
        .expect("the consumer stops within 30 s")
        .expect("the consumer task");
    assert_eq!(committed, ends, "{r1} committed to its end");
    assert_eq!(source.0, source.1, "the source committed to its end");
}
