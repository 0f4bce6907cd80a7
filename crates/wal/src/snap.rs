//! Snapshot files under `snap/`: `<index:016x>-<term:016x>.snap`.
//!
//! Layout (little endian): a 56-byte header
//! `magic "KEELSNAP" | version u32 | flags u32 | cluster_id u64 | index u64 | term u64 |
//! body_len u64 | body_crc u32 | header_crc u32`, then the body
//! `meta_len u32 | SnapshotMetadata (prost) | data`. `header_crc` is crc32c of the 52 bytes
//! before it; `body_crc` is crc32c of the body. The file is exactly header + body long.
//!
//! The file bytes are also the streaming format: a leader sends a file as it is stored,
//! chunk by chunk, and the follower's `SnapshotWriter` checks it as it arrives and installs it
//! only if it is whole.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{BufMut, Bytes};
use keel_proto::raftpb::{Snapshot, SnapshotMetadata};
use prost::Message as _;
use tracing::warn;

use crate::error::{Error, Result};
use crate::fs::{join, read_exact_at, Fs, FsFile};

pub const SNAP_MAGIC: [u8; 8] = *b"KEELSNAP";
pub const SNAP_VERSION: u32 = 1;
pub const SNAP_HEADER_LEN: usize = 56;

/// The state machine must fit in memory (`Storage::snapshot` hands it over whole), so a body
/// longer than this is a damaged header rather than a real snapshot.
pub const MAX_SNAPSHOT_BODY: u64 = 16 << 30;
/// Metadata is a membership list; a megabyte is thousands of members.
pub const MAX_META_LEN: u32 = 1 << 20;
/// Chunks are what a transport frame carries and what is held in memory per step of a
/// transfer; 1 MiB keeps a transfer's memory small while amortising per-chunk overhead.
pub const DEFAULT_CHUNK_SIZE: usize = 1 << 20;
/// No chunk, read or written, exceeds this: bounds a peer's ability to make us buffer.
pub const MAX_CHUNK_SIZE: usize = 16 << 20;
/// Snapshots kept by default: the newest plus two to fall back to if it is damaged.
pub const DEFAULT_KEEP: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapHeader {
    pub version: u32,
    pub cluster_id: u64,
    pub index: u64,
    pub term: u64,
    pub body_len: u64,
    pub body_crc: u32,
}

impl SnapHeader {
    fn encode(&self) -> [u8; SNAP_HEADER_LEN] {
        let mut b = Vec::with_capacity(SNAP_HEADER_LEN);
        b.put_slice(&SNAP_MAGIC);
        b.put_u32_le(self.version);
        b.put_u32_le(0);
        b.put_u64_le(self.cluster_id);
        b.put_u64_le(self.index);
        b.put_u64_le(self.term);
        b.put_u64_le(self.body_len);
        b.put_u32_le(self.body_crc);
        let crc = crc32c::crc32c(&b);
        b.put_u32_le(crc);
        b.try_into().expect("header is 56 bytes")
    }

