//! The leader's view of each follower's log, and the set of members.

use crate::inflights::Inflights;
use crate::quorum::{MajorityConfig, VoteResult};
use keel_proto::raftpb::ConfState;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressState {
    /// The leader does not know where the follower's log ends: it sends one append at a time
    /// and waits for the answer (or a heartbeat response) before sending the next.
    Probe,
    /// The follower is known to match up to `matched`: appends are pipelined, up to the
    /// inflight window.
    Replicate,
    /// The follower needs a snapshot; nothing else is sent until it reports back.
    Snapshot,
}

#[derive(Debug, Clone)]
pub struct Progress {
    /// Highest index known to be durably replicated on this node. Never decreases while this
    /// leader is in office.
    pub matched: u64,
    /// Next index to send. Invariant: `matched < next_idx`.
    pub next_idx: u64,
    pub state: ProgressState,
    /// In `Snapshot` state: the index of the snapshot being sent.
    pub pending_snapshot: u64,
    /// Heard from within the current election timeout; CheckQuorum reads and clears it.
    pub recent_active: bool,
    /// In `Probe` state: an append is out and unanswered, so stop sending until a response or a
    /// heartbeat response arrives.
    pub probe_sent: bool,
    pub inflights: Inflights,
    pub is_learner: bool,
}

impl Progress {
    pub fn new(next_idx: u64, max_inflight: usize, max_inflight_bytes: u64) -> Self {
        Progress {
            matched: 0,
            next_idx,
            state: ProgressState::Probe,
            pending_snapshot: 0,
            recent_active: false,
            probe_sent: false,
            inflights: Inflights::new(max_inflight, max_inflight_bytes),
            is_learner: false,
        }
    }

    fn reset_state(&mut self, state: ProgressState) {
        self.probe_sent = false;
        self.pending_snapshot = 0;
        self.state = state;
        self.inflights.reset();
    }

    pub fn become_probe(&mut self) {
        if self.state == ProgressState::Snapshot {
            // The snapshot may have been applied; start probing right after it.
            let pending = self.pending_snapshot;
            self.reset_state(ProgressState::Probe);
            self.next_idx = (self.matched + 1).max(pending + 1);
        } else {
            self.reset_state(ProgressState::Probe);
            self.next_idx = self.matched + 1;
        }
    }

    pub fn become_replicate(&mut self) {
        self.reset_state(ProgressState::Replicate);
        self.next_idx = self.matched + 1;
    }

    pub fn become_snapshot(&mut self, snapshot_idx: u64) {
        self.reset_state(ProgressState::Snapshot);
        self.pending_snapshot = snapshot_idx;
    }

    /// Records an acknowledgement up to `n`. Returns false for a stale (duplicate or reordered)
    /// acknowledgement.
    pub fn maybe_update(&mut self, n: u64) -> bool {
        let updated = self.matched < n;
        if updated {
            self.matched = n;
            self.probe_sent = false;
        }
        self.next_idx = self.next_idx.max(n + 1);
        updated
    }

    /// Bookkeeping after sending `entries` entries (their last index `last`) of `bytes` bytes.
    pub fn sent_entries(&mut self, entries: usize, last: u64, bytes: u64) {
        match self.state {
            ProgressState::Replicate => {
                if entries > 0 {
                    self.next_idx = last + 1;
                    self.inflights.add(last, bytes);
                }
            }
            ProgressState::Probe => self.probe_sent = true,
            ProgressState::Snapshot => {
                panic!("sending entries to a follower in Snapshot state")
            }
        }
    }

    /// Handles a rejected append of `rejected` (the index before the entries sent). `match_hint`
    /// is where the leader now thinks the logs may agree. Returns false if the rejection is stale.
    pub fn maybe_decr_to(&mut self, rejected: u64, match_hint: u64) -> bool {
        if self.state == ProgressState::Replicate {
            // A rejection at or below what is known to match is from an earlier exchange.
            if rejected <= self.matched {
                return false;
            }
            // Replicating, the follower's log matched up to `matched`; resume from there.
            self.next_idx = self.matched + 1;
            return true;
        }
        // Probing sends one append at a time; a rejection for anything but it is stale.
        if self.next_idx == 0 || self.next_idx - 1 != rejected {
            return false;
        }
        self.next_idx = rejected.min(match_hint + 1).max(self.matched + 1).max(1);
        self.probe_sent = false;
        true
    }

