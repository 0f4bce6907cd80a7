//! Keel's state machine: an etcd v3 MVCC key space.
//!
//! A [`Store`] holds every key's history since the last compaction, one cluster-wide revision,
//! leases as data and a table for at-most-once apply. It is pure and deterministic: no clock, no
//! randomness, no I/O, no Raft. Members that apply the same [`Command`]s at the same indexes hold
//! equal stores, byte for byte in [`Store::snapshot`].
//!
//! Writes arrive as [`Command`]s through [`Store::apply`], each returning its response and the
//! [`Event`]s for watchers. Reads ([`Store::range`], [`Store::txn_read`], [`Store::events_since`])
//! borrow the store and are served by the node after ReadIndex (linearizable) or straight away
//! (serializable).
//!
//! Limits: the store puts no bound on key or value size (etcd has none either beyond the request
//! size, which the API layer checks against [`DEFAULT_MAX_REQUEST_BYTES`]); an empty key is
//! refused. Txn nesting is bounded by [`MAX_TXN_DEPTH`]; the op-count limit
//! ([`TxnRequest::check_op_limit`]) is a server setting the caller enforces.

mod codec;
mod dedup;
mod error;
mod hash;
mod lease;
mod snapshot;
mod span;
mod store;
mod txn;
mod types;
mod validate;
mod watch;

pub use codec::COMMAND_FORMAT_VERSION;
pub use error::{DecodeError, Error};
pub use snapshot::{StoreImage, SNAPSHOT_FORMAT_VERSION};
pub use store::Store;
pub use types::*;

/// Deepest txn nesting accepted (a top-level txn is depth 1). etcd relies on protobuf's recursion
/// limit (100); a lower bound here keeps decode, validation and apply recursion far from the
/// stack's end.
pub const MAX_TXN_DEPTH: usize = 32;

/// etcd's `MaxLeaseTTL` in seconds; a larger TTL would overflow the node layer's deadline
/// arithmetic.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

/// etcd's default `--max-txn-ops`, for callers of [`TxnRequest::check_op_limit`].
pub const DEFAULT_MAX_TXN_OPS: usize = 128;

/// etcd's default `--max-request-bytes` (1.5 MiB). The only size limit on keys and values; enforced
/// by the API layer on the whole request, since the store sees requests after they are in the log.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1536 * 1024;

/// Results remembered per proposer for at-most-once apply.
///
/// Duplicates come from retransmitted proposals (a follower forwarding to a leader that changed, a
/// proposal re-submitted after a timeout). The contract with the node layer: a proposer keeps fewer
/// than `DEDUP_WINDOW` proposals unresolved at a time (it needs such a bound for backpressure
/// anyway). Then a retransmitted request is always either still in its proposer's window (applied:
/// its first result is replayed) or above the window (never applied: it applies now), because at
/// most `DEDUP_WINDOW - 1` newer requests can have been applied while it was unresolved. Anything
/// at or below the window is refused ([`Error::StaleRequest`]) rather than risk a second
/// application. Bounded because each entry holds a whole response.
pub const DEDUP_WINDOW: usize = 1024;

/// Proposers remembered at once. Proposers are node incarnations, a few per member over a
/// cluster's life; when more appear, the one that applied least recently is forgotten, since a
/// proposer silent that long has no retransmission left in flight.
pub const DEDUP_MAX_PROPOSERS: usize = 64;
