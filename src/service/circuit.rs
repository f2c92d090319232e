//! The circuit breaker around the processor (DESIGN.md, guarantee 10). The retry chain is
//! for a message that fails; an endpoint that is down fails every message, and without a
//! breaker each would burn through its retry levels into the DLQ.
//!
//! - **Closed**: calls go through. Retryable failures are counted in a sliding window; the
//!   circuit opens when their share reaches `PROCESSOR_CIRCUIT_FAILURE_RATIO` over at least
//!   `PROCESSOR_CIRCUIT_MIN_CALLS` calls in `PROCESSOR_CIRCUIT_WINDOW`, or after that many
//!   connection errors or timeouts in a row. Fatal results never count: an endpoint that
//!   answers 4xx is up. The share counts first attempts only: a retry (a message from a
//!   retry topic) failed before, so retries fail more often than the endpoint does, and
//!   once other traffic stops a few bad messages retried together would open the circuit
//!   and, as each other's probes, keep it open. A retry's connection error or timeout still
//!   counts toward the run.
//! - **Suspect**: a retryable failure that does not open the circuit, while the window holds
//!   at least the minimum of calls, is not routed at once. It is a per-message failure only
//!   once the endpoint answers another call after it; an outage answers none, and its
//!   failures pile up until the circuit opens. So the message waits, off its lane, for
//!   [`Breaker::settle`]: an answer to a call that started after it routes it as usual; the circuit
//!   opening holds it like any other. It is routed too when the traffic stops: no call in
//!   flight and none started for `window / min_calls` (the gap between calls of the
//!   slowest traffic the share can judge), and in any case after one window. Below the
//!   minimum of calls the share cannot open the circuit anyway: the failure is routed at
//!   once.
//! - **Open**: no call goes out. A message whose retryable failure tripped the circuit, or
//!   came in while it was open, is *held*: its lane waits and calls again once the circuit
//!   closes, so it is neither routed nor committed, its retry level does not advance and its
//!   due time is kept. The pipeline pauses fetching on every partition meanwhile.
//! - **Half-open**: after an interval (exponential, from the first to the second value of
//!   `PROCESSOR_CIRCUIT_OPEN_FOR`), one held message goes out as a probe. Success closes the
//!   circuit and every held message goes out again; failure reopens it for the next interval.
//!
//! Time is tokio's, so tests drive the state machine with a paused clock.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use parking_lot::Mutex;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::observability::events::CircuitTransition;
use crate::observability::Metrics;
use crate::service::processor::ProcessError;

pub use crate::observability::events::CircuitState;

/// The breaker's settings (`PROCESSOR_CIRCUIT*`).
#[derive(Debug, Clone, PartialEq)]
pub struct CircuitSettings {
    /// `PROCESSOR_CIRCUIT`: off restores the plain retry chain.
    pub enabled: bool,
    /// Share of retryable failures in the window that opens the circuit.
    pub failure_ratio: f64,
    /// Calls the window needs before the share counts; also the run of connection errors
    /// or timeouts that opens it at once.
    pub min_calls: u32,
    /// The sliding window.
    pub window: Duration,
    /// The first and the longest interval before a probe.
    pub open_for: (Duration, Duration),
}

impl CircuitSettings {
    /// A breaker that never opens (`PROCESSOR_CIRCUIT=off`): the plain retry chain.
    pub fn off() -> Self {
        CircuitSettings {
            enabled: false,
            failure_ratio: 1.0,
            min_calls: 1,
            window: Duration::from_secs(1),
            open_for: (Duration::from_secs(1), Duration::from_secs(1)),
        }
    }
}

/// Buckets of the sliding window.
const BUCKETS: u32 = 10;

/// Calls and retryable failures in a sliding window of buckets.
#[derive(Debug)]
struct Window {
    width: Duration,
    buckets: std::collections::VecDeque<(Instant, u32, u32)>,
}

impl Window {
    fn new(window: Duration) -> Self {
        Window {
            width: (window / BUCKETS).max(Duration::from_millis(1)),
            buckets: std::collections::VecDeque::new(),
        }
    }

    fn record(&mut self, now: Instant, failed: bool) {
        let horizon = self.width * BUCKETS;
        while self
            .buckets
            .front()
            .is_some_and(|(start, _, _)| now.saturating_duration_since(*start) >= horizon)
        {
            self.buckets.pop_front();
        }
        match self.buckets.back_mut() {
            Some((start, calls, failures))
                if now.saturating_duration_since(*start) < self.width =>
            {
                *calls += 1;
                *failures += u32::from(failed);
            }
            _ => self.buckets.push_back((now, 1, u32::from(failed))),
        }
    }

