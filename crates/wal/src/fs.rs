//! The file-system seam. The WAL and the snapshot store do all their I/O through `Fs`, so the
//! same code runs over the real disk (`StdFs`) and over `MemFs`, whose crash and fault model
//! lets tests and the simulator exercise recovery deterministically.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

/// A file system as the WAL needs it. Paths are plain `Path`s; names returned by `list_dir` are
/// bare file names.
pub trait Fs: Send + Sync + fmt::Debug {
    /// Creates `path` and any missing parents. On a real disk making a new directory durable
    /// needs `sync_dir` of its parent.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Opens an existing file for reading and writing.
    fn open(&self, path: &Path) -> io::Result<Box<dyn FsFile>>;
    /// Creates a new, empty file; fails if it exists (so a stale file is never silently reused).
    fn create(&self, path: &Path) -> io::Result<Box<dyn FsFile>>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// The names of the regular files in `dir`, sorted.
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Makes the creations, renames and removals of entries in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    fn exists(&self, path: &Path) -> io::Result<bool>;
}

/// An open file. Reads take `&self` so that readers of a shared log need no exclusive borrow.
pub trait FsFile: Send + Sync + fmt::Debug {
    fn len(&self) -> io::Result<u64>;
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Fills `buf` from `offset`; returns how many bytes were read (fewer only at end of file).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `offset`, extending the file if needed.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at the current end of the file.
    fn append(&mut self, buf: &[u8]) -> io::Result<()>;
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    /// Reserves space so the file is at least `len` bytes long and reads zeros past its old end.
    /// Later writes inside the reserved range cannot fail for lack of space and, on file systems
    /// that support it, do not change the file's size (so fdatasync has no size to flush).
    fn preallocate(&mut self, len: u64) -> io::Result<()>;
    /// fdatasync: the file's data and size are durable when this returns Ok.
    fn sync_data(&mut self) -> io::Result<()>;
    /// `len` bytes at `offset`, read-only, for data kept at hand but rarely read (the snapshot
    /// a leader holds for lagging followers). This copy reads them into memory; a real file
    /// maps them instead, so they cost no memory until read and the kernel can drop them again.
    /// The caller must never change or shorten the file while the bytes live.
    fn map(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let mut buf = vec![0u8; len];
        let mut done = 0;
        while done < len {
            match self.read_at(&mut buf[done..], offset + done as u64)? {
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("cannot read {len} bytes at offset {offset}: the file is shorter"),
                    ))
                }
                n => done += n,
            }
        }
        Ok(Bytes::from(buf))
    }
}

/// Reads exactly `buf.len()` bytes at `offset` or fails with `UnexpectedEof`.
pub fn read_exact_at(file: &dyn FsFile, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = file.read_at(&mut buf[done..], offset + done as u64)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "short read: wanted {} bytes at offset {offset}, file ends after {}",
                    buf.len(),
                    done
                ),
            ));
        }
        done += n;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// StdFs
// ---------------------------------------------------------------------------------------------

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdFs;

/// A read-only mapping of a file (`StdFile::map`), unmapped when the last `Bytes` of it drops.
/// Its pages belong to the page cache: resident only while read, and reclaimable.
#[cfg(unix)]
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by this value alone; reading it from any thread
// is as safe as reading any immutable memory.
#[cfg(unix)]
unsafe impl Send for Mapping {}
#[cfg(unix)]
unsafe impl Sync for Mapping {}

#[cfg(unix)]
impl AsRef<[u8]> for Mapping {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes until `drop`. The files mapped (snapshots) are
        // written once before they are mapped and never changed after, only removed, which
        // leaves the mapping valid.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

#[cfg(unix)]
impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `mmap` returned, once.
        unsafe {
            libc::munmap(self.ptr, self.len);
        }
    }
}

#[derive(Debug)]
struct StdFile(std::fs::File);

