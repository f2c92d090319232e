//! `courier demo` end to end: the library entry with short delays (the numbers add up, the
//! retry chain, the DLQ and dedupe all show, `/metrics` answers during the run), and the
//! real binary with `--duration`.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier::app::demo::{session as demo, DemoOptions, DrainEnd, ProgressStyle};
use courier::config::Config;
use courier::service::demo::{FailurePlan, Fate};
use courier::testing::{
    courier_command, http_get, metric_sum, output_within, successful_output, wait_for,
    wait_for_async, ServiceEnv,
};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

type Hook = Box<dyn FnOnce() + Send>;

/// A writer the test can read while the demo writes to it, and that runs a hook (in the
/// demo's task, which waits for it) once the text contains a given string.
#[derive(Clone, Default)]
struct SharedOut {
    buf: Arc<Mutex<Vec<u8>>>,
    hooks: Arc<Mutex<Vec<(String, Hook)>>>,
}

impl SharedOut {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock()).into_owned()
    }

    /// Runs `hook` inside the write that makes the text contain `pattern`.
    fn on_line(&self, pattern: &str, hook: impl FnOnce() + Send + 'static) {
        self.hooks.lock().push((pattern.to_owned(), Box::new(hook)));
    }
}

impl Write for SharedOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.buf.lock().extend_from_slice(buf);
        let text = self.text();
        let due: Vec<Hook> = {
            let mut hooks = self.hooks.lock();
            let (due, keep) = std::mem::take(&mut *hooks)
                .into_iter()
                .partition(|(pattern, _)| text.contains(pattern.as_str()));
            *hooks = keep;
            due.into_iter().map(|(_, hook)| hook).collect()
        };
        for hook in due {
            hook();
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const T: Duration = Duration::from_secs(20);

/// The configuration of a demo test: the defaults, short delays, port 0 everywhere (the
/// demo brings its own broker and topics, so names need not be unique).
fn config() -> Config {
    ServiceEnv::local()
        .with(&[
            ("KAFKA_RETRY_BACKOFF", "200ms,300ms,400ms"),
            ("KAFKA_CONSUMER_COMMIT_INTERVAL_MS", "200"),
            ("KAFKA_PRODUCER_LINGER_MS", "0"),
        ])
        .config()
}

/// The first word after `name` on the banner line that starts with it.
fn banner_field(out: &SharedOut, name: &str) -> String {
    out.text()
        .lines()
        .find_map(|l| {
            let l = l.trim_start().strip_prefix(name)?;
            l.split_whitespace().next().map(str::to_owned)
        })
        .unwrap_or_else(|| panic!("no `{name}` line in the banner:\n{}", out.text()))
}

/// The `/metrics` URL from the demo's banner, once it is printed.
async fn metrics_url(out: &SharedOut) -> String {
    let mut url = None;
    wait_for("the banner", Duration::from_secs(20), || {
        url = out.text().lines().find_map(|l| {
            let l = l.trim_start().strip_prefix("metrics")?;
            l.split_whitespace().next().map(str::to_owned)
        });
        url.is_some()
    })
    .await;
    url.expect("found above")
}

/// What the services logged about each message, captured from their tracing events: the
/// demo processor's successes, the worker's skipped duplicates and its DLQ hand-offs.
#[derive(Debug, Default)]
struct Outcomes {
    ok: Vec<String>,
    duplicates: Vec<String>,
    dead_lettered: Vec<String>,
}

/// A tracing layer that records [`Outcomes`] by `message-id`.
struct Capture(Arc<Mutex<Outcomes>>);

#[derive(Default)]
struct EventFields {
    message: String,
    message_id: Option<String>,
    dlq_topic: bool,
}

impl tracing::field::Visit for EventFields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        match field.name() {
            "message_id" => self.message_id = Some(value.to_owned()),
            "message" => self.message = value.to_owned(),
            "dlq_topic" => self.dlq_topic = true,
            _ => {}
        }
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message_id" => self.message_id = Some(format!("{value:?}")),
            "message" => self.message = format!("{value:?}"),
            "dlq_topic" => self.dlq_topic = true,
            _ => {}
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let target = event.metadata().target();
        let mut f = EventFields::default();
        event.record(&mut f);
        let Some(id) = f.message_id else { return };
        let mut o = self.0.lock();
        match target {
            "courier::service::demo" if f.message.contains("accepted a message") => o.ok.push(id),
            "courier::message" if f.message.starts_with("Skipped a duplicate") => {
                o.duplicates.push(id)
            }
            "courier::message" if f.dlq_topic => o.dead_lettered.push(id),
            _ => {}
        }
    }
}

