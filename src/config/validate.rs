//! The limits serde's types cannot say: one short `validate` per section, one check across
//! sections, and the normalization that follows a valid load. Every problem is collected, one
//! line each, naming the variable, the value and what is accepted.

use std::fmt::Display;
use std::time::Duration;

use super::define::Var;
use super::error::Problem;
use super::sections::{
    Acks, ConsumerConfig, DedupeConfig, HealthConfig, HttpConfig, KafkaConfig, LogConfig,
    ProcessorConfig, ProcessorKind, ProducerConfig, RetryConfig,
};
use super::values::valid_topic;
use super::Config;

const TOPIC: &str = "a topic name of 1 to 249 characters from [a-zA-Z0-9._-]";
const HOUR_MS: u128 = 3_600_000;

/// The problems of one section, named by its fields.
pub(crate) struct Check<'a> {
    vars: &'static [Var],
    problems: &'a mut Vec<Problem>,
}

impl<'a> Check<'a> {
    pub(crate) fn new(vars: &'static [Var], problems: &'a mut Vec<Problem>) -> Self {
        Check { vars, problems }
    }

    /// The variable of `field`. A name that is not a field of the section is a bug in this
    /// file; every load runs every check, so any test that loads a configuration finds it.
    fn env(&self, field: &str) -> &'static str {
        match self.vars.iter().find(|v| v.field == field) {
            Some(v) => v.env,
            None => panic!("validate.rs names `{field}`, which its section does not define"),
        }
    }

    fn fail(&mut self, field: &str, value: impl Display, expected: impl Display) {
        let var = self.env(field).to_owned();
        self.problems.push(Problem::Value {
            var,
            value: value.to_string(),
            expected: expected.to_string(),
        });
    }

    fn range<T: PartialOrd + Display>(&mut self, field: &str, value: T, lo: T, hi: T) {
        self.env(field);
        if value < lo || value > hi {
            self.fail(field, value, format!("a whole number from {lo} to {hi}"));
        }
    }

    fn at_least<T: PartialOrd + Display>(&mut self, field: &str, value: T, lo: T) {
        self.env(field);
        if value < lo {
            self.fail(field, value, format!("a whole number of at least {lo}"));
        }
    }

    fn millis(&mut self, field: &str, value: Duration, lo: u128, hi: u128) {
        self.range(field, value.as_millis(), lo, hi);
    }

    fn not_empty(&mut self, field: &str, value: &str, expected: &str) {
        if value.trim().is_empty() {
            self.fail(field, value, expected);
        }
    }

    fn topic(&mut self, field: &str, name: &str) {
        if !valid_topic(name) {
            self.fail(field, name, TOPIC);
        }
    }
}

const SASL_MECHANISMS: &[&str] = &[
    "PLAIN",
    "SCRAM-SHA-256",
    "SCRAM-SHA-512",
    "OAUTHBEARER",
    "GSSAPI",
];

impl KafkaConfig {
    fn validate(&self, c: &mut Check<'_>) {
        c.not_empty("brokers", &self.brokers, "host:port[,host:port...]");
        c.not_empty("client_id", &self.client_id, "a non-empty client id");
        let mechanism = self.sasl_mechanism.as_deref().map(str::to_ascii_uppercase);
        if let Some(m) = &mechanism {
            if !SASL_MECHANISMS.contains(&m.as_str()) {
                c.fail(
                    "sasl_mechanism",
                    m,
                    "PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER or GSSAPI",
                );
            }
        }
        let needs_password = matches!(
            mechanism.as_deref(),
            None | Some("PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512")
        );
        if self.security_protocol.is_sasl()
            && needs_password
            && (self.sasl_username.is_none() || self.sasl_password.is_none())
        {
            c.fail(
                "security_protocol",
                self.security_protocol,
                "KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD to be set with a SASL protocol",
            );
        }
        c.range("topic_partitions", self.topic_partitions, 1, 10_000);
        c.range("topic_replication", self.topic_replication, 1, 32);
    }
}

