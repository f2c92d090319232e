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
use std::path::PathBuf;
use std::time::{Duration, Instant};

use courier::testing::env::PROCESS;
use courier::testing::{
    event_record, DevBrokerProcess, HttpSink, Kafka, Log, Names, Reply, ServiceEnv, ServiceProcess,
    SinkRequest, SinkState,
};

const PARTITIONS: i32 = 6;
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

/// The sequence number of one of the test's ids (`{prefix}{seq}`).
fn seq_of(prefix: &str, id: &str) -> Option<usize> {
    id.strip_prefix(prefix)?.parse().ok()
}

/// The sink's answer to the `attempt`-th request for `id`, by [`behaviour`].
fn answer(prefix: &str, id: &str, attempt: u32) -> Reply {
    Reply::Status(match seq_of(prefix, id).map(behaviour) {
        Some(Behaviour::Fatal) => 400,
        Some(Behaviour::FailTwice) if attempt <= 2 => 500,
        _ => 200,
    })
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
    /// One more replica: `consumer-N`, logging to `dir/consumer-N.log`.
    fn start(&mut self) -> ServiceProcess {
        self.started += 1;
        let env = ServiceEnv::against(&self.bootstrap, self.names)
            .with(PROCESS)
            .set("KAFKA_CONSUMER_ASSIGNMENT_STRATEGY", self.strategy)
            .set("COURIER_PROCESSOR", "http")
            .set("PROCESSOR_HTTP_URL", &self.url)
            .set("KAFKA_RETRY_BACKOFF", "1s,2s,3s")
            .set(
                "KAFKA_CONSUMER_COMMIT_INTERVAL_MS",
                COMMIT_INTERVAL_MS.to_string(),
            )
            .set("KAFKA_CONSUMER_MAX_IN_FLIGHT", MAX_IN_FLIGHT.to_string())
            .set("KAFKA_CONSUMER_WORKERS", WORKERS.to_string());
        // Diagnosis knobs: `COURIER_FLEET_LOG` (a LOG_LEVEL filter) and
        // `COURIER_FLEET_RDKAFKA_DEBUG` (librdkafka's `debug` contexts, e.g. `cgrp`).
        let env = match std::env::var("COURIER_FLEET_LOG") {
            Ok(level) => env.set("LOG_LEVEL", level),
            Err(_) => env,
        };
        let env = match std::env::var("COURIER_FLEET_RDKAFKA_DEBUG") {
            Ok(debug) => env.set("RDKAFKA_DEBUG", debug),
            Err(_) => env,
        };
        let log = self.dir.join(format!("consumer-{}.log", self.started));
        ServiceProcess::spawn("consumer", &env, Log::File(log))
    }
}

/// Produces `RATE_PER_SEC` messages a second for `STREAM`; returns (id, partition, offset).
async fn produce_stream(kafka: Kafka, topic: String, prefix: String) -> Vec<(String, i32, i64)> {
    let producer = kafka.producer(&[
        ("acks", "all"),
        ("enable.idempotence", "true"),
        ("linger.ms", "5"),
    ]);
    let total = RATE_PER_SEC * STREAM.as_secs() as usize;
    let tick = Duration::from_millis(100);
    let per_tick = RATE_PER_SEC / 10;
    let mut out = Vec::with_capacity(total);
    let mut interval = tokio::time::interval(tick);
    for start in (0..total).step_by(per_tick) {
        interval.tick().await;
        let futs = (start..(start + per_tick).min(total)).map(|seq| {
            let producer = producer.clone();
            let id = format!("{prefix}{seq}");
            let key = format!("key-{}", seq % 101);
            let record = event_record(&topic, &id, "fleet", seq, key);
            async move {
                let (partition, offset) = producer.send(&record).await;
                (id, partition, offset)
            }
        });
        out.extend(futures::future::join_all(futs).await);
    }
    out
}

