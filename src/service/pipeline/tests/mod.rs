//! The pipeline against a mocked driver (`MockDriverControl`), a scripted processor and a
//! mocked publisher: retry gate, foreign retries, revokes, reassignments, the byte bound and
//! faults inside one message. Every wait has a deadline and fails loudly.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::Semaphore;

mod rebalance;

use super::*;
use crate::config::RetryConfig;
use crate::model::{
    Ack, CourierHeaders, ErrorKind, Headers, HEADER_CONSUMER_GROUP, HEADER_DUE_AT_MS,
};
use crate::observability::{Metrics, Readiness};
use crate::service::circuit::{Breaker, CircuitSettings};
use crate::service::dedupe::MemoryDedupe;
use crate::service::limits::Limits;
use crate::service::processor::{ProcessError, Processor};
use crate::service::publish::MockPublisher;
use crate::service::source::MockDriverControl;

/// Everything the mocked driver was asked.
#[derive(Default)]
struct Calls {
    seeks: Vec<(Tp, Epoch, i64)>,
    commits: Vec<(Tp, Epoch, i64)>,
    pauses: Vec<(Tp, Epoch)>,
    resumes: Vec<(Tp, Epoch)>,
    closed: Option<Vec<(Tp, Epoch, i64)>>,
}

fn control(calls: &Arc<Mutex<Calls>>) -> MockDriverControl {
    let mut c = MockDriverControl::new();
    let next = Arc::new(AtomicU64::new(100));
    let k = calls.clone();
    c.expect_seek().returning(move |tp, g, o| {
        k.lock().seeks.push((tp.clone(), g, o));
        next.fetch_add(1, Ordering::SeqCst)
    });
    let k = calls.clone();
    c.expect_commit()
        .returning(move |o| k.lock().commits.extend(o));
    let k = calls.clone();
    c.expect_pause()
        .returning(move |tp, g| k.lock().pauses.push((tp.clone(), g)));
    let k = calls.clone();
    c.expect_resume()
        .returning(move |tp, g| k.lock().resumes.push((tp.clone(), g)));
    c.expect_recycle().returning(|_| ());
    let k = calls.clone();
    c.expect_close()
        .returning(move |o| k.lock().closed = Some(o));
    c
}

/// A processor scripted by payload: `panic` panics, `fail` is retryable, `block` waits for
/// a permit of `gate`; every call is recorded, and the concurrency reached is kept.
#[derive(Default)]
struct Script {
    calls: Mutex<Vec<(String, i64)>>,
    gate: Option<Arc<Semaphore>>,
    running: AtomicUsize,
    max_running: AtomicUsize,
}

#[async_trait]
impl Processor for Script {
    async fn process(&self, d: &Delivery) -> Result<(), ProcessError> {
        self.calls.lock().push((d.topic.clone(), d.offset));
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        let payload = d.payload.clone().unwrap_or_default();
        let result = match payload.as_slice() {
            b"panic" => panic!("scripted panic"),
            b"fail" => Err(ProcessError::retryable("scripted")),
            b"block" => {
                let gate = self.gate.as_ref().expect("a gate for blocking messages");
                gate.acquire().await.expect("gate open").forget();
                Ok(())
            }
            _ => Ok(()),
        };
        self.running.fetch_sub(1, Ordering::SeqCst);
        result
    }
}

/// A script whose `block` messages wait for permits of the returned gate (none yet).
fn gated() -> (Arc<Semaphore>, Arc<Script>) {
    let gate = Arc::new(Semaphore::new(0));
    let script = Arc::new(Script {
        gate: Some(gate.clone()),
        ..Script::default()
    });
    (gate, script)
}

impl Script {
    /// Waits until `n` calls are running.
    async fn until_running(&self, what: &str, n: usize) {
        until(what, || self.running.load(Ordering::SeqCst) == n).await;
    }
}

fn publisher(sent: &Arc<Mutex<Vec<crate::model::OutgoingRecord>>>) -> MockPublisher {
    let mut p = MockPublisher::new();
    let seen = sent.clone();
    p.expect_publish().returning(move |r| {
        seen.lock().push(r);
        Ok(Ack {
            partition: 0,
            offset: 0,
        })
    });
    p.expect_flush().returning(|_| 0);
    p
}