    fn totals(&self) -> (u32, u32) {
        self.buckets
            .iter()
            .fold((0, 0), |(c, f), (_, calls, failures)| {
                (c + calls, f + failures)
            })
    }

    fn clear(&mut self) {
        self.buckets.clear();
    }
}

#[derive(Debug)]
struct Inner {
    state: CircuitState,
    window: Window,
    consecutive_unreachable: u32,
    reopen_at: Option<Instant>,
    probe_out: bool,
    intervals: backon::ExponentialBackoff,
    last_error: String,
    /// The newest start (see [`Pass`]'s `seq`) of a call the endpoint answered (a success
    /// or a fatal refusal).
    answered: u64,
    /// Times the circuit opened, ever.
    opened: u64,
    /// Suspects waiting in [`Breaker::settle`]: an answer wakes them only when there are.
    settling: u32,
}

/// How a call was let through.
#[derive(Debug)]
pub struct Pass {
    probe: bool,
    breaker: Arc<Breaker>,
    recorded: bool,
    retry: bool,
    /// The call's place in the order calls started (1, 2, …).
    seq: u64,
}

impl Pass {
    /// Marks the call as a retry of a message that failed before (it came from a retry
    /// topic): its result does not count toward the failure share (see [`Breaker`]).
    pub fn retry(mut self, retry: bool) -> Self {
        self.retry = retry;
        self
    }
}

impl Drop for Pass {
    /// A probe that never reported (its message was revoked or shut down) gives the turn
    /// to the next held message at once.
    fn drop(&mut self) {
        if !self.recorded {
            self.breaker.finished.fetch_add(1, Ordering::Relaxed);
        }
        if self.probe && !self.recorded {
            let mut inner = self.breaker.inner.lock();
            if inner.state == CircuitState::HalfOpen && inner.probe_out {
                inner.probe_out = false;
                drop(inner);
                self.breaker.wake.notify_waiters();
            }
        }
    }
}

/// What the worker does with a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// As usual: finished, or routed to a retry topic or the DLQ.
    Route,
    /// Held: wait for the circuit and call again with the same message.
    Hold,
    /// A retryable failure while the circuit is closed: per-message or the start of an
    /// outage? [`Breaker::settle`] tells (`Route` or `Hold`).
    Suspect(Suspect),
}

/// Where the breaker stood when a suspect failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Suspect {
    /// Calls started when it failed: an answer to a call that started later settles it.
    started: u64,
    opened: u64,
    until: Instant,
}

/// The circuit breaker of one consumer process.
#[derive(Debug)]
pub struct Breaker {
    settings: CircuitSettings,
    /// Whether the state is `Closed` (or the breaker is off): the lock-free fast path of
    /// [`Breaker::admit`]. Written only under `inner`'s lock, with the state.
    closed: AtomicBool,
    inner: Mutex<Inner>,
    wake: Notify,
    /// Wakes suspects: an answer was recorded, or the circuit opened.
    settled: Notify,
    /// Calls let through, ever, and calls that reported (or gave up), ever: whether any
    /// call is in flight or started lately, which a suspect watches.
    started: AtomicU64,
    finished: AtomicU64,
    state_tx: watch::Sender<CircuitState>,
    metrics: Metrics,
}

fn intervals(open_for: (Duration, Duration)) -> backon::ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(open_for.0)
        .with_max_delay(open_for.1.max(open_for.0))
        .without_max_times()
        .build()
}

impl Breaker {
    /// A closed breaker.
    pub fn new(settings: CircuitSettings, metrics: Metrics) -> Arc<Self> {
        let (state_tx, _) = watch::channel(CircuitState::Closed);
        metrics.emit(CircuitTransition::initial());
        Arc::new(Breaker {
            inner: Mutex::new(Inner {
                state: CircuitState::Closed,
                window: Window::new(settings.window),
                consecutive_unreachable: 0,
                reopen_at: None,
                probe_out: false,
                intervals: intervals(settings.open_for),
                last_error: String::new(),
                answered: 0,
                opened: 0,
                settling: 0,
            }),
            settings,
            closed: AtomicBool::new(true),
            wake: Notify::new(),
            settled: Notify::new(),
            started: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            state_tx,
            metrics,
        })
    }

    /// The current state.
    pub fn state(&self) -> CircuitState {
        self.inner.lock().state
    }

