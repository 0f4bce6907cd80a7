//! The write-ahead log: segment files of records, group commit, recovery, purge.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use keel_proto::raftpb::{Entry, HardState};
use prost::Message as _;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::fs::{join, read_exact_at, Fs, FsFile};
use crate::record::{
    self, EntryInfo, Kind, SegmentHeader, ENTRIES_OVERHEAD, FLAG_RESET, FORMAT_VERSION,
    HARD_STATE_RECORD_LEN, HEADER_LEN, MAX_PAYLOAD, SEGMENT_HEADER_PAYLOAD,
    SNAPSHOT_MARKER_RECORD_LEN, TARGET_PAYLOAD,
};
use crate::scan::{self, Tail};

pub const DEFAULT_SEGMENT_SIZE: u64 = 64 << 20;
/// Small segments are allowed so tests can exercise rollover; below this a segment could not
/// hold its head records and one small batch.
pub const MIN_SEGMENT_SIZE: u64 = 4 << 10;
/// Recovery reads a whole segment into memory to verify it, so its size bounds that memory.
pub const MAX_SEGMENT_SIZE: u64 = 1 << 30;

/// The hot tail kept decoded in memory. 16 MiB covers what steady-state replication re-reads
/// (entries just appended, sent to followers, resent on a lost message, applied) at thousands
/// of small entries per second, so only a follower that fell behind makes the leader read
/// segments; more would only hold memory that a lagging follower's catch-up (a sequential
/// disk read) does not need.
pub const DEFAULT_CACHE_BYTES: u64 = 16 << 20;
/// A cap on the configurable cache so a typo cannot ask for all of memory.
pub const MAX_CACHE_BYTES: u64 = 4 << 30;

/// Largest head of a segment: header, hard state, snapshot marker.
const MAX_HEAD_LEN: u64 =
    (HEADER_LEN + SEGMENT_HEADER_PAYLOAD + HARD_STATE_RECORD_LEN + SNAPSHOT_MARKER_RECORD_LEN)
        as u64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalOptions {
    /// This node's id; a data dir written by another node is refused.
    pub node_id: u64,
    /// The cluster's id; a data dir of another cluster is refused.
    pub cluster_id: u64,
    /// Size segments are preallocated to; a record never straddles two segments.
    pub segment_size: u64,
    /// Bytes of recent entries kept decoded in memory (sum of their encoded sizes).
    pub cache_bytes: u64,
    /// Prepare the next segment on a background thread by writing it full of zeros and syncing
    /// it. Overwriting blocks that are already written costs fdatasync no metadata (fallocate'd
    /// blocks are "unwritten" extents whose conversion is a journal commit on every sync), so
    /// syncs get cheaper: on the benchmark disk, 64 KiB synced overwrites ran 2.6x faster.
    /// Off by default so that runs over `MemFs` stay single-threaded and deterministic; a server
    /// on a real disk should turn it on.
    pub zero_fill_ahead: bool,
    /// `purge` leaves the files of the segments it drops on disk and hands their paths to the
    /// caller (`take_removed`), who deletes them elsewhere (`remove_files`). A purge then costs
    /// the log no file-system work: unlinking 64 MiB segments and syncing the directory took up
    /// to 99 ms of a node's Raft thread while a snapshot was being written. A crash before the
    /// files go leaves segments that only hold entries a snapshot covers, as a crash between
    /// marking a snapshot and purging always could; the next open reads past them and the next
    /// purge drops them again. Off by default (the simulator's runs stay single-threaded).
    pub defer_removal: bool,
}

impl WalOptions {
    pub fn new(node_id: u64, cluster_id: u64) -> Self {
        WalOptions {
            node_id,
            cluster_id,
            segment_size: DEFAULT_SEGMENT_SIZE,
            cache_bytes: DEFAULT_CACHE_BYTES,
            zero_fill_ahead: false,
            defer_removal: false,
        }
    }

    fn validate(&self) -> Result<()> {
        if !(MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&self.segment_size) {
            return Err(Error::Config(format!(
                "segment_size {} is outside {MIN_SEGMENT_SIZE}..={MAX_SEGMENT_SIZE}",
                self.segment_size
            )));
        }
        if self.cache_bytes > MAX_CACHE_BYTES {
            return Err(Error::Config(format!(
                "cache_bytes {} is over {MAX_CACHE_BYTES}",
                self.cache_bytes
            )));
        }
        Ok(())
    }

    /// The largest entries payload a segment can take after its head.
    fn max_payload(&self) -> usize {
        let room = self.segment_size - MAX_HEAD_LEN - HEADER_LEN as u64;
        (room as usize).min(MAX_PAYLOAD)
    }
}

pub fn segment_name(seq: u64, first_index: u64) -> String {
    format!("{seq:016x}-{first_index:016x}.wal")
}

fn parse_segment_name(name: &str) -> Option<(u64, u64)> {
    parse_hex_pair_name(name, ".wal")
}

/// Parses `<16 hex digits>-<16 hex digits><ext>`, the naming of segments and snapshot files;
/// anything else (temp files, foreign files) is not ours.
pub(crate) fn parse_hex_pair_name(name: &str, ext: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(ext)?;
    let (a, b) = stem.split_once('-')?;
    if a.len() != 16 || b.len() != 16 {
        return None;
    }
    Some((
        u64::from_str_radix(a, 16).ok()?,
        u64::from_str_radix(b, 16).ok()?,
    ))
}

#[derive(Debug)]
struct Segment {
    seq: u64,
    path: PathBuf,
    file: Box<dyn FsFile>,
}

