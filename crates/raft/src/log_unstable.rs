//! Entries and a snapshot the core has accepted but the application has not yet made durable.

use crate::storage::snapshot_position;
use keel_proto::raftpb::{Entry, Snapshot};

#[derive(Debug, Default, Clone)]
pub struct Unstable {
    /// A snapshot received from the leader, waiting to be persisted. When present it precedes
    /// every entry in `entries`.
    pub snapshot: Option<Snapshot>,
    /// Invariant: `entries[i].index == offset + i`.
    pub entries: Vec<Entry>,
    pub offset: u64,
    /// Entries below this index were handed out in a Ready and are being persisted; they are not
    /// handed out again. Invariant: `offset <= offset_in_progress <= offset + entries.len()`.
    pub offset_in_progress: u64,
    /// The snapshot was handed out in a Ready and is being persisted.
    pub snapshot_in_progress: bool,
}

fn snap_index(s: &Snapshot) -> u64 {
    snapshot_position(s).0
}

fn snap_term(s: &Snapshot) -> u64 {
    snapshot_position(s).1
}

impl Unstable {
    pub fn new(offset: u64) -> Self {
        Unstable {
            offset,
            offset_in_progress: offset,
            ..Default::default()
        }
    }

    /// The index of the first entry, if only a snapshot bounds it.
    pub fn maybe_first_index(&self) -> Option<u64> {
        self.snapshot.as_ref().map(|s| snap_index(s) + 1)
    }

    pub fn maybe_last_index(&self) -> Option<u64> {
        if !self.entries.is_empty() {
            return Some(self.offset + self.entries.len() as u64 - 1);
        }
        self.snapshot.as_ref().map(snap_index)
    }

    pub fn maybe_term(&self, i: u64) -> Option<u64> {
        if i < self.offset {
            let s = self.snapshot.as_ref()?;
            return (snap_index(s) == i).then(|| snap_term(s));
        }
        let last = self.maybe_last_index()?;
        if i > last {
            return None;
        }
        if i == self.offset && self.entries.is_empty() {
            // Only the snapshot covers this index (offset == snapshot index + 1 ≠ i then).
            return None;
        }
        self.entries.get((i - self.offset) as usize).map(|e| e.term)
    }

    /// Entries not yet handed out for persistence.
    pub fn next_entries(&self) -> &[Entry] {
        let start = (self.offset_in_progress - self.offset) as usize;
        &self.entries[start..]
    }

    pub fn next_snapshot(&self) -> Option<&Snapshot> {
        if self.snapshot_in_progress {
            return None;
        }
        self.snapshot.as_ref()
    }

    /// Marks everything currently unstable as handed out.
    pub fn accept_in_progress(&mut self) {
        if let Some(last) = self.entries.last() {
            self.offset_in_progress = last.index + 1;
        }
        if self.snapshot.is_some() {
            self.snapshot_in_progress = true;
        }
    }

    /// Entries up to `(i, t)` are durable. Ignored if the entry at `i` was since replaced by one
    /// of another term (a newer leader overwrote it while the old one was being written; the
    /// new one is still to be persisted).
    pub fn stable_to(&mut self, i: u64, t: u64) {
        let Some(gt) = self.maybe_term(i) else { return };
        if i < self.offset {
            // Only matched the snapshot's index; entries are not affected.
            return;
        }
        if gt == t {
            let n = (i + 1 - self.offset) as usize;
            self.entries.drain(..n);
            self.offset = i + 1;
            self.offset_in_progress = self.offset_in_progress.max(self.offset);
            self.shrink();
        }
    }

    fn shrink(&mut self) {
        // Release memory after a large batch was persisted, but avoid churning small vectors.
        if self.entries.is_empty() && self.entries.capacity() > 1024 {
            self.entries = Vec::new();
        } else if self.entries.capacity() > 4 * self.entries.len().max(256) {
            self.entries.shrink_to(self.entries.len() * 2);
        }
    }

    pub fn stable_snap_to(&mut self, i: u64) {
        if let Some(s) = &self.snapshot {
            if snap_index(s) == i {
                self.snapshot = None;
                self.snapshot_in_progress = false;
            }
        }
    }

    pub fn restore(&mut self, s: Snapshot) {
        self.offset = snap_index(&s) + 1;
        self.offset_in_progress = self.offset;
        self.entries.clear();
        self.snapshot = Some(s);
        self.snapshot_in_progress = false;
    }

