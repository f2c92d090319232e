//! The consumer pipeline against a mock cluster per test.

use std::collections::{BTreeMap, HashSet};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier::model::*;
use courier::service::pipeline::ConsumerSummary;
use courier::testing::{
    courier_command, header, http_get, metric_sum, stop_consumer, wait_for, wait_ready,
    ChildProcess, HttpSink, Reply, ScriptedProcessor, Step, TestKafka,
};

const T: Duration = Duration::from_secs(30);
const PROCESSED: &str = "courier_messages_processed_total";

fn total(
    summary: &ConsumerSummary,
    f: impl Fn(&courier::service::pipeline::PartitionCounts) -> u64,
) -> u64 {
    summary.values().map(f).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_processes_each_once_and_commits_end_offsets() {
    let k = TestKafka::new(4);
    let ids = k.produce_events("h", 200, 50).await;
    let p = ScriptedProcessor::new();
    let (running, shutdown) = k.consumer(p.clone(), &[("DEDUPE_CAPACITY", "50")]).await;
    wait_for("all processed", T, || p.calls() >= 200).await;
    // The dedupe store keeps the 50 newest of the 200 completed ids, nothing more.
    let metrics = running.metrics.clone();
    wait_for("dedupe entries at the capacity", T, || {
        metrics.dedupe_entries.get() == 50
    })
    .await;
    let summary = stop_consumer(running, shutdown, T).await;
    let mut ok = p.ok_ids();
    ok.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(ok, want, "every message processed exactly once");
    assert_eq!(total(&summary, |s| s.ok), 200);
    k.assert_committed_to_end(&k.source);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_twice_then_succeeds_through_retry_1_and_2() {
    let k = TestKafka::new(2);
    let p = ScriptedProcessor::new();
    p.script(
        "r-0",
        vec![Step::Retry("flaky 1"), Step::Retry("flaky 2"), Step::Ok],
    );
    k.produce(
        &k.source,
        vec![(
            Some(b"kk".to_vec()),
            br#"{"id":"r-0","type":"t"}"#.to_vec(),
            vec![
                ("message-id".into(), Some(b"r-0".to_vec())),
                ("trace".into(), Some(b"t1".to_vec())),
            ],
        )],
    )
    .await;
    let (running, shutdown) = k
        .consumer(p.clone(), &[("KAFKA_RETRY_BACKOFF", "400ms,700ms")])
        .await;
    wait_for("third attempt", T, || {
        p.ok_ids().contains(&"r-0".to_string())
    })
    .await;
    let summary = stop_consumer(running, shutdown, T).await;
    let calls = p.calls_for("r-0");
    assert_eq!(calls.len(), 3);
    assert_eq!(calls[0].delivery.topic, k.source);
    assert_eq!(calls[1].delivery.topic, k.retry_topic(1));
    assert_eq!(calls[2].delivery.topic, k.retry_topic(2));
    for (level, call) in calls.iter().enumerate().skip(1) {
        let d = &call.delivery;
        let due: i64 = header(d, HEADER_DUE_AT_MS).unwrap().parse().unwrap();
        assert!(
            call.at_ms >= due,
            "attempt {level} ran at {} before its due time {due}",
            call.at_ms
        );
        assert_eq!(header(d, HEADER_ATTEMPT).unwrap(), level.to_string());
        assert_eq!(header(d, HEADER_ORIGINAL_TOPIC).unwrap(), k.source);
        assert_eq!(header(d, HEADER_ORIGINAL_OFFSET).unwrap(), "0");
        assert_eq!(header(d, HEADER_CONSUMER_GROUP).unwrap(), k.group);
        assert_eq!(header(d, HEADER_ERROR_KIND).unwrap(), "retryable");
        assert_eq!(
            header(d, HEADER_ERROR_MESSAGE).unwrap(),
            format!("flaky {level}")
        );
        assert_eq!(header(d, "trace").unwrap(), "t1");
        assert_eq!(d.key.as_deref(), Some(b"kk".as_slice()));
        assert_eq!(d.payload, calls[0].delivery.payload);
        assert_eq!(
            d.headers
                .iter()
                .filter(|(k, _)| k == HEADER_ATTEMPT)
                .count(),
            1
        );
    }
    let delay2 = header(&calls[2].delivery, HEADER_DUE_AT_MS)
        .unwrap()
        .parse::<i64>()
        .unwrap()
        - header(&calls[2].delivery, HEADER_FAILED_AT_MS)
            .unwrap()
            .parse::<i64>()
            .unwrap();
    assert_eq!(delay2, 700, "level 2 uses the second backoff");
    assert_eq!(total(&summary, |s| s.retried), 2);
    assert_eq!(total(&summary, |s| s.ok), 1);
    assert_eq!(k.end_offsets(&k.dlq), vec![0, 0], "nothing dead-lettered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_failing_reaches_dlq_after_last_level_and_fatal_at_once() {
    let k = TestKafka::new(2);
    let p = ScriptedProcessor::new();
    p.script("always", vec![Step::Retry("still down")]);
    p.script("fatal", vec![Step::Fatal("schema mismatch")]);
    let key = vec![0xff, 0x00, 0x7f];
    let payload = b"\x00not json at all\xff".to_vec();
    let headers = |id: &str| {
        vec![
            ("message-id".into(), Some(id.as_bytes().to_vec())),
            ("user-h".into(), Some(vec![1, 2, 3])),
            ("null-h".into(), None),
        ]
    };
    k.produce(
        &k.source,
        vec![
            (Some(key.clone()), payload.clone(), headers("always")),
            (Some(key.clone()), payload.clone(), headers("fatal")),
        ],
    )
    .await;
    let (running, shutdown) = k
        .consumer(p.clone(), &[("KAFKA_RETRY_BACKOFF", "200ms")])
        .await;
    let dlq = k.read_all(&k.dlq, 2, T);
    let summary = stop_consumer(running, shutdown, T).await;
    assert_eq!(dlq.len(), 2, "{dlq:?}");
    for d in &dlq {
        let id = d.message_id().unwrap();
        let (attempt, kind, msg) = if id == "always" {
            ("4", "exhausted", "still down")
        } else {
            ("1", "fatal", "schema mismatch")
        };
        assert_eq!(header(d, HEADER_ATTEMPT).unwrap(), attempt, "{id}");
        assert_eq!(header(d, HEADER_ERROR_KIND).unwrap(), kind);
        assert_eq!(header(d, HEADER_ERROR_MESSAGE).unwrap(), msg);
        assert_eq!(header(d, HEADER_ORIGINAL_TOPIC).unwrap(), k.source);
        assert!(
            header(d, HEADER_ORIGINAL_PARTITION).is_some()
                && header(d, HEADER_ORIGINAL_OFFSET).is_some()
        );
        assert!(
            header(d, HEADER_ORIGINAL_TIMESTAMP_MS)
                .unwrap()
                .parse::<i64>()
                .unwrap()
                > 0
        );
        assert!(
            header(d, HEADER_FAILED_AT_MS)
                .unwrap()
                .parse::<i64>()
                .unwrap()
                > 0
        );
        assert_eq!(header(d, HEADER_CONSUMER_GROUP).unwrap(), k.group);
        assert!(
            header(d, HEADER_DUE_AT_MS).is_none(),
            "no due time on the DLQ"
        );
        assert_eq!(d.key.as_deref(), Some(key.as_slice()));
        assert_eq!(d.payload.as_deref(), Some(payload.as_slice()));
        let user: Vec<_> = d
            .headers
            .iter()
            .filter(|(k, _)| !k.starts_with("courier-"))
            .cloned()
            .collect();
        assert_eq!(user, headers(id));
    }
    assert_eq!(p.calls_for("always").len(), 4, "source + 3 retry levels");
    assert_eq!(p.calls_for("fatal").len(), 1);
    assert_eq!(total(&summary, |s| s.dead_lettered), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_processed_once_and_missing_ids_counted() {
    let k = TestKafka::new(2);
    let p = ScriptedProcessor::new();
    let body = |id: &str| format!(r#"{{"id":"{id}","type":"t"}}"#).into_bytes();
    k.produce(
        &k.source,
        vec![
            (
                Some(b"a".to_vec()),
                body("d1"),
                vec![("message-id".into(), Some(b"d1".to_vec()))],
            ),
            (
                Some(b"b".to_vec()),
                body("d1"),
                vec![("message-id".into(), Some(b"d1".to_vec()))],
            ),
            (
                Some(b"a".to_vec()),
                body("d1"),
                vec![("message-id".into(), Some(b"d1".to_vec()))],
            ),
            (Some(b"c".to_vec()), body("none"), vec![]),
        ],
    )
    .await;
    let (running, shutdown) = k.consumer(p.clone(), &[]).await;
    let metrics = running.metrics.clone();
    wait_for("all four finished", T, || {
        let text = metrics.render();
        text.contains("courier_messages_without_id_total 1")
            && metric_sum(&text, PROCESSED, &["outcome=\"duplicate\""]) == 2.0
            && metric_sum(&text, PROCESSED, &["outcome=\"ok\""]) == 2.0
    })
    .await;
    let summary = stop_consumer(running, shutdown, T).await;
    assert_eq!(p.calls_for("d1").len(), 1);
    assert_eq!(p.seen.lock().iter().filter(|s| s.id.is_none()).count(), 1);
    assert_eq!(total(&summary, |s| s.duplicates), 2);
    k.assert_committed_to_end(&k.source);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_message_holds_the_commit_point() {
    let k = TestKafka::new(1);
    let p = ScriptedProcessor::new();
    // Offset 3 is held until the test releases it; offsets 0-2 and 4-9 finish at once.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    p.script("s-3", vec![Step::Hold(gate.clone())]);
    k.produce_events("s", 10, 10).await;
    let (running, shutdown) = k
        .consumer(
            p.clone(),
            &[
                ("KAFKA_CONSUMER_WORKERS", "64"),
                ("RDKAFKA_STATISTICS_INTERVAL_MS", "200"),
            ],
        )
        .await;
    let metrics = running.metrics.clone();
    wait_for("every offset but 3 finished", T, || p.ok_ids().len() >= 9).await;
    let lag_series = format!(
        "courier_consumer_lag{{partition=\"0\",topic=\"{}\"}}",
        k.source
    );
    wait_for("the lag gauge from librdkafka statistics", T, || {
        metrics.render().contains(&lag_series)
    })
    .await;
    wait_for("the commit point at the slow offset 3", T, || {
        k.committed(&k.source) == vec![3]
    })
    .await;
    // It stays there through ten commit intervals (100 ms) while offsets 4-9 are finished.
    let mut held = Vec::new();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        held.push(k.committed(&k.source)[0]);
    }
    assert!(
        !p.ok_ids().contains(&"s-3".to_string()),
        "the slow message is still in flight"
    );
    assert_eq!(held, vec![3; 10], "the commit point holds at offset 3");
    gate.close();
    wait_for("the commit point past the released message", T, || {
        k.committed(&k.source) == vec![10]
    })
    .await;
    stop_consumer(running, shutdown, T).await;
    assert_eq!(k.committed(&k.source), vec![10]);
}

/// An endpoint for the `http` processor that records the `message-id` of every request it
/// answers 200 at once, and never answers the request for `hold`.
async fn recording_endpoint(hold: &'static str) -> (String, Arc<HttpSink>) {
    let script = move |id: &str, _| {
        if id == hold {
            Reply::Hang
        } else {
            Reply::Status(200)
        }
    };
    HttpSink::new(script, Duration::ZERO)
        .record_on_answer()
        .start()
        .await
}

/// Produces `n` events to `partition`: ids `{prefix}{partition}-{i}`, keyed by id.
async fn produce_to_partition(
    k: &TestKafka,
    prefix: &str,
    partition: i32,
    n: usize,
) -> Vec<String> {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}{partition}-{i}")).collect();
    let msgs = ids
        .iter()
        .map(|id| {
            (
                Some(id.clone().into_bytes()),
                format!(r#"{{"id":"{id}","type":"t"}}"#).into_bytes(),
                vec![("message-id".into(), Some(id.clone().into_bytes()))],
            )
        })
        .collect();
    k.produce_to(&k.source, Some(partition), msgs).await;
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_the_finished_but_uncommitted_messages_are_processed_again() {
    let k = TestKafka::new(2);
    // Partition 1 is processed and committed to its end first. Then partition 0, whose
    // first message the endpoint never answers: that partition's commit point stays at
    // offset 0 while the messages behind it (in other key lanes) finish.
    let p1 = produce_to_partition(&k, "c", 1, 20).await;
    let (url, answered) = recording_endpoint("c0-0").await;
    let mut child = ChildProcess::spawn(
        courier_command(["consumer"])
            .envs(k.env(&[
                ("COURIER_PROCESSOR", "http"),
                ("PROCESSOR_HTTP_URL", &url),
                ("PROCESSOR_HTTP_TIMEOUT_MS", "120000"),
                ("KAFKA_CONSUMER_WORKERS", "8"),
            ]))
            .stderr(Stdio::null()),
    );
    let finished_in = |ids: &[String]| -> Vec<String> {
        let done = answered.ok_ids();
        ids.iter().filter(|i| done.contains(*i)).cloned().collect()
    };
    wait_for("partition 1 processed and committed", T, || {
        finished_in(&p1).len() == p1.len() && k.committed(&k.source)[1] == 20
    })
    .await;
    let p0 = produce_to_partition(&k, "c", 0, 20).await;
    wait_for(
        "messages behind partition 0's held first one finished",
        T,
        || finished_in(&p0).len() >= 5 && k.committed(&k.source) == vec![0, 20],
    )
    .await;
    let status = child.kill_9();
    assert!(!status.success(), "killed: {status:?}");
    // The dead process commits nothing more; what it finished on partition 0 is uncommitted.
    assert_eq!(k.committed(&k.source), vec![0, 20]);
    let finished_uncommitted = finished_in(&p0);
    assert!(!finished_uncommitted.contains(&p0[0]));
    assert!(finished_uncommitted.len() >= 5, "{finished_uncommitted:?}");

    let second = ScriptedProcessor::new();
    let (running, shutdown) = k.consumer(second.clone(), &[]).await;
    wait_for("partition 0 processed by the new consumer", T, || {
        second.ok_ids().len() >= p0.len()
    })
    .await;
    let summary = stop_consumer(running, shutdown, T).await;
    let mut again = second.ok_ids();
    again.sort();
    let mut want = p0.clone();
    want.sort();
    assert_eq!(
        again, want,
        "exactly the uncommitted partition is processed again, each message once"
    );
    let missing: Vec<&String> = finished_uncommitted
        .iter()
        .filter(|id| !again.contains(id))
        .collect();
    assert!(
        missing.is_empty(),
        "finished but uncommitted at the kill, yet not processed again: {missing:?}"
    );
    assert_eq!(total(&summary, |s| s.ok), p0.len() as u64);
    k.assert_committed_to_end(&k.source);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_retry_publish_holds_the_commit_point_until_acknowledged() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let k = TestKafka::new(1);
    let p = ScriptedProcessor::new();
    // Offset 3 fails retryably: it must be published to retry-1 before it is finished.
    p.script("p-3", vec![Step::Retry("flaky"), Step::Ok]);
    k.produce_events("p", 6, 6).await;
    // From now on every Produce request fails, until the test clears the errors.
    k.broker.cluster().request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 1000],
    );
    let (running, shutdown) = k
        .consumer(p.clone(), &[("KAFKA_PRODUCER_IDEMPOTENT", "false")])
        .await;
    let metrics = running.metrics.clone();
    let failures = || {
        metric_sum(
            &metrics.render(),
            "courier_publish_failures_total",
            &[
                "reason=\"unauthorized\"",
                &format!("topic=\"{}\"", k.retry_topic(1)),
            ],
        )
    };
    wait_for("the retry publish failing", T, || failures() >= 2.0).await;
    wait_for("the commit point at the failing message", T, || {
        k.committed(&k.source) == vec![3]
    })
    .await;
    // Sampled while the publish keeps failing: at least two more failures.
    let (first, deadline) = (failures(), Instant::now() + T);
    let mut held = Vec::new();
    while failures() < first + 2.0 {
        assert!(Instant::now() < deadline, "the publish stopped failing");
        held.push(k.committed(&k.source)[0]);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !held.is_empty() && held.iter().all(|c| *c == 3),
        "the commit point holds at the unpublished message: {held:?}"
    );
    assert_eq!(
        k.end_offsets(&k.retry_topic(1)),
        vec![0],
        "not published yet"
    );
    k.broker
        .cluster()
        .clear_request_errors(RDKafkaApiKey::Produce);
    wait_for("the commit point past the acknowledged publish", T, || {
        k.committed(&k.source) == vec![6]
    })
    .await;
    wait_for("the retry processed", T, || {
        p.ok_ids().contains(&"p-3".to_string())
    })
    .await;
    let summary = stop_consumer(running, shutdown, T).await;
    let calls = p.calls_for("p-3");
    assert_eq!(calls.len(), 2, "once from the source, once from retry-1");
    assert_eq!(calls[1].delivery.topic, k.retry_topic(1));
    assert_eq!(total(&summary, |s| s.retried), 1);
    assert_eq!(k.end_offsets(&k.retry_topic(1)), vec![1], "published once");
    k.assert_committed_to_end(&k.retry_topic(1));
    assert_eq!(k.end_offsets(&k.dlq), vec![0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_bounds_in_flight() {
    let k = TestKafka::new(3);
    k.produce_events("b", 500, 500).await;
    let p = ScriptedProcessor::with_sleep(Duration::from_millis(20));
    let (running, shutdown) = k
        .consumer(
            p.clone(),
            &[
                ("KAFKA_CONSUMER_MAX_IN_FLIGHT", "10"),
                ("KAFKA_CONSUMER_PAUSE_AFTER_MS", "200"),
                ("KAFKA_CONSUMER_WORKERS", "64"),
            ],
        )
        .await;
    let metrics = running.metrics.clone();
    let mut max_seen = 0;
    let mut paused_seen = false;
    let deadline = Instant::now() + T;
    while p.calls() < 500 {
        assert!(
            Instant::now() < deadline,
            "only {} of 500 processed within {T:?}",
            p.calls()
        );
        max_seen = max_seen.max(metrics.in_flight.get());
        paused_seen |= metrics.paused_partitions.get() > 0;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    stop_consumer(running, shutdown, T).await;
    assert!(max_seen <= 10, "in flight reached {max_seen}");
    assert!(p.max_concurrent.load(Ordering::SeqCst) <= 10);
    assert!(
        paused_seen,
        "fetching paused after the bound held for the grace period"
    );
    assert_eq!(p.ok_ids().len(), 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_groups_share_one_retry_chain() {
    let k = TestKafka::new(1);
    let pa = ScriptedProcessor::new();
    let pb = ScriptedProcessor::new();
    pa.script("g-0", vec![Step::Retry("a fails once"), Step::Ok]);
    pb.script("g-0", vec![Step::Retry("b fails once"), Step::Ok]);
    k.produce_events("g", 1, 1).await;
    let (ra, sa) = k
        .consumer(pa.clone(), &[("KAFKA_CONSUMER_GROUP_ID", "group-a")])
        .await;
    let (rb, sb) = k
        .consumer(pb.clone(), &[("KAFKA_CONSUMER_GROUP_ID", "group-b")])
        .await;
    let (ma, mb) = (ra.metrics.clone(), rb.metrics.clone());
    let skipped = |m: &courier::observability::Metrics| {
        metric_sum(&m.render(), PROCESSED, &["outcome=\"skipped\""])
    };
    wait_for(
        "both groups succeeded and skipped the other's retry",
        T,
        || {
            pa.ok_ids().len() == 1
                && pb.ok_ids().len() == 1
                && skipped(&ma) == 1.0
                && skipped(&mb) == 1.0
        },
    )
    .await;
    let (suma, sumb) = (
        stop_consumer(ra, sa, T).await,
        stop_consumer(rb, sb, T).await,
    );
    for (p, group) in [(&pa, "group-a"), (&pb, "group-b")] {
        let calls = p.calls_for("g-0");
        assert_eq!(calls.len(), 2, "{group}: source + its own retry only");
        assert_eq!(
            header(&calls[1].delivery, HEADER_CONSUMER_GROUP).unwrap(),
            group
        );
    }
    assert_eq!(
        total(&suma, |s| s.skipped),
        1,
        "group-a skipped group-b's retry"
    );
    assert_eq!(total(&sumb, |s| s.skipped), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_order_on_a_source_partition() {
    let k = TestKafka::new(1);
    k.produce_events("o", 200, 5).await;
    let p = ScriptedProcessor::with_sleep(Duration::from_millis(1));
    let (running, shutdown) = k
        .consumer(p.clone(), &[("KAFKA_CONSUMER_WORKERS", "16")])
        .await;
    wait_for("all processed", T, || p.calls() >= 200).await;
    stop_consumer(running, shutdown, T).await;
    let mut per_key: BTreeMap<Vec<u8>, Vec<i64>> = BTreeMap::new();
    for s in p.seen.lock().iter() {
        per_key
            .entry(s.delivery.key.clone().unwrap())
            .or_default()
            .push(s.delivery.offset);
    }
    assert_eq!(per_key.len(), 5);
    for (key, offsets) in per_key {
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "key {:?} out of order: {offsets:?}",
            String::from_utf8_lossy(&key)
        );
    }
    assert!(
        p.max_concurrent.load(Ordering::SeqCst) > 1,
        "keys ran in parallel"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_the_group() {
    let k = TestKafka::new(1);
    let p = ScriptedProcessor::new();
    let (running, shutdown) = k.consumer(p.clone(), &[]).await;
    let url = format!("http://{}/readyz", running.ops_addr);
    let (status, body) = http_get(&url).await;
    assert_eq!(status, 503, "not ready before joining the group");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(body["reason"].is_string());
    wait_ready(&url, T).await;
    stop_consumer(running, shutdown, T).await;
}

/// A local HTTP endpoint for the `http` processor: answers 200 after `delay`, recording the
/// `message-id` of each request when it is answered.
async fn slow_endpoint(delay: Duration) -> (String, Arc<HttpSink>) {
    HttpSink::new(|_: &str, _| Reply::Status(200), delay)
        .record_on_answer()
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_commits_and_exits_0() {
    let k = TestKafka::new(2);
    let ids = k.produce_events("t", 20, 20).await;
    let (url, seen) = slow_endpoint(Duration::from_millis(300)).await;
    let mut child = ChildProcess::spawn(
        courier_command(["consumer"])
            .envs(k.env(&[
                ("COURIER_PROCESSOR", "http"),
                ("PROCESSOR_HTTP_URL", &url),
                ("KAFKA_CONSUMER_WORKERS", "4"),
            ]))
            .stderr(Stdio::null()),
    );
    wait_for("processing started", T, || !seen.ok_ids().is_empty()).await;
    let before = seen.ok_ids().len();
    child.signal("TERM");
    let status = child.wait(T).await;
    assert!(status.success(), "exit 0 after SIGTERM: {status:?}");
    let done: HashSet<String> = seen.ok_ids().into_iter().collect();
    assert!(
        done.len() > before,
        "in-flight work finished after the signal"
    );
    let committed: i64 = k.committed(&k.source).iter().map(|c| (*c).max(0)).sum();
    assert_eq!(
        committed as usize,
        done.len(),
        "exactly the finished messages are committed"
    );
    assert!(ids.iter().filter(|i| done.contains(*i)).count() == done.len());
}