/// Where an entries record is. Invariant: every record in `Wal::records` holds at least one
/// live entry, and records are in log order.
#[derive(Debug, Clone, Copy)]
struct RecordMeta {
    seq: u64,
    offset: u64,
    /// Whole record, header included.
    len: u32,
    /// crc of the record before it, needed to verify it again when reading it back.
    seed: u32,
}

#[derive(Debug, Clone, Copy)]
struct EntryMeta {
    term: u64,
    /// Serial number of the record holding the entry (see `Wal::records_base`).
    record: u64,
    pos: u32,
    len: u32,
}

/// Recent entries, decoded. Invariant: holds exactly the entries
/// `first..first + ents.len()`, which end at the log's last index (a suffix of the log), and
/// `size` is the sum of their encoded sizes, at most the configured bound.
#[derive(Debug, Default)]
struct Cache {
    first: u64,
    ents: VecDeque<Entry>,
    size: u64,
}

impl Cache {
    fn truncate_from(&mut self, index: u64) {
        if index <= self.first {
            self.ents.clear();
            self.size = 0;
            return;
        }
        while self.first + self.ents.len() as u64 > index {
            let e = self.ents.pop_back().expect("non-empty");
            self.size -= e.encoded_len() as u64;
        }
    }

    fn drop_below(&mut self, index: u64) {
        while self.first < index {
            match self.ents.pop_front() {
                Some(e) => self.size -= e.encoded_len() as u64,
                None => break,
            }
            self.first += 1;
        }
        if self.ents.is_empty() {
            self.first = index.max(self.first);
        }
    }

    /// Appends entries that continue the log (callers truncate first).
    fn push(&mut self, ents: &[Entry], cap: u64) {
        for e in ents {
            if self.ents.is_empty() {
                self.first = e.index;
            }
            debug_assert_eq!(e.index, self.first + self.ents.len() as u64);
            self.size += e.encoded_len() as u64;
            self.ents.push_back(e.clone());
        }
        while self.size > cap {
            let Some(e) = self.ents.pop_front() else {
                break;
            };
            self.size -= e.encoded_len() as u64;
            self.first += 1;
        }
    }

    fn get(&self, index: u64) -> Option<&Entry> {
        index
            .checked_sub(self.first)
            .and_then(|i| self.ents.get(i as usize))
    }
}

/// The log as recovered or written: the index of entries, hard state and snapshot marker.
/// `replay` on recovery and the write path both go through these methods, so what a reopen
/// sees is what the writer saw.
#[derive(Debug, Default)]
struct LogState {
    /// Index of `entries[0]`; when empty, the index the next entry must have.
    first_index: u64,
    entries: VecDeque<EntryMeta>,
    records: VecDeque<RecordMeta>,
    /// Serial number of `records[0]`.
    records_base: u64,
    hard_state: HardState,
    /// Index and term of the latest snapshot marker.
    snapshot: (u64, u64),
    /// Whether `first_index` is known. A segment left first after a purge starts anywhere,
    /// so the first entries record read decides it.
    anchored: bool,
    /// Index and term of the entry just before `first_index`, when known: the start of time,
    /// a reset's snapshot, or a snapshot marker right before the log. Unknown after a purge.
    base: Option<(u64, u64)>,
}

impl LogState {
    fn last_index(&self) -> u64 {
        self.first_index + self.entries.len() as u64 - 1
    }

    fn reset(&mut self, next_index: u64) {
        self.entries.clear();
        self.records_base += self.records.len() as u64;
        self.records.clear();
        self.first_index = next_index;
        self.anchored = true;
        self.base = None;
    }

    /// Applies an entries record whose entries are `infos` (consecutive indexes). A record
    /// starting at or below the last index overwrites from there: later records win.
    fn apply_entries(
        &mut self,
        infos: &[EntryInfo],
        rec: RecordMeta,
    ) -> std::result::Result<(), String> {
        let first = infos[0].index;
        if !self.anchored || first < self.first_index {
            // Either nothing is known yet, or the record overwrites entries older than any
            // still on disk (they were purged with their segment).
            self.reset(first);
        } else if first > self.last_index() + 1 {
            return Err(format!(
                "entries start at {first} but the log ends at {}: a gap",
                self.last_index()
            ));
        }
        self.entries.truncate((first - self.first_index) as usize);
        let keep = self.entries.back().map(|e| e.record);
        while let Some(back) = self.records.len().checked_sub(1) {
            let serial = self.records_base + back as u64;
            if keep.is_some_and(|k| serial <= k) {
                break;
            }
            self.records.pop_back();
        }
        let serial = self.records_base + self.records.len() as u64;
        self.records.push_back(rec);
        self.entries.extend(infos.iter().map(|i| EntryMeta {
            term: i.term,
            record: serial,
            pos: i.pos,
            len: i.len,
        }));
        Ok(())
    }

    fn term(&self, index: u64) -> Option<u64> {
        index
            .checked_sub(self.first_index)
            .and_then(|i| self.entries.get(i as usize))
            .map(|e| e.term)
    }

    fn record_of(&self, index: u64) -> Option<RecordMeta> {
        let e = self
            .entries
            .get(index.checked_sub(self.first_index)? as usize)?;
        self.records
            .get((e.record - self.records_base) as usize)
            .copied()
    }
}

