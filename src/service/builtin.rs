//! The built-in processors: `log` and `http`.
//!
//! - [`LogProcessor`] validates that the payload is an event envelope (a JSON object with a
//!   string `id` and a string `type`) and logs it; anything else is [`ProcessError::Fatal`].
//! - [`HttpProcessor`] POSTs the payload to a URL with the `message-id` and courier headers,
//!   the trace context, `Idempotency-Key`, `User-Agent` and any static headers, and maps the
//!   answer: 2xx ok; 408, 429, 5xx, timeouts and transport errors retryable; everything else
//!   fatal.

use std::error::Error as StdError;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use reqwest::StatusCode;
use serde_json::Value;

use crate::config::{HeaderSetting, ProcessorConfig, ProcessorKind};
use crate::model::{
    truncate_utf8, Delivery, TraceContext, COURIER_HEADER_PREFIX, HEADER_MESSAGE_ID,
    HEADER_TRACEPARENT, HEADER_TRACESTATE,
};
use crate::service::processor::{ProcessError, Processor};

/// The `User-Agent` of the http processor's requests.
pub const USER_AGENT_VALUE: &str = concat!("courier/", env!("CARGO_PKG_VERSION"));
/// The header carrying the `message-id` for the endpoint's own dedupe.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The longest `Retry-After` honoured; longer hints are capped to this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// At most this many bytes of a response body are quoted in an error reason.
const MAX_REASON_BODY_BYTES: usize = 200;
/// At most this many bytes of a transport error's text are kept in a reason.
const MAX_REASON_ERROR_BYTES: usize = 300;
/// The connect timeout is the request timeout, but never more than this.
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A 2xx body is read up to this size so the connection can be reused.
const MAX_DRAIN_BYTES: usize = 64 * 1024;

/// Validates each payload as an event envelope and logs it at `info`.
///
/// The payload must be a JSON object with a string `id` and a string `type`; otherwise
/// processing fails with [`ProcessError::Fatal`], since retrying cannot fix the bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogProcessor;

#[async_trait]
impl Processor for LogProcessor {
    async fn process(&self, delivery: &Delivery) -> Result<(), ProcessError> {
        let event_type = validate_envelope(delivery.payload.as_deref())?;
        tracing::info!(
            message_id = delivery.message_id(),
            trace_id = delivery.trace_id().unwrap_or(""),
            topic = %delivery.topic,
            partition = delivery.partition,
            offset = delivery.offset,
            event_type = %event_type,
            "Processed an event with the log processor."
        );
        Ok(())
    }
}

/// Checks that `payload` is a JSON object with string `id` and `type`; returns the type.
fn validate_envelope(payload: Option<&[u8]>) -> Result<String, ProcessError> {
    let bytes = payload.ok_or_else(|| ProcessError::fatal("payload is missing (null value)"))?;
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ProcessError::fatal(format!("payload is not valid JSON: {e}")))?;
    let Value::Object(object) = value else {
        return Err(ProcessError::fatal(format!(
            "payload is {}, not a JSON object",
            json_kind(&value)
        )));
    };
    let field = |name: &str| -> Result<String, ProcessError> {
        match object.get(name) {
            Some(Value::String(s)) => Ok(s.clone()),
            None => Err(ProcessError::fatal(format!(
                "payload has no string `{name}`"
            ))),
            Some(other) => Err(ProcessError::fatal(format!(
                "payload field `{name}` is {}, not a string",
                json_kind(other)
            ))),
        }
    };
    field("id")?;
    field("type")
}

