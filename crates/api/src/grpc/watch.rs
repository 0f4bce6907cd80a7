//! etcd's Watch service over the node's watch hub (`keel_node::watch`).
//!
//! One task per stream owns the stream's watchers. It subscribes to the hub before it reads the
//! first request, so every change applied after a watcher's start point is either in the feed it
//! receives or in the store's history, which it reads for watchers that start in the past, that
//! fell behind the feed, or that a snapshot install skipped over. A watcher is *synced* once it
//! has every change up to the revision the store had when its history was last read; from then
//! on it takes changes from the feed, skipping any below its next revision. That is what keeps
//! each watcher's events in revision order with no gap and no duplicate.
//!
//! Memory per stream is bounded: the responses waiting for the client are at most
//! [`STREAM_BUFFER`] and [`STREAM_BYTES`]; when a client stops reading for [`SLOW_GRACE`] with
//! the buffer full, its watchers are cancelled with a reason rather than buffered for.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use keel_etcdpb::etcdserverpb as pb;
use keel_etcdpb::etcdserverpb::watch_create_request::FilterType;
use keel_etcdpb::etcdserverpb::watch_request::RequestUnion;
use keel_etcdpb::mvccpb;
use keel_kv::{Event, EventKind};
use keel_node::watch::HistoryError;
use keel_node::WatchFeed;
use prost::Message as _;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt as _;
use tonic::{Request, Response, Status, Streaming};

use super::{convert, status_of, Shared};

/// Responses a stream holds for a client that has not read them yet. A stream multiplexes many
/// watchers and one applied batch answers each of them separately, so this is counted in
/// responses, generously; the events themselves are shared with the store (reference-counted
/// keys and values), so each response costs little beyond its framing.
pub const STREAM_BUFFER: usize = 4096;

/// Encoded bytes of the responses a stream holds for its client. The events' keys and values
/// are shared with the store while it keeps them, but not after a compaction, and a response
/// can hold up to `max-request-bytes` of values, so a count alone would allow gigabytes.
pub const STREAM_BYTES: usize = 16 << 20;

/// How long a stream may stay full before its watchers are cancelled as too slow. Long enough
/// for a client's GC pause or a congested link, short enough that a client that stopped
/// reading does not hold a stuck task and a lagging subscription for long.
pub const SLOW_GRACE: Duration = Duration::from_secs(5);

/// Watchers one stream may hold, so that a client cannot make one task filter every change
/// against an unbounded list. etcd has no limit; clients multiplex every watch of a connection
/// on one stream, and real ones hold far fewer.
pub const MAX_WATCHERS_PER_STREAM: usize = 10_000;

/// Requests read ahead of the stream task: the reader waits when the task is busy, which is
/// backpressure on the client rather than a queue.
const REQUEST_BUFFER: usize = 64;

/// What a retry of a history read waits after the node refused it as overloaded.
const HISTORY_RETRY: Duration = Duration::from_millis(50);

/// etcd's `clientv3.InvalidWatchID`: the id of a response that answers for no one watcher.
const INVALID_WATCH_ID: i64 = -1;

/// etcd's messages, which clients match on.
const ERR_COMPACTED: &str = "etcdserver: mvcc: required revision has been compacted";
const ERR_EMPTY_RANGE: &str = "mvcc: watcher range is empty";
const ERR_DUPLICATE_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";

pub(super) struct WatchService(pub Arc<Shared>);

type WatchStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::watch_server::Watch for WatchService {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let mut inbound = req.into_inner();
        let (out, out_rx) = mpsc::channel(STREAM_BUFFER);
        let (ctrl_tx, ctrl) = mpsc::channel(REQUEST_BUFFER);
        // The reader ends at the client's half-close or an error; the stream goes on sending
        // until the client goes away, as etcd's does.
        tokio::spawn(async move {
            while let Ok(Some(r)) = inbound.message().await {
                if ctrl_tx.send(r).await.is_err() {
                    break;
                }
            }
        });
        let task = StreamTask {
            feed: self.0.app.node.subscribe_watch(),
            shared: self.0.clone(),
            watchers: BTreeMap::new(),
            next_id: 0,
            revision: 0,
            out,
            bytes: Arc::new(Semaphore::new(STREAM_BYTES)),
            ctrl,
        };
        self.0.app.metrics.watch_streams.inc();
        tokio::spawn(task.run());
        // The permit goes back once tonic takes the response for the connection, whose own
        // buffers HTTP/2 flow control bounds.
        let stream = ReceiverStream::new(out_rx).map(|(resp, _permit)| resp);
        Ok(Response::new(Box::pin(stream)))
    }
}

struct Watcher {
    key: Bytes,
    /// As on the wire: empty for one key, `"\0"` for every key from `key`.
    range_end: Bytes,
    /// The lowest revision this watcher has not been given the changes of. Invariant: every
    /// matching change below it has been sent, in order, and none at or above it.
    next_rev: i64,
    /// Its changes up to the store's revision are all known: take the rest from the feed.
    synced: bool,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    progress_notify: bool,
    fragment: bool,
    /// Events were sent since the last progress tick, so the next tick sends no notification.
    active: bool,
}

impl Watcher {
    fn covers(&self, key: &[u8]) -> bool {
        match &self.range_end[..] {
            [] => key == &self.key[..],
            [0] => key >= &self.key[..],
            end => key >= &self.key[..] && key < end,
        }
    }

    fn wants(&self, e: &Event) -> bool {
        match e.kind {
            EventKind::Put => !self.no_put,
            EventKind::Delete => !self.no_delete,
        }
    }

    fn event_out(&self, e: &Event) -> mvccpb::Event {
        mvccpb::Event {
            r#type: match e.kind {
                EventKind::Put => mvccpb::event::EventType::Put as i32,
                EventKind::Delete => mvccpb::event::EventType::Delete as i32,
            },
            kv: Some(convert::kv_out(e.kv.clone())),
            prev_kv: if self.prev_kv {
                e.prev_kv.clone().map(convert::kv_out)
            } else {
                None
            },
        }
    }
}

/// The client is gone or the node stopped: the stream ends.
struct Gone;

struct StreamTask {
    shared: Arc<Shared>,
    feed: broadcast::Receiver<Arc<WatchFeed>>,
    watchers: BTreeMap<i64, Watcher>,
    /// Where the search for a free id starts, as etcd's `nextID`.
    next_id: i64,
    /// The highest store revision this task knows of (from feeds and reads): what progress
    /// notifications report. A lower bound of the store's, never above what watchers were sent.
    revision: i64,
    out: mpsc::Sender<Outgoing>,
    /// Permits for [`STREAM_BYTES`], held by responses until the client's connection takes them.
    bytes: Arc<Semaphore>,
    ctrl: mpsc::Receiver<pb::WatchRequest>,
}

/// A response and the stream bytes it holds (none for answers to requests, which the request
/// channel bounds).
type Outgoing = (
    Result<pb::WatchResponse, Status>,
    Option<OwnedSemaphorePermit>,
);

impl StreamTask {
    async fn run(mut self) {
        let _ = self.serve().await;
        let m = &self.shared.app.metrics;
        m.watch_streams.dec();
        m.watchers.dec_by(self.watchers.len() as i64);
    }

    async fn serve(&mut self) -> Result<(), Gone> {
        let interval = self.shared.watch_progress_interval;
        let mut progress =
            tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        let mut requests_open = true;
        loop {
            if let Some(id) = self.first_unsynced() {
                self.catch_up(id).await?;
                // Between slices, whatever is already waiting, without waiting for more.
                while requests_open {
                    match self.ctrl.try_recv() {
                        Ok(r) => self.request(r).await?,
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => requests_open = false,
                    }
                }
                self.drain_feed().await?;
                continue;
            }
            tokio::select! {
                r = self.ctrl.recv(), if requests_open => match r {
                    Some(r) => self.request(r).await?,
                    None => requests_open = false,
                },
                f = self.feed.recv() => match f {
                    Ok(f) => self.on_feed(&f).await?,
                    Err(RecvError::Lagged(_)) => self.unsync_all(),
                    Err(RecvError::Closed) => {
                        let stopped = Status::unavailable("etcdserver: server stopped");
                        let _ = self.out.send((Err(stopped), None)).await;
                        return Err(Gone);
                    }
                },
                _ = progress.tick() => self.progress_tick().await?,
                _ = self.out.closed() => return Err(Gone),
            }
        }
    }

