//! The log as the core sees it: persisted entries (through `Storage`) followed by unstable ones.

use crate::errors::StorageError;
use crate::log_unstable::Unstable;
use crate::storage::{limit_size, Storage};
use keel_proto::raftpb::{Entry, Snapshot};

pub struct RaftLog<S: Storage> {
    pub store: S,
    pub unstable: Unstable,
    /// Highest index known to be committed (durable on a quorum).
    /// Invariant: `applied <= committed <= last_index()`.
    pub committed: u64,
    /// Highest index the application has applied.
    pub applied: u64,
    /// Highest index handed to the application to apply (in an outstanding Ready).
    /// Invariant: `applied <= applying <= committed`.
    pub applying: u64,
    /// Highest index known durable in this node's own log. The leader counts only this much of
    /// its own log toward a quorum, so a commit never depends on an unsynced local write.
    pub persisted: u64,
    /// Bound on the bytes of committed entries in one Ready, so apply batches stay bounded even
    /// when a follower catches up a long log at once.
    pub max_apply_bytes: u64,
}

impl<S: Storage> RaftLog<S> {
    pub fn new(store: S, max_apply_bytes: u64) -> Self {
        let first = store.first_index().expect("storage first_index");
        let last = store.last_index().expect("storage last_index");
        RaftLog {
            store,
            unstable: Unstable::new(last + 1),
            committed: first - 1,
            applied: first - 1,
            applying: first - 1,
            persisted: last,
            max_apply_bytes,
        }
    }

    pub fn first_index(&self) -> u64 {
        self.unstable
            .maybe_first_index()
            .unwrap_or_else(|| self.store.first_index().expect("storage first_index"))
    }

    pub fn last_index(&self) -> u64 {
        self.unstable
            .maybe_last_index()
            .unwrap_or_else(|| self.store.last_index().expect("storage last_index"))
    }

    pub fn last_term(&self) -> u64 {
        self.term(self.last_index())
            .expect("the term of the last index is always known")
    }

    /// The term of entry `i`; the valid range is `[first_index() - 1, last_index()]`.
    pub fn term(&self, i: u64) -> Result<u64, StorageError> {
        if let Some(t) = self.unstable.maybe_term(i) {
            return Ok(t);
        }
        let dummy = self.first_index() - 1;
        if i < dummy {
            return Err(StorageError::Compacted(i));
        }
        if i > self.last_index() {
            return Err(StorageError::Unavailable(i));
        }
        self.store.term(i)
    }

    /// The term of entry `i`, or 0 if it is not in the log (compacted or beyond the end).
    pub fn term_or_zero(&self, i: u64) -> u64 {
        self.term(i).unwrap_or(0)
    }

    pub fn match_term(&self, i: u64, t: u64) -> bool {
        self.term(i).is_ok_and(|x| x == t)
    }

    /// A log ending at `(lasti, term)` is at least as up to date as ours (Raft §5.4.1).
    pub fn is_up_to_date(&self, lasti: u64, term: u64) -> bool {
        let lt = self.last_term();
        term > lt || (term == lt && lasti >= self.last_index())
    }

    /// Appends entries from a leader's append whose preceding entry is `(index, log_term)`.
    /// Returns the index of the last new entry, or None if the preceding entry does not match.
    pub fn maybe_append(
        &mut self,
        index: u64,
        log_term: u64,
        committed: u64,
        ents: &[Entry],
    ) -> Option<u64> {
        if !self.match_term(index, log_term) {
            return None;
        }
        let last_new = index + ents.len() as u64;
        let ci = self.find_conflict(ents);
        if ci != 0 {
            assert!(
                ci > self.committed,
                "entry {ci} conflicts with committed entry (committed {})",
                self.committed
            );
            let start = (ci - (index + 1)) as usize;
            self.append(&ents[start..]);
        }
        // A follower may only learn commitment of what it has verified matches the leader.
        self.commit_to(committed.min(last_new));
        Some(last_new)
    }

    pub fn append(&mut self, ents: &[Entry]) -> u64 {
        let Some(first) = ents.first() else {
            return self.last_index();
        };
        let after = first.index - 1;
        assert!(
            after >= self.committed,
            "appending after {after} would overwrite committed entries up to {}",
            self.committed
        );
        if first.index <= self.persisted {
            // The durable suffix from here on is being replaced.
            self.persisted = after;
        }
        self.unstable.truncate_and_append(ents);
        self.last_index()
    }

