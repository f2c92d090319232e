//! `courier producer`: the ingest API, an optional generator, health checking and the ops
//! server; on shutdown it stops accepting, flushes with a deadline and logs a summary.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::tls::{self, TlsConfig, TlsListener};
use crate::api::watch::{spawn_reloader, Reload, Watched};
use crate::api::{self, auth, IngestConfig};
use crate::config::Config;
use crate::observability::{serve_ops, Metrics, Readiness};
use crate::service::generator::{
    self, parse_types, GeneratorConfig, GeneratorStats, DEFAULT_MAX_PENDING,
};
use crate::service::ingest::Ledger;
use crate::service::Publisher;
use crate::transport::{HealthChecker, KafkaPublisher};

/// `courier producer` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ProducerArgs {
    /// Generate seed-style events too.
    #[arg(long)]
    pub generate: bool,
    /// Events per second of the generator.
    #[arg(long, default_value_t = 100.0, value_name = "N")]
    pub rate: f64,
    /// Stop after this many generated events.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Event types, comma-separated.
    #[arg(
        long,
        default_value = "order_created,payment_received,notification_sent"
    )]
    pub types: String,
}

impl ProducerArgs {
    /// The generator's settings for `topic`, or `None` without `--generate` (`--rate` is
    /// checked either way, `--types` only with `--generate`).
    ///
    /// # Errors
    /// A `--rate` that is not a positive number, or an unknown or empty `--types`.
    pub fn generator(&self, topic: &str) -> anyhow::Result<Option<GeneratorConfig>> {
        let rate = self.rate;
        if !(rate > 0.0 && rate.is_finite()) {
            anyhow::bail!("--rate={rate}: expected a positive number of events per second");
        }
        if !self.generate {
            return Ok(None);
        }
        Ok(Some(GeneratorConfig {
            topic: topic.to_owned(),
            rate,
            count: self.count,
            types: parse_types(&self.types)?,
            duplicate_share: 0.0,
            max_pending: DEFAULT_MAX_PENDING,
        }))
    }
}

/// `courier producer`: runs until `shutdown` (or, with `--count`, until the generator is
/// done), then flushes.
///
/// # Errors
/// Bad flags, a client or address that cannot be set up, or messages still unacknowledged
/// at the flush deadline.
pub async fn run(
    config: Config,
    args: ProducerArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let opts = ProducerOptions {
        generate: args.generator(&config.producer.topic)?,
        metrics: None,
        progress: true,
    };
    let running = start(config, opts, shutdown).await?;
    let unflushed = running.done.await?;
    if unflushed > 0 {
        anyhow::bail!("{unflushed} messages were not acknowledged before the flush deadline");
    }
    Ok(())
}

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
    pub done: JoinHandle<usize>,
}

