//! One seeded run: N Raft nodes with a replicated KV, a simulated network and disk, clients,
//! faults, and the safety checks that run as the cluster evolves.
//!
//! Time is an integer; a Raft tick is `TICK` units. Events (ticks, message deliveries, disk
//! completions, client actions) sit in a priority queue ordered by (time, sequence number), so a
//! run is a pure function of its options.

use crate::check::Checker;
use crate::linearizability::{CheckResult, History, Op, OpId, Output};
use crate::rng::Rng;
use crate::Fnv;
use bytes::Bytes;
use keel_kv::{
    Compare, CompareResult, CompareTarget, Event, Op as KvOp, PutRequest, RangeRequest, RequestOp,
    Response, TxnRequest,
};
use keel_node::{NodeConfig, NodeCore, Outcome, WatchFeed};
use keel_raft::raftpb::ConfState;
use keel_raft::raftpb::{ConfChange, ConfChangeType, Message};
use keel_raft::storage::snapshot_position;
use keel_raft::{Config, RawNode, StateRole};
use keel_wal::{FaultError, MemFs, StorageOptions, WalOptions, WalStorage};
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::path::Path;
use std::sync::Arc;

/// Simulated time units per Raft tick.
pub const TICK: u64 = 100;
/// Election timeout in ticks (randomized up to twice that).
const ELECTION_TICK: usize = 10;
/// A client gives up on a request after this long; its outcome is then unknown.
const CLIENT_TIMEOUT: u64 = 40 * TICK;
/// Entries kept behind a snapshot so that slightly lagging followers catch up from the log.
const COMPACTION_MARGIN: u64 = 20;
/// Where each node's data dir lives on its own simulated file system.
const DATA_DIR: &str = "/keel";
/// The simulated cluster's id (written in every WAL segment header).
const CLUSTER_ID: u64 = 0x5EED;

#[derive(Debug, Clone)]
pub struct Options {
    pub seed: u64,
    pub nodes: usize,
    /// Ticks of the faulty phase; then faults heal and liveness is checked.
    pub ticks: u64,
    pub clients: usize,
    /// Few keys mean many operations per key: more contention for the checker to judge.
    pub keys: u64,
    pub faults: bool,
    pub membership: bool,
    /// A node snapshots and compacts after this many applied entries (0 = never).
    pub snapshot_every: u64,
    /// Ticks allowed after healing for a leader to emerge and every client to complete an op.
    pub liveness_ticks: u64,
    /// Bytes of entries per append. One entry per message (a tiny limit) lets a new leader's
    /// old-term entries reach followers without its own-term entries, which the Figure 8
    /// scenario needs.
    pub max_size_per_msg: u64,
    /// Multiplies every fault probability: above 1 for more churn (rarer interleavings).
    pub fault_rate: f64,
    /// Every node's disk acknowledges syncs without persisting (a lying write cache): a fault
    /// Raft cannot survive, used to show that the durability checks catch lost writes.
    pub lying_disks: bool,
    pub trace: bool,
    #[cfg(feature = "bug-injection")]
    pub bugs: keel_raft::InjectedBugs,
    #[cfg(feature = "bug-injection")]
    pub node_bugs: keel_node::InjectedBugs,
}

impl Options {
    pub fn new(seed: u64, nodes: usize) -> Self {
        Options {
            seed,
            nodes,
            ticks: 300,
            clients: 4,
            keys: 3,
            faults: true,
            membership: true,
            snapshot_every: 40,
            liveness_ticks: 300,
            max_size_per_msg: if seed.is_multiple_of(4) { 1 } else { 4096 },
            fault_rate: 1.0,
            lying_disks: false,
            trace: false,
            #[cfg(feature = "bug-injection")]
            bugs: Default::default(),
            #[cfg(feature = "bug-injection")]
            node_bugs: Default::default(),
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub msgs_sent: u64,
    pub msgs_dropped: u64,
    pub msgs_duplicated: u64,
    pub msgs_delayed: u64,
    pub crashes: u64,
    pub torn_writes: u64,
    pub restarts: u64,
    pub partitions: u64,
    pub one_way_partitions: u64,
    pub pauses: u64,
    pub slow_disks: u64,
    pub slow_clocks: u64,
    pub conf_changes: u64,
    pub snapshots_taken: u64,
    pub snapshots_installed: u64,
    pub leader_changes: u64,
    pub ops_ok: u64,
    pub ops_failed: u64,
    /// Ops in flight when the run ended or given up on (unknown outcome).
    pub ops_unknown: u64,
    /// Ops a client gave up on after `CLIENT_TIMEOUT`.
    pub client_timeouts: u64,
    /// Injected disk faults (ENOSPC or EIO on a sync) that made a node stop.
    pub disk_faults: u64,
    /// Restarts whose WAL recovery cut a torn tail.
    pub torn_tails_cut: u64,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        macro_rules! sum { ($($f:ident),*) => { $( self.$f += o.$f; )* } }
        sum!(
            msgs_sent,
            msgs_dropped,
            msgs_duplicated,
            msgs_delayed,
            crashes,
            torn_writes,
            restarts,
            partitions,
            one_way_partitions,
            pauses,
            slow_disks,
            slow_clocks,
            conf_changes,
            snapshots_taken,
            snapshots_installed,
            leader_changes,
            ops_ok,
            ops_failed,
            ops_unknown,
            client_timeouts,
            disk_faults,
            torn_tails_cut
        );
    }
}

#[derive(Debug)]
pub struct Report {
    pub seed: u64,
    /// Hash of every event processed, in order: equal hashes mean an identical run.
    pub trace_hash: u64,
    pub violations: Vec<String>,
    pub linearizability: CheckResult,
    pub stats: Stats,
    pub history_len: usize,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.violations.is_empty() && self.linearizability.is_ok()
    }
}

