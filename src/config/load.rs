//! Loading: built-in defaults → optional TOML file → environment, merged by figment in the
//! file's shape, then deserialized into [`Config`] by serde. A value serde refuses is
//! reported and set aside (its default stands in), and the load goes on, so that one run
//! reports every problem: unknown keys, values of the wrong kind, then each section's limits.

use std::path::{Path, PathBuf};

use figment::error::Kind;
use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Value};
use figment::Figment;
use serde::Serialize;

use super::define::Var;
use super::error::{ConfigError, Problem};
use super::values::{is_secret_property, passthrough_name};
use super::{vars, Config};

/// The variable naming the optional TOML file (the `--config` flag wins over it).
pub const CONFIG_FILE_VAR: &str = "COURIER_CONFIG";

/// Aliases kept from the seed services: (alias, canonical variable).
pub const ALIASES: &[(&str, &str)] = &[("KAFKA_CONSUMER_TOPIC", "KAFKA_CONSUMER_TOPICS")];

/// Prefix of the librdkafka passthrough variables.
pub const RDKAFKA_PREFIX: &str = "RDKAFKA_";

/// The sections the TOML file nests in `[kafka]` and [`Config`] holds beside it.
const IN_KAFKA: [&str; 3] = ["producer", "consumer", "retry"];

/// See the module documentation.
pub(crate) fn load(file: Option<&Path>, env: &[(String, String)]) -> Result<Config, ConfigError> {
    let path = file.map(Path::to_path_buf).or_else(|| {
        lookup(env, CONFIG_FILE_VAR)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    let mut merged = merge(path.as_deref(), env)?;
    let mut problems = Vec::new();
    drop_unknown_keys(&mut merged, "", &mut problems);
    let config = extract(to_config_shape(merged), &mut problems);
    if let Some(config) = &config {
        config.validate(&mut problems);
    }
    match config {
        Some(mut config) if problems.is_empty() => {
            config.normalize();
            Ok(config)
        }
        _ => Err(invalid(problems)),
    }
}

/// The problems in the order of the docs: unknown keys, then by setting (serde reports in
/// alphabetical order, the checks in section order).
fn invalid(mut problems: Vec<Problem>) -> ConfigError {
    problems.sort_by_key(|p| match p {
        Problem::UnknownKey(_) => 0,
        Problem::Value { var, .. } => {
            1 + vars().position(|v| v.env == var).unwrap_or(usize::MAX - 1)
        }
    });
    ConfigError::Invalid(problems)
}

/// The three layers merged, in the TOML file's shape.
fn merge(path: Option<&Path>, env: &[(String, String)]) -> Result<Dict, ConfigError> {
    let mut fig = Figment::from(Serialized::defaults(file_shape(&Config::default())));
    if let Some(path) = path {
        if !path.is_file() {
            return Err(ConfigError::NoSuchFile(path.to_path_buf()));
        }
        fig = fig.merge(Toml::file_exact(path));
    }
    fig = fig.merge(Serialized::defaults(env_layer(env)));
    // Only the file can fail here: the other layers are maps built above.
    fig.extract::<Dict>().map_err(|e| ConfigError::NotToml {
        path: path.map(Path::to_path_buf).unwrap_or_default(),
        message: e.to_string().lines().next().unwrap_or_default().to_owned(),
    })
}

fn lookup<'a>(env: &'a [(String, String)], name: &str) -> Option<&'a str> {
    env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn var_by(pred: impl Fn(&Var) -> bool) -> Option<&'static Var> {
    vars().find(|v| pred(v))
}

/// The environment as a layer: each known variable at its key (as text: serde reads numbers
/// and booleans from it), an alias only without its canonical variable, and `RDKAFKA_*`
/// under `[rdkafka]`.
fn env_layer(env: &[(String, String)]) -> Dict {
    let mut dict = Dict::new();
    for (alias, canonical) in ALIASES {
        let value = lookup(env, alias).filter(|_| lookup(env, canonical).is_none());
        if let (Some(value), Some(var)) = (value, var_by(|v| v.env == *canonical)) {
            insert(&mut dict, &var.key(), value.trim().into());
        }
    }
    for var in vars() {
        if let Some(value) = lookup(env, var.env) {
            insert(&mut dict, &var.key(), value.trim().into());
        }
    }
    let mut rdkafka = Dict::new();
    for (name, value) in env {
        if let Some(rest) = name.strip_prefix(RDKAFKA_PREFIX) {
            rdkafka.insert(passthrough_name(rest), value.clone().into());
        }
    }
    if !rdkafka.is_empty() {
        dict.insert("rdkafka".into(), rdkafka.into());
    }
    dict
}

fn insert(dict: &mut Dict, key: &str, value: Value) {
    match key.split_once('.') {
        None => {
            dict.insert(key.to_owned(), value);
        }
        Some((head, rest)) => {
            let entry = dict
                .entry(head.to_owned())
                .or_insert_with(|| Dict::new().into());
            if !matches!(entry, Value::Dict(..)) {
                *entry = Dict::new().into();
            }
            if let Value::Dict(_, inner) = entry {
                insert(inner, rest, value);
            }
        }
    }
}

/// Removes every key no setting has (beside `[rdkafka]`, which takes any name), one
/// problem each.
fn drop_unknown_keys(dict: &mut Dict, prefix: &str, problems: &mut Vec<Problem>) {
    let mut unknown = Vec::new();
    for (name, value) in dict.iter_mut() {
        let key = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        if key == "rdkafka" || var_by(|v| v.key() == key).is_some() {
            continue;
        }
        let section = format!("{key}.");
        let is_section = var_by(|v| v.key().starts_with(&section)).is_some();
        match value {
            Value::Dict(_, inner) if is_section => drop_unknown_keys(inner, &key, problems),
            _ => {
                unknown.push(name.clone());
                problems.push(Problem::UnknownKey(key));
            }
        }
    }
    for name in unknown {
        dict.remove(&name);
    }
}

