//! The WAL's write and read paths, rollover, overwrite, purge, cache, reset; over MemFs and the
//! real file system.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{ent, ents, image, restore};
use keel_proto::raftpb::{Entry, HardState};
use keel_wal::record::{self, SegmentHeader};
use keel_wal::{Error, Fs, MemFs, StdFs, Wal, WalOptions};

fn opts() -> WalOptions {
    let mut o = WalOptions::new(1, 0xc1);
    o.segment_size = 8 << 10;
    o.cache_bytes = 1 << 10;
    o
}

fn dir() -> PathBuf {
    PathBuf::from("/data/wal")
}

fn open(fs: &MemFs) -> Wal {
    Wal::open(Arc::new(fs.clone()), &dir(), opts()).unwrap().0
}

fn all(w: &Wal) -> Vec<Entry> {
    w.entries(w.first_index(), w.last_index() + 1, u64::MAX)
        .unwrap()
}

fn hs(term: u64, vote: u64, commit: u64) -> HardState {
    HardState { term, vote, commit }
}

#[test]
fn save_and_reopen_round_trip() {
    let fs = MemFs::new();
    let mut w = open(&fs);
    assert_eq!((w.first_index(), w.last_index()), (1, 0));
    w.save(Some(&hs(1, 1, 0)), &ents(1, 5, 1)).unwrap();
    w.save(Some(&hs(1, 1, 3)), &ents(6, 3, 1)).unwrap();
    w.save(None, &ents(9, 1, 1)).unwrap();
    let want = ents(1, 9, 1);
    assert_eq!(all(&w), want);
    drop(w);
    let w = open(&fs);
    assert_eq!(all(&w), want);
    assert_eq!(w.hard_state(), &hs(1, 1, 3));
    assert_eq!(w.term(9).unwrap(), Some(1));
    assert_eq!(w.term(10).unwrap(), None);
}

#[test]
fn overwrite_truncates_the_suffix_and_replays_the_same() {
    let fs = MemFs::new();
    let mut w = open(&fs);
    w.save(None, &ents(1, 10, 1)).unwrap();
    w.save(None, &ents(6, 3, 2)).unwrap();
    let mut want = ents(1, 5, 1);
    want.extend(ents(6, 3, 2));
    assert_eq!(w.last_index(), 8);
    assert_eq!(all(&w), want);
    // Overwrite again, inside the part just written and inside the older part.
    w.save(None, &ents(3, 2, 3)).unwrap();
    want.truncate(2);
    want.extend(ents(3, 2, 3));
    assert_eq!(all(&w), want);
    drop(w);
    let w = open(&fs);
    assert_eq!(
        all(&w),
        want,
        "recovery replays overwrites: later records win"
    );
}

#[test]
fn bad_batches_are_refused_without_poisoning() {
    let fs = MemFs::new();
    let mut w = open(&fs);
    w.save(None, &ents(1, 3, 1)).unwrap();
    assert!(matches!(
        w.save(None, &ents(5, 1, 1)),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        w.save(None, &[ent(4, 1, b"a"), ent(6, 1, b"b")]),
        Err(Error::Invalid(_))
    ));
    let huge = ent(4, 1, &vec![7u8; 9 << 10]);
    assert!(matches!(
        w.save(None, &[huge]),
        Err(Error::EntryTooLarge { index: 4, .. })
    ));
    w.save(None, &ents(4, 1, 1)).unwrap();
    assert_eq!(w.last_index(), 4);
}

#[test]
fn segments_roll_over_and_are_named_by_sequence_and_first_index() {
    let fs = MemFs::new();
    let mut w = open(&fs);
    let mut want = Vec::new();
    for i in 0..60u64 {
        let batch: Vec<Entry> = (0..4)
            .map(|k| ent(i * 4 + k + 1, 1, &[k as u8; 100]))
            .collect();
        want.extend(batch.clone());
        w.save(Some(&hs(1, 0, i * 4)), &batch).unwrap();
    }
    assert!(w.segment_count() > 3, "{} segments", w.segment_count());
    let names = fs.list_dir(&dir()).unwrap();
    assert_eq!(names.len(), w.segment_count());
    assert_eq!(names[0], "0000000000000001-0000000000000001.wal");
    for (i, n) in names.iter().enumerate() {
        assert!(n.starts_with(&format!("{:016x}-", i + 1)), "{n}");
        // Every segment is preallocated to the segment size.
        assert_eq!(fs.read_file(&dir().join(n)).unwrap().len(), 8 << 10);
    }
    // The second segment's name holds the index of the first entry written into it.
    let second = &names[1];
    let first_in_second: u64 = u64::from_str_radix(&second[17..33], 16).unwrap();
    assert!(first_in_second > 1 && first_in_second <= 240);
    assert_eq!(all(&w), want);
    drop(w);
    let w = open(&fs);
    assert_eq!(all(&w), want);
    assert_eq!(w.hard_state(), &hs(1, 0, 236));
}

