//! Safety invariants, checked as the run evolves: at every new leader, every Ready's entries,
//! every apply and every disk write. Each check is of one property from the Raft paper (Figure 3).

use crate::Fnv;
use keel_raft::raftpb::{Entry, HardState};
use keel_raft::{RawNode, Storage};
use std::collections::{BTreeMap, HashMap};

#[derive(Default)]
pub struct Checker {
    pub violations: Vec<String>,
    /// Election Safety: term -> the one node that led it.
    leaders: HashMap<u64, u64>,
    /// Log Matching: (index, term) -> (term of the entry before it, digest of the entry), as
    /// first seen on any node.
    entries: HashMap<(u64, u64), (Option<u64>, u64)>,
    /// State Machine Safety: index -> (term, digest) of the entry applied there.
    applied: BTreeMap<u64, (u64, u64)>,
    /// Entries some node declared committed: index -> (entry term, commit term). The commit term
    /// is the earliest term of a node seen declaring it; a node learns commits only from leaders
    /// of its own term or later, so this is never below the term the entry was really committed
    /// in, and checking against it never raises a false alarm.
    committed: BTreeMap<u64, (u64, u64)>,
    /// The last hard state seen durable per node: term and vote never go back.
    durable: HashMap<u64, HardState>,
}

fn digest(e: &Entry) -> u64 {
    let mut h = Fnv::default();
    h.write_u64(e.entry_type as u64);
    h.write_bytes(&e.data);
    h.finish()
}

impl Checker {
    fn fail(&mut self, s: String) {
        self.violations.push(s);
    }

    /// Election Safety and Leader Completeness, when `id` has just become leader.
    pub fn on_leader<S: Storage>(&mut self, id: u64, raw: &RawNode<S>) {
        let term = raw.raft.term;
        if let Some(&other) = self.leaders.get(&term) {
            if other != id {
                self.fail(format!(
                    "election safety: nodes {other} and {id} both leader in term {term}"
                ));
            }
        }
        self.leaders.insert(term, id);
        let log = &raw.raft.raft_log;
        let first = log.first_index();
        let required = self
            .committed
            .iter()
            .rev()
            .find(|(_, &(_, ct))| ct < term)
            .map_or(0, |(&i, _)| i);
        if log.last_index() < required {
            self.fail(format!(
                "leader completeness: leader {id} of term {term} ends at {} but {required} was \
                 committed in an earlier term",
                log.last_index(),
            ));
            return;
        }
        // Leader Completeness (§5.4): entries committed in earlier terms are in the leader's log.
        // Entries below its first index are covered by its snapshot.
        let missing = self
            .committed
            .range(first.saturating_sub(1)..)
            .filter(|(_, &(_, ct))| ct < term)
            .find(|(&i, &(t, _))| log.term(i) != Ok(t))
            .map(|(&i, &(t, _))| (i, t, log.term(i)));
        if let Some((i, t, have)) = missing {
            self.fail(format!(
                "leader completeness: leader {id} of term {term} has {have:?} at committed \
                 index {i}, which holds an entry of term {t}"
            ));
        }
    }

    /// Log Matching, for entries a node has just accepted into its log.
    pub fn on_entries<S: Storage>(&mut self, id: u64, raw: &RawNode<S>, ents: &[Entry]) {
        let log = &raw.raft.raft_log;
        for e in ents {
            let prev = log.term(e.index - 1).ok();
            let d = digest(e);
            match self.entries.get(&(e.index, e.term)) {
                Some(&(p, d0)) => {
                    if d0 != d {
                        self.fail(format!(
                            "log matching: node {id} holds a different entry at index {} term {}",
                            e.index, e.term
                        ));
                    } else if let (Some(p), Some(prev)) = (p, prev) {
                        if p != prev {
                            self.fail(format!(
                                "log matching: node {id} has entry {}/{} after term {prev}, \
                                 elsewhere after term {p}",
                                e.index, e.term
                            ));
                        }
                    }
                }
                None => {
                    self.entries.insert((e.index, e.term), (prev, d));
                }
            }
        }
    }

    /// State Machine Safety: every node applies the same entry at each index.
    pub fn on_apply(&mut self, id: u64, node_term: u64, e: &Entry) {
        let d = digest(e);
        match self.applied.get(&e.index) {
            Some(&(t, d0)) if (t, d0) != (e.term, d) => {
                self.fail(format!(
                    "state machine safety: node {id} applied {}/{} but another node applied \
                     term {t} there",
                    e.index, e.term
                ));
            }
            Some(_) => {}
            None => {
                self.applied.insert(e.index, (e.term, d));
                self.note_committed(id, e.index, e.term, node_term);
            }
        }
    }

    /// Records that entry `(index, term)` is committed according to node `id`; two nodes
    /// disagreeing on the term of a committed index is a safety violation in itself.
    fn note_committed(&mut self, id: u64, index: u64, term: u64, commit_term: u64) {
        match self.committed.get(&index).copied() {
            Some((t, _)) if t != term => self.fail(format!(
                "state machine safety: node {id} holds {index}/{term} as committed, another \
                 node {index}/{t}"
            )),
            Some((t, ct)) => {
                self.committed.insert(index, (t, ct.min(commit_term)));
            }
            None => {
                self.committed.insert(index, (term, commit_term));
            }
        }
    }

    /// A node made a commit index durable: everything up to it in its log is committed.
    pub fn on_commit<S: Storage>(&mut self, id: u64, raw: &RawNode<S>, from: u64, to: u64) {
        let log = &raw.raft.raft_log;
        let lo = from.max(log.first_index());
        for i in lo..=to {
            if let Ok(t) = log.term(i) {
                self.note_committed(id, i, t, raw.raft.term);
            }
        }
    }

    /// Term and vote on disk never go backwards, across writes and crashes.
    pub fn on_durable(&mut self, id: u64, hs: HardState) {
        if let Some(prev) = self.durable.get(&id) {
            if hs.term < prev.term {
                self.fail(format!(
                    "durability: node {id}'s term on disk went from {} to {}",
                    prev.term, hs.term
                ));
            } else if hs.term == prev.term && prev.vote != 0 && hs.vote != prev.vote {
                self.fail(format!(
                    "durability: node {id} changed its vote in term {} from {} to {}",
                    hs.term, prev.vote, hs.vote
                ));
            }
        }
        self.durable.insert(id, hs);
    }

    /// A node restarts from its disk: what it reloads is checked the same way.
    pub fn on_durable_reload(&mut self, id: u64, hs: HardState) {
        self.on_durable(id, hs);
    }
}
