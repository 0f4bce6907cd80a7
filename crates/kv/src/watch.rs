//! Reading history back as events, for watches that start in the past. The watch hub itself
//! (streams, fan-out, progress) belongs to the node layer, which gets new events from `apply` and
//! old ones from here.

use crate::span::Span;
use crate::store::{Entry, Store};
use crate::types::{Event, EventKind};
use crate::Error;

fn event_at(key: &bytes::Bytes, hist: &[Entry], i: usize) -> Event {
    let e = &hist[i];
    let prev_kv = i
        .checked_sub(1)
        .map(|p| &hist[p])
        .filter(|p| p.is_live())
        .map(|p| p.to_kv(key));
    let kind = if e.is_live() {
        EventKind::Put
    } else {
        EventKind::Delete
    };
    Event {
        kind,
        kv: e.to_kv(key),
        prev_kv,
    }
}

impl Store {
    /// Every change to keys in the range (same `key`/`range_end` rules as Range) at revisions >=
    /// `start_rev`, in (revision, sub-revision) order, with `prev_kv` filled in. `start_rev <= 0`
    /// means "from the next revision", as in an etcd watch, and returns nothing. Fails with
    /// [`Error::Compacted`] when `start_rev` is below the compaction point, where changes are no
    /// longer all known. From the compaction point itself, as in etcd, its changes come without
    /// `prev_kv` (the versions they replaced are compacted away).
    pub fn events_since(
        &self,
        start_rev: i64,
        key: &[u8],
        range_end: &[u8],
    ) -> Result<Vec<Event>, Error> {
        self.events_between(start_rev, i64::MAX, key, range_end)
    }

    /// [`Store::events_since`] limited to revisions below `end_rev`, so that a catching-up watcher
    /// can be fed in bounded batches.
    pub fn events_between(
        &self,
        start_rev: i64,
        end_rev: i64,
        key: &[u8],
        range_end: &[u8],
    ) -> Result<Vec<Event>, Error> {
        if start_rev <= 0 {
            return Ok(Vec::new());
        }
        if start_rev < self.compact_revision {
            return Err(Error::Compacted);
        }
        let span = Span::new(key, range_end);
        let mut events = Vec::new();
        if let Span::One(k) = span {
            // One key: its own history is shorter than the log.
            if let Some((key, hist)) = self.keys.get_key_value(k) {
                let from = hist.partition_point(|e| e.mod_revision < start_rev);
                for i in from..hist.len() {
                    if hist[i].mod_revision >= end_rev {
                        break;
                    }
                    events.push(event_at(key, hist, i));
                }
            }
            return Ok(events);
        }
        let from = self.log.partition_point(|r| r.revision < start_rev);
        for r in self.log.range(from..) {
            if r.revision >= end_rev {
                break;
            }
            if !span.contains(&r.key) {
                continue;
            }
            let found = self.keys.get_key_value(&r.key[..]).and_then(|(key, hist)| {
                let i = hist
                    .binary_search_by(|e| (e.mod_revision, e.sub).cmp(&(r.revision, r.sub)))
                    .ok()?;
                Some(event_at(key, hist, i))
            });
            debug_assert!(found.is_some(), "log entry {r:?} has no history entry");
            events.extend(found);
        }
        Ok(events)
    }
}
