//! Rebalances and records nobody planned for, against a mock cluster per test (DESIGN.md,
//! guarantees 3, 7, 8 and 9): a retry that waits for its due time while the group
//! rebalances, a record with a header name that is not UTF-8, a DLQ that does not exist,
//! and a retry topic above `KAFKA_CONSUMER_RETRY_MAX`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use courier::app::dlq::{inspect, replay, FilterFlags, InspectOptions, ReplayOptions};
use courier::model::*;
use courier::testing::{
    header, http_get, stop_consumer, wait_for, ScriptedProcessor, Step, TestKafka,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(40);

/// Another member of `group` that subscribes only to `topic`: joining makes the group
/// rebalance, and with an eager strategy every member's partitions are revoked and then
/// assigned again, to the same members when only they subscribe to them.
struct Bystander {
    stop: Arc<AtomicBool>,
    assigned: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Bystander {
    fn join(k: &TestKafka, topic: &str, strategy: &str) -> Self {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", k.bootstrap())
            .set("group.id", &k.group)
            .set("partition.assignment.strategy", strategy)
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500")
            .create()
            .expect("bystander consumer");
        c.subscribe(&[topic]).expect("subscribe");
        let stop = Arc::new(AtomicBool::new(false));
        let assigned = Arc::new(AtomicBool::new(false));
        let (s, a) = (stop.clone(), assigned.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let _ = c.poll(Duration::from_millis(50));
                if c.assignment().is_ok_and(|t| t.count() > 0) {
                    a.store(true, Ordering::SeqCst);
                }
            }
        });
        Bystander {
            stop,
            assigned,
            thread: Some(thread),
        }
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The one call of `id` that succeeded must have started at or after its due time.
fn assert_once_and_never_early(p: &ScriptedProcessor, id: &str) {
    let calls = p.calls_for(id);
    let ok: Vec<_> = calls.iter().filter(|s| s.ok).collect();
    assert_eq!(
        ok.len(),
        1,
        "processed successfully exactly once: {calls:?}"
    );
    let due: i64 = header(&ok[0].delivery, HEADER_DUE_AT_MS)
        .expect("the retry copy carries its due time")
        .parse()
        .expect("a number");
    assert!(
        ok[0].at_ms >= due,
        "processed {} ms before its due time",
        due - ok[0].at_ms
    );
}

/// The scenario of issue 8, point 1: a member holds a retry that is due in 8 s (its retry
/// partition paused); another member joins; with an eager strategy the partitions are
/// revoked and assigned back to the same member. librdkafka keeps the pause across that, so
/// without an explicit resume the retry was never processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_retry_survives_its_partition_coming_back_to_the_same_member() {
    let k = TestKafka::new(1);
    let other = format!("{}-other", k.source);
    k.broker.create_topic(&other, 1).expect("topic");
    let p = ScriptedProcessor::new();
    p.script("w", vec![Step::Retry("down"), Step::Ok]);
    let (running, shutdown) = k
        .consumer(
            p.clone(),
            &[
                ("KAFKA_CONSUMER_ASSIGNMENT_STRATEGY", "range"),
                ("KAFKA_RETRY_BACKOFF", "8s"),
            ],
        )
        .await;
    let m = running.metrics.clone();
    k.produce(
        &k.source,
        vec![(
            None,
            b"{}".to_vec(),
            vec![(HEADER_MESSAGE_ID.into(), Some(b"w".to_vec()))],
        )],
    )
    .await;
    wait_for("the retry waits, its partition paused", T, || {
        m.paused_partitions.get() == 1
    })
    .await;
    let revoked_before = m.rebalance_partitions.with_label_values(&["revoked"]).get();
    let bystander = Bystander::join(&k, &other, "range");
    wait_for("the group rebalanced around the waiting retry", T, || {
        bystander.assigned.load(Ordering::SeqCst)
            && m.rebalance_partitions.with_label_values(&["revoked"]).get() > revoked_before
    })
    .await;
    assert!(
        p.calls_for("w").len() == 1,
        "the rebalance came before the retry was due"
    );
    wait_for("the retry processed after the rebalance", T, || {
        p.calls_for("w").iter().any(|s| s.ok)
    })
    .await;
    assert_once_and_never_early(&p, "w");
    let summary = stop_consumer(running, shutdown, T).await;
    drop(bystander);
    assert_eq!(summary.values().map(|s| s.ok).sum::<u64>(), 1);
    k.assert_committed_to_end(&k.source);
    k.assert_committed_to_end(&k.retry_topic(1));
}

/// With `cooperative-sticky`, a second courier joins while a retry waits: partitions that
/// move go to it, the others keep flowing. The retry is processed once, after its due time,
/// by whichever member owns it then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_retry_is_processed_once_by_whichever_member_owns_it() {
    let k = TestKafka::new(4);
    let p = ScriptedProcessor::new();
    let mut ids = Vec::new();
    for i in 0..8 {
        let id = format!("w{i}");
        p.script(&id, vec![Step::Retry("down"), Step::Ok]);
        ids.push(id);
    }
    let env = [("KAFKA_RETRY_BACKOFF", "6s")];
    let (a, a_stop) = k.consumer(p.clone(), &env).await;
    let msgs = ids
        .iter()
        .map(|id| {
            (
                Some(id.as_bytes().to_vec()),
                b"{}".to_vec(),
                vec![(HEADER_MESSAGE_ID.into(), Some(id.as_bytes().to_vec()))],
            )
        })
        .collect();
    k.produce(&k.source, msgs).await;
    let am = a.metrics.clone();
    wait_for("retries waiting on A", T, || {
        am.paused_partitions.get() >= 1
    })
    .await;
    let (b, b_stop) = k.consumer(p.clone(), &env).await;
    let bm = b.metrics.clone();
    wait_for("B owns some partitions", T, || {
        bm.assigned_partitions.get() > 0
    })
    .await;
    assert!(
        am.rebalance_partitions
            .with_label_values(&["revoked"])
            .get()
            < 16,
        "cooperative: A did not give up everything"
    );
    wait_for("every retry processed", T, || {
        ids.iter().all(|id| p.calls_for(id).iter().any(|s| s.ok))
    })
    .await;
    for id in &ids {
        assert_once_and_never_early(&p, id);
    }
    // No partition is stuck: the group commits every one to its end while both run (a
    // commit racing a member's departure may fail and be repeated by the next owner).
    wait_for("every partition committed to its end", T, || {
        k.committed_to_end(&k.source) && k.committed_to_end(&k.retry_topic(1))
    })
    .await;
    stop_consumer(b, b_stop, T).await;
    stop_consumer(a, a_stop, T).await;
}

