//! Fleet: several `courier consumer` processes in one group, scaled, killed and restarted
//! while a steady stream flows (DESIGN.md, guarantees 1, 2, 3 and 7 for a group of any
//! size). Everything runs as in production, in separate processes: `courier dev-broker`,
//! the consumers with the `http` processor, and this test, which produces the stream and
//! runs the HTTP sink. The sink fails some ids on purpose, by id: 10% fail twice (500, so
//! they wait on `-retry-1` and `-retry-2` through the rebalances), 2% get 400 (fatal: DLQ).
//!
//! Events: one replica; scale to three (4 s and 7 s in); SIGKILL one; SIGTERM another; then
//! a rolling restart of the rest (a new replica is started and ready before an old one is
//! stopped, as a Deployment's rolling update does). Asserts:
//! - nothing is lost: every id reached the sink with a 2xx or is in the DLQ;
//! - no partition is stuck: every source and retry partition is committed to its end;
//! - no retry ran before its due time: every request that carries `courier-due-at-ms`
//!   arrived at or after it;
//! - duplicates stay within the bound derived below, which is printed with the figures.
//!
//! **The duplicate bound.** A message is processed twice only if a process that finished
//! it did not get its commit through before the partition moved: a kill loses what the
//! victim had in flight (`courier_in_flight` just before the kill) and what it finished
//! but had not committed; a graceful stop or revoke drains and commits synchronously, but
//! the broker refuses commits while the group rebalances (librdkafka's mock broker refuses
//! every commit until the group is stable again, and waits out `session.timeout.ms` after a
//! member leaves), and a refused revoke commit leaves the next owner to start from the last
//! good one. So per event the bound is: in flight at a kill, plus every answer from one
//! commit interval and a 1 s allowance before the event until the same after the group is
//! stable again (every source partition flowing). The test asserts the sum.
//!
//! The figures of each run (time until every partition flows again after each event,
//! duplicates, bound) are printed on a line starting with `FLEET`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use courier::model::{Delivery, HEADER_MESSAGE_ID};
use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const PARTITIONS: i32 = 6;
const RETRY_LEVELS: u32 = 3;
const RATE_PER_SEC: usize = 100;
const STREAM: Duration = Duration::from_secs(60);
const MAX_IN_FLIGHT: usize = 100;
const WORKERS: usize = 4;
const COMMIT_INTERVAL_MS: u64 = 200;
const COMMIT_SLACK_MS: u64 = 1_000;
const SINK_LATENCY: Duration = Duration::from_millis(5);
/// The whole scenario's deadline (the test fails rather than hang a CI run).
const DEADLINE: Duration = Duration::from_secs(200);

/// The scenarios run one at a time: each starts several processes on a 2-core machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    Ok,
    FailTwice,
    Fatal,
}

fn behaviour(seq: usize) -> Behaviour {
    match seq % 50 {
        7 => Behaviour::Fatal,
        1 | 11 | 21 | 31 | 41 => Behaviour::FailTwice,
        _ => Behaviour::Ok,
    }
}

/// One request the sink answered.
#[derive(Debug, Clone)]
struct Request {
    id: String,
    at_ms: i64,
    at: Instant,
    status: u16,
    due_at_ms: Option<i64>,
}

#[derive(Default)]
struct SinkState {
    attempts: HashMap<String, u32>,
    ok: HashMap<String, u32>,
    log: Vec<Request>,
}

struct Sink {
    prefix: String,
    state: Mutex<SinkState>,
}

async fn sink_handler(State(sink): State<Arc<Sink>>, headers: HeaderMap) -> StatusCode {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let id = text(HEADER_MESSAGE_ID).unwrap_or_default();
    let due_at_ms = text("courier-due-at-ms").and_then(|v| v.parse().ok());
    let seq: Option<usize> = id.strip_prefix(&sink.prefix).and_then(|s| s.parse().ok());
    let status = {
        let mut st = sink.state.lock();
        let n = {
            let n = st.attempts.entry(id.clone()).or_default();
            *n += 1;
            *n
        };
        let status = match seq.map(behaviour) {
            Some(Behaviour::Fatal) => StatusCode::BAD_REQUEST,
            Some(Behaviour::FailTwice) if n <= 2 => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::OK,
        };
        if status == StatusCode::OK {
            *st.ok.entry(id.clone()).or_default() += 1;
        }
        st.log.push(Request {
            id,
            at_ms: courier::model::now_ms(),
            at: Instant::now(),
            status: status.as_u16(),
            due_at_ms,
        });
        status
    };
    tokio::time::sleep(SINK_LATENCY).await;
    status
}

