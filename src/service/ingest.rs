//! The producer's ingest API: `POST /v1/events` and `POST /v1/topics/{topic}/events` take one
//! event object or a JSON array of them. Every event is validated before anything is
//! published; the answer comes after the broker's acknowledgement of every event.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use parking_lot::Mutex;
use serde_json::{json, Value};

use crate::model::{Ack, Envelope, OutgoingRecord};
use crate::observability::{Metrics, Readiness};
use crate::service::publish::{PublishError, PublishFailure, Publisher};

/// Ingest API settings.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Topic of `POST /v1/events`.
    pub default_topic: String,
    /// Topics `POST /v1/topics/{topic}/events` accepts.
    pub allowed_topics: Vec<String>,
    /// Largest body, bytes (413 above).
    pub max_body_bytes: usize,
    /// Most events in one request.
    pub max_batch_events: usize,
    /// Deadline for the broker's acknowledgement of every event (503 after).
    pub request_timeout: Duration,
}

/// What was published per topic and partition, and what failed by reason: the producer's
/// shutdown summary.
#[derive(Debug, Default)]
pub struct Ledger {
    published: Mutex<BTreeMap<(String, i32), u64>>,
    failed: Mutex<BTreeMap<(String, &'static str), u64>>,
}

impl Ledger {
    /// Records one publish result.
    pub fn record(&self, topic: &str, result: &Result<Ack, PublishError>) {
        match result {
            Ok(ack) => {
                *self
                    .published
                    .lock()
                    .entry((topic.to_owned(), ack.partition))
                    .or_default() += 1
            }
            Err(e) => {
                *self
                    .failed
                    .lock()
                    .entry((topic.to_owned(), e.kind.label()))
                    .or_default() += 1
            }
        }
    }

    /// Published counts by (topic, partition).
    pub fn published(&self) -> BTreeMap<(String, i32), u64> {
        self.published.lock().clone()
    }

    /// Failure counts by (topic, reason).
    pub fn failed(&self) -> BTreeMap<(String, &'static str), u64> {
        self.failed.lock().clone()
    }

    /// Total published.
    pub fn total_published(&self) -> u64 {
        self.published.lock().values().sum()
    }

    /// Logs the summary, one line per topic and partition and per failure reason.
    pub fn log_summary(&self) {
        for ((topic, partition), n) in self.published() {
            tracing::info!(
                topic,
                partition,
                published = n,
                "Published to this partition."
            );
        }
        for ((topic, reason), n) in self.failed() {
            tracing::warn!(
                topic,
                reason,
                failed = n,
                "Publishes failed for this reason."
            );
        }
        tracing::info!(published = self.total_published(), "Producer summary.");
    }
}

#[derive(Clone)]
struct IngestState {
    cfg: Arc<IngestConfig>,
    publisher: Arc<dyn Publisher>,
    readiness: Arc<Readiness>,
    metrics: Metrics,
    ledger: Arc<Ledger>,
}

/// The ingest router.
pub fn router(
    cfg: IngestConfig,
    publisher: Arc<dyn Publisher>,
    readiness: Arc<Readiness>,
    metrics: Metrics,
    ledger: Arc<Ledger>,
) -> Router {
    let state = IngestState {
        cfg: Arc::new(cfg),
        publisher,
        readiness,
        metrics,
        ledger,
    };
    Router::new()
        .route("/v1/events", post(post_default))
        .route("/v1/topics/{topic}/events", post(post_topic))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "no such route: POST /v1/events or /v1/topics/{topic}/events",
                None,
            )
        })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "only POST is accepted here",
                None,
            )
        })
        .with_state(state)
}

/// An error answer: status and a JSON body `{"error": ..., "details": ...}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    details: Option<Value>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": self.message});
        if let Some(d) = self.details {
            body["details"] = d;
        }
        let mut resp = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        resp
    }
}

fn error(status: StatusCode, message: &str, details: Option<Value>) -> ApiError {
    ApiError {
        status,
        message: message.to_owned(),
        details,
    }
}

async fn post_default(State(s): State<IngestState>, headers: HeaderMap, body: Body) -> Response {
    let topic = s.cfg.default_topic.clone();
    let resp = ingest(&s, &topic, &headers, body).await;
    s.metrics
        .http_requests
        .with_label_values(&["/v1/events", resp.status().as_str()])
        .inc();
    resp
}

