//! Configuration: built-in defaults → optional TOML file → environment variables, merged by
//! figment and validated once into a typed [`Config`]. A bad value is reported in one line
//! that names the environment variable, the value and what is accepted.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One environment variable of the contract and the TOML key it sets.
#[derive(Debug, Clone, Copy)]
pub struct Var {
    /// Environment variable name.
    pub env: &'static str,
    /// Dotted TOML key.
    pub key: &'static str,
    /// What it means (one line; the README table and `config/courier.toml` say the same).
    pub help: &'static str,
}

macro_rules! vars {
    ($(($env:literal, $key:literal, $help:literal)),* $(,)?) => {
        /// Every environment variable courier reads, with its TOML key.
        pub const VARS: &[Var] = &[$(Var { env: $env, key: $key, help: $help }),*];
    };
}

vars![
    (
        "KAFKA_BROKERS",
        "kafka.brokers",
        "bootstrap servers, comma-separated"
    ),
    (
        "KAFKA_CLIENT_ID",
        "kafka.client_id",
        "client id sent to the broker"
    ),
    (
        "KAFKA_SECURITY_PROTOCOL",
        "kafka.security_protocol",
        "plaintext, ssl, sasl_plaintext or sasl_ssl"
    ),
    (
        "KAFKA_SASL_MECHANISM",
        "kafka.sasl_mechanism",
        "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"
    ),
    (
        "KAFKA_SASL_USERNAME",
        "kafka.sasl_username",
        "SASL user name"
    ),
    (
        "KAFKA_SASL_PASSWORD",
        "kafka.sasl_password",
        "SASL password (secret: redacted in output)"
    ),
    (
        "KAFKA_SSL_CA_LOCATION",
        "kafka.ssl_ca_location",
        "CA certificate file for TLS"
    ),
    (
        "KAFKA_AUTO_CREATE_TOPICS",
        "kafka.auto_create_topics",
        "provision the source, retry and DLQ topics at start-up"
    ),
    (
        "KAFKA_TOPIC_PARTITIONS",
        "kafka.topic_partitions",
        "partitions of topics courier creates"
    ),
    (
        "KAFKA_TOPIC_REPLICATION",
        "kafka.topic_replication",
        "replication factor of topics courier creates"
    ),
    (
        "KAFKA_PRODUCER_TOPIC",
        "kafka.producer.topic",
        "default topic of the producer"
    ),
    ("KAFKA_PRODUCER_ACKS", "kafka.producer.acks", "0, 1 or all"),
    (
        "KAFKA_PRODUCER_RETRIES",
        "kafka.producer.retries",
        "librdkafka send retries before a delivery fails"
    ),
    (
        "KAFKA_PRODUCER_IDEMPOTENT",
        "kafka.producer.idempotent",
        "idempotent producer (no duplicates from send retries; needs acks=all)"
    ),
    (
        "KAFKA_PRODUCER_COMPRESSION",
        "kafka.producer.compression",
        "none, gzip, snappy, lz4 or zstd"
    ),
    (
        "KAFKA_PRODUCER_LINGER_MS",
        "kafka.producer.linger_ms",
        "how long to wait to fill a batch"
    ),
    (
        "KAFKA_PRODUCER_DELIVERY_TIMEOUT_MS",
        "kafka.producer.delivery_timeout_ms",
        "time limit for one delivery, retries included"
    ),
    (
        "KAFKA_PRODUCER_QUEUE_MAX_MESSAGES",
        "kafka.producer.queue_max_messages",
        "local send queue bound; a full queue answers 503"
    ),
    (
        "KAFKA_PRODUCER_FLUSH_TIMEOUT_MS",
        "kafka.producer.flush_timeout_ms",
        "shutdown deadline for flushing queued messages"
    ),
    (
        "KAFKA_PRODUCER_ALLOWED_TOPICS",
        "kafka.producer.allowed_topics",
        "topics the ingest API may publish to (default: the producer topic)"
    ),
    (
        "KAFKA_CONSUMER_TOPICS",
        "kafka.consumer.topics",
        "source topics, comma-separated (KAFKA_CONSUMER_TOPIC is an alias)"
    ),
    (
        "KAFKA_CONSUMER_GROUP_ID",
        "kafka.consumer.group_id",
        "consumer group"
    ),
    (
        "KAFKA_CONSUMER_WORKERS",
        "kafka.consumer.workers",
        "worker lanes; a key always goes to the same lane"
    ),
    (
        "KAFKA_CONSUMER_MAX_IN_FLIGHT",
        "kafka.consumer.max_in_flight",
        "messages in flight at most; fetching pauses above it"
    ),
    (
        "KAFKA_CONSUMER_MAX_IN_FLIGHT_BYTES",
        "kafka.consumer.max_in_flight_bytes",
        "bytes (key, payload, headers) in flight at most; fetching pauses above it; one larger message is still taken alone"
    ),
    (
        "KAFKA_CONSUMER_ASSIGNMENT_STRATEGY",
        "kafka.consumer.assignment_strategy",
        "cooperative-sticky (only partitions that change owner move), range or roundrobin"
    ),
    (
        "KAFKA_CONSUMER_PAUSE_AFTER_MS",
        "kafka.consumer.pause_after_ms",
        "how long the in-flight bound must hold before fetching pauses"
    ),
    (
        "KAFKA_CONSUMER_RETRY_MAX",
        "kafka.consumer.retry_max",
        "retry levels before the DLQ"
    ),
    (
        "KAFKA_CONSUMER_COMMIT_INTERVAL_MS",
        "kafka.consumer.commit_interval_ms",
        "how often finished offsets are committed"
    ),
    (
        "KAFKA_CONSUMER_SHUTDOWN_TIMEOUT_MS",
        "kafka.consumer.shutdown_timeout_ms",
        "how long shutdown and revoke wait for in-flight messages"
    ),
    (
        "KAFKA_CONSUMER_FETCH_MIN_BYTES",
        "kafka.consumer.fetch_min_bytes",
        "fetch.min.bytes"
    ),
    (
        "KAFKA_CONSUMER_FETCH_MAX_BYTES",
        "kafka.consumer.fetch_max_bytes",
        "fetch.max.bytes"
    ),
    (
        "KAFKA_RETRY_TOPIC_PREFIX",
        "kafka.retry.topic_prefix",
        "retry topics are {prefix}-1..N"
    ),
    (
        "KAFKA_RETRY_BACKOFF",
        "kafka.retry.backoff",
        "delay per retry level, comma-separated; the last repeats"
    ),
    (
        "KAFKA_DLQ_TOPIC",
        "kafka.retry.dlq_topic",
        "dead-letter topic"
    ),
    (
        "DEDUPE_TTL",
        "dedupe.ttl",
        "how long a processed message-id is remembered"
    ),
    (
        "DEDUPE_CAPACITY",
        "dedupe.capacity",
        "most message-ids remembered; the oldest is evicted first"
    ),
    ("COURIER_PROCESSOR", "processor.kind", "log or http"),
    (
        "PROCESSOR_HTTP_URL",
        "processor.http_url",
        "URL the http processor POSTs each payload to"
    ),
    (
        "PROCESSOR_HTTP_TIMEOUT_MS",
        "processor.http_timeout_ms",
        "time limit of one http processor request"
    ),
    (
        "HTTP_ADDR",
        "http.addr",
        "the producer's ingest API address"
    ),
    (
        "HTTP_MAX_BODY_BYTES",
        "http.max_body_bytes",
        "largest accepted request body (413 above)"
    ),
    (
        "HTTP_MAX_BATCH_EVENTS",
        "http.max_batch_events",
        "most events in one ingest request (413 above)"
    ),
    (
        "HTTP_REQUEST_TIMEOUT_MS",
        "http.request_timeout_ms",
        "ingest request deadline, broker acknowledgement included (503 after)"
    ),
    (
        "OPS_ADDR",
        "ops.addr",
        "address of /metrics, /healthz and /readyz"
    ),
    (
        "HEALTH_PROBE_INTERVAL_MS",
        "health.probe_interval_ms",
        "how often the broker is probed with a metadata request"
    ),
    (
        "HEALTH_PROBE_TIMEOUT_MS",
        "health.probe_timeout_ms",
        "time limit of one probe"
    ),
    (
        "HEALTH_MAX_BACKOFF_MS",
        "health.max_backoff_ms",
        "longest wait between probes while the broker is down"
    ),
    (
        "LOG_LEVEL",
        "log.level",
        "debug, info, warn, error, or a RUST_LOG-style filter"
    ),
    ("LOG_FORMAT", "log.format", "json or pretty"),
];