fn ctx(processor: Arc<dyn Processor>, publisher: MockPublisher) -> Arc<WorkerContext> {
    let metrics = Metrics::new();
    Arc::new(WorkerContext {
        processor,
        publisher: Arc::new(publisher),
        dedupe: Arc::new(MemoryDedupe::new(Duration::from_secs(60), 100)),
        retry: RetryConfig {
            topic_prefix: "ev-retry".into(),
            backoff: vec![Duration::from_secs(60)],
            dlq_topic: "ev-dlq".into(),
        },
        retry_max: 3,
        group: "g".into(),
        metrics: metrics.clone(),
        abort: CancellationToken::new(),
        publish_backoff: (Duration::from_millis(1), Duration::from_millis(10)),
        max_retry_delay: Duration::from_secs(3600),
        holds: Readiness::new(metrics.clone(), true),
        breaker: Breaker::new(CircuitSettings::off(), metrics),
        limits: Limits::default(),
        stop_holding: CancellationToken::new(),
    })
}

fn delivery(topic: &str, offset: i64, key: &str, payload: &[u8], headers: Headers) -> Delivery {
    Delivery {
        topic: topic.into(),
        partition: 0,
        offset,
        key: Some(key.as_bytes().to_vec()),
        payload: Some(payload.to_vec()),
        headers,
        timestamp_ms: None,
    }
}

/// A retry of `topic` (key `k`) due `ms` milliseconds from now.
fn due_in(topic: &str, offset: i64, ms: i64) -> Delivery {
    let due = (now_ms() + ms).to_string().into_bytes();
    delivery(
        topic,
        offset,
        "k",
        b"{}",
        vec![(HEADER_DUE_AT_MS.into(), Some(due))],
    )
}

fn cfg() -> PipelineConfig {
    PipelineConfig {
        workers: 2,
        max_in_flight: 10,
        max_in_flight_bytes: 1 << 20,
        commit_interval: Duration::from_millis(20),
        shutdown_timeout: Duration::from_secs(2),
        pause_after: Duration::from_millis(100),
        max_due_ahead: Duration::from_secs(3600),
    }
}

/// A running pipeline and its inputs.
struct Harness {
    events: mpsc::Sender<DriverEvent>,
    deliveries: mpsc::Sender<DeliveryBatch>,
    calls: Arc<Mutex<Calls>>,
    shutdown: CancellationToken,
    run: tokio::task::JoinHandle<ConsumerSummary>,
}

impl Harness {
    fn start(cfg: PipelineConfig, ctx: Arc<WorkerContext>) -> Self {
        let calls = Arc::new(Mutex::new(Calls::default()));
        let (events, ev_rx) = mpsc::channel(4);
        let (deliveries, d_rx) = mpsc::channel(4);
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(run(
            cfg,
            ctx,
            Arc::new(control(&calls)),
            ev_rx,
            d_rx,
            shutdown.clone(),
        ));
        Harness {
            events,
            deliveries,
            calls,
            shutdown,
            run,
        }
    }

    /// A pipeline with `script` as its processor and a publisher nobody looks at.
    fn scripted(cfg: PipelineConfig, script: &Arc<Script>) -> Self {
        Harness::start(cfg, ctx(script.clone(), publisher(&Default::default())))
    }

    async fn assign(&self, tp: &Tp, generation: Epoch) {
        self.events
            .send(DriverEvent::Assigned(vec![(tp.clone(), generation)]))
            .await
            .expect("pipeline running");
    }

    /// Sends a revoke; the receiver gets the pipeline's answer.
    async fn revoke(&self, tp: &Tp, lost: bool) -> std::sync::mpsc::Receiver<Vec<(Tp, i64)>> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.events
            .send(DriverEvent::Revoked {
                partitions: vec![tp.clone()],
                lost,
                reply: tx,
            })
            .await
            .expect("pipeline running");
        rx
    }

    async fn deliver(&self, batch: DeliveryBatch) {
        self.deliveries.send(batch).await.expect("pipeline running");
    }

    /// Waits until the driver was asked to commit `offset` of `tp` under `generation`.
    async fn until_committed(&self, what: &str, tp: &Tp, generation: Epoch, offset: i64) {
        until(what, || {
            self.calls
                .lock()
                .commits
                .contains(&(tp.clone(), generation, offset))
        })
        .await;
    }

    /// Waits until the driver was asked to resume `tp` under `generation`.
    async fn until_resumed(&self, what: &str, tp: &Tp, generation: Epoch) {
        until(what, || {
            self.calls
                .lock()
                .resumes
                .contains(&(tp.clone(), generation))
        })
        .await;
    }

    async fn stop(self) -> (ConsumerSummary, Arc<Mutex<Calls>>) {
        self.shutdown.cancel();
        let summary = tokio::time::timeout(Duration::from_secs(10), self.run)
            .await
            .expect("the pipeline stops within its drain deadline")
            .expect("pipeline task");
        (summary, self.calls)
    }
}

