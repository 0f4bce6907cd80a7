//! The leader's handlers: proposals, replication and commit, heartbeats and CheckQuorum,
//! ReadIndex, leader transfer, and membership changes.

use crate::errors::{DropReason, Error, Result};
use crate::progress::ProgressState;
use crate::quorum::VoteResult;
use crate::raft::{msg, Raft, StateRole, NONE};
use crate::read_only::ReadState;
use crate::storage::{entries_size, Storage};
use crate::StorageError;
use bytes::Bytes;
use keel_proto::raftpb::{
    ConfChange, ConfChangeType, ConfState, Entry, EntryType, Message, MessageType,
};
use prost::Message as _;

impl<S: Storage> Raft<S> {
    pub(crate) fn become_leader(&mut self) {
        assert_ne!(
            self.role,
            StateRole::Follower,
            "follower cannot become leader directly"
        );
        self.reset(self.term);
        self.leader_id = self.id;
        self.role = StateRole::Leader;
        let id = self.id;
        if let Some(pr) = self.trk.progress.get_mut(&id) {
            // The leader's own log trivially matches itself; only `matched` (durability) lags.
            pr.become_replicate();
            pr.recent_active = true;
        }
        // Entries already in the log may include a membership change we cannot see as applied;
        // being conservative, allow a new one only after everything up to here is applied.
        self.pending_conf_index = self.raft_log.last_index();
        // An empty entry of the new term: committing it commits everything before it (§5.4.2)
        // and lets ReadIndex learn the commit index (thesis §6.4).
        let empty = Entry::default();
        self.append_entries(vec![empty]);
    }

    fn append_entries(&mut self, mut es: Vec<Entry>) {
        let li = self.raft_log.last_index();
        for (i, e) in es.iter_mut().enumerate() {
            e.term = self.term;
            e.index = li + 1 + i as u64;
        }
        // The leader counts its own entries toward a quorum only once they are durable (on
        // advance), so a commit never rests on an unsynced local write.
        self.raft_log.append(&es);
    }

    pub(crate) fn step_leader(&mut self, m: Message) -> Result<()> {
        match m.msg_type() {
            MessageType::MsgBeat => {
                self.bcast_heartbeat();
                return Ok(());
            }
            MessageType::MsgCheckQuorum => {
                self.check_quorum_active();
                return Ok(());
            }
            MessageType::MsgPropose => return self.handle_propose(m),
            MessageType::MsgReadIndex => return self.handle_read_index(m),
            _ => {}
        }
        if !self.trk.progress.contains_key(&m.from) {
            return Ok(());
        }
        match m.msg_type() {
            MessageType::MsgAppendResponse => self.handle_append_response(m),
            MessageType::MsgHeartbeatResponse => self.handle_heartbeat_response(m),
            MessageType::MsgSnapStatus => {
                let pr = self.trk.progress.get_mut(&m.from).expect("checked above");
                if pr.state == ProgressState::Snapshot {
                    if m.reject {
                        pr.pending_snapshot = 0;
                    }
                    pr.become_probe();
                    // Wait for the follower to answer (a heartbeat response) before probing, so
                    // a failed snapshot is not immediately retried in a tight loop.
                    pr.probe_sent = true;
                }
            }
            MessageType::MsgUnreachable => {
                let pr = self.trk.progress.get_mut(&m.from).expect("checked above");
                // Appends in flight were probably lost; probe instead of pipelining into the void.
                if pr.state == ProgressState::Replicate {
                    pr.become_probe();
                }
            }
            MessageType::MsgTransferLeader => self.handle_transfer_leader(m.from),
            _ => {}
        }
        Ok(())
    }

    pub(crate) fn check_quorum_active(&mut self) {
        if !self.trk.quorum_active(self.id) {
            // We have not heard from a quorum for an election timeout: a new leader may exist
            // on the other side of a partition. Stepping down stops serving stale reads.
            self.become_follower(self.term, NONE);
            return;
        }
        let id = self.id;
        for (&pid, pr) in self.trk.progress.iter_mut() {
            if pid != id {
                pr.recent_active = false;
            }
        }
    }

