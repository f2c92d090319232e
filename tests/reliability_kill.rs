//! Reliability: the consumer killed with SIGKILL, several times, while it processes 10,000
//! messages.
//!
//! Everything runs as it does in production, in separate processes: `courier dev-broker`
//! (the broker), `courier consumer` with the `http` processor (the service under test), and
//! this test, which produces the messages with an rdkafka producer and runs the HTTP sink
//! the processor posts to. The sink records every message-id it accepts and fails some ids
//! on purpose, deterministically by id: some transiently (5xx once or twice, then 2xx:
//! through the retry topics), some permanently (400: Fatal, straight to the DLQ).
//!
//! The consumer is killed with `kill -KILL` at random moments (1–3 s after it is seen
//! processing), `KILLS` times, and restarted each time. In the end every produced id must be
//! either accepted by the sink or in the DLQ with courier's headers; nothing may be missing.
//! Duplicate processing (at-least-once) is counted, reported and bounded.
//!
//! `COURIER_KILL_SEED` replays the kill moments of an earlier run (the seed is printed).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use common::rand_id;
use courier::model::Delivery;
use parking_lot::Mutex;
use rand::{RngExt, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const MESSAGES: usize = 10_000;
const KILLS: usize = 4;
const PARTITIONS: i32 = 6;
const RETRY_LEVELS: u32 = 3;
const MAX_IN_FLIGHT: usize = 200;
const WORKERS: usize = 8;
const COMMIT_INTERVAL_MS: u64 = 200;
/// How long after a kill messages may still be in the pipeline of the killed process before
/// they are committed; see `duplicate_bound`.
const COMMIT_SLACK_MS: u64 = 1_000;
/// How long the sink takes to answer: with 8 workers the consumer handles at most ~500
/// messages/s, so it is busy (messages in flight) for much of the run, not just in bursts.
const SINK_LATENCY: Duration = Duration::from_millis(15);
/// The whole scenario's deadline (the test fails rather than hang a CI run).
const DEADLINE: Duration = Duration::from_secs(170);

/// What the sink does with an id, by its sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    /// 2xx at once.
    Ok,
    /// 5xx this many times, then 2xx.
    Transient(u32),
    /// 400 every time: Fatal, to the DLQ.
    Permanent,
}

fn behaviour(seq: usize) -> Behaviour {
    if seq % 100 == 1 {
        Behaviour::Permanent
    } else if seq % 20 == 3 {
        Behaviour::Transient(1)
    } else if seq % 20 == 7 {
        Behaviour::Transient(2)
    } else {
        Behaviour::Ok
    }
}

/// One request the sink answered.
#[derive(Debug, Clone)]
struct Request {
    id: String,
    at: Instant,
    status: u16,
    /// Which consumer process sent it (its URL path says).
    incarnation: usize,
}

impl Request {
    /// A final answer: the message is processed (2xx) or goes to the DLQ (400).
    fn is_final(&self) -> bool {
        self.status == 200 || self.status == 400
    }
}

#[derive(Default)]
struct SinkState {
    /// Requests per id so far (across restarts of the consumer).
    attempts: HashMap<String, u32>,
    /// 2xx answers per id.
    ok: HashMap<String, u32>,
    /// Every answer, in order.
    log: Vec<Request>,
    /// Requests without a known message-id.
    strays: u32,
}

struct Sink {
    prefix: String,
    state: Mutex<SinkState>,
}

impl Sink {
    fn seq_of(&self, id: &str) -> Option<usize> {
        id.strip_prefix(&self.prefix)?.parse().ok()
    }
}

