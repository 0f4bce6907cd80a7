//! The Raft state machine: term and vote, roles, elections, and the follower/candidate handlers.
//! The leader's handlers (replication, commit, reads, transfer, membership) are in `leader.rs`.

use crate::config::Config;
use crate::errors::{DropReason, Error, Result};
use crate::progress::ProgressTracker;
use crate::quorum::VoteResult;
use crate::raft_log::RaftLog;
use crate::read_only::{ReadOnly, ReadState};
use crate::storage::Storage;
use bytes::Bytes;
use keel_proto::raftpb::{HardState, Message, MessageType, Snapshot};

/// "No node": node ids are never 0.
pub const NONE: u64 = 0;
/// Vote context of an election started by a leader transfer: voters grant it even while they
/// believe a leader is alive, because that leader asked for it.
pub const CAMPAIGN_TRANSFER: &[u8] = b"CampaignTransfer";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateRole {
    Follower,
    PreCandidate,
    Candidate,
    Leader,
}

impl std::fmt::Display for StateRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            StateRole::Follower => "follower",
            StateRole::PreCandidate => "pre-candidate",
            StateRole::Candidate => "candidate",
            StateRole::Leader => "leader",
        };
        f.write_str(s)
    }
}

/// Volatile state worth reporting to the application (role changes are logged from it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SoftState {
    pub leader_id: u64,
    pub role: StateRole,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CampaignKind {
    PreElection,
    Election,
    Transfer,
}

pub struct Raft<S: Storage> {
    pub id: u64,
    /// Current term. Invariant: never decreases, and is persisted (in the HardState of a Ready)
    /// before any message of this term that depends on it is sent.
    pub term: u64,
    /// Whom this node voted for in `term` (NONE if nobody). Invariant: at most one per term,
    /// persisted before the vote is sent.
    pub vote: u64,
    pub raft_log: RaftLog<S>,
    pub trk: ProgressTracker,
    pub role: StateRole,
    pub is_learner: bool,
    pub leader_id: u64,
    /// Set while leadership is being handed to this node; proposals are refused meanwhile.
    pub lead_transferee: Option<u64>,
    /// Index of the latest membership change the leader proposed. Invariant: a new change may be
    /// proposed only once `applied >= pending_conf_index`, so at most one is in flight.
    pub pending_conf_index: u64,
    /// Payload bytes of uncommitted entries (leader only), bounded by `max_uncommitted_size`.
    pub uncommitted_size: u64,
    pub read_only: ReadOnly,
    pub read_states: Vec<ReadState>,
    /// ReadIndex requests that arrived before this leader committed an entry of its own term: it
    /// cannot know the commit index until then (thesis §6.4). Bounded by `max_pending_reads`.
    pub pending_read_index_messages: Vec<Message>,
    /// Messages that may be sent at once.
    pub msgs: Vec<Message>,
    /// Messages that may be sent only after the current Ready's entries and hard state are durable.
    pub msgs_after_append: Vec<Message>,

    pub(crate) election_elapsed: usize,
    pub(crate) heartbeat_elapsed: usize,
    pub(crate) randomized_election_timeout: usize,
    pub(crate) election_timeout: usize,
    pub(crate) heartbeat_timeout: usize,
    pub(crate) check_quorum: bool,
    pub(crate) pre_vote: bool,
    pub(crate) disable_proposal_forwarding: bool,
    pub(crate) max_msg_size: u64,
    pub(crate) max_uncommitted_size: u64,
    pub(crate) max_pending_reads: usize,
    rng: u64,
    #[cfg(feature = "bug-injection")]
    pub(crate) bugs: crate::config::InjectedBugs,
}

pub(crate) fn is_response(t: MessageType) -> bool {
    matches!(
        t,
        MessageType::MsgAppendResponse
            | MessageType::MsgRequestVoteResponse
            | MessageType::MsgHeartbeatResponse
            | MessageType::MsgUnreachable
            | MessageType::MsgRequestPreVoteResponse
    )
}

