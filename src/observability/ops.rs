//! The ops HTTP server: `/metrics`, `/healthz` (liveness, never depends on Kafka) and
//! `/readyz` (readiness: the broker answers, and for the consumer, the group is joined).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{Metrics, Readiness};

#[derive(Clone)]
struct OpsState {
    metrics: Metrics,
    readiness: Arc<Readiness>,
}

/// The ops router (exposed for tests).
pub fn router(metrics: Metrics, readiness: Arc<Readiness>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .with_state(OpsState { metrics, readiness })
}

async fn metrics_handler(State(s): State<OpsState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

async fn readyz(State(s): State<OpsState>) -> impl IntoResponse {
    match s.readiness.check() {
        Ok(()) => (StatusCode::OK, Json(json!({"status": "ready"}))),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready", "reason": reason})),
        ),
    }
}

/// Binds the ops server on `addr` and serves it until `shutdown` is cancelled. Returns the
/// bound address (port 0 picks a free port) and the task serving it.
///
/// # Errors
/// When the address cannot be bound.
pub async fn serve_ops(
    addr: SocketAddr,
    metrics: Metrics,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("OPS_ADDR={addr}: cannot listen: {e}"))
    })?;
    let local = listener.local_addr()?;
    let app = router(metrics, readiness);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok((local, task))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    /// `/readyz`'s status and `courier_ready` after each step, for a consumer's readiness.
    async fn observe(app: &Router, metrics: &Metrics) -> (u16, i64) {
        let resp = app
            .clone()
            .oneshot(Request::get("/readyz").body(Body::empty()).unwrap())
            .await
            .unwrap();
        (resp.status().as_u16(), metrics.ready.get())
    }

    #[tokio::test]
    async fn ready_gauge_follows_every_readiness_change() {
        let metrics = Metrics::new();
        let readiness = Readiness::new(metrics.clone(), true);
        let app = router(metrics.clone(), readiness.clone());
        assert_eq!(observe(&app, &metrics).await, (503, 0), "before any probe");
        readiness.broker_ok();
        assert_eq!(observe(&app, &metrics).await, (503, 0), "group not joined");
        readiness.set_group_joined(true);
        assert_eq!(observe(&app, &metrics).await, (200, 1), "broker up, joined");
        readiness.broker_failed("connection refused");
        assert_eq!(observe(&app, &metrics).await, (503, 0), "broker down");
        readiness.broker_ok();
        assert_eq!(observe(&app, &metrics).await, (200, 1), "broker back");
        readiness.set_group_joined(false);
        assert_eq!(observe(&app, &metrics).await, (503, 0), "group lost");
        assert!(metrics.render().contains("\ncourier_ready 0\n"));
    }

    #[tokio::test]
    async fn a_producer_is_ready_on_its_first_successful_probe() {
        let metrics = Metrics::new();
        let readiness = Readiness::new(metrics.clone(), false);
        let app = router(metrics.clone(), readiness.clone());
        assert_eq!(observe(&app, &metrics).await, (503, 0));
        readiness.broker_ok();
        assert_eq!(observe(&app, &metrics).await, (200, 1));
        assert!(metrics.render().contains("\ncourier_ready 1\n"));
    }

    #[tokio::test]
    async fn a_held_message_makes_readiness_fail_until_released() {
        let metrics = Metrics::new();
        let readiness = Readiness::new(metrics.clone(), false);
        let app = router(metrics.clone(), readiness.clone());
        readiness.broker_ok();
        readiness.hold("ev/0@7", "its publish to ev-dlq fails: unknown topic");
        assert_eq!(observe(&app, &metrics).await, (503, 0));
        let reason = readiness.check().unwrap_err();
        assert!(
            reason.contains("ev/0@7: its publish to ev-dlq fails"),
            "{reason}"
        );
        assert_eq!(metrics.held_messages.get(), 1);
        readiness.release("ev/0@7");
        assert_eq!(observe(&app, &metrics).await, (200, 1));
        assert_eq!(metrics.held_messages.get(), 0);
    }
}