/// The write-ahead log of one node.
///
/// Writes: `write` appends records (entries, hard state) to the current segment; `sync` makes
/// everything written durable with one fdatasync; `save` is both. Entries written are visible to
/// reads at once; callers that need reads to show only durable state (like `WalStorage`) use
/// `save`. After any failed write or sync every call fails with `Error::Poisoned` until the
/// log is reopened.
pub struct Wal {
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    opts: WalOptions,
    /// Oldest first; the last one takes appends. Never empty; sequence numbers are consecutive.
    segments: VecDeque<Segment>,
    /// Offset in the last segment where the next record goes. Everything from here to the end
    /// of the segment reads as zeros.
    tail: u64,
    /// crc of the last record written: the seed of the next.
    last_crc: u32,
    state: LogState,
    cache: Cache,
    poisoned: Option<String>,
    /// Reused for encoding so appends do not allocate per record.
    buf: Vec<u8>,
    positions: Vec<u32>,
    /// Records encoded into `buf` that update `state` once written.
    pending: Vec<Pending>,
    /// The next segment being zero-filled in the background (`zero_fill_ahead`).
    prepared: Option<Preparing>,
    /// Purged segment files not yet deleted (`defer_removal`). Bounded by the segments one
    /// purge drops: the caller takes them after every compaction.
    removed: Vec<PathBuf>,
}

/// A background zero-fill of the next segment: its temp path and open file when done.
type Preparing = std::thread::JoinHandle<std::io::Result<(PathBuf, Box<dyn FsFile>)>>;

impl Drop for Wal {
    fn drop(&mut self) {
        // Do not leave a thread writing into the directory after the log is closed.
        if let Some(h) = self.prepared.take() {
            let _ = h.join();
        }
    }
}

enum Pending {
    Entries {
        rec: RecordMeta,
        from: usize,
        to: usize,
    },
    HardState(HardState),
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("dir", &self.dir)
            .field("segments", &self.segments.len())
            .field("first_index", &self.state.first_index)
            .field("entries", &self.state.entries.len())
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

/// What `Wal::open` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segments: usize,
    pub bytes_scanned: u64,
    /// Set when a torn tail was cut: the file, the offset and how many bytes were dropped.
    pub torn_tail: Option<(PathBuf, u64, u64)>,
}

