//! The application's handle on the core: inputs in, numbered `Ready`s out.

use crate::config::Config;
use crate::errors::{Error, Result};
use crate::progress::Progress;
use crate::raft::{is_response, msg, Raft, SoftState, StateRole, NONE};
use crate::read_only::ReadState;
use crate::storage::Storage;
use bytes::Bytes;
use keel_proto::raftpb::{
    ConfChange, ConfState, Entry, EntryType, HardState, Message, MessageType, Snapshot,
};
use prost::Message as _;
use std::collections::BTreeMap;

/// Indices above this are treated as malformed: no real log gets near it, and rejecting them
/// keeps every `index + 1` in the core free of overflow.
const MAX_SANE_INDEX: u64 = 1 << 62;

/// Everything the application must do, in this order: persist `snapshot`, `entries` and
/// `hard_state` (one sync if `must_sync`); send `messages` (these may go out before or during
/// the write); after the write is durable, send `persisted_messages`; apply the snapshot and
/// `committed_entries` in order; hand `read_states` to waiting readers once their index is
/// applied; then call `advance(number)`.
#[derive(Debug, Default)]
pub struct Ready {
    pub number: u64,
    /// Set when the role or leader changed since the last Ready.
    pub soft_state: Option<SoftState>,
    /// Set when term, vote or commit changed since the last Ready.
    pub hard_state: Option<HardState>,
    pub entries: Vec<Entry>,
    pub snapshot: Option<Snapshot>,
    pub messages: Vec<Message>,
    pub persisted_messages: Vec<Message>,
    pub committed_entries: Vec<Entry>,
    pub read_states: Vec<ReadState>,
    /// The write must be fsync'ed before `persisted_messages` go out: new entries, a snapshot,
    /// or a changed term or vote. A commit-index change alone may be written lazily.
    pub must_sync: bool,
}

/// What an outstanding Ready handed out, to be acknowledged by `advance`.
#[derive(Debug)]
struct InFlight {
    number: u64,
    last_entry: Option<(u64, u64)>,
    snapshot_index: Option<u64>,
    last_committed: Option<u64>,
    committed_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct Status {
    pub id: u64,
    pub hard_state: HardState,
    pub soft_state: SoftState,
    pub applied: u64,
    pub last_index: u64,
    pub first_index: u64,
    pub conf_state: ConfState,
    /// Followers' progress; only on the leader.
    pub progress: BTreeMap<u64, Progress>,
    pub lead_transferee: Option<u64>,
}

pub struct RawNode<S: Storage> {
    pub raft: Raft<S>,
    prev_soft: SoftState,
    prev_hard: HardState,
    next_number: u64,
    /// Invariant: at most one Ready is out at a time; `ready()` panics otherwise.
    in_flight: Option<InFlight>,
}

impl<S: Storage> RawNode<S> {
    pub fn new(config: &Config, store: S) -> Result<Self> {
        let raft = Raft::new(config, store)?;
        let prev_hard = raft.hard_state();
        Ok(RawNode {
            prev_soft: raft.soft_state(),
            prev_hard,
            raft,
            next_number: 1,
            in_flight: None,
        })
    }

    pub fn store(&self) -> &S {
        &self.raft.raft_log.store
    }

    /// For writing entries and snapshots once they are durable (before `advance`).
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.raft.raft_log.store
    }

    pub fn tick(&mut self) {
        self.raft.tick();
    }

    pub fn campaign(&mut self) -> Result<()> {
        self.raft.step(msg(MessageType::MsgHup, NONE))
    }

    pub fn propose(&mut self, data: Bytes) -> Result<()> {
        self.propose_batch(vec![data])
    }

    /// Proposes several commands as consecutive entries in one step: one append message per
    /// follower instead of one per command.
    pub fn propose_batch(&mut self, data: Vec<Bytes>) -> Result<()> {
        let mut m = msg(MessageType::MsgPropose, NONE);
        m.from = self.raft.id;
        m.entries = data
            .into_iter()
            .map(|data| Entry {
                data,
                ..Default::default()
            })
            .collect();
        self.raft.step(m)
    }

    pub fn propose_conf_change(&mut self, cc: ConfChange) -> Result<()> {
        let mut e = Entry {
            data: cc.encode_to_vec().into(),
            ..Default::default()
        };
        e.set_entry_type(EntryType::EntryConfChange);
        let mut m = msg(MessageType::MsgPropose, NONE);
        m.from = self.raft.id;
        m.entries = vec![e];
        self.raft.step(m)
    }

