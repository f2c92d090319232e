//! The command line: one library call per subcommand.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::app::{self, consumer::ConsumerOptions, producer::ProducerOptions};
use crate::config::{parse_duration, Config};
use crate::service::generator::{parse_types, GeneratorConfig};

/// courier: Kafka producer and consumer services with retry topics, a dead-letter topic
/// and dedupe by message-id. Configured by environment variables (see README.md).
#[derive(Debug, Parser)]
#[command(name = "courier", version, about)]
pub struct Cli {
    /// A TOML configuration file (also COURIER_CONFIG); environment variables override it.
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The producer service: HTTP ingest API and an optional event generator.
    Producer {
        /// Generate seed-style events too.
        #[arg(long)]
        generate: bool,
        /// Events per second of the generator.
        #[arg(long, default_value_t = 100.0, value_name = "N")]
        rate: f64,
        /// Stop after this many generated events.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// Event types, comma-separated.
        #[arg(
            long,
            default_value = "order_created,payment_received,notification_sent"
        )]
        types: String,
    },
    /// The consumer service: worker pool, retry topics, DLQ and dedupe.
    Consumer,
    /// Topic provisioning.
    Topics {
        /// create or list.
        #[command(subcommand)]
        action: TopicsAction,
    },
    /// An in-memory Kafka-protocol broker for local runs and tests (keeps nothing on disk).
    DevBroker {
        /// Also write the bootstrap address to this file.
        #[arg(long, value_name = "PATH")]
        bootstrap_file: Option<PathBuf>,
    },
    /// Print the effective configuration as TOML, secrets redacted (or, with a flag, the
    /// docs generated from the definition of every setting).
    Config(app::tools::ConfigArgs),
    /// Dev broker + producer + consumer in one process, with injected failures.
    Demo(app::demo::DemoArgs),
    /// Dead-letter topic operations: inspect and replay.
    Dlq {
        /// inspect or replay.
        #[command(subcommand)]
        action: app::dlq::DlqAction,
    },
}

/// `courier topics` actions.
#[derive(Debug, Subcommand)]
pub enum TopicsAction {
    /// Create the source, retry and DLQ topics (existing ones are fine).
    Create,
    /// List topics with their partition counts.
    List,
}

/// Parses `--duration`-style arguments.
pub fn duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

fn load(cli: &Cli) -> anyhow::Result<Config> {
    let mut config = Config::load(cli.config.as_deref())?;
    if matches!(cli.command, Command::Demo(_)) {
        app::demo::log_defaults(&mut config);
    }
    Ok(config)
}

/// Runs the parsed command line. Returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Config(args) = cli.command {
        // The generated docs need no configuration; the effective one is loaded below.
        if app::tools::print_config_docs(args, &mut std::io::stdout())? {
            return Ok(());
        }
    }
    let config = load(&cli)?;
    crate::observability::logging::init(&config.log, std::io::stderr);
    match cli.command {
        Command::Config(_) => {
            app::tools::print_config(&config, &mut std::io::stdout())?;
        }
        Command::Topics {
            action: TopicsAction::Create,
        } => app::tools::topics_create(&config, &mut std::io::stdout()).await?,
        Command::Topics {
            action: TopicsAction::List,
        } => app::tools::topics_list(&config, &mut std::io::stdout()).await?,
        Command::DevBroker { bootstrap_file } => {
            let shutdown = app::shutdown_on_signals();
            app::tools::dev_broker(&config, bootstrap_file.as_deref(), shutdown).await?;
        }
        Command::Producer {
            generate,
            rate,
            count,
            types,
        } => {
            if !(rate > 0.0 && rate.is_finite()) {
                anyhow::bail!("--rate={rate}: expected a positive number of events per second");
            }
            let generate = if generate {
                Some(GeneratorConfig {
                    topic: config.producer.topic.clone(),
                    rate,
                    count,
                    types: parse_types(&types).map_err(anyhow::Error::msg)?,
                    duplicate_share: 0.0,
                    max_pending: crate::service::generator::DEFAULT_MAX_PENDING,
                })
            } else {
                None
            };
            let shutdown = app::shutdown_on_signals();
            let running = app::producer::start(
                config,
                ProducerOptions {
                    generate,
                    metrics: None,
                    progress: true,
                },
                shutdown,
            )
            .await?;
            let unflushed = running.done.await?;
            if unflushed > 0 {
                anyhow::bail!(
                    "{unflushed} messages were not acknowledged before the flush deadline"
                );
            }
        }
        Command::Demo(args) => app::demo::run(config, args, app::shutdown_on_signals()).await?,
        Command::Dlq { action } => app::dlq::run_cli(config, action).await?,
        Command::Consumer => {
            let shutdown = app::shutdown_on_signals();
            let running =
                app::consumer::start(config, ConsumerOptions::default(), shutdown).await?;
            running.done.await?;
        }
    }
    Ok(())
}
