//! How values are written in the TOML file and the environment, as serde adapters: durations
//! in milliseconds (`*_ms` keys) or in humantime syntax (`1h`), lists as an array or a
//! comma-separated string, optional text where empty means unset, and [`Secret`], which
//! redacts itself. Each adapter's error says what is accepted, for the one-line messages.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::de::{self, Deserializer, SeqAccess, Unexpected, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// What a duration may look like, as error messages say it.
const DURATION: &str = "a duration such as 500ms, 10s, 5m or 1h";

/// A secret string: redacted in `Debug`, `Display` and serialized output.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself: call only where it is handed to the client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Whether no secret is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn shown(&self) -> &'static str {
        if self.0.is_empty() {
            ""
        } else {
            "[redacted]"
        }
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.shown())
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.shown())
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.shown())
    }
}

/// One static request header of the http processor (`PROCESSOR_HTTP_HEADERS`), written
/// `Name=Value`. The value is a secret (an `Authorization` token, say): output shows
/// `Name=[redacted]`. The name and value are checked by `validate.rs`, so that a malformed
/// item is reported without echoing what may be a secret.
#[derive(Clone, PartialEq, Eq)]
pub struct HeaderSetting {
    /// The header name, as written (trimmed).
    pub name: String,
    /// Its value (trimmed); empty when the item had no `=`.
    pub value: Secret,
    /// Whether the item had a `=` at all.
    pub has_equals: bool,
}

impl HeaderSetting {
    /// Reads one `Name=Value` item (split at the first `=`).
    pub fn parse(item: &str) -> Self {
        match item.split_once('=') {
            Some((name, value)) => HeaderSetting {
                name: name.trim().to_owned(),
                value: Secret::new(value.trim()),
                has_equals: true,
            },
            None => HeaderSetting {
                name: item.trim().to_owned(),
                value: Secret::default(),
                has_equals: false,
            },
        }
    }

    /// `Name=[redacted]`, for output.
    pub fn shown(&self) -> String {
        format!("{}=[redacted]", self.name)
    }
}

impl fmt::Debug for HeaderSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown())
    }
}

/// `Vec<HeaderSetting>`: `Name=Value` items as an array or a comma-separated string;
/// written back with every value redacted.
pub(crate) mod header_list {
    use serde::{Deserializer, Serializer};

    use super::HeaderSetting;

    pub(crate) fn serialize<S: Serializer>(v: &[HeaderSetting], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(HeaderSetting::shown))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<HeaderSetting>, D::Error> {
        Ok(super::list(d)?
            .iter()
            .map(|item| HeaderSetting::parse(item))
            .collect())
    }
}

/// Parses a duration: `500ms`, `10s`, `5m`, `1h` (humantime syntax, e.g. `1m30s`, too).
///
/// # Errors
/// A message saying what is accepted.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err(format!("expected {DURATION}"));
    }
    humantime::parse_duration(s).map_err(|_| format!("expected {DURATION}"))
}

/// A duration as configured: whole hours in `h`, whole seconds in `s`, else `ms` (`60s`
/// stays `60s`, `3600s` reads `1h`); finer durations in humantime syntax.
pub fn format_duration(d: Duration) -> String {
    const HOUR: u64 = 3600;
    match (d.as_secs(), d.subsec_nanos()) {
        (s, 0) if s > 0 && s % HOUR == 0 => format!("{}h", s / HOUR),
        (s, 0) => format!("{s}s"),
        (_, n) if n % 1_000_000 == 0 => format!("{}ms", d.as_millis()),
        _ => humantime::format_duration(d).to_string(),
    }
}

/// Whether `s` is a legal Kafka topic name.
pub fn valid_topic(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 249
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Reads a string, a number or a boolean as text (`acks = 0` and `acks = "0"` alike).
///
/// # Errors
/// When the value is a table or an array.
pub fn scalar_text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct Scalar;
    impl Visitor<'_> for Scalar {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a single value")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(Scalar)
}

