//! Snapshot: the whole store as bytes, and back.
//!
//! Layout: magic `KEELKVSN` | format version (u32 LE) | body | CRC-32C (u32 LE) of everything
//! before it. The body (varints, as in `codec`) holds the applied index, revision, compaction
//! point, lease-id counter, every key's history at or above the compaction point, the leases, and
//! the dedup table. Derived state (the revision log, lease key sets, counters and hashes) is
//! rebuilt on restore rather than stored, so it cannot disagree with what it derives from.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use crate::codec::{put_bytes, put_ivarint, put_uvarint, Reader};
use crate::dedup::Dedup;
use crate::hash::{kv_hash, lease_hash};
use crate::store::{Entry, Keys, Lease, LogRef, Store};
use crate::DecodeError;

const MAGIC: [u8; 8] = *b"KEELKVSN";

/// Bumped on any change to the layout; `restore` refuses other versions.
pub const SNAPSHOT_FORMAT_VERSION: u32 = 1;

/// No store gets anywhere near 2^62 writes; refusing more keeps every `revision + n` in apply from
/// overflowing whatever a (well-sealed but forged) snapshot says.
const MAX_REVISION: i64 = 1 << 62;

const HEADER_LEN: usize = MAGIC.len() + 4;
const CRC_LEN: usize = 4;

/// The store as of one applied index, for a snapshot: taken in O(1) on the thread that applies
/// (`Store::image`), encoded on any other (`StoreImage::encode`) while apply goes on. It shares
/// the key tree with the store; a later write copies the nodes it changes, so the image never
/// sees it.
#[derive(Debug, Clone)]
pub struct StoreImage {
    applied_index: u64,
    revision: i64,
    compact_revision: i64,
    next_lease_id: i64,
    keys: Keys,
    /// `(id, ttl, granted_ttl)` in id order: what a snapshot keeps of a lease (its keys are
    /// derived on restore).
    leases: Vec<(i64, i64, i64)>,
    dedup: Dedup,
}

impl StoreImage {
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The snapshot bytes ([`Store::restore`] reads them).
    pub fn encode(&self) -> Bytes {
        let mut buf = Vec::new();
        self.encode_into(&mut buf);
        Bytes::from(buf)
    }

    /// Appends the snapshot bytes to `buf`, so that a caller framing them (the node's snapshot
    /// adds its own header) writes the state once rather than copying it.
    pub fn encode_into(&self, buf: &mut Vec<u8>) {
        let start = buf.len();
        buf.extend_from_slice(&MAGIC);
        buf.extend_from_slice(&SNAPSHOT_FORMAT_VERSION.to_le_bytes());
        put_uvarint(buf, self.applied_index);
        put_ivarint(buf, self.revision);
        put_ivarint(buf, self.compact_revision);
        put_ivarint(buf, self.next_lease_id);
        put_uvarint(buf, self.keys.len() as u64);
        for (key, hist) in &self.keys {
            put_bytes(buf, key);
            put_uvarint(buf, hist.len() as u64);
            for e in hist.iter() {
                put_ivarint(buf, e.mod_revision);
                put_uvarint(buf, u64::from(e.sub));
                put_ivarint(buf, e.create_revision);
                put_ivarint(buf, e.version);
                put_ivarint(buf, e.lease);
                put_bytes(buf, &e.value);
            }
        }
        put_uvarint(buf, self.leases.len() as u64);
        for &(id, ttl, granted_ttl) in &self.leases {
            put_ivarint(buf, id);
            put_ivarint(buf, ttl);
            put_ivarint(buf, granted_ttl);
        }
        self.dedup.put(buf);
        let crc = crc32c::crc32c(&buf[start..]);
        buf.extend_from_slice(&crc.to_le_bytes());
    }
}

impl Store {
    /// The state to snapshot, in O(1) for the key space (O(leases + dedup table) for the rest).
    pub fn image(&self) -> StoreImage {
        StoreImage {
            applied_index: self.applied_index,
            revision: self.revision,
            compact_revision: self.compact_revision,
            next_lease_id: self.next_lease_id,
            keys: self.keys.clone(),
            leases: self
                .leases
                .iter()
                .map(|(&id, l)| (id, l.ttl, l.granted_ttl))
                .collect(),
            dedup: self.dedup.clone(),
        }
    }

    /// The whole store as snapshot bytes: `image().encode()`, for callers that do both at once.
    pub fn snapshot(&self) -> Bytes {
        self.image().encode()
    }

    /// Rebuilds a store from [`Store::snapshot`] bytes. Refuses, without panicking, anything else:
    /// wrong magic or version, a checksum mismatch (so truncation and bit flips), and well-formed
    /// content that breaks an invariant.
    pub fn restore(data: &[u8]) -> Result<Store, DecodeError> {
        if data.len() < MAGIC.len() {
            return Err(DecodeError::Truncated(data.len()));
        }
        if data[..MAGIC.len()] != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        if data.len() < HEADER_LEN + CRC_LEN {
            return Err(DecodeError::Truncated(data.len()));
        }
        // The version comes before the checksum: another version may checksum differently.
        let version = u32::from_le_bytes([data[8], data[9], data[10], data[11]]);
        if version != SNAPSHOT_FORMAT_VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let (covered, crc) = data.split_at(data.len() - CRC_LEN);
        let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        let computed = crc32c::crc32c(covered);
        if stored != computed {
            return Err(DecodeError::ChecksumMismatch { stored, computed });
        }
        let mut r = Reader::new(&covered[HEADER_LEN..]);
        let store = read_body(&mut r)?;
        r.finish()?;
        Ok(store)
    }
}

