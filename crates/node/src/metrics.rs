//! The node's Prometheus metrics. The Raft thread updates them (atomics, no locks on the hot
//! path); the API layer renders them on `/metrics`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

pub struct Metrics {
    registry: Registry,
    pub proposals: Counter,
    pub proposals_failed: Counter,
    pub reads: Counter,
    pub committed: Counter,
    pub applied: Counter,
    pub fsync_seconds: Histogram,
    pub leader_changes: Counter,
    pub peer_send_failures: Counter,
    pub peer_unreachable: Counter,
    pub snapshots: Counter,
    pub snapshots_installed: Counter,
    pub term: Gauge,
    pub is_leader: Gauge,
    pub commit_index: Gauge,
    pub applied_index: Gauge,
    pub wal_bytes: Gauge,
    pub leases: Gauge,
    pub leases_expired: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("keel");
        let counter = |r: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            r.register(name, help, c.clone());
            c
        };
        let gauge = |r: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            r.register(name, help, g.clone());
            g
        };
        let proposals = counter(&mut registry, "proposals", "Writes accepted for proposal");
        let proposals_failed = counter(
            &mut registry,
            "proposals_failed",
            "Writes refused, timed out or failed",
        );
        let reads = counter(&mut registry, "reads", "Linearizable reads accepted");
        let committed = counter(&mut registry, "committed_entries", "Log entries committed");
        let applied = counter(&mut registry, "applied_entries", "Log entries applied");
        // 50 us to ~1.6 s: a fast NVMe flush sits at the bottom, a stalled disk at the top.
        let fsync_seconds = Histogram::new(exponential_buckets(0.00005, 2.0, 16));
        registry.register(
            "wal_fsync_seconds",
            "Time to make one Ready durable (write and fdatasync)",
            fsync_seconds.clone(),
        );
        let leader_changes = counter(
            &mut registry,
            "leader_changes",
            "Times this node saw the leader change",
        );
        let peer_send_failures = counter(
            &mut registry,
            "peer_send_failures",
            "Messages the transport could not queue for a peer",
        );
        let peer_unreachable = counter(
            &mut registry,
            "peer_unreachable",
            "Reports of a peer that could not be reached",
        );
        let snapshots = counter(&mut registry, "snapshots", "Snapshots taken or installed");
        let snapshots_installed = counter(
            &mut registry,
            "snapshots_installed",
            "Snapshots received from a leader and installed",
        );
        let term = gauge(&mut registry, "term", "Current Raft term");
        let is_leader = gauge(&mut registry, "is_leader", "1 when this node is the leader");
        let commit_index = gauge(&mut registry, "commit_index", "Highest committed index");
        let applied_index = gauge(&mut registry, "applied_index", "Highest applied index");
        let wal_bytes = gauge(
            &mut registry,
            "wal_bytes",
            "Bytes of write-ahead log on disk",
        );
        let leases = gauge(&mut registry, "leases", "Leases in this node's store");
        let leases_expired = counter(
            &mut registry,
            "leases_expired",
            "Revokes this node proposed as leader for leases past their TTL",
        );
        Metrics {
            registry,
            proposals,
            proposals_failed,
            reads,
            committed,
            applied,
            fsync_seconds,
            leader_changes,
            peer_send_failures,
            peer_unreachable,
            snapshots,
            snapshots_installed,
            term,
            is_leader,
            commit_index,
            applied_index,
            wal_bytes,
            leases,
            leases_expired,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