    pub fn is_paused(&self) -> bool {
        match self.state {
            ProgressState::Probe => self.probe_sent,
            ProgressState::Replicate => self.inflights.full(),
            ProgressState::Snapshot => true,
        }
    }
}

/// Members and their progress. BTreeMap keeps iteration (and so output) deterministic.
#[derive(Debug, Clone)]
pub struct ProgressTracker {
    pub voters: MajorityConfig,
    pub learners: BTreeSet<u64>,
    pub progress: BTreeMap<u64, Progress>,
    pub votes: BTreeMap<u64, bool>,
    pub max_inflight: usize,
    pub max_inflight_bytes: u64,
}

impl ProgressTracker {
    pub fn new(max_inflight: usize, max_inflight_bytes: u64) -> Self {
        ProgressTracker {
            voters: MajorityConfig::default(),
            learners: BTreeSet::new(),
            progress: BTreeMap::new(),
            votes: BTreeMap::new(),
            max_inflight,
            max_inflight_bytes,
        }
    }

    pub fn conf_state(&self) -> ConfState {
        ConfState {
            voters: self.voters.voters().iter().copied().collect(),
            learners: self.learners.iter().copied().collect(),
        }
    }

    /// Replaces the membership with `cs`; every progress restarts at `next_idx`.
    pub fn reset_to(&mut self, cs: &ConfState, next_idx: u64) {
        self.voters = MajorityConfig::new(cs.voters.iter().copied());
        self.learners = cs
            .learners
            .iter()
            .copied()
            .filter(|l| !self.voters.contains(*l))
            .collect();
        self.progress.clear();
        let ids: Vec<u64> = self
            .voters
            .voters()
            .iter()
            .chain(self.learners.iter())
            .copied()
            .collect();
        for id in ids {
            self.add_progress(id, next_idx);
        }
    }

    pub fn add_progress(&mut self, id: u64, next_idx: u64) {
        let mut pr = Progress::new(next_idx, self.max_inflight, self.max_inflight_bytes);
        pr.is_learner = self.learners.contains(&id);
        // A new member gets a full election timeout before CheckQuorum counts it as silent.
        pr.recent_active = true;
        self.progress.insert(id, pr);
    }

    pub fn is_voter(&self, id: u64) -> bool {
        self.voters.contains(id)
    }

    pub fn is_member(&self, id: u64) -> bool {
        self.progress.contains_key(&id)
    }

    pub fn committed(&self) -> u64 {
        self.voters
            .committed_index(|id| self.progress.get(&id).map_or(0, |p| p.matched))
    }

    pub fn reset_votes(&mut self) {
        self.votes.clear();
    }

    pub fn record_vote(&mut self, id: u64, granted: bool) {
        self.votes.entry(id).or_insert(granted);
    }

    pub fn tally(&self) -> (usize, usize, VoteResult) {
        let granted = self
            .votes
            .iter()
            .filter(|(id, g)| **g && self.voters.contains(**id))
            .count();
        let rejected = self
            .votes
            .iter()
            .filter(|(id, g)| !**g && self.voters.contains(**id))
            .count();
        let res = self.voters.vote_result(|id| self.votes.get(&id).copied());
        (granted, rejected, res)
    }

