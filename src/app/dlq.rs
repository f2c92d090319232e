//! `courier dlq inspect|replay`.

use crate::config::Config;

/// `courier dlq` actions.
#[derive(Debug, clap::Subcommand)]
pub enum DlqAction {
    /// List dead-lettered messages.
    Inspect,
}

/// Runs a DLQ action from the command line.
///
/// # Errors
/// Not built yet.
pub async fn run_cli(_config: Config, _action: DlqAction) -> anyhow::Result<()> {
    anyhow::bail!("courier dlq is not built yet")
}