    /// The store's revision, with every change up to it handed to the synced watchers: the
    /// feeds of those changes were published before the node answered, so they are already
    /// waiting in the subscription. A lag on the way leaves watchers unsynced, which a progress
    /// answer then does not vouch for.
    async fn current_revision(
        &mut self,
    ) -> Result<Result<i64, keel_node::driver::DriverError>, Gone> {
        let revision = match self.shared.app.node.revision().await {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        self.drain_feed().await?;
        self.revision = self.revision.max(revision);
        Ok(Ok(revision))
    }

    /// Handles every feed already waiting, without waiting for more.
    async fn drain_feed(&mut self) -> Result<(), Gone> {
        loop {
            match self.feed.try_recv() {
                Ok(f) => self.on_feed(&f).await?,
                Err(broadcast::error::TryRecvError::Empty) => return Ok(()),
                Err(broadcast::error::TryRecvError::Lagged(_)) => self.unsync_all(),
                Err(broadcast::error::TryRecvError::Closed) => return Err(Gone),
            }
        }
    }

    fn first_unsynced(&self) -> Option<i64> {
        self.watchers
            .iter()
            .find(|(_, w)| !w.synced)
            .map(|(&id, _)| id)
    }

    /// The feed lost changes for this stream (it lagged, or a snapshot replaced the store):
    /// every watcher reads them from history.
    fn unsync_all(&mut self) {
        for w in self.watchers.values_mut() {
            w.synced = false;
        }
    }

    fn header(&self, revision: i64) -> Option<pb::ResponseHeader> {
        self.shared.header(revision)
    }

    async fn request(&mut self, r: pb::WatchRequest) -> Result<(), Gone> {
        match r.request_union {
            Some(RequestUnion::CreateRequest(c)) => self.create(c).await,
            Some(RequestUnion::CancelRequest(c)) => {
                // An unknown id gets no answer, as in etcd.
                if self.watchers.remove(&c.watch_id).is_some() {
                    self.shared.app.metrics.watchers.dec();
                    let resp = pb::WatchResponse {
                        header: self.header(self.revision),
                        watch_id: c.watch_id,
                        canceled: true,
                        ..Default::default()
                    };
                    self.send_control(resp).await?;
                }
                Ok(())
            }
            Some(RequestUnion::ProgressRequest(_)) => {
                let revision = match self.current_revision().await? {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = self.out.send((Err(status_of(e)), None)).await;
                        return Err(Gone);
                    }
                };
                // etcd answers a progress request only when it can vouch for every watcher: one
                // that is still catching up has not seen everything up to the revision.
                if self.watchers.values().all(|w| w.synced) {
                    let resp = pb::WatchResponse {
                        header: self.header(revision),
                        watch_id: INVALID_WATCH_ID,
                        ..Default::default()
                    };
                    self.send_control(resp).await?;
                }
                Ok(())
            }
            None => Ok(()),
        }
    }

    async fn refuse_create(&mut self, reason: &str) -> Result<(), Gone> {
        let resp = pb::WatchResponse {
            header: self.header(self.revision),
            watch_id: INVALID_WATCH_ID,
            created: true,
            canceled: true,
            cancel_reason: reason.to_string(),
            ..Default::default()
        };
        self.send_control(resp).await
    }