async fn sink_handler(
    State(sink): State<Arc<Sink>>,
    UrlPath(incarnation): UrlPath<usize>,
    headers: HeaderMap,
) -> StatusCode {
    let id = headers
        .get("message-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let status = sink.answer(id, incarnation);
    // The work is recorded; the answer takes a while, like a real endpoint's. A kill in
    // between loses the answer, and the message is processed again after the restart.
    tokio::time::sleep(SINK_LATENCY).await;
    status
}

impl Sink {
    /// Records one request for `id` and decides its answer.
    fn answer(&self, id: String, incarnation: usize) -> StatusCode {
        let Some(seq) = self.seq_of(&id) else {
            self.state.lock().strays += 1;
            return StatusCode::OK;
        };
        let mut st = self.state.lock();
        let n = {
            let n = st.attempts.entry(id.clone()).or_default();
            *n += 1;
            *n
        };
        let status = match behaviour(seq) {
            Behaviour::Permanent => StatusCode::BAD_REQUEST,
            Behaviour::Transient(f) if n <= f => {
                if n == 1 {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            }
            _ => StatusCode::OK,
        };
        if status == StatusCode::OK {
            *st.ok.entry(id.clone()).or_default() += 1;
        }
        st.log.push(Request {
            id,
            at: Instant::now(),
            status: status.as_u16(),
            incarnation,
        });
        status
    }
}

async fn start_sink(prefix: &str) -> (String, Arc<Sink>) {
    let sink = Arc::new(Sink {
        prefix: prefix.to_owned(),
        state: Mutex::new(SinkState::default()),
    });
    let app = axum::Router::new()
        .route("/inc/{n}", axum::routing::post(sink_handler))
        .with_state(sink.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    // Each consumer process posts to `{url}{incarnation}`.
    let url = format!("http://{}/inc/", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, sink)
}

/// A child process that is killed (SIGKILL) and reaped if the test ends early.
struct Guard(Option<Child>);

impl Guard {
    fn pid(&self) -> u32 {
        self.0.as_ref().map(Child::id).unwrap_or(0)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("kill runs");
    assert!(ok.success(), "kill -{sig} {pid}");
}

/// A field of /proc/<pid>/status in kB (e.g. VmHWM, VmRSS).
fn proc_status_kb(pid: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(&format!("{field}:")))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Names {
    source: String,
    prefix: String,
    dlq: String,
    group: String,
}

impl Names {
    fn retry(&self, n: u32) -> String {
        format!("{}-{n}", self.prefix)
    }

    fn all_topics(&self) -> Vec<String> {
        let mut v = vec![self.source.clone()];
        v.extend((1..=RETRY_LEVELS).map(|n| self.retry(n)));
        v.push(self.dlq.clone());
        v
    }

    fn topic_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("KAFKA_CONSUMER_TOPICS", self.source.clone()),
            ("KAFKA_PRODUCER_TOPIC", self.source.clone()),
            ("KAFKA_RETRY_TOPIC_PREFIX", self.prefix.clone()),
            ("KAFKA_DLQ_TOPIC", self.dlq.clone()),
            ("KAFKA_CONSUMER_RETRY_MAX", RETRY_LEVELS.to_string()),
            ("KAFKA_CONSUMER_GROUP_ID", self.group.clone()),
        ]
    }
}

/// Starts `courier dev-broker` and returns it with its bootstrap address (its first line).
fn start_broker(names: &Names, dir: &Path) -> (Guard, String) {
    let file = dir.join("bootstrap");
    let mut child = Command::new(env!("CARGO_BIN_EXE_courier"))
        .arg("dev-broker")
        .arg("--bootstrap-file")
        .arg(&file)
        .envs(names.topic_env())
        .env("KAFKA_TOPIC_PARTITIONS", PARTITIONS.to_string())
        .env("LOG_FORMAT", "pretty")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("broker.log")).unwrap())
        .spawn()
        .expect("dev-broker starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("dev-broker prints its address");
    let bootstrap = line.trim().to_owned();
    assert!(bootstrap.contains(':'), "bootstrap address: {line:?}");
    let from_file = std::fs::read_to_string(&file).unwrap_or_default();
    assert_eq!(from_file.trim(), bootstrap, "--bootstrap-file holds it too");
    (Guard(Some(child)), bootstrap)
}

/// Starts `courier consumer` (incarnation `n`), logging to `dir/consumer-n.log`.
fn start_consumer(
    names: &Names,
    bootstrap: &str,
    url: &str,
    dir: &Path,
    n: usize,
) -> (Guard, PathBuf, u16) {
    let log = dir.join(format!("consumer-{n}.log"));
    let ops_port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_courier"))
        .arg("consumer")
        .envs(names.topic_env())
        .env("KAFKA_BROKERS", bootstrap)
        .env("COURIER_PROCESSOR", "http")
        .env("PROCESSOR_HTTP_URL", format!("{url}{n}"))
        .env("PROCESSOR_HTTP_TIMEOUT_MS", "5000")
        .env("KAFKA_RETRY_BACKOFF", "200ms")
        .env(
            "KAFKA_CONSUMER_COMMIT_INTERVAL_MS",
            COMMIT_INTERVAL_MS.to_string(),
        )
        .env("KAFKA_CONSUMER_MAX_IN_FLIGHT", MAX_IN_FLIGHT.to_string())
        .env("KAFKA_CONSUMER_WORKERS", WORKERS.to_string())
        .env("KAFKA_CONSUMER_SHUTDOWN_TIMEOUT_MS", "10000")
        .env("RDKAFKA_SESSION_TIMEOUT_MS", "6000")
        .env("RDKAFKA_HEARTBEAT_INTERVAL_MS", "500")
        .env("RDKAFKA_TOPIC_METADATA_REFRESH_INTERVAL_MS", "1000")
        .env("HEALTH_PROBE_INTERVAL_MS", "500")
        .env("OPS_ADDR", format!("127.0.0.1:{ops_port}"))
        .env("LOG_FORMAT", "pretty")
        .env("LOG_LEVEL", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("consumer starts");
    (Guard(Some(child)), log, ops_port)
}

/// Produces `MESSAGES` messages: at a steady pace while the kills go on (so every
/// incarnation has work when it is killed), the rest at once when `kills_done`; returns
/// (id, partition, offset) per message.
async fn produce_all(
    bootstrap: String,
    topic: String,
    prefix: String,
    kills_done: Arc<AtomicBool>,
) -> Vec<(String, i32, i64)> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let mut out = Vec::with_capacity(MESSAGES);
    let chunk = 250;
    for start in (0..MESSAGES).step_by(chunk) {
        let futs = (start..(start + chunk).min(MESSAGES)).map(|seq| {
            let producer = producer.clone();
            let topic = topic.clone();
            let id = format!("{prefix}{seq}");
            async move {
                let payload =
                    serde_json::json!({"id": id, "type": "kill_test", "seq": seq}).to_string();
                let key = format!("key-{}", seq % 997);
                let headers = OwnedHeaders::new().insert(Header {
                    key: "message-id",
                    value: Some(id.as_bytes()),
                });
                let record = FutureRecord::to(&topic)
                    .key(&key)
                    .payload(&payload)
                    .headers(headers);
                let (partition, offset) = producer
                    .send(record, Duration::from_secs(30))
                    .await
                    .map(|d| (d.partition, d.offset))
                    .unwrap_or_else(|(e, _)| panic!("produce {id}: {e}"));
                (id, partition, offset)
            }
        });
        out.extend(futures::future::join_all(futs).await);
        if !kills_done.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(1_200)).await;
        }
    }
    out
}

