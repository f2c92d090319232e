//! The demo's summary: how its drain ended, and a table whose numbers must add up (every
//! produced message processed ok, skipped as a duplicate, or dead-lettered).

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use super::setup::DemoTopics;
use crate::service::pipeline::ConsumerSummary;

/// How the demo's drain ended: only a complete drain can add up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainEnd {
    /// Every produced message was finished.
    Complete,
    /// The user stopped waiting (Ctrl-C).
    Interrupted,
    /// The wait hit its limit (the retry chain's delays plus slack).
    TimedOut,
    /// The consumer stopped by itself.
    ConsumerStopped,
}

impl std::fmt::Display for DrainEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DrainEnd::Complete => "the drain finished every message",
            DrainEnd::Interrupted => "the drain was interrupted",
            DrainEnd::TimedOut => "the drain hit its time limit",
            DrainEnd::ConsumerStopped => "the consumer stopped by itself",
        })
    }
}

/// The outcome of a demo run: the numbers of its summary table.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoSummary {
    /// Messages acknowledged on the source topics (generated and sent to the ingest API).
    pub produced: u64,
    /// Of `produced`, the generator's.
    pub generated: u64,
    /// Generated events that re-used an earlier id.
    pub resent_ids: u64,
    /// Messages processed successfully (each counted once, at its successful attempt).
    pub ok: u64,
    /// Of `ok`, those that succeeded on a retry topic.
    pub ok_after_retry: u64,
    /// Messages skipped because their `message-id` was already processed (or in progress).
    pub duplicates: u64,
    /// Messages published to the DLQ.
    pub dead_lettered: u64,
    /// Of `dead_lettered`, the processor's fatal failures (the rest exhausted the retries).
    pub fatal: u64,
    /// Messages sent to each retry level: index 0 is `{prefix}-1`.
    pub retried: Vec<u64>,
    /// Messages left unfinished when the consumer stopped (consumed again after a restart).
    pub abandoned: u64,
    /// Processor calls (every attempt of every message).
    pub processor_calls: u64,
    /// How long events were generated.
    pub ran_for: Duration,
    /// How long the drain took.
    pub drained_in: Duration,
    /// How the drain ended.
    pub drain: DrainEnd,
    /// The `/metrics` URL served during the run.
    pub metrics_url: String,
    /// The ingest API's address.
    pub ingest_addr: SocketAddr,
    /// What the `--outage` did, when there was one.
    pub outage: Option<OutageSummary>,
}

/// What an endpoint outage (`courier demo --outage`) did.
#[derive(Debug, Clone, PartialEq)]
pub struct OutageSummary {
    /// How long the endpoint was down.
    pub length: Duration,
    /// Calls it refused.
    pub refused_calls: u64,
    /// Times the circuit opened.
    pub circuit_opened: u64,
    /// Messages the outage sent on to a retry topic and, in the end, the DLQ (0 while the
    /// circuit breaker is on).
    pub dead_lettered: u64,
}

impl DemoSummary {
    /// Whether every produced message is accounted for exactly once: ok, duplicate or DLQ.
    pub fn adds_up(&self) -> bool {
        self.produced == self.ok + self.duplicates + self.dead_lettered
            && self.outage.as_ref().is_none_or(|o| o.dead_lettered == 0)
    }

    /// The accounting as one line, ending in ✓ when it adds up and ✗ (with why) when not.
    pub fn check_line(&self) -> String {
        let sum = format!(
            "ok {} + duplicates {} + dead-lettered {}",
            self.ok, self.duplicates, self.dead_lettered
        );
        let outage = match &self.outage {
            Some(o) if o.dead_lettered > 0 => {
                return format!(
                    "produced {} = {sum}, but {} dead-lettered because of the outage ✗",
                    self.produced, o.dead_lettered
                )
            }
            Some(_) => ", 0 dead-lettered because of the outage",
            None => "",
        };
        if self.adds_up() {
            return format!("produced {} = {sum}{outage} ✓", self.produced);
        }
        let finished = self.ok + self.duplicates + self.dead_lettered;
        let why = if finished < self.produced {
            let cut = match self.drain {
                DrainEnd::Complete => String::new(),
                end => format!(": {end}"),
            };
            format!("{} not finished{cut}", self.produced - finished)
        } else {
            format!("{} finished more than once", finished - self.produced)
        };
        format!("produced {} ≠ {sum} ✗ ({why})", self.produced)
    }

    /// Adds the consumer's per-partition counts (its shutdown summary).
    pub(super) fn add_partitions(&mut self, summary: &ConsumerSummary, topics: &DemoTopics) {
        for (tp, p) in summary {
            let level = topics.level(&tp.topic);
            self.ok += p.ok;
            if level > 0 {
                self.ok_after_retry += p.ok;
            }
            self.duplicates += p.duplicates;
            self.dead_lettered += p.dead_lettered;
            self.abandoned += p.abandoned;
            // A retry from level L goes to level L + 1, at index L.
            if let Some(n) = self.retried.get_mut(level as usize) {
                *n += p.retried;
            }
        }
    }

