use std::io;
use std::path::PathBuf;

use keel_raft::StorageError;

/// Everything that can go wrong in the WAL and the snapshot store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A record before the torn tail fails its checks: the data dir is damaged and recovery
    /// refuses to guess what was lost.
    #[error("corrupt WAL: {} at byte offset {offset}: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },

    #[error(
        "{}: written by format version {found}, but this build reads versions up to {supported}; \
         upgrade keel before opening this data dir",
        path.display()
    )]
    UnsupportedVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },

    #[error(
        "{}: belongs to node id {found}, but this node is configured as {expected}; \
         is the data dir of another member mounted here?",
        path.display()
    )]
    NodeIdMismatch {
        path: PathBuf,
        expected: u64,
        found: u64,
    },

    #[error(
        "{}: belongs to cluster id {found:#x}, but this node is configured for cluster {expected:#x}",
        path.display()
    )]
    ClusterIdMismatch {
        path: PathBuf,
        expected: u64,
        found: u64,
    },

    /// The snapshot file is damaged or not a snapshot.
    #[error("bad snapshot file {}: {reason}", path.display())]
    BadSnapshot { path: PathBuf, reason: String },

    /// The WAL says a snapshot was taken at `index`, but no intact snapshot file covers it.
    #[error(
        "no usable snapshot in {}: the WAL records a snapshot at index {index} term {term}, \
         and {detail}",
        dir.display()
    )]
    MissingSnapshot {
        dir: PathBuf,
        index: u64,
        term: u64,
        detail: String,
    },

    /// An earlier write or sync failed. After a failed fsync the kernel may have dropped the
    /// dirty pages and marked them clean, so what is on disk is unknown and a later successful
    /// fsync proves nothing (PostgreSQL's "fsyncgate"). Only reopening, which re-reads and
    /// verifies the files, gets back to a known state.
    #[error("the WAL refuses further use after an earlier failure ({0}); reopen it to recover")]
    Poisoned(String),

    #[error("entry {index} is {size} bytes, over the limit of {max} bytes for one WAL record")]
    EntryTooLarge { index: u64, size: u64, max: u64 },

    /// A caller broke the write-side contract (a gap in the log, a non-contiguous batch).
    #[error("invalid WAL operation: {0}")]
    Invalid(String),

    #[error("invalid WAL options: {0}")]
    Config(String),

    #[error("{0}")]
    Storage(#[from] StorageError),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(
        path: impl Into<PathBuf>,
        offset: u64,
        reason: impl Into<String>,
    ) -> Self {
        Error::Corrupt {
            path: path.into(),
            offset,
            reason: reason.into(),
        }
    }
}

impl From<Error> for StorageError {
    fn from(e: Error) -> Self {
        match e {
            Error::Storage(s) => s,
            other => StorageError::Other(other.to_string()),
        }
    }
}
