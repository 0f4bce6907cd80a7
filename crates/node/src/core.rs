//! `NodeCore`: one Raft member's state, stepped by a driver.
//!
//! The driver's loop, in order:
//! 1. feed input: `tick`, `step` (peer messages), `propose`, `read`, `propose_conf_change`;
//! 2. `ready()` returns messages to send now (a leader's appends go out while its own write is
//!    still being flushed);
//! 3. `persist()` makes the Ready durable and returns the messages that had to wait for that
//!    (votes, append acknowledgements);
//! 4. `apply()` applies committed entries to the state machine, answers waiting requests,
//!    serves reads whose read index is applied, and takes a snapshot every `snapshot_count`
//!    entries;
//! 5. `take_outcomes()` hands the answers to whoever waits for them.
//!
//! Every step is bounded and none blocks on a client, so a slow client is backpressure
//! (`NodeError::Overloaded`), never a stall of the Raft loop.

use bytes::Bytes;
use keel_kv::{Command, Event, Op, RangeRequest, RangeResponse, RequestId, Response, Store};
use keel_proto::raftpb::{ConfChange, ConfState, Entry, EntryType, HardState, Message, Snapshot};
use keel_raft::storage::snapshot_position;
use keel_raft::{RawNode, ReadState, StateRole};
use prost::Message as _;
use std::collections::HashMap;

use crate::entry::{self, Envelope, NodeEntry};
use crate::lessor::LeaseChange;
use crate::log_store::LogStore;
use crate::snapshot::{self, AddressBook, Attributes, MemberAttrs, NodeImage};

/// Identifies a request to whoever made it; opaque to the node.
pub type Token = u64;

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub raft: keel_raft::Config,
    /// Must differ at every process start: the state machine's at-most-once table is keyed by
    /// (proposer, sequence number), and a restarted node reusing an id could have a new request
    /// taken for a retransmission of an old one.
    pub proposer: u64,
    /// Applied entries between two snapshots (and log compactions), on average.
    pub snapshot_count: u64,
    /// Where in each run of `snapshot_count` indexes this member takes its snapshot: when the
    /// applied index reaches `k * snapshot_count + snapshot_phase` for some k (and is at least
    /// half a run past the last one). 0 is every multiple of `snapshot_count`. Members given
    /// different phases (`snapshot_phase_for`) do not all write their snapshots at once: while
    /// one writes, the other two still answer the leader at full speed, where with one phase
    /// all three slowed down together (docs/BENCHMARKS.md). Taken modulo `snapshot_count`.
    pub snapshot_phase: u64,
    /// Entries kept in the log behind a snapshot, so a follower slightly behind catches up from
    /// the log rather than needing the whole snapshot.
    pub compaction_margin: u64,
    /// Writes proposed here and not yet applied. Below the state machine's dedup window, so a
    /// retransmitted proposal is always recognised (see `keel_kv::DEDUP_WINDOW`).
    pub max_pending_writes: usize,
    /// Reads waiting for their read index. Bounds memory under a read storm while the leader
    /// cannot confirm leadership.
    pub max_pending_reads: usize,
    /// Hand snapshots to the caller to write (`take_snapshot_job`, then `snapshot_saved`)
    /// instead of writing them inline. Writing a snapshot file is an fsync of the whole state;
    /// done on the Raft thread it stalls heartbeats long enough to cost the leadership. Off by
    /// default, so a caller that steps the core alone (the simulator, tests) keeps it whole.
    pub background_snapshots: bool,
    /// This member's name and client URLs, published through the log (etcd's `publish`) once
    /// this node knows a leader, whenever the replicated ones differ. `None` publishes nothing:
    /// the member then shows as never started (the simulator, tests of the core alone).
    pub attributes: Option<MemberAttrs>,
    /// Keep the events of applied writes for `take_watch_feed` (the watch hub's input). Off by
    /// default so that a caller that never takes them (the simulator) does not accumulate them.
    pub collect_events: bool,
    /// Known bugs to plant, so the simulator can show its checkers catch them.
    #[cfg(feature = "bug-injection")]
    pub bugs: InjectedBugs,
}

/// Bugs `NodeCore` can be built with (feature `bug-injection`).
#[cfg(feature = "bug-injection")]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InjectedBugs {
    /// A snapshot install does not mark the watch feed reset, so watchers never learn of the
    /// changes the snapshot skipped over.
    pub watch_feed_ignores_snapshots: bool,
}

/// Whether a member whose last snapshot is at `last` takes one at `applied`: `applied` has
/// reached one of its boundaries (`k * every + phase`) that lies at least half a run past
/// `last`. A boundary closer than that (after a snapshot installed from the leader, or one that
/// took long to write) is skipped rather than taken late, so a member stays on its phase and
/// off the others'. Spacing is between half a run and one and a half (plus the last apply
/// batch), `every` on average. `every == 0` turns snapshots off.
pub(crate) fn snapshot_due(applied: u64, last: u64, every: u64, phase: u64) -> bool {
    if every == 0 {
        return false;
    }
    let start = last.saturating_add(every.div_ceil(2));
    // Boundaries at or below `i`: the count steps up at each index = phase (mod every).
    let shift = every - phase % every;
    let boundaries = |i: u64| i.saturating_add(shift) / every;
    applied >= start && boundaries(applied) > boundaries(start - 1)
}

