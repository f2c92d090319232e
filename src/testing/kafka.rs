//! Kafka from the outside, as a test sees it: a mock cluster per test ([`TestKafka`]) and
//! rdkafka clients of the test's own ([`Kafka`]) that produce with headers, read topics
//! back as [`Delivery`], and read end offsets and a group's committed offsets. Every call
//! that waits on the broker has a deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::env::{Names, ServiceEnv, QUICK};
use crate::app::consumer::RunningConsumer;
use crate::config::Config;
use crate::model::{Delivery, Headers, OutgoingRecord, HEADER_MESSAGE_ID};
use crate::service::Processor;
use crate::transport::consumer::to_delivery;
use crate::transport::{headers, DevBroker};

/// A test message: (key, payload, headers).
pub type TestMessage = (Option<Vec<u8>>, Vec<u8>, Headers);

/// How long a test client waits for one answer of the broker.
const BROKER_ANSWER: Duration = Duration::from_secs(15);

/// What librdkafka reports for a partition without a committed offset.
const NO_OFFSET: i64 = -1001;

/// A cluster as a test sees it: its address and the partitions of its test topics.
#[derive(Debug, Clone)]
pub struct Kafka {
    /// `host:port` of the broker.
    pub bootstrap: String,
    /// Partitions of every topic the test looks at.
    pub partitions: i32,
}

impl Kafka {
    /// The cluster at `bootstrap`, whose test topics have `partitions` partitions.
    pub fn new(bootstrap: impl Into<String>, partitions: i32) -> Kafka {
        Kafka {
            bootstrap: bootstrap.into(),
            partitions,
        }
    }

    /// A consumer client: in `group` for committed offsets, else outside any group.
    fn client(&self, group: Option<&str>) -> BaseConsumer {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap)
            .set("enable.auto.commit", "false")
            .set("fetch.message.max.bytes", "10485760");
        if let Some(g) = group {
            c.set("group.id", g);
        }
        c.create().expect("a test consumer client")
    }

    /// A producer with `properties` over rdkafka's defaults (e.g. `acks`, `linger.ms`).
    pub fn producer(&self, properties: &[(&str, &str)]) -> TestProducer {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap);
        for (k, v) in properties {
            c.set(*k, *v);
        }
        TestProducer(c.create().expect("a test producer"))
    }

    /// Produces `messages` to `topic` (to `partition`, or by key), all at once, waiting for
    /// every acknowledgement.
    pub async fn produce(&self, topic: &str, partition: Option<i32>, messages: Vec<TestMessage>) {
        let records = messages
            .into_iter()
            .map(|(key, payload, headers)| OutgoingRecord {
                topic: topic.to_owned(),
                partition,
                key,
                payload: Some(payload),
                headers,
            });
        self.producer(&[("linger.ms", "0")]).send_all(records).await;
    }

    /// Every message now in `topic` (all partitions, from the beginning), waiting up to
    /// `timeout` for at least `at_least` of them and then until 300 ms pass without one.
    pub fn read_all(&self, topic: &str, at_least: usize, timeout: Duration) -> Vec<Delivery> {
        let c = self.reader(topic);
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        let mut quiet_since = Instant::now();
        while Instant::now() < deadline {
            match c.poll(Duration::from_millis(50)) {
                Some(Ok(m)) => {
                    quiet_since = Instant::now();
                    out.push(to_delivery(&m));
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

    /// Every message of `topic` up to its end offsets of now, read from the beginning;
    /// fewer when `timeout` passes first.
    pub fn read_to_end(&self, topic: &str, timeout: Duration) -> Vec<Delivery> {
        let c = self.reader(topic);
        let ends: i64 = self.end_offsets(topic).iter().sum();
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while Instant::now() < deadline && (out.len() as i64) < ends {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                out.push(to_delivery(&m));
            }
        }
        out
    }

    /// A client assigned every partition of `topic` from the beginning.
    fn reader(&self, topic: &str) -> BaseConsumer {
        let c = self.client(Some(&format!("reader-{}", super::rand_id())));
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .expect("a partition to read");
        }
        c.assign(&tpl).expect("assign the partitions to read");
        c
    }

    /// (low, high) watermark per partition of `topic`.
    ///
    /// # Errors
    /// When the broker does not answer within 15 s.
    pub fn watermarks(&self, topic: &str) -> Result<Vec<(i64, i64)>, KafkaError> {
        let c = self.client(None);
        (0..self.partitions)
            .map(|p| c.fetch_watermarks(topic, p, BROKER_ANSWER))
            .collect()
    }

    /// The end offset (high watermark) per partition of `topic`, or None when the broker
    /// does not answer within 15 s.
    pub fn try_end_offsets(&self, topic: &str) -> Option<Vec<i64>> {
        self.end_offsets_or_error(topic).ok()
    }

    /// [`Kafka::try_end_offsets`]; fails the test, with the broker's error, when there is no
    /// answer.
    pub fn end_offsets(&self, topic: &str) -> Vec<i64> {
        self.end_offsets_or_error(topic)
            .unwrap_or_else(|e| panic!("no end offsets of {topic}: {e}"))
    }

    fn end_offsets_or_error(&self, topic: &str) -> Result<Vec<i64>, KafkaError> {
        let w = self.watermarks(topic)?;
        Ok(w.into_iter().map(|(_, high)| high).collect())
    }

    /// The committed offset of `group` per partition of `topic` (-1001: none), or None
    /// when the broker does not answer within 15 s.
    pub fn try_committed(&self, group: &str, topic: &str) -> Option<Vec<i64>> {
        self.committed_or_error(group, topic).ok()
    }

    /// [`Kafka::try_committed`]; fails the test, with the broker's error, when there is no
    /// answer.
    pub fn committed(&self, group: &str, topic: &str) -> Vec<i64> {
        self.committed_or_error(group, topic)
            .unwrap_or_else(|e| panic!("no committed offsets of {group} on {topic}: {e}"))
    }

    fn committed_or_error(&self, group: &str, topic: &str) -> Result<Vec<i64>, KafkaError> {
        let c = self.client(Some(group));
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.partitions {
            tpl.add_partition(topic, p);
        }
        let got = c.committed_offsets(tpl, BROKER_ANSWER)?;
        Ok((0..self.partitions)
            .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => NO_OFFSET,
            })
            .collect())
    }

    /// Whether `group` committed every partition of `topic` to its end (an empty partition
    /// needs no commit); false too when the broker does not answer in time.
    pub fn committed_to_end(&self, group: &str, topic: &str) -> bool {
        match (
            self.try_committed(group, topic),
            self.try_end_offsets(topic),
        ) {
            (Some(c), Some(e)) => at_end(&c, &e) == e,
            _ => false,
        }
    }

    /// The topics of `topics` that `group` has not committed to their end, one line each
    /// (`{topic}: committed [..], end [..]`); empty when every partition is.
    pub fn not_committed_to_end(&self, group: &str, topics: &[String]) -> Vec<String> {
        topics
            .iter()
            .filter_map(|t| {
                let ends = self.end_offsets(t);
                let c = at_end(&self.committed(group, t), &ends);
                (c != ends).then(|| format!("{t}: committed {c:?}, end {ends:?}"))
            })
            .collect()
    }

    /// Messages of `topics` at or past the committed offsets of `group`: what the group's
    /// next member consumes (again or anew).
    pub fn behind_committed(&self, group: &str, topics: &[String]) -> i64 {
        topics
            .iter()
            .map(|t| {
                let c = self.committed(group, t);
                self.end_offsets(t)
                    .iter()
                    .zip(c)
                    .map(|(e, c)| e - c.max(0))
                    .sum::<i64>()
            })
            .sum()
    }
}