fn reader(bootstrap: &str, group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader")
}

/// Every message of `topic` from the beginning, until quiet.
fn read_topic(bootstrap: &str, topic: &str, timeout: Duration) -> Vec<Delivery> {
    let c = reader(bootstrap, &format!("reader-{}", rand_id()));
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let ends: i64 = end_offsets(bootstrap, topic).iter().sum();
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while Instant::now() < deadline && (out.len() as i64) < ends {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            out.push(Delivery {
                topic: m.topic().to_owned(),
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().map(<[u8]>::to_vec),
                headers: m
                    .headers()
                    .map(courier::transport::headers::read)
                    .unwrap_or_default(),
                timestamp_ms: m.timestamp().to_millis(),
            });
        }
    }
    out
}

fn end_offsets(bootstrap: &str, topic: &str) -> Vec<i64> {
    let c = reader(bootstrap, &format!("wm-{}", rand_id()));
    (0..PARTITIONS)
        .map(|p| {
            c.fetch_watermarks(topic, p, Duration::from_secs(5))
                .expect("watermarks")
                .1
        })
        .collect()
}

/// The group's committed offset per partition (-1 = none).
fn committed(bootstrap: &str, group: &str, topic: &str) -> Vec<i64> {
    let c = reader(bootstrap, group);
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(topic, p);
    }
    let got = c
        .committed_offsets(tpl, Duration::from_secs(5))
        .expect("committed offsets");
    (0..PARTITIONS)
        .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => -1,
        })
        .collect()
}