/// A snapshot phase for member `id` (see `NodeConfig::snapshot_phase`): ids spread over the run
/// by the golden ratio, so that any few ids, consecutive ones included, land far apart (1, 2
/// and 3 at 0.62, 0.24 and 0.85 of the run).
pub fn snapshot_phase_for(id: u64, every: u64) -> u64 {
    if every == 0 {
        return 0;
    }
    // 2^64 / golden ratio: frac(id * 0.618...) as a 64-bit fraction.
    let frac = id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((u128::from(frac) * u128::from(every)) >> 64) as u64
}

impl NodeConfig {
    pub fn new(id: u64, proposer: u64) -> Self {
        NodeConfig {
            raft: keel_raft::Config::new(id),
            proposer,
            snapshot_count: 10_000,
            snapshot_phase: 0,
            compaction_margin: 5_000,
            max_pending_writes: 1_000,
            max_pending_reads: 10_000,
            background_snapshots: false,
            attributes: None,
            collect_events: false,
            #[cfg(feature = "bug-injection")]
            bugs: InjectedBugs::default(),
        }
    }

    fn validate(&self) -> Result<(), NodeError> {
        if self.max_pending_writes == 0 || self.max_pending_writes >= keel_kv::DEDUP_WINDOW {
            return Err(NodeError::Config(format!(
                "max_pending_writes must be in 1..{}",
                keel_kv::DEDUP_WINDOW
            )));
        }
        if self.max_pending_reads == 0 {
            return Err(NodeError::Config(
                "max_pending_reads must be above 0".into(),
            ));
        }
        if let Some(a) = &self.attributes {
            a.validate().map_err(NodeError::Config)?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Raft(#[from] keel_raft::Error),
    /// The log could not be written or synced. The node must stop: after a failed fsync
    /// nothing on disk can be trusted until recovery re-reads it.
    #[error("storage: {0}")]
    Storage(String),
    #[error("too many requests in flight ({0}); retry later")]
    Overloaded(usize),
    #[error("invalid node config: {0}")]
    Config(String),
    #[error("state machine snapshot: {0}")]
    Snapshot(String),
    /// A request that can never succeed as given (a malformed peer address).
    #[error("invalid request: {0}")]
    Invalid(String),
}

impl From<keel_raft::StorageError> for NodeError {
    fn from(e: keel_raft::StorageError) -> Self {
        NodeError::Storage(e.to_string())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A write proposed here was applied; `result` is what the state machine answered.
    Write {
        token: Token,
        result: Result<Response, keel_kv::Error>,
    },
    /// A linearizable read, served once this node applied the read index.
    Read {
        token: Token,
        result: Result<RangeResponse, keel_kv::Error>,
    },
    /// A membership change proposed here was applied; the configuration now in force.
    ConfChange { token: Token, conf_state: ConfState },
    /// The membership or the address book changed (a change applied here, whoever proposed it,
    /// or a snapshot installed). `removed` names a member a change took out.
    Members {
        conf_state: ConfState,
        removed: Option<u64>,
    },
    /// A read that cannot be confirmed any more (leadership changed while it waited); retry.
    ReadDropped { token: Token },
    /// A peer address change proposed here (`propose_peer_addr`) was applied: the
    /// configuration then in force, or why applying it refused the change.
    PeerAddrChanged {
        token: Token,
        result: Result<ConfState, PeerAddrError>,
    },
    /// This node's role or its known leader changed.
    RoleChanged {
        role: StateRole,
        term: u64,
        leader: u64,
    },
}

/// Why an applied peer address change changed nothing. Both are races with another change
/// committed first: the proposer's checks passed against an older view of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerAddrError {
    #[error("node {0} is not a member")]
    NotMember(u64),
    #[error("{addr} is already the peer address of member {owner}")]
    AddressInUse { addr: String, owner: u64 },
}

/// Messages a Ready lets out at once.
#[derive(Debug)]
pub struct Outgoing {
    pub number: u64,
    pub messages: Vec<Message>,
    /// The coming `persist` must fsync (new entries, snapshot, term or vote).
    pub must_sync: bool,
}

/// A Ready handed out and not yet finished.
struct InFlight {
    number: u64,
    snapshot: Option<Snapshot>,
    hard_state: Option<HardState>,
    entries: Vec<Entry>,
    /// Entries or hard state were written in `ready` and wait for a sync.
    written: bool,
    /// What was written must be durable before the Ready's messages go out and it is applied:
    /// new entries, a snapshot, or a new term or vote. A hard state whose only change is the
    /// commit index is written but not synced (as etcd's `MustSync`): a commit index is a fact
    /// of the cluster, not a promise of this node, so losing it in a crash loses nothing (the
    /// leader tells it again, and a snapshot on disk implies its own index is committed). It
    /// becomes durable with the next sync. Syncing it cost a 1-client put on the leader a
    /// second fdatasync between the quorum's acknowledgement and the answer.
    must_sync: bool,
    persisted: bool,
    persisted_messages: Vec<Message>,
    committed: Vec<Entry>,
    read_states: Vec<ReadState>,
}

type ReadBatch = Vec<(Token, RangeRequest)>;

pub struct NodeCore<S: LogStore> {
    raw: RawNode<S>,
    kv: Store,
    cfg: NodeConfig,
    next_seq: u64,
    /// Sequence number -> waiting write and its encoded command, kept to propose again when the
    /// leader changes (a proposal forwarded to a leader that died is lost; the dedup table
    /// applies a write proposed twice once). Invariant: `len() <= cfg.max_pending_writes`; the
    /// commands are the same buffers the log holds, alive only until answered or cancelled.
    writes: HashMap<u64, (Token, Bytes)>,
    /// The leader of the last Ready's soft state (0: none known).
    leader: u64,
    /// Sequence number -> waiting membership change.
    confs: HashMap<u64, Token>,
    /// Reads not yet sent for a read index; one read index serves the whole batch.
    read_queue: ReadBatch,
    /// Read index context -> reads waiting for its confirmation.
    reads_in_flight: HashMap<u64, ReadBatch>,
    /// Confirmed reads waiting for the state machine to reach their index.
    reads_confirmed: Vec<(u64, ReadBatch)>,
    /// Reads in the three stages above. Invariant: `<= cfg.max_pending_reads`.
    reads_count: usize,
    next_ctx: u64,
    /// Index of the last entry applied (or covered by the snapshot restored).
    applied: u64,
    last_snapshot: u64,
    /// Snapshots received from a leader and installed since start (not the ones taken here).
    snapshots_installed: u64,
    /// With `background_snapshots`: a snapshot prepared and not yet taken by the caller.
    snapshot_job: Option<SnapshotJob>,
    /// With `background_snapshots`: the index of the snapshot being written. Invariant: at most
    /// one at a time, so files are written in index order and memory holds one copy.
    snapshot_writing: Option<u64>,
    /// Peer addresses of members, replicated through membership changes and snapshots.
    /// Entries may outlive their member only until the change removing it is applied.
    peers: AddressBook,
    /// Members' published attributes, replicated through node entries and snapshots.
    /// Invariant: only members have an entry (removed with the member).
    attrs: Attributes,
    /// Ticks before this node may propose its attributes again: a publish in flight commits
    /// within a few heartbeats, and one lost with a leader is retried once this runs out.
    publish_wait: usize,
    /// Sequence number -> waiting peer address change. Counted with `writes` and `confs`
    /// against `cfg.max_pending_writes`. Not proposed again on a leader change, unlike writes:
    /// a repeat applied after a later change of the same member's address would undo it.
    addr_changes: HashMap<u64, Token>,
    in_flight: Option<InFlight>,
    outcomes: Vec<Outcome>,
    /// With `collect_events`: what applying changed since the last `take_watch_feed`.
    watch_feed: WatchFeed,
    /// With `collect_events`: lease grants and revokes applied since the last
    /// `take_lease_changes`, in order, for the leader's lease clock.
    lease_changes: Vec<LeaseChange>,
}

/// What the state machine's applied writes changed since the last `take_watch_feed`: the input of
/// a watch hub.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchFeed {
    /// In (revision, sub-revision) order, each exactly once, with `prev_kv` filled in. When
    /// `reset` is set, only the changes applied after the snapshot.
    pub events: Vec<Event>,
    /// A snapshot replaced the state machine: the changes between the previous feed and the
    /// snapshot are not in any feed, so a watcher must read them from the store's history.
    pub reset: bool,
    /// The store's revision once these changes were applied.
    pub revision: i64,
}

impl WatchFeed {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && !self.reset
    }
}

/// A context naming its proposer and a sequence number: a membership change's (so the
/// proposing node recognises it when applied) and a read batch's (so contexts from different
/// nodes never collide at the leader).
fn request_context(proposer: u64, seq: u64) -> Bytes {
    let mut b = Vec::with_capacity(16);
    b.extend_from_slice(&proposer.to_le_bytes());
    b.extend_from_slice(&seq.to_le_bytes());
    b.into()
}

fn parse_request_context(c: &[u8]) -> Option<(u64, u64)> {
    let c: &[u8; 16] = c.try_into().ok()?;
    let proposer = u64::from_le_bytes(c[..8].try_into().ok()?);
    let seq = u64::from_le_bytes(c[8..].try_into().ok()?);
    Some((proposer, seq))
}

impl<S: LogStore> NodeCore<S> {
    /// Starts from what `store` holds: the state machine is restored from the latest snapshot
    /// and committed entries after it are re-applied through the first Readies.
    pub fn new(cfg: NodeConfig, store: S) -> Result<Self, NodeError> {
        cfg.validate()?;
        let snap = store.snapshot(0)?;
        let (index, _) = snapshot_position(&snap);
        let (peers, attrs, kv) = restore(&snap.data)?;
        let mut raft_cfg = cfg.raft.clone();
        raft_cfg.applied = index;
        let mut raw = RawNode::new(&raft_cfg, store)?;
        raw.store_mut().unload_snapshot_data();
        Ok(NodeCore {
            raw,
            kv,
            cfg,
            next_seq: 1,
            writes: HashMap::new(),
            leader: 0,
            confs: HashMap::new(),
            read_queue: Vec::new(),
            reads_in_flight: HashMap::new(),
            reads_confirmed: Vec::new(),
            reads_count: 0,
            next_ctx: 1,
            applied: index,
            last_snapshot: index,
            snapshots_installed: 0,
            snapshot_job: None,
            snapshot_writing: None,
            peers,
            attrs,
            publish_wait: 0,
            addr_changes: HashMap::new(),
            in_flight: None,
            outcomes: Vec::new(),
            watch_feed: WatchFeed::default(),
            lease_changes: Vec::new(),
        })
    }

