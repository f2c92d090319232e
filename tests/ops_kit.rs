//! The operations kit in `deploy/observability/` against what courier exports: every
//! `courier_*` name a dashboard or a rule file uses is a registered metric (read from
//! `Metrics::families()`, not from a list kept here), every label matcher on a courier metric
//! names one of its labels, and every dashboard panel has a query.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use courier::observability::metrics::Family;
use courier::observability::Metrics;
use prometheus::proto::MetricType;
use serde_json::Value;

const HISTOGRAM_SUFFIXES: [&str; 3] = ["_bucket", "_sum", "_count"];

/// Labels Prometheus adds when it scrapes (static configs, Kubernetes service discovery).
const TARGET_LABELS: [&str; 5] = ["job", "instance", "namespace", "pod", "service"];

fn observability_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/observability")
}

/// Files in `deploy/observability` whose name ends with one of `exts`, sorted.
fn files(exts: &[&str]) -> Vec<PathBuf> {
    let dir = observability_dir();
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            exts.iter().any(|ext| name.ends_with(ext))
        })
        .collect();
    out.sort();
    out
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A `courier_*` name as written, with the label names of the matchers right after it.
#[derive(Debug, PartialEq)]
struct Use {
    name: String,
    labels: Vec<String>,
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Whether a scan of PromQL is inside a quoted string, escapes included.
#[derive(Default)]
struct Quotes {
    inside: bool,
    escaped: bool,
}

impl Quotes {
    /// Takes the next character; whether it belongs to a quoted string (quotes included).
    fn take(&mut self, c: char) -> bool {
        if self.inside {
            if self.escaped {
                self.escaped = false;
            } else if c == '\\' {
                self.escaped = true;
            } else if c == '"' {
                self.inside = false;
            }
            true
        } else {
            self.inside = c == '"';
            self.inside
        }
    }
}

/// The text inside the `{...}` that `rest` starts with (braces inside quoted values skipped).
fn selector_body(rest: &str) -> Option<&str> {
    let body = rest.strip_prefix('{')?;
    let mut quotes = Quotes::default();
    for (i, c) in body.char_indices() {
        if !quotes.take(c) && c == '}' {
            return Some(&body[..i]);
        }
    }
    None
}

/// Label names of a matcher list `a="x", b=~"y,z"` (values may hold commas and escapes).
fn matcher_labels(body: &str) -> Vec<String> {
    let mut labels = Vec::new();
    let mut current = String::new();
    let mut quotes = Quotes::default();
    for c in body.chars() {
        if quotes.take(c) {
            continue;
        }
        if c == ',' {
            labels.push(std::mem::take(&mut current));
        } else {
            current.push(c);
        }
    }
    labels.push(current);
    labels
        .iter()
        .filter_map(|m| {
            let name: String = m.trim().chars().take_while(|c| is_name_char(*c)).collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

/// Every `courier_*` token in `text` (lower case, not part of a longer word; the bare prefix,
/// as in prose about "courier_*", is skipped), with its selector's label names when a
/// `{...}` follows it.
fn courier_names(text: &str) -> Vec<Use> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(pos) = text[from..].find("courier_") {
        let start = from + pos;
        from = start + "courier_".len();
        if start > 0 && is_name_char(bytes[start - 1] as char) {
            continue;
        }
        let name: String = text[start..]
            .chars()
            .take_while(|c| is_name_char(*c))
            .collect();
        let after = start + name.len();
        from = after;
        if name == "courier_" {
            continue;
        }
        let labels = selector_body(text[after..].trim_start())
            .map(matcher_labels)
            .unwrap_or_default();
        out.push(Use { name, labels });
    }
    out
}

/// Where a name is written: PromQL, or prose (annotations, comments), where a histogram may
/// be named by its base name.
#[derive(Clone, Copy, PartialEq)]
enum Context {
    Query,
    Prose,
}

/// Splits a rule file (or its promtool tests) into PromQL (`expr:` values, inline or block
/// scalars; `series:` values) and everything else.
fn split_yaml(text: &str) -> (Vec<String>, String) {
    let mut queries = Vec::new();
    let mut prose = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start().trim_start_matches("- ");
        let indent = line.len() - line.trim_start().len();
        let value = ["expr:", "series:"]
            .iter()
            .find_map(|key| trimmed.strip_prefix(key));
        let Some(value) = value.map(str::trim) else {
            prose.push_str(line);
            prose.push('\n');
            continue;
        };
        if value.starts_with('|') || value.starts_with('>') {
            let mut block = String::new();
            while let Some(next) = lines.peek() {
                let next_indent = next.len() - next.trim_start().len();
                if !next.trim().is_empty() && next_indent <= indent {
                    break;
                }
                block.push_str(next);
                block.push('\n');
                lines.next();
            }
            queries.push(block);
        } else {
            queries.push(value.trim_matches(|c| c == '\'' || c == '"').to_owned());
        }
    }
    (queries, prose)
}

/// What is wrong with `uses` against courier's families: unknown names, a histogram's base
/// name in a query or a histogram suffix on something else, labels the metric does not have.
fn problems(uses: &[Use], families: &[Family], context: Context) -> Vec<String> {
    let mut out = Vec::new();
    for u in uses {
        let exact = families.iter().find(|f| f.name == u.name);
        let via_suffix = HISTOGRAM_SUFFIXES.iter().find_map(|s| {
            let base = u.name.strip_suffix(s)?;
            families
                .iter()
                .find(|f| f.name == base && f.kind == MetricType::HISTOGRAM)
                .map(|f| (f, *s))
        });
        let (family, suffix) = match (exact, via_suffix) {
            (Some(f), _) if f.kind != MetricType::HISTOGRAM || context == Context::Prose => {
                (f, None)
            }
            (_, Some((f, s))) => (f, Some(s)),
            (Some(f), None) => {
                out.push(format!(
                    "{}: a histogram; use {}_bucket, _sum or _count",
                    u.name, f.name
                ));
                continue;
            }
            (None, None) => {
                out.push(format!("{}: courier exports no such metric", u.name));
                continue;
            }
        };
        for label in &u.labels {
            let known = family.labels.contains(label)
                || TARGET_LABELS.contains(&label.as_str())
                || (label == "le" && suffix == Some("_bucket"));
            if !known {
                out.push(format!(
                    "{}: no label {label:?} (it has {:?} and the scrape's {:?})",
                    u.name, family.labels, TARGET_LABELS
                ));
            }
        }
    }
    out
}

/// Every panel, nested ones (in collapsed rows) included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            if let Some(nested) = p.get("panels") {
                walk(nested, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// The PromQL of a dashboard: panel targets and query variables.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    let mut out: Vec<String> = panels(dashboard)
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if v["type"] == "query" {
            let q = v["query"]
                .get("query")
                .or(Some(&v["query"]))
                .and_then(Value::as_str);
            out.extend(q.map(str::to_owned));
        }
    }
    out
}

#[test]
fn every_courier_name_in_dashboards_and_rules_is_exported_with_its_labels() {
    let metrics = Metrics::new();
    let families = metrics.families();
    let mut used = BTreeSet::new();
    let mut report = Vec::new();

    let dashboards = files(&[".json"]);
    assert!(
        !dashboards.is_empty(),
        "no dashboard in deploy/observability"
    );
    for path in &dashboards {
        let dashboard: Value = serde_json::from_str(&read(path))
            .unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
        for q in dashboard_queries(&dashboard) {
            let uses = courier_names(&q);
            used.extend(uses.iter().map(|u| u.name.clone()));
            report.extend(
                problems(&uses, families, Context::Query)
                    .into_iter()
                    .map(|p| format!("{}: {p}", path.display())),
            );
        }
    }

    // Rule files and their promtool tests: every courier_* token, in expressions and input
    // series (PromQL) and in annotations and comments (prose) alike.
    let rule_files = files(&[".yml", ".yaml"]);
    assert!(
        rule_files
            .iter()
            .any(|p| !p.to_string_lossy().contains(".test.")),
        "no rule file in deploy/observability"
    );
    for path in &rule_files {
        let (queries, prose) = split_yaml(&read(path));
        assert!(!queries.is_empty(), "{}: no expr or series", path.display());
        for q in &queries {
            let uses = courier_names(q);
            used.extend(uses.iter().map(|u| u.name.clone()));
            report.extend(
                problems(&uses, families, Context::Query)
                    .into_iter()
                    .map(|p| format!("{}: {p}", path.display())),
            );
        }
        report.extend(
            problems(&courier_names(&prose), families, Context::Prose)
                .into_iter()
                .map(|p| format!("{}: {p}", path.display())),
        );
    }

    report.sort();
    report.dedup();
    assert!(report.is_empty(), "\n{}", report.join("\n"));
    // The kit watches the signals of the README's operating notes.
    for name in [
        "courier_messages_processed_total",
        "courier_consumer_lag",
        "courier_retry_lateness_seconds_bucket",
        "courier_in_flight",
        "courier_paused_partitions",
        "courier_broker_up",
        "courier_ready",
        "courier_publish_failures_total",
        "courier_commits_total",
    ] {
        assert!(used.contains(name), "the ops kit never uses {name}");
    }
}

#[test]
fn every_dashboard_panel_has_a_query_and_a_unique_id() {
    for path in files(&[".json"]) {
        let dashboard: Value = serde_json::from_str(&read(&path))
            .unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
        assert!(dashboard["uid"].as_str().is_some_and(|u| !u.is_empty()));
        let all = panels(&dashboard);
        assert!(all.len() >= 8, "{}: {} panels", path.display(), all.len());
        let mut ids = BTreeSet::new();
        for p in all {
            let title = p["title"].as_str().unwrap_or("<untitled>");
            let id = p["id"].as_u64();
            assert!(
                id.is_some_and(|id| ids.insert(id)),
                "{title}: missing or duplicate id"
            );
            if p["type"] == "row" {
                continue;
            }
            let targets = p["targets"].as_array().cloned().unwrap_or_default();
            assert!(
                !targets.is_empty(),
                "{}: panel {title:?} has no query",
                path.display()
            );
            let mut refs = BTreeSet::new();
            for t in &targets {
                let expr = t["expr"].as_str().unwrap_or_default();
                assert!(
                    !expr.trim().is_empty(),
                    "{}: panel {title:?} has an empty query",
                    path.display()
                );
                assert!(
                    refs.insert(t["refId"].as_str().unwrap_or_default().to_owned()),
                    "{}: panel {title:?}: duplicate refId",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn the_checker_rejects_what_courier_does_not_export() {
    let metrics = Metrics::new();
    let bad = "sum(rate(courier_no_such_total[5m])) \
               + courier_retry_lateness_seconds \
               + courier_in_flight_count \
               + courier_consumer_lag{partiton=\"0\", job=~\"a,b\"} \
               + courier_broker_up{le=\"1\"}";
    let found = problems(&courier_names(bad), metrics.families(), Context::Query);
    assert_eq!(found.len(), 5, "{found:#?}");
    for (fragment, problem) in [
        ("courier_no_such_total", &found[0]),
        ("a histogram", &found[1]),
        ("courier_in_flight_count", &found[2]),
        ("\"partiton\"", &found[3]),
        ("\"le\"", &found[4]),
    ] {
        assert!(problem.contains(fragment), "{problem}");
    }

    let good = "histogram_quantile(0.99, sum by (le) (rate(courier_retry_lateness_seconds_bucket{job=~\"$job\", le!=\"\"}[5m]))) \
                + courier_messages_processed_total{outcome=\"dlq\", topic=~\"a,b\\\"}\"} \
                + not_courier_metric + xcourier_thing";
    let uses = courier_names(good);
    assert_eq!(
        uses,
        [
            Use {
                name: "courier_retry_lateness_seconds_bucket".into(),
                labels: vec!["job".into(), "le".into()],
            },
            Use {
                name: "courier_messages_processed_total".into(),
                labels: vec!["outcome".into(), "topic".into()],
            },
        ]
    );
    assert_eq!(
        problems(&uses, metrics.families(), Context::Query),
        Vec::<String>::new()
    );
    // Prose may name a histogram by its base name, never an unknown metric.
    let prose = problems(
        &courier_names("see courier_retry_lateness_seconds and courier_lateness"),
        metrics.families(),
        Context::Prose,
    );
    assert_eq!(prose.len(), 1, "{prose:?}");
    assert!(prose[0].starts_with("courier_lateness:"));
}

#[test]
fn rule_files_split_into_queries_and_prose() {
    let text = "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: |\n          rate(courier_a[5m])\n            > 0\n        for: 1m\n        annotations:\n          description: see courier_b\n      - record: r\n        expr: courier_c{x=\"1\"}\n    input_series:\n      - series: 'courier_d{le=\"1\"}'\n";
    let (queries, prose) = split_yaml(text);
    assert_eq!(queries.len(), 3, "{queries:?}");
    assert!(queries[0].contains("rate(courier_a[5m])") && queries[0].contains("> 0"));
    assert!(!queries[0].contains("for:"));
    assert_eq!(queries[1], "courier_c{x=\"1\"}");
    assert_eq!(queries[2], "courier_d{le=\"1\"}");
    assert!(prose.contains("courier_b") && !prose.contains("courier_a"));
}
