//! WAL benchmarks: figures, not assertions. Everything runs on one disk in one run, so the WAL
//! figures can be read against the raw ones measured next to them.
//!
//!   cargo bench -p keel-wal --bench wal_bench
//!
//! Environment:
//!   WAL_BENCH_DIR           where to write (default: a temp dir under the current dir; pick
//!                           a real disk, not tmpfs)
//!   WAL_BENCH_MS            milliseconds per timed loop (default 1000)
//!   WAL_BENCH_ROUNDS        rounds; figures are interleaved and the median reported (default 5)
//!   WAL_BENCH_RECOVERY_MB   size of the WAL built for the recovery figure (default 1024)

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_proto::raftpb::{Entry, EntryType, HardState};
use keel_wal::{Fs, StdFs, Wal, WalOptions};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Raw fdatasync rate of a loop appending 4 KiB to a file, the floor the WAL is held to.
fn raw_append_sync(dir: &Path, write_size: usize, secs: Duration) -> (f64, f64) {
    let path = dir.join(format!("raw-{write_size}"));
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .unwrap();
    let buf = vec![0x5au8; write_size];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < secs {
        f.write_all(&buf).unwrap();
        f.sync_data().unwrap();
        n += 1;
    }
    let el = start.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path).unwrap();
    (n as f64 / el, n as f64 * write_size as f64 / el / 1e6)
}

/// Like `raw_append_sync`, but overwriting a file reserved in advance (`zeroed`: written with
/// zeros and synced; otherwise fallocate'd): the best any log can do at this sync granularity,
/// since no file size or extent changes need flushing.
fn raw_prealloc_sync(dir: &Path, write_size: usize, secs: Duration, zeroed: bool) -> f64 {
    let path = dir.join(format!("raw-prealloc-{write_size}-{zeroed}"));
    let span: u64 = 256 << 20;
    let fs: Arc<dyn Fs> = Arc::new(StdFs);
    let mut f = fs.create(&path).unwrap();
    if zeroed {
        let zeros = vec![0u8; 1 << 20];
        for i in 0..(span >> 20) {
            f.write_at(&zeros, i << 20).unwrap();
        }
    } else {
        f.preallocate(span).unwrap();
    }
    f.sync_data().unwrap();
    let buf = vec![0x5au8; write_size];
    let start = Instant::now();
    let mut off = 0u64;
    while start.elapsed() < secs && off + write_size as u64 <= span {
        f.write_at(&buf, off).unwrap();
        f.sync_data().unwrap();
        off += write_size as u64;
    }
    let el = start.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path).unwrap();
    off as f64 / el / 1e6
}

fn entries(first: u64, n: usize, size: usize) -> Vec<Entry> {
    let data = Bytes::from(vec![0xa7u8; size]);
    (0..n as u64)
        .map(|i| Entry {
            term: 1,
            index: first + i,
            entry_type: EntryType::EntryNormal as i32,
            data: data.clone(),
        })
        .collect()
}

struct AppendFigures {
    entries_per_s: f64,
    mb_per_s: f64,
    syncs_per_s: f64,
}

/// WAL appends of `size`-byte entries, `batch` per save (one fdatasync each), with a hard
/// state in every batch as a Ready carries one.
fn wal_append(
    dir: &Path,
    batch: usize,
    size: usize,
    secs: Duration,
    zero_fill_ahead: bool,
) -> AppendFigures {
    let wdir = dir.join(format!("wal-b{batch}"));
    let fs: Arc<dyn Fs> = Arc::new(StdFs);
    let mut opts = WalOptions::new(1, 1);
    opts.zero_fill_ahead = zero_fill_ahead;
    let (mut w, _) = Wal::open(fs, &wdir, opts).unwrap();
    // Pre-build the batches so the loop measures the WAL, not entry construction.
    let template = entries(1, batch, size);
    let mut next = 1u64;
    let start = Instant::now();
    let mut syncs = 0u64;
    let mut batch_ents = template.clone();
    while start.elapsed() < secs {
        for (k, e) in batch_ents.iter_mut().enumerate() {
            e.index = next + k as u64;
        }
        let hs = HardState {
            term: 1,
            vote: 1,
            commit: next - 1,
        };
        w.save(Some(&hs), &batch_ents).unwrap();
        next += batch as u64;
        syncs += 1;
    }
    let el = start.elapsed().as_secs_f64();
    drop(w);
    std::fs::remove_dir_all(&wdir).unwrap();
    let ents = (next - 1) as f64;
    AppendFigures {
        entries_per_s: ents / el,
        mb_per_s: ents * size as f64 / el / 1e6,
        syncs_per_s: syncs as f64 / el,
    }
}

