//! `courier dlq inspect|replay` against a mock cluster per test.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use courier::app::dlq::{inspect, replay, FilterFlags, InspectOptions, ReplayOptions};
use courier::config::Config;
use courier::model::*;
use courier::service::dlq::{InspectReport, ReplayReport};
use courier::testing::{
    header, rand_id, stop_consumer, wait_for, ScriptedProcessor, Step, TestKafka, TestMessage,
};
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(30);

/// The user part of a test message: a binary key, a binary payload and user headers
/// (one of them null), so "byte for byte" is checked on awkward bytes.
fn original(id: &str) -> Delivery {
    Delivery {
        topic: String::new(),
        partition: 0,
        offset: 5,
        key: Some(format!("k-{id}\u{0}\u{ff}").into_bytes()),
        payload: Some([b"\x00\xfe".as_slice(), id.as_bytes()].concat()),
        headers: vec![
            (HEADER_MESSAGE_ID.into(), Some(id.as_bytes().to_vec())),
            ("trace".into(), Some(vec![0, 1, 2, 255])),
            ("null-h".into(), None),
        ],
        timestamp_ms: Some(now_ms() - 60_000),
    }
}

/// A DLQ message as the consumer writes it (via `failure_record`), from `topic`.
fn dead(id: &str, topic: Option<&str>, kind: ErrorKind, failed_at_ms: i64) -> TestMessage {
    let mut d = original(id);
    d.topic = topic.unwrap_or("gone").to_owned();
    let hop = FailureHop {
        topic: "dlq",
        attempt: if kind == ErrorKind::Exhausted { 4 } else { 1 },
        due_at_ms: None,
        group: "some-group",
        kind,
        message: "it broke",
        failed_at_ms,
    };
    let mut rec = failure_record(&d, &hop);
    if topic.is_none() {
        rec.headers.retain(|(k, _)| k != HEADER_ORIGINAL_TOPIC);
    }
    (rec.key, rec.payload.unwrap_or_default(), rec.headers)
}

fn fatal_batch(k: &TestKafka, prefix: &str, n: usize) -> Vec<TestMessage> {
    (0..n)
        .map(|i| {
            dead(
                &format!("{prefix}-{i}"),
                Some(&k.source),
                ErrorKind::Fatal,
                now_ms(),
            )
        })
        .collect()
}

fn filter(kinds: &[&str], since: Option<&str>, ids: &[&str]) -> FilterFlags {
    FilterFlags {
        error_kind: kinds.iter().map(|s| s.to_string()).collect(),
        since: since.map(str::to_owned),
        id: ids.iter().map(|s| s.to_string()).collect(),
    }
}

async fn run_inspect(config: &Config, opts: InspectOptions) -> (InspectReport, String) {
    let mut out = Vec::new();
    let report = tokio::time::timeout(T, inspect(config, &opts, &mut out))
        .await
        .expect("inspect finishes in time")
        .expect("inspect succeeds");
    (report, String::from_utf8(out).expect("UTF-8 output"))
}

async fn run_replay(
    config: &Config,
    opts: &ReplayOptions,
    shutdown: CancellationToken,
) -> (ReplayReport, String) {
    let mut out = Vec::new();
    let report = tokio::time::timeout(T, replay(config, opts, shutdown, &mut out))
        .await
        .expect("replay finishes in time")
        .expect("replay succeeds");
    (report, String::from_utf8(out).expect("UTF-8 output"))
}

fn ids(entries: &[courier::service::dlq::DlqEntry]) -> Vec<String> {
    let mut v: Vec<String> = entries.iter().filter_map(|e| e.id.clone()).collect();
    v.sort();
    v
}

fn sorted_ids(ds: &[Delivery]) -> Vec<String> {
    let mut v: Vec<String> = ds
        .iter()
        .filter_map(|d| d.message_id().map(str::to_owned))
        .collect();
    v.sort();
    v
}