    /// The index of the first entry of `ents` that is not already in the log with the same term
    /// (a conflict, or the first new entry); 0 if all are present.
    pub fn find_conflict(&self, ents: &[Entry]) -> u64 {
        ents.iter()
            .find(|e| !self.match_term(e.index, e.term))
            .map_or(0, |e| e.index)
    }

    /// For fast back-off: the largest index at or below `index` whose term is at or below `term`,
    /// with that term. Entries above it cannot match a leader whose entry there has `term`.
    pub fn find_conflict_by_term(&self, index: u64, term: u64) -> (u64, u64) {
        let mut i = index.min(self.last_index());
        loop {
            match self.term(i) {
                Ok(t) if t > term => i -= 1,
                Ok(t) => return (i, t),
                Err(_) => return (i, 0),
            }
            if i == 0 {
                return (0, 0);
            }
        }
    }

    pub fn commit_to(&mut self, to: u64) {
        if self.committed < to {
            assert!(
                self.last_index() >= to,
                "commit index {to} is beyond the last index {}",
                self.last_index()
            );
            self.committed = to;
        }
    }

    /// Commits `max_index` if it is from `term` (the leader's current term; Raft §5.4.2).
    pub fn maybe_commit(&mut self, max_index: u64, term: u64) -> bool {
        if max_index > self.committed && self.term_or_zero(max_index) == term {
            self.commit_to(max_index);
            return true;
        }
        false
    }

    pub fn applied_to(&mut self, i: u64) {
        if i == 0 {
            return;
        }
        assert!(
            self.committed >= i && i >= self.applied,
            "applied({i}) outside [applied {}, committed {}]",
            self.applied,
            self.committed
        );
        self.applied = i;
        self.applying = self.applying.max(i);
    }

    pub fn stable_to(&mut self, i: u64, t: u64) {
        let before = self.unstable.offset;
        self.unstable.stable_to(i, t);
        if self.unstable.offset > before || self.match_term(i, t) {
            self.persisted = self.persisted.max(i);
        }
    }

    pub fn stable_snap_to(&mut self, i: u64) {
        self.unstable.stable_snap_to(i);
        self.persisted = self.persisted.max(i);
    }

    /// Committed entries not yet handed out for applying, bounded by `max_apply_bytes`.
    pub fn next_committed_entries(&self) -> Vec<Entry> {
        let lo = self.applying.max(self.first_index() - 1) + 1;
        let hi = self.committed + 1;
        if lo >= hi {
            return Vec::new();
        }
        self.slice(lo, hi, self.max_apply_bytes)
            .expect("committed entries must be readable")
    }

    pub fn has_next_committed_entries(&self) -> bool {
        self.applying.max(self.first_index() - 1) < self.committed
    }

    /// Entries from `i` to the end, at most `max_size` bytes (at least one entry).
    pub fn entries(&self, i: u64, max_size: u64) -> Result<Vec<Entry>, StorageError> {
        if i > self.last_index() {
            return Ok(Vec::new());
        }
        self.slice(i, self.last_index() + 1, max_size)
    }

    pub fn snapshot(&self) -> Result<Snapshot, StorageError> {
        if let Some(s) = &self.unstable.snapshot {
            return Ok(s.clone());
        }
        self.store.snapshot(self.applied)
    }

    /// Entries `[lo, hi)`, from storage then the unstable tail, at most `max_size` bytes.
    pub fn slice(&self, lo: u64, hi: u64, max_size: u64) -> Result<Vec<Entry>, StorageError> {
        let first = self.first_index();
        if lo < first {
            return Err(StorageError::Compacted(lo));
        }
        if hi > self.last_index() + 1 {
            return Err(StorageError::Unavailable(hi));
        }
        if lo >= hi {
            return Ok(Vec::new());
        }
        let off = self.unstable.offset;
        let mut out = Vec::new();
        if lo < off {
            out = self.store.entries(lo, hi.min(off), max_size)?;
            // Storage stopped short (size limit): do not go on into the unstable part.
            if (out.len() as u64) < hi.min(off) - lo {
                return Ok(out);
            }
        }
        if hi > off {
            out.extend_from_slice(self.unstable.slice(lo.max(off), hi));
        }
        limit_size(&mut out, max_size);
        Ok(out)
    }