/// Installs the capture as this test binary's global subscriber (plus stderr logs with
/// `TEST_LOG`); only one test of this binary runs services in-process.
fn capture_outcomes() -> Arc<Mutex<Outcomes>> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::Layer;
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let targets = tracing_subscriber::filter::Targets::new()
        .with_target("courier::service::demo", tracing::Level::DEBUG)
        .with_target("courier::message", tracing::Level::INFO);
    let stderr = std::env::var("TEST_LOG").ok().map(|level| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(tracing_subscriber::EnvFilter::new(level))
    });
    let subscriber = tracing_subscriber::registry()
        .with(Capture(outcomes.clone()).with_filter(targets))
        .with(stderr);
    tracing::subscriber::set_global_default(subscriber)
        .expect("the first global subscriber of this test binary");
    outcomes
}

/// Reads every record of `topic` on the demo's broker from the beginning, from a thread of
/// its own, until asked to catch up with the end offsets of that moment; then reports
/// whether it did and stops. The records are `(message-id, partition, offset)`.
struct TopicReader {
    records: Arc<Mutex<Vec<(String, i32, i64)>>>,
    catch_up: Mutex<std::sync::mpsc::Sender<()>>,
    caught_up: Mutex<std::sync::mpsc::Receiver<bool>>,
}

impl TopicReader {
    fn start(bootstrap: &str, topic: &str) -> TopicReader {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::message::Message;
        let records = Arc::new(Mutex::new(Vec::new()));
        let (catch_up, catch_up_rx) = std::sync::mpsc::channel::<()>();
        let (caught_up_tx, caught_up) = std::sync::mpsc::channel::<bool>();
        let c: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "demo-test-reader")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "10")
            .create()
            .expect("reader");
        let md = c
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("the demo's topic metadata");
        let partitions = md.topics()[0].partitions().len() as i32;
        assert!(partitions > 0, "{topic} has partitions");
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
                .unwrap();
        }
        c.assign(&tpl).expect("assign");
        let (out, topic) = (records.clone(), topic.to_owned());
        std::thread::spawn(move || {
            let mut next = vec![0i64; partitions as usize];
            let mut ends: Option<(Vec<i64>, Instant)> = None;
            loop {
                if let Some(Ok(m)) = c.poll(Duration::from_millis(20)) {
                    let id = m
                        .headers()
                        .and_then(|h| {
                            use rdkafka::message::Headers;
                            h.iter().find(|h| h.key == "message-id")?.value
                        })
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_default();
                    out.lock().push((id, m.partition(), m.offset()));
                    next[m.partition() as usize] = m.offset() + 1;
                }
                if ends.is_none() && catch_up_rx.try_recv().is_ok() {
                    let e = (0..partitions)
                        .map(|p| {
                            c.fetch_watermarks(&topic, p, Duration::from_secs(5))
                                .map_or(i64::MAX, |w| w.1)
                        })
                        .collect();
                    ends = Some((e, Instant::now() + Duration::from_secs(20)));
                }
                if let Some((e, deadline)) = &ends {
                    let done = next.iter().zip(e).all(|(n, e)| n >= e);
                    if done || Instant::now() > *deadline {
                        let _ = caught_up_tx.send(done);
                        return;
                    }
                }
            }
        });
        TopicReader {
            records,
            catch_up: Mutex::new(catch_up),
            caught_up: Mutex::new(caught_up),
        }
    }

    /// Blocks until the reader has every record up to the end offsets of now (at most
    /// 25 s); whether it did.
    fn catch_up(&self) -> bool {
        self.catch_up.lock().send(()).is_ok()
            && self
                .caught_up
                .lock()
                .recv_timeout(Duration::from_secs(25))
                .unwrap_or(false)
    }
}

