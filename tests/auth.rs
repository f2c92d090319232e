//! Ingest authentication (`HTTP_AUTH_TOKENS_FILE`) against a mock cluster per test: missing,
//! malformed, wrong, revoked and unscoped tokens get 401 or 403 with a JSON error and a Bearer
//! challenge, and the topics' high watermarks do not move; valid tokens publish; the file is
//! re-read when it changes and on SIGHUP, and a malformed or missing file keeps the last good
//! set.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use courier::app::producer::{start, ProducerOptions, RunningProducer};
use courier::testing::{
    http_get, metric_sum, post_request, rand_id, start_producer, stop_producer, wait_ready,
    TestKafka,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(30);
/// Longer than several reload polls (1 s each).
const RELOAD: Duration = Duration::from_secs(10);
const EVENT: &[u8] = br#"{"type":"auth_test"}"#;
const REALM: &str = r#"Bearer realm="courier""#;
const INVALID: &str = r#"Bearer realm="courier", error="invalid_token""#;
const SCOPE: &str = r#"Bearer realm="courier", error="insufficient_scope""#;

/// A fresh 20-character token.
fn token() -> String {
    format!("{}{}", rand_id(), rand_id())
}

fn bearer(t: &str) -> Vec<u8> {
    format!("Bearer {t}").into_bytes()
}

/// A refused request: what it is, its path, its `Authorization` headers, the status and the
/// challenge it must get.
type Case<'a> = (&'a str, &'a String, Vec<Vec<u8>>, u16, &'a str);

async fn producer(k: &TestKafka, extra: &[(&str, &str)]) -> (RunningProducer, CancellationToken) {
    let (running, shutdown) = start_producer(k.config(extra)).await;
    wait_ready(&format!("http://{}/readyz", running.ops_addr), T).await;
    (running, shutdown)
}

/// An answer: status, headers (names in lower case) and body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `error` of a JSON error body.
    fn error(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_str(&self.body).ok()?;
        v["error"].as_str().map(str::to_owned)
    }
}

/// `POST path` with one `Authorization` header per item of `auth` (raw bytes), over a fresh
/// loopback connection, within 10 s.
async fn post(addr: SocketAddr, path: &str, auth: &[Vec<u8>], body: &[u8]) -> Answer {
    let head = post_request(addr, path, auth, body);
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(&head).await.expect("write");
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
        buf
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("an answer within 10 s");
    parse_answer(&raw)
}

fn parse_answer(raw: &[u8]) -> Answer {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    // Every answer here is JSON of a known length (no chunked encoding).
    let body = body.to_owned();
    Answer {
        status,
        headers,
        body,
    }
}

/// The status a token gets on `/v1/events` with a body that is not JSON: 400 when the token
/// is accepted, 401 when it is not. Publishes nothing either way.
async fn probe(addr: SocketAddr, t: &str) -> u16 {
    post(addr, "/v1/events", &[bearer(t)], b"{not json")
        .await
        .status
}

