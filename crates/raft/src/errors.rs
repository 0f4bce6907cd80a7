use thiserror::Error;

/// Errors a `Storage` implementation reports to the core.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StorageError {
    /// The requested index is at or below the first index kept: it was folded into a snapshot.
    #[error("log index {0} is compacted")]
    Compacted(u64),
    /// The requested index is above the last index kept.
    #[error("log index {0} is unavailable")]
    Unavailable(u64),
    /// A snapshot is being produced and is not ready yet; the core retries later.
    #[error("snapshot temporarily unavailable")]
    SnapshotTemporarilyUnavailable,
    /// An I/O or decoding failure. The core cannot continue safely past this and panics
    /// where it has no way to report it (the driver should stop the node first).
    #[error("storage: {0}")]
    Other(String),
}

/// Operating conditions the caller of the core is expected to handle (never programmer errors).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Error {
    #[error("proposal dropped: {0}")]
    ProposalDropped(DropReason),
    #[error("step of a local message type {0:?} through step()")]
    StepLocalMsg(i32),
    #[error("message to {to} from peer {from} is not for this node")]
    StepPeerNotFound { from: u64, to: u64 },
    #[error("invalid configuration: {0}")]
    ConfigInvalid(String),
    #[error("membership change refused: {0}")]
    ConfChangeRefused(String),
    #[error("{0}")]
    Storage(#[from] StorageError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// This node is not the leader and knows no leader to forward to.
    NoLeader,
    /// The leader is handing leadership over and refuses new work until that finishes or times out.
    LeaderTransferring,
    /// The uncommitted tail of the log is over `max_uncommitted_size`.
    UncommittedSizeExceeded,
    /// This node is not in its own configuration: removed, or not yet told it was added.
    NotAMember,
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            DropReason::NoLeader => "no leader",
            DropReason::LeaderTransferring => "leader transfer in progress",
            DropReason::UncommittedSizeExceeded => "too many uncommitted bytes",
            DropReason::NotAMember => "this node is not a member of the cluster",
        };
        f.write_str(s)
    }
}

pub type Result<T> = std::result::Result<T, Error>;
