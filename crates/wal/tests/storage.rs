//! `WalStorage` answers exactly as `keel_raft::MemStorage` does under the same operations,
//! including across reopens; and its recovery picks the right snapshot.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use common::{ent, ents};
use keel_proto::raftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use keel_raft::{MemStorage, Storage, StorageError};
use keel_wal::{Error, Fs, MemFs, StorageOptions, WalStorage};
use proptest::prelude::*;

fn dir() -> PathBuf {
    PathBuf::from("/node1")
}

fn opts() -> StorageOptions {
    let mut o = StorageOptions::new(1, 42);
    o.wal.segment_size = 4 << 10;
    o.wal.cache_bytes = 512;
    o.keep_snapshots = 2;
    o
}

fn open(fs: &MemFs) -> WalStorage {
    WalStorage::open(Arc::new(fs.clone()), &dir(), opts()).unwrap()
}

#[derive(Debug, Clone)]
enum Op {
    /// Entries from `first_index - back` (may reach below the compacted index, or overwrite),
    /// `n` of them, with a fresh term.
    Append {
        back: u64,
        n: u64,
        len: usize,
    },
    HardState {
        vote: u64,
    },
    /// Snapshot at `first + pct% of the log`.
    CreateSnapshot {
        pct: u64,
    },
    /// Compact to `offset + pct% of (snapshot - offset)`.
    Compact {
        pct: u64,
    },
    /// A snapshot from a leader `ahead` entries past our last index.
    ApplySnapshot {
        ahead: u64,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u64..6, 1u64..12, 0usize..200).prop_map(|(back, n, len)| Op::Append { back, n, len }),
        2 => (0u64..3).prop_map(|vote| Op::HardState { vote }),
        2 => (0u64..=100).prop_map(|pct| Op::CreateSnapshot { pct }),
        2 => (0u64..=100).prop_map(|pct| Op::Compact { pct }),
        1 => (0u64..20).prop_map(|ahead| Op::ApplySnapshot { ahead }),
        2 => Just(Op::Reopen),
    ]
}

/// Every answer the core can ask for, compared.
fn check_same(w: &WalStorage, m: &MemStorage) {
    let (wf, mf) = (w.first_index().unwrap(), m.first_index().unwrap());
    let (wl, ml) = (w.last_index().unwrap(), m.last_index().unwrap());
    assert_eq!((wf, wl), (mf, ml), "first/last index");
    assert_eq!(w.initial_state().unwrap(), m.initial_state().unwrap());
    assert_eq!(w.snapshot(0).unwrap(), m.snapshot(0).unwrap());
    for i in mf.saturating_sub(2)..=ml + 2 {
        assert_eq!(w.term(i), m.term(i), "term({i})");
    }
    let sizes = [0u64, 100, 400, u64::MAX];
    for lo in mf.saturating_sub(1)..=ml + 1 {
        for hi in [lo, lo + 1, lo + 3, ml + 1, ml + 2] {
            if hi < lo {
                continue;
            }
            for &max in &sizes {
                if lo > hi || (lo > ml + 1 && hi > ml + 1) {
                    continue;
                }
                assert_eq!(
                    w.entries(lo, hi, max),
                    m.entries(lo, hi, max),
                    "entries({lo}, {hi}, {max})"
                );
            }
        }
    }
}

