//! `courier demo`: the in-memory dev broker, the producer (with its generator) and the
//! consumer in one process, with failures injected by [`DemoProcessor`], so a newcomer sees
//! the whole flow (retry topics, the DLQ, dedupe, `/metrics`) with one command on a fresh
//! machine.
//!
//! It ends on Ctrl-C or after `--duration`: it stops the generator, waits (bounded) until
//! every produced message is finished, stops the consumer cleanly and prints a summary
//! whose numbers must add up: every produced message was processed ok, skipped as a
//! duplicate, or dead-lettered.

use std::io::{IsTerminal, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::app::consumer::{self, ConsumerOptions, RunningConsumer};
use crate::app::producer::{self, ProducerOptions, RunningProducer};
use crate::config::{parse_duration, Config};
use crate::observability::Metrics;
use crate::service::demo::{check_share, DemoProcessor, DemoTopics, FailurePlan, LiveCounts};
use crate::service::generator::{GeneratorConfig, EVENT_TYPES};
use crate::service::Processor;
use crate::transport::DevBroker;

pub use crate::service::demo::{DemoSummary, DrainEnd};

/// The retry delays of the demo unless `KAFKA_RETRY_BACKOFF` (or the TOML file) sets them:
/// short, so the whole retry chain plays out within seconds.
const DEMO_BACKOFF: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(3),
];
/// The consumer's ops address of the demo unless `OPS_ADDR` sets one: loopback only.
const DEMO_OPS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9090);
/// The ingest API of the demo unless `HTTP_ADDR` sets one: loopback only.
const DEMO_HTTP_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);
/// How often the demo probes the broker unless `HEALTH_PROBE_INTERVAL_MS` sets it, so
/// `/readyz` turns ready quickly.
const DEMO_PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// Slack of the drain on top of the retry chain's delays (fetching, commits, a slow host).
const DRAIN_SLACK: Duration = Duration::from_secs(30);

/// `courier demo` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Stop by itself after this long (e.g. 30s, 2m); without it, run until Ctrl-C.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Generated events per second.
    #[arg(long, value_name = "N", default_value_t = 50.0, value_parser = parse_rate)]
    pub rate: f64,
    /// Share of events that fail once or twice, then succeed on a retry.
    #[arg(long, value_name = "F", default_value_t = 0.10, value_parser = parse_share)]
    pub transient_share: f64,
    /// Share of events that never succeed: half fail fatally (straight to the DLQ), half
    /// fail through every retry level.
    #[arg(long, value_name = "F", default_value_t = 0.05, value_parser = parse_share)]
    pub permanent_share: f64,
    /// Share of events the generator re-sends with an earlier event's id, to show dedupe.
    #[arg(long, value_name = "F", default_value_t = 0.05, value_parser = parse_share)]
    pub duplicate_share: f64,
}

/// `--*-share`: clap names the flag in its error, so the message says only what is accepted.
fn parse_share(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err("expected a number from 0 to 1".into()),
    }
}

/// `--rate`: a rate of zero would never produce anything, and the generator needs a finite one.
fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err("expected a positive number of events per second".into()),
    }
}

/// How the demo reports progress while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressStyle {
    /// One line updated in place with a carriage return: for a terminal that nothing else
    /// writes to.
    Live,
    /// A plain line every `every`; `clear_line` first clears whatever another writer (the
    /// producer's own progress on stderr) left on the terminal's current row.
    Lines {
        /// How often.
        every: Duration,
        /// Start each line with a carriage return and an erase-line escape.
        clear_line: bool,
    },
}

/// What the demo does; [`DemoArgs`] from the command line, or set directly by tests.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Stop by itself after this long; `None`: only when `shutdown` is cancelled.
    pub duration: Option<Duration>,
    /// Generated events per second.
    pub rate: f64,
    /// Which shares of messages fail, and how.
    pub failures: FailurePlan,
    /// Share of generated events that re-use an earlier event's id.
    pub duplicate_share: f64,
    /// How progress is shown.
    pub progress: ProgressStyle,
    /// Cancelled to stop waiting for the drain after `shutdown` ended the run (the CLI
    /// wires it to a second Ctrl-C); after `duration`, cancelling `shutdown` does the same.
    /// The summary then says the drain was interrupted.
    pub stop_draining: CancellationToken,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            duration: None,
            rate: 50.0,
            failures: FailurePlan {
                transient_share: 0.10,
                permanent_share: 0.05,
            },
            duplicate_share: 0.05,
            progress: ProgressStyle::Lines {
                every: Duration::from_secs(5),
                clear_line: false,
            },
            stop_draining: CancellationToken::new(),
        }
    }
}

