//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use bytes::Bytes;
use keel_proto::raftpb::{Entry, EntryType};
use keel_wal::{Fs, MemFs};

/// splitmix64: a tiny seeded generator so every test run is reproducible from its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn bytes(&mut self, n: usize) -> Bytes {
        let v: Vec<u8> = (0..n).map(|_| self.next_u64() as u8).collect();
        Bytes::from(v)
    }
}

pub fn ent(index: u64, term: u64, data: &[u8]) -> Entry {
    Entry {
        index,
        term,
        entry_type: EntryType::EntryNormal as i32,
        data: Bytes::copy_from_slice(data),
    }
}

/// Entries `from..from + n` with term `term` and data derived from index and term, so a
/// wrong or stale entry is visible in a comparison.
pub fn ents(from: u64, n: u64, term: u64) -> Vec<Entry> {
    (from..from + n)
        .map(|i| ent(i, term, format!("entry {i} term {term}").as_bytes()))
        .collect()
}

/// The durable files under `dir` (name, contents), after a crash dropped the rest.
pub fn image(fs: &MemFs, dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for sub in ["wal", "snap", ""] {
        let d = if sub.is_empty() {
            dir.to_path_buf()
        } else {
            dir.join(sub)
        };
        if !fs.exists(&d).unwrap() {
            continue;
        }
        for name in fs.list_dir(&d).unwrap() {
            let p = d.join(&name);
            out.push((p.clone(), fs.read_file(&p).unwrap()));
        }
    }
    out
}

/// A fresh file system holding exactly `files`, all durable.
pub fn restore(files: &[(PathBuf, Vec<u8>)]) -> MemFs {
    let fs = MemFs::new();
    for (p, bytes) in files {
        fs.create_dir_all(p.parent().unwrap()).unwrap();
        let mut f = fs.create(p).unwrap();
        f.write_at(bytes, 0).unwrap();
        f.sync_data().unwrap();
        fs.sync_dir(p.parent().unwrap()).unwrap();
    }
    fs
}
