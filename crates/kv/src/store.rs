//! The key space: histories, the write primitives every op is built from, apply dispatch, range and
//! compaction.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use imbl::ordmap::RangedIter;
use imbl::shared_ptr::DefaultSharedPtr;
use imbl::OrdMap;

use crate::dedup::{Dedup, Seen};
use crate::hash::kv_hash;
use crate::span::Span;
use crate::types::{
    Applied, Command, CompactRequest, CompactResponse, DeleteRangeRequest, DeleteRangeResponse,
    Event, EventKind, KeyValue, Op, PutRequest, PutResponse, RangeRequest, RangeResponse, Response,
    SortOrder, SortTarget,
};
use crate::Error;

/// One version of a key in its history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) mod_revision: i64,
    /// Position among the changes of `mod_revision`: orders the events of one txn.
    pub(crate) sub: u32,
    /// 0 marks a tombstone (the key was deleted at `mod_revision`); a tombstone also has version 0,
    /// lease 0 and an empty value. Otherwise 1 <= create_revision <= mod_revision.
    pub(crate) create_revision: i64,
    pub(crate) version: i64,
    pub(crate) lease: i64,
    pub(crate) value: Bytes,
}

impl Entry {
    pub(crate) fn is_live(&self) -> bool {
        self.create_revision != 0
    }

    pub(crate) fn to_kv(&self, key: &Bytes) -> KeyValue {
        KeyValue {
            key: key.clone(),
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            value: self.value.clone(),
            lease: self.lease,
        }
    }
}

/// One key's versions, oldest first. Shared (`Arc`) so that copying a tree node after a snapshot
/// image bumps a count per key rather than copying every history in the node; a write then
/// copies only the history it changes (`Arc::make_mut`), and only while an image shares it.
pub(crate) type History = Arc<Vec<Entry>>;

/// Every key's history; see `Store::keys`.
pub(crate) type Keys = OrdMap<Bytes, History>;

/// Where a history entry above the compaction point sits, in revision order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LogRef {
    pub(crate) revision: i64,
    pub(crate) sub: u32,
    pub(crate) key: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Lease {
    /// Last checkpointed remaining TTL; `granted_ttl` until the first checkpoint.
    pub(crate) ttl: i64,
    pub(crate) granted_ttl: i64,
    /// Exactly the live keys whose current version carries this lease.
    pub(crate) keys: BTreeSet<Bytes>,
}

/// The state machine. See the crate documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Store {
    /// Every key with a version the store must still answer for. Per history: non-empty;
    /// `(mod_revision, sub)` strictly increasing; every `mod_revision <= revision`; at most one
    /// entry at or below `compact_revision`: a live one (the key's value as of the compaction
    /// point), or a tombstone exactly at it (a watch from the compaction point must still see
    /// that delete, as etcd's does). Older versions, and tombstones below the point, are dropped:
    /// nothing at or after the compaction point can see them.
    ///
    /// A persistent (copy-on-write) map rather than a `BTreeMap`: a snapshot takes it in O(1)
    /// (`Store::image`) and is encoded on another thread while apply goes on, where a copy of a
    /// large store would stall the Raft thread for as long as encoding it. A write after a
    /// snapshot copies only the tree nodes on its path, once.
    pub(crate) keys: Keys,
    /// One reference per history entry at or above `compact_revision` (above it when never
    /// compacted, i.e. every entry), in `(revision, sub)` order. Lets a watch catch up by
    /// scanning revisions rather than every key, and tells compaction which keys it has to
    /// visit.
    pub(crate) log: VecDeque<LogRef>,
    /// The last write's revision; 1 for an empty store, as in etcd, so that the first write is
    /// revision 2.
    pub(crate) revision: i64,
    /// Reads below it are refused; 0 = never compacted.
    /// Invariant: `0 <= compact_revision <= revision`.
    pub(crate) compact_revision: i64,
    pub(crate) leases: BTreeMap<i64, Lease>,
    /// Where the search for a free id starts when a grant leaves the choice to the store.
    /// Invariant: `next_lease_id >= 1`.
    pub(crate) next_lease_id: i64,
    pub(crate) dedup: Dedup,
    /// Index of the last command applied; 0 before the first.
    pub(crate) applied_index: u64,
    /// Keys whose last entry is live.
    pub(crate) live_keys: u64,
    /// Wrapping sum of `kv_hash` over live keys' current versions: kept up to date on every write
    /// so that `hash()` costs nothing, and order-independent so that any path to the same state
    /// gives the same sum.
    pub(crate) live_hash: u64,
    /// Wrapping sum of `lease_hash` over leases.
    pub(crate) lease_hash: u64,
}