    pub fn raw(&self) -> &RawNode<S> {
        &self.raw
    }

    /// The state machine, for serializable (local, possibly stale) reads and status.
    /// Peer addresses of the members, as replicated (see `propose_conf_change`).
    pub fn peers(&self) -> &AddressBook {
        &self.peers
    }

    pub fn kv(&self) -> &Store {
        &self.kv
    }

    /// Hands over the state machine, leaving an empty one: for a node that is stopping and
    /// frees its state elsewhere. The core must not be used after it.
    pub fn take_kv(&mut self) -> Store {
        std::mem::take(&mut self.kv)
    }

    /// Members' published attributes (name, client URLs), as replicated. A member without an
    /// entry never published: etcd's "unstarted".
    pub fn attributes(&self) -> &Attributes {
        &self.attrs
    }

    /// This node's state as a snapshot holds it (address book, attributes, state machine):
    /// what a Raft snapshot's data would be at `applied()`.
    pub fn snapshot_data(&self) -> Bytes {
        self.image().encode()
    }

    /// The state `snapshot_data` encodes, taken without encoding it: O(1) for the key space,
    /// so the caller can encode it off the Raft thread.
    pub fn image(&self) -> NodeImage {
        NodeImage::new(
            self.applied,
            self.peers.clone(),
            self.attrs.clone(),
            self.kv.image(),
        )
    }

    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Index of the last snapshot this node took or installed.
    pub fn last_snapshot(&self) -> u64 {
        self.last_snapshot
    }

