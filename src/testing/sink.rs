//! The HTTP endpoint courier's `http` processor posts to in a test: it answers each
//! `message-id` as the test scripts it (succeed, fail so many times, refuse for good, never
//! answer) and records every request: when it came, from which process (the URL path each
//! consumer process is given), the status, and the `courier-due-at-ms` of a retry.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use parking_lot::Mutex;

use crate::model::{HEADER_DUE_AT_MS, HEADER_MESSAGE_ID};

/// What the sink does with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Answer with this status.
    Status(u16),
    /// Never answer (the request stays in flight until the client gives up).
    Hang,
    /// Not one of the test's messages: 200, counted in [`SinkState::strays`] only.
    Stray,
}

/// The script: the reply to the `attempt`-th request (1-based) for a `message-id`.
type Script = dyn Fn(&str, u32) -> Reply + Send + Sync;

/// One request the sink answered (or holds).
#[derive(Debug, Clone)]
pub struct SinkRequest {
    /// Its `message-id` header (empty when it had none).
    pub id: String,
    /// The URL path it was posted to (one per consumer process, if the test wants).
    pub path: String,
    /// When it arrived.
    pub at: Instant,
    /// When it arrived, wall clock ms (to compare with `courier-due-at-ms`).
    pub at_ms: i64,
    /// The answer's status (0: never answered).
    pub status: u16,
    /// Its `courier-due-at-ms` header: the due time of a retry.
    pub due_at_ms: Option<i64>,
}

impl SinkRequest {
    /// A final answer: the message is processed (2xx) or goes to the DLQ (400).
    pub fn is_final(&self) -> bool {
        self.status == 200 || self.status == 400
    }
}

/// What the sink has seen.
#[derive(Debug, Default)]
pub struct SinkState {
    /// Requests per id so far (strays not counted).
    pub attempts: HashMap<String, u32>,
    /// 200 answers per id.
    pub ok: HashMap<String, u32>,
    /// Every request recorded, in order.
    pub log: Vec<SinkRequest>,
    /// Requests the script called [`Reply::Stray`].
    pub strays: u32,
}

/// A scripted HTTP endpoint on a loopback port of its own, serving until the test's
/// runtime ends.
pub struct HttpSink {
    script: Box<Script>,
    latency: Duration,
    record_on_answer: bool,
    /// What it has seen so far.
    pub state: Mutex<SinkState>,
}

impl HttpSink {
    /// A sink that answers by `script`, recording each request as it arrives and then
    /// taking `latency` to answer, like a real endpoint: a process killed meanwhile loses
    /// the answer to work the sink has done.
    pub fn new(
        script: impl Fn(&str, u32) -> Reply + Send + Sync + 'static,
        latency: Duration,
    ) -> HttpSink {
        HttpSink {
            script: Box::new(script),
            latency,
            record_on_answer: false,
            state: Mutex::new(SinkState::default()),
        }
    }

    /// Records a request only when it is answered, after the latency (a request never
    /// answered is never recorded).
    pub fn record_on_answer(mut self) -> HttpSink {
        self.record_on_answer = true;
        self
    }