/// Issue 8, point 3: one record whose header name is not UTF-8 used to panic the consumer
/// thread on every restart. Now it is processed or dead-lettered with its header bytes
/// intact, the next record is processed, and `dlq inspect` and `dlq replay` handle it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_name_that_is_not_utf8_is_kept_byte_for_byte() {
    let k = TestKafka::new(1);
    let p = ScriptedProcessor::new();
    p.script("poison-fatal", vec![Step::Fatal("scripted")]);
    let raw_name: &[u8] = b"bad\xffkey";
    let poison = |id: &str| {
        (
            None,
            b"{}".to_vec(),
            vec![
                (HeaderKey::from(raw_name), Some(b"v\xfe".to_vec())),
                (HEADER_MESSAGE_ID.into(), Some(id.as_bytes().to_vec())),
            ],
        )
    };
    let plain = (
        None,
        b"{}".to_vec(),
        vec![(HEADER_MESSAGE_ID.into(), Some(b"next".to_vec()))],
    );
    k.produce(
        &k.source,
        vec![poison("poison-ok"), poison("poison-fatal"), plain],
    )
    .await;
    let (running, shutdown) = k.consumer(p.clone(), &[]).await;
    wait_for("all three handled", T, || p.calls() >= 3).await;
    let seen = p.calls_for("poison-ok");
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].delivery.header_raw(raw_name),
        Some(b"v\xfe".as_slice()),
        "the processor sees the header as it was written"
    );
    assert!(
        p.calls_for("next").iter().any(|s| s.ok),
        "the next record is processed"
    );
    let dlq = k.read_all(&k.dlq, 1, T);
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].message_id(), Some("poison-fatal"));
    assert_eq!(
        dlq[0].header_raw(raw_name),
        Some(b"v\xfe".as_slice()),
        "forwarded to the DLQ byte for byte"
    );
    stop_consumer(running, shutdown, T).await;
    k.assert_committed_to_end(&k.source);

    let config = k.config(&[]);
    let mut out = Vec::new();
    let report = inspect(&config, &InspectOptions::default(), &mut out)
        .await
        .expect("dlq inspect reads the record");
    assert_eq!(report.entries.len(), 1);
    let mut out = Vec::new();
    let opts = ReplayOptions {
        all: true,
        filter: FilterFlags::default(),
        ..ReplayOptions::default()
    };
    replay(&config, &opts, CancellationToken::new(), &mut out)
        .await
        .expect("dlq replay republishes the record");
    let source = k.read_all(&k.source, 4, T);
    let replayed = source
        .iter()
        .find(|d| d.header(HEADER_REPLAYED_AT_MS).is_some())
        .expect("the replayed copy is on the source topic");
    assert_eq!(replayed.header_raw(raw_name), Some(b"v\xfe".as_slice()));
}