    /// Snapshots installed from a leader since this core was built.
    pub fn snapshots_installed(&self) -> u64 {
        self.snapshots_installed
    }

    /// The outstanding Ready's new log entries (empty if none is out). For observers such as
    /// the simulator's safety checker.
    pub fn pending_entries(&self) -> &[Entry] {
        self.in_flight.as_ref().map_or(&[], |f| &f.entries)
    }

    /// The outstanding Ready's committed entries, before `apply`.
    pub fn pending_committed(&self) -> &[Entry] {
        self.in_flight.as_ref().map_or(&[], |f| &f.committed)
    }

    /// The outstanding Ready's hard state, if it changed.
    pub fn pending_hard_state(&self) -> Option<HardState> {
        self.in_flight.as_ref().and_then(|f| f.hard_state)
    }

    /// The outstanding Ready's snapshot from the leader, if any.
    pub fn pending_snapshot(&self) -> Option<&Snapshot> {
        self.in_flight.as_ref().and_then(|f| f.snapshot.as_ref())
    }

    pub fn tick(&mut self) {
        self.raw.tick();
        self.publish_wait = self.publish_wait.saturating_sub(1);
    }

    pub fn campaign(&mut self) -> Result<(), NodeError> {
        Ok(self.raw.campaign()?)
    }

    pub fn transfer_leader(&mut self, to: u64) {
        self.raw.transfer_leader(to);
    }

    pub fn report_unreachable(&mut self, id: u64) {
        self.raw.report_unreachable(id);
    }

    pub fn report_snapshot(&mut self, id: u64, ok: bool) {
        self.raw.report_snapshot(id, ok);
    }

    /// A message from a peer. Malformed or misrouted ones are refused and change nothing.
    pub fn step(&mut self, m: Message) -> Result<(), NodeError> {
        Ok(self.raw.step(m)?)
    }

    /// Proposes a write; `Outcome::Write` with `token` follows once it is applied here.
    pub fn propose(&mut self, token: Token, op: Op) -> Result<(), NodeError> {
        if self.pending_changes() >= self.cfg.max_pending_writes {
            return Err(NodeError::Overloaded(self.cfg.max_pending_writes));
        }
        let seq = self.next_seq;
        let id = RequestId {
            proposer: self.cfg.proposer,
            seq,
        };
        let data = Command::with_id(id, op).encode();
        self.raw.propose(data.clone())?;
        self.next_seq += 1;
        self.writes.insert(seq, (token, data));
        Ok(())
    }

    /// Proposes a membership change; `Outcome::ConfChange` follows once it is applied here.
    /// A change that adds a member may carry its peer address (`host:port`) as `cc.context`;
    /// every member records it when applying the change.
    pub fn propose_conf_change(
        &mut self,
        token: Token,
        mut cc: ConfChange,
    ) -> Result<(), NodeError> {
        if self.pending_changes() >= self.cfg.max_pending_writes {
            return Err(NodeError::Overloaded(self.cfg.max_pending_writes));
        }
        let addr = if cc.context.is_empty() {
            None
        } else {
            let a = std::str::from_utf8(&cc.context)
                .map_err(|_| NodeError::Invalid("peer address is not UTF-8".into()))?;
            if a.len() > snapshot::MAX_ADDR_LEN {
                return Err(NodeError::Invalid(format!(
                    "peer address longer than {} bytes",
                    snapshot::MAX_ADDR_LEN
                )));
            }
            Some(a.to_string())
        };
        let seq = self.next_seq;
        let req = request_context(self.cfg.proposer, seq);
        cc.context = snapshot::conf_context(&req, addr.as_deref());
        self.raw.propose_conf_change(cc)?;
        self.next_seq += 1;
        self.confs.insert(seq, token);
        Ok(())
    }

