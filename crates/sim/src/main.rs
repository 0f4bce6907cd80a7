//! Seed sweeps: `cargo run -p keel-sim --release -- --seeds 100000`.
//! `SIM_SEED=<n>` replays one seed with a trace of what happened.

use keel_sim::{nodes_for_seed, Options, Report, Sim, Stats};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

fn usage() -> ! {
    eprintln!(
        "usage: keel-sim [--seeds N] [--start S] [--threads T] [--ticks K] [--nodes N] \
         [--max-msg BYTES] [--fault-rate F] [--clients C] [--keys K] [--no-faults] [--bug vote-twice|read-without-heartbeat|commit-old-term]"
    );
    eprintln!("       SIM_SEED=<n> keel-sim    (replay one seed with a trace)");
    std::process::exit(2)
}

fn main() {
    let mut seeds = 1000u64;
    let mut start = 0u64;
    let mut ticks = None;
    let mut nodes = None;
    let mut max_msg = None;
    let mut fault_rate = 1.0f64;
    let mut clients = None;
    let mut keys = None;
    let mut no_faults = false;
    #[allow(unused_mut)]
    let mut bug = String::new();
    let mut threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || -> u64 {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| usage())
        };
        match a.as_str() {
            "--seeds" => seeds = val(),
            "--start" => start = val(),
            "--threads" => threads = val().max(1) as usize,
            "--ticks" => ticks = Some(val()),
            "--nodes" => nodes = Some(val() as usize),
            "--max-msg" => max_msg = Some(val()),
            "--clients" => clients = Some(val() as usize),
            "--keys" => keys = Some(val()),
            "--fault-rate" => {
                fault_rate = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            "--bug" => bug = args.next().unwrap_or_else(|| usage()),
            "--no-faults" => no_faults = true,
            _ => usage(),
        }
    }
    let options = |seed: u64| -> Options {
        let mut o = Options::new(seed, nodes.unwrap_or_else(|| nodes_for_seed(seed)));
        if let Some(t) = ticks {
            o.ticks = t;
        }
        if let Some(m) = max_msg {
            o.max_size_per_msg = m;
        }
        o.fault_rate = fault_rate;
        if no_faults {
            o.faults = false;
            o.membership = false;
        }
        if let Some(c) = clients {
            o.clients = c;
        }
        if let Some(k) = keys {
            o.keys = k;
        }
        set_bug(&mut o, &bug);
        o
    };
    if let Ok(s) = std::env::var("SIM_SEED") {
        let seed: u64 = s.parse().unwrap_or_else(|_| usage());
        let mut o = options(seed);
        o.trace = true;
        let r = Sim::new(o).run();
        print_report(&r);
        std::process::exit(if r.ok() { 0 } else { 1 });
    }

    let next = AtomicU64::new(start);
    let end = start + seeds;
    let failures: Mutex<Vec<Report>> = Mutex::new(Vec::new());
    let totals: Mutex<Stats> = Mutex::new(Stats::default());
    let unknown = AtomicU64::new(0);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= end {
                    return;
                }
                let o = options(seed);
                let r = match std::panic::catch_unwind(|| Sim::new(o).run()) {
                    Ok(r) => r,
                    Err(e) => {
                        let msg = e
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default();
                        panicked(seed, msg)
                    }
                };
                totals.lock().unwrap().add(&r.stats);
                if matches!(
                    r.linearizability,
                    keel_sim::linearizability::CheckResult::Unknown { .. }
                ) {
                    unknown.fetch_add(1, Ordering::Relaxed);
                }
                if !r.violations.is_empty()
                    || matches!(
                        r.linearizability,
                        keel_sim::linearizability::CheckResult::Violation { .. }
                    )
                {
                    eprintln!("seed {seed} FAILED (replay with SIM_SEED={seed})");
                    failures.lock().unwrap().push(r);
                }
            });
        }
    });
    let secs = t0.elapsed().as_secs_f64();
    let failures = failures.into_inner().unwrap();
    let t = totals.into_inner().unwrap();
    println!(
        "{seeds} seeds ({start}..{end}) in {secs:.1} s on {threads} threads: {:.1} seeds/s",
        seeds as f64 / secs
    );
    println!(
        "faults: {} crashes ({} with a write in flight), {} restarts, {} partitions, {} one-way cuts, \
         {} pauses, {} slow-disk toggles, {} slow-clock toggles, {} membership changes",
        t.crashes,
        t.torn_writes,
        t.restarts,
        t.partitions,
        t.one_way_partitions,
        t.pauses,
        t.slow_disks,
        t.slow_clocks,
        t.conf_changes
    );
    println!(
        "network: {} messages, {} dropped, {} duplicated, {} delayed",
        t.msgs_sent, t.msgs_dropped, t.msgs_duplicated, t.msgs_delayed
    );
    println!(
        "raft: {} leader elections, {} snapshots taken, {} installed",
        t.leader_changes, t.snapshots_taken, t.snapshots_installed
    );
    println!(
        "disk (real WAL on a simulated file system): {} injected ENOSPC/EIO faults, {} \
         restarts whose recovery cut a torn tail",
        t.disk_faults, t.torn_tails_cut
    );
    println!(
        "clients: {} ok, {} refused, {} unknown outcome; linearizability unknown (bound hit) in \
         {} seeds",
        t.ops_ok,
        t.ops_failed,
        t.ops_unknown,
        unknown.load(Ordering::Relaxed)
    );
    for r in &failures {
        print_report(r);
    }
    println!(
        "{} passed, {} failed",
        seeds - failures.len() as u64,
        failures.len()
    );
    if !failures.is_empty() {
        std::process::exit(1);
    }
}

#[cfg(feature = "bug-injection")]
fn set_bug(o: &mut Options, bug: &str) {
    match bug {
        "" => {}
        "vote-twice" => o.bugs.vote_twice = true,
        "read-without-heartbeat" => o.bugs.read_index_without_heartbeat = true,
        "commit-old-term" => o.bugs.commit_old_term_entries = true,
        _ => usage(),
    }
}

#[cfg(not(feature = "bug-injection"))]
fn set_bug(_: &mut Options, bug: &str) {
    if !bug.is_empty() {
        eprintln!("--bug needs a build with --features bug-injection");
        std::process::exit(2);
    }
}

/// A panic in the core or the simulator is a failure of that seed like any other.
fn panicked(seed: u64, msg: String) -> Report {
    Report {
        seed,
        trace_hash: 0,
        violations: vec![format!("panic: {msg}")],
        linearizability: keel_sim::linearizability::CheckResult::Ok,
        stats: Stats::default(),
        history_len: 0,
    }
}

fn print_report(r: &Report) {
    println!(
        "seed {}: trace hash {:016x}, {} ops, {}",
        r.seed, r.trace_hash, r.history_len, r.linearizability
    );
    for v in &r.violations {
        println!("  violation: {v}");
    }
    println!("  {:?}", r.stats);
}