impl Wal {
    /// Opens the log in `dir`, creating it if absent, and recovers it: every record is verified,
    /// a torn tail is truncated (and reported), damage anywhere else is an error naming the file
    /// and offset.
    pub fn open(fs: Arc<dyn Fs>, dir: &Path, opts: WalOptions) -> Result<(Wal, RecoveryReport)> {
        opts.validate()?;
        let dir = dir.to_path_buf();
        if !fs.exists(&dir).map_err(|e| Error::io("stat", &dir, e))? {
            fs.create_dir_all(&dir)
                .map_err(|e| Error::io("create dir", &dir, e))?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs.sync_dir(parent)
                    .map_err(|e| Error::io("sync dir", parent, e))?;
            }
        }
        let mut wal = Wal {
            fs,
            dir,
            opts,
            segments: VecDeque::new(),
            tail: 0,
            last_crc: 0,
            state: LogState::default(),
            cache: Cache::default(),
            poisoned: None,
            buf: Vec::with_capacity(64 << 10),
            positions: Vec::new(),
            pending: Vec::new(),
            prepared: None,
            removed: Vec::new(),
        };
        let report = wal.recover()?;
        wal.prepare_next();
        Ok((wal, report))
    }

    fn recover(&mut self) -> Result<RecoveryReport> {
        let fs = self.fs.clone();
        let names = fs
            .list_dir(&self.dir)
            .map_err(|e| Error::io("list", &self.dir, e))?;
        let mut found = Vec::new();
        for name in names {
            if name.ends_with(".wal.tmp") {
                // A segment whose creation did not finish: it was never renamed into place, so
                // nothing in it was ever acknowledged.
                let p = join(&self.dir, &name);
                fs.remove(&p).map_err(|e| Error::io("remove", &p, e))?;
            } else if let Some((seq, first)) = parse_segment_name(&name) {
                found.push((seq, first, name));
            }
        }
        // Always sync the directory: the segments listed may include one whose creation was
        // never made durable (a run whose directory fsync failed); appending acknowledged
        // entries to a file whose name could still vanish would lose them.
        self.sync_dir()?;
        found.sort();
        if found.is_empty() {
            self.state.first_index = 1;
            self.state.anchored = true;
            self.state.base = Some((0, 0));
            self.create_segment(1, 1, 0)?;
            return Ok(RecoveryReport::default());
        }
        for w in found.windows(2) {
            if w[1].0 != w[0].0 + 1 {
                return Err(Error::corrupt(
                    join(&self.dir, &w[1].2),
                    0,
                    format!(
                        "segment sequence jumps from {} to {}: a segment is missing",
                        w[0].0, w[1].0
                    ),
                ));
            }
        }

        // Headers first: refuse a foreign or newer data dir before reading gigabytes, and find
        // the last reset (segments before it are superseded and may be left over from an
        // interrupted `reset`).
        let mut headers = Vec::with_capacity(found.len());
        for (seq, first, name) in &found {
            let path = join(&self.dir, name);
            let file = fs.open(&path).map_err(|e| Error::io("open", &path, e))?;
            let h = self.read_header(&path, file.as_ref(), *seq, *first)?;
            headers.push((h, path, file));
        }
        let start = headers
            .iter()
            .rposition(|(h, _, _)| h.flags & FLAG_RESET != 0)
            .unwrap_or(0);
        if start > 0 {
            for (_, path, _) in headers.drain(..start) {
                info!(file = %path.display(), "removing a segment superseded by a snapshot reset");
                fs.remove(&path)
                    .map_err(|e| Error::io("remove", &path, e))?;
            }
            self.sync_dir()?;
        }

        let mut report = RecoveryReport {
            segments: headers.len(),
            ..Default::default()
        };
        let mut img = Vec::new();
        let n = headers.len();
        let mut prev_crc: Option<u32> = None;
        for (i, (h, path, file)) in headers.into_iter().enumerate() {
            let is_last = i + 1 == n;
            let len = file.len().map_err(|e| Error::io("stat", &path, e))?;
            img.clear();
            img.resize(len as usize, 0);
            read_exact_at(file.as_ref(), &mut img, 0).map_err(|e| Error::io("read", &path, e))?;
            report.bytes_scanned += len;
            if let Some(p) = prev_crc {
                if h.prev_crc != p {
                    return Err(Error::corrupt(
                        &path,
                        0,
                        "segment header does not chain from the previous segment's last record",
                    ));
                }
            }
            if h.flags & FLAG_RESET != 0 {
                self.state.reset(h.first_index);
            } else if h.seq == 1 {
                // The first segment ever: the log starts at the beginning of time.
                self.state.first_index = 1;
                self.state.anchored = true;
                self.state.base = Some((0, 0));
            }
            let seq = h.seq;
            let state = &mut self.state;
            let (end, crc, tail) = scan::scan(&img, 0, h.prev_crc, |off, seed, rec| {
                apply_record(state, seq, off as u64, seed, rec)
            });
            match tail {
                Tail::Clean => {}
                Tail::Corrupt { offset, reason } => {
                    return Err(Error::corrupt(&path, offset as u64, reason));
                }
                Tail::Torn {
                    offset,
                    nonzero_end,
                } => {
                    if !is_last {
                        // Rollover syncs a segment before the next one exists, so only the last
                        // one can hold an unsynced (torn) write.
                        return Err(Error::corrupt(
                            &path,
                            offset as u64,
                            "incomplete record at the end of a segment that is not the last",
                        ));
                    }
                    if offset < h.head_len as usize {
                        return Err(Error::corrupt(
                            &path,
                            offset as u64,
                            "incomplete record inside the segment head, which was durable before \
                             the segment was named",
                        ));
                    }
                    warn!(
                        file = %path.display(),
                        offset,
                        dropped_bytes = nonzero_end - offset,
                        "WAL has a torn tail (an unsynced write cut by a crash); truncating it"
                    );
                    report.torn_tail =
                        Some((path.clone(), offset as u64, (nonzero_end - offset) as u64));
                }
            }
            if end < h.head_len as usize {
                return Err(Error::corrupt(
                    &path,
                    end as u64,
                    "segment head is incomplete",
                ));
            }
            prev_crc = Some(crc);
            if is_last {
                self.tail = end as u64;
                self.last_crc = crc;
            }
            self.segments.push_back(Segment { seq, path, file });
            if !self.state.anchored && is_last {
                // No entries record anywhere: the log is empty and continues where the
                // segments were started.
                self.state.first_index = h.first_index;
                self.state.anchored = true;
            }
        }

        // Make the tail writable again: zero what a torn write left (so the space after the
        // log reads as zeros, which recovery relies on) and restore the preallocation a cut
        // file lost.
        if let Some((path, offset, dropped)) = report.torn_tail.clone() {
            let seg = self.segments.back_mut().expect("segments");
            seg.file
                .write_at(&vec![0u8; dropped as usize], offset)
                .map_err(|e| Error::io("write", &path, e))?;
        }
        let seg = self.segments.back_mut().expect("segments");
        let len = seg
            .file
            .len()
            .map_err(|e| Error::io("stat", &seg.path, e))?;
        if len < self.opts.segment_size {
            seg.file
                .preallocate(self.opts.segment_size)
                .map_err(|e| Error::io("preallocate", &seg.path, e))?;
        }
        // Always sync: what recovery just accepted may be writes still in the page cache from
        // a run whose fsync failed; they must be durable before anything is appended after them
        // (and one sync at open costs nothing).
        seg.file
            .sync_data()
            .map_err(|e| Error::io("sync", &seg.path, e))?;
        self.fill_cache()?;
        Ok(report)
    }

    fn read_header(
        &self,
        path: &Path,
        file: &dyn FsFile,
        seq: u64,
        first: u64,
    ) -> Result<SegmentHeader> {
        // Read a little more than a version-1 header so a newer, longer one still verifies.
        let mut buf = [0u8; 4 * (HEADER_LEN + SEGMENT_HEADER_PAYLOAD)];
        let n = file
            .read_at(&mut buf, 0)
            .map_err(|e| Error::io("read", path, e))?;
        let buf = &buf[..n];
        let seed = record::header_seed(buf)
            .ok_or_else(|| Error::corrupt(path, 0, "not a keel WAL segment (no header record)"))?;
        // The crc is checked before the version is believed: a flipped bit in the version field
        // is damage, not a file from the future.
        let rec = record::decode(buf, 0, seed)
            .map_err(|e| Error::corrupt(path, 0, format!("segment header is damaged: {e:?}")))?;
        let h =
            record::decode_segment_header(rec.body).map_err(|e| Error::corrupt(path, 0, e.0))?;
        if h.version > FORMAT_VERSION {
            return Err(Error::UnsupportedVersion {
                path: path.to_path_buf(),
                found: h.version,
                supported: FORMAT_VERSION,
            });
        }
        if h.version == 0 {
            return Err(Error::corrupt(path, 0, "segment header has version 0"));
        }
        if h.node_id != self.opts.node_id {
            return Err(Error::NodeIdMismatch {
                path: path.to_path_buf(),
                expected: self.opts.node_id,
                found: h.node_id,
            });
        }
        if h.cluster_id != self.opts.cluster_id {
            return Err(Error::ClusterIdMismatch {
                path: path.to_path_buf(),
                expected: self.opts.cluster_id,
                found: h.cluster_id,
            });
        }
        if h.seq != seq || h.first_index != first {
            return Err(Error::corrupt(
                path,
                0,
                format!(
                    "file name says segment {seq} from index {first}, its header says segment {} from index {}",
                    h.seq, h.first_index
                ),
            ));
        }
        Ok(h)
    }

    fn sync_dir(&self) -> Result<()> {
        self.fs
            .sync_dir(&self.dir)
            .map_err(|e| Error::io("sync dir", &self.dir, e))
    }

    /// Loads the newest entries (up to the cache bound) from disk.
    fn fill_cache(&mut self) -> Result<()> {
        self.cache = Cache::default();
        if self.state.entries.is_empty() {
            self.cache.first = self.state.first_index;
            return Ok(());
        }
        let mut lo = self.state.last_index() + 1;
        let mut size = 0u64;
        while lo > self.state.first_index {
            let e = &self.state.entries[(lo - 1 - self.state.first_index) as usize];
            // encoded_len of an Entry is what the meta's len records.
            if size + u64::from(e.len) > self.opts.cache_bytes {
                break;
            }
            size += u64::from(e.len);
            lo -= 1;
        }
        let last = self.state.last_index();
        let ents = self.read_from_disk(lo, last + 1, u64::MAX)?;
        self.cache.first = lo;
        self.cache.push(&ents, self.opts.cache_bytes);
        Ok(())
    }

    // ----- reads ------------------------------------------------------------------------------

    fn check_poisoned(&self) -> Result<()> {
        match &self.poisoned {
            Some(why) => Err(Error::Poisoned(why.clone())),
            None => Ok(()),
        }
    }

    /// Index of the first entry kept (when the log is empty, the index the next entry gets).
    pub fn first_index(&self) -> u64 {
        self.state.first_index
    }

    /// Index of the last entry (`first_index() - 1` when empty).
    pub fn last_index(&self) -> u64 {
        self.state.last_index()
    }

    /// The term of entry `index`, if the log holds it.
    pub fn term(&self, index: u64) -> Result<Option<u64>> {
        self.check_poisoned()?;
        Ok(self.state.term(index))
    }

    pub fn hard_state(&self) -> &HardState {
        &self.state.hard_state
    }

    /// Index and term of the entry before `first_index()`, when the log knows them.
    pub fn base(&self) -> Option<(u64, u64)> {
        self.state.base
    }

    /// Index and term of the latest snapshot marker ((0, 0) if none).
    pub fn snapshot_marker(&self) -> (u64, u64) {
        self.state.snapshot
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Bytes of log on disk up to the write position: full earlier segments plus the used part
    /// of the last one (preallocated zeros past the tail are not counted).
    pub fn bytes(&self) -> u64 {
        (self.segments.len() as u64 - 1) * self.opts.segment_size + self.tail
    }

    /// Entries `[lo, hi)`, stopping once their encoded sizes pass `max_size` (the first entry is
    /// always returned). The range must lie within `first_index()..=last_index() + 1`.
    pub fn entries(&self, lo: u64, hi: u64, max_size: u64) -> Result<Vec<Entry>> {
        self.check_poisoned()?;
        if lo < self.state.first_index || hi > self.state.last_index() + 1 || lo > hi {
            return Err(Error::Invalid(format!(
                "entries [{lo}, {hi}) outside the log [{}, {}]",
                self.state.first_index,
                self.state.last_index()
            )));
        }
        let mut out = Vec::new();
        let mut size = 0u64;
        let split = self.cache.first.clamp(lo, hi);
        if lo < split {
            out = self.read_from_disk(lo, split, max_size)?;
            size = out.iter().map(|e| e.encoded_len() as u64).sum();
            if (out.len() as u64) < split - lo {
                return Ok(out);
            }
        }
        for i in split..hi {
            let e = self.cache.get(i).expect("cache holds the log's suffix");
            let s = e.encoded_len() as u64;
            if !out.is_empty() && size + s > max_size {
                break;
            }
            size += s;
            out.push(e.clone());
        }
        Ok(out)
    }

    /// Reads entries back from the segments, verifying each record read.
    fn read_from_disk(&self, lo: u64, hi: u64, max_size: u64) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        let mut size = 0u64;
        let mut i = lo;
        while i < hi {
            let rec = self
                .state
                .record_of(i)
                .expect("indexes within the log have a record");
            let seg = self
                .segments
                .iter()
                .find(|s| s.seq == rec.seq)
                .expect("records point into live segments");
            let mut raw = vec![0u8; rec.len as usize];
            read_exact_at(seg.file.as_ref(), &mut raw, rec.offset)
                .map_err(|e| Error::io("read", &seg.path, e))?;
            record::decode(&raw, 0, rec.seed).map_err(|why| {
                Error::corrupt(
                    &seg.path,
                    rec.offset,
                    format!("record changed on disk since it was verified: {why:?}"),
                )
            })?;
            let raw = Bytes::from(raw);
            let serial = self.state.entries[(i - self.state.first_index) as usize].record;
            while i < hi {
                let meta = self.state.entries[(i - self.state.first_index) as usize];
                if meta.record != serial {
                    break;
                }
                let e = record::decode_entry(&raw, meta.pos, meta.len)
                    .map_err(|why| Error::corrupt(&seg.path, rec.offset, why.0))?;
                if e.index != i {
                    return Err(Error::corrupt(
                        &seg.path,
                        rec.offset,
                        format!("expected entry {i}, found {}", e.index),
                    ));
                }
                let s = e.encoded_len() as u64;
                if !out.is_empty() && size + s > max_size {
                    return Ok(out);
                }
                size += s;
                out.push(e);
                i += 1;
            }
        }
        Ok(out)
    }

    // ----- writes -----------------------------------------------------------------------------

    /// Runs a write-path step; any failure poisons the log. A failed write may have left part of
    /// a record in the page cache and a failed fsync leaves the disk in an unknown state, so
    /// nothing more may be written (or acknowledged) on top of it.
    fn guarded<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        self.check_poisoned()?;
        let r = f(self);
        if let Err(e) = &r {
            if matches!(e, Error::Io { .. }) {
                warn!(error = %e, "WAL write failed; refusing further writes until reopened");
                self.poisoned = Some(e.to_string());
            }
        }
        r
    }

    /// `write` then `sync`: one fdatasync for the whole batch. Only when this returns `Ok` is
    /// anything in it durable and may be acknowledged.
    pub fn save(&mut self, hs: Option<&HardState>, ents: &[Entry]) -> Result<()> {
        self.write(hs, ents)?;
        self.sync()
    }

    /// Writes entries (overwriting the log from the first one's index) and then the hard state,
    /// without syncing. Entries must be consecutive and start within
    /// `first_index()..=last_index() + 1`.
    pub fn write(&mut self, hs: Option<&HardState>, ents: &[Entry]) -> Result<()> {
        self.check_poisoned()?;
        self.validate_batch(ents)?;
        self.guarded(|w| w.write_inner(hs, ents))
    }

    fn validate_batch(&self, ents: &[Entry]) -> Result<()> {
        let Some(first) = ents.first() else {
            return Ok(());
        };
        for w in ents.windows(2) {
            if w[1].index != w[0].index + 1 {
                return Err(Error::Invalid(format!(
                    "batch is not consecutive: {} follows {}",
                    w[1].index, w[0].index
                )));
            }
        }
        let (lo, hi) = (self.state.first_index, self.state.last_index() + 1);
        if first.index < lo || first.index > hi {
            return Err(Error::Invalid(format!(
                "batch starts at {}, outside {lo}..={hi} (the log is [{lo}, {}])",
                first.index,
                hi - 1
            )));
        }
        let max = self.opts.max_payload();
        for e in ents {
            let need = record::entry_footprint(e) + ENTRIES_OVERHEAD - HEADER_LEN;
            if need > max {
                return Err(Error::EntryTooLarge {
                    index: e.index,
                    size: e.encoded_len() as u64,
                    max: (max - (ENTRIES_OVERHEAD - HEADER_LEN) - 4) as u64,
                });
            }
        }
        Ok(())
    }

    fn write_inner(&mut self, hs: Option<&HardState>, ents: &[Entry]) -> Result<()> {
        self.buf.clear();
        self.pending.clear();
        let target = TARGET_PAYLOAD.min(self.opts.max_payload());
        let mut start = 0;
        while start < ents.len() {
            // Take entries up to the target payload size (at least one).
            let mut end = start;
            let mut payload = ENTRIES_OVERHEAD - HEADER_LEN;
            while end < ents.len() {
                let f = record::entry_footprint(&ents[end]);
                if end > start && payload + f > target {
                    break;
                }
                payload += f;
                end += 1;
            }
            let rec_len = (HEADER_LEN + payload) as u64;
            if self.tail + self.buf.len() as u64 + rec_len > self.opts.segment_size {
                self.flush()?;
                self.roll(ents[start].index)?;
            }
            let offset = self.tail + self.buf.len() as u64;
            let seed = self.last_crc;
            self.positions.clear();
            let at = self.buf.len();
            self.last_crc =
                record::encode_entries(&mut self.buf, seed, &ents[start..end], &mut self.positions);
            debug_assert_eq!(self.buf.len() - at, rec_len as usize);
            self.pending.push(Pending::Entries {
                rec: RecordMeta {
                    seq: self.segments.back().expect("segments").seq,
                    offset,
                    len: rec_len as u32,
                    seed,
                },
                from: start,
                to: end,
            });
            start = end;
        }
        if let Some(hs) = hs {
            let rec_len = HARD_STATE_RECORD_LEN as u64;
            if self.tail + self.buf.len() as u64 + rec_len > self.opts.segment_size {
                self.flush()?;
                let next = self.next_index_after_pending(ents);
                self.roll(next)?;
            }
            self.last_crc = record::encode_hard_state(&mut self.buf, self.last_crc, hs);
            self.pending.push(Pending::HardState(*hs));
        }
        self.flush()?;
        // Apply to the in-memory state only now that the bytes are written.
        for p in std::mem::take(&mut self.pending) {
            match p {
                Pending::Entries { rec, from, to } => self.apply_written(rec, &ents[from..to]),
                Pending::HardState(hs) => self.state.hard_state = hs,
            }
        }
        Ok(())
    }

    fn next_index_after_pending(&self, ents: &[Entry]) -> u64 {
        match ents.last() {
            Some(e) => e.index + 1,
            None => self.state.last_index() + 1,
        }
    }

    fn apply_written(&mut self, rec: RecordMeta, ents: &[Entry]) {
        self.positions.clear();
        let mut pos = (HEADER_LEN + 4) as u32;
        let infos: Vec<EntryInfo> = ents
            .iter()
            .map(|e| {
                let len = e.encoded_len() as u32;
                let info = EntryInfo {
                    index: e.index,
                    term: e.term,
                    pos: pos + 4,
                    len,
                };
                pos += 4 + len;
                info
            })
            .collect();
        self.state
            .apply_entries(&infos, rec)
            .expect("batch validated against the log");
        self.cache.truncate_from(ents[0].index);
        if self.cache.ents.is_empty() {
            self.cache.first = ents[0].index;
        }
        self.cache.push(ents, self.opts.cache_bytes);
    }

    /// Writes `buf` at the tail of the last segment.
    fn flush(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            // Records already encoded for a previous segment were flushed before rolling.
            return Ok(());
        }
        let seg = self.segments.back_mut().expect("segments");
        seg.file
            .write_at(&self.buf, self.tail)
            .map_err(|e| Error::io("write", &seg.path, e))?;
        self.tail += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Makes everything written so far durable.
    pub fn sync(&mut self) -> Result<()> {
        self.guarded(|w| {
            let seg = w.segments.back_mut().expect("segments");
            seg.file
                .sync_data()
                .map_err(|e| Error::io("sync", &seg.path, e))
        })
    }

    /// Starts a new segment for entries from `next_index`.
    fn roll(&mut self, next_index: u64) -> Result<()> {
        // The current segment's records must be durable before any record exists after them
        // in the next file: that keeps a torn write confined to the last segment.
        let seg = self.segments.back_mut().expect("segments");
        seg.file
            .sync_data()
            .map_err(|e| Error::io("sync", &seg.path, e))?;
        let seq = seg.seq + 1;
        self.create_segment(seq, next_index, 0)
    }

    /// Creates segment `seq` through a temp file (preallocated, head written and synced,
    /// renamed, directory synced) so a segment under its final name always has a durable head.
    /// The head restates the hard state and snapshot marker so purging older segments never
    /// loses them.
    fn create_segment(&mut self, seq: u64, first_index: u64, flags: u32) -> Result<()> {
        let name = segment_name(seq, first_index);
        let path = join(&self.dir, &name);
        let (tmp, mut file) = match self.prepared.take().map(|h| h.join()) {
            Some(Ok(Ok(prepared))) => prepared,
            other => {
                if let Some(Ok(Err(e))) = other {
                    warn!(error = %e, "preparing the next WAL segment failed; creating it inline");
                }
                let tmp = join(&self.dir, &format!("{name}.tmp"));
                let mut file = self
                    .fs
                    .create(&tmp)
                    .map_err(|e| Error::io("create", &tmp, e))?;
                if self.opts.zero_fill_ahead {
                    // No prepared segment (the first one, or preparing failed): zero it here.
                    zero_fill(file.as_mut(), self.opts.segment_size)
                        .map_err(|e| Error::io("zero-fill", &tmp, e))?;
                } else {
                    file.preallocate(self.opts.segment_size)
                        .map_err(|e| Error::io("preallocate", &tmp, e))?;
                }
                (tmp, file)
            }
        };
        let restate_hs = self.state.hard_state != HardState::default();
        let (si, st) = self.state.snapshot;
        let restate_snap = (si, st) != (0, 0);
        let head_len = HEADER_LEN
            + SEGMENT_HEADER_PAYLOAD
            + if restate_hs { HARD_STATE_RECORD_LEN } else { 0 }
            + if restate_snap {
                SNAPSHOT_MARKER_RECORD_LEN
            } else {
                0
            };
        let mut head = Vec::with_capacity(head_len);
        let mut crc = record::encode_segment_header(
            &mut head,
            &SegmentHeader {
                version: FORMAT_VERSION,
                prev_crc: self.last_crc,
                flags,
                head_len: head_len as u32,
                node_id: self.opts.node_id,
                cluster_id: self.opts.cluster_id,
                seq,
                first_index,
            },
        );
        if restate_hs {
            crc = record::encode_hard_state(&mut head, crc, &self.state.hard_state);
        }
        if restate_snap {
            crc = record::encode_snapshot_marker(&mut head, crc, si, st);
        }
        debug_assert_eq!(head.len(), head_len);
        file.write_at(&head, 0)
            .map_err(|e| Error::io("write", &tmp, e))?;
        file.sync_data().map_err(|e| Error::io("sync", &tmp, e))?;
        self.fs
            .rename(&tmp, &path)
            .map_err(|e| Error::io("rename", &tmp, e))?;
        self.sync_dir()?;
        self.segments.push_back(Segment { seq, path, file });
        self.tail = head.len() as u64;
        self.last_crc = crc;
        self.prepare_next();
        Ok(())
    }

    /// Starts zero-filling the segment after the current one (see `zero_fill_ahead`). Its temp
    /// name ends in `.wal.tmp`, so a crash leaves nothing recovery would read.
    fn prepare_next(&mut self) {
        if !self.opts.zero_fill_ahead || self.prepared.is_some() {
            return;
        }
        let seq = self.segments.back().map_or(1, |s| s.seq + 1);
        let path = join(&self.dir, &format!("{seq:016x}-next.wal.tmp"));
        let fs = self.fs.clone();
        let size = self.opts.segment_size;
        self.prepared = Some(std::thread::spawn(move || {
            if fs.exists(&path)? {
                fs.remove(&path)?;
            }
            let mut f = fs.create(&path)?;
            zero_fill(f.as_mut(), size)?;
            f.sync_data()?;
            Ok((path, f))
        }));
    }

    /// Records that a snapshot covers the log up to `index` (whose term is `term`), durably.
    /// Recovery then knows entries up to there are only a catch-up margin, and `purge` may drop
    /// them.
    pub fn mark_snapshot(&mut self, index: u64, term: u64) -> Result<()> {
        self.check_poisoned()?;
        let (si, _) = self.state.snapshot;
        if index < si {
            return Err(Error::Invalid(format!(
                "snapshot marker {index} is older than the current one at {si}"
            )));
        }
        match self.state.term(index) {
            Some(t) if t == term => {}
            _ if index + 1 == self.state.first_index && index == si => {}
            found => {
                return Err(Error::Invalid(format!(
                "snapshot marker ({index}, {term}) does not match the log (term there: {found:?})"
            )))
            }
        }
        self.guarded(|w| {
            w.buf.clear();
            let rec_len = SNAPSHOT_MARKER_RECORD_LEN as u64;
            if w.tail + rec_len > w.opts.segment_size {
                let next = w.state.last_index() + 1;
                w.roll(next)?;
            }
            w.last_crc = record::encode_snapshot_marker(&mut w.buf, w.last_crc, index, term);
            w.flush()?;
            let seg = w.segments.back_mut().expect("segments");
            seg.file
                .sync_data()
                .map_err(|e| Error::io("sync", &seg.path, e))?;
            w.state.snapshot = (index, term);
            Ok(())
        })
    }

    /// Discards the whole log and starts a new one after a snapshot at (`index`, `term`)
    /// received from the leader, with hard state `hs`. The new segment is durable before the
    /// old ones are removed, and recovery finishes an interrupted reset.
    pub fn reset(&mut self, index: u64, term: u64, hs: &HardState) -> Result<()> {
        self.check_poisoned()?;
        self.guarded(|w| {
            let seg = w.segments.back_mut().expect("segments");
            seg.file
                .sync_data()
                .map_err(|e| Error::io("sync", &seg.path, e))?;
            let seq = seg.seq + 1;
            let saved = (w.state.hard_state, w.state.snapshot);
            w.state.hard_state = *hs;
            w.state.snapshot = (index, term);
            if let Err(e) = w.create_segment(seq, index + 1, FLAG_RESET) {
                (w.state.hard_state, w.state.snapshot) = saved;
                return Err(e);
            }
            w.state.reset(index + 1);
            w.state.base = Some((index, term));
            w.cache = Cache {
                first: index + 1,
                ..Cache::default()
            };
            while w.segments.len() > 1 {
                let old = w.segments.pop_front().expect("segments");
                w.fs.remove(&old.path)
                    .map_err(|e| Error::io("remove", &old.path, e))?;
            }
            w.sync_dir()
        })
    }

    pub fn options(&self) -> &WalOptions {
        &self.opts
    }

    /// Files of purged segments left for the caller to delete (`defer_removal`).
    pub fn take_removed(&mut self) -> Vec<PathBuf> {
        std::mem::take(&mut self.removed)
    }

    /// Removes whole segments none of whose live entries is at or above `below` (never the last
    /// segment). Entries below `below` may survive in a kept segment. `below` may not pass the
    /// snapshot marker + 1: entries no snapshot covers are never dropped. Returns how many
    /// segments were removed.
    pub fn purge(&mut self, below: u64) -> Result<usize> {
        self.check_poisoned()?;
        let (si, _) = self.state.snapshot;
        if below > si + 1 {
            return Err(Error::Invalid(format!(
                "purge below {below} would drop entries after the snapshot at {si}"
            )));
        }
        let keep_seq = if below > self.state.last_index() {
            self.segments.back().expect("segments").seq
        } else if below <= self.state.first_index {
            return Ok(0);
        } else {
            self.state.record_of(below).expect("index in log").seq
        };
        self.guarded(|w| {
            let mut removed = 0;
            while w.segments.front().is_some_and(|s| s.seq < keep_seq) {
                let old = w.segments.pop_front().expect("segments");
                if w.opts.defer_removal {
                    w.removed.push(old.path);
                } else {
                    w.fs.remove(&old.path)
                        .map_err(|e| Error::io("remove", &old.path, e))?;
                }
                removed += 1;
            }
            if removed == 0 {
                return Ok(0);
            }
            if !w.opts.defer_removal {
                w.sync_dir()?;
            }
            let st = &mut w.state;
            while st.records.front().is_some_and(|r| r.seq < keep_seq) {
                st.records.pop_front();
                st.records_base += 1;
            }
            while st
                .entries
                .front()
                .is_some_and(|e| e.record < st.records_base)
            {
                st.entries.pop_front();
                st.first_index += 1;
            }
            w.cache.drop_below(w.state.first_index);
            Ok(removed)
        })
    }

    /// Whether a failed write or sync has made this log refuse further use.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }
}

