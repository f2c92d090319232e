//! The Prometheus registry with every metric name of DESIGN.md (prefix `courier_`).
//! Labels never carry message ids or other unbounded values.

use std::sync::Arc;

use prometheus::core::Collector;
use prometheus::proto::MetricType;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every courier metric, registered in its own [`Registry`] (one per service instance, so
/// tests in one process do not share counters).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `courier_messages_published_total{topic}`.
    pub messages_published: IntCounterVec,
    /// `courier_publish_failures_total{topic,reason}`.
    pub publish_failures: IntCounterVec,
    /// `courier_messages_received_total{topic}`.
    pub messages_received: IntCounterVec,
    /// `courier_messages_processed_total{topic,outcome}`: ok, retry, dlq, duplicate, skipped.
    pub messages_processed: IntCounterVec,
    /// `courier_messages_without_id_total`.
    pub messages_without_id: IntCounter,
    /// `courier_processing_duration_seconds`.
    pub processing_duration: Histogram,
    /// `courier_end_to_end_latency_seconds`: processing end minus the Kafka timestamp.
    pub end_to_end_latency: Histogram,
    /// `courier_retry_lateness_seconds`: processing start minus due time.
    pub retry_lateness: Histogram,
    /// `courier_in_flight`.
    pub in_flight: IntGauge,
    /// `courier_consumer_lag{topic,partition}`.
    pub consumer_lag: IntGaugeVec,
    /// `courier_paused_partitions`.
    pub paused_partitions: IntGauge,
    /// `courier_dedupe_entries`.
    pub dedupe_entries: IntGauge,
    /// `courier_broker_up`.
    pub broker_up: IntGauge,
    /// `courier_assigned_partitions`: partitions this consumer owns (source and retry topics).
    pub assigned_partitions: IntGauge,
    /// `courier_rebalance_partitions_total{kind}`: partitions assigned to, revoked from or
    /// lost by this consumer as the group moves them.
    pub rebalance_partitions: IntCounterVec,
    /// `courier_held_messages`: messages holding their partition because their retry or
    /// DLQ publish fails for a reason that will not heal by itself.
    pub held_messages: IntGauge,
    /// `courier_http_requests_total{route,status}`: ingest API requests by matched route.
    pub http_requests: IntCounterVec,
    /// `courier_commits_total{result}`: offset commits, ok or error.
    pub commits: IntCounterVec,
    /// `courier_ready`: 1 while `/readyz` would answer 200, kept by `Readiness`.
    pub ready: IntGauge,
    families: Arc<[Family]>,
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

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let registry = Registry::new();
        let mut families = Vec::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m.expect("metric definition is valid");
                registry
                    .register(Box::new(m.clone()))
                    .expect("metric names are unique");
                // A vec with no children yet is left out of `gather()`, so the families are
                // read from each collector's own description instead.
                for (desc, family) in m.desc().into_iter().zip(m.collect()) {
                    families.push(Family {
                        name: desc.fq_name.clone(),
                        kind: family.get_field_type(),
                        labels: desc.variable_labels.clone(),
                    });
                }
                m
            }};
        }
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help).namespace("courier"), labels)
        };
        let hist = |name: &str, help: &str| {
            Histogram::with_opts(
                HistogramOpts::new(name, help)
                    .namespace("courier")
                    .buckets(LATENCY_BUCKETS.to_vec()),
            )
        };
        Metrics {
            messages_published: reg!(counter_vec(
                "messages_published_total",
                "Messages acknowledged by the broker, by topic.",
                &["topic"]
            )),
            publish_failures: reg!(counter_vec(
                "publish_failures_total",
                "Publishes that failed, by topic and reason.",
                &["topic", "reason"]
            )),
            messages_received: reg!(counter_vec(
                "messages_received_total",
                "Messages read from Kafka, by topic.",
                &["topic"]
            )),
            messages_processed: reg!(counter_vec(
                "messages_processed_total",
                "Messages finished, by topic and outcome (ok, retry, dlq, duplicate, skipped).",
                &["topic", "outcome"]
            )),
            messages_without_id: reg!(IntCounter::with_opts(
                Opts::new(
                    "messages_without_id_total",
                    "Messages processed without a message-id header (not deduplicated)."
                )
                .namespace("courier")
            )),
            processing_duration: reg!(hist(
                "processing_duration_seconds",
                "Time the processor took per message."
            )),
            end_to_end_latency: reg!(hist(
                "end_to_end_latency_seconds",
                "From the message's Kafka timestamp to the end of its processing."
            )),
            retry_lateness: reg!(hist(
                "retry_lateness_seconds",
                "How late a retry ran: processing start minus its due time."
            )),
            in_flight: reg!(IntGauge::with_opts(
                Opts::new("in_flight", "Messages received and not yet finished.")
                    .namespace("courier")
            )),
            consumer_lag: reg!(IntGaugeVec::new(
                Opts::new(
                    "consumer_lag",
                    "Messages behind the partition's high watermark."
                )
                .namespace("courier"),
                &["topic", "partition"]
            )),
            paused_partitions: reg!(IntGauge::with_opts(
                Opts::new(
                    "paused_partitions",
                    "Partitions paused (back-pressure or a retry not yet due)."
                )
                .namespace("courier")
            )),
            dedupe_entries: reg!(IntGauge::with_opts(
                Opts::new("dedupe_entries", "message-ids held by the dedupe store.")
                    .namespace("courier")
            )),
            broker_up: reg!(IntGauge::with_opts(
                Opts::new("broker_up", "1 while the broker answers metadata probes.")
                    .namespace("courier")
            )),
            assigned_partitions: reg!(IntGauge::with_opts(
                Opts::new(
                    "assigned_partitions",
                    "Partitions this consumer owns (source and retry topics)."
                )
                .namespace("courier")
            )),
            rebalance_partitions: reg!(counter_vec(
                "rebalance_partitions_total",
                "Partitions assigned to, revoked from or lost by this consumer (kind).",
                &["kind"]
            )),
            held_messages: reg!(IntGauge::with_opts(
                Opts::new(
                    "held_messages",
                    "Messages holding their partition because their retry or DLQ publish fails for a reason that will not heal by itself."
                )
                .namespace("courier")
            )),
            http_requests: reg!(counter_vec(
                "http_requests_total",
                "Ingest API requests by matched route and status.",
                &["route", "status"]
            )),
            commits: reg!(counter_vec(
                "commits_total",
                "Offset commits by result.",
                &["result"]
            )),
            ready: reg!(IntGauge::with_opts(
                Opts::new(
                    "ready",
                    "1 while /readyz answers 200 (broker reachable; consumer: group joined)."
                )
                .namespace("courier")
            )),
            registry,
            families: families.into(),
        }
    }

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
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "missing {name}");
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
