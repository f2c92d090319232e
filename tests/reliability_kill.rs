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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier::testing::env::PROCESS;
use courier::testing::{
    event_record, header, proc_status_kib, rand_id, DevBrokerProcess, HttpSink, Kafka, Log, Names,
    Reply, ServiceEnv, ServiceProcess, SinkRequest, SinkState,
};
use rand::{RngExt, SeedableRng};

const MESSAGES: usize = 10_000;
const KILLS: usize = 4;
const PARTITIONS: i32 = 6;
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

/// The sequence number of one of the test's ids (`{prefix}{seq}`).
fn seq_of(prefix: &str, id: &str) -> Option<usize> {
    id.strip_prefix(prefix)?.parse().ok()
}

/// The sink's answer to the `attempt`-th request for `id`: by [`behaviour`]; an id that is
/// not the test's is a stray.
fn answer(prefix: &str, id: &str, attempt: u32) -> Reply {
    let Some(seq) = seq_of(prefix, id) else {
        return Reply::Stray;
    };
    Reply::Status(match behaviour(seq) {
        Behaviour::Permanent => 400,
        Behaviour::Transient(f) if attempt <= f => {
            if attempt == 1 {
                503
            } else {
                500
            }
        }
        _ => 200,
    })
}

/// Which consumer process sent a request: each incarnation posts to `{sink}{n}`.
fn incarnation_of(r: &SinkRequest) -> usize {
    r.path.trim_start_matches('/').parse().unwrap_or(usize::MAX)
}

/// Starts `courier consumer` (incarnation `n`), logging to `dir/consumer-n.log`.
fn start_consumer(
    names: &Names,
    bootstrap: &str,
    url: &str,
    dir: &Path,
    n: usize,
) -> ServiceProcess {
    let env = ServiceEnv::against(bootstrap, names)
        .with(PROCESS)
        .set("COURIER_PROCESSOR", "http")
        .set("PROCESSOR_HTTP_URL", format!("{url}{n}"))
        .set("PROCESSOR_HTTP_TIMEOUT_MS", "5000")
        .set("KAFKA_RETRY_BACKOFF", "200ms")
        .set(
            "KAFKA_CONSUMER_COMMIT_INTERVAL_MS",
            COMMIT_INTERVAL_MS.to_string(),
        )
        .set("KAFKA_CONSUMER_MAX_IN_FLIGHT", MAX_IN_FLIGHT.to_string())
        .set("KAFKA_CONSUMER_WORKERS", WORKERS.to_string());
    let log = dir.join(format!("consumer-{n}.log"));
    ServiceProcess::spawn("consumer", &env, Log::File(log))
}

