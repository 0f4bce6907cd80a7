//! Automatic compaction of the key space's history, as etcd's `--auto-compaction-mode` and
//! `--auto-compaction-retention`. Without it every revision is kept forever: memory, every
//! snapshot and every snapshot sent to a follower grow with the number of writes ever made.
//!
//! Only the leader compacts, through an ordinary `Compact` proposal, so every member drops the
//! same history at the same log index. A node that is not the leader forgets what it sampled:
//! a new leader starts its own window, as etcd's compactor does.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use keel_kv::{CompactRequest, Op};
use keel_raft::StateRole;
use tracing::{debug, info, warn};

use crate::driver::{DriverError, NodeHandle};

/// etcd's check interval in revision mode.
const REVISION_CHECK: Duration = Duration::from_secs(300);

/// Periodic mode samples the revision this many times per retention window (etcd: 10), so
/// compaction lags the window by at most a tenth of it.
const SAMPLES_PER_WINDOW: u32 = 10;

/// The shortest sampling interval: below it the samples cost more than they save.
const MIN_SAMPLE: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoCompaction {
    /// Keep the revisions of the last `Duration`.
    Periodic(Duration),
    /// Keep the last `n` revisions (checked every 5 minutes, as etcd).
    Revision(i64),
}

/// Where compaction should go now, from samples of (time, revision), newest last.
/// Periodic: the newest revision sampled at least `window` ago. Pure, for tests.
pub fn periodic_target(samples: &VecDeque<(Instant, i64)>, now: Instant, window: Duration) -> i64 {
    samples
        .iter()
        .rev()
        .find(|(t, _)| now.saturating_duration_since(*t) >= window)
        .map_or(0, |&(_, r)| r)
}

/// Revision mode: keep `keep` revisions below `current`.
pub fn revision_target(current: i64, keep: i64) -> i64 {
    current.saturating_sub(keep)
}

/// Runs until the node stops. Spawn it on the node's runtime.
pub async fn run(node: NodeHandle, mode: AutoCompaction) {
    let every = match mode {
        AutoCompaction::Periodic(w) => (w / SAMPLES_PER_WINDOW).max(MIN_SAMPLE),
        AutoCompaction::Revision(_) => REVISION_CHECK,
    };
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Invariant: at most SAMPLES_PER_WINDOW + 1 samples, oldest first; the oldest one is the
    // newest that is at least a window old (or there is none yet).
    let mut samples: VecDeque<(Instant, i64)> = VecDeque::new();
    let mut compacted = 0i64;
    loop {
        ticks.tick().await;
        let st = match node.status().await {
            Ok(st) => st,
            Err(DriverError::Stopped) => return,
            Err(e) => {
                debug!("auto-compaction: no status ({e})");
                continue;
            }
        };
        if st.role != StateRole::Leader {
            samples.clear();
            continue;
        }
        let rev = match node.revision().await {
            Ok(r) => r,
            Err(DriverError::Stopped) => return,
            Err(_) => continue,
        };
        let now = Instant::now();
        let target = match mode {
            AutoCompaction::Periodic(window) => {
                samples.push_back((now, rev));
                let t = periodic_target(&samples, now, window);
                while samples.len() > 1 && now.saturating_duration_since(samples[1].0) >= window {
                    samples.pop_front();
                }
                while samples.len() > SAMPLES_PER_WINDOW as usize + 1 {
                    samples.pop_front();
                }
                t
            }
            AutoCompaction::Revision(keep) => revision_target(rev, keep),
        };
        if target <= compacted || target <= 1 {
            continue;
        }
        match node
            .propose(Op::Compact(CompactRequest { revision: target }))
            .await
        {
            Ok(_) => {
                info!(
                    node = node.id(),
                    "auto-compaction: compacted to revision {target}"
                );
                compacted = target;
            }
            // Someone compacted past it already (etcdctl compaction): nothing to do.
            Err(DriverError::Kv(keel_kv::Error::Compacted)) => compacted = target,
            Err(DriverError::Stopped) => return,
            Err(e) => warn!(
                node = node.id(),
                "auto-compaction to revision {target} failed: {e}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periodic_target_is_the_newest_sample_a_window_old() {
        let t0 = Instant::now();
        let s = |secs: u64, rev: i64| (t0 + Duration::from_secs(secs), rev);
        let samples: VecDeque<_> = [s(0, 10), s(1, 20), s(2, 30), s(3, 40)].into();
        let w = Duration::from_secs(2);
        assert_eq!(
            periodic_target(&samples, t0 + Duration::from_secs(3), w),
            20
        );
        assert_eq!(periodic_target(&samples, t0 + Duration::from_secs(1), w), 0);
        assert_eq!(
            periodic_target(&samples, t0 + Duration::from_secs(9), w),
            40
        );
    }

    #[test]
    fn revision_target_keeps_the_last_n() {
        assert_eq!(revision_target(100, 30), 70);
        assert_eq!(revision_target(10, 30), -20);
    }
}