/// Aliases kept from the seed services: (alias, canonical variable).
pub const ALIASES: &[(&str, &str)] = &[("KAFKA_CONSUMER_TOPIC", "KAFKA_CONSUMER_TOPICS")];

/// Prefix of the librdkafka passthrough variables.
pub const RDKAFKA_PREFIX: &str = "RDKAFKA_";

/// The environment variable that sets TOML key `key`, if any.
pub fn env_name_for_key(key: &str) -> Option<&'static str> {
    VARS.iter().find(|v| v.key == key).map(|v| v.env)
}

/// A secret string: redacted in `Debug`, `Display` and serialized output.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself: call only where it is handed to the client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Whether no secret is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "\"[redacted]\""
        })
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "" } else { "[redacted]" })
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "[redacted]" })
    }
}

/// A string that may have been written as a number (`KAFKA_PRODUCER_ACKS=0`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Text(pub String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Any {
            S(String),
            I(i64),
            F(f64),
            B(bool),
        }
        Ok(Text(match Any::deserialize(d)? {
            Any::S(s) => s,
            Any::I(i) => i.to_string(),
            Any::F(f) => f.to_string(),
            Any::B(b) => b.to_string(),
        }))
    }
}

/// A list written as a TOML array or a comma-separated string.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct List(pub Vec<String>);

impl<'de> Deserialize<'de> for List {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Any {
            V(Vec<Text>),
            S(Text),
        }
        let items = match Any::deserialize(d)? {
            Any::V(v) => v.into_iter().map(|t| t.0).collect::<Vec<_>>(),
            Any::S(s) => s.0.split(',').map(str::to_owned).collect(),
        };
        Ok(List(
            items
                .into_iter()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
        ))
    }
}

/// The merged configuration before validation: exactly the TOML file's shape.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    /// `[kafka]`.
    pub kafka: RawKafka,
    /// `[dedupe]`.
    pub dedupe: RawDedupe,
    /// `[processor]`.
    pub processor: RawProcessor,
    /// `[http]`.
    pub http: RawHttp,
    /// `[ops]`.
    pub ops: RawOps,
    /// `[health]`.
    pub health: RawHealth,
    /// `[log]`.
    pub log: RawLog,
    /// `[rdkafka]`: librdkafka properties passed through as they are (dotted names).
    pub rdkafka: BTreeMap<String, Text>,
}

#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawKafka {
    pub brokers: Text,
    pub client_id: Text,
    pub security_protocol: Text,
    pub sasl_mechanism: Text,
    pub sasl_username: Text,
    pub sasl_password: Secret,
    pub ssl_ca_location: Text,
    pub auto_create_topics: bool,
    pub topic_partitions: i64,
    pub topic_replication: i64,
    pub producer: RawProducer,
    pub consumer: RawConsumer,
    pub retry: RawRetry,
}

#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawProducer {
    pub topic: Text,
    pub acks: Text,
    pub retries: i64,
    pub idempotent: bool,
    pub compression: Text,
    pub linger_ms: i64,
    pub delivery_timeout_ms: i64,
    pub queue_max_messages: i64,
    pub flush_timeout_ms: i64,
    pub allowed_topics: List,
}

#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConsumer {
    pub topics: List,
    pub group_id: Text,
    pub workers: i64,
    pub max_in_flight: i64,
    pub max_in_flight_bytes: i64,
    pub assignment_strategy: Text,
    pub pause_after_ms: i64,
    pub retry_max: i64,
    pub commit_interval_ms: i64,
    pub shutdown_timeout_ms: i64,
    pub fetch_min_bytes: i64,
    pub fetch_max_bytes: i64,
}

#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRetry {
    pub topic_prefix: Text,
    pub backoff: List,
    pub dlq_topic: Text,
}

#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDedupe {
    pub ttl: Text,
    pub capacity: i64,
}

#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawProcessor {
    pub kind: Text,
    pub http_url: Text,
    pub http_timeout_ms: i64,
}

#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHttp {
    pub addr: Text,
    pub max_body_bytes: i64,
    pub max_batch_events: i64,
    pub request_timeout_ms: i64,
}

#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawOps {
    pub addr: Text,
}

#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHealth {
    pub probe_interval_ms: i64,
    pub probe_timeout_ms: i64,
    pub max_backoff_ms: i64,
}

#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    pub level: Text,
    pub format: Text,
}

fn t(s: &str) -> Text {
    Text(s.to_owned())
}