impl<S: Storage> Raft<S> {
    pub fn new(c: &Config, store: S) -> Result<Self> {
        c.validate()?;
        let (hs, cs) = store.initial_state()?;
        let raft_log = RaftLog::new(store, c.max_committed_size_per_ready);
        let mut r = Raft {
            id: c.id,
            term: 0,
            vote: NONE,
            raft_log,
            trk: ProgressTracker::new(c.max_inflight_msgs, c.max_inflight_bytes),
            role: StateRole::Follower,
            is_learner: false,
            leader_id: NONE,
            lead_transferee: None,
            pending_conf_index: 0,
            uncommitted_size: 0,
            read_only: ReadOnly::default(),
            read_states: Vec::new(),
            pending_read_index_messages: Vec::new(),
            msgs: Vec::new(),
            msgs_after_append: Vec::new(),
            election_elapsed: 0,
            heartbeat_elapsed: 0,
            randomized_election_timeout: 0,
            election_timeout: c.election_tick,
            heartbeat_timeout: c.heartbeat_tick,
            check_quorum: c.check_quorum,
            pre_vote: c.pre_vote,
            disable_proposal_forwarding: c.disable_proposal_forwarding,
            max_msg_size: c.max_size_per_msg,
            max_uncommitted_size: c.max_uncommitted_size,
            max_pending_reads: c.max_pending_reads,
            // splitmix64 must not start from 0 for every node with a zero seed.
            rng: c.seed ^ 0x9E37_79B9_7F4A_7C15,
            #[cfg(feature = "bug-injection")]
            bugs: c.bugs,
        };
        let next = r.raft_log.last_index() + 1;
        r.trk.reset_to(&cs, next);
        r.is_learner = r.trk.learners.contains(&r.id);
        if hs != HardState::default() {
            let last = r.raft_log.last_index();
            if hs.commit < r.raft_log.committed || hs.commit > last {
                return Err(Error::Storage(crate::StorageError::Other(format!(
                    "hard state commit {} outside the log [{}, {}]",
                    hs.commit, r.raft_log.committed, last
                ))));
            }
            r.raft_log.committed = hs.commit;
            r.term = hs.term;
            r.vote = hs.vote;
        }
        if c.applied > 0 {
            let applied = c.applied.min(r.raft_log.committed);
            r.raft_log.applied_to(applied);
        }
        r.become_follower(r.term, NONE);
        Ok(r)
    }

    pub fn soft_state(&self) -> SoftState {
        SoftState {
            leader_id: self.leader_id,
            role: self.role,
        }
    }

