//! The node's side of the transport: inbound messages and reports about outbound ones.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use keel_proto::raftpb::Message;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use crate::stats::Stats;

/// What the node driver must tell its Raft core about outbound traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Report {
    /// Messages to this peer were lost (a failed batch, a failed dial, a lost connection):
    /// call `RawNode::report_unreachable(id)`. Sent once per such event, not per message.
    Unreachable(u64),
    /// A snapshot stream to `to` ended: `ok` means the peer delivered it whole to its node.
    /// Call `RawNode::report_snapshot(to, ok)`.
    Snapshot { to: u64, ok: bool },
}

/// Reports for the node driver.
pub type Reports = mpsc::Receiver<Report>;

#[derive(Clone, Debug)]
pub(crate) struct Reporter {
    tx: mpsc::Sender<Report>,
    stats: Arc<Stats>,
}

impl Reporter {
    pub(crate) fn new(tx: mpsc::Sender<Report>, stats: Arc<Stats>) -> Reporter {
        Reporter { tx, stats }
    }

    /// Never waits: an unreachable report is a hint (Raft also notices missing responses), so
    /// losing one to a full channel costs only speed.
    pub(crate) fn unreachable(&self, id: u64) {
        self.try_report(Report::Unreachable(id));
    }

    pub(crate) fn try_report(&self, r: Report) {
        if self.tx.try_send(r).is_err() {
            Stats::inc(&self.stats.reports_dropped);
        }
    }

    /// Waits for room: the leader keeps a follower in snapshot state until it hears the
    /// outcome, so this report must not be lost. Only the peer's snapshot task waits here.
    pub(crate) async fn snapshot(&self, to: u64, ok: bool) {
        // An error means the driver is gone; there is nobody left to tell.
        let _ = self.tx.send(Report::Snapshot { to, ok }).await;
    }
}

/// What an inbound message costs against the inbox's limits until the node takes it.
#[derive(Debug)]
enum Charge {
    /// Frame bytes, counted in `queued_bytes`.
    Bytes(usize),
    /// A snapshot holds one of `max_inbound_snapshots` permits until the node has taken it.
    Snapshot { _permit: OwnedSemaphorePermit },
}

#[derive(Debug)]
pub(crate) struct Delivery {
    msg: Message,
    charge: Charge,
}

/// Inbound messages from every peer, in arrival order per connection. Bounded by count and
/// by bytes; when either bound is reached new messages are dropped and counted
/// (`Stats::dropped_inbox_full`), because Raft retransmits and a reader that waited instead
/// would stall its peer's whole stream (and, past the peer's write timeout, its connection).
/// Ends (`recv` returns `None`) once the transport has shut down.
#[derive(Debug)]
pub struct Inbox {
    rx: mpsc::Receiver<Delivery>,
    /// Frame bytes of the non-snapshot messages in `rx`.
    queued_bytes: Arc<AtomicUsize>,
}

impl Inbox {
    pub async fn recv(&mut self) -> Option<Message> {
        let d = self.rx.recv().await?;
        Some(self.take(d))
    }

    /// For a consumer that waits on several sources at once (the Raft thread, outside any
    /// runtime). `Ready(None)`: the transport has shut down.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.rx.poll_recv(cx).map(|d| d.map(|d| self.take(d)))
    }

    /// A message if one is waiting; `None` if the inbox is empty or closed.
    pub fn try_recv(&mut self) -> Option<Message> {
        let d = self.rx.try_recv().ok()?;
        Some(self.take(d))
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.rx.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    fn take(&self, d: Delivery) -> Message {
        if let Charge::Bytes(n) = d.charge {
            self.queued_bytes.fetch_sub(n, Ordering::Relaxed);
        }
        d.msg
    }
}

#[derive(Clone, Debug)]
pub(crate) struct InboxSender {
    tx: mpsc::Sender<Delivery>,
    queued_bytes: Arc<AtomicUsize>,
    max_bytes: usize,
}

pub(crate) fn inbox(capacity: usize, max_bytes: usize) -> (InboxSender, Inbox) {
    let (tx, rx) = mpsc::channel(capacity);
    let queued_bytes = Arc::new(AtomicUsize::new(0));
    (
        InboxSender {
            tx,
            queued_bytes: queued_bytes.clone(),
            max_bytes,
        },
        Inbox { rx, queued_bytes },
    )
}

impl InboxSender {
    /// Queues a message of `frame_len` bytes, or returns false if the inbox is full (by count
    /// or bytes) or closed.
    pub(crate) fn try_deliver(&self, msg: Message, frame_len: usize) -> bool {
        // Relaxed: the byte bound may be overshot by concurrent readers by at most one frame
        // each, which is within what the bound is for.
        let before = self.queued_bytes.fetch_add(frame_len, Ordering::Relaxed);
        if before + frame_len > self.max_bytes {
            self.queued_bytes.fetch_sub(frame_len, Ordering::Relaxed);
            return false;
        }
        let d = Delivery {
            msg,
            charge: Charge::Bytes(frame_len),
        };
        if self.tx.try_send(d).is_err() {
            self.queued_bytes.fetch_sub(frame_len, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Queues a received snapshot, waiting up to `limit` for room.
    pub(crate) async fn deliver_snapshot(
        &self,
        msg: Message,
        permit: OwnedSemaphorePermit,
        limit: Duration,
    ) -> bool {
        let d = Delivery {
            msg,
            charge: Charge::Snapshot { _permit: permit },
        };
        matches!(
            tokio::time::timeout(limit, self.tx.send(d)).await,
            Ok(Ok(()))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn inbox_bounds_by_count_and_by_bytes_and_frees_on_take() {
        let (tx, mut rx) = inbox(3, 100);
        assert!(tx.try_deliver(Message::default(), 60));
        assert!(
            !tx.try_deliver(Message::default(), 41),
            "over the byte bound"
        );
        assert!(tx.try_deliver(Message::default(), 40));
        assert!(tx.try_deliver(Message::default(), 0));
        assert!(
            !tx.try_deliver(Message::default(), 0),
            "over the count bound"
        );
        rx.try_recv().unwrap();
        assert!(tx.try_deliver(Message::default(), 60), "60 bytes freed");
        assert_eq!(rx.len(), 3);
    }
}
