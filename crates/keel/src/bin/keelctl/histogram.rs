//! A fixed-size histogram of durations (in microseconds) for `keelctl bench watch`.
//!
//! A fan-out run delivers watchers × writes events: 1,000 watchers at 500 writes/s is half a
//! million lags a second, so keeping every sample (as the request latencies of the other bench
//! ops are kept) would grow by 4 MB a second without bound. A histogram costs the same 15 KB
//! whatever the run's length, and merges by adding counts, so each watch stream keeps its own
//! without sharing a lock.
//!
//! Layout (HdrHistogram's, with 5 bits of precision): values below [`EXACT`] have a bucket
//! each; above, every power of two is split into [`PER_OCTAVE`] equal buckets, so a reported
//! value is at most 1/32 (3.2%) above the true one, and the largest value is kept exactly.

/// Values below this are counted exactly.
const EXACT: u64 = 64;
/// Buckets per power of two above [`EXACT`].
const PER_OCTAVE: u64 = 32;
/// [`EXACT`] exact buckets, then one octave for each of the bit positions 6..=63.
const BUCKETS: usize = EXACT as usize + (64 - 6) * PER_OCTAVE as usize;

pub struct Histogram {
    /// Invariant: `counts.len() == BUCKETS` and the counts add up to `total`.
    counts: Vec<u64>,
    total: u64,
    /// The largest value recorded, exactly: a bucket's upper bound would overstate it.
    max: u64,
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            max: 0,
        }
    }
}

/// The bucket holding `v`. Increasing in `v`.
fn index(v: u64) -> usize {
    if v < EXACT {
        return v as usize;
    }
    // The highest set bit is 6..=63; shifting by `octave` leaves its top 6 bits, 32..=63.
    let octave = 63 - v.leading_zeros() as u64 - 5;
    let top = v >> octave;
    (EXACT + (octave - 1) * PER_OCTAVE + (top - PER_OCTAVE)) as usize
}

/// The largest value that falls in bucket `i`.
fn highest(i: usize) -> u64 {
    let i = i as u64;
    if i < EXACT {
        return i;
    }
    let k = i - EXACT;
    let octave = k / PER_OCTAVE + 1;
    let top = k % PER_OCTAVE + PER_OCTAVE;
    // For the last bucket this is u64::MAX exactly: (63 << 58) + (1 << 58) - 1.
    (top << octave) + ((1u64 << octave) - 1)
}

/// The 1-based nearest rank of percentile `p` (0 to 100) among `n > 0` sorted samples.
pub fn nearest_rank(n: usize, p: f64) -> usize {
    (((p / 100.0) * n as f64).ceil() as usize).clamp(1, n)
}

impl Histogram {
    pub fn record(&mut self, v: u64) {
        self.counts[index(v)] += 1;
        self.total += 1;
        self.max = self.max.max(v);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    /// The nearest-rank percentile `p` (0 to 100), as the highest value of its bucket (never
    /// above the largest recorded); 0 when empty.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = nearest_rank(self.total as usize, p) as u64;
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return highest(i).min(self.max);
            }
        }
        unreachable!("the counts add up to total")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_tile_the_range_in_order() {
        let mut last = 0;
        let probes = (0..5000u64)
            .chain((6..64).flat_map(|b| {
                let p = 1u64 << b;
                [p - 1, p, p + 1, p + p / 3]
            }))
            .chain([u64::MAX - 1, u64::MAX]);
        let mut probes: Vec<u64> = probes.collect();
        probes.sort_unstable();
        for v in probes {
            let i = index(v);
            assert!(i < BUCKETS, "{v} -> {i}");
            assert!(i >= last, "index not increasing at {v}");
            last = i;
            let hi = highest(i);
            assert!(hi >= v, "bucket {i} of {v} ends at {hi}");
            // The bucket's width is at most 1/32 of its values.
            assert!(hi - v <= v / 32, "bucket {i} of {v} too wide: ends at {hi}");
            if i > 0 {
                assert!(highest(i - 1) < v, "{v} belongs below bucket {i}");
            }
        }
        assert_eq!(index(u64::MAX), BUCKETS - 1);
        assert_eq!(highest(BUCKETS - 1), u64::MAX);
    }

    #[test]
    fn small_values_are_exact() {
        let mut h = Histogram::default();
        for v in 1..=50 {
            h.record(v);
        }
        assert_eq!(h.total, 50);
        assert_eq!(h.percentile(50.0), 25);
        assert_eq!(h.percentile(99.0), 50);
        assert_eq!(h.percentile(0.0), 1);
        assert_eq!(h.max(), 50);
    }

    #[test]
    fn percentiles_within_the_bucket_precision() {
        let mut h = Histogram::default();
        for v in 1..=100_000 {
            h.record(v);
        }
        for (p, want) in [(50.0, 50_000u64), (90.0, 90_000), (99.0, 99_000)] {
            let got = h.percentile(p);
            assert!(
                got >= want && got - want <= want / 32,
                "p{p}: {got}, want {want}"
            );
        }
        // The top is the recorded maximum, not its bucket's end.
        assert_eq!(h.percentile(100.0), 100_000);
    }

    #[test]
    fn merge_adds_counts_and_keeps_the_max() {
        let (mut a, mut b) = (Histogram::default(), Histogram::default());
        for _ in 0..99 {
            a.record(10);
        }
        b.record(7_000);
        a.merge(&b);
        assert_eq!(a.total, 100);
        assert_eq!(a.percentile(99.0), 10);
        assert_eq!(a.percentile(100.0), 7_000);
        assert_eq!(a.max(), 7_000);
    }

    #[test]
    fn empty_reports_zero() {
        let h = Histogram::default();
        assert_eq!((h.total, h.percentile(99.0), h.max()), (0, 0, 0));
    }

    #[test]
    fn nearest_rank_matches_its_definition() {
        assert_eq!(nearest_rank(1, 50.0), 1);
        assert_eq!(nearest_rank(10, 50.0), 5);
        assert_eq!(nearest_rank(10, 99.0), 10);
        assert_eq!(nearest_rank(200, 99.0), 198);
        assert_eq!(nearest_rank(10, 0.0), 1);
    }
}