/// A JSON value's kind with an article, for error messages.
fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// POSTs each payload to a fixed URL.
///
/// The request carries the payload bytes as the body (empty when the message value is null),
/// `content-type: application/json`, the `message-id` header, every `courier-*` header of
/// the delivery whose name and value are valid in HTTP (others are skipped), `traceparent`
/// and `tracestate` (the `process` span's with the `otel` feature, else the record's own),
/// `Idempotency-Key: <message-id>`, `User-Agent: courier/<version>` and the static
/// headers of `PROCESSOR_HTTP_HEADERS`. Redirects are not followed, so a 3xx answer is
/// fatal like any other non-retryable status.
#[derive(Clone)]
pub struct HttpProcessor {
    client: reqwest::Client,
    url: reqwest::Url,
    timeout: Duration,
    /// `User-Agent` and `PROCESSOR_HTTP_HEADERS`, values marked sensitive.
    fixed: HeaderMap,
}

impl std::fmt::Debug for HttpProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The static headers' values are secrets: names only.
        let names: Vec<&str> = self.fixed.keys().map(HeaderName::as_str).collect();
        f.debug_struct("HttpProcessor")
            .field("url", &self.url.origin().ascii_serialization())
            .field("timeout", &self.timeout)
            .field("headers", &names)
            .finish()
    }
}

/// What the http processor is configured with beside its URL and timeout.
#[derive(Debug, Clone, Default)]
pub struct HttpOptions {
    /// Static headers (`PROCESSOR_HTTP_HEADERS`).
    pub headers: Vec<HeaderSetting>,
    /// Extra CA certificates (`PROCESSOR_HTTP_CA_FILE`).
    pub ca_file: Option<String>,
}

impl HttpProcessor {
    /// A processor posting to `url`, giving each request `timeout` in total (connecting
    /// included), without static headers or extra CAs; see [`HttpProcessor::with_options`].
    ///
    /// # Errors
    /// As [`HttpProcessor::with_options`].
    pub fn new(url: &str, timeout: Duration) -> Result<Self, String> {
        HttpProcessor::with_options(url, timeout, &HttpOptions::default())
    }

    /// A processor posting to `url` with `options`. TLS uses rustls with the `ring` provider
    /// and trusts the system's root certificates (webpki's compiled-in roots when the system
    /// has none) plus the CA file; no process-wide crypto provider is needed.
    ///
    /// # Errors
    /// A description when `url` is not an absolute `http`/`https` URL, `timeout` is zero, a
    /// static header is invalid, the CA file cannot be read or holds no valid certificate,
    /// or the HTTP client cannot be built.
    pub fn with_options(
        url: &str,
        timeout: Duration,
        options: &HttpOptions,
    ) -> Result<Self, String> {
        let parsed =
            reqwest::Url::parse(url).map_err(|e| format!("invalid processor URL {url:?}: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(format!(
                "invalid processor URL {url:?}: the scheme must be http or https"
            ));
        }
        if timeout.is_zero() {
            return Err("the processor HTTP timeout must be greater than zero".to_owned());
        }
        let fixed = fixed_headers(&options.headers)?;
        let tls = client_tls(options.ca_file.as_deref().map(Path::new))?;
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(timeout)
            .connect_timeout(timeout.min(MAX_CONNECT_TIMEOUT))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {}", error_chain(&e)))?;
        Ok(HttpProcessor {
            client,
            url: parsed,
            timeout,
            fixed,
        })
    }

    /// Maps a failed send (no HTTP status) to a [`ProcessError`].
    fn send_error(&self, error: reqwest::Error) -> ProcessError {
        // The URL may carry credentials; reasons end up in DLQ headers, so leave it out.
        let error = error.without_url();
        let detail = error_chain(&error);
        let detail = truncate_utf8(&detail, MAX_REASON_ERROR_BYTES);
        if error.is_builder() {
            ProcessError::fatal(format!("cannot build the HTTP request: {detail}"))
        } else if error.is_timeout() {
            ProcessError::unreachable(format!(
                "HTTP request timed out after {:?}: {detail}",
                self.timeout
            ))
        } else if error.is_connect() {
            ProcessError::unreachable(format!("HTTP connection failed: {detail}"))
        } else {
            ProcessError::retryable(format!("HTTP request failed: {detail}"))
        }
    }
}