impl Fs for StdFs {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn open(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        Ok(Box::new(StdFile(f)))
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(Box::new(StdFile(f)))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for ent in std::fs::read_dir(dir)? {
            let ent = ent?;
            if !ent.file_type()?.is_file() {
                continue;
            }
            // A name that is not UTF-8 was not written by us; skip it rather than fail.
            if let Ok(name) = ent.file_name().into_string() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        std::fs::File::open(dir)?.sync_all()
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        path.try_exists()
    }
}

impl FsFile for StdFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    #[cfg(unix)]
    fn map(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        use std::os::fd::AsRawFd;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let file_len = self.len()?;
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > file_len)
        {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("cannot map {len} bytes at offset {offset}: the file is shorter"),
            ));
        }
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        let start = offset - offset % page;
        let skip = (offset - start) as usize;
        let map_len = skip + len;
        let file_off = libc::off_t::try_from(start)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        // SAFETY: a fresh read-only shared mapping of an open descriptor; the kernel picks the
        // address. It stays valid after the descriptor closes.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                self.0.as_raw_fd(),
                file_off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Bytes::from_owner(Mapping { ptr, len: map_len }).slice(skip..))
    }

    #[cfg(unix)]
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(&self.0, buf, offset)
    }

    #[cfg(not(unix))]
    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "keel-wal needs positional I/O (unix)",
        ))
    }

    #[cfg(unix)]
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.0, buf, offset)
    }

    #[cfg(not(unix))]
    fn write_at(&mut self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "keel-wal needs positional I/O (unix)",
        ))
    }

    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        let len = self.len()?;
        self.write_at(buf, len)
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    #[cfg(target_os = "linux")]
    fn preallocate(&mut self, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let len = libc::off_t::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length too large"))?;
        // SAFETY: fallocate on a valid, open descriptor; no memory is passed.
        let rc = unsafe { libc::fallocate(self.0.as_raw_fd(), 0, 0, len) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        // File systems without fallocate get the portable (sparse) fallback; a full disk must
        // surface as an error here and not later in the middle of an append.
        if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
            let cur = self.len()?;
            if cur < len as u64 {
                self.0.set_len(len as u64)?;
            }
            return Ok(());
        }
        Err(err)
    }

    #[cfg(not(target_os = "linux"))]
    fn preallocate(&mut self, len: u64) -> io::Result<()> {
        if self.len()? < len {
            self.0.set_len(len)?;
        }
        Ok(())
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
}

// ---------------------------------------------------------------------------------------------
// MemFs
// ---------------------------------------------------------------------------------------------

/// Which error an injected fault produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultError {
    /// ENOSPC.
    NoSpace,
    /// EIO.
    Io,
}

impl FaultError {
    fn to_io(self) -> io::Error {
        match self {
            FaultError::NoSpace => io::Error::new(
                io::ErrorKind::StorageFull,
                "no space left on device (injected)",
            ),
            FaultError::Io => io::Error::other("input/output error (injected)"),
        }
    }
}

/// An in-memory file system that remembers what is durable.
///
/// Every file keeps its current contents and the contents as of its last `sync_data`; every
/// directory keeps its current entries and its entries as of its last `sync_dir`. `crash()`
/// throws away everything that was not made durable. Deterministic: no clock and no randomness
/// inside; `crash_with` takes its choices from the caller.
///
/// Open handles become stale at a crash: every operation on them fails, as a process's file
/// descriptors do not survive a power failure.
#[derive(Clone)]
pub struct MemFs {
    state: Arc<Mutex<MemState>>,
}

impl fmt::Debug for MemFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.lock();
        f.debug_struct("MemFs")
            .field("inodes", &st.inodes.len())
            .field("generation", &st.generation)
            .finish()
    }
}

type Ino = u64;
const ROOT: Ino = 0;

#[derive(Debug, Default)]
struct MemState {
    inodes: BTreeMap<Ino, Inode>,
    next_ino: Ino,
    /// Bumped by every crash; handles opened in an older generation are stale.
    generation: u64,
    /// Fails a write once this many more bytes have been written (the failing write stores the
    /// bytes up to the limit, as a real short write would). One-shot.
    write_fault: Option<(u64, FaultError)>,
    /// Fails the sync after this many more successful syncs (file or directory). One-shot.
    sync_fault: Option<(u64, FaultError)>,
    /// A disk that acknowledges file syncs without making anything durable (a lying write
    /// cache). Used to prove that durability checks above the WAL notice lost acknowledged
    /// writes; the WAL itself cannot detect it.
    lying_sync: bool,
}