    /// Applies a committed membership change; call it when its entry is applied.
    pub fn apply_conf_change(&mut self, cc: &ConfChange) -> ConfState {
        self.raft.apply_conf_change(cc)
    }

    /// Asks for a linearizable read point. The answer arrives as a `ReadState` with the same
    /// `ctx` in a later Ready; serve the read once `index` is applied.
    pub fn read_index(&mut self, ctx: Bytes) -> Result<()> {
        let mut m = msg(MessageType::MsgReadIndex, NONE);
        m.from = self.raft.id;
        m.context = ctx;
        self.raft.step(m)
    }

    pub fn transfer_leader(&mut self, transferee: u64) {
        let mut m = msg(MessageType::MsgTransferLeader, self.raft.id);
        m.from = transferee;
        // A transfer to an unknown node is ignored by the leader.
        let _ = self.raft.step(m);
    }

    /// The transport could not reach `id`: the leader stops pipelining to it.
    pub fn report_unreachable(&mut self, id: u64) {
        let mut m = msg(MessageType::MsgUnreachable, self.raft.id);
        m.from = id;
        let _ = self.raft.step(m);
    }

    /// The result of sending a snapshot to `id`.
    pub fn report_snapshot(&mut self, id: u64, success: bool) {
        let mut m = msg(MessageType::MsgSnapStatus, self.raft.id);
        m.from = id;
        m.reject = !success;
        let _ = self.raft.step(m);
    }

    /// Feeds a message received from a peer. Malformed messages are refused with an error and
    /// change nothing.
    pub fn step(&mut self, m: Message) -> Result<()> {
        let t = m.msg_type();
        if matches!(
            t,
            MessageType::MsgInvalid
                | MessageType::MsgHup
                | MessageType::MsgBeat
                | MessageType::MsgCheckQuorum
                | MessageType::MsgUnreachable
                | MessageType::MsgSnapStatus
        ) {
            return Err(Error::StepLocalMsg(m.msg_type));
        }
        if m.to != self.raft.id || m.from == NONE || m.from == self.raft.id {
            return Err(Error::StepPeerNotFound {
                from: m.from,
                to: m.to,
            });
        }
        if is_response(t) && !self.raft.trk.is_member(m.from) {
            return Err(Error::StepPeerNotFound {
                from: m.from,
                to: m.to,
            });
        }
        validate(&m)?;
        self.raft.step(m)
    }

    pub fn has_ready(&self) -> bool {
        if self.in_flight.is_some() {
            return false;
        }
        let r = &self.raft;
        let hs = r.hard_state();
        r.soft_state() != self.prev_soft
            || (hs != self.prev_hard && hs != HardState::default())
            || !r.raft_log.unstable.next_entries().is_empty()
            || r.raft_log.unstable.next_snapshot().is_some()
            || !r.msgs.is_empty()
            || !r.msgs_after_append.is_empty()
            || r.raft_log.has_next_committed_entries()
            || !r.read_states.is_empty()
    }

    pub fn ready(&mut self) -> Ready {
        assert!(
            self.in_flight.is_none(),
            "ready() called again before advance() of Ready {}",
            self.in_flight.as_ref().map_or(0, |f| f.number)
        );
        let number = self.next_number;
        self.next_number += 1;
        let r = &mut self.raft;
        let entries = r.raft_log.unstable.next_entries().to_vec();
        let snapshot = r.raft_log.unstable.next_snapshot().cloned();
        r.raft_log.unstable.accept_in_progress();
        let committed_entries = r.raft_log.next_committed_entries();
        if let Some(e) = committed_entries.last() {
            r.raft_log.applying = e.index;
        }
        let soft = r.soft_state();
        let soft_state = (soft != self.prev_soft).then_some(soft);
        self.prev_soft = soft;
        let hs = r.hard_state();
        let must_sync = !entries.is_empty()
            || snapshot.is_some()
            || hs.term != self.prev_hard.term
            || hs.vote != self.prev_hard.vote;
        let hard_state = (hs != self.prev_hard).then_some(hs);
        self.prev_hard = hs;
        self.in_flight = Some(InFlight {
            number,
            last_entry: entries.last().map(|e| (e.index, e.term)),
            snapshot_index: snapshot
                .as_ref()
                .and_then(|s| s.metadata.as_ref().map(|m| m.index)),
            last_committed: committed_entries.last().map(|e| e.index),
            committed_bytes: committed_entries.iter().map(|e| e.data.len() as u64).sum(),
        });
        Ready {
            number,
            soft_state,
            hard_state,
            entries,
            snapshot,
            messages: std::mem::take(&mut r.msgs),
            persisted_messages: std::mem::take(&mut r.msgs_after_append),
            committed_entries,
            read_states: std::mem::take(&mut r.read_states),
            must_sync,
        }
    }

