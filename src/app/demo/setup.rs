//! The demo's configuration: the loaded one, changed only where the demo must (its own
//! broker, addresses on loopback, short retry delays unless the user set some), and the
//! topics its accounting tells apart.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use crate::config::{Config, RetryConfig};

/// The retry delays of the demo unless `KAFKA_RETRY_BACKOFF` (or the TOML file) sets them:
/// short, so the whole retry chain plays out within seconds.
const DEMO_BACKOFF: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(3),
];
/// The consumer's ops address of the demo unless `OPS_ADDR` sets one: loopback only.
const DEMO_OPS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9090);
/// The ingest API of the demo unless `HTTP_ADDR` sets one: loopback only.
const DEMO_HTTP_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);
/// How often the demo probes the broker unless `HEALTH_PROBE_INTERVAL_MS` sets it, so
/// `/readyz` turns ready quickly.
const DEMO_PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// The topics of the demo's accounting: which are sources, which are retry levels, and
/// the DLQ.
#[derive(Debug, Clone)]
pub(crate) struct DemoTopics {
    /// The source topics (what the demo produces to and consumes).
    pub(crate) sources: Vec<String>,
    /// The retry chain.
    pub(crate) retry: RetryConfig,
    /// Retry levels before the DLQ.
    pub(crate) retry_max: u32,
    /// Partitions per topic.
    pub(crate) partitions: i32,
}

impl DemoTopics {
    /// The topics of `config`.
    pub(crate) fn from_config(config: &Config) -> Self {
        DemoTopics {
            sources: config.consumer.topics.clone(),
            retry: config.retry.clone(),
            retry_max: config.consumer.retry_max,
            partitions: config.kafka.topic_partitions,
        }
    }

    /// The retry level of `topic` (0 for a source topic or anything else).
    pub(crate) fn level(&self, topic: &str) -> u32 {
        self.retry.level_of(topic, self.retry_max).unwrap_or(0)
    }

    /// Every retry level's delay added up: the longest a message can spend waiting in the
    /// chain, which bounds the demo's drain.
    pub(crate) fn chain_delay(&self) -> Duration {
        (1..=self.retry_max).map(|n| self.retry.delay(n)).sum()
    }
}

/// The producer's and the consumer's configurations: the loaded one, changed only where
/// the demo must (the broker, addresses on loopback, short delays the user did not set).
pub(super) fn demo_configs(
    mut config: Config,
    bootstrap: &str,
    notes: &mut Vec<String>,
) -> anyhow::Result<(Config, Config)> {
    if !config.consumer.topics.contains(&config.producer.topic) {
        anyhow::bail!(
            "KAFKA_PRODUCER_TOPIC={}: the demo needs it among KAFKA_CONSUMER_TOPICS ({}) so that what it produces is consumed",
            config.producer.topic,
            config.consumer.topics.join(",")
        );
    }
    let defaults = Config::default();
    config.kafka.brokers = bootstrap.to_owned();
    // The demo created the topics itself (the dev broker has no CreateTopics API).
    config.kafka.auto_create_topics = false;
    if config.retry.backoff == defaults.retry.backoff {
        config.retry.backoff = DEMO_BACKOFF.to_vec();
    }
    if config.health.probe_interval == defaults.health.probe_interval {
        config.health.probe_interval = DEMO_PROBE_INTERVAL;
    }
    let producer_ops = demo_addresses(&mut config, &defaults, notes);
    let mut producer_cfg = config.clone();
    producer_cfg.ops.addr = producer_ops;
    Ok((producer_cfg, config))
}

/// Puts the consumer's ops server and the ingest API on loopback unless the user chose
/// addresses, falls back to free ports where taken, and returns the producer's ops address
/// (the next port up; the consumer's `OPS_ADDR` is the one the banner shows).
fn demo_addresses(config: &mut Config, defaults: &Config, notes: &mut Vec<String>) -> SocketAddr {
    let wanted_ops = if config.ops.addr == defaults.ops.addr {
        DEMO_OPS_ADDR
    } else {
        config.ops.addr
    };
    let wanted_http = if config.http.addr == defaults.http.addr {
        DEMO_HTTP_ADDR
    } else {
        config.http.addr
    };
    config.ops.addr = available("OPS_ADDR", wanted_ops, notes);
    config.http.addr = available("HTTP_ADDR", wanted_http, notes);
    let producer_ops = match config.ops.addr.port() {
        0 | u16::MAX => SocketAddr::new(config.ops.addr.ip(), 0),
        p => SocketAddr::new(config.ops.addr.ip(), p + 1),
    };
    available("the producer's ops address", producer_ops, notes)
}

