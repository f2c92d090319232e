//! A batch of records for one topic, built without a heap allocation per record: every key,
//! value and `message-id` lives in one shared buffer, the headers all records carry (the
//! request's trace context) are stored once, and a record's own headers only when it has
//! any. The ingest API and the generator publish through it
//! ([`crate::service::Publisher::publish_all`]); [`RecordBatch::to_records`] gives the same
//! records as [`OutgoingRecord`]s, header for header.

use std::ops::Range;

use super::{HeaderKey, Headers, OutgoingRecord, HEADER_MESSAGE_ID};

/// Records for one topic: see the module documentation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordBatch {
    topic: String,
    /// Keys, values and message ids, back to back.
    data: Vec<u8>,
    entries: Vec<Entry>,
    /// Written on every record after its own headers.
    common: Headers,
}

/// One record: ranges into [`RecordBatch::data`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    key: Option<Range<usize>>,
    payload: Range<usize>,
    message_id: Range<usize>,
    partition: Option<i32>,
    /// Headers of this record only, after `message-id` (empty: no allocation).
    own: Headers,
}

/// One record of a batch, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    batch: &'a RecordBatch,
    entry: &'a Entry,
}

impl RecordBatch {
    /// An empty batch for `topic`, with room for `records` records of `bytes` bytes in all
    /// (keys, values and message ids).
    pub fn with_capacity(topic: &str, records: usize, bytes: usize) -> Self {
        RecordBatch {
            topic: topic.to_owned(),
            data: Vec::with_capacity(bytes),
            entries: Vec::with_capacity(records),
            common: Headers::new(),
        }
    }

    /// The destination topic of every record.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// How many records it holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds no record.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds a record with `key`, the header `message-id: message_id` and the value that
    /// `write_value` appends to the buffer it is given (e.g. `serde_json::to_writer`).
    pub fn push(
        &mut self,
        key: Option<&[u8]>,
        message_id: &str,
        partition: Option<i32>,
        write_value: impl FnOnce(&mut Vec<u8>),
    ) {
        let key = key.map(|k| self.append(k));
        let message_id = self.append(message_id.as_bytes());
        let start = self.data.len();
        write_value(&mut self.data);
        let payload = start..self.data.len();
        self.entries.push(Entry {
            key,
            payload,
            message_id,
            partition,
            own: Headers::new(),
        });
    }

    /// Makes room for `records` more records.
    pub fn reserve(&mut self, records: usize) {
        self.entries.reserve(records);
    }

    /// Adds a header to the last record pushed, after its `message-id` and the headers added
    /// before. Does nothing on an empty batch.
    pub fn push_header(&mut self, name: &str, value: &[u8]) {
        if let Some(e) = self.entries.last_mut() {
            e.own.push((HeaderKey::from(name), Some(value.to_vec())));
        }
    }

    /// Adds `headers` to record `index`, after the headers it has of its own.
    ///
    /// # Panics
    /// When `index` is not below [`RecordBatch::len`].
    pub fn extend_headers_of(
        &mut self,
        index: usize,
        headers: impl IntoIterator<Item = (HeaderKey, Option<Vec<u8>>)>,
    ) {
        self.entries[index].own.extend(headers);
    }

    /// Headers written on every record, after its own.
    pub fn set_common_headers(&mut self, headers: Headers) {
        self.common = headers;
    }

    /// Record `index`.
    ///
    /// # Panics
    /// When `index` is not below [`RecordBatch::len`].
    pub fn get(&self, index: usize) -> RecordRef<'_> {
        RecordRef {
            batch: self,
            entry: &self.entries[index],
        }
    }

    /// Every record, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = RecordRef<'_>> + '_ {
        self.entries
            .iter()
            .map(|entry| RecordRef { batch: self, entry })
    }

    /// Every record as an owned [`OutgoingRecord`], in order, with the same headers.
    pub fn to_records(&self) -> Vec<OutgoingRecord> {
        self.iter().map(|r| r.to_record()).collect()
    }

    fn append(&mut self, bytes: &[u8]) -> Range<usize> {
        let start = self.data.len();
        self.data.extend_from_slice(bytes);
        start..self.data.len()
    }
}

