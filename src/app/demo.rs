//! `courier demo`: dev broker + producer + consumer in one process, with injected failures.

use crate::config::Config;

/// `courier demo` arguments.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {}

/// Runs the demo from the command line.
///
/// # Errors
/// Not built yet.
pub async fn run_cli(_config: Config, _args: DemoArgs) -> anyhow::Result<()> {
    anyhow::bail!("courier demo is not built yet")
}