/// Committed offsets with an empty partition's "none" read as 0, to compare with `ends`.
fn at_end(committed: &[i64], ends: &[i64]) -> Vec<i64> {
    committed
        .iter()
        .zip(ends)
        .map(|(c, e)| if *e == 0 && *c < 0 { 0 } else { *c })
        .collect()
}

/// An event envelope `{"id", "type": kind, "seq"}` for `topic`, keyed `key`, with its
/// `message-id` header.
pub fn event_record(topic: &str, id: &str, kind: &str, seq: usize, key: String) -> OutgoingRecord {
    OutgoingRecord {
        topic: topic.to_owned(),
        partition: None,
        key: Some(key.into_bytes()),
        payload: Some(
            serde_json::json!({"id": id, "type": kind, "seq": seq})
                .to_string()
                .into_bytes(),
        ),
        headers: vec![(HEADER_MESSAGE_ID.into(), Some(id.as_bytes().to_vec()))],
    }
}

/// A producer of the test's own (not courier's).
#[derive(Clone)]
pub struct TestProducer(FutureProducer);

impl TestProducer {
    /// Sends `record` (headers written as courier writes them) and waits up to 30 s for its
    /// acknowledgement: (partition, offset). Fails the test when it is refused.
    pub async fn send(&self, record: &OutgoingRecord) -> (i32, i64) {
        let hs = headers::write(&record.headers);
        let mut r: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&record.topic).headers(hs);
        if let Some(k) = &record.key {
            r = r.key(k.as_slice());
        }
        if let Some(v) = &record.payload {
            r = r.payload(v.as_slice());
        }
        if let Some(p) = record.partition {
            r = r.partition(p);
        }
        self.0
            .send(r, Duration::from_secs(30))
            .await
            .map(|d| (d.partition, d.offset))
            .unwrap_or_else(|(e, _)| panic!("produce to {}: {e}", record.topic))
    }

    /// Sends every record at once; (partition, offset) of each, in order.
    pub async fn send_all(
        &self,
        records: impl IntoIterator<Item = OutgoingRecord>,
    ) -> Vec<(i32, i64)> {
        let records: Vec<OutgoingRecord> = records.into_iter().collect();
        futures::future::join_all(records.iter().map(|r| self.send(r))).await
    }
}