    async fn create(&mut self, mut c: pb::WatchCreateRequest) -> Result<(), Gone> {
        if c.key.is_empty() {
            // etcd's: "\0" is the smallest key, so an empty key with "\0" watches everything.
            c.key = Bytes::from_static(b"\0");
        }
        if c.start_revision < 0 {
            return self.refuse_create(ERR_COMPACTED).await;
        }
        let bounded = !c.range_end.is_empty() && c.range_end[..] != [0];
        if bounded && c.key >= c.range_end {
            return self.refuse_create(ERR_EMPTY_RANGE).await;
        }
        let id = if c.watch_id != 0 {
            if self.watchers.contains_key(&c.watch_id) {
                return self.refuse_create(ERR_DUPLICATE_ID).await;
            }
            c.watch_id
        } else {
            while self.watchers.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id += 1;
            self.next_id - 1
        };
        if self.watchers.len() >= MAX_WATCHERS_PER_STREAM {
            let reason =
                format!("keel: too many watchers on one stream (limit {MAX_WATCHERS_PER_STREAM})");
            return self.refuse_create(&reason).await;
        }
        let revision = match self.current_revision().await? {
            Ok(r) => r,
            Err(e) => {
                let _ = self.out.send((Err(status_of(e)), None)).await;
                return Err(Gone);
            }
        };
        let next_rev = if c.start_revision == 0 {
            revision + 1
        } else {
            c.start_revision
        };
        let filters = |f: FilterType| c.filters.contains(&(f as i32));
        let w = Watcher {
            key: c.key,
            range_end: c.range_end,
            next_rev,
            synced: next_rev > revision,
            prev_kv: c.prev_kv,
            no_put: filters(FilterType::Noput),
            no_delete: filters(FilterType::Nodelete),
            progress_notify: c.progress_notify,
            fragment: c.fragment,
            active: false,
        };
        self.watchers.insert(id, w);
        self.shared.app.metrics.watchers.inc();
        let resp = pb::WatchResponse {
            header: self.header(revision),
            watch_id: id,
            created: true,
            ..Default::default()
        };
        self.send_control(resp).await
    }

    /// One slice of history for watcher `id`.
    async fn catch_up(&mut self, id: i64) -> Result<(), Gone> {
        let Some(w) = self.watchers.get(&id) else {
            return Ok(());
        };
        let (start, key, range_end) = (w.next_rev, w.key.clone(), w.range_end.clone());
        let h = match self.shared.app.node.history(start, key, range_end).await {
            Ok(h) => h,
            Err(keel_node::driver::DriverError::Overloaded) => {
                tokio::time::sleep(HISTORY_RETRY).await;
                return Ok(());
            }
            Err(e) => {
                let _ = self.out.send((Err(status_of(e)), None)).await;
                return Err(Gone);
            }
        };
        match h {
            Err(HistoryError::Compacted { compact_revision }) => {
                self.watchers.remove(&id);
                self.shared.app.metrics.watchers.dec();
                let resp = pb::WatchResponse {
                    header: self.header(self.revision),
                    watch_id: id,
                    compact_revision,
                    canceled: true,
                    ..Default::default()
                };
                self.send_control(resp).await
            }
            Ok(h) => {
                self.revision = self.revision.max(h.revision);
                let Some(w) = self.watchers.get_mut(&id) else {
                    return Ok(());
                };
                let events: Vec<mvccpb::Event> = h
                    .events
                    .iter()
                    .filter(|e| w.wants(e))
                    .map(|e| w.event_out(e))
                    .collect();
                w.next_rev = h.next;
                w.synced = h.next > h.revision;
                let fragment = w.fragment;
                if events.is_empty() {
                    return Ok(());
                }
                w.active = true;
                self.send_events(id, events, h.revision, fragment).await
            }
        }
    }

