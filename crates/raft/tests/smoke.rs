//! A minimal in-memory cluster: elect, replicate, commit, read, and survive losing the leader.

mod common;

use bytes::Bytes;
use common::Cluster;

#[test]
fn three_nodes_elect_replicate_and_fail_over() {
    let mut c = Cluster::new(3);
    c.campaign(1);
    assert_eq!(c.leader(), Some(1));
    c.propose(1, b"a");
    // A follower forwards to the leader.
    c.propose(2, b"b");
    for id in 1..=3 {
        assert_eq!(
            c.applied_data(id),
            vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")]
        );
    }
    // Linearizable read on a follower.
    c.node_mut(3).read_index(Bytes::from_static(b"r1")).unwrap();
    c.stabilize();
    let got = c.reads.get(&3).and_then(|r| r.first().cloned());
    let rs = got.expect("read state on follower");
    assert_eq!(rs.request_ctx, Bytes::from_static(b"r1"));
    assert_eq!(rs.index, c.node(1).raft.raft_log.committed);

    // Kill the leader; one of the others takes over and commits.
    c.down.insert(1);
    c.tick_all(40);
    let new = c.leader().expect("a new leader");
    assert_ne!(new, 1);
    c.propose(new, b"c");
    for id in 2..=3 {
        assert_eq!(c.applied_data(id).last(), Some(&Bytes::from_static(b"c")));
    }
}

#[test]
fn single_node_commits_alone() {
    let mut c = Cluster::new(1);
    c.campaign(1);
    assert_eq!(c.leader(), Some(1));
    c.propose(1, b"x");
    assert_eq!(c.applied_data(1), vec![Bytes::from_static(b"x")]);
}
