//! NodeCore on the real WAL (over MemFs) and the real state machine, three members in one
//! process: requests are answered only once applied, reads are linearizable, forwarded
//! duplicates apply once, restarts recover from disk, and a proposer fed by its own commits
//! keeps the cluster moving.

use bytes::Bytes;
use keel_kv::{Op, PutRequest, RangeRequest, Response};
use keel_node::core::PeerAddrError;
use keel_node::snapshot::MemberAttrs;
use keel_node::{NodeConfig, NodeCore, NodeError, Outcome};
use keel_proto::raftpb::{ConfChange, ConfChangeType, ConfState, Message, MessageType};
use keel_raft::StateRole;
use keel_wal::{MemFs, StorageOptions, WalStorage};
use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::Arc;

const DIR: &str = "/data";
const CLUSTER: u64 = 7;

struct Cluster {
    nodes: BTreeMap<u64, NodeCore<WalStorage>>,
    disks: BTreeMap<u64, MemFs>,
    net: VecDeque<Message>,
    outcomes: BTreeMap<u64, Vec<Outcome>>,
    /// When set, every forwarded proposal is delivered twice (a retransmission).
    duplicate_proposals: bool,
    boots: u64,
}

fn config(id: u64, proposer: u64) -> NodeConfig {
    let mut c = NodeConfig::new(id, proposer);
    c.snapshot_count = 8;
    c.compaction_margin = 2;
    c
}

impl Cluster {
    fn new(n: u64) -> Self {
        Self::with_config(n, config)
    }

    fn with_config(n: u64, config: impl Fn(u64, u64) -> NodeConfig) -> Self {
        let ids: Vec<u64> = (1..=n).collect();
        let mut c = Cluster {
            nodes: BTreeMap::new(),
            disks: BTreeMap::new(),
            net: VecDeque::new(),
            outcomes: BTreeMap::new(),
            duplicate_proposals: false,
            boots: 0,
        };
        for &id in &ids {
            let fs = MemFs::new();
            let store = WalStorage::bootstrap(
                Arc::new(fs.clone()),
                Path::new(DIR),
                StorageOptions::new(id, CLUSTER),
                ConfState {
                    voters: ids.clone(),
                    learners: vec![],
                },
            )
            .unwrap();
            c.disks.insert(id, fs);
            c.boots += 1;
            let node = NodeCore::new(config(id, c.boots), store).unwrap();
            c.nodes.insert(id, node);
        }
        c
    }

    fn node(&mut self, id: u64) -> &mut NodeCore<WalStorage> {
        self.nodes.get_mut(&id).unwrap()
    }

    /// Runs every node's Ready loop and delivers messages until nothing moves.
    fn stabilize(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            for (&id, n) in self.nodes.iter_mut() {
                while let Some(out) = n.ready().unwrap() {
                    moved = true;
                    self.net.extend(out.messages);
                    self.net.extend(n.persist().unwrap());
                    n.apply().unwrap();
                }
                self.outcomes
                    .entry(id)
                    .or_default()
                    .extend(n.take_outcomes());
            }
            while let Some(m) = self.net.pop_front() {
                moved = true;
                let twice = self.duplicate_proposals && m.msg_type() == MessageType::MsgPropose;
                if let Some(n) = self.nodes.get_mut(&m.to) {
                    if twice {
                        let _ = n.step(m.clone());
                    }
                    let _ = n.step(m);
                }
            }
            if !moved {
                return;
            }
        }
        panic!("cluster did not stabilize");
    }

    /// Restarts node `id` from its disk with `cfg` (a new proposer id, as a new process has).
    fn reopen(&mut self, id: u64, mut cfg: NodeConfig) {
        drop(self.nodes.remove(&id));
        let store = WalStorage::open(
            Arc::new(self.disks[&id].clone()),
            Path::new(DIR),
            StorageOptions::new(id, CLUSTER),
        )
        .unwrap();
        self.boots += 1;
        cfg.proposer = self.boots;
        self.nodes.insert(id, NodeCore::new(cfg, store).unwrap());
    }

    /// Heartbeat rounds from `leader`, so restarted members learn who leads.
    fn heartbeats(&mut self, leader: u64) {
        for _ in 0..3 {
            self.node(leader).tick();
            self.stabilize();
        }
    }

    fn elect(&mut self, id: u64) {
        self.node(id).campaign().unwrap();
        self.stabilize();
        assert_eq!(self.nodes[&id].raw().raft.role, StateRole::Leader);
    }

    /// Answers to requests made on `id` (role changes left out).
    fn take(&mut self, id: u64) -> Vec<Outcome> {
        std::mem::take(self.outcomes.entry(id).or_default())
            .into_iter()
            .filter(|o| !matches!(o, Outcome::RoleChanged { .. }))
            .collect()
    }
}

