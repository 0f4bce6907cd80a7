//! Requests, responses, events and the Raft log command.
//!
//! Field names, defaults and enum numbering follow etcd's `rpc.proto` and `kv.proto` so that the
//! gRPC layer maps them one to one. Where etcd's meaning of a field depends on a magic value
//! (`range_end == "\0"`, `revision == 0`, `limit == 0`) the same magic value means the same thing
//! here.

use bytes::Bytes;

/// One version of a key, as clients see it (etcd `mvccpb.KeyValue`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyValue {
    pub key: Bytes,
    /// Revision of the put that created this incarnation of the key. A delete ends an incarnation,
    /// so a put after a delete starts a new one with a new `create_revision`. 0 only in the `kv` of
    /// a delete event.
    pub create_revision: i64,
    /// Revision of the last write to the key (for a delete event: the revision of the delete).
    pub mod_revision: i64,
    /// 1 on creation, +1 per put within the incarnation. 0 only in the `kv` of a delete event.
    pub version: i64,
    pub value: Bytes,
    /// Lease the key is attached to; 0 = none.
    pub lease: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change, for watchers (etcd `mvccpb.Event`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// After a put: the new version. After a delete: only `key` and `mod_revision` (the delete's
    /// revision) are set, as in etcd.
    pub kv: KeyValue,
    /// The version this change replaced, if the key was live before it. Always filled in; a watcher
    /// that did not ask for `prev_kv` drops it.
    pub prev_kv: Option<KeyValue>,
}

/// Numbering as etcd's `RangeRequest.SortOrder`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortOrder {
    #[default]
    None = 0,
    Ascend = 1,
    Descend = 2,
}

/// Numbering as etcd's `RangeRequest.SortTarget`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortTarget {
    #[default]
    Key = 0,
    Version = 1,
    Create = 2,
    Mod = 3,
    Value = 4,
}

