//! Test support shared by `tests/` and `benches/` (the `test-util` feature; both get it
//! through this crate's dev-dependency on itself, so `cargo test` needs no flag). It is not
//! a production layer: it talks to Kafka with rdkafka clients of its own, as an outside
//! observer of the services under test would.
//!
//! - [`env`]: random topic and group names per test ([`Names`]) and the one builder of a
//!   service's environment ([`ServiceEnv`]), with its presets and per-test overrides.
//! - [`kafka`]: a mock cluster per test ([`TestKafka`]) and the helpers that look at a
//!   cluster from outside ([`Kafka`]): produce with headers, read a topic, end offsets,
//!   committed offsets of a group.
//! - [`services`]: courier's consumer and producer started in this process.
//! - [`process`]: the `courier` binary as child processes (`dev-broker`, `consumer`,
//!   `producer`), killed and reaped on drop, with deadlines on every wait.
//! - [`http`]: a plain HTTP/1.1 client for ingest and ops endpoints, and `/metrics` text.
//! - [`sink`]: the scripted HTTP endpoint the `http` processor posts to.
//! - [`processor`]: a [`Processor`](crate::service::Processor) scripted per message id.
//!
//! Every wait here has a deadline and fails loudly, naming what it waited for.

pub mod env;
pub mod http;
pub mod kafka;
pub mod process;
pub mod processor;
pub mod services;
pub mod sink;

use std::future::Future;
use std::time::{Duration, Instant};

use crate::model::Delivery;

pub use env::{Names, ServiceEnv, RETRY_LEVELS};
pub use http::{
    free_port, http_get, http_request, metric_sum, metric_value, post_request, probe,
    reqwest_post_json, response_status, try_http_get, try_http_request, wait_ready, wait_status,
};
pub use kafka::{event_record, Kafka, TestKafka, TestMessage, TestProducer};
pub use process::{
    courier_bin, courier_command, output_within, successful_output, tail, ChildProcess,
    DevBrokerProcess, Log, ServiceProcess,
};
pub use processor::{ScriptedProcessor, Seen, Step};
pub use services::{
    start_consumer, start_producer, start_producer_and_consumer, stop_consumer, stop_producer,
};
pub use sink::{HttpSink, Reply, SinkRequest, SinkState};

/// A random suffix for names: 10 hex digits.
pub fn rand_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_owned()
}

/// `{prefix}-` and a random suffix: a name no other test uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", rand_id())
}

/// A header's value as text.
pub fn header(d: &Delivery, name: &str) -> Option<String> {
    d.header(name)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Waits until `cond` holds, polling every 20 ms; fails the test after `timeout`, naming
/// `what`.
pub async fn wait_for(what: &str, timeout: Duration, cond: impl FnMut() -> bool) {
    assert!(
        poll(timeout, Duration::from_millis(20), cond).await,
        "timed out waiting for {what}"
    );
}

/// [`wait_for`] with an async condition, polled every 50 ms.
pub async fn wait_for_async<F, Fut>(what: &str, timeout: Duration, cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    assert!(
        poll_async(timeout, Duration::from_millis(50), cond).await,
        "timed out waiting for {what}"
    );
}

/// Whether `cond` held within `timeout` (polled every 50 ms), for a test that measures and
/// reports before it asserts.
pub async fn eventually(timeout: Duration, cond: impl FnMut() -> bool) -> bool {
    poll(timeout, Duration::from_millis(50), cond).await
}

/// [`eventually`] with an async condition, polled every 200 ms.
pub async fn eventually_async<F, Fut>(timeout: Duration, cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    poll_async(timeout, Duration::from_millis(200), cond).await
}

async fn poll(timeout: Duration, every: Duration, mut cond: impl FnMut() -> bool) -> bool {
    poll_async(timeout, every, || std::future::ready(cond())).await
}

async fn poll_async<F, Fut>(timeout: Duration, every: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`, ...); `pid` is a process id
/// or `"self"`. None where there is no such file (not Linux) or field.
pub fn proc_status_kib(pid: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    line_value(&text, field, ':')
}

/// The first word after `key` and `separator` on the first line that starts with both,
/// parsed: `VmRSS:  1234 kB`, or `courier_in_flight 3`.
fn line_value<T: std::str::FromStr>(text: &str, key: &str, separator: char) -> Option<T> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(separator))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_status_reads_this_process() {
        let rss = proc_status_kib("self", "VmRSS").expect("Linux has /proc/self/status");
        assert!(rss > 0);
        assert_eq!(proc_status_kib("self", "NoSuchField"), None);
    }

    #[tokio::test]
    async fn waits_give_up_at_their_deadline() {
        let started = Instant::now();
        assert!(!eventually(Duration::from_millis(120), || false).await);
        assert!(started.elapsed() >= Duration::from_millis(120));
        let mut n = 0;
        assert!(
            eventually(Duration::from_secs(5), || {
                n += 1;
                n == 3
            })
            .await
        );
    }

    #[tokio::test]
    #[should_panic(expected = "timed out waiting for nothing at all")]
    async fn wait_for_fails_loudly() {
        wait_for("nothing at all", Duration::from_millis(50), || false).await;
    }
}