#[cfg(target_os = "linux")]
fn drop_file_cache(dir: &Path) {
    use std::os::fd::AsRawFd;
    for e in std::fs::read_dir(dir).unwrap() {
        let f = std::fs::File::open(e.unwrap().path()).unwrap();
        // SAFETY: advisory call on a valid descriptor; the pages are clean (synced) so the
        // kernel may drop them, making the next read come from the disk.
        unsafe {
            libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn drop_file_cache(_dir: &Path) {}

/// Builds a WAL of about `mb` MiB and times opening (recovering) it, warm and cold cache.
fn recovery(dir: &Path, mb: u64) -> (u64, f64, f64, f64, f64) {
    let wdir = dir.join("wal-recovery");
    let fs: Arc<dyn Fs> = Arc::new(StdFs);
    let (mut w, _) = Wal::open(fs.clone(), &wdir, WalOptions::new(1, 1)).unwrap();
    let per_batch = 256usize;
    let size = 4096usize;
    let mut batch = entries(1, per_batch, size);
    let mut next = 1u64;
    let target = mb << 20;
    let mut written = 0u64;
    while written < target {
        for (k, e) in batch.iter_mut().enumerate() {
            e.index = next + k as u64;
        }
        w.write(None, &batch).unwrap();
        next += per_batch as u64;
        written += (per_batch * (size + 12)) as u64;
        if next % (per_batch as u64 * 64) == 1 {
            w.sync().unwrap();
        }
    }
    w.sync().unwrap();
    let last = w.last_index();
    drop(w);

    let start = Instant::now();
    let (w, report) = Wal::open(fs.clone(), &wdir, WalOptions::new(1, 1)).unwrap();
    let warm = start.elapsed().as_secs_f64();
    assert_eq!(w.last_index(), last);
    drop(w);

    drop_file_cache(&wdir);
    let start = Instant::now();
    let (w, _) = Wal::open(fs, &wdir, WalOptions::new(1, 1)).unwrap();
    let cold = start.elapsed().as_secs_f64();
    assert_eq!(w.last_index(), last);
    drop(w);
    std::fs::remove_dir_all(&wdir).unwrap();
    let scanned = report.bytes_scanned as f64 / 1e6;
    (last, scanned, warm, scanned / warm, scanned / cold)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

/// Median, min and max of a figure over the rounds.
fn spread(v: &[f64]) -> String {
    let mut w = v.to_vec();
    let m = median(&mut w);
    format!("{m:>9.1} (min {:.1}, max {:.1})", w[0], w[w.len() - 1])
}

fn main() {
    let secs = Duration::from_millis(env_u64("WAL_BENCH_MS", 1000));
    let rounds = env_u64("WAL_BENCH_ROUNDS", 5) as usize;
    let recovery_mb = env_u64("WAL_BENCH_RECOVERY_MB", 1024);
    let tmp = match std::env::var("WAL_BENCH_DIR") {
        Ok(d) => tempfile::tempdir_in(d).unwrap(),
        Err(_) => tempfile::tempdir_in(".").unwrap(),
    };
    let dir = tmp.path();
    println!(
        "keel-wal benchmarks in {}: {rounds} rounds of {} ms per figure, interleaved; median (min, max)",
        dir.display(),
        secs.as_millis()
    );
    // Bytes one batch of 256 puts on disk: entries (256 B data + ~12 B framing each), record
    // headers and a hard state record.
    let b256_bytes = 256 * (256 + 12) + 60;
    let mut raw4k = Vec::new();
    // Index: batch size (1, 16, 256) then mode (fallocated segments, zero-filled ahead).
    let mut b = vec![Vec::new(); 6];
    let mut bmb = vec![Vec::new(); 6];
    let mut bsync = vec![Vec::new(); 6];
    let (mut same_append, mut same_falloc, mut same_zero, mut seq_1m) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        raw4k.push(raw_append_sync(dir, 4096, secs).0);
        for (i, batch) in [1usize, 16, 256].into_iter().enumerate() {
            for zero_fill in [false, true] {
                let f = wal_append(dir, batch, 256, secs, zero_fill);
                let k = 2 * i + zero_fill as usize;
                b[k].push(f.entries_per_s);
                bmb[k].push(f.mb_per_s);
                bsync[k].push(f.syncs_per_s);
            }
        }
        same_append.push(raw_append_sync(dir, b256_bytes, secs).1);
        same_falloc.push(raw_prealloc_sync(dir, b256_bytes, secs, false));
        same_zero.push(raw_prealloc_sync(dir, b256_bytes, secs, true));
        seq_1m.push(raw_append_sync(dir, 1 << 20, secs).1);
    }
    println!(
        "raw 4 KiB append + fdatasync             syncs/s {}",
        spread(&raw4k)
    );
    for (i, batch) in [1usize, 16, 256].into_iter().enumerate() {
        for zero_fill in [false, true] {
            let k = 2 * i + zero_fill as usize;
            let mode = if zero_fill {
                "zero_fill_ahead"
            } else {
                "fallocate (default)"
            };
            println!("WAL batch {batch:>3} x 256 B, {mode}:");
            println!("    entries/s         {}", spread(&b[k]));
            println!("    MB/s (entry data) {}", spread(&bmb[k]));
            println!("    syncs/s           {}", spread(&bsync[k]));
        }
    }
    println!(
        "raw {b256_bytes} B append + fdatasync (batch 256's bytes per sync)  MB/s {}",
        spread(&same_append)
    );
    println!(
        "raw {b256_bytes} B overwrite + fdatasync, fallocated file          MB/s {}",
        spread(&same_falloc)
    );
    println!(
        "raw {b256_bytes} B overwrite + fdatasync, zero-filled file         MB/s {}",
        spread(&same_zero)
    );
    println!(
        "raw 1 MiB append + fdatasync (synced sequential bandwidth) MB/s {}",
        spread(&seq_1m)
    );

    let (last, scanned, warm_s, warm_mbps, cold_mbps) = recovery(dir, recovery_mb);
    println!(
        "recovery of {scanned:.0} MB ({last} entries): {warm_s:.3} s warm cache = {warm_mbps:.0} MB/s; cold cache (pages dropped with fadvise) {cold_mbps:.0} MB/s"
    );

    // Ratios per round (figures of one round were taken minutes apart at most), then median.
    let ratio = |a: &[f64], b: &[f64], k: f64| -> f64 {
        let mut r: Vec<f64> = a.iter().zip(b).map(|(x, y)| 100.0 * k * x / y).collect();
        median(&mut r)
    };
    let on_disk = (256.0 * (256.0 + 12.0) + 60.0) / (256.0 * 256.0);
    println!();
    for (k, mode) in [(0, "fallocate"), (1, "zero_fill_ahead")] {
        println!(
            "[{mode}] batch 1 syncs/s / raw 4 KiB fdatasync rate:                {:>6.1}% (target >= 90%)",
            ratio(&bsync[k], &raw4k, 1.0)
        );
        println!(
            "[{mode}] batch 256 bytes/s / raw 1 MiB synced sequential bandwidth: {:>6.1}% (target >= 80%)",
            ratio(&bmb[4 + k], &seq_1m, on_disk)
        );
    }
    println!(
        "recovery, warm cache:                                       {warm_mbps:>6.0} MB/s (target >= 500)"
    );
}
