//! Every setting, once: one struct per section of the TOML file, each field with its meaning,
//! type, default and environment variable; and the enums of accepted words.
//!
//! Adding a setting is one entry here (and, if it has limits, one line in `validate.rs`);
//! the README table and `config/courier.toml` are regenerated from it.

use std::net::SocketAddr;
use std::time::Duration;

use super::define::Var;
use super::values::{HeaderSetting, Secret};

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

choice! {
    /// `KAFKA_PRODUCER_ACKS`: which acknowledgement a delivery waits for.
    pub enum Acks expecting "0, 1 or all" {
        /// No acknowledgement.
        None = "0",
        /// The leader's.
        Leader = "1",
        /// All in-sync replicas'.
        All = "all" | "-1",
    }
}

choice! {
    /// `KAFKA_PRODUCER_COMPRESSION`: librdkafka's `compression.type`.
    pub enum Compression expecting "none, gzip, snappy, lz4 or zstd" {
        /// Uncompressed.
        None = "none" | "",
        /// gzip.
        Gzip = "gzip",
        /// Snappy.
        Snappy = "snappy",
        /// LZ4.
        Lz4 = "lz4",
        /// Zstandard.
        Zstd = "zstd",
    }
}

choice! {
    /// `KAFKA_SECURITY_PROTOCOL`: librdkafka's `security.protocol`.
    pub enum SecurityProtocol expecting "plaintext, ssl, sasl_plaintext or sasl_ssl" {
        /// No TLS, no SASL.
        Plaintext = "plaintext",
        /// TLS.
        Ssl = "ssl",
        /// SASL without TLS.
        SaslPlaintext = "sasl_plaintext",
        /// SASL over TLS.
        SaslSsl = "sasl_ssl",
    }
}

impl SecurityProtocol {
    /// Whether the protocol authenticates with SASL.
    pub fn is_sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }
}

choice! {
    /// `KAFKA_CONSUMER_ASSIGNMENT_STRATEGY`: librdkafka's `partition.assignment.strategy`.
    pub enum AssignmentStrategy expecting "cooperative-sticky, range or roundrobin" {
        /// Incremental rebalancing: only partitions that change owner move.
        CooperativeSticky = "cooperative-sticky",
        /// Eager: ranges of partitions per topic.
        Range = "range",
        /// Eager: partitions dealt round-robin.
        RoundRobin = "roundrobin",
    }
}

choice! {
    /// `KAFKA_CONSUMER_AUTO_OFFSET_RESET`: where a group with no committed offset starts on
    /// its source topics. Retry topics always start at the earliest offset (a retry written
    /// before the group's first commit on them must not be skipped).
    pub enum OffsetReset expecting "earliest or latest" {
        /// From the first record still in the topic.
        Earliest = "earliest" | "smallest" | "beginning",
        /// From the end: records produced before the group first starts are skipped.
        Latest = "latest" | "largest" | "end",
    }
}

choice! {
    /// `COURIER_PROCESSOR`: what the consumer does with a message.
    pub enum ProcessorKind expecting "log or http" {
        /// Validate the envelope and log it.
        Log = "log",
        /// POST each payload to `PROCESSOR_HTTP_URL`.
        Http = "http",
    }
}

choice! {
    /// `LOG_FORMAT`.
    pub enum LogFormat expecting "json or pretty" {
        /// One JSON object a line.
        Json = "json",
        /// Human-readable.
        Pretty = "pretty" | "text",
    }
}

