//! Why a configuration was refused: every problem, one line each, the first line in the
//! form `KAFKA_PRODUCER_ACKS=2: expected 0, 1 or all` (variable, value, what is accepted).

use std::fmt;
use std::path::PathBuf;

/// One problem of a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// A value that is not accepted.
    Value {
        /// The environment variable (or, for `[rdkafka]`, the TOML key).
        var: String,
        /// The value as it was written.
        value: String,
        /// What is accepted.
        expected: String,
    },
    /// A TOML key that no setting has.
    UnknownKey(String),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Value {
                var,
                value,
                expected,
            } => write!(f, "{var}={value}: expected {expected}"),
            Problem::UnknownKey(key) => write!(
                f,
                "unknown configuration key `{key}` (see config/courier.toml for every key)"
            ),
        }
    }
}

/// Why [`Config::load`](super::Config::load) refused the configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `--config` or `COURIER_CONFIG` names no file.
    #[error("COURIER_CONFIG={}: no such file (expected the path of a TOML configuration file)", .0.display())]
    NoSuchFile(PathBuf),
    /// The file is not valid TOML.
    #[error("COURIER_CONFIG={}: expected a TOML file ({message})", path.display())]
    NotToml {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// Settings that are not accepted: one line each.
    #[error("{}", lines(.0))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    /// Every problem found (one for the file errors).
    pub fn problems(&self) -> Vec<String> {
        match self {
            ConfigError::Invalid(problems) => problems.iter().map(ToString::to_string).collect(),
            other => vec![other.to_string()],
        }
    }
}

fn lines(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}
