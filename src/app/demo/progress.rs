//! The demo's progress line: live counts read from the metrics registry that the producer
//! and the consumer share, written in place on a terminal or as plain lines elsewhere.

use std::io::Write;
use std::time::Duration;

use tokio::time::Instant;

use super::setup::DemoTopics;
use crate::observability::Metrics;

/// How the demo reports progress while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressStyle {
    /// One line updated in place with a carriage return: for a terminal that nothing else
    /// writes to.
    Live,
    /// A plain line every `every`; `clear_line` first clears whatever another writer (the
    /// producer's own progress on stderr) left on the terminal's current row.
    Lines {
        /// How often.
        every: Duration,
        /// Start each line with a carriage return and an erase-line escape.
        clear_line: bool,
    },
}

/// Live counts of a demo run, read from the metrics registry that the producer and the
/// consumer share (so the progress line and `/metrics` never disagree).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct LiveCounts {
    /// Acknowledged publishes to the source topics.
    pub(crate) produced: u64,
    /// Messages processed successfully.
    pub(crate) ok: u64,
    /// Messages skipped as duplicates.
    pub(crate) duplicates: u64,
    /// Messages finished by a DLQ publish.
    pub(crate) dead_lettered: u64,
    /// Acknowledged publishes to each retry level (index 0 is level 1).
    pub(crate) retried: Vec<u64>,
    /// `courier_consumer_lag` summed over every partition.
    pub(crate) lag: i64,
    /// `courier_circuit_state`: 0 closed, 1 open, 2 half-open.
    pub(crate) circuit: i64,
    /// `courier_circuit_transitions_total{to="open"}`: how often the circuit opened.
    pub(crate) circuit_opened: u64,
}

impl LiveCounts {
    /// Reads the counts out of `metrics`.
    pub(crate) fn read(metrics: &Metrics, topics: &DemoTopics) -> Self {
        let mut c = LiveCounts {
            retried: vec![0; topics.retry_max as usize],
            ..LiveCounts::default()
        };
        for family in metrics.registry().gather() {
            for m in family.get_metric() {
                let label = |name: &str| {
                    m.get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map_or("", |l| l.value())
                };
                let count = m.get_counter().get_value() as u64;
                match family.name() {
                    "courier_messages_published_total" => {
                        c.add_published(label("topic"), count, topics)
                    }
                    "courier_messages_processed_total" => match label("outcome") {
                        "ok" => c.ok += count,
                        "duplicate" => c.duplicates += count,
                        "dlq" => c.dead_lettered += count,
                        _ => {}
                    },
                    "courier_consumer_lag" => c.lag += m.get_gauge().get_value() as i64,
                    "courier_circuit_state" => c.circuit = m.get_gauge().get_value() as i64,
                    "courier_circuit_transitions_total" if label("to") == "open" => {
                        c.circuit_opened += count
                    }
                    _ => {}
                }
            }
        }
        c
    }

    fn add_published(&mut self, topic: &str, count: u64, topics: &DemoTopics) {
        if topics.sources.iter().any(|t| t == topic) {
            self.produced += count;
        } else if let Some(n) = (topics.level(topic) as usize)
            .checked_sub(1)
            .and_then(|i| self.retried.get_mut(i))
        {
            *n += count;
        }
    }

    /// Messages finished for good: ok, duplicate or dead-lettered.
    pub(crate) fn finished(&self) -> u64 {
        self.ok + self.duplicates + self.dead_lettered
    }

    /// Produced messages not finished yet (in flight, or waiting in the retry chain).
    pub(crate) fn pending(&self) -> u64 {
        self.produced.saturating_sub(self.finished())
    }

    /// One progress line, within about 80 columns for four-digit counts. `opened_since`:
    /// how often the circuit opened since the previous line, so that an open phase between
    /// two lines still shows.
    pub(crate) fn line(&self, elapsed: Duration, opened_since: u64) -> String {
        let retried: Vec<String> = self.retried.iter().map(u64::to_string).collect();
        let circuit = match self.circuit {
            1 => "OPEN",
            2 => "half-open",
            _ if opened_since > 0 => "closed (was OPEN)",
            _ => "closed",
        };
        format!(
            "{:>6.1}s produced {} ok {} retried {} dlq {} dup {} pending {} lag {} circuit {circuit}",
            elapsed.as_secs_f64(),
            self.produced,
            self.ok,
            retried.join("/"),
            self.dead_lettered,
            self.duplicates,
            self.pending(),
            self.lag
        )
    }
}

