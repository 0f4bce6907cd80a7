//! Majority quorum math. Keel changes membership one server at a time, so a single majority
//! configuration is all the core needs (no joint consensus).

use std::collections::BTreeSet;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VoteResult {
    /// Not enough votes yet to decide either way.
    Pending,
    /// A majority rejected: no way to win.
    Lost,
    /// A majority granted.
    Won,
}

/// The voting members. A BTreeSet so iteration order, and therefore every message the core
/// emits, is the same on every run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MajorityConfig {
    voters: BTreeSet<u64>,
}

impl MajorityConfig {
    pub fn new(voters: impl IntoIterator<Item = u64>) -> Self {
        MajorityConfig {
            voters: voters.into_iter().collect(),
        }
    }

    pub fn voters(&self) -> &BTreeSet<u64> {
        &self.voters
    }

    pub fn contains(&self, id: u64) -> bool {
        self.voters.contains(&id)
    }

    pub fn insert(&mut self, id: u64) {
        self.voters.insert(id);
    }

    pub fn remove(&mut self, id: u64) {
        self.voters.remove(&id);
    }

    pub fn len(&self) -> usize {
        self.voters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.voters.is_empty()
    }

    /// Votes needed to win.
    pub fn quorum(&self) -> usize {
        self.voters.len() / 2 + 1
    }

    /// The largest index that a majority of voters has acknowledged. An empty configuration
    /// returns `u64::MAX` so that it never holds back a commit in a combination with others.
    pub fn committed_index(&self, acked: impl Fn(u64) -> u64) -> u64 {
        let n = self.voters.len();
        if n == 0 {
            return u64::MAX;
        }
        // Clusters are small; a stack array avoids an allocation on every append response.
        let mut stack = [0u64; 16];
        let mut heap;
        let idx: &mut [u64] = if n <= stack.len() {
            &mut stack[..n]
        } else {
            heap = vec![0u64; n];
            &mut heap
        };
        for (slot, &id) in idx.iter_mut().zip(self.voters.iter()) {
            *slot = acked(id);
        }
        idx.sort_unstable();
        // Sorted ascending, the element at n - quorum is acknowledged by `quorum` voters
        // (itself and every one above it).
        idx[n - self.quorum()]
    }

    /// `votes(id)` is `Some(true)` for a grant, `Some(false)` for a rejection, `None` if unknown.
    pub fn vote_result(&self, votes: impl Fn(u64) -> Option<bool>) -> VoteResult {
        if self.voters.is_empty() {
            // An empty configuration wins every vote, which lets joint use compose; in practice
            // the core refuses to campaign without being a voter.
            return VoteResult::Won;
        }
        let (mut granted, mut missing) = (0, 0);
        for &id in &self.voters {
            match votes(id) {
                Some(true) => granted += 1,
                Some(false) => {}
                None => missing += 1,
            }
        }
        let q = self.quorum();
        if granted >= q {
            VoteResult::Won
        } else if granted + missing >= q {
            VoteResult::Pending
        } else {
            VoteResult::Lost
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn committed_index_is_the_majority_floor() {
        let c = MajorityConfig::new([1, 2, 3]);
        let acked: HashMap<u64, u64> = [(1, 5), (2, 3), (3, 9)].into();
        assert_eq!(c.committed_index(|id| acked[&id]), 5);
        let c = MajorityConfig::new([1, 2, 3, 4]);
        let acked: HashMap<u64, u64> = [(1, 5), (2, 3), (3, 9), (4, 4)].into();
        // Four voters need three acks: 9, 5 and 4 are at or above 4.
        assert_eq!(c.committed_index(|id| acked[&id]), 4);
        let c = MajorityConfig::new([7]);
        assert_eq!(c.committed_index(|_| 12), 12);
        assert_eq!(MajorityConfig::default().committed_index(|_| 0), u64::MAX);
    }

    #[test]
    fn committed_index_missing_acks_count_as_zero() {
        let c = MajorityConfig::new([1, 2, 3, 4, 5]);
        let acked: HashMap<u64, u64> = [(1, 10), (2, 10)].into();
        assert_eq!(c.committed_index(|id| *acked.get(&id).unwrap_or(&0)), 0);
        let acked: HashMap<u64, u64> = [(1, 10), (2, 10), (5, 7)].into();
        assert_eq!(c.committed_index(|id| *acked.get(&id).unwrap_or(&0)), 7);
    }

    #[test]
    fn committed_index_large_cluster_uses_heap() {
        let c = MajorityConfig::new(1..=21);
        // Voter i acked i: the 11th highest of 1..=21 is 11.
        assert_eq!(c.committed_index(|id| id), 11);
    }

    #[test]
    fn vote_results() {
        let c = MajorityConfig::new([1, 2, 3]);
        let v = |m: &'static [(u64, bool)]| {
            move |id: u64| m.iter().find(|(i, _)| *i == id).map(|(_, g)| *g)
        };
        assert_eq!(c.vote_result(v(&[])), VoteResult::Pending);
        assert_eq!(c.vote_result(v(&[(1, true)])), VoteResult::Pending);
        assert_eq!(c.vote_result(v(&[(1, true), (2, true)])), VoteResult::Won);
        assert_eq!(
            c.vote_result(v(&[(1, true), (2, false)])),
            VoteResult::Pending
        );
        assert_eq!(
            c.vote_result(v(&[(2, false), (3, false)])),
            VoteResult::Lost
        );
        // Votes from non-members are not counted.
        assert_eq!(
            c.vote_result(v(&[(1, true), (9, true), (8, true)])),
            VoteResult::Pending
        );
    }
}