#[derive(Debug)]
enum Inode {
    File(MemFile),
    Dir(MemDir),
}

#[derive(Debug, Default)]
struct MemFile {
    data: Vec<u8>,
    durable: Vec<u8>,
    /// What happened to `data` since the last sync, in order; `durable` plus all of these is
    /// `data`. Kept so that `crash_with` can persist a prefix of them, torn at any byte, which
    /// is what a disk that writes back in order does when the power goes.
    pending: Vec<PendingOp>,
}

#[derive(Debug, Clone)]
enum PendingOp {
    Write { offset: u64, bytes: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Default)]
struct MemDir {
    entries: BTreeMap<String, Ino>,
    /// Invariant: names here refer to inodes that exist (inodes are only freed at a crash, after
    /// directories were rolled back to these entries).
    durable: BTreeMap<String, Ino>,
}

fn apply(buf: &mut Vec<u8>, op: &PendingOp) {
    match op {
        PendingOp::Write { offset, bytes } => {
            let off = *offset as usize;
            if buf.len() < off + bytes.len() {
                buf.resize(off + bytes.len(), 0);
            }
            buf[off..off + bytes.len()].copy_from_slice(bytes);
        }
        PendingOp::SetLen(len) => buf.resize(*len as usize, 0),
    }
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file or directory", path.display()),
    )
}

fn components(path: &Path) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::Normal(s) => out.push(
                s.to_str()
                    .ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidInput, "non UTF-8 path in MemFs")
                    })?
                    .to_string(),
            ),
            Component::ParentDir => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "MemFs does not resolve '..'",
                ))
            }
        }
    }
    Ok(out)
}

impl MemState {
    fn new() -> Self {
        let mut st = MemState::default();
        st.inodes.insert(ROOT, Inode::Dir(MemDir::default()));
        st.next_ino = ROOT + 1;
        st
    }

    fn dir(&self, ino: Ino) -> Option<&MemDir> {
        match self.inodes.get(&ino) {
            Some(Inode::Dir(d)) => Some(d),
            _ => None,
        }
    }

    fn dir_mut(&mut self, ino: Ino) -> Option<&mut MemDir> {
        match self.inodes.get_mut(&ino) {
            Some(Inode::Dir(d)) => Some(d),
            _ => None,
        }
    }

    fn file_mut(&mut self, ino: Ino) -> Option<&mut MemFile> {
        match self.inodes.get_mut(&ino) {
            Some(Inode::File(f)) => Some(f),
            _ => None,
        }
    }