/// How often each id occurs.
fn count<'a>(ids: impl Iterator<Item = &'a String>) -> HashMap<&'a str, usize> {
    ids.fold(HashMap::new(), |mut m, id| {
        *m.entry(id.as_str()).or_default() += 1;
        m
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_accounts_for_every_message_id_and_shows_every_path() {
    let outcomes = capture_outcomes();
    let out = SharedOut::default();
    let opts = DemoOptions {
        duration: Some(Duration::from_secs(4)),
        rate: 100.0,
        failures: FailurePlan {
            transient_share: 0.2,
            permanent_share: 0.1,
        },
        duplicate_share: 0.1,
        outage: None,
        progress: ProgressStyle::Lines {
            every: Duration::from_secs(1),
            clear_line: false,
        },
        stop_draining: CancellationToken::new(),
    };
    let plan = opts.failures;
    let run = tokio::spawn(demo::run(
        config(),
        opts,
        CancellationToken::new(),
        out.clone(),
    ));
    let url = metrics_url(&out).await;
    let bootstrap = banner_field(&out, "broker");
    // The source topic is read while the demo runs; once the demo has stopped its producer
    // (it says "Draining"), the topic is final and the reader catches up with its end
    // before the demo goes on and, in the end, drops its broker.
    let reader = Arc::new(TopicReader::start(&bootstrap, "events"));
    let caught_up = Arc::new(Mutex::new(None));
    {
        let (reader, caught_up) = (reader.clone(), caught_up.clone());
        out.on_line("Draining", move || {
            *caught_up.lock() = Some(reader.catch_up());
        });
    }
    let (status, body) = http_get(&url).await;
    assert_eq!(status, 200, "{url} answers during the run");
    assert!(body.contains("courier_in_flight "), "{body}");
    // The counters move while the demo runs.
    wait_for_async("publishes and processing in /metrics", T, || async {
        let (status, body) = http_get(&url).await;
        status == 200
            && body.contains("courier_messages_published_total{topic=\"events\"}")
            && metric_sum(
                &body,
                "courier_messages_processed_total",
                &["outcome=\"ok\""],
            ) > 0.0
    })
    .await;

    let summary = tokio::time::timeout(Duration::from_secs(40), run)
        .await
        .expect("the demo ends within its drain bound")
        .expect("the demo task does not panic")
        .expect("the demo runs");
    let text = out.text();
    assert_eq!(summary.drain, DrainEnd::Complete, "{text}");
    assert_eq!(summary.abandoned, 0);
    assert_eq!(
        *caught_up.lock(),
        Some(true),
        "the test read the whole source topic before the demo ended"
    );

    // Accounting by message id: every record on the source topic was processed ok, skipped
    // as a duplicate or dead-lettered, as the failure plan says for its id.
    let records = reader.records.lock().clone();
    let o = std::mem::take(&mut *outcomes.lock());
    let produced = count(records.iter().map(|r| &r.0));
    let (ok, dup, dead) = (
        count(o.ok.iter()),
        count(o.duplicates.iter()),
        count(o.dead_lettered.iter()),
    );
    println!(
        "demo accounting by id: {} records of {} ids on the source topic; ok {}, duplicates {}, \
         dead-lettered {}",
        records.len(),
        produced.len(),
        o.ok.len(),
        o.duplicates.len(),
        o.dead_lettered.len()
    );
    let mut wrong = Vec::new();
    for (id, n) in &produced {
        let (k, d, x) = (
            ok.get(id).copied().unwrap_or(0),
            dup.get(id).copied().unwrap_or(0),
            dead.get(id).copied().unwrap_or(0),
        );
        let fine = match plan.fate(id.as_bytes()) {
            Fate::Succeeds | Fate::Transient { .. } => k == 1 && x == 0 && d == n - 1,
            Fate::Fatal | Fate::Exhausted => k == 0 && x >= 1 && x + d == *n,
        };
        if !fine {
            wrong.push(format!(
                "{id} ({:?}): {n} on the topic, ok {k}, duplicate {d}, dead-lettered {x}",
                plan.fate(id.as_bytes())
            ));
        }
    }
    for id in ok.keys().chain(dup.keys()).chain(dead.keys()) {
        if !produced.contains_key(id) {
            wrong.push(format!("{id}: finished but never on the source topic"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} ids not accounted for, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
    // The summary's numbers are these ids, counted.
    assert_eq!(summary.produced, records.len() as u64, "{summary:?}");
    assert_eq!(summary.ok, o.ok.len() as u64, "{summary:?}");
    assert_eq!(summary.duplicates, o.duplicates.len() as u64, "{summary:?}");
    assert_eq!(
        summary.dead_lettered,
        o.dead_lettered.len() as u64,
        "{summary:?}"
    );
    assert!(summary.adds_up(), "{summary:?}\n{text}");
    assert!(text.contains(&summary.check_line()), "{text}");

    // Every path showed.
    assert!(
        summary.produced >= 200,
        "about 400 events in 4 s: {summary:?}"
    );
    assert!(
        summary.retried[0] > 0 && summary.retried[2] > 0,
        "{summary:?}"
    );
    assert!(summary.ok_after_retry > 0, "{summary:?}");
    assert!(
        summary.dead_lettered > 0 && summary.fatal > 0,
        "{summary:?}"
    );
    assert!(
        summary.dead_lettered > summary.fatal,
        "some exhausted: {summary:?}"
    );
    assert!(summary.duplicates > 0, "{summary:?}");
    assert!(text.contains("kcat -C -b 127.0.0.1:"), "{text}");
}

/// Runs the courier binary with `args` and `env`, killing it after `timeout`.
fn run_binary(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> std::process::Output {
    output_within(courier_command(args).envs(env.iter().copied()), timeout)
}

#[test]
fn the_binary_runs_for_its_duration_and_adds_up() {
    let output = run_binary(
        &["demo", "--duration", "3s"],
        &[
            ("KAFKA_RETRY_BACKOFF", "200ms"),
            ("OPS_ADDR", "127.0.0.1:0"),
            ("HTTP_ADDR", "127.0.0.1:0"),
            ("LOG_LEVEL", "error,courier::message=off"),
        ],
        Duration::from_secs(45),
    );
    let (stdout, _) = successful_output(&output);
    let check = stdout
        .lines()
        .find(|l| l.starts_with("produced "))
        .unwrap_or_else(|| panic!("a summary line in:\n{stdout}"));
    assert!(check.ends_with('✓'), "{check}");
    let numbers: Vec<u64> = check
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(numbers.len(), 4, "{check}");
    assert!(numbers[0] > 0, "{check}");
    assert_eq!(numbers[0], numbers[1] + numbers[2] + numbers[3], "{check}");
    assert!(stdout.contains("The --duration is over"), "{stdout}");
}

#[test]
fn bad_flags_name_the_flag() {
    let quick = Duration::from_secs(20);
    let local = [("OPS_ADDR", "127.0.0.1:0"), ("HTTP_ADDR", "127.0.0.1:0")];
    let output = run_binary(
        &[
            "demo",
            "--transient-share",
            "0.7",
            "--permanent-share",
            "0.5",
        ],
        &local,
        quick,
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--permanent-share=0.5"), "{stderr}");
    let output = run_binary(&["demo", "--duplicate-share", "2"], &local, quick);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--duplicate-share"), "{stderr}");
    let output = run_binary(&["demo", "--duration", "soon"], &local, quick);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--duration"), "{stderr}");
}