#[derive(Debug)]
enum Ev {
    Tick,
    // Boxed: a Message is large and most queued events are small.
    Deliver(Box<Message>),
    DiskDone {
        node: u64,
        incarnation: u64,
    },
    Client(usize),
    ClientTimeout {
        client: usize,
        op: OpId,
    },
    /// The transport's report to a leader on a snapshot it streamed.
    SnapStatus {
        leader: u64,
        to: u64,
        ok: bool,
    },
}

struct Queued {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        // BinaryHeap is a max-heap: reverse so the earliest event comes out first.
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

struct Node {
    id: u64,
    /// None while crashed. The production node code: Raft, the real WAL on `fs`, the real
    /// state machine.
    core: Option<NodeCore<WalStorage>>,
    /// The node's disk: keeps exactly what was synced across a crash, plus whatever torn
    /// prefix of unsynced writes `crash_with` lets survive.
    fs: MemFs,
    /// A disk fault was injected: the node's next WAL error is expected, and stops the node.
    disk_fault_armed: bool,
    /// Bumped at each crash so disk completions of a previous life are ignored.
    incarnation: u64,
    /// A Ready is out and its write is being synced.
    write_pending: bool,
    paused: bool,
    /// Messages and disk completions that arrived while paused, replayed on resume.
    paused_inbox: Vec<Message>,
    paused_disk: bool,
    slow_disk: bool,
    /// Ticks only one time in three: a node whose clock (or scheduling) lags, so its timeouts,
    /// CheckQuorum included, fire late compared with everyone else's.
    slow_clock: bool,
    /// Requests taken here and not answered yet: NodeCore token -> client operation.
    tokens: HashMap<u64, OpId>,
    /// Commit index up to which entries were reported to the checker as committed.
    last_commit_checked: u64,
    /// The store revision the node's watch feed has reached: the next feed must go on from it.
    watch_rev: i64,
}

struct Client {
    id: u64,
    seq: u64,
    /// The op in flight and the node it went to.
    pending: Option<(OpId, u64)>,
    /// Ops completed after the faults healed (liveness).
    done_after_heal: u64,
}

pub struct Sim {
    opts: Options,
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Queued>,
    nodes: BTreeMap<u64, Node>,
    clients: Vec<Client>,
    history: History,
    /// Directed links that drop everything.
    cut: BTreeSet<(u64, u64)>,
    net_faults: bool,
    healed_at: Option<u64>,
    trace: Fnv,
    pub stats: Stats,
    checker: Checker,
    /// The events of every revision, as the first node to apply it published them: every other
    /// node's watch feed must carry the same.
    events_at: BTreeMap<i64, Vec<Event>>,
}

impl Sim {
    pub fn new(opts: Options) -> Self {
        let mut rng = Rng::new(opts.seed);
        let ids: Vec<u64> = (1..=opts.nodes as u64).collect();
        let mut nodes = BTreeMap::new();
        for &id in &ids {
            let fs = MemFs::new();
            let store = WalStorage::bootstrap(
                Arc::new(fs.clone()),
                Path::new(DATA_DIR),
                storage_options(id),
                ConfState {
                    voters: ids.clone(),
                    learners: vec![],
                },
            )
            .expect("bootstrap a data dir on an empty MemFs");
            fs.set_lying_sync(opts.lying_disks);
            let core = NodeCore::new(node_config(&opts, id, 0, rng.next_u64()), store)
                .expect("a fresh data dir opens");
            let n = Node {
                id,
                core: Some(core),
                fs,
                disk_fault_armed: false,
                incarnation: 0,
                write_pending: false,
                paused: false,
                paused_inbox: Vec::new(),
                paused_disk: false,
                slow_disk: false,
                slow_clock: false,
                tokens: HashMap::new(),
                last_commit_checked: 0,
                watch_rev: 1,
            };
            nodes.insert(id, n);
        }
        let clients = (0..opts.clients)
            .map(|i| Client {
                id: i as u64 + 1,
                seq: 0,
                pending: None,
                done_after_heal: 0,
            })
            .collect();
        let mut sim = Sim {
            net_faults: opts.faults,
            opts,
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes,
            clients,
            history: History::new(),
            cut: BTreeSet::new(),
            healed_at: None,
            trace: Fnv::default(),
            stats: Stats::default(),
            checker: Checker::default(),
            events_at: BTreeMap::new(),
        };
        sim.schedule(TICK, Ev::Tick);
        for c in 0..sim.clients.len() {
            let d = sim.rng.range(1, 5 * TICK);
            sim.schedule(d, Ev::Client(c));
        }
        sim
    }

    fn schedule(&mut self, after: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Queued {
            at: self.now + after,
            seq: self.seq,
            ev,
        });
    }

    fn log(&self, s: impl FnOnce() -> String) {
        if self.opts.trace {
            println!("[{:>7}] {}", self.now, s());
        }
    }