#[test]
fn reads_outside_the_cache_come_from_disk_and_are_verified() {
    let fs = MemFs::new();
    let mut w = open(&fs);
    let batch: Vec<Entry> = (1..=40).map(|i| ent(i, 1, &[i as u8; 60])).collect();
    w.save(None, &batch).unwrap();
    assert_eq!(all(&w), batch, "mixed disk and cache read");
    // The cache holds about 1 KiB: the last entries. Damage the first record on disk behind
    // the WAL's back: the newest entries are still served from memory, older ones fail loudly.
    let seg = dir().join(&fs.list_dir(&dir()).unwrap()[0]);
    let mut bytes = fs.read_file(&seg).unwrap();
    let pos = bytes.windows(60).position(|w| w == [5u8; 60]).unwrap();
    bytes[pos] ^= 1;
    fs.write_file_durable(&seg, &bytes).unwrap();
    assert_eq!(
        w.entries(40, 41, u64::MAX).unwrap(),
        vec![batch[39].clone()]
    );
    let err = w.entries(5, 6, u64::MAX).unwrap_err();
    assert!(
        matches!(&err, Error::Corrupt { path, .. } if path == &seg),
        "{err}"
    );
    // The cache is bounded: no more than its byte limit of entries is kept, so entry 20 (well
    // over 1 KiB from the end) comes from disk and sees the damage too.
    assert!(w.entries(2, 21, u64::MAX).is_err());
}

#[test]
fn entries_respect_max_size_like_memstorage() {
    let fs = MemFs::new();
    let mut w = open(&fs);
    let batch: Vec<Entry> = (1..=30).map(|i| ent(i, 1, &[1u8; 50])).collect();
    w.save(None, &batch).unwrap();
    let one = prost::Message::encoded_len(&batch[0]) as u64;
    for max in [0, one - 1, one, 2 * one, 7 * one + 3, 100 * one] {
        for lo in [1u64, 10, 25] {
            let got = w.entries(lo, 31, max).unwrap();
            let mut want = batch[(lo - 1) as usize..].to_vec();
            keel_raft::storage::limit_size(&mut want, max);
            assert_eq!(got, want, "lo {lo} max {max}");
        }
    }
}

#[test]
fn purge_removes_whole_segments_below_an_index() {
    let fs = MemFs::new();
    let mut w = open(&fs);
    for i in 0..50u64 {
        w.save(None, &[ent(i + 1, 1, &[0u8; 600])]).unwrap();
    }
    let before = w.segment_count();
    assert!(before >= 3);
    assert!(
        matches!(w.purge(30), Err(Error::Invalid(_))),
        "no purge past the snapshot"
    );
    w.mark_snapshot(40, 1).unwrap();
    let removed = w.purge(30).unwrap();
    assert!(removed >= 1);
    assert_eq!(w.segment_count(), before - removed);
    let first = w.first_index();
    assert!(first > 1 && first <= 30, "first index {first}");
    assert_eq!(w.term(30).unwrap(), Some(1));
    drop(w);
    let w = open(&fs);
    assert_eq!(w.first_index(), first, "reopen sees the same start");
    assert_eq!(w.last_index(), 50);
    assert_eq!(w.snapshot_marker(), (40, 1));
    assert_eq!(all(&w).len() as u64, 51 - first);
}

#[test]
fn purge_after_everything_is_snapshotted_keeps_the_last_segment() {
    let fs = MemFs::new();
    let mut w = open(&fs);
    for i in 0..40u64 {
        w.save(Some(&hs(2, 1, i)), &[ent(i + 1, 2, &[0u8; 300])])
            .unwrap();
    }
    w.mark_snapshot(40, 2).unwrap();
    w.purge(41).unwrap();
    assert_eq!(w.segment_count(), 1);
    let (f, l) = (w.first_index(), w.last_index());
    drop(w);
    let w = open(&fs);
    assert_eq!((w.first_index(), w.last_index()), (f, l));
    assert_eq!(
        w.hard_state(),
        &hs(2, 1, 39),
        "the head of each segment restates it"
    );
    assert_eq!(w.snapshot_marker(), (40, 2));
}

