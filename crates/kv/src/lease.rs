//! Leases as data. Time is not the store's: the node layer runs the clock on the leader and
//! proposes a `LeaseRevoke` when a lease expires, and `LeaseCheckpoint`s so a new leader does not
//! restart every lease at its full TTL. The store records grants, checkpoints and which keys each
//! lease holds.

use std::collections::BTreeSet;

use bytes::Bytes;

use crate::hash::lease_hash;
use crate::store::{Lease, Store};
use crate::types::{
    Event, LeaseCheckpointRequest, LeaseCheckpointResponse, LeaseGrantRequest, LeaseGrantResponse,
    LeaseInfo, LeaseRevokeRequest, LeaseRevokeResponse,
};
use crate::{Error, MAX_LEASE_TTL};

impl Store {
    pub(crate) fn apply_lease_grant(
        &mut self,
        g: &LeaseGrantRequest,
    ) -> Result<LeaseGrantResponse, Error> {
        if g.ttl > MAX_LEASE_TTL {
            return Err(Error::LeaseTtlTooLarge);
        }
        let id = match g.id {
            0 => self.take_free_lease_id(),
            id if self.leases.contains_key(&id) => return Err(Error::LeaseExists),
            id => id,
        };
        self.leases.insert(
            id,
            Lease {
                ttl: g.ttl,
                granted_ttl: g.ttl,
                keys: BTreeSet::new(),
            },
        );
        self.lease_hash = self.lease_hash.wrapping_add(lease_hash(id, g.ttl, g.ttl));
        Ok(LeaseGrantResponse {
            revision: self.revision,
            id,
            ttl: g.ttl,
        })
    }

    /// The lowest free id at or after the counter, wrapping to 1 after `i64::MAX`; only positive
    /// ids, as etcd's generator gives. Terminates: fewer than `i64::MAX` leases can exist.
    fn take_free_lease_id(&mut self) -> i64 {
        let mut id = self.next_lease_id;
        while self.leases.contains_key(&id) {
            id = id.checked_add(1).unwrap_or(1);
        }
        self.next_lease_id = id.checked_add(1).unwrap_or(1);
        id
    }

    /// Deletes the lease's keys (in key order, like etcd) at one revision, then the lease.
    pub(crate) fn apply_lease_revoke(
        &mut self,
        r: &LeaseRevokeRequest,
    ) -> Result<(LeaseRevokeResponse, Vec<Event>), Error> {
        let lease = self.leases.remove(&r.id).ok_or(Error::LeaseNotFound)?;
        self.lease_hash =
            self.lease_hash
                .wrapping_sub(lease_hash(r.id, lease.ttl, lease.granted_ttl));
        let mut w = self.begin();
        for key in &lease.keys {
            self.delete_key(&mut w, key);
        }
        let events = self.end(w);
        Ok((
            LeaseRevokeResponse {
                revision: self.revision,
            },
            events,
        ))
    }

    pub(crate) fn apply_lease_checkpoint(
        &mut self,
        c: &LeaseCheckpointRequest,
    ) -> LeaseCheckpointResponse {
        for cp in &c.checkpoints {
            if let Some(lease) = self.leases.get_mut(&cp.id) {
                let old = lease_hash(cp.id, lease.ttl, lease.granted_ttl);
                lease.ttl = cp.remaining_ttl;
                let new = lease_hash(cp.id, lease.ttl, lease.granted_ttl);
                self.lease_hash = self.lease_hash.wrapping_sub(old).wrapping_add(new);
            }
        }
        LeaseCheckpointResponse {
            revision: self.revision,
        }
    }

    /// Lease 0 means "no lease"; a missing lease cannot occur for a checked put, and a revoked one
    /// has just been removed, in which case there is nothing to update.
    pub(crate) fn attach(&mut self, lease: i64, key: &Bytes) {
        if let Some(l) = self.leases.get_mut(&lease) {
            l.keys.insert(key.clone());
        }
    }

    pub(crate) fn detach(&mut self, lease: i64, key: &Bytes) {
        if let Some(l) = self.leases.get_mut(&lease) {
            l.keys.remove(key);
        }
    }

    pub fn lease(&self, id: i64) -> Option<LeaseInfo> {
        self.leases.get(&id).map(|l| LeaseInfo {
            id,
            ttl: l.ttl,
            granted_ttl: l.granted_ttl,
        })
    }

    /// The live keys attached to a lease, in key order.
    pub fn lease_keys(&self, id: i64) -> Option<Vec<Bytes>> {
        self.leases
            .get(&id)
            .map(|l| l.keys.iter().cloned().collect())
    }

    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// Every lease, by id: what a new leader needs to start its expiry clock.
    pub fn leases(&self) -> Vec<LeaseInfo> {
        self.leases
            .iter()
            .map(|(&id, l)| LeaseInfo {
                id,
                ttl: l.ttl,
                granted_ttl: l.granted_ttl,
            })
            .collect()
    }
}
