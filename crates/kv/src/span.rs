//! The set of keys a `(key, range_end)` pair selects, with etcd's magic values decoded once.

use std::ops::Bound;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Span<'a> {
    /// `range_end` empty: exactly this key.
    One(&'a [u8]),
    /// `range_end == "\0"`: every key at or after this one.
    From(&'a [u8]),
    /// [start, end) with start < end.
    Between(&'a [u8], &'a [u8]),
    /// `range_end <= key`: no key at all. Keeps `key` so that `bounds` can still name a (empty)
    /// range.
    Nothing(&'a [u8]),
}

impl<'a> Span<'a> {
    pub(crate) fn new(key: &'a [u8], range_end: &'a [u8]) -> Span<'a> {
        match range_end {
            [] => Span::One(key),
            [0] => Span::From(key),
            end if key < end => Span::Between(key, end),
            _ => Span::Nothing(key),
        }
    }

    pub(crate) fn contains(&self, k: &[u8]) -> bool {
        match *self {
            Span::One(key) => k == key,
            Span::From(start) => k >= start,
            Span::Between(start, end) => k >= start && k < end,
            Span::Nothing(_) => false,
        }
    }

    /// Bounds for `BTreeMap::range`, which panics on a start above the end: `Nothing` maps to the
    /// empty `[key, key)`, which it accepts.
    pub(crate) fn bounds(&self) -> (Bound<&'a [u8]>, Bound<&'a [u8]>) {
        match *self {
            Span::One(key) => (Bound::Included(key), Bound::Included(key)),
            Span::From(start) => (Bound::Included(start), Bound::Unbounded),
            Span::Between(start, end) => (Bound::Included(start), Bound::Excluded(end)),
            Span::Nothing(key) => (Bound::Included(key), Bound::Excluded(key)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_values() {
        assert_eq!(Span::new(b"a", b""), Span::One(b"a"));
        assert_eq!(Span::new(b"a", b"\0"), Span::From(b"a"));
        assert_eq!(Span::new(b"a", b"c"), Span::Between(b"a", b"c"));
        assert_eq!(Span::new(b"c", b"a"), Span::Nothing(b"c"));
        assert_eq!(Span::new(b"a", b"a"), Span::Nothing(b"a"));
        // A two-byte end that starts with NUL is an ordinary bound, not the "to the end" marker.
        assert_eq!(Span::new(b"a", b"\0\0"), Span::Nothing(b"a"));
    }

    #[test]
    fn contains_matches_bounds() {
        let spans = [
            Span::new(b"b", b""),
            Span::new(b"b", b"\0"),
            Span::new(b"b", b"d"),
            Span::new(b"d", b"b"),
        ];
        let keys: [&[u8]; 6] = [b"a", b"b", b"b\0", b"c", b"d", b"e"];
        for span in spans {
            for k in keys {
                let in_bounds = std::ops::RangeBounds::<[u8]>::contains(&span.bounds(), k);
                assert_eq!(span.contains(k), in_bounds, "{span:?} {k:?}");
            }
        }
        assert!(Span::new(b"b", b"d").contains(b"c"));
        assert!(!Span::new(b"b", b"d").contains(b"d"));
        assert!(Span::new(b"b", b"\0").contains(b"zzz"));
    }
}
