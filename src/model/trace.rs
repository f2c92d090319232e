//! W3C trace context (<https://www.w3.org/TR/trace-context/>): the `traceparent` and
//! `tracestate` headers a record carries from ingest through every retry and DLQ hop to the
//! http processor's endpoint. Parsing is strict (a malformed `traceparent` is ignored and a
//! new trace started, as the recommendation asks) and cheap: [`trace_id_of`] borrows the
//! trace id out of the header value without allocating, for log lines.

use super::{header_value, HeaderKey, Headers};

/// The W3C `traceparent` header: `00-<trace-id>-<parent-id>-<flags>`.
pub const HEADER_TRACEPARENT: &str = "traceparent";
/// The W3C `tracestate` header: vendor-specific `key=value` pairs, comma-separated.
pub const HEADER_TRACESTATE: &str = "tracestate";

/// The length of a version-00 `traceparent`.
const TRACEPARENT_LEN: usize = 55;
/// The longest `tracestate` kept (32 members of at most 256 bytes would be 8 KiB; the
/// recommendation lets a vendor truncate, and 512 bytes is what it asks every vendor to
/// propagate at least).
pub const MAX_TRACESTATE_BYTES: usize = 512;
/// At most this many `tracestate` list members.
const MAX_TRACESTATE_MEMBERS: usize = 32;

/// A parsed `traceparent`: trace id, parent (span) id and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace id (never zero).
    pub trace_id: u128,
    /// The id of the span that is the parent of whatever comes next (never zero).
    pub span_id: u64,
    /// Trace flags; bit 0 is `sampled`.
    pub flags: u8,
}

impl TraceParent {
    /// The `sampled` flag.
    pub const SAMPLED: u8 = 0x01;

    /// Parses a `traceparent` value. Version `00` must be exactly 55 characters; a later
    /// version may append fields after a `-`, which are ignored. Hex must be lower case;
    /// an all-zero trace or parent id and version `ff` are invalid.
    pub fn parse(value: &[u8]) -> Option<Self> {
        if value.len() < TRACEPARENT_LEN {
            return None;
        }
        let version = hex_u8(&value[0..2])?;
        if version == 0xff || (version == 0 && value.len() != TRACEPARENT_LEN) {
            return None;
        }
        if value.len() > TRACEPARENT_LEN && value[TRACEPARENT_LEN] != b'-' {
            return None;
        }
        if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
            return None;
        }
        let trace_id = hex_u128(&value[3..35])?;
        let span_id = u64::try_from(hex_u128(&value[36..52])?).ok()?;
        let flags = hex_u8(&value[53..55])?;
        (trace_id != 0 && span_id != 0).then_some(TraceParent {
            trace_id,
            span_id,
            flags,
        })
    }

    /// A new trace: random trace and span ids, sampled.
    pub fn new_root() -> Self {
        TraceParent {
            trace_id: nonzero(rand::random::<u128>),
            span_id: nonzero(rand::random::<u64>),
            flags: Self::SAMPLED,
        }
    }

    /// The trace id as 32 lower-case hex digits.
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The header value, version `00`.
    pub fn to_header(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

/// A trace context: `traceparent` and the `tracestate` that travels with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// `traceparent`.
    pub parent: TraceParent,
    /// `tracestate`, when one came with a valid `traceparent` and was valid itself.
    pub state: Option<String>,
}

impl TraceContext {
    /// The context of a request or record: a valid `traceparent` with its `tracestate` (a
    /// malformed `tracestate` is dropped, keeping the `traceparent`); `None` when the
    /// `traceparent` is absent or malformed (its `tracestate` is then ignored, as the
    /// recommendation requires).
    pub fn from_values(traceparent: Option<&[u8]>, tracestate: Option<&[u8]>) -> Option<Self> {
        let parent = TraceParent::parse(traceparent?)?;
        let state = tracestate
            .and_then(valid_tracestate)
            .filter(|s| !s.is_empty())
            .map(str::to_owned);
        Some(TraceContext { parent, state })
    }

    /// The context of a record's headers, as [`TraceContext::from_values`].
    pub fn from_headers(headers: &Headers) -> Option<Self> {
        TraceContext::from_values(
            header_value(headers, HEADER_TRACEPARENT),
            header_value(headers, HEADER_TRACESTATE),
        )
    }

    /// A new trace (see [`TraceParent::new_root`]), without `tracestate`.
    pub fn new_root() -> Self {
        TraceContext {
            parent: TraceParent::new_root(),
            state: None,
        }
    }

    /// The Kafka headers `traceparent` and (when set) `tracestate`.
    pub fn headers(&self) -> impl Iterator<Item = (HeaderKey, Option<Vec<u8>>)> + '_ {
        let parent = (
            HeaderKey::from(HEADER_TRACEPARENT),
            Some(self.parent.to_header().into_bytes()),
        );
        let state = self.state.as_ref().map(|s| {
            (
                HeaderKey::from(HEADER_TRACESTATE),
                Some(s.clone().into_bytes()),
            )
        });
        std::iter::once(parent).chain(state)
    }
}