/// Writes progress in the chosen style; writes are best-effort (a closed stdout must not
/// abandon the drain).
#[derive(Debug)]
pub(super) struct Progress {
    style: ProgressStyle,
    started: Instant,
    last: Option<Instant>,
    line_open: bool,
    /// `circuit_opened` at the previous line.
    opened_before: u64,
}

impl Progress {
    pub(super) fn new(style: ProgressStyle) -> Self {
        let now = Instant::now();
        Progress {
            style,
            started: now,
            // Plain lines start after one period; a live line at once.
            last: matches!(style, ProgressStyle::Lines { .. }).then_some(now),
            line_open: false,
            opened_before: 0,
        }
    }

    /// Writes a progress line if one is due (or `now`).
    pub(super) fn tick(&mut self, out: &mut impl Write, snap: &LiveCounts, now: bool) {
        let every = match self.style {
            ProgressStyle::Live => Duration::from_millis(250),
            ProgressStyle::Lines { every, .. } => every,
        };
        if !now && self.last.is_some_and(|t| t.elapsed() < every) {
            return;
        }
        self.last = Some(Instant::now());
        let opened_since = snap.circuit_opened.saturating_sub(self.opened_before);
        self.opened_before = snap.circuit_opened;
        let line = snap.line(self.started.elapsed(), opened_since);
        let _ = match self.style {
            ProgressStyle::Live => {
                self.line_open = true;
                write!(out, "\r\x1b[2K{line}")
            }
            ProgressStyle::Lines {
                clear_line: true, ..
            } => writeln!(out, "\r\x1b[2K{line}"),
            ProgressStyle::Lines { .. } => writeln!(out, "{line}"),
        };
        let _ = out.flush();
    }

    /// Ends a live line, so that what follows starts on a line of its own.
    pub(super) fn end_line(&mut self, out: &mut impl Write) {
        if self.line_open {
            let _ = writeln!(out);
            self.line_open = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_counts_read_the_shared_metrics() {
        let m = Metrics::new();
        let t = DemoTopics::example();
        m.messages_published
            .with_label_values(&["events"])
            .inc_by(10);
        m.messages_published
            .with_label_values(&["events-retry-2"])
            .inc_by(2);
        m.messages_published
            .with_label_values(&["events-dlq"])
            .inc();
        for (topic, outcome, n) in [
            ("events", "ok", 6),
            ("events-retry-1", "ok", 1),
            ("events", "duplicate", 2),
            ("events-retry-3", "dlq", 1),
            ("events", "retry", 3),
        ] {
            m.messages_processed
                .with_label_values(&[topic, outcome])
                .inc_by(n);
        }
        m.consumer_lag.with_label_values(&["events", "0"]).set(4);
        let c = LiveCounts::read(&m, &t);
        assert_eq!(
            (c.produced, c.ok, c.duplicates, c.dead_lettered, c.lag),
            (10, 7, 2, 1, 4)
        );
        assert_eq!(c.retried, vec![0, 2, 0]);
        assert_eq!((c.finished(), c.pending()), (10, 0));
        let line = c.line(Duration::from_secs(3), 0);
        assert!(
            line.contains("retried 0/2/0 dlq 1 dup 2 pending 0 lag 4"),
            "{line}"
        );
        assert_eq!(t.chain_delay(), Duration::from_secs(5));
    }

    #[test]
    fn an_open_phase_between_two_lines_still_shows() {
        let m = Metrics::new();
        let t = DemoTopics::example();
        let mut out = Vec::new();
        let mut p = Progress::new(ProgressStyle::Lines {
            every: Duration::from_secs(3600),
            clear_line: false,
        });
        p.tick(&mut out, &LiveCounts::read(&m, &t), true);
        // The circuit opens and closes again before the next line.
        m.circuit_transitions.with_label_values(&["open"]).inc();
        m.circuit_transitions
            .with_label_values(&["half_open"])
            .inc();
        m.circuit_transitions.with_label_values(&["closed"]).inc();
        p.tick(&mut out, &LiveCounts::read(&m, &t), true);
        p.tick(&mut out, &LiveCounts::read(&m, &t), true);
        m.circuit_state.set(1);
        p.tick(&mut out, &LiveCounts::read(&m, &t), true);
        let text = String::from_utf8(out).unwrap();
        let states: Vec<&str> = text
            .lines()
            .map(|l| l.split(" circuit ").nth(1).unwrap_or(""))
            .collect();
        assert_eq!(
            states,
            ["closed", "closed (was OPEN)", "closed", "OPEN"],
            "{text}"
        );
    }
}
