//! The watch hub: how the changes a node applies reach the watchers on that node.
//!
//! The Raft thread publishes one [`WatchFeed`] per drained batch of Readies into a broadcast
//! ring; it never waits for a watcher and never filters for one. Each watch stream subscribes
//! and does its own filtering, so fan-out costs the stream's task, not the Raft loop.
//!
//! Nothing is lost to a slow subscriber: the ring drops the oldest feeds for a subscriber that
//! falls behind and tells it so (`RecvError::Lagged`), and the subscriber reads what it missed
//! from the store's history ([`History`]), which holds every change since the last compaction.
//! A feed with `reset` (a snapshot replaced the state machine) is handled the same way.

use std::sync::Arc;

use keel_kv::Event;
use tokio::sync::broadcast;

use crate::core::WatchFeed;

/// Feeds the ring keeps for its slowest subscriber. One feed is one drained batch of Readies
/// (up to a few hundred writes under load), so this is seconds of writes at full speed, and it
/// bounds what a lagging subscriber pins: at most this many feeds, after which it is told it
/// lagged and reads history instead.
pub const FEED_CAPACITY: usize = 256;

/// Revisions one history read covers at most, as etcd's `watchBatchMaxRevs`: a watcher
/// catching up from far behind is fed in slices, so one read never holds the Raft thread for
/// long nor builds an unbounded answer.
pub const HISTORY_MAX_REVISIONS: i64 = 1000;

/// The publishing side, owned by the Raft thread.
#[derive(Clone)]
pub struct WatchHub {
    tx: broadcast::Sender<Arc<WatchFeed>>,
}

impl Default for WatchHub {
    fn default() -> Self {
        WatchHub::new()
    }
}

impl WatchHub {
    pub fn new() -> WatchHub {
        let (tx, _) = broadcast::channel(FEED_CAPACITY);
        WatchHub { tx }
    }

    /// Hands a feed to every subscriber. With none, the feed is dropped: a subscriber that
    /// comes later starts from the store's revision at that time.
    pub fn publish(&self, feed: WatchFeed) {
        if feed.is_empty() || self.tx.receiver_count() == 0 {
            return;
        }
        // Fails only when the last subscriber left meanwhile, which is the case above.
        let _ = self.tx.send(Arc::new(feed));
    }

    /// Every feed published from now on, until the receiver lags or is dropped.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<WatchFeed>> {
        self.tx.subscribe()
    }

    pub fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }
}

/// A slice of the store's history, for a watcher catching up (see [`HISTORY_MAX_REVISIONS`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    /// The changes to the asked range at revisions in [start, `next`), in order.
    pub events: Vec<Event>,
    /// Where the next slice starts. Once it is above `revision`, the watcher has every change
    /// up to the store's current revision and can take the rest from the feed.
    pub next: i64,
    /// The store's revision when the slice was read.
    pub revision: i64,
}

/// Why history could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HistoryError {
    /// The start is below the compaction point; changes there are gone. `compact_revision` is
    /// the compaction point: the lowest start history can still serve, as etcd reports it.
    Compacted { compact_revision: i64 },
}

/// One slice of history from `start` (which must be above 0): pure, over the store, so the
/// driver runs it on the Raft thread and tests run it alone.
pub fn read_history(
    kv: &keel_kv::Store,
    start: i64,
    key: &[u8],
    range_end: &[u8],
) -> Result<History, HistoryError> {
    let revision = kv.revision();
    let start = start.max(1);
    let next = start
        .saturating_add(HISTORY_MAX_REVISIONS)
        .min(revision + 1);
    if start > revision {
        return Ok(History {
            events: Vec::new(),
            next: start,
            revision,
        });
    }
    let events = kv
        .events_between(start, next, key, range_end)
        .map_err(|_| HistoryError::Compacted {
            compact_revision: kv.compact_revision(),
        })?;
    Ok(History {
        events,
        next,
        revision,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use keel_kv::{Command, CompactRequest, EventKind, Op, PutRequest, Store};

    fn put(kv: &mut Store, index: u64, key: &str, value: &str) {
        let op = Op::Put(PutRequest {
            key: Bytes::from(key.to_string()),
            value: Bytes::from(value.to_string()),
            ..Default::default()
        });
        kv.apply(index, &Command::new(op));
    }

    #[test]
    fn history_comes_in_slices_that_cover_every_revision_once() {
        let mut kv = Store::new();
        let n = (HISTORY_MAX_REVISIONS as u64) * 2 + 10;
        for i in 1..=n {
            put(&mut kv, i, &format!("k{}", i % 7), &format!("v{i}"));
        }
        let mut start = 2;
        let mut seen = Vec::new();
        let mut slices = 0;
        loop {
            let h = read_history(&kv, start, b"k", b"l").unwrap();
            slices += 1;
            assert!(h.next > start || h.next > h.revision);
            seen.extend(h.events.iter().map(|e| e.kv.mod_revision));
            if h.next > h.revision {
                break;
            }
            start = h.next;
        }
        assert_eq!(slices, 3);
        let want: Vec<i64> = (2..=kv.revision()).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn history_below_the_compaction_point_is_refused_with_it_and_served_from_it() {
        let mut kv = Store::new();
        for i in 1..=10 {
            put(&mut kv, i, "a", &i.to_string());
        }
        kv.apply(
            11,
            &Command::new(Op::Compact(CompactRequest { revision: 6 })),
        );
        assert_eq!(
            read_history(&kv, 3, b"a", b""),
            Err(HistoryError::Compacted {
                compact_revision: 6
            })
        );
        let h = read_history(&kv, 7, b"a", b"").unwrap();
        assert_eq!(h.events.len(), 5);
        assert!(h.events.iter().all(|e| e.kind == EventKind::Put));
        assert_eq!(h.events[0].prev_kv.as_ref().unwrap().mod_revision, 6);
        // From the compaction point itself: its change, without the version it replaced.
        let h = read_history(&kv, 6, b"a", b"").unwrap();
        assert_eq!(h.events.len(), 6);
        assert_eq!(h.events[0].kv.mod_revision, 6);
        assert!(h.events[0].prev_kv.is_none());
    }

    #[test]
    fn history_from_the_future_is_empty_and_waits_at_its_start() {
        let mut kv = Store::new();
        put(&mut kv, 1, "a", "1");
        let h = read_history(&kv, 10, b"a", b"").unwrap();
        assert!(h.events.is_empty());
        assert_eq!((h.next, h.revision), (10, 2));
    }

    #[tokio::test]
    async fn a_lagging_subscriber_is_told_instead_of_pinning_feeds() {
        let hub = WatchHub::new();
        let mut rx = hub.subscribe();
        for r in 0..(FEED_CAPACITY as i64 + 5) {
            hub.publish(WatchFeed {
                events: Vec::new(),
                reset: true,
                revision: r,
            });
        }
        match rx.recv().await {
            Err(broadcast::error::RecvError::Lagged(n)) => assert_eq!(n, 5),
            other => panic!("expected a lag, got {other:?}"),
        }
        assert_eq!(rx.recv().await.unwrap().revision, 5);
    }

    #[test]
    fn nothing_is_kept_without_subscribers() {
        let hub = WatchHub::new();
        hub.publish(WatchFeed {
            events: Vec::new(),
            reset: true,
            revision: 1,
        });
        let mut rx = hub.subscribe();
        assert!(rx.try_recv().is_err());
    }
}
