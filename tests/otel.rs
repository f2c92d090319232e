//! The `otel` feature (run with `cargo test --features otel --test otel`): an ingest request
//! with a `traceparent` gives a `publish` span (its child) and, at the consumer, a `process`
//! span (the publish span's child), exported over OTLP/HTTP to a receiver in this test that
//! decodes them with the `opentelemetry-proto` types; the record carries the publish span's
//! context and the http processor forwards the process span's. Configured by the standard
//! `OTEL_*` variables, set here before the exporter starts (this binary has one test, so
//! nothing else reads the environment meanwhile).
#![cfg(feature = "otel")]

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Router;
use courier::app::producer::ProducerOptions;
use courier::testing::{
    header, reqwest_post_json, start_producer_and_consumer, wait_for, TestKafka,
};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use parking_lot::Mutex;
use prost::Message;

const DEADLINE: Duration = Duration::from_secs(30);
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

/// What the OTLP receiver decoded: each span with its resource's `service.name`.
type Received = Arc<Mutex<Vec<(String, Span)>>>;

async fn otlp_traces(State(got): State<Received>, body: Bytes) -> &'static str {
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf request");
    for rs in request.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                AnyValue::StringValue(s) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for span in ss.spans {
                got.lock().push((service.clone(), span));
            }
        }
    }
    // An empty ExportTraceServiceResponse.
    ""
}

async fn endpoint(State(got): State<Arc<Mutex<Vec<HeaderMap>>>>, headers: HeaderMap) {
    got.lock().push(headers);
}

async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_process_spans_are_exported_over_otlp_http_and_linked() {
    let k = TestKafka::new(1);
    let spans: Received = Arc::default();
    let receiver = Router::new()
        .route("/v1/traces", axum::routing::post(otlp_traces))
        .with_state(spans.clone());
    let otlp = serve(receiver).await;
    let requests: Arc<Mutex<Vec<HeaderMap>>> = Arc::default();
    let target = serve(
        Router::new()
            .route("/events", axum::routing::post(endpoint))
            .with_state(requests.clone()),
    )
    .await;
    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp);
    std::env::set_var("OTEL_SERVICE_NAME", "courier-under-test");
    std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "100");
    assert_eq!(courier::otel::init(), Ok(true));

    let url = format!("{target}/events");
    let env = [
        ("COURIER_PROCESSOR", "http"),
        ("PROCESSOR_HTTP_URL", url.as_str()),
    ];
    let (producer, consumer, shutdown) =
        start_producer_and_consumer(k.config(&env), ProducerOptions::default(), DEADLINE).await;
    let response = reqwest_post_json(
        &format!("http://{}/v1/events", producer.http_addr),
        &[("traceparent", &format!("00-{TRACE_ID}-{PARENT_ID}-01"))],
        r#"{"id":"traced-1","type":"t"}"#,
    )
    .await;
    assert_eq!(response.status(), 200);
    wait_for("the endpoint's request", DEADLINE, || {
        !requests.lock().is_empty()
    })
    .await;
    courier::otel::flush().await;
    let find = |name: &str| -> Option<(String, Span)> {
        spans.lock().iter().find(|(_, s)| s.name == name).cloned()
    };
    wait_for(
        "publish and process spans at the receiver",
        DEADLINE,
        || find("publish").is_some() && find("process").is_some(),
    )
    .await;
    let (service, publish) = find("publish").unwrap();
    let (_, process) = find("process").unwrap();
    assert_eq!(service, "courier-under-test", "OTEL_SERVICE_NAME");
    assert_eq!(hex(&publish.trace_id), TRACE_ID);
    assert_eq!(
        hex(&publish.parent_span_id),
        PARENT_ID,
        "a child of the request"
    );
    assert_eq!(publish.kind, SpanKind::Producer as i32);
    assert_eq!(hex(&process.trace_id), TRACE_ID);
    assert_eq!(
        process.parent_span_id, publish.span_id,
        "process is a child of publish"
    );
    assert_eq!(process.kind, SpanKind::Consumer as i32);

    let record = &k.read_all(&k.source, 1, DEADLINE)[0];
    let carried = header(record, "traceparent").unwrap();
    assert_eq!(
        carried,
        format!("00-{TRACE_ID}-{}-01", hex(&publish.span_id)),
        "the record carries the publish span's context"
    );
    let forwarded = requests.lock()[0]["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        forwarded,
        format!("00-{TRACE_ID}-{}-01", hex(&process.span_id)),
        "the http processor forwards the process span's context"
    );
    shutdown.cancel();
    let _ = consumer.done.await;
    let _ = producer.done.await;
    courier::otel::shutdown().await;
}