    /// Parses and checks a header; `Err` carries the reason.
    fn decode(b: &[u8], cluster_id: u64) -> std::result::Result<SnapHeader, String> {
        if b.len() < SNAP_HEADER_LEN {
            return Err(format!(
                "file is {} bytes, shorter than its header",
                b.len()
            ));
        }
        if b[0..8] != SNAP_MAGIC {
            return Err("not a keel snapshot (bad magic)".into());
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8"));
        let version = u32_at(8);
        if crc32c::crc32c(&b[..52]) != u32_at(52) {
            return Err("header checksum mismatch".into());
        }
        if version > SNAP_VERSION {
            return Err(format!(
                "written by snapshot format version {version}, this build reads up to {SNAP_VERSION}"
            ));
        }
        let h = SnapHeader {
            version,
            cluster_id: u64_at(16),
            index: u64_at(24),
            term: u64_at(32),
            body_len: u64_at(40),
            body_crc: u32_at(48),
        };
        if h.cluster_id != cluster_id {
            return Err(format!(
                "belongs to cluster {:#x}, this node is in cluster {cluster_id:#x}",
                h.cluster_id
            ));
        }
        if h.body_len > MAX_SNAPSHOT_BODY {
            return Err(format!("body length {} is over the limit", h.body_len));
        }
        Ok(h)
    }
}

pub fn snapshot_name(index: u64, term: u64) -> String {
    format!("{index:016x}-{term:016x}.snap")
}

fn parse_snapshot_name(name: &str) -> Option<(u64, u64)> {
    crate::wal::parse_hex_pair_name(name, ".snap")
}

fn meta_of(snap: &Snapshot) -> SnapshotMetadata {
    snap.metadata.clone().unwrap_or_default()
}

/// Decodes a verified body into a snapshot, zero-copy for the data.
fn decode_body(body: Bytes, h: &SnapHeader) -> std::result::Result<Snapshot, String> {
    if body.len() < 4 {
        return Err("body too short for its metadata length".into());
    }
    let meta_len = u32::from_le_bytes(body[0..4].try_into().expect("4"));
    if meta_len > MAX_META_LEN || 4 + meta_len as usize > body.len() {
        return Err(format!("metadata length {meta_len} is impossible"));
    }
    let meta = SnapshotMetadata::decode(body.slice(4..4 + meta_len as usize))
        .map_err(|e| format!("metadata does not decode: {e}"))?;
    if meta.index != h.index || meta.term != h.term {
        return Err(format!(
            "metadata says index {} term {}, header says index {} term {}",
            meta.index, meta.term, h.index, h.term
        ));
    }
    Ok(Snapshot {
        data: body.slice(4 + meta_len as usize..),
        metadata: Some(meta),
    })
}

/// A snapshot file passed over while loading, and why.
pub type Skipped = (PathBuf, String);

/// The snapshot files of one node.
#[derive(Debug, Clone)]
pub struct SnapStore {
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    cluster_id: u64,
}

/// A snapshot file present in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapFile {
    pub index: u64,
    pub term: u64,
    pub path: PathBuf,
}

impl SnapStore {
    /// Opens (creating if needed) the store in `dir`, removing temp files left by an
    /// interrupted write.
    pub fn open(fs: Arc<dyn Fs>, dir: &Path, cluster_id: u64) -> Result<SnapStore> {
        let dir = dir.to_path_buf();
        if !fs.exists(&dir).map_err(|e| Error::io("stat", &dir, e))? {
            fs.create_dir_all(&dir)
                .map_err(|e| Error::io("create dir", &dir, e))?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs.sync_dir(parent)
                    .map_err(|e| Error::io("sync dir", parent, e))?;
            }
        }
        let store = SnapStore {
            fs,
            dir,
            cluster_id,
        };
        for name in store.names()? {
            if name.ends_with(".snap.tmp") {
                let p = join(&store.dir, &name);
                store
                    .fs
                    .remove(&p)
                    .map_err(|e| Error::io("remove", &p, e))?;
            }
        }
        // Always: a rename from a run whose directory fsync failed may still be undoable, and
        // the WAL is about to rely on the files listed here.
        store.sync_dir()?;
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn names(&self) -> Result<Vec<String>> {
        self.fs
            .list_dir(&self.dir)
            .map_err(|e| Error::io("list", &self.dir, e))
    }

    fn sync_dir(&self) -> Result<()> {
        self.fs
            .sync_dir(&self.dir)
            .map_err(|e| Error::io("sync dir", &self.dir, e))
    }

    /// Snapshot files, newest (highest index, then term) first.
    pub fn list(&self) -> Result<Vec<SnapFile>> {
        let mut out: Vec<SnapFile> = self
            .names()?
            .into_iter()
            .filter_map(|n| {
                parse_snapshot_name(&n).map(|(index, term)| SnapFile {
                    index,
                    term,
                    path: join(&self.dir, &n),
                })
            })
            .collect();
        out.sort_by_key(|f| std::cmp::Reverse((f.index, f.term)));
        Ok(out)
    }