/// Waits for `cond`, failing loudly after 5 s.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits for an answer on a std channel without blocking the runtime.
async fn answer(rx: &std::sync::mpsc::Receiver<Vec<(Tp, i64)>>) -> Vec<(Tp, i64)> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(a) = rx.try_recv() {
            return a;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for the revoke answer"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn a_retry_not_yet_due_is_held_and_never_committed_past() {
    let script = Arc::new(Script::default());
    let h = Harness::scripted(cfg(), &script);
    let tp = Tp::new("ev-retry-1", 0);
    h.assign(&tp, 1).await;
    let later = (now_ms() + 60_000).to_string().into_bytes();
    let due_later: Headers = vec![
        (HEADER_DUE_AT_MS.into(), Some(later)),
        (HEADER_CONSUMER_GROUP.into(), Some(b"g".to_vec())),
    ];
    // Offsets 0..2 are due (no due header); 3 is not due yet.
    let batch = (0..3)
        .map(|o| (delivery("ev-retry-1", o, "k", b"{}", vec![]), 1))
        .chain([(delivery("ev-retry-1", 3, "k", b"{}", due_later), 1)])
        .collect();
    h.deliver(batch).await;
    until("the seek back to offset 3", || {
        h.calls.lock().seeks.len() == 1
    })
    .await;
    // The race: a message fetched after the seek (new epoch 100) while it waits.
    h.deliver(vec![(delivery("ev-retry-1", 4, "k", b"{}", vec![]), 100)])
        .await;
    until("a second seek back", || h.calls.lock().seeks.len() == 2).await;
    h.until_committed("offsets 0..2 committed", &tp, 1, 3).await;
    let (summary, calls) = h.stop().await;
    let c = calls.lock();
    assert_eq!(c.seeks, vec![(tp.clone(), 1, 3), (tp.clone(), 1, 3)]);
    assert!(c.pauses.contains(&(tp.clone(), 1)));
    assert!(
        c.commits.iter().all(|(_, _, o)| *o <= 3),
        "never committed past offset 3: {:?}",
        c.commits
    );
    assert_eq!(c.closed, Some(vec![(tp.clone(), 1, 3)]));
    assert_eq!(summary[&tp].ok, 3);
    assert_eq!(script.calls.lock().len(), 3, "offset 4 was never processed");
}

#[tokio::test]
async fn other_groups_retries_are_skipped_and_committed_past() {
    let script = Arc::new(Script::default());
    let h = Harness::scripted(cfg(), &script);
    let tp = Tp::new("ev-retry-2", 0);
    h.assign(&tp, 1).await;
    let foreign: Headers = vec![(HEADER_CONSUMER_GROUP.into(), Some(b"other".to_vec()))];
    h.deliver(vec![
        (delivery("ev-retry-2", 0, "k", b"{}", foreign.clone()), 1),
        (delivery("ev-retry-2", 1, "k", b"{}", foreign), 1),
    ])
    .await;
    h.until_committed("both skipped and committed", &tp, 1, 2)
        .await;
    let (summary, _) = h.stop().await;
    assert_eq!(summary[&tp].skipped, 2);
    assert!(script.calls.lock().is_empty());
}

#[tokio::test]
async fn the_byte_bound_limits_what_is_in_flight() {
    let (gate, script) = gated();
    let mut c = cfg();
    c.workers = 8;
    c.max_in_flight = 100;
    // Each message is 5 (payload) + 1 (key) bytes: three fit, a fourth does not.
    c.max_in_flight_bytes = 20;
    let h = Harness::scripted(c, &script);
    let tp = Tp::new("ev", 0);
    h.assign(&tp, 1).await;
    let batch = (0..8)
        .map(|o| (delivery("ev", o, &o.to_string(), b"block", vec![]), 1))
        .collect();
    h.deliver(batch).await;
    script.until_running("three running", 3).await;
    // The batch was admitted in one go: nothing more can start before a completion.
    tokio::task::yield_now().await;
    assert_eq!(script.calls.lock().len(), 3, "no fourth message taken");
    gate.add_permits(8);
    until("all eight processed", || script.calls.lock().len() == 8).await;
    assert!(script.max_running.load(Ordering::SeqCst) <= 3);
    let (summary, _) = h.stop().await;
    assert_eq!(summary[&tp].ok, 8);
}

