//! `courier topics create|list`: provisioning of the source, retry and DLQ topics, and a
//! listing with partition counts.

use std::io::Write;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::transport::admin::TopicOutcome;
use crate::transport::TopicAdmin;

/// `courier topics` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct TopicsArgs {
    /// create or list.
    #[command(subcommand)]
    pub action: TopicsAction,
}

/// `courier topics` actions.
#[derive(Debug, Clone, Copy, clap::Subcommand)]
pub enum TopicsAction {
    /// Create the source, retry and DLQ topics (existing ones are fine).
    Create,
    /// List topics with their partition counts.
    List,
}

/// `courier topics create|list`, to stdout. A one-shot command: it does not watch
/// `_shutdown` (a signal ends it at once).
///
/// # Errors
/// When the broker is unreachable or refuses to create topics, or stdout fails.
pub async fn run(
    config: Config,
    args: TopicsArgs,
    _shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout();
    match args.action {
        TopicsAction::Create => create(&config, &mut out).await,
        TopicsAction::List => list(&config, &mut out).await,
    }
}

/// Creates every configured topic that is missing; one line per topic, `created` or
/// `exists`.
///
/// # Errors
/// When the broker is unreachable or refuses; the message names the missing topics.
async fn create(config: &Config, out: &mut impl Write) -> anyhow::Result<()> {
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

/// Topics with their partition counts.
///
/// # Errors
/// When the broker is unreachable.
async fn list(config: &Config, out: &mut impl Write) -> anyhow::Result<()> {
    let admin = TopicAdmin::new(config)?;
    writeln!(out, "TOPIC\tPARTITIONS")?;
    for t in admin.list().await? {
        writeln!(out, "{}\t{}", t.name, t.partitions)?;
    }
    Ok(())
}