/// Deserializes the configuration; each value serde refuses is reported and removed (its
/// default stands in) until the rest deserializes. `None` if a refused value cannot be
/// located, which would be a bug in this file.
fn extract(mut dict: Dict, problems: &mut Vec<Problem>) -> Option<Config> {
    loop {
        let figment = Figment::from(Serialized::defaults(dict.clone()));
        match figment.extract_lossy::<Config>() {
            Ok(config) => return Some(config),
            Err(e) => {
                problems.push(describe(&e, &dict));
                if !remove(&mut dict, &e.path) {
                    return None;
                }
            }
        }
    }
}

/// Removes the value at `path`, or the innermost table entry that holds it.
fn remove(dict: &mut Dict, path: &[String]) -> bool {
    let Some((first, rest)) = path.split_first() else {
        return false;
    };
    match dict.get_mut(first) {
        Some(Value::Dict(_, inner)) if !rest.is_empty() && inner.contains_key(&rest[0]) => {
            remove(inner, rest)
        }
        Some(_) => dict.remove(first).is_some(),
        None => false,
    }
}

fn find<'a>(dict: &'a Dict, path: &[String]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let value = dict.get(first)?;
    match value {
        Value::Dict(_, inner) if !rest.is_empty() => find(inner, rest).or(Some(value)),
        _ => Some(value),
    }
}

/// A refused value as a problem: its variable, the value as written, what is accepted.
fn describe(e: &figment::Error, dict: &Dict) -> Problem {
    let key = file_key(&e.path);
    let value = match find(dict, &e.path) {
        Some(_) if is_secret_property(&key) => "[redacted]".into(),
        Some(value) => shown(value),
        None => String::new(),
    };
    let var = var_by(|v| v.key() == key).map_or(key, |v| v.env.to_owned());
    let expected = match &e.kind {
        Kind::InvalidType(_, expected) | Kind::InvalidValue(_, expected) => friendly(expected),
        other => other.to_string(),
    };
    Problem::Value {
        var,
        value,
        expected,
    }
}

/// A dotted key of the TOML file from a path in [`Config`].
fn file_key(path: &[String]) -> String {
    let key = path.join(".");
    match path.first() {
        Some(section) if IN_KAFKA.contains(&section.as_str()) => format!("kafka.{key}"),
        _ => key,
    }
}

/// A value as the user wrote it (lists comma-separated).
fn shown(value: &Value) -> String {
    match value {
        Value::String(_, s) => s.clone(),
        Value::Char(_, c) => c.to_string(),
        Value::Bool(_, b) => b.to_string(),
        Value::Num(_, n) => n
            .to_u128()
            .map(|u| u.to_string())
            .or_else(|| n.to_i128().map(|i| i.to_string()))
            .or_else(|| n.to_f64().map(|f| f.to_string()))
            .unwrap_or_default(),
        Value::Array(_, items) => items.iter().map(shown).collect::<Vec<_>>().join(","),
        Value::Dict(..) => "{...}".into(),
        Value::Empty(..) => String::new(),
    }
}

/// serde's names for what it expected, in the words of the README.
fn friendly(expected: &str) -> String {
    match expected {
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" | "i8" | "i16" | "i32" | "i64" | "i128"
        | "isize" => "a whole number".into(),
        "a boolean" | "bool" => "true or false".into(),
        "a string" => "text".into(),
        other => other.to_owned(),
    }
}

/// `value` serialized, in [`Config`]'s shape.
fn dict_of(value: &impl Serialize) -> Dict {
    match Value::serialize(value) {
        Ok(Value::Dict(_, dict)) => dict,
        // Config serializes to a table: its fields are tables and plain values.
        _ => Dict::new(),
    }
}

/// [`Config`] as the TOML file holds it: producer, consumer and retry inside `[kafka]`.
pub(crate) fn file_shape(config: &Config) -> Dict {
    let mut dict = dict_of(config);
    let moved: Vec<(&str, Value)> = IN_KAFKA
        .iter()
        .filter_map(|s| dict.remove(*s).map(|v| (*s, v)))
        .collect();
    if let Some(Value::Dict(_, kafka)) = dict.get_mut("kafka") {
        for (section, value) in moved {
            kafka.insert(section.to_owned(), value);
        }
    }
    dict
}

/// The TOML file's shape as [`Config`]'s.
fn to_config_shape(mut dict: Dict) -> Dict {
    let mut moved = Vec::new();
    if let Some(Value::Dict(_, kafka)) = dict.get_mut("kafka") {
        moved = IN_KAFKA
            .iter()
            .filter_map(|s| kafka.remove(*s).map(|v| (*s, v)))
            .collect();
    }
    for (section, value) in moved {
        dict.insert(section.to_owned(), value);
    }
    dict
}

/// The value at a dotted key of a table in the file's shape.
pub(crate) fn value_at<'a>(dict: &'a Dict, key: &str) -> Option<&'a Value> {
    match key.split_once('.') {
        None => dict.get(key),
        Some((head, rest)) => match dict.get(head)? {
            Value::Dict(_, inner) => value_at(inner, rest),
            _ => None,
        },
    }
}

/// A one-line rendering of a value for the docs (`(empty)` for blank text).
pub(crate) fn shown_default(value: &Value) -> String {
    match shown(value) {
        s if s.is_empty() => "(empty)".into(),
        s => s,
    }
}