fn put(key: &str, value: &str) -> Op {
    Op::Put(PutRequest {
        key: Bytes::copy_from_slice(key.as_bytes()),
        value: Bytes::copy_from_slice(value.as_bytes()),
        ..Default::default()
    })
}

fn get(key: &str) -> RangeRequest {
    RangeRequest {
        key: Bytes::copy_from_slice(key.as_bytes()),
        ..Default::default()
    }
}

fn read_value(o: &Outcome) -> Option<Bytes> {
    match o {
        Outcome::Read {
            result: Ok(resp), ..
        } => resp.kvs.first().map(|kv| kv.value.clone()),
        other => panic!("not a read: {other:?}"),
    }
}

#[test]
fn writes_are_answered_when_applied_and_reads_see_them_everywhere() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.take(1);
    // Through the leader, and through a follower (forwarded to the leader).
    c.node(1).propose(10, put("a", "1")).unwrap();
    c.node(2).propose(20, put("b", "2")).unwrap();
    c.stabilize();
    let w1 = c.take(1);
    assert!(
        matches!(&w1[..], [Outcome::Write { token: 10, result: Ok(Response::Put(p)) }] if p.revision >= 2),
        "{w1:?}"
    );
    let w2 = c.take(2);
    assert!(
        matches!(
            &w2[..],
            [Outcome::Write {
                token: 20,
                result: Ok(Response::Put(_))
            }]
        ),
        "{w2:?}"
    );
    // A linearizable read on the third node sees both writes.
    c.node(3).read(30, get("a")).unwrap();
    c.node(3).read(31, get("b")).unwrap();
    c.stabilize();
    let r = c.take(3);
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(read_value(&r[0]), Some(Bytes::from_static(b"1")));
    assert_eq!(read_value(&r[1]), Some(Bytes::from_static(b"2")));
    let hashes: Vec<u64> = c.nodes.values().map(|n| n.kv().hash()).collect();
    assert!(hashes.windows(2).all(|w| w[0] == w[1]), "{hashes:?}");
}

#[test]
fn a_duplicated_forwarded_proposal_applies_once() {
    let mut c = Cluster::new(3);
    c.elect(1);
    let before = c.nodes[&1].kv().revision();
    c.duplicate_proposals = true;
    c.node(2).propose(1, put("k", "v")).unwrap();
    c.stabilize();
    // Both copies reached the log; the second changed nothing.
    assert_eq!(c.nodes[&1].kv().revision(), before + 1);
    for n in c.nodes.values() {
        assert_eq!(n.kv().revision(), before + 1);
    }
    let w = c.take(2);
    assert!(matches!(&w[..], [Outcome::Write { token: 1, .. }]), "{w:?}");
}

#[test]
fn a_forwarded_proposal_lost_with_its_leader_is_proposed_to_the_next_one() {
    let mut c = Cluster::new(3);
    c.elect(1);
    let before = c.nodes[&2].kv().revision();
    c.node(2).propose(5, put("k", "v")).unwrap();
    // The forward to leader 1 is lost (it crashed before reading it); node 3 takes over.
    while c.node(2).ready().unwrap().is_some() {
        c.node(2).persist().unwrap();
        c.node(2).apply().unwrap();
    }
    c.take(2);
    c.nodes.remove(&1);
    // Node 2 and 3 must stop hearing from the dead leader (CheckQuorum) before either wins.
    for _ in 0..100 {
        for id in [2, 3] {
            c.node(id).tick();
        }
        c.stabilize();
        if c.nodes
            .values()
            .any(|n| n.raw().raft.role == StateRole::Leader)
        {
            break;
        }
    }
    assert!(c
        .nodes
        .values()
        .any(|n| n.raw().raft.role == StateRole::Leader));
    c.stabilize();
    let w = c.take(2);
    assert!(
        matches!(
            &w[..],
            [Outcome::Write {
                token: 5,
                result: Ok(Response::Put(_))
            }]
        ),
        "the write completes without the client retrying: {w:?}"
    );
    for id in [2, 3] {
        assert_eq!(
            c.nodes[&id].kv().revision(),
            before + 1,
            "applied once on {id}"
        );
    }
}

