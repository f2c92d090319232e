//! Shared test harness: a mock cluster per test, random topic and group names, port 0, and
//! Kafka helpers that speak the real protocol (rdkafka clients) to look at topics.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use courier::config::Config;
use courier::model::{Delivery, Headers};
use courier::service::{ProcessError, Processor};
use courier::transport::DevBroker;
use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// A random suffix for names.
pub fn rand_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_owned()
}

/// A mock cluster with its own topic names.
pub struct TestKafka {
    pub broker: DevBroker,
    pub source: String,
    pub prefix: String,
    pub dlq: String,
    pub group: String,
    pub partitions: i32,
}

impl TestKafka {
    /// A cluster with a source topic of `partitions` partitions, 3 retry topics and a DLQ.
    pub fn new(partitions: i32) -> Self {
        courier::observability::logging::init_for_tests();
        let id = rand_id();
        let k = TestKafka {
            broker: DevBroker::start().expect("mock cluster starts"),
            source: format!("src-{id}"),
            prefix: format!("src-{id}-retry"),
            dlq: format!("src-{id}-dlq"),
            group: format!("group-{id}"),
            partitions,
        };
        for t in k.all_topics() {
            k.broker.create_topic(&t, partitions).expect("create topic");
        }
        k
    }

    pub fn retry_topic(&self, n: u32) -> String {
        format!("{}-{n}", self.prefix)
    }

    pub fn all_topics(&self) -> Vec<String> {
        let mut v = vec![self.source.clone(), self.dlq.clone()];
        v.extend((1..=3).map(|n| self.retry_topic(n)));
        v
    }

    pub fn bootstrap(&self) -> String {
        self.broker.bootstrap_servers()
    }

    /// The environment of a courier service against this cluster; `extra` overrides.
    pub fn env(&self, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = vec![
            ("KAFKA_BROKERS", self.bootstrap()),
            ("KAFKA_CONSUMER_TOPICS", self.source.clone()),
            ("KAFKA_PRODUCER_TOPIC", self.source.clone()),
            ("KAFKA_CONSUMER_GROUP_ID", self.group.clone()),
            ("KAFKA_RETRY_TOPIC_PREFIX", self.prefix.clone()),
            ("KAFKA_DLQ_TOPIC", self.dlq.clone()),
            ("KAFKA_RETRY_BACKOFF", "300ms".into()),
            ("KAFKA_CONSUMER_COMMIT_INTERVAL_MS", "100".into()),
            ("KAFKA_CONSUMER_SHUTDOWN_TIMEOUT_MS", "5000".into()),
            ("HTTP_ADDR", "127.0.0.1:0".into()),
            ("OPS_ADDR", "127.0.0.1:0".into()),
            ("HEALTH_PROBE_INTERVAL_MS", "100".into()),
            ("HEALTH_PROBE_TIMEOUT_MS", "500".into()),
            ("HEALTH_MAX_BACKOFF_MS", "300".into()),
            ("KAFKA_PRODUCER_LINGER_MS", "0".into()),
            ("RDKAFKA_SESSION_TIMEOUT_MS", "6000".into()),
            ("RDKAFKA_HEARTBEAT_INTERVAL_MS", "500".into()),
            ("RDKAFKA_TOPIC_METADATA_REFRESH_INTERVAL_MS", "1000".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (k, v) in extra {
            env.retain(|(ek, _)| ek != k);
            env.push((k.to_string(), v.to_string()));
        }
        env
    }

    pub fn config(&self, extra: &[(&str, &str)]) -> Config {
        Config::load_from(None, &self.env(extra)).expect("test configuration is valid")
    }

    fn producer(&self) -> FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("linger.ms", "0")
            .create()
            .expect("producer")
    }

    /// Produces messages `(key, payload, headers)` to `topic`, waiting for every ack.
    pub async fn produce(&self, topic: &str, messages: Vec<(Option<Vec<u8>>, Vec<u8>, Headers)>) {
        self.produce_to(topic, None, messages).await
    }

    /// [`TestKafka::produce`] to one `partition` (`None`: by key).
    pub async fn produce_to(
        &self,
        topic: &str,
        partition: Option<i32>,
        messages: Vec<(Option<Vec<u8>>, Vec<u8>, Headers)>,
    ) {
        let p = self.producer();
        let futs = messages.into_iter().map(|(key, payload, headers)| {
            let p = p.clone();
            let topic = topic.to_owned();
            async move {
                let h = courier::transport::headers::write(&headers);
                let mut r: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic)
                    .payload(payload.as_slice())
                    .headers(h);
                if let Some(k) = &key {
                    r = r.key(k.as_slice());
                }
                if let Some(n) = partition {
                    r = r.partition(n);
                }
                p.send(r, Duration::from_secs(10)).await.expect("produce");
            }
        });
        futures::future::join_all(futs).await;
    }

