//! The OpenTelemetry side of [`super`], compiled with the `otel` feature only: a tracer
//! provider with a batch span processor and the OTLP/HTTP (protobuf) exporter, spans built
//! from and turned back into W3C trace contexts, and the `process` span decorator.

use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use opentelemetry::context::FutureExt;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;

use crate::model::{Delivery, TraceContext, TraceParent};
use crate::service::{ProcessError, Processor};

/// The instrumentation scope of courier's spans.
const SCOPE: &str = "courier";

struct Exporting {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

/// The exporter, once started; `None` inside when exporting is off.
static EXPORTING: OnceLock<Option<Exporting>> = OnceLock::new();

fn tracer() -> Option<&'static SdkTracer> {
    EXPORTING.get()?.as_ref().map(|e| &e.tracer)
}

fn env_is(name: &str, value: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v.trim().eq_ignore_ascii_case(value))
}

/// The OTLP request timeout: `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`, else
/// `OTEL_EXPORTER_OTLP_TIMEOUT` (milliseconds), else 10 s.
fn export_timeout() -> Duration {
    [
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.trim().parse::<u64>().ok())
    .map_or(Duration::from_secs(10), Duration::from_millis)
}

pub(super) fn init() -> Result<bool, String> {
    if let Some(done) = EXPORTING.get() {
        return Ok(done.is_some());
    }
    let exporting = if env_is("OTEL_SDK_DISABLED", "true") || env_is("OTEL_TRACES_EXPORTER", "none")
    {
        None
    } else {
        Some(build()?)
    };
    let on = exporting.is_some();
    if EXPORTING.set(exporting).is_err() {
        // Another caller won the race; its exporter stands.
        return Ok(EXPORTING.get().is_some_and(Option::is_some));
    }
    if on {
        tracing::info!("OpenTelemetry: exporting spans over OTLP/HTTP (OTEL_* variables).");
    }
    Ok(on)
}

fn build() -> Result<Exporting, String> {
    let tls = crate::service::builtin::client_tls(None)?;
    let timeout = export_timeout();
    // reqwest's blocking client runs its own runtime: build it (and later drop it) off any
    // async runtime.
    let client = std::thread::spawn(move || {
        reqwest::blocking::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(timeout)
            .build()
    })
    .join()
    .map_err(|_| "the OTLP HTTP client could not be built".to_owned())?
    .map_err(|e| format!("the OTLP HTTP client could not be built: {e}"))?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_http_client(client)
        .with_timeout(timeout)
        .build()
        .map_err(|e| format!("OpenTelemetry exporter (OTEL_EXPORTER_OTLP_*): {e}"))?;
    let resource = Resource::builder()
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer(SCOPE);
    Ok(Exporting { provider, tracer })
}

pub(super) fn flush() {
    if let Some(Some(e)) = EXPORTING.get() {
        if let Err(err) = e.provider.force_flush() {
            tracing::warn!(error = %err, "OpenTelemetry: exporting the last spans failed.");
        }
    }
}

pub(super) fn shutdown() {
    if let Some(Some(e)) = EXPORTING.get() {
        if let Err(err) = e.provider.shutdown() {
            tracing::warn!(error = %err, "OpenTelemetry: stopping the exporter failed.");
        }
    }
}

/// A recorded span.
#[derive(Debug)]
pub(super) struct LiveSpan {
    span: opentelemetry_sdk::trace::Span,
    state: Option<String>,
}

impl LiveSpan {
    /// Its context as W3C headers.
    pub(super) fn context(&self) -> TraceContext {
        to_trace_context(self.span.span_context()).unwrap_or_else(|| TraceContext {
            parent: TraceParent::new_root(),
            state: self.state.clone(),
        })
    }

    pub(super) fn end(mut self, error: Option<&str>) {
        if let Some(e) = error {
            self.span.set_status(Status::error(e.to_owned()));
        }
        self.span.end();
    }
}

/// An OpenTelemetry parent context from a W3C one.
fn remote_parent(parent: Option<&TraceContext>) -> Context {
    let Some(p) = parent else {
        return Context::new();
    };
    let state = p
        .state
        .as_deref()
        .and_then(|s| TraceState::from_str(s).ok())
        .unwrap_or_default();
    let span_context = SpanContext::new(
        TraceId::from_bytes(p.parent.trace_id.to_be_bytes()),
        SpanId::from_bytes(p.parent.span_id.to_be_bytes()),
        TraceFlags::new(p.parent.flags),
        true,
        state,
    );
    Context::new().with_remote_span_context(span_context)
}

/// A W3C context from an OpenTelemetry span context, when it is valid.
fn to_trace_context(sc: &SpanContext) -> Option<TraceContext> {
    if !sc.is_valid() {
        return None;
    }
    let state = sc.trace_state().header();
    Some(TraceContext {
        parent: TraceParent {
            trace_id: u128::from_be_bytes(sc.trace_id().to_bytes()),
            span_id: u64::from_be_bytes(sc.span_id().to_bytes()),
            flags: sc.trace_flags().to_u8(),
        },
        state: (!state.is_empty()).then_some(state),
    })
}

pub(super) fn start_publish(
    parent: &TraceContext,
    topic: &str,
    message_id: &str,
) -> Option<LiveSpan> {
    let tracer = tracer()?;
    let span = tracer
        .span_builder("publish")
        .with_kind(SpanKind::Producer)
        .with_attributes([
            KeyValue::new("messaging.system", "kafka"),
            KeyValue::new("messaging.operation.type", "send"),
            KeyValue::new("messaging.destination.name", topic.to_owned()),
            KeyValue::new("messaging.message.id", message_id.to_owned()),
        ])
        .start_with_context(tracer, &remote_parent(Some(parent)));
    Some(LiveSpan {
        span,
        state: parent.state.clone(),
    })
}

pub(super) fn current() -> Option<TraceContext> {
    let cx = Context::current();
    let span = cx.span();
    to_trace_context(span.span_context())
}

/// A processor with a `process` span around each call: a child of the record's trace
/// context (a new trace without one), current while the inner processor runs.
pub(super) struct Traced {
    inner: Arc<dyn Processor>,
}

impl Traced {
    pub(super) fn new(inner: Arc<dyn Processor>) -> Self {
        Traced { inner }
    }
}

#[async_trait]
impl Processor for Traced {
    async fn process(&self, delivery: &Delivery) -> Result<(), ProcessError> {
        let Some(tracer) = tracer() else {
            return self.inner.process(delivery).await;
        };
        let parent = TraceContext::from_headers(&delivery.headers);
        let mut attributes = vec![
            KeyValue::new("messaging.system", "kafka"),
            KeyValue::new("messaging.operation.type", "process"),
            KeyValue::new("messaging.destination.name", delivery.topic.clone()),
            KeyValue::new(
                "messaging.destination.partition.id",
                delivery.partition.to_string(),
            ),
            KeyValue::new("messaging.kafka.offset", delivery.offset),
        ];
        if let Some(id) = delivery.message_id() {
            attributes.push(KeyValue::new("messaging.message.id", id.to_owned()));
        }
        let span = tracer
            .span_builder("process")
            .with_kind(SpanKind::Consumer)
            .with_attributes(attributes)
            .start_with_context(tracer, &remote_parent(parent.as_ref()));
        let cx = Context::current_with_span(span);
        let result = self.inner.process(delivery).with_context(cx.clone()).await;
        let span = cx.span();
        if let Err(e) = &result {
            span.set_status(Status::error(e.reason().to_owned()));
        }
        span.end();
        result
    }
}
