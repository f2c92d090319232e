//! Short byte strings held inline: header names and message ids are almost always a few
//! dozen bytes, and the hot path keeps many of them (a header list per message, the dedupe
//! map), so a value of up to `N` bytes lives where it is stored, without an allocation of
//! its own or a pointer to follow; a longer one is shared on the heap.

use std::fmt;
use std::sync::Arc;

/// Up to `N` bytes inline, more on the heap. Equality, order and hashing are those of the
/// bytes (`Borrow<[u8]>` holds: a map keyed by it is searched with `&[u8]`).
#[derive(Clone)]
pub struct InlineBytes<const N: usize>(Repr<N>);

#[derive(Clone)]
enum Repr<const N: usize> {
    Inline { len: u8, bytes: [u8; N] },
    Heap(Arc<[u8]>),
}

impl<const N: usize> InlineBytes<N> {
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Repr::Heap(b) => b,
        }
    }
}

impl<const N: usize> Default for InlineBytes<N> {
    fn default() -> Self {
        InlineBytes::from(&[][..])
    }
}

impl<const N: usize> From<&[u8]> for InlineBytes<N> {
    fn from(b: &[u8]) -> Self {
        const { assert!(N <= u8::MAX as usize) };
        if b.len() <= N {
            let mut bytes = [0; N];
            bytes[..b.len()].copy_from_slice(b);
            InlineBytes(Repr::Inline {
                len: b.len() as u8,
                bytes,
            })
        } else {
            InlineBytes(Repr::Heap(b.into()))
        }
    }
}

impl<const N: usize> From<Vec<u8>> for InlineBytes<N> {
    fn from(b: Vec<u8>) -> Self {
        if b.len() <= N {
            InlineBytes::from(b.as_slice())
        } else {
            InlineBytes(Repr::Heap(b.into()))
        }
    }
}

impl<const N: usize> std::borrow::Borrow<[u8]> for InlineBytes<N> {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl<const N: usize> PartialEq for InlineBytes<N> {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl<const N: usize> Eq for InlineBytes<N> {}

impl<const N: usize> std::hash::Hash for InlineBytes<N> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As `[u8]` hashes, which `Borrow<[u8]>` requires.
        self.as_bytes().hash(state);
    }
}

impl<const N: usize> PartialOrd for InlineBytes<N> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl<const N: usize> Ord for InlineBytes<N> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl<const N: usize> fmt::Debug for InlineBytes<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn short_and_long_values_compare_hash_and_look_up_as_their_bytes() {
        let short = InlineBytes::<4>::from(&b"abcd"[..]);
        let long = InlineBytes::<4>::from(b"abcde".to_vec());
        assert!(matches!(short.0, Repr::Inline { len: 4, .. }));
        assert!(matches!(long.0, Repr::Heap(_)));
        assert_eq!(long.as_bytes(), b"abcde");
        assert_eq!(long, InlineBytes::from(&b"abcde"[..]));
        assert!(short < long);
        let map: HashMap<_, _> = [(short.clone(), 1), (long, 2)].into_iter().collect();
        assert_eq!(map.get(&b"abcd"[..]), Some(&1));
        assert_eq!(map.get(&b"abcde"[..]), Some(&2));
        assert_eq!(format!("{short:?}"), "\"abcd\"");
    }
}
