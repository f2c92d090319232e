//! courier in the estate its users run, against the mock cluster: a W3C trace context from
//! an ingest request through a retry and the DLQ to an HTTPS endpoint behind a private CA
//! (made here with rcgen), the http processor's headers, `KAFKA_CONSUMER_AUTO_OFFSET_RESET`
//! and binary-mode CloudEvents' `ce_id` as the dedupe key.

use std::sync::Arc;
use std::time::Duration;

use courier::app::producer::ProducerOptions;
use courier::model::Headers;
use courier::observability::Metrics;
use courier::service::builtin::HttpProcessor;
use courier::service::{ProcessError, Processor};
use courier::testing::{
    header, metric_sum, rand_id, reqwest_post_json, start_consumer, start_producer_and_consumer,
    wait_for, wait_ready, ScriptedProcessor, TestKafka,
};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DEADLINE: Duration = Duration::from_secs(30);

/// A CA and a server certificate for `localhost` and 127.0.0.1 it signed.
struct TestPki {
    ca_pem: String,
    server: Arc<rustls::ServerConfig>,
}

fn test_pki() -> TestPki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "courier test CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    let key_der = rustls_pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key_der)
        .unwrap();
    TestPki {
        ca_pem: ca_cert.pem(),
        server: Arc::new(server),
    }
}

/// One request the HTTPS endpoint received: lower-case header names and values.
#[derive(Debug, Clone)]
struct Received {
    headers: Vec<(String, String)>,
}

impl Received {
    fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTPS/1.1 endpoint on 127.0.0.1:0 that answers `status_for(request)` and records every
/// request. Returns its URL.
async fn https_endpoint(
    server: Arc<rustls::ServerConfig>,
    status_for: fn(&Received) -> u16,
    seen: Arc<Mutex<Vec<Received>>>,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                // A client that does not trust the CA aborts the handshake: nothing to do.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                while let Some(req) = read_request(&mut tls).await {
                    let status = status_for(&req);
                    seen.lock().push(req);
                    let answer = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
                    if tls.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("https://127.0.0.1:{}/events", addr.port())
}

/// Reads one HTTP/1.1 request (head and a `content-length` body); `None` at the end of the
/// connection.
async fn read_request<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Option<Received> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let headers: Vec<(String, String)> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.ok()?;
    Some(Received { headers })
}

