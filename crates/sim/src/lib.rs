//! Keel's deterministic simulator: Raft nodes, a replicated KV, simulated network and disk,
//! faults, safety checks and a linearizability checker, all driven by one seed.

pub mod check;
pub mod linearizability;
pub mod rng;
pub mod sim;

pub use sim::{Options, Report, Sim, Stats, TICK};

/// FNV-1a: a small, stable hash for event traces and state digests (std's hasher is randomly
/// keyed per process, which would break replay).
#[derive(Debug, Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn write_bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= x as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01B3);
        }
    }

    pub fn write_u64(&mut self, v: u64) {
        self.write_bytes(&v.to_le_bytes());
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// The cluster size a seed runs with: sweeps cover 3, 5 and 7 nodes evenly.
pub fn nodes_for_seed(seed: u64) -> usize {
    [3, 5, 7][(seed % 3) as usize]
}

/// Runs one seed with the default scenario.
pub fn run_seed(seed: u64) -> Report {
    Sim::new(Options::new(seed, nodes_for_seed(seed))).run()
}