    /// Serves on a free loopback port: its base URL (`http://127.0.0.1:port/`); any path
    /// below it is answered alike.
    pub async fn start(self) -> (String, Arc<HttpSink>) {
        let sink = Arc::new(self);
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(sink.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the sink");
        let url = format!("http://{}/", listener.local_addr().expect("its address"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, sink)
    }

    /// The ids answered 200 so far, in order.
    pub fn ok_ids(&self) -> Vec<String> {
        let st = self.state.lock();
        st.log
            .iter()
            .filter(|r| r.status == 200)
            .map(|r| r.id.clone())
            .collect()
    }

    /// Counts one request and decides its reply; records it now unless it is recorded
    /// on answer.
    fn arrive(&self, request: SinkRequest) -> (Reply, Option<SinkRequest>) {
        let mut st = self.state.lock();
        let attempt = st.attempts.get(&request.id).copied().unwrap_or(0) + 1;
        let reply = (self.script)(&request.id, attempt);
        let status = match reply {
            Reply::Stray => {
                st.strays += 1;
                return (reply, None);
            }
            Reply::Hang => 0,
            Reply::Status(s) => s,
        };
        st.attempts.insert(request.id.clone(), attempt);
        let request = SinkRequest { status, ..request };
        if self.record_on_answer {
            return (reply, Some(request));
        }
        Self::record(&mut st, request);
        (reply, None)
    }

    fn record(st: &mut SinkState, request: SinkRequest) {
        if request.status == 200 {
            *st.ok.entry(request.id.clone()).or_default() += 1;
        }
        st.log.push(request);
    }
}

async fn handle(State(sink): State<Arc<HttpSink>>, uri: Uri, headers: HeaderMap) -> StatusCode {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let request = SinkRequest {
        id: text(HEADER_MESSAGE_ID).unwrap_or_default(),
        path: uri.path().to_owned(),
        at: Instant::now(),
        at_ms: crate::model::now_ms(),
        status: 0,
        due_at_ms: text(HEADER_DUE_AT_MS).and_then(|v| v.parse().ok()),
    };
    let (reply, later) = sink.arrive(request);
    if reply == Reply::Hang {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(sink.latency).await;
    if let Some(request) = later {
        HttpSink::record(&mut sink.state.lock(), request);
    }
    match reply {
        Reply::Status(s) => StatusCode::from_u16(s).expect("a valid status"),
        _ => StatusCode::OK,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::http::{http_request, try_http_get};

    /// A POST with the headers courier's `http` processor sends (the test client sends
    /// none of its own).
    async fn post(url: &str, id: &str) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let rest = url.strip_prefix("http://").unwrap();
        let (host, path) = rest.split_once('/').unwrap();
        let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
        let req = format!(
            "POST /{path} HTTP/1.1\r\nHost: {host}\r\nmessage-id: {id}\r\n\
             courier-due-at-ms: 5\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.unwrap();
        buf.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[tokio::test]
    async fn answers_by_script_and_records_every_request() {
        let (url, sink) = HttpSink::new(
            |id, attempt| match id {
                "flaky" if attempt <= 2 => Reply::Status(500),
                "bad" => Reply::Status(400),
                "" => Reply::Stray,
                _ => Reply::Status(200),
            },
            Duration::ZERO,
        )
        .start()
        .await;
        assert_eq!(post(&format!("{url}1"), "flaky").await, 500);
        assert_eq!(post(&format!("{url}2"), "flaky").await, 500);
        assert_eq!(post(&format!("{url}2"), "flaky").await, 200);
        assert_eq!(post(&url, "bad").await, 400);
        assert_eq!(http_request("POST", &url, None, b"").await.0, 200);
        let st = sink.state.lock();
        assert_eq!(st.attempts["flaky"], 3);
        assert_eq!(st.ok.get("flaky"), Some(&1));
        assert_eq!(st.strays, 1);
        let paths: Vec<&str> = st.log.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(paths, ["/1", "/2", "/2", "/"]);
        assert!(st.log.iter().all(|r| r.due_at_ms == Some(5)));
        assert!(!st.log[0].is_final() && st.log[2].is_final() && st.log[3].is_final());
    }

    #[tokio::test]
    async fn records_on_answer_and_never_answers_a_hang() {
        let (url, sink) = HttpSink::new(
            |id, _| {
                if id == "held" {
                    Reply::Hang
                } else {
                    Reply::Status(200)
                }
            },
            Duration::from_millis(50),
        )
        .record_on_answer()
        .start()
        .await;
        let held = tokio::spawn({
            let url = url.clone();
            async move { post(&url, "held").await }
        });
        assert_eq!(post(&url, "a").await, 200);
        assert_eq!(sink.ok_ids(), vec!["a".to_owned()]);
        assert!(try_http_get(&url, Duration::from_secs(5)).await.is_some());
        assert!(!held.is_finished(), "the held request is never answered");
        held.abort();
    }
}
