//! The environment of a courier service under test: topic and group names no other test
//! uses, the settings every test service gets, presets for the ways tests run services, and
//! per-test overrides. In-process services take it as a [`Config`]; child processes as
//! their environment.

use crate::config::{Config, ConfigError};
use crate::transport::DevBroker;

/// Retry levels of every test topic set (courier's default `KAFKA_CONSUMER_RETRY_MAX`).
pub const RETRY_LEVELS: u32 = 3;

/// Every courier service under test: ports chosen by the OS, and a session timeout and
/// heartbeat short enough that the mock cluster rebalances a group in seconds (it waits
/// out a whole session timeout after a member leaves).
pub const LOCAL: &[(&str, &str)] = &[
    ("HTTP_ADDR", "127.0.0.1:0"),
    ("OPS_ADDR", "127.0.0.1:0"),
    ("RDKAFKA_SESSION_TIMEOUT_MS", "6000"),
    ("RDKAFKA_HEARTBEAT_INTERVAL_MS", "500"),
];

/// Services a test runs in its own process for a few seconds: short retry back-off,
/// frequent commits, quick health probes, no producer linger.
pub const QUICK: &[(&str, &str)] = &[
    ("KAFKA_RETRY_BACKOFF", "300ms"),
    ("KAFKA_CONSUMER_COMMIT_INTERVAL_MS", "100"),
    ("KAFKA_CONSUMER_SHUTDOWN_TIMEOUT_MS", "5000"),
    ("HEALTH_PROBE_INTERVAL_MS", "100"),
    ("HEALTH_PROBE_TIMEOUT_MS", "500"),
    ("HEALTH_MAX_BACKOFF_MS", "300"),
    ("KAFKA_PRODUCER_LINGER_MS", "0"),
    ("RDKAFKA_TOPIC_METADATA_REFRESH_INTERVAL_MS", "1000"),
];

/// `courier consumer` processes of a multi-process test (kill, fleet), run as in
/// production for minutes: logs at `info` for the post-mortem, a drain bound long enough
/// for a graceful stop, metadata refreshed every second so new members see the topics.
pub const PROCESS: &[(&str, &str)] = &[
    ("KAFKA_CONSUMER_RETRY_MAX", "3"),
    ("KAFKA_CONSUMER_SHUTDOWN_TIMEOUT_MS", "10000"),
    ("RDKAFKA_TOPIC_METADATA_REFRESH_INTERVAL_MS", "1000"),
    ("HEALTH_PROBE_INTERVAL_MS", "500"),
    ("LOG_FORMAT", "pretty"),
    ("LOG_LEVEL", "info"),
];

/// Benchmarks: courier's defaults but for a calmer health probe, and quiet logs.
pub const BENCH: &[(&str, &str)] = &[("HEALTH_PROBE_INTERVAL_MS", "500"), ("LOG_LEVEL", "warn")];

/// One source topic with its retry chain and DLQ, and a consumer group, named for one
/// test: `{stem}-{id}`, `{stem}-{id}-retry-1..3`, `{stem}-{id}-dlq`, `{stem}-group-{id}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// The source topic.
    pub source: String,
    /// Retry topics are `{prefix}-1` to `{prefix}-3`.
    pub prefix: String,
    /// The dead-letter topic.
    pub dlq: String,
    /// The consumer group.
    pub group: String,
}

impl Names {
    /// Fresh names from `stem` and a random id.
    pub fn new(stem: &str) -> Names {
        let id = super::rand_id();
        let source = format!("{stem}-{id}");
        Names {
            prefix: format!("{source}-retry"),
            dlq: format!("{source}-dlq"),
            group: format!("{stem}-group-{id}"),
            source,
        }
    }

    /// Retry topic `n` (1-based).
    pub fn retry_topic(&self, n: u32) -> String {
        format!("{}-{n}", self.prefix)
    }

    /// What a consumer reads: the source topic and the retry topics, in that order.
    pub fn consumed_topics(&self) -> Vec<String> {
        let mut v = vec![self.source.clone()];
        v.extend((1..=RETRY_LEVELS).map(|n| self.retry_topic(n)));
        v
    }

    /// [`Names::consumed_topics`] and the DLQ.
    pub fn all_topics(&self) -> Vec<String> {
        let mut v = self.consumed_topics();
        v.push(self.dlq.clone());
        v
    }

