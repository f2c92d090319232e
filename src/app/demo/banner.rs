//! The demo's start-up banner: where everything is and how to look at it.

use std::io::IsTerminal;
use std::net::SocketAddr;

use super::session::DemoOptions;
use super::setup::DemoTopics;

/// Where the running demo can be reached (addresses as a URL host names them).
#[derive(Debug, Clone)]
pub(super) struct Endpoints {
    /// The consumer's `/metrics`.
    pub metrics_url: String,
    /// The producer's ops server.
    pub producer_ops: SocketAddr,
    /// The ingest API.
    pub http: SocketAddr,
}

/// The kcat commands that show each topic of the chain, one per line.
fn kcat_lines(t: &DemoTopics, bootstrap: &str) -> String {
    let retries = (1..=t.retry_max).map(|n| t.retry.topic(n));
    t.sources
        .iter()
        .cloned()
        .chain(retries)
        .chain(std::iter::once(t.retry.dlq_topic.clone()))
        .map(|topic| format!("  kcat -C -b {bootstrap} -t {topic} -f '%h %k %s\\n'\n"))
        .collect()
}

/// The start-up banner: where everything is and how to look at it; `notes` say what the
/// demo changed (a port that was taken).
pub(super) fn banner(
    bootstrap: &str,
    t: &DemoTopics,
    opts: &DemoOptions,
    notes: &[String],
    at: &Endpoints,
) -> String {
    let delays: Vec<String> = (1..=t.retry_max)
        .map(|n| humantime::format_duration(t.retry.delay(n)).to_string())
        .collect();
    let pct = |f: f64| format!("{:.0}%", f * 100.0);
    let runs = match opts.duration {
        Some(d) => format!(
            "{}, then drains (Ctrl-C ends it sooner)",
            humantime::format_duration(d)
        ),
        None => "until Ctrl-C, then drains (a second Ctrl-C stops waiting)".to_owned(),
    };
    let notes: String = notes.iter().map(|n| format!("note: {n}\n")).collect();
    let tip = if std::io::stderr().is_terminal() && std::env::var_os("LOG_LEVEL").is_some() {
        "Tip: logs go to stderr; `courier demo 2>/tmp/courier-demo.log` shows a live progress line.\n"
    } else {
        ""
    };
    format!(
        concat!(
            "courier demo: an in-memory Kafka broker, the producer and the consumer in one process.\n",
            "{notes}\n",
            "  broker     {bootstrap} (in memory; nothing is kept after the demo)\n",
            "  topics     {sources} -> {prefix}-1..{max} (delays {delays}) -> {dlq}, {partitions} partitions each\n",
            "  generator  {rate} events/s; {transient} fail transiently (1 or 2 retries), {permanent} permanently, {dups} re-use an earlier id\n",
            "  metrics    {metrics}   (also /healthz, /readyz; the producer's copy: http://{producer_ops}/metrics)\n",
            "  ingest     http://{http}/v1/events\n",
            "  runs       {runs}\n\n",
            "Send an event of your own:\n",
            "  curl -s -XPOST http://{http}/v1/events -H 'content-type: application/json' -d '{{\"type\":\"order_created\",\"id\":\"my-1\"}}'\n",
            "Look at the topics with kcat:\n{kcat}\n",
            "Progress: retried = sent to retry level 1/2/..; dlq = dead-lettered; dup = skipped as duplicates;\n",
            "pending = produced but not finished; lag = consumer lag (refreshed every 5 s).\n{tip}",
        ),
        notes = notes,
        bootstrap = bootstrap,
        sources = t.sources.join(","),
        prefix = t.retry.topic_prefix,
        max = t.retry_max,
        delays = delays.join(", "),
        dlq = t.retry.dlq_topic,
        partitions = t.partitions,
        rate = opts.rate,
        transient = pct(opts.failures.transient_share),
        permanent = pct(opts.failures.permanent_share),
        dups = pct(opts.duplicate_share),
        metrics = at.metrics_url,
        producer_ops = at.producer_ops,
        http = at.http,
        runs = runs,
        kcat = kcat_lines(t, bootstrap),
        tip = tip,
    )
}