    fn handle_propose(&mut self, mut m: Message) -> Result<()> {
        if m.entries.is_empty() {
            return Ok(());
        }
        if !self.trk.is_member(self.id) {
            return Err(Error::ProposalDropped(DropReason::NotAMember));
        }
        if self.lead_transferee.is_some() {
            return Err(Error::ProposalDropped(DropReason::LeaderTransferring));
        }
        let mut conf_at = None;
        for (i, e) in m.entries.iter().enumerate() {
            if e.entry_type() != EntryType::EntryConfChange {
                continue;
            }
            if conf_at.is_some() || self.pending_conf_index > self.raft_log.applied {
                return Err(Error::ConfChangeRefused(
                    "another membership change is in progress".into(),
                ));
            }
            let cc = ConfChange::decode(e.data.as_ref())
                .map_err(|err| Error::ConfChangeRefused(format!("undecodable: {err}")))?;
            self.validate_conf_change(&cc)?;
            conf_at = Some(self.raft_log.last_index() + 1 + i as u64);
        }
        let size: u64 = m.entries.iter().map(|e| e.data.len() as u64).sum();
        if self.max_uncommitted_size > 0
            && self.uncommitted_size > 0
            && self.uncommitted_size + size > self.max_uncommitted_size
        {
            return Err(Error::ProposalDropped(DropReason::UncommittedSizeExceeded));
        }
        self.uncommitted_size += size;
        if let Some(idx) = conf_at {
            self.pending_conf_index = idx;
        }
        self.append_entries(std::mem::take(&mut m.entries));
        self.bcast_append();
        Ok(())
    }

    /// Checks a membership change against the current configuration, so that an unworkable
    /// change is refused before it enters the log.
    pub(crate) fn validate_conf_change(&self, cc: &ConfChange) -> Result<()> {
        let id = cc.node_id;
        let refuse = |s: String| Err(Error::ConfChangeRefused(s));
        if id == NONE {
            return refuse("node id 0 is not valid".into());
        }
        match cc.change_type() {
            ConfChangeType::AddNode => {
                if self.trk.is_voter(id) {
                    return refuse(format!("node {id} is already a voter"));
                }
            }
            ConfChangeType::AddLearnerNode => {
                if self.trk.is_voter(id) {
                    return refuse(format!("node {id} is a voter; demotion is not supported"));
                }
                if self.trk.learners.contains(&id) {
                    return refuse(format!("node {id} is already a learner"));
                }
            }
            ConfChangeType::RemoveNode => {
                if !self.trk.is_member(id) {
                    return refuse(format!("node {id} is not a member"));
                }
                if self.trk.is_voter(id) && self.trk.voters.len() == 1 {
                    return refuse(format!("node {id} is the last voter"));
                }
            }
        }
        Ok(())
    }

    /// Applies a committed membership change. Deterministic on every node: a change that is not
    /// valid against the current configuration is ignored rather than half-applied.
    pub fn apply_conf_change(&mut self, cc: &ConfChange) -> ConfState {
        if self.validate_conf_change(cc).is_ok() {
            let id = cc.node_id;
            let next = self.raft_log.last_index() + 1;
            match cc.change_type() {
                ConfChangeType::AddNode => {
                    if self.trk.learners.remove(&id) {
                        self.trk.voters.insert(id);
                        if let Some(pr) = self.trk.progress.get_mut(&id) {
                            pr.is_learner = false;
                        }
                    } else {
                        self.trk.voters.insert(id);
                        self.trk.add_progress(id, next);
                    }
                }
                ConfChangeType::AddLearnerNode => {
                    self.trk.learners.insert(id);
                    self.trk.add_progress(id, next);
                }
                ConfChangeType::RemoveNode => {
                    self.trk.voters.remove(id);
                    self.trk.learners.remove(&id);
                    self.trk.progress.remove(&id);
                }
            }
        }
        self.is_learner = self.trk.learners.contains(&self.id);
        if self.role == StateRole::Leader {
            if !self.trk.is_voter(self.id) {
                // Removed (or never a voter): tell followers the commit index, so they learn
                // the change is committed, then step down. A remaining voter times out and wins.
                self.bcast_append();
                self.become_follower(self.term, NONE);
            } else {
                if self.maybe_commit() {
                    self.bcast_append();
                } else {
                    let ids: Vec<u64> = self.trk.progress.keys().copied().collect();
                    for id in ids {
                        if id != self.id {
                            self.maybe_send_append(id, false);
                        }
                    }
                }
                if let Some(t) = self.lead_transferee {
                    if !self.trk.is_voter(t) {
                        self.lead_transferee = None;
                    }
                }
            }
        }
        self.trk.conf_state()
    }