    /// Writes `snap` durably: temp file, fsync, rename, directory fsync.
    pub fn save(&self, snap: &Snapshot) -> Result<PathBuf> {
        let meta = meta_of(snap);
        let meta_bytes = meta.encode_to_vec();
        let meta_len = (meta_bytes.len() as u32).to_le_bytes();
        let body_len = (4 + meta_bytes.len() + snap.data.len()) as u64;
        if body_len > MAX_SNAPSHOT_BODY {
            return Err(Error::Invalid(format!(
                "snapshot body of {body_len} bytes is over the limit of {MAX_SNAPSHOT_BODY}"
            )));
        }
        let mut crc = crc32c::crc32c(&meta_len);
        crc = crc32c::crc32c_append(crc, &meta_bytes);
        crc = crc32c::crc32c_append(crc, &snap.data);
        let header = SnapHeader {
            version: SNAP_VERSION,
            cluster_id: self.cluster_id,
            index: meta.index,
            term: meta.term,
            body_len,
            body_crc: crc,
        };
        let mut w = self.writer()?;
        let mut first = Vec::with_capacity(SNAP_HEADER_LEN + 4 + meta_bytes.len());
        first.extend_from_slice(&header.encode());
        first.extend_from_slice(&meta_len);
        first.extend_from_slice(&meta_bytes);
        w.write_chunk(&first)?;
        for chunk in snap.data.chunks(SYNC_EVERY) {
            w.write_chunk(chunk)?;
        }
        let installed = w.finish()?;
        Ok(installed.path)
    }

    /// Reads and verifies one snapshot file.
    pub fn load(&self, file: &SnapFile) -> Result<Snapshot> {
        let bad = |reason: String| Error::BadSnapshot {
            path: file.path.clone(),
            reason,
        };
        let f = self
            .fs
            .open(&file.path)
            .map_err(|e| Error::io("open", &file.path, e))?;
        let len = f.len().map_err(|e| Error::io("stat", &file.path, e))?;
        let mut hb = [0u8; SNAP_HEADER_LEN];
        if len < SNAP_HEADER_LEN as u64 {
            return Err(bad(format!("file is {len} bytes, shorter than its header")));
        }
        read_exact_at(f.as_ref(), &mut hb, 0).map_err(|e| Error::io("read", &file.path, e))?;
        let h = SnapHeader::decode(&hb, self.cluster_id).map_err(bad)?;
        if (h.index, h.term) != (file.index, file.term) {
            return Err(bad(format!(
                "file name says index {} term {}, header says index {} term {}",
                file.index, file.term, h.index, h.term
            )));
        }
        if len != SNAP_HEADER_LEN as u64 + h.body_len {
            return Err(bad(format!(
                "file is {len} bytes, header says {}",
                SNAP_HEADER_LEN as u64 + h.body_len
            )));
        }
        let mut body = vec![0u8; h.body_len as usize];
        read_exact_at(f.as_ref(), &mut body, SNAP_HEADER_LEN as u64)
            .map_err(|e| Error::io("read", &file.path, e))?;
        if crc32c::crc32c(&body) != h.body_crc {
            return Err(bad("body checksum mismatch".into()));
        }
        decode_body(Bytes::from(body), &h).map_err(bad)
    }

    /// `snap`'s data as its file holds it, mapped rather than read (`FsFile::map`), for a
    /// caller that keeps a snapshot at hand (to send to followers) without keeping it in
    /// memory. `snap` must be one this store saved or loaded: the file was checked then, and
    /// only its layout is checked again here.
    pub fn map_data(&self, snap: &Snapshot) -> Result<Bytes> {
        let (index, term) = keel_raft::storage::snapshot_position(snap);
        let path = join(&self.dir, &snapshot_name(index, term));
        let bad = |reason: String| Error::BadSnapshot {
            path: path.clone(),
            reason,
        };
        let f = self
            .fs
            .open(&path)
            .map_err(|e| Error::io("open", &path, e))?;
        let mut hb = [0u8; SNAP_HEADER_LEN + 4];
        read_exact_at(f.as_ref(), &mut hb, 0).map_err(|e| Error::io("read", &path, e))?;
        let h = SnapHeader::decode(&hb[..SNAP_HEADER_LEN], self.cluster_id).map_err(bad)?;
        let meta_len = u32::from_le_bytes(hb[SNAP_HEADER_LEN..].try_into().expect("4"));
        let at = SNAP_HEADER_LEN as u64 + 4 + u64::from(meta_len);
        let len = (SNAP_HEADER_LEN as u64 + h.body_len).checked_sub(at);
        if (h.index, h.term) != (index, term) || len != Some(snap.data.len() as u64) {
            return Err(bad(format!(
                "holds index {} term {} and {len:?} data bytes, not the snapshot at index \
                 {index} term {term} with {} bytes",
                h.index,
                h.term,
                snap.data.len()
            )));
        }
        f.map(at, snap.data.len())
            .map_err(|e| Error::io("map", &path, e))
    }

