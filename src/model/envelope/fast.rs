//! The one-pass ingest parser: a request body (one event object or an array of them) is
//! read once and each event written straight into a [`RecordBatch`] as compact JSON, with
//! no `serde_json::Value` built for it. The top-level fields that validation reads (`type`,
//! `id`, `key`, …) are kept too, borrowed from the body where they have no escapes, and
//! validated by the same code as [`Envelope::from_value`](super::Envelope::from_value).
//!
//! It gives exactly what the value path gives (the same bytes in each record, the same
//! key, id, partition and headers) or nothing: a body that is malformed, not events, empty
//! or too large a batch, holds an invalid event, repeats a top-level field or has an `id`
//! of `null` is left to the value path, which answers it (with the precise error).

use std::borrow::Cow;
use std::fmt;
use std::io::Write;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Number;
#[cfg(test)]
use serde_json::Value;

use super::{
    check, new_id_in, Field, Fields, RecordBatch, CLOUDEVENTS_CONTENT_TYPE, HEADER_CONTENT_TYPE,
};

/// The events of `body` as records for `topic`, when every one of them is a valid envelope
/// and `body` holds at most `max_events`; `None` sends the body to the value path (see the
/// module documentation).
pub fn events_to_batch(body: &[u8], topic: &str, max_events: usize) -> Option<RecordBatch> {
    let mut sink = Sink {
        batch: RecordBatch::with_capacity(topic, 0, body.len() + body.len() / 2),
        scratch: Vec::with_capacity(256),
        max_events,
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    de.deserialize_any(Body(&mut sink)).ok()?;
    de.end().ok()?;
    Some(sink.batch)
}

/// Where the events go.
struct Sink {
    batch: RecordBatch,
    /// The event being written.
    scratch: Vec<u8>,
    max_events: usize,
}

/// A reason to leave the body to the value path (the message is never shown).
fn fallback<E: de::Error>() -> E {
    E::custom("left to the value path")
}

/// The body: one event object or a non-empty array of at most `max_events` of them.
struct Body<'a>(&'a mut Sink);

impl<'de> Visitor<'de> for Body<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an event object or an array of them")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        event(self.0, map, &mut Vec::new())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        // The field names of one event, kept for the next one's.
        let mut names = Vec::new();
        while seq
            .next_element_seed(Event(&mut *self.0, &mut names))?
            .is_some()
        {
            if self.0.batch.len() > self.0.max_events {
                return Err(fallback());
            }
        }
        if self.0.batch.is_empty() {
            return Err(fallback());
        }
        Ok(())
    }
}

/// One element of the array: an event object (and room for its field names).
struct Event<'a, 'de>(&'a mut Sink, &'a mut Vec<Key<'de>>);

impl<'de> DeserializeSeed<'de> for Event<'_, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Event<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an event object")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        event(self.0, map, self.1)
    }
}

/// The values of the top-level fields validation reads (see [`Kept::slot`]) of one event.
#[derive(Default)]
struct Kept<'de>([Option<KeptValue<'de>>; 9]);

impl Kept<'_> {
    /// Where field `name` is kept, if validation reads it.
    fn slot(name: &str) -> Option<usize> {
        Some(match name {
            "type" => 0,
            "id" => 1,
            "key" => 2,
            "source" => 3,
            "time" => 4,
            "timestamp" => 5,
            "partition" => 6,
            "specversion" => 7,
            "partitionkey" => 8,
            _ => return None,
        })
    }
}

impl Fields for Kept<'_> {
    fn get(&self, name: &str) -> Option<Field<'_>> {
        let value = self.0[Kept::slot(name)?].as_ref()?;
        Some(match value {
            KeptValue::Null => Field::Null,
            KeptValue::Str(s) => Field::Str(s),
            KeptValue::Num(n) => Field::Num(n),
            KeptValue::Other => Field::Other,
        })
    }
}

/// A kept field's value: what [`Field`] shows of the `Value` the value path parses.
enum KeptValue<'de> {
    Null,
    Str(Cow<'de, str>),
    Num(Number),
    Other,
}

/// Most top-level fields an event may have on this path (duplicates are looked for among
/// them one by one).
const MAX_FIELDS: usize = 64;

