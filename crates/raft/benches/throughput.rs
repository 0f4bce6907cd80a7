//! Throughput of the consensus core alone: a 3-node cluster with in-memory storage and messages
//! handed over in-process (no network, no disk, no faults), so the figure is the ceiling the core
//! itself puts on a server.
//!
//! Measures entries per second committed on the leader and applied on all three nodes, for
//! single-entry proposals and for `propose_batch` of 64 entries, 256-byte payloads, with several
//! proposals kept in flight. Run: `cargo bench -p keel-raft --bench throughput`.
//! `BENCH_SECS=<s>` changes the measured time per configuration (default 4).

use bytes::Bytes;
use keel_raft::raftpb::Message;
use keel_raft::{Config, MemStorage, RawNode, StateRole};
use std::time::{Duration, Instant};

const PAYLOAD: usize = 256;
const NODES: u64 = 3;
/// Entries kept in the log behind the applied index when compacting; far more than a follower
/// lags in-process, so no snapshot is ever needed.
const KEEP: u64 = 100_000;

struct Bench {
    nodes: Vec<RawNode<MemStorage>>,
    net: Vec<Message>,
    /// Entries with a payload applied, per node.
    applied: Vec<u64>,
    leader_committed: u64,
}

impl Bench {
    fn new() -> Self {
        let ids: Vec<u64> = (1..=NODES).collect();
        let nodes = ids
            .iter()
            .map(|&id| {
                let mut cfg = Config::new(id);
                // The pipeline needs room: up to 16 batches of 64 entries of ~270 bytes in flight.
                cfg.max_inflight_msgs = 256;
                let store = MemStorage::new_with_conf_state(ids.clone(), vec![]);
                RawNode::new(&cfg, store).expect("valid config")
            })
            .collect();
        Bench {
            nodes,
            net: Vec::new(),
            applied: vec![0; NODES as usize],
            leader_committed: 0,
        }
    }

    /// One round: every node handles its Ready (persist, send, apply, advance), then every
    /// message is delivered.
    fn round(&mut self) {
        for (i, n) in self.nodes.iter_mut().enumerate() {
            if !n.has_ready() {
                continue;
            }
            let mut rd = n.ready();
            let store = n.store_mut();
            if let Some(s) = rd.snapshot.take() {
                store.apply_snapshot(s).expect("snapshot");
            }
            store.append(&rd.entries).expect("append");
            if let Some(hs) = rd.hard_state {
                store.set_hard_state(hs);
            }
            self.net.append(&mut rd.messages);
            self.net.append(&mut rd.persisted_messages);
            let applied = rd
                .committed_entries
                .iter()
                .filter(|e| !e.data.is_empty())
                .count() as u64;
            self.applied[i] += applied;
            if n.raft.role == StateRole::Leader {
                self.leader_committed += applied;
            }
            if let Some(last) = rd.committed_entries.last() {
                let last = last.index;
                if last % 65_536 < rd.committed_entries.len() as u64 && last > KEEP {
                    let cs = n.status().conf_state;
                    let store = n.store_mut();
                    store
                        .create_snapshot(last - KEEP, cs, Bytes::new())
                        .expect("snapshot");
                    store.compact(last - KEEP).expect("compact");
                }
            }
            n.advance(rd.number);
        }
        for m in self.net.drain(..) {
            let to = (m.to - 1) as usize;
            // Every message is well formed; a refusal here would be a bug worth seeing.
            self.nodes[to].step(m).expect("step");
        }
    }

    fn idle(&self) -> bool {
        self.net.is_empty() && self.nodes.iter().all(|n| !n.has_ready())
    }

    fn elect(&mut self) {
        self.nodes[0].campaign().expect("campaign");
        while !self.idle() {
            self.round();
        }
        assert_eq!(self.nodes[0].raft.role, StateRole::Leader);
    }

    fn applied_on_all(&self) -> u64 {
        *self.applied.iter().min().expect("nodes")
    }
}

struct Figures {
    secs: f64,
    committed: u64,
    applied_on_all: u64,
}

/// Proposes `batch` entries at a time, keeping `window` proposals in flight, for `dur`.
fn run(batch: usize, window: u64, dur: Duration) -> Figures {
    let mut b = Bench::new();
    b.elect();
    let payload = Bytes::from(vec![0xAB; PAYLOAD]);
    let mut proposed = 0u64;
    let mut start = Instant::now();
    let warmup = Duration::from_millis(500);
    let mut warm = false;
    let (mut base_committed, mut base_applied) = (0, 0);
    loop {
        while proposed - b.leader_committed < window * batch as u64 {
            let data = vec![payload.clone(); batch];
            b.nodes[0].propose_batch(data).expect("propose");
            proposed += batch as u64;
        }
        b.round();
        let elapsed = start.elapsed();
        if !warm && elapsed >= warmup {
            warm = true;
            start = Instant::now();
            base_committed = b.leader_committed;
            base_applied = b.applied_on_all();
        } else if warm && elapsed >= dur {
            return Figures {
                secs: elapsed.as_secs_f64(),
                committed: b.leader_committed - base_committed,
                applied_on_all: b.applied_on_all() - base_applied,
            };
        }
    }
}

fn main() {
    let secs = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4.0);
    let dur = Duration::from_secs_f64(secs);
    println!("keel-raft throughput: {NODES} nodes in-process, MemStorage, {PAYLOAD}-byte payloads");
    for (batch, window) in [(1usize, 64u64), (64, 8)] {
        let f = run(batch, window, dur);
        println!(
            "batch {batch:>2} ({window} proposals in flight): {:>10.0} entries/s committed on the \
             leader, {:>10.0} entries/s applied on all {NODES} ({} entries in {:.2} s)",
            f.committed as f64 / f.secs,
            f.applied_on_all as f64 / f.secs,
            f.applied_on_all,
            f.secs
        );
    }
}
