//! Kafka headers to and from courier's [`Headers`], byte for byte.
//!
//! The Kafka protocol allows any bytes in a header name, but rdkafka's `Headers::iter` and
//! `OwnedHeaders::insert` assume UTF-8 names (`iter` panics on anything else, and `insert`
//! takes a `&str`). One record with a name that is not UTF-8 would then kill the consumer
//! on every restart (DESIGN.md, guarantee 8). These two functions go through librdkafka's
//! C API instead, so names and values pass unchanged.
//!
//! Limit: librdkafka hands a header name over as a NUL-terminated string, so a name with
//! an embedded NUL byte is read up to that byte. Nothing else is altered.

use std::ffi::CStr;
use std::os::raw::{c_char, c_void};

use rdkafka::bindings as rdsys;
use rdkafka::message::{BorrowedHeaders, Headers as _, OwnedHeaders};
use rdkafka::types::RDKafkaHeaders;

use crate::model::{HeaderKey, Headers};

/// Every header of `headers`, in order, names and values byte for byte.
pub fn read(headers: &BorrowedHeaders) -> Headers {
    let native = headers as *const BorrowedHeaders as *const RDKafkaHeaders;
    let count = headers.count();
    let mut out = Vec::with_capacity(count);
    for idx in 0..count {
        let mut name: *const c_char = std::ptr::null();
        let mut value: *const c_void = std::ptr::null();
        let mut size: usize = 0;
        // SAFETY: `native` is the live header list behind `headers` (rdkafka hands out
        // `&BorrowedHeaders` as a cast of exactly this pointer), `idx` is below its count,
        // and the out-pointers are valid locals.
        let err = unsafe {
            rdsys::rd_kafka_header_get_all(native, idx, &mut name, &mut value, &mut size)
        };
        if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            continue;
        }
        // SAFETY: librdkafka returns a NUL-terminated name that lives as long as the list,
        // and a value of `size` bytes (or null for a null value).
        let key = unsafe { CStr::from_ptr(name) }.to_bytes();
        let value = (!value.is_null())
            .then(|| unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) }.to_vec());
        out.push((HeaderKey::from(key), value));
    }
    out
}

/// A librdkafka header list with `headers`, names and values byte for byte.
pub fn write(headers: &Headers) -> OwnedHeaders {
    let owned = OwnedHeaders::new_with_capacity(headers.len());
    let native = owned.as_borrowed() as *const BorrowedHeaders as *mut RDKafkaHeaders;
    for (key, value) in headers {
        let name = key.as_bytes();
        let (value_ptr, value_len) = match value {
            Some(v) => (v.as_ptr().cast::<c_void>(), v.len() as isize),
            None => (std::ptr::null(), 0),
        };
        // SAFETY: `native` is the header list `owned` owns and keeps alive; librdkafka copies
        // `name_len` bytes of the name and `value_len` bytes of the value. A list created by
        // `rd_kafka_headers_new` is writable, so adding cannot fail (rdkafka asserts the same).
        unsafe {
            rdsys::rd_kafka_header_add(
                native,
                name.as_ptr().cast::<c_char>(),
                name.len() as isize,
                value_ptr,
                value_len,
            );
        }
    }
    owned
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_values_of_any_bytes_round_trip() {
        let headers: Headers = vec![
            (
                HeaderKey::from(b"bad\xffkey".as_slice()),
                Some(b"v".to_vec()),
            ),
            ("message-id".into(), Some(b"m-1".to_vec())),
            ("null".into(), None),
            ("empty".into(), Some(Vec::new())),
            ("binary".into(), Some(vec![0, 255, 1, 0])),
        ];
        let owned = write(&headers);
        assert_eq!(read(owned.as_borrowed()), headers);
    }
}