    /// Runs the whole scenario and checks the history.
    pub fn run(mut self) -> Report {
        let fault_end = self.opts.ticks * TICK;
        let live_end = fault_end + self.opts.liveness_ticks * TICK;
        while let Some(q) = self.queue.pop() {
            self.now = q.at;
            if self.healed_at.is_none() && self.now >= fault_end {
                self.heal_all();
            }
            if self.now > live_end {
                break;
            }
            self.trace.write_u64(q.at);
            self.handle(q.ev);
            if !self.checker.violations.is_empty() {
                break;
            }
            if self.healed_at.is_some() && self.live_and_converged() {
                break;
            }
        }
        if self.checker.violations.is_empty() && !self.live_and_converged() {
            let leader = self.leader();
            let mut nodes = String::new();
            for n in self.nodes.values() {
                match n.core.as_ref() {
                    Some(c) => nodes.push_str(&format!(
                        "\n    node {}: {} term {} leader {} commit {} applied {} last {} \
                         conf {:?}/{:?} paused {} write pending {}",
                        n.id,
                        c.raw().raft.role,
                        c.raw().raft.term,
                        c.raw().raft.leader_id,
                        c.raw().raft.raft_log.committed,
                        c.applied(),
                        c.raw().raft.raft_log.last_index(),
                        c.raw().raft.trk.conf_state().voters,
                        c.raw().raft.trk.conf_state().learners,
                        n.paused,
                        n.write_pending
                    )),
                    None => nodes.push_str(&format!("\n    node {}: down", n.id)),
                }
            }
            let clients: Vec<String> = self
                .clients
                .iter()
                .map(|c| format!("{} done, pending {:?}", c.done_after_heal, c.pending))
                .collect();
            self.checker.violations.push(format!(
                "liveness: {} ticks after healing, leader {leader:?}, clients {clients:?}{nodes}",
                self.opts.liveness_ticks
            ));
        }
        for r in self.history.records() {
            if matches!(r.status, crate::linearizability::Status::Pending) {
                self.stats.ops_unknown += 1;
            }
        }
        let linearizability = self.history.check();
        Report {
            seed: self.opts.seed,
            trace_hash: self.trace.finish(),
            violations: std::mem::take(&mut self.checker.violations),
            linearizability,
            stats: self.stats.clone(),
            history_len: self.history.len(),
        }
    }

    /// Processes the next event; false when nothing is left. For directed scenarios that
    /// interleave their own actions with the cluster's (see `tests/figure8.rs`).
    pub fn step_event(&mut self) -> bool {
        let Some(q) = self.queue.pop() else {
            return false;
        };
        self.now = q.at;
        self.trace.write_u64(q.at);
        self.handle(q.ev);
        true
    }

    pub fn now(&self) -> u64 {
        self.now
    }

    pub fn violations(&self) -> &[String] {
        &self.checker.violations
    }

    fn raw(&self, id: u64) -> Option<&RawNode<WalStorage>> {
        self.nodes
            .get(&id)
            .and_then(|n| n.core.as_ref())
            .map(|c| c.raw())
    }

    pub fn role(&self, id: u64) -> Option<StateRole> {
        self.raw(id).map(|r| r.raft.role)
    }

    pub fn term(&self, id: u64) -> u64 {
        self.raw(id).map_or(0, |r| r.raft.term)
    }

    pub fn last_index(&self, id: u64) -> u64 {
        self.raw(id).map_or(0, |r| r.raft.raft_log.last_index())
    }

    pub fn committed(&self, id: u64) -> u64 {
        self.raw(id).map_or(0, |r| r.raft.raft_log.committed)
    }

    /// The term of `id`'s entry at `index`, if it has one.
    pub fn log_term(&self, id: u64, index: u64) -> Option<u64> {
        self.raw(id).and_then(|r| r.raft.raft_log.term(index).ok())
    }

    /// Cuts every link between different groups (and heals any other cut).
    pub fn partition(&mut self, groups: &[&[u64]]) {
        self.cut.clear();
        for (i, a) in groups.iter().enumerate() {
            for (j, b) in groups.iter().enumerate() {
                if i != j {
                    for &x in *a {
                        for &y in *b {
                            self.cut.insert((x, y));
                        }
                    }
                }
            }
        }
        self.log(|| format!("partition {groups:?}"));
    }

    pub fn heal_network(&mut self) {
        self.cut.clear();
    }

    pub fn campaign(&mut self, id: u64) {
        if let Some(core) = self.nodes.get_mut(&id).and_then(|n| n.core.as_mut()) {
            let _ = core.campaign();
            self.drive(id);
        }
    }

