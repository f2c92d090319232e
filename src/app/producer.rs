//! `courier producer`: the ingest API, an optional generator, health checking and the ops
//! server; on shutdown it stops accepting, flushes with a deadline and logs a summary.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::api::{self, IngestConfig};
use crate::config::Config;
use crate::observability::{serve_ops, Metrics, Readiness};
use crate::service::generator::{self, GeneratorConfig, GeneratorStats};
use crate::service::ingest::Ledger;
use crate::service::Publisher;
use crate::transport::{HealthChecker, KafkaPublisher};

/// Producer options from the command line.
#[derive(Debug, Clone, Default)]
pub struct ProducerOptions {
    /// Run the generator too.
    pub generate: Option<GeneratorConfig>,
    /// Use these metrics (to share one registry with a consumer in the same process).
    pub metrics: Option<Metrics>,
    /// Draw the generator's progress line on stderr when it is a terminal.
    pub progress: bool,
}

/// A started producer: where it listens, and its handles.
#[derive(Debug)]
pub struct RunningProducer {
    /// The ingest API's bound address.
    pub http_addr: SocketAddr,
    /// The ops server's bound address.
    pub ops_addr: SocketAddr,
    /// Publish counts.
    pub ledger: Arc<Ledger>,
    /// Generator counts.
    pub generator: Arc<GeneratorStats>,
    /// Finishes when the producer has shut down; yields the messages still unflushed.
    pub done: tokio::task::JoinHandle<usize>,
}

/// Starts the producer; it runs until `shutdown` is cancelled (or the generator's count is
/// reached and no HTTP API is wanted).
///
/// # Errors
/// When the client cannot be created or an address cannot be bound.
pub async fn start(
    config: Config,
    opts: ProducerOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<RunningProducer> {
    let metrics = opts.metrics.clone().unwrap_or_default();
    let readiness = Readiness::new(metrics.clone(), false);
    crate::app::auto_create_topics(&config).await;
    let kafka = Arc::new(KafkaPublisher::new(&config, metrics.clone())?);
    let health = HealthChecker::start(&config, readiness.clone(), Some(kafka.clone()))?;
    let publisher: Arc<dyn Publisher> = kafka.clone();
    let ledger = Arc::new(Ledger::default());
    let (ops_addr, ops_task) = serve_ops(
        config.ops.addr,
        metrics.clone(),
        readiness.clone(),
        shutdown.clone(),
    )
    .await?;
    let listener = tokio::net::TcpListener::bind(config.http.addr)
        .await
        .map_err(|e| anyhow::anyhow!("HTTP_ADDR={}: cannot listen: {e}", config.http.addr))?;
    let http_addr = listener.local_addr()?;
    let app = api::router(
        IngestConfig {
            default_topic: config.producer.topic.clone(),
            allowed_topics: config.producer.allowed_topics.clone(),
            max_body_bytes: config.http.max_body_bytes,
            max_batch_events: config.http.max_batch_events,
            request_timeout: config.http.request_timeout,
        },
        publisher.clone(),
        readiness.clone(),
        metrics.clone(),
        ledger.clone(),
    );
    let http_shutdown = shutdown.clone();
    let http_task = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { http_shutdown.cancelled().await })
            .await;
    });
    let stats = Arc::new(GeneratorStats::default());
    let gen_task = opts.generate.clone().map(|g| {
        let (p, l, s, t) = (
            publisher.clone(),
            ledger.clone(),
            stats.clone(),
            shutdown.clone(),
        );
        let bounded = g.count.is_some();
        tokio::spawn(async move {
            generator::run(g, p, l, s, t.clone()).await;
            if bounded {
                tracing::info!("The generator sent its --count; stopping.");
                t.cancel();
            }
        })
    });
    if opts.progress
        && opts.generate.is_some()
        && std::io::IsTerminal::is_terminal(&std::io::stderr())
    {
        spawn_progress(stats.clone(), shutdown.clone());
    }
    tracing::info!(http = %http_addr, ops = %ops_addr, topic = %config.producer.topic, brokers = %config.kafka.brokers, "The producer is running.");
    let flush_timeout = config.producer.flush_timeout;
    let done_ledger = ledger.clone();
    let done = tokio::spawn(async move {
        shutdown.cancelled().await;
        tracing::info!("Stopping: no new requests; waiting for in-flight requests and flushing.");
        let _ = http_task.await;
        if let Some(g) = gen_task {
            let _ = g.await;
        }
        let unflushed = publisher.flush(flush_timeout).await;
        if unflushed > 0 {
            tracing::error!(
                unflushed,
                "Messages were still unacknowledged at the flush deadline."
            );
        }
        done_ledger.log_summary();
        health.stop();
        let _ = ops_task.await;
        unflushed
    });
    Ok(RunningProducer {
        http_addr,
        ops_addr,
        ledger,
        generator: stats,
        done,
    })
}

/// Prints a live progress line on a terminal (stderr) until `shutdown`.
fn spawn_progress(stats: Arc<GeneratorStats>, shutdown: CancellationToken) {
    use std::io::Write;
    use std::sync::atomic::Ordering::Relaxed;
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let acked = stats.acked.load(Relaxed);
            let rate = acked as f64 / started.elapsed().as_secs_f64().max(0.001);
            eprint!(
                "\r\x1b[2Ksent {} | acked {} | failed {} | {:.0} msg/s",
                stats.sent.load(Relaxed),
                acked,
                stats.failed.load(Relaxed),
                rate
            );
            let _ = std::io::stderr().flush();
        }
        eprintln!();
    });
}
