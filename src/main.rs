//! The `courier` binary: parses the command line and calls the library.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = courier::cli::Cli::parse();
    match courier::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("courier: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
