//! A small in-memory test cluster and single-node helpers shared by the integration tests.
//!
//! Every Ready is handled the way a correct driver would: persist the snapshot, entries and hard
//! state to `MemStorage`, apply committed entries (membership changes included), then advance.
//! While doing so it checks the Ready contract itself, so that every test also checks it: a
//! response that acknowledges state never travels in `messages`, a granted vote is only sent
//! once the vote is durable, and committed entries are handed out in order without gaps.

#![allow(dead_code)] // Each test binary uses a different part of this module.

use bytes::Bytes;
use keel_raft::raftpb::{
    ConfChange, ConfChangeType, Entry, EntryType, HardState, Message, MessageType, Snapshot,
};
use keel_raft::{Config, MemStorage, RawNode, ReadState, StateRole, Storage};
use prost::Message as _;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

pub type Node = RawNode<MemStorage>;

/// Plain Raft as in the paper: no PreVote, no CheckQuorum, so §5 behaviour is observed alone.
pub fn raw_config(id: u64) -> Config {
    Config {
        election_tick: 10,
        heartbeat_tick: 1,
        pre_vote: false,
        check_quorum: false,
        ..Config::new(id)
    }
}

pub fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        ..Default::default()
    }
}

/// Entries `1..=terms.len()` with the given terms.
pub fn log_of(terms: &[u64]) -> Vec<Entry> {
    terms
        .iter()
        .enumerate()
        .map(|(i, &t)| entry(i as u64 + 1, t))
        .collect()
}

pub fn msg(t: MessageType, from: u64, to: u64, term: u64) -> Message {
    let mut m = Message {
        from,
        to,
        term,
        ..Default::default()
    };
    m.set_msg_type(t);
    m
}

pub fn append(from: u64, to: u64, term: u64, index: u64, log_term: u64, ents: &[Entry]) -> Message {
    let mut m = msg(MessageType::MsgAppend, from, to, term);
    m.index = index;
    m.log_term = log_term;
    m.entries = ents.to_vec();
    m
}

pub fn vote_req(from: u64, to: u64, term: u64, last_index: u64, last_term: u64) -> Message {
    let mut m = msg(MessageType::MsgRequestVote, from, to, term);
    m.index = last_index;
    m.log_term = last_term;
    m
}

pub fn conf_change(t: ConfChangeType, id: u64) -> ConfChange {
    let mut cc = ConfChange {
        node_id: id,
        ..Default::default()
    };
    cc.set_change_type(t);
    cc
}

/// A storage for a member of `voters` whose log holds `terms` (entries 1..) at hard-state `term`.
pub fn store_with_log(voters: &[u64], terms: &[u64], term: u64) -> MemStorage {
    let mut s = MemStorage::new_with_conf_state(voters.to_vec(), vec![]);
    s.append(&log_of(terms)).unwrap();
    s.set_hard_state(HardState {
        term,
        vote: 0,
        commit: 0,
    });
    s
}

pub fn new_node(cfg: &Config, store: MemStorage) -> Node {
    RawNode::new(cfg, store).unwrap()
}

/// `(index, term)` of every entry in the node's log, from the first kept to the last.
pub fn log_terms(n: &Node) -> Vec<(u64, u64)> {
    let l = &n.raft.raft_log;
    let (lo, hi) = (l.first_index(), l.last_index());
    l.slice(lo, hi + 1, u64::MAX)
        .unwrap()
        .iter()
        .map(|e| (e.index, e.term))
        .collect()
}

/// What a handled Ready contained, kept after it was persisted, applied and advanced.
#[derive(Debug, Default)]
pub struct Handled {
    pub hard_state: Option<HardState>,
    pub entries: Vec<Entry>,
    pub snapshot: Option<Snapshot>,
    pub messages: Vec<Message>,
    pub persisted_messages: Vec<Message>,
    pub committed_entries: Vec<Entry>,
    pub read_states: Vec<ReadState>,
    pub must_sync: bool,
}

impl Handled {
    /// Both message lists, in the order a driver would send them.
    pub fn all_messages(&self) -> Vec<Message> {
        self.messages
            .iter()
            .chain(self.persisted_messages.iter())
            .cloned()
            .collect()
    }
}

fn must_wait_for_persistence(t: MessageType) -> bool {
    matches!(
        t,
        MessageType::MsgAppendResponse
            | MessageType::MsgRequestVote
            | MessageType::MsgRequestVoteResponse
    )
}