/// Produces `MESSAGES` messages: at a steady pace while the kills go on (so every
/// incarnation has work when it is killed), the rest at once when `kills_done`; returns
/// (id, partition, offset) per message.
async fn produce_all(
    kafka: Kafka,
    topic: String,
    prefix: String,
    kills_done: Arc<AtomicBool>,
) -> Vec<(String, i32, i64)> {
    let producer = kafka.producer(&[
        ("acks", "all"),
        ("enable.idempotence", "true"),
        ("linger.ms", "5"),
    ]);
    let mut out = Vec::with_capacity(MESSAGES);
    let chunk = 250;
    for start in (0..MESSAGES).step_by(chunk) {
        let futs = (start..(start + chunk).min(MESSAGES)).map(|seq| {
            let producer = producer.clone();
            let id = format!("{prefix}{seq}");
            let key = format!("key-{}", seq % 997);
            let record = event_record(&topic, &id, "kill_test", seq, key);
            async move {
                let (partition, offset) = producer.send(&record).await;
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
    kafka: &Kafka,
    dir: &Path,
    incarnations: usize,
) -> String {
    let mut out = String::new();
    let kill_times: Vec<String> = kills
        .iter()
        .map(|k| format!("{:.3}s", k.at.duration_since(started).as_secs_f64()))
        .collect();
    out.push_str(&format!("kills at {kill_times:?}\n"));
    let (kafka, topics) = (kafka.clone(), names.all_topics());
    let group = names.group.clone();
    let lost_set: HashSet<String> = lost.iter().cloned().collect();
    let copies = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        for t in &topics {
            let c = kafka.committed(&group, t);
            let e = kafka.end_offsets(t);
            lines.push(format!("{t}: committed {c:?} end {e:?}"));
            for d in kafka.read_to_end(t, Duration::from_secs(10)) {
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
    let names = Names::new("kill");
    // Kept on failure (the path is printed); removed at the end of a passing run.
    let dir = tempfile::Builder::new()
        .prefix("courier-kill-")
        .tempdir()
        .unwrap()
        .keep();
    let broker = DevBrokerProcess::start(&ServiceEnv::new(&names).with(PROCESS), PARTITIONS, &dir);
    let bootstrap = broker.bootstrap.clone();
    let from_file = std::fs::read_to_string(&broker.bootstrap_file).unwrap_or_default();
    assert_eq!(from_file.trim(), bootstrap, "--bootstrap-file holds it too");
    let kafka = Kafka::new(&bootstrap, PARTITIONS);
    let id_prefix = format!("m-{}-", rand_id());
    let (url, sink) = {
        let prefix = id_prefix.clone();
        HttpSink::new(
            move |id, attempt| answer(&prefix, id, attempt),
            SINK_LATENCY,
        )
        .start()
        .await
    };
    println!(
        "kill test: seed={seed} broker={bootstrap} logs={} (kept on failure)",
        dir.display()
    );

    let kills_done = Arc::new(AtomicBool::new(false));
    let producing = tokio::spawn(produce_all(
        kafka.clone(),
        names.source.clone(),
        id_prefix.clone(),
        kills_done.clone(),
    ));

    let answered = |sink: &HttpSink| sink.state.lock().log.len();
    let mut incarnation = 0;
    let mut consumer = start_consumer(&names, &bootstrap, &url, &dir, incarnation);
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
                consumer.tail(40)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let wait = Duration::from_millis(rng.random_range(1_000..3_000));
        tokio::time::sleep(wait).await;
        let pid = consumer.id().to_string();
        let hwm_kb = proc_status_kib(&pid, "VmHWM").unwrap_or(0);
        max_hwm_kb = max_hwm_kb.max(hwm_kb);
        // Kill only with work in flight, at once after reading the gauge (SIGKILL from this
        // process, no `kill` command in between).
        let busy_deadline = Instant::now() + Duration::from_secs(30);
        let in_flight = loop {
            if let Some(v) = consumer.gauge("courier_in_flight").await {
                if v >= 1.0 {
                    break v as u64;
                }
            }
            assert!(
                Instant::now() < busy_deadline && started.elapsed() < DEADLINE,
                "incarnation {incarnation} had nothing in flight for 30 s; its log:\n{}",
                consumer.tail(40)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let at = consumer.sigkill();
        let status = consumer.wait(Duration::from_secs(10)).await;
        assert!(!status.success(), "killed: {status:?}");
        let answered_within = |window: Duration| {
            sink.state
                .lock()
                .log
                .iter()
                .filter(|r| {
                    incarnation_of(r) == incarnation
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
        let (k, g, topics) = (kafka.clone(), names.group.clone(), names.consumed_topics());
        let uncommitted = tokio::task::spawn_blocking(move || k.behind_committed(&g, &topics))
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
        consumer = start_consumer(&names, &bootstrap, &url, &dir, incarnation);
    }
    kills_done.store(true, Ordering::SeqCst);

    let produced = producing.await.expect("producer task");
    assert_eq!(produced.len(), MESSAGES);
    let ids: Vec<String> = produced.iter().map(|(id, _, _)| id.clone()).collect();
    let permanent: HashSet<&String> = ids
        .iter()
        .filter(|id| seq_of(&id_prefix, id).map(behaviour) == Some(Behaviour::Permanent))
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
    let pid = consumer.id().to_string();
    max_hwm_kb = max_hwm_kb.max(proc_status_kib(&pid, "VmHWM").unwrap_or(0));

    // A graceful stop of the last incarnation: drains and commits everything.
    consumer.signal("TERM");
    let exit = consumer.wait_or_kill(Duration::from_secs(20)).await;

    // The accounting.
    let (k, dlq_topic) = (kafka.clone(), names.dlq.clone());
    let dlq =
        tokio::task::spawn_blocking(move || k.read_to_end(&dlq_topic, Duration::from_secs(20)))
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
    let mut finals: HashMap<&str, Vec<&SinkRequest>> = HashMap::new();
    for r in st.log.iter().filter(|r| r.is_final()) {
        finals.entry(r.id.as_str()).or_default().push(r);
    }
    let mut reprocessed = vec![0usize; kills.len()];
    let mut oldest_answer = vec![Duration::ZERO; kills.len()];
    let mut twice_in_one_process = Vec::new();
    let mut dlq_twice_in_one_process = 0usize;
    for rs in finals.values() {
        for w in rs.windows(2) {
            let (first, second) = (incarnation_of(w[0]), incarnation_of(w[1]));
            if first == second {
                if w[0].status == 200 && w[1].status == 200 {
                    twice_in_one_process.push((w[0].id.clone(), first));
                } else {
                    dlq_twice_in_one_process += 1;
                }
            } else if let Some(k) = kills.get(first) {
                reprocessed[first] += 1;
                let age = k.at.duration_since(w[0].at);
                oldest_answer[first] = oldest_answer[first].max(age);
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
    let last_log = consumer.tail(30);
    if !lost.is_empty() {
        let lost: Vec<String> = lost.iter().take(10).map(|s| (*s).clone()).collect();
        let report = post_mortem(
            &lost,
            &produced,
            &st,
            &kills,
            started,
            &names,
            &kafka,
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
    let (k, g, topics) = (kafka.clone(), names.group.clone(), names.consumed_topics());
    let stuck = tokio::task::spawn_blocking(move || k.not_committed_to_end(&g, &topics))
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