    pub(crate) fn bcast_append(&mut self) {
        let ids: Vec<u64> = self.trk.progress.keys().copied().collect();
        for id in ids {
            if id != self.id {
                self.maybe_send_append(id, true);
            }
        }
    }

    pub(crate) fn send_append(&mut self, to: u64) {
        self.maybe_send_append(to, true);
    }

    /// Sends the next append to `to` if its progress allows. With `send_if_empty` an append
    /// without entries still goes out (it carries the commit index). Returns whether a message
    /// was sent.
    pub(crate) fn maybe_send_append(&mut self, to: u64, send_if_empty: bool) -> bool {
        let Some(pr) = self.trk.progress.get(&to) else {
            return false;
        };
        if pr.is_paused() {
            return false;
        }
        let prev_index = pr.next_idx - 1;
        let prev_term = self.raft_log.term(prev_index);
        let ents = self.raft_log.entries(pr.next_idx, self.max_msg_size);
        if let (Ok(prev_term), Ok(ents)) = (&prev_term, &ents) {
            if ents.is_empty() && !send_if_empty {
                return false;
            }
            let n = ents.len();
            let last = ents.last().map_or(prev_index, |e| e.index);
            let bytes = entries_size(ents);
            let mut m = msg(MessageType::MsgAppend, to);
            m.index = prev_index;
            m.log_term = *prev_term;
            m.commit = self.raft_log.committed;
            m.entries = ents.clone();
            self.trk
                .progress
                .get_mut(&to)
                .expect("checked above")
                .sent_entries(n, last, bytes);
            self.send(m);
            return true;
        }
        // The entries the follower needs were compacted: it needs a snapshot.
        self.maybe_send_snapshot(to)
    }

    fn maybe_send_snapshot(&mut self, to: u64) -> bool {
        let pr = self.trk.progress.get(&to).expect("caller checked");
        if !pr.recent_active {
            // Do not ship a snapshot to a node that may be down; wait until it answers.
            return false;
        }
        let snap = match self.raft_log.snapshot() {
            Ok(s) => s,
            Err(StorageError::SnapshotTemporarilyUnavailable) => return false,
            Err(e) => panic!("log compacted below {to}'s next index but no snapshot: {e}"),
        };
        let sindex = crate::storage::snapshot_position(&snap).0;
        if sindex == 0 {
            assert_eq!(
                self.raft_log.first_index(),
                1,
                "log compacted below {to}'s next index but the snapshot is empty"
            );
            // Only the bootstrap snapshot exists, which a node that joined later cannot use
            // (see handle_append_response): wait until the application takes one.
            return false;
        }
        self.trk
            .progress
            .get_mut(&to)
            .expect("caller checked")
            .become_snapshot(sindex);
        let mut m = msg(MessageType::MsgSnapshot, to);
        m.snapshot = Some(snap);
        self.send(m);
        true
    }

