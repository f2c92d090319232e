//! The DLQ decisions without a broker: entries, filters, the inspect counts and the replay
//! loop over a scripted reader, a mock publisher and a mock progress store.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::model::{
    failure_record, Ack, Delivery, ErrorKind, FailureHop, OutgoingRecord, HEADER_ATTEMPT,
    HEADER_ORIGINAL_TOPIC, HEADER_REPLAYED_AT_MS,
};
use crate::service::publish::{MockPublisher, PublishError, PublishFailure};

const NOW: i64 = 1_700_000_000_000;

fn source(id: &str) -> Delivery {
    Delivery {
        topic: "events".into(),
        partition: 2,
        offset: 41,
        key: Some(vec![0xff, 0, 1]),
        payload: Some(b"\x00payload\xff".to_vec()),
        headers: vec![
            ("message-id".into(), Some(id.as_bytes().to_vec())),
            ("trace".into(), Some(vec![1, 2, 3])),
            ("null-h".into(), None),
        ],
        timestamp_ms: Some(NOW - 10_000),
    }
}

/// A DLQ message as the consumer writes it, at DLQ position `partition@offset`.
fn dead(id: &str, kind: ErrorKind, failed_at_ms: i64, partition: i32, offset: i64) -> Delivery {
    let rec = failure_record(
        &source(id),
        &FailureHop {
            topic: "events-dlq",
            attempt: 4,
            due_at_ms: None,
            group: "g",
            kind,
            message: "boom",
            failed_at_ms,
        },
    );
    Delivery {
        topic: "events-dlq".into(),
        partition,
        offset,
        key: rec.key,
        payload: rec.payload,
        headers: rec.headers,
        timestamp_ms: Some(failed_at_ms),
    }
}

