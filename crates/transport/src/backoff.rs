//! Reconnect delays: exponential, capped, with "equal jitter" (half the step fixed, half
//! random).
//!
//! The jitter exists to spread out the redials of several nodes toward one peer that comes
//! back, not to resist an adversary. A SplitMix64 sequence seeded from the (local, peer) id
//! pair is enough for that: two nodes never share a seed because their ids differ, the same
//! pair replays the same delays (log lines and test runs can be reasoned about), and it needs
//! no OS entropy or random-number crate.

use std::time::Duration;

#[derive(Debug)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    /// The un-jittered delay of the next attempt. Invariant: `initial <= step <= max`.
    step: Duration,
    rng: u64,
}

impl Backoff {
    /// `initial <= max` is checked by `Config::validate`.
    pub(crate) fn new(initial: Duration, max: Duration, local: u64, peer: u64) -> Backoff {
        debug_assert!(initial <= max && !initial.is_zero());
        Backoff {
            initial,
            max,
            step: initial,
            rng: local.rotate_left(32) ^ peer ^ 0x6b65_656c_7472_616e,
        }
    }

    /// The delay before the next attempt: uniformly within `[step/2, step]`, then the step
    /// doubles up to `max`.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (step * 2).min(self.max);
        let half = step / 2;
        let spread = (step - half).as_nanos() as u64;
        half + Duration::from_nanos(self.next_u64() % (spread + 1))
    }

    /// After a successful connection the next failure starts over from `initial`.
    pub(crate) fn reset(&mut self) {
        self.step = self.initial;
    }

    fn next_u64(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn grows_doubling_within_jitter_bounds_then_caps() {
        let mut b = Backoff::new(100 * MS, 1000 * MS, 1, 2);
        let steps = [100, 200, 400, 800, 1000, 1000, 1000];
        for s in steps {
            let d = b.next_delay();
            assert!(
                d >= s * MS / 2 && d <= s * MS,
                "{d:?} outside [{}, {s}] ms",
                s / 2
            );
        }
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(10 * MS, 1000 * MS, 1, 2);
        for _ in 0..10 {
            b.next_delay();
        }
        b.reset();
        assert!(b.next_delay() <= 10 * MS);
    }

    #[test]
    fn same_pair_same_delays_other_pair_other_delays() {
        let seq = |l, p| {
            let mut b = Backoff::new(100 * MS, 10_000 * MS, l, p);
            (0..8).map(|_| b.next_delay()).collect::<Vec<_>>()
        };
        assert_eq!(seq(1, 2), seq(1, 2));
        assert_ne!(
            seq(1, 2),
            seq(3, 2),
            "two nodes redialing peer 2 must not move in step"
        );
        assert_ne!(seq(1, 2), seq(2, 1));
    }

    #[test]
    fn jitter_actually_spreads() {
        let mut b = Backoff::new(1000 * MS, 1000 * MS, 7, 9);
        let delays: std::collections::HashSet<_> = (0..32).map(|_| b.next_delay()).collect();
        assert!(delays.len() > 16, "{} distinct delays of 32", delays.len());
    }
}