impl DemoOptions {
    /// Checks the options before anything starts, naming the flag of a bad value.
    ///
    /// # Errors
    /// A rate that is not a positive number, a share outside 0..=1, or failure shares that
    /// add up to more than 1.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.rate > 0.0 && self.rate.is_finite()) {
            return Err(format!(
                "--rate={}: expected a positive number of events per second",
                self.rate
            ));
        }
        self.failures.validate()?;
        check_share("--duplicate-share", self.duplicate_share)
    }
}

/// Runs the demo from the command line: Ctrl-C (SIGINT/SIGTERM) ends it, a second Ctrl-C
/// stops waiting for the drain, and the summary goes to stdout.
///
/// # Errors
/// Bad flags, a component that cannot start, or numbers that do not add up unless the user
/// interrupted the drain (so scripts and CI can use the demo as a smoke test).
pub async fn run_cli(config: Config, args: DemoArgs) -> anyhow::Result<()> {
    let (stdout_tty, stderr_tty) = (
        std::io::stdout().is_terminal(),
        std::io::stderr().is_terminal(),
    );
    // Logs go to stderr (quiet by default in the demo, see `cli::demo_log_defaults`); a line
    // updated in place on stdout stays readable unless the user asked for chattier logs.
    let quiet = std::env::var_os("LOG_LEVEL").is_none();
    let progress = match (stdout_tty, stderr_tty) {
        (true, false) => ProgressStyle::Live,
        (true, true) if quiet => ProgressStyle::Live,
        (true, true) => ProgressStyle::Lines {
            every: Duration::from_secs(2),
            clear_line: true,
        },
        _ => ProgressStyle::Lines {
            every: Duration::from_secs(5),
            clear_line: false,
        },
    };
    let opts = DemoOptions {
        duration: args.duration,
        rate: args.rate,
        failures: FailurePlan {
            transient_share: args.transient_share,
            permanent_share: args.permanent_share,
        },
        duplicate_share: args.duplicate_share,
        progress,
        stop_draining: CancellationToken::new(),
    };
    let shutdown = crate::app::shutdown_on_signals();
    let (first, stop_draining) = (shutdown.clone(), opts.stop_draining.clone());
    tokio::spawn(async move {
        first.cancelled().await;
        crate::app::shutdown_on_signals().cancelled().await;
        stop_draining.cancel();
    });
    let summary = run(config, opts, shutdown, std::io::stdout()).await?;
    // Stopping the drain on purpose is the user's call; anything else that does not add up
    // is a failure (a time limit, a lost or doubly counted message).
    if !summary.adds_up() && summary.drain != DrainEnd::Interrupted {
        anyhow::bail!("the demo's numbers do not add up: {}", summary.check_line());
    }
    Ok(())
}

