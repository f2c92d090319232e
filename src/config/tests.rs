use std::path::Path;
use std::time::Duration;

use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn load(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::load_from(None, &env(pairs))
}

fn load_toml(text: &str, pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, text).unwrap();
    Config::load_from(Some(&path), &env(pairs))
}

#[test]
fn defaults_are_valid() {
    let c = load(&[]).unwrap();
    assert_eq!(c.consumer.topics, vec!["events"]);
    assert_eq!(c.retry.topic(2), "events-retry-2");
    assert_eq!(
        c.retry.backoff,
        vec![
            Duration::from_secs(1),
            Duration::from_secs(10),
            Duration::from_secs(60)
        ]
    );
    assert_eq!(c.producer.allowed_topics, vec!["events"]);
    assert_eq!(c.producer.acks, Acks::All);
    assert_eq!(c.ops.addr.port(), 9090);
    assert_eq!(
        c.consumer.assignment_strategy,
        AssignmentStrategy::CooperativeSticky
    );
    assert_eq!(c.consumer.max_in_flight_bytes, 67_108_864);
    let mut defaults = Config::default();
    defaults.normalize();
    assert_eq!(c, defaults, "loading nothing gives the defaults");
}

#[test]
fn environment_overrides_and_parses() {
    let c = load(&[
        ("KAFKA_PRODUCER_ACKS", "1"),
        ("KAFKA_PRODUCER_IDEMPOTENT", "false"),
        ("KAFKA_CONSUMER_TOPICS", "orders, payments"),
        ("KAFKA_CONSUMER_WORKERS", "16"),
        ("KAFKA_CONSUMER_COMMIT_INTERVAL_MS", "250"),
        ("KAFKA_RETRY_BACKOFF", "500ms,2s"),
        ("DEDUPE_TTL", "5m"),
        ("RDKAFKA_SOCKET_KEEPALIVE_ENABLE", "true"),
        ("RDKAFKA_SOME__ODD_NAME", "x"),
    ])
    .unwrap();
    assert_eq!(c.producer.acks, Acks::Leader);
    assert!(!c.producer.idempotent);
    let (props, _) = crate::transport::settings::properties(
        &c,
        crate::transport::settings::ClientRole::Producer,
    );
    assert_eq!(props["enable.idempotence"], "false");
    assert_eq!(props["acks"], "1");
    assert_eq!(c.consumer.topics, vec!["orders", "payments"]);
    assert_eq!(c.consumer.workers, 16);
    assert_eq!(c.consumer.commit_interval, Duration::from_millis(250));
    assert_eq!(c.retry.delay(1), Duration::from_millis(500));
    assert_eq!(
        c.retry.delay(7),
        Duration::from_secs(2),
        "the last delay repeats"
    );
    assert_eq!(c.dedupe.ttl, Duration::from_secs(300));
    assert_eq!(c.rdkafka["socket.keepalive.enable"], "true");
    assert_eq!(c.rdkafka["some_odd.name"], "x");
}

#[test]
fn new_consumer_settings_parse_and_are_bounded() {
    let c = load(&[
        ("KAFKA_CONSUMER_ASSIGNMENT_STRATEGY", "RoundRobin"),
        ("KAFKA_CONSUMER_MAX_IN_FLIGHT_BYTES", "1024"),
    ])
    .unwrap();
    assert_eq!(
        c.consumer.assignment_strategy,
        AssignmentStrategy::RoundRobin
    );
    assert_eq!(c.consumer.assignment_strategy.as_str(), "roundrobin");
    assert_eq!(c.consumer.max_in_flight_bytes, 1024);
    let range = load(&[("KAFKA_CONSUMER_ASSIGNMENT_STRATEGY", "range")]).unwrap();
    assert_eq!(range.consumer.assignment_strategy.as_str(), "range");
    assert_eq!(
        load(&[("KAFKA_CONSUMER_ASSIGNMENT_STRATEGY", "sticky")])
            .unwrap_err()
            .to_string(),
        "KAFKA_CONSUMER_ASSIGNMENT_STRATEGY=sticky: expected cooperative-sticky, range or roundrobin"
    );
    assert_eq!(
        load(&[("KAFKA_CONSUMER_MAX_IN_FLIGHT_BYTES", "0")])
            .unwrap_err()
            .to_string(),
        "KAFKA_CONSUMER_MAX_IN_FLIGHT_BYTES=0: expected a whole number of at least 1"
    );
}

