//! One place maps the typed configuration to librdkafka properties: typed settings first,
//! the `RDKAFKA_*` passthrough last; a passthrough that contradicts a typed setting is
//! reported and the typed setting wins.

use std::collections::BTreeMap;

use rdkafka::ClientConfig;

use crate::config::Config;

/// Which client the properties are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientRole {
    /// A producer (ingest, retry/DLQ publishing).
    Producer,
    /// The group consumer.
    Consumer,
    /// Metadata probes and topic administration.
    Admin,
}

/// A property set by the passthrough that a typed setting overrode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// librdkafka property name.
    pub property: String,
    /// The passthrough's value (dropped).
    pub passthrough: String,
    /// The typed setting's value (kept).
    pub typed: String,
}

/// librdkafka properties for `role`, and the passthrough conflicts found.
pub fn properties(config: &Config, role: ClientRole) -> (BTreeMap<String, String>, Vec<Conflict>) {
    let typed = typed_properties(config, role);
    let mut conflicts = Vec::new();
    let mut out = typed.clone();
    // Tuning defaults: courier's choice, but a passthrough may change them without conflict.
    let tuning = match role {
        ClientRole::Consumer => CONSUMER_TUNING,
        ClientRole::Producer => PRODUCER_TUNING,
        ClientRole::Admin => &[],
    };
    for (name, value) in tuning {
        out.insert((*name).to_owned(), (*value).to_owned());
    }
    for (name, value) in &config.rdkafka {
        match typed.get(name) {
            Some(t) if t != value => conflicts.push(Conflict {
                property: name.clone(),
                passthrough: value.clone(),
                typed: if crate::config::is_secret_property(name) {
                    "[redacted]".into()
                } else {
                    t.clone()
                },
            }),
            Some(_) => {}
            None => {
                if role_accepts(role, name) {
                    out.insert(name.clone(), value.clone());
                }
            }
        }
    }
    (out, conflicts)
}

/// The properties the typed settings decide for `role`.
fn typed_properties(config: &Config, role: ClientRole) -> BTreeMap<String, String> {
    let k = &config.kafka;
    let mut typed = BTreeMap::new();
    let mut set = |name: &str, value: String| {
        typed.insert(name.to_owned(), value);
    };
    set("bootstrap.servers", k.brokers.clone());
    set("client.id", k.client_id.clone());
    set("security.protocol", k.security_protocol.as_str().to_owned());
    if let Some(m) = &k.sasl_mechanism {
        set("sasl.mechanisms", m.clone());
    }
    if let Some(u) = &k.sasl_username {
        set("sasl.username", u.clone());
    }
    if let Some(p) = &k.sasl_password {
        set("sasl.password", p.expose().to_owned());
    }
    if let Some(ca) = &k.ssl_ca_location {
        set("ssl.ca.location", ca.clone());
    }
    match role {
        ClientRole::Producer => {
            let p = &config.producer;
            set("acks", p.acks.as_str().to_owned());
            set("enable.idempotence", p.idempotent.to_string());
            set("message.send.max.retries", p.retries.to_string());
            set("compression.type", p.compression.as_str().to_owned());
            set("linger.ms", p.linger_ms.to_string());
            set(
                "message.timeout.ms",
                p.delivery_timeout.as_millis().to_string(),
            );
            set(
                "queue.buffering.max.messages",
                p.queue_max_messages.to_string(),
            );
            set("retry.backoff.ms", "100".into());
            set("retry.backoff.max.ms", "1000".into());
        }
        ClientRole::Consumer => {
            let c = &config.consumer;
            set("group.id", c.group_id.clone());
            set(
                "partition.assignment.strategy",
                c.assignment_strategy.as_str().to_owned(),
            );
            // Offsets are committed explicitly, and only once a message is finished.
            set("enable.auto.commit", "false".into());
            set("enable.auto.offset.store", "false".into());
            // Always earliest: retry topics must be read from their start by a group that
            // has no commit on them yet. KAFKA_CONSUMER_AUTO_OFFSET_RESET=latest is applied
            // to the source topics before the consumer joins (transport::offset_reset).
            set("auto.offset.reset", "earliest".into());
            set("fetch.min.bytes", c.fetch_min_bytes.to_string());
            set("fetch.max.bytes", c.fetch_max_bytes.to_string());
            set("enable.partition.eof", "false".into());
        }
        ClientRole::Admin => {}
    }
    typed
}