/// Writes one event object as compact JSON into the sink's scratch buffer, validates it,
/// and adds its record to the batch.
fn event<'de, A: MapAccess<'de>>(
    sink: &mut Sink,
    mut map: A,
    names: &mut Vec<Key<'de>>,
) -> Result<(), A::Error> {
    let out = &mut sink.scratch;
    out.clear();
    out.push(b'{');
    let mut kept = Kept::default();
    names.clear();
    while let Some(name) = map.next_key_seed(KeySeed)? {
        // A repeated field: the value path keeps the last value at the first place.
        if names.len() >= MAX_FIELDS || names.iter().any(|n| n.as_str() == name.as_str()) {
            return Err(fallback());
        }
        if !names.is_empty() {
            out.push(b',');
        }
        name.write(out);
        out.push(b':');
        match Kept::slot(name.as_str()) {
            Some(i) => kept.0[i] = Some(map.next_value_seed(Keep(&mut *out))?),
            None => map.next_value_seed(Transcode(&mut *out))?,
        }
        names.push(name);
    }
    let checked = check(&kept).map_err(|_| fallback())?;
    let mut generated = uuid::Uuid::encode_buffer();
    let id = match checked.id {
        Some(id) => id,
        // `"id": null` is replaced where it stands by the value path: left to it.
        None if kept.get("id").is_some() => return Err(fallback()),
        None => {
            let id = new_id_in(&mut generated);
            out.extend_from_slice(b",\"id\":");
            // Hex digits and hyphens: nothing to escape.
            write_borrowed_str(out, id);
            id
        }
    };
    out.push(b'}');
    let key = checked.key.unwrap_or(id);
    let scratch = &sink.scratch;
    sink.batch
        .push(Some(key.as_bytes()), id, checked.partition, |buf| {
            buf.extend_from_slice(scratch)
        });
    if checked.cloudevent {
        sink.batch
            .push_header(HEADER_CONTENT_TYPE, CLOUDEVENTS_CONTENT_TYPE.as_bytes());
    }
    Ok(())
}

