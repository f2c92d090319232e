//! Configuration: built-in defaults → optional TOML file → environment variables, merged by
//! figment and deserialized by serde into a typed [`Config`], one struct per section.
//!
//! - `sections.rs` defines every setting once (field, type, default, variable, meaning);
//! - `values.rs` says how values are written (durations, lists, secrets);
//! - `load.rs` merges the layers and collects every problem;
//! - `validate.rs` holds each section's limits and the rules across sections;
//! - `docs.rs` generates the README table and `config/courier.toml`.
//!
//! A refused configuration names, one line per problem, the variable, the value and what is
//! accepted: `KAFKA_PRODUCER_ACKS=2: expected 0, 1 or all`.

#[macro_use]
mod define;
pub mod docs;
mod error;
mod load;
mod sections;
mod validate;
pub mod values;

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use define::Var;
pub use error::{ConfigError, Problem};
pub use load::{ALIASES, CONFIG_FILE_VAR, RDKAFKA_PREFIX};
pub use sections::{
    Acks, AssignmentStrategy, Compression, ConsumerConfig, DedupeConfig, HealthConfig, HttpConfig,
    KafkaConfig, LogConfig, LogFormat, OffsetReset, OpsConfig, ProcessorConfig, ProcessorKind,
    ProducerConfig, RetryConfig, SecurityProtocol,
};
pub use values::{
    is_secret_property, parse_duration, passthrough_name, valid_topic, HeaderSetting, Secret,
};

/// The configuration. In the TOML file, `producer`, `consumer` and `retry` are tables
/// inside `[kafka]`; here they sit beside it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Connection, security and provisioning.
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
    /// Ops server.
    pub ops: OpsConfig,
    /// Health probing.
    pub health: HealthConfig,
    /// Logging.
    pub log: LogConfig,
    /// `[rdkafka]` and `RDKAFKA_*`: librdkafka properties by their dotted names.
    #[serde(deserialize_with = "values::passthrough")]
    pub rdkafka: BTreeMap<String, String>,
}

/// Every setting, in the order of the docs.
pub fn vars() -> impl Iterator<Item = &'static Var> {
    sections::SECTIONS.iter().flat_map(|section| section.iter())
}

impl Config {
    /// Loads the configuration from defaults, the optional TOML file (`file`, else
    /// `COURIER_CONFIG`) and the process environment, and validates it.
    ///
    /// # Errors
    /// A [`ConfigError`] naming, per problem, the variable, its value and what is accepted.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(file, &env)
    }

    /// Like [`Config::load`] with an explicit environment (used by tests).
    ///
    /// # Errors
    /// A [`ConfigError`] naming, per problem, the variable, its value and what is accepted.
    pub fn load_from(file: Option<&Path>, env: &[(String, String)]) -> Result<Config, ConfigError> {
        load::load(file, env)
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
}

#[cfg(test)]
mod tests;
