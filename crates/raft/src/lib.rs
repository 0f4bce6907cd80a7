//! Keel's Raft consensus core.
//!
//! Deterministic and free of I/O: no clock (time is `tick()`), no threads, no sockets, no
//! filesystem. Randomness comes from `Config::seed`. The application drives it through `RawNode`.

pub mod errors;
pub mod storage;

pub use errors::{DropReason, Error, Result, StorageError};
pub use keel_proto::raftpb;
pub use storage::{MemStorage, Storage};