fn apply(op: &Op, w: &mut WalStorage, m: &mut MemStorage, fs: &MemFs, term: &mut u64) {
    match *op {
        Op::Append { back, n, len } => {
            *term += 1;
            // Raft never overwrites what a snapshot covers (it is committed); a batch may still
            // start below the compacted index, which is ignored.
            let last = m.last_index().unwrap();
            let snap = m.snapshot(0).unwrap().metadata.unwrap().index;
            let mut first = (last + 1 - back.min(last)).max(1);
            let wholly_compacted = first + n <= m.first_index().unwrap();
            if first <= snap && !wholly_compacted {
                first = snap + 1;
            }
            let batch: Vec<Entry> = (first..first + n)
                .map(|i| ent(i, *term, &vec![i as u8; len]))
                .collect();
            let hs = HardState {
                term: *term,
                vote: 1,
                commit: m.hard_state.commit,
            };
            m.append(&batch).unwrap();
            m.set_hard_state(hs);
            w.save(Some(&hs), &batch).unwrap();
        }
        Op::HardState { vote } => {
            let hs = HardState {
                term: *term,
                vote,
                commit: m.hard_state.commit.max(m.first_index().unwrap() - 1),
            };
            m.set_hard_state(hs);
            w.set_hard_state(&hs).unwrap();
        }
        Op::CreateSnapshot { pct } => {
            let (f, l) = (m.first_index().unwrap(), m.last_index().unwrap());
            let i = f - 1 + (l + 1 - f) * pct / 100;
            let cs = ConfState {
                voters: vec![1, 2, i % 5 + 3],
                learners: vec![],
            };
            let data = Bytes::from(format!("state at {i}"));
            let mr = m.create_snapshot(i, cs.clone(), data.clone());
            let wr = w.create_snapshot(i, cs, data);
            match (mr, wr) {
                (Ok(()), Ok(())) => {}
                (Err(me), Err(Error::Storage(we))) => assert_eq!(me, we),
                (mr, wr) => panic!("create_snapshot({i}): mem {mr:?} wal {wr:?}"),
            }
        }
        Op::Compact { pct } => {
            let off = m.first_index().unwrap() - 1;
            let snap = m.snapshot(0).unwrap().metadata.unwrap().index;
            if snap <= off {
                // Nothing a snapshot covers is left to compact; WalStorage refuses what
                // MemStorage would allow (dropping entries no snapshot holds).
                let c = off + 1;
                if c <= m.last_index().unwrap() {
                    assert!(matches!(w.compact(c), Err(Error::Invalid(_))));
                }
                return;
            }
            let c = off + 1 + (snap - off - 1) * pct / 100;
            m.compact(c).unwrap();
            w.compact(c).unwrap();
        }
        Op::ApplySnapshot { ahead } => {
            *term += 1;
            // Index 0 always has term 0 in Raft; a leader never sends a snapshot there.
            let i = (m.last_index().unwrap() + ahead).max(1);
            let snap = Snapshot {
                data: Bytes::from(format!("leader state at {i}")),
                metadata: Some(SnapshotMetadata {
                    conf_state: Some(ConfState {
                        voters: vec![1, 2, 3],
                        learners: vec![4],
                    }),
                    index: i,
                    term: *term,
                }),
            };
            let mr = m.apply_snapshot(snap.clone());
            let wr = w.apply_snapshot(snap);
            match (mr, wr) {
                (Ok(()), Ok(())) => {}
                (Err(me), Err(Error::Storage(we))) => assert_eq!(me, we),
                (mr, wr) => panic!("apply_snapshot({i}): mem {mr:?} wal {wr:?}"),
            }
        }
        Op::Reopen => {
            let old_first = w.first_index().unwrap();
            *w = open(fs);
            // Compaction is durable per segment: a reopened log may start earlier, never later.
            let first = w.first_index().unwrap();
            assert!(
                first <= old_first,
                "reopen moved first index {old_first} -> {first}"
            );
            if first < old_first {
                w.compact(old_first - 1).unwrap();
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn wal_storage_answers_like_mem_storage(ops in proptest::collection::vec(op(), 1..40)) {
        let fs = MemFs::new();
        let mut w = WalStorage::bootstrap(
            Arc::new(fs.clone()),
            &dir(),
            opts(),
            ConfState { voters: vec![1, 2, 3], learners: vec![] },
        ).unwrap();
        let mut m = MemStorage::new_with_conf_state(vec![1, 2, 3], vec![]);
        let mut term = 0;
        check_same(&w, &m);
        for op in &ops {
            apply(op, &mut w, &mut m, &fs, &mut term);
            check_same(&w, &m);
        }
        apply(&Op::Reopen, &mut w, &mut m, &fs, &mut term);
        check_same(&w, &m);
    }
}

#[test]
fn overwriting_what_a_snapshot_covers_is_refused() {
    let fs = MemFs::new();
    let mut w = open(&fs);
    w.save(None, &ents(1, 5, 1)).unwrap();
    w.create_snapshot(3, ConfState::default(), Bytes::new())
        .unwrap();
    assert!(matches!(
        w.save(None, &ents(3, 1, 2)),
        Err(Error::Invalid(_))
    ));
    w.save(None, &ents(4, 1, 2)).unwrap();
    assert_eq!(w.last_index().unwrap(), 4);
}

#[test]
fn fresh_and_bootstrapped_storage_start_like_mem_storage() {
    let fs = MemFs::new();
    let w = open(&fs);
    check_same(&w, &MemStorage::new());
    let fs = MemFs::new();
    let cs = ConfState {
        voters: vec![1, 2, 3],
        learners: vec![9],
    };
    let w = WalStorage::bootstrap(Arc::new(fs.clone()), &dir(), opts(), cs.clone()).unwrap();
    check_same(&w, &MemStorage::new_with_conf_state(vec![1, 2, 3], vec![9]));
    drop(w);
    let err = WalStorage::bootstrap(Arc::new(fs.clone()), &dir(), opts(), cs).unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err}");
}

fn snap_files(fs: &MemFs) -> Vec<String> {
    fs.list_dir(&dir().join("snap")).unwrap()
}

#[test]
fn a_damaged_newest_snapshot_falls_back_to_an_older_one_the_log_covers() {
    let fs = MemFs::new();
    let mut w = WalStorage::bootstrap(
        Arc::new(fs.clone()),
        &dir(),
        opts(),
        ConfState {
            voters: vec![1],
            learners: vec![],
        },
    )
    .unwrap();
    w.save(None, &ents(1, 30, 1)).unwrap();
    w.create_snapshot(
        10,
        ConfState {
            voters: vec![1],
            learners: vec![],
        },
        Bytes::from("s10"),
    )
    .unwrap();
    w.create_snapshot(
        20,
        ConfState {
            voters: vec![1],
            learners: vec![],
        },
        Bytes::from("s20"),
    )
    .unwrap();
    w.compact(8).unwrap();
    drop(w);
    let files = snap_files(&fs);
    assert_eq!(files.len(), 2, "keep_snapshots = 2: {files:?}");
    let newest = dir().join("snap").join(files.last().unwrap());
    let mut bytes = fs.read_file(&newest).unwrap();
    let n = bytes.len();
    bytes[n - 2] ^= 0x40;
    fs.write_file_durable(&newest, &bytes).unwrap();
    let w = open(&fs);
    let s = w.snapshot(0).unwrap();
    assert_eq!(s.metadata.as_ref().unwrap().index, 10);
    assert_eq!(s.data, Bytes::from("s10"));
    assert_eq!(w.last_index().unwrap(), 30);
    assert_eq!(w.entries(9, 31, u64::MAX).unwrap(), ents(9, 22, 1));

    // With both damaged there is nothing safe to start from: refuse, naming them.
    drop(w);
    let older = dir().join("snap").join(&files[0]);
    let mut bytes = fs.read_file(&older).unwrap();
    bytes[60] ^= 1;
    fs.write_file_durable(&older, &bytes).unwrap();
    let err = WalStorage::open(Arc::new(fs.clone()), &dir(), opts()).unwrap_err();
    assert!(
        matches!(err, Error::MissingSnapshot { index: 20, .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(newest.to_str().unwrap()) && msg.contains(older.to_str().unwrap()),
        "{msg}"
    );
}

#[test]
fn a_snapshot_the_wal_never_recorded_is_removed_at_open() {
    let fs = MemFs::new();
    let mut w = open(&fs);
    w.save(None, &ents(1, 5, 1)).unwrap();
    // As if the node crashed after installing a received snapshot's file but before the WAL
    // recorded it.
    w.snap_store()
        .save(&Snapshot {
            data: Bytes::from("x"),
            metadata: Some(SnapshotMetadata {
                conf_state: None,
                index: 50,
                term: 3,
            }),
        })
        .unwrap();
    drop(w);
    let w = open(&fs);
    assert!(snap_files(&fs).is_empty());
    assert_eq!(w.snapshot(0).unwrap().metadata.unwrap().index, 0);
    assert_eq!(w.last_index().unwrap(), 5);
}

#[test]
fn a_streamed_snapshot_is_installed_and_the_log_restarts_after_it() {
    let leader_fs = MemFs::new();
    let mut leader = open(&leader_fs);
    leader.save(None, &ents(1, 40, 2)).unwrap();
    let data = Bytes::from(vec![0x5a; 10_000]);
    leader
        .create_snapshot(
            40,
            ConfState {
                voters: vec![1, 2],
                learners: vec![],
            },
            data.clone(),
        )
        .unwrap();
    let fs = MemFs::new();
    let mut follower = open(&fs);
    follower.save(None, &ents(1, 3, 1)).unwrap();
    let mut reader = leader.snapshot_reader(1000).unwrap();
    let mut writer = follower.snapshot_writer().unwrap();
    let mut chunks = 0;
    while let Some(chunk) = reader.next_chunk().unwrap() {
        assert!(chunk.len() <= 1000);
        writer.write_chunk(&chunk).unwrap();
        chunks += 1;
    }
    assert!(chunks >= 10);
    let file = writer.finish().unwrap();
    let snap = follower.apply_snapshot_file(&file).unwrap();
    assert_eq!(snap.data, data);
    assert_eq!(follower.first_index().unwrap(), 41);
    assert_eq!(follower.last_index().unwrap(), 40);
    assert_eq!(follower.term(40), Ok(2));
    assert_eq!(follower.term(39), Err(StorageError::Compacted(39)));
    assert_eq!(follower.hard_state().commit, 40);
    follower.save(None, &ents(41, 2, 2)).unwrap();
    drop(follower);
    let follower = open(&fs);
    assert_eq!(follower.first_index().unwrap(), 41);
    assert_eq!(follower.entries(41, 43, u64::MAX).unwrap(), ents(41, 2, 2));
    assert_eq!(follower.snapshot(0).unwrap().data, data);
}

#[test]
fn storage_runs_on_the_real_file_system() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("node");
    let fs: Arc<dyn Fs> = Arc::new(keel_wal::StdFs);
    let cs = ConfState {
        voters: vec![1, 2, 3],
        learners: vec![],
    };
    let mut w = WalStorage::bootstrap(fs.clone(), &d, opts(), cs.clone()).unwrap();
    let mut m = MemStorage::new_with_conf_state(vec![1, 2, 3], vec![]);
    for k in 0..10u64 {
        let batch = ents(k * 10 + 1, 10, 1);
        let hs = HardState {
            term: 1,
            vote: 1,
            commit: k * 10,
        };
        w.save(Some(&hs), &batch).unwrap();
        m.append(&batch).unwrap();
        m.set_hard_state(hs);
    }
    w.create_snapshot(60, cs.clone(), Bytes::from("sixty"))
        .unwrap();
    m.create_snapshot(60, cs, Bytes::from("sixty")).unwrap();
    w.compact(50).unwrap();
    m.compact(50).unwrap();
    check_same(&w, &m);
    drop(w);
    let w = WalStorage::open(fs, &d, opts()).unwrap();
    assert!(w.first_index().unwrap() <= 51);
    assert_eq!(
        w.entries(51, 101, u64::MAX).unwrap(),
        m.entries(51, 101, u64::MAX).unwrap()
    );
    assert_eq!(w.snapshot(0).unwrap(), m.snapshot(0).unwrap());
    assert!(Path::new(&d.join("snap")).exists());
}

#[test]
fn snapshot_data_served_from_its_mapped_file_is_the_data_saved() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("node");
    let fs: Arc<dyn Fs> = Arc::new(keel_wal::StdFs);
    let cs = ConfState {
        voters: vec![1],
        learners: vec![],
    };
    let mut w = WalStorage::bootstrap(fs.clone(), &d, opts(), cs.clone()).unwrap();
    w.save(
        Some(&HardState {
            term: 1,
            vote: 1,
            commit: 5,
        }),
        &ents(1, 5, 1),
    )
    .unwrap();
    // Several pages, starting at an offset in the file that is not page aligned.
    let data: Bytes = (0..3 * 4096 + 123).map(|i| (i * 7 % 251) as u8).collect();
    w.create_snapshot(5, cs, data.clone()).unwrap();
    assert_eq!(w.snapshot(0).unwrap().data, data);
    w.unload_snapshot_data();
    assert_eq!(w.snapshot(0).unwrap().data, data);
    drop(w);

    let mut w = WalStorage::open(fs, &d, opts()).unwrap();
    assert_eq!(w.snapshot(0).unwrap().data, data);
    w.unload_snapshot_data();
    let held = w.snapshot(0).unwrap().data;
    assert_eq!(held, data);
    // A file replaced behind the store's back is not served: the data stays what it was.
    let snap_dir = d.join("snap");
    let file = std::fs::read_dir(&snap_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "snap"))
        .unwrap();
    std::fs::remove_file(&file).unwrap();
    std::fs::write(&file, b"not a snapshot").unwrap();
    w.unload_snapshot_data();
    assert_eq!(w.snapshot(0).unwrap().data, data);
    drop(held);
}

/// With `defer_removal`, adopting a snapshot and compacting delete nothing: the old files are
/// handed to the caller. A crash before the caller deletes them loses nothing, and once
/// `remove_files` returns they are gone for good.
#[test]
fn deferred_removal_hands_old_files_to_the_caller_and_a_crash_before_they_go_is_harmless() {
    let fs = MemFs::new();
    let mut o = opts();
    o.wal.defer_removal = true;
    let reopen = |fs: &MemFs| WalStorage::open(Arc::new(fs.clone()), &dir(), o.clone()).unwrap();
    let mut w = reopen(&fs);
    let cs = ConfState {
        voters: vec![1, 2, 3],
        learners: vec![],
    };
    let mut last = 0;
    let mut removed = Vec::new();
    for round in 1..=4u64 {
        // About 8 KiB of entries per round: two 4 KiB segments.
        for _ in 0..4 {
            let batch: Vec<Entry> = (last + 1..last + 11)
                .map(|i| ent(i, 1, &[round as u8; 200]))
                .collect();
            last += 10;
            let hs = HardState {
                term: 1,
                vote: 1,
                commit: last,
            };
            w.save(Some(&hs), &batch).unwrap();
        }
        let snap = w
            .prepare_snapshot(last, cs.clone(), Bytes::from(format!("state at {last}")))
            .unwrap();
        w.snap_store().save(&snap).unwrap();
        assert!(w.adopt_snapshot(snap).unwrap());
        w.compact_keeping(5).unwrap();
        removed.extend(w.take_removed());
    }
    let segments = removed
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "wal"));
    assert!(segments.count() >= 2, "{removed:?}");
    // A file not yet deleted is handed over again by the next round; deleting it twice is
    // harmless (below).
    let snaps: std::collections::BTreeSet<_> = removed
        .iter()
        .filter(|p| p.starts_with(dir().join("snap")))
        .collect();
    assert_eq!(snaps.len(), 2, "4 snapshots, 2 kept: {removed:?}");
    for p in &removed {
        assert!(fs.exists(p).unwrap(), "{} was deleted", p.display());
    }
    let first = w.first_index().unwrap();
    let want = w.entries(first, last + 1, u64::MAX).unwrap();
    drop(w);

    // A crash with the old files still there.
    fs.crash();
    let w = reopen(&fs);
    assert_eq!(w.snapshot(0).unwrap().metadata.unwrap().index, last);
    assert_eq!(w.last_index().unwrap(), last);
    assert_eq!(w.entries(first, last + 1, u64::MAX).unwrap(), want);
    drop(w);

    keel_wal::remove_files(&fs, &removed).unwrap();
    // Deleting them again (a retry after a crash) is fine.
    keel_wal::remove_files(&fs, &removed).unwrap();
    fs.crash();
    for p in &removed {
        assert!(!fs.exists(p).unwrap(), "{} came back", p.display());
    }
    let w = reopen(&fs);
    assert_eq!(w.snapshot(0).unwrap().metadata.unwrap().index, last);
    assert_eq!(w.entries(first, last + 1, u64::MAX).unwrap(), want);
}