    /// Appends `ents`, whose first index may be anywhere in `(.., last_index + 1]`; a
    /// conflicting suffix is dropped.
    pub fn truncate_and_append(&mut self, ents: &[Entry]) {
        let Some(first) = ents.first() else { return };
        let after = first.index;
        let end = self.offset + self.entries.len() as u64;
        if after == end {
            self.entries.extend_from_slice(ents);
        } else if after <= self.offset {
            // Everything unstable is replaced, including entries being written now (their
            // stable_to will then not match on term and be ignored).
            self.offset = after;
            self.offset_in_progress = self.offset;
            self.entries.clear();
            self.entries.extend_from_slice(ents);
        } else {
            self.entries.truncate((after - self.offset) as usize);
            self.offset_in_progress = self.offset_in_progress.min(after);
            self.entries.extend_from_slice(ents);
        }
    }

    /// Entries `[lo, hi)`; the caller guarantees the range is within the unstable entries.
    pub fn slice(&self, lo: u64, hi: u64) -> &[Entry] {
        assert!(
            lo >= self.offset && hi <= self.offset + self.entries.len() as u64 && lo <= hi,
            "unstable slice [{lo}, {hi}) out of bounds [{}, {})",
            self.offset,
            self.offset + self.entries.len() as u64
        );
        &self.entries[(lo - self.offset) as usize..(hi - self.offset) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_proto::raftpb::SnapshotMetadata;

    fn ents(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
        range
            .map(|index| Entry {
                index,
                term,
                ..Default::default()
            })
            .collect()
    }

    fn snap(index: u64, term: u64) -> Snapshot {
        Snapshot {
            data: Default::default(),
            metadata: Some(SnapshotMetadata {
                conf_state: None,
                index,
                term,
            }),
        }
    }

    #[test]
    fn terms_and_bounds() {
        let mut u = Unstable::new(5);
        assert_eq!(u.maybe_last_index(), None);
        u.truncate_and_append(&ents(5..=7, 2));
        assert_eq!(u.maybe_last_index(), Some(7));
        assert_eq!(u.maybe_term(4), None);
        assert_eq!(u.maybe_term(6), Some(2));
        assert_eq!(u.maybe_term(8), None);
        u.restore(snap(10, 3));
        assert_eq!(u.maybe_first_index(), Some(11));
        assert_eq!(u.maybe_last_index(), Some(10));
        assert_eq!(u.maybe_term(10), Some(3));
        assert_eq!(u.maybe_term(11), None);
    }

    #[test]
    fn truncate_and_append_cases() {
        let mut u = Unstable::new(5);
        u.truncate_and_append(&ents(5..=7, 1));
        u.accept_in_progress();
        assert!(u.next_entries().is_empty());
        // Conflict in the middle: the in-progress mark moves back so the new entries go out.
        u.truncate_and_append(&ents(6..=8, 2));
        assert_eq!(u.offset_in_progress, 6);
        assert_eq!(u.next_entries().len(), 3);
        assert_eq!(u.maybe_term(5), Some(1));
        // Replace everything from before the offset.
        u.truncate_and_append(&ents(4..=4, 3));
        assert_eq!((u.offset, u.entries.len()), (4, 1));
    }

    #[test]
    fn stable_to_ignores_replaced_terms() {
        let mut u = Unstable::new(5);
        u.truncate_and_append(&ents(5..=7, 1));
        u.accept_in_progress();
        u.truncate_and_append(&ents(6..=7, 2));
        // The old write of (7, term 1) finishes: it must not mark the new (7, term 2) stable.
        u.stable_to(7, 1);
        assert_eq!(u.offset, 5);
        u.stable_to(5, 1);
        assert_eq!(u.offset, 6);
        u.stable_to(7, 2);
        assert_eq!(u.offset, 8);
        assert!(u.entries.is_empty());
        assert_eq!(u.offset_in_progress, 8);
    }

    #[test]
    fn snapshot_in_progress() {
        let mut u = Unstable::new(1);
        u.restore(snap(10, 3));
        assert!(u.next_snapshot().is_some());
        u.accept_in_progress();
        assert!(u.next_snapshot().is_none());
        u.stable_snap_to(9);
        assert!(u.snapshot.is_some());
        u.stable_snap_to(10);
        assert!(u.snapshot.is_none());
    }
}
