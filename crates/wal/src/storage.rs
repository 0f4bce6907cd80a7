//! `keel_raft::Storage` served straight from the WAL and the snapshot store, plus the write
//! side a node driver needs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use keel_proto::raftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use keel_raft::storage::{Storage, StorageResult};
use keel_raft::StorageError;
use tracing::warn;

use crate::error::{Error, Result};
use crate::fs::Fs;
use crate::snap::{SnapFile, SnapStore, SnapshotReader, SnapshotWriter, DEFAULT_KEEP};
use crate::wal::{RecoveryReport, Wal, WalOptions};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageOptions {
    pub wal: WalOptions,
    /// Snapshot files kept (the newest plus fallbacks); at least 1.
    pub keep_snapshots: usize,
}

impl StorageOptions {
    pub fn new(node_id: u64, cluster_id: u64) -> Self {
        StorageOptions {
            wal: WalOptions::new(node_id, cluster_id),
            keep_snapshots: DEFAULT_KEEP,
        }
    }
}

/// A node's durable Raft state in a data dir (`wal/` and `snap/`).
///
/// The log it serves is entries `offset + 1 ..= last`, where `offset` is the index before the
/// first entry served and `offset_term` its term (the last compacted entry, or the snapshot's
/// index). Writes return only once durable, so everything it serves is durable.
///
/// Compaction is durable at segment granularity: after a reopen the log may start earlier than
/// `compact` left it (the rest of a kept segment is served again), never later.
#[derive(Debug)]
pub struct WalStorage {
    wal: Wal,
    snaps: SnapStore,
    /// The snapshot the log continues from; its data is held for `Storage::snapshot`.
    snapshot: Snapshot,
    /// Invariant: `offset <= wal.last_index()` and `offset + 1 >= wal.first_index()`, so every
    /// index in `offset + 1 ..= last` is in the WAL.
    offset: u64,
    offset_term: u64,
    keep_snapshots: usize,
    dir: PathBuf,
    /// Old snapshot files for the caller to delete (`WalOptions::defer_removal`); taken with
    /// the purged segments after every adopted snapshot, so it holds at most one round's.
    old_snapshots: Vec<PathBuf>,
}