    fn lookup_dir(&self, comps: &[String], path: &Path) -> io::Result<Ino> {
        let mut cur = ROOT;
        for c in comps {
            let d = self.dir(cur).ok_or_else(|| not_found(path))?;
            cur = *d.entries.get(c).ok_or_else(|| not_found(path))?;
        }
        if self.dir(cur).is_none() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{}: not a directory", path.display()),
            ));
        }
        Ok(cur)
    }

    /// The directory holding `path` and the file name within it.
    fn parent_of(&self, path: &Path) -> io::Result<(Ino, String)> {
        let mut comps = components(path)?;
        let name = comps.pop().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "empty path has no parent")
        })?;
        Ok((self.lookup_dir(&comps, path)?, name))
    }

    fn lookup(&self, path: &Path) -> io::Result<Ino> {
        let (dir, name) = self.parent_of(path)?;
        self.dir(dir)
            .and_then(|d| d.entries.get(&name).copied())
            .ok_or_else(|| not_found(path))
    }

    fn alloc(&mut self, inode: Inode) -> Ino {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.inodes.insert(ino, inode);
        ino
    }

    fn take_sync_fault(&mut self) -> io::Result<()> {
        if let Some((left, err)) = self.sync_fault {
            if left == 0 {
                self.sync_fault = None;
                return Err(err.to_io());
            }
            self.sync_fault = Some((left - 1, err));
        }
        Ok(())
    }

    /// How many of `want` bytes may be written before an injected write fault fires, and the
    /// error to return after writing them.
    fn write_budget(&mut self, want: usize) -> (usize, Option<io::Error>) {
        if let Some((left, err)) = self.write_fault {
            if (want as u64) > left {
                self.write_fault = None;
                return (left as usize, Some(err.to_io()));
            }
            self.write_fault = Some((left - want as u64, err));
        }
        (want, None)
    }

    /// Drops everything not durable, keeping the parts `choose` picks when it is given.
    fn crash(&mut self, mut choose: Option<&mut dyn FnMut(u64) -> u64>) {
        self.generation += 1;
        for inode in self.inodes.values_mut() {
            match inode {
                Inode::File(f) => {
                    let mut img = std::mem::take(&mut f.durable);
                    if let Some(choose) = choose.as_deref_mut() {
                        // Keep a prefix of the pending operations; the last kept write may be
                        // torn at any byte.
                        let keep = choose(f.pending.len() as u64) as usize;
                        let keep = keep.min(f.pending.len());
                        for (i, op) in f.pending.iter().take(keep).enumerate() {
                            match op {
                                PendingOp::Write { offset, bytes } if i + 1 == keep => {
                                    let cut = choose(bytes.len() as u64) as usize;
                                    let cut = cut.min(bytes.len());
                                    apply(
                                        &mut img,
                                        &PendingOp::Write {
                                            offset: *offset,
                                            bytes: bytes[..cut].to_vec(),
                                        },
                                    );
                                }
                                _ => apply(&mut img, op),
                            }
                        }
                    }
                    f.pending.clear();
                    f.data = img.clone();
                    f.durable = img;
                }
                Inode::Dir(d) => {
                    // A directory either had its metadata written back or not.
                    let keep_new = match choose.as_deref_mut() {
                        Some(choose) if d.entries != d.durable => choose(1) == 1,
                        _ => false,
                    };
                    if keep_new {
                        d.durable = d.entries.clone();
                    } else {
                        d.entries = d.durable.clone();
                    }
                }
            }
        }
        // Free what is no longer reachable from the root.
        let mut reachable = std::collections::BTreeSet::new();
        let mut stack = vec![ROOT];
        while let Some(ino) = stack.pop() {
            if !reachable.insert(ino) {
                continue;
            }
            if let Some(Inode::Dir(d)) = self.inodes.get(&ino) {
                stack.extend(d.entries.values().copied());
            }
        }
        self.inodes.retain(|ino, _| reachable.contains(ino));
    }
}

impl Default for MemFs {
    fn default() -> Self {
        Self::new()
    }
}

