//! Core configuration, validated once at start.

use crate::errors::{Error, Result};

#[derive(Debug, Clone)]
pub struct Config {
    /// This node's id; never 0 (0 means "none" on the wire).
    pub id: u64,
    /// Ticks without hearing from a leader before a follower campaigns. The actual timeout is
    /// drawn from `[election_tick, 2 * election_tick)` so that candidates rarely collide.
    pub election_tick: usize,
    /// Ticks between leader heartbeats. Must be well below `election_tick`.
    pub heartbeat_tick: usize,
    /// Index the application has already applied (on restart).
    pub applied: u64,
    /// Bytes of entries in one append message. Bounds message size (the transport has a frame
    /// limit) and the cost of a rejected append.
    pub max_size_per_msg: u64,
    /// Appends in flight to one follower in the Replicate state.
    pub max_inflight_msgs: usize,
    /// Bytes in flight to one follower (0 = only the message count limits it).
    pub max_inflight_bytes: u64,
    /// Bytes of proposed but uncommitted entry payloads the leader accepts before refusing
    /// proposals. Bounds leader memory when followers are slow or absent (0 = no limit).
    pub max_uncommitted_size: u64,
    /// Bytes of committed entries handed out to apply in one Ready.
    pub max_committed_size_per_ready: u64,
    /// Pending ReadIndex requests the leader queues; beyond it requests are dropped and the
    /// client retries. Bounds memory under a read storm while heartbeats are not answered.
    pub max_pending_reads: usize,
    /// Run a pre-election before bumping the term, so a partitioned node cannot disrupt the
    /// cluster when it comes back (Raft thesis §9.6).
    pub pre_vote: bool,
    /// A leader that has not heard from a quorum for an election timeout steps down; followers
    /// that heard from a leader within the timeout ignore votes (leader lease, thesis §6.2).
    pub check_quorum: bool,
    /// Followers hand proposals to the leader rather than failing them.
    pub disable_proposal_forwarding: bool,
    /// Seed for the randomized election timeout. With equal seeds and inputs, two cores produce
    /// identical outputs.
    pub seed: u64,
    /// Planted bugs for proving the simulator's checkers catch them. Test builds only.
    #[cfg(feature = "bug-injection")]
    pub bugs: InjectedBugs,
}

/// Known safety bugs that can be switched on in test builds (feature `bug-injection`).
#[cfg(feature = "bug-injection")]
#[derive(Debug, Clone, Copy, Default)]
pub struct InjectedBugs {
    /// Commit by counting replicas of entries from earlier terms (the Figure 8 bug).
    pub commit_old_term_entries: bool,
    /// Answer ReadIndex at once, without confirming leadership with a heartbeat round.
    pub read_index_without_heartbeat: bool,
    /// Grant a vote even after voting for someone else in the same term.
    pub vote_twice: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            id: 0,
            election_tick: 10,
            heartbeat_tick: 1,
            applied: 0,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            max_inflight_bytes: 0,
            max_uncommitted_size: 64 << 20,
            max_committed_size_per_ready: 16 << 20,
            max_pending_reads: 4096,
            pre_vote: true,
            check_quorum: true,
            disable_proposal_forwarding: false,
            seed: 0,
            #[cfg(feature = "bug-injection")]
            bugs: InjectedBugs::default(),
        }
    }
}

impl Config {
    pub fn new(id: u64) -> Self {
        Config {
            id,
            seed: id,
            ..Default::default()
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |s: &str| Err(Error::ConfigInvalid(s.to_string()));
        if self.id == 0 {
            return bad("id must not be 0");
        }
        if self.heartbeat_tick == 0 {
            return bad("heartbeat_tick must be greater than 0");
        }
        if self.election_tick <= self.heartbeat_tick {
            return bad("election_tick must be greater than heartbeat_tick");
        }
        if self.max_inflight_msgs == 0 {
            return bad("max_inflight_msgs must be greater than 0");
        }
        if self.max_committed_size_per_ready == 0 {
            return bad("max_committed_size_per_ready must be greater than 0");
        }
        if self.max_pending_reads == 0 {
            return bad("max_pending_reads must be greater than 0");
        }
        Ok(())
    }
}
