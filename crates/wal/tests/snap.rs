//! Snapshot files: atomic install, verification of every byte, fallback, retention, chunked
//! streaming.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::Rng;
use keel_proto::raftpb::{ConfState, Snapshot, SnapshotMetadata};
use keel_wal::snap::{SnapFile, SnapStore, MAX_CHUNK_SIZE};
use keel_wal::{Error, Fs, MemFs};

fn dir() -> PathBuf {
    PathBuf::from("/n/snap")
}

fn store(fs: &MemFs) -> SnapStore {
    SnapStore::open(Arc::new(fs.clone()), &dir(), 42).unwrap()
}

fn snap(index: u64, term: u64, len: usize) -> Snapshot {
    let mut rng = Rng::new(index);
    Snapshot {
        data: rng.bytes(len),
        metadata: Some(SnapshotMetadata {
            conf_state: Some(ConfState {
                voters: vec![1, 2, 3],
                learners: vec![index],
            }),
            index,
            term,
        }),
    }
}

fn newest_ok(s: &SnapStore) -> Option<Snapshot> {
    s.load_newest(u64::MAX, |_| Ok(())).unwrap().0
}

#[test]
fn save_load_round_trip_and_retention() {
    let fs = MemFs::new();
    let s = store(&fs);
    for i in 1..=5 {
        s.save(&snap(i * 10, i, 1000 * i as usize)).unwrap();
    }
    assert_eq!(newest_ok(&s), Some(snap(50, 5, 5000)));
    assert_eq!(s.retain(3).unwrap(), 2);
    let names: Vec<u64> = s.list().unwrap().iter().map(|f| f.index).collect();
    assert_eq!(names, vec![50, 40, 30]);
    // Durable: a crash right after save keeps it (file synced, rename's directory synced).
    fs.crash();
    let s = store(&fs);
    assert_eq!(newest_ok(&s), Some(snap(50, 5, 5000)));
    assert_eq!(s.retain(3).unwrap(), 0);
}

#[test]
fn an_unsynced_install_is_never_visible_half_written() {
    let fs = MemFs::new();
    let s = store(&fs);
    s.save(&snap(10, 1, 100)).unwrap();
    let mut w = s.writer().unwrap();
    let bytes = file_bytes(&snap_file(20, 1, &snap(20, 1, 5000)));
    w.write_chunk(&bytes[..3000]).unwrap();
    fs.crash();
    let s = store(&fs);
    assert!(fs
        .list_dir(&dir())
        .unwrap()
        .iter()
        .all(|n| !n.ends_with(".tmp")));
    assert_eq!(newest_ok(&s).unwrap().metadata.unwrap().index, 10);
}

/// Saves `sn` into a scratch store and returns its file, to get at the exact bytes.
fn snap_file(index: u64, term: u64, sn: &Snapshot) -> (MemFs, SnapFile) {
    let fs = MemFs::new();
    let scratch = SnapStore::open(Arc::new(fs.clone()), &dir(), 42).unwrap();
    scratch.save(sn).unwrap();
    let f = scratch
        .list()
        .unwrap()
        .into_iter()
        .find(|f| (f.index, f.term) == (index, term))
        .unwrap();
    (fs, f)
}

fn file_bytes((fs, f): &(MemFs, SnapFile)) -> Vec<u8> {
    fs.read_file(&f.path).unwrap()
}