    /// When the open circuit lets a probe out (the pipeline calls [`Breaker::tick`] then).
    pub fn next_deadline(&self) -> Option<Instant> {
        let inner = self.inner.lock();
        inner
            .reopen_at
            .filter(|_| inner.state == CircuitState::Open)
    }

    /// Moves an open circuit whose interval passed to half-open: the next call, a held
    /// message's or a newly fetched one's, is the probe.
    pub fn tick(&self) {
        let mut inner = self.inner.lock();
        if inner.state == CircuitState::Open && inner.reopen_at.is_some_and(|t| Instant::now() >= t)
        {
            self.transition(
                &mut inner,
                CircuitState::HalfOpen,
                "the probe interval passed",
            );
            drop(inner);
            self.wake.notify_waiters();
        }
    }

    /// Follows the state (the pipeline pauses fetching while it is open).
    pub fn subscribe(&self) -> watch::Receiver<CircuitState> {
        self.state_tx.subscribe()
    }

    /// A pass at once while the circuit is closed (or the breaker is off), without a lock
    /// or a wait; `None` otherwise, and the caller then awaits [`Breaker::admit`].
    pub fn try_admit(self: &Arc<Self>) -> Option<Pass> {
        (!self.settings.enabled || self.closed.load(Ordering::Acquire)).then(|| self.pass(false))
    }

    /// Waits until a call may go out: at once while closed; while open, until the probe
    /// interval has passed and this caller is the probe, or until the circuit closes.
    pub async fn admit(self: &Arc<Self>) -> Pass {
        if let Some(pass) = self.try_admit() {
            return pass;
        }
        loop {
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let wait_until = {
                let mut inner = self.inner.lock();
                if !self.settings.enabled || inner.state == CircuitState::Closed {
                    return self.pass(false);
                }
                let now = Instant::now();
                let due = inner.reopen_at.is_some_and(|t| now >= t);
                if inner.state == CircuitState::Open && due {
                    self.transition(
                        &mut inner,
                        CircuitState::HalfOpen,
                        "the probe interval passed",
                    );
                }
                if inner.state == CircuitState::HalfOpen && !inner.probe_out {
                    inner.probe_out = true;
                    return self.pass(true);
                }
                inner
                    .reopen_at
                    .filter(|_| inner.state == CircuitState::Open)
            };
            match wait_until {
                Some(t) => {
                    tokio::select! {
                        _ = woken => {}
                        _ = tokio::time::sleep_until(t) => {}
                    }
                }
                None => woken.await,
            }
        }
    }

    fn pass(self: &Arc<Self>, probe: bool) -> Pass {
        let seq = self.started.fetch_add(1, Ordering::Relaxed) + 1;
        Pass {
            probe,
            breaker: self.clone(),
            recorded: false,
            retry: false,
            seq,
        }
    }

    /// Records a call's result and says what to do with its message.
    pub fn record(&self, mut pass: Pass, result: &Result<(), ProcessError>) -> Verdict {
        pass.recorded = true;
        self.finished.fetch_add(1, Ordering::Relaxed);
        if !self.settings.enabled {
            return Verdict::Route;
        }
        let mut inner = self.inner.lock();
        let now = Instant::now();
        let (failed, unreachable) = match result {
            Err(ProcessError::Retryable {
                unreachable,
                reason,
                ..
            }) => {
                inner.last_error = reason.clone();
                (true, *unreachable)
            }
            // An answer, even a refusal, means the endpoint is up.
            Ok(()) | Err(ProcessError::Fatal(_)) => (false, false),
        };
        if !failed {
            inner.answered = inner.answered.max(pass.seq);
            if inner.settling > 0 {
                self.settled.notify_waiters();
            }
        }
        match inner.state {
            CircuitState::Closed => self.record_closed(&mut inner, &pass, now, failed, unreachable),
            CircuitState::HalfOpen if pass.probe => {
                inner.probe_out = false;
                if failed {
                    self.open(&mut inner, now, "the probe failed");
                    Verdict::Hold
                } else {
                    inner.window.clear();
                    inner.consecutive_unreachable = 0;
                    inner.intervals = intervals(self.settings.open_for);
                    inner.reopen_at = None;
                    self.transition(&mut inner, CircuitState::Closed, "the probe succeeded");
                    drop(inner);
                    self.wake.notify_waiters();
                    Verdict::Route
                }
            }
            // A call let through before the circuit opened.
            CircuitState::Open | CircuitState::HalfOpen if failed => Verdict::Hold,
            CircuitState::Open | CircuitState::HalfOpen => Verdict::Route,
        }
    }

