//! Keel's write-ahead log, snapshot files and crash recovery.
//!
//! A data dir holds `wal/` (segments of checksummed, chained records: entries, hard state,
//! snapshot markers) and `snap/` (snapshot files). `WalStorage` serves `keel_raft::Storage`
//! from them and offers the write side a node driver needs. All I/O goes through the `Fs` seam,
//! so tests and the simulator run the same code over `MemFs`, which models what survives a
//! crash and injects disk faults. See README.md for the on-disk format and recovery rules.

pub mod error;
pub mod fs;
pub mod record;
pub mod scan;
pub mod snap;
pub mod storage;
pub mod wal;

pub use error::{Error, Result};
pub use fs::{FaultError, Fs, FsFile, MemFs, StdFs};
pub use snap::{SnapFile, SnapStore, SnapshotReader, SnapshotWriter};
pub use storage::{remove_files, StorageOptions, WalStorage};
pub use wal::{RecoveryReport, Wal, WalOptions};