#[test]
fn every_truncation_and_bit_flip_is_refused_and_falls_back() {
    let fs = MemFs::new();
    let s = store(&fs);
    s.save(&snap(10, 1, 300)).unwrap();
    s.save(&snap(20, 2, 300)).unwrap();
    let newest = s.list().unwrap()[0].clone();
    let good = fs.read_file(&newest.path).unwrap();
    let older = snap(10, 1, 300);
    for cut in 0..good.len() {
        fs.write_file_durable(&newest.path, &good[..cut]).unwrap();
        let err = s.load(&newest).unwrap_err();
        assert!(
            matches!(&err, Error::BadSnapshot { path, .. } if path == &newest.path),
            "cut {cut}: {err}"
        );
        let (found, skipped) = s.load_newest(u64::MAX, |_| Ok(())).unwrap();
        assert_eq!(found.as_ref(), Some(&older), "cut {cut}");
        assert_eq!(
            skipped[0].0, newest.path,
            "the warning names the damaged file"
        );
    }
    for byte in 0..good.len() {
        for bit in [0, 3, 7] {
            let mut bad = good.clone();
            bad[byte] ^= 1 << bit;
            fs.write_file_durable(&newest.path, &bad).unwrap();
            assert!(s.load(&newest).is_err(), "flip of bit {bit} at {byte}");
            assert_eq!(newest_ok(&s).as_ref(), Some(&older));
        }
    }
    // Extra bytes at the end are damage too.
    let mut long = good.clone();
    long.push(0);
    fs.write_file_durable(&newest.path, &long).unwrap();
    assert!(s.load(&newest).is_err());
}

#[test]
fn streaming_in_chunks_verifies_and_installs_atomically() {
    let src_fs = MemFs::new();
    let src = store(&src_fs);
    let sn = snap(77, 4, 50_000);
    src.save(&sn).unwrap();
    let file = src.list().unwrap()[0].clone();
    let dst_fs = MemFs::new();
    let dst = store(&dst_fs);

    for chunk in [1usize, 7, 4096, MAX_CHUNK_SIZE, usize::MAX] {
        let mut r = src.reader(&file, chunk).unwrap();
        assert_eq!(r.len(), src_fs.read_file(&file.path).unwrap().len() as u64);
        let mut w = dst.writer().unwrap();
        let mut total = 0;
        while let Some(c) = r.next_chunk().unwrap() {
            assert!(c.len() <= chunk.clamp(1, MAX_CHUNK_SIZE));
            total += c.len();
            w.write_chunk(&c).unwrap();
        }
        assert_eq!(total as u64, r.len());
        let installed = w.finish().unwrap();
        assert_eq!((installed.index, installed.term), (77, 4));
        assert_eq!(dst.load(&installed).unwrap(), sn);
    }
    assert_eq!(dst.list().unwrap().len(), 1);
}

fn stream(src_bytes: &[u8], dst: &SnapStore) -> Result<SnapFile, Error> {
    let mut w = dst.writer()?;
    for c in src_bytes.chunks(1000) {
        w.write_chunk(c)?;
    }
    w.finish()
}

#[test]
fn a_bad_stream_is_refused_and_leaves_nothing_behind() {
    let (sfs, sfile) = snap_file(5, 1, &snap(5, 1, 5000));
    let good = sfs.read_file(&sfile.path).unwrap();
    let fs = MemFs::new();
    let dst = store(&fs);
    let mut rng = Rng::new(9);
    let cases: Vec<(String, Vec<u8>)> = vec![
        ("truncated".into(), good[..good.len() - 1].to_vec()),
        ("header only".into(), good[..56].to_vec()),
        ("half a header".into(), good[..20].to_vec()),
        ("one byte too many".into(), [good.clone(), vec![1]].concat()),
        ("flipped body bit".into(), {
            let mut b = good.clone();
            let at = rng.range(56, good.len() as u64 - 1) as usize;
            b[at] ^= 4;
            b
        }),
        ("flipped header bit".into(), {
            let mut b = good.clone();
            b[30] ^= 1;
            b
        }),
    ];
    for (what, bytes) in cases {
        let err = stream(&bytes, &dst).unwrap_err();
        assert!(matches!(err, Error::BadSnapshot { .. }), "{what}: {err}");
        assert!(
            fs.list_dir(&dir()).unwrap().is_empty(),
            "{what}: temp file left"
        );
    }
    assert!(stream(&good, &dst).is_ok());

    // Another cluster's snapshot, or a newer format, is refused with the reason.
    let other = SnapStore::open(Arc::new(MemFs::new()), &dir(), 43).unwrap();
    let err = stream(&good, &other).unwrap_err();
    assert!(err.to_string().contains("cluster"), "{err}");
}

