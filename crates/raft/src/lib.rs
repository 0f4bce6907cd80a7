//! Keel's Raft consensus core.
//!
//! Deterministic and free of I/O: no clock (time is `tick()`), no threads, no sockets, no
//! filesystem. Randomness comes from `Config::seed`. The application drives it through `RawNode`:
//! feed it ticks, peer messages and proposals; take a numbered `Ready`; persist, send and apply
//! what it says; then `advance`.

pub mod config;
pub mod errors;
pub mod inflights;
mod leader;
pub mod log_unstable;
pub mod progress;
pub mod quorum;
pub mod raft;
pub mod raft_log;
pub mod raw_node;
pub mod read_only;
pub mod storage;

pub use config::Config;
#[cfg(feature = "bug-injection")]
pub use config::InjectedBugs;
pub use errors::{DropReason, Error, Result, StorageError};
pub use keel_proto::raftpb;
pub use progress::{Progress, ProgressState};
pub use raft::{Raft, SoftState, StateRole, CAMPAIGN_TRANSFER, NONE};
pub use raw_node::{RawNode, Ready, Status};
pub use read_only::ReadState;
pub use storage::{MemStorage, Storage};
