//! One seeded run: N Raft nodes with a replicated KV, a simulated network and disk, clients,
//! faults, and the safety checks that run as the cluster evolves.
//!
//! Time is an integer; a Raft tick is `TICK` units. Events (ticks, message deliveries, disk
//! completions, client actions) sit in a priority queue ordered by (time, sequence number), so a
//! run is a pure function of its options.

use crate::check::Checker;
use crate::kv::{Command, Kv};
use crate::linearizability::{CheckResult, History, Op, OpId, Output};
use crate::rng::Rng;
use crate::Fnv;
use bytes::Bytes;
use keel_raft::raftpb::ConfState;
use keel_raft::raftpb::{
    ConfChange, ConfChangeType, Entry, EntryType, HardState, Message, Snapshot,
};
use keel_raft::{Config, RawNode, StateRole, Storage};
use keel_wal::{FaultError, MemFs, StorageOptions, WalOptions, WalStorage};
use prost::Message as _;
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

/// A Ready handed out and being "written" to the simulated disk.
struct PendingWrite {
    number: u64,
    entries: Vec<Entry>,
    hard_state: Option<HardState>,
    snapshot: Option<Snapshot>,
    persisted_messages: Vec<Message>,
    committed: Vec<Entry>,
    read_states: Vec<keel_raft::ReadState>,
}

