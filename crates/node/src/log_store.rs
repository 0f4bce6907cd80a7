//! The write side of a node's Raft storage, as `NodeCore` uses it.

use std::path::PathBuf;

use bytes::Bytes;
use keel_proto::raftpb::{ConfState, Entry, HardState, Snapshot};
use keel_raft::Storage;
use keel_wal::WalStorage;

/// Durable Raft state: `Storage` for the core to read, plus the writes a Ready calls for.
/// `write` may return before the data is durable; only after `sync` may anything it wrote be
/// acknowledged.
pub trait LogStore: Storage {
    fn write(&mut self, hs: Option<&HardState>, ents: &[Entry]) -> Result<(), String>;
    fn sync(&mut self) -> Result<(), String>;
    /// Installs a snapshot received from the leader, durably; the log restarts after it.
    fn install_snapshot(&mut self, snap: Snapshot) -> Result<(), String>;
    /// Records a snapshot of the applied state at `index`, durably, and drops log entries up
    /// to `margin` before it.
    fn snapshot_and_compact(
        &mut self,
        index: u64,
        conf_state: ConfState,
        data: Bytes,
        margin: u64,
    ) -> Result<(), String>;
    /// The snapshot `snapshot_and_compact` would write, for a caller that writes the file
    /// elsewhere (off the Raft thread) and then calls `adopt_snapshot`.
    fn prepare_snapshot(
        &self,
        index: u64,
        conf_state: ConfState,
        data: Bytes,
    ) -> Result<Snapshot, String>;
    /// Records a snapshot whose file is durable and drops log entries up to `margin` before
    /// it. `false` when a newer snapshot was installed meanwhile (nothing changes).
    fn adopt_snapshot(&mut self, snap: Snapshot, margin: u64) -> Result<bool, String>;
    /// The state machine has been restored from the latest snapshot: its data need not stay in
    /// memory too (it is read again only to send it to a follower).
    fn unload_snapshot_data(&mut self);
    /// Files the store no longer needs and left for the caller to delete (see
    /// `keel_wal::WalOptions::defer_removal`).
    fn take_removed(&mut self) -> Vec<PathBuf> {
        Vec::new()
    }
}

impl LogStore for WalStorage {
    fn write(&mut self, hs: Option<&HardState>, ents: &[Entry]) -> Result<(), String> {
        WalStorage::write(self, hs, ents).map_err(|e| e.to_string())
    }

    fn sync(&mut self) -> Result<(), String> {
        WalStorage::sync(self).map_err(|e| e.to_string())
    }

    fn install_snapshot(&mut self, snap: Snapshot) -> Result<(), String> {
        self.apply_snapshot(snap).map_err(|e| e.to_string())
    }

    fn snapshot_and_compact(
        &mut self,
        index: u64,
        conf_state: ConfState,
        data: Bytes,
        margin: u64,
    ) -> Result<(), String> {
        self.create_snapshot(index, conf_state, data)
            .and_then(|_| self.compact_keeping(margin))
            .map_err(|e| e.to_string())
    }

    fn prepare_snapshot(
        &self,
        index: u64,
        conf_state: ConfState,
        data: Bytes,
    ) -> Result<Snapshot, String> {
        WalStorage::prepare_snapshot(self, index, conf_state, data).map_err(|e| e.to_string())
    }

    fn adopt_snapshot(&mut self, snap: Snapshot, margin: u64) -> Result<bool, String> {
        let adopted = WalStorage::adopt_snapshot(self, snap).map_err(|e| e.to_string())?;
        if adopted {
            self.compact_keeping(margin).map_err(|e| e.to_string())?;
        }
        Ok(adopted)
    }

    fn unload_snapshot_data(&mut self) {
        WalStorage::unload_snapshot_data(self)
    }

    fn take_removed(&mut self) -> Vec<PathBuf> {
        WalStorage::take_removed(self)
    }
}