/// Consumer tuning defaults that `RDKAFKA_*` may override:
/// - `fetch.wait.max.ms`: a resumed partition (a retry that became due) joins the next fetch
///   round, so this bounds how late a retry runs (librdkafka's default is 500 ms; at 100 ms
///   the steady retry lateness p99 was 99–108 ms, at 50 ms 58–74 ms, BENCHMARKS.md). The
///   cost: an idle consumer sends up to 20 empty fetches a second per broker.
/// - `statistics.interval.ms`: how often `courier_consumer_lag` is refreshed.
/// - `queued.max.messages.kbytes`: what librdkafka buffers ahead of the pipeline.
/// - `fetch.queue.backoff.ms`: when that buffer is full, librdkafka waits this long before
///   fetching again; its default (1 s) left the pipeline idle most of the time.
/// - `reconnect.backoff.max.ms`: back within about 2 s of a broker's return.
pub const CONSUMER_TUNING: &[(&str, &str)] = &[
    ("fetch.wait.max.ms", "50"),
    ("statistics.interval.ms", "5000"),
    ("queued.max.messages.kbytes", "16384"),
    ("fetch.queue.backoff.ms", "10"),
    ("reconnect.backoff.max.ms", "2000"),
];

/// Producer tuning defaults that `RDKAFKA_*` may override:
/// - `message.max.bytes`: librdkafka's default (1,000,000) is below the 1 MiB records other
///   clients write by default, which courier must be able to forward to a retry topic or the
///   DLQ; the broker's own limit still applies (and a record it refuses is dead-lettered as
///   a pointer to the original).
/// - `reconnect.backoff.max.ms`: how long a client waits at most between reconnects, so it
///   is back within about 2 s of a broker's return (librdkafka's default is 10 s).
pub const PRODUCER_TUNING: &[(&str, &str)] = &[
    ("message.max.bytes", "10485760"),
    ("reconnect.backoff.max.ms", "2000"),
];

/// Whether a passthrough property belongs to `role`. Producer-only and consumer-only
/// properties are dropped for the other role, since librdkafka warns about them.
fn role_accepts(role: ClientRole, name: &str) -> bool {
    const CONSUMER_ONLY: &[&str] = &[
        "group.",
        "session.timeout.ms",
        "heartbeat.interval.ms",
        "max.poll.interval.ms",
        "fetch.",
        "auto.offset.reset",
        "enable.auto.",
        "auto.commit",
        "isolation.level",
        "partition.assignment.strategy",
        "queued.m",
    ];
    const PRODUCER_ONLY: &[&str] = &[
        "acks",
        "linger.ms",
        "batch.",
        "compression.",
        "message.timeout.ms",
        "queue.buffering.",
        "enable.idempotence",
        "message.send.max.retries",
        "retries",
        "transactional.id",
        "delivery.timeout.ms",
        "partitioner",
        "sticky.partitioning",
    ];
    let consumer_only = CONSUMER_ONLY.iter().any(|p| name.starts_with(p));
    let producer_only = PRODUCER_ONLY.iter().any(|p| name.starts_with(p));
    match role {
        ClientRole::Producer => !consumer_only,
        ClientRole::Consumer => !producer_only,
        ClientRole::Admin => !consumer_only && !producer_only,
    }
}