/// Issue 8, point 3: a DLQ topic that does not exist (and may not be auto-created) makes a
/// fatal message's publish fail with an error that does not heal by itself. The message
/// holds its partition visibly (`/readyz` 503 naming it, `courier_held_messages`), is never
/// dropped, and courier recovers by itself once the topic is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_dlq_holds_visibly_and_recovers_once_created() {
    let k = TestKafka::new(1);
    let dlq = format!("{}-missing", k.dlq);
    let p = ScriptedProcessor::new();
    p.script("bad", vec![Step::Fatal("scripted")]);
    let (running, shutdown) = k
        .consumer(
            p.clone(),
            &[
                ("KAFKA_DLQ_TOPIC", dlq.as_str()),
                ("RDKAFKA_ALLOW_AUTO_CREATE_TOPICS", "false"),
                ("RDKAFKA_TOPIC_METADATA_PROPAGATION_MAX_MS", "500"),
            ],
        )
        .await;
    let msg = |id: &str| {
        (
            None,
            b"{}".to_vec(),
            vec![(HEADER_MESSAGE_ID.into(), Some(id.as_bytes().to_vec()))],
        )
    };
    k.produce(&k.source, vec![msg("bad"), msg("after")]).await;
    let m = running.metrics.clone();
    wait_for("the message is held", T, || m.held_messages.get() == 1).await;
    let readyz = format!("http://{}/readyz", running.ops_addr);
    let (status, body) = http_get(&readyz).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(&format!("{}/0@0", k.source)), "{body}");
    assert!(body.contains(&dlq), "{body}");
    wait_for("the next message is processed meanwhile", T, || {
        p.calls_for("after").iter().any(|s| s.ok)
    })
    .await;
    assert_eq!(
        k.committed(&k.source),
        vec![0],
        "the commit point holds at the held message"
    );
    k.broker.create_topic(&dlq, 1).expect("create the DLQ");
    wait_for("the held message moves on", T, || {
        m.held_messages.get() == 0
    })
    .await;
    wait_for("ready again", T, || {
        // A blocking HTTP call is fine here: the runtime has a second worker.
        futures::executor::block_on(http_get(&readyz)).0 == 200
    })
    .await;
    let dead = k.read_all(&dlq, 1, T);
    assert_eq!(dead[0].message_id(), Some("bad"));
    stop_consumer(running, shutdown, T).await;
    k.assert_committed_to_end(&k.source);
}

/// Issue 8, point 6: a retry topic above `KAFKA_CONSUMER_RETRY_MAX` (left from a larger
/// setting) is still consumed; a failure there goes to the DLQ as exhausted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_topics_above_the_maximum_are_not_stranded() {
    let k = TestKafka::new(1);
    let p = ScriptedProcessor::new();
    p.script("high-fail", vec![Step::Retry("still down")]);
    let msg = |id: &str| {
        (
            None,
            b"{}".to_vec(),
            vec![(HEADER_MESSAGE_ID.into(), Some(id.as_bytes().to_vec()))],
        )
    };
    // retry-3 exists; the consumer is told there is only one level.
    k.produce(&k.retry_topic(3), vec![msg("high-ok"), msg("high-fail")])
        .await;
    let (running, shutdown) = k
        .consumer(p.clone(), &[("KAFKA_CONSUMER_RETRY_MAX", "1")])
        .await;
    wait_for("both consumed", T, || p.calls() >= 2).await;
    let dlq = k.read_all(&k.dlq, 1, T);
    assert_eq!(dlq[0].message_id(), Some("high-fail"));
    assert_eq!(
        header(&dlq[0], HEADER_ERROR_KIND).as_deref(),
        Some("exhausted")
    );
    stop_consumer(running, shutdown, T).await;
    k.assert_committed_to_end(&k.retry_topic(3));
}