/// Runs the demo: starts the dev broker, the consumer and the producer with its generator;
/// reports progress to `out` until `shutdown` or `opts.duration`; then stops the generator,
/// drains, stops the consumer and writes the summary table to `out`.
///
/// # Errors
/// Bad options, a component that cannot start, or `out` failing for the banner or summary
/// (progress lines are best-effort).
pub async fn run(
    config: Config,
    opts: DemoOptions,
    shutdown: CancellationToken,
    mut out: impl Write + Send,
) -> anyhow::Result<DemoSummary> {
    opts.validate().map_err(anyhow::Error::msg)?;
    let broker = BrokerThread::start(&config).await?;
    let mut notes = Vec::new();
    let (producer_cfg, consumer_cfg) = demo_configs(config, &broker.bootstrap, &mut notes)?;
    let mut demo = Demo::start(producer_cfg, consumer_cfg, &opts).await?;
    out.write_all(demo.banner(&broker.bootstrap, &opts, &notes).as_bytes())?;
    out.flush()?;
    let mut progress = Progress::new(opts.progress);
    let started = Instant::now();
    let reason = demo
        .watch(&mut out, &mut progress, &opts, &shutdown)
        .await?;
    let ran_for = started.elapsed();
    progress.end_line(&mut out);
    writeln!(
        out,
        "{reason}: stopping the generator, then waiting for every produced message to finish."
    )?;
    demo.stop_producer().await?;
    // After --duration, the first Ctrl-C stops waiting; after a Ctrl-C, the second one.
    let stop_waiting = match reason {
        StopReason::Duration => shutdown,
        StopReason::Signal => opts.stop_draining.clone(),
    };
    let drain = demo.drain(&mut out, &mut progress, &stop_waiting).await;
    progress.end_line(&mut out);
    let summary = demo.finish(ran_for, drain).await?;
    summary.write_table(&mut out, &demo.topics)?;
    out.flush()?;
    drop(demo);
    drop(broker);
    Ok(summary)
}

/// The dev broker on a thread of its own: librdkafka's mock cluster handle is not `Send`,
/// and keeping it off the async task lets callers spawn the demo's future. Dropping this
/// stops the broker.
#[derive(Debug)]
struct BrokerThread {
    bootstrap: String,
    _stop: std::sync::mpsc::Sender<()>,
}

impl BrokerThread {
    /// Starts the in-memory broker with every topic the configuration names.
    async fn start(config: &Config) -> anyhow::Result<Self> {
        let (topics, partitions) = (config.all_topics(), config.kafka.topic_partitions);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<String, String>>();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("demo-broker".into())
            .spawn(move || {
                let started = DevBroker::start()
                    .map_err(|e| format!("cannot start the in-memory dev broker: {e}"))
                    .and_then(|broker| {
                        for topic in &topics {
                            broker.create_topic(topic, partitions).map_err(|e| {
                                format!("cannot create topic {topic} on the dev broker: {e}")
                            })?;
                        }
                        Ok(broker)
                    });
                let broker = match started {
                    Ok(b) => b,
                    Err(e) => return drop(ready_tx.send(Err(e))),
                };
                let _ = ready_tx.send(Ok(broker.bootstrap_servers()));
                // Returns once the sender is dropped: then the broker goes.
                let _ = stop_rx.recv();
                drop(broker);
            })?;
        let bootstrap = ready_rx
            .await
            .map_err(|_| anyhow::anyhow!("the dev broker's thread ended before it started"))?
            .map_err(anyhow::Error::msg)?;
        tracing::info!(bootstrap = %bootstrap, topics = ?config.all_topics(), "The demo's in-memory broker is running.");
        Ok(BrokerThread {
            bootstrap,
            _stop: stop_tx,
        })
    }
}

/// The producer's and the consumer's configurations: the loaded one, changed only where
/// the demo must (the broker, addresses on loopback, short delays the user did not set).
fn demo_configs(
    mut config: Config,
    bootstrap: &str,
    notes: &mut Vec<String>,
) -> anyhow::Result<(Config, Config)> {
    if !config.consumer.topics.contains(&config.producer.topic) {
        anyhow::bail!(
            "KAFKA_PRODUCER_TOPIC={}: the demo needs it among KAFKA_CONSUMER_TOPICS ({}) so that what it produces is consumed",
            config.producer.topic,
            config.consumer.topics.join(",")
        );
    }
    let defaults = Config::default();
    config.kafka.brokers = bootstrap.to_owned();
    // The demo created the topics itself (the dev broker has no CreateTopics API).
    config.kafka.auto_create_topics = false;
    if config.retry.backoff == defaults.retry.backoff {
        config.retry.backoff = DEMO_BACKOFF.to_vec();
    }
    if config.health.probe_interval == defaults.health.probe_interval {
        config.health.probe_interval = DEMO_PROBE_INTERVAL;
    }
    let producer_ops = demo_addresses(&mut config, &defaults, notes);
    let mut producer_cfg = config.clone();
    producer_cfg.ops.addr = producer_ops;
    Ok((producer_cfg, config))
}