#[tokio::test]
async fn one_message_larger_than_the_byte_bound_is_taken_alone() {
    let script = Arc::new(Script::default());
    let mut c = cfg();
    c.max_in_flight_bytes = 4;
    let h = Harness::scripted(c, &script);
    let tp = Tp::new("ev", 0);
    h.assign(&tp, 1).await;
    h.deliver(vec![
        (delivery("ev", 0, "k", b"larger than four", vec![]), 1),
        (delivery("ev", 1, "k", b"also larger", vec![]), 1),
    ])
    .await;
    until("both processed", || script.calls.lock().len() == 2).await;
    let (summary, _) = h.stop().await;
    assert_eq!(summary[&tp].ok, 2);
}

/// Sends `payload` then `{}` (same key) on partition 0 of `topic` and waits until both are
/// committed: the first dead-lettered, the second processed. Returns the script and what was
/// published.
async fn dead_letter_the_first(
    topic: &str,
    payload: &[u8],
) -> (Arc<Script>, Arc<Mutex<Vec<crate::model::OutgoingRecord>>>) {
    let script = Arc::new(Script::default());
    let sent = Arc::new(Mutex::new(Vec::new()));
    let h = Harness::start(cfg(), ctx(script.clone(), publisher(&sent)));
    let tp = Tp::new(topic, 0);
    h.assign(&tp, 1).await;
    h.deliver(vec![
        (delivery(topic, 0, "k", payload, vec![]), 1),
        (delivery(topic, 1, "k", b"{}", vec![]), 1),
    ])
    .await;
    h.until_committed("both finished and committed", &tp, 1, 2)
        .await;
    let (summary, _) = h.stop().await;
    assert_eq!((summary[&tp].dead_lettered, summary[&tp].ok), (1, 1));
    (script, sent)
}

/// A panicking processor call is a fatal failure: dead-lettered, and the lane goes on with
/// the next message of the same key.
#[tokio::test]
async fn a_processor_panic_is_a_fatal_failure_and_the_lane_goes_on() {
    let (_, sent) = dead_letter_the_first("ev", b"panic").await;
    let sent = sent.lock();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].topic, "ev-dlq");
    let hd = CourierHeaders::parse(&sent[0].headers);
    assert_eq!(hd.error_kind, Some(ErrorKind::Fatal));
    assert!(hd
        .error_message
        .unwrap()
        .contains("the processor panicked: scripted panic"));
}

/// A retry topic above `retry_max` (left from a larger setting) is consumed; a failure there
/// goes to the DLQ as exhausted.
#[tokio::test]
async fn a_failure_on_a_retry_topic_above_the_maximum_is_exhausted() {
    let (script, sent) = dead_letter_the_first("ev-retry-5", b"fail").await;
    let sent = sent.lock();
    assert_eq!(sent[0].topic, "ev-dlq");
    let hd = CourierHeaders::parse(&sent[0].headers);
    assert_eq!(hd.error_kind, Some(ErrorKind::Exhausted));
    assert_eq!(hd.attempt, Some(6));
    let processed: HashSet<i64> = script.calls.lock().iter().map(|(_, o)| *o).collect();
    assert_eq!(processed, HashSet::from([0, 1]));
}

#[tokio::test]
async fn deadlines_never_overflow() {
    let far = deadline_after(Duration::MAX);
    assert!(far > Instant::now() + Duration::from_secs(86_400));
    let near = deadline_after(Duration::from_millis(5));
    assert!(near <= Instant::now() + Duration::from_millis(5));
}

#[tokio::test(start_paused = true)]
async fn commit_points_are_committed_again_even_when_they_did_not_move() {
    let script = Arc::new(Script::default());
    let h = Harness::scripted(cfg(), &script);
    let tp = Tp::new("ev", 0);
    h.assign(&tp, 1).await;
    h.deliver(vec![
        (delivery("ev", 0, "k", b"{}", vec![]), 1),
        (delivery("ev", 1, "k", b"{}", vec![]), 1),
    ])
    .await;
    let committed = |calls: &Arc<Mutex<Calls>>| {
        calls
            .lock()
            .commits
            .iter()
            .filter(|c| **c == (tp.clone(), 1, 2))
            .count()
    };
    until("offset 2 committed", || committed(&h.calls) >= 1).await;
    let first = committed(&h.calls);
    // Many commit intervals pass with nothing new: the point is not sent again...
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        committed(&h.calls),
        first,
        "an unmoved point is not re-sent every interval"
    );
    // ...until the re-assertion period is over: a refused or overwritten commit is repaired.
    tokio::time::sleep(REASSERT_COMMITS).await;
    assert!(
        committed(&h.calls) > first,
        "the unmoved commit point was committed again after {REASSERT_COMMITS:?}"
    );
    h.stop().await;
}
