//! Ingest authentication (`HTTP_AUTH_TOKENS_FILE`): every ingest request must carry
//! `Authorization: Bearer <token>` with a token of the file, and that token must be allowed
//! the request's topic. Without one: 401 and `WWW-Authenticate: Bearer realm="courier"`
//! (with `error="invalid_token"` for a malformed, unknown or revoked token); a token without
//! rights to the topic: 403 (`error="insufficient_scope"`). Either is answered before the
//! body is read, so nothing is published, and is counted in
//! `courier_http_requests_total{route,status}`.
//!
//! The file, one token a line:
//! ```text
//! # comments and blank lines are ignored; so is everything after a `#`
//! 3f9c0e...d41a                       # may publish to KAFKA_PRODUCER_ALLOWED_TOPICS
//! 77b1a2...9e0c orders,payments       # only to these (each must be allowed too)
//! ```
//! A token is 16 to 4096 characters of RFC 6750's `b64token` (`A-Z a-z 0-9 - . _ ~ + /`,
//! then `=` padding). Only the tokens' SHA-256 digests are kept in memory; a presented token
//! is hashed and compared with every digest in constant time (`subtle`), so neither the
//! comparison nor its length leaks through timing. Tokens never appear in logs, metrics,
//! error messages or `courier config`: file errors name the line, never its text.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{FromRequestParts, MatchedPath, Path as UrlPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use subtle::{Choice, ConditionallySelectable, ConstantTimeEq};

use super::response::error;
use super::watch::{Summary, Watched};
use super::IngestConfig;
use crate::config::valid_topic;
use crate::observability::Metrics;

/// Largest token file read, bytes.
const MAX_FILE_BYTES: u64 = 1024 * 1024;
/// Shortest accepted token: guessing it must be hopeless.
const MIN_TOKEN_CHARS: usize = 16;
/// Longest accepted token.
const MAX_TOKEN_CHARS: usize = 4096;

/// The tokens of the file, as SHA-256 digests with their topics.
pub(crate) struct TokenSet {
    entries: Vec<Entry>,
}

struct Entry {
    digest: [u8; 32],
    /// The topics this token may publish to; `None`: every allowed topic.
    topics: Option<Vec<String>>,
}

impl std::fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenSet({} tokens)", self.entries.len())
    }
}

