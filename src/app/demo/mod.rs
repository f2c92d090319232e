//! `courier demo`: the in-memory dev broker, the producer (with its generator) and the
//! consumer in one process, with failures injected by `service::demo::DemoProcessor`, so a
//! newcomer sees the whole flow (retry topics, the DLQ, dedupe, `/metrics`) with one command
//! on a fresh machine.
//!
//! It ends on Ctrl-C or after `--duration`: it stops the generator, waits (bounded) until
//! every produced message is finished, stops the consumer cleanly and prints a summary
//! whose numbers must add up: every produced message was processed ok, skipped as a
//! duplicate, or dead-lettered.
//!
//! This module is the command line; [`session`] runs one demo with options set by the
//! caller (the tests drive it directly), `setup` adapts the configuration, and the
//! presentation (`banner`, `progress`, `summary`) lives beside it.

mod banner;
mod progress;
pub mod session;
mod setup;
mod summary;

use std::io::IsTerminal;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{parse_duration, Config, LogFormat};
use crate::service::demo::FailurePlan;

pub use progress::ProgressStyle;
pub use session::{DemoOptions, OptionsError, Outage};
pub use summary::{DemoSummary, DrainEnd, OutageSummary};

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
    /// Take the processor's endpoint down for this long mid-run (e.g. 10s): the circuit
    /// breaker opens, holds the failing messages and pauses fetching; nothing is
    /// dead-lettered because of the outage.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub outage: Option<Duration>,
    /// When the --outage starts, after the demo starts.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub outage_after: Duration,
}

/// `--*-share`: clap names the flag in its error, so the message says only what is accepted.
fn parse_share(s: &str) -> Result<f64, &'static str> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err("expected a number from 0 to 1"),
    }
}

/// `--rate`: a rate of zero would never produce anything, and the generator needs a finite one.
fn parse_rate(s: &str) -> Result<f64, &'static str> {
    match s.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err("expected a positive number of events per second"),
    }
}

/// The demo is watched by a person: unless `LOG_LEVEL`/`LOG_FORMAT` say otherwise, it logs
/// only warnings (without the per-message retry/DLQ lines its injected failures cause) and
/// in the readable format on a terminal, so its progress line and summary stay in view.
/// Applied before logging starts.
pub(crate) fn log_defaults(config: &mut Config) {
    if std::env::var_os("LOG_LEVEL").is_none() {
        // Per-message events (the injected failures' retry and DLQ lines) log under
        // `courier::message`: quieted, so the progress line and summary stay in view.
        config.log.level = "warn,courier::message=off".into();
    }
    if std::env::var_os("LOG_FORMAT").is_none() && std::io::stderr().is_terminal() {
        config.log.format = LogFormat::Pretty;
    }
}

/// `courier demo`: runs the demo until `shutdown` (Ctrl-C) or `--duration`; a second Ctrl-C
/// stops waiting for the drain, and the summary goes to stdout.
///
/// # Errors
/// Bad flags, a component that cannot start, or numbers that do not add up unless the user
/// interrupted the drain (so scripts and CI can use the demo as a smoke test).
pub async fn run(
    config: Config,
    args: DemoArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let opts = DemoOptions {
        duration: args.duration,
        rate: args.rate,
        failures: FailurePlan {
            transient_share: args.transient_share,
            permanent_share: args.permanent_share,
        },
        duplicate_share: args.duplicate_share,
        outage: args.outage.map(|length| Outage {
            after: args.outage_after,
            length,
        }),
        progress: terminal_progress_style(),
        stop_draining: CancellationToken::new(),
    };
    let (first, stop_draining) = (shutdown.clone(), opts.stop_draining.clone());
    tokio::spawn(async move {
        first.cancelled().await;
        crate::app::shutdown_on_signals().cancelled().await;
        stop_draining.cancel();
    });
    let summary = session::run(config, opts, shutdown, std::io::stdout()).await?;
    // Stopping the drain on purpose is the user's call; anything else that does not add up
    // is a failure (a time limit, a lost or doubly counted message).
    if !summary.adds_up() && summary.drain != DrainEnd::Interrupted {
        anyhow::bail!("the demo's numbers do not add up: {}", summary.check_line());
    }
    Ok(())
}

/// The progress style for stdout as it is: logs go to stderr (quiet by default in the demo,
/// see [`log_defaults`]), so a line updated in place on stdout stays readable unless the user
/// asked for chattier logs on the same terminal.
fn terminal_progress_style() -> ProgressStyle {
    let (stdout_tty, stderr_tty) = (
        std::io::stdout().is_terminal(),
        std::io::stderr().is_terminal(),
    );
    let quiet = std::env::var_os("LOG_LEVEL").is_none();
    match (stdout_tty, stderr_tty) {
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
        let e = o.validate().unwrap_err().to_string();
        assert!(e.contains("expected at most 1"), "{e}");
        let o = DemoOptions {
            duplicate_share: 2.0,
            ..DemoOptions::default()
        };
        let e = o.validate().unwrap_err().to_string();
        assert!(e.starts_with("--duplicate-share=2:"), "{e}");
        let o = DemoOptions {
            rate: -1.0,
            ..DemoOptions::default()
        };
        let e = o.validate().unwrap_err().to_string();
        assert!(e.starts_with("--rate=-1:"), "{e}");
    }
}