    async fn on_feed(&mut self, feed: &WatchFeed) -> Result<(), Gone> {
        if feed.reset {
            self.unsync_all();
        }
        self.revision = self.revision.max(feed.revision);
        let mut batches = Vec::new();
        for (&id, w) in self.watchers.iter_mut() {
            if !w.synced {
                continue;
            }
            let events: Vec<mvccpb::Event> = feed
                .events
                .iter()
                .filter(|e| e.kv.mod_revision >= w.next_rev && w.covers(&e.kv.key) && w.wants(e))
                .map(|e| w.event_out(e))
                .collect();
            w.next_rev = w.next_rev.max(feed.revision + 1);
            if !events.is_empty() {
                w.active = true;
                batches.push((id, events, w.fragment));
            }
        }
        for (id, events, fragment) in batches {
            self.send_events(id, events, feed.revision, fragment)
                .await?;
        }
        Ok(())
    }

    async fn progress_tick(&mut self) -> Result<(), Gone> {
        let mut due = Vec::new();
        for (&id, w) in self.watchers.iter_mut() {
            if w.progress_notify && w.synced && !w.active {
                due.push(id);
            }
            w.active = false;
        }
        for id in due {
            let resp = pb::WatchResponse {
                header: self.header(self.revision),
                watch_id: id,
                ..Default::default()
            };
            self.send(resp).await?;
        }
        Ok(())
    }

    async fn send_events(
        &mut self,
        id: i64,
        events: Vec<mvccpb::Event>,
        revision: i64,
        fragment: bool,
    ) -> Result<(), Gone> {
        let resp = pb::WatchResponse {
            header: self.header(revision),
            watch_id: id,
            events,
            ..Default::default()
        };
        if !fragment {
            return self.send(resp).await;
        }
        for part in fragments(resp, self.shared.app.cfg.max_request_bytes) {
            self.send(part).await?;
        }
        Ok(())
    }

    /// Answers to requests wait for room: the client asked for them, and it reads them.
    async fn send_control(&mut self, resp: pb::WatchResponse) -> Result<(), Gone> {
        self.out.send((Ok(resp), None)).await.map_err(|_| Gone)
    }

    /// Sends a response for a watcher; a client that does not make room within [`SLOW_GRACE`]
    /// loses its watchers.
    async fn send(&mut self, resp: pb::WatchResponse) -> Result<(), Gone> {
        // A response larger than the whole budget takes all of it, and waits for an empty
        // stream.
        let size = resp.encoded_len().clamp(1, STREAM_BYTES) as u32;
        let fast = match self.bytes.clone().try_acquire_many_owned(size) {
            Ok(permit) => match self.out.clone().try_reserve_owned() {
                Ok(slot) => Some((permit, slot)),
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(Gone),
                Err(mpsc::error::TrySendError::Full(_)) => None,
            },
            Err(_) => None,
        };
        let (permit, slot) = match fast {
            Some(r) => r,
            None => {
                let waited = tokio::time::timeout(
                    SLOW_GRACE,
                    room(self.bytes.clone(), self.out.clone(), size),
                )
                .await;
                match waited {
                    Ok(Some(r)) => r,
                    Ok(None) => return Err(Gone),
                    Err(_) => return self.cancel_slow().await,
                }
            }
        };
        slot.send((Ok(resp), Some(permit)));
        Ok(())
    }

    /// The client left a full stream unread for [`SLOW_GRACE`]: every watcher of the stream is
    /// cancelled, with a reason, rather than buffered for. The response that did not fit was for
    /// one of them.
    async fn cancel_slow(&mut self) -> Result<(), Gone> {
        let watchers = std::mem::take(&mut self.watchers);
        let m = &self.shared.app.metrics;
        m.watchers.dec_by(watchers.len() as i64);
        m.watch_slow_cancels.inc_by(watchers.len() as u64);
        let reason = format!(
            "keel: watcher too slow: its stream stayed full ({STREAM_BUFFER} responses or \
             {STREAM_BYTES} bytes) for {} s",
            SLOW_GRACE.as_secs()
        );
        tracing::warn!(
            "cancelling {} watchers of a stream: {reason}",
            watchers.len()
        );
        for id in watchers.into_keys() {
            let resp = pb::WatchResponse {
                header: self.header(self.revision),
                watch_id: id,
                canceled: true,
                cancel_reason: reason.clone(),
                ..Default::default()
            };
            self.send_control(resp).await?;
        }
        Ok(())
    }
}

