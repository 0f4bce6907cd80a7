//! The read side of the persisted log. The core reads persisted entries through `Storage`; the
//! application writes them (after they are durable) and then tells the core via `advance`.

use crate::errors::StorageError;
use keel_proto::raftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use prost::Message as _;

pub type StorageResult<T> = std::result::Result<T, StorageError>;

/// What the core needs from persisted state.
///
/// Invariants an implementation keeps:
/// - indices `first_index()..=last_index()` are contiguous and readable;
/// - `term(first_index() - 1)` is answered (it is the term of the snapshot the log starts after);
/// - `first_index() - 1 == snapshot().metadata.index` once any snapshot was applied.
pub trait Storage {
    /// The hard state and membership the node restarts with.
    fn initial_state(&self) -> StorageResult<(HardState, ConfState)>;
    /// Entries `[low, high)`, at least one if any is in range, and no more than `max_size` bytes
    /// beyond the first.
    fn entries(&self, low: u64, high: u64, max_size: u64) -> StorageResult<Vec<Entry>>;
    /// The term of entry `idx`; `first_index() - 1` must be answered too.
    fn term(&self, idx: u64) -> StorageResult<u64>;
    fn first_index(&self) -> StorageResult<u64>;
    fn last_index(&self) -> StorageResult<u64>;
    /// The newest snapshot, used to bring up a follower whose next entry is compacted.
    /// `SnapshotTemporarilyUnavailable` makes the core try again later.
    fn snapshot(&self, request_index: u64) -> StorageResult<Snapshot>;
}

/// The (index, term) a snapshot was taken at; (0, 0) without metadata.
pub fn snapshot_position(s: &Snapshot) -> (u64, u64) {
    s.metadata.as_ref().map_or((0, 0), |m| (m.index, m.term))
}

/// The membership recorded in a snapshot (empty without metadata).
pub fn snapshot_conf_state(s: &Snapshot) -> ConfState {
    s.metadata
        .as_ref()
        .and_then(|m| m.conf_state.clone())
        .unwrap_or_default()
}

/// Sum of encoded sizes, used for all byte limits so that the leader's and the transport's
/// notions of a message's size agree.
pub fn entries_size(ents: &[Entry]) -> u64 {
    ents.iter().map(|e| e.encoded_len() as u64).sum()
}

/// Truncates `ents` so its encoded size is at most `max_size`, but always keeps the first entry
/// so that progress is possible with entries larger than the limit.
pub fn limit_size(ents: &mut Vec<Entry>, max_size: u64) {
    if ents.len() <= 1 {
        return;
    }
    let mut size = 0u64;
    let mut keep = 0usize;
    for e in ents.iter() {
        size += e.encoded_len() as u64;
        if keep > 0 && size > max_size {
            break;
        }
        keep += 1;
    }
    ents.truncate(keep);
}

/// An in-memory `Storage`, for tests, the simulator and single-process use.
///
/// `ents[0]` is a dummy entry carrying the index and term of the last compacted entry (the
/// snapshot's), so `ents[i]` has index `ents[0].index + i`. It is never empty.
#[derive(Debug, Clone)]
pub struct MemStorage {
    pub hard_state: HardState,
    snapshot: Snapshot,
    ents: Vec<Entry>,
}

impl Default for MemStorage {
    fn default() -> Self {
        MemStorage {
            hard_state: HardState::default(),
            snapshot: Snapshot {
                data: Default::default(),
                metadata: Some(SnapshotMetadata::default()),
            },
            ents: vec![Entry::default()],
        }
    }
}

impl MemStorage {
    pub fn new() -> Self {
        Self::default()
    }

    /// A storage whose initial membership is `voters` (and `learners`), as a freshly bootstrapped
    /// cluster. The configuration lives in a snapshot at index 0 so every member starts identical.
    pub fn new_with_conf_state(voters: Vec<u64>, learners: Vec<u64>) -> Self {
        let mut s = Self::default();
        s.snapshot.metadata = Some(SnapshotMetadata {
            conf_state: Some(ConfState { voters, learners }),
            index: 0,
            term: 0,
        });
        s
    }

    fn offset(&self) -> u64 {
        self.ents[0].index
    }

    pub fn set_hard_state(&mut self, hs: HardState) {
        self.hard_state = hs;
    }

