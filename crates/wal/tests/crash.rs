//! Crash and damage tests over seeded random workloads. Recovery must return exactly a state
//! the log was in (everything synced is there and nothing is altered; a cut of the last
//! records gives the state before them), or refuse with an error naming the file and an offset
//! at or before the damage. Never altered data.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{image, restore, Rng};
use keel_proto::raftpb::{Entry, HardState};
use keel_wal::record;
use keel_wal::scan::{self, nonzero_end};
use keel_wal::{Error, Fs, MemFs, Wal, WalOptions};

const DATA: &str = "/data";

fn wal_dir() -> PathBuf {
    Path::new(DATA).join("wal")
}

fn opts() -> WalOptions {
    let mut o = WalOptions::new(7, 0xfeed);
    o.segment_size = 8 << 10;
    o.cache_bytes = 2 << 10;
    o
}

fn open(fs: &MemFs) -> Result<Wal, Error> {
    Wal::open(Arc::new(fs.clone()), &wal_dir(), opts()).map(|(w, _)| w)
}

/// What a reader of the log sees.
#[derive(Debug, Clone, PartialEq, Eq)]
struct State {
    first: u64,
    entries: Vec<Entry>,
    hs: HardState,
    marker: (u64, u64),
}

fn state_of(w: &Wal) -> State {
    State {
        first: w.first_index(),
        entries: w
            .entries(w.first_index(), w.last_index() + 1, u64::MAX)
            .unwrap(),
        hs: *w.hard_state(),
        marker: w.snapshot_marker(),
    }
}

/// One step of history: the state after it, the batch it wrote (if a save), and where the log
/// ended on disk (last segment's name, end of its records).
#[derive(Debug, Clone)]
struct Step {
    state: State,
    batch: Vec<Entry>,
    at: (String, usize),
}

fn position(fs: &MemFs) -> (String, usize) {
    let last = fs.list_dir(&wal_dir()).unwrap().pop().unwrap();
    let bytes = fs.read_file(&wal_dir().join(&last)).unwrap();
    // Every record ends with a non-zero byte and the space after the log is zeros, so the last
    // non-zero byte ends the last record.
    (last, nonzero_end(&bytes))
}

/// A random batch continuing (or overwriting a suffix of) the log, with maybe a hard state.
fn random_batch(rng: &mut Rng, w: &Wal, term: &mut u64) -> (Option<HardState>, Vec<Entry>) {
    let (first, last) = (w.first_index(), w.last_index());
    let start = if last >= first && rng.chance(20) {
        // Overwrite a suffix, as a follower does when a new leader's log differs.
        *term += 1;
        rng.range(first.max(last.saturating_sub(4)).max(1), last)
    } else {
        last + 1
    };
    let n = rng.range(1, 8);
    let batch: Vec<Entry> = (start..start + n)
        .map(|i| {
            let len = rng.below(300) as usize;
            common::ent(i, *term, &rng.bytes(len))
        })
        .collect();
    let hs = rng.chance(70).then(|| HardState {
        term: *term,
        vote: rng.below(3),
        commit: start.saturating_sub(1),
    });
    (hs, batch)
}

/// A random synced operation on `w`; returns the batch if it was a save.
fn random_op(rng: &mut Rng, w: &mut Wal, term: &mut u64) -> Option<Vec<Entry>> {
    let (first, last) = (w.first_index(), w.last_index());
    let roll = rng.below(100);
    if roll < 6 && last >= first && last > w.snapshot_marker().0 {
        let i = rng.range(w.snapshot_marker().0.max(first), last);
        let t = w.term(i).unwrap().unwrap();
        w.mark_snapshot(i, t).unwrap();
        if rng.chance(70) {
            let below = rng.range(first, i + 1);
            w.purge(below).unwrap();
        }
        return None;
    }
    if roll < 8 {
        *term += 1;
        let i = last + rng.range(0, 5);
        let hs = HardState {
            term: *term,
            vote: 0,
            commit: i,
        };
        w.reset(i, *term, &hs).unwrap();
        return None;
    }
    let (hs, batch) = random_batch(rng, w, term);
    w.save(hs.as_ref(), &batch).unwrap();
    Some(batch)
}

