//! The node runtime end to end: three nodes in one process over real transports on 127.0.0.1
//! and real WALs in temp dirs. Every wait polls a condition under a deadline.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use keel_kv::{Op, PutRequest};
use keel_node::driver::{start, DriverConfig, DriverError, NodeHandle, Status};
use keel_raft::StateRole;
use tempfile::TempDir;

const CLUSTER: u64 = 42;
/// Short ticks keep the tests fast; ten ticks per election timeout still leaves a 0.5 to 1 s
/// timeout, well clear of scheduling hiccups on a loaded 2-core machine.
const TICK: Duration = Duration::from_millis(50);
const WAIT: Duration = Duration::from_secs(20);

/// A free port on 127.0.0.1: bound, read and released, then handed to the transport.
fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(t) = check().await {
            return t;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Cluster {
    dirs: BTreeMap<u64, TempDir>,
    nodes: BTreeMap<u64, NodeHandle>,
}

impl Cluster {
    fn new(n: u64) -> Cluster {
        let dirs = (1..=n).map(|id| (id, TempDir::new().unwrap())).collect();
        Cluster {
            dirs,
            nodes: BTreeMap::new(),
        }
    }

    /// Starts every node on fresh ports (the data dirs do not record addresses).
    async fn start_all(&mut self) {
        let addrs: BTreeMap<u64, SocketAddr> =
            self.dirs.keys().map(|&id| (id, free_addr())).collect();
        let members: Vec<u64> = self.dirs.keys().copied().collect();
        for (&id, dir) in &self.dirs {
            let mut cfg = DriverConfig::new(id, CLUSTER, dir.path(), addrs[&id]);
            cfg.peers = addrs.iter().map(|(&i, a)| (i, a.to_string())).collect();
            cfg.initial_members = members.clone();
            cfg.tick_interval = TICK;
            cfg.snapshot_count = 100;
            let node = start(cfg).await.unwrap();
            assert_eq!(node.local_addr(), addrs[&id]);
            self.nodes.insert(id, node);
        }
    }

    async fn statuses(&self) -> Vec<Status> {
        let mut v = Vec::new();
        for n in self.nodes.values() {
            v.push(n.status().await.unwrap());
        }
        v
    }

    /// Waits until exactly one node is leader and every node follows it in its term.
    async fn leader(&self) -> u64 {
        wait_for("one leader known to all", WAIT, || async {
            let st = self.statuses().await;
            let leaders: Vec<&Status> = st.iter().filter(|s| s.role == StateRole::Leader).collect();
            let [l] = leaders[..] else { return None };
            st.iter()
                .all(|s| s.leader == l.id && s.term == l.term)
                .then_some(l.id)
        })
        .await
    }

    fn node(&self, id: u64) -> &NodeHandle {
        &self.nodes[&id]
    }

    async fn shutdown(&mut self) {
        for (_, n) in std::mem::take(&mut self.nodes) {
            n.shutdown().await;
        }
    }
}

fn put_op(key: &str, value: &str) -> Op {
    Op::Put(PutRequest {
        key: key.as_bytes().to_vec().into(),
        value: value.as_bytes().to_vec().into(),
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_replicate_and_read_linearizably() {
    let mut c = Cluster::new(3);
    c.start_all().await;
    let leader = c.leader().await;
    let follower = (1..=3).find(|&i| i != leader).unwrap();

    let r1 = c.node(leader).put("a", "from-leader").await.unwrap();
    let r2 = c.node(follower).put("b", "from-follower").await.unwrap();
    assert!(r2 > r1, "revisions grow: {r1} then {r2}");

    for id in 1..=3 {
        let n = c.node(id);
        assert_eq!(
            n.get("a").await.unwrap().as_deref(),
            Some(&b"from-leader"[..])
        );
        assert_eq!(
            n.get("b").await.unwrap().as_deref(),
            Some(&b"from-follower"[..])
        );
        assert_eq!(n.get("missing").await.unwrap(), None);
    }
    c.shutdown().await;
}

/// raftexample's TestProposeOnCommit, through the driver: every node proposes again as soon as
/// its previous write is applied, all three at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn propose_on_commit_keeps_moving() {
    const ROUNDS: usize = 200;
    let mut c = Cluster::new(3);
    c.start_all().await;
    c.leader().await;

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut tasks = Vec::new();
    for (&id, n) in &c.nodes {
        let n = n.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0;
            while done < ROUNDS {
                assert!(
                    Instant::now() < deadline,
                    "node {id} stalled at round {done}"
                );
                match n
                    .propose(put_op(&format!("k{id}"), &(done + 1).to_string()))
                    .await
                {
                    Ok(_) => done += 1,
                    // A leader change under load loses in-flight proposals; the loop re-proposes.
                    Err(DriverError::NoLeader | DriverError::Timeout) => {}
                    Err(e) => panic!("node {id} round {done}: {e}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for id in 1..=3 {
        let v = c.node(id).get(format!("k{id}")).await.unwrap();
        assert_eq!(v.as_deref(), Some(ROUNDS.to_string().as_bytes()));
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_recovers_data_and_changes_the_proposer_id() {
    let mut c = Cluster::new(3);
    c.start_all().await;
    let leader = c.leader().await;
    c.node(leader).put("durable", "yes").await.unwrap();
    let before: BTreeMap<u64, u64> = c
        .statuses()
        .await
        .iter()
        .map(|s| (s.id, s.proposer))
        .collect();
    for (&id, &p) in &before {
        assert_eq!(p, id << 32 | 1, "first boot of node {id}");
    }
    c.shutdown().await;

    c.start_all().await;
    let after: BTreeMap<u64, u64> = c
        .statuses()
        .await
        .iter()
        .map(|s| (s.id, s.proposer))
        .collect();
    for (&id, &p) in &after {
        assert_eq!(p, id << 32 | 2, "second boot of node {id}");
    }
    c.leader().await;
    for id in 1..=3 {
        let v = c.node(id).get("durable").await.unwrap();
        assert_eq!(v.as_deref(), Some(&b"yes"[..]), "node {id}");
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_is_refused_promptly_not_queued() {
    const FLOOD: usize = 20_000;
    let dir = TempDir::new().unwrap();
    let mut cfg = DriverConfig::new(1, CLUSTER, dir.path(), free_addr());
    cfg.initial_members = vec![1];
    cfg.tick_interval = TICK;
    cfg.max_queued_requests = 16;
    let node = start(cfg).await.unwrap();
    wait_for("single node leads", WAIT, || async {
        (node.status().await.unwrap().role == StateRole::Leader).then_some(())
    })
    .await;

    let started = Instant::now();
    let mut tasks = Vec::with_capacity(FLOOD);
    for i in 0..FLOOD {
        let n = node.clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            (
                n.propose(put_op("flood", &i.to_string())).await,
                t.elapsed(),
            )
        }));
    }
    let (mut ok, mut overloaded) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            (Ok(_), _) => ok += 1,
            (Err(DriverError::Overloaded), waited) => {
                assert!(waited < Duration::from_secs(1), "refusal took {waited:?}");
                overloaded += 1;
            }
            (Err(e), _) => panic!("unexpected: {e}"),
        }
    }
    let elapsed = started.elapsed();
    assert!(ok > 0 && overloaded > 0, "ok {ok}, overloaded {overloaded}");
    assert!(
        elapsed < Duration::from_secs(5),
        "flood took {elapsed:?}: callers waited instead of being refused"
    );
    // Backpressure cleared, the node serves again.
    node.put("after", "flood").await.unwrap();
    assert_eq!(
        node.get("after").await.unwrap().as_deref(),
        Some(&b"flood"[..])
    );
    node.shutdown().await;
    assert!(matches!(
        node.put("x", "y").await,
        Err(DriverError::Stopped)
    ));
}

/// A write that cannot commit (its quorum is gone) is answered `Timeout` at its deadline and
/// forgotten by the core, and a read that cannot be confirmed times out too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_quorum_time_out_and_are_forgotten() {
    let mut c = Cluster::new(3);
    let addrs: BTreeMap<u64, SocketAddr> = (1..=3).map(|id| (id, free_addr())).collect();
    // Two of three members run: a quorum, until one of them stops.
    for id in 1..=2 {
        let mut cfg = DriverConfig::new(id, CLUSTER, c.dirs[&id].path(), addrs[&id]);
        cfg.peers = addrs.iter().map(|(&i, a)| (i, a.to_string())).collect();
        cfg.initial_members = vec![1, 2, 3];
        cfg.tick_interval = TICK;
        cfg.request_timeout = Duration::from_secs(1);
        c.nodes.insert(id, start(cfg).await.unwrap());
    }
    let leader = c.leader().await;
    let other = 3 - leader;
    c.nodes.remove(&other).unwrap().shutdown().await;

    // The leader still leads for at least one election timeout (check-quorum looks back a whole
    // timeout), so it accepts the proposal, which then cannot commit.
    let n = c.node(leader).clone();
    let started = Instant::now();
    let r = n.put("lost", "quorum").await;
    assert!(matches!(r, Err(DriverError::Timeout)), "{r:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(n.status().await.unwrap().pending_requests, 0);
    let r = n.get("lost").await;
    assert!(matches!(r, Err(DriverError::Timeout)), "{r:?}");
    c.shutdown().await;
}