#[test]
fn reset_discards_the_log_and_survives_an_interrupted_reset() {
    let fs = MemFs::new();
    let mut w = open(&fs);
    for i in 0..30u64 {
        w.save(None, &[ent(i + 1, 1, &[0u8; 300])]).unwrap();
    }
    let before = image(&fs, Path::new("/data"));
    w.reset(100, 4, &hs(4, 0, 100)).unwrap();
    assert_eq!((w.first_index(), w.last_index()), (101, 100));
    assert_eq!(w.segment_count(), 1);
    w.save(None, &ents(101, 2, 4)).unwrap();
    drop(w);
    let after = image(&fs, Path::new("/data"));
    let w = open(&fs);
    assert_eq!(all(&w), ents(101, 2, 4));
    assert_eq!(w.snapshot_marker(), (100, 4));
    assert_eq!(w.hard_state(), &hs(4, 0, 100));
    drop(w);

    // A crash after the new segment was durable but before the old ones were removed.
    let mut files = before;
    files.extend(after);
    let fs = restore(&files);
    let w = open(&fs);
    assert_eq!(all(&w), ents(101, 2, 4));
    assert_eq!(
        w.segment_count(),
        1,
        "superseded segments are removed at open"
    );
}

#[test]
fn write_then_one_sync_is_a_group_commit() {
    let fs = MemFs::new();
    let mut w = open(&fs);
    w.save(None, &ents(1, 2, 1)).unwrap();
    w.write(None, &ents(3, 2, 1)).unwrap();
    w.write(Some(&hs(1, 2, 4)), &ents(5, 2, 1)).unwrap();
    let seg = dir().join(&fs.list_dir(&dir()).unwrap()[0]);
    assert!(fs.has_unsynced(&seg).unwrap());
    fs.crash();
    let w = open(&fs);
    assert_eq!(
        all(&w),
        ents(1, 2, 1),
        "nothing written after the last sync survives"
    );

    let mut w = w;
    w.write(None, &ents(3, 2, 1)).unwrap();
    w.write(Some(&hs(1, 2, 4)), &ents(5, 2, 1)).unwrap();
    w.sync().unwrap();
    let seg = dir().join(&fs.list_dir(&dir()).unwrap()[0]);
    assert!(!fs.has_unsynced(&seg).unwrap());
    fs.crash();
    let w = open(&fs);
    assert_eq!(all(&w), ents(1, 6, 1));
    assert_eq!(w.hard_state(), &hs(1, 2, 4));
}

#[test]
fn leftover_temp_segments_are_removed() {
    let fs = MemFs::new();
    let mut w = open(&fs);
    w.save(None, &ents(1, 2, 1)).unwrap();
    drop(w);
    let tmp = dir().join("0000000000000002-0000000000000003.wal.tmp");
    fs.create(&tmp).unwrap().write_at(b"junk", 0).unwrap();
    let w = open(&fs);
    assert!(!fs.exists(&tmp).unwrap());
    assert_eq!(all(&w), ents(1, 2, 1));
}

fn first_segment(fs: &MemFs) -> PathBuf {
    dir().join(&fs.list_dir(&dir()).unwrap()[0])
}

#[test]
fn a_data_dir_of_another_node_or_cluster_is_refused() {
    let fs = MemFs::new();
    let mut w = open(&fs);
    w.save(None, &ents(1, 2, 1)).unwrap();
    drop(w);
    let seg = first_segment(&fs);
    let mut o = opts();
    o.node_id = 2;
    let err = Wal::open(Arc::new(fs.clone()), &dir(), o).unwrap_err();
    assert!(
        matches!(&err, Error::NodeIdMismatch { path, expected: 2, found: 1 } if path == &seg),
        "{err}"
    );
    assert!(err.to_string().contains("node id 1"), "{err}");
    assert!(err.to_string().contains(seg.to_str().unwrap()), "{err}");
    let mut o = opts();
    o.cluster_id = 0xc2;
    let err = Wal::open(Arc::new(fs.clone()), &dir(), o).unwrap_err();
    assert!(
        matches!(&err, Error::ClusterIdMismatch { path, expected: 0xc2, found: 0xc1 } if path == &seg),
        "{err}"
    );
}

#[test]
fn a_newer_format_version_is_refused_with_the_file_named() {
    let fs = MemFs::new();
    let mut w = open(&fs);
    w.save(None, &ents(1, 2, 1)).unwrap();
    drop(w);
    let seg = first_segment(&fs);
    let mut bytes = fs.read_file(&seg).unwrap();
    // Rewrite the header as a future version would (a valid record with version 2).
    let mut head = Vec::new();
    record::encode_segment_header(
        &mut head,
        &SegmentHeader {
            version: record::FORMAT_VERSION + 1,
            prev_crc: 0,
            flags: 0,
            head_len: 0,
            node_id: 1,
            cluster_id: 0xc1,
            seq: 1,
            first_index: 1,
        },
    );
    bytes[..head.len()].copy_from_slice(&head);
    fs.write_file_durable(&seg, &bytes).unwrap();
    let err = Wal::open(Arc::new(fs.clone()), &dir(), opts()).unwrap_err();
    assert!(
        matches!(&err, Error::UnsupportedVersion { path, found: 2, supported: 1 } if path == &seg),
        "{err}"
    );
    assert!(err.to_string().contains("version 2"), "{err}");
}

