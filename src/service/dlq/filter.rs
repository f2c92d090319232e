//! Which DLQ messages an operation is about: the `--error-kind`, `--since` and `--id` flags,
//! replay's `--all`, and the fingerprint of a selection that names its progress group.

use std::collections::BTreeSet;

use crate::config::parse_duration;
use crate::model::ErrorKind;

use super::DlqEntry;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{flag}={value}: expected {expected}")]
pub struct FilterError {
    /// The flag, e.g. `--error-kind`.
    pub flag: &'static str,
    /// The value given.
    pub value: String,
    /// What is accepted.
    pub expected: &'static str,
}

/// The filter flags as typed, before parsing; also what the replay group's hash is over.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilterArgs {
    /// `--error-kind` values.
    pub error_kinds: Vec<String>,
    /// `--since` value.
    pub since: Option<String>,
    /// `--id` values.
    pub ids: Vec<String>,
}

impl FilterArgs {
    /// Whether no filter flag was given.
    pub fn is_empty(&self) -> bool {
        self.error_kinds.is_empty() && self.since.is_none() && self.ids.is_empty()
    }
}

/// Which DLQ messages an operation is about. Every given criterion must hold; several
/// kinds or ids are alternatives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DlqFilter {
    kinds: BTreeSet<&'static str>,
    since_ms: Option<i64>,
    ids: BTreeSet<String>,
}

const KIND_EXPECTED: &str = "retryable, fatal or exhausted";
const SINCE_EXPECTED: &str =
    "a duration such as 30m or 1h, or an RFC 3339 timestamp such as 2024-05-01T12:00:00Z";

impl DlqFilter {
    /// Parses the flags; `now_ms` anchors a relative `--since`.
    ///
    /// # Errors
    /// A [`FilterError`] naming the flag, the value and what is accepted.
    pub fn parse(args: &FilterArgs, now_ms: i64) -> Result<Self, FilterError> {
        let mut kinds = BTreeSet::new();
        for raw in &args.error_kinds {
            let kind =
                ErrorKind::parse(raw.trim().to_ascii_lowercase().as_str()).ok_or_else(|| {
                    FilterError {
                        flag: "--error-kind",
                        value: raw.clone(),
                        expected: KIND_EXPECTED,
                    }
                })?;
            kinds.insert(kind.as_str());
        }
        let since_ms = args
            .since
            .as_deref()
            .map(|s| parse_since(s, now_ms))
            .transpose()?;
        let mut ids = BTreeSet::new();
        for id in &args.ids {
            if id.is_empty() {
                return Err(FilterError {
                    flag: "--id",
                    value: String::new(),
                    expected: "a non-empty message id",
                });
            }
            ids.insert(id.clone());
        }
        Ok(DlqFilter {
            kinds,
            since_ms,
            ids,
        })
    }

    /// Whether `entry` passes every criterion. With `--since`, a message without a failure
    /// time does not match (its age is unknown).
    pub fn matches(&self, entry: &DlqEntry) -> bool {
        let kind_ok = self.kinds.is_empty()
            || entry
                .error_kind
                .is_some_and(|k| self.kinds.contains(k.as_str()));
        let since_ok = self
            .since_ms
            .is_none_or(|cut| entry.failed_at_ms.is_some_and(|f| f >= cut));
        let id_ok = self.ids.is_empty() || entry.id.as_ref().is_some_and(|i| self.ids.contains(i));
        kind_ok && since_ok && id_ok
    }

    /// The cutoff of `--since`, epoch milliseconds.
    pub fn since_ms(&self) -> Option<i64> {
        self.since_ms
    }
}

/// `--since`: a duration back from `now_ms`, or an RFC 3339 timestamp.
fn parse_since(raw: &str, now_ms: i64) -> Result<i64, FilterError> {
    let s = raw.trim();
    if let Ok(d) = parse_duration(s) {
        let back = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        return Ok(now_ms.saturating_sub(back).max(0));
    }
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
        .map_err(|_| FilterError {
            flag: "--since",
            value: raw.to_owned(),
            expected: SINCE_EXPECTED,
        })
}

/// What a replay is about: everything (`--all`), or what a filter matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// `--all`.
    All,
    /// Filter flags.
    Filter(DlqFilter),
}

/// Why the replay selection flags were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectionError {
    /// A filter flag has a bad value.
    #[error(transparent)]
    Flag(#[from] FilterError),
    /// Neither `--all` nor a filter.
    #[error("replay needs --all, or a filter (--error-kind, --since, --id) to choose messages")]
    NothingChosen,
    /// Both `--all` and a filter.
    #[error("--all cannot be combined with a filter (--error-kind, --since, --id)")]
    AllWithFilter,
}

impl Selection {
    /// Replay refuses to guess: it needs `--all` or at least one filter, and not both.
    ///
    /// # Errors
    /// A [`SelectionError`] when neither or both are given, or a filter value is bad.
    pub fn parse(all: bool, args: &FilterArgs, now_ms: i64) -> Result<Self, SelectionError> {
        match (all, args.is_empty()) {
            (true, true) => Ok(Selection::All),
            (true, false) => Err(SelectionError::AllWithFilter),
            (false, true) => Err(SelectionError::NothingChosen),
            (false, false) => Ok(Selection::Filter(DlqFilter::parse(args, now_ms)?)),
        }
    }

    /// Whether `entry` is selected.
    pub fn matches(&self, entry: &DlqEntry) -> bool {
        match self {
            Selection::All => true,
            Selection::Filter(f) => f.matches(entry),
        }
    }
}

/// A short hash of the selection flags, stable across runs and builds (FNV-1a 64 over a
/// normalised text), so that re-running the same replay command finds its progress group
/// while a different filter starts fresh. Order and repetition of values do not matter.
pub fn selection_fingerprint(all: bool, args: &FilterArgs) -> String {
    let norm = |v: &[String], lower: bool| -> Vec<String> {
        let set: BTreeSet<String> = v
            .iter()
            .map(|s| {
                let t = s.trim();
                if lower {
                    t.to_ascii_lowercase()
                } else {
                    t.to_owned()
                }
            })
            .collect();
        set.into_iter().collect()
    };
    let text = if all {
        "all".to_owned()
    } else {
        // Ids are joined with a NUL byte, which Kafka header text of an id cannot be
        // confused with in practice; kinds never contain it.
        format!(
            "kinds={}\nsince={}\nids={}",
            norm(&args.error_kinds, true).join(","),
            args.since.as_deref().map(str::trim).unwrap_or(""),
            norm(&args.ids, false).join("\0"),
        )
    };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")[..8].to_owned()
}

/// The default replay progress group: `{group}-dlq-replay-{fingerprint}`.
pub fn replay_group(consumer_group: &str, all: bool, args: &FilterArgs) -> String {
    format!(
        "{consumer_group}-dlq-replay-{}",
        selection_fingerprint(all, args)
    )
}