impl<'a> RecordRef<'a> {
    /// The destination topic.
    pub fn topic(&self) -> &'a str {
        &self.batch.topic
    }

    /// The explicit partition, if any.
    pub fn partition(&self) -> Option<i32> {
        self.entry.partition
    }

    /// The key.
    pub fn key(&self) -> Option<&'a [u8]> {
        self.entry.key.clone().map(|r| &self.batch.data[r])
    }

    /// The value.
    pub fn payload(&self) -> &'a [u8] {
        &self.batch.data[self.entry.payload.clone()]
    }

    /// The `message-id` header's value.
    pub fn message_id(&self) -> &'a str {
        // The range holds exactly the bytes of the `&str` given to `push`.
        std::str::from_utf8(&self.batch.data[self.entry.message_id.clone()]).unwrap_or_default()
    }

    /// How many headers it carries.
    pub fn header_count(&self) -> usize {
        1 + self.entry.own.len() + self.batch.common.len()
    }

    /// Its headers in order, names and values: `message-id`, its own, the common ones.
    pub fn headers(&self) -> impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)> + 'a {
        let id = (
            HEADER_MESSAGE_ID.as_bytes(),
            Some(&self.batch.data[self.entry.message_id.clone()]),
        );
        let rest = self.entry.own.iter().chain(&self.batch.common);
        std::iter::once(id).chain(rest.map(|(k, v)| (k.as_bytes(), v.as_deref())))
    }

    /// The record as an owned [`OutgoingRecord`].
    pub fn to_record(&self) -> OutgoingRecord {
        OutgoingRecord {
            topic: self.topic().to_owned(),
            partition: self.partition(),
            key: self.key().map(<[u8]>::to_vec),
            payload: Some(self.payload().to_vec()),
            headers: self
                .headers()
                .map(|(k, v)| (HeaderKey::from(k), v.map(<[u8]>::to_vec)))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_keep_their_key_value_and_headers_in_order() {
        let mut b = RecordBatch::with_capacity("t", 2, 64);
        b.push(Some(b"k1"), "id-1", None, |buf| {
            buf.extend_from_slice(b"v1")
        });
        b.push_header("content-type", b"ct");
        b.push(None, "id-2", Some(3), |buf| buf.extend_from_slice(b"{}"));
        b.set_common_headers(vec![("traceparent".into(), Some(b"tp".to_vec()))]);
        assert_eq!(b.len(), 2);
        let records = b.to_records();
        assert_eq!(
            records[0],
            OutgoingRecord {
                topic: "t".into(),
                partition: None,
                key: Some(b"k1".to_vec()),
                payload: Some(b"v1".to_vec()),
                headers: vec![
                    ("message-id".into(), Some(b"id-1".to_vec())),
                    ("content-type".into(), Some(b"ct".to_vec())),
                    ("traceparent".into(), Some(b"tp".to_vec())),
                ],
            }
        );
        assert_eq!(records[1].partition, Some(3));
        assert_eq!(records[1].key, None);
        assert_eq!(records[1].headers.len(), 2);
        assert_eq!(b.get(1).message_id(), "id-2");
        assert_eq!(b.get(0).header_count(), 3);
    }

    #[test]
    fn an_envelope_in_a_batch_is_the_record_it_publishes_alone() {
        use crate::model::Envelope;
        use serde_json::json;
        let events = [
            json!({"type": "a", "key": "k", "data": {"x": [1, 2.5, "é\n"]}}),
            json!({"type": "b", "id": "given", "partition": 2}),
            json!({"specversion": "1.0", "id": "ce-1", "source": "/s", "type": "c"}),
        ];
        let mut b = RecordBatch::with_capacity("t", 0, 0);
        let mut alone = Vec::new();
        for e in events {
            let env = Envelope::from_value(e).unwrap();
            env.push_to(&mut b);
            alone.push(env.to_record("t"));
        }
        assert_eq!(b.to_records(), alone);
    }
}
