//! Topic administration: idempotent provisioning of the source, retry and DLQ topics, and a
//! listing with partition counts. A broker that refuses CreateTopics (such as the in-memory
//! dev broker) gets a clear message naming the topics to create by other means.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;

use crate::config::Config;
use crate::transport::settings::{client_config, ClientRole};

/// What happened to one topic during provisioning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicOutcome {
    /// Created now.
    Created,
    /// Already there.
    Exists,
}

/// A topic and its partition count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    /// Topic name.
    pub name: String,
    /// Partitions.
    pub partitions: usize,
}

/// Why provisioning or listing failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    /// The broker could not be reached.
    #[error("cannot reach the broker at {brokers}: {reason}")]
    Unreachable {
        /// `KAFKA_BROKERS`.
        brokers: String,
        /// The client's error.
        reason: String,
    },
    /// The broker refused to create topics.
    #[error("the broker refused to create topics ({reason}); create them by other means: {}", .missing.join(", "))]
    Refused {
        /// Topics still missing.
        missing: Vec<String>,
        /// The broker's answer.
        reason: String,
    },
}

/// Creates and lists topics.
pub struct TopicAdmin {
    admin: AdminClient<DefaultClientContext>,
    brokers: String,
    timeout: Duration,
}

impl std::fmt::Debug for TopicAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TopicAdmin")
    }
}

impl TopicAdmin {
    /// An admin client with the connection settings of `config`.
    ///
    /// # Errors
    /// When librdkafka rejects the configuration.
    pub fn new(config: &Config) -> Result<Self, rdkafka::error::KafkaError> {
        Ok(TopicAdmin {
            admin: client_config(config, ClientRole::Admin).create()?,
            brokers: config.kafka.brokers.clone(),
            timeout: Duration::from_secs(10),
        })
    }

    /// Topics and partition counts, sorted by name (internal `__` topics left out).
    ///
    /// # Errors
    /// [`AdminError::Unreachable`] when no broker answers.
    pub async fn list(&self) -> Result<Vec<TopicInfo>, AdminError> {
        let client = self.admin.inner();
        let md = tokio::task::block_in_place(|| client.fetch_metadata(None, self.timeout))
            .map_err(|e| AdminError::Unreachable {
                brokers: self.brokers.clone(),
                reason: e.to_string(),
            })?;
        let mut out: Vec<TopicInfo> = md
            .topics()
            .iter()
            .filter(|t| !t.name().starts_with("__") && t.error().is_none())
            .map(|t| TopicInfo {
                name: t.name().to_owned(),
                partitions: t.partitions().len(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Creates every topic of `config` that does not exist yet.
    ///
    /// # Errors
    /// [`AdminError::Refused`] when the broker will not create them; [`AdminError::Unreachable`].
    pub async fn create_all(
        &self,
        config: &Config,
    ) -> Result<Vec<(String, TopicOutcome)>, AdminError> {
        let wanted = config.all_topics();
        let existing: Vec<String> = self.list().await?.into_iter().map(|t| t.name).collect();
        let missing: Vec<&String> = wanted.iter().filter(|t| !existing.contains(t)).collect();
        let mut result: Vec<(String, TopicOutcome)> = wanted
            .iter()
            .filter(|t| existing.contains(t))
            .map(|t| (t.clone(), TopicOutcome::Exists))
            .collect();
        if missing.is_empty() {
            return Ok(result);
        }
        let new_topics: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|t| {
                NewTopic::new(
                    t,
                    config.kafka.topic_partitions,
                    TopicReplication::Fixed(config.kafka.topic_replication),
                )
            })
            .collect();
        let opts = AdminOptions::new()
            .operation_timeout(Some(self.timeout))
            .request_timeout(Some(self.timeout));
        let answers = self
            .admin
            .create_topics(&new_topics, &opts)
            .await
            .map_err(|e| AdminError::Refused {
                missing: missing.iter().map(|s| s.to_string()).collect(),
                reason: e.to_string(),
            })?;
        let mut refused = Vec::new();
        let mut reason = String::new();
        for answer in answers {
            match answer {
                Ok(name) => result.push((name, TopicOutcome::Created)),
                Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    result.push((name, TopicOutcome::Exists))
                }
                Err((name, code)) => {
                    reason = code.to_string();
                    refused.push(name);
                }
            }
        }
        if !refused.is_empty() {
            return Err(AdminError::Refused {
                missing: refused,
                reason,
            });
        }
        Ok(result)
    }
}
