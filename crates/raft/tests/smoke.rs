//! A minimal in-memory cluster: elect, replicate, commit, read, and survive losing the leader.

use bytes::Bytes;
use keel_raft::raftpb::Message;
use keel_raft::{Config, MemStorage, RawNode, StateRole};
use std::collections::{BTreeMap, VecDeque};

struct Cluster {
    nodes: BTreeMap<u64, RawNode<MemStorage>>,
    applied: BTreeMap<u64, Vec<Bytes>>,
    net: VecDeque<Message>,
    down: Vec<u64>,
    reads: BTreeMap<u64, Vec<keel_raft::ReadState>>,
}

impl Cluster {
    fn new(n: u64) -> Self {
        let ids: Vec<u64> = (1..=n).collect();
        let mut nodes = BTreeMap::new();
        for &id in &ids {
            let s = MemStorage::new_with_conf_state(ids.clone(), vec![]);
            nodes.insert(id, RawNode::new(&Config::new(id), s).unwrap());
        }
        Cluster {
            nodes,
            applied: BTreeMap::new(),
            net: VecDeque::new(),
            down: vec![],
            reads: BTreeMap::new(),
        }
    }

    /// Runs Ready loops and delivers messages until nothing moves.
    fn stabilize(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            for (&id, n) in self.nodes.iter_mut() {
                if self.down.contains(&id) || !n.has_ready() {
                    continue;
                }
                moved = true;
                let rd = n.ready();
                if let Some(s) = rd.snapshot.clone() {
                    n.store_mut().apply_snapshot(s).unwrap();
                }
                n.store_mut().append(&rd.entries).unwrap();
                if let Some(hs) = rd.hard_state {
                    n.store_mut().set_hard_state(hs);
                }
                self.net.extend(rd.messages);
                self.net.extend(rd.persisted_messages);
                self.reads.entry(id).or_default().extend(rd.read_states);
                for e in rd.committed_entries {
                    if !e.data.is_empty() {
                        self.applied.entry(id).or_default().push(e.data);
                    }
                }
                n.advance(rd.number);
            }
            while let Some(m) = self.net.pop_front() {
                moved = true;
                if self.down.contains(&m.to) || self.down.contains(&m.from) {
                    continue;
                }
                let _ = self.nodes.get_mut(&m.to).unwrap().step(m);
            }
            if !moved {
                return;
            }
        }
        panic!("cluster did not stabilize");
    }

    fn leader(&self) -> Option<u64> {
        self.nodes
            .iter()
            .filter(|(id, _)| !self.down.contains(id))
            .find(|(_, n)| n.raft.role == StateRole::Leader)
            .map(|(&id, _)| id)
    }

    fn tick_all(&mut self, n: usize) {
        for _ in 0..n {
            for (id, node) in self.nodes.iter_mut() {
                if !self.down.contains(id) {
                    node.tick();
                }
            }
            self.stabilize();
        }
    }
}

#[test]
fn three_nodes_elect_replicate_and_fail_over() {
    let mut c = Cluster::new(3);
    c.nodes.get_mut(&1).unwrap().campaign().unwrap();
    c.stabilize();
    assert_eq!(c.leader(), Some(1));
    c.nodes
        .get_mut(&1)
        .unwrap()
        .propose(Bytes::from_static(b"a"))
        .unwrap();
    // A follower forwards to the leader.
    c.nodes
        .get_mut(&2)
        .unwrap()
        .propose(Bytes::from_static(b"b"))
        .unwrap();
    c.stabilize();
    for id in 1..=3 {
        assert_eq!(
            c.applied[&id],
            vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")]
        );
    }
    // Linearizable read on a follower.
    c.nodes
        .get_mut(&3)
        .unwrap()
        .read_index(Bytes::from_static(b"r1"))
        .unwrap();
    c.stabilize();
    let got = c.reads.get(&3).and_then(|r| r.first().cloned());
    let rs = got.expect("read state on follower");
    assert_eq!(rs.request_ctx, Bytes::from_static(b"r1"));
    assert_eq!(rs.index, c.nodes[&1].raft.raft_log.committed);

    // Kill the leader; one of the others takes over and commits.
    c.down.push(1);
    c.tick_all(40);
    let new = c.leader().expect("a new leader");
    assert_ne!(new, 1);
    c.nodes
        .get_mut(&new)
        .unwrap()
        .propose(Bytes::from_static(b"c"))
        .unwrap();
    c.stabilize();
    for id in 2..=3 {
        assert_eq!(c.applied[&id].last(), Some(&Bytes::from_static(b"c")));
    }
}

#[test]
fn single_node_commits_alone() {
    let mut c = Cluster::new(1);
    c.nodes.get_mut(&1).unwrap().campaign().unwrap();
    c.stabilize();
    assert_eq!(c.leader(), Some(1));
    c.nodes
        .get_mut(&1)
        .unwrap()
        .propose(Bytes::from_static(b"x"))
        .unwrap();
    c.stabilize();
    assert_eq!(c.applied[&1], vec![Bytes::from_static(b"x")]);
}