#[test]
fn background_snapshots_are_written_by_the_caller_one_at_a_time() {
    let mut c = Cluster::new(1);
    let mut cfg = config(1, 100);
    cfg.background_snapshots = true;
    let store = {
        let old = c.nodes.remove(&1).unwrap();
        drop(old);
        WalStorage::open(
            Arc::new(c.disks[&1].clone()),
            Path::new(DIR),
            StorageOptions::new(1, CLUSTER),
        )
        .unwrap()
    };
    c.nodes.insert(1, NodeCore::new(cfg, store).unwrap());
    c.elect(1);
    let snap_before = c.nodes[&1].last_snapshot();
    for i in 0..20 {
        c.node(1).propose(i, put(&format!("k{i}"), "v")).unwrap();
        c.stabilize();
    }
    // Past snapshot_count (8) the core prepared one snapshot and waits for it to be written:
    // no second one is prepared meanwhile, and nothing was compacted yet.
    let job = c.node(1).take_snapshot_job().expect("a snapshot to write");
    assert!(c.node(1).take_snapshot_job().is_none());
    assert_eq!(
        c.nodes[&1].last_snapshot(),
        snap_before,
        "not adopted before it is written"
    );
    let index = job.index();
    assert!(index >= 8, "{index}");
    // The job holds the state as of its index, though writes were applied after it was
    // taken and it is encoded only now.
    assert!(c.nodes[&1].applied() > index);
    let job = job.build();
    let kv = keel_node::snapshot::decode(&job.data).unwrap().kv;
    let at_index = keel_kv::Store::restore(&kv).unwrap();
    assert!(at_index.applied_index() <= index);
    assert!(at_index.revision() < c.nodes[&1].kv().revision());
    assert!(
        at_index.get(b"k19").is_none(),
        "a later write leaked into the image"
    );
    let first_before = keel_raft::Storage::first_index(c.nodes[&1].raw().store()).unwrap();
    c.nodes[&1].raw().store().snap_store().save(&job).unwrap();
    c.node(1).snapshot_saved(job.clone()).unwrap();
    assert_eq!(c.nodes[&1].last_snapshot(), index);
    let first_after = keel_raft::Storage::first_index(c.nodes[&1].raw().store()).unwrap();
    assert!(first_after > first_before, "compacted behind the snapshot");
    // A report for a snapshot that is not being written is refused.
    assert!(c.node(1).snapshot_saved(job).is_err());
    // After a restart the adopted snapshot is the one recovered.
    drop(c.nodes.remove(&1));
    let store = WalStorage::open(
        Arc::new(c.disks[&1].clone()),
        Path::new(DIR),
        StorageOptions::new(1, CLUSTER),
    )
    .unwrap();
    let n = NodeCore::new(config(1, 101), store).unwrap();
    assert_eq!(n.last_snapshot(), index);
}

#[test]
fn proposals_beyond_the_pending_limit_are_refused() {
    let mut c = Cluster::new(1);
    c.elect(1);
    let max = 1_000;
    for t in 0..max {
        c.node(1).propose(t, put("k", "v")).unwrap();
    }
    assert!(matches!(
        c.node(1).propose(max, put("k", "v")),
        Err(NodeError::Overloaded(_))
    ));
    c.stabilize();
    assert_eq!(
        c.take(1)
            .iter()
            .filter(|o| matches!(o, Outcome::Write { .. }))
            .count(),
        1000
    );
    // Room again once applied.
    c.node(1).propose(max, put("k", "v")).unwrap();
}