    /// Proposes that member `id` now listens for peers at `addr` (`host:port`, at most
    /// `snapshot::MAX_ADDR_LEN` bytes); `Outcome::PeerAddrChanged` follows once it is applied
    /// here. Every member records the address when it applies the entry (and its driver dials
    /// it); the configuration is unchanged, so this needs no membership change.
    pub fn propose_peer_addr(
        &mut self,
        token: Token,
        id: u64,
        addr: String,
    ) -> Result<(), NodeError> {
        if self.pending_changes() >= self.cfg.max_pending_writes {
            return Err(NodeError::Overloaded(self.cfg.max_pending_writes));
        }
        let e = NodeEntry::PeerAddr { id, addr };
        entry::validate(&e).map_err(NodeError::Invalid)?;
        let seq = self.next_seq;
        let data = Envelope {
            proposer: self.cfg.proposer,
            seq,
            entry: e,
        }
        .encode();
        self.raw.propose(data)?;
        self.next_seq += 1;
        self.addr_changes.insert(seq, token);
        Ok(())
    }

    /// Writes, membership changes and address changes proposed here and waiting.
    fn pending_changes(&self) -> usize {
        self.writes.len() + self.confs.len() + self.addr_changes.len()
    }

    /// Queues a linearizable read; `Outcome::Read` (or `ReadDropped`) follows. Reads queued
    /// between two Readies share one read index (one heartbeat round).
    pub fn read(&mut self, token: Token, req: RangeRequest) -> Result<(), NodeError> {
        if self.reads_count >= self.cfg.max_pending_reads {
            return Err(NodeError::Overloaded(self.cfg.max_pending_reads));
        }
        self.read_queue.push((token, req));
        self.reads_count += 1;
        Ok(())
    }

    /// Forgets a request whose caller gave up (timed out). A write may still be applied later;
    /// its answer is then dropped.
    pub fn cancel(&mut self, token: Token) {
        self.writes.retain(|_, (t, _)| *t != token);
        self.confs.retain(|_, t| *t != token);
        self.addr_changes.retain(|_, t| *t != token);
        let before = self.queued_reads();
        self.read_queue.retain(|(t, _)| *t != token);
        for b in self.reads_in_flight.values_mut() {
            b.retain(|(t, _)| *t != token);
        }
        for (_, b) in self.reads_confirmed.iter_mut() {
            b.retain(|(t, _)| *t != token);
        }
        self.reads_count -= before - self.queued_reads();
    }

    fn queued_reads(&self) -> usize {
        self.read_queue.len()
            + self.reads_in_flight.values().map(Vec::len).sum::<usize>()
            + self
                .reads_confirmed
                .iter()
                .map(|(_, b)| b.len())
                .sum::<usize>()
    }

    pub fn take_outcomes(&mut self) -> Vec<Outcome> {
        std::mem::take(&mut self.outcomes)
    }

    fn flush_reads(&mut self) {
        if self.read_queue.is_empty() {
            return;
        }
        let ctx = self.next_ctx;
        self.next_ctx += 1;
        let batch = std::mem::take(&mut self.read_queue);
        // The leader keeps one request per context, and followers forward theirs to it: the
        // context names this process (proposer id) as well as the batch, or two nodes' batches
        // could be taken for one.
        match self.raw.read_index(request_context(self.cfg.proposer, ctx)) {
            Ok(()) => {
                self.reads_in_flight.insert(ctx, batch);
            }
            Err(_) => self.drop_reads(batch),
        }
    }

    fn drop_reads(&mut self, batch: ReadBatch) {
        self.reads_count -= batch.len();
        for (token, _) in batch {
            self.outcomes.push(Outcome::ReadDropped { token });
        }
    }

    /// Proposes every waiting write again, to a leader that took over. Writes forwarded to the
    /// old leader may have died with it and would otherwise wait out their deadline; the ones
    /// that did reach the log apply once, because the state machine drops a repeated request id.
    /// In sequence order, so writes from this node keep the order they were proposed in.
    fn repropose(&mut self) {
        if self.writes.is_empty() {
            return;
        }
        let mut seqs: Vec<u64> = self.writes.keys().copied().collect();
        seqs.sort_unstable();
        let batch: Vec<Bytes> = seqs.iter().map(|s| self.writes[s].1.clone()).collect();
        // A refusal (a transfer under way, the uncommitted-size limit) leaves the writes
        // waiting as before: the original proposals may still commit, or the deadline ends them.
        let _ = self.raw.propose_batch(batch);
    }

    /// Takes the next Ready, if the previous one is finished and there is work. Entries and hard
    /// state are written (not yet synced) before the messages are handed out.
    pub fn ready(&mut self) -> Result<Option<Outgoing>, NodeError> {
        if self.in_flight.is_some() {
            return Ok(None);
        }
        self.flush_reads();
        self.maybe_publish();
        if !self.raw.has_ready() {
            return Ok(None);
        }
        let rd = self.raw.ready();
        if let Some(ss) = rd.soft_state {
            self.outcomes.push(Outcome::RoleChanged {
                role: ss.role,
                term: self.raw.raft.term,
                leader: ss.leader_id,
            });
            // Requests for confirmation went to a leader that is gone or deposed; an answer may
            // never come. Confirmed reads stay valid: their index was confirmed by a quorum.
            let lost: Vec<ReadBatch> = self.reads_in_flight.drain().map(|(_, b)| b).collect();
            for b in lost {
                self.drop_reads(b);
            }
            if ss.leader_id != 0 && ss.leader_id != self.leader {
                self.repropose();
            }
            self.leader = ss.leader_id;
        }
        let written = rd.snapshot.is_none() && (!rd.entries.is_empty() || rd.hard_state.is_some());
        if written {
            self.raw
                .store_mut()
                .write(rd.hard_state.as_ref(), &rd.entries)
                .map_err(NodeError::Storage)?;
        }
        self.in_flight = Some(InFlight {
            number: rd.number,
            snapshot: rd.snapshot,
            hard_state: rd.hard_state,
            entries: rd.entries,
            written,
            must_sync: rd.must_sync,
            persisted: false,
            persisted_messages: rd.persisted_messages,
            committed: rd.committed_entries,
            read_states: rd.read_states,
        });
        Ok(Some(Outgoing {
            number: rd.number,
            messages: rd.messages,
            must_sync: rd.must_sync,
        }))
    }

