//! Apply and read costs over 100k keys. Prints figures; asserts nothing.
//!
//! Run with `cargo bench -p keel-kv`. Keys are 12 bytes (`key/00000042`), values 100 bytes.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_kv::{Command, CompactRequest, Op, PutRequest, RangeRequest, RequestId, Store};

const KEYS: usize = 100_000;
const READ_ROUNDS: usize = 3;

fn key(i: usize) -> Bytes {
    Bytes::from(format!("key/{i:08}"))
}

fn report(what: &str, elapsed: Duration, ops: usize) {
    println!(
        "{what:<52} {:>9.0} ns/op",
        elapsed.as_nanos() as f64 / ops as f64
    );
}

/// Reads do not change the store, so take the best of a few rounds to shed warm-up and noise.
fn best_of(rounds: usize, mut f: impl FnMut()) -> Duration {
    (0..rounds)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

fn main() {
    let value = Bytes::from(vec![b'v'; 100]);
    let keys: Vec<Bytes> = (0..KEYS).map(key).collect();
    let puts: Vec<Command> = keys
        .iter()
        .map(|k| {
            Command::new(Op::Put(PutRequest {
                key: k.clone(),
                value: value.clone(),
                ..Default::default()
            }))
        })
        .collect();

    let mut store = Store::new();
    let mut index = 0u64;

    let t = Instant::now();
    for c in &puts {
        index += 1;
        black_box(store.apply(index, c));
    }
    report("apply put, new key", t.elapsed(), KEYS);

    let t = Instant::now();
    for c in &puts {
        index += 1;
        black_box(store.apply(index, c));
    }
    report("apply put, existing key", t.elapsed(), KEYS);

    let encoded: Vec<Bytes> = puts.iter().map(Command::encode).collect();
    let t = Instant::now();
    for e in &encoded {
        index += 1;
        let c = Command::decode(e).expect("bench commands decode");
        black_box(store.apply(index, &c));
    }
    report("decode + apply put, existing key", t.elapsed(), KEYS);

    let with_ids: Vec<Command> = puts
        .iter()
        .enumerate()
        .map(|(seq, c)| {
            Command::with_id(
                RequestId {
                    proposer: 7,
                    seq: seq as u64,
                },
                c.op.clone(),
            )
        })
        .collect();
    let t = Instant::now();
    for c in &with_ids {
        index += 1;
        black_box(store.apply(index, c));
    }
    report(
        "apply put with request id (dedup), existing key",
        t.elapsed(),
        KEYS,
    );

    let gets: Vec<RangeRequest> = keys
        .iter()
        .map(|k| RangeRequest {
            key: k.clone(),
            ..Default::default()
        })
        .collect();
    let elapsed = best_of(READ_ROUNDS, || {
        for r in &gets {
            black_box(store.range(r).expect("range"));
        }
    });
    report("range, one key, current revision", elapsed, KEYS);

    let old_revision = store.revision() - 2 * KEYS as i64;
    let old_gets: Vec<RangeRequest> = gets
        .iter()
        .map(|r| RangeRequest {
            revision: old_revision,
            ..r.clone()
        })
        .collect();
    let elapsed = best_of(READ_ROUNDS, || {
        for r in &old_gets {
            black_box(store.range(r).expect("range"));
        }
    });
    report("range, one key, past revision (4 versions)", elapsed, KEYS);

    const SCANS: usize = 10_000;
    let scans: Vec<RangeRequest> = (0..SCANS)
        .map(|i| RangeRequest {
            key: keys[i * (KEYS / SCANS) % (KEYS - 200)].clone(),
            range_end: Bytes::from_static(b"\0"),
            limit: 100,
            ..Default::default()
        })
        .collect();
    // Such a scan counts the whole rest of the key space too (etcd's `count`), so it is priced per
    // key visited.
    let visited: usize = scans
        .iter()
        .map(|r| keys.iter().filter(|k| **k >= r.key).count())
        .sum();
    let elapsed = best_of(1, || {
        for r in &scans {
            black_box(store.range(r).expect("range"));
        }
    });
    report("range to end, limit 100, per key counted", elapsed, visited);

    let bounded: Vec<RangeRequest> = (0..SCANS)
        .map(|i| {
            let start = i * (KEYS / SCANS) % (KEYS - 200);
            RangeRequest {
                key: keys[start].clone(),
                range_end: keys[start + 100].clone(),
                ..Default::default()
            }
        })
        .collect();
    let elapsed = best_of(READ_ROUNDS, || {
        for r in &bounded {
            black_box(store.range(r).expect("range"));
        }
    });
    report("range of 100 keys, per range", elapsed, SCANS);

    let count_all = RangeRequest {
        key: Bytes::from_static(b"\0"),
        range_end: Bytes::from_static(b"\0"),
        count_only: true,
        ..Default::default()
    };
    let elapsed = best_of(READ_ROUNDS, || {
        black_box(store.range(&count_all).expect("range"));
    });
    report("count_only over all keys, per key", elapsed, KEYS);

    let since = store.revision() - KEYS as i64 + 1;
    let elapsed = best_of(READ_ROUNDS, || {
        black_box(store.events_since(since, b"\0", b"\0").expect("events"));
    });
    report(
        "events_since over the last 100k revisions, per event",
        elapsed,
        KEYS,
    );

    // What the Raft thread pays for a snapshot: taking the image. Encoding it happens on the
    // snapshot writer's thread.
    let t = Instant::now();
    let image = black_box(store.image());
    let took = t.elapsed();
    println!(
        "{:<52} {:>9.1} us (whole store)",
        "image (taken on the apply thread)",
        took.as_secs_f64() * 1e6
    );
    let t = Instant::now();
    let snap = image.encode();
    report(
        "snapshot encode (4 versions per key), per key",
        t.elapsed(),
        KEYS,
    );

    let t = Instant::now();
    let restored = Store::restore(&snap).expect("restore");
    report("restore, per key", t.elapsed(), KEYS);
    println!("{:<52} {:>9} bytes", "snapshot size", snap.len());
    assert_eq!(restored.hash(), store.hash());

    // A write after the image copies the tree nodes on its path once; the first writes pay it.
    let t = Instant::now();
    for c in puts.iter().step_by(100) {
        index += 1;
        black_box(store.apply(index, c));
    }
    report(
        "apply put, existing key, first after an image",
        t.elapsed(),
        KEYS / 100,
    );
    drop(image);

    let t = Instant::now();
    index += 1;
    let compact = Command::new(Op::Compact(CompactRequest {
        revision: store.revision(),
    }));
    black_box(store.apply(index, &compact));
    report("compact away 3 of 4 versions, per key", t.elapsed(), KEYS);
}