    /// The Ready numbered `number` was persisted and its committed entries applied.
    pub fn advance(&mut self, number: u64) {
        let f = self
            .in_flight
            .take()
            .expect("advance() without an outstanding Ready");
        assert_eq!(
            f.number, number,
            "advance({number}) but Ready {} is out",
            f.number
        );
        let r = &mut self.raft;
        if let Some(i) = f.snapshot_index {
            r.raft_log.stable_snap_to(i);
        }
        if let Some((i, t)) = f.last_entry {
            r.raft_log.stable_to(i, t);
        }
        if let Some(c) = f.last_committed {
            // A snapshot received while this Ready was out may already have moved `applied`
            // past these entries; the application replaces its state with the snapshot anyway.
            if c > r.raft_log.applied {
                r.raft_log.applied_to(c);
            }
            r.reduce_uncommitted_size(f.committed_bytes);
        }
        r.on_persisted();
    }

    pub fn status(&self) -> Status {
        let r = &self.raft;
        Status {
            id: r.id,
            hard_state: r.hard_state(),
            soft_state: r.soft_state(),
            applied: r.raft_log.applied,
            last_index: r.raft_log.last_index(),
            first_index: r.raft_log.first_index(),
            conf_state: r.trk.conf_state(),
            progress: if r.role == StateRole::Leader {
                r.trk.progress.clone()
            } else {
                BTreeMap::new()
            },
            lead_transferee: r.lead_transferee,
        }
    }
}

/// Structural checks on a peer's message, so that nothing a peer sends can break an invariant
/// of the log (entries out of order, terms from the future, overflowing indices).
fn validate(m: &Message) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::ConfigInvalid(format!(
            "malformed {:?}: {why}",
            m.msg_type()
        )))
    };
    if m.term >= MAX_SANE_INDEX
        || m.index >= MAX_SANE_INDEX
        || m.log_term >= MAX_SANE_INDEX
        || m.commit >= MAX_SANE_INDEX
        || m.reject_hint >= MAX_SANE_INDEX
        || m.reject_hint_term >= MAX_SANE_INDEX
    {
        return bad("index or term out of range");
    }
    // Term 0 marks a local message to `Raft::step`, which skips the term checks for it; from a
    // peer it would be taken as the current term (a candidate would "step down" to term 0).
    // Only forwarded proposals and reads travel without a term.
    if m.term == 0
        && !matches!(
            m.msg_type(),
            MessageType::MsgPropose | MessageType::MsgReadIndex
        )
    {
        return bad("no term");
    }
    match m.msg_type() {
        MessageType::MsgAppend => {
            let mut prev_term = m.log_term;
            if m.log_term > m.term {
                return bad("previous entry's term is above the message term");
            }
            for (i, e) in m.entries.iter().enumerate() {
                if e.index != m.index + 1 + i as u64 {
                    return bad("entries are not consecutive after the previous index");
                }
                if e.term == 0 || e.term < prev_term || e.term > m.term {
                    return bad("entry terms must not decrease nor exceed the message term");
                }
                prev_term = e.term;
            }
        }
        MessageType::MsgSnapshot => {
            let Some(meta) = m.snapshot.as_ref().and_then(|s| s.metadata.as_ref()) else {
                return bad("no snapshot metadata");
            };
            if meta.term > m.term
                || meta.term == 0
                || meta.index >= MAX_SANE_INDEX
                || meta.index == 0
            {
                return bad("snapshot index or term out of range");
            }
        }
        MessageType::MsgPropose if m.entries.iter().any(|e| e.index != 0 || e.term != 0) => {
            return bad("a proposal carries only payloads");
        }
        _ => {}
    }
    Ok(())
}