/// Appends `s` as a JSON string, as `serde_json` writes it.
fn write_str(out: &mut Vec<u8>, s: &str) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Appends `s`, a string with no character JSON escapes (`"`, `\`, U+0000 to U+001F), as
/// [`write_str`] would, without looking for them: a string the parser borrowed from the
/// body (`serde_json` borrows a string only when it has no escape sequence, and refuses
/// control characters in a string) or a generated id.
fn write_borrowed_str(out: &mut Vec<u8>, s: &str) {
    out.reserve(s.len() + 2);
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

/// An object key, borrowed from the body when it has no escapes.
enum Key<'de> {
    Borrowed(&'de str),
    Owned(String),
}

impl Key<'_> {
    fn as_str(&self) -> &str {
        match self {
            Key::Borrowed(s) => s,
            Key::Owned(s) => s,
        }
    }

    /// Appends it as a JSON string.
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Key::Borrowed(s) => write_borrowed_str(out, s),
            Key::Owned(s) => write_str(out, s),
        }
    }
}

struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Key<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Key<'de>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Key<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
        Ok(Key::Borrowed(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
        Ok(Key::Owned(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
        Ok(Key::Owned(v))
    }
}

/// Writes the next JSON value as [`Transcode`] does, and keeps what validation reads of it:
/// the same number `Value` would hold, a string borrowed from the body unless it has escapes.
struct Keep<'a>(&'a mut Vec<u8>);

impl<'de> DeserializeSeed<'de> for Keep<'_> {
    type Value = KeptValue<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<KeptValue<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Keep<'_> {
    type Value = KeptValue<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<KeptValue<'de>, E> {
        Transcode(self.0).visit_bool::<E>(v)?;
        Ok(KeptValue::Other)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<KeptValue<'de>, E> {
        Transcode(self.0).visit_i64::<E>(v)?;
        Ok(KeptValue::Num(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<KeptValue<'de>, E> {
        Transcode(self.0).visit_u64::<E>(v)?;
        Ok(KeptValue::Num(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<KeptValue<'de>, E> {
        Transcode(self.0).visit_f64::<E>(v)?;
        // As `Value` does: a number that is not finite is `null`.
        Ok(Number::from_f64(v).map_or(KeptValue::Null, KeptValue::Num))
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<KeptValue<'de>, E> {
        write_borrowed_str(self.0, v);
        Ok(KeptValue::Str(Cow::Borrowed(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<KeptValue<'de>, E> {
        write_str(self.0, v);
        Ok(KeptValue::Str(Cow::Owned(v.to_owned())))
    }

    fn visit_unit<E: de::Error>(self) -> Result<KeptValue<'de>, E> {
        self.0.extend_from_slice(b"null");
        Ok(KeptValue::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<KeptValue<'de>, E> {
        self.visit_unit()
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<KeptValue<'de>, A::Error> {
        Transcode(self.0).visit_seq(seq)?;
        Ok(KeptValue::Other)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<KeptValue<'de>, A::Error> {
        Transcode(self.0).visit_map(map)?;
        Ok(KeptValue::Other)
    }
}

/// Writes the next JSON value as compact JSON, as `serde_json` writes the `Value` it would
/// have parsed: the same visits (`u64`, `i64`, `f64`, strings unescaped and escaped again)
/// and the same formatting (`serde_json::to_writer` for numbers and strings).
struct Transcode<'a>(&'a mut Vec<u8>);

impl<'de> DeserializeSeed<'de> for Transcode<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Transcode<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.0
            .extend_from_slice(if v { b"true".as_slice() } else { b"false" });
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        let _ = write!(self.0, "{v}");
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        let _ = write!(self.0, "{v}");
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        // As `Value` does: a number that is not finite is `null`.
        match serde_json::Number::from_f64(v) {
            Some(n) => {
                let _ = serde_json::to_writer(&mut *self.0, &n);
            }
            None => self.0.extend_from_slice(b"null"),
        }
        Ok(())
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<(), E> {
        write_borrowed_str(self.0, v);
        Ok(())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        write_str(self.0, v);
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.0.extend_from_slice(b"null");
        Ok(())
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.visit_unit()
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.0.push(b'[');
        let mut first = true;
        loop {
            let at = self.0.len();
            if !first {
                self.0.push(b',');
            }
            if seq.next_element_seed(Transcode(&mut *self.0))?.is_none() {
                self.0.truncate(at);
                break;
            }
            first = false;
        }
        self.0.push(b']');
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        // A nested object: the value path keeps it as a map too, so a repeated field there
        // is left to it as well.
        let mut names: Vec<Key<'de>> = Vec::new();
        self.0.push(b'{');
        while let Some(name) = map.next_key_seed(KeySeed)? {
            if names.len() >= MAX_FIELDS || names.iter().any(|n| n.as_str() == name.as_str()) {
                return Err(fallback());
            }
            if !names.is_empty() {
                self.0.push(b',');
            }
            name.write(self.0);
            self.0.push(b':');
            map.next_value_seed(Transcode(&mut *self.0))?;
            names.push(name);
        }
        self.0.push(b'}');
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Envelope;

    /// The records of the value path: what `ingest::validate_batch` and `push_to` give.
    fn value_path(body: &str, max: usize) -> Option<Vec<crate::model::OutgoingRecord>> {
        let value: Value = serde_json::from_str(body).ok()?;
        let items = match value {
            Value::Array(items) if !items.is_empty() && items.len() <= max => items,
            Value::Object(_) => vec![value],
            _ => return None,
        };
        let mut batch = RecordBatch::with_capacity("t", 0, 0);
        for item in items {
            Envelope::from_value(item).ok()?.push_to(&mut batch);
        }
        Some(batch.to_records())
    }

    #[test]
    fn the_one_pass_records_are_the_value_path_records() {
        let bodies = [
            r#"{"type":"a","id":"1","data":{"n":1}}"#,
            r#"[{"type":"a","id":"1"},{"id":"2","type":"b","key":"k","partition":3}]"#,
            r#" { "id" : "x\u00e9\n\"" , "type":"t" , "data" : [1, -2, 3.50, 1e3, 12345678901234567890123, true, false, null, "\ud83d\ude00", {"a":{"b":[]}}, {}] } "#,
            r#"{"type":"t","id":"i","time":"2024-01-02T03:04:05Z","source":"s","key":""}"#,
            r#"{"type":"t","id":"i","timestamp":null,"source":null,"partition":null,"key":null}"#,
            r#"{"specversion":"1.0","id":"ce","source":"/s","type":"c","partitionkey":"pk","data":{}}"#,
            r#"{"specversion":"1.0","id":"ce","source":"/s","type":"c","key":"k2","time":"2024-01-02T03:04:05.123+01:00"}"#,
            r#"{"type":"t","id":"i","data":{"x":0.1,"y":-0.0,"z":1.7976931348623157e308,"w":5e-324}}"#,
        ];
        for body in bodies {
            let fast = events_to_batch(body.as_bytes(), "t", 10)
                .expect(body)
                .to_records();
            assert_eq!(Some(fast), value_path(body, 10), "{body}");
        }
    }

    #[test]
    fn a_missing_id_is_a_new_uuid_written_last_and_the_default_key() {
        let batch = events_to_batch(br#"{"type":"t","data":1}"#, "t", 1).unwrap();
        let r = batch.get(0);
        let id = r.message_id();
        assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 7);
        assert_eq!(r.key(), Some(id.as_bytes()));
        let want = format!(r#"{{"type":"t","data":1,"id":"{id}"}}"#);
        assert_eq!(r.payload(), want.as_bytes());
    }

    /// Arbitrary JSON whose object keys are often the envelope's own, with no `null` id
    /// (the value path writes a generated id in its place; see the module documentation).
    fn arb_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| serde_json::json!(n)),
            any::<u64>().prop_map(|n| serde_json::json!(n)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| serde_json::json!(f)),
            ".{0,12}".prop_map(Value::String),
            Just(serde_json::json!("1.0")),
            Just(serde_json::json!("2024-01-02T03:04:05Z")),
        ];
        let key = prop_oneof![
            Just("type".to_owned()),
            Just("id".to_owned()),
            Just("key".to_owned()),
            Just("time".to_owned()),
            Just("source".to_owned()),
            Just("partition".to_owned()),
            Just("specversion".to_owned()),
            Just("partitionkey".to_owned()),
            Just("data".to_owned()),
            ".{1,6}",
        ];
        leaf.prop_recursive(4, 48, 6, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::vec((key.clone(), inner), 0..8).prop_map(|kv| {
                    let mut m: serde_json::Map<String, Value> = kv.into_iter().collect();
                    if m.get("id") == Some(&Value::Null) {
                        m.insert("id".into(), Value::String("given".into()));
                    }
                    Value::Object(m)
                }),
            ]
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 2000,
            failure_persistence: None,
            ..Default::default()
        })]

        /// Whatever the value path accepts (with an id given), the one pass accepts too, with
        /// the same records; and it accepts nothing else.
        #[test]
        fn one_pass_and_value_path_agree(v in arb_json(), id in ".{1,8}", pretty in proptest::bool::ANY) {
            let mut v = v;
            let with_id = |m: &mut serde_json::Map<String, Value>| {
                m.entry("id").or_insert(Value::String(id.clone()));
            };
            match &mut v {
                Value::Object(m) => with_id(m),
                Value::Array(items) => items.iter_mut().filter_map(Value::as_object_mut).for_each(with_id),
                _ => {}
            }
            let body = if pretty { serde_json::to_string_pretty(&v) } else { serde_json::to_string(&v) }.unwrap();
            let fast = events_to_batch(body.as_bytes(), "t", 4).map(|b| b.to_records());
            proptest::prop_assert_eq!(fast, value_path(&body, 4), "{}", body);
        }
    }

    #[test]
    fn anything_else_is_left_to_the_value_path() {
        for body in [
            "",
            "{",
            "[]",
            "42",
            r#""s""#,
            r#"[1]"#,
            r#"[{"type":"a"},{"type":"a"},{"type":"a"}]"#,
            r#"{"id":"x"}"#,
            r#"{"type":"t","type":"u"}"#,
            r#"{"type":"t","data":{"a":1,"a":2}}"#,
            r#"{"type":"t","id":null}"#,
            r#"{"type":"t","time":"yesterday"}"#,
            r#"{"specversion":"0.3","id":"i","source":"s","type":"t"}"#,
            r#"{"type":"t"} trailing"#,
        ] {
            assert!(events_to_batch(body.as_bytes(), "t", 2).is_none(), "{body}");
        }
    }
}