fn args(kinds: &[&str], since: Option<&str>, ids: &[&str]) -> FilterArgs {
    FilterArgs {
        error_kinds: kinds.iter().map(|s| s.to_string()).collect(),
        since: since.map(str::to_owned),
        ids: ids.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn entry_reads_courier_headers() {
    let e = DlqEntry::from_delivery(&dead("a", ErrorKind::Exhausted, NOW - 5_000, 1, 7));
    assert_eq!(e.id.as_deref(), Some("a"));
    assert_eq!((e.dlq_partition, e.dlq_offset), (1, 7));
    assert_eq!(e.original_topic.as_deref(), Some("events"));
    assert_eq!(
        (e.original_partition, e.original_offset),
        (Some(2), Some(41))
    );
    assert_eq!(e.attempts, Some(4));
    assert_eq!(e.error_kind, Some(ErrorKind::Exhausted));
    assert_eq!(e.error_message.as_deref(), Some("boom"));
    assert_eq!(e.consumer_group.as_deref(), Some("g"));
    assert_eq!(e.age_ms(NOW), Some(5_000));
    assert_eq!(e.original_label(), "events/2@41");
    assert!(e.malformed.is_empty());
    let json = e.to_json(NOW);
    assert_eq!(json["error_kind"], "exhausted");
    assert_eq!(json["age_ms"], 5_000);
}

#[test]
fn entry_is_lenient_with_malformed_headers() {
    let mut d = dead("a", ErrorKind::Fatal, NOW, 0, 0);
    for (k, v) in &mut d.headers {
        if k == HEADER_ATTEMPT {
            *v = Some(b"many".to_vec());
        }
        if k == "courier-error-kind" {
            *v = Some(b"weird".to_vec());
        }
    }
    let e = DlqEntry::from_delivery(&d);
    assert_eq!(e.attempts, None);
    assert_eq!(e.error_kind, None);
    assert_eq!(e.kind_label(), UNKNOWN);
    assert_eq!(e.malformed.len(), 2);
    let bare = DlqEntry::from_delivery(&Delivery {
        headers: vec![],
        ..source("x")
    });
    assert_eq!(bare.id, None);
    assert_eq!(bare.age_ms(NOW), None);
    assert_eq!(bare.original_label(), "(unknown)/?@?");
}

#[test]
fn bad_flag_values_name_the_flag_and_what_is_accepted() {
    let err = DlqFilter::parse(&args(&["fatal", "oops"], None, &[]), NOW).unwrap_err();
    assert_eq!(
        err.to_string(),
        "--error-kind=oops: expected retryable, fatal or exhausted"
    );
    let err = DlqFilter::parse(&args(&[], Some("yesterday"), &[]), NOW).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("--since=yesterday: expected a duration"),
        "{err}"
    );
    assert!(err.to_string().contains("RFC 3339"));
    let err = DlqFilter::parse(&args(&[], None, &[""]), NOW).unwrap_err();
    assert_eq!(err.to_string(), "--id=: expected a non-empty message id");
}

#[test]
fn since_accepts_durations_and_timestamps() {
    let f = DlqFilter::parse(&args(&[], Some("1h"), &[]), NOW).unwrap();
    assert_eq!(f.since_ms(), Some(NOW - 3_600_000));
    let f = DlqFilter::parse(&args(&[], Some(" 1m30s "), &[]), NOW).unwrap();
    assert_eq!(f.since_ms(), Some(NOW - 90_000));
    let f = DlqFilter::parse(&args(&[], Some("2023-11-14T22:13:20Z"), &[]), NOW).unwrap();
    assert_eq!(f.since_ms(), Some(1_700_000_000_000));
    let f = DlqFilter::parse(&args(&[], Some("2023-11-14T23:13:20+01:00"), &[]), NOW).unwrap();
    assert_eq!(f.since_ms(), Some(1_700_000_000_000));
}

#[test]
fn filter_criteria_all_hold_alternatives_within_one() {
    let fatal_new = DlqEntry::from_delivery(&dead("a", ErrorKind::Fatal, NOW - 1_000, 0, 0));
    let exh_old = DlqEntry::from_delivery(&dead("b", ErrorKind::Exhausted, NOW - 7_200_000, 0, 1));
    let no_time = DlqEntry::from_delivery(&Delivery {
        headers: vec![("message-id".into(), Some(b"c".to_vec()))],
        ..source("c")
    });
    let all = DlqFilter::default();
    assert!(all.matches(&fatal_new) && all.matches(&exh_old) && all.matches(&no_time));
    let kinds = DlqFilter::parse(&args(&["FATAL", "exhausted"], None, &[]), NOW).unwrap();
    assert!(kinds.matches(&fatal_new) && kinds.matches(&exh_old) && !kinds.matches(&no_time));
    let since = DlqFilter::parse(&args(&[], Some("1h"), &[]), NOW).unwrap();
    assert!(since.matches(&fatal_new) && !since.matches(&exh_old) && !since.matches(&no_time));
    let ids = DlqFilter::parse(&args(&[], None, &["b", "c"]), NOW).unwrap();
    assert!(!ids.matches(&fatal_new) && ids.matches(&exh_old) && ids.matches(&no_time));
    let both = DlqFilter::parse(&args(&["fatal"], None, &["b"]), NOW).unwrap();
    assert!(!both.matches(&fatal_new) && !both.matches(&exh_old));
}

#[test]
fn replay_needs_all_or_a_filter_not_both() {
    let none = Selection::parse(false, &FilterArgs::default(), NOW).unwrap_err();
    assert_eq!(none, SelectionError::NothingChosen);
    assert!(
        none.to_string().contains("needs --all, or a filter"),
        "{none}"
    );
    let both = Selection::parse(true, &args(&["fatal"], None, &[]), NOW).unwrap_err();
    assert_eq!(both, SelectionError::AllWithFilter);
    assert_eq!(
        Selection::parse(true, &FilterArgs::default(), NOW).unwrap(),
        Selection::All
    );
    assert!(Selection::parse(false, &args(&["nope"], None, &[]), NOW).is_err());
}

#[test]
fn fingerprint_is_stable_and_order_insensitive() {
    let a = args(&["fatal", "exhausted"], Some("1h"), &["x", "y"]);
    let b = args(&["Exhausted", "fatal", "fatal"], Some("1h "), &["y", "x"]);
    assert_eq!(
        selection_fingerprint(false, &a),
        selection_fingerprint(false, &b)
    );
    assert_ne!(
        selection_fingerprint(false, &a),
        selection_fingerprint(false, &args(&["fatal"], Some("1h"), &["x", "y"]))
    );
    assert_ne!(
        selection_fingerprint(true, &FilterArgs::default()),
        selection_fingerprint(false, &FilterArgs::default())
    );
    // Pinned: a change here silently restarts every interrupted replay.
    assert_eq!(
        selection_fingerprint(true, &FilterArgs::default()),
        "e6f09b19"
    );
    let g = replay_group("orders", true, &FilterArgs::default());
    assert_eq!(g, "orders-dlq-replay-e6f09b19");
}

#[test]
fn replay_record_keeps_user_bytes_and_resets_courier_headers() {
    let d = dead("a", ErrorKind::Fatal, NOW, 0, 3);
    let r = replay_record(&d, NOW + 1).unwrap();
    let orig = source("a");
    assert_eq!(r.topic, "events");
    assert_eq!(r.partition, None);
    assert_eq!(r.key, orig.key);
    assert_eq!(r.payload, orig.payload);
    let mut want = orig.headers.clone();
    want.push((
        HEADER_REPLAYED_AT_MS.into(),
        Some(b"1700000000001".to_vec()),
    ));
    assert_eq!(r.headers, want);
    let mut no_topic = d.clone();
    no_topic.headers.retain(|(k, _)| k != HEADER_ORIGINAL_TOPIC);
    assert_eq!(replay_record(&no_topic, NOW), Err(Unreplayable));
    // An earlier replay's marker is replaced, never appended.
    let mut again = d;
    again
        .headers
        .push((HEADER_REPLAYED_AT_MS.into(), Some(b"5".to_vec())));
    let r = replay_record(&again, NOW).unwrap();
    let marks: Vec<_> = r
        .headers
        .iter()
        .filter(|(k, _)| k == HEADER_REPLAYED_AT_MS)
        .collect();
    assert_eq!(marks.len(), 1);
}

#[test]
fn ages_are_compact() {
    assert_eq!(format_age(-5), "0s");
    assert_eq!(format_age(45_900), "45s");
    assert_eq!(format_age(750_000), "12m30s");
    assert_eq!(format_age(3 * 3_600_000 + 5 * 60_000), "3h05m");
    assert_eq!(format_age(2 * 86_400_000 + 4 * 3_600_000), "2d04h");
}

#[test]
fn pacer_spaces_publishes_without_bursts() {
    let t0 = Instant::now();
    let mut p = Pacer::new(Some(4.0));
    assert_eq!(p.next_delay(t0), Duration::ZERO);
    assert_eq!(p.next_delay(t0), Duration::from_millis(250));
    assert_eq!(
        p.next_delay(t0 + Duration::from_millis(600)),
        Duration::ZERO
    );
    assert_eq!(
        p.next_delay(t0 + Duration::from_millis(600)),
        Duration::from_millis(150)
    );
    let mut unlimited = Pacer::new(None);
    assert_eq!(unlimited.next_delay(t0), Duration::ZERO);
    assert_eq!(unlimited.next_delay(t0), Duration::ZERO);
}

async fn feed(events: Vec<ReadEvent>) -> mpsc::Receiver<ReadEvent> {
    let (tx, rx) = mpsc::channel(events.len().max(1));
    for e in events {
        tx.send(e).await.unwrap();
    }
    rx
}

fn dlq_fixture() -> Vec<ReadEvent> {
    let mut no_topic = dead("n", ErrorKind::Fatal, NOW - 1_000, 1, 0);
    no_topic.headers.retain(|(k, _)| k != HEADER_ORIGINAL_TOPIC);
    vec![
        ReadEvent::Message(dead("a", ErrorKind::Fatal, NOW - 1_000, 0, 0)),
        ReadEvent::Message(dead("b", ErrorKind::Exhausted, NOW - 1_000, 0, 1)),
        ReadEvent::Message(no_topic),
        ReadEvent::Message(dead("c", ErrorKind::Fatal, NOW - 1_000, 1, 1)),
        ReadEvent::Message(dead("d", ErrorKind::Exhausted, NOW - 1_000, 0, 2)),
        ReadEvent::End,
    ]
}

#[tokio::test]
async fn inspect_counts_everything_and_lists_the_first_n_in_dlq_order() {
    let mut rx = feed(dlq_fixture()).await;
    let filter = DlqFilter::parse(&args(&["fatal"], None, &[]), NOW).unwrap();
    let r = collect_inspect(&mut rx, "events-dlq", &filter, Some(2), NOW)
        .await
        .unwrap();
    let listed: Vec<_> = r.entries.iter().map(|e| e.id.clone().unwrap()).collect();
    assert_eq!(
        listed,
        vec!["a", "n"],
        "partition 0 first, then partition 1"
    );
    assert_eq!(r.summary.scanned, 5);
    assert_eq!(r.summary.matched, 3);
    assert_eq!(r.summary.by_error_kind["fatal"], 3);
    assert_eq!(r.summary.by_original_topic["events"], 2);
    assert_eq!(r.summary.by_original_topic[UNKNOWN], 1);
    let json = r.to_json();
    assert_eq!(json["summary"]["listed"], 2);
    assert_eq!(json["summary"]["matched"], 3);
    let mut cut = feed(vec![ReadEvent::Message(dead(
        "a",
        ErrorKind::Fatal,
        NOW,
        0,
        0,
    ))])
    .await;
    let err = collect_inspect(&mut cut, "t", &DlqFilter::default(), None, NOW).await;
    assert!(err.is_err(), "a reader that stops without End is an error");
}

type Commits = Arc<Mutex<Vec<Vec<(i32, i64)>>>>;

fn progress(commits: &Commits, fail: bool) -> MockProgressStore {
    let mut p = MockProgressStore::new();
    let c = commits.clone();
    p.expect_commit().returning(move |o| {
        c.lock().unwrap().push(o);
        if fail {
            Err(ProgressError::new("coordinator gone"))
        } else {
            Ok(())
        }
    });
    p
}

fn publisher(
    published: &Arc<Mutex<Vec<OutgoingRecord>>>,
    fail_on: Option<&'static str>,
) -> MockPublisher {
    let mut m = MockPublisher::new();
    let p = published.clone();
    m.expect_publish().returning(move |r| {
        let id = r.headers[0].1.clone().unwrap();
        if fail_on.is_some_and(|f| f.as_bytes() == id.as_slice()) {
            return Err(PublishError {
                kind: PublishFailure::Timeout,
                message: "timed out".into(),
            });
        }
        p.lock().unwrap().push(r);
        Ok(Ack {
            partition: 0,
            offset: 9,
        })
    });
    m
}

fn plan(kinds: &[&str]) -> ReplayPlan {
    ReplayPlan {
        selection: Selection::parse(kinds.is_empty(), &args(kinds, None, &[]), NOW).unwrap(),
        rate: None,
    }
}

/// How the mocks of a scripted replay fail.
#[derive(Debug, Clone, Copy, Default)]
struct Faults {
    /// The publish of the message with this id fails.
    publish_of: Option<&'static str>,
    /// Every commit fails.
    commits: bool,
}

/// What a replay of [`dlq_fixture`] did.
struct Replayed {
    /// The ids of the published records, in order.
    published: Vec<Vec<u8>>,
    /// The offsets of each commit, in order.
    commits: Vec<Vec<(i32, i64)>>,
    report: ReplayReport,
    /// The name of each observed [`ReplayEvent`].
    seen: Vec<String>,
    result: Result<(), ReplayError>,
}

/// Replays [`dlq_fixture`] with `plan` through a mock publisher and progress store that fail
/// as `faults` says; `None` is a dry run (no target).
async fn replay_fixture(
    plan: &ReplayPlan,
    faults: Option<Faults>,
    shutdown: &CancellationToken,
) -> Replayed {
    let published = Arc::new(Mutex::new(Vec::new()));
    let commits: Commits = Arc::default();
    let f = faults.unwrap_or_default();
    let (pb, pr) = (
        publisher(&published, f.publish_of),
        progress(&commits, f.commits),
    );
    let target = faults.map(|_| ReplayTarget {
        publisher: &pb,
        progress: &pr,
    });
    let mut rx = feed(dlq_fixture()).await;
    let mut report = ReplayReport::default();
    let mut seen = Vec::new();
    let result = replay_loop(&mut rx, plan, target, shutdown, &mut report, |ev| {
        let name = format!("{ev:?}");
        seen.push(name.split_whitespace().next().unwrap().to_owned());
    })
    .await;
    let published: Vec<Vec<u8>> = published
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.headers[0].1.clone().unwrap())
        .collect();
    let commits = commits.lock().unwrap().clone();
    Replayed {
        published,
        commits,
        report,
        seen,
        result,
    }
}