async fn post_topic(
    State(s): State<IngestState>,
    Path(topic): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let resp = if s.cfg.allowed_topics.contains(&topic) {
        ingest(&s, &topic, &headers, body).await
    } else {
        error(
            StatusCode::NOT_FOUND,
            &format!("topic `{topic}` is not in KAFKA_PRODUCER_ALLOWED_TOPICS"),
            None,
        )
        .into_response()
    };
    s.metrics
        .http_requests
        .with_label_values(&["/v1/topics/{topic}/events", resp.status().as_str()])
        .inc();
    resp
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

async fn read_body(s: &IngestState, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let limit = s.cfg.max_body_bytes;
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the body is larger than {limit} bytes (HTTP_MAX_BODY_BYTES)"),
            None,
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    // The whole body must arrive within the request deadline: a client that stalls or
    // trickles it cannot hold the connection (and its task) open for longer.
    let deadline = s.cfg.request_timeout;
    let Ok(read) = tokio::time::timeout(deadline, axum::body::to_bytes(body, limit)).await else {
        return Err(error(
            StatusCode::REQUEST_TIMEOUT,
            &format!(
                "the body did not arrive within {} ms (HTTP_REQUEST_TIMEOUT_MS)",
                deadline.as_millis()
            ),
            None,
        ));
    };
    read.map_err(|e| {
        let length_limit = std::error::Error::source(&e)
            .is_some_and(|src| src.is::<http_body_util::LengthLimitError>());
        if length_limit {
            too_large()
        } else {
            error(
                StatusCode::BAD_REQUEST,
                &format!("could not read the body: {e}"),
                None,
            )
        }
    })
}

/// Parses and validates a body into envelopes, or the 4xx response saying what is wrong.
fn parse_events(s: &IngestState, bytes: &[u8]) -> Result<Vec<Envelope>, ApiError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            &format!("malformed JSON: {e}"),
            None,
        )
    })?;
    let items = match value {
        Value::Array(items) if items.is_empty() => {
            return Err(error(StatusCode::BAD_REQUEST, "the batch is empty", None))
        }
        Value::Array(items) if items.len() > s.cfg.max_batch_events => {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!(
                    "a batch holds at most {} events (HTTP_MAX_BATCH_EVENTS); this one has {}",
                    s.cfg.max_batch_events,
                    items.len()
                ),
                None,
            ))
        }
        Value::Array(items) => items,
        Value::Object(_) => vec![value],
        _ => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "the body must be an event object or an array of events",
                None,
            ))
        }
    };
    let mut envelopes = Vec::with_capacity(items.len());
    let mut problems = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        match Envelope::from_value(item) {
            Ok(e) => envelopes.push(e),
            Err(e) => problems.push(json!({"index": index, "error": e.to_string()})),
        }
    }
    if !problems.is_empty() {
        let first = problems[0]["error"]
            .as_str()
            .unwrap_or("invalid event")
            .to_owned();
        return Err(error(
            StatusCode::BAD_REQUEST,
            &format!("invalid event: {first}; nothing was published"),
            Some(Value::Array(problems)),
        ));
    }
    Ok(envelopes)
}

async fn ingest(s: &IngestState, topic: &str, headers: &HeaderMap, body: Body) -> Response {
    if !is_json(headers) {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/json",
            None,
        )
        .into_response();
    }
    let bytes = match read_body(s, headers, body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let envelopes = match parse_events(s, &bytes) {
        Ok(e) => e,
        Err(e) => return e.into_response(),
    };
    if let Err(reason) = s.readiness.check() {
        return unavailable(&format!("the broker is unavailable: {reason}"), None).into_response();
    }
    let records: Vec<OutgoingRecord> = envelopes.iter().map(|e| e.to_record(topic)).collect();
    let timeout = s.cfg.request_timeout;
    let results = futures::future::join_all(records.into_iter().map(|r| {
        let publisher = s.publisher.clone();
        async move {
            match tokio::time::timeout(timeout, publisher.publish(r)).await {
                Ok(res) => res,
                Err(_) => Err(PublishError {
                    kind: PublishFailure::Timeout,
                    message: format!(
                        "no acknowledgement within {} ms (HTTP_REQUEST_TIMEOUT_MS)",
                        timeout.as_millis()
                    ),
                }),
            }
        }
    }))
    .await;
    respond(s, topic, &envelopes, results)
}

fn unavailable(message: &str, details: Option<Value>) -> ApiError {
    error(StatusCode::SERVICE_UNAVAILABLE, message, details)
}

fn respond(
    s: &IngestState,
    topic: &str,
    envelopes: &[Envelope],
    results: Vec<Result<Ack, PublishError>>,
) -> Response {
    let mut out = Vec::with_capacity(results.len());
    let mut worst: Option<PublishFailure> = None;
    for (env, res) in envelopes.iter().zip(&results) {
        s.ledger.record(topic, res);
        match res {
            Ok(ack) => out.push(json!({"id": env.id, "topic": topic, "partition": ack.partition, "offset": ack.offset})),
            Err(e) => {
                tracing::warn!(message_id = %env.id, topic, reason = e.kind.label(), error = %e.message, "An event was not published.");
                if worst.is_none() || !e.kind.is_transient() {
                    worst = Some(e.kind);
                }
                out.push(json!({"id": env.id, "topic": topic, "error": e.message, "reason": e.kind.label()}));
            }
        }
    }
    match worst {
        None => (StatusCode::OK, Json(json!({"results": out}))).into_response(),
        Some(PublishFailure::UnknownPartition) => error(
            StatusCode::BAD_REQUEST,
            "an event names a partition the topic does not have; see results",
            Some(Value::Array(out)),
        )
        .into_response(),
        Some(PublishFailure::MessageTooLarge) => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the broker refused an event as too large; see results",
            Some(Value::Array(out)),
        )
        .into_response(),
        Some(_) => {
            let failed = out.iter().filter(|r| r.get("error").is_some()).count();
            unavailable(&format!("{failed} of {} events were not published; see results (events without an error were published)", out.len()), Some(Value::Array(out))).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::publish::MockPublisher;
    use axum::http::Request;
    use tower::ServiceExt;

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
}