fn run_workload(seed: u64, ops: usize) -> (MemFs, Vec<Step>) {
    let fs = MemFs::new();
    let mut rng = Rng::new(seed);
    let mut w = open(&fs).unwrap();
    let mut term = 1;
    let mut history = vec![Step {
        state: state_of(&w),
        batch: Vec::new(),
        at: position(&fs),
    }];
    for _ in 0..ops {
        let batch = random_op(&mut rng, &mut w, &mut term).unwrap_or_default();
        history.push(Step {
            state: state_of(&w),
            batch,
            at: position(&fs),
        });
    }
    (fs, history)
}

/// Whether `got` is a state the log may recover to when the step after `prev` was cut short:
/// `prev` itself, `next`, or `prev` overwritten by a prefix of `next`'s batch (its records are
/// durable one by one) without `next`'s hard state.
fn acceptable(got: &State, prev: &State, next: &State, batch: &[Entry]) -> bool {
    if got == prev || got == next {
        return true;
    }
    if got.hs != prev.hs || got.marker != prev.marker || batch.is_empty() {
        return false;
    }
    let f = batch[0].index;
    let keep = prev
        .entries
        .iter()
        .take_while(|e| e.index < f)
        .cloned()
        .collect::<Vec<_>>();
    (1..=batch.len()).any(|m| {
        let mut want = keep.clone();
        want.extend_from_slice(&batch[..m]);
        got.entries == want
    })
}

/// Record boundaries (start, end) in a segment image, after its head.
fn records_after_head(img: &[u8]) -> Vec<(usize, usize)> {
    let seed = record::header_seed(img).unwrap();
    let head = record::decode(img, 0, seed).unwrap();
    let h = record::decode_segment_header(head.body).unwrap();
    let mut out = Vec::new();
    let (_, _, tail) = scan::scan(img, 0, seed, |off, _, rec| {
        if off >= h.head_len as usize {
            out.push((off, rec.end));
        }
        Ok(())
    });
    assert_eq!(tail, scan::Tail::Clean);
    out
}

#[test]
fn cutting_the_last_segment_at_every_offset_recovers_a_prefix() {
    for seed in 0..4 {
        let (fs, history) = run_workload(seed, 120);
        let files = image(&fs, Path::new(DATA));
        let (last_name, _) = history.last().unwrap().at.clone();
        let last_path = wal_dir().join(&last_name);
        let idx = files.iter().position(|(p, _)| p == &last_path).unwrap();
        let img = files[idx].1.clone();
        let recs = records_after_head(&img);
        let Some(&(from, _)) = recs.iter().rev().nth(5).or(recs.first()) else {
            continue;
        };
        let tail = nonzero_end(&img);
        for cut in from..=tail {
            for zero_fill in [false, true] {
                let mut damaged = img[..cut].to_vec();
                if zero_fill {
                    damaged.resize(img.len(), 0);
                }
                let mut files = files.clone();
                files[idx].1 = damaged;
                let fs = restore(&files);
                let w = open(&fs).unwrap_or_else(|e| {
                    panic!("seed {seed} cut {cut} zero_fill {zero_fill}: a cut is a torn tail, got {e}")
                });
                let got = state_of(&w);
                // The step that was cut: the first whose end in this segment is past the cut.
                let j = history
                    .iter()
                    .position(|s| s.at.0 == last_name && s.at.1 > cut)
                    .unwrap_or(history.len() - 1);
                let j = j.max(1);
                let ok = acceptable(
                    &got,
                    &history[j - 1].state,
                    &history[j].state,
                    &history[j].batch,
                ) || (history[j].at.1 <= cut && got == history[j].state);
                assert!(
                    ok,
                    "seed {seed} cut {cut} zero_fill {zero_fill}: recovered {:?}\nprev {:?}\nnext {:?}",
                    brief(&got),
                    brief(&history[j - 1].state),
                    brief(&history[j].state)
                );
            }
        }
    }
}

fn brief(s: &State) -> String {
    format!(
        "first {} last {:?} hs {:?} marker {:?}",
        s.first,
        s.entries.last().map(|e| (e.index, e.term)),
        s.hs,
        s.marker
    )
}

