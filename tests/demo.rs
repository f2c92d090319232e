//! `courier demo` end to end: the library entry with short delays (the numbers add up, the
//! retry chain, the DLQ and dedupe all show, `/metrics` answers during the run), and the
//! real binary with `--duration`.

mod common;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use courier::app::demo::{self, DemoOptions, ProgressStyle};
use courier::config::Config;
use courier::service::demo::{DrainEnd, FailurePlan};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

/// A writer the test can read while the demo writes to it.
#[derive(Clone, Default)]
struct SharedOut(Arc<Mutex<Vec<u8>>>);

impl SharedOut {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock()).into_owned()
    }
}

impl Write for SharedOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The configuration of a demo test: the defaults, short delays, port 0 everywhere (the
/// demo brings its own broker and topics, so names need not be unique).
fn config() -> Config {
    let env: Vec<(String, String)> = [
        ("KAFKA_RETRY_BACKOFF", "200ms,300ms,400ms"),
        ("OPS_ADDR", "127.0.0.1:0"),
        ("HTTP_ADDR", "127.0.0.1:0"),
        ("KAFKA_CONSUMER_COMMIT_INTERVAL_MS", "200"),
        ("KAFKA_PRODUCER_LINGER_MS", "0"),
        ("RDKAFKA_SESSION_TIMEOUT_MS", "6000"),
        ("RDKAFKA_HEARTBEAT_INTERVAL_MS", "500"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    Config::load_from(None, &env).expect("test configuration is valid")
}

/// The `/metrics` URL from the demo's banner, once it is printed.
async fn metrics_url(out: &SharedOut) -> String {
    let mut url = None;
    common::wait_for("the banner", Duration::from_secs(20), || {
        url = out.text().lines().find_map(|l| {
            let l = l.trim_start().strip_prefix("metrics")?;
            l.split_whitespace().next().map(str::to_owned)
        });
        url.is_some()
    })
    .await;
    url.expect("found above")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_adds_up_and_shows_every_path() {
    courier::observability::logging::init_for_tests();
    let out = SharedOut::default();
    let opts = DemoOptions {
        duration: Some(Duration::from_secs(4)),
        rate: 100.0,
        failures: FailurePlan {
            transient_share: 0.2,
            permanent_share: 0.1,
        },
        duplicate_share: 0.1,
        progress: ProgressStyle::Lines {
            every: Duration::from_secs(1),
            clear_line: false,
        },
        stop_draining: CancellationToken::new(),
    };
    let run = tokio::spawn(demo::run(
        config(),
        opts,
        CancellationToken::new(),
        out.clone(),
    ));
    let url = metrics_url(&out).await;
    let (status, body) = common::http_get(&url).await;
    assert_eq!(status, 200, "{url} answers during the run");
    assert!(body.contains("courier_messages_processed_total") || body.contains("# TYPE courier_"));
    // The counters move while the demo runs.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = common::http_get(&url).await;
        assert_eq!(status, 200);
        if body.contains("courier_messages_published_total{topic=\"events\"}") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no publishes in /metrics: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let summary = tokio::time::timeout(Duration::from_secs(40), run)
        .await
        .expect("the demo ends within its drain bound")
        .expect("the demo task does not panic")
        .expect("the demo runs");
    let text = out.text();
    assert_eq!(summary.drain, DrainEnd::Complete, "{text}");
    assert!(summary.adds_up(), "{summary:?}\n{text}");
    assert!(
        summary.produced >= 200,
        "about 400 events in 4 s: {summary:?}"
    );
    assert!(
        summary.retried[0] > 0 && summary.retried[2] > 0,
        "{summary:?}"
    );
    assert!(summary.ok_after_retry > 0, "{summary:?}");
    assert!(
        summary.dead_lettered > 0 && summary.fatal > 0,
        "{summary:?}"
    );
    assert!(
        summary.dead_lettered > summary.fatal,
        "some exhausted: {summary:?}"
    );
    assert!(summary.duplicates > 0, "{summary:?}");
    assert_eq!(summary.abandoned, 0);
    assert!(text.contains(&summary.check_line()), "{text}");
    assert!(summary.check_line().ends_with('✓'));
    assert!(text.contains("kcat -C -b 127.0.0.1:"), "{text}");
}

/// Runs the courier binary with `args` and `env`, killing it after `timeout`.
fn run_binary(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_courier"));
    cmd.args(args)
        .env_remove("COURIER_CONFIG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("the binary starts");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(output) => output.expect("the binary's output"),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
            panic!("courier {args:?} did not end within {timeout:?}");
        }
    }
}

#[test]
fn the_binary_runs_for_its_duration_and_adds_up() {
    let output = run_binary(
        &["demo", "--duration", "3s"],
        &[
            ("KAFKA_RETRY_BACKOFF", "200ms"),
            ("OPS_ADDR", "127.0.0.1:0"),
            ("HTTP_ADDR", "127.0.0.1:0"),
            ("LOG_LEVEL", "error,courier::service::worker=off"),
        ],
        Duration::from_secs(45),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    let check = stdout
        .lines()
        .find(|l| l.starts_with("produced "))
        .unwrap_or_else(|| panic!("a summary line in:\n{stdout}"));
    assert!(check.ends_with('✓'), "{check}");
    let numbers: Vec<u64> = check
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(numbers.len(), 4, "{check}");
    assert!(numbers[0] > 0, "{check}");
    assert_eq!(numbers[0], numbers[1] + numbers[2] + numbers[3], "{check}");
    assert!(stdout.contains("The --duration is over"), "{stdout}");
}

#[test]
fn bad_flags_name_the_flag() {
    let quick = Duration::from_secs(20);
    let local = [("OPS_ADDR", "127.0.0.1:0"), ("HTTP_ADDR", "127.0.0.1:0")];
    let output = run_binary(
        &[
            "demo",
            "--transient-share",
            "0.7",
            "--permanent-share",
            "0.5",
        ],
        &local,
        quick,
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--permanent-share=0.5"), "{stderr}");
    let output = run_binary(&["demo", "--duplicate-share", "2"], &local, quick);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--duplicate-share"), "{stderr}");
    let output = run_binary(&["demo", "--duration", "soon"], &local, quick);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--duration"), "{stderr}");
}