#[tokio::test]
async fn replay_publishes_selected_and_commits_after_each_ack() {
    let r = replay_fixture(
        &plan(&["fatal"]),
        Some(Faults::default()),
        &CancellationToken::new(),
    )
    .await;
    r.result.unwrap();
    assert_eq!(r.published, vec![b"a".to_vec(), b"c".to_vec()]);
    assert_eq!(
        r.commits,
        vec![vec![(0, 1)], vec![(0, 2), (1, 2)], vec![(0, 3)]],
        "past a, then past b (skipped), n (unreplayable) and c, then past d at the end"
    );
    let report = &r.report;
    assert_eq!(
        (
            report.scanned,
            report.replayed,
            report.skipped,
            report.unreplayable
        ),
        (5, 2, 2, 1)
    );
    assert_eq!(report.per_topic["events"], 2);
    assert!(!report.dry_run && !report.interrupted);
    assert_eq!(r.seen, vec!["Replayed", "Unreplayable", "Replayed"]);
}

#[tokio::test]
async fn dry_run_publishes_and_commits_nothing() {
    let r = replay_fixture(&plan(&[]), None, &CancellationToken::new()).await;
    r.result.unwrap();
    assert!(r.report.dry_run);
    assert!(r.published.is_empty() && r.commits.is_empty());
    let would = r.seen.iter().filter(|e| *e == "WouldReplay").count();
    assert_eq!((r.report.replayed, r.report.unreplayable, would), (4, 1, 4));
}