#[test]
fn a_crash_drops_exactly_the_unsynced_writes_and_the_log_goes_on() {
    for seed in 0..12 {
        let fs = MemFs::new();
        let mut rng = Rng::new(1000 + seed);
        let mut w = open(&fs).unwrap();
        let mut term = 1;
        for round in 0..25 {
            for _ in 0..rng.range(1, 15) {
                random_op(&mut rng, &mut w, &mut term);
            }
            let synced = state_of(&w);
            // One write that is never synced, then the power goes.
            let (hs, batch) = random_batch(&mut rng, &w, &mut term);
            let segments = w.segment_count();
            w.write(hs.as_ref(), &batch).unwrap();
            // A rollover syncs the segment it leaves, so records of this write that went there
            // are durable early (harmless: durable before acknowledged is the rule).
            let rolled = w.segment_count() != segments;
            let unsynced = state_of(&w);
            let torn = rng.chance(50);
            if torn {
                let mut r = rng.clone();
                fs.crash_with(&mut |n| r.range(0, n));
                rng.next_u64();
            } else {
                fs.crash();
            }
            drop(w);
            w = open(&fs).unwrap_or_else(|e| panic!("seed {seed} round {round}: {e}"));
            let got = state_of(&w);
            if torn || rolled {
                assert!(
                    acceptable(&got, &synced, &unsynced, &batch),
                    "seed {seed} round {round}: recovered {}\nsynced {}\nunsynced {}",
                    brief(&got),
                    brief(&synced),
                    brief(&unsynced)
                );
            } else {
                assert!(
                    got == synced,
                    "seed {seed} round {round}: recovered {}\nsynced {}",
                    brief(&got),
                    brief(&synced)
                );
            }
        }
    }
}

#[test]
fn a_flipped_bit_inside_the_records_is_refused_naming_file_and_offset() {
    for seed in 0..3 {
        let (fs, history) = run_workload(100 + seed, 100);
        let files = image(&fs, Path::new(DATA));
        let full = history.last().unwrap().state.clone();
        let mut rng = Rng::new(seed);
        let segs: Vec<usize> = (0..files.len())
            .filter(|&i| files[i].0.extension().is_some_and(|e| e == "wal"))
            .collect();
        for _ in 0..300 {
            let i = segs[rng.below(segs.len() as u64) as usize];
            let used = nonzero_end(&files[i].1);
            let pos = rng.below(used as u64) as usize;
            let bit = rng.below(8);
            let mut files = files.clone();
            files[i].1[pos] ^= 1 << bit;
            let fs2 = restore(&files);
            match open(&fs2) {
                Ok(w) => panic!(
                    "seed {seed}: flip of bit {bit} at {} offset {pos} went unnoticed: {}",
                    files[i].0.display(),
                    brief(&state_of(&w))
                ),
                Err(Error::Corrupt { path, offset, .. }) => {
                    assert_eq!(path, files[i].0, "seed {seed} flip at {pos}");
                    assert!(
                        offset as usize <= pos,
                        "error offset {offset} after flip at {pos}"
                    );
                }
                Err(e) => panic!("seed {seed} flip at {pos}: unexpected error {e}"),
            }
        }
        // Damage in the zero-filled space past the end of the log: refused, or the whole log.
        let last = *segs.last().unwrap();
        for _ in 0..50 {
            let used = nonzero_end(&files[last].1);
            let pos = rng.range(used as u64, files[last].1.len() as u64 - 1) as usize;
            let mut files = files.clone();
            files[last].1[pos] ^= 1 << rng.below(8);
            match open(&restore(&files)) {
                Ok(w) => assert_eq!(state_of(&w), full, "seed {seed} flip at {pos}"),
                Err(Error::Corrupt { path, .. }) => assert_eq!(path, files[last].0),
                Err(e) => panic!("unexpected error {e}"),
            }
        }
    }
}

#[test]
fn a_torn_tail_is_zeroed_so_a_later_torn_write_is_still_recognised() {
    // Tear a write, recover, write a shorter record over the torn bytes, tear again.
    let fs = MemFs::new();
    let mut w = open(&fs).unwrap();
    w.save(None, &common::ents(1, 3, 1)).unwrap();
    let big: Vec<Entry> = (4..8).map(|i| common::ent(i, 1, &[0xAB; 200])).collect();
    w.write(None, &big).unwrap();
    let mut answers = vec![1u64, 500].into_iter();
    fs.crash_with(&mut |n| answers.next().unwrap().min(n));
    drop(w);
    let mut w = open(&fs).unwrap();
    assert_eq!(w.last_index(), 3);
    w.write(None, &common::ents(4, 1, 2)).unwrap();
    let mut answers = vec![1u64, 10].into_iter();
    fs.crash_with(&mut |n| answers.next().unwrap().min(n));
    drop(w);
    let w = open(&fs).unwrap();
    assert_eq!(state_of(&w).entries, common::ents(1, 3, 1));
}
