//! A plain HTTP/1.1 client over loopback for the ingest API and the ops endpoints, and the
//! Prometheus text those serve. One request a connection (`Connection: close`); the body is
//! written while the answer is read, so an answer the server gives before it read the whole
//! body (413 for a body over the limit) still arrives.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request: (status, body). Status 0 when the server closed without an answer.
///
/// # Errors
/// When nothing listens at the URL's address.
pub async fn try_http_request(
    method: &str,
    url: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    let rest = url
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("an http:// URL: {url}"));
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let mut stream = tokio::net::TcpStream::connect(host).await?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(ct) = content_type {
        head.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    head.push_str("\r\n");
    let (mut rd, mut wr) = stream.split();
    // A write the server cut short (it answered early and closed) is not an error: its
    // answer is what counts.
    let write = async {
        let _ = wr.write_all(head.as_bytes()).await;
        let _ = wr.write_all(body).await;
    };
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 8192];
        loop {
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    futures::join!(write, read);
    Ok(parse_response(&String::from_utf8_lossy(&buf)))
}

/// The status of a raw HTTP/1.1 answer (`HTTP/1.1 200 OK`...); 0 when there is none.
pub fn response_status(text: &str) -> u16 {
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The bytes of a JSON `POST path` to `host` (`Connection: close`) with one
/// `Authorization` header per item of `auth`, sent as given (raw bytes, so a test can send
/// malformed ones), then `body`.
pub fn post_request(
    host: impl std::fmt::Display,
    path: &str,
    auth: &[Vec<u8>],
    body: &[u8],
) -> Vec<u8> {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    )
    .into_bytes();
    for a in auth {
        req.extend_from_slice(b"Authorization: ");
        req.extend_from_slice(a);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(body);
    req
}

/// A JSON `POST` of `body` to `url` with extra `headers` (`traceparent`, ...) through
/// reqwest, with the TLS setup of courier's http processor; fails the test when no answer
/// comes.
pub async fn reqwest_post_json(
    url: &str,
    headers: &[(&str, &str)],
    body: &'static str,
) -> reqwest::Response {
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(crate::service::builtin::client_tls(None).unwrap())
        .build()
        .unwrap();
    let mut request = client.post(url).header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(body).send().await.unwrap()
}

/// (status, body) of a raw answer; a chunked body is joined.
fn parse_response(text: &str) -> (u16, String) {
    let status = response_status(text);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// [`try_http_request`]; fails the test when nothing listens at the URL.
pub async fn http_request(
    method: &str,
    url: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> (u16, String) {
    try_http_request(method, url, content_type, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: cannot connect: {e}"))
}

/// GET: (status, body); fails the test when nothing listens at the URL.
pub async fn http_get(url: &str) -> (u16, String) {
    http_request("GET", url, None, b"").await
}

/// GET, or None when nothing listens there or no answer came within `timeout`.
pub async fn try_http_get(url: &str, timeout: Duration) -> Option<(u16, String)> {
    tokio::time::timeout(timeout, try_http_request("GET", url, None, b""))
        .await
        .ok()?
        .ok()
}

/// The status of a GET of `url`; 0 when nothing listens there or no answer came within 2 s.
pub async fn probe(url: &str) -> u16 {
    try_http_get(url, Duration::from_secs(2))
        .await
        .map_or(0, |r| r.0)
}

/// Polls `url` until it answers 200; fails the test after `timeout` with the last status.
pub async fn wait_ready(url: &str, timeout: Duration) {
    wait_status(url, 200, timeout).await
}

/// Polls `url` until it answers `status` (e.g. `/readyz` 503 during an outage); fails the
/// test after `timeout` with the last status.
pub async fn wait_status(url: &str, status: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let last = probe(url).await;
        if last == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{url} not {status} within {timeout:?} (last: {last}, 0 = no answer)"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A free loopback port (bound and released) for a child process.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("local address")
        .port()
}

/// The sum of the series of metric `name` (Prometheus text) whose labels contain every one
/// of `labels`, e.g. `outcome="duplicate"`.
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The value of the unlabelled series `name` (a gauge such as `courier_in_flight`).
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    super::line_value(text, name, ' ')
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = "# HELP courier_in_flight x\n# TYPE courier_in_flight gauge\n\
        courier_in_flight 7\ncourier_in_flight_max 9\n\
        courier_messages_processed_total{outcome=\"ok\",topic=\"a\"} 3\n\
        courier_messages_processed_total{outcome=\"ok\",topic=\"b\"} 4\n\
        courier_messages_processed_total{outcome=\"duplicate\",topic=\"a\"} 1\n";

    #[test]
    fn metrics_text_by_name_and_labels() {
        assert_eq!(metric_value(METRICS, "courier_in_flight"), Some(7.0));
        assert_eq!(metric_value(METRICS, "courier_lag"), None);
        let processed = "courier_messages_processed_total";
        assert_eq!(metric_sum(METRICS, processed, &[]), 8.0);
        assert_eq!(metric_sum(METRICS, processed, &["outcome=\"ok\""]), 7.0);
        assert_eq!(
            metric_sum(METRICS, processed, &["outcome=\"ok\"", "topic=\"b\""]),
            4.0
        );
        assert_eq!(metric_sum(METRICS, "courier_in_flight", &[]), 7.0);
    }

    #[test]
    fn answers_plain_and_chunked() {
        let plain = "HTTP/1.1 413 Payload Too Large\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(plain), (413, "{}".into()));
        let chunked =
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked), (200, "abcde".into()));
        assert_eq!(parse_response(""), (0, String::new()));
    }

    #[test]
    fn a_post_carries_each_authorization_header_as_given() {
        let req = post_request(
            "h:1",
            "/v1/events",
            &[b"Bearer a".to_vec(), b"x".to_vec()],
            b"{}",
        );
        assert_eq!(
            String::from_utf8(req).unwrap(),
            "POST /v1/events HTTP/1.1\r\nHost: h:1\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: 2\r\n\
             Authorization: Bearer a\r\nAuthorization: x\r\n\r\n{}"
        );
        assert_eq!(response_status("HTTP/1.1 401 Unauthorized\r\n"), 401);
    }

    #[tokio::test]
    async fn nothing_listening_is_no_answer() {
        let url = format!("http://127.0.0.1:{}/readyz", free_port());
        assert_eq!(probe(&url).await, 0);
        assert!(try_http_request("GET", &url, None, b"").await.is_err());
    }
}
