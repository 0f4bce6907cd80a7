//! Limits and timeouts. Every queue, buffer and wait of the transport is bounded by one of
//! these; the defaults are sized for a LAN cluster and say why.

use std::time::Duration;

use crate::error::Error;
use crate::wire::MAX_CONTROL_FRAME;

const MIB: usize = 1 << 20;

/// Transport settings. `Config::new` gives the defaults; change fields, then
/// [`crate::Transport::bind`] validates them.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's id: what dialers must name as `to` and what this node sends as `from`.
    /// Non-zero (Raft's "no node").
    pub id: u64,
    /// Connections from another cluster are refused at the handshake, so two clusters that
    /// share hosts can never exchange messages because of a stale address.
    pub cluster_id: u64,
    /// Largest frame accepted or sent (16 MiB). Raft appends are bounded by the core's
    /// `max_size_per_msg` (about 1 MiB) plus one entry, and entries by the API's request
    /// limit, so 16 MiB is far above any legitimate frame while capping what one peer
    /// connection can make this node buffer. Must be the same on every node.
    pub max_frame_size: usize,
    /// Messages queued per peer before `send` drops (4096). A leader emits at most a few
    /// hundred messages per peer per tick; a peer that falls this far behind is slow or gone,
    /// and Raft retransmits what was dropped.
    pub peer_queue_capacity: usize,
    /// Bytes the peer's task writes under one `write_timeout` (1 MiB), when it writes what
    /// the sender could not: a backlog of many MiB is given time by the MiB, so a peer that
    /// reads slowly but steadily is not mistaken for one that stopped.
    pub max_batch_bytes: usize,
    /// Inbound messages waiting for the node (4096), over all peers.
    pub inbox_capacity: usize,
    /// Bytes of inbound messages waiting for the node (64 MiB), over all peers; with
    /// `inbox_capacity` this bounds memory even when every message is a large append.
    /// Snapshots are bounded separately by `max_snapshot_size * max_inbound_snapshots`.
    pub inbox_max_bytes: usize,
    /// Reports waiting for the node driver (1024). Reports are rare (one per failed batch or
    /// connection attempt, one per snapshot), so this is only reached by a driver that stopped
    /// reading; then unreachable reports are dropped and counted.
    pub report_capacity: usize,
    /// Time to establish TCP to a peer (3 s): longer than any LAN handshake, short enough
    /// that a black-holed address is retried within a few election timeouts.
    pub dial_timeout: Duration,
    /// Time for the hello and its answer, on either side (5 s). Also how long a connection
    /// that sends nothing may hold an acceptor slot.
    pub handshake_timeout: Duration,
    /// Time for one batch or one snapshot chunk to leave (5 s). A peer that stops reading
    /// (paused, overloaded) would otherwise hold the writer forever; after this the connection
    /// is treated as lost and redialed.
    pub write_timeout: Duration,
    /// First reconnect delay (50 ms); doubles per failure up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Longest reconnect delay (1 s): about one election timeout, so a peer that comes back is
    /// reconnected before the cluster needs it for a quorum.
    pub max_backoff: Duration,
    /// Bytes per snapshot chunk (1 MiB), at most `max_frame_size`.
    pub snapshot_chunk_size: usize,
    /// Largest snapshot accepted (1 GiB). The receiver assembles it in memory, so this is a
    /// memory bound; a file-backed receiver can raise it.
    pub max_snapshot_size: u64,
    /// Snapshots being received or waiting in the inbox at once (2). Each may hold up to
    /// `max_snapshot_size` bytes.
    pub max_inbound_snapshots: usize,
    /// Longest silence inside a snapshot stream (10 s), on either side.
    pub snapshot_idle_timeout: Duration,
    /// How long a received snapshot may wait for room in the inbox (10 s). Unlike a small
    /// message it is worth waiting for: dropping it wastes the whole transfer. The sender is
    /// told it failed after this.
    pub snapshot_deliver_timeout: Duration,
    /// Accepted connections at once (256): a few per peer, plus room for strays that are
    /// being refused.
    pub max_inbound_connections: usize,
}

impl Config {
    pub fn new(id: u64, cluster_id: u64) -> Config {
        Config {
            id,
            cluster_id,
            max_frame_size: 16 * MIB,
            peer_queue_capacity: 4096,
            max_batch_bytes: MIB,
            inbox_capacity: 4096,
            inbox_max_bytes: 64 * MIB,
            report_capacity: 1024,
            dial_timeout: Duration::from_secs(3),
            handshake_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
            snapshot_chunk_size: MIB,
            max_snapshot_size: 1 << 30,
            max_inbound_snapshots: 2,
            snapshot_idle_timeout: Duration::from_secs(10),
            snapshot_deliver_timeout: Duration::from_secs(10),
            max_inbound_connections: 256,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        let bad = |what: &str| Err(Error::InvalidConfig(what.to_string()));
        if self.id == 0 {
            return bad("id must be non-zero");
        }
        // u32 length prefix; the control-frame floor keeps a reject reason representable.
        if self.max_frame_size < MAX_CONTROL_FRAME || self.max_frame_size > u32::MAX as usize {
            return bad("max_frame_size must be within 1 KiB..=4 GiB-1");
        }
        if self.snapshot_chunk_size == 0 || self.snapshot_chunk_size > self.max_frame_size {
            return bad("snapshot_chunk_size must be within 1..=max_frame_size");
        }
        let zero_counts = [
            self.peer_queue_capacity,
            self.max_batch_bytes,
            self.inbox_capacity,
            self.inbox_max_bytes,
            self.report_capacity,
            self.max_inbound_snapshots,
            self.max_inbound_connections,
        ];
        if zero_counts.contains(&0) {
            return bad("queue, batch and connection limits must be non-zero");
        }
        let timeouts = [
            self.dial_timeout,
            self.handshake_timeout,
            self.write_timeout,
            self.initial_backoff,
            self.snapshot_idle_timeout,
            self.snapshot_deliver_timeout,
        ];
        if timeouts.iter().any(Duration::is_zero) {
            return bad("timeouts and backoff must be non-zero");
        }
        // Otherwise a legitimate message of the largest size could never enter the inbox.
        if self.inbox_max_bytes < self.max_frame_size {
            return bad("inbox_max_bytes must be at least max_frame_size");
        }
        if self.initial_backoff > self.max_backoff {
            return bad("initial_backoff must not exceed max_backoff");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        assert!(Config::new(1, 1).validate().is_ok());
        let reason = |c: Config| match c.validate() {
            Err(Error::InvalidConfig(r)) => r,
            other => panic!("expected InvalidConfig, got {other:?}"),
        };
        assert!(reason(Config::new(0, 1)).contains("id"));
        let mut c = Config::new(1, 1);
        c.snapshot_chunk_size = c.max_frame_size + 1;
        assert!(reason(c).contains("snapshot_chunk_size"));
        let mut c = Config::new(1, 1);
        c.peer_queue_capacity = 0;
        assert!(reason(c).contains("non-zero"));
        let mut c = Config::new(1, 1);
        c.initial_backoff = c.max_backoff * 2;
        assert!(reason(c).contains("backoff"));
    }
}