/// A [`ClientConfig`] for `role`; conflicts are logged as warnings.
pub fn client_config(config: &Config, role: ClientRole) -> ClientConfig {
    let (props, conflicts) = properties(config, role);
    for c in conflicts {
        tracing::warn!(
            property = %c.property,
            passthrough = %c.passthrough,
            typed = %c.typed,
            "An RDKAFKA_ passthrough contradicts a typed setting; the typed setting wins."
        );
    }
    let mut cc = ClientConfig::new();
    for (k, v) in props {
        cc.set(k, v);
    }
    cc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(env: &[(&str, &str)]) -> Config {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load_from(None, &env).unwrap()
    }

    #[test]
    fn producer_properties_from_typed_settings() {
        let c = config(&[
            ("KAFKA_PRODUCER_COMPRESSION", "zstd"),
            ("KAFKA_PRODUCER_LINGER_MS", "20"),
        ]);
        let (p, conflicts) = properties(&c, ClientRole::Producer);
        assert_eq!(p["acks"], "all");
        assert_eq!(p["enable.idempotence"], "true");
        assert_eq!(p["compression.type"], "zstd");
        assert_eq!(p["linger.ms"], "20");
        assert_eq!(p["message.timeout.ms"], "30000");
        assert!(!p.contains_key("group.id"));
        assert!(conflicts.is_empty());
    }

    #[test]
    fn consumer_never_auto_commits() {
        let c = config(&[
            ("RDKAFKA_ENABLE_AUTO_COMMIT", "true"),
            ("RDKAFKA_SESSION_TIMEOUT_MS", "6000"),
        ]);
        let (p, conflicts) = properties(&c, ClientRole::Consumer);
        assert_eq!(p["enable.auto.commit"], "false");
        assert_eq!(p["session.timeout.ms"], "6000");
        assert_eq!(p["fetch.wait.max.ms"], "50", "a tuning default");
        let tuned = config(&[("RDKAFKA_FETCH_WAIT_MAX_MS", "20")]);
        let (p2, c2) = properties(&tuned, ClientRole::Consumer);
        assert_eq!(
            p2["fetch.wait.max.ms"], "20",
            "passthrough overrides a tuning default"
        );
        assert!(c2.is_empty());
        assert_eq!(
            conflicts,
            vec![Conflict {
                property: "enable.auto.commit".into(),
                passthrough: "true".into(),
                typed: "false".into()
            }]
        );
        let (prod, _) = properties(&c, ClientRole::Producer);
        assert!(
            !prod.contains_key("session.timeout.ms"),
            "consumer-only passthrough stays off the producer"
        );
    }

    #[test]
    fn assignment_strategy_is_typed_and_wins_over_the_passthrough() {
        let (p, conflicts) = properties(&config(&[]), ClientRole::Consumer);
        assert_eq!(p["partition.assignment.strategy"], "cooperative-sticky");
        assert!(conflicts.is_empty());
        let c = config(&[
            ("KAFKA_CONSUMER_ASSIGNMENT_STRATEGY", "range"),
            ("RDKAFKA_PARTITION_ASSIGNMENT_STRATEGY", "roundrobin"),
        ]);
        let (p, conflicts) = properties(&c, ClientRole::Consumer);
        assert_eq!(p["partition.assignment.strategy"], "range");
        assert_eq!(conflicts[0].property, "partition.assignment.strategy");
        assert_eq!(conflicts[0].passthrough, "roundrobin");
        let (prod, _) = properties(&c, ClientRole::Producer);
        assert!(!prod.contains_key("partition.assignment.strategy"));
    }

    #[test]
    fn librdkafka_resets_to_earliest_even_when_the_source_topics_start_at_the_end() {
        for env in [
            &[][..],
            &[("KAFKA_CONSUMER_AUTO_OFFSET_RESET", "latest")][..],
        ] {
            let (p, _) = properties(&config(env), ClientRole::Consumer);
            assert_eq!(p["auto.offset.reset"], "earliest", "{env:?}");
        }
        let c = config(&[("RDKAFKA_AUTO_OFFSET_RESET", "latest")]);
        let (_, conflicts) = properties(&c, ClientRole::Consumer);
        assert_eq!(
            conflicts[0].property, "auto.offset.reset",
            "the passthrough is reported"
        );
    }

    #[test]
    fn security_settings_and_redacted_conflicts() {
        let c = config(&[
            ("KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
            ("KAFKA_SASL_MECHANISM", "scram-sha-512"),
            ("KAFKA_SASL_USERNAME", "u"),
            ("KAFKA_SASL_PASSWORD", "p"),
            ("RDKAFKA_SASL_PASSWORD", "other"),
        ]);
        let (p, conflicts) = properties(&c, ClientRole::Admin);
        assert_eq!(p["security.protocol"], "sasl_ssl");
        assert_eq!(p["sasl.mechanisms"], "SCRAM-SHA-512");
        assert_eq!(p["sasl.password"], "p");
        assert_eq!(conflicts[0].typed, "[redacted]");
    }
}