#[async_trait]
impl Processor for HttpProcessor {
    async fn process(&self, delivery: &Delivery) -> Result<(), ProcessError> {
        let body = delivery.payload.clone().unwrap_or_default();
        let response = self
            .client
            .post(self.url.clone())
            .headers(self.request_headers(delivery))
            .body(body)
            .send()
            .await
            .map_err(|e| self.send_error(e))?;
        classify(response).await
    }
}

/// A client TLS configuration: rustls with the `ring` provider, HTTP/2 and HTTP/1.1 by
/// ALPN, trusting the system's root certificates (rustls-native-certs: the platform's
/// store, `SSL_CERT_FILE`/`SSL_CERT_DIR` honoured) or, when the system has none, webpki's
/// compiled-in Mozilla roots; plus every certificate of `ca_file` (PEM).
///
/// # Errors
/// A one-line description naming `PROCESSOR_HTTP_CA_FILE` when the file cannot be read,
/// holds no PEM certificate, or holds one that is not a valid CA certificate.
pub fn client_tls(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (system, _) = roots.add_parsable_certificates(native.certs);
    if system == 0 {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        tracing::debug!(
            "No system root certificates were found; trusting webpki's compiled-in roots."
        );
    }
    if let Some(path) = ca_file {
        add_ca_file(&mut roots, path)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot configure TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Adds every certificate of the PEM file at `path` to `roots`.
fn add_ca_file(roots: &mut rustls::RootCertStore, path: &Path) -> Result<(), String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let shown = path.display();
    let pem = std::fs::read(path)
        .map_err(|e| format!("PROCESSOR_HTTP_CA_FILE={shown}: cannot read it: {e}"))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("PROCESSOR_HTTP_CA_FILE={shown}: not a valid PEM file: {e}"))?;
    if certs.is_empty() {
        return Err(format!(
            "PROCESSOR_HTTP_CA_FILE={shown}: expected PEM certificates (-----BEGIN CERTIFICATE-----), found none"
        ));
    }
    for cert in certs {
        roots.add(cert).map_err(|e| {
            format!(
                "PROCESSOR_HTTP_CA_FILE={shown}: a certificate is not a valid CA certificate: {e}"
            )
        })?;
    }
    Ok(())
}

/// `User-Agent` and the static headers, their values marked sensitive (never printed by
/// `Debug`).
fn fixed_headers(settings: &[HeaderSetting]) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    headers.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
    for h in settings {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| {
            format!(
                "PROCESSOR_HTTP_HEADERS: `{}` is not a valid header name",
                h.name
            )
        })?;
        let mut value = HeaderValue::from_str(h.value.expose()).map_err(|_| {
            format!(
                "PROCESSOR_HTTP_HEADERS: the value of `{}` is not a valid header value",
                h.name
            )
        })?;
        value.set_sensitive(true);
        headers.append(name, value);
    }
    Ok(headers)
}

impl HttpProcessor {
    /// The request headers: content type, `message-id` and the valid courier headers, the
    /// trace context, `Idempotency-Key`, `User-Agent` and the static headers.
    fn request_headers(&self, delivery: &Delivery) -> HeaderMap {
        let mut headers = self.fixed.clone();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(id) = delivery.message_id() {
            // Text already; the `ce_id` of a binary CloudEvent stands in for a missing
            // message-id, as for dedupe.
            if let Ok(value) = HeaderValue::from_str(id) {
                headers.insert(HeaderName::from_static(IDEMPOTENCY_KEY), value);
            }
        }
        let trace =
            crate::otel::current().or_else(|| TraceContext::from_headers(&delivery.headers));
        if let Some(trace) = trace {
            for (name, value) in [
                (HEADER_TRACEPARENT, Some(trace.parent.to_header())),
                (HEADER_TRACESTATE, trace.state),
            ] {
                if let Some(Ok(value)) = value.map(HeaderValue::try_from) {
                    headers.insert(HeaderName::from_static(name), value);
                }
            }
        }
        add_delivery_headers(&mut headers, delivery);
        headers
    }
}

