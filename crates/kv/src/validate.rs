//! Checks that depend on the request alone, not on the store.
//!
//! etcd runs these in its gRPC layer before proposing. The API layer should call them too (to
//! refuse early), and the store runs them again on apply, because a log entry is input like any
//! other and apply must be total.

use std::borrow::Cow;
use std::collections::BTreeSet;

use crate::span::Span;
use crate::types::{DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest};
use crate::{Error, MAX_TXN_DEPTH};

impl RangeRequest {
    pub fn validate(&self) -> Result<(), Error> {
        if self.key.is_empty() {
            return Err(Error::EmptyKey);
        }
        Ok(())
    }
}

impl PutRequest {
    pub fn validate(&self) -> Result<(), Error> {
        if self.key.is_empty() {
            return Err(Error::EmptyKey);
        }
        if self.ignore_value && !self.value.is_empty() {
            return Err(Error::ValueProvided);
        }
        if self.ignore_lease && self.lease != 0 {
            return Err(Error::LeaseProvided);
        }
        Ok(())
    }
}

impl DeleteRangeRequest {
    pub fn validate(&self) -> Result<(), Error> {
        if self.key.is_empty() {
            return Err(Error::EmptyKey);
        }
        Ok(())
    }
}

impl TxnRequest {
    /// Every op of both branches, at every depth, is valid on its own; nesting stays within
    /// [`MAX_TXN_DEPTH`]; and no branch writes a key twice (etcd's interval rule, see
    /// `check_intervals`). The op-count limit is the server's setting: see
    /// [`TxnRequest::check_op_limit`].
    pub fn validate(&self) -> Result<(), Error> {
        self.validate_ops(1)?;
        check_intervals(&self.success)?;
        check_intervals(&self.failure)?;
        Ok(())
    }

    fn validate_ops(&self, depth: usize) -> Result<(), Error> {
        if depth > MAX_TXN_DEPTH {
            return Err(Error::TxnTooDeep);
        }
        for op in self.success.iter().chain(&self.failure) {
            match op {
                RequestOp::Range(r) => r.validate()?,
                RequestOp::Put(p) => p.validate()?,
                RequestOp::DeleteRange(d) => d.validate()?,
                RequestOp::Txn(t) => t.validate_ops(depth + 1)?,
            }
        }
        Ok(())
    }

    /// etcd's `--max-txn-ops` rule: no compare list and no branch, at any depth, longer than
    /// `max_ops` (etcd's default is [`crate::DEFAULT_MAX_TXN_OPS`]). The caller enforces it because
    /// the limit is a server setting that may differ between members, and apply must not depend on
    /// one.
    pub fn check_op_limit(&self, max_ops: usize) -> Result<(), Error> {
        self.check_op_limit_at(max_ops, 1)
    }

    fn check_op_limit_at(&self, max_ops: usize, depth: usize) -> Result<(), Error> {
        if depth > MAX_TXN_DEPTH {
            return Err(Error::TxnTooDeep);
        }
        if self.compare.len() > max_ops
            || self.success.len() > max_ops
            || self.failure.len() > max_ops
        {
            return Err(Error::TooManyOps);
        }
        for op in self.success.iter().chain(&self.failure) {
            if let RequestOp::Txn(t) = op {
                t.check_op_limit_at(max_ops, depth + 1)?;
            }
        }
        Ok(())
    }

    /// Compares plus ops of both branches, nested txns counted as one op each plus their own
    /// content.
    pub fn op_count(&self) -> usize {
        let nested: usize = self
            .success
            .iter()
            .chain(&self.failure)
            .map(|op| match op {
                RequestOp::Txn(t) => t.op_count(),
                _ => 0,
            })
            .sum();
        self.compare.len() + self.success.len() + self.failure.len() + nested
    }

    /// No put or delete on either branch at any depth: such a txn may be served from a local view.
    pub fn is_read_only(&self) -> bool {
        self.success.iter().chain(&self.failure).all(|op| match op {
            RequestOp::Range(_) => true,
            RequestOp::Put(_) | RequestOp::DeleteRange(_) => false,
            RequestOp::Txn(t) => t.is_read_only(),
        })
    }
}

/// `[start, end)`; a `None` end is unbounded.
type Interval<'a> = (&'a [u8], Option<Cow<'a, [u8]>>);

/// Delete ranges as a set of half-open key intervals, answering "is this key deleted by some op?".
///
/// Kept as a sorted, merged list (rebuilt lazily after inserts) so that a txn with many puts and
/// deletes costs O(n log n) instead of puts × deletes: the op-count limit is the caller's, so this
/// must not assume it.
#[derive(Default)]
struct Deletes<'a> {
    /// Sorted by start and disjoint whenever `merged`.
    ranges: Vec<Interval<'a>>,
    merged: bool,
}