impl ProducerConfig {
    fn validate(&self, c: &mut Check<'_>) {
        c.topic("topic", &self.topic);
        if self.idempotent && self.acks != Acks::All {
            c.fail(
                "acks",
                self.acks,
                "all while KAFKA_PRODUCER_IDEMPOTENT=true (set KAFKA_PRODUCER_IDEMPOTENT=false to use weaker acks)",
            );
        }
        for topic in &self.allowed_topics {
            c.topic("allowed_topics", topic);
        }
        c.range("retries", self.retries, 0, i32::MAX as u32);
        c.range("linger_ms", self.linger_ms, 0, 900_000);
        c.millis("delivery_timeout", self.delivery_timeout, 1, HOUR_MS);
        c.range(
            "queue_max_messages",
            self.queue_max_messages,
            1,
            i32::MAX as u32,
        );
        c.millis("flush_timeout", self.flush_timeout, 0, HOUR_MS);
    }
}

impl ConsumerConfig {
    fn validate(&self, c: &mut Check<'_>) {
        if self.topics.is_empty() {
            c.fail("topics", "", "one or more topic names, comma-separated");
        }
        for topic in &self.topics {
            c.topic("topics", topic);
        }
        c.not_empty("group_id", &self.group_id, "a non-empty group id");
        c.range("workers", self.workers, 1, 4096);
        c.range("max_in_flight", self.max_in_flight, 1, 1_000_000);
        c.at_least("max_in_flight_bytes", self.max_in_flight_bytes, 1);
        c.millis("pause_after", self.pause_after, 0, HOUR_MS);
        c.range("retry_max", self.retry_max, 0, 100);
        c.millis("commit_interval", self.commit_interval, 10, HOUR_MS);
        c.millis("shutdown_timeout", self.shutdown_timeout, 0, HOUR_MS);
        c.range("fetch_min_bytes", self.fetch_min_bytes, 1, 100_000_000);
        c.range("fetch_max_bytes", self.fetch_max_bytes, 1024, 2_147_483_135);
    }
}

impl RetryConfig {
    fn validate(&self, c: &mut Check<'_>) {
        c.topic("topic_prefix", &self.topic_prefix);
        c.topic("dlq_topic", &self.dlq_topic);
        if self.backoff.is_empty() {
            c.fail(
                "backoff",
                "",
                "a comma-separated list of durations such as 1s,10s,60s",
            );
        }
    }
}

impl DedupeConfig {
    fn validate(&self, c: &mut Check<'_>) {
        c.range("capacity", self.capacity, 0, 100_000_000);
    }
}

impl ProcessorConfig {
    fn validate(&self, c: &mut Check<'_>) {
        match &self.http_url {
            Some(u) => {
                let scheme = u.starts_with("http://") || u.starts_with("https://");
                if !scheme || reqwest::Url::parse(u).is_err() {
                    c.fail("http_url", u, "an http:// or https:// URL");
                }
            }
            None if self.kind == ProcessorKind::Http => {
                c.fail("http_url", "", "a URL when COURIER_PROCESSOR=http");
            }
            None => {}
        }
        c.millis("http_timeout", self.http_timeout, 1, HOUR_MS);
        if !(self.circuit_failure_ratio > 0.0 && self.circuit_failure_ratio <= 1.0) {
            c.fail(
                "circuit_failure_ratio",
                self.circuit_failure_ratio,
                "a share above 0 and at most 1, e.g. 0.5",
            );
        }
        c.range("circuit_min_calls", self.circuit_min_calls, 1, 1_000_000);
        c.millis("circuit_window", self.circuit_window, 100, 24 * HOUR_MS);
        let open_for = &self.circuit_open_for;
        let ordered = open_for.len() == 2 && open_for[0] <= open_for[1];
        let in_range = open_for
            .iter()
            .all(|d| (1..=24 * HOUR_MS).contains(&d.as_millis()));
        if !(ordered && in_range) {
            let text: Vec<String> = open_for
                .iter()
                .map(|d| super::values::format_duration(*d))
                .collect();
            c.fail(
                "circuit_open_for",
                text.join(","),
                "two durations, the first at most the second, e.g. 1s,30s",
            );
        }
        if !(self.max_rate.is_finite() && self.max_rate >= 0.0) {
            c.fail(
                "max_rate",
                self.max_rate,
                "calls per second, 0 for no limit",
            );
        }
        c.range("max_concurrency", self.max_concurrency, 0, 65_536);
        self.validate_headers(c);
    }

