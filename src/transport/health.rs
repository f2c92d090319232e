//! The broker health checker: probes the cluster with a metadata request on an interval, on
//! its own thread (the probe blocks), backs off while the broker is down, lets a publisher
//! recreate a producer that hit a fatal error, and feeds `/readyz` and `courier_broker_up`.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use backon::{BackoffBuilder, ExponentialBuilder};
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::config::Config;
use crate::observability::Readiness;
use crate::transport::context::CourierContext;
use crate::transport::settings::{client_config, ClientRole};
use crate::transport::KafkaPublisher;

/// A running health checker; dropping it (or [`HealthChecker::stop`]) ends the thread.
pub struct HealthChecker {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for HealthChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HealthChecker")
    }
}

impl HealthChecker {
    /// Starts probing. `publisher`, if given, is checked for a fatal error after each probe.
    ///
    /// # Errors
    /// When the probe client cannot be created from the configuration.
    pub fn start(
        config: &Config,
        readiness: Arc<Readiness>,
        publisher: Option<Arc<KafkaPublisher>>,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let client: BaseConsumer<CourierContext> = client_config(config, ClientRole::Admin)
            .create_with_context(CourierContext::default())?;
        let interval = config.health.probe_interval;
        let timeout = config.health.probe_timeout;
        let max_backoff = config.health.max_backoff.max(interval);
        let (tx, rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("courier-health".into())
            .spawn(move || {
                let new_backoff = || {
                    ExponentialBuilder::default()
                        .with_min_delay(interval)
                        .with_max_delay(max_backoff)
                        .with_factor(2.0)
                        .with_jitter()
                        .without_max_times()
                        .build()
                };
                let mut backoff = new_backoff();
                loop {
                    let wait = match client.client().fetch_metadata(None, timeout) {
                        Ok(md) if !md.brokers().is_empty() => {
                            if !readiness.is_broker_up() {
                                tracing::info!(brokers = md.brokers().len(), "The broker is reachable.");
                            }
                            readiness.broker_ok();
                            backoff = new_backoff();
                            interval
                        }
                        Ok(_) => {
                            readiness.broker_failed("metadata listed no brokers");
                            backoff.next().unwrap_or(max_backoff)
                        }
                        Err(e) => {
                            let n = readiness.broker_failed(&e.to_string());
                            let wait = backoff.next().unwrap_or(max_backoff);
                            tracing::warn!(consecutive_failures = n, error = %e, retry_in_ms = wait.as_millis() as u64, "The broker did not answer a metadata probe.");
                            wait
                        }
                    };
                    if let Some(p) = &publisher {
                        if let Some(reason) = p.recreate_if_fatal() {
                            readiness.broker_failed(&format!("producer fatal error: {reason}"));
                        }
                    }
                    match rx.recv_timeout(wait) {
                        Err(mpsc::RecvTimeoutError::Timeout) => continue,
                        _ => break,
                    }
                }
            })
            .map_err(|e| rdkafka::error::KafkaError::ClientCreation(e.to_string()))?;
        Ok(HealthChecker {
            stop: Some(tx),
            thread: Some(thread),
        })
    }

    /// Stops probing and waits for the thread (at most one probe timeout).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        self.stop.take();
        // Do not join on drop: a probe may block for its timeout; the thread ends by itself.
        self.thread.take();
    }
}
