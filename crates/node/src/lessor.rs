//! The leader's lease clock. Leases are data in the state machine (grants, revokes, attached
//! keys); time is not, since members apply at different moments. So the leader alone keeps a
//! deadline per lease, renews it on keep-alives, and proposes a revoke through Raft once it
//! passes. Followers keep no deadlines: a new leader starts every lease afresh from what the
//! store holds, extended by an election timeout (as etcd's `Promote`), so a lease never expires
//! early because leadership moved, at the cost of living up to one TTL longer.
//!
//! Pure: the caller passes the time in, so tests drive it without a clock.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use keel_kv::LeaseInfo;

/// Revokes proposed per call of [`Lessor::expired`] (one call per tick: 1,000/s at 100 ms
/// ticks), as etcd's `leaseRevokeRate`: when many leases fall due at once (a leader that
/// inherited them all at the same moment) the log takes their revokes at a bounded rate.
pub const MAX_REVOKES_PER_TICK: usize = 100;

/// How long a proposed revoke may stay unapplied before it is proposed again (it may have been
/// dropped by a leader change in flight).
pub const REVOKE_RETRY: Duration = Duration::from_secs(3);

/// A grant or revoke applied to the store, as the lessor needs to hear of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseChange {
    Granted {
        id: i64,
        ttl: i64,
    },
    Revoked {
        id: i64,
    },
    /// A snapshot replaced the store: start again from its leases.
    Reset,
}

#[derive(Debug, Default)]
pub struct Lessor {
    /// Only the leader keeps deadlines. Invariant: empty when not primary.
    primary: bool,
    /// Lease id -> (deadline, granted TTL in seconds).
    leases: HashMap<i64, (Instant, i64)>,
    /// The same deadlines, ordered, to find the due ones without a scan. Invariant: holds
    /// exactly `(deadline, id)` for every entry of `leases`.
    by_deadline: BTreeSet<(Instant, i64)>,
    /// Leases whose revoke was proposed, and when.
    revoking: HashMap<i64, Instant>,
}

fn secs(s: i64) -> Duration {
    Duration::from_secs(s.max(0) as u64)
}

impl Lessor {
    pub fn is_primary(&self) -> bool {
        self.primary
    }

    /// This node became leader: every lease in the store gets its remaining TTL (the granted one
    /// unless a checkpoint recorded less) plus `extend` from now.
    pub fn promote(&mut self, now: Instant, leases: &[LeaseInfo], extend: Duration) {
        self.demote();
        self.primary = true;
        for l in leases {
            self.set(l.id, now + extend + secs(l.ttl), l.granted_ttl);
        }
    }

    pub fn demote(&mut self) {
        self.primary = false;
        self.leases.clear();
        self.by_deadline.clear();
        self.revoking.clear();
    }

    fn set(&mut self, id: i64, deadline: Instant, granted: i64) {
        if let Some((old, _)) = self.leases.insert(id, (deadline, granted)) {
            self.by_deadline.remove(&(old, id));
        }
        self.by_deadline.insert((deadline, id));
    }

    fn remove(&mut self, id: i64) {
        if let Some((old, _)) = self.leases.remove(&id) {
            self.by_deadline.remove(&(old, id));
        }
        self.revoking.remove(&id);
    }

    /// What the store applied. Followers ignore it (a promotion reads the store afresh); the
    /// caller passes the store's leases for a reset.
    pub fn applied(&mut self, now: Instant, change: LeaseChange, leases: &[LeaseInfo]) {
        if !self.primary {
            return;
        }
        match change {
            LeaseChange::Granted { id, ttl } => self.set(id, now + secs(ttl), ttl),
            LeaseChange::Revoked { id } => self.remove(id),
            LeaseChange::Reset => self.promote(now, leases, Duration::ZERO),
        }
    }

    /// A keep-alive: the lease lives its granted TTL from now. Returns that TTL, or `None` when
    /// the lease is unknown or already past its deadline (its revoke is coming; etcd refuses to
    /// renew it too).
    pub fn renew(&mut self, now: Instant, id: i64) -> Option<i64> {
        let &(deadline, granted) = self.leases.get(&id)?;
        if deadline <= now {
            return None;
        }
        self.set(id, now + secs(granted), granted);
        Some(granted)
    }

    /// Seconds left, rounded up as etcd does; 0 once due. `None` for an unknown lease.
    pub fn remaining(&self, now: Instant, id: i64) -> Option<i64> {
        let &(deadline, _) = self.leases.get(&id)?;
        let left = deadline.saturating_duration_since(now);
        Some(left.as_secs() as i64 + i64::from(left.subsec_nanos() > 0))
    }