/// Puts the consumer's ops server and the ingest API on loopback unless the user chose
/// addresses, falls back to free ports where taken, and returns the producer's ops address
/// (the next port up; the consumer's `OPS_ADDR` is the one the banner shows).
fn demo_addresses(config: &mut Config, defaults: &Config, notes: &mut Vec<String>) -> SocketAddr {
    let wanted_ops = if config.ops.addr == defaults.ops.addr {
        DEMO_OPS_ADDR
    } else {
        config.ops.addr
    };
    let wanted_http = if config.http.addr == defaults.http.addr {
        DEMO_HTTP_ADDR
    } else {
        config.http.addr
    };
    config.ops.addr = available("OPS_ADDR", wanted_ops, notes);
    config.http.addr = available("HTTP_ADDR", wanted_http, notes);
    let producer_ops = match config.ops.addr.port() {
        0 | u16::MAX => SocketAddr::new(config.ops.addr.ip(), 0),
        p => SocketAddr::new(config.ops.addr.ip(), p + 1),
    };
    available("the producer's ops address", producer_ops, notes)
}

/// `addr` if it can be bound now, else the same IP with port 0 (any free port), with a
/// note for the banner; the real address is printed once it is bound.
fn available(what: &str, addr: SocketAddr, notes: &mut Vec<String>) -> SocketAddr {
    if addr.port() == 0 {
        return addr;
    }
    let probe = || -> std::io::Result<()> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As tokio's own listeners do, so a port in TIME_WAIT counts as free; binding
        // still fails while another socket listens on it.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)
    };
    match probe() {
        Ok(()) => addr,
        Err(e) => {
            notes.push(format!(
                "{what} {addr} is not available ({e}); using a free port instead."
            ));
            SocketAddr::new(addr.ip(), 0)
        }
    }
}

/// An address as a URL host: a wildcard address is reached through loopback.
fn url_addr(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

/// Why the generating phase ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    Duration,
    Signal,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::Duration => "The --duration is over",
            StopReason::Signal => "Interrupted",
        })
    }
}

/// How the drain ended.
#[derive(Debug, Clone, Copy)]
struct Drain {
    took: Duration,
    end: DrainEnd,
}

/// Writes progress in the chosen style; writes are best-effort (a closed stdout must not
/// abandon the drain).
#[derive(Debug)]
struct Progress {
    style: ProgressStyle,
    started: Instant,
    last: Option<Instant>,
    line_open: bool,
}

impl Progress {
    fn new(style: ProgressStyle) -> Self {
        let now = Instant::now();
        Progress {
            style,
            started: now,
            // Plain lines start after one period; a live line at once.
            last: matches!(style, ProgressStyle::Lines { .. }).then_some(now),
            line_open: false,
        }
    }

    /// Writes a progress line if one is due (or `now`).
    fn tick(&mut self, out: &mut impl Write, snap: &LiveCounts, now: bool) {
        let every = match self.style {
            ProgressStyle::Live => Duration::from_millis(250),
            ProgressStyle::Lines { every, .. } => every,
        };
        if !now && self.last.is_some_and(|t| t.elapsed() < every) {
            return;
        }
        self.last = Some(Instant::now());
        let line = snap.line(self.started.elapsed());
        let _ = match self.style {
            ProgressStyle::Live => {
                self.line_open = true;
                write!(out, "\r\x1b[2K{line}")
            }
            ProgressStyle::Lines {
                clear_line: true, ..
            } => writeln!(out, "\r\x1b[2K{line}"),
            ProgressStyle::Lines { .. } => writeln!(out, "{line}"),
        };
        let _ = out.flush();
    }

    /// Ends a live line, so that what follows starts on a line of its own.
    fn end_line(&mut self, out: &mut impl Write) {
        if self.line_open {
            let _ = writeln!(out);
            self.line_open = false;
        }
    }
}

/// The running parts of the demo. Dropping it stops the producer and the consumer, so an
/// early error return does not leave them running.
struct Demo {
    metrics: Metrics,
    processor: Arc<DemoProcessor>,
    producer: RunningProducer,
    consumer: RunningConsumer,
    producer_stop: CancellationToken,
    consumer_stop: CancellationToken,
    topics: DemoTopics,
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.producer_stop.cancel();
        self.consumer_stop.cancel();
    }
}

