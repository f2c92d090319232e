//! Reliability against bad input.
//!
//! - The ingest API under a seeded fuzz of malformed requests: always a 4xx with a JSON
//!   error, never a 5xx, never a crash, and nothing (not even half a batch) published.
//! - The consumer fed garbage straight on its source and retry topics (random bytes,
//!   non-JSON payloads, bogus courier headers, huge values): every message ends processed
//!   or in the DLQ, and every partition's committed offset reaches its end.
//! - Property tests of the parsers: `Envelope::from_value`, `CourierHeaders::parse` and
//!   `parse_duration`.
//!
//! `COURIER_FUZZ_SEED` replays a run of the seeded generators (the seed is printed).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use courier::config::parse_duration;
use courier::model::{CourierHeaders, Delivery, Envelope, HeaderKey, Headers, OutgoingRecord};
use courier::service::builtin::LogProcessor;
use courier::service::{ProcessError, Processor};
use courier::testing::{
    eventually, header, http_get, http_request, metric_sum, post_request, response_status,
    start_consumer, start_producer, wait_ready, TestKafka,
};
use parking_lot::Mutex;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

fn seed() -> u64 {
    std::env::var("COURIER_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

// ---------------------------------------------------------------------------------------
// The ingest API
// ---------------------------------------------------------------------------------------

/// One malformed request and the status it must get (`None`: any 4xx).
struct Case {
    what: String,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    want: Option<u16>,
}

fn case(what: impl Into<String>, body: impl Into<Vec<u8>>, want: Option<u16>) -> Case {
    Case {
        what: what.into(),
        content_type: Some("application/json"),
        body: body.into(),
        want,
    }
}

fn valid_event(rng: &mut StdRng) -> Value {
    let mut e = json!({"type": format!("t{}", rng.random_range(0..100))});
    if rng.random_bool(0.5) {
        e["id"] = json!(format!("id-{}", rng.random::<u32>()));
    }
    if rng.random_bool(0.5) {
        e["key"] = json!(format!("k{}", rng.random::<u8>()));
    }
    if rng.random_bool(0.3) {
        e["time"] = json!("2024-05-06T07:08:09Z");
    }
    if rng.random_bool(0.5) {
        e["data"] = json!({"n": rng.random::<i32>(), "s": "x".repeat(rng.random_range(0..50))});
    }
    e
}

/// A value of a JSON type other than string.
fn non_string(rng: &mut StdRng) -> Value {
    match rng.random_range(0..5) {
        0 => json!(rng.random::<i32>()),
        1 => json!(rng.random_bool(0.5)),
        2 => json!([1, "a"]),
        3 => json!({"x": 1}),
        _ => json!(1.5),
    }
}

fn nested(depth: usize, open: &str, close: &str) -> String {
    format!(
        r#"{{"type":"t","data":{}{}}}"#,
        open.repeat(depth),
        close.repeat(depth)
    )
}

/// The fixed corpus plus `random` seeded cases. The body limit is 1 MiB and a batch holds
/// at most 1000 events (the defaults).
fn ingest_cases(rng: &mut StdRng, random: usize) -> Vec<Case> {
    let mut cases = vec![
        case("empty body", "", Some(400)),
        case("only whitespace", "  \n ", Some(400)),
        case("open brace", "{", Some(400)),
        case("open bracket", "[", Some(400)),
        case("truncated field", r#"{"type":"#, Some(400)),
        case("truncated string", r#"{"type":"ord"#, Some(400)),
        case("trailing garbage", r#"{"type":"t"} x"#, Some(400)),
        case("two objects", r#"{"type":"t"}{"type":"u"}"#, Some(400)),
        case("null", "null", Some(400)),
        case("true", "true", Some(400)),
        case("number", "12", Some(400)),
        case("string", r#""event""#, Some(400)),
        case("empty object", "{}", Some(400)),
        case("nested empty array", "[[]]", Some(400)),
        case("array of number", "[1]", Some(400)),
        case("array of null", "[null]", Some(400)),
        case("empty array", "[]", Some(400)),
        case("empty array, spaced", "[ \n ]", Some(400)),
        case("invalid UTF-8 alone", b"\xff\xfe".to_vec(), Some(400)),
        case(
            "invalid UTF-8 in type",
            b"{\"type\":\"\xff\"}".to_vec(),
            Some(400),
        ),
        case(
            "invalid UTF-8 in data",
            b"{\"type\":\"t\",\"data\":\"a\xc3\"}".to_vec(),
            Some(400),
        ),
        case(
            "lone surrogate escape",
            r#"{"type":"\ud800"}"#.as_bytes().to_vec(),
            Some(400),
        ),
        case(
            "BOM then JSON",
            b"\xef\xbb\xbf{\"type\":\"t\"}".to_vec(),
            None,
        ),
        case("NUL byte", b"{\"type\":\"t\"}\x00".to_vec(), Some(400)),
        case("nesting 129 arrays", nested(129, "[", "]"), Some(400)),
        case(
            "nesting 100000 arrays",
            nested(100_000, "[", "]"),
            Some(400),
        ),
        case(
            "nesting 10000 objects",
            nested(10_000, r#"{"a":"#, "}"),
            Some(400),
        ),
        case(
            "type of 300 bytes",
            json!({"type": "t".repeat(300)}).to_string(),
            Some(400),
        ),
        case(
            "id of 300 bytes",
            json!({"type": "t", "id": "i".repeat(300)}).to_string(),
            Some(400),
        ),
        case(
            "key of 300 bytes",
            json!({"type": "t", "key": "k".repeat(300)}).to_string(),
            Some(400),
        ),
        case(
            "type of 900 KB",
            json!({"type": "t".repeat(900_000)}).to_string(),
            Some(400),
        ),
        case(
            "body of 2 MB",
            json!({"type": "t", "data": "d".repeat(2_000_000)}).to_string(),
            Some(413),
        ),
        case("empty type", r#"{"type":""}"#, Some(400)),
        case("empty id", r#"{"type":"t","id":""}"#, Some(400)),
        case("null type", r#"{"type":null}"#, Some(400)),
        case("type number", r#"{"type":1}"#, Some(400)),
        case("type array", r#"{"type":["t"]}"#, Some(400)),
        case("type object", r#"{"type":{"t":1}}"#, Some(400)),
        case("type bool", r#"{"type":true}"#, Some(400)),
        case("id number", r#"{"type":"t","id":7}"#, Some(400)),
        case("id object", r#"{"type":"t","id":{}}"#, Some(400)),
        case("key number", r#"{"type":"t","key":7}"#, Some(400)),
        case("source number", r#"{"type":"t","source":7}"#, Some(400)),
        case(
            "time not a date",
            r#"{"type":"t","time":"yesterday"}"#,
            Some(400),
        ),
        case(
            "time a number",
            r#"{"type":"t","time":1700000000}"#,
            Some(400),
        ),
        case(
            "time month 13",
            r#"{"type":"t","time":"2024-13-01T00:00:00Z"}"#,
            Some(400),
        ),
        case(
            "timestamp not a date",
            r#"{"type":"t","timestamp":"now"}"#,
            Some(400),
        ),
        case(
            "partition negative",
            r#"{"type":"t","partition":-1}"#,
            Some(400),
        ),
        case(
            "partition fraction",
            r#"{"type":"t","partition":0.5}"#,
            Some(400),
        ),
        case(
            "partition string",
            r#"{"type":"t","partition":"0"}"#,
            Some(400),
        ),
        case(
            "partition beyond i32",
            r#"{"type":"t","partition":4294967296}"#,
            Some(400),
        ),
        case(
            "partition 7 of a 1-partition topic",
            r#"{"type":"t","partition":7}"#,
            None,
        ),
        case(
            "one bad event in a batch",
            r#"[{"type":"a"},{"type":"b"},{"type":7},{"type":"c"}]"#,
            Some(400),
        ),
        case(
            "10,000 valid events",
            serde_json::to_string(&vec![json!({"type": "t"}); 10_000]).unwrap(),
            Some(413),
        ),
        case(
            "10,000 invalid events",
            serde_json::to_string(&vec![json!({"id": 1}); 10_000]).unwrap(),
            Some(413),
        ),
        case(
            "1,000 events, the last bad",
            serde_json::to_string(
                &(0..1000)
                    .map(|i| {
                        if i == 999 {
                            json!({"type": null})
                        } else {
                            json!({"type": "t"})
                        }
                    })
                    .collect::<Vec<_>>(),
            )
            .unwrap(),
            Some(400),
        ),
    ];
    // A valid body with a content type that is not JSON.
    for ct in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("application/xml"),
        Some("application/jsonx"),
        Some("json"),
        Some(""),
        Some("application/octet-stream"),
    ] {
        cases.push(Case {
            what: format!("content type {ct:?}"),
            content_type: ct,
            body: br#"{"type":"t"}"#.to_vec(),
            want: Some(415),
        });
    }
    for i in 0..random {
        let kind = rng.random_range(0..6);
        let c = match kind {
            0 => {
                // Random bytes; a leading '\x01' keeps them from being JSON by chance.
                let n = rng.random_range(0..2000);
                let mut b = vec![1u8];
                b.extend((0..n).map(|_| rng.random::<u8>()));
                case(format!("random bytes #{i}"), b, Some(400))
            }
            1 => {
                // A valid event or batch cut short.
                let v = if rng.random_bool(0.5) {
                    valid_event(rng)
                } else {
                    Value::Array(
                        (0..rng.random_range(1..20))
                            .map(|_| valid_event(rng))
                            .collect(),
                    )
                };
                let full = v.to_string();
                let cut = rng.random_range(0..full.len());
                case(
                    format!("truncated #{i}"),
                    &full.as_bytes()[..cut],
                    Some(400),
                )
            }
            2 => {
                // A byte that cannot occur in UTF-8 inserted anywhere.
                let full = valid_event(rng).to_string().into_bytes();
                let at = rng.random_range(0..=full.len());
                let bad = [0x80u8, 0xbf, 0xc0, 0xc1, 0xf5, 0xff][rng.random_range(0..6)];
                let mut b = full[..at].to_vec();
                b.push(bad);
                b.extend_from_slice(&full[at..]);
                case(format!("invalid UTF-8 #{i}"), b, Some(400))
            }
            3 => {
                // A field of the wrong JSON type.
                let mut e = valid_event(rng);
                let field = [
                    "type",
                    "id",
                    "key",
                    "source",
                    "time",
                    "timestamp",
                    "partition",
                ][rng.random_range(0..7)];
                let bad = match field {
                    "partition" => [json!(-3), json!("1"), json!(2.5), json!([0])]
                        [rng.random_range(0..4)]
                    .clone(),
                    "time" | "timestamp" => {
                        if rng.random_bool(0.5) {
                            json!("not a time")
                        } else {
                            non_string(rng)
                        }
                    }
                    _ => non_string(rng),
                };
                e[field] = bad;
                case(
                    format!("wrong type of {field} #{i}"),
                    e.to_string(),
                    Some(400),
                )
            }
            4 => {
                // Deep nesting beyond any sane limit.
                let depth = rng.random_range(129..50_000);
                let (o, c) = if rng.random_bool(0.5) {
                    ("[", "]")
                } else {
                    (r#"{"a":"#, "}")
                };
                case(
                    format!("nesting {depth} #{i}"),
                    nested(depth, o, c),
                    Some(400),
                )
            }
            _ => {
                // A batch of valid events with one bad one somewhere.
                let n = rng.random_range(1..50);
                let mut v: Vec<Value> = (0..n).map(|_| valid_event(rng)).collect();
                let at = rng.random_range(0..=n);
                v.insert(at, json!({"type": non_string(rng)}));
                case(
                    format!("batch of {} with a bad event at {at} #{i}", n + 1),
                    serde_json::to_string(&v).unwrap(),
                    Some(400),
                )
            }
        };
        cases.push(c);
    }
    cases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_fuzz_always_4xx_json_and_publishes_nothing() {
    let seed = seed();
    println!("ingest fuzz seed={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let k = TestKafka::new(1);
    let (p, shutdown) = start_producer(k.config(&[])).await;
    wait_ready(&format!("http://{}/readyz", p.ops_addr), T).await;
    let urls = [
        format!("http://{}/v1/events", p.http_addr),
        format!("http://{}/v1/topics/{}/events", p.http_addr, k.source),
    ];
    let cases = ingest_cases(&mut rng, 400);
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    for (i, c) in cases.iter().enumerate() {
        let url = &urls[i % 2];
        let (status, body) =
            tokio::time::timeout(T, http_request("POST", url, c.content_type, &c.body))
                .await
                .unwrap_or((0, String::new()));
        *by_status.entry(status).or_default() += 1;
        let json_error = serde_json::from_str::<Value>(&body)
            .ok()
            .is_some_and(|v| v["error"].is_string());
        let status_ok = match c.want {
            Some(w) => status == w,
            None => (400..500).contains(&status),
        };
        if !status_ok || !json_error {
            failures.push(format!(
                "{}: got {status} (want {}), body {:.200}",
                c.what,
                c.want.map_or("4xx".into(), |w| w.to_string()),
                body
            ));
        }
    }
    // Other methods on the ingest routes: a 4xx with a JSON error too ("every error is
    // JSON").
    for (i, method) in ["GET", "PUT", "DELETE", "PATCH"].iter().enumerate() {
        let url = &urls[i % 2];
        let (status, body) =
            http_request(method, url, Some("application/json"), br#"{"type":"t"}"#).await;
        *by_status.entry(status).or_default() += 1;
        let json_error = serde_json::from_str::<Value>(&body)
            .ok()
            .is_some_and(|v| v["error"].is_string());
        if !(400..500).contains(&status) || !json_error {
            failures.push(format!("{method} {url}: got {status}, body {body:?}"));
        }
    }
    let ends = k.end_offsets(&k.source);
    // The API still works after all that.
    let (status, body) = http_request(
        "POST",
        &urls[0],
        Some("application/json"),
        br#"{"type":"after"}"#,
    )
    .await;
    shutdown.cancel();
    let _ = p.done.await;
    println!(
        "RELIABILITY ingest-fuzz: requests={} statuses={by_status:?} failures={} \
         published_by_bad_input={} took_ms={} seed={seed}",
        cases.len() + 4,
        failures.len(),
        ends.iter().sum::<i64>(),
        started.elapsed().as_millis()
    );
    assert!(
        failures.is_empty(),
        "{} malformed requests were not answered with the right 4xx and a JSON error:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(ends, vec![0], "nothing was published by malformed requests");
    assert_eq!(status, 200, "a valid event is still accepted: {body}");
}

/// Seeded fuzz of the `Authorization` header with ingest authentication on
/// (`HTTP_AUTH_TOKENS_FILE`): every request carries a valid event, and none may get past
/// authentication. Only exact tokens of the file pass; everything else gets 401 (403 for a
/// valid token without rights to the topic) with a JSON error and a Bearer challenge, and
/// nothing is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_fuzz_authorization_headers_never_get_through() {
    /// POST with one `Authorization` header per item (raw bytes): (status, whether a
    /// `WWW-Authenticate: Bearer realm="courier"...` came back, body).
    async fn post(addr: std::net::SocketAddr, path: &str, auth: &[Vec<u8>]) -> (u16, bool, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let body = br#"{"type":"must_not_be_published"}"#;
        let req = post_request(addr, path, auth, body);
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let _ = s.write_all(&req).await;
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = response_status(&text);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let challenge = head.lines().any(|l| {
            l.to_ascii_lowercase()
                .starts_with("www-authenticate: bearer realm=\"courier\"")
        });
        (status, challenge, body.to_owned())
    }
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/";
    let seed = seed();
    println!("ingest auth fuzz seed={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let k = TestKafka::new(1);
    let other = format!("{}-other", k.source);
    k.broker.create_topic(&other, 1).unwrap();
    let token = |rng: &mut StdRng| -> String {
        (0..32)
            .map(|_| B64[rng.random_range(0..62)] as char)
            .collect()
    };
    let (a, b) = (token(&mut rng), token(&mut rng));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(&file, format!("{a}\n{b} {other}\n")).unwrap();
    let env = [
        ("HTTP_AUTH_TOKENS_FILE", file.to_str().unwrap()),
        ("KAFKA_PRODUCER_ALLOWED_TOPICS", other.as_str()),
    ];
    let (p, shutdown) = start_producer(k.config(&env)).await;
    wait_ready(&format!("http://{}/readyz", p.ops_addr), T).await;
    let paths = [
        "/v1/events".to_string(),
        format!("/v1/topics/{}/events", k.source),
    ];
    // Bytes a header value may hold on the wire: visible ASCII, space, tab, obs-text.
    let header_byte = |rng: &mut StdRng| -> u8 {
        match rng.random_range(0..10) {
            0 => b'\t',
            1 => rng.random_range(0x80..=0xff),
            _ => rng.random_range(0x20..=0x7e),
        }
    };
    let mutate = |rng: &mut StdRng, t: &str| -> String {
        let mut s = t.as_bytes().to_vec();
        match rng.random_range(0..6) {
            0 => {
                let i = rng.random_range(0..s.len());
                let was = s[i];
                while s[i] == was {
                    s[i] = B64[rng.random_range(0..B64.len())];
                }
            }
            1 => s.truncate(rng.random_range(0..s.len())),
            2 => s.extend((0..rng.random_range(1..8)).map(|_| B64[rng.random_range(0..B64.len())])),
            3 => s.extend(std::iter::repeat_n(b'=', rng.random_range(1..4))),
            4 => {
                // Not first: whitespace before the token is allowed.
                let i = rng.random_range(1..s.len());
                s.insert(i, header_byte(rng));
            }
            _ => s.make_ascii_uppercase(),
        }
        let m = String::from_utf8_lossy(&s).into_owned();
        if m == t {
            format!("{m}Z")
        } else {
            m
        }
    };
    let requests = 300;
    let mut failures = Vec::new();
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    let started = Instant::now();
    for i in 0..requests {
        let bearer = |t: &str| format!("Bearer {t}").into_bytes();
        let (what, auth, want): (&str, Vec<Vec<u8>>, u16) = match i % 10 {
            0 => ("no header", vec![], 401),
            1 => {
                let n = rng.random_range(0..200);
                (
                    "random bytes",
                    vec![(0..n).map(|_| header_byte(&mut rng)).collect()],
                    401,
                )
            }
            2 => {
                let scheme = [
                    "Basic",
                    "Token",
                    "Bearer:",
                    "Bearer=",
                    "Digest",
                    "Beare",
                    "Bearerr",
                    "Negotiate",
                ];
                let s = scheme[rng.random_range(0..scheme.len())];
                let t = if rng.random_bool(0.5) {
                    a.clone()
                } else {
                    token(&mut rng)
                };
                ("another scheme", vec![format!("{s} {t}").into_bytes()], 401)
            }
            3 => {
                let n = rng.random_range(1..300);
                let t: String = (0..n)
                    .map(|_| B64[rng.random_range(0..B64.len())] as char)
                    .collect();
                ("a random token", vec![bearer(&t)], 401)
            }
            4 => (
                "a near miss of the token",
                vec![bearer(&mutate(&mut rng, &a))],
                401,
            ),
            5 => {
                let sep = [",", ":", "", "=", "/", ";"];
                let s = sep[rng.random_range(0..sep.len())];
                (
                    "the token glued to the scheme",
                    vec![format!("Bearer{s}{a}").into_bytes()],
                    401,
                )
            }
            6 => {
                let second = if rng.random_bool(0.5) {
                    bearer(&a)
                } else {
                    bearer(&token(&mut rng))
                };
                ("two Authorization headers", vec![bearer(&a), second], 401)
            }
            7 => ("a token limited to another topic", vec![bearer(&b)], 403),
            8 => {
                let n = rng.random_range(1_000..16_000);
                let t: String = (0..n)
                    .map(|_| B64[rng.random_range(0..B64.len())] as char)
                    .collect();
                ("a long token", vec![bearer(&t)], 401)
            }
            _ => {
                let mut v = b"Bearer ".to_vec();
                v.extend((0..rng.random_range(1..64)).map(|_| header_byte(&mut rng)));
                ("bearer and random bytes", vec![v], 401)
            }
        };
        let path = &paths[i % 2];
        let (status, challenge, body) = tokio::time::timeout(T, post(p.http_addr, path, &auth))
            .await
            .unwrap_or((0, false, String::new()));
        *by_status.entry(status).or_default() += 1;
        let json_error = serde_json::from_str::<Value>(&body)
            .ok()
            .is_some_and(|v| v["error"].is_string());
        if status != want || !challenge || !json_error {
            failures.push(format!(
                "#{i} {what} on {path}: got {status} (want {want}), challenge {challenge}, body {body:.200}, header {:.120}",
                auth.iter().map(|h| String::from_utf8_lossy(h).into_owned()).collect::<Vec<_>>().join(" | ")
            ));
        }
    }
    let published = k.end_offsets(&k.source)[0] + k.end_offsets(&other)[0];
    let (_, metrics) = http_get(&format!("http://{}/metrics", p.ops_addr)).await;
    let counted = metric_sum(&metrics, "courier_http_requests_total", &["status=\"401\""])
        + metric_sum(&metrics, "courier_http_requests_total", &["status=\"403\""]);
    // The tokens themselves still work.
    let (ok_a, _, _) = post(
        p.http_addr,
        &paths[0],
        &[format!("Bearer {a}").into_bytes()],
    )
    .await;
    let (ok_b, _, _) = post(
        p.http_addr,
        &format!("/v1/topics/{other}/events"),
        &[format!("Bearer {b}").into_bytes()],
    )
    .await;
    shutdown.cancel();
    let _ = p.done.await;
    println!(
        "RELIABILITY ingest-auth-fuzz: requests={requests} statuses={by_status:?} failures={} \
         published_by_refused={published} counted_401_403={counted} took_ms={} seed={seed}",
        failures.len(),
        started.elapsed().as_millis()
    );
    assert!(
        failures.is_empty(),
        "{} requests were not refused with the right status, a JSON error and a Bearer challenge:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(published, 0, "a refused request published");
    assert_eq!(
        counted, requests as f64,
        "courier_http_requests_total counts every refusal"
    );
    assert_eq!((ok_a, ok_b), (200, 200), "the file's tokens publish");
}

// ---------------------------------------------------------------------------------------
// The consumer
// ---------------------------------------------------------------------------------------

/// The default `log` processor, recording which fuzz messages it processed successfully.
struct Recording {
    ok: Mutex<HashSet<u64>>,
    calls: Mutex<usize>,
}

impl Recording {
    fn new() -> Arc<Recording> {
        Arc::new(Recording {
            ok: Mutex::new(HashSet::new()),
            calls: Mutex::new(0),
        })
    }
}

fn fuzz_seq(d: &Delivery) -> Option<u64> {
    std::str::from_utf8(d.header("fuzz-seq")?)
        .ok()?
        .parse()
        .ok()
}

#[async_trait]
impl Processor for Recording {
    async fn process(&self, d: &Delivery) -> Result<(), ProcessError> {
        *self.calls.lock() += 1;
        let r = LogProcessor.process(d).await;
        if r.is_ok() {
            if let Some(seq) = fuzz_seq(d) {
                self.ok.lock().insert(seq);
            }
        }
        r
    }
}

type Msg = (String, Option<Vec<u8>>, Option<Vec<u8>>, Headers);

fn h(k: &str, v: &[u8]) -> (HeaderKey, Option<Vec<u8>>) {
    (k.into(), Some(v.to_vec()))
}

/// Garbage for the consumer: (topic, key, payload, headers). Every message carries a
/// `fuzz-seq` header (user headers are kept on every hop, so the DLQ copy has it too).
fn consumer_cases(k: &TestKafka, rng: &mut StdRng, random: usize) -> Vec<Msg> {
    let big = vec![b'x'; 100 * 1024];
    let far = (courier::model::now_ms() + 2 * 3_600_000).to_string();
    let year_9999 = b"253402300799000".to_vec();
    let event = |id: &str| Some(json!({"id": id, "type": "fuzz"}).to_string().into_bytes());
    let header_sets: Vec<(&str, Headers)> = vec![
        ("no headers", vec![]),
        ("attempt not a number", vec![h("courier-attempt", b"two")]),
        ("attempt negative", vec![h("courier-attempt", b"-1")]),
        (
            "attempt huge",
            vec![h("courier-attempt", b"99999999999999999999999")],
        ),
        ("attempt u32 max", vec![h("courier-attempt", b"4294967295")]),
        ("attempt empty", vec![h("courier-attempt", b"")]),
        ("attempt null", vec![("courier-attempt".into(), None)]),
        ("due in year 9999", vec![h("courier-due-at-ms", &year_9999)]),
        (
            "due in 2 hours",
            vec![h("courier-due-at-ms", far.as_bytes())],
        ),
        ("due not a number", vec![h("courier-due-at-ms", b"soon")]),
        ("due negative", vec![h("courier-due-at-ms", b"-5")]),
        ("due 100 KB", vec![h("courier-due-at-ms", &big)]),
        (
            "due invalid UTF-8",
            vec![h("courier-due-at-ms", b"\xff\xfe1")],
        ),
        ("group 100 KB", vec![h("courier-consumer-group", &big)]),
        (
            "group invalid UTF-8",
            vec![h("courier-consumer-group", b"\xc3\x28")],
        ),
        (
            "error message 100 KB",
            vec![h("courier-error-message", &big)],
        ),
        (
            "error kind unknown",
            vec![h("courier-error-kind", b"weird")],
        ),
        (
            "original position bogus",
            vec![
                h("courier-original-topic", &big),
                h("courier-original-partition", b"x"),
                h("courier-original-offset", b"-4"),
                h("courier-original-timestamp-ms", b"\xff"),
            ],
        ),
        ("replayed bogus", vec![h("courier-replayed-at-ms", b"nope")]),
        (
            "attempt twice",
            vec![h("courier-attempt", b"1"), h("courier-attempt", b"x")],
        ),
        ("unknown courier header", vec![h("courier-zzz", &big)]),
        ("user header 100 KB", vec![h("trace", &big)]),
        (
            "message-id invalid UTF-8",
            vec![h("message-id", b"\xff\x00")],
        ),
        ("message-id empty", vec![h("message-id", b"")]),
        ("message-id null", vec![("message-id".into(), None)]),
        ("message-id 100 KB", vec![h("message-id", &big)]),
    ];
    // Ids are unique per message (dedupe would rightly skip a second message of one id).
    let unique = |hs: &Headers, n: usize| -> Headers {
        hs.iter()
            .map(|(k, v)| match v {
                Some(v) if k == "message-id" && v.len() > 1000 => {
                    let mut v = v.clone();
                    v.extend_from_slice(format!("-{n}").as_bytes());
                    (k.clone(), Some(v))
                }
                _ => (k.clone(), v.clone()),
            })
            .collect()
    };
    let payloads: Vec<(&str, Option<Vec<u8>>)> = vec![
        ("valid event", None), // filled per message with a unique id
        ("non-JSON text", Some(b"hello, world".to_vec())),
        ("invalid UTF-8", Some(b"\xff\xfe\xfd".to_vec())),
        ("JSON array", Some(b"[1,2,3]".to_vec())),
        ("JSON string", Some(b"\"event\"".to_vec())),
        ("id a number", Some(br#"{"id":5,"type":"t"}"#.to_vec())),
        ("no type", Some(br#"{"id":"x"}"#.to_vec())),
        ("empty", Some(Vec::new())),
        ("deep nesting", Some(nested(10_000, "[", "]").into_bytes())),
    ];
    let topics: Vec<String> = std::iter::once(k.source.clone())
        .chain((1..=3).map(|n| k.retry_topic(n)))
        .collect();
    let mut out = Vec::new();
    let mut push =
        |topic: &str, key: Option<Vec<u8>>, payload: Option<Vec<u8>>, mut hs: Headers| {
            let seq = out.len();
            hs.push(h("fuzz-seq", seq.to_string().as_bytes()));
            out.push((topic.to_owned(), key, payload, hs));
        };
    // Every header set with every payload kind, spread over the source and retry topics.
    let mut n = 0;
    for (_, hs) in &header_sets {
        for (_, payload) in &payloads {
            let topic = &topics[n % topics.len()];
            let has_id = hs.iter().any(|(k, _)| k == "message-id");
            let mut hs = unique(hs, n);
            let id = format!("fz-{n}");
            if !has_id && n % 3 != 0 {
                hs.push(h("message-id", id.as_bytes()));
            }
            let payload = payload.clone().or_else(|| event(&id));
            let key = (n % 4 != 0).then(|| format!("k{}", n % 7).into_bytes());
            push(topic, key, payload, hs);
            n += 1;
        }
    }
    // Random bytes everywhere: payload, key and header values.
    for i in 0..random {
        let topic = &topics[rng.random_range(0..topics.len())];
        let bytes = |rng: &mut StdRng, max: usize| -> Vec<u8> {
            let n = rng.random_range(0..max);
            (0..n).map(|_| rng.random::<u8>()).collect()
        };
        let payload = rng.random_bool(0.9).then(|| bytes(rng, 3000));
        let key = rng.random_bool(0.7).then(|| bytes(rng, 40));
        let names = [
            "message-id",
            "courier-attempt",
            "courier-due-at-ms",
            "courier-consumer-group",
            "courier-original-topic",
            "courier-original-partition",
            "courier-original-offset",
            "courier-error-kind",
            "courier-replayed-at-ms",
            "x-user",
        ];
        let mut hs: Headers = Vec::new();
        for _ in 0..rng.random_range(0..5) {
            let name = names[rng.random_range(0..names.len())];
            let value = if name == "message-id" {
                // Unique, so dedupe does not merge random messages.
                let mut v = format!("rnd-{i}-").into_bytes();
                v.extend(bytes(rng, 20));
                Some(v)
            } else if name == "courier-consumer-group" {
                // A valid group other than ours is skipped by design; keep it bogus.
                Some(b"\xff".to_vec())
            } else if rng.random_bool(0.1) {
                None
            } else {
                Some(bytes(rng, 64))
            };
            // Header names may hold any bytes (Kafka allows it): some are not UTF-8.
            let name = if rng.random_bool(0.15) {
                let mut n = b"x-\xff".to_vec();
                n.extend(bytes(rng, 8).into_iter().filter(|b| *b != 0));
                HeaderKey::from(n)
            } else {
                HeaderKey::from(name)
            };
            hs.push((name, value));
        }
        push(topic, key, payload, hs);
    }
    out
}

/// Produces `msgs` with a producer that allows 1 MiB records (the Java client's default
/// `max.request.size`, so the consumer sees what other clients may write).
async fn produce_raw(k: &TestKafka, msgs: &[Msg]) {
    let p = k
        .kafka()
        .producer(&[("message.max.bytes", "1048576"), ("linger.ms", "5")]);
    let records = msgs
        .iter()
        .map(|(topic, key, payload, headers)| OutgoingRecord {
            topic: topic.clone(),
            partition: None,
            key: key.clone(),
            payload: payload.clone(),
            headers: headers.clone(),
        });
    p.send_all(records).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_garbage_ends_processed_or_dead_lettered_and_nothing_sticks() {
    let seed = seed();
    println!("consumer fuzz seed={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let k = TestKafka::new(2);
    let msgs = consumer_cases(&k, &mut rng, 200);
    produce_raw(&k, &msgs).await;
    let rec = Recording::new();
    let (running, shutdown) = start_consumer(k.config(&[]), rec.clone()).await;
    let topics = k.consumed_topics();
    let started = Instant::now();
    let mut stuck: Vec<String>;
    // Every partition of the source and retry topics committed to its end, within a deadline.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        stuck = k.kafka().not_committed_to_end(&k.group, &topics);
        if stuck.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let settled_after = started.elapsed();
    let processed = rec.ok.lock().clone();
    let expect_dlq = msgs.len() - processed.len();
    let dlq = k.read_all(&k.dlq, expect_dlq, Duration::from_secs(15));
    let dead: HashSet<u64> = dlq.iter().filter_map(fuzz_seq).collect();
    let missing: Vec<usize> = (0..msgs.len())
        .filter(|i| !processed.contains(&(*i as u64)) && !dead.contains(&(*i as u64)))
        .collect();
    let bad_dlq: Vec<String> = dlq
        .iter()
        .filter(|d| {
            !matches!(
                header(d, "courier-error-kind").as_deref(),
                Some("fatal" | "exhausted")
            ) || d.header("courier-attempt").is_none()
        })
        .map(|d| format!("{:?}", d.headers.iter().map(|h| &h.0).collect::<Vec<_>>()))
        .collect();
    // Still alive: a good message after the garbage is processed.
    let calls_before = *rec.calls.lock();
    k.produce(
        &k.source,
        vec![(
            None,
            json!({"id": "after", "type": "t"}).to_string().into_bytes(),
            vec![h("message-id", b"after"), h("fuzz-seq", b"999999")],
        )],
    )
    .await;
    let alive = eventually(T, || rec.ok.lock().contains(&999_999)).await;
    shutdown.cancel();
    let summary = tokio::time::timeout(T, running.done).await;
    println!(
        "RELIABILITY consumer-fuzz: messages={} processed_ok={} dead_lettered={} missing={} \
         stuck_partitions={} settled_ms={} calls={} seed={seed}",
        msgs.len(),
        processed.len(),
        dead.len(),
        missing.len(),
        stuck.len(),
        settled_after.as_millis(),
        calls_before,
    );
    let describe = |i: &usize| {
        let (t, key, payload, hs) = &msgs[*i];
        format!(
            "#{i} on {t}: key {} B, payload {:?} B, headers {:?}",
            key.as_ref().map_or(0, Vec::len),
            payload.as_ref().map(Vec::len),
            hs.iter()
                .map(|(k, v)| (
                    k.as_str(),
                    v.as_ref()
                        .map(|v| String::from_utf8_lossy(&v[..v.len().min(24)]).into_owned())
                ))
                .collect::<Vec<_>>()
        )
    };
    assert!(
        stuck.is_empty(),
        "partitions stuck (committed offsets short of the end): {stuck:?}; unfinished: {:?}",
        missing.iter().take(5).map(describe).collect::<Vec<_>>()
    );
    assert!(
        missing.is_empty(),
        "{} messages neither processed nor dead-lettered: {:?}",
        missing.len(),
        missing.iter().take(5).map(describe).collect::<Vec<_>>()
    );
    assert!(
        bad_dlq.is_empty(),
        "DLQ records without courier headers: {bad_dlq:?}"
    );
    assert!(alive, "the consumer still processes after the garbage");
    assert!(
        matches!(summary, Ok(Ok(_))),
        "the consumer shut down cleanly (no panic): {summary:?}"
    );
}

/// A record near 1 MiB (what a Java producer writes with its default `max.request.size`)
/// that fails processing must still reach the DLQ, byte for byte, and must not hold its
/// partition's commit point (nor its worker lane) for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_record_near_1_mib_is_dead_lettered_not_stuck() {
    let k = TestKafka::new(1);
    let mut msgs: Vec<Msg> = vec![(
        k.source.clone(),
        Some(b"big".to_vec()),
        Some(vec![b'x'; 1_040_000]),
        vec![h("message-id", b"big-0"), h("fuzz-seq", b"0")],
    )];
    for i in 1..=10u32 {
        let id = format!("after-{i}");
        msgs.push((
            k.source.clone(),
            Some(format!("k-{i}").into_bytes()),
            Some(json!({"id": id, "type": "t"}).to_string().into_bytes()),
            vec![
                h("message-id", id.as_bytes()),
                h("fuzz-seq", i.to_string().as_bytes()),
            ],
        ));
    }
    produce_raw(&k, &msgs).await;
    let rec = Recording::new();
    let (running, shutdown) = start_consumer(k.config(&[]), rec.clone()).await;
    // Generous: the 1 MiB publish takes well under a second when it works.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut dlq = Vec::new();
    while Instant::now() < deadline {
        dlq = k.read_all(&k.dlq, 1, Duration::from_secs(3));
        if !dlq.is_empty() && k.committed(&k.source) == vec![11] && rec.ok.lock().len() == 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let committed = k.committed(&k.source);
    let processed = rec.ok.lock().len();
    let metrics = running.metrics.render();
    shutdown.cancel();
    let stopped = tokio::time::timeout(T, running.done).await;
    let failures: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("courier_publish_failures_total"))
        .collect();
    println!(
        "RELIABILITY consumer-1mib: dlq={} committed={committed:?} (end [11]) \
         processed_behind_it={processed}/10 publish_failures={failures:?}",
        dlq.len()
    );
    assert_eq!(
        dlq.len(),
        1,
        "the ~1 MiB record that failed is in the DLQ (publish failures: {failures:?})"
    );
    assert_eq!(
        dlq[0].payload.as_ref().map(Vec::len),
        Some(1_040_000),
        "byte for byte"
    );
    assert_eq!(committed, vec![11], "the partition is committed to its end");
    assert_eq!(processed, 10, "the messages behind it are processed");
    assert!(
        matches!(stopped, Ok(Ok(_))),
        "the consumer shut down cleanly within {T:?}: {stopped:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Parsers
// ---------------------------------------------------------------------------------------

/// Arbitrary JSON whose object keys are often the envelope's own.
fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
        Just(json!("")),
        Just(json!("2024-01-02T03:04:05Z")),
        "[a-z]{250,260}".prop_map(Value::String),
    ];
    let key = prop_oneof![
        Just("type".to_owned()),
        Just("id".to_owned()),
        Just("key".to_owned()),
        Just("time".to_owned()),
        Just("timestamp".to_owned()),
        Just("source".to_owned()),
        Just("partition".to_owned()),
        Just("data".to_owned()),
        "[a-z]{1,6}",
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((key.clone(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// An object with a `type` of any JSON value, other fields that are not validated (anything
/// but the envelope's named fields), so acceptance depends on `type` alone.
fn arb_object_with_type() -> impl Strategy<Value = Value> {
    (
        arb_json(),
        proptest::collection::vec(("[a-z]{7,10}", arb_json()), 0..4),
    )
        .prop_map(|(t, rest)| {
            let mut m: serde_json::Map<String, Value> = rest.into_iter().collect();
            m.insert("type".into(), t);
            Value::Object(m)
        })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Never panics; whatever it accepts is an object with a non-empty string `type` of at
    /// most 256 bytes, and the envelope agrees with the published body.
    #[test]
    fn envelope_from_arbitrary_json(v in arb_json()) {
        let is_object = v.is_object();
        let ty = v.get("type").cloned();
        if let Ok(env) = Envelope::from_value(v) {
            prop_assert!(is_object);
            let ty = ty.and_then(|t| t.as_str().map(str::to_owned));
            prop_assert_eq!(ty.as_deref(), Some(env.event_type.as_str()));
            prop_assert!(!env.event_type.is_empty() && env.event_type.len() <= 256);
            prop_assert_eq!(env.body["id"].as_str(), Some(env.id.as_str()));
            prop_assert!(!env.id.is_empty() && env.id.len() <= 256);
            prop_assert!(env.key.len() <= 256);
        }
    }

    /// With only unvalidated fields beside it, an object is accepted exactly when its
    /// `type` is a non-empty string of at most 256 bytes; anything not an object never is.
    #[test]
    fn envelope_accepts_exactly_objects_with_a_string_type(v in arb_object_with_type(), other in arb_json()) {
        let want = v["type"].as_str().is_some_and(|s| !s.is_empty() && s.len() <= 256);
        let got = Envelope::from_value(v.clone());
        prop_assert_eq!(got.is_ok(), want, "{} -> {:?}", v, got);
        if !other.is_object() {
            prop_assert!(Envelope::from_value(other).is_err());
        }
    }

    /// Never panics on arbitrary header names and bytes; a numeric header is read exactly
    /// when its first value is a decimal of at most 32 bytes, and a present but unreadable
    /// one is listed as malformed.
    #[test]
    fn courier_headers_parse_arbitrary_bytes(
        headers in proptest::collection::vec(
            (
                prop_oneof![
                    Just("courier-attempt".to_owned()),
                    Just("courier-due-at-ms".to_owned()),
                    Just("courier-original-offset".to_owned()),
                    Just("courier-consumer-group".to_owned()),
                    Just("courier-error-kind".to_owned()),
                    Just("courier-error-message".to_owned()),
                    Just("message-id".to_owned()),
                    ".{0,20}",
                ],
                proptest::option::weighted(0.9, prop_oneof![
                    proptest::collection::vec(any::<u8>(), 0..40),
                    "[ ]?-?[0-9]{0,25}[ ]?".prop_map(String::into_bytes),
                    proptest::collection::vec(any::<u8>(), 1000..1100),
                ]),
            ),
            0..12,
        )
    ) {
        let headers: Headers = headers.into_iter().map(|(k, v)| (HeaderKey::from(k), v)).collect();
        let parsed = CourierHeaders::parse(&headers);
        let first = |name: &str| headers.iter().find(|(k, _)| k == name).and_then(|(_, v)| v.clone());
        let expect = |name: &str| -> Option<i64> {
            let raw = first(name)?;
            if raw.len() > 32 { return None; }
            std::str::from_utf8(&raw).ok()?.trim().parse::<i64>().ok().filter(|n| *n >= 0)
        };
        prop_assert_eq!(parsed.due_at_ms, expect("courier-due-at-ms"));
        prop_assert_eq!(parsed.original_offset, expect("courier-original-offset"));
        prop_assert_eq!(
            parsed.attempt,
            expect("courier-attempt").and_then(|n| u32::try_from(n).ok())
        );
        for name in ["courier-due-at-ms", "courier-original-offset"] {
            let unreadable = first(name).is_some() && expect(name).is_none();
            prop_assert_eq!(parsed.malformed.contains(&name), unreadable, "{}", name);
        }
    }

    /// Never panics on arbitrary text.
    #[test]
    fn parse_duration_never_panics(s in any::<String>(), t in "[ 0-9]{0,30}(ns|us|ms|s|m|min|h|d|w|M|y|sec|x)?[ 0-9a-z]{0,4}") {
        let _ = parse_duration(&s);
        let _ = parse_duration(&t);
    }

    /// `Nms` and `Ns` round-trip, with or without surrounding spaces.
    #[test]
    fn parse_duration_round_trips_ms_and_s(n in 0u64..=u32::MAX as u64, pad in any::<bool>()) {
        let p = if pad { " " } else { "" };
        prop_assert_eq!(parse_duration(&format!("{p}{n}ms{p}")), Ok(Duration::from_millis(n)));
        prop_assert_eq!(parse_duration(&format!("{p}{n}s{p}")), Ok(Duration::from_secs(n)));
    }
}