/// `addr` if it can be bound now, else the same IP with port 0 (any free port), with a
/// note for the banner; the real address is printed once it is bound.
fn available(what: &str, addr: SocketAddr, notes: &mut Vec<String>) -> SocketAddr {
    if addr.port() == 0 {
        return addr;
    }
    let probe = || -> std::io::Result<()> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As tokio's own listeners do, so a port in TIME_WAIT counts as free; binding
        // still fails while another socket listens on it.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)
    };
    match probe() {
        Ok(()) => addr,
        Err(e) => {
            notes.push(format!(
                "{what} {addr} is not available ({e}); using a free port instead."
            ));
            SocketAddr::new(addr.ip(), 0)
        }
    }
}

/// An address as a URL host: a wildcard address is reached through loopback.
pub(super) fn url_addr(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

#[cfg(test)]
impl DemoTopics {
    /// `events`, three retry levels with delays of 1 s and 2 s (the last repeating), and
    /// `events-dlq`, six partitions each: the topics of the presentation's unit tests.
    pub(super) fn example() -> Self {
        DemoTopics {
            sources: vec!["events".into()],
            retry: RetryConfig {
                topic_prefix: "events-retry".into(),
                backoff: vec![Duration::from_secs(1), Duration::from_secs(2)],
                dlq_topic: "events-dlq".into(),
            },
            retry_max: 3,
            partitions: 6,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_changes_only_what_it_must() {
        let load = |pairs: &[(&str, &str)]| -> Config {
            let env: Vec<(String, String)> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Config::load_from(None, &env).expect("valid configuration")
        };
        let broker = "127.0.0.1:1234";
        let mut notes = Vec::new();
        let (p, c) = demo_configs(load(&[]), broker, &mut notes).unwrap();
        assert_eq!(c.kafka.brokers, broker);
        assert_eq!(c.retry.backoff, DEMO_BACKOFF.to_vec());
        assert!(c.ops.addr.ip().is_loopback() && c.http.addr.ip().is_loopback());
        assert_ne!(p.ops.addr, c.ops.addr);
        assert_eq!(c.health.probe_interval, DEMO_PROBE_INTERVAL);
        assert!(!c.kafka.auto_create_topics);
        let user = load(&[
            ("KAFKA_RETRY_BACKOFF", "200ms,300ms"),
            ("OPS_ADDR", "127.0.0.1:0"),
            ("HEALTH_PROBE_INTERVAL_MS", "100"),
        ]);
        let (p, c) = demo_configs(user, broker, &mut notes).unwrap();
        assert_eq!(
            c.retry.backoff,
            vec![Duration::from_millis(200), Duration::from_millis(300)]
        );
        assert_eq!((c.ops.addr.port(), p.ops.addr.port()), (0, 0));
        assert_eq!(c.health.probe_interval, Duration::from_millis(100));
        let bad = load(&[("KAFKA_PRODUCER_TOPIC", "elsewhere")]);
        let e = demo_configs(bad, broker, &mut notes).unwrap_err();
        assert!(e.to_string().starts_with("KAFKA_PRODUCER_TOPIC=elsewhere:"));
    }

    #[tokio::test]
    async fn a_taken_port_falls_back_to_any_port() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let mut notes = Vec::new();
        assert_eq!(available("OPS_ADDR", addr, &mut notes).port(), 0);
        assert!(notes[0].starts_with(&format!("OPS_ADDR {addr} is not available")));
        drop(taken);
        assert_eq!(available("OPS_ADDR", addr, &mut notes), addr);
        let any = "0.0.0.0:9".parse().unwrap();
        assert_eq!(url_addr(any).to_string(), "127.0.0.1:9");
    }
}
