//! courier's consumer and producer started in the test's own process, with a shutdown
//! token the test holds.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::wait_ready;
use crate::app::consumer::{self, ConsumerOptions, RunningConsumer};
use crate::app::producer::{self, ProducerOptions, RunningProducer};
use crate::config::Config;
use crate::service::pipeline::ConsumerSummary;
use crate::service::Processor;

/// Starts courier's consumer with `processor`; fails the test when it cannot start.
pub async fn start_consumer(
    config: Config,
    processor: Arc<dyn Processor>,
) -> (RunningConsumer, CancellationToken) {
    let shutdown = CancellationToken::new();
    let options = ConsumerOptions {
        processor: Some(processor),
        metrics: None,
    };
    let running = consumer::start(config, options, shutdown.clone())
        .await
        .expect("consumer starts");
    (running, shutdown)
}

/// Cancels `shutdown` and waits up to `timeout` for the consumer's summary; fails the test
/// when it does not stop in time or its task panicked.
pub async fn stop_consumer(
    running: RunningConsumer,
    shutdown: CancellationToken,
    timeout: Duration,
) -> ConsumerSummary {
    shutdown.cancel();
    tokio::time::timeout(timeout, running.done)
        .await
        .expect("consumer stops in time")
        .expect("consumer task")
}

/// Starts courier's producer (ingest API and ops server); fails the test when it cannot
/// start. It may not be ready yet: see [`super::wait_ready`].
pub async fn start_producer(config: Config) -> (RunningProducer, CancellationToken) {
    let shutdown = CancellationToken::new();
    let running = producer::start(config, ProducerOptions::default(), shutdown.clone())
        .await
        .expect("producer starts");
    (running, shutdown)
}

/// Cancels `shutdown` and waits up to `timeout` for the producer to finish; returns the
/// messages it left unflushed. Fails the test when it does not stop in time or its task
/// panicked.
pub async fn stop_producer(
    running: RunningProducer,
    shutdown: CancellationToken,
    timeout: Duration,
) -> usize {
    shutdown.cancel();
    tokio::time::timeout(timeout, running.done)
        .await
        .expect("producer stops in time")
        .expect("producer task")
}

/// Starts courier's producer (with `options`) and consumer (its own processor) on `config`
/// under one shutdown token, and waits up to `timeout` until the producer is ready; fails
/// the test when either cannot start.
pub async fn start_producer_and_consumer(
    config: Config,
    options: ProducerOptions,
    timeout: Duration,
) -> (RunningProducer, RunningConsumer, CancellationToken) {
    let shutdown = CancellationToken::new();
    let producer = producer::start(config.clone(), options, shutdown.clone())
        .await
        .expect("producer starts");
    let consumer = consumer::start(config, ConsumerOptions::default(), shutdown.clone())
        .await
        .expect("consumer starts");
    wait_ready(&format!("http://{}/readyz", producer.ops_addr), timeout).await;
    (producer, consumer, shutdown)
}