    /// Proposes a put straight to `id` (no client waits for it). False if refused.
    pub fn propose_put(&mut self, id: u64, key: u64, value: u64) -> bool {
        let Some(core) = self.nodes.get_mut(&id).and_then(|n| n.core.as_mut()) else {
            return false;
        };
        // Tokens with the top bit set are never a client operation's.
        let ok = core.propose(1 << 63 | value, put_op(key, value)).is_ok();
        self.drive(id);
        ok
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Tick => {
                self.trace.write_u64(1);
                self.tick();
                self.schedule(TICK, Ev::Tick);
            }
            Ev::Deliver(m) => {
                self.trace.write_u64(2);
                self.trace.write_u64(m.to);
                self.trace.write_u64(m.from);
                self.trace.write_u64(m.msg_type as u64);
                self.trace.write_u64(m.term);
                self.trace.write_u64(m.index);
                self.deliver(*m);
            }
            Ev::DiskDone { node, incarnation } => {
                self.trace.write_u64(3);
                self.trace.write_u64(node);
                let n = self.nodes.get_mut(&node).expect("node exists");
                if n.incarnation != incarnation || n.core.is_none() {
                    return;
                }
                if n.paused {
                    n.paused_disk = true;
                    return;
                }
                self.complete_write(node);
                self.drive(node);
            }
            Ev::Client(c) => {
                self.trace.write_u64(4);
                self.client_act(c);
            }
            Ev::ClientTimeout { client, op } => {
                self.trace.write_u64(5);
                self.client_timeout(client, op);
            }
            Ev::SnapStatus { leader, to, ok } => {
                self.trace.write_u64(6);
                let n = self.nodes.get_mut(&leader).expect("node exists");
                if n.paused {
                    return;
                }
                if let Some(core) = n.core.as_mut() {
                    core.report_snapshot(to, ok);
                    self.drive(leader);
                }
            }
        }
    }

    fn tick(&mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            let skip = self.nodes[&id].slow_clock && self.rng.range(0, 2) != 0;
            let n = self.nodes.get_mut(&id).unwrap();
            if n.paused || skip {
                continue;
            }
            if let Some(core) = n.core.as_mut() {
                core.tick();
                self.drive(id);
            }
        }
        if self.healed_at.is_none() && self.opts.faults {
            self.inject_faults();
        }
    }

    fn inject_faults(&mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        let f = self.opts.fault_rate;
        let r = &mut self.rng;
        // Per-tick probabilities: each kind of fault strikes every few dozen ticks, so a run of
        // a few hundred ticks sees several, overlapping.
        if r.chance(f * 0.02) {
            let victim = *r.pick(&ids).unwrap();
            self.crash(victim);
        }
        let down: Vec<u64> = self
            .nodes
            .values()
            .filter(|n| n.core.is_none())
            .map(|n| n.id)
            .collect();
        if !down.is_empty() && self.rng.chance(f * 0.08) {
            let id = *self.rng.pick(&down).unwrap();
            self.restart(id);
        }
        if self.rng.chance(f * 0.015) {
            // Symmetric partition: a random side is cut off from the rest.
            self.cut.clear();
            let side: Vec<u64> = ids
                .iter()
                .copied()
                .filter(|_| self.rng.chance(0.4))
                .collect();
            for &a in &side {
                for &b in &ids {
                    if !side.contains(&b) {
                        self.cut.insert((a, b));
                        self.cut.insert((b, a));
                    }
                }
            }
            self.stats.partitions += 1;
            self.log(|| format!("partition {side:?} from the rest"));
        }
        if self.rng.chance(f * 0.01) {
            let a = *self.rng.pick(&ids).unwrap();
            let b = *self.rng.pick(&ids).unwrap();
            if a != b {
                self.cut.insert((a, b));
                self.stats.one_way_partitions += 1;
                self.log(|| format!("one-way cut {a}->{b}"));
            }
        }
        if !self.cut.is_empty() && self.rng.chance(f * 0.04) {
            self.cut.clear();
            self.log(|| "network healed".into());
        }
        if self.rng.chance(f * 0.01) {
            let id = *self.rng.pick(&ids).unwrap();
            let n = self.nodes.get_mut(&id).unwrap();
            if n.core.is_some() && !n.paused {
                n.paused = true;
                self.stats.pauses += 1;
                self.log(|| format!("pause {id}"));
            }
        }
        let paused: Vec<u64> = self
            .nodes
            .values()
            .filter(|n| n.paused)
            .map(|n| n.id)
            .collect();
        if !paused.is_empty() && self.rng.chance(f * 0.1) {
            let id = *self.rng.pick(&paused).unwrap();
            self.resume(id);
        }
        if self.rng.chance(f * 0.01) {
            let id = *self.rng.pick(&ids).unwrap();
            let n = self.nodes.get_mut(&id).unwrap();
            n.slow_disk = !n.slow_disk;
            self.stats.slow_disks += 1;
        }
        if self.rng.chance(f * 0.01) {
            let id = *self.rng.pick(&ids).unwrap();
            let n = self.nodes.get_mut(&id).unwrap();
            n.slow_clock = !n.slow_clock;
            self.stats.slow_clocks += 1;
        }
        // Nemeses aimed at the leader: they leave uncommitted tails on a minority and force
        // elections among divergent logs, the interleavings behind Figure 8 and stale reads.
        if self.rng.chance(f * 0.015) {
            if let Some(l) = self.leader() {
                self.isolate(l);
            }
        }
        if self.rng.chance(f * 0.008) {
            if let Some(l) = self.leader() {
                self.crash(l);
            }
        }
        if self.rng.chance(f * 0.004) {
            let id = *self.rng.pick(&ids).unwrap();
            let after = self.rng.range(0, 3);
            let err = if self.rng.chance(0.5) {
                FaultError::NoSpace
            } else {
                FaultError::Io
            };
            let n = self.nodes.get_mut(&id).unwrap();
            if n.core.is_some() && !n.disk_fault_armed {
                n.fs.fail_sync_after(after, err);
                n.disk_fault_armed = true;
                self.stats.disk_faults += 1;
                self.log(|| format!("disk of {id} fails after {after} syncs with {err:?}"));
            }
        }
        if self.opts.membership && self.rng.chance(f * 0.02) {
            self.change_membership();
        }
    }

    /// A WAL error stops the node (fail-stop: after a failed fsync nothing on disk can be
    /// trusted until recovery re-reads it). Expected only after an injected disk fault.
    fn disk_failure(&mut self, id: u64, e: impl std::fmt::Display) {
        if !self.nodes[&id].disk_fault_armed {
            self.checker.violations.push(format!(
                "storage: node {id} failed without an injected fault: {e}"
            ));
        }
        self.log(|| format!("{id} stops on a disk error: {e}"));
        self.crash(id);
    }

    /// Cuts `id` off from every other node (and heals any other partition).
    pub fn isolate(&mut self, id: u64) {
        self.cut.clear();
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for b in ids {
            if b != id {
                self.cut.insert((id, b));
                self.cut.insert((b, id));
            }
        }
        self.stats.partitions += 1;
        self.log(|| format!("isolate {id}"));
    }

    fn heal_all(&mut self) {
        self.healed_at = Some(self.now);
        self.log(|| "healing everything".into());
        self.cut.clear();
        self.net_faults = false;
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            let n = self.nodes.get_mut(&id).unwrap();
            n.slow_disk = false;
            n.slow_clock = false;
            n.fs.clear_faults();
            n.disk_fault_armed = false;
            if n.paused {
                self.resume(id);
            }
            if self.nodes[&id].core.is_none() {
                self.restart(id);
            }
        }
    }

    fn crash(&mut self, id: u64) {
        let n = self.nodes.get_mut(&id).unwrap();
        if n.core.is_none() {
            return;
        }
        self.stats.crashes += 1;
        if std::mem::take(&mut n.write_pending) {
            self.stats.torn_writes += 1;
        }
        // The disk keeps what was synced; of each file's unsynced writes a random prefix
        // survives, torn at a random byte.
        let rng = &mut self.rng;
        n.fs.crash_with(&mut |k| rng.range(0, k));
        n.fs.clear_faults();
        n.disk_fault_armed = false;
        n.core = None;
        n.incarnation += 1;
        n.paused = false;
        n.paused_inbox.clear();
        n.paused_disk = false;
        // Requests in flight here are lost with the process; their clients time out.
        n.tokens.clear();
        self.log(|| format!("crash {id}"));
    }

    fn restart(&mut self, id: u64) {
        let seed = self.rng.next_u64();
        let n = self.nodes.get_mut(&id).unwrap();
        if n.core.is_some() {
            return;
        }
        self.stats.restarts += 1;
        let opened = WalStorage::open_with_report(
            Arc::new(n.fs.clone()),
            Path::new(DATA_DIR),
            storage_options(id),
        );
        let store = match opened {
            Ok((store, report)) => {
                if report.torn_tail.is_some() {
                    self.stats.torn_tails_cut += 1;
                }
                store
            }
            Err(e) => {
                // Only unsynced writes were lost or torn: recovery must always succeed.
                self.checker
                    .violations
                    .push(format!("recovery: node {id} refused to restart: {e}"));
                return;
            }
        };
        self.checker.on_durable_reload(id, *store.hard_state());
        let incarnation = n.incarnation;
        let core = match NodeCore::new(node_config(&self.opts, id, incarnation, seed), store) {
            Ok(core) => core,
            Err(e) => {
                self.checker
                    .violations
                    .push(format!("recovery: node {id} could not start: {e}"));
                return;
            }
        };
        let snap_index = core.last_snapshot();
        n.watch_rev = core.kv().revision();
        n.core = Some(core);
        self.log(|| format!("restart {id} from snapshot {snap_index}"));
        // Committed entries after the snapshot are re-applied through Ready.
        self.drive(id);
    }

    fn resume(&mut self, id: u64) {
        let n = self.nodes.get_mut(&id).unwrap();
        n.paused = false;
        let inbox = std::mem::take(&mut n.paused_inbox);
        let disk = std::mem::take(&mut n.paused_disk);
        self.log(|| format!("resume {id} with {} queued messages", inbox.len()));
        if disk {
            self.complete_write(id);
        }
        for m in inbox {
            self.step(id, m);
        }
        self.drive(id);
    }

    fn change_membership(&mut self) {
        let Some(leader) = self.leader() else { return };
        let cs = self.nodes[&leader]
            .core
            .as_ref()
            .unwrap()
            .raw()
            .raft
            .trk
            .conf_state();
        let all: Vec<u64> = self.nodes.keys().copied().collect();
        let outside: Vec<u64> = all
            .iter()
            .copied()
            .filter(|id| !cs.voters.contains(id) && !cs.learners.contains(id))
            .collect();
        let cc = if let Some(&l) = cs.learners.first() {
            ConfChange {
                change_type: ConfChangeType::AddNode as i32,
                node_id: l,
                ..Default::default()
            }
        } else if let (Some(&o), true) = (outside.first(), self.rng.chance(0.7)) {
            ConfChange {
                change_type: ConfChangeType::AddLearnerNode as i32,
                node_id: o,
                ..Default::default()
            }
        } else if cs.voters.len() > 3 {
            let v = *self.rng.pick(&cs.voters).unwrap();
            ConfChange {
                change_type: ConfChangeType::RemoveNode as i32,
                node_id: v,
                ..Default::default()
            }
        } else {
            return;
        };
        let core = self.nodes.get_mut(&leader).unwrap().core.as_mut().unwrap();
        if core.propose_conf_change(1 << 63, cc.clone()).is_ok() {
            self.stats.conf_changes += 1;
            self.log(|| format!("propose {:?} {}", cc.change_type(), cc.node_id));
        }
        self.drive(leader);
    }

    pub fn leader(&self) -> Option<u64> {
        // The live leader with the highest term: a deposed one may not know yet.
        self.nodes
            .values()
            .filter(|n| !n.paused)
            .filter_map(|n| n.core.as_ref().map(|c| (n.id, c.raw())))
            .filter(|(_, r)| r.raft.role == StateRole::Leader)
            .max_by_key(|(_, r)| r.raft.term)
            .map(|(id, _)| id)
    }

    fn send(&mut self, m: Message) {
        self.stats.msgs_sent += 1;
        let is_snap = m.msg_type() == keel_raft::raftpb::MessageType::MsgSnapshot;
        let (from, to) = (m.from, m.to);
        if self.cut.contains(&(m.from, m.to)) {
            self.stats.msgs_dropped += 1;
            if is_snap {
                // The stream fails; the leader hears about it when its connection times out.
                self.schedule(
                    TICK,
                    Ev::SnapStatus {
                        leader: from,
                        to,
                        ok: false,
                    },
                );
            }
            return;
        }
        if is_snap {
            // Snapshots go over their own stream: not dropped, duplicated or reordered, but the
            // receiver may be down, in which case the stream fails.
            let delay = self.rng.range(10, TICK);
            let ok = self.nodes.get(&to).is_some_and(|n| n.core.is_some());
            self.schedule(delay, Ev::Deliver(Box::new(m)));
            self.schedule(
                delay + 1,
                Ev::SnapStatus {
                    leader: from,
                    to,
                    ok,
                },
            );
            return;
        }
        let mut delay = self.rng.range(1, 20);
        if self.net_faults {
            let f = self.opts.fault_rate;
            if self.rng.chance(f * 0.03) {
                self.stats.msgs_dropped += 1;
                return;
            }
            if self.rng.chance(f * 0.05) {
                // Delayed long enough to be reordered behind later messages.
                delay += self.rng.range(20, 3 * TICK);
                self.stats.msgs_delayed += 1;
            }
            if self.rng.chance(f * 0.02) {
                self.stats.msgs_duplicated += 1;
                let d2 = self.rng.range(1, 2 * TICK);
                self.schedule(d2, Ev::Deliver(Box::new(m.clone())));
            }
        }
        self.schedule(delay, Ev::Deliver(Box::new(m)));
    }

    fn deliver(&mut self, m: Message) {
        if self.cut.contains(&(m.from, m.to)) {
            // A partition that starts while a packet is in flight drops it too.
            self.stats.msgs_dropped += 1;
            return;
        }
        let to = m.to;
        let Some(n) = self.nodes.get_mut(&to) else {
            return;
        };
        if n.core.is_none() {
            return;
        }
        if n.paused {
            n.paused_inbox.push(m);
            return;
        }
        self.step(to, m);
        self.drive(to);
    }

    fn step(&mut self, id: u64, m: Message) {
        let n = self.nodes.get_mut(&id).unwrap();
        if let Some(core) = n.core.as_mut() {
            // Errors are expected (messages from removed nodes, stale responses).
            let _ = core.step(m);
        }
    }

    /// Takes Readies while the disk is free.
    fn drive(&mut self, id: u64) {
        loop {
            let n = self.nodes.get_mut(&id).unwrap();
            if n.paused || n.write_pending {
                return;
            }
            let Some(core) = n.core.as_mut() else { return };
            let out = match core.ready() {
                Ok(Some(out)) => out,
                Ok(None) => {
                    self.handle_outcomes(id);
                    return;
                }
                Err(e) => {
                    self.disk_failure(id, e);
                    return;
                }
            };
            n.write_pending = true;
            // Before the messages go out: a new leader may be isolated the moment it wins.
            self.handle_outcomes(id);
            let core = self.nodes[&id].core.as_ref().unwrap();
            self.checker
                .on_entries(id, core.raw(), core.pending_entries());
            for m in out.messages {
                self.send(m);
            }
            let n = self.nodes.get_mut(&id).unwrap();
            if !out.must_sync {
                self.complete_write(id);
                continue;
            }
            let latency = if n.slow_disk {
                self.rng.range(TICK, 4 * TICK)
            } else {
                self.rng.range(1, 10)
            };
            let incarnation = n.incarnation;
            self.schedule(
                latency,
                Ev::DiskDone {
                    node: id,
                    incarnation,
                },
            );
            return;
        }
    }

    /// The Ready's write is durable: send what waited for it, apply, answer.
    fn complete_write(&mut self, id: u64) {
        let n = self.nodes.get_mut(&id).unwrap();
        if !std::mem::take(&mut n.write_pending) {
            return;
        }
        let core = n.core.as_mut().unwrap();
        let hs = core.pending_hard_state();
        let installed = core.pending_snapshot().map(|s| snapshot_position(s).0);
        let persisted = match core.persist() {
            Ok(msgs) => msgs,
            Err(e) => {
                self.disk_failure(id, e);
                return;
            }
        };
        let core = self.nodes[&id].core.as_ref().unwrap();
        self.checker
            .on_durable(id, *core.raw().store().hard_state());
        if let Some(hs) = hs {
            let n = &self.nodes[&id];
            let known = core.applied().max(n.last_commit_checked);
            if hs.commit > known {
                self.checker.on_commit(id, core.raw(), known + 1, hs.commit);
                self.nodes.get_mut(&id).unwrap().last_commit_checked = hs.commit;
            }
        }
        for m in persisted {
            self.send(m);
        }
        let core = self.nodes[&id].core.as_ref().unwrap();
        let term = core.raw().raft.term;
        for e in core.pending_committed() {
            self.checker.on_apply(id, term, e);
        }
        if let Some(idx) = installed {
            self.stats.snapshots_installed += 1;
            self.log(|| format!("{id} installed snapshot at {idx}"));
        }
        let core = self.nodes.get_mut(&id).unwrap().core.as_mut().unwrap();
        let before = core.last_snapshot();
        if let Err(e) = core.apply() {
            self.disk_failure(id, e);
            return;
        }
        if installed.is_none() && core.last_snapshot() > before {
            self.stats.snapshots_taken += 1;
        }
        let feed = core.take_watch_feed();
        self.check_watch_feed(id, feed);
        self.handle_outcomes(id);
    }

    /// What watchers on a node are built on: its feed goes on from the revision the last one
    /// reached (unless a snapshot reset it), covers every revision once, in order, and carries
    /// the same events for a revision as every other node's.
    fn check_watch_feed(&mut self, id: u64, feed: WatchFeed) {
        let n = self.nodes.get_mut(&id).unwrap();
        let mut prev = (!feed.reset).then_some(n.watch_rev);
        let mut at_start = true;
        let mut by_rev: BTreeMap<i64, Vec<Event>> = BTreeMap::new();
        let mut bad = None;
        for e in &feed.events {
            let r = e.kv.mod_revision;
            let ok = match prev {
                None => true,
                Some(p) if at_start => r == p + 1,
                Some(p) => r == p || r == p + 1,
            };
            if !ok && bad.is_none() {
                bad = Some(format!(
                    "watch feed: node {id} went from revision {prev:?} to {r}"
                ));
            }
            prev = Some(r);
            at_start = false;
            by_rev.entry(r).or_default().push(e.clone());
        }
        let end_ok = match prev {
            Some(p) if !feed.events.is_empty() => p == feed.revision,
            Some(p) => p == feed.revision,
            None => true,
        };
        if !end_ok && bad.is_none() {
            bad = Some(format!(
                "watch feed: node {id} ended at {prev:?} but its store is at {}",
                feed.revision
            ));
        }
        n.watch_rev = feed.revision;
        // The feed says what the store's history says of the same revisions (where compaction
        // left it): nothing dropped, nothing repeated.
        if let Some(kv) = n.core.as_ref().map(|c| c.kv()) {
            for (&r, evs) in &by_rev {
                if let Ok(h) = kv.events_between(r, r + 1, b"\0", b"\0") {
                    if h != *evs && bad.is_none() {
                        bad = Some(format!(
                            "watch feed: node {id} published {} events for revision {r}, its \
                             history holds {}",
                            evs.len(),
                            h.len()
                        ));
                    }
                }
            }
        }
        for (r, evs) in by_rev {
            match self.events_at.get(&r) {
                Some(first) if *first != evs && bad.is_none() => {
                    bad = Some(format!(
                        "watch feed: node {id} published other events for revision {r}"
                    ));
                }
                Some(_) => {}
                None => {
                    self.events_at.insert(r, evs);
                }
            }
        }
        if let Some(v) = bad {
            self.checker.violations.push(v);
        }
    }

    /// Hands the node's answers to the clients waiting for them.
    fn handle_outcomes(&mut self, id: u64) {
        let Some(core) = self.nodes.get_mut(&id).and_then(|n| n.core.as_mut()) else {
            return;
        };
        for o in core.take_outcomes() {
            let (token, out) = match o {
                Outcome::RoleChanged {
                    role: StateRole::Leader,
                    term,
                    ..
                } => {
                    self.stats.leader_changes += 1;
                    self.log(|| format!("{id} became leader at term {term}"));
                    let raw = self.nodes[&id].core.as_ref().unwrap().raw();
                    self.checker.on_leader(id, raw);
                    // A leader that loses its network the moment it wins: its first appends
                    // (its own-term entry) never leave it, so logs diverge across terms.
                    if self.healed_at.is_none()
                        && self.opts.faults
                        && self.rng.chance(self.opts.fault_rate * 0.05)
                    {
                        self.isolate(id);
                    }
                    continue;
                }
                Outcome::RoleChanged { .. }
                | Outcome::ConfChange { .. }
                | Outcome::PeerAddrChanged { .. }
                | Outcome::Members { .. } => continue,
                Outcome::Write { token, result } => {
                    let out = match result {
                        Ok(Response::Put(_)) => Some(Output::Put),
                        Ok(Response::Txn(t)) => Some(Output::Cas(t.succeeded)),
                        _ => None,
                    };
                    (token, out)
                }
                Outcome::Read { token, result } => {
                    let out = result
                        .ok()
                        .map(|r| Output::Get(r.kvs.first().map(|kv| decode_value(&kv.value))));
                    (token, out)
                }
                Outcome::ReadDropped { token } => (token, None),
            };
            let Some(op) = self.nodes.get_mut(&id).unwrap().tokens.remove(&token) else {
                continue;
            };
            let client = self.history.get(op).client;
            match out {
                Some(out) => self.finish_op(op, client, out),
                // Refused by the state machine, or a read that could not be confirmed: it had
                // no effect.
                None => self.fail_op(op, client),
            }
        }
    }

    fn fail_op(&mut self, op: OpId, client: u64) {
        let c = &mut self.clients[(client - 1) as usize];
        if c.pending.map(|(p, _)| p) != Some(op) {
            return;
        }
        c.pending = None;
        self.history.fail_definitely(op);
        self.stats.ops_failed += 1;
        let d = self.rng.range(TICK / 2, 2 * TICK);
        self.schedule(d, Ev::Client((client - 1) as usize));
    }

    fn finish_op(&mut self, op: OpId, client: u64, out: Output) {
        let c = &mut self.clients[(client - 1) as usize];
        if c.pending.map(|(p, _)| p) != Some(op) {
            // The client already gave up on it; the outcome stays unknown in the history.
            return;
        }
        c.pending = None;
        if self.healed_at.is_some() {
            c.done_after_heal += 1;
        }
        self.history.complete(op, self.now, out);
        self.stats.ops_ok += 1;
        let d = self.rng.range(1, TICK);
        self.schedule(d, Ev::Client((client - 1) as usize));
    }

    fn client_act(&mut self, ci: usize) {
        if self.clients[ci].pending.is_some() {
            return;
        }
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        let node = *self.rng.pick(&ids).unwrap();
        let key = self.rng.range(1, self.opts.keys);
        let c = &mut self.clients[ci];
        c.seq += 1;
        let (client, seq) = (c.id, c.seq);
        let value = client * 1_000_000 + seq;
        let op = match self.rng.range(0, 9) {
            0..=3 => Op::Put { key, value },
            4..=7 => Op::Get { key },
            _ => {
                // Expect a value this client may have written, or absence.
                let expected = if self.rng.chance(0.3) {
                    None
                } else {
                    Some(client * 1_000_000 + self.rng.range(1, seq))
                };
                Op::Cas {
                    key,
                    expected,
                    new: value,
                }
            }
        };
        let id = self.history.invoke(client, self.now, op);
        self.clients[ci].pending = Some((id, node));
        let n = self.nodes.get_mut(&node).unwrap();
        let token = id.index() as u64;
        let accepted = match (n.core.as_mut(), n.paused) {
            (Some(core), false) => match op {
                Op::Get { key } => core
                    .read(
                        token,
                        RangeRequest {
                            key: key_bytes(key),
                            ..Default::default()
                        },
                    )
                    .is_ok(),
                Op::Put { key, value } => core.propose(token, put_op(key, value)).is_ok(),
                Op::Cas { key, expected, new } => {
                    core.propose(token, cas_op(key, expected, new)).is_ok()
                }
            },
            // A crashed or paused node does not take the request at all.
            _ => false,
        };
        if accepted {
            n.tokens.insert(token, id);
        }
        if !accepted {
            self.history.fail_definitely(id);
            self.stats.ops_failed += 1;
            self.clients[ci].pending = None;
            let d = self.rng.range(TICK / 2, 2 * TICK);
            self.schedule(d, Ev::Client(ci));
            return;
        }
        self.drive(node);
        self.schedule(CLIENT_TIMEOUT, Ev::ClientTimeout { client: ci, op: id });
    }

    fn client_timeout(&mut self, ci: usize, op: OpId) {
        let c = &mut self.clients[ci];
        let Some((pending, node)) = c.pending else {
            return;
        };
        if pending != op {
            return;
        }
        c.pending = None;
        self.stats.client_timeouts += 1;
        self.log(|| format!("client {} gives up on {op} at node {node}", ci + 1));
        let n = self.nodes.get_mut(&node).unwrap();
        let token = op.index() as u64;
        if n.tokens.remove(&token).is_some() {
            if let Some(core) = n.core.as_mut() {
                core.cancel(token);
            }
        }
        if matches!(self.history.get(op).op, Op::Get { .. }) {
            // A read that never answered had no effect: drop it.
            self.history.fail_definitely(op);
        }
        let d = self.rng.range(1, TICK);
        self.schedule(d, Ev::Client(ci));
    }

    /// After healing: a leader exists, every client completed an op, and every member has
    /// applied the leader's commit index with identical state.
    fn live_and_converged(&self) -> bool {
        let Some(leader) = self.leader() else {
            return false;
        };
        if self.clients.iter().any(|c| c.done_after_heal < 2) {
            return false;
        }
        let l = self.nodes[&leader].core.as_ref().unwrap();
        let commit = l.raw().raft.raft_log.committed;
        let digest = l.kv().hash();
        let cs = l.raw().raft.trk.conf_state();
        cs.voters.iter().chain(cs.learners.iter()).all(|id| {
            self.nodes[id]
                .core
                .as_ref()
                .is_some_and(|c| c.applied() == commit && c.kv().hash() == digest)
        })
    }
}