#[test]
fn a_newer_snapshot_format_is_refused() {
    let fs = MemFs::new();
    let s = store(&fs);
    s.save(&snap(3, 1, 10)).unwrap();
    let f = s.list().unwrap()[0].clone();
    let mut b = fs.read_file(&f.path).unwrap();
    b[8..12].copy_from_slice(&2u32.to_le_bytes());
    let crc = crc32c::crc32c(&b[..52]);
    b[52..56].copy_from_slice(&crc.to_le_bytes());
    fs.write_file_durable(&f.path, &b).unwrap();
    let err = s.load(&f).unwrap_err();
    assert!(err.to_string().contains("version 2"), "{err}");
}

#[test]
fn the_reader_fails_rather_than_send_a_damaged_file_whole() {
    let fs = MemFs::new();
    let s = store(&fs);
    s.save(&snap(3, 1, 10_000)).unwrap();
    let f = s.list().unwrap()[0].clone();
    let mut b = fs.read_file(&f.path).unwrap();
    b[5000] ^= 1;
    fs.write_file_durable(&f.path, &b).unwrap();
    let mut r = s.reader(&f, 4096).unwrap();
    let mut result = Ok(());
    loop {
        match r.next_chunk() {
            Ok(Some(_)) => continue,
            Ok(None) => break,
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    assert!(matches!(result, Err(Error::BadSnapshot { .. })));
}

#[test]
fn snapshot_files_work_on_the_real_file_system() {
    let tmp = tempfile::tempdir().unwrap();
    let fs: Arc<dyn Fs> = Arc::new(keel_wal::StdFs);
    let s = SnapStore::open(fs, &tmp.path().join("snap"), 42).unwrap();
    s.save(&snap(1, 1, 100)).unwrap();
    s.save(&snap(2, 1, 100_000)).unwrap();
    assert_eq!(newest_ok(&s), Some(snap(2, 1, 100_000)));
    let f = s.list().unwrap()[0].clone();
    std::fs::write(&f.path, b"KEELSNAP garbage").unwrap();
    assert_eq!(newest_ok(&s), Some(snap(1, 1, 100)));
    assert_eq!(s.retain(1).unwrap(), 1);
    assert_eq!(
        s.list()
            .unwrap()
            .iter()
            .map(|f| f.index)
            .collect::<Vec<_>>(),
        vec![2]
    );
}

/// A snapshot file is synced as it is written, every `SYNC_EVERY` bytes, and not before.
#[test]
fn a_snapshot_file_is_synced_every_sync_every_bytes_as_it_is_written() {
    use keel_wal::snap::SYNC_EVERY;
    use keel_wal::FaultError;
    let fs = MemFs::new();
    let s = store(&fs);
    let sn = snap(20, 1, 3 * SYNC_EVERY);
    let bytes = file_bytes(&snap_file(20, 1, &sn));
    let mut w = s.writer().unwrap();
    // Every sync from here fails, so a chunk that syncs is one that errs.
    fs.fail_sync_after(0, FaultError::Io);
    let below = SYNC_EVERY - 1;
    w.write_chunk(&bytes[..below]).unwrap();
    let e = w.write_chunk(&bytes[below..below + 1]).unwrap_err();
    assert!(matches!(e, Error::Io { op: "sync", .. }), "{e}");
    drop(w);

    // With syncs working, the whole file goes in through `save`, and a crash keeps it.
    fs.clear_faults();
    let s = store(&fs);
    s.save(&sn).unwrap();
    fs.crash();
    assert_eq!(newest_ok(&store(&fs)), Some(sn));
}