    /// Appends entries, overwriting any conflicting suffix. Entries at or below the compacted
    /// index are ignored (they are already covered by the snapshot).
    pub fn append(&mut self, ents: &[Entry]) -> StorageResult<()> {
        let Some(first_new) = ents.first().map(|e| e.index) else {
            return Ok(());
        };
        let first = self.offset() + 1;
        let last_new = ents[ents.len() - 1].index;
        if last_new < first {
            return Ok(());
        }
        let ents = if first > first_new {
            &ents[(first - first_new) as usize..]
        } else {
            ents
        };
        let start = ents[0].index;
        let next = self.offset() + self.ents.len() as u64;
        if start > next {
            return Err(StorageError::Other(format!(
                "append leaves a gap: last index {}, appending from {}",
                next - 1,
                start
            )));
        }
        self.ents.truncate((start - self.offset()) as usize);
        self.ents.extend_from_slice(ents);
        Ok(())
    }

    /// Replaces all state with `snap` (a snapshot received from the leader).
    pub fn apply_snapshot(&mut self, snap: Snapshot) -> StorageResult<()> {
        let meta = snap.metadata.clone().unwrap_or_default();
        if meta.index < self.snapshot_index() {
            return Err(StorageError::Compacted(meta.index));
        }
        self.ents = vec![Entry {
            term: meta.term,
            index: meta.index,
            ..Default::default()
        }];
        if self.hard_state.commit < meta.index {
            self.hard_state.commit = meta.index;
        }
        if self.hard_state.term < meta.term {
            // A vote belongs to its term; carried into the new one it would be a vote never cast.
            self.hard_state.term = meta.term;
            self.hard_state.vote = 0;
        }
        self.snapshot = snap;
        Ok(())
    }

    /// Records a snapshot the application made at `index` (must be applied already), without
    /// discarding entries; `compact` does that.
    pub fn create_snapshot(
        &mut self,
        index: u64,
        conf_state: ConfState,
        data: bytes::Bytes,
    ) -> StorageResult<()> {
        if index <= self.snapshot_index() {
            return Err(StorageError::Compacted(index));
        }
        let term = self.term(index)?;
        self.snapshot = Snapshot {
            data,
            metadata: Some(SnapshotMetadata {
                conf_state: Some(conf_state),
                index,
                term,
            }),
        };
        Ok(())
    }

    /// Discards entries up to and including `compact_index`.
    pub fn compact(&mut self, compact_index: u64) -> StorageResult<()> {
        let offset = self.offset();
        if compact_index <= offset {
            return Err(StorageError::Compacted(compact_index));
        }
        let last = self.last_index()?;
        if compact_index > last {
            return Err(StorageError::Unavailable(compact_index));
        }
        let i = (compact_index - offset) as usize;
        let term = self.ents[i].term;
        self.ents.drain(..i);
        self.ents[0] = Entry {
            term,
            index: compact_index,
            ..Default::default()
        };
        Ok(())
    }

    fn snapshot_index(&self) -> u64 {
        snapshot_position(&self.snapshot).0
    }

    pub fn snapshot_ref(&self) -> &Snapshot {
        &self.snapshot
    }
}

impl Storage for MemStorage {
    fn initial_state(&self) -> StorageResult<(HardState, ConfState)> {
        Ok((self.hard_state, snapshot_conf_state(&self.snapshot)))
    }

    fn entries(&self, low: u64, high: u64, max_size: u64) -> StorageResult<Vec<Entry>> {
        let offset = self.offset();
        if low <= offset {
            return Err(StorageError::Compacted(low));
        }
        let last = self.last_index()?;
        if high > last + 1 {
            return Err(StorageError::Unavailable(high));
        }
        let mut out = self.ents[(low - offset) as usize..(high - offset) as usize].to_vec();
        limit_size(&mut out, max_size);
        Ok(out)
    }

    fn term(&self, idx: u64) -> StorageResult<u64> {
        let offset = self.offset();
        if idx < offset {
            return Err(StorageError::Compacted(idx));
        }
        match self.ents.get((idx - offset) as usize) {
            Some(e) => Ok(e.term),
            None => Err(StorageError::Unavailable(idx)),
        }
    }

    fn first_index(&self) -> StorageResult<u64> {
        Ok(self.offset() + 1)
    }