impl Summary for TokenSet {
    fn summary(&self) -> String {
        let limited = self.entries.iter().filter(|e| e.topics.is_some()).count();
        format!("{} tokens ({limited} limited to listed topics)", self.len())
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl TokenSet {
    /// The entry of `token`: its digest is compared with every stored digest, in constant
    /// time, without stopping at a match.
    fn find(&self, token: &[u8]) -> Option<&Entry> {
        let digest = sha256(token);
        let mut found = Choice::from(0);
        let mut index = 0u32;
        for (i, e) in self.entries.iter().enumerate() {
            let same = e.digest[..].ct_eq(&digest[..]);
            index.conditional_assign(&(i as u32), same);
            found |= same;
        }
        bool::from(found).then(|| &self.entries[index as usize])
    }

    /// How many tokens.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds no token (every request is refused).
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Whether `s` is an RFC 6750 `b64token`.
fn is_b64token(s: &[u8]) -> bool {
    let body_end = s.iter().rposition(|&b| b != b'=').map_or(0, |i| i + 1);
    body_end > 0
        && s[..body_end].iter().all(|&b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
        })
}

/// A parsed token file and what the operator should know about it.
#[derive(Debug)]
pub(crate) struct Parsed {
    pub(crate) tokens: TokenSet,
    /// Lines whose topics are not all allowed (they can never publish there).
    pub(crate) warnings: Vec<String>,
}

/// Parses a token file. Messages name lines and items, never their text (a misplaced token
/// must not end up in a log); topic names of `KAFKA_PRODUCER_ALLOWED_TOPICS` may be named.
///
/// # Errors
/// The first problem: a token too short, too long or with characters outside `b64token`,
/// an invalid or empty topic item, the same token twice.
pub(crate) fn parse(text: &str, allowed: &[String]) -> Result<Parsed, String> {
    let mut entries: Vec<(usize, Entry)> = Vec::new();
    let mut warnings = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let (token, rest) = match line.split_once(|c: char| c.is_ascii_whitespace()) {
            Some((t, r)) => (t, r.trim()),
            None => (line, ""),
        };
        let chars = token.chars().count();
        if !is_b64token(token.as_bytes()) {
            return Err(format!(
                "line {n}: the token has characters outside A-Z a-z 0-9 - . _ ~ + / (and trailing =)"
            ));
        }
        if !(MIN_TOKEN_CHARS..=MAX_TOKEN_CHARS).contains(&chars) {
            return Err(format!(
                "line {n}: a token must be {MIN_TOKEN_CHARS} to {MAX_TOKEN_CHARS} characters long, e.g. `openssl rand -hex 32`"
            ));
        }
        let topics = if rest.is_empty() {
            None
        } else {
            let mut list = Vec::new();
            for (j, item) in rest.split(',').map(str::trim).enumerate() {
                if !valid_topic(item) {
                    return Err(format!(
                        "line {n}: topic {} of the list is not a topic name (1 to 249 characters of a-z A-Z 0-9 . _ -; topics are separated by commas, without spaces inside a name)",
                        j + 1
                    ));
                }
                list.push(item.to_owned());
            }
            let unknown: Vec<&str> = list
                .iter()
                .filter(|t| !allowed.contains(t))
                .map(String::as_str)
                .collect();
            if !unknown.is_empty() {
                warnings.push(format!(
                    "line {n} lists {} not in KAFKA_PRODUCER_ALLOWED_TOPICS: ingest refuses them (404) whatever the token",
                    unknown.join(", ")
                ));
            }
            Some(list)
        };
        let digest = sha256(token.as_bytes());
        if let Some((first, _)) = entries.iter().find(|(_, e)| e.digest == digest) {
            return Err(format!("line {n}: the same token as line {first}"));
        }
        entries.push((n, Entry { digest, topics }));
    }
    Ok(Parsed {
        tokens: TokenSet {
            entries: entries.into_iter().map(|(_, e)| e).collect(),
        },
        warnings,
    })
}

/// Reads and parses the token file at `path`.
fn read(path: &Path, allowed: &[String]) -> Result<TokenSet, String> {
    let at = || format!("HTTP_AUTH_TOKENS_FILE={}", path.display());
    let len = std::fs::metadata(path)
        .map_err(|e| format!("{}: cannot read: {e}", at()))?
        .len();
    if len > MAX_FILE_BYTES {
        return Err(format!(
            "{}: {len} bytes, more than the {MAX_FILE_BYTES} a token file may have",
            at()
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", at()))?;
    let text = String::from_utf8(bytes).map_err(|_| format!("{}: not UTF-8 text", at()))?;
    let parsed = parse(&text, allowed).map_err(|e| format!("{}: {e}", at()))?;
    for w in &parsed.warnings {
        tracing::warn!(file = %path.display(), "Ingest token file: {w}.");
    }
    if parsed.tokens.is_empty() {
        tracing::warn!(file = %path.display(), "The ingest token file holds no token: every ingest request gets 401.");
    }
    Ok(parsed.tokens)
}

/// The tokens of `path`, watched for changes.
pub(crate) type Tokens = Watched<TokenSet>;

/// Loads the token file at start-up.
///
/// # Errors
/// A missing, unreadable or malformed file.
pub(crate) fn load(path: &str, allowed: &[String]) -> Result<Arc<Tokens>, String> {
    let path = PathBuf::from(path);
    let allowed = allowed.to_vec();
    let p = path.clone();
    let tokens = Watched::load("tokens", vec![path], move || read(&p, &allowed))?;
    Ok(Arc::new(tokens))
}

/// Why a request is refused.
#[derive(Debug, PartialEq, Eq)]
enum Denied {
    /// No `Authorization` header.
    Missing,
    /// An `Authorization` header of another scheme (`Basic ...`).
    NotBearer,
    /// A bearer credential that is not a well-formed token, or several headers.
    Malformed(&'static str),
    /// A well-formed token that is not (or no longer) in the file.
    Unknown,
    /// A known token without rights to the topic.
    Forbidden(String),
}

impl Denied {
    fn into_response(self) -> Response {
        const REALM: &str = r#"Bearer realm="courier""#;
        const INVALID: &str = r#"Bearer realm="courier", error="invalid_token""#;
        const SCOPE: &str = r#"Bearer realm="courier", error="insufficient_scope""#;
        let (status, message, challenge) = match self {
            Denied::Missing => (
                StatusCode::UNAUTHORIZED,
                "authentication required: send Authorization: Bearer <token>".to_owned(),
                REALM,
            ),
            Denied::NotBearer => (
                StatusCode::UNAUTHORIZED,
                "the Authorization header must use the Bearer scheme".to_owned(),
                REALM,
            ),
            Denied::Malformed(why) => (StatusCode::UNAUTHORIZED, why.to_owned(), INVALID),
            Denied::Unknown => (
                StatusCode::UNAUTHORIZED,
                "unknown or revoked bearer token".to_owned(),
                INVALID,
            ),
            Denied::Forbidden(topic) => (
                StatusCode::FORBIDDEN,
                format!("this token may not publish to topic `{topic}`"),
                SCOPE,
            ),
        };
        let mut resp = error(status, &message, None).into_response();
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(challenge),
        );
        resp
    }
}

/// The token presented in `headers`, checked against `set`, and its rights on `topic` (a
/// topic outside `allowed` is left to the handler, which answers 404).
fn authorize(
    set: &TokenSet,
    headers: &HeaderMap,
    topic: Option<&str>,
    allowed: &[String],
) -> Result<(), Denied> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next().ok_or(Denied::Missing)?;
    if values.next().is_some() {
        return Err(Denied::Malformed("more than one Authorization header"));
    }
    // `Bearer`, whitespace, the token; whitespace around the token is ignored.
    let bytes = value.as_bytes().trim_ascii();
    let (scheme, rest) = match bytes.iter().position(|&b| b == b' ' || b == b'\t') {
        Some(i) => (&bytes[..i], &bytes[i..]),
        None => (bytes, &b""[..]),
    };
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err(Denied::NotBearer);
    }
    let token = rest.trim_ascii();
    if token.is_empty() {
        return Err(Denied::Malformed("empty bearer token"));
    }
    if !is_b64token(token) {
        return Err(Denied::Malformed("malformed bearer token"));
    }
    let entry = set.find(token).ok_or(Denied::Unknown)?;
    match (topic, &entry.topics) {
        (Some(t), Some(list)) if allowed.iter().any(|a| a == t) && !list.iter().any(|l| l == t) => {
            Err(Denied::Forbidden(t.to_owned()))
        }
        _ => Ok(()),
    }
}

#[derive(Clone)]
struct AuthState {
    tokens: Arc<Tokens>,
    default_topic: Arc<str>,
    allowed: Arc<[String]>,
    metrics: Metrics,
}

/// `router` with every ingest route behind the tokens of `tokens` (the fallbacks, 404 and
/// 405, stay as they are).
pub(crate) fn require_tokens(
    router: Router,
    cfg: &IngestConfig,
    tokens: Arc<Tokens>,
    metrics: Metrics,
) -> Router {
    let state = AuthState {
        tokens,
        default_topic: cfg.default_topic.as_str().into(),
        allowed: cfg.allowed_topics.clone().into(),
        metrics,
    };
    router.route_layer(axum::middleware::from_fn_with_state(state, check_request))
}

async fn check_request(
    State(s): State<AuthState>,
    matched: MatchedPath,
    req: Request,
    next: Next,
) -> Response {
    let (mut parts, body) = req.into_parts();
    // The topic the route publishes to: the path's, else the producer topic. A path that
    // does not decode is left to the handler (400) once the token is known.
    let topic = if matched.as_str().contains("{topic}") {
        UrlPath::<String>::from_request_parts(&mut parts, &())
            .await
            .ok()
            .map(|UrlPath(t)| t)
    } else {
        Some(s.default_topic.to_string())
    };
    let set = s.tokens.get();
    match authorize(&set, &parts.headers, topic.as_deref(), &s.allowed) {
        Ok(()) => next.run(Request::from_parts(parts, body)).await,
        Err(denied) => {
            let resp = denied.into_response();
            s.metrics
                .http_requests
                .with_label_values(&[matched.as_str(), resp.status().as_str()])
                .inc();
            resp
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "tok-aaaaaaaaaaaaaaaa";
    const B: &str = "tok-bbbbbbbbbbbbbbbb";

    fn allowed() -> Vec<String> {
        vec!["events".into(), "orders".into()]
    }

    fn set(text: &str) -> TokenSet {
        parse(text, &allowed()).expect("parses").tokens
    }

    fn headers(values: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::AUTHORIZATION, HeaderValue::from_bytes(v).unwrap());
        }
        h
    }

    fn check(set: &TokenSet, values: &[&[u8]], topic: &str) -> Result<(), Denied> {
        authorize(set, &headers(values), Some(topic), &allowed())
    }

    #[test]
    fn the_file_syntax() {
        let text = format!(
            "# comment\n\n  {A}   # everything allowed\n{B} orders , events# two\n{B}x orders\n"
        );
        let s = set(&text);
        assert_eq!(s.len(), 3);
        assert_eq!(s.find(A.as_bytes()).unwrap().topics, None);
        assert_eq!(
            s.find(B.as_bytes()).unwrap().topics,
            Some(vec!["orders".to_string(), "events".to_string()])
        );
        assert!(s.find(b"tok-cccccccccccccccc").is_none());
        assert_eq!(set("").len(), 0, "an empty file is valid: nobody gets in");
        let p = parse(&format!("{A} nowhere"), &allowed()).unwrap();
        assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
        assert!(p.warnings[0].contains("nowhere"));
    }

    #[test]
    fn malformed_files_name_the_line_and_never_the_token() {
        let secret = "sEcReT-0123456789abcdef";
        let cases = [
            (format!("{A}\nshort"), "line 2"),
            (format!("{A}\n{secret}!"), "line 2"),
            (format!("{secret} a b"), "line 1"),
            (format!("{secret} orders,,events"), "line 1"),
            (format!("{secret} {secret}/x"), "line 1"),
            (
                format!("{secret}\n\n{secret} orders"),
                "the same token as line 1",
            ),
            ("x".repeat(5000), "line 1"),
        ];
        for (text, want) in cases {
            let e = parse(&text, &allowed()).expect_err(&text);
            assert!(e.contains(want), "{e}");
            assert!(!e.contains("sEcReT"), "the error quotes the token: {e}");
        }
    }

    #[test]
    fn requests_are_checked() {
        let s = set(&format!("{A}\n{B} orders\n"));
        let bearer = |t: &str| format!("Bearer {t}").into_bytes();
        assert_eq!(check(&s, &[], "events"), Err(Denied::Missing));
        assert_eq!(
            check(&s, &[b"Basic dXNlcjpwYXNz"], "events"),
            Err(Denied::NotBearer)
        );
        assert_eq!(check(&s, &[b"Bearerxyz"], "events"), Err(Denied::NotBearer));
        assert!(matches!(
            check(&s, &[b"Bearer"], "events"),
            Err(Denied::Malformed(_))
        ));
        assert!(matches!(
            check(&s, &[b"Bearer a b"], "events"),
            Err(Denied::Malformed(_))
        ));
        assert!(matches!(
            check(&s, &[&bearer(A), &bearer(A)], "events"),
            Err(Denied::Malformed(_))
        ));
        assert_eq!(
            check(&s, &[&bearer(&format!("{A}x"))], "events"),
            Err(Denied::Unknown)
        );
        assert_eq!(
            check(&s, &[&bearer(&A[..A.len() - 1])], "events"),
            Err(Denied::Unknown)
        );
        assert_eq!(check(&s, &[&bearer(A)], "events"), Ok(()));
        assert_eq!(
            check(&s, &[format!("bEaReR  {A} ").as_bytes()], "orders"),
            Ok(())
        );
        assert_eq!(
            check(&s, &[format!("Bearer\t{A}").as_bytes()], "orders"),
            Ok(())
        );
        assert_eq!(check(&s, &[&bearer(B)], "orders"), Ok(()));
        assert_eq!(
            check(&s, &[&bearer(B)], "events"),
            Err(Denied::Forbidden("events".into()))
        );
        assert_eq!(
            check(&s, &[&bearer(B)], "not-allowed"),
            Ok(()),
            "a topic outside the allowed ones is the handler's 404"
        );
    }

    #[test]
    fn a_refusal_is_json_with_a_bearer_challenge() {
        let cases = [
            (Denied::Missing, 401, r#"Bearer realm="courier""#),
            (
                Denied::Unknown,
                401,
                r#"Bearer realm="courier", error="invalid_token""#,
            ),
            (
                Denied::Forbidden("t".into()),
                403,
                r#"Bearer realm="courier", error="insufficient_scope""#,
            ),
        ];
        for (d, status, challenge) in cases {
            let resp = d.into_response();
            assert_eq!(resp.status().as_u16(), status);
            assert_eq!(resp.headers()[header::WWW_AUTHENTICATE], challenge);
            assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
        }
    }
}