    /// The newest snapshot that loads, at or below `max_index`, falling back past damaged ones
    /// (each named in a warning). `accept` may reject a loaded snapshot (the WAL cannot continue
    /// from it); rejected ones are skipped with a warning too.
    pub fn load_newest(
        &self,
        max_index: u64,
        mut accept: impl FnMut(&Snapshot) -> std::result::Result<(), String>,
    ) -> Result<(Option<Snapshot>, Vec<Skipped>)> {
        let mut skipped = Vec::new();
        for file in self.list()? {
            if file.index > max_index {
                continue;
            }
            let why = match self.load(&file) {
                Ok(snap) => match accept(&snap) {
                    Ok(()) => return Ok((Some(snap), skipped)),
                    Err(why) => why,
                },
                Err(e) => e.to_string(),
            };
            warn!(file = %file.path.display(), reason = %why, "skipping snapshot, falling back to an older one");
            skipped.push((file.path, why));
        }
        Ok((None, skipped))
    }

    /// Deletes all but the newest `keep` snapshots (at least one is always kept).
    pub fn retain(&self, keep: usize) -> Result<usize> {
        let old = self.beyond(keep)?;
        for path in &old {
            self.fs
                .remove(path)
                .map_err(|e| Error::io("remove", path, e))?;
        }
        if !old.is_empty() {
            self.sync_dir()?;
        }
        Ok(old.len())
    }

    /// The files `retain(keep)` would delete.
    pub fn beyond(&self, keep: usize) -> Result<Vec<PathBuf>> {
        Ok(self
            .list()?
            .into_iter()
            .skip(keep.max(1))
            .map(|f| f.path)
            .collect())
    }

    /// Removes snapshot files the WAL never recorded: newer than (`index`, `term`), or at that
    /// index with another term. A crash between installing a snapshot and recording it in the
    /// WAL leaves one; it was never used, and would confuse retention and fallback.
    pub fn remove_unrecorded(&self, index: u64, term: u64) -> Result<usize> {
        let mut removed = 0;
        for f in self.list()? {
            if f.index > index || (f.index == index && f.term != term) {
                warn!(file = %f.path.display(), "removing a snapshot the WAL never recorded");
                self.fs
                    .remove(&f.path)
                    .map_err(|e| Error::io("remove", &f.path, e))?;
                removed += 1;
            }
        }
        if removed > 0 {
            self.sync_dir()?;
        }
        Ok(removed)
    }

    /// A writer that receives a snapshot file in chunks (as streamed by a peer's
    /// `SnapshotReader`), verifies it and installs it atomically on `finish`.
    pub fn writer(&self) -> Result<SnapshotWriter> {
        // Unique among concurrent writers in this process; leftovers are removed at open.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut tmp = None;
        for attempt in 0..64u64 {
            let p = join(&self.dir, &format!("{:016x}.snap.tmp", n + (attempt << 48)));
            match self.fs.create(&p) {
                Ok(f) => {
                    tmp = Some((p, f));
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io("create", &p, e)),
            }
        }
        let (tmp_path, file) = tmp.ok_or_else(|| {
            Error::Invalid("could not find a free temp file name in the snapshot dir".into())
        })?;
        Ok(SnapshotWriter {
            store: self.clone(),
            tmp_path,
            file: Some(file),
            written: 0,
            head: Vec::with_capacity(SNAP_HEADER_LEN),
            header: None,
            crc: 0,
            unsynced: 0,
        })
    }