/// Deletes files a log or snapshot store no longer needs (`WalStorage::take_removed`), then
/// syncs the directories they were in. A file already gone counts as deleted.
pub fn remove_files(fs: &dyn Fs, paths: &[PathBuf]) -> Result<()> {
    let mut dirs: Vec<&Path> = Vec::new();
    for p in paths {
        match fs.remove(p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove", p, e)),
        }
        if let Some(d) = p.parent() {
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
    }
    for d in dirs {
        fs.sync_dir(d).map_err(|e| Error::io("sync dir", d, e))?;
    }
    Ok(())
}

fn snap_index(s: &Snapshot) -> (u64, u64) {
    keel_raft::storage::snapshot_position(s)
}

fn empty_snapshot() -> Snapshot {
    Snapshot {
        data: Bytes::new(),
        metadata: Some(SnapshotMetadata::default()),
    }
}

impl WalStorage {
    /// Opens the data dir, creating an empty one (no members yet: a node that joins and waits
    /// for a snapshot) if it does not exist.
    pub fn open(fs: Arc<dyn Fs>, dir: &Path, opts: StorageOptions) -> Result<WalStorage> {
        Ok(Self::open_with_report(fs, dir, opts)?.0)
    }

    /// Initialises a new data dir for a member of a freshly bootstrapped cluster whose initial
    /// membership is `conf_state` (kept in a snapshot at index 0, so every founding member
    /// starts identical). Refuses a dir that already holds a WAL.
    pub fn bootstrap(
        fs: Arc<dyn Fs>,
        dir: &Path,
        opts: StorageOptions,
        conf_state: ConfState,
    ) -> Result<WalStorage> {
        let wal_dir = dir.join("wal");
        let has_wal = fs
            .exists(&wal_dir)
            .map_err(|e| Error::io("stat", &wal_dir, e))?
            && fs
                .list_dir(&wal_dir)
                .map_err(|e| Error::io("list", &wal_dir, e))?
                .iter()
                .any(|n| n.ends_with(".wal"));
        if has_wal {
            return Err(Error::Invalid(format!(
                "{} already holds a WAL; bootstrap only initialises a new data dir",
                wal_dir.display()
            )));
        }
        ensure_dir(fs.as_ref(), dir)?;
        let snaps = SnapStore::open(fs.clone(), &dir.join("snap"), opts.wal.cluster_id)?;
        snaps.save(&Snapshot {
            data: Bytes::new(),
            metadata: Some(SnapshotMetadata {
                conf_state: Some(conf_state),
                index: 0,
                term: 0,
            }),
        })?;
        Self::open(fs, dir, opts)
    }

    /// `open`, also returning what WAL recovery found (a torn tail it cut, sizes).
    pub fn open_with_report(
        fs: Arc<dyn Fs>,
        dir: &Path,
        opts: StorageOptions,
    ) -> Result<(WalStorage, RecoveryReport)> {
        if opts.keep_snapshots == 0 {
            return Err(Error::Config("keep_snapshots must be at least 1".into()));
        }
        ensure_dir(fs.as_ref(), dir)?;
        let snaps = SnapStore::open(fs.clone(), &dir.join("snap"), opts.wal.cluster_id)?;
        let (wal, report) = Wal::open(fs, &dir.join("wal"), opts.wal.clone())?;
        let (mi, mt) = wal.snapshot_marker();
        snaps.remove_unrecorded(mi, mt)?;

        // The snapshot the WAL records, or failing that an older one the WAL can still continue
        // from (its entry is in the log with the same term, so the log after it is intact).
        let (w_first, w_last) = (wal.first_index(), wal.last_index());
        let (found, skipped) = snaps.load_newest(mi, |s| {
            let (i, t) = snap_index(s);
            if (i, t) == (mi, mt) {
                return Ok(());
            }
            match wal.term(i) {
                Ok(Some(term)) if term == t => Ok(()),
                _ if i == 0 && w_first == 1 => Ok(()),
                _ => Err(format!(
                    "the WAL (entries {w_first}..={w_last}) cannot continue from index {i} term {t}"
                )),
            }
        })?;
        let snapshot = match found {
            Some(s) => {
                if snap_index(&s) != (mi, mt) {
                    warn!(
                        wal_snapshot_index = mi,
                        used_index = snap_index(&s).0,
                        "the snapshot the WAL records is unusable; recovering from an older one"
                    );
                }
                s
            }
            None if skipped.is_empty() && (mi, mt) == (0, 0) => empty_snapshot(),
            None => {
                let detail = if skipped.is_empty() {
                    "there is no snapshot file".to_string()
                } else {
                    let list: Vec<String> = skipped
                        .iter()
                        .map(|(p, why)| format!("{}: {why}", p.display()))
                        .collect();
                    format!("every candidate was refused: {}", list.join("; "))
                };
                return Err(Error::MissingSnapshot {
                    dir: snaps.dir().to_path_buf(),
                    index: mi,
                    term: mt,
                    detail,
                });
            }
        };
        let (si, st) = snap_index(&snapshot);
        if w_first > si + 1 {
            return Err(Error::corrupt(
                wal.dir(),
                0,
                format!(
                    "the log starts at index {w_first}, leaving a gap after the snapshot at {si}"
                ),
            ));
        }
        if w_last < si {
            return Err(Error::corrupt(
                wal.dir(),
                0,
                format!("the log ends at index {w_last}, before the snapshot at {si}"),
            ));
        }
        // The served log starts after an index whose term is known: the snapshot's, the one the
        // WAL knows precedes its first entry, or else the first entry the WAL still holds.
        let (offset, offset_term) = if w_first == si + 1 {
            (si, st)
        } else if let Some(base) = wal.base().filter(|&(b, _)| b + 1 == w_first) {
            base
        } else {
            let t = wal.term(w_first)?.expect("first entry is in the log");
            (w_first, t)
        };
        let storage = WalStorage {
            wal,
            snaps,
            snapshot,
            offset,
            offset_term,
            keep_snapshots: opts.keep_snapshots,
            dir: dir.to_path_buf(),
            old_snapshots: Vec::new(),
        };
        Ok((storage, report))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn hard_state(&self) -> &HardState {
        self.wal.hard_state()
    }

    pub fn wal(&self) -> &Wal {
        &self.wal
    }

    pub fn snap_store(&self) -> &SnapStore {
        &self.snaps
    }

    fn snapshot_index(&self) -> u64 {
        snap_index(&self.snapshot).0
    }

    /// Persists a Ready's entries and hard state with one fdatasync (group commit), then
    /// reflects them. Entries at or below the compacted index are ignored (a snapshot covers
    /// them); an entry at or below the last index overwrites the log from there.
    pub fn save(&mut self, hs: Option<&HardState>, ents: &[Entry]) -> Result<()> {
        self.write(hs, ents)?;
        self.sync()
    }

    /// Makes everything written so far durable (one fdatasync).
    pub fn sync(&mut self) -> Result<()> {
        self.wal.sync()
    }

    /// `save` without the sync: the batch is written and served at once, but durable (and safe
    /// to acknowledge) only after `sync`. Lets a driver overlap the flush with other work; the
    /// simulator crashes between the two to tear unsynced writes. Serving unsynced entries is
    /// harmless to the Raft core, which reads its own unstable entries first.
    pub fn write(&mut self, hs: Option<&HardState>, ents: &[Entry]) -> Result<()> {
        let ents = match (ents.first(), ents.last()) {
            (Some(first), Some(last)) => {
                let start = self.offset + 1;
                if last.index < start {
                    &[][..]
                } else if first.index < start {
                    &ents[(start - first.index) as usize..]
                } else {
                    ents
                }
            }
            _ => ents,
        };
        if let Some(first) = ents.first() {
            let si = self.snapshot_index();
            if first.index <= si && first.index <= self.wal.last_index() {
                return Err(Error::Invalid(format!(
                    "batch from {} would overwrite entries the snapshot at {si} covers \
                     (they are committed)",
                    first.index
                )));
            }
            let next = self.wal.last_index() + 1;
            if first.index > next {
                return Err(Error::Invalid(format!(
                    "append leaves a gap: last index {}, appending from {}",
                    next - 1,
                    first.index
                )));
            }
        }
        self.wal.write(hs, ents)
    }

    /// Appends entries durably (see `save`).
    pub fn append(&mut self, ents: &[Entry]) -> Result<()> {
        self.save(None, ents)
    }

    /// Persists the hard state durably.
    pub fn set_hard_state(&mut self, hs: &HardState) -> Result<()> {
        self.save(Some(hs), &[])
    }

    /// Installs a snapshot received from the leader: the file is made durable first, then the
    /// WAL is restarted after it (the whole log is discarded), then old snapshots are pruned.
    pub fn apply_snapshot(&mut self, snap: Snapshot) -> Result<()> {
        let (index, term) = snap_index(&snap);
        if index < self.snapshot_index() {
            return Err(StorageError::Compacted(index).into());
        }
        self.snaps.save(&snap)?;
        let hs = hard_state_after_snapshot(*self.wal.hard_state(), index, term);
        self.wal.reset(index, term, &hs)?;
        self.offset = index;
        self.offset_term = term;
        self.snapshot = snap;
        self.snaps.retain(self.keep_snapshots)?;
        Ok(())
    }

    /// Installs a snapshot file already received with `snapshot_writer` (so the data is not
    /// written twice) and restarts the WAL after it, as `apply_snapshot` does.
    pub fn apply_snapshot_file(&mut self, file: &SnapFile) -> Result<Snapshot> {
        if file.index < self.snapshot_index() {
            return Err(StorageError::Compacted(file.index).into());
        }
        let snap = self.snaps.load(file)?;
        let hs = hard_state_after_snapshot(*self.wal.hard_state(), file.index, file.term);
        self.wal.reset(file.index, file.term, &hs)?;
        self.offset = file.index;
        self.offset_term = file.term;
        self.snapshot = snap.clone();
        self.snaps.retain(self.keep_snapshots)?;
        Ok(snap)
    }

    /// Records a snapshot the application made at `index` (already applied): the file is made
    /// durable, then the WAL records it. Entries are not discarded; `compact` does that.
    pub fn create_snapshot(
        &mut self,
        index: u64,
        conf_state: ConfState,
        data: Bytes,
    ) -> Result<()> {
        let snap = self.prepare_snapshot(index, conf_state, data)?;
        self.snaps.save(&snap)?;
        self.adopt_snapshot(snap).map(|_| ())
    }

    /// The first step of `create_snapshot` split in three, for callers that write the file on
    /// another thread: the snapshot of the applied state at `index`, not yet written. Write it
    /// with (a clone of) `snap_store().save`, then hand it to `adopt_snapshot`.
    pub fn prepare_snapshot(
        &self,
        index: u64,
        conf_state: ConfState,
        data: Bytes,
    ) -> Result<Snapshot> {
        if index <= self.snapshot_index() {
            return Err(StorageError::Compacted(index).into());
        }
        let term = Storage::term(self, index)?;
        Ok(Snapshot {
            data,
            metadata: Some(SnapshotMetadata {
                conf_state: Some(conf_state),
                index,
                term,
            }),
        })
    }

    /// Records a snapshot whose file is durable (written by `SnapStore::save`): the WAL marks
    /// it and older files are pruned. Returns `false`, changing nothing, when a snapshot at or
    /// past its index was installed meanwhile (from the leader): the log it was taken from is
    /// gone, and pruning removes its file later.
    pub fn adopt_snapshot(&mut self, snap: Snapshot) -> Result<bool> {
        let (index, term) = snap_index(&snap);
        if index <= self.snapshot_index() {
            return Ok(false);
        }
        self.wal.mark_snapshot(index, term)?;
        self.snapshot = snap;
        self.unload_snapshot_data();
        if self.wal.options().defer_removal {
            self.old_snapshots = self.snaps.beyond(self.keep_snapshots)?;
        } else {
            self.snaps.retain(self.keep_snapshots)?;
        }
        Ok(true)
    }

    /// With `WalOptions::defer_removal`: the files that adopting a snapshot and compacting left
    /// for the caller to delete with `remove_files`, off the thread that drives the log.
    pub fn take_removed(&mut self) -> Vec<PathBuf> {
        let mut paths = std::mem::take(&mut self.old_snapshots);
        paths.extend(self.wal.take_removed());
        paths
    }

    /// Swaps the snapshot's data held for `Storage::snapshot` (for followers that need it) for
    /// a mapping of its file: the state machine already holds the same state, and a second
    /// copy in memory would double what a node needs. Call it once the data has been restored
    /// from. If the file cannot be mapped the data stays in memory, which costs only memory.
    pub fn unload_snapshot_data(&mut self) {
        if self.snapshot.data.is_empty() {
            return;
        }
        match self.snaps.map_data(&self.snapshot) {
            Ok(mapped) => self.snapshot.data = mapped,
            Err(e) => warn!(error = %e, "keeping the snapshot in memory: it cannot be mapped"),
        }
    }

    /// Discards entries up to and including `compact_index` (which a snapshot must cover) and
    /// removes the WAL segments that only held such entries.
    pub fn compact(&mut self, compact_index: u64) -> Result<()> {
        if compact_index <= self.offset {
            return Err(StorageError::Compacted(compact_index).into());
        }
        if compact_index > self.wal.last_index() {
            return Err(StorageError::Unavailable(compact_index).into());
        }
        if compact_index > self.snapshot_index() {
            return Err(Error::Invalid(format!(
                "compacting to {compact_index} would drop entries after the snapshot at {}",
                self.snapshot_index()
            )));
        }
        let term = self.wal.term(compact_index)?.expect("index within the log");
        // Keep the segment holding `compact_index`: after a reopen its term answers
        // `term(first_index - 1)`.
        self.wal.purge(compact_index)?;
        self.offset = compact_index;
        self.offset_term = term;
        Ok(())
    }

    /// After a local snapshot: compacts to `margin` entries before the snapshot, so followers a
    /// little behind still catch up from the log instead of needing the snapshot. Does nothing
    /// if the log already starts there.
    pub fn compact_keeping(&mut self, margin: u64) -> Result<()> {
        let target = self.snapshot_index().saturating_sub(margin);
        if target > self.offset {
            self.compact(target)?;
        }
        Ok(())
    }

    /// A reader of the current snapshot's file, for streaming it to a follower in chunks of at
    /// most `chunk_size` bytes.
    pub fn snapshot_reader(&self, chunk_size: usize) -> Result<SnapshotReader> {
        let (index, term) = snap_index(&self.snapshot);
        let file = SnapFile {
            index,
            term,
            path: self
                .snaps
                .dir()
                .join(crate::snap::snapshot_name(index, term)),
        };
        self.snaps.reader(&file, chunk_size)
    }

    /// A writer for a snapshot streamed from the leader; install the result with
    /// `apply_snapshot_file`.
    pub fn snapshot_writer(&self) -> Result<SnapshotWriter> {
        self.snaps.writer()
    }
}

/// The hard state once a snapshot at (`index`, `term`) is installed, as `MemStorage` does it:
/// commit reaches the snapshot; a later term clears the vote (a vote belongs to its term).
fn hard_state_after_snapshot(mut hs: HardState, index: u64, term: u64) -> HardState {
    hs.commit = hs.commit.max(index);
    if hs.term < term {
        hs.term = term;
        hs.vote = 0;
    }
    hs
}

fn ensure_dir(fs: &dyn Fs, dir: &Path) -> Result<()> {
    if !fs.exists(dir).map_err(|e| Error::io("stat", dir, e))? {
        fs.create_dir_all(dir)
            .map_err(|e| Error::io("create dir", dir, e))?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs.sync_dir(parent)
                .map_err(|e| Error::io("sync dir", parent, e))?;
        }
    }
    Ok(())
}

impl Storage for WalStorage {
    fn initial_state(&self) -> StorageResult<(HardState, ConfState)> {
        let cs = keel_raft::storage::snapshot_conf_state(&self.snapshot);
        Ok((*self.wal.hard_state(), cs))
    }

    fn entries(&self, low: u64, high: u64, max_size: u64) -> StorageResult<Vec<Entry>> {
        if low <= self.offset {
            return Err(StorageError::Compacted(low));
        }
        let last = self.wal.last_index();
        if high > last + 1 {
            return Err(StorageError::Unavailable(high));
        }
        Ok(self.wal.entries(low, high, max_size)?)
    }

    fn term(&self, idx: u64) -> StorageResult<u64> {
        if idx < self.offset {
            return Err(StorageError::Compacted(idx));
        }
        if idx == self.offset {
            return Ok(self.offset_term);
        }
        match self.wal.term(idx)? {
            Some(t) => Ok(t),
            None => Err(StorageError::Unavailable(idx)),
        }
    }

    fn first_index(&self) -> StorageResult<u64> {
        Ok(self.offset + 1)
    }

    fn last_index(&self) -> StorageResult<u64> {
        Ok(self.wal.last_index())
    }

    fn snapshot(&self, _request_index: u64) -> StorageResult<Snapshot> {
        Ok(self.snapshot.clone())
    }
}
