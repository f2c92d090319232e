//! One run of the demo, with options set by the caller and its report written to a given
//! output: the dev broker on a thread of its own, the consumer and the producer with its
//! generator on one metrics registry, progress until the end of the run, a bounded drain,
//! and the summary.

use std::io::Write;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::banner::{banner, Endpoints};
use super::progress::{LiveCounts, Progress, ProgressStyle};
use super::setup::{demo_configs, url_addr, DemoTopics};
use super::summary::{DemoSummary, DrainEnd, OutageSummary};
use crate::app::consumer::{self, ConsumerOptions, RunningConsumer};
use crate::app::producer::{self, ProducerOptions, RunningProducer};
use crate::config::Config;
use crate::observability::Metrics;
use crate::service::demo::{check_share, DemoProcessor, FailurePlan, ShareError};
use crate::service::generator::{GeneratorConfig, DEFAULT_MAX_PENDING, EVENT_TYPES};
use crate::service::Processor;
use crate::transport::DevBroker;

/// Slack of the drain on top of the retry chain's delays (fetching, commits, a slow host).
const DRAIN_SLACK: Duration = Duration::from_secs(30);

/// What the demo does; from `DemoArgs` on the command line, or set directly by tests.
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
    /// An outage of the processor's endpoint mid-run (`--outage`).
    pub outage: Option<Outage>,
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
            outage: None,
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
    pub fn validate(&self) -> Result<(), OptionsError> {
        if !(self.rate > 0.0 && self.rate.is_finite()) {
            return Err(OptionsError::Rate(self.rate));
        }
        self.failures.validate()?;
        Ok(check_share("--duplicate-share", self.duplicate_share)?)
    }
}

/// `--outage`: the demo processor's endpoint is down from `after` for `length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outage {
    /// After the demo starts.
    pub after: Duration,
    /// How long.
    pub length: Duration,
}

/// A demo option the demo cannot run with, naming its command-line flag.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OptionsError {
    /// Not a positive, finite number of events per second.
    #[error("--rate={0}: expected a positive number of events per second")]
    Rate(f64),
    /// A share outside 0..=1, or failure shares adding up to more than 1.
    #[error(transparent)]
    Share(#[from] ShareError),
}

/// Runs one demo: starts the dev broker, the consumer and the producer with its generator;
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
    opts.validate()?;
    let broker = BrokerThread::start(&config).await?;
    let mut notes = Vec::new();
    let (producer_cfg, consumer_cfg) = demo_configs(config, &broker.bootstrap, &mut notes)?;
    let mut demo = Demo::start(producer_cfg, consumer_cfg, &opts).await?;
    let text = banner(
        &broker.bootstrap,
        &demo.topics,
        &opts,
        &notes,
        &demo.endpoints(),
    );
    out.write_all(text.as_bytes())?;
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
    let summary = demo.finish(ran_for, drain, opts.outage).await?;
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
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<anyhow::Result<String>>();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("demo-broker".into())
            .spawn(move || {
                let started = DevBroker::start()
                    .map_err(|e| anyhow::anyhow!("cannot start the in-memory dev broker: {e}"))
                    .and_then(|broker| {
                        for topic in &topics {
                            broker.create_topic(topic, partitions).map_err(|e| {
                                anyhow::anyhow!(
                                    "cannot create topic {topic} on the dev broker: {e}"
                                )
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
            .map_err(|_| anyhow::anyhow!("the dev broker's thread ended before it started"))??;
        tracing::info!(bootstrap = %bootstrap, topics = ?config.all_topics(), "The demo's in-memory broker is running.");
        Ok(BrokerThread {
            bootstrap,
            _stop: stop_tx,
        })
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
        if let Some(o) = opts.outage {
            // Its own task: the outage ends on time even if the run's duration ends first.
            let p = processor.clone();
            tokio::spawn(async move {
                tokio::time::sleep(o.after).await;
                p.set_down(true);
                tokio::time::sleep(o.length).await;
                p.set_down(false);
            });
        }
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
            max_pending: DEFAULT_MAX_PENDING,
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

    /// Where the running demo can be reached, for the banner.
    fn endpoints(&self) -> Endpoints {
        Endpoints {
            metrics_url: self.metrics_url(),
            producer_ops: url_addr(self.producer.ops_addr),
            http: url_addr(self.producer.http_addr),
        }
    }

    /// Says so when the `--outage` started or ended since the last look.
    fn note_outage(&self, out: &mut impl Write, progress: &mut Progress, was_down: &mut bool) {
        let down = self.processor.is_down();
        if down == *was_down {
            return;
        }
        *was_down = down;
        progress.end_line(out);
        let _ = if down {
            writeln!(out, "The processor's endpoint is down (--outage): the circuit opens, holds the failing messages and pauses fetching.")
        } else {
            writeln!(out, "The processor's endpoint is back: the circuit's next probe succeeds and the held messages go out again.")
        };
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
        let mut was_down = false;
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(StopReason::Signal),
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    return Ok(StopReason::Duration)
                }
                _ = tick.tick() => {}
            }
            self.note_outage(out, progress, &mut was_down);
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
    async fn finish(
        &mut self,
        ran_for: Duration,
        drain: Drain,
        outage: Option<Outage>,
    ) -> anyhow::Result<DemoSummary> {
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
            outage: outage.map(|o| OutageSummary {
                length: o.length,
                refused_calls: calls.outage_refusals.load(Relaxed),
                circuit_opened: self
                    .metrics
                    .circuit_transitions
                    .with_label_values(&["open"])
                    .get(),
                dead_lettered: self.processor.routed_by_outage(),
            }),
        };
        s.add_partitions(&per_partition, &self.topics);
        Ok(s)
    }
}