    fn handle_append_response(&mut self, m: Message) {
        let last_index = self.raft_log.last_index();
        let from = m.from;
        let pr = self.trk.progress.get_mut(&from).expect("caller checked");
        pr.recent_active = true;
        if m.reject {
            if m.index == 0 {
                // Nothing precedes index 1, so such an append cannot mismatch: the follower
                // knows no configuration (it joined after bootstrap) and cannot use the log from
                // its start, which presumes the bootstrap configuration. It needs a snapshot.
                if pr.matched == 0 && pr.state != ProgressState::Snapshot {
                    self.maybe_send_snapshot(from);
                }
                return;
            }
            // `m.index` is the rejected append's previous index; the hint says where the
            // follower's log might agree with ours.
            let mut next_probe = m.reject_hint;
            if m.reject_hint_term > 0 {
                next_probe = self
                    .raft_log
                    .find_conflict_by_term(m.reject_hint, m.reject_hint_term)
                    .0;
            }
            let pr = self.trk.progress.get_mut(&from).expect("caller checked");
            if pr.maybe_decr_to(m.index, next_probe) {
                if pr.state == ProgressState::Replicate {
                    pr.become_probe();
                }
                self.send_append(from);
            }
            return;
        }
        if m.index > last_index {
            // Acknowledging entries we never sent: a malformed or misrouted message.
            return;
        }
        let old_paused = pr.is_paused();
        if !pr.maybe_update(m.index) {
            return;
        }
        match pr.state {
            ProgressState::Probe => pr.become_replicate(),
            ProgressState::Snapshot => {
                if pr.matched >= pr.pending_snapshot {
                    pr.become_probe();
                    pr.become_replicate();
                }
            }
            ProgressState::Replicate => pr.inflights.free_le(m.index),
        }
        let matched = pr.matched;
        if self.maybe_commit() {
            self.bcast_append();
        } else if old_paused {
            self.send_append(from);
        }
        // Fill the pipeline: as many appends as the inflight window and the log allow.
        while self.maybe_send_append(from, false) {}
        if self.lead_transferee == Some(from) && matched == self.raft_log.last_index() {
            self.send_timeout_now(from);
        }
    }

    fn handle_heartbeat_response(&mut self, m: Message) {
        let last_index = self.raft_log.last_index();
        let from = m.from;
        let pr = self.trk.progress.get_mut(&from).expect("caller checked");
        pr.recent_active = true;
        pr.probe_sent = false;
        if pr.state == ProgressState::Replicate && pr.inflights.full() {
            // The follower is alive but acks may have been lost: let one more append through.
            pr.inflights.free_first_one();
        }
        if pr.matched < last_index {
            self.send_append(from);
        }
        if m.context.is_empty() {
            return;
        }
        let Some(acks) = self.read_only.recv_ack(from, &m.context) else {
            return;
        };
        if self
            .trk
            .voters
            .vote_result(|id| acks.contains(&id).then_some(true))
            != VoteResult::Won
        {
            return;
        }
        for rs in self.read_only.advance(&m.context) {
            self.respond_read_index(rs.req, rs.index);
        }
    }

    /// Advances the commit index to what a quorum has durably stored, if that entry is of the
    /// current term. Returns whether it moved.
    pub(crate) fn maybe_commit(&mut self) -> bool {
        let mci = self.trk.committed().min(self.raft_log.last_index());
        #[cfg(feature = "bug-injection")]
        if self.bugs.commit_old_term_entries && mci > self.raft_log.committed {
            self.raft_log.commit_to(mci);
            self.release_pending_reads();
            return true;
        }
        // Counting replicas commits only entries of the current term (Raft §5.4.2, Figure 8);
        // earlier entries are committed indirectly by the Log Matching Property.
        if self.raft_log.maybe_commit(mci, self.term) {
            self.release_pending_reads();
            return true;
        }
        false
    }

    fn release_pending_reads(&mut self) {
        if self.pending_read_index_messages.is_empty() || !self.committed_entry_in_current_term() {
            return;
        }
        for m in std::mem::take(&mut self.pending_read_index_messages) {
            self.send_read_index_confirmation(m);
        }
    }

    pub(crate) fn committed_entry_in_current_term(&self) -> bool {
        self.raft_log.term_or_zero(self.raft_log.committed) == self.term
    }

    /// Called once the entries of a Ready are durable: the leader's own log now counts.
    pub(crate) fn on_persisted(&mut self) {
        if self.role != StateRole::Leader {
            return;
        }
        let p = self.raft_log.persisted.min(self.raft_log.last_index());
        let id = self.id;
        let updated = match self.trk.progress.get_mut(&id) {
            Some(pr) => pr.maybe_update(p),
            None => false,
        };
        if updated && self.maybe_commit() {
            self.bcast_append();
        }
    }

