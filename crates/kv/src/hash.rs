//! Hashes for comparing members. They catch divergence, not adversaries: not cryptographic, but
//! identical on every platform (fixed byte order, no `Hash` trait, whose output Rust does not
//! promise to keep stable).

use crate::store::Store;
use crate::types::{HashKv, KeyValue};
use crate::Error;

/// A bijective mixer in which every input bit flips about half the output bits (the splitmix64
/// finaliser), so that wrapping sums of mixed values do not cancel by structure.
pub(crate) fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// One live version's contribution to `Store::hash`. Key and value get a CRC each
/// (hardware-accelerated, so the hot path pays little even for large values) and the integer fields
/// are folded in through the mixer.
pub(crate) fn kv_hash(kv: &KeyValue) -> u64 {
    let data = (u64::from(crc32c::crc32c(&kv.key)) << 32) | u64::from(crc32c::crc32c(&kv.value));
    let mut h = mix64(data);
    for field in [kv.create_revision, kv.mod_revision, kv.version, kv.lease] {
        h = mix64(h ^ field as u64);
    }
    h
}

pub(crate) fn lease_hash(id: i64, ttl: i64, granted_ttl: i64) -> u64 {
    // A distinct starting point keeps a lease from ever hashing like a key-value.
    let mut h = mix64(0x006c_6561_7365_u64 ^ id as u64);
    h = mix64(h ^ ttl as u64);
    mix64(h ^ granted_ttl as u64)
}

impl Store {
    /// A hash of the current state: live keys with all their fields, leases, the revision and the
    /// compaction point. Constant time (maintained on every write), so a simulator can compare
    /// members after every step. History is not covered: see [`Store::hash_kv`].
    pub fn hash(&self) -> u64 {
        let mut h = mix64(self.live_hash);
        h = mix64(h ^ self.lease_hash);
        h = mix64(h ^ self.revision as u64);
        mix64(h ^ self.compact_revision as u64)
    }

    /// etcd's HashKV: a CRC-32C of every history entry at or below `revision` (0 = current) that
    /// the store still holds, key by key in order. Members compact at the same revisions through
    /// the log, so equal members give equal hashes for any revision both can serve.
    pub fn hash_kv(&self, revision: i64) -> Result<HashKv, Error> {
        self.check_read_revision(revision, self.revision)?;
        let rev = if revision > 0 {
            revision
        } else {
            self.revision
        };
        let mut crc = 0u32;
        for (key, hist) in &self.keys {
            for e in hist.iter().take_while(|e| e.mod_revision <= rev) {
                // Lengths first, so that no two different entries feed the same byte stream.
                crc = crc32c::crc32c_append(crc, &(key.len() as u64).to_le_bytes());
                crc = crc32c::crc32c_append(crc, key);
                let mut fixed = [0u8; 44];
                fixed[0..8].copy_from_slice(&e.mod_revision.to_le_bytes());
                fixed[8..12].copy_from_slice(&e.sub.to_le_bytes());
                fixed[12..20].copy_from_slice(&e.create_revision.to_le_bytes());
                fixed[20..28].copy_from_slice(&e.version.to_le_bytes());
                fixed[28..36].copy_from_slice(&e.lease.to_le_bytes());
                fixed[36..44].copy_from_slice(&(e.value.len() as u64).to_le_bytes());
                crc = crc32c::crc32c_append(crc, &fixed);
                crc = crc32c::crc32c_append(crc, &e.value);
            }
        }
        Ok(HashKv {
            hash: crc,
            compact_revision: self.compact_revision,
            hash_revision: rev,
        })
    }
}