impl Default for RawKafka {
    fn default() -> Self {
        RawKafka {
            brokers: t("localhost:9092"),
            client_id: t("courier"),
            security_protocol: t("plaintext"),
            sasl_mechanism: t(""),
            sasl_username: t(""),
            sasl_password: Secret::default(),
            ssl_ca_location: t(""),
            auto_create_topics: false,
            topic_partitions: 6,
            topic_replication: 1,
            producer: RawProducer::default(),
            consumer: RawConsumer::default(),
            retry: RawRetry::default(),
        }
    }
}

impl Default for RawProducer {
    fn default() -> Self {
        RawProducer {
            topic: t("events"),
            acks: t("all"),
            retries: 2_147_483_647,
            idempotent: true,
            compression: t("none"),
            linger_ms: 5,
            delivery_timeout_ms: 30_000,
            queue_max_messages: 100_000,
            flush_timeout_ms: 10_000,
            allowed_topics: List::default(),
        }
    }
}

impl Default for RawConsumer {
    fn default() -> Self {
        RawConsumer {
            topics: List(vec!["events".into()]),
            group_id: t("courier"),
            workers: 8,
            max_in_flight: 1000,
            max_in_flight_bytes: 67_108_864,
            assignment_strategy: t("cooperative-sticky"),
            pause_after_ms: 10_000,
            retry_max: 3,
            commit_interval_ms: 1000,
            shutdown_timeout_ms: 30_000,
            fetch_min_bytes: 1,
            fetch_max_bytes: 52_428_800,
        }
    }
}

impl Default for RawRetry {
    fn default() -> Self {
        RawRetry {
            topic_prefix: t("events-retry"),
            backoff: List(vec!["1s".into(), "10s".into(), "60s".into()]),
            dlq_topic: t("events-dlq"),
        }
    }
}

impl Default for RawDedupe {
    fn default() -> Self {
        RawDedupe {
            ttl: t("1h"),
            capacity: 100_000,
        }
    }
}

impl Default for RawProcessor {
    fn default() -> Self {
        RawProcessor {
            kind: t("log"),
            http_url: t(""),
            http_timeout_ms: 5000,
        }
    }
}

impl Default for RawHttp {
    fn default() -> Self {
        RawHttp {
            addr: t("0.0.0.0:8080"),
            max_body_bytes: 1_048_576,
            max_batch_events: 1000,
            request_timeout_ms: 10_000,
        }
    }
}

impl Default for RawOps {
    fn default() -> Self {
        RawOps {
            addr: t("0.0.0.0:9090"),
        }
    }
}

impl Default for RawHealth {
    fn default() -> Self {
        RawHealth {
            probe_interval_ms: 2000,
            probe_timeout_ms: 2000,
            max_backoff_ms: 10_000,
        }
    }
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: t("info"),
            format: t("json"),
        }
    }
}

/// A configuration error: one line naming the variable, the value and what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// `KAFKA_PRODUCER_ACKS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acks {
    /// No acknowledgement.
    None,
    /// The leader's.
    Leader,
    /// All in-sync replicas'.
    All,
}

/// `KAFKA_PRODUCER_COMPRESSION`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl Compression {
    /// librdkafka's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

/// `KAFKA_CONSUMER_ASSIGNMENT_STRATEGY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum AssignmentStrategy {
    CooperativeSticky,
    Range,
    RoundRobin,
}

impl AssignmentStrategy {
    /// librdkafka's `partition.assignment.strategy` value.
    pub fn as_str(self) -> &'static str {
        match self {
            AssignmentStrategy::CooperativeSticky => "cooperative-sticky",
            AssignmentStrategy::Range => "range",
            AssignmentStrategy::RoundRobin => "roundrobin",
        }
    }
}

/// `KAFKA_SECURITY_PROTOCOL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum SecurityProtocol {
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    /// librdkafka's name.
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }
}

/// `COURIER_PROCESSOR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessorKind {
    /// Validate the envelope and log it.
    Log,
    /// POST each payload to `PROCESSOR_HTTP_URL`.
    Http,
}

/// `LOG_FORMAT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object a line.
    Json,
    /// Human-readable.
    Pretty,
}

/// Connection and security settings shared by every client.
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaConfig {
    /// `KAFKA_BROKERS`.
    pub brokers: String,
    /// `KAFKA_CLIENT_ID`.
    pub client_id: String,
    /// `KAFKA_SECURITY_PROTOCOL`.
    pub security_protocol: SecurityProtocol,
    /// `KAFKA_SASL_MECHANISM`.
    pub sasl_mechanism: Option<String>,
    /// `KAFKA_SASL_USERNAME`.
    pub sasl_username: Option<String>,
    /// `KAFKA_SASL_PASSWORD`.
    pub sasl_password: Option<Secret>,
    /// `KAFKA_SSL_CA_LOCATION`.
    pub ssl_ca_location: Option<String>,
    /// `KAFKA_AUTO_CREATE_TOPICS`.
    pub auto_create_topics: bool,
    /// `KAFKA_TOPIC_PARTITIONS`.
    pub topic_partitions: i32,
    /// `KAFKA_TOPIC_REPLICATION`.
    pub topic_replication: i32,
    /// `RDKAFKA_*` and `[rdkafka]`: librdkafka properties by their dotted names.
    pub passthrough: BTreeMap<String, String>,
}

/// Producer settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ProducerConfig {
    /// `KAFKA_PRODUCER_TOPIC`.
    pub topic: String,
    /// `KAFKA_PRODUCER_ACKS`.
    pub acks: Acks,
    /// `KAFKA_PRODUCER_RETRIES`.
    pub retries: u32,
    /// `KAFKA_PRODUCER_IDEMPOTENT`.
    pub idempotent: bool,
    /// `KAFKA_PRODUCER_COMPRESSION`.
    pub compression: Compression,
    /// `KAFKA_PRODUCER_LINGER_MS`.
    pub linger_ms: u64,
    /// `KAFKA_PRODUCER_DELIVERY_TIMEOUT_MS`.
    pub delivery_timeout: Duration,
    /// `KAFKA_PRODUCER_QUEUE_MAX_MESSAGES`.
    pub queue_max_messages: u32,
    /// `KAFKA_PRODUCER_FLUSH_TIMEOUT_MS`.
    pub flush_timeout: Duration,
    /// `KAFKA_PRODUCER_ALLOWED_TOPICS` (always holds `topic`).
    pub allowed_topics: Vec<String>,
}