/// A mock cluster of this test's own, with a source topic, its retry topics and a DLQ
/// (fresh [`Names`], reachable as fields: `k.source`, `k.group`, `k.retry_topic(1)`), and
/// the environment of a courier service against it.
pub struct TestKafka {
    /// The in-process mock cluster.
    pub broker: DevBroker,
    /// Partitions of every topic.
    pub partitions: i32,
    names: Names,
}

impl std::ops::Deref for TestKafka {
    type Target = Names;

    fn deref(&self) -> &Names {
        &self.names
    }
}

impl TestKafka {
    /// A cluster with every topic of fresh [`Names`] at `partitions` partitions.
    pub fn new(partitions: i32) -> Self {
        crate::observability::logging::init_for_tests();
        let broker = DevBroker::start().expect("mock cluster starts");
        let names = Names::new("src");
        names
            .create_on(&broker, partitions)
            .expect("create the test topics");
        TestKafka {
            broker,
            partitions,
            names,
        }
    }

    /// Its topic and group names.
    pub fn names(&self) -> &Names {
        &self.names
    }

    /// Its bootstrap address.
    pub fn bootstrap(&self) -> String {
        self.broker.bootstrap_servers()
    }

    /// The clients' view of it.
    pub fn kafka(&self) -> Kafka {
        Kafka::new(self.bootstrap(), self.partitions)
    }

    /// The environment of a courier service against this cluster ([`QUICK`] settings);
    /// `extra` overrides.
    pub fn env(&self, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        self.service_env(extra).into_vars()
    }

    /// [`TestKafka::env`] as a [`ServiceEnv`].
    pub fn service_env(&self, extra: &[(&str, &str)]) -> ServiceEnv {
        ServiceEnv::against(&self.bootstrap(), &self.names)
            .with(QUICK)
            .with(extra)
    }

    /// The configuration of [`TestKafka::env`].
    pub fn config(&self, extra: &[(&str, &str)]) -> Config {
        self.service_env(extra).config()
    }

    /// courier's consumer in this process with `processor` and [`TestKafka::config`].
    pub async fn consumer(
        &self,
        processor: Arc<dyn Processor>,
        extra: &[(&str, &str)],
    ) -> (RunningConsumer, tokio_util::sync::CancellationToken) {
        super::start_consumer(self.config(extra), processor).await
    }

    /// Produces `messages` (key, payload, headers) to `topic`, waiting for every ack.
    pub async fn produce(&self, topic: &str, messages: Vec<TestMessage>) {
        self.kafka().produce(topic, None, messages).await
    }

    /// [`TestKafka::produce`] to one `partition` (`None`: by key).
    pub async fn produce_to(
        &self,
        topic: &str,
        partition: Option<i32>,
        messages: Vec<TestMessage>,
    ) {
        self.kafka().produce(topic, partition, messages).await
    }

    /// Produces `n` envelopes to the source topic with ids `{prefix}-{i}` and keys
    /// `key-{i % keys}`; returns the ids.
    pub async fn produce_events(&self, prefix: &str, n: usize, keys: usize) -> Vec<String> {
        let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
        let key = |i: usize| format!("key-{}", i % keys.max(1));
        let records = ids
            .iter()
            .enumerate()
            .map(|(i, id)| event_record(&self.names.source, id, "test_event", i, key(i)));
        self.kafka()
            .producer(&[("linger.ms", "0")])
            .send_all(records)
            .await;
        ids
    }

    /// [`Kafka::read_all`].
    pub fn read_all(&self, topic: &str, at_least: usize, timeout: Duration) -> Vec<Delivery> {
        self.kafka().read_all(topic, at_least, timeout)
    }

    /// The group's committed offset per partition of `topic` (-1001 = none).
    pub fn committed(&self, topic: &str) -> Vec<i64> {
        self.kafka().committed(&self.names.group, topic)
    }

    /// [`TestKafka::committed`], or None when the broker does not answer within 15 s.
    pub fn try_committed(&self, topic: &str) -> Option<Vec<i64>> {
        self.kafka().try_committed(&self.names.group, topic)
    }

    /// [`TestKafka::committed`] of another `group`.
    pub fn committed_of(&self, group: &str, topic: &str) -> Vec<i64> {
        self.kafka().committed(group, topic)
    }

    /// [`Kafka::committed_to_end`] of the group.
    pub fn committed_to_end(&self, topic: &str) -> bool {
        self.kafka().committed_to_end(&self.names.group, topic)
    }

    /// Asserts the group committed every partition of `topic` up to its end (an empty
    /// partition needs no commit).
    pub fn assert_committed_to_end(&self, topic: &str) {
        let ends = self.end_offsets(topic);
        let committed = at_end(&self.committed(topic), &ends);
        assert_eq!(
            committed, ends,
            "committed offsets of {topic} equal its end offsets"
        );
    }

    /// High watermark per partition of `topic`.
    pub fn end_offsets(&self, topic: &str) -> Vec<i64> {
        self.kafka().end_offsets(topic)
    }

    /// [`TestKafka::end_offsets`], or None when the broker does not answer within 15 s.
    pub fn try_end_offsets(&self, topic: &str) -> Option<Vec<i64>> {
        self.kafka().try_end_offsets(topic)
    }
}
