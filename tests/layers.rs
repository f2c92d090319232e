//! The layering of DESIGN.md, checked on the source: only `transport/` touches rdkafka
//! (`testing/` too, for the tests' own clients), `service/` is free of rdkafka, axum and
//! prometheus, and no layer reaches up to `app/` or the CLI.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read a source directory") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// Lines of `file` that use one of `crates` (`use x::`, `x::` paths): production code only
/// (a file's unit tests, from its first `#[cfg(test)]`, and test-only files are left out;
/// an in-test HTTP server is not a layer's dependency), comments excluded.
fn uses(file: &Path, crates: &[&str]) -> Vec<String> {
    let is_test_file = file.file_name().is_some_and(|n| n == "tests.rs")
        || file.components().any(|c| c.as_os_str() == "tests");
    if is_test_file {
        return Vec::new();
    }
    let text = std::fs::read_to_string(file).expect("read a source file");
    text.lines()
        .take_while(|l| !l.starts_with("#[cfg(test)]"))
        .enumerate()
        .filter(|(_, l)| !l.trim_start().starts_with("//"))
        .filter(|(_, l)| {
            crates.iter().any(|c| {
                l.contains(&format!("{c}::"))
                    && !l.contains(&format!("lib{c}::"))
                    && !l.contains(&format!("_{c}::"))
            })
        })
        .map(|(i, l)| format!("{}:{}: {}", file.display(), i + 1, l.trim()))
        .collect()
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn only_transport_touches_rdkafka() {
    let mut found = Vec::new();
    for dir in ["app", "api", "service", "observability", "config", "model"] {
        let path = src().join(dir);
        if !path.exists() {
            continue;
        }
        for file in rust_files(&path) {
            found.extend(uses(&file, &["rdkafka"]));
        }
    }
    for file in ["cli.rs", "main.rs", "lib.rs"] {
        found.extend(uses(&src().join(file), &["rdkafka"]));
    }
    assert!(
        found.is_empty(),
        "rdkafka outside transport/:\n{}",
        found.join("\n")
    );
}

#[test]
fn service_is_free_of_rdkafka_axum_and_prometheus() {
    let found: Vec<String> = rust_files(&src().join("service"))
        .iter()
        .flat_map(|f| uses(f, &["rdkafka", "axum", "prometheus"]))
        .collect();
    assert!(found.is_empty(), "in service/:\n{}", found.join("\n"));
}

#[test]
fn no_layer_reaches_up_to_app_or_the_cli() {
    let mut found = Vec::new();
    for dir in [
        "api",
        "service",
        "transport",
        "observability",
        "config",
        "model",
    ] {
        let path = src().join(dir);
        if !path.exists() {
            continue;
        }
        for file in rust_files(&path) {
            found.extend(
                uses(&file, &["crate::app", "crate::cli"])
                    .into_iter()
                    .filter(|l| !l.contains("#[doc")),
            );
        }
    }
    assert!(found.is_empty(), "reaching up:\n{}", found.join("\n"));
}

#[test]
fn the_checks_see_a_violation() {
    let dir = std::env::temp_dir().join(format!("courier-layers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.rs");
    std::fs::write(
        &file,
        "// rdkafka:: in a comment is fine\nuse rdkafka::ClientConfig;\nlet x = librdkafka::y;\n",
    )
    .unwrap();
    let found = uses(&file, &["rdkafka"]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].ends_with("use rdkafka::ClientConfig;"));
    std::fs::remove_dir_all(&dir).unwrap();
}