/// `message-id` and the valid courier headers of `delivery`.
fn add_delivery_headers(headers: &mut HeaderMap, delivery: &Delivery) {
    if let Some(raw) = delivery.header(HEADER_MESSAGE_ID) {
        match HeaderValue::from_bytes(raw) {
            Ok(value) => {
                headers.insert(HeaderName::from_static(HEADER_MESSAGE_ID), value);
            }
            Err(_) => tracing::debug!(
                header = HEADER_MESSAGE_ID,
                "Did not forward a header whose value is not a valid HTTP header value."
            ),
        }
    }
    let courier = delivery
        .headers
        .iter()
        .filter(|(name, _)| name.starts_with(COURIER_HEADER_PREFIX));
    for (name, value) in courier {
        // A null Kafka header has no value to send.
        let Some(value) = value.as_deref() else {
            continue;
        };
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            (Ok(name), Ok(value)) => {
                headers.append(name, value);
            }
            _ => tracing::debug!(
                header = %name,
                "Did not forward a header whose name or value is not valid in HTTP."
            ),
        }
    }
}

/// Maps an HTTP response to the processing outcome.
async fn classify(response: reqwest::Response) -> Result<(), ProcessError> {
    let status = response.status();
    if status.is_success() {
        // Reading (a bounded part of) the body lets the connection be reused.
        read_prefix(response, MAX_DRAIN_BYTES).await;
        return Ok(());
    }
    let retry_after =
        if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| parse_retry_after(v, SystemTime::now()))
        } else {
            None
        };
    let snippet = body_snippet(response).await;
    let reason = if snippet.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {snippet}")
    };
    if is_retryable_status(status) {
        Err(ProcessError::Retryable {
            reason,
            retry_after,
            unreachable: false,
        })
    } else {
        Err(ProcessError::Fatal(reason))
    }
}

/// 408, 429 and every 5xx may succeed later.
fn is_retryable_status(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
}

/// Reads the body until at least `limit` bytes arrived, it ends, or it fails.
async fn read_prefix(mut response: reqwest::Response, limit: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => out.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    out
}

/// The start of the response body as one short line of text, for an error reason.
async fn body_snippet(response: reqwest::Response) -> String {
    // A few spare bytes so a multi-byte character at the cut is not lost.
    let raw = read_prefix(response, MAX_REASON_BODY_BYTES + 4).await;
    let text: String = String::from_utf8_lossy(&raw)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let text = text.trim();
    let cut = truncate_utf8(text, MAX_REASON_BODY_BYTES);
    if cut.len() < text.len() || raw.len() > MAX_REASON_BODY_BYTES {
        format!("{}...", cut.trim_end())
    } else {
        cut.to_owned()
    }
}