impl<'a> Deletes<'a> {
    fn insert(&mut self, key: &'a [u8], range_end: &'a [u8]) {
        let range = match Span::new(key, range_end) {
            // The smallest key above `k` is `k` followed by a NUL byte.
            Span::One(k) => (k, Some(Cow::Owned([k, &[0u8][..]].concat()))),
            Span::From(start) => (start, None),
            Span::Between(start, end) => (start, Some(Cow::Borrowed(end))),
            Span::Nothing(_) => return,
        };
        self.ranges.push(range);
        self.merged = false;
    }

    fn union(&mut self, other: Deletes<'a>) {
        if !other.ranges.is_empty() {
            self.ranges.extend(other.ranges);
            self.merged = false;
        }
    }

    fn contains(&mut self, k: &[u8]) -> bool {
        if !self.merged {
            self.merge();
        }
        let i = self.ranges.partition_point(|(start, _)| *start <= k);
        i > 0 && self.ranges[i - 1].1.as_deref().is_none_or(|end| k < end)
    }

    fn merge(&mut self) {
        self.ranges.sort_by(|a, b| a.0.cmp(b.0));
        let mut merged: Vec<Interval<'a>> = Vec::with_capacity(self.ranges.len());
        for (start, end) in self.ranges.drain(..) {
            if let Some(last) = merged.last_mut() {
                let overlaps = last.1.as_deref().is_none_or(|last_end| start <= last_end);
                if overlaps {
                    let extend = match (&last.1, &end) {
                        (None, _) => false,
                        (Some(_), None) => true,
                        (Some(last_end), Some(end)) => end > last_end,
                    };
                    if extend {
                        last.1 = end;
                    }
                    continue;
                }
            }
            merged.push((start, end));
        }
        self.ranges = merged;
        self.merged = true;
    }
}

/// etcd's `checkIntervals`: within one branch, no key may be put twice, and no put may fall in a
/// delete range, at this level or in nested txns. A key put by both branches of one nested txn is
/// fine (only one branch runs). Overlapping deletes are fine (the second finds nothing). Returns
/// the branch's puts and deletes for the level above.
///
/// One deliberate difference: etcd's interval tree reads a delete with `range_end == "\0"` as an
/// empty interval and so misses conflicts with it; here it means "to the end", as it does when the
/// delete runs.
fn check_intervals(ops: &[RequestOp]) -> Result<(BTreeSet<&[u8]>, Deletes<'_>), Error> {
    let mut dels = Deletes::default();
    for op in ops {
        if let RequestOp::DeleteRange(d) = op {
            dels.insert(&d.key, &d.range_end);
        }
    }

    let mut puts: BTreeSet<&[u8]> = BTreeSet::new();
    for op in ops {
        let RequestOp::Txn(t) = op else { continue };
        let (puts_then, dels_then) = check_intervals(&t.success)?;
        let (puts_else, dels_else) = check_intervals(&t.failure)?;
        for &k in &puts_then {
            if puts.contains(k) || dels.contains(k) {
                return Err(Error::DuplicateKey);
            }
            puts.insert(k);
        }
        for &k in &puts_else {
            if (puts.contains(k) && !puts_then.contains(k)) || dels.contains(k) {
                return Err(Error::DuplicateKey);
            }
            puts.insert(k);
        }
        dels.union(dels_then);
        dels.union(dels_else);
    }

    for op in ops {
        let RequestOp::Put(p) = op else { continue };
        let k: &[u8] = &p.key;
        if puts.contains(k) || dels.contains(k) {
            return Err(Error::DuplicateKey);
        }
        puts.insert(k);
    }
    Ok((puts, dels))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set<'a>(ranges: &[(&'a [u8], &'a [u8])]) -> Deletes<'a> {
        let mut d = Deletes::default();
        for (k, e) in ranges {
            d.insert(k, e);
        }
        d
    }

    #[test]
    fn deletes_membership_after_merge() {
        let mut d = set(&[
            (b"m", b"p"),
            (b"b", b""),
            (b"c", b"f"),
            (b"e", b"h"),
            (b"x", b"\0"),
            (b"z", b"a"),
        ]);
        for (k, want) in [
            (&b"a"[..], false),
            (b"b", true),
            (b"b\0", false),
            (b"c", true),
            (b"g", true),
            (b"h", false),
            (b"m", true),
            (b"o", true),
            (b"p", false),
            (b"w", false),
            (b"x", true),
            (b"zz", true),
        ] {
            assert_eq!(d.contains(k), want, "{k:?}");
        }
    }

    #[test]
    fn unbounded_range_swallows_later_ones() {
        let mut d = set(&[(b"b", b"\0"), (b"c", b"d")]);
        assert!(d.contains(b"zzzz"));
        assert!(!d.contains(b"a"));
    }
}