impl Demo {
    /// Starts the consumer first (it joins its group while the producer starts), then the
    /// producer with the generator, both on one metrics registry.
    async fn start(
        producer_cfg: Config,
        consumer_cfg: Config,
        opts: &DemoOptions,
    ) -> anyhow::Result<Demo> {
        let metrics = Metrics::new();
        let topics = DemoTopics::from_config(&consumer_cfg);
        let processor = Arc::new(DemoProcessor::new(opts.failures, topics.retry_max));
        let consumer_stop = CancellationToken::new();
        let producer_stop = CancellationToken::new();
        let consumer_opts = ConsumerOptions {
            processor: Some(processor.clone() as Arc<dyn Processor>),
            metrics: Some(metrics.clone()),
        };
        let consumer = consumer::start(consumer_cfg, consumer_opts, consumer_stop.clone()).await?;
        // Until the producer is up, an error must not leave the consumer running.
        let guard = consumer_stop.clone().drop_guard();
        let generate = GeneratorConfig {
            topic: producer_cfg.producer.topic.clone(),
            rate: opts.rate,
            count: None,
            types: EVENT_TYPES.iter().map(|t| (*t).to_owned()).collect(),
            duplicate_share: opts.duplicate_share,
            max_pending: 10_000,
        };
        let producer_opts = ProducerOptions {
            generate: Some(generate),
            metrics: Some(metrics.clone()),
            progress: false,
        };
        let producer = producer::start(producer_cfg, producer_opts, producer_stop.clone()).await?;
        guard.disarm();
        Ok(Demo {
            metrics,
            processor,
            producer,
            consumer,
            producer_stop,
            consumer_stop,
            topics,
        })
    }

    fn counts(&self) -> LiveCounts {
        LiveCounts::read(&self.metrics, &self.topics)
    }

    fn metrics_url(&self) -> String {
        format!("http://{}/metrics", url_addr(self.consumer.ops_addr))
    }

    /// The kcat commands that show each topic of the chain, one per line.
    fn kcat_lines(&self, bootstrap: &str) -> String {
        let t = &self.topics;
        let retries = (1..=t.retry_max).map(|n| t.retry.topic(n));
        t.sources
            .iter()
            .cloned()
            .chain(retries)
            .chain(std::iter::once(t.retry.dlq_topic.clone()))
            .map(|topic| format!("  kcat -C -b {bootstrap} -t {topic} -f '%h %k %s\\n'\n"))
            .collect()
    }

    /// The start-up banner: where everything is and how to look at it.
    fn banner(&self, bootstrap: &str, opts: &DemoOptions, notes: &[String]) -> String {
        let t = &self.topics;
        let http = url_addr(self.producer.http_addr);
        let delays: Vec<String> = (1..=t.retry_max)
            .map(|n| humantime::format_duration(t.retry.delay(n)).to_string())
            .collect();
        let pct = |f: f64| format!("{:.0}%", f * 100.0);
        let runs = match opts.duration {
            Some(d) => format!(
                "{}, then drains (Ctrl-C ends it sooner)",
                humantime::format_duration(d)
            ),
            None => "until Ctrl-C, then drains (a second Ctrl-C stops waiting)".to_owned(),
        };
        let notes: String = notes.iter().map(|n| format!("note: {n}\n")).collect();
        let tip = if std::io::stderr().is_terminal() && std::env::var_os("LOG_LEVEL").is_some() {
            "Tip: logs go to stderr; `courier demo 2>/tmp/courier-demo.log` shows a live progress line.\n"
        } else {
            ""
        };
        format!(
            concat!(
                "courier demo: an in-memory Kafka broker, the producer and the consumer in one process.\n",
                "{notes}\n",
                "  broker     {bootstrap} (in memory; nothing is kept after the demo)\n",
                "  topics     {sources} -> {prefix}-1..{max} (delays {delays}) -> {dlq}, {partitions} partitions each\n",
                "  generator  {rate} events/s; {transient} fail transiently (1 or 2 retries), {permanent} permanently, {dups} re-use an earlier id\n",
                "  metrics    {metrics}   (also /healthz, /readyz; the producer's copy: http://{producer_ops}/metrics)\n",
                "  ingest     http://{http}/v1/events\n",
                "  runs       {runs}\n\n",
                "Send an event of your own:\n",
                "  curl -s -XPOST http://{http}/v1/events -H 'content-type: application/json' -d '{{\"type\":\"order_created\",\"id\":\"my-1\"}}'\n",
                "Look at the topics with kcat:\n{kcat}\n",
                "Progress: retried = sent to retry level 1/2/..; dlq = dead-lettered; dup = skipped as duplicates;\n",
                "pending = produced but not finished; lag = consumer lag (refreshed every 5 s).\n{tip}",
            ),
            notes = notes,
            bootstrap = bootstrap,
            sources = t.sources.join(","),
            prefix = t.retry.topic_prefix,
            max = t.retry_max,
            delays = delays.join(", "),
            dlq = t.retry.dlq_topic,
            partitions = t.partitions,
            rate = opts.rate,
            transient = pct(opts.failures.transient_share),
            permanent = pct(opts.failures.permanent_share),
            dups = pct(opts.duplicate_share),
            metrics = self.metrics_url(),
            producer_ops = url_addr(self.producer.ops_addr),
            http = http,
            runs = runs,
            kcat = self.kcat_lines(bootstrap),
            tip = tip,
        )
    }