    /// Leases past their deadline whose revoke should be proposed now: at most
    /// [`MAX_REVOKES_PER_TICK`], skipping those proposed less than [`REVOKE_RETRY`] ago.
    pub fn expired(&mut self, now: Instant) -> Vec<i64> {
        let mut due = Vec::new();
        for &(deadline, id) in &self.by_deadline {
            if deadline > now || due.len() == MAX_REVOKES_PER_TICK {
                break;
            }
            match self.revoking.get(&id) {
                Some(&at) if now.saturating_duration_since(at) < REVOKE_RETRY => {}
                _ => due.push(id),
            }
        }
        for &id in &due {
            self.revoking.insert(id, now);
        }
        due
    }

    pub fn len(&self) -> usize {
        self.leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: i64, ttl: i64) -> LeaseInfo {
        LeaseInfo {
            id,
            ttl,
            granted_ttl: ttl,
        }
    }

    #[test]
    fn a_follower_keeps_no_clock() {
        let t0 = Instant::now();
        let mut l = Lessor::default();
        l.applied(t0, LeaseChange::Granted { id: 1, ttl: 5 }, &[]);
        assert!(l.is_empty());
        assert_eq!(l.renew(t0, 1), None);
        assert!(l.expired(t0 + secs(100)).is_empty());
    }

    #[test]
    fn grant_renew_expire_and_revoke_on_the_leader() {
        let t0 = Instant::now();
        let mut l = Lessor::default();
        l.promote(t0, &[], Duration::ZERO);
        l.applied(t0, LeaseChange::Granted { id: 7, ttl: 10 }, &[]);
        assert_eq!(l.remaining(t0 + Duration::from_millis(1500), 7), Some(9));
        assert!(l.expired(t0 + secs(9)).is_empty());
        // Renewed at 9 s: lives to 19 s.
        assert_eq!(l.renew(t0 + secs(9), 7), Some(10));
        assert!(l.expired(t0 + secs(18)).is_empty());
        assert_eq!(l.expired(t0 + secs(19)), vec![7]);
        // Proposed: not again until the retry interval, and no renewal once due.
        assert!(l.expired(t0 + secs(20)).is_empty());
        assert_eq!(l.renew(t0 + secs(20), 7), None);
        assert_eq!(l.expired(t0 + secs(19) + REVOKE_RETRY), vec![7]);
        l.applied(t0 + secs(23), LeaseChange::Revoked { id: 7 }, &[]);
        assert!(l.is_empty());
        assert_eq!(l.remaining(t0, 7), None);
    }

    #[test]
    fn a_new_leader_extends_every_lease_by_the_election_timeout() {
        let t0 = Instant::now();
        let mut l = Lessor::default();
        let checkpointed = LeaseInfo {
            id: 2,
            ttl: 3,
            granted_ttl: 60,
        };
        l.promote(t0, &[info(1, 5), checkpointed], secs(1));
        assert_eq!(l.remaining(t0, 1), Some(6));
        assert_eq!(l.remaining(t0, 2), Some(4));
        assert!(l.expired(t0 + Duration::from_millis(3999)).is_empty());
        assert_eq!(l.expired(t0 + secs(4)), vec![2]);
        // A renewal restores the granted TTL, not the checkpointed one.
        assert_eq!(l.renew(t0 + secs(1), 1), Some(5));
        l.demote();
        assert!(l.is_empty() && !l.is_primary());
    }

    #[test]
    fn revokes_are_proposed_at_a_bounded_rate_oldest_first() {
        let t0 = Instant::now();
        let mut l = Lessor::default();
        let many: Vec<_> = (1..=250).map(|id| info(id, 1 + id % 3)).collect();
        l.promote(t0, &many, Duration::ZERO);
        let now = t0 + secs(10);
        let first = l.expired(now);
        assert_eq!(first.len(), MAX_REVOKES_PER_TICK);
        // TTL 1 leases (ids with id % 3 == 0) are due first.
        assert!(first[..83].iter().all(|id| id % 3 == 0));
        let second = l.expired(now);
        let third = l.expired(now);
        assert_eq!((second.len(), third.len()), (100, 50));
        let mut all: Vec<_> = first.into_iter().chain(second).chain(third).collect();
        all.sort_unstable();
        assert_eq!(all, (1..=250).collect::<Vec<_>>());
    }

    #[test]
    fn a_reset_reloads_the_leases_of_the_new_store() {
        let t0 = Instant::now();
        let mut l = Lessor::default();
        l.promote(t0, &[info(1, 5)], Duration::ZERO);
        l.applied(t0, LeaseChange::Reset, &[info(2, 8)]);
        assert_eq!(l.remaining(t0, 1), None);
        assert_eq!(l.remaining(t0, 2), Some(8));
        assert!(l.is_primary());
    }
}