impl Default for Store {
    fn default() -> Self {
        Store::new()
    }
}

/// An in-progress write: every change it makes takes revision `rev` and the next sub-revision.
pub(crate) struct Write {
    pub(crate) rev: i64,
    pub(crate) sub: u32,
    pub(crate) events: Vec<Event>,
}

impl Write {
    fn next(&mut self) -> (i64, u32) {
        let sub = self.sub;
        self.sub += 1;
        (self.rev, sub)
    }
}

/// The version of a key visible at `rev`, if live.
pub(crate) fn visible(hist: &[Entry], rev: i64) -> Option<&Entry> {
    let e = match hist.last() {
        // Most reads are at the current revision: skip the search.
        Some(last) if last.mod_revision <= rev => last,
        _ => hist[..hist.partition_point(|e| e.mod_revision <= rev)].last()?,
    };
    e.is_live().then_some(e)
}

/// The keys a `(key, range_end)` pair selects, with their histories, in key order.
pub(crate) enum Scan<'a> {
    /// A single key is looked up directly: a one-key range descends the tree twice,
    /// once per bound.
    One(Option<(&'a Bytes, &'a History)>),
    Many(RangedIter<'a, Bytes, History, DefaultSharedPtr>),
}

impl<'a> Iterator for Scan<'a> {
    type Item = (&'a Bytes, &'a History);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Scan::One(one) => one.take(),
            Scan::Many(range) => range.next(),
        }
    }
}

impl Store {
    pub fn new() -> Store {
        Store {
            keys: Keys::new(),
            log: VecDeque::new(),
            revision: 1,
            compact_revision: 0,
            leases: BTreeMap::new(),
            next_lease_id: 1,
            dedup: Dedup::default(),
            applied_index: 0,
            live_keys: 0,
            live_hash: 0,
            lease_hash: 0,
        }
    }