/// The production node's configuration, with small limits so that every path gets exercised.
fn node_config(opts: &Options, id: u64, incarnation: u64, seed: u64) -> NodeConfig {
    // A new proposer id at every start, as the state machine's at-most-once table requires.
    let mut c = NodeConfig::new(id, id << 32 | incarnation);
    c.raft = Config {
        id,
        election_tick: ELECTION_TICK,
        heartbeat_tick: 1,
        // Small messages and windows so that replication is split across many messages and
        // flow control paths get exercised.
        max_size_per_msg: opts.max_size_per_msg,
        max_inflight_msgs: 16,
        seed,
        #[cfg(feature = "bug-injection")]
        bugs: opts.bugs,
        ..Config::default()
    };
    c.snapshot_count = opts.snapshot_every;
    // As the server: members snapshot at different indexes, so snapshots and compactions reach
    // the members at different points of the log.
    c.snapshot_phase = keel_node::core::snapshot_phase_for(id, opts.snapshot_every);
    c.compaction_margin = COMPACTION_MARGIN;
    c.collect_events = true;
    #[cfg(feature = "bug-injection")]
    {
        c.bugs = opts.node_bugs;
    }
    c
}

/// Keys sort numerically as bytes; values are little-endian u64s.
fn key_bytes(key: u64) -> Bytes {
    Bytes::copy_from_slice(&key.to_be_bytes())
}

