//! Wiring: each subcommand builds its transport, service and observability parts from the
//! configuration and runs until its shutdown token is cancelled. Every subcommand `x` has
//! the same shape: `XArgs` (its flags) and `app::x::run(config, args, shutdown)`.

pub(crate) mod config;
pub mod consumer;
pub mod demo;
pub(crate) mod dev_broker;
pub mod dlq;
pub mod producer;
pub(crate) mod topics;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::transport::admin::{AdminError, TopicOutcome};
use crate::transport::TopicAdmin;

/// A cancellation token cancelled by SIGTERM or SIGINT (Ctrl-C).
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("Received a shutdown signal.");
        t.cancel();
    });
    token
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// What start-up provisioning (`KAFKA_AUTO_CREATE_TOPICS=true`) did with one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provisioned {
    /// Created now.
    Created,
    /// It existed already.
    Exists,
    /// Not created, and not known to exist: the broker refused to create it or could not be
    /// reached. The service starts anyway; the reason says what to do.
    Failed {
        /// The broker's or the client's answer.
        reason: String,
    },
}

/// Provisions the topics when `KAFKA_AUTO_CREATE_TOPICS=true` and returns what happened to
/// each topic of the configuration (nothing when auto-create is off). A refusal is logged,
/// not fatal: the topics may be created by other means.
pub async fn auto_create_topics(config: &Config) -> Vec<(String, Provisioned)> {
    if !config.kafka.auto_create_topics {
        return Vec::new();
    }
    let wanted = config.all_topics();
    let all_failed = |reason: String| -> Vec<(String, Provisioned)> {
        tracing::warn!(error = %reason, topics = ?wanted, "Topic provisioning failed; continuing with the topics that exist.");
        let failed = Provisioned::Failed { reason };
        wanted.iter().map(|t| (t.clone(), failed.clone())).collect()
    };
    let admin = match TopicAdmin::new(config) {
        Ok(a) => a,
        Err(e) => return all_failed(format!("cannot create an admin client: {e}")),
    };
    // Listed first, so that a partial refusal still tells created topics from existing ones.
    let existing: Vec<String> = match admin.list().await {
        Ok(topics) => topics.into_iter().map(|t| t.name).collect(),
        Err(e) => return all_failed(e.to_string()),
    };
    let outcomes: Vec<(String, Provisioned)> = match admin.create_all(config).await {
        Ok(done) => done
            .into_iter()
            .map(|(topic, outcome)| {
                let outcome = match outcome {
                    TopicOutcome::Created => Provisioned::Created,
                    TopicOutcome::Exists => Provisioned::Exists,
                };
                (topic, outcome)
            })
            .collect(),
        Err(e) => {
            let AdminError::Refused { missing, .. } = &e else {
                return all_failed(e.to_string());
            };
            tracing::warn!(error = %e, "Topic provisioning failed; continuing with the topics that exist.");
            let reason = e.to_string();
            wanted
                .iter()
                .map(|t| {
                    let outcome = if missing.contains(t) {
                        Provisioned::Failed {
                            reason: reason.clone(),
                        }
                    } else if existing.contains(t) {
                        Provisioned::Exists
                    } else {
                        Provisioned::Created
                    };
                    (t.clone(), outcome)
                })
                .collect()
        }
    };
    for (topic, outcome) in &outcomes {
        if !matches!(outcome, Provisioned::Failed { .. }) {
            tracing::info!(topic, outcome = ?outcome, "Topic provisioned.");
        }
    }
    outcomes
}