/// Persists, checks, applies and advances one Ready, if there is one.
pub fn handle_ready(n: &mut Node) -> Option<Handled> {
    if !n.has_ready() {
        return None;
    }
    let rd = n.ready();
    for m in &rd.messages {
        assert!(
            !must_wait_for_persistence(m.msg_type()),
            "{:?} from {} must wait for persistence but is in Ready.messages",
            m.msg_type(),
            m.from
        );
    }
    if rd
        .hard_state
        .is_some_and(|hs| hs.term != n.store().hard_state.term)
        || !rd.entries.is_empty()
    {
        assert!(rd.must_sync, "new term or entries without must_sync");
    }
    if let Some(s) = rd.snapshot.clone() {
        n.store_mut().apply_snapshot(s).unwrap();
    }
    n.store_mut().append(&rd.entries).unwrap();
    if let Some(hs) = rd.hard_state {
        n.store_mut().set_hard_state(hs);
    }
    let durable = n.store().hard_state;
    let durable_last = n.store().last_index().unwrap();
    for m in &rd.persisted_messages {
        match m.msg_type() {
            MessageType::MsgRequestVoteResponse if !m.reject => assert!(
                durable.term > m.term || (durable.term == m.term && durable.vote == m.to),
                "vote for {} in term {} sent but durable hard state is {durable:?}",
                m.to,
                m.term
            ),
            MessageType::MsgRequestVote => assert!(
                durable.term > m.term || (durable.term == m.term && durable.vote == m.from),
                "vote request for term {} sent before the self-vote is durable ({durable:?})",
                m.term
            ),
            MessageType::MsgAppendResponse if !m.reject => assert!(
                durable_last >= m.index,
                "acknowledged index {} but only {durable_last} is durable",
                m.index
            ),
            _ => {}
        }
    }
    let mut expect = n.raft.raft_log.applied + 1;
    if let Some(s) = &rd.snapshot {
        expect = expect.max(s.metadata.as_ref().map_or(0, |m| m.index) + 1);
    }
    for e in &rd.committed_entries {
        assert_eq!(
            e.index, expect,
            "committed entries out of order or with a gap"
        );
        expect += 1;
        if e.entry_type() == EntryType::EntryConfChange && !e.data.is_empty() {
            let cc = ConfChange::decode(e.data.as_ref()).unwrap();
            n.apply_conf_change(&cc);
        }
    }
    let number = rd.number;
    let handled = Handled {
        hard_state: rd.hard_state,
        entries: rd.entries,
        snapshot: rd.snapshot,
        messages: rd.messages,
        persisted_messages: rd.persisted_messages,
        committed_entries: rd.committed_entries,
        read_states: rd.read_states,
        must_sync: rd.must_sync,
    };
    n.advance(number);
    Some(handled)
}

/// Handles Readies until there is none; returns every message they produced.
pub fn drain(n: &mut Node) -> Vec<Message> {
    let mut out = Vec::new();
    while let Some(h) = handle_ready(n) {
        out.extend(h.all_messages());
    }
    out
}

pub fn of_type(msgs: &[Message], t: MessageType) -> Vec<&Message> {
    msgs.iter().filter(|m| m.msg_type() == t).collect()
}

type DropRule = Box<dyn FnMut(&Message) -> bool>;

pub struct Cluster {
    pub nodes: BTreeMap<u64, Node>,
    /// Every committed entry each node applied, in order.
    pub applied: BTreeMap<u64, Vec<Entry>>,
    /// Snapshots each node installed (their index).
    pub snapshots: BTreeMap<u64, Vec<u64>>,
    pub reads: BTreeMap<u64, Vec<ReadState>>,
    pub net: VecDeque<Message>,
    /// Crashed-and-frozen nodes: no ticks, no Readies, their traffic is lost.
    pub down: BTreeSet<u64>,
    /// Cut links, `(from, to)`.
    pub cut: BTreeSet<(u64, u64)>,
    /// Messages for which this returns true are lost.
    pub drop_rule: Option<DropRule>,
    /// Every message delivered, for tests that look at the traffic.
    pub delivered: Vec<Message>,
}

impl Cluster {
    /// `n` voters with the default configuration (PreVote and CheckQuorum on).
    pub fn new(n: u64) -> Self {
        Self::with_config(n, |_| {})
    }

    /// `n` voters running plain Raft (`raw_config`).
    pub fn raw(n: u64) -> Self {
        Self::with_config(n, |c| {
            c.pre_vote = false;
            c.check_quorum = false;
        })
    }

    pub fn with_config(n: u64, f: impl Fn(&mut Config)) -> Self {
        let ids: Vec<u64> = (1..=n).collect();
        let mut c = Self::empty();
        for &id in &ids {
            let mut cfg = Config::new(id);
            f(&mut cfg);
            let s = MemStorage::new_with_conf_state(ids.clone(), vec![]);
            c.nodes.insert(id, new_node(&cfg, s));
        }
        c
    }