    /// Installs a snapshot from the leader: the log now starts after it.
    pub fn restore(&mut self, s: Snapshot) {
        let idx = crate::storage::snapshot_position(&s).0;
        self.committed = idx;
        self.applying = idx;
        self.applied = idx;
        self.unstable.restore(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn ent(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            ..Default::default()
        }
    }

    fn log_with(terms: &[u64]) -> RaftLog<MemStorage> {
        let mut l = RaftLog::new(MemStorage::new(), u64::MAX);
        let ents: Vec<Entry> = terms
            .iter()
            .enumerate()
            .map(|(i, &t)| ent(i as u64 + 1, t))
            .collect();
        l.append(&ents);
        l
    }

    #[test]
    fn find_conflict() {
        let l = log_with(&[1, 2, 3]);
        assert_eq!(l.find_conflict(&[]), 0);
        assert_eq!(l.find_conflict(&[ent(1, 1), ent(2, 2)]), 0);
        assert_eq!(l.find_conflict(&[ent(2, 2), ent(3, 3), ent(4, 4)]), 4);
        assert_eq!(l.find_conflict(&[ent(2, 1), ent(3, 4)]), 2);
    }

    #[test]
    fn find_conflict_by_term() {
        // Terms 1 1 3 3 5 at indices 1..=5.
        let l = log_with(&[1, 1, 3, 3, 5]);
        assert_eq!(l.find_conflict_by_term(5, 4), (4, 3));
        assert_eq!(l.find_conflict_by_term(5, 2), (2, 1));
        assert_eq!(l.find_conflict_by_term(5, 5), (5, 5));
        assert_eq!(l.find_conflict_by_term(9, 0), (0, 0));
        assert_eq!(
            l.find_conflict_by_term(10, 9),
            (5, 5),
            "clamped to the last index"
        );
    }

    #[test]
    fn maybe_append_and_commit() {
        let mut l = log_with(&[1, 2, 3]);
        assert_eq!(l.maybe_append(3, 2, 3, &[ent(4, 4)]), None, "term mismatch");
        assert_eq!(l.maybe_append(3, 3, 3, &[ent(4, 4), ent(5, 4)]), Some(5));
        assert_eq!(l.committed, 3);
        // Conflicting suffix replaced; commit limited to what the message verified.
        assert_eq!(l.maybe_append(3, 3, 9, &[ent(4, 5)]), Some(4));
        assert_eq!(l.last_index(), 4);
        assert_eq!(l.term(4), Ok(5));
        assert_eq!(l.committed, 4);
    }

    #[test]
    #[should_panic(expected = "conflicts with committed")]
    fn conflict_with_committed_panics() {
        let mut l = log_with(&[1, 2, 3]);
        l.commit_to(3);
        l.maybe_append(1, 1, 3, &[ent(2, 9)]);
    }

    #[test]
    fn maybe_commit_only_current_term() {
        let mut l = log_with(&[1, 1, 2]);
        assert!(!l.maybe_commit(2, 2), "entry 2 is from term 1");
        assert!(l.maybe_commit(3, 2));
        assert_eq!(l.committed, 3);
    }

    #[test]
    fn slice_spans_storage_and_unstable() {
        let mut s = MemStorage::new();
        s.append(&[ent(1, 1), ent(2, 1), ent(3, 1)]).unwrap();
        let mut l = RaftLog::new(s, u64::MAX);
        l.append(&[ent(4, 2), ent(5, 2)]);
        let got: Vec<u64> = l
            .slice(2, 6, u64::MAX)
            .unwrap()
            .iter()
            .map(|e| e.index)
            .collect();
        assert_eq!(got, vec![2, 3, 4, 5]);
        let one = prost::Message::encoded_len(&ent(1, 1)) as u64;
        let got = l.slice(2, 6, 3 * one).unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(l.slice(0, 2, u64::MAX), Err(StorageError::Compacted(0)));
        assert_eq!(l.slice(1, 7, u64::MAX), Err(StorageError::Unavailable(7)));
    }

    #[test]
    fn persisted_moves_back_on_overwrite() {
        let mut s = MemStorage::new();
        s.append(&[ent(1, 1), ent(2, 1), ent(3, 1)]).unwrap();
        let mut l = RaftLog::new(s, u64::MAX);
        assert_eq!(l.persisted, 3);
        l.append(&[ent(2, 2)]);
        assert_eq!(l.persisted, 1);
        l.stable_to(2, 2);
        assert_eq!(l.persisted, 2);
    }

    #[test]
    fn next_committed_entries_respects_applying() {
        let mut l = log_with(&[1, 1, 1, 1]);
        l.commit_to(3);
        assert_eq!(l.next_committed_entries().len(), 3);
        l.applying = 2;
        assert_eq!(l.next_committed_entries().len(), 1);
        l.applied_to(3);
        assert!(!l.has_next_committed_entries());
    }
}