    /// A reader of a stored snapshot in chunks of at most `chunk_size` bytes (clamped to
    /// `1..=MAX_CHUNK_SIZE`).
    pub fn reader(&self, file: &SnapFile, chunk_size: usize) -> Result<SnapshotReader> {
        let f = self
            .fs
            .open(&file.path)
            .map_err(|e| Error::io("open", &file.path, e))?;
        let len = f.len().map_err(|e| Error::io("stat", &file.path, e))?;
        let bad = |reason: String| Error::BadSnapshot {
            path: file.path.clone(),
            reason,
        };
        let mut hb = [0u8; SNAP_HEADER_LEN];
        if len < SNAP_HEADER_LEN as u64 {
            return Err(bad(format!("file is {len} bytes, shorter than its header")));
        }
        read_exact_at(f.as_ref(), &mut hb, 0).map_err(|e| Error::io("read", &file.path, e))?;
        let h = SnapHeader::decode(&hb, self.cluster_id).map_err(bad)?;
        if len != SNAP_HEADER_LEN as u64 + h.body_len {
            return Err(bad(format!(
                "file is {len} bytes, header says more or less"
            )));
        }
        Ok(SnapshotReader {
            path: file.path.clone(),
            file: f,
            offset: 0,
            len,
            header: h,
            crc: 0,
            chunk_size: chunk_size.clamp(1, MAX_CHUNK_SIZE),
        })
    }
}

/// Receives a snapshot file chunk by chunk. Nothing is visible under a snapshot name until
/// `finish` has checked the header, the length and the checksum and made the file durable;
/// dropping an unfinished writer removes its temp file.
#[derive(Debug)]
pub struct SnapshotWriter {
    store: SnapStore,
    tmp_path: PathBuf,
    file: Option<Box<dyn FsFile>>,
    written: u64,
    head: Vec<u8>,
    header: Option<SnapHeader>,
    /// crc of the body bytes received so far.
    crc: u32,
    /// Bytes appended since the file was last synced. Invariant: below `SYNC_EVERY` between
    /// calls.
    unsynced: u64,
}

/// A snapshot file is synced every this many bytes as it is written, not only at the end. Left
/// to the end, the whole file (hundreds of MB with a large history) went to the disk in one
/// burst, and the WAL's small writes queued behind it: puts at 256 clients had a p99 of 40 to
/// 47 ms against 25 to 30 with 1 MiB, and 34 to 36 with 4 MiB (bench/ab.sh, 30 s runs, 6
/// snapshots per member). A WAL sync now finds at most this much snapshot data ahead of it. The
/// price is a writer that takes longer, so the image it encodes (and the tree nodes that
/// writes replace meanwhile) lives longer.
pub const SYNC_EVERY: usize = 1 << 20;

impl SnapshotWriter {
    fn bad(&self, reason: String) -> Error {
        Error::BadSnapshot {
            path: self.tmp_path.clone(),
            reason,
        }
    }

    /// Appends the next chunk (at most `MAX_CHUNK_SIZE` bytes), syncing the file once `SYNC_EVERY`
    /// bytes are unsynced.
    pub fn write_chunk(&mut self, chunk: &[u8]) -> Result<()> {
        if chunk.len() > MAX_CHUNK_SIZE {
            return Err(self.bad(format!(
                "chunk of {} bytes is over the limit of {MAX_CHUNK_SIZE}",
                chunk.len()
            )));
        }
        let mut rest = chunk;
        if self.header.is_none() {
            let take = rest.len().min(SNAP_HEADER_LEN - self.head.len());
            self.head.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.head.len() == SNAP_HEADER_LEN {
                let h = SnapHeader::decode(&self.head, self.store.cluster_id)
                    .map_err(|r| self.bad(r))?;
                self.header = Some(h);
            }
        }
        if let Some(h) = &self.header {
            let body_seen = self.written + chunk.len() as u64 - SNAP_HEADER_LEN as u64;
            if body_seen > h.body_len {
                return Err(self.bad(format!(
                    "more data than the {} body bytes the header announced",
                    h.body_len
                )));
            }
            self.crc = crc32c::crc32c_append(self.crc, rest);
        }
        let file = self.file.as_mut().expect("writer used after finish");
        file.append(chunk)
            .map_err(|e| Error::io("write", &self.tmp_path, e))?;
        self.written += chunk.len() as u64;
        self.unsynced += chunk.len() as u64;
        if self.unsynced >= SYNC_EVERY as u64 {
            file.sync_data()
                .map_err(|e| Error::io("sync", &self.tmp_path, e))?;
            self.unsynced = 0;
        }
        Ok(())
    }

