//! The producer service against a mock cluster per test, and the binary as a user runs it.

use std::time::{Duration, Instant};

use courier::app::producer::RunningProducer;
use courier::testing::{
    courier_command, free_port, header, http_get, http_request, output_within, start_producer,
    wait_ready, wait_status, Log, ServiceProcess, TestKafka,
};
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(30);
const JSON: Option<&str> = Some("application/json");

async fn producer(k: &TestKafka, extra: &[(&str, &str)]) -> (RunningProducer, CancellationToken) {
    let (running, shutdown) = start_producer(k.config(extra)).await;
    wait_ready(&format!("http://{}/readyz", running.ops_addr), T).await;
    (running, shutdown)
}

fn events_url(p: &RunningProducer) -> String {
    format!("http://{}/v1/events", p.http_addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posted_event_is_on_the_topic_with_key_value_and_message_id() {
    let k = TestKafka::new(3);
    let (p, shutdown) = producer(&k, &[("KAFKA_PRODUCER_COMPRESSION", "zstd")]).await;
    let (status, body) = http_request(
        "POST",
        &events_url(&p),
        JSON,
        br#"{"id":"evt-1","type":"order_created","key":"cust-9","data":{"n":1}}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let resp: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(resp["results"][0]["id"], "evt-1");
    assert_eq!(resp["results"][0]["topic"], k.source.as_str());
    let msgs = k.read_all(&k.source, 1, T);
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(
        m.partition as i64,
        resp["results"][0]["partition"].as_i64().unwrap()
    );
    assert_eq!(m.offset, resp["results"][0]["offset"].as_i64().unwrap());
    assert_eq!(m.key.as_deref(), Some(b"cust-9".as_slice()));
    assert_eq!(header(m, "message-id").unwrap(), "evt-1");
    let value: serde_json::Value = serde_json::from_slice(m.payload.as_deref().unwrap()).unwrap();
    assert_eq!(
        value,
        serde_json::json!({"id":"evt-1","type":"order_created","key":"cust-9","data":{"n":1}})
    );
    shutdown.cancel();
    assert_eq!(p.done.await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_and_allowed_topics() {
    let k = TestKafka::new(2);
    let other = format!("{}-audit", k.source);
    k.broker.create_topic(&other, 2).unwrap();
    let (p, shutdown) = producer(&k, &[("KAFKA_PRODUCER_ALLOWED_TOPICS", &other)]).await;
    let batch = br#"[{"type":"a"},{"type":"b","partition":1},{"type":"c","id":"fixed"}]"#;
    let (status, body) = http_request("POST", &events_url(&p), JSON, batch).await;
    assert_eq!(status, 200, "{body}");
    let resp: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(resp["results"].as_array().unwrap().len(), 3);
    assert_eq!(
        resp["results"][1]["partition"], 1,
        "explicit partition honoured"
    );
    for (topic, want) in [(other.as_str(), 200), ("not-allowed", 404)] {
        let url = format!("http://{}/v1/topics/{topic}/events", p.http_addr);
        let (status, _) = http_request("POST", &url, JSON, br#"{"type":"x"}"#).await;
        assert_eq!(status, want, "{topic}");
    }
    let main = k.read_all(&k.source, 3, T);
    assert_eq!(main.len(), 3);
    let ids: Vec<String> = main
        .iter()
        .map(|m| header(m, "message-id").unwrap())
        .collect();
    assert!(ids.contains(&"fixed".to_string()));
    assert_eq!(k.read_all(&other, 1, T).len(), 1);
    shutdown.cancel();
    p.done.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_status_and_publishes_nothing() {
    let k = TestKafka::new(1);
    let (p, shutdown) = producer(
        &k,
        &[
            ("HTTP_MAX_BODY_BYTES", "2048"),
            ("HTTP_MAX_BATCH_EVENTS", "5"),
        ],
    )
    .await;
    let url = events_url(&p);
    let big = format!(r#"{{"type":"t","data":"{}"}}"#, "x".repeat(4096));
    let many = format!("[{}]", [r#"{"type":"t"}"#; 6].join(","));
    let deep = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
    let cases: Vec<(Option<&str>, Vec<u8>, u16)> = vec![
        (JSON, b"{\"type\":".to_vec(), 400),
        (JSON, b"\xff\xfe".to_vec(), 400),
        (JSON, br#"{"data":1}"#.to_vec(), 400),
        (JSON, br#"{"type":["x"]}"#.to_vec(), 400),
        (JSON, br#"[{"type":"ok"},{"type":5}]"#.to_vec(), 400),
        (JSON, b"[]".to_vec(), 400),
        (JSON, deep.into_bytes(), 400),
        (JSON, big.into_bytes(), 413),
        (JSON, many.into_bytes(), 413),
        (Some("text/plain"), br#"{"type":"t"}"#.to_vec(), 415),
        (None, br#"{"type":"t"}"#.to_vec(), 415),
    ];
    for (ct, body, want) in cases {
        let (status, text) = http_request("POST", &url, ct, &body).await;
        assert_eq!(status, want, "{:.80}", String::from_utf8_lossy(&body));
        let json: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("JSON error body: {text}"));
        assert!(json["error"].is_string());
    }
    assert_eq!(k.end_offsets(&k.source), vec![0], "nothing was published");
    shutdown.cancel();
    p.done.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_gives_503_quickly_and_recovers_without_restart() {
    let k = TestKafka::new(1);
    let (p, shutdown) = producer(&k, &[("HTTP_REQUEST_TIMEOUT_MS", "2000")]).await;
    let ready = format!("http://{}/readyz", p.ops_addr);
    assert_eq!(http_get(&ready).await.0, 200);
    k.broker.broker_down().unwrap();
    // /readyz notices the outage.
    wait_status(&ready, 503, T).await;
    let started = Instant::now();
    let (status, body) = http_request("POST", &events_url(&p), JSON, br#"{"type":"t"}"#).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "503 within the request timeout"
    );
    let metrics = http_get(&format!("http://{}/metrics", p.ops_addr)).await.1;
    assert!(metrics.contains("courier_broker_up 0"));
    k.broker.broker_up().unwrap();
    wait_ready(&ready, T).await;
    let (status, body) = http_request(
        "POST",
        &events_url(&p),
        JSON,
        br#"{"type":"t","id":"after"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    shutdown.cancel();
    p.done.await.unwrap();
}

#[test]
fn config_errors_name_the_variable_and_exit_non_zero() {
    let cases = [
        (
            "KAFKA_PRODUCER_ACKS",
            "2",
            "KAFKA_PRODUCER_ACKS=2: expected 0, 1 or all",
        ),
        (
            "KAFKA_CONSUMER_WORKERS",
            "zero",
            "KAFKA_CONSUMER_WORKERS=zero: expected a whole number",
        ),
        (
            "KAFKA_RETRY_BACKOFF",
            "1s,later",
            "KAFKA_RETRY_BACKOFF=1s,later: expected a comma-separated list of durations",
        ),
    ];
    for (var, value, want) in cases {
        let out = output_within(courier_command(["config"]).env(var, value), T);
        assert!(!out.status.success(), "{var}={value} must fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(want), "{stderr}");
    }
    let out = output_within(
        courier_command(["config"]).env("KAFKA_SASL_PASSWORD", "s3cret"),
        T,
    );
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("s3cret") && stdout.contains("sasl_password = \"[redacted]\""),
        "{stdout}"
    );
}

/// How long the child producer holds a message in its queue before sending it
/// (`KAFKA_PRODUCER_LINGER_MS`), unless a flush sends it sooner.
const LINGER: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_messages_still_pending_in_the_client() {
    let k = TestKafka::new(1);
    let http = free_port();
    let mut child = ServiceProcess::spawn(
        "producer",
        &k.service_env(&[
            ("HTTP_ADDR", &format!("127.0.0.1:{http}")),
            ("KAFKA_PRODUCER_LINGER_MS", &LINGER.as_millis().to_string()),
            ("HTTP_REQUEST_TIMEOUT_MS", "1000"),
            ("KAFKA_PRODUCER_FLUSH_TIMEOUT_MS", "15000"),
            ("LOG_FORMAT", "pretty"),
        ]),
        Log::Null,
    );
    child.wait_ready(T).await;
    // The events reach the producer's client, which holds them for the linger: there is no
    // acknowledgement within the request timeout, so the request is answered 503 while
    // the messages are still queued in the client.
    let posted = Instant::now();
    let batch =
        br#"[{"type":"t","id":"sig-0"},{"type":"t","id":"sig-1"},{"type":"t","id":"sig-2"}]"#;
    let url = format!("http://127.0.0.1:{http}/v1/events");
    let (status, body) = http_request("POST", &url, JSON, batch).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("HTTP_REQUEST_TIMEOUT_MS"), "{body}");
    assert_eq!(
        k.end_offsets(&k.source),
        vec![0],
        "the messages are pending in the client, not on the broker"
    );
    child.signal("TERM");
    let status = child.wait(T).await;
    assert!(status.success(), "exit 0 after SIGTERM: {status:?}");
    assert!(
        posted.elapsed() < LINGER,
        "the producer exited before its linger would have sent the messages"
    );
    let mut ids: Vec<String> = k
        .read_all(&k.source, 3, T)
        .iter()
        .filter_map(|m| m.message_id().map(str::to_owned))
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        vec!["sig-0", "sig-1", "sig-2"],
        "the flush on SIGTERM delivered every pending message, once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checker_recreates_a_producer_after_a_fatal_error() {
    use courier::observability::{Metrics, Readiness};
    use courier::service::{PublishFailure, Publisher};
    use courier::transport::{HealthChecker, KafkaPublisher};
    use std::sync::Arc;
    let k = TestKafka::new(1);
    let config = k.config(&[]);
    let metrics = Metrics::new();
    let readiness = Readiness::new(metrics.clone(), false);
    let publisher = Arc::new(KafkaPublisher::new(&config, metrics.clone()).unwrap());
    let record = |id: &str| courier::model::OutgoingRecord {
        topic: k.source.clone(),
        partition: None,
        key: Some(id.as_bytes().to_vec()),
        payload: Some(b"{}".to_vec()),
        headers: vec![("message-id".into(), Some(id.as_bytes().to_vec()))],
    };
    publisher
        .publish(record("before"))
        .await
        .expect("healthy producer publishes");
    publisher.inject_fatal_error_for_tests();
    let err = publisher.publish(record("broken")).await.unwrap_err();
    assert_eq!(err.kind, PublishFailure::Fatal, "{err}");
    let health = HealthChecker::start(&config, readiness.clone(), Some(publisher.clone())).unwrap();
    let deadline = Instant::now() + T;
    loop {
        match publisher.publish(record("after")).await {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "never recovered: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    health.stop();
    let ids: Vec<String> = k
        .read_all(&k.source, 2, T)
        .iter()
        .filter_map(|m| m.message_id().map(str::to_owned))
        .collect();
    assert!(
        ids.contains(&"before".into()) && ids.contains(&"after".into()),
        "{ids:?}"
    );
}