    /// Reports progress until `shutdown` or the end of `opts.duration`.
    ///
    /// # Errors
    /// When the consumer or the producer stopped by itself.
    async fn watch(
        &self,
        out: &mut impl Write,
        progress: &mut Progress,
        opts: &DemoOptions,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<StopReason> {
        let deadline = opts.duration.map(|d| Instant::now() + d);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(StopReason::Signal),
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    return Ok(StopReason::Duration)
                }
                _ = tick.tick() => {}
            }
            if self.consumer.done.is_finished() || self.producer.done.is_finished() {
                anyhow::bail!("the demo's consumer or producer stopped by itself; see the log");
            }
            progress.tick(out, &self.counts(), false);
        }
    }

    /// Stops the generator and the ingest API and waits for their publishes to be
    /// acknowledged (the producer's flush deadline bounds it).
    async fn stop_producer(&mut self) -> anyhow::Result<()> {
        self.producer_stop.cancel();
        let unflushed = (&mut self.producer.done).await?;
        if unflushed > 0 {
            tracing::warn!(unflushed, "Some generated events were not acknowledged before the flush deadline; they are not counted as produced.");
        }
        Ok(())
    }

    /// Waits until every produced message is finished (ok, duplicate or DLQ), at most the
    /// retry chain's delays plus slack, or until `stop` (Ctrl-C).
    async fn drain(
        &self,
        out: &mut impl Write,
        progress: &mut Progress,
        stop: &CancellationToken,
    ) -> Drain {
        let started = Instant::now();
        let limit = self.topics.chain_delay() + DRAIN_SLACK;
        let _ = writeln!(out, "Draining {} unfinished messages (retries wait for their due time; at most {}; Ctrl-C stops waiting).", self.counts().pending(), humantime::format_duration(limit));
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            let counts = self.counts();
            let end = if counts.pending() == 0 {
                Some(DrainEnd::Complete)
            } else if started.elapsed() >= limit {
                Some(DrainEnd::TimedOut)
            } else if stop.is_cancelled() {
                Some(DrainEnd::Interrupted)
            } else if self.consumer.done.is_finished() {
                Some(DrainEnd::ConsumerStopped)
            } else {
                None
            };
            progress.tick(out, &counts, end == Some(DrainEnd::Complete));
            if let Some(end) = end {
                if end != DrainEnd::Complete {
                    progress.end_line(out);
                    let _ = writeln!(
                        out,
                        "Stopped waiting ({end}) with {} messages unfinished.",
                        counts.pending()
                    );
                    tracing::warn!(reason = %end, "The demo's drain was cut short; its summary will not add up.");
                }
                return Drain {
                    took: started.elapsed(),
                    end,
                };
            }
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => {}
            }
        }
    }

    /// Stops the consumer cleanly and turns its per-partition summary into the demo's.
    async fn finish(&mut self, ran_for: Duration, drain: Drain) -> anyhow::Result<DemoSummary> {
        let produced = self.counts().produced;
        self.consumer_stop.cancel();
        let per_partition = (&mut self.consumer.done).await?;
        let gen = &self.producer.generator;
        let calls = self.processor.counts();
        let mut s = DemoSummary {
            produced,
            generated: gen.acked.load(Relaxed),
            resent_ids: gen.duplicates.load(Relaxed),
            ok: 0,
            ok_after_retry: 0,
            duplicates: 0,
            dead_lettered: 0,
            fatal: calls.fatal.load(Relaxed),
            retried: vec![0; self.topics.retry_max as usize],
            abandoned: 0,
            processor_calls: calls.calls.load(Relaxed),
            ran_for,
            drained_in: drain.took,
            drain: drain.end,
            metrics_url: self.metrics_url(),
            ingest_addr: self.producer.http_addr,
        };
        s.add_partitions(&per_partition, &self.topics);
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_parsed_and_validated() {
        assert_eq!(parse_share("0.25"), Ok(0.25));
        assert!(parse_share("1.5").is_err());
        assert!(parse_share("x").is_err());
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("inf").is_err());
        let mut o = DemoOptions::default();
        assert!(o.validate().is_ok());
        o.failures.transient_share = 0.8;
        o.failures.permanent_share = 0.3;
        assert!(o.validate().unwrap_err().contains("expected at most 1"));
        let o = DemoOptions {
            duplicate_share: 2.0,
            ..DemoOptions::default()
        };
        assert!(o
            .validate()
            .unwrap_err()
            .starts_with("--duplicate-share=2:"));
        let o = DemoOptions {
            rate: -1.0,
            ..DemoOptions::default()
        };
        assert!(o.validate().unwrap_err().starts_with("--rate=-1:"));
    }

    #[test]
    fn the_config_changes_only_what_it_must() {
        let load = |pairs: &[(&str, &str)]| -> Config {
            let env: Vec<(String, String)> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Config::load_from(None, &env).expect("valid configuration")
        };
        let broker = "127.0.0.1:1234";
        let mut notes = Vec::new();
        let (p, c) = demo_configs(load(&[]), broker, &mut notes).unwrap();
        assert_eq!(c.kafka.brokers, broker);
        assert_eq!(c.retry.backoff, DEMO_BACKOFF.to_vec());
        assert!(c.ops.addr.ip().is_loopback() && c.http.addr.ip().is_loopback());
        assert_ne!(p.ops.addr, c.ops.addr);
        assert_eq!(c.health.probe_interval, DEMO_PROBE_INTERVAL);
        assert!(!c.kafka.auto_create_topics);
        let user = load(&[
            ("KAFKA_RETRY_BACKOFF", "200ms,300ms"),
            ("OPS_ADDR", "127.0.0.1:0"),
            ("HEALTH_PROBE_INTERVAL_MS", "100"),
        ]);
        let (p, c) = demo_configs(user, broker, &mut notes).unwrap();
        assert_eq!(
            c.retry.backoff,
            vec![Duration::from_millis(200), Duration::from_millis(300)]
        );
        assert_eq!((c.ops.addr.port(), p.ops.addr.port()), (0, 0));
        assert_eq!(c.health.probe_interval, Duration::from_millis(100));
        let bad = load(&[("KAFKA_PRODUCER_TOPIC", "elsewhere")]);
        let e = demo_configs(bad, broker, &mut notes).unwrap_err();
        assert!(e.to_string().starts_with("KAFKA_PRODUCER_TOPIC=elsewhere:"));
    }

    #[tokio::test]
    async fn a_taken_port_falls_back_to_any_port() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let mut notes = Vec::new();
        assert_eq!(available("OPS_ADDR", addr, &mut notes).port(), 0);
        assert!(notes[0].starts_with(&format!("OPS_ADDR {addr} is not available")));
        drop(taken);
        assert_eq!(available("OPS_ADDR", addr, &mut notes), addr);
        let any = "0.0.0.0:9".parse().unwrap();
        assert_eq!(url_addr(any).to_string(), "127.0.0.1:9");
    }
}
