//! Where Raft, the log and the state machine meet.
//!
//! `NodeCore` owns a `RawNode`, the `keel_kv::Store` it replicates and the table of requests
//! waiting for an answer. It does no I/O of its own: storage goes through `LogStore` (the WAL,
//! over whatever file system it was opened on), and messages and answers are handed back to
//! the caller. The server's driver ([`driver`]) and the simulator run the same code.

pub mod compactor;
pub mod core;
pub mod driver;
pub mod entry;
pub mod lessor;
pub mod log_store;
pub mod metrics;
pub mod snapshot;
pub mod watch;

#[cfg(feature = "bug-injection")]
pub use crate::core::InjectedBugs;
pub use crate::core::{
    NodeConfig, NodeCore, NodeError, Outcome, Outgoing, SnapshotJob, Token, WatchFeed,
};
pub use crate::log_store::LogStore;