    /// Makes the outstanding Ready durable (one sync) and returns the messages that waited for
    /// it. Call `apply` next.
    pub fn persist(&mut self) -> Result<Vec<Message>, NodeError> {
        let Some(f) = self.in_flight.as_mut() else {
            return Ok(Vec::new());
        };
        if f.persisted {
            return Ok(Vec::new());
        }
        let store = self.raw.store_mut();
        if let Some(snap) = &f.snapshot {
            // A snapshot restarts the log: install it, then write what follows it.
            store
                .install_snapshot(snap.clone())
                .map_err(NodeError::Storage)?;
            store
                .write(f.hard_state.as_ref(), &f.entries)
                .map_err(NodeError::Storage)?;
            store.sync().map_err(NodeError::Storage)?;
        } else if f.written && f.must_sync {
            store.sync().map_err(NodeError::Storage)?;
        }
        f.persisted = true;
        Ok(std::mem::take(&mut f.persisted_messages))
    }

    /// Applies the outstanding Ready's snapshot and committed entries, answers what they
    /// complete, and finishes the Ready.
    pub fn apply(&mut self) -> Result<(), NodeError> {
        let Some(f) = self.in_flight.take() else {
            return Ok(());
        };
        assert!(
            f.persisted,
            "apply() before persist() of Ready {}",
            f.number
        );
        if let Some(snap) = &f.snapshot {
            let (index, _) = snapshot_position(snap);
            (self.peers, self.attrs, self.kv) = restore(&snap.data)?;
            self.raw.store_mut().unload_snapshot_data();
            self.applied = index;
            self.last_snapshot = index;
            self.snapshots_installed += 1;
            if self.cfg.collect_events {
                self.watch_feed.events.clear();
                self.watch_feed.reset = true;
                #[cfg(feature = "bug-injection")]
                if self.cfg.bugs.watch_feed_ignores_snapshots {
                    self.watch_feed.reset = false;
                }
                self.lease_changes.clear();
                self.lease_changes.push(LeaseChange::Reset);
            }
            self.outcomes.push(Outcome::Members {
                conf_state: self.raw.raft.trk.conf_state(),
                removed: None,
            });
        }
        for e in &f.committed {
            self.apply_entry(e);
        }
        for rs in f.read_states {
            let ctx = match parse_request_context(&rs.request_ctx) {
                Some((proposer, ctx)) if proposer == self.cfg.proposer => ctx,
                _ => continue,
            };
            if let Some(batch) = self.reads_in_flight.remove(&ctx) {
                self.reads_confirmed.push((rs.index, batch));
            }
        }
        self.serve_reads();
        self.raw.advance(f.number);
        self.maybe_snapshot()
    }

    fn apply_entry(&mut self, e: &Entry) {
        if e.index <= self.applied {
            // Covered by the snapshot this node restored.
            return;
        }
        self.applied = e.index;
        match e.entry_type() {
            EntryType::EntryNormal => {
                // A new leader's empty entry carries no command.
                if e.data.is_empty() {
                    return;
                }
                // Membership data, never the state machine's (see `entry` for why the first
                // byte cannot start a command).
                if entry::is_node_entry(&e.data) {
                    self.apply_node_entry(&e.data);
                    return;
                }
                // A payload that does not decode was never proposed by a Keel node; every
                // replica skips it alike, so the state machines stay identical.
                let Ok(cmd) = Command::decode(&e.data) else {
                    return;
                };
                let mut applied = self.kv.apply(e.index, &cmd);
                if self.cfg.collect_events {
                    self.watch_feed.events.append(&mut applied.events);
                    match (&cmd.op, &applied.result) {
                        (Op::LeaseGrant(_), Ok(Response::LeaseGrant(g))) if !applied.duplicate => {
                            self.lease_changes.push(LeaseChange::Granted {
                                id: g.id,
                                ttl: g.ttl,
                            });
                        }
                        (Op::LeaseRevoke(r), Ok(_)) if !applied.duplicate => {
                            self.lease_changes.push(LeaseChange::Revoked { id: r.id });
                        }
                        _ => {}
                    }
                }
                if let Some(id) = cmd.request_id {
                    if id.proposer == self.cfg.proposer {
                        if let Some((token, _)) = self.writes.remove(&id.seq) {
                            self.outcomes.push(Outcome::Write {
                                token,
                                result: applied.result,
                            });
                        }
                    }
                }
            }
            EntryType::EntryConfChange => {
                let Ok(cc) = ConfChange::decode(e.data.as_ref()) else {
                    return;
                };
                let before = self.raw.raft.trk.conf_state();
                let conf_state = self.raw.apply_conf_change(&cc);
                let (req, addr) = snapshot::parse_conf_context(&cc.context);
                let id = cc.node_id;
                let member = |cs: &ConfState| cs.voters.contains(&id) || cs.learners.contains(&id);
                let mut removed = None;
                if member(&conf_state) {
                    if let Some(a) = addr {
                        self.peers.insert(id, a.to_string());
                    }
                } else if member(&before) {
                    self.peers.remove(&id);
                    self.attrs.remove(&id);
                    removed = Some(id);
                }
                self.outcomes.push(Outcome::Members {
                    conf_state: conf_state.clone(),
                    removed,
                });
                if let Some((proposer, seq)) = req.and_then(parse_request_context) {
                    if proposer == self.cfg.proposer {
                        if let Some(token) = self.confs.remove(&seq) {
                            self.outcomes
                                .push(Outcome::ConfChange { token, conf_state });
                        }
                    }
                }
            }
        }
    }

