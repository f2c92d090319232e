//! The ingest API over a mock publisher: statuses, error bodies and what is published.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::{router, IngestConfig};
use crate::model::Ack;
use crate::observability::{Metrics, Readiness};
use crate::service::ingest::Ledger;
use crate::service::publish::{MockPublisher, PublishError, PublishFailure};

fn app(publisher: MockPublisher, broker_up: bool) -> Router {
    let metrics = Metrics::new();
    let readiness = Readiness::new(metrics.clone(), false);
    if broker_up {
        readiness.broker_ok();
    }
    let cfg = IngestConfig {
        default_topic: "events".into(),
        allowed_topics: vec!["events".into(), "audit".into()],
        max_body_bytes: 4096,
        max_batch_events: 3,
        request_timeout: Duration::from_millis(200),
    };
    router(
        cfg,
        Arc::new(publisher),
        readiness,
        metrics,
        Arc::new(Ledger::default()),
    )
}

async fn post(app: Router, uri: &str, ct: Option<&str>, body: &str) -> (StatusCode, Value) {
    let mut req = Request::post(uri);
    if let Some(ct) = ct {
        req = req.header("content-type", ct);
    }
    let resp = app
        .oneshot(req.body(Body::from(body.to_owned())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn never_publishes() -> MockPublisher {
    let mut p = MockPublisher::new();
    p.expect_publish().never();
    p
}

#[tokio::test]
async fn bad_input_gets_4xx_json_and_publishes_nothing() {
    let big = format!("{{\"type\":\"t\",\"data\":\"{}\"}}", "x".repeat(5000));
    let cases: Vec<(&str, Option<&str>, String, StatusCode)> = vec![
        (
            "/v1/events",
            Some("application/json"),
            "{not json".into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/events",
            Some("application/json"),
            "{\"id\":\"a\"}".into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/events",
            Some("application/json"),
            "{\"type\":7}".into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/events",
            Some("application/json"),
            "[]".into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/events",
            Some("application/json"),
            "42".into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/events",
            Some("application/json"),
            "[{\"type\":\"a\"},{\"nope\":1}]".into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/events",
            Some("application/json"),
            "[{\"type\":\"a\"},{\"type\":\"a\"},{\"type\":\"a\"},{\"type\":\"a\"}]".into(),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            "/v1/events",
            Some("application/json"),
            big,
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            "/v1/events",
            Some("text/plain"),
            "{\"type\":\"t\"}".into(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "/v1/events",
            None,
            "{\"type\":\"t\"}".into(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "/v1/topics/secret/events",
            Some("application/json"),
            "{\"type\":\"t\"}".into(),
            StatusCode::NOT_FOUND,
        ),
    ];
    for (uri, ct, body, want) in cases {
        let (status, json) = post(app(never_publishes(), true), uri, ct, &body).await;
        assert_eq!(status, want, "{uri} {ct:?} {body:.60}");
        assert!(
            json["error"].is_string(),
            "JSON error for {body:.60}: {json}"
        );
    }
}

#[tokio::test]
async fn a_body_that_stalls_or_trickles_gets_408_after_the_deadline() {
    use futures::StreamExt;
    type Chunk = Result<Bytes, std::io::Error>;
    let stalls = futures::stream::iter([Ok(Bytes::from_static(b"{\"type\":"))])
        .chain(futures::stream::pending::<Chunk>());
    // A byte every 20 ms: never idle long, but never done within the deadline either.
    let trickles = futures::stream::unfold((), |()| async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Some((Chunk::Ok(Bytes::from_static(b" ")), ()))
    });
    for body in [Body::from_stream(stalls), Body::from_stream(trickles)] {
        let started = std::time::Instant::now();
        let req = Request::post("/v1/events")
            .header("content-type", "application/json")
            .body(body)
            .unwrap();
        let resp = tokio::time::timeout(
            Duration::from_secs(10),
            app(never_publishes(), true).oneshot(req),
        )
        .await
        .expect("an answer within 10 s, not a connection held open")
        .unwrap();
        assert_eq!(resp.status(), StatusCode::REQUEST_TIMEOUT);
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "not before HTTP_REQUEST_TIMEOUT_MS"
        );
    }
}

#[tokio::test]
async fn wrong_method_gets_a_json_405() {
    let resp = app(never_publishes(), true)
        .oneshot(Request::get("/v1/events").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let json: Value = serde_json::from_slice(&bytes).unwrap();
    assert!(json["error"].is_string());
}

#[tokio::test]
async fn a_partition_the_topic_lacks_is_a_400_not_a_503() {
    let mut p = MockPublisher::new();
    p.expect_publish().returning(|_| {
        Err(PublishError {
            kind: PublishFailure::UnknownPartition,
            message: "Local: Unknown partition".into(),
        })
    });
    let (status, json) = post(
        app(p, true),
        "/v1/events",
        Some("application/json"),
        "{\"type\":\"a\",\"partition\":99}",
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(json["details"][0]["reason"], "unknown_partition");
}

#[tokio::test]
async fn invalid_event_in_batch_names_its_index() {
    let (status, json) = post(
        app(never_publishes(), true),
        "/v1/events",
        Some("application/json"),
        "[{\"type\":\"a\"},{\"type\":1}]",
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(json["details"][0]["index"], 1);
    assert_eq!(json["details"][0]["error"], "field `type` must be a string");
}

#[tokio::test]
async fn broker_down_answers_503_without_publishing() {
    let (status, json) = post(
        app(never_publishes(), false),
        "/v1/events",
        Some("application/json"),
        "{\"type\":\"t\"}",
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(json["error"].as_str().unwrap().contains("broker"));
}

#[tokio::test]
async fn publishes_batch_and_reports_offsets() {
    let mut p = MockPublisher::new();
    p.expect_publish().times(2).returning(|r| {
        assert_eq!(r.topic, "audit");
        Ok(Ack {
            partition: 1,
            offset: 5,
        })
    });
    let (status, json) = post(
        app(p, true),
        "/v1/topics/audit/events",
        Some("application/json; charset=utf-8"),
        "[{\"type\":\"a\",\"id\":\"x1\"},{\"type\":\"b\",\"id\":\"x2\"}]",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        json["results"][0],
        json!({"id": "x1", "topic": "audit", "partition": 1, "offset": 5})
    );
    assert_eq!(json["results"][1]["id"], "x2");
}

#[tokio::test]
async fn a_failed_event_makes_503_and_names_it() {
    let mut p = MockPublisher::new();
    p.expect_publish().times(2).returning(|r| {
        if r.headers[0].1.as_deref() == Some(b"bad".as_slice()) {
            Err(PublishError {
                kind: PublishFailure::QueueFull,
                message: "queue full".into(),
            })
        } else {
            Ok(Ack {
                partition: 0,
                offset: 1,
            })
        }
    });
    let (status, json) = post(
        app(p, true),
        "/v1/events",
        Some("application/json"),
        "[{\"type\":\"a\",\"id\":\"ok\"},{\"type\":\"b\",\"id\":\"bad\"}]",
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json["details"][0]["offset"], 1);
    assert_eq!(json["details"][1]["reason"], "queue_full");
}

/// Posts `body` with extra request headers and returns the records published.
async fn published_with(
    headers: &[(&str, &str)],
    ct: &str,
    body: &str,
) -> Vec<crate::model::OutgoingRecord> {
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let sink = seen.clone();
    let mut p = MockPublisher::new();
    p.expect_publish().returning(move |r| {
        sink.lock().push(r);
        Ok(Ack {
            partition: 0,
            offset: 0,
        })
    });
    let mut req = Request::post("/v1/events").header("content-type", ct);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = app(p, true)
        .oneshot(req.body(Body::from(body.to_owned())).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let out = seen.lock().clone();
    out
}

#[tokio::test]
async fn the_request_trace_context_goes_on_every_record_else_a_new_trace() {
    use crate::model::{TraceContext, HEADER_TRACESTATE};
    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let batch = "[{\"type\":\"a\"},{\"type\":\"b\"}]";
    let given = published_with(
        &[("traceparent", PARENT), ("tracestate", "congo=t61rcWkgMzE")],
        "application/json",
        batch,
    )
    .await;
    assert_eq!(given.len(), 2);
    for r in &given {
        let t = TraceContext::from_headers(&r.headers).unwrap();
        assert_eq!(t.parent.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            crate::model::header_value(&r.headers, HEADER_TRACESTATE),
            Some(&b"congo=t61rcWkgMzE"[..])
        );
    }
    // A malformed traceparent is ignored (with its tracestate): a new trace, one per request.
    for headers in [
        &[
            ("traceparent", "00-zz-00f067aa0ba902b7-01"),
            ("tracestate", "a=b"),
        ][..],
        &[][..],
    ] {
        let fresh = published_with(headers, "application/json", batch).await;
        let ids: Vec<u128> = fresh
            .iter()
            .map(|r| {
                TraceContext::from_headers(&r.headers)
                    .unwrap()
                    .parent
                    .trace_id
            })
            .collect();
        assert_eq!(ids[0], ids[1], "one trace per request");
        assert_ne!(ids[0], 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert!(crate::model::header_value(&fresh[0].headers, HEADER_TRACESTATE).is_none());
        let sampled = TraceContext::from_headers(&fresh[0].headers)
            .unwrap()
            .parent
            .flags;
        assert_eq!(sampled, crate::model::TraceParent::SAMPLED);
    }
}

#[tokio::test]
async fn a_structured_cloudevent_is_published_with_its_content_type() {
    let ce = json!({"specversion": "1.0", "id": "ce-7", "type": "t", "source": "/s", "data": 1});
    let records = published_with(&[], "application/cloudevents+json", &ce.to_string()).await;
    assert_eq!(
        crate::model::header_value(&records[0].headers, "content-type"),
        Some(&b"application/cloudevents+json"[..])
    );
    assert_eq!(
        crate::model::header_value(&records[0].headers, "message-id"),
        Some(&b"ce-7"[..])
    );
    let bad = json!({"specversion": "1.0", "type": "t", "source": "/s"});
    let (status, body) = post(
        app(never_publishes(), true),
        "/v1/events",
        Some("application/cloudevents+json"),
        &bad.to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"].as_str().unwrap().contains("`id`"), "{body}");
}