fn inconsistent(what: &'static str) -> DecodeError {
    DecodeError::Inconsistent(what)
}

fn read_body(r: &mut Reader<'_>) -> Result<Store, DecodeError> {
    let applied_index = r.uvarint()?;
    let revision = r.ivarint()?;
    let compact_revision = r.ivarint()?;
    let next_lease_id = r.ivarint()?;
    if !(1..=MAX_REVISION).contains(&revision)
        || compact_revision < 0
        || compact_revision > revision
    {
        return Err(inconsistent("revision or compaction point out of range"));
    }
    if next_lease_id < 1 {
        return Err(inconsistent("lease id counter below 1"));
    }

    let mut keys = Keys::new();
    let n_keys = r.count()?;
    for _ in 0..n_keys {
        let key = r.bytes()?;
        if key.is_empty() {
            return Err(inconsistent("empty key"));
        }
        if keys.get_max().is_some_and(|(last, _)| *last >= key) {
            return Err(inconsistent("keys out of order"));
        }
        let hist = r.vec(|r| {
            Ok(Entry {
                mod_revision: r.ivarint()?,
                sub: r.u32v()?,
                create_revision: r.ivarint()?,
                version: r.ivarint()?,
                lease: r.ivarint()?,
                value: r.bytes()?,
            })
        })?;
        check_history(&hist, revision, compact_revision)?;
        keys.insert(key, Arc::new(hist));
    }

    let mut leases: BTreeMap<i64, Lease> = BTreeMap::new();
    let n_leases = r.count()?;
    for _ in 0..n_leases {
        let id = r.ivarint()?;
        let ttl = r.ivarint()?;
        let granted_ttl = r.ivarint()?;
        if id == 0 || leases.last_key_value().is_some_and(|(&last, _)| last >= id) {
            return Err(inconsistent("lease ids zero or out of order"));
        }
        leases.insert(
            id,
            Lease {
                ttl,
                granted_ttl,
                keys: BTreeSet::new(),
            },
        );
    }

    let dedup = Dedup::get(r)?;

    let mut live_keys = 0u64;
    let mut live_hash = 0u64;
    let mut log = Vec::new();
    for (key, hist) in &keys {
        if let Some(last) = hist.last().filter(|e| e.is_live()) {
            live_keys += 1;
            let kv = last.to_kv(key);
            live_hash = live_hash.wrapping_add(kv_hash(&kv));
            if kv.lease != 0 {
                let lease = leases
                    .get_mut(&kv.lease)
                    .ok_or(inconsistent("live key attached to a missing lease"))?;
                lease.keys.insert(key.clone());
            }
        }
        for e in hist.iter().filter(|e| e.mod_revision >= compact_revision) {
            log.push(LogRef {
                revision: e.mod_revision,
                sub: e.sub,
                key: key.clone(),
            });
        }
    }
    log.sort_by_key(|l| (l.revision, l.sub));
    if log
        .windows(2)
        .any(|w| (w[0].revision, w[0].sub) == (w[1].revision, w[1].sub))
    {
        return Err(inconsistent(
            "two changes share a revision and sub-revision",
        ));
    }
    let lease_hash = leases.iter().fold(0u64, |h, (&id, l)| {
        h.wrapping_add(lease_hash(id, l.ttl, l.granted_ttl))
    });

    Ok(Store {
        keys,
        log: VecDeque::from(log),
        revision,
        compact_revision,
        leases,
        next_lease_id,
        dedup,
        applied_index,
        live_keys,
        live_hash,
        lease_hash,
    })
}

/// The per-history invariants documented on `Store::keys` and `Entry`.
fn check_history(hist: &[Entry], revision: i64, compact_revision: i64) -> Result<(), DecodeError> {
    if hist.is_empty() {
        return Err(inconsistent("key with an empty history"));
    }
    for e in hist {
        if e.mod_revision < 1 || e.mod_revision > revision {
            return Err(inconsistent("entry revision out of range"));
        }
        let fields_ok = if e.is_live() {
            // Each version of an incarnation took a revision of its own.
            e.create_revision >= 1
                && e.create_revision <= e.mod_revision
                && e.version >= 1
                && e.version <= e.mod_revision - e.create_revision + 1
        } else {
            e.version == 0 && e.lease == 0 && e.value.is_empty()
        };
        if !fields_ok {
            return Err(inconsistent("entry fields contradict each other"));
        }
    }
    if hist
        .windows(2)
        .any(|w| (w[0].mod_revision, w[0].sub) >= (w[1].mod_revision, w[1].sub))
    {
        return Err(inconsistent("history out of order"));
    }
    let below = hist.partition_point(|e| e.mod_revision <= compact_revision);
    if below > 1 || (below == 1 && !hist[0].is_live() && hist[0].mod_revision != compact_revision) {
        return Err(inconsistent(
            "history below the compaction point not compacted",
        ));
    }
    Ok(())
}
