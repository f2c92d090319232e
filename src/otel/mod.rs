//! Trace spans around publishing and processing, behind one small API that the rest of
//! courier calls whether or not the `otel` cargo feature is on.
//!
//! Without the feature nothing of OpenTelemetry is compiled: a [`Span`] is empty, the trace
//! context of a request or record travels unchanged (ingest writes the request's
//! `traceparent`, or a new one, on every record; the http processor forwards the record's),
//! and [`instrument`] returns the processor it is given.
//!
//! With the feature, spans are exported over OTLP/HTTP (protobuf) by a batch processor on
//! its own thread, configured by the standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT`
//! (default `http://localhost:4318`; `/v1/traces` is appended) or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_EXPORTER_OTLP_HEADERS`,
//! `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_TRACES_SAMPLER`, `OTEL_BSP_*`; `OTEL_SDK_DISABLED=true` or
//! `OTEL_TRACES_EXPORTER=none` turns exporting off. Two spans per message:
//! - `publish` (kind producer) at ingest, a child of the request's trace context; the record
//!   carries the `publish` span's context, so the consumer's span is its child;
//! - `process` (kind consumer) around each processor call, a child of the record's context;
//!   the http processor forwards the `process` span's context to the endpoint.

use std::sync::Arc;

use crate::model::TraceContext;
use crate::service::Processor;

#[cfg(feature = "otel")]
mod exporter;

/// One span: `publish` or `process`. Empty without the `otel` feature or when exporting is
/// off.
#[derive(Debug, Default)]
pub struct Span {
    #[cfg(feature = "otel")]
    inner: Option<exporter::LiveSpan>,
}

impl Span {
    /// The trace context to hand downstream: this span's, or `parent` when no span is
    /// recorded.
    pub fn context_or(&self, parent: &TraceContext) -> TraceContext {
        #[cfg(feature = "otel")]
        if let Some(live) = &self.inner {
            return live.context();
        }
        parent.clone()
    }

    /// Ends the span, failed with `error` when one is given.
    pub fn end(self, error: Option<&str>) {
        #[cfg(feature = "otel")]
        if let Some(live) = self.inner {
            live.end(error);
        }
        #[cfg(not(feature = "otel"))]
        let _ = error;
    }
}

/// Starts the exporter from the `OTEL_*` variables (with the `otel` feature; otherwise
/// nothing). Returns whether spans are exported. Call once at start-up; later calls keep the
/// first exporter.
///
/// # Errors
/// When the exporter cannot be built (e.g. an invalid endpoint URL).
pub fn init() -> Result<bool, String> {
    #[cfg(feature = "otel")]
    return exporter::init();
    #[cfg(not(feature = "otel"))]
    Ok(false)
}

/// Exports the spans still queued and stops the exporter (with the `otel` feature), at most
/// a few seconds. Runs on a blocking thread: the exporter's HTTP client blocks.
pub async fn shutdown() {
    #[cfg(feature = "otel")]
    {
        let _ = tokio::task::spawn_blocking(exporter::shutdown).await;
    }
}

/// Exports the spans ended so far (with the `otel` feature), waiting for the exporter.
pub async fn flush() {
    #[cfg(feature = "otel")]
    {
        let _ = tokio::task::spawn_blocking(exporter::flush).await;
    }
}

/// A `publish` span for one event published to `topic`, a child of `parent`.
pub fn publish_span(parent: &TraceContext, topic: &str, message_id: &str) -> Span {
    #[cfg(feature = "otel")]
    return Span {
        inner: exporter::start_publish(parent, topic, message_id),
    };
    #[cfg(not(feature = "otel"))]
    {
        let _ = (parent, topic, message_id);
        Span::default()
    }
}

/// The trace context of the `process` span this task runs in, if any: what the http
/// processor forwards instead of the record's own context.
pub fn current() -> Option<TraceContext> {
    #[cfg(feature = "otel")]
    return exporter::current();
    #[cfg(not(feature = "otel"))]
    None
}

/// `processor`, with a `process` span around each call when the `otel` feature is on.
pub fn instrument(processor: Arc<dyn Processor>) -> Arc<dyn Processor> {
    #[cfg(feature = "otel")]
    return Arc::new(exporter::Traced::new(processor));
    #[cfg(not(feature = "otel"))]
    processor
}