struct Node {
    id: u64,
    /// None while crashed. Its storage is the real WAL on `fs`.
    raw: Option<RawNode<WalStorage>>,
    /// The node's disk: keeps exactly what was synced across a crash, plus whatever torn
    /// prefix of unsynced writes `crash_with` lets survive.
    fs: MemFs,
    /// A disk fault was injected: the node's next WAL error is expected, and stops the node.
    disk_fault_armed: bool,
    kv: Kv,
    /// Bumped at each crash so disk completions of a previous life are ignored.
    incarnation: u64,
    pending_write: Option<PendingWrite>,
    paused: bool,
    /// Messages and disk completions that arrived while paused, replayed on resume.
    paused_inbox: Vec<Message>,
    paused_disk: bool,
    slow_disk: bool,
    /// Ticks only one time in three: a node whose clock (or scheduling) lags, so its timeouts,
    /// CheckQuorum included, fire late compared with everyone else's.
    slow_clock: bool,
    /// Proposals made here, waiting for their entry to be applied here: (client, seq) -> op.
    proposals: HashMap<(u64, u64), OpId>,
    /// Reads waiting for a read state: ctx -> (op, key).
    reads: HashMap<u64, (OpId, u64)>,
    /// Read states waiting for the state machine to catch up: (index, op, key).
    ready_reads: Vec<(u64, OpId, u64)>,
    last_snapshot: u64,
    /// Commit index up to which entries were reported to the checker as committed.
    last_commit_checked: u64,
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
    next_ctx: u64,
    trace: Fnv,
    pub stats: Stats,
    checker: Checker,
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
            let mut n = Node {
                id,
                raw: None,
                fs,
                disk_fault_armed: false,
                kv: Kv::default(),
                incarnation: 0,
                pending_write: None,
                paused: false,
                paused_inbox: Vec::new(),
                paused_disk: false,
                slow_disk: false,
                slow_clock: false,
                proposals: HashMap::new(),
                reads: HashMap::new(),
                ready_reads: Vec::new(),
                last_snapshot: 0,
                last_commit_checked: 0,
            };
            n.raw = Some(new_raw(&opts, id, rng.next_u64(), store, 0));
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
            next_ctx: 1,
            trace: Fnv::default(),
            stats: Stats::default(),
            checker: Checker::default(),
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
                match n.raw.as_ref() {
                    Some(r) => nodes.push_str(&format!(
                        "\n    node {}: {} term {} leader {} commit {} applied {} last {} \
                         conf {:?}/{:?} paused {} write pending {}",
                        n.id,
                        r.raft.role,
                        r.raft.term,
                        r.raft.leader_id,
                        r.raft.raft_log.committed,
                        n.kv.applied,
                        r.raft.raft_log.last_index(),
                        r.raft.trk.conf_state().voters,
                        r.raft.trk.conf_state().learners,
                        n.paused,
                        n.pending_write.is_some()
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
        self.nodes.get(&id).and_then(|n| n.raw.as_ref())
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
        if let Some(raw) = self.nodes.get_mut(&id).and_then(|n| n.raw.as_mut()) {
            let _ = raw.campaign();
            self.drive(id);
        }
    }

    /// Proposes a put straight to `id` (no client waits for it). False if refused.
    pub fn propose_put(&mut self, id: u64, key: u64, value: u64) -> bool {
        let cmd = Command {
            client: 0,
            seq: value,
            op: Op::Put { key, value },
        };
        let Some(raw) = self.nodes.get_mut(&id).and_then(|n| n.raw.as_mut()) else {
            return false;
        };
        let ok = raw.propose(Bytes::from(cmd.encode())).is_ok();
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
                if n.incarnation != incarnation || n.raw.is_none() {
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
                if let Some(raw) = n.raw.as_mut() {
                    raw.report_snapshot(to, ok);
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
            if let Some(raw) = n.raw.as_mut() {
                raw.tick();
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
            .filter(|n| n.raw.is_none())
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
            if n.raw.is_some() && !n.paused {
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
            if n.raw.is_some() && !n.disk_fault_armed {
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
    fn disk_failure(&mut self, id: u64, e: keel_wal::Error) {
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
            if self.nodes[&id].raw.is_none() {
                self.restart(id);
            }
        }
    }

    fn crash(&mut self, id: u64) {
        let n = self.nodes.get_mut(&id).unwrap();
        if n.raw.is_none() {
            return;
        }
        self.stats.crashes += 1;
        if n.pending_write.take().is_some() {
            self.stats.torn_writes += 1;
        }
        // The disk keeps what was synced; of each file's unsynced writes a random prefix
        // survives, torn at a random byte.
        let rng = &mut self.rng;
        n.fs.crash_with(&mut |k| rng.range(0, k));
        n.fs.clear_faults();
        n.disk_fault_armed = false;
        n.raw = None;
        n.incarnation += 1;
        n.paused = false;
        n.paused_inbox.clear();
        n.paused_disk = false;
        n.proposals.clear();
        n.reads.clear();
        n.ready_reads.clear();
        self.log(|| format!("crash {id}"));
    }

    fn restart(&mut self, id: u64) {
        let seed = self.rng.next_u64();
        let n = self.nodes.get_mut(&id).unwrap();
        if n.raw.is_some() {
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
        let snap = store
            .snapshot(0)
            .expect("the WAL storage holds its snapshot");
        let snap_index = keel_raft::storage::snapshot_position(&snap).0;
        n.kv = Kv::restore(&snap.data);
        n.kv.applied = snap_index;
        n.last_snapshot = snap_index;
        self.checker.on_durable_reload(id, *store.hard_state());
        n.raw = Some(new_raw(&self.opts, id, seed, store, snap_index));
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
        let raw = self.nodes[&leader].raw.as_ref().unwrap();
        let cs = raw.raft.trk.conf_state();
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
        let raw = self.nodes.get_mut(&leader).unwrap().raw.as_mut().unwrap();
        if raw.propose_conf_change(cc.clone()).is_ok() {
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
            .filter_map(|n| n.raw.as_ref().map(|r| (n.id, r)))
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
            let ok = self.nodes.get(&to).is_some_and(|n| n.raw.is_some());
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
        if n.raw.is_none() {
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
        if let Some(raw) = n.raw.as_mut() {
            // Errors are expected (messages from removed nodes, stale responses).
            let _ = raw.step(m);
        }
    }

    /// Takes Readies while the disk is free.
    fn drive(&mut self, id: u64) {
        loop {
            let n = self.nodes.get_mut(&id).unwrap();
            if n.paused || n.pending_write.is_some() {
                return;
            }
            let Some(raw) = n.raw.as_mut() else { return };
            if !raw.has_ready() {
                return;
            }
            let rd = raw.ready();
            if let Some(ss) = rd.soft_state {
                if ss.role == StateRole::Leader {
                    self.stats.leader_changes += 1;
                    let raw = self.nodes[&id].raw.as_ref().unwrap();
                    let term = raw.raft.term;
                    self.log(|| format!("{id} became leader at term {term}"));
                    self.checker.on_leader(id, raw);
                    // A leader that loses its network the moment it wins: its first appends
                    // (its own-term entry) never leave it, so logs diverge across terms.
                    if self.healed_at.is_none()
                        && self.opts.faults
                        && self.rng.chance(self.opts.fault_rate * 0.05)
                    {
                        self.isolate(id);
                    }
                }
            }
            let raw = self.nodes[&id].raw.as_ref().unwrap();
            self.checker.on_entries(id, raw, &rd.entries);
            for m in rd.messages {
                self.send(m);
            }
            let n = self.nodes.get_mut(&id).unwrap();
            let nothing_to_write =
                rd.entries.is_empty() && rd.snapshot.is_none() && rd.hard_state.is_none();
            if !nothing_to_write && rd.snapshot.is_none() {
                // Written now, durable only at the sync when the disk completes: a crash in
                // between tears it.
                let store = n.raw.as_mut().unwrap().store_mut();
                if let Err(e) = store.write(rd.hard_state.as_ref(), &rd.entries) {
                    self.disk_failure(id, e);
                    return;
                }
            }
            n.pending_write = Some(PendingWrite {
                number: rd.number,
                entries: rd.entries,
                hard_state: rd.hard_state,
                snapshot: rd.snapshot,
                persisted_messages: rd.persisted_messages,
                committed: rd.committed_entries,
                read_states: rd.read_states,
            });
            if nothing_to_write {
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

    /// The pending write is durable: persist, send what waited for it, apply, advance.
    fn complete_write(&mut self, id: u64) {
        let n = self.nodes.get_mut(&id).unwrap();
        let Some(w) = n.pending_write.take() else {
            return;
        };
        let store = n.raw.as_mut().unwrap().store_mut();
        let synced = match &w.snapshot {
            // A snapshot restarts the log: install it, then write what follows it.
            Some(snap) => store
                .apply_snapshot(snap.clone())
                .and_then(|_| store.save(w.hard_state.as_ref(), &w.entries)),
            None => store.sync(),
        };
        if let Err(e) = synced {
            self.disk_failure(id, e);
            return;
        }
        let hs = *self.nodes[&id].raw.as_ref().unwrap().store().hard_state();
        self.checker.on_durable(id, hs);
        if let Some(hs) = w.hard_state {
            let n = &self.nodes[&id];
            let known = n.kv.applied.max(n.last_commit_checked);
            if hs.commit > known {
                self.checker
                    .on_commit(id, n.raw.as_ref().unwrap(), known + 1, hs.commit);
                self.nodes.get_mut(&id).unwrap().last_commit_checked = hs.commit;
            }
        }
        for m in w.persisted_messages {
            self.send(m);
        }
        if let Some(s) = &w.snapshot {
            let n = self.nodes.get_mut(&id).unwrap();
            let idx = keel_raft::storage::snapshot_position(s).0;
            n.kv = Kv::restore(&s.data);
            n.kv.applied = idx;
            n.last_snapshot = idx;
            self.stats.snapshots_installed += 1;
            self.log(|| format!("{id} installed snapshot at {idx}"));
        }
        for e in &w.committed {
            self.apply(id, e);
        }
        let n = self.nodes.get_mut(&id).unwrap();
        for rs in w.read_states {
            let ctx = u64::from_le_bytes(rs.request_ctx.as_ref().try_into().unwrap_or([0; 8]));
            if let Some((op, key)) = n.reads.remove(&ctx) {
                n.ready_reads.push((rs.index, op, key));
            }
        }
        self.serve_reads(id);
        let n = self.nodes.get_mut(&id).unwrap();
        n.raw.as_mut().unwrap().advance(w.number);
        self.maybe_snapshot(id);
    }

    fn apply(&mut self, id: u64, e: &Entry) {
        let term = self.nodes[&id].raw.as_ref().map_or(0, |r| r.raft.term);
        self.checker.on_apply(id, term, e);
        let n = self.nodes.get_mut(&id).unwrap();
        if e.index <= n.kv.applied {
            // Already covered by the snapshot this node restored from.
            return;
        }
        match e.entry_type() {
            EntryType::EntryConfChange => {
                n.kv.skip(e.index);
                if let Ok(cc) = ConfChange::decode(e.data.as_ref()) {
                    n.raw.as_mut().unwrap().apply_conf_change(&cc);
                }
            }
            EntryType::EntryNormal => {
                let Some(cmd) = Command::decode(&e.data) else {
                    n.kv.skip(e.index);
                    return;
                };
                let out = n.kv.apply(e.index, &cmd);
                if let Some(op) = n.proposals.remove(&(cmd.client, cmd.seq)) {
                    self.finish_op(op, cmd.client, out);
                }
            }
        }
    }

    fn serve_reads(&mut self, id: u64) {
        let n = self.nodes.get_mut(&id).unwrap();
        let applied = n.kv.applied;
        let (ready, waiting): (Vec<_>, Vec<_>) = n
            .ready_reads
            .drain(..)
            .partition(|(idx, _, _)| *idx <= applied);
        n.ready_reads = waiting;
        let results: Vec<(OpId, Output)> = ready
            .into_iter()
            .map(|(_, op, key)| (op, Output::Get(n.kv.read(key))))
            .collect();
        for (op, out) in results {
            let client = self.history.get(op).client;
            self.finish_op(op, client, out);
        }
    }

    fn maybe_snapshot(&mut self, id: u64) {
        let every = self.opts.snapshot_every;
        let n = self.nodes.get_mut(&id).unwrap();
        if every == 0 || n.kv.applied < n.last_snapshot + every {
            return;
        }
        let raw = n.raw.as_mut().unwrap();
        let applied = n.kv.applied;
        let cs = raw.raft.trk.conf_state();
        let data = Bytes::from(n.kv.snapshot());
        let store = raw.store_mut();
        let taken = store
            .create_snapshot(applied, cs, data)
            .and_then(|_| store.compact_keeping(COMPACTION_MARGIN));
        if let Err(e) = taken {
            self.disk_failure(id, e);
            return;
        }
        n.last_snapshot = applied;
        self.stats.snapshots_taken += 1;
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
        let accepted = match (n.raw.as_mut(), n.paused) {
            (Some(raw), false) => match op {
                Op::Get { key } => {
                    let ctx = self.next_ctx;
                    self.next_ctx += 1;
                    let ok = raw
                        .read_index(Bytes::copy_from_slice(&ctx.to_le_bytes()))
                        .is_ok();
                    if ok {
                        n.reads.insert(ctx, (id, key));
                    }
                    ok
                }
                _ => {
                    let cmd = Command { client, seq, op };
                    let ok = raw.propose(Bytes::from(cmd.encode())).is_ok();
                    if ok {
                        n.proposals.insert((client, seq), id);
                    }
                    ok
                }
            },
            // A crashed or paused node does not take the request at all.
            _ => false,
        };
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
        let n = self.nodes.get_mut(&node).unwrap();
        n.proposals.retain(|_, o| *o != op);
        n.reads.retain(|_, (o, _)| *o != op);
        n.ready_reads.retain(|(_, o, _)| *o != op);
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
        let l = self.nodes[&leader].raw.as_ref().unwrap();
        let commit = l.raft.raft_log.committed;
        let digest = self.nodes[&leader].kv.digest();
        let cs = l.raft.trk.conf_state();
        cs.voters.iter().chain(cs.learners.iter()).all(|id| {
            let n = &self.nodes[id];
            n.kv.applied == commit && n.kv.digest() == digest
        })
    }
}

fn new_raw(
    opts: &Options,
    id: u64,
    seed: u64,
    store: WalStorage,
    applied: u64,
) -> RawNode<WalStorage> {
    let cfg = Config {
        id,
        election_tick: ELECTION_TICK,
        heartbeat_tick: 1,
        applied,
        // Small messages and windows so that replication is split across many messages and
        // flow control paths get exercised.
        max_size_per_msg: opts.max_size_per_msg,
        max_inflight_msgs: 16,
        seed,
        #[cfg(feature = "bug-injection")]
        bugs: opts.bugs,
        ..Config::default()
    };
    RawNode::new(&cfg, store).expect("valid config and storage")
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