#[test]
fn a_crashed_node_recovers_from_its_disk_and_catches_up() {
    let mut c = Cluster::new(3);
    c.elect(1);
    for i in 0..30u64 {
        c.node(1).propose(i, put(&format!("k{i}"), "x")).unwrap();
        c.stabilize();
    }
    // Node 3 loses power: only what it synced survives.
    c.nodes.remove(&3);
    c.disks[&3].crash();
    for i in 30..60u64 {
        c.node(1).propose(i, put(&format!("k{i}"), "y")).unwrap();
        c.stabilize();
    }
    let store = WalStorage::open(
        Arc::new(c.disks[&3].clone()),
        Path::new(DIR),
        StorageOptions::new(3, CLUSTER),
    )
    .unwrap();
    c.boots += 1;
    let n3 = NodeCore::new(config(3, c.boots), store).unwrap();
    // Restored from its own snapshot (every 8 entries), not from scratch.
    assert!(n3.applied() >= 24, "restarted at {}", n3.applied());
    c.nodes.insert(3, n3);
    c.node(1).propose(99, put("after", "restart")).unwrap();
    c.stabilize();
    let leader = c.nodes[&1].kv().hash();
    for (id, n) in &c.nodes {
        assert_eq!(n.kv().hash(), leader, "node {id} diverged");
        assert_eq!(
            n.kv().get(b"k59").map(|kv| kv.value),
            Some(Bytes::from_static(b"y"))
        );
    }
}

/// raftexample's TestProposeOnCommit: every committed write is fed straight back as a new
/// proposal on all three nodes. A proposer that waits on the commit path must not stall Raft.
#[test]
fn proposing_on_every_commit_keeps_making_progress() {
    let mut c = Cluster::new(3);
    c.elect(1);
    for id in 1..=3 {
        c.node(id).propose(0, put(&format!("n{id}"), "0")).unwrap();
    }
    let mut commits = [0u64; 4];
    for _round in 0..200 {
        c.stabilize();
        for id in 1..=3u64 {
            for o in c.take(id) {
                if let Outcome::Write { token, result } = o {
                    assert!(result.is_ok());
                    commits[id as usize] += 1;
                    c.node(id)
                        .propose(token + 1, put(&format!("n{id}"), &(token + 1).to_string()))
                        .unwrap();
                }
            }
        }
        if commits[1..].iter().all(|&n| n >= 100) {
            break;
        }
    }
    assert!(commits[1..].iter().all(|&n| n >= 100), "{commits:?}");
}

#[test]
fn reads_waiting_for_confirmation_are_dropped_when_leadership_changes() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.take(2);
    // Queue a read on node 2, hand its request to the leader, then lose the answer and elect
    // someone else.
    c.node(2).read(5, get("a")).unwrap();
    let out = c.node(2).ready().unwrap().unwrap();
    c.node(2).persist().unwrap();
    c.node(2).apply().unwrap();
    // The request to the leader is lost.
    assert!(out
        .messages
        .iter()
        .any(|m| m.msg_type() == MessageType::MsgReadIndex));
    drop(out);
    c.node(1).transfer_leader(3);
    c.stabilize();
    assert_eq!(c.nodes[&3].raw().raft.role, StateRole::Leader);
    let got = std::mem::take(c.outcomes.entry(2).or_default());
    assert!(
        got.iter()
            .any(|o| matches!(o, Outcome::RoleChanged { leader: 3, .. })),
        "{got:?}"
    );
    assert!(
        got.iter()
            .any(|o| matches!(o, Outcome::ReadDropped { token: 5 })),
        "{got:?}"
    );
}

/// Reads on the leader and on a follower whose first batches were numbered alike: the leader
/// must answer both (contexts name their node), not take them for one request.
#[test]
fn concurrent_reads_from_different_nodes_are_all_answered() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.node(1).propose(1, put("a", "1")).unwrap();
    c.stabilize();
    c.take(1);
    for id in 1..=3 {
        c.node(id).read(100 + id, get("a")).unwrap();
    }
    c.stabilize();
    for id in 1..=3 {
        let got = c.take(id);
        assert_eq!(got.len(), 1, "node {id}: {got:?}");
        assert_eq!(read_value(&got[0]), Some(Bytes::from_static(b"1")));
    }
}

fn attrs(id: u64, port: u16) -> MemberAttrs {
    MemberAttrs {
        name: format!("infra{id}"),
        client_urls: vec![format!("http://127.0.0.1:{port}")],
    }
}

fn publishing(id: u64, port: u16) -> NodeConfig {
    let mut cfg = config(id, 0);
    cfg.attributes = Some(attrs(id, port));
    cfg
}

/// Node entries (tagged 0xFF) in the log of `n`.
fn node_entries(n: &NodeCore<WalStorage>) -> usize {
    let raft = &n.raw().raft;
    let log = &raft.raft_log;
    log.entries(log.first_index(), u64::MAX)
        .unwrap()
        .iter()
        .filter(|e| keel_node::entry::is_node_entry(&e.data))
        .count()
}