/// Waits until `t` gets `want` from [`probe`], failing after [`RELOAD`].
async fn wait_probe(addr: SocketAddr, t: &str, want: u16, what: &str) {
    let deadline = Instant::now() + RELOAD;
    loop {
        let got = probe(addr, t).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still {got} (want {want}) after {RELOAD:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn metrics(p: &RunningProducer) -> String {
    let (status, text) = http_get(&format!("http://{}/metrics", p.ops_addr)).await;
    assert_eq!(status, 200);
    text
}

/// Waits until `courier_file_reloads_total{file="tokens",result}` reaches `at_least`.
async fn wait_reloads(p: &RunningProducer, result: &str, at_least: f64) {
    let label = format!("result=\"{result}\"");
    let deadline = Instant::now() + RELOAD;
    loop {
        let n = metric_sum(
            &metrics(p).await,
            "courier_file_reloads_total",
            &["file=\"tokens\"", &label],
        );
        if n >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "courier_file_reloads_total{{file=\"tokens\",{label}}} = {n} after {RELOAD:?} (want >= {at_least})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Replaces `path` with `text` by a rename, as the kubelet updates a Secret volume.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_malformed_wrong_and_unscoped_tokens_are_refused_and_publish_nothing() {
    let k = TestKafka::new(1);
    let other = format!("{}-other", k.source);
    k.broker.create_topic(&other, 1).unwrap();
    let (a, b) = (token(), token());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(
        &file,
        format!("# test tokens\n{a}   # any allowed topic\n\n{b} {other}\n"),
    )
    .unwrap();
    let (p, shutdown) = producer(
        &k,
        &[
            ("HTTP_AUTH_TOKENS_FILE", file.to_str().unwrap()),
            ("KAFKA_PRODUCER_ALLOWED_TOPICS", &other),
        ],
    )
    .await;
    let default = "/v1/events".to_string();
    let on_source = format!("/v1/topics/{}/events", k.source);
    let on_other = format!("/v1/topics/{other}/events");
    let raw = |s: &str| s.as_bytes().to_vec();
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        ("no Authorization", &default, vec![], 401, REALM),
        ("no Authorization, topic route", &on_other, vec![], 401, REALM),
        ("Basic scheme", &on_source, vec![raw("Basic dXNlcjpwYXNz")], 401, REALM),
        ("the token without a scheme", &default, vec![raw(&a)], 401, REALM),
        ("Bearer alone", &default, vec![raw("Bearer")], 401, INVALID),
        ("Bearer and spaces", &default, vec![raw("Bearer    ")], 401, INVALID),
        ("two tokens in one header", &default, vec![bearer(&format!("{a} {a}"))], 401, INVALID),
        ("a character outside b64token", &default, vec![bearer(&format!("{a}!"))], 401, INVALID),
        ("one character more", &default, vec![bearer(&format!("{a}0"))], 401, INVALID),
        ("one character less", &on_source, vec![bearer(&a[..a.len() - 1])], 401, INVALID),
        ("another case", &default, vec![bearer(&a.to_ascii_uppercase())], 401, INVALID),
        ("an unknown token", &on_other, vec![bearer(&token())], 401, INVALID),
        ("two Authorization headers", &default, vec![bearer(&a), bearer(&a)], 401, INVALID),
        ("a token limited to another topic", &default, vec![bearer(&b)], 403, SCOPE),
        ("the same on the topic route", &on_source, vec![bearer(&b)], 403, SCOPE),
    ];
    let mut counted: std::collections::BTreeMap<(&str, u16), f64> = Default::default();
    for (what, path, auth, status, challenge) in &cases {
        let r = post(p.http_addr, path, auth, EVENT).await;
        assert_eq!(r.status, *status, "{what}: {}", r.body);
        assert_eq!(r.header("www-authenticate"), Some(*challenge), "{what}");
        assert_eq!(r.header("content-type"), Some("application/json"), "{what}");
        let error = r
            .error()
            .unwrap_or_else(|| panic!("{what}: no JSON error: {}", r.body));
        assert!(
            !error.contains(&a) && !error.contains(&b),
            "{what}: {error}"
        );
        let route = if **path == default {
            "/v1/events"
        } else {
            "/v1/topics/{topic}/events"
        };
        *counted.entry((route, *status)).or_default() += 1.0;
    }
    // An unauthenticated client learns nothing about topics: 401 before 404.
    let r = post(p.http_addr, "/v1/topics/nope/events", &[], EVENT).await;
    assert_eq!(r.status, 401);
    *counted
        .entry(("/v1/topics/{topic}/events", 401))
        .or_default() += 1.0;
    assert_eq!(
        k.end_offsets(&k.source),
        vec![0],
        "refused requests published"
    );
    assert_eq!(k.end_offsets(&other), vec![0], "refused requests published");

    // The valid tokens publish where they may.
    let ok = [
        (&default, &a, 200),
        (&on_other, &a, 200),
        (&on_other, &b, 200),
        (&"/v1/topics/nope/events".to_string(), &b, 404),
    ];
    for (path, t, status) in ok {
        let r = post(p.http_addr, path, &[bearer(t)], EVENT).await;
        assert_eq!(r.status, status, "{path}: {}", r.body);
    }
    assert_eq!(k.end_offsets(&k.source), vec![1]);
    assert_eq!(k.end_offsets(&other), vec![2]);

    let text = metrics(&p).await;
    for ((route, status), n) in counted {
        let got = metric_sum(
            &text,
            "courier_http_requests_total",
            &[
                &format!("route=\"{route}\""),
                &format!("status=\"{status}\""),
            ],
        );
        assert_eq!(
            got, n,
            "courier_http_requests_total{{route={route},status={status}}}"
        );
    }
    assert!(
        !text.contains(&a) && !text.contains(&b),
        "a token is in /metrics"
    );
    println!(
        "AUTH refusals: {} requests refused (401/403), nothing published",
        cases.len() + 1
    );
    assert_eq!(stop_producer(p, shutdown, T).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_gets_401_once_the_file_changes_without_a_restart() {
    let k = TestKafka::new(1);
    let (a, c, d) = (token(), token(), token());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(&file, format!("{a}\n")).unwrap();
    let (p, shutdown) = producer(&k, &[("HTTP_AUTH_TOKENS_FILE", file.to_str().unwrap())]).await;
    let addr = p.http_addr;
    let publish = |t: String| async move { post(addr, "/v1/events", &[bearer(&t)], EVENT).await };
    assert_eq!(publish(a.clone()).await.status, 200);
    assert_eq!(k.end_offsets(&k.source), vec![1]);

    // Revoked by a new file renamed over the old one (a Secret update).
    let changed = Instant::now();
    replace(&file, &format!("# a is revoked\n{c}\n"));
    wait_probe(p.http_addr, &a, 401, "the revoked token is refused").await;
    println!(
        "AUTH revocation: refused {} ms after the file changed",
        changed.elapsed().as_millis()
    );
    let r = publish(a.clone()).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.header("www-authenticate"), Some(INVALID));
    assert_eq!(
        k.end_offsets(&k.source),
        vec![1],
        "a revoked token published"
    );
    assert_eq!(
        publish(c.clone()).await.status,
        200,
        "the new token publishes"
    );

    // Added by a write in place (an editor, `echo >>`).
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .unwrap();
    std::io::Write::write_all(&mut f, format!("{d}\n").as_bytes()).unwrap();
    drop(f);
    wait_probe(p.http_addr, &d, 400, "the added token is accepted").await;
    assert_eq!(publish(d.clone()).await.status, 200);
    assert_eq!(publish(a.clone()).await.status, 401);
    assert_eq!(k.end_offsets(&k.source), vec![3]);
    wait_reloads(&p, "ok", 2.0).await;
    assert_eq!(stop_producer(p, shutdown, T).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_re_reads_the_token_file_even_when_it_looks_unchanged() {
    let k = TestKafka::new(1);
    let (a, a2) = (token(), token());
    assert_eq!(a.len(), a2.len());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(&file, format!("{a}\n")).unwrap();
    let (p, shutdown) = producer(&k, &[("HTTP_AUTH_TOKENS_FILE", file.to_str().unwrap())]).await;
    assert_eq!(probe(p.http_addr, &a).await, 400);
    // Same inode, same length, same modification time: the 1 s check cannot see it.
    let before = std::fs::metadata(&file).unwrap();
    std::fs::write(&file, format!("{a2}\n")).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(before.modified().unwrap())
        .unwrap();
    let after = std::fs::metadata(&file).unwrap();
    assert_eq!(
        (before.len(), before.modified().unwrap()),
        (after.len(), after.modified().unwrap())
    );
    // The handler is installed for the whole process: every producer of this test binary
    // re-reads its files, which is harmless.
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    wait_probe(
        p.http_addr,
        &a2,
        400,
        "the token read on SIGHUP is accepted",
    )
    .await;
    assert_eq!(
        probe(p.http_addr, &a).await,
        401,
        "the old token is refused"
    );
    assert_eq!(stop_producer(p, shutdown, T).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_or_missing_file_keeps_the_last_good_set() {
    let k = TestKafka::new(1);
    let (a, c) = (token(), token());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(&file, format!("{a}\n")).unwrap();
    let (p, shutdown) = producer(&k, &[("HTTP_AUTH_TOKENS_FILE", file.to_str().unwrap())]).await;

    // A malformed file (line 2 is too short to be a token) would revoke `a` if it were taken.
    replace(&file, &format!("{c}\nshort\n"));
    wait_reloads(&p, "error", 1.0).await;
    assert_eq!(probe(p.http_addr, &a).await, 400, "the last good set stays");
    assert_eq!(
        probe(p.http_addr, &c).await,
        401,
        "nothing of the bad file is used"
    );
    // A file that is gone.
    std::fs::remove_file(&file).unwrap();
    wait_reloads(&p, "error", 2.0).await;
    assert_eq!(probe(p.http_addr, &a).await, 400, "the last good set stays");
    let r = post(p.http_addr, "/v1/events", &[bearer(&a)], EVENT).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // An empty file is valid: nobody gets in.
    std::fs::write(&file, "# nobody\n").unwrap();
    wait_probe(p.http_addr, &a, 401, "an empty file refuses every token").await;
    // And a good file again.
    replace(&file, &format!("{c}\n"));
    wait_probe(p.http_addr, &c, 400, "the good file is taken").await;
    assert_eq!(k.end_offsets(&k.source), vec![1]);
    assert_eq!(stop_producer(p, shutdown, T).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_malformed_token_file_stops_the_start_up() {
    let k = TestKafka::new(1);
    let dir = tempfile::tempdir().unwrap();
    let secret = token();
    let malformed = dir.path().join("malformed");
    std::fs::write(&malformed, format!("{}\n{secret} bad/topic\n", token())).unwrap();
    let binary = dir.path().join("binary");
    std::fs::write(&binary, [0xff, 0xfe, b'\n']).unwrap();
    let cases = [
        (dir.path().join("missing"), "cannot read"),
        (malformed, "line 2"),
        (binary, "not UTF-8"),
    ];
    for (path, want) in cases {
        let path = path.to_str().unwrap();
        let e = start(
            k.config(&[("HTTP_AUTH_TOKENS_FILE", path)]),
            ProducerOptions::default(),
            CancellationToken::new(),
        )
        .await
        .expect_err(path);
        let e = format!("{e:#}");
        assert!(
            e.contains(&format!("HTTP_AUTH_TOKENS_FILE={path}")) && e.contains(want),
            "{e}"
        );
        assert!(!e.contains(&secret), "the error quotes a token: {e}");
    }
}