    /// Produces `n` envelopes with ids `{prefix}-{i}` and keys `key-{i % keys}`.
    pub async fn produce_events(&self, prefix: &str, n: usize, keys: usize) -> Vec<String> {
        let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
        let msgs = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let payload = serde_json::json!({"id": id, "type": "test_event", "seq": i})
                    .to_string()
                    .into_bytes();
                (
                    Some(format!("key-{}", i % keys.max(1)).into_bytes()),
                    payload,
                    vec![("message-id".into(), Some(id.clone().into_bytes()))],
                )
            })
            .collect();
        self.produce(&self.source, msgs).await;
        ids
    }

    /// Reads every message now in `topic` (all partitions, from the beginning), waiting up
    /// to `timeout` for at least `at_least` of them.
    pub fn read_all(&self, topic: &str, at_least: usize, timeout: Duration) -> Vec<Delivery> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("group.id", format!("reader-{}", rand_id()))
            .set("enable.auto.commit", "false")
            .set("fetch.message.max.bytes", "10485760")
            .create()
            .expect("reader");
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        c.assign(&tpl).unwrap();
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        let mut quiet_since = Instant::now();
        while Instant::now() < deadline {
            match c.poll(Duration::from_millis(50)) {
                Some(Ok(m)) => {
                    quiet_since = Instant::now();
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
                _ => {
                    if out.len() >= at_least && quiet_since.elapsed() > Duration::from_millis(300) {
                        break;
                    }
                }
            }
        }
        out
    }

    /// The group's committed offset per partition of `topic` (-1001 = none).
    pub fn committed(&self, topic: &str) -> Vec<i64> {
        self.try_committed(topic).expect("committed offsets")
    }

    /// [`TestKafka::committed`], or None when the broker does not answer within 15 s.
    pub fn try_committed(&self, topic: &str) -> Option<Vec<i64>> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("group.id", &self.group)
            .create()
            .expect("offset reader");
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.partitions {
            tpl.add_partition(topic, p);
        }
        let got = c.committed_offsets(tpl, Duration::from_secs(15)).ok()?;
        Some(
            (0..self.partitions)
                .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => -1001,
                })
                .collect(),
        )
    }

    /// Asserts the group committed every partition of `topic` up to its end (an empty
    /// partition needs no commit).
    pub fn assert_committed_to_end(&self, topic: &str) {
        let ends = self.end_offsets(topic);
        let committed: Vec<i64> = self
            .committed(topic)
            .into_iter()
            .zip(&ends)
            .map(|(c, e)| if *e == 0 && c < 0 { 0 } else { c })
            .collect();
        assert_eq!(
            committed, ends,
            "committed offsets of {topic} equal its end offsets"
        );
    }

    /// High watermark per partition of `topic`.
    pub fn end_offsets(&self, topic: &str) -> Vec<i64> {
        self.try_end_offsets(topic).expect("watermarks")
    }

    /// [`TestKafka::end_offsets`], or None when the broker does not answer within 15 s.
    pub fn try_end_offsets(&self, topic: &str) -> Option<Vec<i64>> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create()
            .expect("watermark reader");
        (0..self.partitions)
            .map(|p| {
                c.fetch_watermarks(topic, p, Duration::from_secs(15))
                    .ok()
                    .map(|w| w.1)
            })
            .collect()
    }
}

/// What a [`ScriptedProcessor`] does with one attempt.
#[derive(Debug, Clone)]
pub enum Step {
    Ok,
    Retry(&'static str),
    Fatal(&'static str),
    Sleep(Duration),
    /// Waits until the semaphore has a permit or is closed (the test closes it to release),
    /// then succeeds.
    Hold(Arc<tokio::sync::Semaphore>),
}

/// One processing call as the processor saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub id: Option<String>,
    pub delivery: Delivery,
    pub at_ms: i64,
    pub ok: bool,
}

/// A processor scripted per message id: each call takes the next step for that id (the last
/// step repeats; no script means Ok). Records every call.
#[derive(Default)]
pub struct ScriptedProcessor {
    pub scripts: Mutex<HashMap<String, Vec<Step>>>,
    pub seen: Mutex<Vec<Seen>>,
    pub current: std::sync::atomic::AtomicUsize,
    pub max_concurrent: std::sync::atomic::AtomicUsize,
    pub default_sleep: Option<Duration>,
}

impl ScriptedProcessor {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn with_sleep(d: Duration) -> Arc<Self> {
        Arc::new(ScriptedProcessor {
            default_sleep: Some(d),
            ..Default::default()
        })
    }

    pub fn script(&self, id: &str, steps: Vec<Step>) {
        self.scripts.lock().insert(id.to_owned(), steps);
    }

    pub fn ok_ids(&self) -> Vec<String> {
        self.seen
            .lock()
            .iter()
            .filter(|s| s.ok)
            .filter_map(|s| s.id.clone())
            .collect()
    }

    pub fn calls(&self) -> usize {
        self.seen.lock().len()
    }