    /// [`Breaker::record`] while the circuit is closed: counts the call, and opens the
    /// circuit when the share or the run of connection errors says so.
    fn record_closed(
        &self,
        inner: &mut Inner,
        pass: &Pass,
        now: Instant,
        failed: bool,
        unreachable: bool,
    ) -> Verdict {
        // Retries are the failing subset by construction: counted, a handful of bad
        // messages would open the circuit once other traffic stops.
        if !pass.retry {
            inner.window.record(now, failed);
        }
        inner.consecutive_unreachable = if unreachable {
            inner.consecutive_unreachable + 1
        } else {
            0
        };
        if !failed {
            return Verdict::Route;
        }
        let (calls, failures) = inner.window.totals();
        let ratio = f64::from(failures) / f64::from(calls.max(1));
        let reason = if calls >= self.settings.min_calls && ratio >= self.settings.failure_ratio {
            format!("{failures} of the last {calls} calls failed")
        } else if inner.consecutive_unreachable >= self.settings.min_calls {
            format!(
                "{} connection errors or timeouts in a row",
                inner.consecutive_unreachable
            )
        } else if calls < self.settings.min_calls {
            // Too little traffic for the share to count: nothing to wait for.
            return Verdict::Route;
        } else {
            return Verdict::Suspect(Suspect {
                started: self.started.load(Ordering::Relaxed),
                opened: inner.opened,
                until: now + self.settings.window,
            });
        };
        self.open(inner, now, &reason);
        Verdict::Hold
    }

    /// Waits until a suspect failure is settled: `Route` once the endpoint answered a call
    /// that started after it failed (a per-message failure; a call already out when it
    /// failed proves nothing, it may have been served before an outage began), `Hold` once the circuit opened after it
    /// (the outage claims it: call again when the circuit lets it), `Route` when the traffic
    /// stopped (no call in flight and none started for [`Breaker::quiet_gap`]: nothing is
    /// left to tell) or when the window passes with neither.
    pub async fn settle(&self, suspect: Suspect) -> Verdict {
        let _waiting = Settling::enter(self);
        let gap = self.quiet_gap();
        let mut started = self.started.load(Ordering::Relaxed);
        let mut quiet_from = Instant::now();
        loop {
            let woken = self.settled.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            {
                let inner = self.inner.lock();
                if inner.opened != suspect.opened {
                    return Verdict::Hold;
                }
                if inner.answered > suspect.started || Instant::now() >= suspect.until {
                    return Verdict::Route;
                }
            }
            let now = Instant::now();
            let started_now = self.started.load(Ordering::Relaxed);
            if started_now != started {
                started = started_now;
                quiet_from = now;
            } else if now >= quiet_from + gap
                && self.finished.load(Ordering::Relaxed) == started_now
            {
                return Verdict::Route;
            }
            let next = (quiet_from + gap).max(now + gap / 4).min(suspect.until);
            tokio::select! {
                _ = woken => {}
                _ = tokio::time::sleep_until(next) => {}
            }
        }
    }

    /// How long without a new call means the traffic stopped, for a suspect: the gap
    /// between calls of the slowest traffic whose failure share can open the circuit
    /// (`min_calls` in a window).
    pub fn quiet_gap(&self) -> Duration {
        self.settings.window / self.settings.min_calls.max(1)
    }

    fn open(&self, inner: &mut Inner, now: Instant, reason: &str) {
        let interval = inner.intervals.next().unwrap_or(self.settings.open_for.1);
        inner.reopen_at = Some(now + interval);
        inner.opened += 1;
        let reason = format!("{reason}; the next probe in {} ms", interval.as_millis());
        self.transition(inner, CircuitState::Open, &reason);
        if inner.settling > 0 {
            self.settled.notify_waiters();
        }
    }

    fn transition(&self, inner: &mut Inner, to: CircuitState, reason: &str) {
        let from = inner.state;
        inner.state = to;
        self.closed
            .store(to == CircuitState::Closed, Ordering::Release);
        self.metrics.emit(CircuitTransition {
            from,
            to,
            reason,
            last_error: &inner.last_error,
        });
        self.state_tx.send_replace(to);
    }
}

/// Counts a suspect in [`Breaker::settle`] for as long as it waits.
struct Settling<'a>(&'a Breaker);

impl<'a> Settling<'a> {
    fn enter(breaker: &'a Breaker) -> Self {
        breaker.inner.lock().settling += 1;
        Settling(breaker)
    }
}

impl Drop for Settling<'_> {
    fn drop(&mut self) {
        self.0.inner.lock().settling -= 1;
    }
}

#[cfg(test)]
mod tests;
