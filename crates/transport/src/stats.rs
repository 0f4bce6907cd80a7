//! Counters for the metrics layer. Plain atomics, updated with `Relaxed`: each is an
//! independent monotonic count, read for display, never used to synchronise.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Stats {
    /// Messages written to a peer's socket (outbound; snapshots not included).
    pub sent: AtomicU64,
    /// Write calls that carried those messages; `sent / write_batches` is the batching factor.
    pub write_batches: AtomicU64,
    /// Bytes written on Raft connections, frame headers included.
    pub bytes_sent: AtomicU64,
    /// Messages refused by `send` because the peer's queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Messages refused by `send` because `to` is not a known peer.
    pub dropped_unknown_peer: AtomicU64,
    /// Outbound messages whose encoding is over `max_frame_size`.
    pub dropped_too_large: AtomicU64,
    /// Messages lost because their peer was unreachable or the connection failed mid-write.
    pub send_failures: AtomicU64,
    /// Successful connections to a peer after its first (a redial after a loss or failure).
    pub reconnects: AtomicU64,
    /// Frames read from accepted connections (all kinds).
    pub frames_received: AtomicU64,
    /// Bytes read from accepted connections after the hello.
    pub bytes_received: AtomicU64,
    /// Inbound messages dropped because the inbox was full (by count or bytes).
    pub dropped_inbox_full: AtomicU64,
    /// Inbound messages whose `from` or `to` disagrees with the connection's handshake.
    pub dropped_misaddressed: AtomicU64,
    /// Inbound connections refused at the handshake (bad magic, version, cluster or id).
    pub rejected_handshakes: AtomicU64,
    /// Inbound connections closed for an oversized, unknown or malformed frame.
    pub protocol_errors: AtomicU64,
    /// Snapshots the peer confirmed it delivered to its node.
    pub snapshots_sent: AtomicU64,
    /// Snapshots that did not reach the peer's node (refused, lost, timed out, queue full).
    pub snapshots_failed: AtomicU64,
    /// Snapshots received whole and delivered to this node.
    pub snapshots_received: AtomicU64,
    /// Inbound snapshots refused (over the size limit, too many at once, broken stream).
    pub snapshots_refused: AtomicU64,
    /// Snapshot chunks received (lets tests and dashboards see a stream in progress).
    pub snapshot_chunks_received: AtomicU64,
    /// Reports dropped because the report channel was full.
    pub reports_dropped: AtomicU64,
}

impl Stats {
    /// Reads one counter; shorthand for `counter.load(Relaxed)`.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