    /// Applies a node entry. Its effect depends only on the entry and on the configuration
    /// and address book as of this index, so every member ends in the same state.
    fn apply_node_entry(&mut self, data: &[u8]) {
        // Like an undecodable command: never proposed by a Keel node, skipped alike.
        let Ok(env) = Envelope::decode(data) else {
            return;
        };
        let cs = self.raw.raft.trk.conf_state();
        let member = |id: u64| cs.voters.contains(&id) || cs.learners.contains(&id);
        match env.entry {
            NodeEntry::Attributes { id, attrs } => {
                // A late publish of a removed member must not bring its entry back.
                if member(id) {
                    self.attrs.insert(id, attrs);
                }
            }
            NodeEntry::PeerAddr { id, addr } => {
                let owner = self
                    .peers
                    .iter()
                    .find(|(&o, a)| o != id && **a == addr && member(o))
                    .map(|(&o, _)| o);
                let result = if !member(id) {
                    Err(PeerAddrError::NotMember(id))
                } else if let Some(owner) = owner {
                    Err(PeerAddrError::AddressInUse { addr, owner })
                } else {
                    self.peers.insert(id, addr);
                    self.outcomes.push(Outcome::Members {
                        conf_state: cs.clone(),
                        removed: None,
                    });
                    Ok(cs)
                };
                if env.proposer == self.cfg.proposer {
                    if let Some(token) = self.addr_changes.remove(&env.seq) {
                        self.outcomes
                            .push(Outcome::PeerAddrChanged { token, result });
                    }
                }
            }
        }
    }

    /// etcd's publish: proposes this member's attributes when the replicated ones differ
    /// (so a restart with the same name and URLs proposes nothing). Waits until a leader is
    /// known and this node applied an entry of the current term (the new leader's first at
    /// least): before that the replicated attributes read here may lag the log, and a
    /// restarted member would publish again what the log already holds.
    fn maybe_publish(&mut self) {
        let Some(mine) = self.cfg.attributes.as_ref() else {
            return;
        };
        let raft = &self.raw.raft;
        let id = raft.id;
        if self.publish_wait > 0 || raft.leader_id == 0 || self.attrs.get(&id) == Some(mine) {
            return;
        }
        if !raft.trk.is_voter(id) && !raft.trk.learners.contains(&id) {
            return;
        }
        if raft.raft_log.term(self.applied).ok() != Some(raft.term) {
            return;
        }
        // Sequence 0 is never a waiting request's (they count from 1): nobody waits on a
        // publish, the comparison above is its answer.
        let data = Envelope {
            proposer: self.cfg.proposer,
            seq: 0,
            entry: NodeEntry::Attributes {
                id,
                attrs: mine.clone(),
            },
        }
        .encode();
        // Two election timeouts: an election and a commit fit in it, so a publish still in
        // flight is not doubled, and one lost with its leader is retried soon after.
        self.publish_wait = 2 * self.cfg.raft.election_tick;
        // A refusal (a leader transfer under way) is retried like a lost proposal.
        let _ = self.raw.propose(data);
    }

    fn serve_reads(&mut self) {
        let applied = self.applied;
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.reads_confirmed)
            .into_iter()
            .partition(|(index, _)| *index <= applied);
        self.reads_confirmed = waiting;
        for (_, batch) in ready {
            self.reads_count -= batch.len();
            for (token, req) in batch {
                let result = self.kv.range(&req);
                self.outcomes.push(Outcome::Read { token, result });
            }
        }
    }

    fn maybe_snapshot(&mut self) -> Result<(), NodeError> {
        if !snapshot_due(
            self.applied,
            self.last_snapshot,
            self.cfg.snapshot_count,
            self.cfg.snapshot_phase,
        ) {
            return Ok(());
        }
        if self.snapshot_writing.is_some() {
            return Ok(());
        }
        let cs = self.raw.raft.trk.conf_state();
        let (index, margin) = (self.applied, self.cfg.compaction_margin);
        if self.cfg.background_snapshots {
            // Encoded by whoever writes it: here only the image is taken.
            let snap = self
                .raw
                .store()
                .prepare_snapshot(index, cs, Bytes::new())
                .map_err(NodeError::Storage)?;
            self.snapshot_job = Some(SnapshotJob {
                snap,
                image: self.image(),
            });
            self.snapshot_writing = Some(index);
            return Ok(());
        }
        let data = self.snapshot_data();
        self.raw
            .store_mut()
            .snapshot_and_compact(index, cs, data, margin)
            .map_err(NodeError::Storage)?;
        self.last_snapshot = index;
        Ok(())
    }

