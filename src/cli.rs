//! The command line: the flags, and one library call per subcommand. Every subcommand `x`
//! is `app::x::XArgs` plus `app::x::run(config, args, shutdown)`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::app;
use crate::config::Config;

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
    Producer(app::producer::ProducerArgs),
    /// The consumer service: worker pool, retry topics, DLQ and dedupe.
    Consumer(app::consumer::ConsumerArgs),
    /// Topic provisioning.
    Topics(app::topics::TopicsArgs),
    /// An in-memory Kafka-protocol broker for local runs and tests (keeps nothing on disk).
    DevBroker(app::dev_broker::DevBrokerArgs),
    /// Print the effective configuration as TOML, secrets redacted (or, with a flag, the
    /// docs generated from the definition of every setting).
    Config(app::config::ConfigArgs),
    /// Dev broker + producer + consumer in one process, with injected failures.
    Demo(app::demo::DemoArgs),
    /// Dead-letter topic operations: inspect and replay.
    Dlq(app::dlq::DlqArgs),
}

impl Command {
    /// Whether the command stops cleanly on SIGTERM/SIGINT (its shutdown token is cancelled
    /// by them). The one-shot commands keep the default: a signal ends the process at once,
    /// so Ctrl-C never waits for a listing or for an unreachable broker.
    fn stops_on_signals(&self) -> bool {
        match self {
            Command::Producer(_)
            | Command::Consumer(_)
            | Command::DevBroker(_)
            | Command::Demo(_) => true,
            Command::Dlq(args) => args.stops_on_signals(),
            Command::Topics(_) | Command::Config(_) => false,
        }
    }
}

/// Runs the parsed command line: loads the configuration, starts logging and runs the
/// subcommand.
///
/// # Errors
/// A configuration that does not load, or the subcommand's error.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let Cli {
        config: path,
        command,
    } = cli;
    if let Command::Config(args) = &command {
        if args.wants_docs() {
            // Generated from the definition of every setting: no configuration is loaded,
            // so one that does not load cannot hide the docs that would fix it.
            app::config::print_docs(*args, &mut std::io::stdout())?;
            return Ok(());
        }
    }
    let mut config = Config::load(path.as_deref())?;
    if matches!(command, Command::Demo(_)) {
        app::demo::log_defaults(&mut config);
    }
    crate::observability::logging::init(&config.log, std::io::stderr);
    let shutdown = if command.stops_on_signals() {
        app::shutdown_on_signals()
    } else {
        CancellationToken::new()
    };
    // Spans (the `otel` feature) come from the services only.
    let traced = matches!(
        command,
        Command::Producer(_) | Command::Consumer(_) | Command::Demo(_)
    );
    if traced {
        if let Err(e) = crate::otel::init() {
            tracing::warn!(error = %e, "OpenTelemetry: spans are not exported.");
        }
    }
    let result = match command {
        Command::Producer(args) => app::producer::run(config, args, shutdown).await,
        Command::Consumer(args) => app::consumer::run(config, args, shutdown).await,
        Command::Topics(args) => app::topics::run(config, args, shutdown).await,
        Command::DevBroker(args) => app::dev_broker::run(config, args, shutdown).await,
        Command::Config(args) => app::config::run(config, args, shutdown).await,
        Command::Demo(args) => app::demo::run(config, args, shutdown).await,
        Command::Dlq(args) => app::dlq::run(config, args, shutdown).await,
    };
    if traced {
        crate::otel::shutdown().await;
    }
    result
}
