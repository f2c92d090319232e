//! Wiring: each subcommand builds its transport, service and observability parts from the
//! configuration and runs until its shutdown token is cancelled.

pub mod consumer;
pub mod demo;
pub mod dlq;
pub mod producer;
pub mod tools;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
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

/// Provisions the topics when `KAFKA_AUTO_CREATE_TOPICS=true`; a refusal is logged, not fatal
/// (the topics may exist already or be created by other means).
pub async fn auto_create_topics(config: &Config) {
    if !config.kafka.auto_create_topics {
        return;
    }
    let admin = match TopicAdmin::new(config) {
        Ok(a) => Arc::new(a),
        Err(e) => {
            tracing::warn!(error = %e, "Cannot create an admin client to provision topics.");
            return;
        }
    };
    match admin.create_all(config).await {
        Ok(done) => {
            for (topic, outcome) in done {
                tracing::info!(topic, outcome = ?outcome, "Topic provisioned.");
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "Topic provisioning failed; continuing with the topics that exist.")
        }
    }
}