async fn start_sink(prefix: &str) -> (String, Arc<Sink>) {
    let sink = Arc::new(Sink {
        prefix: prefix.to_owned(),
        state: Mutex::new(SinkState::default()),
    });
    let app = axum::Router::new()
        .route("/", axum::routing::post(sink_handler))
        .with_state(sink.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, sink)
}

/// A child process, killed and reaped if the test ends early.
struct Guard(Option<Child>);

impl Guard {
    fn pid(&self) -> u32 {
        self.0.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Waits for the process to exit; its status code (None: killed by a signal).
    fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let mut child = self.0.take().expect("a running process");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("process {} did not exit within {timeout:?}", child.id());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[derive(Clone)]
struct Names {
    source: String,
    prefix: String,
    dlq: String,
    group: String,
}

impl Names {
    fn new() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
        Names {
            source: format!("fleet-{id}"),
            prefix: format!("fleet-{id}-retry"),
            dlq: format!("fleet-{id}-dlq"),
            group: format!("fleet-group-{id}"),
        }
    }

    fn consumed_topics(&self) -> Vec<String> {
        let mut v = vec![self.source.clone()];
        v.extend((1..=RETRY_LEVELS).map(|n| format!("{}-{n}", self.prefix)));
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

fn start_broker(names: &Names, dir: &Path) -> (Guard, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_courier"))
        .arg("dev-broker")
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
    (Guard(Some(child)), line.trim().to_owned())
}

/// One replica: its process, log and ops port.
struct Replica {
    name: String,
    guard: Guard,
    ops_port: u16,
}

struct Fleet<'a> {
    names: &'a Names,
    bootstrap: String,
    url: String,
    dir: PathBuf,
    strategy: &'static str,
    started: usize,
}

impl Fleet<'_> {
    fn start(&mut self) -> Replica {
        self.started += 1;
        let name = format!("consumer-{}", self.started);
        let ops_port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_courier"))
            .arg("consumer")
            .envs(self.names.topic_env())
            .env("KAFKA_BROKERS", &self.bootstrap)
            .env("KAFKA_CONSUMER_ASSIGNMENT_STRATEGY", self.strategy)
            .env("COURIER_PROCESSOR", "http")
            .env("PROCESSOR_HTTP_URL", &self.url)
            .env("KAFKA_RETRY_BACKOFF", "1s,2s,3s")
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
            .env(
                "LOG_LEVEL",
                std::env::var("COURIER_FLEET_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(std::env::var("COURIER_FLEET_RDKAFKA_DEBUG").map(|d| ("RDKAFKA_DEBUG", d)))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join(format!("{name}.log"))).unwrap())
            .spawn()
            .expect("consumer starts");
        Replica {
            name,
            guard: Guard(Some(child)),
            ops_port,
        }
    }
}

/// The body of one GET on the replica's ops port, if it answers within a second.
async fn ops_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(1), fetch)
        .await
        .ok()?
}

async fn gauge(port: u16, name: &str) -> Option<f64> {
    let (_, text) = ops_get(port, "/metrics").await?;
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

async fn wait_ready(r: &Replica, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if ops_get(r.ops_port, "/readyz")
            .await
            .is_some_and(|(s, _)| s == 200)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} not ready within {timeout:?}",
            r.name
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Produces `RATE_PER_SEC` messages a second for `STREAM`; returns (id, partition, offset).
async fn produce_stream(
    bootstrap: String,
    topic: String,
    prefix: String,
) -> Vec<(String, i32, i64)> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let total = RATE_PER_SEC * STREAM.as_secs() as usize;
    let tick = Duration::from_millis(100);
    let per_tick = RATE_PER_SEC / 10;
    let mut out = Vec::with_capacity(total);
    let mut interval = tokio::time::interval(tick);
    for start in (0..total).step_by(per_tick) {
        interval.tick().await;
        let futs = (start..(start + per_tick).min(total)).map(|seq| {
            let producer = producer.clone();
            let topic = topic.clone();
            let id = format!("{prefix}{seq}");
            async move {
                let payload =
                    serde_json::json!({"id": id, "type": "fleet", "seq": seq}).to_string();
                let key = format!("key-{}", seq % 101);
                let headers = courier::transport::headers::write(&vec![(
                    HEADER_MESSAGE_ID.into(),
                    Some(id.as_bytes().to_vec()),
                )]);
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
    }
    out
}

fn client(bootstrap: &str, group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("client")
}

fn end_offsets(bootstrap: &str, topic: &str) -> Vec<i64> {
    let c = client(bootstrap, "fleet-watermarks");
    (0..PARTITIONS)
        .map(|p| {
            c.fetch_watermarks(topic, p, Duration::from_secs(5))
                .expect("watermarks")
                .1
        })
        .collect()
}

fn committed(bootstrap: &str, group: &str, topic: &str) -> Vec<i64> {
    let c = client(bootstrap, group);
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

/// Whether the group committed every partition of every consumed topic to its end.
fn stuck_partitions(bootstrap: &str, names: &Names) -> Vec<String> {
    let mut stuck = Vec::new();
    for t in names.consumed_topics() {
        let ends = end_offsets(bootstrap, &t);
        let done = committed(bootstrap, &names.group, &t);
        for (p, (c, e)) in done.iter().zip(&ends).enumerate() {
            if *e > 0 && c != e {
                stuck.push(format!("{t}/{p}: committed {c} of {e}"));
            }
        }
    }
    stuck
}

fn read_dlq(bootstrap: &str, topic: &str) -> Vec<Delivery> {
    let c = client(
        bootstrap,
        &format!("fleet-reader-{}", uuid::Uuid::new_v4().simple()),
    );
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let ends: i64 = end_offsets(bootstrap, topic).iter().sum();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut out = Vec::new();
    while Instant::now() < deadline && (out.len() as i64) < ends {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            out.push(courier::transport::consumer::to_delivery(&m));
        }
    }
    out
}

/// A moment of the scenario, with what it measured.
struct Event {
    what: String,
    at: Instant,
    /// For a kill: the victim's `courier_in_flight` just before it.
    in_flight: Option<usize>,
}

/// 2xx answers in `[from, to)`.
fn answered_between(st: &SinkState, from: Instant, to: Instant) -> usize {
    st.log
        .iter()
        .filter(|r| r.status == 200 && r.at >= from && r.at < to)
        .count()
}

/// How long after `at` every source partition had a 2xx answer again: the time until the
/// whole fleet flows after an event.
fn resume_time(
    st: &SinkState,
    produced_at: &HashMap<String, i32>,
    at: Instant,
    until: Instant,
) -> Option<Duration> {
    let mut first: BTreeMap<i32, Instant> = BTreeMap::new();
    for r in st
        .log
        .iter()
        .filter(|r| r.status == 200 && r.at >= at && r.at < until)
    {
        if let Some(p) = produced_at.get(&r.id) {
            first.entry(*p).or_insert(r.at);
        }
    }
    if first.len() < PARTITIONS as usize {
        return None;
    }
    first.values().max().map(|t| t.duration_since(at))
}

async fn event(events: &mut Vec<Event>, what: String, victim: Option<&Replica>) {
    let in_flight = match victim {
        Some(r) => gauge(r.ops_port, "courier_in_flight")
            .await
            .map(|v| v as usize),
        None => None,
    };
    events.push(Event {
        what,
        at: Instant::now(),
        in_flight,
    });
}

/// SIGTERM: the replica drains, commits, leaves the group and exits 0.
async fn stop_replica(events: &mut Vec<Event>, mut r: Replica) {
    event(events, format!("SIGTERM {}", r.name), None).await;
    signal(r.guard.pid(), "TERM");
    let code = tokio::task::spawn_blocking(move || r.guard.wait(Duration::from_secs(30)))
        .await
        .expect("wait task");
    assert_eq!(code, Some(0), "a replica exits 0 on SIGTERM");
}

async fn fleet(strategy: &'static str) {
    let _serial = SERIAL.lock().await;
    let names = Names::new();
    let dir = std::env::temp_dir().join(format!("courier-fleet-{}", names.source));
    std::fs::create_dir_all(&dir).unwrap();
    let (_broker, bootstrap) = start_broker(&names, &dir);
    let prefix = format!("{}-id-", names.source);
    let (url, sink) = start_sink(&prefix).await;
    let mut fleet = Fleet {
        names: &names,
        bootstrap: bootstrap.clone(),
        url,
        dir: dir.clone(),
        strategy,
        started: 0,
    };
    let began = Instant::now();
    let stream = tokio::spawn(produce_stream(
        bootstrap.clone(),
        names.source.clone(),
        prefix.clone(),
    ));
    let mut events = Vec::new();
    let r1 = fleet.start();
    wait_ready(&r1, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    // Scale 1 → 3.
    event(&mut events, "scale 1→2".into(), None).await;
    let mut r2 = fleet.start();
    tokio::time::sleep(Duration::from_secs(3)).await;
    event(&mut events, "scale 2→3".into(), None).await;
    let r3 = fleet.start();
    wait_ready(&r2, Duration::from_secs(30)).await;
    wait_ready(&r3, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    // SIGKILL one; its pod is restarted a moment later.
    event(&mut events, format!("SIGKILL {}", r2.name), Some(&r2)).await;
    signal(r2.guard.pid(), "KILL");
    assert_eq!(
        r2.guard.wait(Duration::from_secs(10)),
        None,
        "killed by the signal"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r4 = fleet.start();
    tokio::time::sleep(Duration::from_secs(10)).await;
    // SIGTERM another (scale down to two).
    stop_replica(&mut events, r3).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    // Rolling restart of the rest: each new replica is ready before an old one stops.
    let mut running = vec![r4];
    for old in [r1, running.remove(0)] {
        event(
            &mut events,
            "rolling restart: a new replica starts".into(),
            None,
        )
        .await;
        let new = fleet.start();
        wait_ready(&new, Duration::from_secs(30)).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop_replica(&mut events, old).await;
        running.push(new);
        tokio::time::sleep(Duration::from_secs(8)).await;
    }

    let produced = stream.await.expect("producer task");
    let permanent: HashSet<String> = produced
        .iter()
        .filter(|(id, _, _)| {
            id.strip_prefix(&prefix)
                .and_then(|s| s.parse().ok())
                .map(behaviour)
                == Some(Behaviour::Fatal)
        })
        .map(|(id, _, _)| id.clone())
        .collect();
    // Done: every good id answered 2xx, every permanent one in the DLQ, nothing stuck.
    let deadline = began + DEADLINE;
    let (lost, dlq) = loop {
        let dlq = {
            let (b, t) = (bootstrap.clone(), names.dlq.clone());
            tokio::task::spawn_blocking(move || read_dlq(&b, &t))
                .await
                .unwrap()
        };
        let in_dlq: HashSet<String> = dlq
            .iter()
            .filter_map(|d| d.message_id().map(str::to_owned))
            .collect();
        let lost: Vec<String> = {
            let st = sink.state.lock();
            produced
                .iter()
                .map(|(id, _, _)| id)
                .filter(|id| !st.ok.contains_key(*id) && !in_dlq.contains(*id))
                .cloned()
                .collect()
        };
        let stuck = {
            let (b, n) = (bootstrap.clone(), names.clone());
            tokio::task::spawn_blocking(move || stuck_partitions(&b, &n))
                .await
                .unwrap()
        };
        if lost.is_empty() && stuck.is_empty() {
            break (lost, dlq);
        }
        if Instant::now() > deadline {
            let mut state = Vec::new();
            for r in &running {
                let mut g = Vec::new();
                for name in [
                    "courier_in_flight",
                    "courier_paused_partitions",
                    "courier_assigned_partitions",
                    "courier_held_messages",
                    "courier_circuit_state",
                ] {
                    g.push(format!("{name}={:?}", gauge(r.ops_port, name).await));
                }
                state.push(format!(
                    "{} (pid {}): {}",
                    r.name,
                    r.guard.pid(),
                    g.join(" ")
                ));
            }
            if let Ok(secs) = std::env::var("COURIER_FLEET_HOLD_ON_FAILURE") {
                // Keeps the processes alive for a look (gdb, curl) before failing.
                eprintln!("FLEET stuck: {state:?}; holding {secs} s");
                tokio::time::sleep(Duration::from_secs(secs.parse().unwrap_or(600))).await;
            }
            panic!(
                "{} ids never reached the sink nor the DLQ (first: {:?}); stuck partitions: {stuck:?}; replicas: {state:?}; logs in {}",
                lost.len(),
                lost.iter().take(5).collect::<Vec<_>>(),
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let ended = Instant::now();
    for mut r in running {
        signal(r.guard.pid(), "TERM");
        assert_eq!(
            r.guard.wait(Duration::from_secs(30)),
            Some(0),
            "{} exits 0 on SIGTERM",
            r.name
        );
    }
    let stuck = {
        let (b, n) = (bootstrap.clone(), names.clone());
        tokio::task::spawn_blocking(move || stuck_partitions(&b, &n))
            .await
            .unwrap()
    };
    assert!(
        stuck.is_empty(),
        "after the last SIGTERM every partition is committed to its end: {stuck:?}"
    );

    let st = sink.state.lock();
    assert!(lost.is_empty());
    // No retry before its due time.
    let early: Vec<&Request> = st
        .log
        .iter()
        .filter(|r| r.due_at_ms.is_some_and(|d| r.at_ms < d))
        .collect();
    assert!(
        early.is_empty(),
        "{} retries ran before their due time, e.g. {:?}",
        early.len(),
        early.first()
    );
    let retried = st.log.iter().filter(|r| r.due_at_ms.is_some()).count();
    // Every DLQ record is a permanent failure, never a good id.
    for d in &dlq {
        let id = d.message_id().unwrap_or("");
        assert!(permanent.contains(id), "{id} is in the DLQ but succeeds");
    }
    let good_ok: Vec<_> = st.ok.keys().filter(|id| permanent.contains(*id)).collect();
    assert!(
        good_ok.is_empty(),
        "permanent failures answered 2xx: {good_ok:?}"
    );
    let dup_ok: u32 = st.ok.values().map(|n| n - 1).sum();
    let mut dlq_count: HashMap<&str, u32> = HashMap::new();
    for d in &dlq {
        *dlq_count.entry(d.message_id().unwrap_or("")).or_default() += 1;
    }
    let dup_dlq: u32 = dlq_count.values().map(|n| n - 1).sum();
    let duplicates = (dup_ok + dup_dlq) as usize;
    // Each duplicate 2xx, attributed to the last event before its second answer.
    let mut dup_by_event = vec![0usize; events.len()];
    let mut answers: HashMap<&str, u32> = HashMap::new();
    for r in st.log.iter().filter(|r| r.status == 200) {
        let n = answers.entry(r.id.as_str()).or_default();
        *n += 1;
        if *n > 1 {
            if let Some(i) = events.iter().rposition(|e| e.at <= r.at) {
                dup_by_event[i] += 1;
            }
        }
    }
    let partition_of: HashMap<String, i32> =
        produced.iter().map(|(id, p, _)| (id.clone(), *p)).collect();
    let slack = Duration::from_millis(COMMIT_INTERVAL_MS + COMMIT_SLACK_MS);
    let mut figures = Vec::new();
    let mut bound = 0;
    for (i, e) in events.iter().enumerate() {
        let until = events.get(i + 1).map_or(ended, |n| n.at);
        let resume = resume_time(&st, &partition_of, e.at, until);
        // The group is stable again once every partition flows; until then commits may be
        // refused. What was answered from one commit interval before the event to one after
        // that may be processed again by a partition's next owner; a kill adds what it had
        // in flight.
        let stable = e.at + resume.unwrap_or_else(|| until.duration_since(e.at));
        let allowance = e.in_flight.unwrap_or(0)
            + answered_between(
                &st,
                e.at.checked_sub(slack).unwrap_or(began),
                stable + slack,
            );
        bound += allowance;
        let resume = resume.map_or("not within the phase".to_owned(), |d| {
            format!("{:.1}s", d.as_secs_f64())
        });
        figures.push(format!(
            "{} at {:.1}s: all partitions flowing after {resume}; duplicates after it {}; allowance {allowance} (in flight {:?})",
            e.what,
            e.at.duration_since(began).as_secs_f64(),
            dup_by_event[i],
            e.in_flight,
        ));
    }
    println!(
        "FLEET strategy={strategy} produced={} dlq={} retried_requests={retried} duplicates={duplicates} (2xx {dup_ok} + dlq {dup_dlq}) bound={bound} took={:.1}s\nFLEET {}",
        produced.len(),
        dlq.len(),
        ended.duration_since(began).as_secs_f64(),
        figures.join("\nFLEET ")
    );
    assert!(
        duplicates <= bound,
        "{duplicates} duplicates exceed the bound {bound}"
    );
    drop(st);
    if std::env::var_os("COURIER_FLEET_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("FLEET logs kept in {}", dir.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_scaled_killed_and_rolled_loses_nothing_cooperative_sticky() {
    fleet("cooperative-sticky").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_scaled_killed_and_rolled_loses_nothing_eager_range() {
    fleet("range").await;
}
