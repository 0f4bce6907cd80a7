//! Disk full and I/O errors while writing: the error reaches the caller, nothing unsynced is
//! acknowledged, the WAL refuses further writes, and a reopen returns exactly what was synced.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::{ents, Rng};
use keel_proto::raftpb::{Entry, HardState};
use keel_wal::{Error, FaultError, MemFs, Wal, WalOptions};

fn dir() -> PathBuf {
    PathBuf::from("/d/wal")
}

fn opts() -> WalOptions {
    let mut o = WalOptions::new(3, 9);
    o.segment_size = 8 << 10;
    o
}

fn open(fs: &MemFs) -> Wal {
    Wal::open(Arc::new(fs.clone()), &dir(), opts()).unwrap().0
}

fn all(w: &Wal) -> Vec<Entry> {
    w.entries(w.first_index(), w.last_index() + 1, u64::MAX)
        .unwrap()
}

#[test]
fn a_failed_sync_is_reported_poisons_the_wal_and_loses_only_unacknowledged_writes() {
    for err in [FaultError::Io, FaultError::NoSpace] {
        let fs = MemFs::new();
        let mut w = open(&fs);
        w.save(None, &ents(1, 5, 1)).unwrap();
        fs.fail_sync_after(0, err);
        let e = w.save(None, &ents(6, 5, 1)).unwrap_err();
        assert!(matches!(e, Error::Io { op: "sync", .. }), "{e}");
        // After a failed fsync nothing more may be written or read as if all were well.
        assert!(matches!(
            w.save(None, &ents(6, 1, 1)),
            Err(Error::Poisoned(_))
        ));
        assert!(matches!(w.sync(), Err(Error::Poisoned(_))));
        assert!(matches!(w.entries(1, 2, u64::MAX), Err(Error::Poisoned(_))));
        assert!(w.is_poisoned());
        fs.crash();
        drop(w);
        let w = open(&fs);
        assert_eq!(all(&w), ents(1, 5, 1));
    }
}

#[test]
fn a_failed_write_is_reported_and_recovery_cuts_the_partial_record() {
    for err in [FaultError::Io, FaultError::NoSpace] {
        let fs = MemFs::new();
        let mut w = open(&fs);
        w.save(
            Some(&HardState {
                term: 1,
                vote: 3,
                commit: 2,
            }),
            &ents(1, 3, 1),
        )
        .unwrap();
        // The write stops 40 bytes in, as a real short write on a full disk does.
        fs.fail_write_after(40, err);
        let e = w.save(None, &ents(4, 10, 1)).unwrap_err();
        assert!(matches!(e, Error::Io { op: "write", .. }), "{e}");
        assert!(matches!(
            w.save(None, &ents(4, 1, 1)),
            Err(Error::Poisoned(_))
        ));
        drop(w);
        // Without a crash the partial record is still in the page cache: recovery must see it
        // as a torn tail, not as data.
        let (w, report) = Wal::open(Arc::new(fs.clone()), &dir(), opts()).unwrap();
        assert!(report.torn_tail.is_some());
        assert_eq!(all(&w), ents(1, 3, 1));
        assert_eq!(w.hard_state().vote, 3);
    }
}

#[test]
fn disk_full_when_a_new_segment_is_preallocated() {
    let fs = MemFs::new();
    let mut w = open(&fs);
    let mut synced = Vec::new();
    let mut i = 1;
    // Fill the first segment; then the disk is full for the next one.
    while w.segment_count() == 1 {
        let b = ents(i, 4, 1);
        fs.fail_write_after(u64::MAX, FaultError::NoSpace);
        w.save(None, &b).unwrap();
        synced.extend(b);
        i += 4;
    }
    drop(w);
    let mut w = open(&fs);
    let mut n = 0;
    let err = loop {
        fs.fail_write_after(2000, FaultError::NoSpace);
        let b = ents(i, 4, 1);
        match w.save(None, &b) {
            Ok(()) => {
                synced.extend(b);
                i += 4;
                n += 1;
            }
            Err(e) => break e,
        }
        assert!(n < 1000, "never failed");
    };
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(err.to_string().contains("no space"), "{err}");
    fs.clear_faults();
    fs.crash();
    drop(w);
    let w = open(&fs);
    assert_eq!(all(&w), synced);
}

#[test]
fn random_faults_never_lose_an_acknowledged_entry() {
    for seed in 0..20 {
        let mut rng = Rng::new(seed);
        let fs = MemFs::new();
        let mut w = open(&fs);
        let mut acked: Vec<Entry> = Vec::new();
        let mut acked_hs = HardState::default();
        for _ in 0..60 {
            match rng.below(10) {
                0 => fs.fail_write_after(rng.below(3000), FaultError::NoSpace),
                1 => fs.fail_sync_after(rng.below(4), FaultError::Io),
                _ => {}
            }
            let start = acked.last().map_or(1, |e| e.index + 1);
            let b: Vec<Entry> = (start..start + rng.range(1, 6))
                .map(|i| {
                    let len = rng.below(200) as usize;
                    common::ent(i, 1, &rng.bytes(len))
                })
                .collect();
            let hs = HardState {
                term: 1,
                vote: 1,
                commit: start - 1,
            };
            match w.save(Some(&hs), &b) {
                Ok(()) => {
                    acked.extend(b);
                    acked_hs = hs;
                }
                Err(_) => {
                    fs.clear_faults();
                    if rng.chance(50) {
                        fs.crash();
                    }
                    drop(w);
                    w = open(&fs);
                    let got = all(&w);
                    // Everything acknowledged is there; a failed batch may or may not be.
                    assert!(
                        got.len() >= acked.len(),
                        "seed {seed}: lost acknowledged entries"
                    );
                    assert_eq!(&got[..acked.len()], &acked[..], "seed {seed}");
                    assert!(
                        w.hard_state() == &acked_hs || w.hard_state() == &hs,
                        "seed {seed}: hard state {:?} is neither the acknowledged nor the failed one",
                        w.hard_state()
                    );
                    acked = got;
                    acked_hs = *w.hard_state();
                }
            }
        }
        fs.clear_faults();
        fs.crash();
        drop(w);
        let w = open(&fs);
        let got = all(&w);
        assert!(
            got == acked,
            "seed {seed}: got {} entries (last {:?}), acked {} (last {:?})",
            got.len(),
            got.last().map(|e| e.index),
            acked.len(),
            acked.last().map(|e| e.index)
        );
        assert_eq!(w.hard_state(), &acked_hs, "seed {seed}");
    }
}