    fn last_index(&self) -> StorageResult<u64> {
        Ok(self.offset() + self.ents.len() as u64 - 1)
    }

    fn snapshot(&self, _request_index: u64) -> StorageResult<Snapshot> {
        Ok(self.snapshot.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ent(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            ..Default::default()
        }
    }

    fn store(ents: &[(u64, u64)]) -> MemStorage {
        let mut s = MemStorage::new();
        s.ents = ents.iter().map(|&(i, t)| ent(i, t)).collect();
        s
    }

    #[test]
    fn term_at_bounds() {
        let s = store(&[(3, 3), (4, 4), (5, 5)]);
        assert_eq!(s.term(2), Err(StorageError::Compacted(2)));
        assert_eq!(s.term(3), Ok(3));
        assert_eq!(s.term(5), Ok(5));
        assert_eq!(s.term(6), Err(StorageError::Unavailable(6)));
        assert_eq!(s.first_index(), Ok(4));
        assert_eq!(s.last_index(), Ok(5));
    }

    #[test]
    fn entries_respects_bounds_and_size() {
        let s = store(&[(3, 3), (4, 4), (5, 5), (6, 6)]);
        assert_eq!(s.entries(3, 5, u64::MAX), Err(StorageError::Compacted(3)));
        assert_eq!(s.entries(4, 8, u64::MAX), Err(StorageError::Unavailable(8)));
        assert_eq!(s.entries(4, 7, u64::MAX).unwrap().len(), 3);
        // A limit smaller than one entry still returns one entry.
        assert_eq!(s.entries(4, 7, 0).unwrap().len(), 1);
        let one = ent(4, 4).encoded_len() as u64;
        assert_eq!(s.entries(4, 7, 2 * one).unwrap().len(), 2);
    }

    #[test]
    fn append_overwrites_conflicts_and_ignores_compacted() {
        let mut s = store(&[(3, 3), (4, 4), (5, 5)]);
        s.append(&[ent(2, 3), ent(3, 3), ent(4, 6)]).unwrap();
        assert_eq!(s.last_index(), Ok(4));
        assert_eq!(s.term(4), Ok(6));
        s.append(&[ent(5, 6), ent(6, 6)]).unwrap();
        assert_eq!(s.last_index(), Ok(6));
        assert!(s.append(&[ent(8, 6)]).is_err(), "a gap must be refused");
        assert_eq!(s.last_index(), Ok(6));
    }

    #[test]
    fn compact_and_snapshot() {
        let mut s = store(&[(3, 3), (4, 4), (5, 5)]);
        assert_eq!(s.compact(3), Err(StorageError::Compacted(3)));
        assert_eq!(s.compact(6), Err(StorageError::Unavailable(6)));
        s.compact(4).unwrap();
        assert_eq!(s.first_index(), Ok(5));
        assert_eq!(s.term(4), Ok(4));
        s.create_snapshot(5, ConfState::default(), bytes::Bytes::from_static(b"x"))
            .unwrap();
        assert_eq!(s.snapshot(0).unwrap().metadata.unwrap().index, 5);
        let mut other = MemStorage::new();
        other.apply_snapshot(s.snapshot(0).unwrap()).unwrap();
        assert_eq!(other.first_index(), Ok(6));
        assert_eq!(other.term(5), Ok(5));
        assert_eq!(other.hard_state.commit, 5);
    }

    #[test]
    fn apply_snapshot_of_a_later_term_clears_the_vote() {
        // Regression (found by tests/fuzz_step.rs): the vote of term 1 was kept with term 2.
        let mut s = MemStorage::new();
        s.set_hard_state(HardState {
            term: 1,
            vote: 1,
            commit: 0,
        });
        let mut snap = Snapshot {
            data: Default::default(),
            metadata: Some(SnapshotMetadata {
                conf_state: None,
                index: 3,
                term: 2,
            }),
        };
        s.apply_snapshot(snap.clone()).unwrap();
        assert_eq!((s.hard_state.term, s.hard_state.vote), (2, 0));
        // Same term: the vote stands.
        s.set_hard_state(HardState {
            term: 2,
            vote: 3,
            commit: 3,
        });
        snap.metadata.as_mut().unwrap().index = 4;
        s.apply_snapshot(snap).unwrap();
        assert_eq!((s.hard_state.term, s.hard_state.vote), (2, 3));
    }
}