/// The trace id of a `traceparent` header among `headers`, borrowed from its value (no
/// allocation): `None` when there is none or it is malformed.
pub fn trace_id_of(headers: &Headers) -> Option<&str> {
    let value = header_value(headers, HEADER_TRACEPARENT)?;
    TraceParent::parse(value)?;
    // Validated above: ASCII hex digits.
    std::str::from_utf8(&value[3..35]).ok()
}

/// `value` as text when it is a valid `tracestate`: at most [`MAX_TRACESTATE_BYTES`] of
/// printable ASCII, at most 32 comma-separated `key=value` members with a non-empty key
/// and value.
fn valid_tracestate(value: &[u8]) -> Option<&str> {
    if value.len() > MAX_TRACESTATE_BYTES || !value.iter().all(|b| (0x20..=0x7e).contains(b)) {
        return None;
    }
    let text = std::str::from_utf8(value).ok()?.trim();
    let members: Vec<&str> = text
        .split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .collect();
    let well_formed = members.iter().all(|m| {
        m.split_once('=').is_some_and(|(k, v)| {
            !k.is_empty()
                && !v.is_empty()
                && !k.contains(' ')
                && k.bytes().all(|b| {
                    b.is_ascii_lowercase()
                        || b.is_ascii_digit()
                        || matches!(b, b'_' | b'-' | b'*' | b'/' | b'@')
                })
                && !v.contains('=')
        })
    });
    (members.len() <= MAX_TRACESTATE_MEMBERS && well_formed).then_some(text)
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

fn hex_u8(s: &[u8]) -> Option<u8> {
    Some(hex_digit(s[0])? << 4 | hex_digit(s[1])?)
}

fn hex_u128(s: &[u8]) -> Option<u128> {
    s.iter()
        .try_fold(0u128, |acc, b| Some(acc << 4 | u128::from(hex_digit(*b)?)))
}

/// A random value that is not zero (an all-zero id is invalid).
fn nonzero<T: PartialEq + Default>(draw: impl Fn() -> T) -> T {
    loop {
        let v = draw();
        if v != T::default() {
            return v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_recommendation_example() {
        let p = TraceParent::parse(VALID.as_bytes()).unwrap();
        assert_eq!(p.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(p.span_id, 0x00f067aa0ba902b7);
        assert_eq!(p.flags, 1);
        assert_eq!(p.to_header(), VALID);
        assert_eq!(p.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn rejects_malformed_traceparents() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ] {
            assert_eq!(TraceParent::parse(bad.as_bytes()), None, "{bad:?}");
        }
        // A later version may append fields.
        let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes";
        assert!(TraceParent::parse(future.as_bytes()).is_some());
    }

    #[test]
    fn a_new_root_is_valid_sampled_and_random() {
        let a = TraceParent::new_root();
        let b = TraceParent::new_root();
        assert_eq!(TraceParent::parse(a.to_header().as_bytes()), Some(a));
        assert_eq!(a.flags, TraceParent::SAMPLED);
        assert_ne!(a.trace_id, b.trace_id);
    }

    #[test]
    fn tracestate_is_kept_only_beside_a_valid_traceparent() {
        let state = b"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7";
        let c = TraceContext::from_values(Some(VALID.as_bytes()), Some(state)).unwrap();
        assert_eq!(
            c.state.as_deref(),
            Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
        );
        assert_eq!(TraceContext::from_values(Some(b"junk"), Some(state)), None);
        for bad in [&b"no-equals"[..], b"k=v\x01", b"K=v", &[b'a'; 600]] {
            let c = TraceContext::from_values(Some(VALID.as_bytes()), Some(bad)).unwrap();
            assert_eq!(c.state, None, "{:?}", String::from_utf8_lossy(bad));
        }
        let headers: Vec<_> =
            c_headers(&TraceContext::from_values(Some(VALID.as_bytes()), Some(state)).unwrap());
        assert_eq!(headers, vec![HEADER_TRACEPARENT, HEADER_TRACESTATE]);
    }

    fn c_headers(c: &TraceContext) -> Vec<&'static str> {
        c.headers()
            .map(|(k, _)| {
                if k == HEADER_TRACEPARENT {
                    HEADER_TRACEPARENT
                } else {
                    HEADER_TRACESTATE
                }
            })
            .collect()
    }

    #[test]
    fn trace_id_is_borrowed_from_a_valid_header_only() {
        let h =
            |v: &str| -> Headers { vec![(HEADER_TRACEPARENT.into(), Some(v.as_bytes().to_vec()))] };
        assert_eq!(
            trace_id_of(&h(VALID)),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id_of(&h("00-nope")), None);
        assert_eq!(trace_id_of(&Vec::new()), None);
    }
}