    /// With `collect_events`: what applying changed since the last call (empty when nothing
    /// did). The caller must take it after every `apply` it wants watchers to see promptly;
    /// nothing is lost by waiting, but it accumulates meanwhile.
    pub fn take_watch_feed(&mut self) -> WatchFeed {
        let mut feed = std::mem::take(&mut self.watch_feed);
        feed.revision = self.kv.revision();
        feed
    }

    /// With `collect_events`: the lease grants and revokes applied since the last call.
    pub fn take_lease_changes(&mut self) -> Vec<LeaseChange> {
        std::mem::take(&mut self.lease_changes)
    }

    /// With `background_snapshots`: the snapshot to build (`SnapshotJob::build`) and write
    /// durably (the store's `SnapStore::save`), both on any thread, then to hand back with
    /// `snapshot_saved`.
    pub fn take_snapshot_job(&mut self) -> Option<SnapshotJob> {
        self.snapshot_job.take()
    }

    /// The snapshot from `take_snapshot_job` is durable: the log records it and is compacted
    /// behind it. A snapshot overtaken by one installed from the leader meanwhile is dropped.
    /// Files the store left for the caller to delete (see `LogStore::take_removed`).
    pub fn take_removed(&mut self) -> Vec<std::path::PathBuf> {
        self.raw.store_mut().take_removed()
    }

    pub fn snapshot_saved(&mut self, snap: Snapshot) -> Result<(), NodeError> {
        let (index, _) = snapshot_position(&snap);
        if self.snapshot_writing != Some(index) {
            return Err(NodeError::Snapshot(format!(
                "snapshot at {index} reported saved, but {:?} was being written",
                self.snapshot_writing
            )));
        }
        self.snapshot_writing = None;
        let margin = self.cfg.compaction_margin;
        if self
            .raw
            .store_mut()
            .adopt_snapshot(snap, margin)
            .map_err(NodeError::Storage)?
        {
            self.last_snapshot = self.last_snapshot.max(index);
        }
        Ok(())
    }
}

/// A snapshot to write (see `NodeCore::take_snapshot_job`): its position and configuration,
/// and the state it holds, not yet encoded.
#[derive(Debug)]
pub struct SnapshotJob {
    /// Metadata filled in; `data` empty until `build`.
    snap: Snapshot,
    image: NodeImage,
}

impl SnapshotJob {
    /// The index the snapshot is at.
    pub fn index(&self) -> u64 {
        snapshot_position(&self.snap).0
    }

    /// Encodes the state: the cost of a snapshot that grows with the store, for a thread other
    /// than the Raft thread to pay.
    pub fn build(self) -> Snapshot {
        Snapshot {
            data: self.image.encode(),
            ..self.snap
        }
    }
}

/// The address book, attributes and state machine a snapshot's data holds.
fn restore(data: &Bytes) -> Result<(AddressBook, Attributes, Store), NodeError> {
    let snapshot::NodeSnapshot { peers, attrs, kv } =
        snapshot::decode(data).map_err(NodeError::Snapshot)?;
    let kv = if kv.is_empty() {
        Store::new()
    } else {
        Store::restore(&kv).map_err(|e| NodeError::Snapshot(e.to_string()))?
    };
    Ok((peers, attrs, kv))
}

#[cfg(test)]
mod tests {
    use super::{snapshot_due, snapshot_phase_for};

    #[test]
    fn a_snapshot_is_due_at_each_boundary_of_the_members_phase() {
        // Entries applied one at a time from 0, snapshotting whenever one is due.
        let run = |every: u64, phase: u64| {
            let mut last = 0;
            let mut taken = vec![];
            for applied in 1..=35 {
                if snapshot_due(applied, last, every, phase) {
                    taken.push(applied);
                    last = applied;
                }
            }
            taken
        };
        // Phase 0: the multiples of the count.
        assert_eq!(run(10, 0), vec![10, 20, 30]);
        // Phase 3: 13, 23, 33; the boundary at 3 is under half a run past 0.
        assert_eq!(run(10, 3), vec![13, 23, 33]);
        // A phase past the count wraps; a count of 0 is off.
        assert_eq!(run(10, 13), run(10, 3));
        assert!(run(0, 0).is_empty());
        // Applies come in batches: a boundary crossed inside a batch counts.
        assert!(snapshot_due(25, 13, 10, 3));
        assert!(!snapshot_due(22, 13, 10, 3));
        // A snapshot installed just before a boundary: that boundary is skipped, the next one
        // taken on time.
        assert!(!snapshot_due(23, 21, 10, 3));
        assert!(!snapshot_due(32, 21, 10, 3));
        assert!(snapshot_due(33, 21, 10, 3));
        // One just past half a run before it: taken.
        assert!(snapshot_due(23, 18, 10, 3));
        assert!(!snapshot_due(23, 19, 10, 3));
    }

    #[test]
    fn phases_of_the_first_ids_are_spread_over_the_run() {
        let every = 100_000;
        let mut p: Vec<u64> = (1..=3).map(|id| snapshot_phase_for(id, every)).collect();
        assert!(p.iter().all(|&x| x < every));
        p.sort();
        let gaps = [p[1] - p[0], p[2] - p[1], p[0] + every - p[2]];
        assert!(gaps.iter().all(|&g| g >= every / 5), "{p:?}");
        assert_eq!(snapshot_phase_for(7, 0), 0);
    }
}
