//! The producer's ingest HTTP adapter: `POST /v1/events` and `POST /v1/topics/{topic}/events`
//! take one event object or a JSON array of them. It reads and checks the request, hands the
//! events to `service::ingest` (every event validated before anything is published), and
//! answers after the broker's acknowledgement of every event, with a status that says what
//! the client can do. Requests are counted by matched route and status. Optionally behind
//! bearer tokens (`auth`) and TLS (`tls`), whose files are re-read while running (`watch`).

pub(crate) mod auth;
mod request;
mod response;
#[cfg(test)]
mod tests;
pub(crate) mod tls;
pub(crate) mod watch;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use prometheus::IntCounter;

use crate::config::Config;
use crate::model::{events_to_batch, RecordBatch};
use crate::observability::{Metrics, Readiness};
use crate::service::ingest::{publish_records, records_of, validate_batch, Ledger};
use crate::service::Publisher;
use response::{batch_answer, error, ApiError};

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
    /// Deadline for the body to arrive (408 after) and for the broker's acknowledgement of
    /// every event (503 after).
    pub request_timeout: Duration,
}

impl IngestConfig {
    /// The settings of `config`: the producer's topics and the `HTTP_*` limits.
    pub fn from_config(config: &Config) -> Self {
        IngestConfig {
            default_topic: config.producer.topic.clone(),
            allowed_topics: config.producer.allowed_topics.clone(),
            max_body_bytes: config.http.max_body_bytes,
            max_batch_events: config.http.max_batch_events,
            request_timeout: config.http.request_timeout,
        }
    }
}

/// What the handlers share, behind one `Arc`: axum clones the state for every request.
type IngestState = Arc<Ingest>;

struct Ingest {
    cfg: IngestConfig,
    publisher: Arc<dyn Publisher>,
    readiness: Arc<Readiness>,
    metrics: Metrics,
    /// `courier_http_requests_total` of a 200 from `POST /v1/events`, looked up once.
    default_ok: IntCounter,
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
    let default_ok = metrics
        .http_requests
        .with_label_values(&[DEFAULT_ROUTE, StatusCode::OK.as_str()]);
    let state = Arc::new(Ingest {
        cfg,
        publisher,
        readiness,
        metrics,
        default_ok,
        ledger,
    });
    Router::new()
        .route(DEFAULT_ROUTE, post(post_default))
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

/// The route of the default topic.
const DEFAULT_ROUTE: &str = "/v1/events";

// The handlers take the request whole and read its headers in place (the `HeaderMap`
// extractor would copy them).
async fn post_default(State(s): State<IngestState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let resp = ingest(&s, &s.cfg.default_topic, &parts.headers, body).await;
    if resp.status() == StatusCode::OK {
        s.default_ok.inc();
    } else {
        s.metrics
            .http_requests
            .with_label_values(&[DEFAULT_ROUTE, resp.status().as_str()])
            .inc();
    }
    resp
}

async fn post_topic(
    State(s): State<IngestState>,
    Path(topic): Path<String>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let resp = if s.cfg.allowed_topics.contains(&topic) {
        ingest(&s, &topic, &parts.headers, body).await
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

async fn ingest(s: &IngestState, topic: &str, headers: &HeaderMap, body: Body) -> Response {
    let mut batch = match accept(s, topic, headers, body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let deadline = s.cfg.request_timeout;
    let trace = request::trace_context(headers);
    let results = publish_records(&s.publisher, &mut batch, &trace, deadline, &s.ledger).await;
    batch_answer(&batch, &results)
}

/// Everything before publishing: the content type, the body within its size and deadline,
/// valid events (as the records that publish them to `topic`), and a reachable broker.
async fn accept(
    s: &IngestState,
    topic: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<RecordBatch, ApiError> {
    request::require_json(headers)?;
    let bytes =
        request::read_body(headers, body, s.cfg.max_body_bytes, s.cfg.request_timeout).await?;
    let max = s.cfg.max_batch_events;
    // One pass over the body when every event is valid; otherwise the value path, which
    // says precisely what is wrong.
    let batch = match events_to_batch(&bytes, topic, max) {
        Some(batch) => batch,
        None => {
            let value = request::parse_json(&bytes)?;
            records_of(topic, &validate_batch(value, max)?)
        }
    };
    if let Err(reason) = s.readiness.check() {
        return Err(response::unavailable(
            &format!("the broker is unavailable: {reason}"),
            None,
        ));
    }
    Ok(batch)
}