#[tokio::test]
async fn a_failed_publish_commits_only_what_came_before() {
    let faults = Faults {
        publish_of: Some("c"),
        ..Faults::default()
    };
    let r = replay_fixture(&plan(&["fatal"]), Some(faults), &CancellationToken::new()).await;
    let err = r.result.unwrap_err();
    assert!(
        err.to_string()
            .contains("publishing DLQ message 1@1 to events failed"),
        "{err}"
    );
    assert_eq!(r.commits, vec![vec![(0, 1)], vec![(0, 2), (1, 1)]]);
    assert_eq!(r.report.replayed, 1);
}

#[tokio::test]
async fn a_failed_commit_names_the_published_message() {
    let faults = Faults {
        commits: true,
        ..Faults::default()
    };
    let r = replay_fixture(&plan(&["fatal"]), Some(faults), &CancellationToken::new()).await;
    let msg = r.result.unwrap_err().to_string();
    assert!(
        msg.contains("coordinator gone") && msg.contains("0@0 (a) was published but not recorded"),
        "{msg}"
    );
    assert_eq!(r.published.len(), 1, "stops at the first failed commit");
}

#[tokio::test]
async fn cancelling_stops_between_messages_and_cuts_the_rate_wait_short() {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        cancel.cancel();
    });
    // At 0.5/s the second publish is due after 2 s: cancelling at 0.2 s ends the wait.
    let plan = ReplayPlan {
        rate: Some(0.5),
        ..plan(&[])
    };
    let started = Instant::now();
    let r = replay_fixture(&plan, Some(Faults::default()), &token).await;
    r.result.unwrap();
    assert!(started.elapsed() < Duration::from_millis(1900));
    assert!(r.report.interrupted);
    assert!(r.report.replayed <= 1);
    assert_eq!(r.published.len() as u64, r.report.replayed);
    if r.report.replayed == 1 {
        assert_eq!(r.commits, vec![vec![(0, 1)]]);
    }
}