/// Consumer settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerConfig {
    /// `KAFKA_CONSUMER_TOPICS`.
    pub topics: Vec<String>,
    /// `KAFKA_CONSUMER_GROUP_ID`.
    pub group_id: String,
    /// `KAFKA_CONSUMER_WORKERS`.
    pub workers: usize,
    /// `KAFKA_CONSUMER_MAX_IN_FLIGHT`.
    pub max_in_flight: usize,
    /// `KAFKA_CONSUMER_MAX_IN_FLIGHT_BYTES`.
    pub max_in_flight_bytes: usize,
    /// `KAFKA_CONSUMER_ASSIGNMENT_STRATEGY`.
    pub assignment_strategy: AssignmentStrategy,
    /// `KAFKA_CONSUMER_PAUSE_AFTER_MS`.
    pub pause_after: Duration,
    /// `KAFKA_CONSUMER_RETRY_MAX`.
    pub retry_max: u32,
    /// `KAFKA_CONSUMER_COMMIT_INTERVAL_MS`.
    pub commit_interval: Duration,
    /// `KAFKA_CONSUMER_SHUTDOWN_TIMEOUT_MS`.
    pub shutdown_timeout: Duration,
    /// `KAFKA_CONSUMER_FETCH_MIN_BYTES`.
    pub fetch_min_bytes: u32,
    /// `KAFKA_CONSUMER_FETCH_MAX_BYTES`.
    pub fetch_max_bytes: u32,
}

/// The retry chain.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    /// `KAFKA_RETRY_TOPIC_PREFIX`.
    pub topic_prefix: String,
    /// `KAFKA_RETRY_BACKOFF`: delay per level; the last repeats.
    pub backoff: Vec<Duration>,
    /// `KAFKA_DLQ_TOPIC`.
    pub dlq_topic: String,
}

impl RetryConfig {
    /// Retry topic of level `n` (1-based).
    pub fn topic(&self, level: u32) -> String {
        format!("{}-{}", self.topic_prefix, level)
    }

    /// The retry level of `topic`, if it is one of this chain's topics up to `max`.
    pub fn level_of(&self, topic: &str, max: u32) -> Option<u32> {
        let rest = topic.strip_prefix(&self.topic_prefix)?.strip_prefix('-')?;
        let n: u32 = rest.parse().ok()?;
        (n >= 1 && n <= max && rest == n.to_string()).then_some(n)
    }

    /// The delay of retry level `n` (1-based); the last configured delay repeats.
    pub fn delay(&self, level: u32) -> Duration {
        let i = (level.max(1) as usize - 1).min(self.backoff.len().saturating_sub(1));
        self.backoff.get(i).copied().unwrap_or(Duration::ZERO)
    }
}

/// Dedupe window.
#[derive(Debug, Clone, PartialEq)]
pub struct DedupeConfig {
    /// `DEDUPE_TTL`.
    pub ttl: Duration,
    /// `DEDUPE_CAPACITY`.
    pub capacity: usize,
}

/// Processor choice.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessorConfig {
    /// `COURIER_PROCESSOR`.
    pub kind: ProcessorKind,
    /// `PROCESSOR_HTTP_URL`.
    pub http_url: Option<String>,
    /// `PROCESSOR_HTTP_TIMEOUT_MS`.
    pub http_timeout: Duration,
}

/// Ingest API.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpConfig {
    /// `HTTP_ADDR`.
    pub addr: SocketAddr,
    /// `HTTP_MAX_BODY_BYTES`.
    pub max_body_bytes: usize,
    /// `HTTP_MAX_BATCH_EVENTS`.
    pub max_batch_events: usize,
    /// `HTTP_REQUEST_TIMEOUT_MS`.
    pub request_timeout: Duration,
}

/// Broker health probing.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    /// `HEALTH_PROBE_INTERVAL_MS`.
    pub probe_interval: Duration,
    /// `HEALTH_PROBE_TIMEOUT_MS`.
    pub probe_timeout: Duration,
    /// `HEALTH_MAX_BACKOFF_MS`.
    pub max_backoff: Duration,
}

/// Logging.
#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    /// `LOG_LEVEL`, as an `EnvFilter` directive.
    pub level: String,
    /// `LOG_FORMAT`.
    pub format: LogFormat,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Connection and provisioning.
    pub kafka: KafkaConfig,
    /// Producer.
    pub producer: ProducerConfig,
    /// Consumer.
    pub consumer: ConsumerConfig,
    /// Retry chain and DLQ.
    pub retry: RetryConfig,
    /// Dedupe.
    pub dedupe: DedupeConfig,
    /// Processor.
    pub processor: ProcessorConfig,
    /// Ingest API.
    pub http: HttpConfig,
    /// Ops server address (`OPS_ADDR`).
    pub ops_addr: SocketAddr,
    /// Health probing.
    pub health: HealthConfig,
    /// Logging.
    pub log: LogConfig,
    /// The merged configuration this was validated from (for `courier config`).
    pub raw: RawConfig,
}

impl Config {
    /// Loads the configuration from defaults, the optional TOML file and the process
    /// environment, and validates it.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the variable, its value and what is accepted.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(file, &env)
    }

    /// Like [`Config::load`] with an explicit environment (used by tests).
    ///
    /// # Errors
    /// A [`ConfigError`] naming the variable, its value and what is accepted.
    pub fn load_from(file: Option<&Path>, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let file: Option<PathBuf> = file.map(Path::to_path_buf).or_else(|| {
            env.iter()
                .find(|(k, _)| k == "COURIER_CONFIG")
                .filter(|(_, v)| !v.is_empty())
                .map(|(_, v)| PathBuf::from(v))
        });
        let mut fig = Figment::from(Serialized::defaults(RawConfig::default()));
        if let Some(path) = &file {
            if !path.is_file() {
                return Err(ConfigError(format!(
                    "COURIER_CONFIG={}: no such file (expected the path of a TOML configuration file)",
                    path.display()
                )));
            }
            fig = fig.merge(Toml::file(path));
        }
        fig = fig.merge(env_provider(env)?);
        let raw: RawConfig = fig.extract().map_err(describe_figment_error)?;
        let mut config = validate(raw)?;
        for (k, v) in env {
            if let Some(rest) = k.strip_prefix(RDKAFKA_PREFIX) {
                config
                    .kafka
                    .passthrough
                    .insert(passthrough_name(rest), v.clone());
            }
        }
        Ok(config)
    }

    /// Every topic courier provisions: the producer's allowed topics, the source topics, the
    /// retry topics `{prefix}-1..N` and the DLQ, without repeats, in that order.
    pub fn all_topics(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let retry = (1..=self.consumer.retry_max).map(|n| self.retry.topic(n));
        for t in self
            .producer
            .allowed_topics
            .iter()
            .cloned()
            .chain(self.consumer.topics.iter().cloned())
            .chain(retry)
            .chain(std::iter::once(self.retry.dlq_topic.clone()))
        {
            if !out.contains(&t) {
                out.push(t);
            }
        }
        out
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_toml(&self) -> String {
        let mut raw = self.raw.clone();
        for (k, v) in &self.kafka.passthrough {
            raw.rdkafka.insert(k.clone(), Text(v.clone()));
        }
        for (k, v) in raw.rdkafka.iter_mut() {
            if is_secret_property(k) && !v.0.is_empty() {
                v.0 = "[redacted]".into();
            }
        }
        toml::to_string(&raw).unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
    }
}

