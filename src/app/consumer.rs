//! `courier consumer`: the consumer driver, the pipeline with its worker lanes, dedupe, the
//! retry/DLQ publisher, health checking and the ops server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::observability::{serve_ops, Metrics, Readiness};
use crate::service::builtin::build_processor;
use crate::service::circuit::{Breaker, CircuitSettings};
use crate::service::dedupe::MemoryDedupe;
use crate::service::limits::Limits;
use crate::service::pipeline::{self, ConsumerSummary, PipelineConfig};
use crate::service::worker::WorkerContext;
use crate::service::{Processor, Publisher};
use crate::transport::{consumer, HealthChecker, KafkaPublisher};

/// What a caller may inject (tests and the demo); defaults come from the configuration.
#[derive(Default)]
pub struct ConsumerOptions {
    /// Use this processor instead of `COURIER_PROCESSOR`'s.
    pub processor: Option<Arc<dyn Processor>>,
    /// Use these metrics (to read them from the caller).
    pub metrics: Option<Metrics>,
}

impl std::fmt::Debug for ConsumerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConsumerOptions")
    }
}

/// A started consumer.
#[derive(Debug)]
pub struct RunningConsumer {
    /// The ops server's bound address.
    pub ops_addr: SocketAddr,
    /// Its metrics.
    pub metrics: Metrics,
    /// Finishes after shutdown with the per-partition summary.
    pub done: tokio::task::JoinHandle<ConsumerSummary>,
}

/// The longest delay a retry may get (a processor's `retry_after` is clamped to it); the
/// horizon beyond which a due time is treated as malformed is a margin above it, so a retry
/// written by any member of the group is never treated as due early.
fn max_retry_delay(config: &Config) -> Duration {
    let longest = config
        .retry
        .backoff
        .iter()
        .max()
        .copied()
        .unwrap_or_default();
    longest.max(Duration::from_secs(3600))
}

/// The circuit breaker's settings from `PROCESSOR_CIRCUIT*`.
fn circuit_settings(config: &Config) -> CircuitSettings {
    let p = &config.processor;
    let first = p
        .circuit_open_for
        .first()
        .copied()
        .unwrap_or(Duration::from_secs(1));
    CircuitSettings {
        enabled: p.circuit,
        failure_ratio: p.circuit_failure_ratio,
        min_calls: p.circuit_min_calls,
        window: p.circuit_window,
        open_for: (first, p.circuit_open_for.last().copied().unwrap_or(first)),
    }
}

/// What every worker lane shares, and the pipeline's sizing.
fn pipeline_parts(
    config: &Config,
    processor: Arc<dyn Processor>,
    publisher: Arc<dyn Publisher>,
    metrics: &Metrics,
    readiness: &Arc<Readiness>,
) -> (Arc<WorkerContext>, PipelineConfig) {
    let max_retry_delay = max_retry_delay(config);
    let ctx = Arc::new(WorkerContext {
        processor,
        publisher,
        dedupe: Arc::new(MemoryDedupe::new(config.dedupe.ttl, config.dedupe.capacity)),
        retry: config.retry.clone(),
        retry_max: config.consumer.retry_max,
        group: config.consumer.group_id.clone(),
        metrics: metrics.clone(),
        abort: CancellationToken::new(),
        publish_backoff: (Duration::from_millis(100), Duration::from_secs(10)),
        max_retry_delay,
        holds: readiness.clone(),
        breaker: Breaker::new(circuit_settings(config), metrics.clone()),
        limits: Limits::new(config.processor.max_concurrency, config.processor.max_rate),
        stop_holding: CancellationToken::new(),
    });
    let cfg = PipelineConfig {
        workers: config.consumer.workers,
        max_in_flight: config.consumer.max_in_flight,
        max_in_flight_bytes: config.consumer.max_in_flight_bytes,
        commit_interval: config.consumer.commit_interval,
        shutdown_timeout: config.consumer.shutdown_timeout,
        pause_after: config.consumer.pause_after,
        max_due_ahead: max_retry_delay + Duration::from_secs(60),
    };
    (ctx, cfg)
}

/// Starts the consumer; it runs until `shutdown` is cancelled.
///
/// # Errors
/// When a client cannot be created, the processor is misconfigured or the ops address
/// cannot be bound.
pub async fn start(
    config: Config,
    opts: ConsumerOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<RunningConsumer> {
    let metrics = opts.metrics.unwrap_or_default();
    let readiness = Readiness::new(metrics.clone(), true);
    let processor = match opts.processor {
        Some(p) => p,
        None => build_processor(&config.processor).map_err(|e| anyhow::anyhow!(e))?,
    };
    crate::app::auto_create_topics(&config).await;
    let kafka = Arc::new(KafkaPublisher::new(&config, metrics.clone())?);
    let health = HealthChecker::start(&config, readiness.clone(), Some(kafka.clone()))?;
    let publisher: Arc<dyn Publisher> = kafka;
    let ops_shutdown = CancellationToken::new();
    let (ops_addr, ops_task) = serve_ops(
        config.ops.addr,
        metrics.clone(),
        readiness.clone(),
        ops_shutdown.clone(),
    )
    .await?;
    let (ctx, cfg) = pipeline_parts(&config, processor, publisher.clone(), &metrics, &readiness);
    if config.consumer.auto_offset_reset == crate::config::OffsetReset::Latest {
        let c = config.clone();
        tokio::task::spawn_blocking(move || crate::transport::offset_reset::start_at_end(&c))
            .await??;
    }
    let driver = consumer::start(&config, metrics.clone(), readiness.clone())?;
    tracing::info!(ops = %ops_addr, group = %config.consumer.group_id, topics = ?config.consumer.topics, workers = cfg.workers, max_in_flight = cfg.max_in_flight, brokers = %config.kafka.brokers, "The consumer is running.");
    let flush_timeout = config.producer.flush_timeout;
    let done = tokio::spawn(async move {
        let control: Arc<dyn crate::service::source::DriverControl> = driver.control;
        let summary = pipeline::run(
            cfg,
            ctx,
            control,
            driver.events,
            driver.deliveries,
            shutdown,
        )
        .await;
        publisher.flush(flush_timeout).await;
        health.stop();
        ops_shutdown.cancel();
        let _ = ops_task.await;
        summary
    });
    Ok(RunningConsumer {
        ops_addr,
        metrics,
        done,
    })
}

/// `courier consumer` arguments: none yet (the consumer is configured by its variables).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConsumerArgs {}

/// `courier consumer`: runs until `shutdown`, then drains, commits and leaves the group.
///
/// # Errors
/// When a client, the processor or the ops address cannot be set up.
pub async fn run(
    config: Config,
    _args: ConsumerArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let running = start(config, ConsumerOptions::default(), shutdown).await?;
    running.done.await?;
    Ok(())
}