    pub fn calls_for(&self, id: &str) -> Vec<Seen> {
        self.seen
            .lock()
            .iter()
            .filter(|s| s.id.as_deref() == Some(id))
            .cloned()
            .collect()
    }
}

#[async_trait]
impl Processor for ScriptedProcessor {
    async fn process(&self, d: &Delivery) -> Result<(), ProcessError> {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.current.fetch_add(1, SeqCst) + 1;
        self.max_concurrent.fetch_max(now, SeqCst);
        let id = d.message_id().map(str::to_owned);
        let at_ms = courier::model::now_ms();
        let step = {
            let mut scripts = self.scripts.lock();
            match id.as_ref().and_then(|i| scripts.get_mut(i)) {
                Some(steps) if steps.len() > 1 => steps.remove(0),
                Some(steps) => steps[0].clone(),
                None => Step::Ok,
            }
        };
        if let Some(s) = self.default_sleep {
            tokio::time::sleep(s).await;
        }
        let result = match step {
            Step::Ok => Ok(()),
            Step::Retry(r) => Err(ProcessError::retryable(r)),
            Step::Fatal(r) => Err(ProcessError::fatal(r)),
            Step::Sleep(d) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
            Step::Hold(gate) => {
                let _ = gate.acquire().await;
                Ok(())
            }
        };
        self.seen.lock().push(Seen {
            id,
            delivery: d.clone(),
            at_ms,
            ok: result.is_ok(),
        });
        self.current.fetch_sub(1, SeqCst);
        result
    }
}

/// Waits until `cond` holds, polling every 20 ms, failing after `timeout` with `what`.
pub async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `url` until it answers 200, failing after `timeout` with the last status.
pub async fn wait_ready(url: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let status = probe(url).await;
        if status == 200 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{url} not 200 within {timeout:?} (last: {status}, 0 = no answer)"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The status of a GET of `url`; 0 when nothing listens there or no answer came within 2 s.
pub async fn probe(url: &str) -> u16 {
    let host = url
        .strip_prefix("http://")
        .and_then(|r| r.split('/').next())
        .expect("an http:// URL");
    if tokio::net::TcpStream::connect(host).await.is_err() {
        return 0;
    }
    tokio::time::timeout(Duration::from_secs(2), http_get(url))
        .await
        .map_or(0, |r| r.0)
}

/// A free loopback port (bound and released) for a child process.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("local address")
        .port()
}

/// A child process that is killed (SIGKILL) and reaped if the test ends before it does.
pub struct ChildProcess(Option<std::process::Child>);

impl ChildProcess {
    /// Spawns `cmd`.
    pub fn spawn(cmd: &mut std::process::Command) -> Self {
        ChildProcess(Some(cmd.spawn().expect("the child process starts")))
    }

    /// Its process id.
    pub fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, std::process::Child::id)
    }

    /// Its stderr, if piped (once).
    pub fn take_stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.0.as_mut()?.stderr.take()
    }

    /// Sends `signal` (e.g. `TERM`) with the `kill` command (no libc dependency).
    pub fn signal(&self, signal: &str) {
        let ok = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.id().to_string())
            .status()
            .expect("kill runs");
        assert!(ok.success(), "kill -{signal} {}", self.id());
    }

    /// SIGKILL at once (no `kill` process in between), then reaps it.
    pub fn kill_9(&mut self) -> std::process::ExitStatus {
        let mut child = self.0.take().expect("a running child");
        child.kill().expect("SIGKILL");
        child.wait().expect("reap the killed child")
    }

    /// Its stdout, if piped (once).
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.0.as_mut()?.stdout.take()
    }

    /// Its exit status if it has exited; kills it and fails the test once `deadline` passed.
    fn poll_exit(
        &mut self,
        deadline: Instant,
        timeout: Duration,
    ) -> Option<std::process::ExitStatus> {
        let child = self.0.as_mut().expect("a running child");
        if let Some(status) = child.try_wait().expect("try_wait") {
            self.0 = None;
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            self.0 = None;
            panic!("the child process did not exit within {timeout:?}");
        }
        None
    }

    /// Waits for it to exit, at most `timeout`; kills it and fails the test after that.
    pub async fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.poll_exit(deadline, timeout) {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// [`ChildProcess::wait`] for a test without a runtime.
    pub fn wait_blocking(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.poll_exit(deadline, timeout) {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The sum of the series of metric `name` (Prometheus text) whose labels contain every one
/// of `labels`, e.g. `outcome="duplicate"`.
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// [`wait_for`] with an async condition.
pub async fn wait_for_async<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A header's value as text.
pub fn header(d: &Delivery, name: &str) -> Option<String> {
    d.header(name)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// A plain HTTP/1.1 request over loopback: (status, body).
pub async fn http_request(
    method: &str,
    url: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let mut stream = tokio::net::TcpStream::connect(host).await.expect("connect");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(ct) = content_type {
        req.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await.expect("write");
    stream.write_all(body).await.expect("write body");
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// GET over loopback: (status, body).
pub async fn http_get(url: &str) -> (u16, String) {
    http_request("GET", url, None, b"").await
}
