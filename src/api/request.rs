//! Reading an ingest request: a JSON content type, a body within its size limit that arrives
//! within the request deadline, and well-formed JSON.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, StatusCode};
use serde_json::Value;

use super::response::{error, ApiError};
use crate::model::{TraceContext, HEADER_TRACEPARENT, HEADER_TRACESTATE};

/// The request's W3C trace context: its `traceparent` (with `tracestate`) when valid, else
/// a new trace (a malformed `traceparent` is ignored, as the recommendation asks).
pub(super) fn trace_context(headers: &HeaderMap) -> TraceContext {
    let value = |name: &str| headers.get(name).map(|v| v.as_bytes());
    TraceContext::from_values(value(HEADER_TRACEPARENT), value(HEADER_TRACESTATE))
        .unwrap_or_else(TraceContext::new_root)
}

/// `Content-Type` must be `application/json` or `application/*+json` (parameters allowed).
pub(super) fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    if is_json(headers) {
        Ok(())
    } else {
        Err(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/json",
            None,
        ))
    }
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

/// Reads the whole body: 413 above `limit` bytes (at once when `Content-Length` says so),
/// 408 when it has not arrived within `deadline`.
pub(super) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    deadline: Duration,
) -> Result<Bytes, ApiError> {
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

/// The body as JSON, or a 400 saying where it is malformed.
pub(super) fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            &format!("malformed JSON: {e}"),
            None,
        )
    })
}