    /// `PROCESSOR_HTTP_HEADERS`: each item `Name=Value` with a valid HTTP header name and
    /// value, not one courier sets itself. A problem shows names only: values are secrets.
    fn validate_headers(&self, c: &mut Check<'_>) {
        let bad: Vec<String> = self
            .http_headers
            .iter()
            .filter(|h| {
                let name_ok =
                    reqwest::header::HeaderName::from_bytes(h.name.as_bytes()).is_ok_and(|n| {
                        !RESERVED_HEADERS.contains(&n.as_str())
                            && !n.as_str().starts_with("courier-")
                    });
                let value_ok = reqwest::header::HeaderValue::from_str(h.value.expose()).is_ok();
                !(h.has_equals && name_ok && value_ok && !h.value.is_empty())
            })
            .map(|h| {
                let name_ok = reqwest::header::HeaderName::from_bytes(h.name.as_bytes()).is_ok();
                if name_ok {
                    h.shown()
                } else {
                    "[redacted]".to_owned()
                }
            })
            .collect();
        if !bad.is_empty() {
            c.fail(
                "http_headers",
                bad.join(","),
                "Name=Value pairs, comma-separated, e.g. Authorization=Bearer x,X-Team=payments: a valid header name other than those courier sets (content-type, message-id, idempotency-key, user-agent, traceparent, tracestate, courier-*, host, content-length, connection, transfer-encoding) and a non-empty value without control characters",
            );
        }
    }
}

/// Request headers the http processor sets itself (or HTTP owns): `PROCESSOR_HTTP_HEADERS`
/// may not name them.
const RESERVED_HEADERS: &[&str] = &[
    "content-type",
    "message-id",
    "idempotency-key",
    "user-agent",
    "traceparent",
    "tracestate",
    "host",
    "content-length",
    "connection",
    "transfer-encoding",
];

impl HttpConfig {
    fn validate(&self, c: &mut Check<'_>) {
        c.range("max_body_bytes", self.max_body_bytes, 64, 1_073_741_824);
        c.range("max_batch_events", self.max_batch_events, 1, 100_000);
        c.millis("request_timeout", self.request_timeout, 1, HOUR_MS);
        // HTTPS needs both halves; mutual TLS needs HTTPS. The files themselves are read by
        // the producer at start-up (the consumer never opens them).
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(_), None) => c.fail(
                "tls_key_file",
                "",
                "a PEM private key file when HTTP_TLS_CERT_FILE is set",
            ),
            (None, Some(_)) => c.fail(
                "tls_cert_file",
                "",
                "a PEM certificate file when HTTP_TLS_KEY_FILE is set",
            ),
            _ => {}
        }
        if self.tls_client_ca_file.is_some() && self.tls_cert_file.is_none() {
            c.fail(
                "tls_cert_file",
                "",
                "HTTP_TLS_CERT_FILE and HTTP_TLS_KEY_FILE when HTTP_TLS_CLIENT_CA_FILE is set (mutual TLS needs HTTPS)",
            );
        }
    }
}

impl HealthConfig {
    fn validate(&self, c: &mut Check<'_>) {
        c.millis("probe_interval", self.probe_interval, 10, HOUR_MS);
        c.millis("probe_timeout", self.probe_timeout, 10, 600_000);
        c.millis("max_backoff", self.max_backoff, 10, HOUR_MS);
    }
}

impl LogConfig {
    fn validate(&self, c: &mut Check<'_>) {
        let level = self.level.trim();
        if level.is_empty() || tracing_subscriber::EnvFilter::try_new(level).is_err() {
            c.fail(
                "level",
                level,
                "debug, info, warn, error or a RUST_LOG-style filter",
            );
        }
    }
}

impl Config {
    /// Every section's limits, then the rules across sections.
    pub(crate) fn validate(&self, problems: &mut Vec<Problem>) {
        self.kafka
            .validate(&mut Check::new(KafkaConfig::VARS, problems));
        self.producer
            .validate(&mut Check::new(ProducerConfig::VARS, problems));
        self.consumer
            .validate(&mut Check::new(ConsumerConfig::VARS, problems));
        self.retry
            .validate(&mut Check::new(RetryConfig::VARS, problems));
        self.dedupe
            .validate(&mut Check::new(DedupeConfig::VARS, problems));
        self.processor
            .validate(&mut Check::new(ProcessorConfig::VARS, problems));
        self.http
            .validate(&mut Check::new(HttpConfig::VARS, problems));
        self.health
            .validate(&mut Check::new(HealthConfig::VARS, problems));
        self.log
            .validate(&mut Check::new(LogConfig::VARS, problems));
        self.check_across(problems);
    }