/// Waits for `size` stream bytes and a slot; `None` when the client went away.
async fn room(
    bytes: Arc<Semaphore>,
    out: mpsc::Sender<Outgoing>,
    size: u32,
) -> Option<(OwnedSemaphorePermit, mpsc::OwnedPermit<Outgoing>)> {
    let permit = bytes.acquire_many_owned(size).await.ok()?;
    let slot = out.reserve_owned().await.ok()?;
    Some((permit, slot))
}

/// etcd's fragmentation: a response at or above `limit` bytes with more than one event is sent
/// as several, each below the limit where one event allows it, all but the last marked
/// `fragment`.
fn fragments(resp: pb::WatchResponse, limit: usize) -> Vec<pb::WatchResponse> {
    if resp.encoded_len() < limit || resp.events.len() < 2 {
        return vec![resp];
    }
    let mut parts = Vec::new();
    let template = pb::WatchResponse {
        events: Vec::new(),
        ..resp.clone()
    };
    let mut cur = template.clone();
    for ev in resp.events {
        cur.events.push(ev);
        if cur.events.len() > 1 && cur.encoded_len() >= limit {
            let last = cur.events.pop();
            let mut full = std::mem::replace(&mut cur, template.clone());
            full.fragment = true;
            parts.push(full);
            cur.events.extend(last);
        }
    }
    parts.push(cur);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(key: &str, value_len: usize) -> mvccpb::Event {
        mvccpb::Event {
            r#type: 0,
            kv: Some(mvccpb::KeyValue {
                key: Bytes::from(key.to_string()),
                value: Bytes::from(vec![b'x'; value_len]),
                ..Default::default()
            }),
            prev_kv: None,
        }
    }

    #[test]
    fn fragments_keep_every_event_in_order_and_mark_all_but_the_last() {
        let events: Vec<_> = (0..10).map(|i| event(&format!("k{i}"), 100)).collect();
        let resp = pb::WatchResponse {
            watch_id: 3,
            events: events.clone(),
            ..Default::default()
        };
        let parts = fragments(resp.clone(), 350);
        assert!(parts.len() > 1);
        let joined: Vec<_> = parts.iter().flat_map(|p| p.events.clone()).collect();
        assert_eq!(joined, events);
        for (i, p) in parts.iter().enumerate() {
            assert_eq!(p.fragment, i + 1 < parts.len());
            assert_eq!(p.watch_id, 3);
            assert!(p.encoded_len() < 350 || p.events.len() == 1);
        }
        // Small enough: sent whole.
        assert_eq!(fragments(resp, 1 << 20).len(), 1);
    }

    #[test]
    fn one_big_event_is_never_split() {
        let resp = pb::WatchResponse {
            events: vec![event("k", 10_000)],
            ..Default::default()
        };
        let parts = fragments(resp, 100);
        assert_eq!(parts.len(), 1);
        assert!(!parts[0].fragment);
    }

    fn watcher(key: &str, range_end: &[u8]) -> Watcher {
        Watcher {
            key: Bytes::from(key.to_string()),
            range_end: Bytes::copy_from_slice(range_end),
            next_rev: 1,
            synced: true,
            prev_kv: false,
            no_put: false,
            no_delete: false,
            progress_notify: false,
            fragment: false,
            active: false,
        }
    }

    #[test]
    fn ranges_mean_what_they_mean_in_etcd() {
        let one = watcher("a", b"");
        assert!(one.covers(b"a") && !one.covers(b"ab"));
        let from = watcher("b", b"\0");
        assert!(from.covers(b"b") && from.covers(b"zzz") && !from.covers(b"a"));
        let prefix = watcher("p/", b"p0");
        assert!(prefix.covers(b"p/x") && !prefix.covers(b"p0") && !prefix.covers(b"p"));
        let all = watcher("\0", b"\0");
        assert!(all.covers(b"\0") && all.covers(b"anything"));
    }
}