/// etcd's publish: each member proposes its name and client URLs once it follows a leader,
/// every member holds all of them; a restart with the same attributes proposes nothing, and
/// one with a changed URL proposes again.
#[test]
fn members_publish_their_attributes_and_again_only_when_they_change() {
    let mut c = Cluster::new(3);
    for id in 1..=3 {
        c.reopen(id, publishing(id, 2379 + id as u16));
    }
    c.elect(1);
    let want: Vec<(u64, MemberAttrs)> = (1..=3)
        .map(|id| (id, attrs(id, 2379 + id as u16)))
        .collect();
    for (id, n) in &c.nodes {
        let got: Vec<(u64, MemberAttrs)> = n
            .attributes()
            .iter()
            .map(|(&i, a)| (i, a.clone()))
            .collect();
        assert_eq!(got, want, "node {id}");
    }
    assert_eq!(node_entries(&c.nodes[&1]), 3);
    // The state machine saw none of them: no revision was spent.
    assert_eq!(c.nodes[&1].kv().revision(), 1);

    c.reopen(2, publishing(2, 2381));
    c.heartbeats(1);
    assert_eq!(c.nodes[&2].raw().raft.leader_id, 1);
    assert_eq!(
        node_entries(&c.nodes[&1]),
        3,
        "a restart with the same attributes"
    );

    c.reopen(2, publishing(2, 9999));
    c.heartbeats(1);
    assert_eq!(
        node_entries(&c.nodes[&1]),
        4,
        "a changed client URL is published"
    );
    for (id, n) in &c.nodes {
        assert_eq!(n.attributes()[&2], attrs(2, 9999), "node {id}");
    }
}

/// Attributes are part of the replicated state: carried by snapshots (a member restored from
/// one knows them before replaying anything) and dropped with the member.
#[test]
fn attributes_travel_in_snapshots_and_leave_with_their_member() {
    let mut c = Cluster::new(3);
    for id in 1..=3 {
        c.reopen(id, publishing(id, 2379 + id as u16));
    }
    c.elect(1);
    for i in 0..30u64 {
        c.node(1).propose(i, put(&format!("k{i}"), "v")).unwrap();
        c.stabilize();
    }
    // Past snapshot_count (8) and the compaction margin: the publishes are only in snapshots.
    assert_eq!(node_entries(&c.nodes[&3]), 0);
    c.reopen(3, config(3, 0));
    assert_eq!(
        c.nodes[&3].attributes().len(),
        3,
        "restored from the snapshot"
    );
    assert_eq!(c.nodes[&3].attributes()[&1], attrs(1, 2380));
    let snap = keel_node::snapshot::decode(&c.nodes[&3].snapshot_data()).unwrap();
    assert_eq!(&snap.attrs, c.nodes[&3].attributes());

    let mut cc = ConfChange {
        node_id: 3,
        ..Default::default()
    };
    cc.set_change_type(ConfChangeType::RemoveNode);
    c.node(1).propose_conf_change(7, cc).unwrap();
    c.stabilize();
    for id in [1, 2] {
        let ids: Vec<u64> = c.nodes[&id].attributes().keys().copied().collect();
        assert_eq!(ids, vec![1, 2], "node {id}");
    }
}

/// etcd's MemberUpdate through a node entry: every member records the new address and is told
/// (`Members`, so its driver dials it); the proposer is answered. Applying refuses a change
/// for a non-member or to an address another member has, alike on every member.
#[test]
fn peer_address_changes_apply_everywhere_and_refuse_races() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.take(1);
    c.take(2);
    c.node(2)
        .propose_peer_addr(5, 3, "10.0.0.3:2380".into())
        .unwrap();
    c.stabilize();
    let got = c.take(2);
    assert!(
        got.iter().any(|o| matches!(
            o,
            Outcome::PeerAddrChanged { token: 5, result: Ok(cs) } if cs.voters == vec![1, 2, 3]
        )),
        "{got:?}"
    );
    for (id, n) in &c.nodes {
        assert_eq!(n.peers()[&3], "10.0.0.3:2380", "node {id}");
    }
    assert!(c
        .take(1)
        .iter()
        .any(|o| matches!(o, Outcome::Members { removed: None, .. })));

    c.node(1)
        .propose_peer_addr(6, 2, "10.0.0.3:2380".into())
        .unwrap();
    c.node(1)
        .propose_peer_addr(7, 9, "10.0.0.9:2380".into())
        .unwrap();
    c.stabilize();
    let got = c.take(1);
    assert!(got.contains(&Outcome::PeerAddrChanged {
        token: 6,
        result: Err(PeerAddrError::AddressInUse {
            addr: "10.0.0.3:2380".into(),
            owner: 3
        })
    }));
    assert!(got.contains(&Outcome::PeerAddrChanged {
        token: 7,
        result: Err(PeerAddrError::NotMember(9))
    }));
    for (id, n) in &c.nodes {
        assert!(!n.peers().contains_key(&2), "node {id}");
        assert!(!n.peers().contains_key(&9), "node {id}");
    }
    assert!(matches!(
        c.node(1).propose_peer_addr(8, 2, String::new()),
        Err(NodeError::Invalid(_))
    ));
}

