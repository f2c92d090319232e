//! The one-shot commands: `topics create|list`, `dev-broker` and `config`.

use std::io::Write;
use std::path::Path;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::transport::admin::TopicOutcome;
use crate::transport::{DevBroker, TopicAdmin};

/// `courier topics create`: creates every configured topic that is missing.
///
/// # Errors
/// When the broker is unreachable or refuses; the message names the missing topics.
pub async fn topics_create(config: &Config, out: &mut impl Write) -> anyhow::Result<()> {
    let admin = TopicAdmin::new(config)?;
    let done = admin.create_all(config).await?;
    for (topic, outcome) in done {
        let what = match outcome {
            TopicOutcome::Created => "created",
            TopicOutcome::Exists => "exists",
        };
        writeln!(out, "{topic}\t{what}")?;
    }
    Ok(())
}

/// `courier topics list`: topics with their partition counts.
///
/// # Errors
/// When the broker is unreachable.
pub async fn topics_list(config: &Config, out: &mut impl Write) -> anyhow::Result<()> {
    let admin = TopicAdmin::new(config)?;
    writeln!(out, "TOPIC\tPARTITIONS")?;
    for t in admin.list().await? {
        writeln!(out, "{}\t{}", t.name, t.partitions)?;
    }
    Ok(())
}

/// `courier dev-broker`: an in-memory broker with the configured topics, until `shutdown`.
/// Prints the bootstrap address on the first line of stdout (and to `bootstrap_file`).
///
/// # Errors
/// When the mock cluster cannot start or the file cannot be written.
pub async fn dev_broker(
    config: &Config,
    bootstrap_file: Option<&Path>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let broker = DevBroker::start()?;
    for topic in config.all_topics() {
        broker.create_topic(&topic, config.kafka.topic_partitions)?;
    }
    let bootstrap = broker.bootstrap_servers();
    // The file first: whoever reads the stdout line may look for the file next.
    if let Some(path) = bootstrap_file {
        std::fs::write(path, format!("{bootstrap}\n"))
            .map_err(|e| anyhow::anyhow!("--bootstrap-file {}: {e}", path.display()))?;
    }
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{bootstrap}")?;
    stdout.flush()?;
    tracing::info!(bootstrap = %bootstrap, topics = ?config.all_topics(), partitions = config.kafka.topic_partitions, "The in-memory dev broker is running (nothing is kept on disk; for local runs and tests only).");
    shutdown.cancelled().await;
    tracing::info!("The dev broker is stopping.");
    drop(broker);
    Ok(())
}

/// `courier config`: the effective configuration as TOML, secrets redacted.
///
/// # Errors
/// When stdout cannot be written.
pub fn print_config(config: &Config, out: &mut impl Write) -> std::io::Result<()> {
    out.write_all(config.to_toml().as_bytes())
}

/// `courier config` flags: without one, the effective configuration.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
#[group(multiple = false)]
pub struct ConfigArgs {
    /// Print the README's table of every variable (Markdown) instead.
    #[arg(long)]
    pub markdown: bool,
    /// Print config/courier.toml, every key with its default and meaning, instead.
    #[arg(long, visible_alias = "toml")]
    pub toml_template: bool,
}

/// `courier config --markdown` or `--toml-template`: the docs generated from the definition
/// of every setting. Returns whether a flag asked for them.
///
/// # Errors
/// When stdout cannot be written.
pub fn print_config_docs(args: ConfigArgs, out: &mut impl Write) -> std::io::Result<bool> {
    let text = if args.markdown {
        crate::config::docs::markdown_table()
    } else if args.toml_template {
        crate::config::docs::toml_template()
    } else {
        return Ok(false);
    };
    out.write_all(text.as_bytes())?;
    Ok(true)
}

/// The config file argument: `--config` wins over `COURIER_CONFIG`.
pub fn load_config(path: Option<&Path>) -> Result<Config, crate::config::ConfigError> {
    Config::load(path)
}