    pub(crate) fn scan<'a>(&'a self, key: &'a [u8], range_end: &'a [u8]) -> Scan<'a> {
        match Span::new(key, range_end) {
            Span::One(k) => Scan::One(self.keys.get_key_value(k)),
            span => Scan::Many(self.keys.range::<_, [u8]>(span.bounds())),
        }
    }

    pub fn revision(&self) -> i64 {
        self.revision
    }

    pub fn compact_revision(&self) -> i64 {
        self.compact_revision
    }

    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// Live keys at the current revision.
    pub fn len(&self) -> usize {
        self.live_keys as usize
    }

    pub fn is_empty(&self) -> bool {
        self.live_keys == 0
    }

    /// History entries above the compaction point: what a compaction would be able to reclaim, for
    /// the node layer's auto-compaction policy.
    pub fn uncompacted_entries(&self) -> usize {
        self.log.len()
    }

    /// The current version of `key`, if live.
    pub fn get(&self, key: &[u8]) -> Option<KeyValue> {
        let (k, hist) = self.keys.get_key_value(key)?;
        visible(hist, self.revision).map(|e| e.to_kv(k))
    }

    /// Applies one committed log entry.
    ///
    /// # Panics
    /// If `index` is not above [`Store::applied_index`]: each entry is applied once, in log order
    /// (gaps are fine: the node does not pass entries that carry no command).
    pub fn apply(&mut self, index: u64, cmd: &Command) -> Applied {
        assert!(
            index > self.applied_index,
            "apply at index {index} but {} is already applied: \
             entries must be applied once, in log order",
            self.applied_index
        );
        self.applied_index = index;
        if let Some(id) = cmd.request_id {
            match self.dedup.check(id) {
                Seen::Applied(result) => {
                    return Applied {
                        result: result.clone(),
                        events: Vec::new(),
                        duplicate: true,
                    };
                }
                Seen::TooOld => {
                    let result = Err(Error::StaleRequest {
                        proposer: id.proposer,
                        seq: id.seq,
                    });
                    return Applied {
                        result,
                        events: Vec::new(),
                        duplicate: false,
                    };
                }
                Seen::New => {}
            }
        }
        let (result, events) = match self.execute(&cmd.op) {
            Ok((response, events)) => (Ok(response), events),
            Err(e) => (Err(e), Vec::new()),
        };
        if let Some(id) = cmd.request_id {
            self.dedup.record(id, index, &result);
        }
        Applied {
            result,
            events,
            duplicate: false,
        }
    }

    /// Runs one op. On error nothing has changed: every op checks everything that can fail before
    /// its first write.
    fn execute(&mut self, op: &Op) -> Result<(Response, Vec<Event>), Error> {
        Ok(match op {
            Op::Noop => (Response::Noop, Vec::new()),
            Op::Put(p) => {
                p.validate()?;
                self.check_put(p)?;
                let mut w = self.begin();
                let resp = self.exec_put(&mut w, p);
                (Response::Put(resp), self.end(w))
            }
            Op::DeleteRange(d) => {
                d.validate()?;
                let mut w = self.begin();
                let resp = self.exec_delete(&mut w, d);
                (Response::DeleteRange(resp), self.end(w))
            }
            Op::Txn(t) => {
                let (resp, events) = self.apply_txn(t)?;
                (Response::Txn(resp), events)
            }
            Op::Compact(c) => (Response::Compact(self.apply_compact(c)?), Vec::new()),
            Op::LeaseGrant(g) => (Response::LeaseGrant(self.apply_lease_grant(g)?), Vec::new()),
            Op::LeaseRevoke(r) => {
                let (resp, events) = self.apply_lease_revoke(r)?;
                (Response::LeaseRevoke(resp), events)
            }
            Op::LeaseCheckpoint(c) => (
                Response::LeaseCheckpoint(self.apply_lease_checkpoint(c)),
                Vec::new(),
            ),
        })
    }

    pub(crate) fn begin(&self) -> Write {
        Write {
            rev: self.revision + 1,
            sub: 0,
            events: Vec::new(),
        }
    }

    /// Commits the write's revision if it changed anything: as in etcd, a write that finds nothing
    /// to change (a delete of a missing key, a txn whose branch only reads) leaves the revision
    /// alone.
    pub(crate) fn end(&mut self, w: Write) -> Vec<Event> {
        if w.sub > 0 {
            self.revision = w.rev;
        }
        w.events
    }

    /// The revision a read inside `w` sees: the write's own once it has changed something, so that
    /// later ops of a txn see earlier ones.
    pub(crate) fn read_rev(&self, w: &Write) -> i64 {
        if w.sub > 0 {
            w.rev
        } else {
            self.revision
        }
    }

    /// What a put needs from the store. Run before any write of its op so that a failure changes
    /// nothing.
    pub(crate) fn check_put(&self, p: &PutRequest) -> Result<(), Error> {
        if (p.ignore_value || p.ignore_lease) && self.get_live(&p.key).is_none() {
            return Err(Error::KeyNotFound);
        }
        if p.lease != 0 && !self.leases.contains_key(&p.lease) {
            return Err(Error::LeaseNotFound);
        }
        Ok(())
    }

    fn get_live(&self, key: &[u8]) -> Option<&Entry> {
        self.keys.get(key)?.last().filter(|e| e.is_live())
    }

    /// Runs a put that `check_put` accepted.
    pub(crate) fn exec_put(&mut self, w: &mut Write, p: &PutRequest) -> PutResponse {
        // Look the key up only when a flag asks for it: the plain put is the hot path.
        let current = if p.ignore_value || p.ignore_lease {
            self.get_live(&p.key)
        } else {
            None
        };
        let (value, lease) = match current {
            Some(cur) => (
                if p.ignore_value {
                    cur.value.clone()
                } else {
                    p.value.clone()
                },
                if p.ignore_lease { cur.lease } else { p.lease },
            ),
            None => (p.value.clone(), p.lease),
        };
        let prev = self.put_key(w, &p.key, value, lease);
        PutResponse {
            revision: w.rev,
            prev_kv: if p.prev_kv { prev } else { None },
        }
    }

    pub(crate) fn exec_delete(
        &mut self,
        w: &mut Write,
        d: &DeleteRangeRequest,
    ) -> DeleteRangeResponse {
        let doomed: Vec<Bytes> = self
            .scan(&d.key, &d.range_end)
            .filter(|(_, hist)| hist.last().is_some_and(Entry::is_live))
            .map(|(k, _)| k.clone())
            .collect();
        let mut prev_kvs = Vec::new();
        for key in &doomed {
            if let Some(prev) = self.delete_key(w, key) {
                if d.prev_kv {
                    prev_kvs.push(prev);
                }
            }
        }
        DeleteRangeResponse {
            revision: self.read_rev(w),
            deleted: doomed.len() as i64,
            prev_kvs,
        }
    }

    /// Writes a new version of `key`; returns the version it replaces, if live.
    pub(crate) fn put_key(
        &mut self,
        w: &mut Write,
        key: &Bytes,
        value: Bytes,
        lease: i64,
    ) -> Option<KeyValue> {
        let (rev, sub) = w.next();
        let next = |hist: &[Entry]| {
            let prev = hist.last().filter(|e| e.is_live()).map(|e| e.to_kv(key));
            let (create_revision, version) = match &prev {
                Some(p) => (p.create_revision, p.version + 1),
                None => (rev, 1),
            };
            let entry = Entry {
                mod_revision: rev,
                sub,
                create_revision,
                version,
                lease,
                value,
            };
            (entry.to_kv(key), entry, prev)
        };
        // One walk down the tree for a key that exists (imbl's `entry` takes two: a lookup,
        // then `get_mut`), which is most puts: key compares were 7% of a follower's CPU.
        let (kv, prev) = match self.keys.get_mut(key) {
            Some(hist) => {
                let (kv, entry, prev) = next(hist);
                Arc::make_mut(hist).push(entry);
                (kv, prev)
            }
            None => {
                let (kv, entry, prev) = next(&[]);
                // A new key's history holds one version (`vec!` of one allocates one): a
                // Vec's first push would reserve four (216 bytes of 256 for a key written
                // once), and most keys of a large store are written rarely. One that is
                // rewritten grows as any Vec does.
                self.keys.insert(key.clone(), Arc::new(vec![entry]));
                (kv, prev)
            }
        };

        self.live_hash = self.live_hash.wrapping_add(kv_hash(&kv));
        match &prev {
            Some(p) => {
                self.live_hash = self.live_hash.wrapping_sub(kv_hash(p));
                if p.lease != lease {
                    self.detach(p.lease, key);
                    self.attach(lease, key);
                }
            }
            None => {
                self.live_keys += 1;
                self.attach(lease, key);
            }
        }
        self.log.push_back(LogRef {
            revision: rev,
            sub,
            key: key.clone(),
        });
        w.events.push(Event {
            kind: EventKind::Put,
            kv,
            prev_kv: prev.clone(),
        });
        prev
    }

    /// Writes a tombstone for `key` if it is live; returns the version it ends.
    pub(crate) fn delete_key(&mut self, w: &mut Write, key: &Bytes) -> Option<KeyValue> {
        let hist = Arc::make_mut(self.keys.get_mut(key)?);
        let prev = hist.last().filter(|e| e.is_live())?.to_kv(key);
        let (rev, sub) = w.next();
        let tombstone = Entry {
            mod_revision: rev,
            sub,
            create_revision: 0,
            version: 0,
            lease: 0,
            value: Bytes::new(),
        };
        let kv = tombstone.to_kv(key);
        hist.push(tombstone);

        self.live_keys -= 1;
        self.live_hash = self.live_hash.wrapping_sub(kv_hash(&prev));
        self.detach(prev.lease, key);
        self.log.push_back(LogRef {
            revision: rev,
            sub,
            key: key.clone(),
        });
        w.events.push(Event {
            kind: EventKind::Delete,
            kv,
            prev_kv: Some(prev.clone()),
        });
        Some(prev)
    }

    /// Refuses a read revision the store cannot serve; 0 or negative means the current one.
    pub(crate) fn check_read_revision(&self, revision: i64, current: i64) -> Result<(), Error> {
        if revision > current {
            return Err(Error::FutureRevision);
        }
        if revision > 0 && revision < self.compact_revision {
            return Err(Error::Compacted);
        }
        Ok(())
    }

    /// etcd Range at the current revision (or at `req.revision`).
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse, Error> {
        req.validate()?;
        self.check_read_revision(req.revision, self.revision)?;
        let rev = if req.revision > 0 {
            req.revision
        } else {
            self.revision
        };
        Ok(self.range_unchecked(req, rev, self.revision))
    }

    /// Range at `rev`, which the caller has checked, answering with header revision `current`.
    pub(crate) fn range_unchecked(
        &self,
        req: &RangeRequest,
        rev: i64,
        current: i64,
    ) -> RangeResponse {
        let order = effective_order(req);
        let limit = if req.limit > 0 {
            usize::try_from(req.limit).unwrap_or(usize::MAX)
        } else {
            usize::MAX
        };
        let mut kvs = Vec::new();
        let mut count = 0i64;
        for (key, hist) in self.scan(&req.key, &req.range_end) {
            let Some(e) = visible(hist, rev) else {
                continue;
            };
            count += 1;
            // Unsorted results come out in key order, so one past the limit is enough to know
            // `more`; the count still needs the whole range.
            if req.count_only
                || (order == SortOrder::None && kvs.len() > limit)
                || !passes_filters(req, e)
            {
                continue;
            }
            kvs.push(e.to_kv(key));
        }
        if order != SortOrder::None {
            sort_kvs(&mut kvs, req.sort_target, order);
        }
        let more = kvs.len() > limit;
        kvs.truncate(limit);
        if req.keys_only {
            // After sorting: a keys-only read sorted by value still sorts by the values.
            for kv in &mut kvs {
                kv.value = Bytes::new();
            }
        }
        RangeResponse {
            revision: current,
            kvs,
            more,
            count,
        }
    }

    fn apply_compact(&mut self, c: &CompactRequest) -> Result<CompactResponse, Error> {
        if c.revision <= self.compact_revision {
            return Err(Error::Compacted);
        }
        if c.revision > self.revision {
            return Err(Error::FutureRevision);
        }
        self.compact_revision = c.revision;
        // Only keys written since the last compaction can hold entries that this one frees: every
        // other key already has a single entry at or below the old compaction point, which stays
        // the latest at or below the new one. Changes at the compaction point itself keep their
        // references: a watch may start there.
        while self.log.front().is_some_and(|r| r.revision < c.revision) {
            if let Some(r) = self.log.pop_front() {
                self.compact_key(&r.key, c.revision);
            }
        }
        let at_point: Vec<Bytes> = self
            .log
            .iter()
            .take_while(|r| r.revision == c.revision)
            .map(|r| r.key.clone())
            .collect();
        for key in &at_point {
            self.compact_key(key, c.revision);
        }
        Ok(CompactResponse {
            revision: self.revision,
        })
    }

    fn compact_key(&mut self, key: &Bytes, rev: i64) {
        let Some(hist) = self.keys.get_mut(key).map(Arc::make_mut) else {
            return;
        };
        let below = hist.partition_point(|e| e.mod_revision <= rev);
        // The newest entry at or below `rev` is the key's value as of `rev` (reads at `rev` and the
        // prev_kv of later events need it). A tombstone says nothing that absence does not, unless
        // it is exactly at `rev`, where a watch from the compaction point reports it.
        let keep_from = match below.checked_sub(1) {
            Some(i) if hist[i].is_live() || hist[i].mod_revision == rev => i,
            _ => below,
        };
        hist.drain(..keep_from);
        if hist.is_empty() {
            self.keys.remove(key);
        } else if hist.capacity() > 2 * hist.len() {
            // Compaction usually leaves one version of many: give back the room the others
            // took, or a compacted store keeps the memory of its whole history.
            hist.shrink_to_fit();
        }
    }
}