/// Starts the producer; it runs until `shutdown` is cancelled (or the generator's count is
/// reached and no HTTP API is wanted).
///
/// # Errors
/// When the client cannot be created, an address cannot be bound, or the ingest token or
/// TLS files (`HTTP_AUTH_TOKENS_FILE`, `HTTP_TLS_*`) cannot be read or do not parse.
pub async fn start(
    config: Config,
    opts: ProducerOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<RunningProducer> {
    let metrics = opts.metrics.clone().unwrap_or_default();
    let ingest = IngestConfig::from_config(&config);
    // The token and TLS files first: a missing or broken one stops the start-up before any
    // client is created.
    let security = IngestSecurity::load(&config, &ingest)?;
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
    let app = api::router(
        ingest.clone(),
        publisher.clone(),
        readiness,
        metrics.clone(),
        ledger.clone(),
    );
    let app = security.protect(app, &ingest, &metrics);
    let (http_addr, http_task) = serve_ingest(
        config.http.addr,
        app,
        security.tls.clone(),
        shutdown.clone(),
    )
    .await?;
    security.watch(metrics, shutdown.clone());
    let stats = Arc::new(GeneratorStats::default());
    let gen_task = opts.generate.clone().map(|g| {
        let (p, l, s) = (publisher.clone(), ledger.clone(), stats.clone());
        spawn_generator(g, p, l, s, shutdown.clone())
    });
    if opts.progress
        && opts.generate.is_some()
        && std::io::IsTerminal::is_terminal(&std::io::stderr())
    {
        spawn_progress(stats.clone(), shutdown.clone());
    }
    security.log_running(&config, http_addr, ops_addr);
    let stopping = Stopping {
        http: http_task,
        generator: gen_task,
        ops: ops_task,
        publisher,
        flush_timeout: config.producer.flush_timeout,
        ledger: ledger.clone(),
        health,
    };
    let done = tokio::spawn(stopping.after(shutdown));
    Ok(RunningProducer {
        http_addr,
        ops_addr,
        ledger,
        generator: stats,
        done,
    })
}

/// The ingest listener's token and TLS files (each optional), loaded and watched.
struct IngestSecurity {
    tokens: Option<Arc<auth::Tokens>>,
    tls: Option<Arc<Watched<TlsConfig>>>,
}

impl IngestSecurity {
    /// Loads the files the configuration names.
    ///
    /// # Errors
    /// A file that is missing, unreadable or malformed, named with its variable.
    fn load(config: &Config, ingest: &IngestConfig) -> anyhow::Result<Self> {
        let tokens = config
            .http
            .auth_tokens_file
            .as_deref()
            .map(|path| auth::load(path, &ingest.allowed_topics))
            .transpose()
            .map_err(anyhow::Error::msg)?;
        let tls = tls::load(&config.http).map_err(anyhow::Error::msg)?;
        Ok(IngestSecurity { tokens, tls })
    }

    /// `app` behind the bearer tokens, when there are any.
    fn protect(&self, app: axum::Router, ingest: &IngestConfig, metrics: &Metrics) -> axum::Router {
        match &self.tokens {
            Some(t) => auth::require_tokens(app, ingest, t.clone(), metrics.clone()),
            None => app,
        }
    }

    /// Logs that the producer is running, and how it can be reached.
    fn log_running(&self, config: &Config, http_addr: SocketAddr, ops_addr: SocketAddr) {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client_certs = config.http.tls_client_ca_file.is_some();
        let bearer_tokens = self.tokens.is_some();
        tracing::info!(http = %http_addr, scheme, client_certs, bearer_tokens, ops = %ops_addr, topic = %config.producer.topic, brokers = %config.kafka.brokers, "The producer is running.");
    }

    /// Re-reads the files when they change and on SIGHUP, until `shutdown`.
    fn watch(&self, metrics: Metrics, shutdown: CancellationToken) {
        let mut watched: Vec<Arc<dyn Reload>> = Vec::new();
        if let Some(t) = &self.tokens {
            watched.push(t.clone());
        }
        if let Some(t) = &self.tls {
            watched.push(t.clone());
        }
        spawn_reloader(watched, metrics, shutdown);
    }
}

/// What a running producer stops, flushes and reports once it is told to shut down.
struct Stopping {
    http: JoinHandle<()>,
    generator: Option<JoinHandle<()>>,
    ops: JoinHandle<()>,
    publisher: Arc<dyn Publisher>,
    flush_timeout: Duration,
    ledger: Arc<Ledger>,
    health: HealthChecker,
}

impl Stopping {
    /// Once `shutdown` is cancelled: lets in-flight requests and the generator finish,
    /// flushes within the deadline, logs the summary and stops the health checker and the
    /// ops server. Returns the messages still unflushed.
    async fn after(self, shutdown: CancellationToken) -> usize {
        shutdown.cancelled().await;
        tracing::info!("Stopping: no new requests; waiting for in-flight requests and flushing.");
        let _ = self.http.await;
        if let Some(g) = self.generator {
            let _ = g.await;
        }
        let unflushed = self.publisher.flush(self.flush_timeout).await;
        if unflushed > 0 {
            tracing::error!(
                unflushed,
                "Messages were still unacknowledged at the flush deadline."
            );
        }
        self.ledger.log_summary();
        self.health.stop();
        let _ = self.ops.await;
        unflushed
    }
}

/// Binds the ingest API on `addr` and serves it, over TLS when `tls` is set, until
/// `shutdown`, letting in-flight requests finish. Returns the bound address.
async fn serve_ingest(
    addr: SocketAddr,
    app: axum::Router,
    tls: Option<Arc<Watched<TlsConfig>>>,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("HTTP_ADDR={addr}: cannot listen: {e}"))?;
    let bound = listener.local_addr()?;
    let stop = async move { shutdown.cancelled().await };
    let task = match tls {
        None => tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await;
        }),
        Some(tls) => {
            let listener = TlsListener::new(listener, tls)?;
            tokio::spawn(async move {
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(stop)
                    .await;
            })
        }
    };
    Ok((bound, task))
}

/// Runs the generator until `shutdown`; one with a `--count` stops the producer once it has
/// sent them all.
fn spawn_generator(
    cfg: GeneratorConfig,
    publisher: Arc<dyn Publisher>,
    ledger: Arc<Ledger>,
    stats: Arc<GeneratorStats>,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let bounded = cfg.count.is_some();
    tokio::spawn(async move {
        generator::run(cfg, publisher, ledger, stats, shutdown.clone()).await;
        if bounded {
            tracing::info!("The generator sent its --count; stopping.");
            shutdown.cancel();
        }
    })
}

/// Prints a live progress line on a terminal (stderr) until `shutdown`.
fn spawn_progress(stats: Arc<GeneratorStats>, shutdown: CancellationToken) {
    use std::io::Write;
    use std::sync::atomic::Ordering::Relaxed;
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
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