/// Whether a librdkafka property holds a secret (redacted in output).
pub fn is_secret_property(name: &str) -> bool {
    name.contains("password") || name.contains("secret") || name.ends_with(".key.pem")
}

/// `RDKAFKA_<NAME>` → librdkafka property: `_` becomes `.`, `__` becomes `_`, lower case.
pub fn passthrough_name(rest: &str) -> String {
    rest.to_ascii_lowercase()
        .replace("__", "\u{0}")
        .replace('_', ".")
        .replace('\u{0}', "_")
}

fn env_provider(
    env: &[(String, String)],
) -> Result<figment::providers::Serialized<figment::value::Dict>, ConfigError> {
    // Map each known variable to its dotted key. An alias loses to its canonical name.
    let mut dict = figment::value::Dict::new();
    let mut set = |key: &str, value: &str| {
        let v: figment::value::Value = value
            .parse()
            .unwrap_or_else(|_| figment::value::Value::from(value.to_owned()));
        // Keep lists and durations as text: the parser above would split "a,b" oddly.
        let v = match v {
            figment::value::Value::String(..)
            | figment::value::Value::Num(..)
            | figment::value::Value::Bool(..) => v,
            _ => figment::value::Value::from(value.to_owned()),
        };
        insert_dotted(&mut dict, key, v);
    };
    for (alias, canonical) in ALIASES {
        let has_canonical = env.iter().any(|(k, _)| k == canonical);
        if let Some((_, v)) = env.iter().find(|(k, _)| k == alias) {
            if !has_canonical {
                let key = VARS.iter().find(|var| var.env == *canonical).map(|v| v.key);
                if let Some(key) = key {
                    set(key, v);
                }
            }
        }
    }
    for var in VARS {
        if let Some((_, v)) = env.iter().find(|(k, _)| k == var.env) {
            set(var.key, v);
        }
    }
    Ok(Serialized::defaults(dict))
}

fn insert_dotted(dict: &mut figment::value::Dict, key: &str, value: figment::value::Value) {
    use figment::value::{Dict, Value};
    let mut parts = key.split('.').peekable();
    let mut cur = dict;
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            cur.insert(part.to_owned(), value);
            return;
        }
        let entry = cur
            .entry(part.to_owned())
            .or_insert_with(|| Value::from(Dict::new()));
        if !matches!(entry, Value::Dict(..)) {
            *entry = Value::from(Dict::new());
        }
        let Value::Dict(_, next) = entry else {
            return;
        };
        cur = next;
    }
}

fn describe_figment_error(err: figment::Error) -> ConfigError {
    use figment::error::Kind;
    let key = err.path.join(".");
    let name = env_name_for_key(&key)
        .map(str::to_owned)
        .unwrap_or_else(|| {
            if key.is_empty() {
                "configuration".into()
            } else {
                key.clone()
            }
        });
    let msg = match &err.kind {
        Kind::InvalidType(actual, expected) => {
            let value = match actual {
                figment::error::Actual::Str(s) => s.clone(),
                other => other.to_string(),
            };
            format!("{name}={value}: expected {}", friendly_expected(expected))
        }
        Kind::UnknownField(field, _) => {
            let full = if err.path.last() == Some(field) || key.is_empty() {
                if key.is_empty() {
                    field.clone()
                } else {
                    key.clone()
                }
            } else {
                format!("{key}.{field}")
            };
            format!("unknown configuration key `{full}` (see config/courier.toml for every key)")
        }
        other => format!("{name}: {other}"),
    };
    ConfigError(msg)
}

fn friendly_expected(expected: &str) -> String {
    match expected {
        "i64" | "u64" | "u32" | "i32" | "usize" => "a whole number".into(),
        "a boolean" | "bool" => "true or false".into(),
        other => other.to_owned(),
    }
}

/// Parses a duration: `500ms`, `10s`, `5m`, `1h` (humantime syntax, e.g. `1m30s`, too).
///
/// # Errors
/// A message saying what is accepted.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("expected a duration such as 500ms, 10s, 5m or 1h".into());
    }
    humantime::parse_duration(s)
        .map_err(|_| "expected a duration such as 500ms, 10s, 5m or 1h".into())
}

struct Check {
    errors: Vec<String>,
}

impl Check {
    fn fail(&mut self, key: &str, value: impl fmt::Display, accepted: &str) {
        let name = env_name_for_key(key).unwrap_or(key);
        self.errors
            .push(format!("{name}={value}: expected {accepted}"));
    }

    fn range(&mut self, key: &str, v: i64, lo: i64, hi: i64) -> i64 {
        if v < lo || v > hi {
            self.fail(key, v, &format!("a whole number from {lo} to {hi}"));
            return lo;
        }
        v
    }

    fn ms(&mut self, key: &str, v: i64, lo: i64, hi: i64) -> Duration {
        Duration::from_millis(self.range(key, v, lo, hi) as u64)
    }

    fn text(&mut self, key: &str, v: &Text, what: &str) -> String {
        let s = v.0.trim().to_owned();
        if s.is_empty() {
            self.fail(key, "", what);
        }
        s
    }

    fn topic(&mut self, key: &str, v: &str) {
        if !valid_topic(v) {
            self.fail(
                key,
                v,
                "a topic name of 1 to 249 characters from [a-zA-Z0-9._-]",
            );
        }
    }
}