fn total_end(k: &TestKafka, topic: &str) -> i64 {
    k.end_offsets(topic).iter().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_lists_filters_and_summarises() {
    let k = TestKafka::new(2);
    let now = now_ms();
    let other = format!("other-{}", rand_id());
    k.produce(
        &k.dlq,
        vec![
            dead("new-fatal", Some(&k.source), ErrorKind::Fatal, now - 10_000),
            dead(
                "old-exhausted",
                Some(&k.source),
                ErrorKind::Exhausted,
                now - 7_200_000,
            ),
            dead("other-fatal", Some(&other), ErrorKind::Fatal, now - 60_000),
            dead("no-topic", None, ErrorKind::Fatal, now - 86_400_000 * 3),
        ],
    )
    .await;
    let config = k.config(&[]);
    let (all, text) = run_inspect(&config, InspectOptions::default()).await;
    assert_eq!(
        ids(&all.entries),
        vec!["new-fatal", "no-topic", "old-exhausted", "other-fatal"]
    );
    assert_eq!((all.summary.scanned, all.summary.matched), (4, 4));
    assert_eq!(all.summary.by_error_kind["fatal"], 3);
    assert_eq!(all.summary.by_error_kind["exhausted"], 1);
    assert_eq!(all.summary.by_original_topic[&k.source], 2);
    assert_eq!(all.summary.by_original_topic[&other], 1);
    assert_eq!(all.summary.by_original_topic["(unknown)"], 1);
    assert!(text.starts_with("ID "), "{text}");
    assert!(
        text.contains("new-fatal") && text.contains("it broke"),
        "{text}"
    );
    assert!(text.contains("4 of 4 messages"), "{text}");
    let old = all
        .entries
        .iter()
        .find(|e| e.id.as_deref() == Some("old-exhausted"))
        .unwrap();
    assert_eq!(old.attempts, Some(4));
    assert_eq!(old.original_topic.as_deref(), Some(k.source.as_str()));
    assert!(old.age_ms(all.now_ms).unwrap() >= 7_200_000);

    let by = |f: FilterFlags| InspectOptions {
        filter: f,
        ..Default::default()
    };
    let (fatal, _) = run_inspect(&config, by(filter(&["fatal"], None, &[]))).await;
    assert_eq!(
        ids(&fatal.entries),
        vec!["new-fatal", "no-topic", "other-fatal"]
    );
    let (recent, _) = run_inspect(&config, by(filter(&[], Some("1h"), &[]))).await;
    assert_eq!(ids(&recent.entries), vec!["new-fatal", "other-fatal"]);
    let stamp = time::OffsetDateTime::from_unix_timestamp((now - 4 * 3_600_000) / 1000)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let (since_ts, _) = run_inspect(&config, by(filter(&[], Some(&stamp), &[]))).await;
    assert_eq!(
        ids(&since_ts.entries),
        vec!["new-fatal", "old-exhausted", "other-fatal"]
    );
    let (by_id, _) = run_inspect(
        &config,
        by(filter(&[], None, &["no-topic", "old-exhausted"])),
    )
    .await;
    assert_eq!(ids(&by_id.entries), vec!["no-topic", "old-exhausted"]);
    let (combined, _) = run_inspect(
        &config,
        by(filter(
            &["fatal"],
            Some("1h"),
            &["old-exhausted", "other-fatal"],
        )),
    )
    .await;
    assert_eq!(ids(&combined.entries), vec!["other-fatal"]);
    assert_eq!(combined.summary.scanned, 4);

    let limited = InspectOptions {
        limit: Some(1),
        json: true,
        ..Default::default()
    };
    let (report, json) = run_inspect(&config, limited).await;
    assert_eq!(report.entries.len(), 1);
    let doc: serde_json::Value = serde_json::from_str(&json).expect("--json is one JSON document");
    assert_eq!(doc["entries"].as_array().unwrap().len(), 1);
    assert_eq!(
        doc["summary"]["matched"], 4,
        "the summary counts past the limit"
    );
    assert_eq!(doc["summary"]["listed"], 1);
    assert_eq!(doc["summary"]["by_error_kind"]["fatal"], 3);
    assert_eq!(doc["summary"]["by_original_topic"][&k.source], 2);
    let e = &doc["entries"][0];
    assert!(
        e["id"].is_string() && e["dlq_offset"].is_i64() && e["age_ms"].is_i64(),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_commits_nothing_and_rejects_bad_flags() {
    let k = TestKafka::new(2);
    k.produce(&k.dlq, fatal_batch(&k, "n", 6)).await;
    let config = k.config(&[]);
    let (first, _) = run_inspect(&config, InspectOptions::default()).await;
    let (second, _) = run_inspect(&config, InspectOptions::default()).await;
    assert_eq!(first.summary.scanned, 6);
    assert_eq!(second.summary.scanned, 6, "a second look sees the same");
    // The mock cluster has no ListGroups, so "no group at all" cannot be listed; inspect's
    // own group id is random and never committed to. Neither the service's group nor the
    // replay group has offsets, and a later group reads everything.
    assert_eq!(k.committed_of(&k.group, &k.dlq), vec![-1001, -1001]);
    let replay_group = courier::service::dlq::replay_group(&k.group, true, &Default::default());
    assert_eq!(k.committed_of(&replay_group, &k.dlq), vec![-1001, -1001]);
    assert_eq!(
        k.read_all(&k.dlq, 6, T).len(),
        6,
        "a later group reads everything"
    );

    let bad = InspectOptions {
        filter: filter(&["fatl"], None, &[]),
        ..Default::default()
    };
    let err = inspect(&config, &bad, &mut Vec::new()).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "--error-kind=fatl: expected retryable, fatal or exhausted"
    );
    let bad = InspectOptions {
        filter: filter(&[], Some("last week"), &[]),
        ..Default::default()
    };
    let err = inspect(&config, &bad, &mut Vec::new()).await.unwrap_err();
    assert!(
        err.to_string()
            .starts_with("--since=last week: expected a duration"),
        "{err}"
    );
    let missing = k.config(&[("KAFKA_DLQ_TOPIC", "no-such-dlq")]);
    let err = inspect(&missing, &InspectOptions::default(), &mut Vec::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no-such-dlq"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_publishes_byte_for_byte_with_courier_headers_reset() {
    let k = TestKafka::new(2);
    let now = now_ms();
    k.produce(
        &k.dlq,
        vec![
            dead("f-1", Some(&k.source), ErrorKind::Fatal, now),
            dead("f-2", Some(&k.source), ErrorKind::Fatal, now),
            dead("x-1", Some(&k.source), ErrorKind::Exhausted, now),
            dead("f-none", None, ErrorKind::Fatal, now),
        ],
    )
    .await;
    let config = k.config(&[]);
    let opts = ReplayOptions {
        filter: filter(&["fatal"], None, &[]),
        ..Default::default()
    };
    let before = now_ms();
    let (report, text) = run_replay(&config, &opts, CancellationToken::new()).await;
    let after = now_ms();
    assert_eq!(
        (report.replayed, report.skipped, report.unreplayable),
        (2, 1, 1),
        "{text}"
    );
    assert_eq!(report.per_topic, BTreeMap::from([(k.source.clone(), 2)]));
    assert!(
        text.contains("replayed: 2")
            && text.contains("unreplayable (no courier-original-topic): 1"),
        "{text}"
    );
    let got = k.read_all(&k.source, 2, T);
    assert_eq!(sorted_ids(&got), vec!["f-1", "f-2"]);
    for d in &got {
        let want = original(d.message_id().unwrap());
        assert_eq!(d.key, want.key);
        assert_eq!(d.payload, want.payload);
        let (user, courier): (Vec<_>, Vec<_>) = d
            .headers
            .iter()
            .cloned()
            .partition(|(k, _)| !k.starts_with("courier-"));
        assert_eq!(user, want.headers, "user headers byte for byte, in order");
        assert_eq!(courier.len(), 1, "only the replay marker: {courier:?}");
        let at: i64 = header(d, HEADER_REPLAYED_AT_MS).unwrap().parse().unwrap();
        assert!((before..=after).contains(&at));
    }
    let group = format!(
        "{}-dlq-replay-{}",
        k.group,
        courier::service::dlq::selection_fingerprint(false, &opts.filter.args())
    );
    assert_eq!(k.committed_of(&group, &k.dlq), k.end_offsets(&k.dlq));
    let (again, _) = run_replay(&config, &opts, CancellationToken::new()).await;
    assert_eq!(
        (again.scanned, again.replayed),
        (0, 0),
        "the same command resumes at the end"
    );
    let (other, _) = run_replay(
        &config,
        &ReplayOptions {
            filter: filter(&[], None, &["x-1"]),
            ..Default::default()
        },
        CancellationToken::new(),
    )
    .await;
    assert_eq!(
        (other.scanned, other.replayed),
        (4, 1),
        "a different filter starts afresh"
    );
    let err = replay(
        &config,
        &ReplayOptions::default(),
        CancellationToken::new(),
        &mut Vec::new(),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("replay needs --all, or a filter"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_lists_and_publishes_nothing() {
    let k = TestKafka::new(2);
    k.produce(&k.dlq, fatal_batch(&k, "d", 3)).await;
    let config = k.config(&[]);
    let dry = ReplayOptions {
        all: true,
        dry_run: true,
        ..Default::default()
    };
    let (report, text) = run_replay(&config, &dry, CancellationToken::new()).await;
    assert!(report.dry_run);
    assert_eq!(report.replayed, 3);
    for i in 0..3 {
        assert!(text.contains(&format!("d-{i}")), "{text}");
    }
    assert!(text.contains("would replay: 3"), "{text}");
    assert_eq!(total_end(&k, &k.source), 0, "nothing published");
    let real = ReplayOptions {
        all: true,
        ..Default::default()
    };
    let (done, _) = run_replay(&config, &real, CancellationToken::new()).await;
    assert_eq!(
        done.replayed, 3,
        "the dry run committed nothing for the same group"
    );
    // The real replay's publishes are acknowledged; anything the dry run had sent would be
    // on the topic by now too.
    assert_eq!(
        total_end(&k, &k.source),
        3,
        "only the real replay published"
    );
    assert_eq!(
        sorted_ids(&k.read_all(&k.source, 3, T)),
        vec!["d-0", "d-1", "d-2"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_is_honoured() {
    let k = TestKafka::new(1);
    let n = 31;
    k.produce(&k.dlq, fatal_batch(&k, "r", n)).await;
    let config = k.config(&[]);
    let rate = 20.0;
    let opts = ReplayOptions {
        all: true,
        rate: Some(rate),
        ..Default::default()
    };
    let (report, _) = run_replay(&config, &opts, CancellationToken::new()).await;
    assert_eq!(report.replayed, n as u64);
    // When each replayed record was produced (its CreateTime, set by the replay's client),
    // in the order of the DLQ (one partition, so one order).
    let replayed = k.read_all(&k.source, n, T);
    assert_eq!(replayed.len(), n);
    let at: Vec<i64> = replayed
        .iter()
        .map(|d| d.timestamp_ms.expect("a CreateTime") - replayed[0].timestamp_ms.unwrap())
        .collect();
    // Never faster than the rate: the i-th publish is not sent before i / rate after the
    // first (2 ms for the timestamps' resolution). The pacer keeps to that schedule, so a
    // slow start (the first acknowledgement and commit take up to a second here) is made
    // up for later.
    let interval_ms = 1000.0 / rate;
    let early: Vec<(usize, i64)> = at
        .iter()
        .enumerate()
        .filter(|(i, t)| (**t as f64) < *i as f64 * interval_ms - 2.0)
        .map(|(i, t)| (i, *t))
        .collect();
    assert!(
        early.is_empty(),
        "sent before their time: {early:?} of {at:?}"
    );
    // Not much slower either: the whole replay spans (n - 1) / rate, within a tolerance.
    let due_ms = (n - 1) as f64 * interval_ms;
    let tolerance_ms = 400.0;
    let span_ms = at[n - 1] as f64;
    println!(
        "replay rate: asked {rate}/s, measured {:.1}/s ({n} publishes over {span_ms} ms)",
        (n - 1) as f64 * 1000.0 / span_ms
    );
    assert!(
        span_ms <= due_ms + tolerance_ms,
        "{n} publishes at {rate}/s took {span_ms} ms, more than {due_ms} + {tolerance_ms} ms: {at:?}"
    );
    let bad = ReplayOptions {
        rate: Some(0.0),
        ..opts
    };
    let err = replay(&config, &bad, CancellationToken::new(), &mut Vec::new())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("--rate=0: expected a positive number"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_replay_resumes_and_replays_each_message_once() {
    let k = TestKafka::new(2);
    k.produce(&k.dlq, fatal_batch(&k, "i", 12)).await;
    let config = k.config(&[]);
    let opts = ReplayOptions {
        filter: filter(&["fatal"], None, &[]),
        rate: Some(8.0),
        ..Default::default()
    };
    let token = CancellationToken::new();
    let (kafka, source, cancel) = (k.kafka(), k.source.clone(), token.clone());
    let watcher = std::thread::spawn(move || {
        let published = || -> i64 { kafka.try_end_offsets(&source).map_or(0, |e| e.iter().sum()) };
        let deadline = Instant::now() + T;
        while published() < 3 {
            if Instant::now() >= deadline {
                cancel.cancel();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        cancel.cancel();
        true
    });
    let (first, text) = run_replay(&config, &opts, token).await;
    assert!(
        watcher.join().unwrap(),
        "three replays published within {T:?}"
    );
    assert!(first.interrupted, "{text}");
    assert!(
        text.contains("run the same command again to resume"),
        "{text}"
    );
    assert!((3..12).contains(&first.replayed), "{first:?}");
    let (second, _) = run_replay(&config, &opts, CancellationToken::new()).await;
    assert!(!second.interrupted);
    assert_eq!(first.replayed + second.replayed, 12);
    let got = k.read_all(&k.source, 12, T);
    let want: Vec<String> = {
        let mut v: Vec<String> = (0..12).map(|i| format!("i-{i}")).collect();
        v.sort();
        v
    };
    assert_eq!(sorted_ids(&got), want, "every message exactly once");
}

fn event(id: &str) -> TestMessage {
    (
        Some(b"same-key".to_vec()),
        format!(r#"{{"id":"{id}","type":"t"}}"#).into_bytes(),
        vec![(HEADER_MESSAGE_ID.into(), Some(id.as_bytes().to_vec()))],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_message_is_replayed_and_then_processed() {
    let k = TestKafka::new(2);
    let p = ScriptedProcessor::new();
    p.script("e2e", vec![Step::Fatal("bad schema"), Step::Ok]);
    let (running, shutdown) = k.consumer(p.clone(), &[]).await;
    k.produce(&k.source, vec![event("e2e")]).await;
    let dlq = k.read_all(&k.dlq, 1, T);
    assert_eq!(header(&dlq[0], HEADER_ERROR_KIND).as_deref(), Some("fatal"));
    let opts = ReplayOptions {
        filter: filter(&["fatal"], None, &["e2e"]),
        ..Default::default()
    };
    let (report, _) = run_replay(&k.config(&[]), &opts, CancellationToken::new()).await;
    assert_eq!(report.replayed, 1);
    wait_for("the replayed message processed", T, || {
        p.ok_ids().contains(&"e2e".to_string())
    })
    .await;
    let summary = stop_consumer(running, shutdown, T).await;
    let calls = p.calls_for("e2e");
    assert_eq!(calls.len(), 2);
    let replayed = &calls[1].delivery;
    assert_eq!(replayed.topic, k.source);
    assert!(header(replayed, HEADER_REPLAYED_AT_MS).is_some());
    assert!(
        header(replayed, HEADER_ATTEMPT).is_none() && header(replayed, HEADER_ERROR_KIND).is_none()
    );
    assert_eq!(replayed.payload, calls[0].delivery.payload);
    assert_eq!(summary.values().map(|s| s.ok).sum::<u64>(), 1);
    assert_eq!(summary.values().map(|s| s.dead_lettered).sum::<u64>(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_passes_dedupe_once_and_its_copy_is_a_duplicate() {
    let k = TestKafka::new(2);
    let p = ScriptedProcessor::new();
    let (running, shutdown) = k.consumer(p.clone(), &[]).await;
    k.produce(&k.source, vec![event("done-1")]).await;
    wait_for("the first processing", T, || p.ok_ids().len() == 1).await;
    // The same message sits in the DLQ too (e.g. dead-lettered by an earlier run).
    let first = p.calls_for("done-1")[0].delivery.clone();
    let hop = FailureHop {
        topic: &k.dlq,
        attempt: 1,
        due_at_ms: None,
        group: &k.group,
        kind: ErrorKind::Fatal,
        message: "downstream said no",
        failed_at_ms: now_ms(),
    };
    let rec = failure_record(&first, &hop);
    k.produce(&k.dlq, vec![(rec.key, rec.payload.unwrap(), rec.headers)])
        .await;
    let opts = ReplayOptions {
        filter: filter(&[], None, &["done-1"]),
        ..Default::default()
    };
    let (report, _) = run_replay(&k.config(&[]), &opts, CancellationToken::new()).await;
    assert_eq!(report.replayed, 1);
    wait_for("the replay processed once more", T, || {
        p.ok_ids().len() == 2
    })
    .await;
    let copy = k
        .read_all(&k.source, 2, T)
        .into_iter()
        .find(|d| header(d, HEADER_REPLAYED_AT_MS).is_some())
        .expect("the replayed record");
    k.produce(
        &k.source,
        vec![(copy.key, copy.payload.unwrap(), copy.headers)],
    )
    .await;
    let metrics = running.metrics.clone();
    wait_for("the copy skipped as a duplicate", T, || {
        metrics
            .render()
            .lines()
            .any(|l| l.contains("outcome=\"duplicate\"") && l.ends_with(" 1"))
    })
    .await;
    let summary = stop_consumer(running, shutdown, T).await;
    assert_eq!(
        p.calls_for("done-1").len(),
        2,
        "processed twice: once, then the replay"
    );
    assert_eq!(summary.values().map(|s| s.duplicates).sum::<u64>(), 1);
}