    pub fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            vote: self.vote,
            commit: self.raft_log.committed,
        }
    }

    /// splitmix64: tiny, good enough for timeouts, and fully determined by the seed.
    fn next_rand(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn reset_randomized_election_timeout(&mut self) {
        let r = (self.next_rand() % self.election_timeout as u64) as usize;
        self.randomized_election_timeout = self.election_timeout + r;
    }

    pub fn randomized_election_timeout(&self) -> usize {
        self.randomized_election_timeout
    }

    /// Queues a message, filling in `from` and `term`, and routes it by whether it must wait
    /// for the current Ready to be persisted.
    pub(crate) fn send(&mut self, mut m: Message) {
        if m.from == NONE {
            m.from = self.id;
        }
        let t = m.msg_type();
        match t {
            MessageType::MsgRequestVote
            | MessageType::MsgRequestPreVote
            | MessageType::MsgRequestVoteResponse
            | MessageType::MsgRequestPreVoteResponse => {
                // Vote terms are not always ours (a pre-vote asks for term + 1), so the caller
                // sets them; a zero here is a bug in the core.
                assert_ne!(m.term, 0, "term must be set on {t:?}");
            }
            // Forwarded local requests carry no term; the receiver treats them as local.
            MessageType::MsgPropose | MessageType::MsgReadIndex => {}
            _ => m.term = self.term,
        }
        // A response that acknowledges log entries, and a vote or vote request (which commits to
        // this node's term and vote), is only truthful once the Ready that produced it is durable.
        let after_persist = matches!(
            t,
            MessageType::MsgAppendResponse
                | MessageType::MsgRequestVote
                | MessageType::MsgRequestVoteResponse
        );
        if after_persist {
            self.msgs_after_append.push(m);
        } else {
            self.msgs.push(m);
        }
    }

    pub(crate) fn reset(&mut self, term: u64) {
        if self.term != term {
            assert!(
                term > self.term,
                "term went backwards: {} -> {term}",
                self.term
            );
            self.term = term;
            self.vote = NONE;
        }
        self.leader_id = NONE;
        self.election_elapsed = 0;
        self.heartbeat_elapsed = 0;
        self.reset_randomized_election_timeout();
        self.lead_transferee = None;
        self.trk.reset_votes();
        let last = self.raft_log.last_index();
        let persisted = self.raft_log.persisted.min(last);
        let (cap, bytes) = (self.trk.max_inflight, self.trk.max_inflight_bytes);
        for (&id, pr) in self.trk.progress.iter_mut() {
            let learner = pr.is_learner;
            *pr = crate::progress::Progress::new(last + 1, cap, bytes);
            pr.is_learner = learner;
            if id == self.id {
                // Only what is durable here counts toward a quorum.
                pr.matched = persisted;
            }
        }
        self.uncommitted_size = 0;
        // Pending reads belonged to another leadership; their clients retry.
        self.read_only.clear();
        self.pending_read_index_messages.clear();
    }

    pub fn become_follower(&mut self, term: u64, leader_id: u64) {
        self.reset(term);
        self.leader_id = leader_id;
        self.role = StateRole::Follower;
    }

    pub(crate) fn become_pre_candidate(&mut self) {
        assert_ne!(
            self.role,
            StateRole::Leader,
            "leader cannot become pre-candidate"
        );
        // A pre-election changes neither term nor vote: it only asks whether it would win.
        self.role = StateRole::PreCandidate;
        self.trk.reset_votes();
        self.leader_id = NONE;
    }

    pub(crate) fn become_candidate(&mut self) {
        assert_ne!(
            self.role,
            StateRole::Leader,
            "leader cannot become candidate"
        );
        self.reset(self.term + 1);
        self.vote = self.id;
        self.role = StateRole::Candidate;
    }

    /// True if this node may campaign: a voter in its own configuration.
    pub fn promotable(&self) -> bool {
        self.trk.is_voter(self.id)
    }

    pub(crate) fn tick(&mut self) {
        if self.role == StateRole::Leader {
            self.tick_heartbeat();
        } else {
            self.tick_election();
        }
    }

    fn tick_election(&mut self) {
        self.election_elapsed += 1;
        if self.promotable() && self.election_elapsed >= self.randomized_election_timeout {
            self.election_elapsed = 0;
            self.hup(CampaignKind::Election);
        }
    }

    fn tick_heartbeat(&mut self) {
        self.heartbeat_elapsed += 1;
        self.election_elapsed += 1;
        if self.election_elapsed >= self.election_timeout {
            self.election_elapsed = 0;
            if self.check_quorum {
                self.check_quorum_active();
            }
            // A transfer that did not finish within an election timeout is abandoned.
            if self.role == StateRole::Leader && self.lead_transferee.is_some() {
                self.lead_transferee = None;
            }
        }
        if self.role != StateRole::Leader {
            return;
        }
        if self.heartbeat_elapsed >= self.heartbeat_timeout {
            self.heartbeat_elapsed = 0;
            self.bcast_heartbeat();
        }
    }

    /// Starts an election if allowed. `Election` means "time out": with PreVote it first runs a
    /// pre-election.
    pub(crate) fn hup(&mut self, kind: CampaignKind) {
        if self.role == StateRole::Leader || !self.promotable() {
            return;
        }
        // A committed but unapplied membership change may change who is a voter; campaigning
        // before applying it could use the wrong configuration.
        if self.has_unapplied_conf_change() {
            return;
        }
        let kind = match kind {
            CampaignKind::Election if self.pre_vote => CampaignKind::PreElection,
            k => k,
        };
        self.campaign(kind);
    }

    fn has_unapplied_conf_change(&self) -> bool {
        let lo = self.raft_log.applied + 1;
        let hi = self.raft_log.committed + 1;
        if lo >= hi {
            return false;
        }
        match self.raft_log.slice(lo, hi, u64::MAX) {
            Ok(ents) => ents
                .iter()
                .any(|e| e.entry_type() == keel_proto::raftpb::EntryType::EntryConfChange),
            Err(_) => false,
        }
    }

    pub(crate) fn campaign(&mut self, kind: CampaignKind) {
        let (vote_msg, term) = if kind == CampaignKind::PreElection {
            self.become_pre_candidate();
            (MessageType::MsgRequestPreVote, self.term + 1)
        } else {
            self.become_candidate();
            (MessageType::MsgRequestVote, self.term)
        };
        self.trk.record_vote(self.id, true);
        if self.trk.tally().2 == VoteResult::Won {
            // A single-voter cluster wins at once.
            if kind == CampaignKind::PreElection {
                self.campaign(CampaignKind::Election);
            } else {
                self.become_leader();
            }
            return;
        }
        let (last_index, last_term) = (self.raft_log.last_index(), self.raft_log.last_term());
        let context = if kind == CampaignKind::Transfer {
            Bytes::from_static(CAMPAIGN_TRANSFER)
        } else {
            Bytes::new()
        };
        let voters: Vec<u64> = self.trk.voters.voters().iter().copied().collect();
        for id in voters {
            if id == self.id {
                continue;
            }
            let mut m = msg(vote_msg, id);
            m.term = term;
            m.index = last_index;
            m.log_term = last_term;
            m.context = context.clone();
            self.send(m);
        }
    }

    /// The entry point for every message, local or from a peer.
    pub fn step(&mut self, m: Message) -> Result<()> {
        let t = m.msg_type();
        if m.term > self.term {
            if matches!(
                t,
                MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
            ) {
                let force = m.context.as_ref() == CAMPAIGN_TRANSFER;
                let in_lease = self.check_quorum
                    && self.leader_id != NONE
                    && self.election_elapsed < self.election_timeout;
                if !force && in_lease {
                    // We heard from a leader within the election timeout: this candidate is
                    // probably partitioned from it, so do not let it depose a working leader.
                    return Ok(());
                }
            }
            match t {
                // A pre-vote does not change our term: the candidate has not bumped it either.
                MessageType::MsgRequestPreVote => {}
                // A granted pre-vote carries the future term; the term changes only when the
                // pre-candidate wins and campaigns for real.
                MessageType::MsgRequestPreVoteResponse if !m.reject => {}
                MessageType::MsgAppend | MessageType::MsgHeartbeat | MessageType::MsgSnapshot => {
                    self.become_follower(m.term, m.from)
                }
                _ => self.become_follower(m.term, NONE),
            }
        } else if m.term != 0 && m.term < self.term {
            if (self.check_quorum || self.pre_vote)
                && matches!(t, MessageType::MsgHeartbeat | MessageType::MsgAppend)
            {
                // A deposed leader (e.g. after a partition healed) learns the new term from this
                // and steps down; without it, PreVote and CheckQuorum could leave it stuck.
                let mut r = msg(MessageType::MsgAppendResponse, m.from);
                r.index = self.raft_log.last_index();
                self.send(r);
            } else if t == MessageType::MsgRequestPreVote {
                let mut r = msg(MessageType::MsgRequestPreVoteResponse, m.from);
                r.term = self.term;
                r.reject = true;
                self.send(r);
            }
            return Ok(());
        }

        if matches!(t, MessageType::MsgPropose | MessageType::MsgReadIndex)
            && m.from == self.id
            && !self.trk.is_member(self.id)
        {
            // A node that knows it was removed (or was never told it was added) would forward
            // requests to a leader that will never replicate their outcome back to it.
            return Err(Error::ProposalDropped(DropReason::NotAMember));
        }
        match t {
            MessageType::MsgHup => {
                self.hup(CampaignKind::Election);
                Ok(())
            }
            MessageType::MsgRequestVote | MessageType::MsgRequestPreVote => {
                self.handle_vote_request(m);
                Ok(())
            }
            _ => match self.role {
                StateRole::Leader => self.step_leader(m),
                StateRole::Candidate | StateRole::PreCandidate => self.step_candidate(m),
                StateRole::Follower => self.step_follower(m),
            },
        }
    }

    fn handle_vote_request(&mut self, m: Message) {
        let t = m.msg_type();
        let pre = t == MessageType::MsgRequestPreVote;
        // We can vote if we already voted for this candidate (a retransmission), if we have not
        // voted and know no leader in this term, or for a pre-vote of a later term.
        #[allow(unused_mut)]
        let mut can_vote = self.vote == m.from
            || (self.vote == NONE && self.leader_id == NONE)
            || (pre && m.term > self.term);
        // The planted bug grants a second vote in a term but keeps the first on record, so the
        // disk never shows it: only the election-safety check can catch it.
        #[cfg(feature = "bug-injection")]
        let double_vote = self.bugs.vote_twice && !pre && !can_vote && self.vote != NONE;
        #[cfg(feature = "bug-injection")]
        if double_vote {
            can_vote = true;
        }
        let resp_type = if pre {
            MessageType::MsgRequestPreVoteResponse
        } else {
            MessageType::MsgRequestVoteResponse
        };
        let mut r = msg(resp_type, m.from);
        if can_vote && self.raft_log.is_up_to_date(m.index, m.log_term) {
            // The response carries the candidate's term so it is not dropped as stale; for a
            // pre-vote that term is one we have not entered.
            r.term = m.term;
            self.send(r);
            #[cfg(feature = "bug-injection")]
            if double_vote {
                return;
            }
            if !pre {
                self.election_elapsed = 0;
                self.vote = m.from;
            }
        } else {
            r.term = self.term;
            r.reject = true;
            self.send(r);
        }
    }

    fn step_candidate(&mut self, m: Message) -> Result<()> {
        let my_resp = if self.role == StateRole::PreCandidate {
            MessageType::MsgRequestPreVoteResponse
        } else {
            MessageType::MsgRequestVoteResponse
        };
        let t = m.msg_type();
        match t {
            MessageType::MsgPropose => {
                return Err(Error::ProposalDropped(DropReason::NoLeader));
            }
            MessageType::MsgReadIndex => {
                return Err(Error::ProposalDropped(DropReason::NoLeader));
            }
            MessageType::MsgAppend => {
                self.become_follower(m.term, m.from);
                self.handle_append_entries(m);
            }
            MessageType::MsgHeartbeat => {
                self.become_follower(m.term, m.from);
                self.handle_heartbeat(m);
            }
            MessageType::MsgSnapshot => {
                self.become_follower(m.term, m.from);
                self.handle_snapshot(m);
            }
            _ if t == my_resp => {
                self.trk.record_vote(m.from, !m.reject);
                match self.trk.tally().2 {
                    VoteResult::Won => {
                        if self.role == StateRole::PreCandidate {
                            self.campaign(CampaignKind::Election);
                        } else {
                            self.become_leader();
                            self.bcast_append();
                        }
                    }
                    VoteResult::Lost => {
                        // A rejected pre-vote of a later term already made us a follower above.
                        self.become_follower(self.term, NONE);
                    }
                    VoteResult::Pending => {}
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn step_follower(&mut self, mut m: Message) -> Result<()> {
        match m.msg_type() {
            MessageType::MsgPropose => {
                if self.leader_id == NONE || self.disable_proposal_forwarding {
                    return Err(Error::ProposalDropped(DropReason::NoLeader));
                }
                m.to = self.leader_id;
                self.send(m);
            }
            MessageType::MsgAppend => {
                self.election_elapsed = 0;
                self.leader_id = m.from;
                self.handle_append_entries(m);
            }
            MessageType::MsgHeartbeat => {
                self.election_elapsed = 0;
                self.leader_id = m.from;
                self.handle_heartbeat(m);
            }
            MessageType::MsgSnapshot => {
                self.election_elapsed = 0;
                self.leader_id = m.from;
                self.handle_snapshot(m);
            }
            MessageType::MsgTransferLeader if self.leader_id != NONE => {
                m.to = self.leader_id;
                self.send(m);
            }
            MessageType::MsgTimeoutNow => {
                // The leader asked us to take over: skip the pre-election, the leader is not
                // going to object.
                self.hup(CampaignKind::Transfer);
            }
            MessageType::MsgReadIndex => {
                if self.leader_id == NONE {
                    return Err(Error::ProposalDropped(DropReason::NoLeader));
                }
                m.to = self.leader_id;
                self.send(m);
            }
            MessageType::MsgReadIndexResp => {
                self.read_states.push(ReadState {
                    index: m.index,
                    request_ctx: m.context,
                });
            }
            _ => {}
        }
        Ok(())
    }

    pub(crate) fn handle_append_entries(&mut self, m: Message) {
        if m.index < self.raft_log.committed {
            // Everything up to our commit index is already settled; tell the leader where we are.
            let mut r = msg(MessageType::MsgAppendResponse, m.from);
            r.index = self.raft_log.committed;
            self.send(r);
            return;
        }
        if m.index == 0 && self.trk.progress.is_empty() {
            // The log from index 1 presumes the configuration the cluster was bootstrapped with
            // (the snapshot at index 0). This node knows no configuration: it joined later and
            // never had that one, and replaying the membership changes onto nothing would leave
            // it believing it is the only voter. Refusing an append after index 0, which cannot
            // otherwise mismatch, asks the leader for a snapshot instead.
            let mut r = msg(MessageType::MsgAppendResponse, m.from);
            r.reject = true;
            self.send(r);
            return;
        }
        let mut r = msg(MessageType::MsgAppendResponse, m.from);
        match self
            .raft_log
            .maybe_append(m.index, m.log_term, m.commit, &m.entries)
        {
            Some(last_new) => r.index = last_new,
            None => {
                // Fast back-off (thesis §5.3 optimisation): point the leader at the last entry
                // whose term could match its own, skipping a whole conflicting term at once.
                let hint = m.index.min(self.raft_log.last_index());
                let (hint_index, hint_term) = self.raft_log.find_conflict_by_term(hint, m.log_term);
                r.index = m.index;
                r.reject = true;
                r.reject_hint = hint_index;
                r.reject_hint_term = hint_term;
            }
        }
        self.send(r);
    }

    pub(crate) fn handle_heartbeat(&mut self, m: Message) {
        // The leader sends min(its commit, our match), which we hold; the clamp only guards
        // against a malformed message.
        let to = m.commit.min(self.raft_log.last_index());
        self.raft_log.commit_to(to);
        let mut r = msg(MessageType::MsgHeartbeatResponse, m.from);
        r.context = m.context;
        self.send(r);
    }

    pub(crate) fn handle_snapshot(&mut self, m: Message) {
        let Some(snap) = m.snapshot else { return };
        let mut r = msg(MessageType::MsgAppendResponse, m.from);
        r.index = if self.restore(snap) {
            self.raft_log.last_index()
        } else {
            self.raft_log.committed
        };
        self.send(r);
    }

    /// Installs `snap` if it is ahead of our commit index and includes us. Returns false when it
    /// was not needed (or not acceptable).
    pub(crate) fn restore(&mut self, snap: Snapshot) -> bool {
        let Some(meta) = snap.metadata.clone() else {
            return false;
        };
        if meta.index <= self.raft_log.committed {
            return false;
        }
        // The snapshot's configuration may not include us: a node added after the leader's
        // latest snapshot was taken. Installing it is safe (outside the configuration we never
        // campaign) and necessary: the entry that adds us follows the snapshot in the log.
        let cs = meta.conf_state.clone().unwrap_or_default();
        if self.raft_log.match_term(meta.index, meta.term) {
            // We already have the entries; only the commit index was behind.
            self.raft_log.commit_to(meta.index);
            return false;
        }
        self.raft_log.restore(snap);
        let next = self.raft_log.last_index() + 1;
        self.trk.reset_to(&cs, next);
        self.is_learner = self.trk.learners.contains(&self.id);
        self.pending_conf_index = 0;
        true
    }
}

/// A message of type `t` to `to`, everything else default.
pub(crate) fn msg(t: MessageType, to: u64) -> Message {
    let mut m = Message {
        to,
        ..Default::default()
    };
    m.set_msg_type(t);
    m
}