fn header(d: &Delivery, name: &str) -> Option<String> {
    d.header(name)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A gauge's value from the consumer's `/metrics`, if it answers within a second.
async fn gauge(port: u16, name: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        Some(String::from_utf8_lossy(&buf).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(1), fetch)
        .await
        .ok()??;
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// What is known about lost messages: their produced position, the sink's answers, every
/// copy on the source and retry topics with the group's committed offsets there, and the
/// consumers' log lines that name them.
#[allow(clippy::too_many_arguments)]
async fn post_mortem(
    lost: &[String],
    produced: &[(String, i32, i64)],
    st: &SinkState,
    kills: &[Kill],
    started: Instant,
    names: &Names,
    bootstrap: &str,
    dir: &Path,
    incarnations: usize,
) -> String {
    let mut out = String::new();
    let kill_times: Vec<String> = kills
        .iter()
        .map(|k| format!("{:.3}s", k.at.duration_since(started).as_secs_f64()))
        .collect();
    out.push_str(&format!("kills at {kill_times:?}\n"));
    let (b, topics) = (bootstrap.to_owned(), names.all_topics());
    let group = names.group.clone();
    let lost_set: HashSet<String> = lost.iter().cloned().collect();
    let copies = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        for t in &topics {
            let c = committed(&b, &group, t);
            let e = end_offsets(&b, t);
            lines.push(format!("{t}: committed {c:?} end {e:?}"));
            for d in read_topic(&b, t, Duration::from_secs(10)) {
                if d.message_id().is_some_and(|id| lost_set.contains(id)) {
                    let hs: Vec<(String, String)> = d
                        .headers
                        .iter()
                        .map(|(k, v)| {
                            (
                                k.to_string(),
                                v.as_deref()
                                    .map(|v| String::from_utf8_lossy(v).into_owned())
                                    .unwrap_or_default(),
                            )
                        })
                        .collect();
                    lines.push(format!(
                        "  copy {}/{}@{} ts={:?} headers={hs:?}",
                        d.topic, d.partition, d.offset, d.timestamp_ms
                    ));
                }
            }
        }
        lines.join("\n")
    })
    .await
    .unwrap();
    out.push_str(&copies);
    out.push('\n');
    for id in lost {
        let pos = produced.iter().find(|(i, _, _)| i == id);
        let answers: Vec<(u16, String)> = st
            .log
            .iter()
            .filter(|r| &r.id == id)
            .map(|r| {
                (
                    r.status,
                    format!("{:.3}s", r.at.duration_since(started).as_secs_f64()),
                )
            })
            .collect();
        out.push_str(&format!(
            "lost {id}: produced at {pos:?}, sink answers {answers:?}\n"
        ));
        let needle = format!("\"{id}\"");
        for n in 0..=incarnations {
            let text =
                std::fs::read_to_string(dir.join(format!("consumer-{n}.log"))).unwrap_or_default();
            for line in text.lines().filter(|l| l.contains(&needle)) {
                out.push_str(&format!("  consumer-{n}: {line}\n"));
            }
        }
    }
    out
}