/// etcd `RangeRequest`, less `serializable`, which chooses how the node serves the read and is not
/// the store's business.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RangeRequest {
    /// Must not be empty.
    pub key: Bytes,
    /// Empty: just `key`. `"\0"`: every key >= `key`. Otherwise the half-open range [`key`,
    /// `range_end`), empty when `range_end <= key`.
    pub range_end: Bytes,
    /// Most keys returned; 0 or negative = no limit. `more` tells whether some were left out.
    pub limit: i64,
    /// Revision to read at; 0 or negative = the current one.
    pub revision: i64,
    pub sort_order: SortOrder,
    pub sort_target: SortTarget,
    pub keys_only: bool,
    pub count_only: bool,
    /// Filters on the returned keys; 0 = no bound. They apply before `limit` but not to `count`, as
    /// in etcd.
    pub min_mod_revision: i64,
    pub max_mod_revision: i64,
    pub min_create_revision: i64,
    pub max_create_revision: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RangeResponse {
    /// Header revision: the store's revision when the read was served (not the revision read at),
    /// as in etcd.
    pub revision: i64,
    pub kvs: Vec<KeyValue>,
    /// Whether `limit` left out keys that passed the filters.
    pub more: bool,
    /// Number of live keys in the range at the read revision, before filters and limit.
    pub count: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PutRequest {
    /// Must not be empty.
    pub key: Bytes,
    /// Must be empty when `ignore_value` is set.
    pub value: Bytes,
    /// Lease to attach, 0 = none (and detach from any former lease). Must exist. Must be 0 when
    /// `ignore_lease`.
    pub lease: i64,
    pub prev_kv: bool,
    /// Keep the current value; the key must exist.
    pub ignore_value: bool,
    /// Keep the current lease; the key must exist.
    pub ignore_lease: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PutResponse {
    pub revision: i64,
    /// Set when asked for and the key was live.
    pub prev_kv: Option<KeyValue>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeleteRangeRequest {
    /// Must not be empty.
    pub key: Bytes,
    /// Same meaning as in [`RangeRequest::range_end`].
    pub range_end: Bytes,
    pub prev_kv: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeleteRangeResponse {
    pub revision: i64,
    pub deleted: i64,
    /// In key order, when asked for.
    pub prev_kvs: Vec<KeyValue>,
}

/// Numbering as etcd's `Compare.CompareResult`. The comparison reads `key's field <op> target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompareResult {
    #[default]
    Equal = 0,
    Greater = 1,
    Less = 2,
    NotEqual = 3,
}

/// etcd's `Compare.target` together with its `target_union` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompareTarget {
    Version(i64),
    Create(i64),
    Mod(i64),
    Value(Bytes),
    Lease(i64),
}

impl Default for CompareTarget {
    fn default() -> Self {
        CompareTarget::Version(0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Compare {
    pub result: CompareResult,
    pub target: CompareTarget,
    pub key: Bytes,
    /// Same meaning as in [`RangeRequest::range_end`]; every live key in the range must pass. An
    /// empty range compares like a missing key: every field 0, except that a `Value` comparison
    /// fails.
    pub range_end: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestOp {
    Range(RangeRequest),
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
    Txn(TxnRequest),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseOp {
    Range(RangeResponse),
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
}

/// etcd `TxnRequest`: if every compare holds, run `success`, else `failure`, all at one revision.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TxnRequest {
    pub compare: Vec<Compare>,
    pub success: Vec<RequestOp>,
    pub failure: Vec<RequestOp>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TxnResponse {
    pub revision: i64,
    pub succeeded: bool,
    pub responses: Vec<ResponseOp>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CompactRequest {
    pub revision: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CompactResponse {
    pub revision: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeaseGrantRequest {
    /// 0: the store picks the lowest unused id at or after its counter (deterministic on every
    /// member).
    pub id: i64,
    /// Seconds. The node layer raises it to its minimum before proposing; the store only refuses
    /// more than [`crate::MAX_LEASE_TTL`].
    pub ttl: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeaseGrantResponse {
    pub revision: i64,
    pub id: i64,
    pub ttl: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeaseRevokeRequest {
    pub id: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeaseRevokeResponse {
    pub revision: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeaseCheckpoint {
    pub id: i64,
    pub remaining_ttl: i64,
}

/// etcd `LeaseCheckpointRequest`: records the leader's view of remaining TTLs so that a new leader
/// does not restart every lease at its full TTL. Unknown ids are skipped, as in etcd (the lease may
/// have been revoked meanwhile).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaseCheckpointRequest {
    pub checkpoints: Vec<LeaseCheckpoint>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeaseCheckpointResponse {
    pub revision: i64,
}

/// What a lease looks like from outside (etcd `LeaseTimeToLiveResponse` less the node layer's
/// clock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    pub id: i64,
    /// Last checkpointed remaining TTL in seconds; equal to `granted_ttl` until a checkpoint is
    /// applied.
    pub ttl: i64,
    pub granted_ttl: i64,
}

/// Identifies one proposal for at-most-once apply.
///
/// `(proposer, seq)` must never be reused: a proposer that restarts takes a new `proposer` id (or
/// carries its `seq` on), and `seq` grows with each proposal, which lets the store refuse a
/// retransmission that arrives after its dedup window has moved on instead of applying it a second
/// time. A proposer keeps fewer than [`crate::DEDUP_WINDOW`] proposals unresolved at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId {
    pub proposer: u64,
    pub seq: u64,
}

/// Every kind of write, i.e. everything that goes through the Raft log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Changes nothing but the applied index; lets the node confirm it has applied everything of
    /// its term.
    Noop,
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
    Txn(TxnRequest),
    Compact(CompactRequest),
    LeaseGrant(LeaseGrantRequest),
    LeaseRevoke(LeaseRevokeRequest),
    LeaseCheckpoint(LeaseCheckpointRequest),
}

/// One Raft log entry's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// Set for proposals that may be retransmitted (forwarded to a leader); `None` opts out of
    /// dedup.
    pub request_id: Option<RequestId>,
    pub op: Op,
}

impl Command {
    pub fn new(op: Op) -> Command {
        Command {
            request_id: None,
            op,
        }
    }

    pub fn with_id(request_id: RequestId, op: Op) -> Command {
        Command {
            request_id: Some(request_id),
            op,
        }
    }
}

/// What applying an [`Op`] answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Noop,
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    Compact(CompactResponse),
    LeaseGrant(LeaseGrantResponse),
    LeaseRevoke(LeaseRevokeResponse),
    LeaseCheckpoint(LeaseCheckpointResponse),
}

/// The outcome of [`crate::Store::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// What the proposer is told. An error means the command changed nothing (beyond the applied
    /// index).
    pub result: Result<Response, crate::Error>,
    /// Every change in (revision, sub-revision) order, for the watch hub. Empty for a duplicate:
    /// its changes went out when it was first applied.
    pub events: Vec<Event>,
    /// The request id had been applied before; `result` is the first application's result.
    pub duplicate: bool,
}

/// Result of [`crate::Store::hash_kv`] (etcd `HashKVResponse`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashKv {
    pub hash: u32,
    pub compact_revision: i64,
    pub hash_revision: i64,
}