    /// Verifies what was received and installs it under its final name, durably. Returns the
    /// installed file.
    pub fn finish(mut self) -> Result<SnapFile> {
        let h = self
            .header
            .ok_or_else(|| self.bad("stream ended inside the header".into()))?;
        if self.written != SNAP_HEADER_LEN as u64 + h.body_len {
            return Err(self.bad(format!(
                "stream ended after {} of {} bytes",
                self.written,
                SNAP_HEADER_LEN as u64 + h.body_len
            )));
        }
        if self.crc != h.body_crc {
            return Err(self.bad("body checksum mismatch".into()));
        }
        let mut file = self.file.take().expect("finish once");
        // The metadata must decode and agree with the header before the file is installed.
        let meta_probe = (h.body_len as usize).min(4 + MAX_META_LEN as usize);
        let mut probe = vec![0u8; meta_probe];
        read_exact_at(file.as_ref(), &mut probe, SNAP_HEADER_LEN as u64)
            .map_err(|e| Error::io("read", &self.tmp_path, e))?;
        if probe.len() < 4 {
            return Err(self.bad("body too short for its metadata length".into()));
        }
        let meta_len = u32::from_le_bytes(probe[0..4].try_into().expect("4")) as usize;
        if meta_len > MAX_META_LEN as usize || 4 + meta_len > probe.len() {
            return Err(self.bad(format!("metadata length {meta_len} is impossible")));
        }
        let meta = SnapshotMetadata::decode(&probe[4..4 + meta_len])
            .map_err(|e| self.bad(format!("metadata does not decode: {e}")))?;
        if (meta.index, meta.term) != (h.index, h.term) {
            return Err(self.bad("metadata disagrees with the header".into()));
        }
        file.sync_data()
            .map_err(|e| Error::io("sync", &self.tmp_path, e))?;
        let dest = join(&self.store.dir, &snapshot_name(h.index, h.term));
        self.store
            .fs
            .rename(&self.tmp_path, &dest)
            .map_err(|e| Error::io("rename", &self.tmp_path, e))?;
        self.store.sync_dir()?;
        // Installed: nothing left for Drop to clean up.
        self.tmp_path = PathBuf::new();
        Ok(SnapFile {
            index: h.index,
            term: h.term,
            path: dest,
        })
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        if !self.tmp_path.as_os_str().is_empty() {
            // Best effort: a leftover temp file is also removed when the store is next opened.
            let _ = self.store.fs.remove(&self.tmp_path);
        }
    }
}

/// Reads a stored snapshot file in bounded chunks for streaming to a peer. It checks the
/// body checksum as it goes and fails instead of yielding the last chunk of a damaged file, so
/// a damaged snapshot is never sent whole.
#[derive(Debug)]
pub struct SnapshotReader {
    path: PathBuf,
    file: Box<dyn FsFile>,
    offset: u64,
    len: u64,
    header: SnapHeader,
    crc: u32,
    chunk_size: usize,
}

impl SnapshotReader {
    /// Total bytes the stream will yield.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn header(&self) -> &SnapHeader {
        &self.header
    }

    /// The next chunk, or `None` at the end.
    pub fn next_chunk(&mut self) -> Result<Option<Bytes>> {
        if self.offset == self.len {
            return Ok(None);
        }
        let n = (self.len - self.offset).min(self.chunk_size as u64) as usize;
        let mut buf = vec![0u8; n];
        read_exact_at(self.file.as_ref(), &mut buf, self.offset)
            .map_err(|e| Error::io("read", &self.path, e))?;
        let header_end = SNAP_HEADER_LEN as u64;
        let body_from = header_end.saturating_sub(self.offset).min(n as u64) as usize;
        self.crc = crc32c::crc32c_append(self.crc, &buf[body_from..]);
        self.offset += n as u64;
        if self.offset == self.len && self.crc != self.header.body_crc {
            return Err(Error::BadSnapshot {
                path: self.path.clone(),
                reason: "body checksum mismatch".into(),
            });
        }
        Ok(Some(Bytes::from(buf)))
    }
}