/// A Ready that only moves the commit index is written but not synced: a crash may lose it,
/// and the node must come back from what it synced (entries, its snapshot) and relearn the
/// commit index from the leader.
#[test]
fn a_commit_index_is_not_synced_on_its_own_and_losing_it_loses_nothing() {
    let mut c = Cluster::new(3);
    c.elect(1);
    for i in 0..10u64 {
        c.node(1).propose(i, put(&format!("k{i}"), "v")).unwrap();
        c.stabilize();
    }
    // Each write reached node 2 as an append (synced), then its commit as an empty append.
    let committed = c.nodes[&2].raw().raft.raft_log.committed;
    assert_eq!(c.nodes[&2].applied(), committed);
    c.nodes.remove(&2);
    c.disks[&2].crash();
    c.reopen(2, config(2, 0));
    let recovered = c.nodes[&2].raw().raft.raft_log.committed;
    assert!(
        recovered < committed,
        "the last commit-only change ({committed}) survived the crash as {recovered}: it was synced"
    );
    // Snapshots (every 8 entries) are durable with the commit index they imply.
    assert!(recovered >= 8, "recovered commit {recovered}");
    c.heartbeats(1);
    assert_eq!(c.nodes[&2].raw().raft.raft_log.committed, committed);
    assert_eq!(c.nodes[&2].kv().hash(), c.nodes[&1].kv().hash());
    assert_eq!(
        c.nodes[&2].kv().get(b"k9").map(|kv| kv.value),
        Some(Bytes::from_static(b"v"))
    );
}

/// Snapshot indexes each member took while `proposals` puts were applied one at a time.
fn snapshot_indexes(phased: bool, proposals: u64) -> BTreeMap<u64, Vec<u64>> {
    let mut c = Cluster::with_config(3, |id, proposer| {
        let mut cfg = config(id, proposer);
        if phased {
            cfg.snapshot_phase = keel_node::core::snapshot_phase_for(id, cfg.snapshot_count);
        }
        cfg
    });
    c.elect(1);
    let mut taken: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for i in 0..proposals {
        c.node(1).propose(i, put(&format!("k{i}"), "v")).unwrap();
        c.stabilize();
        for (&id, n) in &c.nodes {
            let seen = taken.entry(id).or_default();
            if seen.last() != Some(&n.last_snapshot()) && n.last_snapshot() > 0 {
                seen.push(n.last_snapshot());
            }
        }
    }
    taken
}

#[test]
fn members_given_phases_take_their_snapshots_at_different_indexes() {
    // One phase: all three members write their snapshot at the same index, the stall this
    // avoids (and the check below would catch it).
    let same = snapshot_indexes(false, 60);
    assert_eq!(same[&1], same[&2]);
    assert_eq!(same[&1], same[&3]);
    let phased = snapshot_indexes(true, 60);
    for (id, indexes) in &phased {
        let phase = keel_node::core::snapshot_phase_for(*id, 8);
        assert!(indexes.len() >= 5, "member {id}: {indexes:?}");
        for w in indexes.windows(2) {
            // As often as without a phase: one snapshot per run of 8, never two close together.
            assert!(
                w[1] - w[0] >= 4 && w[1] - w[0] <= 9,
                "member {id}: {indexes:?}"
            );
        }
        for &i in &indexes[1..] {
            // Puts applied one by one: each is taken at the member's own boundary.
            assert_eq!(i % 8, phase, "member {id}: {indexes:?}");
        }
    }
    let all: Vec<u64> = phased.values().flatten().copied().collect();
    let distinct: std::collections::BTreeSet<u64> = all.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        all.len(),
        "two members at one index: {phased:?}"
    );
}