impl MemFs {
    pub fn new() -> Self {
        MemFs {
            state: Arc::new(Mutex::new(MemState::new())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, MemState> {
        // A panic while holding the lock (a failed test assertion elsewhere) leaves the state
        // consistent: every mutation completes before anything can panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Power failure: every write not followed by a successful `sync_data` of its file is lost,
    /// and every directory not synced since its last change is rolled back (a created file may
    /// vanish, a removed one come back, a rename be undone). All open handles go stale.
    pub fn crash(&self) {
        self.lock().crash(None);
    }

    /// Power failure where some unsynced work reached the disk: for each file, `choose(n)` (which
    /// must return a value in `0..=n`) picks how many of its `n` pending operations survive, and
    /// then where in the last surviving write the tear is; for each directory with unsynced
    /// changes, `choose(1) == 1` keeps all of them. The caller's seeded generator makes this
    /// deterministic.
    pub fn crash_with(&self, choose: &mut dyn FnMut(u64) -> u64) {
        self.lock().crash(Some(choose));
    }

    /// The next writes fail with `err` once `after_bytes` more bytes were written; the write that
    /// crosses the limit stores its bytes up to the limit. Fires once.
    pub fn fail_write_after(&self, after_bytes: u64, err: FaultError) {
        self.lock().write_fault = Some((after_bytes, err));
    }

    /// The sync (of a file or a directory) after `after_syncs` more successful ones fails with
    /// `err`, and makes nothing durable. Fires once.
    pub fn fail_sync_after(&self, after_syncs: u64, err: FaultError) {
        self.lock().sync_fault = Some((after_syncs, err));
    }

    /// From now on file syncs succeed without making anything durable (see `lying_sync`).
    pub fn set_lying_sync(&self, lying: bool) {
        self.lock().lying_sync = lying;
    }

    pub fn clear_faults(&self) {
        let mut st = self.lock();
        st.write_fault = None;
        st.sync_fault = None;
    }

    /// The current contents of a file (what a read returns), for tests.
    pub fn read_file(&self, path: &Path) -> io::Result<Vec<u8>> {
        let st = self.lock();
        let ino = st.lookup(path)?;
        match st.inodes.get(&ino) {
            Some(Inode::File(f)) => Ok(f.data.clone()),
            _ => Err(not_found(path)),
        }
    }

    /// Replaces a file's contents and makes them durable at once, as damage done to the disk
    /// behind the program's back would be; for tests.
    pub fn write_file_durable(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let mut st = self.lock();
        let ino = st.lookup(path)?;
        let f = st.file_mut(ino).ok_or_else(|| not_found(path))?;
        f.data = bytes.to_vec();
        f.durable = bytes.to_vec();
        f.pending.clear();
        Ok(())
    }

    /// Whether a file has writes that a crash would lose; for tests.
    pub fn has_unsynced(&self, path: &Path) -> io::Result<bool> {
        let mut st = self.lock();
        let ino = st.lookup(path)?;
        let f = st.file_mut(ino).ok_or_else(|| not_found(path))?;
        Ok(!f.pending.is_empty())
    }
}

#[derive(Debug)]
struct MemHandle {
    fs: MemFs,
    ino: Ino,
    generation: u64,
}

impl MemHandle {
    fn with<T>(&self, f: impl FnOnce(&mut MemState, Ino) -> io::Result<T>) -> io::Result<T> {
        let mut st = self.fs.lock();
        if st.generation != self.generation {
            return Err(io::Error::other(
                "stale file handle: the file system crashed since this file was opened",
            ));
        }
        f(&mut st, self.ino)
    }
}

fn file_of(st: &mut MemState, ino: Ino) -> io::Result<&mut MemFile> {
    st.file_mut(ino)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "file vanished"))
}

impl FsFile for MemHandle {
    fn len(&self) -> io::Result<u64> {
        self.with(|st, ino| Ok(file_of(st, ino)?.data.len() as u64))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.with(|st, ino| {
            let f = file_of(st, ino)?;
            let off = offset as usize;
            if off >= f.data.len() {
                return Ok(0);
            }
            let n = buf.len().min(f.data.len() - off);
            buf[..n].copy_from_slice(&f.data[off..off + n]);
            Ok(n)
        })
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.with(|st, ino| {
            let (n, err) = st.write_budget(buf.len());
            let f = file_of(st, ino)?;
            if n > 0 {
                let op = PendingOp::Write {
                    offset,
                    bytes: buf[..n].to_vec(),
                };
                apply(&mut f.data, &op);
                f.pending.push(op);
            }
            match err {
                Some(e) => Err(e),
                None => Ok(()),
            }
        })
    }

    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        let len = self.len()?;
        self.write_at(buf, len)
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.with(|st, ino| {
            let f = file_of(st, ino)?;
            let op = PendingOp::SetLen(len);
            apply(&mut f.data, &op);
            f.pending.push(op);
            Ok(())
        })
    }

    fn preallocate(&mut self, len: u64) -> io::Result<()> {
        self.with(|st, ino| {
            // Reserving space is where a full disk shows up first.
            let cur = file_of(st, ino)?.data.len() as u64;
            if len > cur {
                // A reservation is all or nothing: fallocate does not half-reserve.
                if let (_, Some(e)) = st.write_budget((len - cur) as usize) {
                    return Err(e);
                }
                let f = file_of(st, ino)?;
                let op = PendingOp::SetLen(len);
                apply(&mut f.data, &op);
                f.pending.push(op);
            }
            Ok(())
        })
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.with(|st, ino| {
            st.take_sync_fault()?;
            if st.lying_sync {
                return Ok(());
            }
            let f = file_of(st, ino)?;
            for op in std::mem::take(&mut f.pending) {
                apply(&mut f.durable, &op);
            }
            debug_assert_eq!(f.durable, f.data);
            Ok(())
        })
    }
}

impl Fs for MemFs {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut st = self.lock();
        let mut cur = ROOT;
        for c in components(path)? {
            let existing = st.dir(cur).and_then(|d| d.entries.get(&c).copied());
            cur = match existing {
                Some(ino) if st.dir(ino).is_some() => ino,
                Some(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("{}: a file is in the way", path.display()),
                    ))
                }
                None => {
                    // Directories are durable as soon as they exist: the crash model is about
                    // files (their data and their names), which is what the WAL's ordering
                    // guarantees rest on; the code still syncs the parent of a new directory.
                    let ino = st.alloc(Inode::Dir(MemDir::default()));
                    let parent = st.dir_mut(cur).expect("walked into a directory");
                    parent.entries.insert(c.clone(), ino);
                    parent.durable.insert(c, ino);
                    ino
                }
            };
        }
        Ok(())
    }

    fn open(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        let st = self.lock();
        let ino = st.lookup(path)?;
        if !matches!(st.inodes.get(&ino), Some(Inode::File(_))) {
            return Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                format!("{}: is a directory", path.display()),
            ));
        }
        Ok(Box::new(MemHandle {
            fs: self.clone(),
            ino,
            generation: st.generation,
        }))
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        let mut st = self.lock();
        let (dir, name) = st.parent_of(path)?;
        if st.dir(dir).is_some_and(|d| d.entries.contains_key(&name)) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{}: already exists", path.display()),
            ));
        }
        let ino = st.alloc(Inode::File(MemFile::default()));
        st.dir_mut(dir)
            .expect("parent is a directory")
            .entries
            .insert(name, ino);
        Ok(Box::new(MemHandle {
            fs: self.clone(),
            ino,
            generation: st.generation,
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut st = self.lock();
        let (fdir, fname) = st.parent_of(from)?;
        let (tdir, tname) = st.parent_of(to)?;
        let ino = st
            .dir_mut(fdir)
            .and_then(|d| d.entries.remove(&fname))
            .ok_or_else(|| not_found(from))?;
        st.dir_mut(tdir)
            .expect("parent is a directory")
            .entries
            .insert(tname, ino);
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut st = self.lock();
        let (dir, name) = st.parent_of(path)?;
        st.dir_mut(dir)
            .and_then(|d| d.entries.remove(&name))
            .map(|_| ())
            .ok_or_else(|| not_found(path))
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let st = self.lock();
        let ino = st.lookup_dir(&components(dir)?, dir)?;
        let d = st.dir(ino).expect("looked up a directory");
        Ok(d.entries
            .iter()
            .filter(|(_, ino)| matches!(st.inodes.get(ino), Some(Inode::File(_))))
            .map(|(n, _)| n.clone())
            .collect())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.lock();
        let ino = st.lookup_dir(&components(dir)?, dir)?;
        st.take_sync_fault()?;
        let d = st.dir_mut(ino).expect("looked up a directory");
        d.durable = d.entries.clone();
        Ok(())
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        let st = self.lock();
        match st.lookup(path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// A path under `dir`; a helper so call sites read as intent.
pub(crate) fn join(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    #[test]
    fn crash_drops_unsynced_writes_and_keeps_synced() {
        let fs = MemFs::new();
        fs.create_dir_all(&p("/d")).unwrap();
        let mut f = fs.create(&p("/d/a")).unwrap();
        f.write_at(b"hello", 0).unwrap();
        f.sync_data().unwrap();
        fs.sync_dir(&p("/d")).unwrap();
        f.write_at(b"HELLO world", 0).unwrap();
        assert_eq!(fs.read_file(&p("/d/a")).unwrap(), b"HELLO world");
        fs.crash();
        assert_eq!(fs.read_file(&p("/d/a")).unwrap(), b"hello");
        assert!(
            f.write_at(b"x", 0).is_err(),
            "a handle from before the crash is stale"
        );
    }

    #[test]
    fn crash_undoes_unsynced_directory_operations() {
        let fs = MemFs::new();
        fs.create_dir_all(&p("/d")).unwrap();
        let mut f = fs.create(&p("/d/a")).unwrap();
        f.write_at(b"a", 0).unwrap();
        f.sync_data().unwrap();
        fs.sync_dir(&p("/d")).unwrap();
        fs.rename(&p("/d/a"), &p("/d/b")).unwrap();
        let mut g = fs.create(&p("/d/c")).unwrap();
        g.write_at(b"c", 0).unwrap();
        g.sync_data().unwrap();
        assert_eq!(fs.list_dir(&p("/d")).unwrap(), vec!["b", "c"]);
        fs.crash();
        assert_eq!(fs.list_dir(&p("/d")).unwrap(), vec!["a"]);

        fs.remove(&p("/d/a")).unwrap();
        fs.sync_dir(&p("/d")).unwrap();
        fs.crash();
        assert!(fs.list_dir(&p("/d")).unwrap().is_empty());
    }

    #[test]
    fn crash_with_keeps_a_torn_prefix() {
        let fs = MemFs::new();
        fs.create_dir_all(&p("/d")).unwrap();
        let mut f = fs.create(&p("/d/a")).unwrap();
        fs.sync_dir(&p("/d")).unwrap();
        f.write_at(b"0123", 0).unwrap();
        f.write_at(b"4567", 4).unwrap();
        f.write_at(b"89", 8).unwrap();
        // Keep two operations, the second torn after 1 byte.
        let mut answers = vec![2u64, 1].into_iter();
        fs.crash_with(&mut |_| answers.next().unwrap());
        assert_eq!(fs.read_file(&p("/d/a")).unwrap(), b"01234");
    }

    #[test]
    fn injected_write_fault_is_a_short_write_then_error() {
        let fs = MemFs::new();
        fs.create_dir_all(&p("/d")).unwrap();
        let mut f = fs.create(&p("/d/a")).unwrap();
        fs.fail_write_after(3, FaultError::NoSpace);
        let err = f.write_at(b"abcdef", 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::StorageFull);
        assert_eq!(fs.read_file(&p("/d/a")).unwrap(), b"abc");
        f.write_at(b"zz", 3).unwrap();
        assert_eq!(fs.read_file(&p("/d/a")).unwrap(), b"abczz");
    }

    #[test]
    fn lying_sync_loses_acknowledged_writes_at_a_crash() {
        let fs = MemFs::new();
        let p = Path::new("/f");
        let mut f = fs.create(p).unwrap();
        fs.sync_dir(Path::new("/")).unwrap();
        f.append(b"durable").unwrap();
        f.sync_data().unwrap();
        fs.set_lying_sync(true);
        f.append(b" lost").unwrap();
        f.sync_data().unwrap();
        fs.crash();
        assert_eq!(fs.read_file(p).unwrap(), b"durable");
    }

    #[test]
    fn injected_sync_fault_makes_nothing_durable() {
        let fs = MemFs::new();
        fs.create_dir_all(&p("/d")).unwrap();
        let mut f = fs.create(&p("/d/a")).unwrap();
        fs.sync_dir(&p("/d")).unwrap();
        fs.fail_sync_after(0, FaultError::Io);
        f.write_at(b"abc", 0).unwrap();
        assert!(f.sync_data().is_err());
        assert!(fs.has_unsynced(&p("/d/a")).unwrap());
        fs.crash();
        assert_eq!(fs.read_file(&p("/d/a")).unwrap(), b"");
    }

    #[test]
    fn create_refuses_existing_and_open_needs_existing() {
        let fs = MemFs::new();
        fs.create_dir_all(&p("/d")).unwrap();
        fs.create(&p("/d/a")).unwrap();
        assert_eq!(
            fs.create(&p("/d/a")).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        assert_eq!(
            fs.open(&p("/d/b")).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        assert!(fs.exists(&p("/d/a")).unwrap());
        assert!(!fs.exists(&p("/d/b")).unwrap());
    }
}
