use thiserror::Error;

use crate::MAX_TXN_DEPTH;

/// Why a request was refused.
///
/// Messages are etcd's gRPC status messages byte for byte where etcd has one, because etcd clients
/// (clientv3's `rpctypes`) recognise errors by message, not by code. Errors are values that a dedup
/// table replays and a snapshot stores, hence `Clone` and `Eq`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Error {
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    /// `ignore_value` or `ignore_lease` on a key that does not exist.
    #[error("etcdserver: key not found")]
    KeyNotFound,
    #[error("etcdserver: value is provided")]
    ValueProvided,
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRevision,
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    /// Keel's own: bounds recursion in decode, validation and apply.
    #[error("keel: txn nested deeper than {MAX_TXN_DEPTH} levels")]
    TxnTooDeep,
    /// The request id is at or below what the dedup window still remembers for its proposer, so the
    /// store cannot tell whether it was applied; refusing keeps apply at most once.
    #[error("keel: request {seq} of proposer {proposer:#x} is older than the dedup window")]
    StaleRequest { proposer: u64, seq: u64 },
    /// [`crate::Store::txn_read`] was handed a txn that writes.
    #[error("keel: txn writes and cannot be served as a read")]
    TxnNotReadOnly,
}

impl Error {
    /// The gRPC status code etcd sends with this error (numbering of the gRPC spec), so that the
    /// API layer needs no table of its own.
    pub fn grpc_code(&self) -> u32 {
        const INVALID_ARGUMENT: u32 = 3;
        const NOT_FOUND: u32 = 5;
        const FAILED_PRECONDITION: u32 = 9;
        const ABORTED: u32 = 10;
        const OUT_OF_RANGE: u32 = 11;
        match self {
            Error::EmptyKey
            | Error::KeyNotFound
            | Error::ValueProvided
            | Error::LeaseProvided
            | Error::DuplicateKey
            | Error::TooManyOps
            | Error::TxnTooDeep => INVALID_ARGUMENT,
            Error::Compacted | Error::FutureRevision | Error::LeaseTtlTooLarge => OUT_OF_RANGE,
            Error::LeaseNotFound => NOT_FOUND,
            Error::LeaseExists | Error::TxnNotReadOnly => FAILED_PRECONDITION,
            Error::StaleRequest { .. } => ABORTED,
        }
    }
}

/// Why bytes could not be read back as a command or a snapshot. Decoding never panics and never
/// allocates more than a small multiple of its input, whatever the bytes.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("input ends inside a field at byte {0}")]
    Truncated(usize),
    #[error("invalid {what} at byte {offset}")]
    Invalid { what: &'static str, offset: usize },
    #[error("{0} unexpected bytes after the end")]
    TrailingBytes(usize),
    #[error("not a keel kv snapshot (bad magic)")]
    BadMagic,
    #[error("unsupported format version {0}")]
    UnsupportedVersion(u32),
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    ChecksumMismatch { stored: u32, computed: u32 },
    /// Well-formed bytes whose content breaks a store invariant: refusing them beats serving a
    /// corrupt key space.
    #[error("inconsistent snapshot: {0}")]
    Inconsistent(&'static str),
}