    pub(crate) fn bcast_heartbeat(&mut self) {
        let ctx = self.read_only.last_pending_ctx().unwrap_or_default();
        self.bcast_heartbeat_with_ctx(ctx);
    }

    fn bcast_heartbeat_with_ctx(&mut self, ctx: Bytes) {
        let committed = self.raft_log.committed;
        let targets: Vec<(u64, u64)> = self
            .trk
            .progress
            .iter()
            .filter(|(&id, _)| id != self.id)
            .map(|(&id, pr)| (id, pr.matched.min(committed)))
            .collect();
        for (to, commit) in targets {
            // A follower may not have the leader's whole committed log yet; it can only commit
            // what it is known to hold.
            let mut m = msg(MessageType::MsgHeartbeat, to);
            m.commit = commit;
            m.context = ctx.clone();
            self.send(m);
        }
    }

    fn handle_read_index(&mut self, m: Message) -> Result<()> {
        if self.trk.voters.len() == 1 && self.trk.is_voter(self.id) {
            // A single voter is always the leader of its term: nobody can have committed more.
            let idx = self.raft_log.committed;
            self.respond_read_index(m, idx);
            return Ok(());
        }
        if !self.committed_entry_in_current_term() {
            if self.pending_read_index_messages.len() >= self.max_pending_reads {
                return Err(Error::ProposalDropped(DropReason::UncommittedSizeExceeded));
            }
            self.pending_read_index_messages.push(m);
            return Ok(());
        }
        self.send_read_index_confirmation(m);
        Ok(())
    }

    /// Queues a read and starts a heartbeat round to confirm leadership (thesis §6.4): only when
    /// a quorum answers is it certain no newer leader committed something we have not seen.
    fn send_read_index_confirmation(&mut self, m: Message) {
        let committed = self.raft_log.committed;
        #[cfg(feature = "bug-injection")]
        if self.bugs.read_index_without_heartbeat {
            self.respond_read_index(m, committed);
            return;
        }
        if self.read_only.len() >= self.max_pending_reads {
            // Dropped; the requester times out and retries.
            return;
        }
        let ctx = m.context.clone();
        self.read_only.add_request(committed, ctx.clone(), m);
        let id = self.id;
        self.read_only.recv_ack(id, &ctx);
        self.bcast_heartbeat_with_ctx(ctx);
    }

    fn respond_read_index(&mut self, req: Message, index: u64) {
        if req.from == NONE || req.from == self.id {
            self.read_states.push(ReadState {
                index,
                request_ctx: req.context,
            });
        } else {
            let mut r = msg(MessageType::MsgReadIndexResp, req.from);
            r.index = index;
            r.context = req.context;
            self.send(r);
        }
    }

    fn handle_transfer_leader(&mut self, transferee: u64) {
        if !self.trk.is_voter(transferee) {
            // Only a voter can become leader.
            return;
        }
        if let Some(current) = self.lead_transferee {
            if current == transferee {
                return;
            }
            self.lead_transferee = None;
        }
        if transferee == self.id {
            return;
        }
        // The transfer must finish within an election timeout or it is abandoned (tick).
        self.election_elapsed = 0;
        self.lead_transferee = Some(transferee);
        let matched = self.trk.progress[&transferee].matched;
        if matched == self.raft_log.last_index() {
            self.send_timeout_now(transferee);
        } else {
            self.send_append(transferee);
        }
    }

    fn send_timeout_now(&mut self, to: u64) {
        self.send(msg(MessageType::MsgTimeoutNow, to));
    }

    /// Releases the payload bytes of applied entries from the uncommitted budget.
    pub(crate) fn reduce_uncommitted_size(&mut self, bytes: u64) {
        if self.role == StateRole::Leader {
            self.uncommitted_size = self.uncommitted_size.saturating_sub(bytes);
        }
    }
}