/// The trace id of a `traceparent` value.
fn trace_id(traceparent: &str) -> &str {
    traceparent.split('-').nth(1).unwrap_or("")
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_context_survives_ingest_retry_and_dlq_up_to_a_private_ca_endpoint() {
    let k = TestKafka::new(1);
    let pki = test_pki();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    // Every request for the event `fails` answers 500: one retry, then the DLQ.
    let url = https_endpoint(
        pki.server.clone(),
        |r| {
            if r.get("idempotency-key") == Some("fails") {
                500
            } else {
                200
            }
        },
        seen.clone(),
    )
    .await;

    // Without the CA file the endpoint's certificate is not trusted.
    let untrusting = HttpProcessor::new(&url, Duration::from_secs(5)).unwrap();
    let probe = courier::model::Delivery {
        topic: "t".into(),
        partition: 0,
        offset: 0,
        key: None,
        payload: Some(b"{}".to_vec()),
        headers: Vec::new(),
        timestamp_ms: None,
    };
    match untrusting.process(&probe).await {
        Err(ProcessError::Retryable { reason, .. }) => {
            assert!(reason.contains("connection failed"), "{reason}")
        }
        other => panic!("an unknown CA must fail the connection: {other:?}"),
    }
    assert!(seen.lock().is_empty());

    let ca = ca_file.display().to_string();
    let env = [
        ("COURIER_PROCESSOR", "http"),
        ("PROCESSOR_HTTP_URL", url.as_str()),
        ("PROCESSOR_HTTP_CA_FILE", ca.as_str()),
        (
            "PROCESSOR_HTTP_HEADERS",
            "Authorization=Bearer t0ken,X-Team=payments",
        ),
        ("PROCESSOR_CIRCUIT", "off"),
        ("KAFKA_CONSUMER_RETRY_MAX", "1"),
        ("KAFKA_RETRY_BACKOFF", "100ms"),
    ];
    let producer_metrics = Metrics::new();
    let options = ProducerOptions {
        metrics: Some(producer_metrics.clone()),
        ..ProducerOptions::default()
    };
    let (producer, consumer, shutdown) =
        start_producer_and_consumer(k.config(&env), options, DEADLINE).await;

    let traceparent = format!("00-{TRACE_ID}-00f067aa0ba902b7-01");
    let response = reqwest_post_json(
        &format!("http://{}/v1/events", producer.http_addr),
        &[
            ("traceparent", &traceparent),
            ("tracestate", "congo=t61rcWkgMzE"),
        ],
        r#"[{"id":"fails","type":"t"},{"id":"works","type":"t"}]"#,
    )
    .await;
    assert_eq!(response.status(), 200);

    let dlq = k.read_all(&k.dlq, 1, DEADLINE);
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    let dead = &dlq[0];
    assert_eq!(
        header(dead, "courier-error-kind").as_deref(),
        Some("exhausted")
    );
    let dead_parent = header(dead, "traceparent").expect("the DLQ record keeps traceparent");
    assert_eq!(trace_id(&dead_parent), TRACE_ID);
    assert_eq!(
        header(dead, "tracestate").as_deref(),
        Some("congo=t61rcWkgMzE")
    );
    let retried = k.read_all(&k.retry_topic(1), 1, DEADLINE);
    assert_eq!(
        trace_id(&header(&retried[0], "traceparent").unwrap()),
        TRACE_ID,
        "the retry record keeps traceparent"
    );

    wait_for("3 requests at the endpoint", DEADLINE, || {
        seen.lock().len() >= 3
    })
    .await;
    let requests = seen.lock().clone();
    let fails: Vec<&Received> = requests
        .iter()
        .filter(|r| r.get("idempotency-key") == Some("fails"))
        .collect();
    assert_eq!(
        fails.len(),
        2,
        "the first attempt and the retry: {requests:?}"
    );
    for r in &requests {
        let tp = r.get("traceparent").expect("traceparent on every attempt");
        assert_eq!(trace_id(tp), TRACE_ID, "{r:?}");
        assert_eq!(r.get("tracestate"), Some("congo=t61rcWkgMzE"));
        assert_eq!(r.get("idempotency-key"), r.get("message-id"));
        let agent = format!("courier/{}", env!("CARGO_PKG_VERSION"));
        assert_eq!(r.get("user-agent"), Some(agent.as_str()));
        assert_eq!(r.get("authorization"), Some("Bearer t0ken"));
        assert_eq!(r.get("x-team"), Some("payments"));
    }
    assert_eq!(
        fails[1].get("courier-attempt"),
        Some("1"),
        "the retry says so"
    );

    let published = metric_sum(
        &producer_metrics.render(),
        "courier_publish_duration_seconds_count",
        &[],
    );
    assert_eq!(
        published, 2.0,
        "one publish latency per acknowledged record"
    );
    let consumer_text = consumer.metrics.render();
    assert_eq!(
        metric_sum(
            &consumer_text,
            "courier_publish_duration_seconds_count",
            &[]
        ),
        2.0,
        "the retry and the DLQ publish"
    );
    shutdown.cancel();
    let _ = consumer.done.await;
    let _ = producer.done.await;
}

/// `(key, payload, headers)` of one event with these headers.
fn event(id: &str, headers: &[(&str, &str)]) -> (Option<Vec<u8>>, Vec<u8>, Headers) {
    let payload = serde_json::json!({"id": id, "type": "t"}).to_string();
    let headers = headers
        .iter()
        .map(|(k, v)| ((*k).into(), Some(v.as_bytes().to_vec())))
        .collect();
    (Some(b"one-key".to_vec()), payload.into_bytes(), headers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_skips_earlier_records_yet_reads_its_own_retry_topic_from_the_start() {
    let k = TestKafka::new(1);
    let old: Vec<_> = (0..5)
        .map(|i| event(&format!("old-{i}"), &[("message-id", &format!("old-{i}"))]))
        .collect();
    k.produce(&k.source, old).await;
    // A retry this group published before it ever committed on the retry topic (a member
    // that stopped right after): due now, it must not be skipped.
    let now = courier::model::now_ms().to_string();
    let retry = event(
        "retry-0",
        &[
            ("message-id", "retry-0"),
            ("courier-attempt", "1"),
            ("courier-due-at-ms", &now),
            ("courier-consumer-group", &k.group),
            ("courier-original-topic", &k.source),
            ("courier-original-partition", "0"),
            ("courier-original-offset", "0"),
        ],
    );
    k.produce(&k.retry_topic(1), vec![retry]).await;

    let processor = ScriptedProcessor::new();
    let config = k.config(&[
        ("KAFKA_CONSUMER_AUTO_OFFSET_RESET", "latest"),
        ("KAFKA_CONSUMER_WORKERS", "1"),
    ]);
    let (running, shutdown) = start_consumer(config, processor.clone()).await;
    assert_eq!(
        k.committed(&k.source),
        vec![5],
        "the end committed before joining"
    );
    wait_ready(&format!("http://{}/readyz", running.ops_addr), DEADLINE).await;

    let mut new: Vec<_> = (0..5)
        .map(|i| event(&format!("new-{i}"), &[("message-id", &format!("new-{i}"))]))
        .collect();
    // Binary-mode CloudEvents without message-id: their ce_id is the dedupe key.
    new.push(event("ce-a", &[("ce_id", "ce-dup"), ("ce_type", "t")]));
    new.push(event("ce-b", &[("ce_id", "ce-dup"), ("ce_type", "t")]));
    k.produce(&k.source, new).await;
    let want: Vec<String> = (0..5)
        .map(|i| format!("new-{i}"))
        .chain(["retry-0".to_owned(), "ce-dup".to_owned()])
        .collect();
    wait_for("the new records and the retry", DEADLINE, || {
        let ok = processor.ok_ids();
        want.iter().all(|w| ok.contains(w))
    })
    .await;
    wait_for("the CloudEvent duplicate skipped", DEADLINE, || {
        metric_sum(
            &running.metrics.render(),
            "courier_messages_processed_total",
            &["outcome=\"duplicate\""],
        ) == 1.0
    })
    .await;
    let ids = processor.ok_ids();
    assert!(
        !ids.iter().any(|id| id.starts_with("old-")),
        "records older than the group were processed: {ids:?}"
    );
    assert_eq!(
        ids.iter().filter(|id| *id == "ce-dup").count(),
        1,
        "{ids:?}"
    );
    shutdown.cancel();
    let _ = running.done.await;

    // The same records with the default (earliest) in a new group: the old ones are read.
    let processor = ScriptedProcessor::new();
    let group = format!("group-{}", rand_id());
    let (running, shutdown) = start_consumer(
        k.config(&[("KAFKA_CONSUMER_GROUP_ID", &group)]),
        processor.clone(),
    )
    .await;
    wait_for("the old records with earliest", DEADLINE, || {
        processor
            .ok_ids()
            .iter()
            .filter(|id| id.starts_with("old-"))
            .count()
            == 5
    })
    .await;
    shutdown.cancel();
    let _ = running.done.await;
}