settings! {
    /// `[kafka]`: connection, security and provisioning, shared by every client.
    pub struct KafkaConfig at "kafka" {
        /// bootstrap servers, comma-separated
        brokers: String = "localhost:9092".into(), env KAFKA_BROKERS;
        /// client id sent to the broker
        client_id: String = "courier".into(), env KAFKA_CLIENT_ID;
        /// plaintext, ssl, sasl_plaintext or sasl_ssl
        security_protocol: SecurityProtocol = SecurityProtocol::Plaintext,
            env KAFKA_SECURITY_PROTOCOL;
        /// PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER or GSSAPI
        #[serde(with = "super::values::optional")]
        sasl_mechanism: Option<String> = None, env KAFKA_SASL_MECHANISM;
        /// SASL user name
        #[serde(with = "super::values::optional")]
        sasl_username: Option<String> = None, env KAFKA_SASL_USERNAME;
        /// SASL password (secret: redacted in output)
        #[serde(with = "super::values::optional")]
        sasl_password: Option<Secret> = None, env KAFKA_SASL_PASSWORD;
        /// CA certificate file for TLS
        #[serde(with = "super::values::optional")]
        ssl_ca_location: Option<String> = None, env KAFKA_SSL_CA_LOCATION;
        /// provision the source, retry and DLQ topics at start-up
        auto_create_topics: bool = false, env KAFKA_AUTO_CREATE_TOPICS;
        /// partitions of topics courier creates
        topic_partitions: i32 = 6, env KAFKA_TOPIC_PARTITIONS;
        /// replication factor of topics courier creates
        topic_replication: i32 = 1, env KAFKA_TOPIC_REPLICATION;
    }
}

settings! {
    /// `[kafka.producer]`.
    pub struct ProducerConfig at "kafka.producer" {
        /// default topic of the producer
        topic: String = "events".into(), env KAFKA_PRODUCER_TOPIC;
        /// 0, 1 or all
        acks: Acks = Acks::All, env KAFKA_PRODUCER_ACKS;
        /// librdkafka send retries before a delivery fails
        retries: u32 = 2_147_483_647, env KAFKA_PRODUCER_RETRIES;
        /// idempotent producer (no duplicates from send retries; needs acks=all)
        idempotent: bool = true, env KAFKA_PRODUCER_IDEMPOTENT;
        /// none, gzip, snappy, lz4 or zstd
        compression: Compression = Compression::None, env KAFKA_PRODUCER_COMPRESSION;
        /// how long to wait to fill a batch
        linger_ms: u64 = 5, env KAFKA_PRODUCER_LINGER_MS;
        /// time limit for one delivery, retries included
        #[serde(with = "super::values::ms")]
        delivery_timeout: Duration = ms(30_000), env KAFKA_PRODUCER_DELIVERY_TIMEOUT_MS,
            key "delivery_timeout_ms";
        /// local send queue bound; a full queue answers 503
        queue_max_messages: u32 = 100_000, env KAFKA_PRODUCER_QUEUE_MAX_MESSAGES;
        /// shutdown deadline for flushing queued messages
        #[serde(with = "super::values::ms")]
        flush_timeout: Duration = ms(10_000), env KAFKA_PRODUCER_FLUSH_TIMEOUT_MS,
            key "flush_timeout_ms";
        /// topics the ingest API may publish to (the producer topic is always one of them)
        #[serde(deserialize_with = "super::values::list")]
        allowed_topics: Vec<String> = Vec::new(), env KAFKA_PRODUCER_ALLOWED_TOPICS,
            shown "(the producer topic)";
    }
}

settings! {
    /// `[kafka.consumer]`.
    pub struct ConsumerConfig at "kafka.consumer" {
        /// source topics, comma-separated (KAFKA_CONSUMER_TOPIC is an alias)
        #[serde(deserialize_with = "super::values::list")]
        topics: Vec<String> = vec!["events".into()], env KAFKA_CONSUMER_TOPICS;
        /// consumer group
        group_id: String = "courier".into(), env KAFKA_CONSUMER_GROUP_ID;
        /// worker lanes; a key always goes to the same lane
        workers: usize = 8, env KAFKA_CONSUMER_WORKERS;
        /// messages in flight at most; fetching pauses above it
        max_in_flight: usize = 1000, env KAFKA_CONSUMER_MAX_IN_FLIGHT;
        /// bytes (key, payload, headers) in flight at most; fetching pauses above it; one larger message is still taken alone
        max_in_flight_bytes: usize = 64 * 1024 * 1024, env KAFKA_CONSUMER_MAX_IN_FLIGHT_BYTES;
        /// cooperative-sticky (only partitions that change owner move), range or roundrobin
        assignment_strategy: AssignmentStrategy = AssignmentStrategy::CooperativeSticky,
            env KAFKA_CONSUMER_ASSIGNMENT_STRATEGY;
        /// how long the in-flight bound must hold before fetching pauses
        #[serde(with = "super::values::ms")]
        pause_after: Duration = ms(10_000), env KAFKA_CONSUMER_PAUSE_AFTER_MS,
            key "pause_after_ms";
        /// retry levels before the DLQ
        retry_max: u32 = 3, env KAFKA_CONSUMER_RETRY_MAX;
        /// how often finished offsets are committed
        #[serde(with = "super::values::ms")]
        commit_interval: Duration = ms(1000), env KAFKA_CONSUMER_COMMIT_INTERVAL_MS,
            key "commit_interval_ms";
        /// how long shutdown and revoke wait for in-flight messages
        #[serde(with = "super::values::ms")]
        shutdown_timeout: Duration = ms(30_000), env KAFKA_CONSUMER_SHUTDOWN_TIMEOUT_MS,
            key "shutdown_timeout_ms";
        /// fetch.min.bytes
        fetch_min_bytes: u32 = 1, env KAFKA_CONSUMER_FETCH_MIN_BYTES;
        /// fetch.max.bytes
        fetch_max_bytes: u32 = 52_428_800, env KAFKA_CONSUMER_FETCH_MAX_BYTES;
        /// where a group with no committed offset starts on a source topic: earliest or latest (latest skips what was produced before the group first started); retry topics always start at the earliest
        auto_offset_reset: OffsetReset = OffsetReset::Earliest, env KAFKA_CONSUMER_AUTO_OFFSET_RESET;
    }
}