    /// True if a quorum of voters was heard from recently (`self_id` always counts).
    pub fn quorum_active(&self, self_id: u64) -> bool {
        let res = self.voters.vote_result(|id| {
            if id == self_id {
                return Some(true);
            }
            self.progress.get(&id).map(|p| p.recent_active)
        });
        res == VoteResult::Won
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pr(state: ProgressState, matched: u64, next: u64) -> Progress {
        let mut p = Progress::new(next, 4, 0);
        p.matched = matched;
        p.state = state;
        p
    }

    #[test]
    fn maybe_update() {
        let mut p = pr(ProgressState::Replicate, 3, 5);
        assert!(!p.maybe_update(2), "stale ack");
        assert_eq!((p.matched, p.next_idx), (3, 5));
        assert!(p.maybe_update(4));
        assert_eq!((p.matched, p.next_idx), (4, 5));
        assert!(p.maybe_update(8));
        assert_eq!((p.matched, p.next_idx), (8, 9));
    }

    #[test]
    fn maybe_decr_replicate() {
        let mut p = pr(ProgressState::Replicate, 5, 10);
        assert!(
            !p.maybe_decr_to(5, 5),
            "rejection at or below match is stale"
        );
        assert!(p.maybe_decr_to(9, 9));
        assert_eq!(p.next_idx, 6);
    }

    #[test]
    fn maybe_decr_probe() {
        let mut p = pr(ProgressState::Probe, 0, 10);
        assert!(
            !p.maybe_decr_to(5, 5),
            "only the outstanding probe's rejection counts"
        );
        assert!(p.maybe_decr_to(9, 3));
        assert_eq!(p.next_idx, 4, "jump to the hint");
        p.probe_sent = true;
        assert!(p.maybe_decr_to(3, 100));
        assert_eq!(p.next_idx, 3, "never move forward on a rejection");
        assert!(!p.probe_sent);
        let mut p = pr(ProgressState::Probe, 0, 1);
        assert!(p.maybe_decr_to(0, 0));
        assert_eq!(p.next_idx, 1, "next never drops to 0");
    }

    #[test]
    fn paused() {
        let mut p = pr(ProgressState::Probe, 0, 1);
        assert!(!p.is_paused());
        p.sent_entries(1, 1, 10);
        assert!(p.is_paused());
        let mut p = pr(ProgressState::Replicate, 0, 1);
        for i in 1..=4 {
            assert!(!p.is_paused());
            p.sent_entries(1, i, 1);
        }
        assert!(p.is_paused());
        assert_eq!(p.next_idx, 5);
        p.become_snapshot(10);
        assert!(p.is_paused());
    }

    #[test]
    fn probe_after_snapshot_starts_past_it() {
        let mut p = pr(ProgressState::Replicate, 1, 2);
        p.become_snapshot(10);
        p.become_probe();
        assert_eq!(p.next_idx, 11);
        assert_eq!(p.state, ProgressState::Probe);
    }

    #[test]
    fn tracker_quorum_active_and_commit() {
        let mut t = ProgressTracker::new(4, 0);
        t.reset_to(
            &ConfState {
                voters: vec![1, 2, 3],
                learners: vec![4],
            },
            1,
        );
        for p in t.progress.values_mut() {
            p.recent_active = false;
        }
        assert!(!t.quorum_active(1));
        t.progress.get_mut(&4).unwrap().recent_active = true;
        assert!(!t.quorum_active(1), "learners do not count");
        t.progress.get_mut(&3).unwrap().recent_active = true;
        assert!(t.quorum_active(1));
        t.progress.get_mut(&1).unwrap().matched = 7;
        t.progress.get_mut(&4).unwrap().matched = 7;
        assert_eq!(t.committed(), 0, "a learner's ack does not commit");
        t.progress.get_mut(&2).unwrap().matched = 5;
        assert_eq!(t.committed(), 5);
    }

    #[test]
    fn tally_ignores_non_voters() {
        let mut t = ProgressTracker::new(4, 0);
        t.reset_to(
            &ConfState {
                voters: vec![1, 2, 3],
                learners: vec![4],
            },
            1,
        );
        t.record_vote(1, true);
        t.record_vote(4, true);
        assert_eq!(t.tally().2, VoteResult::Pending);
        t.record_vote(2, true);
        t.record_vote(2, false);
        assert_eq!(
            t.tally(),
            (2, 0, VoteResult::Won),
            "first vote from a node sticks"
        );
    }
}
