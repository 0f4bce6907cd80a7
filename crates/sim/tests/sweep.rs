//! The CI sweep: a fixed set of seeds across 3, 5 and 7 nodes with every fault enabled. Any
//! safety violation, linearizability violation or liveness failure fails the test and names the
//! seed to replay with `SIM_SEED=<n> cargo run -p keel-sim --release`.

use keel_sim::linearizability::CheckResult;
use keel_sim::{nodes_for_seed, run_seed, Options, Sim};

/// Enough seeds to cover each fault thousands of times, small enough to run in well under a
/// minute at the test profile's optimisation level on two cores. Override with SIM_SWEEP_SEEDS.
const DEFAULT_SEEDS: u64 = 4000;

#[test]
fn fixed_seed_sweep_has_no_violations() {
    let n: u64 = std::env::var("SIM_SWEEP_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEEDS);
    let mut failed = Vec::new();
    let mut unknown = 0;
    let (mut crashes, mut partitions, mut snapshots, mut conf_changes) = (0, 0, 0, 0);
    for seed in 0..n {
        let r = run_seed(seed);
        crashes += r.stats.crashes;
        partitions += r.stats.partitions;
        snapshots += r.stats.snapshots_installed;
        conf_changes += r.stats.conf_changes;
        if matches!(r.linearizability, CheckResult::Unknown { .. }) {
            unknown += 1;
        }
        if !r.violations.is_empty() || matches!(r.linearizability, CheckResult::Violation { .. }) {
            failed.push(format!(
                "seed {seed}: {:?} {}",
                r.violations, r.linearizability
            ));
        }
    }
    println!(
        "{n} seeds: {crashes} crashes, {partitions} partitions, {snapshots} snapshots \
         installed, {conf_changes} membership changes, {unknown} linearizability unknown"
    );
    assert!(
        failed.is_empty(),
        "{} seeds failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    // The sweep must actually exercise the faults it claims to.
    assert!(crashes > n / 2 && partitions > n / 4 && snapshots > 0 && conf_changes > n / 2);
    // The checker giving up must stay rare, or the sweep proves little.
    assert!(
        unknown * 100 <= n,
        "{unknown} of {n} seeds were too hard to check"
    );
}

#[test]
fn a_seed_replays_exactly() {
    for seed in [3, 4, 5] {
        let a = run_seed(seed);
        let b = run_seed(seed);
        assert_eq!(a.trace_hash, b.trace_hash, "seed {seed} did not replay");
        assert_eq!(a.history_len, b.history_len);
    }
    assert_ne!(run_seed(3).trace_hash, run_seed(6).trace_hash);
}

#[test]
fn without_faults_every_operation_succeeds() {
    for seed in 0..20 {
        let mut o = Options::new(seed, nodes_for_seed(seed));
        o.faults = false;
        o.membership = false;
        let r = Sim::new(o).run();
        assert!(
            r.ok(),
            "seed {seed}: {:?} {}",
            r.violations,
            r.linearizability
        );
        assert_eq!(r.stats.client_timeouts, 0, "seed {seed}: {:?}", r.stats);
        // At most the one op per client still in flight when the run stopped.
        assert!(r.stats.ops_unknown <= 4, "seed {seed}: {:?}", r.stats);
        assert!(r.stats.ops_ok > 100, "seed {seed}: {:?}", r.stats);
    }
}

/// The durability checks can fail: disks that acknowledge syncs without persisting lose
/// acknowledged state at every crash, and the checker must notice in most runs.
#[test]
fn disks_that_lie_about_sync_are_caught() {
    let mut caught = 0;
    for seed in 0..50 {
        let mut o = Options::new(seed, nodes_for_seed(seed));
        o.lying_disks = true;
        let r = Sim::new(o).run();
        if !r.ok() {
            caught += 1;
        }
    }
    assert!(
        caught >= 40,
        "lost writes noticed in only {caught} of 50 runs"
    );
}