    /// The rows of the summary table: what, how many, and a note.
    fn rows(&self, topics: &DemoTopics) -> Vec<(String, u64, String)> {
        let row = |what: &str, n: u64, note: String| (what.to_owned(), n, note);
        let via_api = self.produced.saturating_sub(self.generated);
        let sources = topics.sources.join(",");
        let mut rows = vec![
            row(
                "produced",
                self.produced,
                format!(
                    "on {sources} ({} generated, {via_api} via the ingest API)",
                    self.generated
                ),
            ),
            row(
                "processed ok",
                self.ok,
                format!("{} of them on a retry", self.ok_after_retry),
            ),
        ];
        for (i, n) in self.retried.iter().enumerate() {
            let topic = topics.retry.topic(i as u32 + 1);
            rows.push(row(&format!("retried to {topic}"), *n, String::new()));
        }
        let exhausted = self.dead_lettered.saturating_sub(self.fatal);
        let dlq = &topics.retry.dlq_topic;
        rows.push(row(
            "dead-lettered",
            self.dead_lettered,
            format!(
                "on {dlq} ({} fatal, {exhausted} exhausted every retry)",
                self.fatal
            ),
        ));
        rows.push(row(
            "duplicates skipped",
            self.duplicates,
            format!(
                "the generator re-used {} ids; a copy of a failed message is processed again",
                self.resent_ids
            ),
        ));
        if let Some(o) = &self.outage {
            rows.push(row(
                "endpoint outage",
                o.refused_calls,
                format!(
                    "calls refused in {}; the circuit opened {} time(s) and held them; {} dead-lettered because of it",
                    humantime::format_duration(o.length),
                    o.circuit_opened,
                    o.dead_lettered
                ),
            ));
        }
        rows.push(row(
            "processor calls",
            self.processor_calls,
            "every attempt of every message".into(),
        ));
        if self.abandoned > 0 {
            rows.push(row(
                "left unfinished",
                self.abandoned,
                "uncommitted; consumed again after a restart".into(),
            ));
        }
        rows
    }

    /// Writes the summary table and the accounting line.
    ///
    /// # Errors
    /// When `out` fails.
    pub(super) fn write_table(
        &self,
        out: &mut dyn Write,
        topics: &DemoTopics,
    ) -> std::io::Result<()> {
        let cut = if self.drain == DrainEnd::Complete {
            ""
        } else {
            ", cut short"
        };
        let (ran, drained) = (self.ran_for.as_secs_f64(), self.drained_in.as_secs_f64());
        writeln!(
            out,
            "\nSummary (generated for {ran:.1}s, drained in {drained:.1}s{cut})"
        )?;
        for (what, n, note) in self.rows(topics) {
            writeln!(out, "{}", format!("  {what:<26}{n:>7}   {note}").trim_end())?;
        }
        writeln!(out, "\n{}", self.check_line())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(produced: u64, ok: u64, dup: u64, dlq: u64, drain: DrainEnd) -> DemoSummary {
        DemoSummary {
            produced,
            generated: produced,
            resent_ids: dup,
            ok,
            ok_after_retry: 0,
            duplicates: dup,
            dead_lettered: dlq,
            fatal: 0,
            retried: vec![0; 3],
            abandoned: 0,
            processor_calls: 0,
            ran_for: Duration::ZERO,
            drained_in: Duration::ZERO,
            drain,
            metrics_url: String::new(),
            ingest_addr: "127.0.0.1:8080".parse().unwrap(),
            outage: None,
        }
    }

    #[test]
    fn an_outage_that_dead_lettered_anything_fails_the_check() {
        let mut s = summary(100, 90, 5, 5, DrainEnd::Complete);
        let outage = OutageSummary {
            length: Duration::from_secs(10),
            refused_calls: 40,
            circuit_opened: 1,
            dead_lettered: 0,
        };
        s.outage = Some(outage.clone());
        assert!(s.adds_up());
        assert_eq!(
            s.check_line(),
            "produced 100 = ok 90 + duplicates 5 + dead-lettered 5, 0 dead-lettered because of the outage ✓"
        );
        s.outage = Some(OutageSummary {
            dead_lettered: 3,
            ..outage
        });
        assert!(!s.adds_up());
        assert!(
            s.check_line()
                .ends_with("3 dead-lettered because of the outage ✗"),
            "{}",
            s.check_line()
        );
    }

    #[test]
    fn the_check_line_says_whether_and_why() {
        let s = summary(1500, 1310, 75, 115, DrainEnd::Complete);
        assert!(s.adds_up());
        assert_eq!(
            s.check_line(),
            "produced 1500 = ok 1310 + duplicates 75 + dead-lettered 115 ✓"
        );
        let s = summary(1500, 1300, 75, 115, DrainEnd::Interrupted);
        assert!(!s.adds_up());
        assert!(s
            .check_line()
            .ends_with("✗ (10 not finished: the drain was interrupted)"));
        let s = summary(10, 9, 1, 1, DrainEnd::Complete);
        assert!(s.check_line().contains("1 finished more than once"));
    }

    #[test]
    fn the_summary_sums_partitions_by_level() {
        use crate::service::pipeline::PartitionCounts;
        use crate::service::source::Tp;
        let t = DemoTopics::example();
        let mut per = ConsumerSummary::new();
        let p = |ok, retried, dead_lettered, duplicates| PartitionCounts {
            ok,
            retried,
            dead_lettered,
            duplicates,
            ..PartitionCounts::default()
        };
        per.insert(Tp::new("events", 0), p(80, 15, 3, 2));
        per.insert(Tp::new("events", 1), p(10, 5, 0, 0));
        per.insert(Tp::new("events-retry-1", 0), p(12, 8, 0, 0));
        per.insert(Tp::new("events-retry-3", 2), p(0, 0, 2, 0));
        let mut s = summary(0, 0, 0, 0, DrainEnd::Complete);
        s.add_partitions(&per, &t);
        assert_eq!(
            (s.ok, s.ok_after_retry, s.duplicates, s.dead_lettered),
            (102, 12, 2, 5)
        );
        assert_eq!(s.retried, vec![20, 8, 0]);
        s.produced = 109;
        assert!(s.adds_up());
        let mut out = Vec::new();
        s.write_table(&mut out, &t).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("retried to events-retry-1"), "{text}");
        assert!(text.ends_with("dead-lettered 5 ✓\n"), "{text}");
    }
}