/// Parses a `Retry-After` value: delta-seconds or an HTTP-date in any of the three formats
/// of RFC 9110, 5.6.7 (IMF-fixdate, obsolete RFC 850 and asctime, by `httpdate`), relative
/// to `now`. A date in the past gives zero; the result is capped at [`MAX_RETRY_AFTER`]; a
/// malformed value gives `None`.
fn parse_retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if text.is_empty() {
        return None;
    }
    let delay = if text.bytes().all(|b| b.is_ascii_digit()) {
        // Only digits: a number too large for u64 is still a valid, very long delay.
        Duration::from_secs(text.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        let at = httpdate::parse_http_date(text).ok()?;
        // A date in the past means "no need to wait".
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

/// An error and its sources, joined by `: `, skipping a source already quoted by its parent.
fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Builds the processor selected by `config.kind`.
///
/// # Errors
/// A description when the `http` processor has no URL or cannot be built.
pub fn build_processor(config: &ProcessorConfig) -> Result<Arc<dyn Processor>, String> {
    match config.kind {
        ProcessorKind::Log => Ok(crate::otel::instrument(Arc::new(LogProcessor))),
        ProcessorKind::Http => {
            let url = config
                .http_url
                .as_deref()
                .ok_or("the http processor needs PROCESSOR_HTTP_URL")?;
            let options = HttpOptions {
                headers: config.http_headers.clone(),
                ca_file: config.http_ca_file.clone(),
            };
            let http = HttpProcessor::with_options(url, config.http_timeout, &options)?;
            Ok(crate::otel::instrument(Arc::new(http)))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::io::Write;
    use std::sync::Mutex;

    use axum::body::Bytes;
    use axum::extract::State;
    use axum::response::{IntoResponse, Response};
    use axum::Router;

    use super::*;

    fn delivery(payload: Option<&[u8]>, headers: &[(&str, Option<&[u8]>)]) -> Delivery {
        Delivery {
            topic: "events".to_owned(),
            partition: 3,
            offset: 42,
            key: Some(b"k".to_vec()),
            payload: payload.map(<[u8]>::to_vec),
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).into(), v.map(<[u8]>::to_vec)))
                .collect(),
            timestamp_ms: Some(1_700_000_000_000),
        }
    }

    fn event(payload: &[u8]) -> Delivery {
        delivery(Some(payload), &[("message-id", Some(b"m-1"))])
    }

    /// A `Write` into a shared buffer, for capturing log output.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn log_accepts_a_valid_event_and_logs_its_fields() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(move || writer.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let d = event(br#"{"id":"e-1","type":"order.created","data":{"n":1}}"#);
        LogProcessor.process(&d).await.unwrap();
        let out = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        for want in [
            r#""message_id":"m-1""#,
            r#""topic":"events""#,
            r#""partition":3"#,
            r#""offset":42"#,
            r#""event_type":"order.created""#,
            "Processed an event with the log processor.",
        ] {
            assert!(out.contains(want), "log lacks {want}: {out}");
        }
    }

    #[tokio::test]
    async fn log_accepts_an_event_without_message_id() {
        let d = delivery(Some(br#"{"id":"e","type":"t"}"#), &[]);
        assert_eq!(LogProcessor.process(&d).await, Ok(()));
    }

    #[tokio::test]
    async fn log_rejects_invalid_payloads_as_fatal() {
        let cases: &[(Option<&[u8]>, &str)] = &[
            (Some(b"not json"), "payload is not valid JSON"),
            (Some(b"{\"id\":"), "payload is not valid JSON"),
            (Some(b"[1,2]"), "payload is an array, not a JSON object"),
            (Some(b"\"text\""), "payload is a string, not a JSON object"),
            (Some(br#"{"id":"e"}"#), "payload has no string `type`"),
            (Some(br#"{"type":"t"}"#), "payload has no string `id`"),
            (
                Some(br#"{"id":7,"type":"t"}"#),
                "payload field `id` is a number",
            ),
            (
                Some(br#"{"id":"e","type":null}"#),
                "payload field `type` is null",
            ),
            (None, "payload is missing"),
        ];
        for (payload, want) in cases {
            let err = LogProcessor
                .process(&delivery(*payload, &[]))
                .await
                .unwrap_err();
            match err {
                ProcessError::Fatal(reason) => {
                    assert!(reason.starts_with(want), "{payload:?}: {reason}");
                }
                other => panic!("{payload:?}: expected fatal, got {other:?}"),
            }
        }
    }

    /// One scripted answer of the test server.
    #[derive(Clone)]
    struct Reply {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
        delay: Duration,
    }

    impl Reply {
        fn status(status: u16) -> Self {
            Reply {
                status,
                headers: Vec::new(),
                body: String::new(),
                delay: Duration::ZERO,
            }
        }

        fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
            self.headers.push((name, value.into()));
            self
        }
    }

    /// The test server's script (answers, in order; 200 when empty) and what it received.
    #[derive(Default)]
    struct Script {
        replies: Mutex<VecDeque<Reply>>,
        seen: Mutex<Vec<(axum::http::HeaderMap, Vec<u8>)>>,
    }

    async fn answer(
        State(script): State<Arc<Script>>,
        headers: axum::http::HeaderMap,
        body: Bytes,
    ) -> Response {
        script.seen.lock().unwrap().push((headers, body.to_vec()));
        let reply = script.replies.lock().unwrap().pop_front();
        let reply = reply.unwrap_or_else(|| Reply::status(200));
        tokio::time::sleep(reply.delay).await;
        let status = axum::http::StatusCode::from_u16(reply.status).unwrap();
        let mut response = (status, reply.body).into_response();
        for (name, value) in reply.headers {
            let value = axum::http::HeaderValue::from_str(&value).unwrap();
            response.headers_mut().insert(name, value);
        }
        response
    }

    /// Starts a server on 127.0.0.1:0 answering with `replies`; returns its URL.
    async fn serve(replies: Vec<Reply>) -> (String, Arc<Script>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let script = Arc::new(Script {
            replies: Mutex::new(replies.into()),
            seen: Mutex::default(),
        });
        let app = Router::new().fallback(answer).with_state(script.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}/events"), script)
    }

    /// Posts one event to a server answering `reply`.
    async fn post_once(reply: Reply) -> Result<(), ProcessError> {
        let (url, _script) = serve(vec![reply]).await;
        let processor = HttpProcessor::new(&url, Duration::from_secs(5)).unwrap();
        processor.process(&event(br#"{"id":"e","type":"t"}"#)).await
    }

    #[tokio::test]
    async fn http_2xx_is_ok() {
        assert_eq!(post_once(Reply::status(200)).await, Ok(()));
        assert_eq!(post_once(Reply::status(204)).await, Ok(()));
    }

    #[tokio::test]
    async fn http_request_carries_headers_and_exact_payload() {
        let (url, script) = serve(vec![]).await;
        let processor = HttpProcessor::new(&url, Duration::from_secs(5)).unwrap();
        let payload = "{\"id\":\"e-1\",\"type\":\"t\",\"data\":\"h\u{e9}llo \u{1f600}\"}";
        let d = delivery(
            Some(payload.as_bytes()),
            &[
                ("message-id", Some(b"m-42")),
                ("courier-attempt", Some(b"2")),
                ("courier-original-topic", Some(b"events")),
                ("courier-error-message", Some(b"bad\nvalue")),
                ("courier-null", None),
                ("user-header", Some(b"private")),
            ],
        );
        processor.process(&d).await.unwrap();
        let seen = script.seen.lock().unwrap();
        let (headers, body) = &seen[0];
        assert_eq!(body, payload.as_bytes());
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(headers["message-id"], "m-42");
        assert_eq!(headers["courier-attempt"], "2");
        assert_eq!(headers["courier-original-topic"], "events");
        assert!(
            !headers.contains_key("courier-error-message"),
            "invalid value skipped"
        );
        assert!(!headers.contains_key("courier-null"));
        assert!(
            !headers.contains_key("user-header"),
            "user headers are not forwarded"
        );
    }

    #[tokio::test]
    async fn http_null_payload_sends_an_empty_body() {
        let (url, script) = serve(vec![]).await;
        let processor = HttpProcessor::new(&url, Duration::from_secs(5)).unwrap();
        processor.process(&delivery(None, &[])).await.unwrap();
        let seen = script.seen.lock().unwrap();
        assert!(seen[0].1.is_empty());
        assert!(!seen[0].0.contains_key("message-id"));
    }

    #[tokio::test]
    async fn http_retryable_statuses() {
        for status in [500, 502, 503, 408, 429] {
            match post_once(Reply::status(status)).await {
                Err(ProcessError::Retryable {
                    reason,
                    retry_after,
                    unreachable: false,
                }) => {
                    assert!(reason.contains(&status.to_string()), "{status}: {reason}");
                    assert_eq!(retry_after, None, "{status}");
                }
                other => panic!("{status}: expected retryable, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn http_fatal_statuses() {
        let replies = [
            Reply::status(400),
            Reply::status(404),
            Reply::status(422),
            Reply::status(302).header("location", "http://127.0.0.1:1/elsewhere"),
        ];
        for reply in replies {
            let status = reply.status;
            match post_once(reply).await {
                Err(ProcessError::Fatal(reason)) => {
                    assert!(reason.starts_with(&format!("HTTP {status}")), "{reason}");
                }
                other => panic!("{status}: expected fatal, got {other:?}"),
            }
        }
    }

    /// The `retry_after` of a retryable answer with `status` and a `Retry-After: value`.
    async fn retry_after_of(status: u16, value: String) -> Option<Duration> {
        match post_once(Reply::status(status).header("retry-after", value)).await {
            Err(ProcessError::Retryable { retry_after, .. }) => retry_after,
            other => panic!("{status}: expected a retryable failure, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn http_retry_after_seconds_on_429() {
        assert_eq!(
            retry_after_of(429, "7".into()).await,
            Some(Duration::from_secs(7))
        );
    }

    #[tokio::test]
    async fn http_retry_after_date_on_503() {
        let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        let d = retry_after_of(503, date)
            .await
            .expect("a retry_after from the date");
        assert!(
            d > Duration::from_secs(110) && d <= Duration::from_secs(120),
            "{d:?}"
        );
    }

    #[tokio::test]
    async fn http_retry_after_only_on_429_and_503() {
        assert_eq!(retry_after_of(500, "7".into()).await, None);
        assert_eq!(retry_after_of(429, "soon".into()).await, None);
    }

    #[test]
    fn retry_after_parsing() {
        // Sun, 06 Nov 1994 08:49:37 GMT, the example of RFC 9110, 5.6.7.
        let example = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        let now = example - Duration::from_secs(90);
        let parse = |s: &str| parse_retry_after(&HeaderValue::from_str(s).unwrap(), now);
        assert_eq!(parse("0"), Some(Duration::ZERO));
        assert_eq!(parse(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(parse("86400"), Some(MAX_RETRY_AFTER), "capped");
        assert_eq!(parse("99999999999999999999999"), Some(MAX_RETRY_AFTER));
        // The three HTTP-date formats of RFC 9110: IMF-fixdate, RFC 850, asctime.
        for date in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ] {
            assert_eq!(parse(date), Some(Duration::from_secs(90)), "{date}");
        }
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse(&earlier), Some(Duration::ZERO));
        let far = httpdate::fmt_http_date(now + Duration::from_secs(3 * 86_400));
        assert_eq!(parse(&far), Some(MAX_RETRY_AFTER));
        for bad in [
            "",
            "-5",
            "1.5",
            "soon",
            "7s",
            "Sun, 99 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 08:49:37 +0000",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn http_request_carries_trace_context_idempotency_key_agent_and_static_headers() {
        let (url, script) = serve(vec![]).await;
        let options = HttpOptions {
            headers: vec![
                HeaderSetting::parse("Authorization=Bearer s3cret"),
                HeaderSetting::parse("X-Team=payments"),
            ],
            ca_file: None,
        };
        let processor =
            HttpProcessor::with_options(&url, Duration::from_secs(5), &options).unwrap();
        let debug = format!("{processor:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let d = delivery(
            Some(b"{}"),
            &[
                ("message-id", Some(b"m-9")),
                ("traceparent", Some(parent.as_bytes())),
                ("tracestate", Some(b"congo=t61rcWkgMzE")),
            ],
        );
        processor.process(&d).await.unwrap();
        // A binary CloudEvent's id stands in for a missing message-id; a malformed
        // traceparent is not forwarded.
        let ce = delivery(
            Some(b"{}"),
            &[("ce_id", Some(b"ce-1")), ("traceparent", Some(b"00-x"))],
        );
        processor.process(&ce).await.unwrap();
        let seen = script.seen.lock().unwrap();
        let (headers, _) = &seen[0];
        assert_eq!(headers["idempotency-key"], "m-9");
        assert_eq!(
            headers["user-agent"],
            concat!("courier/", env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(headers["authorization"], "Bearer s3cret");
        assert_eq!(headers["x-team"], "payments");
        assert_eq!(headers["traceparent"], parent);
        assert_eq!(headers["tracestate"], "congo=t61rcWkgMzE");
        let (headers, _) = &seen[1];
        assert_eq!(headers["idempotency-key"], "ce-1");
        assert!(!headers.contains_key("traceparent"));
    }

    #[test]
    fn an_unreadable_or_invalid_ca_file_is_a_clear_start_up_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let not_pem = dir.path().join("notes.txt");
        std::fs::write(&not_pem, "just text").unwrap();
        let bad_der = dir.path().join("bad.pem");
        std::fs::write(
            &bad_der,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        for (path, want) in [
            (&missing, "cannot read it"),
            (&not_pem, "found none"),
            (&bad_der, "not a valid CA certificate"),
        ] {
            let options = HttpOptions {
                headers: Vec::new(),
                ca_file: Some(path.display().to_string()),
            };
            let err = HttpProcessor::with_options(
                "https://127.0.0.1:1/x",
                Duration::from_secs(1),
                &options,
            )
            .unwrap_err();
            assert!(err.starts_with("PROCESSOR_HTTP_CA_FILE="), "{err}");
            assert!(err.contains(want), "{path:?}: {err}");
        }
    }

    #[tokio::test]
    async fn http_reason_is_short_and_quotes_the_body() {
        let mut reply = Reply::status(500);
        reply.body = format!("boom\n{}", "x".repeat(10_000));
        let err = post_once(reply).await.unwrap_err();
        let reason = err.reason();
        assert!(
            reason.starts_with("HTTP 500 Internal Server Error: boom x"),
            "{reason}"
        );
        assert!(reason.len() <= 250, "{} bytes", reason.len());
        assert!(!reason.contains('\n'));
    }

    #[tokio::test]
    async fn http_timeout_is_retryable() {
        let mut reply = Reply::status(200);
        reply.delay = Duration::from_secs(5);
        let (url, _script) = serve(vec![reply]).await;
        let processor = HttpProcessor::new(&url, Duration::from_millis(200)).unwrap();
        let started = std::time::Instant::now();
        let err = processor.process(&event(b"{}")).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(3));
        match err {
            ProcessError::Retryable { reason, .. } => {
                assert!(reason.contains("timed out"), "{reason}");
                assert!(!reason.contains("127.0.0.1"), "no URL in reasons: {reason}");
            }
            other => panic!("expected retryable, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn http_connection_refused_is_retryable() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let url = format!("http://127.0.0.1:{port}/events");
        let processor = HttpProcessor::new(&url, Duration::from_secs(2)).unwrap();
        match processor.process(&event(b"{}")).await.unwrap_err() {
            ProcessError::Retryable { reason, .. } => {
                assert!(reason.contains("connection failed"), "{reason}");
            }
            other => panic!("expected retryable, got {other:?}"),
        }
    }

    #[test]
    fn new_validates_its_arguments() {
        let second = Duration::from_secs(1);
        assert!(HttpProcessor::new("not a url", second).is_err());
        assert!(HttpProcessor::new("ftp://example.com/x", second).is_err());
        assert!(HttpProcessor::new("http://example.com/x", Duration::ZERO).is_err());
        // TLS is configured with an explicit provider, not the process default.
        assert!(HttpProcessor::new("https://example.com/x", second).is_ok());
    }

    #[test]
    fn build_processor_by_kind() {
        let mut config = ProcessorConfig {
            kind: ProcessorKind::Log,
            http_url: None,
            http_timeout: Duration::from_secs(1),
            ..ProcessorConfig::default()
        };
        assert!(build_processor(&config).is_ok());
        config.kind = ProcessorKind::Http;
        let err = build_processor(&config).err().unwrap();
        assert!(err.contains("PROCESSOR_HTTP_URL"), "{err}");
        config.http_url = Some("http://127.0.0.1:1/x".to_owned());
        assert!(build_processor(&config).is_ok());
    }
}
