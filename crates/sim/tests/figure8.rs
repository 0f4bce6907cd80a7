//! Raft paper Figure 8, driven through the simulator: a directed script partitions the cluster
//! at the moments that matter, and the simulator's own safety checker judges the outcome. With
//! the correct commit rule (§5.4.2) the interleaving is harmless; with the planted bug that
//! commits earlier-term entries by counting replicas, the checker must catch a new leader that
//! lacks a committed entry.

use keel_raft::StateRole;
use keel_sim::{Options, Sim, TICK};

const NODES: [u64; 5] = [1, 2, 3, 4, 5];

/// Steps the simulation until `cond` holds or `ticks` pass; returns whether it held.
fn run_until(sim: &mut Sim, ticks: u64, cond: impl Fn(&Sim) -> bool) -> bool {
    let deadline = sim.now() + ticks * TICK;
    while sim.now() < deadline {
        if cond(sim) {
            return true;
        }
        if !sim.step_event() {
            break;
        }
    }
    cond(sim)
}

fn leader_among(sim: &Sim, ids: &[u64]) -> Option<u64> {
    ids.iter()
        .copied()
        .find(|&n| sim.role(n) == Some(StateRole::Leader))
}

enum Outcome {
    /// The script could not set up the interleaving with this seed's timing.
    NotReached(&'static str),
    /// The interleaving happened; these are the checker's findings (empty = safe).
    Reached(Vec<String>),
}

fn figure8(seed: u64, bug: bool) -> Outcome {
    let mut o = Options::new(seed, NODES.len());
    o.faults = false;
    o.membership = false;
    o.clients = 0;
    o.snapshot_every = 0;
    // One entry per append: a leader's earlier-term entries can then reach a follower in a
    // message of their own, ahead of the leader's current-term entry.
    o.max_size_per_msg = 1;
    #[cfg(feature = "bug-injection")]
    {
        o.bugs.commit_old_term_entries = bug;
    }
    #[cfg(not(feature = "bug-injection"))]
    assert!(!bug, "planting the bug needs the bug-injection feature");
    let mut sim = Sim::new(o);

    // (a) S1 leads and everyone has its log.
    sim.campaign(1);
    if !run_until(&mut sim, 40, |s| {
        s.leader() == Some(1)
            && s.committed(1) >= 1
            && NODES.iter().all(|&n| s.last_index(n) == s.last_index(1))
    }) {
        return Outcome::NotReached("S1 did not lead");
    }
    // (b) S1 appends entry i but reaches only S2.
    sim.partition(&[&[1, 2], &[3, 4, 5]]);
    sim.propose_put(1, 1, 100);
    let i = sim.last_index(1);
    let t1 = sim.log_term(1, i);
    if !run_until(&mut sim, 10, |s| s.log_term(2, i) == t1) {
        return Outcome::NotReached("entry i did not reach S2");
    }
    // (c) The majority side elects L2, which is cut off the moment it wins: its own entry at
    // index i (a later term than S1's) stays on it alone.
    if !run_until(&mut sim, 100, |s| leader_among(s, &[3, 4, 5]).is_some()) {
        return Outcome::NotReached("no leader among S3-S5");
    }
    let l2 = leader_among(&sim, &[3, 4, 5]).unwrap();
    sim.isolate(l2);
    let t2 = sim.term(l2);
    if sim.log_term(l2, i) != Some(t2) {
        return Outcome::NotReached("L2 has no entry of its term at i");
    }
    // (d) S1 or S2 becomes leader again (term > t2) and spreads S1's entry i. The instant it
    // considers i committed, it and its partner are cut off from the rest.
    if !run_until(&mut sim, 150, |s| {
        leader_among(s, &[1, 2]).is_some_and(|l| s.term(l) > t2 && s.committed(l) >= i)
    }) {
        return Outcome::NotReached("S1/S2 did not commit i");
    }
    let l3 = leader_among(&sim, &[1, 2]).unwrap();
    let partner = if l3 == 1 { 2 } else { 1 };
    let rest: Vec<u64> = [3, 4, 5].into_iter().filter(|&n| n != l2).collect();
    sim.partition(&[&[l3, partner], &[l2, rest[0], rest[1]]]);
    // (e) L2's side elects a leader. Correct Raft: a node there holds L3's current-term entry,
    // so L2 cannot win and nothing committed is lost. Buggy Raft: L2 may win without entry i.
    run_until(&mut sim, 150, |s| !s.violations().is_empty());
    Outcome::Reached(sim.violations().to_vec())
}

/// Seeds to try: each gives the script different election and message timings.
const SEEDS: u64 = 60;

#[test]
fn figure8_interleaving_is_safe_with_the_current_term_rule() {
    let mut reached = 0;
    let mut missed = std::collections::BTreeMap::new();
    for seed in 0..SEEDS {
        match figure8(seed, false) {
            Outcome::Reached(v) => {
                reached += 1;
                assert!(v.is_empty(), "seed {seed}: {v:?}");
            }
            Outcome::NotReached(why) => *missed.entry(why).or_insert(0) += 1,
        }
    }
    println!("scenario reached in {reached} of {SEEDS} seeds; not reached: {missed:?}");
    // The script must actually produce the interleaving, or this test shows nothing.
    assert!(
        reached >= SEEDS / 2,
        "the scenario was reached in only {reached} seeds"
    );
}

#[cfg(feature = "bug-injection")]
#[test]
fn figure8_bug_is_caught_by_the_checker() {
    let mut caught = Vec::new();
    for seed in 0..SEEDS {
        if let Outcome::Reached(v) = figure8(seed, true) {
            if !v.is_empty() {
                caught.push((seed, v));
            }
        }
    }
    println!("caught in {} of {SEEDS} seeds", caught.len());
    let (seed, v) = caught.first().expect("the Figure 8 bug went unnoticed");
    println!("first at seed {seed}: {v:?}");
    assert!(
        v.iter()
            .any(|s| s.contains("leader completeness") || s.contains("state machine safety")),
        "{v:?}"
    );
}