/// `Vec<String>`, from an array or one comma-separated string; items are trimmed and empty
/// items dropped.
pub(crate) fn list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct List;
    impl<'de> Visitor<'de> for List {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a comma-separated list")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<String>, E> {
            Ok(tidy(v.split(',')))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
            let mut items = Vec::new();
            while let Some(item) = seq.next_element::<Scalar>()? {
                items.push(item.0);
            }
            Ok(tidy(items.iter().map(String::as_str)))
        }
    }
    d.deserialize_any(List)
}

fn tidy<'a>(items: impl Iterator<Item = &'a str>) -> Vec<String> {
    items
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// One list item or map value read with [`scalar_text`].
struct Scalar(String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar_text(d).map(Scalar)
    }
}

/// `SocketAddr`, from `ip:port`.
pub(crate) fn addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = scalar_text(d)?;
    text.trim().parse().map_err(|_| {
        de::Error::invalid_value(Unexpected::Str(&text), &"an address such as 0.0.0.0:8080")
    })
}

/// `[rdkafka]`: property names to values, any scalar read as text (a table means a dotted
/// name was not quoted: `"socket.timeout.ms" = 6000`).
pub(crate) fn passthrough<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    let map = BTreeMap::<String, Scalar>::deserialize(d)?;
    Ok(map.into_iter().map(|(k, v)| (k, v.0)).collect())
}

/// `Duration` as a whole number of milliseconds (the `*_ms` keys).
pub(crate) mod ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// `Duration` in humantime syntax (`1h`, `500ms`).
pub(crate) mod human {
    use std::time::Duration;

    use serde::de::{Error, Unexpected};
    use serde::{Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = super::scalar_text(d)?;
        super::parse_duration(&text)
            .map_err(|_| D::Error::invalid_value(Unexpected::Str(&text), &super::DURATION))
    }
}

/// `Vec<Duration>`: humantime durations as an array or a comma-separated string; one bad
/// item rejects the list, which the error shows as written.
pub(crate) mod human_list {
    use std::time::Duration;

    use serde::de::{Error, Unexpected};
    use serde::{Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(v: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|d| super::format_duration(*d)))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        let items = super::list(d)?;
        items
            .iter()
            .map(|item| super::parse_duration(item))
            .collect::<Result<_, _>>()
            .map_err(|_| {
                let expected = format!("a comma-separated list of durations ({})", super::DURATION);
                D::Error::invalid_value(Unexpected::Str(&items.join(",")), &expected.as_str())
            })
    }
}

/// `Option<T>` written as text, where blank means `None` (and `None` is written `""`).
pub(crate) mod optional {
    use serde::{Deserializer, Serialize, Serializer};

    pub(crate) fn serialize<S: Serializer, T: Serialize>(
        v: &Option<T>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(t) => t.serialize(s),
            None => s.serialize_str(""),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>, T: From<String>>(
        d: D,
    ) -> Result<Option<T>, D::Error> {
        let text = super::scalar_text(d)?;
        let text = text.trim();
        Ok((!text.is_empty()).then(|| T::from(text.to_owned())))
    }
}

/// Whether a librdkafka property holds a secret (redacted in output).
pub fn is_secret_property(name: &str) -> bool {
    name.contains("password") || name.contains("secret") || name.ends_with(".key.pem")
}

/// `RDKAFKA_<NAME>` → librdkafka property: `_` becomes `.`, `__` becomes `_`, lower case.
pub fn passthrough_name(rest: &str) -> String {
    rest.to_ascii_lowercase()
        .replace("__", "\u{0}")
        .replace('_', ".")
        .replace('\u{0}', "_")
}

/// The passthrough with secret properties redacted, for printing.
pub(crate) fn redacted(passthrough: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    passthrough
        .iter()
        .map(|(k, v)| {
            let v = if is_secret_property(k) && !v.is_empty() {
                "[redacted]".to_owned()
            } else {
                v.clone()
            };
            (k.clone(), v)
        })
        .collect()
}