fn decode_value(b: &[u8]) -> u64 {
    b.try_into().map(u64::from_le_bytes).unwrap_or(u64::MAX)
}

fn put_op(key: u64, value: u64) -> KvOp {
    KvOp::Put(PutRequest {
        key: key_bytes(key),
        value: Bytes::copy_from_slice(&value.to_le_bytes()),
        ..Default::default()
    })
}

/// Compare-and-set as an etcd transaction: the key holds `expected` (or, for `None`, has never
/// been created in its current incarnation), then put `new`.
fn cas_op(key: u64, expected: Option<u64>, new: u64) -> KvOp {
    let target = match expected {
        Some(v) => CompareTarget::Value(Bytes::copy_from_slice(&v.to_le_bytes())),
        None => CompareTarget::Create(0),
    };
    let KvOp::Put(put) = put_op(key, new) else {
        unreachable!("put_op builds a put")
    };
    KvOp::Txn(TxnRequest {
        compare: vec![Compare {
            result: CompareResult::Equal,
            target,
            key: key_bytes(key),
            range_end: Bytes::new(),
        }],
        success: vec![RequestOp::Put(put)],
        failure: vec![],
    })
}

/// Small segments and cache so that rollover, purge and reads back from the file system happen
/// in every run.
fn storage_options(id: u64) -> StorageOptions {
    let mut o = StorageOptions::new(id, CLUSTER_ID);
    o.wal = WalOptions {
        segment_size: 16 << 10,
        cache_bytes: 4 << 10,
        ..WalOptions::new(id, CLUSTER_ID)
    };
    o
}