#[test]
fn alias_is_used_only_without_canonical() {
    assert_eq!(
        load(&[("KAFKA_CONSUMER_TOPIC", "a")])
            .unwrap()
            .consumer
            .topics,
        vec!["a"]
    );
    let both = load(&[
        ("KAFKA_CONSUMER_TOPIC", "a"),
        ("KAFKA_CONSUMER_TOPICS", "b"),
    ])
    .unwrap();
    assert_eq!(both.consumer.topics, vec!["b"]);
}

#[test]
fn bad_values_name_the_variable_value_and_accepted() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("KAFKA_PRODUCER_ACKS", "2")],
            "KAFKA_PRODUCER_ACKS=2: expected 0, 1 or all",
        ),
        (
            &[("KAFKA_CONSUMER_WORKERS", "lots")],
            "KAFKA_CONSUMER_WORKERS=lots: expected a whole number",
        ),
        (
            &[("KAFKA_CONSUMER_WORKERS", "0")],
            "KAFKA_CONSUMER_WORKERS=0: expected a whole number from 1 to 4096",
        ),
        (
            &[("DEDUPE_TTL", "forever")],
            "DEDUPE_TTL=forever: expected a duration",
        ),
        (
            &[("KAFKA_RETRY_BACKOFF", "1s,soon")],
            "KAFKA_RETRY_BACKOFF=1s,soon: expected a comma-separated list of durations",
        ),
        (
            &[("HTTP_ADDR", "nowhere")],
            "HTTP_ADDR=nowhere: expected an address",
        ),
        (
            &[("LOG_FORMAT", "xml")],
            "LOG_FORMAT=xml: expected json or pretty",
        ),
        (
            &[("COURIER_PROCESSOR", "http")],
            "PROCESSOR_HTTP_URL=: expected a URL when COURIER_PROCESSOR=http",
        ),
        (
            &[("KAFKA_PRODUCER_IDEMPOTENT", "maybe")],
            "KAFKA_PRODUCER_IDEMPOTENT=maybe: expected true or false",
        ),
        (
            &[("KAFKA_CONSUMER_TOPICS", "events-retry-1")],
            "KAFKA_CONSUMER_TOPICS=events-retry-1: expected source topics distinct",
        ),
        (
            &[("KAFKA_SECURITY_PROTOCOL", "sasl_ssl")],
            "KAFKA_SECURITY_PROTOCOL=sasl_ssl: expected KAFKA_SASL_USERNAME",
        ),
        (
            &[("KAFKA_PRODUCER_DELIVERY_TIMEOUT_MS", "0")],
            "KAFKA_PRODUCER_DELIVERY_TIMEOUT_MS=0: expected a whole number from 1 to 3600000",
        ),
        (
            &[("COURIER_CONFIG", "/nonexistent/courier.toml")],
            "COURIER_CONFIG=/nonexistent/courier.toml: no such file",
        ),
    ];
    for (pairs, want) in cases {
        let err = load(pairs).unwrap_err().to_string();
        assert!(
            err.starts_with(want),
            "{pairs:?}: got {err:?}, want prefix {want:?}"
        );
        assert!(!err.contains('\n'), "one line: {err:?}");
    }
}

#[test]
fn every_problem_is_reported_one_per_line() {
    let err = load(&[
        ("KAFKA_PRODUCER_ACKS", "2"),
        ("KAFKA_CONSUMER_WORKERS", "lots"),
        ("KAFKA_CONSUMER_MAX_IN_FLIGHT", "0"),
        ("LOG_FORMAT", "xml"),
        ("KAFKA_DLQ_TOPIC", "bad topic"),
    ])
    .unwrap_err();
    let lines = err.problems();
    let want = [
        "KAFKA_PRODUCER_ACKS=2: expected 0, 1 or all",
        "KAFKA_CONSUMER_WORKERS=lots: expected a whole number",
        "LOG_FORMAT=xml: expected json or pretty",
        "KAFKA_CONSUMER_MAX_IN_FLIGHT=0: expected a whole number from 1 to 1000000",
        "KAFKA_DLQ_TOPIC=bad topic: expected a topic name",
    ];
    for w in want {
        assert!(
            lines.iter().any(|l| l.starts_with(w)),
            "{w:?} missing from {lines:#?}"
        );
    }
    assert_eq!(lines.len(), want.len(), "{lines:#?}");
    assert_eq!(err.to_string(), lines.join("\n"));
}

