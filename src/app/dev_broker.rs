//! `courier dev-broker`: the in-memory broker with the configured topics, for local runs and
//! tests (nothing is kept on disk).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::transport::DevBroker;

/// `courier dev-broker` arguments.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DevBrokerArgs {
    /// Also write the bootstrap address to this file.
    #[arg(long, value_name = "PATH")]
    pub bootstrap_file: Option<PathBuf>,
}

/// `courier dev-broker`: an in-memory broker with the configured topics, until `shutdown`.
/// Prints the bootstrap address on the first line of stdout (and to `--bootstrap-file`).
///
/// # Errors
/// When the mock cluster cannot start or the file cannot be written.
pub async fn run(
    config: Config,
    args: DevBrokerArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let broker = DevBroker::start()?;
    for topic in config.all_topics() {
        broker.create_topic(&topic, config.kafka.topic_partitions)?;
    }
    let bootstrap = broker.bootstrap_servers();
    // The file first: whoever reads the stdout line may look for the file next.
    if let Some(path) = &args.bootstrap_file {
        std::fs::write(path, format!("{bootstrap}\n"))
            .with_context(|| format!("--bootstrap-file {}", path.display()))?;
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