settings! {
    /// `[kafka.retry]`: the retry chain.
    pub struct RetryConfig at "kafka.retry" {
        /// retry topics are {prefix}-1..N
        topic_prefix: String = "events-retry".into(), env KAFKA_RETRY_TOPIC_PREFIX;
        /// delay per retry level, comma-separated; the last repeats
        #[serde(with = "super::values::human_list")]
        backoff: Vec<Duration> = vec![ms(1000), ms(10_000), ms(60_000)], env KAFKA_RETRY_BACKOFF;
        /// dead-letter topic
        dlq_topic: String = "events-dlq".into(), env KAFKA_DLQ_TOPIC;
    }
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

settings! {
    /// `[dedupe]`: the dedupe window.
    pub struct DedupeConfig at "dedupe" {
        /// how long a processed message-id is remembered
        #[serde(with = "super::values::human")]
        ttl: Duration = Duration::from_secs(3600), env DEDUPE_TTL;
        /// most message-ids remembered; the oldest is evicted first (0 turns dedupe off)
        capacity: usize = 100_000, env DEDUPE_CAPACITY;
    }
}

settings! {
    /// `[processor]`: what the consumer does with each message.
    pub struct ProcessorConfig at "processor" {
        /// log or http
        kind: ProcessorKind = ProcessorKind::Log, env COURIER_PROCESSOR;
        /// URL the http processor POSTs each payload to
        #[serde(with = "super::values::optional")]
        http_url: Option<String> = None, env PROCESSOR_HTTP_URL;
        /// time limit of one http processor request
        #[serde(with = "super::values::ms")]
        http_timeout: Duration = ms(5000), env PROCESSOR_HTTP_TIMEOUT_MS, key "http_timeout_ms";
        /// extra static headers of every http processor request, Name=Value pairs, comma-separated (values are secrets: redacted in output, never logged)
        #[serde(with = "super::values::header_list")]
        http_headers: Vec<HeaderSetting> = Vec::new(), env PROCESSOR_HTTP_HEADERS;
        /// PEM file of extra CA certificates the http processor trusts, beside the system's roots
        #[serde(with = "super::values::optional")]
        http_ca_file: Option<String> = None, env PROCESSOR_HTTP_CA_FILE;
        /// circuit breaker around the processor: an endpoint outage pauses fetching and holds the failing messages instead of retrying or dead-lettering them (on or off)
        circuit: bool = true, env PROCESSOR_CIRCUIT;
        /// share of retryable failures in the window that opens the circuit
        circuit_failure_ratio: f64 = 0.5, env PROCESSOR_CIRCUIT_FAILURE_RATIO;
        /// calls the window needs before the share counts; also the run of connection errors or timeouts that opens the circuit at once
        circuit_min_calls: u32 = 20, env PROCESSOR_CIRCUIT_MIN_CALLS;
        /// the circuit's sliding window
        #[serde(with = "super::values::human")]
        circuit_window: Duration = Duration::from_secs(10), env PROCESSOR_CIRCUIT_WINDOW;
        /// first and longest wait before an open circuit sends a probe (it doubles after each failed probe)
        #[serde(with = "super::values::human_list")]
        circuit_open_for: Vec<Duration> = vec![ms(1000), ms(30_000)], env PROCESSOR_CIRCUIT_OPEN_FOR;
        /// processor calls per second at most, a token bucket (0: no limit)
        max_rate: f64 = 0.0, env PROCESSOR_MAX_RATE;
        /// processor calls at once at most (0: the worker count)
        max_concurrency: usize = 0, env PROCESSOR_MAX_CONCURRENCY;
    }
}

settings! {
    /// `[http]`: the producer's ingest API.
    pub struct HttpConfig at "http" {
        /// the producer's ingest API address
        #[serde(deserialize_with = "super::values::addr")]
        addr: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 8080)), env HTTP_ADDR;
        /// largest accepted request body (413 above)
        max_body_bytes: usize = 1_048_576, env HTTP_MAX_BODY_BYTES;
        /// most events in one ingest request (413 above)
        max_batch_events: usize = 1000, env HTTP_MAX_BATCH_EVENTS;
        /// ingest request deadline: for the body to arrive (408 after), then for the broker's acknowledgement (503 after)
        #[serde(with = "super::values::ms")]
        request_timeout: Duration = ms(10_000), env HTTP_REQUEST_TIMEOUT_MS,
            key "request_timeout_ms";
        /// file of the bearer tokens ingest requires, one a line, each optionally followed by the topics it may publish to (unset: no authentication); re-read on change and on SIGHUP
        #[serde(with = "super::values::optional")]
        auth_tokens_file: Option<String> = None, env HTTP_AUTH_TOKENS_FILE;
        /// PEM certificate chain of the ingest listener; with HTTP_TLS_KEY_FILE it serves HTTPS only; re-read on change and on SIGHUP
        #[serde(with = "super::values::optional")]
        tls_cert_file: Option<String> = None, env HTTP_TLS_CERT_FILE;
        /// PEM private key of HTTP_TLS_CERT_FILE
        #[serde(with = "super::values::optional")]
        tls_key_file: Option<String> = None, env HTTP_TLS_KEY_FILE;
        /// PEM CA certificates of ingest clients: turns on mutual TLS (a client without a certificate they signed is refused at the handshake)
        #[serde(with = "super::values::optional")]
        tls_client_ca_file: Option<String> = None, env HTTP_TLS_CLIENT_CA_FILE;
    }
}