/// Whether `s` is a legal Kafka topic name.
pub fn valid_topic(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 249
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn opt(t: &Text) -> Option<String> {
    Some(t.0.trim().to_owned()).filter(|s| !s.is_empty())
}

fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    let mut c = Check { errors: Vec::new() };
    let k = &raw.kafka;
    let brokers = c.text("kafka.brokers", &k.brokers, "host:port[,host:port...]");
    let client_id = c.text("kafka.client_id", &k.client_id, "a non-empty client id");
    let security_protocol = match k.security_protocol.0.trim().to_ascii_lowercase().as_str() {
        "plaintext" => SecurityProtocol::Plaintext,
        "ssl" => SecurityProtocol::Ssl,
        "sasl_plaintext" => SecurityProtocol::SaslPlaintext,
        "sasl_ssl" => SecurityProtocol::SaslSsl,
        other => {
            c.fail(
                "kafka.security_protocol",
                other,
                "plaintext, ssl, sasl_plaintext or sasl_ssl",
            );
            SecurityProtocol::Plaintext
        }
    };
    let sasl_mechanism = opt(&k.sasl_mechanism).map(|m| m.to_ascii_uppercase());
    if let Some(m) = &sasl_mechanism {
        if !matches!(
            m.as_str(),
            "PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512" | "OAUTHBEARER" | "GSSAPI"
        ) {
            c.fail(
                "kafka.sasl_mechanism",
                m,
                "PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER or GSSAPI",
            );
        }
    }
    let sasl_username = opt(&k.sasl_username);
    let sasl_password = (!k.sasl_password.is_empty()).then(|| k.sasl_password.clone());
    let is_sasl = matches!(
        security_protocol,
        SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
    );
    if is_sasl
        && matches!(
            sasl_mechanism.as_deref(),
            None | Some("PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512")
        )
        && (sasl_username.is_none() || sasl_password.is_none())
    {
        c.errors.push(format!(
            "KAFKA_SECURITY_PROTOCOL={}: expected KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD to be set with a SASL protocol",
            security_protocol.as_str()
        ));
    }
    let topic_partitions = c.range("kafka.topic_partitions", k.topic_partitions, 1, 10_000) as i32;
    let topic_replication = c.range("kafka.topic_replication", k.topic_replication, 1, 32) as i32;

    let p = &k.producer;
    let ptopic = c.text("kafka.producer.topic", &p.topic, "a topic name");
    c.topic("kafka.producer.topic", &ptopic);
    let acks = match p.acks.0.trim().to_ascii_lowercase().as_str() {
        "0" => Acks::None,
        "1" => Acks::Leader,
        "all" | "-1" => Acks::All,
        other => {
            c.fail("kafka.producer.acks", other, "0, 1 or all");
            Acks::All
        }
    };
    if p.idempotent && acks != Acks::All {
        c.errors.push(format!(
            "KAFKA_PRODUCER_ACKS={}: expected all while KAFKA_PRODUCER_IDEMPOTENT=true (set KAFKA_PRODUCER_IDEMPOTENT=false to use weaker acks)",
            p.acks.0
        ));
    }
    let compression = match p.compression.0.trim().to_ascii_lowercase().as_str() {
        "none" | "" => Compression::None,
        "gzip" => Compression::Gzip,
        "snappy" => Compression::Snappy,
        "lz4" => Compression::Lz4,
        "zstd" => Compression::Zstd,
        other => {
            c.fail(
                "kafka.producer.compression",
                other,
                "none, gzip, snappy, lz4 or zstd",
            );
            Compression::None
        }
    };
    let mut allowed_topics = p.allowed_topics.0.clone();
    for tpc in &allowed_topics {
        c.topic("kafka.producer.allowed_topics", tpc);
    }
    if !allowed_topics.contains(&ptopic) {
        allowed_topics.insert(0, ptopic.clone());
    }
    let producer = ProducerConfig {
        topic: ptopic,
        acks,
        retries: c.range("kafka.producer.retries", p.retries, 0, i32::MAX as i64) as u32,
        idempotent: p.idempotent,
        compression,
        linger_ms: c.range("kafka.producer.linger_ms", p.linger_ms, 0, 900_000) as u64,
        delivery_timeout: c.ms(
            "kafka.producer.delivery_timeout_ms",
            p.delivery_timeout_ms,
            1,
            3_600_000,
        ),
        queue_max_messages: c.range(
            "kafka.producer.queue_max_messages",
            p.queue_max_messages,
            1,
            2_147_483_647,
        ) as u32,
        flush_timeout: c.ms(
            "kafka.producer.flush_timeout_ms",
            p.flush_timeout_ms,
            0,
            3_600_000,
        ),
        allowed_topics,
    };

    let cs = &k.consumer;
    if cs.topics.0.is_empty() {
        c.fail(
            "kafka.consumer.topics",
            "",
            "one or more topic names, comma-separated",
        );
    }
    for tpc in &cs.topics.0 {
        c.topic("kafka.consumer.topics", tpc);
    }
    let consumer = ConsumerConfig {
        topics: cs.topics.0.clone(),
        group_id: c.text(
            "kafka.consumer.group_id",
            &cs.group_id,
            "a non-empty group id",
        ),
        workers: c.range("kafka.consumer.workers", cs.workers, 1, 4096) as usize,
        max_in_flight: c.range(
            "kafka.consumer.max_in_flight",
            cs.max_in_flight,
            1,
            1_000_000,
        ) as usize,
        max_in_flight_bytes: c.range(
            "kafka.consumer.max_in_flight_bytes",
            cs.max_in_flight_bytes,
            1,
            i64::MAX,
        ) as usize,
        assignment_strategy: match cs
            .assignment_strategy
            .0
            .trim()
            .to_ascii_lowercase()
            .as_str()
        {
            "cooperative-sticky" => AssignmentStrategy::CooperativeSticky,
            "range" => AssignmentStrategy::Range,
            "roundrobin" => AssignmentStrategy::RoundRobin,
            other => {
                c.fail(
                    "kafka.consumer.assignment_strategy",
                    other,
                    "cooperative-sticky, range or roundrobin",
                );
                AssignmentStrategy::CooperativeSticky
            }
        },
        pause_after: c.ms(
            "kafka.consumer.pause_after_ms",
            cs.pause_after_ms,
            0,
            3_600_000,
        ),
        retry_max: c.range("kafka.consumer.retry_max", cs.retry_max, 0, 100) as u32,
        commit_interval: c.ms(
            "kafka.consumer.commit_interval_ms",
            cs.commit_interval_ms,
            10,
            3_600_000,
        ),
        shutdown_timeout: c.ms(
            "kafka.consumer.shutdown_timeout_ms",
            cs.shutdown_timeout_ms,
            0,
            3_600_000,
        ),
        fetch_min_bytes: c.range(
            "kafka.consumer.fetch_min_bytes",
            cs.fetch_min_bytes,
            1,
            100_000_000,
        ) as u32,
        fetch_max_bytes: c.range(
            "kafka.consumer.fetch_max_bytes",
            cs.fetch_max_bytes,
            1024,
            2_147_483_135,
        ) as u32,
    };

    let r = &k.retry;
    let topic_prefix = c.text(
        "kafka.retry.topic_prefix",
        &r.topic_prefix,
        "a topic name prefix",
    );
    c.topic("kafka.retry.topic_prefix", &topic_prefix);
    let dlq_topic = c.text("kafka.retry.dlq_topic", &r.dlq_topic, "a topic name");
    c.topic("kafka.retry.dlq_topic", &dlq_topic);
    let mut backoff = Vec::new();
    for item in &r.backoff.0 {
        match parse_duration(item) {
            Ok(d) => backoff.push(d),
            Err(e) => c.fail(
                "kafka.retry.backoff",
                r.backoff.0.join(","),
                &format!(
                    "a comma-separated list of durations ({})",
                    e.trim_start_matches("expected ")
                ),
            ),
        }
    }
    if r.backoff.0.is_empty() {
        c.fail(
            "kafka.retry.backoff",
            "",
            "a comma-separated list of durations such as 1s,10s,60s",
        );
    }
    let retry = RetryConfig {
        topic_prefix,
        backoff,
        dlq_topic,
    };
    for tpc in &consumer.topics {
        if *tpc == retry.dlq_topic || retry.level_of(tpc, consumer.retry_max.max(1000)).is_some() {
            c.fail(
                "kafka.consumer.topics",
                consumer.topics.join(","),
                "source topics distinct from the retry topics and the DLQ",
            );
        }
    }

    let dedupe = DedupeConfig {
        ttl: match parse_duration(&raw.dedupe.ttl.0) {
            Ok(d) => d,
            Err(e) => {
                c.fail(
                    "dedupe.ttl",
                    &raw.dedupe.ttl.0,
                    e.trim_start_matches("expected "),
                );
                Duration::ZERO
            }
        },
        capacity: c.range("dedupe.capacity", raw.dedupe.capacity, 0, 100_000_000) as usize,
    };

    let kind = match raw.processor.kind.0.trim().to_ascii_lowercase().as_str() {
        "log" => ProcessorKind::Log,
        "http" => ProcessorKind::Http,
        other => {
            c.fail("processor.kind", other, "log or http");
            ProcessorKind::Log
        }
    };
    let http_url = opt(&raw.processor.http_url);
    if let Some(u) = &http_url {
        if !(u.starts_with("http://") || u.starts_with("https://"))
            || reqwest::Url::parse(u).is_err()
        {
            c.fail("processor.http_url", u, "an http:// or https:// URL");
        }
    } else if kind == ProcessorKind::Http {
        c.fail(
            "processor.http_url",
            "",
            "a URL when COURIER_PROCESSOR=http",
        );
    }
    let processor = ProcessorConfig {
        kind,
        http_url,
        http_timeout: c.ms(
            "processor.http_timeout_ms",
            raw.processor.http_timeout_ms,
            1,
            3_600_000,
        ),
    };

    let mut addr = |key: &str, v: &Text| -> SocketAddr {
        match v.0.trim().parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                c.fail(key, &v.0, "an address such as 0.0.0.0:8080");
                SocketAddr::from(([0, 0, 0, 0], 0))
            }
        }
    };
    let http_addr = addr("http.addr", &raw.http.addr);
    let ops_addr = addr("ops.addr", &raw.ops.addr);
    let http = HttpConfig {
        addr: http_addr,
        max_body_bytes: c.range(
            "http.max_body_bytes",
            raw.http.max_body_bytes,
            64,
            1_073_741_824,
        ) as usize,
        max_batch_events: c.range(
            "http.max_batch_events",
            raw.http.max_batch_events,
            1,
            100_000,
        ) as usize,
        request_timeout: c.ms(
            "http.request_timeout_ms",
            raw.http.request_timeout_ms,
            1,
            3_600_000,
        ),
    };
    let health = HealthConfig {
        probe_interval: c.ms(
            "health.probe_interval_ms",
            raw.health.probe_interval_ms,
            10,
            3_600_000,
        ),
        probe_timeout: c.ms(
            "health.probe_timeout_ms",
            raw.health.probe_timeout_ms,
            10,
            600_000,
        ),
        max_backoff: c.ms(
            "health.max_backoff_ms",
            raw.health.max_backoff_ms,
            10,
            3_600_000,
        ),
    };
    let level = raw.log.level.0.trim().to_owned();
    if level.is_empty() || tracing_subscriber::EnvFilter::try_new(&level).is_err() {
        c.fail(
            "log.level",
            &level,
            "debug, info, warn, error or a RUST_LOG-style filter",
        );
    }
    let format = match raw.log.format.0.trim().to_ascii_lowercase().as_str() {
        "json" => LogFormat::Json,
        "pretty" | "text" => LogFormat::Pretty,
        other => {
            c.fail("log.format", other, "json or pretty");
            LogFormat::Json
        }
    };
    if let Some(first) = c.errors.into_iter().next() {
        return Err(ConfigError(first));
    }
    let passthrough = raw
        .rdkafka
        .iter()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    Ok(Config {
        kafka: KafkaConfig {
            brokers,
            client_id,
            security_protocol,
            sasl_mechanism,
            sasl_username,
            sasl_password,
            ssl_ca_location: opt(&k.ssl_ca_location),
            auto_create_topics: k.auto_create_topics,
            topic_partitions,
            topic_replication,
            passthrough,
        },
        producer,
        consumer,
        retry,
        dedupe,
        processor,
        http,
        ops_addr,
        health,
        log: LogConfig { level, format },
        raw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn load(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::load_from(None, &env(pairs))
    }

    #[test]
    fn defaults_are_valid() {
        let c = load(&[]).unwrap();
        assert_eq!(c.consumer.topics, vec!["events"]);
        assert_eq!(c.retry.topic(2), "events-retry-2");
        assert_eq!(
            c.retry.backoff,
            vec![
                Duration::from_secs(1),
                Duration::from_secs(10),
                Duration::from_secs(60)
            ]
        );
        assert_eq!(c.producer.allowed_topics, vec!["events"]);
        assert_eq!(c.producer.acks, Acks::All);
        assert_eq!(c.ops_addr.port(), 9090);
    }

    #[test]
    fn environment_overrides_and_parses() {
        let c = load(&[
            ("KAFKA_PRODUCER_ACKS", "1"),
            ("KAFKA_PRODUCER_IDEMPOTENT", "false"),
            ("KAFKA_CONSUMER_TOPICS", "orders, payments"),
            ("KAFKA_CONSUMER_WORKERS", "16"),
            ("KAFKA_RETRY_BACKOFF", "500ms,2s"),
            ("DEDUPE_TTL", "5m"),
            ("RDKAFKA_SOCKET_KEEPALIVE_ENABLE", "true"),
            ("RDKAFKA_SOME__ODD_NAME", "x"),
        ])
        .unwrap();
        assert_eq!(c.producer.acks, Acks::Leader);
        assert_eq!(c.consumer.topics, vec!["orders", "payments"]);
        assert_eq!(c.consumer.workers, 16);
        assert_eq!(c.retry.delay(1), Duration::from_millis(500));
        assert_eq!(
            c.retry.delay(7),
            Duration::from_secs(2),
            "the last delay repeats"
        );
        assert_eq!(c.dedupe.ttl, Duration::from_secs(300));
        assert_eq!(c.kafka.passthrough["socket.keepalive.enable"], "true");
        assert_eq!(c.kafka.passthrough["some_odd.name"], "x");
    }

    #[test]
    fn alias_is_used_only_without_canonical() {
        assert_eq!(
            load(&[("KAFKA_CONSUMER_TOPIC", "a")])
                .unwrap()
                .consumer
                .topics,
            vec!["a"]
        );
        let both = load(&[
            ("KAFKA_CONSUMER_TOPIC", "a"),
            ("KAFKA_CONSUMER_TOPICS", "b"),
        ])
        .unwrap();
        assert_eq!(both.consumer.topics, vec!["b"]);
    }

    #[test]
    fn bad_values_name_the_variable_value_and_accepted() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("KAFKA_PRODUCER_ACKS", "2")],
                "KAFKA_PRODUCER_ACKS=2: expected 0, 1 or all",
            ),
            (
                &[("KAFKA_CONSUMER_WORKERS", "lots")],
                "KAFKA_CONSUMER_WORKERS=lots: expected a whole number",
            ),
            (
                &[("KAFKA_CONSUMER_WORKERS", "0")],
                "KAFKA_CONSUMER_WORKERS=0: expected a whole number from 1 to 4096",
            ),
            (
                &[("DEDUPE_TTL", "forever")],
                "DEDUPE_TTL=forever: expected a duration",
            ),
            (
                &[("KAFKA_RETRY_BACKOFF", "1s,soon")],
                "KAFKA_RETRY_BACKOFF=1s,soon: expected a comma-separated list of durations",
            ),
            (
                &[("HTTP_ADDR", "nowhere")],
                "HTTP_ADDR=nowhere: expected an address",
            ),
            (
                &[("LOG_FORMAT", "xml")],
                "LOG_FORMAT=xml: expected json or pretty",
            ),
            (
                &[("COURIER_PROCESSOR", "http")],
                "PROCESSOR_HTTP_URL=: expected a URL when COURIER_PROCESSOR=http",
            ),
            (
                &[("KAFKA_PRODUCER_IDEMPOTENT", "maybe")],
                "KAFKA_PRODUCER_IDEMPOTENT=maybe: expected true or false",
            ),
            (
                &[("KAFKA_CONSUMER_TOPICS", "events-retry-1")],
                "KAFKA_CONSUMER_TOPICS=events-retry-1: expected source topics distinct",
            ),
            (
                &[("KAFKA_SECURITY_PROTOCOL", "sasl_ssl")],
                "KAFKA_SECURITY_PROTOCOL=sasl_ssl: expected KAFKA_SASL_USERNAME",
            ),
            (
                &[("COURIER_CONFIG", "/nonexistent/courier.toml")],
                "COURIER_CONFIG=/nonexistent/courier.toml: no such file",
            ),
        ];
        for (pairs, want) in cases {
            let err = load(pairs).unwrap_err().0;
            assert!(
                err.starts_with(want),
                "{pairs:?}: got {err:?}, want prefix {want:?}"
            );
            assert!(!err.contains('\n'), "one line: {err:?}");
        }
    }

    #[test]
    fn toml_file_then_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[kafka]\nbrokers = \"file:1\"\n[kafka.consumer]\nworkers = 3\ngroup_id = \"from-file\"\n").unwrap();
        let c = Config::load_from(
            Some(&path),
            &env(&[("KAFKA_CONSUMER_GROUP_ID", "from-env")]),
        )
        .unwrap();
        assert_eq!(c.kafka.brokers, "file:1");
        assert_eq!(c.consumer.workers, 3);
        assert_eq!(c.consumer.group_id, "from-env");
        std::fs::write(&path, "[kafka]\nbrokerz = \"x\"\n").unwrap();
        let err = Config::load_from(Some(&path), &[]).unwrap_err().0;
        assert!(
            err.contains("unknown configuration key `kafka.brokerz`"),
            "{err}"
        );
    }

    #[test]
    fn shipped_toml_holds_every_key_and_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/courier.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let value: toml::Table = text.parse().unwrap();
        for var in VARS {
            let mut cur = &value;
            let parts: Vec<&str> = var.key.split('.').collect();
            for p in &parts[..parts.len() - 1] {
                cur = cur
                    .get(*p)
                    .and_then(|v| v.as_table())
                    .unwrap_or_else(|| panic!("{} missing table {p}", var.key));
            }
            assert!(
                cur.contains_key(*parts.last().unwrap()),
                "config/courier.toml lacks {}",
                var.key
            );
        }
        Config::load_from(Some(&path), &[]).unwrap();
    }

    #[test]
    fn readme_documents_every_variable() {
        let readme =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
                .unwrap();
        for var in VARS {
            assert!(
                readme.contains(&format!("`{}`", var.env)),
                "README.md does not document {}",
                var.env
            );
        }
    }

    #[test]
    fn printed_config_redacts_secrets() {
        let c = load(&[
            ("KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
            ("KAFKA_SASL_MECHANISM", "PLAIN"),
            ("KAFKA_SASL_USERNAME", "u"),
            ("KAFKA_SASL_PASSWORD", "hunter2"),
            ("RDKAFKA_SSL_KEY_PASSWORD", "hunter3"),
        ])
        .unwrap();
        let out = c.to_toml();
        assert!(
            !out.contains("hunter2") && !out.contains("hunter3"),
            "{out}"
        );
        assert!(out.contains("[redacted]"));
        assert_eq!(
            format!("{:?}", c.kafka.sasl_password),
            "Some(\"[redacted]\")"
        );
        let reparsed: RawConfig = toml::from_str(&out).unwrap();
        assert_eq!(reparsed.kafka.consumer.group_id.0, "courier");
    }

    #[test]
    fn retry_level_of_topic() {
        let r = load(&[]).unwrap().retry;
        assert_eq!(r.level_of("events-retry-1", 3), Some(1));
        assert_eq!(r.level_of("events-retry-3", 3), Some(3));
        assert_eq!(r.level_of("events-retry-4", 3), None);
        assert_eq!(r.level_of("events-retry-01", 3), None);
        assert_eq!(r.level_of("events", 3), None);
    }
}