/// Writes `size` bytes of zeros from the start of `f`, in 1 MiB writes (bounded memory, few
/// syscalls).
fn zero_fill(f: &mut dyn FsFile, size: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(zeros.len() as u64) as usize;
        f.write_at(&zeros[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

/// Applies one verified record during replay.
fn apply_record(
    state: &mut LogState,
    seq: u64,
    offset: u64,
    seed: u32,
    rec: &record::RawRecord<'_>,
) -> std::result::Result<(), String> {
    match Kind::from_u8(rec.kind) {
        Some(Kind::SegmentHeader) => {
            if offset != 0 {
                return Err("segment header in the middle of a segment".into());
            }
            Ok(())
        }
        _ if offset == 0 => Err("segment does not start with a header record".into()),
        Some(Kind::Entries) => {
            let mut infos = Vec::new();
            record::scan_entries(rec.body, |i| infos.push(i)).map_err(|e| e.0)?;
            let meta = RecordMeta {
                seq,
                offset,
                len: (rec.end as u64 - offset) as u32,
                seed,
            };
            state.apply_entries(&infos, meta)
        }
        Some(Kind::HardState) => {
            state.hard_state = record::decode_hard_state(rec.body).map_err(|e| e.0)?;
            Ok(())
        }
        Some(Kind::SnapshotMarker) => {
            let (i, t) = record::decode_snapshot_marker(rec.body).map_err(|e| e.0)?;
            if i < state.snapshot.0 {
                return Err(format!(
                    "snapshot marker {i} older than the previous one at {}",
                    state.snapshot.0
                ));
            }
            state.snapshot = (i, t);
            if state.anchored && i + 1 == state.first_index {
                state.base = Some((i, t));
            }
            Ok(())
        }
        None => Err(format!("unknown record kind {}", rec.kind)),
    }
}