#[test]
fn toml_file_then_environment() {
    let text = "[kafka]\nbrokers = \"file:1\"\n[kafka.consumer]\nworkers = 3\ngroup_id = \"from-file\"\n[kafka.producer]\nacks = 1\nidempotent = false\n[kafka.retry]\nbackoff = [\"1s\", \"2s\"]\n";
    let c = load_toml(text, &[("KAFKA_CONSUMER_GROUP_ID", "from-env")]).unwrap();
    assert_eq!(c.kafka.brokers, "file:1");
    assert_eq!(c.consumer.workers, 3);
    assert_eq!(c.consumer.group_id, "from-env");
    assert_eq!(
        c.producer.acks,
        Acks::Leader,
        "a number in TOML is read as a word"
    );
    assert_eq!(c.retry.backoff.len(), 2);
}

#[test]
fn unknown_keys_are_all_refused() {
    let text = "[kafka]\nbrokerz = \"x\"\n[kafka.producer]\nack = 1\n[producer]\ntopic = \"a\"\n";
    let lines = load_toml(text, &[]).unwrap_err().problems();
    assert_eq!(
        lines,
        vec![
            "unknown configuration key `kafka.brokerz` (see config/courier.toml for every key)",
            "unknown configuration key `kafka.producer.ack` (see config/courier.toml for every key)",
            "unknown configuration key `producer` (see config/courier.toml for every key)",
        ]
    );
    let err = load_toml("[kafka\n", &[]).unwrap_err().to_string();
    assert!(err.contains(": expected a TOML file ("), "{err}");
    assert!(!err.contains('\n'), "{err}");
}

#[test]
fn shipped_toml_loads_to_the_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/courier.toml");
    let c = Config::load_from(Some(&path), &[]).unwrap();
    assert_eq!(c, load(&[]).unwrap());
}

#[test]
fn printed_config_redacts_secrets_and_loads_again() {
    let c = load(&[
        ("KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
        ("KAFKA_SASL_MECHANISM", "plain"),
        ("KAFKA_SASL_USERNAME", "u"),
        ("KAFKA_SASL_PASSWORD", "hunter2"),
        ("RDKAFKA_SSL_KEY_PASSWORD", "hunter3"),
        ("RDKAFKA_SOCKET_TIMEOUT_MS", "5000"),
        ("KAFKA_CONSUMER_GROUP_ID", "printed"),
    ])
    .unwrap();
    assert_eq!(c.kafka.sasl_mechanism.as_deref(), Some("PLAIN"));
    let out = c.to_toml();
    assert!(
        !out.contains("hunter2") && !out.contains("hunter3"),
        "{out}"
    );
    assert!(out.contains("sasl_password = \"[redacted]\""), "{out}");
    assert!(
        out.contains("\"ssl.key.password\" = \"[redacted]\""),
        "{out}"
    );
    assert_eq!(
        format!("{:?}", c.kafka.sasl_password),
        "Some(\"[redacted]\")"
    );
    let err = load_toml("[kafka]\nsasl_password = [\"hunter2\"]\n", &[]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "KAFKA_SASL_PASSWORD=[redacted]: expected a single value"
    );
    let again = load_toml(&out, &[]).unwrap();
    assert_eq!(again.consumer.group_id, "printed");
    assert_eq!(again.rdkafka["socket.timeout.ms"], "5000");
    assert_eq!(again.kafka.sasl_password.unwrap().expose(), "[redacted]");
}

#[test]
fn retry_level_of_topic() {
    let r = load(&[]).unwrap().retry;
    assert_eq!(r.level_of("events-retry-1", 3), Some(1));
    assert_eq!(r.level_of("events-retry-3", 3), Some(3));
    assert_eq!(r.level_of("events-retry-4", 3), None);
    assert_eq!(r.level_of("events-retry-01", 3), None);
    assert_eq!(r.level_of("events", 3), None);
}

#[test]
fn every_variable_and_key_is_unique() {
    let all: Vec<&Var> = vars().collect();
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            assert_ne!(a.env, b.env);
            assert_ne!(a.key(), b.key());
        }
    }
}