    /// Source topics must not be retry topics or the DLQ: courier would consume its own
    /// retries as new messages.
    fn check_across(&self, problems: &mut Vec<Problem>) {
        let mut c = Check::new(ConsumerConfig::VARS, problems);
        let max = self.consumer.retry_max.max(1000);
        let clash = self
            .consumer
            .topics
            .iter()
            .any(|t| *t == self.retry.dlq_topic || self.retry.level_of(t, max).is_some());
        if clash {
            c.fail(
                "topics",
                self.consumer.topics.join(","),
                "source topics distinct from the retry topics and the DLQ",
            );
        }
    }

    /// What a valid load settles: SASL mechanisms in upper case, and the producer topic
    /// always among the allowed topics.
    pub(crate) fn normalize(&mut self) {
        if let Some(m) = &mut self.kafka.sasl_mechanism {
            m.make_ascii_uppercase();
        }
        let p = &mut self.producer;
        if !p.allowed_topics.contains(&p.topic) {
            p.allowed_topics.insert(0, p.topic.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, OffsetReset};

    fn load(env: &[(&str, &str)]) -> Result<Config, Vec<String>> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load_from(None, &env).map_err(|e| e.problems())
    }

    #[test]
    fn static_http_headers_are_parsed_and_their_values_redacted() {
        let c = load(&[(
            "PROCESSOR_HTTP_HEADERS",
            "Authorization=Bearer s3cret=, X-Team=payments",
        )])
        .unwrap();
        let h = &c.processor.http_headers;
        assert_eq!(h.len(), 2);
        assert_eq!(
            (h[0].name.as_str(), h[0].value.expose()),
            ("Authorization", "Bearer s3cret=")
        );
        assert_eq!(
            (h[1].name.as_str(), h[1].value.expose()),
            ("X-Team", "payments")
        );
        let shown = c.to_toml();
        assert!(
            !shown.contains("s3cret") && !shown.contains("payments"),
            "{shown}"
        );
        assert!(shown.contains("Authorization=[redacted]"), "{shown}");
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn bad_static_http_headers_are_reported_without_their_values() {
        for (value, shown) in [
            ("Bearer s3cret", "[redacted]"),
            ("Bad Name=s3cret", "[redacted]"),
            ("User-Agent=s3cret", "User-Agent=[redacted]"),
            ("courier-attempt=s3cret", "courier-attempt=[redacted]"),
            ("X-Empty=", "X-Empty=[redacted]"),
        ] {
            let problems = load(&[("PROCESSOR_HTTP_HEADERS", value)]).unwrap_err();
            assert_eq!(problems.len(), 1, "{value}: {problems:?}");
            assert!(
                problems[0].starts_with(&format!("PROCESSOR_HTTP_HEADERS={shown}:")),
                "{problems:?}"
            );
            assert!(!problems[0].contains("s3cret"), "{problems:?}");
        }
    }

    #[test]
    fn auto_offset_reset_accepts_earliest_or_latest() {
        assert_eq!(
            load(&[]).unwrap().consumer.auto_offset_reset,
            OffsetReset::Earliest
        );
        let c = load(&[("KAFKA_CONSUMER_AUTO_OFFSET_RESET", "LATEST")]).unwrap();
        assert_eq!(c.consumer.auto_offset_reset, OffsetReset::Latest);
        let problems = load(&[("KAFKA_CONSUMER_AUTO_OFFSET_RESET", "middle")]).unwrap_err();
        assert_eq!(
            problems,
            vec!["KAFKA_CONSUMER_AUTO_OFFSET_RESET=middle: expected earliest or latest".to_owned()]
        );
    }

    #[test]
    fn ca_file_is_a_path() {
        let c = load(&[("PROCESSOR_HTTP_CA_FILE", "/etc/courier/ca.pem")]).unwrap();
        assert_eq!(
            c.processor.http_ca_file.as_deref(),
            Some("/etc/courier/ca.pem")
        );
        assert_eq!(
            load(&[("PROCESSOR_HTTP_CA_FILE", " ")])
                .unwrap()
                .processor
                .http_ca_file,
            None
        );
    }
}
