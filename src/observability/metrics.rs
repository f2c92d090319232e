//! The Prometheus registry with every metric name of DESIGN.md (prefix `courier_`).
//! Labels never carry message ids or other unbounded values.

use std::sync::Arc;

use prometheus::core::Collector;
use prometheus::proto::MetricType;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Defines [`Metrics`] from one table: each metric's field, type, name, help and labels,
/// written once (the struct, its registration and the exported families all come from it).
macro_rules! metrics {
    ($($(#[$doc:meta])* $field:ident: $ty:ty = $kind:ident($name:literal, $help:literal $(, [$($label:literal),*])?);)*) => {
        /// Every courier metric, registered in its own [`Registry`] (one per service
        /// instance, so tests in one process do not share counters).
        #[derive(Clone)]
        pub struct Metrics {
            registry: Registry,
            families: Arc<[Family]>,
            $($(#[$doc])* pub $field: $ty,)*
        }

        impl Metrics {
            /// A fresh registry with every metric registered (and the process metrics, on
            /// Linux); `courier_build_info` is set.
            pub fn new() -> Self {
                let mut r = Registrar::with_process_metrics();
                let m = Metrics {
                    $($field: r.register($kind($name, $help, &[$($($label),*)?])),)*
                    families: r.families.into(),
                    registry: r.registry,
                };
                m.build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
                m
            }
        }
    };
}

metrics! {
    /// `courier_messages_published_total{topic}`.
    messages_published: IntCounterVec = counter_vec("messages_published_total", "Messages acknowledged by the broker, by topic.", ["topic"]);
    /// `courier_publish_failures_total{topic,reason}`.
    publish_failures: IntCounterVec = counter_vec("publish_failures_total", "Publishes that failed, by topic and reason.", ["topic", "reason"]);
    /// `courier_messages_received_total{topic}`.
    messages_received: IntCounterVec = counter_vec("messages_received_total", "Messages read from Kafka, by topic.", ["topic"]);
    /// `courier_messages_processed_total{topic,outcome}`: ok, retry, dlq, duplicate, skipped.
    messages_processed: IntCounterVec = counter_vec("messages_processed_total", "Messages finished, by topic and outcome (ok, retry, dlq, duplicate, skipped).", ["topic", "outcome"]);
    /// `courier_messages_without_id_total`.
    messages_without_id: IntCounter = counter("messages_without_id_total", "Messages processed without a message-id header (not deduplicated).");
    /// `courier_processing_duration_seconds`.
    processing_duration: Histogram = histogram("processing_duration_seconds", "Time the processor took per message.");
    /// `courier_end_to_end_latency_seconds`: processing end minus the Kafka timestamp.
    end_to_end_latency: Histogram = histogram("end_to_end_latency_seconds", "From the message's Kafka timestamp to the end of its processing.");
    /// `courier_retry_lateness_seconds`: processing start minus due time.
    retry_lateness: Histogram = histogram("retry_lateness_seconds", "How late a retry ran: processing start minus its due time.");
    /// `courier_in_flight`.
    in_flight: IntGauge = gauge("in_flight", "Messages received and not yet finished.");
    /// `courier_consumer_lag{topic,partition}`.
    consumer_lag: IntGaugeVec = gauge_vec("consumer_lag", "Messages behind the partition's high watermark.", ["topic", "partition"]);
    /// `courier_paused_partitions`.
    paused_partitions: IntGauge = gauge("paused_partitions", "Partitions paused (back-pressure or a retry not yet due).");
    /// `courier_dedupe_entries`.
    dedupe_entries: IntGauge = gauge("dedupe_entries", "message-ids held by the dedupe store.");
    /// `courier_broker_up`.
    broker_up: IntGauge = gauge("broker_up", "1 while the broker answers metadata probes.");
    /// `courier_assigned_partitions`: partitions this consumer owns (source and retry topics).
    assigned_partitions: IntGauge = gauge("assigned_partitions", "Partitions this consumer owns (source and retry topics).");
    /// `courier_rebalance_partitions_total{kind}`: partitions assigned to, revoked from or
    /// lost by this consumer as the group moves them.
    rebalance_partitions: IntCounterVec = counter_vec("rebalance_partitions_total", "Partitions assigned to, revoked from or lost by this consumer (kind).", ["kind"]);
    /// `courier_held_messages`: messages holding their partition because their retry or
    /// DLQ publish fails for a reason that will not heal by itself.
    held_messages: IntGauge = gauge("held_messages", "Messages holding their partition because their retry or DLQ publish fails for a reason that will not heal by itself.");
    /// `courier_http_requests_total{route,status}`: ingest API requests by matched route.
    http_requests: IntCounterVec = counter_vec("http_requests_total", "Ingest API requests by matched route and status.", ["route", "status"]);
    /// `courier_file_reloads_total{file,result}`: re-reads of the ingest token file
    /// (`tokens`) and TLS files (`tls`) after a change or SIGHUP, ok or error (an error keeps
    /// the last good set).
    file_reloads: IntCounterVec = counter_vec("file_reloads_total", "Re-reads of the ingest tokens and TLS files by file (tokens, tls) and result (ok, error; an error keeps the last good set).", ["file", "result"]);
    /// `courier_commits_total{result}`: offset commits, ok or error.
    commits: IntCounterVec = counter_vec("commits_total", "Offset commits by result.", ["result"]);
    /// `courier_circuit_state`: 0 closed, 1 open, 2 half-open.
    circuit_state: IntGauge = gauge("circuit_state", "The processor's circuit breaker: 0 closed, 1 open, 2 half-open.");
    /// `courier_circuit_transitions_total{to}`.
    circuit_transitions: IntCounterVec = counter_vec("circuit_transitions_total", "Circuit breaker transitions, by the state entered.", ["to"]);
    /// `courier_ready`: 1 while `/readyz` would answer 200, kept by `Readiness`.
    ready: IntGauge = gauge("ready", "1 while /readyz answers 200 (broker reachable; consumer: group joined; no message held).");
    /// `courier_build_info{version}`: always 1; the label says which courier runs.
    build_info: IntGaugeVec = gauge_vec("build_info", "Always 1; the version label says which courier build runs.", ["version"]);
    /// `courier_publish_duration_seconds`: from the publish call to the broker's
    /// acknowledgement (ingest, retry and DLQ publishes alike).
    publish_duration: Histogram = histogram("publish_duration_seconds", "From a publish call to the broker's acknowledgement, for acknowledged records.");
}

/// A registered metric family as it is exported: what dashboards and alert rules may use.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    /// The full name, `courier_...` (a histogram's series add `_bucket`, `_sum`, `_count`).
    pub name: String,
    /// Counter, gauge or histogram.
    pub kind: MetricType,
    /// The label names the family is split by (none for a plain metric).
    pub labels: Vec<String>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];

/// Registers metrics and records their families as it goes.
#[derive(Default)]
struct Registrar {
    registry: Registry,
    families: Vec<Family>,
}

impl Registrar {
    /// A registrar holding the prometheus crate's process metrics (`process_cpu_seconds_total`,
    /// `process_resident_memory_bytes`, `process_open_fds`, ...), which exist on Linux only.
    fn with_process_metrics() -> Self {
        #[allow(unused_mut)]
        let mut r = Registrar::default();
        #[cfg(target_os = "linux")]
        r.add(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
        r
    }

    fn register<M: Collector + Clone + 'static>(&mut self, m: prometheus::Result<M>) -> M {
        let m = m.expect("metric definition is valid");
        self.add(Box::new(m.clone()));
        m
    }

    /// Registers `c` and records its families.
    fn add(&mut self, c: Box<dyn Collector>) {
        // A vec with no children yet is left out of `gather()`, so the families are read
        // from each collector's own description and collection instead.
        let kinds: Vec<(String, MetricType)> = c
            .collect()
            .iter()
            .map(|f| (f.name().to_owned(), f.get_field_type()))
            .collect();
        for desc in c.desc() {
            if let Some((_, kind)) = kinds.iter().find(|(name, _)| *name == desc.fq_name) {
                self.families.push(Family {
                    name: desc.fq_name.clone(),
                    kind: *kind,
                    labels: desc.variable_labels.clone(),
                });
            }
        }
        self.registry.register(c).expect("metric names are unique");
    }
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace("courier")
}

fn counter(name: &str, help: &str, _: &[&str]) -> prometheus::Result<IntCounter> {
    IntCounter::with_opts(opts(name, help))
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntCounterVec> {
    IntCounterVec::new(opts(name, help), labels)
}

fn gauge(name: &str, help: &str, _: &[&str]) -> prometheus::Result<IntGauge> {
    IntGauge::with_opts(opts(name, help))
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntGaugeVec> {
    IntGaugeVec::new(opts(name, help), labels)
}

fn histogram(name: &str, help: &str, _: &[&str]) -> prometheus::Result<Histogram> {
    Histogram::with_opts(
        HistogramOpts::new(name, help)
            .namespace("courier")
            .buckets(LATENCY_BUCKETS.to_vec()),
    )
}

impl Metrics {
    /// Every registered family, including labelled ones that have no series yet: the names
    /// a dashboard or an alert rule may use (`tests/ops_kit.rs` checks `deploy/` against it).
    pub fn families(&self) -> &[Family] {
        &self.families
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = encoder.encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// The registry, to register extra collectors.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_design_metric() {
        let m = Metrics::new();
        m.messages_published.with_label_values(&["events"]).inc();
        m.publish_failures
            .with_label_values(&["events", "timeout"])
            .inc();
        m.messages_received.with_label_values(&["events"]).inc();
        m.messages_processed
            .with_label_values(&["events", "ok"])
            .inc();
        m.consumer_lag.with_label_values(&["events", "0"]).set(3);
        m.http_requests
            .with_label_values(&["/v1/events", "200"])
            .inc();
        m.commits.with_label_values(&["ok"]).inc();
        let text = m.render();
        for name in [
            "courier_messages_published_total",
            "courier_publish_failures_total",
            "courier_messages_received_total",
            "courier_messages_processed_total",
            "courier_messages_without_id_total",
            "courier_processing_duration_seconds",
            "courier_end_to_end_latency_seconds",
            "courier_retry_lateness_seconds",
            "courier_in_flight",
            "courier_consumer_lag",
            "courier_paused_partitions",
            "courier_dedupe_entries",
            "courier_broker_up",
            "courier_ready",
            "courier_build_info",
            "courier_publish_duration_seconds",
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "missing {name}");
        }
    }

    #[test]
    fn build_info_is_one_for_this_version() {
        let text = Metrics::new().render();
        let want = format!(
            "courier_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&want), "{text}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn process_metrics_are_exported_and_listed() {
        let m = Metrics::new();
        let text = m.render();
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "missing {name}");
            assert!(
                m.families().iter().any(|f| f.name == name),
                "{name} not listed"
            );
        }
    }

    #[test]
    fn families_list_every_registered_metric_before_its_first_sample() {
        let m = Metrics::new();
        let fams = m.families();
        let find = |name: &str| fams.iter().find(|f| f.name == name);
        let lag = find("courier_consumer_lag").expect("a vec with no series is listed");
        assert_eq!(lag.kind, MetricType::GAUGE);
        assert_eq!(lag.labels, ["topic", "partition"]);
        let lateness = find("courier_retry_lateness_seconds").expect("histogram listed");
        assert_eq!(lateness.kind, MetricType::HISTOGRAM);
        assert_eq!(
            find("courier_ready").map(|f| f.kind),
            Some(MetricType::GAUGE)
        );
        assert!(find("courier_no_such_metric").is_none());
        // Whatever the registry exports is listed.
        m.messages_processed.with_label_values(&["t", "ok"]).inc();
        for family in m.registry().gather() {
            assert!(
                find(family.name()).is_some(),
                "{} not listed",
                family.name()
            );
        }
    }
}
