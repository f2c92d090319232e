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

/// Whether the breaker doubts a failure (see [`Breaker::settle`]).
fn suspect(v: &Verdict) -> bool {
    matches!(v, Verdict::Suspect(_))
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
    // 1 of 3, then 2 of 4: the fourth call reaches the minimum and the share. Below the
    // minimum the share cannot open it: the failure is routed at once.
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
    assert!(calls(&b, 3, unreachable).await.iter().all(suspect));
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
        if i % 20 == 0 {
            let s = match b.record(pass, &down()) {
                Verdict::Suspect(s) => s,
                // The first call: below the minimum of calls, routed at once.
                Verdict::Route if i == 0 => continue,
                v => panic!("call {i}: {v:?}"),
            };
            // The next call succeeds: the failure was the message's own.
            let pass = b.admit().await;
            assert_eq!(b.record(pass, &Ok(())), Verdict::Route);
            assert_eq!(
                futures::FutureExt::now_or_never(b.settle(s)),
                Some(Verdict::Route),
                "call {i}: routed at once"
            );
        } else {
            assert_eq!(b.record(pass, &Ok(())), Verdict::Route, "call {i}");
        }
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

/// A retryable failure that does not open the circuit waits for the endpoint to answer
/// another call after it: then it is the message's own failure, routed as usual.
#[tokio::test(start_paused = true)]
async fn a_suspect_failure_is_routed_once_the_endpoint_answers_a_later_call() {
    let b = Breaker::new(settings(), Metrics::new());
    calls(&b, 10, || Ok(())).await;
    let [Verdict::Suspect(s)] = calls(&b, 1, down).await[..] else {
        panic!("a failure below the threshold is a suspect")
    };
    let settled = {
        let b = b.clone();
        tokio::spawn(async move { (b.settle(s).await, Instant::now()) })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !settled.is_finished(),
        "no answer yet, and within the quiet gap (2.5 s): undecided"
    );
    let answered = Instant::now();
    // A refusal is an answer too: the endpoint is up.
    calls(&b, 1, || Err(ProcessError::fatal("HTTP 400"))).await;
    let (verdict, at) = settled.await.unwrap();
    assert_eq!(verdict, Verdict::Route);
    assert_eq!(at, answered, "at once");
    assert_eq!(b.state(), CircuitState::Closed);
}

/// The failures at the start of an outage open the circuit before any answer comes: every
/// suspect among them is then held like the failure that tripped it, so none is routed.
#[tokio::test(start_paused = true)]
async fn suspect_failures_are_held_when_the_circuit_opens_after_them() {
    let b = Breaker::new(settings(), Metrics::new());
    calls(&b, 3, || Ok(())).await;
    let suspects = calls(&b, 2, down).await;
    let [Verdict::Suspect(s), Verdict::Suspect(_)] = suspects[..] else {
        panic!("1 of 4, 2 of 5: {suspects:?}")
    };
    let settled = {
        let b = b.clone();
        tokio::spawn(async move { b.settle(s).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!settled.is_finished());
    assert_eq!(calls(&b, 1, down).await, vec![Verdict::Hold], "3 of 6");
    assert_eq!(b.state(), CircuitState::Open);
    assert_eq!(
        tokio::time::timeout(Duration::from_millis(1), settled)
            .await
            .expect("at once")
            .unwrap(),
        Verdict::Hold
    );
    // The verdict stands, whatever is answered later.
    calls(&b, 1, || Ok(())).await;
    assert_eq!(b.settle(s).await, Verdict::Hold);
}

/// When the traffic stops (no call in flight, none started for `window / min_calls`), nothing
/// is left to tell an outage from a per-message failure: the suspect is routed then, not
/// before.
#[tokio::test(start_paused = true)]
async fn a_suspect_failure_is_routed_once_the_traffic_stops() {
    let b = Breaker::new(settings(), Metrics::new());
    assert_eq!(b.quiet_gap(), Duration::from_millis(2500));
    calls(&b, 3, || Ok(())).await;
    let failed = Instant::now();
    let [Verdict::Suspect(s)] = calls(&b, 1, down).await[..] else {
        panic!("a suspect")
    };
    assert_eq!(b.settle(s).await, Verdict::Route);
    assert_eq!(
        failed.elapsed(),
        Duration::from_millis(2500),
        "the quiet gap"
    );
    assert_eq!(b.state(), CircuitState::Closed);
}

/// A call still in flight may yet fail and open the circuit (an endpoint that hangs until
/// its timeout): the suspect waits for it, at most one window.
#[tokio::test(start_paused = true)]
async fn a_suspect_waits_for_calls_in_flight_at_most_one_window() {
    let b = Breaker::new(settings(), Metrics::new());
    calls(&b, 3, || Ok(())).await;
    let in_flight = b.admit().await;
    let failed = Instant::now();
    let [Verdict::Suspect(s)] = calls(&b, 1, down).await[..] else {
        panic!("a suspect")
    };
    assert_eq!(b.settle(s).await, Verdict::Route);
    assert_eq!(failed.elapsed(), Duration::from_secs(10), "the window");
    drop(in_flight);
}

/// New calls keep a suspect waiting even when none has answered yet: the traffic goes on,
/// so its failures may still open the circuit.
#[tokio::test(start_paused = true)]
async fn new_calls_keep_a_suspect_waiting_past_the_quiet_gap() {
    let b = Breaker::new(settings(), Metrics::new());
    calls(&b, 3, || Ok(())).await;
    let [Verdict::Suspect(s)] = calls(&b, 1, down).await[..] else {
        panic!("a suspect")
    };
    let settled = {
        let b = b.clone();
        tokio::spawn(async move { b.settle(s).await })
    };
    // A call starts every 2 s (within the 2.5 s gap) and is still out when the next starts.
    let mut out = Vec::new();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!settled.is_finished());
        out.push(b.admit().await);
    }
    // 1 failure of 4 calls so far; the last call out fails too: 2 of 5, below half.
    let failing = out.pop().unwrap();
    assert!(matches!(b.record(failing, &down()), Verdict::Suspect(_)));
    // The other two fail: 3 of 6 opens the circuit, and the first suspect is held.
    for pass in out {
        b.record(pass, &down());
    }
    assert_eq!(b.state(), CircuitState::Open);
    assert_eq!(settled.await.unwrap(), Verdict::Hold);
}

/// A suspect that gives up waiting (its partition was revoked) leaves no waiter counted, and
/// the answers after it wake nobody.
#[tokio::test(start_paused = true)]
async fn a_suspect_that_stops_waiting_is_no_longer_counted() {
    let b = Breaker::new(settings(), Metrics::new());
    calls(&b, 3, || Ok(())).await;
    let [Verdict::Suspect(s)] = calls(&b, 1, down).await[..] else {
        panic!("a suspect")
    };
    let waiting = {
        let b = b.clone();
        tokio::spawn(async move { b.settle(s).await })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(b.inner.lock().settling, 1);
    waiting.abort();
    let _ = waiting.await;
    assert_eq!(b.inner.lock().settling, 0);
}

/// Retries (messages from a retry topic) failed before: their failures do not count toward
/// the share, so a handful of bad messages retried together, once other traffic stopped,
/// never open the circuit. A connection error or timeout counts whatever the message.
#[tokio::test(start_paused = true)]
async fn retries_do_not_count_toward_the_share_but_their_connection_errors_do() {
    let b = Breaker::new(settings(), Metrics::new());
    calls(&b, 4, || Ok(())).await;
    for i in 0..50 {
        let pass = b.admit().await.retry(true);
        let v = b.record(pass, &down());
        assert!(matches!(v, Verdict::Suspect(_)), "retry {i}: {v:?}");
    }
    assert_eq!(b.state(), CircuitState::Closed, "50 failed retries");
    // First attempts still count: 1 of 5, 2 of 6, 3 of 7, 4 of 8 opens it.
    let first: Vec<Verdict> = calls(&b, 4, down).await;
    assert_eq!(first[3], Verdict::Hold);
    assert_eq!(b.state(), CircuitState::Open);

    let b = Breaker::new(settings(), Metrics::new());
    calls(&b, 20, || Ok(())).await;
    let mut last = Verdict::Route;
    for _ in 0..4 {
        let pass = b.admit().await.retry(true);
        last = b.record(pass, &unreachable());
    }
    assert_eq!(
        last,
        Verdict::Hold,
        "4 connection errors in a row, retries or not"
    );
    assert_eq!(b.state(), CircuitState::Open);
}

/// A call already out when the suspect failed may have been served before an outage began:
/// its answer proves nothing. An answer to a call that started later routes the suspect.
#[tokio::test(start_paused = true)]
async fn only_an_answer_to_a_later_call_routes_a_suspect() {
    let b = Breaker::new(settings(), Metrics::new());
    calls(&b, 3, || Ok(())).await;
    let out_before = b.admit().await;
    let [Verdict::Suspect(s)] = calls(&b, 1, down).await[..] else {
        panic!("a suspect")
    };
    let settled = {
        let b = b.clone();
        tokio::spawn(async move { (b.settle(s).await, Instant::now()) })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(b.record(out_before, &Ok(())), Verdict::Route);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!settled.is_finished(), "an answer to an earlier call");
    let answered = Instant::now();
    calls(&b, 1, || Ok(())).await;
    assert_eq!(settled.await.unwrap(), (Verdict::Route, answered));
}
