//! The two macros every setting and every accepted word is written with, so that each is
//! defined once: [`settings!`] declares a section (field, type, default, environment
//! variable and one-line meaning per setting) and [`choice!`] an enum of accepted words with
//! its `as_str` and `Deserialize` side by side. The README table, `config/courier.toml` and
//! the error messages are all derived from what they produce.

/// One setting: its environment variable, where it sits in the TOML file, and what it means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Var {
    /// Environment variable name (`KAFKA_PRODUCER_ACKS`).
    pub env: &'static str,
    /// Dotted TOML table of its section (`kafka.producer`).
    pub section: &'static str,
    /// Its key inside that table (`acks`; units are part of the name: `linger_ms`).
    pub name: &'static str,
    /// The field of the section's struct (`delivery_timeout` for `delivery_timeout_ms`).
    pub field: &'static str,
    /// What it means, in one line.
    pub help: &'static str,
    /// How the docs show the default where the value itself would mislead.
    pub shown_default: Option<&'static str>,
}

impl Var {
    /// The dotted TOML key (`kafka.producer.acks`).
    pub fn key(&self) -> String {
        format!("{}.{}", self.section, self.name)
    }
}

/// The TOML key of a field: its name, unless the definition gives one.
macro_rules! key_name {
    ($field:ident) => {
        stringify!($field)
    };
    ($field:ident, $key:literal) => {
        $key
    };
}

/// `Some(literal)` or `None`.
macro_rules! some_literal {
    () => {
        None
    };
    ($text:literal) => {
        Some($text)
    };
}

/// Declares one section of the configuration: a struct deserialized directly by serde
/// (unknown keys rejected, missing keys defaulted), its `Default`, and `VARS`, the table of
/// its settings.
///
/// Each setting is written once, as
/// ```text
/// /// meaning, one line (the first attribute: it becomes the help text)
/// #[serde(with = "...")]                     // optional: how the value is written
/// field: Type = default, env ENV_NAME [, key "toml_key"] [, shown "(default in docs)"];
/// ```
macro_rules! settings {
    (
        $(#[$smeta:meta])*
        pub struct $name:ident at $section:literal {
            $(
                #[doc = $help:literal]
                $(#[$fmeta:meta])*
                $field:ident: $ty:ty = $default:expr, env $env:ident
                    $(, key $key:literal)? $(, shown $shown:literal)?;
            )*
        }
    ) => {
        $(#[$smeta])*
        #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct $name {
            $(
                #[doc = concat!("`", stringify!($env), "`:", $help)]
                $(#[$fmeta])*
                $(#[serde(rename = $key)])?
                pub $field: $ty,
            )*
        }

        impl Default for $name {
            fn default() -> Self {
                Self {
                    $($field: $default,)*
                }
            }
        }

        impl $name {
            /// This section's settings, in the order of the docs.
            pub const VARS: &'static [Var] = &[$(
                Var {
                    env: stringify!($env),
                    section: $section,
                    name: key_name!($field $(, $key)?),
                    field: stringify!($field),
                    help: $help.trim_ascii(),
                    shown_default: some_literal!($($shown)?),
                },
            )*];
        }
    };
}

/// Declares an enum of accepted words: the first word of a variant is its canonical name
/// (`as_str`, what is printed and what librdkafka is given), the others are accepted too.
/// Words match case-insensitively; numbers and booleans are read as words (`acks = 0`).
macro_rules! choice {
    (
        $(#[$meta:meta])*
        pub enum $name:ident expecting $expected:literal {
            $(
                $(#[$vmeta:meta])*
                $variant:ident = $canonical:literal $(| $alias:literal)*,
            )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
        }

        impl $name {
            /// What the configuration accepts, as error messages say it.
            pub const EXPECTED: &'static str = $expected;

            /// The canonical name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $canonical,)*
                }
            }

            /// The variant a configured word names, if any.
            pub fn parse(word: &str) -> Option<Self> {
                let word = word.trim();
                $(
                    if word.eq_ignore_ascii_case($canonical)
                        $(|| word.eq_ignore_ascii_case($alias))*
                    {
                        return Some($name::$variant);
                    }
                )*
                None
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let word = $crate::config::values::scalar_text(d)?;
                Self::parse(&word).ok_or_else(|| {
                    serde::de::Error::invalid_value(
                        serde::de::Unexpected::Str(&word),
                        &Self::EXPECTED,
                    )
                })
            }
        }
    };
}