    /// A cluster of the given nodes, built by the caller (logs, configs and terms preset).
    pub fn from_nodes(nodes: Vec<(u64, Node)>) -> Self {
        let mut c = Self::empty();
        c.nodes.extend(nodes);
        c
    }

    fn empty() -> Self {
        Cluster {
            nodes: BTreeMap::new(),
            applied: BTreeMap::new(),
            snapshots: BTreeMap::new(),
            reads: BTreeMap::new(),
            net: VecDeque::new(),
            down: BTreeSet::new(),
            cut: BTreeSet::new(),
            drop_rule: None,
            delivered: Vec::new(),
        }
    }

    pub fn node(&self, id: u64) -> &Node {
        &self.nodes[&id]
    }

    pub fn node_mut(&mut self, id: u64) -> &mut Node {
        self.nodes.get_mut(&id).unwrap()
    }

    /// Handles one Ready of `id`, queueing its messages on the network.
    pub fn ready(&mut self, id: u64) -> Option<Handled> {
        if self.down.contains(&id) {
            return None;
        }
        let n = self.nodes.get_mut(&id).unwrap();
        let h = handle_ready(n)?;
        if let Some(s) = &h.snapshot {
            let idx = s.metadata.as_ref().map_or(0, |m| m.index);
            self.snapshots.entry(id).or_default().push(idx);
        }
        self.applied
            .entry(id)
            .or_default()
            .extend(h.committed_entries.iter().cloned());
        self.reads
            .entry(id)
            .or_default()
            .extend(h.read_states.iter().cloned());
        self.net.extend(h.all_messages());
        Some(h)
    }

    fn lost(&mut self, m: &Message) -> bool {
        if self.down.contains(&m.to)
            || self.down.contains(&m.from)
            || self.cut.contains(&(m.from, m.to))
            || !self.nodes.contains_key(&m.to)
        {
            return true;
        }
        self.drop_rule.as_mut().is_some_and(|f| f(m))
    }

    /// Delivers everything queued (not what the deliveries produce).
    pub fn deliver(&mut self) {
        let batch: Vec<Message> = self.net.drain(..).collect();
        for m in batch {
            if self.lost(&m) {
                continue;
            }
            self.delivered.push(m.clone());
            let _ = self.nodes.get_mut(&m.to).unwrap().step(m);
        }
    }

    /// Runs Readies and delivers messages until nothing moves.
    pub fn stabilize(&mut self) {
        for _ in 0..100_000 {
            let ids: Vec<u64> = self.nodes.keys().copied().collect();
            let mut moved = false;
            for id in ids {
                moved |= self.ready(id).is_some();
            }
            moved |= !self.net.is_empty();
            self.deliver();
            if !moved {
                return;
            }
        }
        panic!("cluster did not stabilize");
    }

    pub fn tick(&mut self, id: u64) {
        if !self.down.contains(&id) {
            self.node_mut(id).tick();
        }
    }

    /// `n` rounds of: tick every live node, then stabilize.
    pub fn tick_all(&mut self, n: usize) {
        for _ in 0..n {
            let ids: Vec<u64> = self.nodes.keys().copied().collect();
            for id in ids {
                self.tick(id);
            }
            self.stabilize();
        }
    }

    pub fn campaign(&mut self, id: u64) {
        self.node_mut(id).campaign().unwrap();
        self.stabilize();
    }

    /// Proposes through `id` and runs the cluster until it settles.
    pub fn propose(&mut self, id: u64, data: &'static [u8]) {
        self.node_mut(id).propose(Bytes::from_static(data)).unwrap();
        self.stabilize();
    }

    pub fn isolate(&mut self, id: u64) {
        let others: Vec<u64> = self.nodes.keys().copied().filter(|&o| o != id).collect();
        for o in others {
            self.cut.insert((id, o));
            self.cut.insert((o, id));
        }
    }

    pub fn heal(&mut self) {
        self.cut.clear();
        self.down.clear();
    }

    pub fn leader(&self) -> Option<u64> {
        self.leaders().first().map(|&(id, _)| id)
    }

    /// Live nodes that believe they lead, with their terms.
    pub fn leaders(&self) -> Vec<(u64, u64)> {
        self.nodes
            .iter()
            .filter(|(id, n)| !self.down.contains(id) && n.raft.role == StateRole::Leader)
            .map(|(&id, n)| (id, n.raft.term))
            .collect()
    }

    /// The non-empty payloads `id` applied, in order.
    pub fn applied_data(&self, id: u64) -> Vec<Bytes> {
        self.applied
            .get(&id)
            .map(|es| {
                es.iter()
                    .filter(|e| e.entry_type() == EntryType::EntryNormal && !e.data.is_empty())
                    .map(|e| e.data.clone())
                    .collect()
            })
            .unwrap_or_default()
    }
}
