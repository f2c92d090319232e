//! tracing setup: JSON (default) or pretty lines, filtered by `LOG_LEVEL`.

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber writing to `writer`. Later calls are ignored, so tests
/// may call it freely; they pass `std::io::sink` unless `TEST_LOG` is set.
pub fn init<W>(config: &LogConfig, writer: W)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_new(&config.level).unwrap_or_else(|_| EnvFilter::new("info"));
    // librdkafka's own log lines arrive through the `rdkafka` target; keep them at warn
    // unless the user asked for them explicitly.
    let filter = if config.level.contains("rdkafka") {
        filter
    } else {
        filter
            .add_directive("rdkafka=warn".parse().expect("static directive parses"))
            .add_directive("librdkafka=warn".parse().expect("static directive parses"))
    };
    // A failed write (a full disk, a closed pipe) drops the line: by default the formatter
    // reports it with `eprintln!`, which panics when stderr itself cannot be written.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .log_internal_errors(false);
    let _ = match config.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Pretty => builder.with_target(false).try_init(),
    };
}

/// For tests: logs to stderr when `TEST_LOG` is set, else nowhere.
pub fn init_for_tests() {
    let config = LogConfig {
        level: std::env::var("TEST_LOG").unwrap_or_else(|_| "info".into()),
        format: LogFormat::Pretty,
    };
    if std::env::var_os("TEST_LOG").is_some() {
        init(&config, std::io::stderr);
    } else {
        init(&config, std::io::sink);
    }
}
