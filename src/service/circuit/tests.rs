//! The breaker's state machine against tokio's paused clock.

use std::time::Duration;

use tokio::time::Instant;

use super::*;

fn settings() -> CircuitSettings {
    CircuitSettings {
        enabled: true,
        failure_ratio: 0.5,
        min_calls: 4,
        window: Duration::from_secs(10),
        open_for: (Duration::from_secs(1), Duration::from_secs(4)),
    }
}

fn down() -> Result<(), ProcessError> {
    Err(ProcessError::retryable("HTTP 503"))
}

fn unreachable() -> Result<(), ProcessError> {
    Err(ProcessError::unreachable("connection refused"))
}

/// Calls `n` times with `result`, returning the verdicts.
async fn calls(
    b: &Arc<Breaker>,
    n: usize,
    result: fn() -> Result<(), ProcessError>,
) -> Vec<Verdict> {
    let mut out = Vec::new();
    for _ in 0..n {
        let pass = b.admit().await;
        out.push(b.record(pass, &result()));
    }
    out
}

#[tokio::test(start_paused = true)]
async fn a_failure_share_over_the_minimum_calls_opens_and_holds_the_tripping_message() {
    let m = Metrics::new();
    let b = Breaker::new(settings(), m.clone());
    assert_eq!(calls(&b, 2, || Ok(())).await, vec![Verdict::Route; 2]);
    // 1 of 3, then 2 of 4: the fourth call reaches the minimum and the share.
    assert_eq!(calls(&b, 1, down).await, vec![Verdict::Route]);
    assert_eq!(b.state(), CircuitState::Closed);
    assert_eq!(calls(&b, 1, down).await, vec![Verdict::Hold]);
    assert_eq!(b.state(), CircuitState::Open);
    assert_eq!(m.circuit_state.get(), 1);
    assert_eq!(m.circuit_transitions.with_label_values(&["open"]).get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_run_of_connection_errors_opens_it_without_the_share() {
    let b = Breaker::new(settings(), Metrics::new());
    calls(&b, 20, || Ok(())).await;
    assert_eq!(calls(&b, 3, unreachable).await, vec![Verdict::Route; 3]);
    assert_eq!(
        calls(&b, 1, unreachable).await,
        vec![Verdict::Hold],
        "4 in a row"
    );
    assert_eq!(b.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn fatal_results_never_count() {
    let b = Breaker::new(settings(), Metrics::new());
    let v = calls(&b, 50, || Err(ProcessError::fatal("HTTP 400"))).await;
    assert!(v.iter().all(|v| *v == Verdict::Route));
    assert_eq!(b.state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_steady_five_percent_failure_never_trips() {
    let b = Breaker::new(settings(), Metrics::new());
    for i in 0..2000 {
        let pass = b.admit().await;
        let result = if i % 20 == 0 { down() } else { Ok(()) };
        assert_eq!(b.record(pass, &result), Verdict::Route, "call {i}");
        tokio::time::advance(Duration::from_millis(10)).await;
    }
    assert_eq!(b.state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn old_failures_leave_the_window() {
    let b = Breaker::new(settings(), Metrics::new());
    calls(&b, 1, down).await;
    calls(&b, 2, || Ok(())).await;
    tokio::time::advance(Duration::from_secs(11)).await;
    // Had the first failure stayed, this would be 2 of 4.
    assert_eq!(calls(&b, 1, down).await, vec![Verdict::Route]);
    assert_eq!(b.state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn one_probe_after_the_interval_closes_the_circuit_and_releases_every_held_call() {
    let b = Breaker::new(settings(), Metrics::new());
    calls(&b, 4, unreachable).await;
    assert_eq!(b.state(), CircuitState::Open);
    let opened = Instant::now();
    // Three held messages wait in their lanes.
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let b = b.clone();
            tokio::spawn(async move { (b.admit().await, Instant::now()) })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(999)).await;
    assert!(
        waiters.iter().all(|w| !w.is_finished()),
        "nothing goes out while open"
    );
    let mut done = Vec::new();
    let mut waiting = Vec::new();
    tokio::time::sleep(Duration::from_millis(2)).await;
    for w in waiters {
        if w.is_finished() {
            done.push(w.await.unwrap());
        } else {
            waiting.push(w);
        }
    }
    assert_eq!(done.len(), 1, "exactly one probe");
    assert_eq!(b.state(), CircuitState::HalfOpen);
    let (probe, at) = done.pop().unwrap();
    assert!(at.duration_since(opened) >= Duration::from_secs(1));
    assert_eq!(b.record(probe, &Ok(())), Verdict::Route);
    assert_eq!(b.state(), CircuitState::Closed);
    for w in waiting {
        let (pass, _) = tokio::time::timeout(Duration::from_millis(1), w)
            .await
            .expect("released at once")
            .unwrap();
        assert_eq!(b.record(pass, &Ok(())), Verdict::Route);
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_reopens_for_a_longer_interval_up_to_the_maximum() {
    let b = Breaker::new(settings(), Metrics::new());
    calls(&b, 4, unreachable).await;
    let mut intervals = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        let probe = b.admit().await;
        intervals.push(Instant::now().duration_since(start));
        assert_eq!(b.record(probe, &unreachable()), Verdict::Hold);
        assert_eq!(b.state(), CircuitState::Open);
    }
    let secs: Vec<u64> = intervals.iter().map(|d| d.as_secs()).collect();
    assert_eq!(secs, vec![1, 2, 4, 4, 4], "{intervals:?}");
}

#[tokio::test(start_paused = true)]
async fn a_probe_that_never_reports_hands_the_turn_to_the_next_held_call() {
    let b = Breaker::new(settings(), Metrics::new());
    calls(&b, 4, unreachable).await;
    let probe = b.admit().await;
    let next = {
        let b = b.clone();
        tokio::spawn(async move { b.admit().await })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(!next.is_finished(), "one probe at a time");
    drop(probe); // its message was revoked
    let pass = tokio::time::timeout(Duration::from_millis(10), next)
        .await
        .expect("the next held call becomes the probe")
        .unwrap();
    assert_eq!(b.record(pass, &Ok(())), Verdict::Route);
    assert_eq!(b.state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn the_pipeline_moves_an_open_circuit_to_half_open_when_no_call_is_held() {
    let b = Breaker::new(settings(), Metrics::new());
    let mut states = b.subscribe();
    calls(&b, 4, unreachable).await;
    assert_eq!(*states.borrow_and_update(), CircuitState::Open);
    let deadline = b.next_deadline().expect("an open circuit has a deadline");
    tokio::time::sleep_until(deadline).await;
    b.tick();
    assert_eq!(*states.borrow_and_update(), CircuitState::HalfOpen);
    assert_eq!(b.next_deadline(), None);
    // The next call, whatever message it carries, is the probe.
    let probe = b.admit().await;
    assert_eq!(b.record(probe, &Ok(())), Verdict::Route);
    assert_eq!(*states.borrow_and_update(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn switched_off_it_never_holds() {
    let mut s = settings();
    s.enabled = false;
    let b = Breaker::new(s, Metrics::new());
    assert!(calls(&b, 50, unreachable)
        .await
        .iter()
        .all(|v| *v == Verdict::Route));
    assert_eq!(b.state(), CircuitState::Closed);
}
