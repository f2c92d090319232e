//! `courier demo --outage`: the demo's processor endpoint goes down mid-run; the circuit
//! breaker opens, holds the failing messages and pauses fetching, and the summary still
//! adds up with nothing dead-lettered because of the outage (DESIGN.md, guarantee 10).

use std::time::Duration;

use courier::testing::successful_output;

#[test]
fn an_outage_in_the_demo_dead_letters_nothing_and_the_summary_adds_up() {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_courier"));
    cmd.args([
        "demo",
        "--duration",
        "12s",
        "--outage",
        "4s",
        "--outage-after",
        "3s",
    ])
    .env("KAFKA_RETRY_BACKOFF", "200ms")
    .env("PROCESSOR_CIRCUIT_MIN_CALLS", "5")
    .env("PROCESSOR_CIRCUIT_OPEN_FOR", "500ms,1s")
    .env("OPS_ADDR", "127.0.0.1:0")
    .env("HTTP_ADDR", "127.0.0.1:0")
    .env("LOG_LEVEL", "warn,courier::message=off")
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().expect("the binary starts");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output = match rx.recv_timeout(Duration::from_secs(90)) {
        Ok(output) => output.expect("the binary's output"),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
            panic!("courier demo --outage did not end within 90 s");
        }
    };
    let (stdout, stderr) = successful_output(&output);
    // Open on a line, or open and closed again between two lines.
    assert!(
        stdout.contains("circuit OPEN") || stdout.contains("circuit closed (was OPEN)"),
        "the progress line shows the open circuit:\n{stdout}"
    );
    assert!(
        stderr.contains("The processor's circuit opened"),
        "one log line per transition:\n{stderr}"
    );
    let row = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("endpoint outage"))
        .unwrap_or_else(|| panic!("an outage row in:\n{stdout}"));
    let refused: u64 = row
        .split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(refused > 0, "{row}");
    assert!(!row.contains("opened 0 time"), "{row}");
    let check = stdout
        .lines()
        .find(|l| l.starts_with("produced "))
        .unwrap_or_else(|| panic!("a summary line in:\n{stdout}"));
    assert!(
        check.ends_with("0 dead-lettered because of the outage ✓"),
        "{check}"
    );
}