/// One kill, as measured.
#[derive(Debug, Clone)]
struct Kill {
    at: Instant,
    /// The killed process's `courier_in_flight`, read just before the SIGKILL (the test
    /// waits for it to be above 0: every kill finds work in flight).
    in_flight: u64,
    /// Final answers (2xx or 400) the sink gave the killed process within
    /// `COMMIT_INTERVAL_MS + COMMIT_SLACK_MS` before the kill.
    answered_in_window: usize,
    /// The same within one commit interval only (reported, for comparison).
    answered_in_interval: usize,
    /// VmHWM of the killed process, kB.
    hwm_kb: u64,
    /// Messages of the source and retry topics at or past the group's committed offsets,
    /// read right after the kill: what the next incarnation consumes again or anew.
    uncommitted: i64,
}

/// What one kill can cause to be processed again, from what was measured at that kill.
///
/// A message is processed again after a kill only if the killed process had finished it
/// (the sink gave it a final answer: 2xx, or 400 and a DLQ publish) but its offset was not
/// committed: auto-commit is off and a commit only passes finished messages (guarantee 2),
/// so a committed message is never consumed again; within one process dedupe lets one
/// success per id through (guarantee 1: checked separately, never absorbed here). At the
/// moment of the kill those messages are
///  (a) in flight: the answer was given but the process died before finishing the
///      message; at most `courier_in_flight` read just before the kill; or
///  (b) finished but not committed yet: the pipeline commits the lowest unfinished offset
///      of every partition each `KAFKA_CONSUMER_COMMIT_INTERVAL_MS`, so these were answered
///      within one commit interval before the kill, plus a margin of `COMMIT_SLACK_MS` for
///      handing the commit to the broker (the driver thread hands it over between polls)
///      and for lower offsets of the same partition still waiting in a lane (each in (a);
///      with 200 in flight and 8 lanes at 15 ms a call, a lane's queue takes ~400 ms).
/// So reprocessed(kill) <= in_flight + final answers of the killed process within
/// `COMMIT_INTERVAL_MS + COMMIT_SLACK_MS` before the kill.
fn duplicate_bound(kill: &Kill) -> usize {
    kill.in_flight as usize + kill.answered_in_window
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing_and_duplicates_stay_bounded() {
    let started = Instant::now();
    let seed: u64 = std::env::var("COURIER_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let run = rand_id();
    let names = Names {
        source: format!("kill-{run}"),
        prefix: format!("kill-{run}-retry"),
        dlq: format!("kill-{run}-dlq"),
        group: format!("kill-group-{run}"),
    };
    // Kept on failure (the path is printed); removed at the end of a passing run.
    let dir = tempfile::Builder::new()
        .prefix("courier-kill-")
        .tempdir()
        .unwrap()
        .keep();
    let (broker, bootstrap) = start_broker(&names, &dir);
    let id_prefix = format!("m-{run}-");
    let (url, sink) = start_sink(&id_prefix).await;
    println!(
        "kill test: seed={seed} broker={bootstrap} logs={} (kept on failure)",
        dir.display()
    );

    let kills_done = Arc::new(AtomicBool::new(false));
    let producing = tokio::spawn(produce_all(
        bootstrap.clone(),
        names.source.clone(),
        id_prefix.clone(),
        kills_done.clone(),
    ));

    let answered = |sink: &Sink| sink.state.lock().log.len();
    let mut incarnation = 0;
    let (mut consumer, mut log, mut ops_port) =
        start_consumer(&names, &bootstrap, &url, &dir, incarnation);
    let mut kills: Vec<Kill> = Vec::new();
    let mut max_hwm_kb = 0;
    for _ in 0..KILLS {
        // Wait until this incarnation is processing (it has joined the group), then let it
        // run for a random 1–3 s before killing it.
        let before = answered(&sink);
        let progress_deadline = Instant::now() + Duration::from_secs(45);
        while answered(&sink) <= before + 20 {
            assert!(
                Instant::now() < progress_deadline && started.elapsed() < DEADLINE,
                "incarnation {incarnation} processed nothing; its log:\n{}",
                tail(&log, 40)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let wait = Duration::from_millis(rng.random_range(1_000..3_000));
        tokio::time::sleep(wait).await;
        let pid = consumer.pid().to_string();
        let hwm_kb = proc_status_kb(&pid, "VmHWM").unwrap_or(0);
        max_hwm_kb = max_hwm_kb.max(hwm_kb);
        // Kill only with work in flight, at once after reading the gauge (SIGKILL from this
        // process, no `kill` command in between).
        let busy_deadline = Instant::now() + Duration::from_secs(30);
        let in_flight = loop {
            if let Some(v) = gauge(ops_port, "courier_in_flight").await {
                if v >= 1.0 {
                    break v as u64;
                }
            }
            assert!(
                Instant::now() < busy_deadline && started.elapsed() < DEADLINE,
                "incarnation {incarnation} had nothing in flight for 30 s; its log:\n{}",
                tail(&log, 40)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let mut child = consumer.0.take().unwrap();
        child.kill().expect("SIGKILL");
        let at = Instant::now();
        let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
            .await
            .unwrap();
        assert!(!status.success(), "killed: {status:?}");
        let answered_within = |window: Duration| {
            sink.state
                .lock()
                .log
                .iter()
                .filter(|r| {
                    r.incarnation == incarnation
                        && r.is_final()
                        && at.duration_since(r.at) <= window
                })
                .count()
        };
        let answered_in_window =
            answered_within(Duration::from_millis(COMMIT_INTERVAL_MS + COMMIT_SLACK_MS));
        let answered_in_interval = answered_within(Duration::from_millis(COMMIT_INTERVAL_MS));
        // Whatever the killed process had sent before it died has reached the broker.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (b, g) = (bootstrap.clone(), names.group.clone());
        let topics: Vec<String> = names.all_topics()[..=RETRY_LEVELS as usize].to_vec();
        let uncommitted = tokio::task::spawn_blocking(move || {
            topics
                .iter()
                .map(|t| {
                    let c = committed(&b, &g, t);
                    end_offsets(&b, t)
                        .iter()
                        .zip(c)
                        .map(|(e, c)| e - c.max(0))
                        .sum::<i64>()
                })
                .sum::<i64>()
        })
        .await
        .unwrap();
        kills.push(Kill {
            at,
            in_flight,
            answered_in_window,
            answered_in_interval,
            hwm_kb,
            uncommitted,
        });
        incarnation += 1;
        (consumer, log, ops_port) = start_consumer(&names, &bootstrap, &url, &dir, incarnation);
    }
    kills_done.store(true, Ordering::SeqCst);

    let produced = producing.await.expect("producer task");
    assert_eq!(produced.len(), MESSAGES);
    let ids: Vec<String> = produced.iter().map(|(id, _, _)| id.clone()).collect();
    let permanent: HashSet<&String> = ids
        .iter()
        .filter(|id| sink.seq_of(id).map(behaviour) == Some(Behaviour::Permanent))
        .collect();
    let ok_wanted = ids.len() - permanent.len();

    // Wait (bounded) until every id was either accepted or refused for good by the sink.
    let finish_deadline = started + DEADLINE - Duration::from_secs(25);
    loop {
        let (ok, refused) = {
            let st = sink.state.lock();
            let refused = permanent
                .iter()
                .filter(|id| st.attempts.contains_key(**id))
                .count();
            (st.ok.len(), refused)
        };
        if ok >= ok_wanted && refused == permanent.len() {
            break;
        }
        if Instant::now() > finish_deadline {
            println!(
                "gave up waiting: {ok}/{ok_wanted} accepted, {refused}/{} refused",
                permanent.len()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = consumer.pid().to_string();
    max_hwm_kb = max_hwm_kb.max(proc_status_kb(&pid, "VmHWM").unwrap_or(0));

    // A graceful stop of the last incarnation: drains and commits everything.
    signal(consumer.pid(), "TERM");
    let mut child = consumer.0.take().unwrap();
    let exit = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();

    // The accounting.
    let b = bootstrap.clone();
    let dlq_topic = names.dlq.clone();
    let dlq =
        tokio::task::spawn_blocking(move || read_topic(&b, &dlq_topic, Duration::from_secs(20)))
            .await
            .unwrap();
    let mut dlq_count: HashMap<String, u32> = HashMap::new();
    let mut bad_dlq = Vec::new();
    for d in &dlq {
        let id = d.message_id().unwrap_or("").to_owned();
        let well_formed = header(d, "courier-error-kind").as_deref() == Some("fatal")
            && header(d, "courier-attempt").as_deref() == Some("1")
            && header(d, "courier-original-topic").as_deref() == Some(names.source.as_str())
            && header(d, "courier-original-partition").is_some()
            && header(d, "courier-original-offset").is_some()
            && header(d, "courier-consumer-group").as_deref() == Some(names.group.as_str())
            && header(d, "courier-error-message").is_some_and(|m| m.contains("400"))
            && d.payload.as_deref().is_some_and(|p| {
                serde_json::from_slice::<serde_json::Value>(p)
                    .is_ok_and(|v| v["id"].as_str() == Some(id.as_str()))
            });
        if !well_formed || !permanent.contains(&id) {
            bad_dlq.push(format!("{id}: {:?}", d.headers));
        }
        *dlq_count.entry(id).or_default() += 1;
    }
    // The consumer is stopped: take what the sink recorded.
    let st = std::mem::take(&mut *sink.state.lock());
    let lost: Vec<&String> = ids
        .iter()
        .filter(|id| !st.ok.contains_key(*id) && !dlq_count.contains_key(*id))
        .collect();
    let accepted_permanent: Vec<&String> = permanent
        .iter()
        .copied()
        .filter(|id| st.ok.contains_key(*id))
        .collect();
    let dup_ok: u32 = st.ok.values().map(|n| n - 1).sum();
    let dup_dlq: u32 = dlq_count.values().map(|n| n - 1).sum();
    let duplicates = (dup_ok + dup_dlq) as usize;

    // Attribute what was processed again to the kill that caused it: per id, each pair of
    // consecutive final answers from two processes is a message the earlier one finished
    // and did not commit before it was killed. Two successes from one process breach
    // guarantee 1.
    let mut finals: HashMap<&str, Vec<&Request>> = HashMap::new();
    for r in st.log.iter().filter(|r| r.is_final()) {
        finals.entry(r.id.as_str()).or_default().push(r);
    }
    let mut reprocessed = vec![0usize; kills.len()];
    let mut oldest_answer = vec![Duration::ZERO; kills.len()];
    let mut twice_in_one_process = Vec::new();
    let mut dlq_twice_in_one_process = 0usize;
    for rs in finals.values() {
        for w in rs.windows(2) {
            if w[0].incarnation == w[1].incarnation {
                if w[0].status == 200 && w[1].status == 200 {
                    twice_in_one_process.push((w[0].id.clone(), w[0].incarnation));
                } else {
                    dlq_twice_in_one_process += 1;
                }
            } else if let Some(k) = kills.get(w[0].incarnation) {
                reprocessed[w[0].incarnation] += 1;
                let age = k.at.duration_since(w[0].at);
                oldest_answer[w[0].incarnation] = oldest_answer[w[0].incarnation].max(age);
            }
        }
    }
    let bounds: Vec<usize> = kills.iter().map(duplicate_bound).collect();
    let bound: usize = bounds.iter().sum();
    for (i, k) in kills.iter().enumerate() {
        println!(
            "kill {}: at {:.1}s, in_flight={} answered_in_last_{}ms={} answered_in_last_{}ms={} \
             behind_commit_after={} reprocessed_after={} (oldest answer {} ms before the kill) \
             bound={} VmHWM={} MB",
            i + 1,
            k.at.duration_since(started).as_secs_f64(),
            k.in_flight,
            COMMIT_INTERVAL_MS,
            k.answered_in_interval,
            COMMIT_INTERVAL_MS + COMMIT_SLACK_MS,
            k.answered_in_window,
            k.uncommitted,
            reprocessed[i],
            oldest_answer[i].as_millis(),
            bounds[i],
            k.hwm_kb / 1024
        );
    }
    let by_status: BTreeMap<u16, usize> = st.log.iter().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(r.status).or_default() += 1;
        m
    });
    println!(
        "RELIABILITY kill-9: messages={} kills={} lost={} duplicates={} (2xx={dup_ok} dlq={dup_dlq}) \
         reprocessed_per_kill={reprocessed:?} bounds_per_kill={bounds:?} (in flight + final \
         answers in the last {}ms) twice_in_one_process={} dlq_twice_in_one_process={} \
         accepted={} dead_lettered={} sink_answers={:?} strays={} \
         max_rss_mb={} duration_s={:.0} seed={seed}",
        ids.len(),
        kills.len(),
        lost.len(),
        duplicates,
        COMMIT_INTERVAL_MS + COMMIT_SLACK_MS,
        twice_in_one_process.len(),
        dlq_twice_in_one_process,
        st.ok.len(),
        dlq_count.len(),
        by_status,
        st.strays,
        max_hwm_kb / 1024,
        started.elapsed().as_secs_f64()
    );
    let last_log = tail(&log, 30);
    if !lost.is_empty() {
        let lost: Vec<String> = lost.iter().take(10).map(|s| (*s).clone()).collect();
        let report = post_mortem(
            &lost,
            &produced,
            &st,
            &kills,
            started,
            &names,
            &bootstrap,
            &dir,
            incarnation,
        )
        .await;
        panic!(
            "messages lost (neither accepted by the sink nor in the DLQ); logs in {}:\n{report}",
            dir.display()
        );
    }
    assert!(
        twice_in_one_process.is_empty(),
        "one process processed an id successfully twice (guarantee 1): {:?}",
        &twice_in_one_process[..twice_in_one_process.len().min(10)]
    );
    for (i, k) in kills.iter().enumerate() {
        assert!(
            k.in_flight > 0 && k.uncommitted >= k.in_flight as i64,
            "kill {}: it found {} in flight, and {} messages behind the committed offsets",
            i + 1,
            k.in_flight,
            k.uncommitted
        );
        assert!(
            reprocessed[i] <= bounds[i],
            "kill {}: {} messages processed again, more than its bound {} ({} in flight + {} \
             final answers in the last {} ms)",
            i + 1,
            reprocessed[i],
            bounds[i],
            k.in_flight,
            k.answered_in_window,
            COMMIT_INTERVAL_MS + COMMIT_SLACK_MS
        );
    }
    assert!(
        accepted_permanent.is_empty(),
        "permanently failing ids were accepted: {accepted_permanent:?}"
    );
    assert!(
        bad_dlq.is_empty(),
        "DLQ records without the right headers or of the wrong ids: {:?}",
        &bad_dlq[..bad_dlq.len().min(5)]
    );
    assert!(
        duplicates <= bound,
        "{duplicates} duplicates exceed the sum of the kills' bounds {bound}"
    );
    let exit =
        exit.unwrap_or_else(|| panic!("the last consumer did not stop on SIGTERM:\n{last_log}"));
    assert!(exit.success(), "exit 0 after SIGTERM: {exit:?}\n{last_log}");
    // After the graceful stop nothing is left uncommitted: no partition is stuck.
    let b = bootstrap.clone();
    let (g, topics) = (names.group.clone(), names.all_topics());
    let stuck = tokio::task::spawn_blocking(move || {
        topics[..=RETRY_LEVELS as usize]
            .iter()
            .filter_map(|t| {
                let ends = end_offsets(&b, t);
                let c: Vec<i64> = committed(&b, &g, t)
                    .into_iter()
                    .zip(&ends)
                    .map(|(c, e)| if *e == 0 && c < 0 { 0 } else { c })
                    .collect();
                (c != ends).then(|| format!("{t}: committed {c:?}, end {ends:?}"))
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert!(stuck.is_empty(), "uncommitted after SIGTERM: {stuck:?}");
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        started.elapsed() < Duration::from_secs(180),
        "bounded run time"
    );
}