/// etcd's normalisation: the store returns keys in ascending key order already, so "ascending by
/// key" needs no sort, and a sort target other than the key with no order means ascending.
fn effective_order(req: &RangeRequest) -> SortOrder {
    match (req.sort_target, req.sort_order) {
        (SortTarget::Key, SortOrder::Ascend) => SortOrder::None,
        (SortTarget::Key, order) => order,
        (_, SortOrder::None) => SortOrder::Ascend,
        (_, order) => order,
    }
}

/// Stable, so that ties stay in key order whichever the direction (etcd's sort is unstable there;
/// ours is deterministic, which members serving the same read must be).
fn sort_kvs(kvs: &mut [KeyValue], target: SortTarget, order: SortOrder) {
    let cmp = |a: &KeyValue, b: &KeyValue| match target {
        SortTarget::Key => a.key.cmp(&b.key),
        SortTarget::Version => a.version.cmp(&b.version),
        SortTarget::Create => a.create_revision.cmp(&b.create_revision),
        SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
        SortTarget::Value => a.value.cmp(&b.value),
    };
    match order {
        SortOrder::None => {}
        SortOrder::Ascend => kvs.sort_by(cmp),
        SortOrder::Descend => kvs.sort_by(|a, b| cmp(b, a)),
    }
}

/// etcd prunes on every non-zero bound, negative ones included.
fn passes_filters(req: &RangeRequest, e: &Entry) -> bool {
    (req.min_mod_revision == 0 || e.mod_revision >= req.min_mod_revision)
        && (req.max_mod_revision == 0 || e.mod_revision <= req.max_mod_revision)
        && (req.min_create_revision == 0 || e.create_revision >= req.min_create_revision)
        && (req.max_create_revision == 0 || e.create_revision <= req.max_create_revision)
}