/// The partitions of the source and retry topics the group has not committed to their
/// end.
async fn stuck_partitions(kafka: &Kafka, names: &Names) -> Vec<String> {
    let (k, g, topics) = (kafka.clone(), names.group.clone(), names.consumed_topics());
    tokio::task::spawn_blocking(move || k.not_committed_to_end(&g, &topics))
        .await
        .unwrap()
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

async fn event(events: &mut Vec<Event>, what: String, victim: Option<&ServiceProcess>) {
    let in_flight = match victim {
        Some(r) => r.gauge("courier_in_flight").await.map(|v| v as usize),
        None => None,
    };
    events.push(Event {
        what,
        at: Instant::now(),
        in_flight,
    });
}

/// SIGTERM: the replica drains, commits, leaves the group and exits 0.
async fn stop_replica(events: &mut Vec<Event>, mut r: ServiceProcess) {
    event(events, format!("SIGTERM {}", r.name), None).await;
    r.signal("TERM");
    let code = r.wait(Duration::from_secs(30)).await.code();
    assert_eq!(code, Some(0), "a replica exits 0 on SIGTERM");
}

async fn fleet(strategy: &'static str) {
    let _serial = SERIAL.lock().await;
    let names = Names::new("fleet");
    let dir = std::env::temp_dir().join(format!("courier-fleet-{}", names.source));
    std::fs::create_dir_all(&dir).unwrap();
    let broker = DevBrokerProcess::start(&ServiceEnv::new(&names).with(PROCESS), PARTITIONS, &dir);
    let bootstrap = broker.bootstrap.clone();
    let kafka = Kafka::new(&bootstrap, PARTITIONS);
    let prefix = format!("{}-id-", names.source);
    let (url, sink) = {
        let prefix = prefix.clone();
        HttpSink::new(
            move |id, attempt| answer(&prefix, id, attempt),
            SINK_LATENCY,
        )
        .start()
        .await
    };
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
        kafka.clone(),
        names.source.clone(),
        prefix.clone(),
    ));
    let mut events = Vec::new();
    let r1 = fleet.start();
    r1.wait_ready(Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    // Scale 1 → 3.
    event(&mut events, "scale 1→2".into(), None).await;
    let mut r2 = fleet.start();
    tokio::time::sleep(Duration::from_secs(3)).await;
    event(&mut events, "scale 2→3".into(), None).await;
    let r3 = fleet.start();
    r2.wait_ready(Duration::from_secs(30)).await;
    r3.wait_ready(Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    // SIGKILL one; its pod is restarted a moment later.
    event(&mut events, format!("SIGKILL {}", r2.name), Some(&r2)).await;
    r2.signal("KILL");
    assert_eq!(
        r2.wait(Duration::from_secs(10)).await.code(),
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
        new.wait_ready(Duration::from_secs(30)).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop_replica(&mut events, old).await;
        running.push(new);
        tokio::time::sleep(Duration::from_secs(8)).await;
    }

    let produced = stream.await.expect("producer task");
    let permanent: HashSet<String> = produced
        .iter()
        .filter(|(id, _, _)| seq_of(&prefix, id).map(behaviour) == Some(Behaviour::Fatal))
        .map(|(id, _, _)| id.clone())
        .collect();
    // Done: every good id answered 2xx, every permanent one in the DLQ, nothing stuck.
    let deadline = began + DEADLINE;
    let (lost, dlq) = loop {
        let dlq = {
            let (k, t) = (kafka.clone(), names.dlq.clone());
            tokio::task::spawn_blocking(move || k.read_to_end(&t, Duration::from_secs(20)))
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
        let stuck = stuck_partitions(&kafka, &names).await;
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
                    g.push(format!("{name}={:?}", r.gauge(name).await));
                }
                state.push(format!("{} (pid {}): {}", r.name, r.id(), g.join(" ")));
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
        r.signal("TERM");
        assert_eq!(
            r.wait(Duration::from_secs(30)).await.code(),
            Some(0),
            "{} exits 0 on SIGTERM",
            r.name
        );
    }
    let stuck = stuck_partitions(&kafka, &names).await;
    assert!(
        stuck.is_empty(),
        "after the last SIGTERM every partition is committed to its end: {stuck:?}"
    );

    let st = sink.state.lock();
    assert!(lost.is_empty());
    // No retry before its due time.
    let early: Vec<&SinkRequest> = st
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