#[test]
fn a_missing_middle_segment_is_refused() {
    let fs = MemFs::new();
    let mut w = open(&fs);
    for i in 0..40u64 {
        w.save(None, &[ent(i + 1, 1, &[0u8; 700])]).unwrap();
    }
    drop(w);
    let names = fs.list_dir(&dir()).unwrap();
    assert!(names.len() >= 3);
    fs.remove(&dir().join(&names[1])).unwrap();
    let err = Wal::open(Arc::new(fs.clone()), &dir(), opts()).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn std_fs_round_trip_rollover_purge_and_torn_tail() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("wal");
    let fs: Arc<dyn Fs> = Arc::new(StdFs);
    let mut w = Wal::open(fs.clone(), &d, opts()).unwrap().0;
    let mut want = Vec::new();
    for i in 0..60u64 {
        let e = ent(i + 1, 1, &[i as u8; 200]);
        want.push(e.clone());
        w.save(Some(&hs(1, 1, i)), &[e]).unwrap();
    }
    assert!(w.segment_count() >= 2);
    w.mark_snapshot(30, 1).unwrap();
    w.purge(20).unwrap();
    let first = w.first_index();
    drop(w);
    let (w, report) = Wal::open(fs.clone(), &d, opts()).unwrap();
    assert!(report.torn_tail.is_none());
    assert_eq!(w.first_index(), first);
    assert_eq!(all(&w), want[(first - 1) as usize..].to_vec());
    let tail_before = w.last_index();
    drop(w);

    // Simulate a torn append on the real disk: half a record after the last one.
    let mut names: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let last = d.join(names.last().unwrap());
    let bytes = std::fs::read(&last).unwrap();
    let end = bytes.len() - bytes.iter().rev().position(|&b| b != 0).unwrap();
    let mut rec = Vec::new();
    record::encode_entries(&mut rec, 0, &[ent(61, 1, &[9u8; 100])], &mut Vec::new());
    let mut torn = bytes.clone();
    torn[end..end + rec.len() / 2].copy_from_slice(&rec[..rec.len() / 2]);
    std::fs::write(&last, &torn).unwrap();
    let (mut w, report) = Wal::open(fs.clone(), &d, opts()).unwrap();
    let (path, offset, _) = report.torn_tail.expect("torn tail reported");
    assert_eq!((path, offset), (last.clone(), end as u64));
    assert_eq!(w.last_index(), tail_before);
    // The torn bytes were zeroed, and the log goes on from there.
    w.save(None, &ents(61, 1, 1)).unwrap();
    drop(w);
    let (w, report) = Wal::open(fs, &d, opts()).unwrap();
    assert!(report.torn_tail.is_none());
    assert_eq!(w.last_index(), 61);
}

#[test]
fn zero_fill_ahead_prepares_segments_in_the_background() {
    for real in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let (fs, d): (Arc<dyn Fs>, PathBuf) = if real {
            (Arc::new(StdFs), tmp.path().join("wal"))
        } else {
            (Arc::new(MemFs::new()), dir())
        };
        let mut o = opts();
        o.zero_fill_ahead = true;
        let mut w = Wal::open(fs.clone(), &d, o.clone()).unwrap().0;
        let mut want = Vec::new();
        for i in 0..80u64 {
            let e = ent(i + 1, 1, &[i as u8; 500]);
            want.push(e.clone());
            w.save(None, &[e]).unwrap();
        }
        assert!(w.segment_count() >= 4);
        drop(w);
        // The segment being prepared when the log was closed is a temp file: never read, and
        // removed at open.
        let names = fs.list_dir(&d).unwrap();
        assert!(
            names.iter().any(|n| n.ends_with("-next.wal.tmp")),
            "{names:?}"
        );
        let w = Wal::open(fs.clone(), &d, o).unwrap().0;
        assert_eq!(all(&w), want);
        for n in fs.list_dir(&d).unwrap() {
            if n.ends_with(".wal") {
                let f = fs.open(&d.join(&n)).unwrap();
                assert_eq!(f.len().unwrap(), 8 << 10, "{n} is full size");
            }
        }
    }
}