    /// Creates every topic on `broker` with `partitions` partitions.
    ///
    /// # Errors
    /// When the mock cluster refuses a topic.
    pub fn create_on(
        &self,
        broker: &DevBroker,
        partitions: i32,
    ) -> Result<(), rdkafka::error::KafkaError> {
        self.all_topics()
            .iter()
            .try_for_each(|t| broker.create_topic(t, partitions))
    }
}

/// The environment variables of one courier service under test. Later settings replace
/// earlier ones of the same name, so a preset and then a test's own overrides compose:
/// `ServiceEnv::against(&bootstrap, &names).with(QUICK).with(&[("KAFKA_CONSUMER_WORKERS", "8")])`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceEnv {
    vars: Vec<(String, String)>,
}

impl ServiceEnv {
    /// [`LOCAL`] only: for a service that brings its own broker and topics (the demo).
    pub fn local() -> ServiceEnv {
        ServiceEnv::default().with(LOCAL)
    }

    /// [`LOCAL`] with the topics and group of `names`; the broker is set later
    /// ([`ServiceEnv::brokers`]), e.g. for the `dev-broker` that provides it.
    pub fn new(names: &Names) -> ServiceEnv {
        ServiceEnv::local()
            .set("KAFKA_CONSUMER_TOPICS", &names.source)
            .set("KAFKA_PRODUCER_TOPIC", &names.source)
            .set("KAFKA_CONSUMER_GROUP_ID", &names.group)
            .set("KAFKA_RETRY_TOPIC_PREFIX", &names.prefix)
            .set("KAFKA_DLQ_TOPIC", &names.dlq)
    }

    /// [`ServiceEnv::new`] against the broker at `bootstrap`.
    pub fn against(bootstrap: &str, names: &Names) -> ServiceEnv {
        ServiceEnv::new(names).brokers(bootstrap)
    }

    /// Sets `KAFKA_BROKERS`.
    pub fn brokers(self, bootstrap: &str) -> ServiceEnv {
        self.set("KAFKA_BROKERS", bootstrap)
    }

    /// Sets `key`, replacing an earlier value.
    pub fn set(mut self, key: &str, value: impl Into<String>) -> ServiceEnv {
        self.vars.retain(|(k, _)| k != key);
        self.vars.push((key.to_owned(), value.into()));
        self
    }

    /// Sets every pair of `vars`, in order.
    pub fn with(self, vars: &[(&str, &str)]) -> ServiceEnv {
        vars.iter().fold(self, |env, (k, v)| env.set(k, *v))
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The variables, e.g. for `Command::envs`.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The variables, owned.
    pub fn into_vars(self) -> Vec<(String, String)> {
        self.vars
    }

    /// The validated configuration these variables give (no file, no process environment).
    ///
    /// # Errors
    /// When a variable is invalid.
    pub fn try_config(&self) -> Result<Config, ConfigError> {
        Config::load_from(None, &self.vars)
    }

    /// [`ServiceEnv::try_config`]; fails the test when the configuration is invalid.
    pub fn config(&self) -> Config {
        self.try_config()
            .unwrap_or_else(|e| panic!("the test configuration is invalid: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_fresh_and_topics_in_order() {
        let (a, b) = (Names::new("t"), Names::new("t"));
        assert_ne!(a, b);
        assert!(a.source.starts_with("t-") && a.group.starts_with("t-group-"));
        let all = a.all_topics();
        assert_eq!(all.len(), 2 + RETRY_LEVELS as usize);
        assert_eq!(all[0], a.source);
        assert_eq!(all[1], format!("{}-retry-1", a.source));
        assert_eq!(all.last(), Some(&a.dlq));
    }

    #[test]
    fn later_settings_replace_earlier_ones() {
        let names = Names::new("t");
        let env = ServiceEnv::against("127.0.0.1:9", &names)
            .with(QUICK)
            .with(&[
                ("KAFKA_RETRY_BACKOFF", "1s"),
                ("KAFKA_CONSUMER_WORKERS", "3"),
            ]);
        assert_eq!(env.get("KAFKA_RETRY_BACKOFF"), Some("1s"));
        assert_eq!(env.get("KAFKA_BROKERS"), Some("127.0.0.1:9"));
        assert_eq!(
            env.iter()
                .filter(|(k, _)| *k == "KAFKA_RETRY_BACKOFF")
                .count(),
            1
        );
        let config = env.config();
        assert_eq!(config.consumer.group_id, names.group);
        assert_eq!(config.consumer.workers, 3);
    }
}