settings! {
    /// `[ops]`: the ops server of either service.
    pub struct OpsConfig at "ops" {
        /// address of /metrics, /healthz and /readyz
        #[serde(deserialize_with = "super::values::addr")]
        addr: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 9090)), env OPS_ADDR;
    }
}

settings! {
    /// `[health]`: broker health probing.
    pub struct HealthConfig at "health" {
        /// how often the broker is probed with a metadata request
        #[serde(with = "super::values::ms")]
        probe_interval: Duration = ms(2000), env HEALTH_PROBE_INTERVAL_MS,
            key "probe_interval_ms";
        /// time limit of one probe
        #[serde(with = "super::values::ms")]
        probe_timeout: Duration = ms(2000), env HEALTH_PROBE_TIMEOUT_MS,
            key "probe_timeout_ms";
        /// longest wait between probes while the broker is down
        #[serde(with = "super::values::ms")]
        max_backoff: Duration = ms(10_000), env HEALTH_MAX_BACKOFF_MS, key "max_backoff_ms";
    }
}

settings! {
    /// `[log]`.
    pub struct LogConfig at "log" {
        /// debug, info, warn, error, or a RUST_LOG-style filter
        level: String = "info".into(), env LOG_LEVEL;
        /// json or pretty
        format: LogFormat = LogFormat::Json, env LOG_FORMAT;
    }
}

/// Every section's settings, in the order of the TOML file and the README table.
pub const SECTIONS: &[&[Var]] = &[
    KafkaConfig::VARS,
    ProducerConfig::VARS,
    ConsumerConfig::VARS,
    RetryConfig::VARS,
    DedupeConfig::VARS,
    ProcessorConfig::VARS,
    HttpConfig::VARS,
    OpsConfig::VARS,
    HealthConfig::VARS,
    LogConfig::VARS,
];
