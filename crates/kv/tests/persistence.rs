//! Everything that turns into bytes and back: commands, snapshots; and the consistency hashes.

mod common;

use bytes::Bytes;
use common::*;
use keel_kv::{
    Command, CompactRequest, Compare, CompareResult, CompareTarget, DecodeError,
    DeleteRangeRequest, Error, LeaseCheckpoint, LeaseCheckpointRequest, LeaseGrantRequest,
    LeaseRevokeRequest, Op, PutRequest, RangeRequest, RequestId, RequestOp, SortOrder, SortTarget,
    Store, TxnRequest, COMMAND_FORMAT_VERSION, SNAPSHOT_FORMAT_VERSION,
};
use proptest::prelude::*;

/// A store that has been through every kind of op: history, tombstones, a compaction, leases,
/// checkpoints and dedup entries holding both successes and errors.
fn rich() -> Kv {
    let mut kv = Kv::new();
    let lease = kv.grant(0, 30).unwrap();
    kv.grant(77, 5).unwrap();
    for i in 0..20 {
        kv.put(&format!("k{:02}", i % 7), &format!("v{i}"));
    }
    kv.put_with(PutRequest {
        lease,
        ..put_req("leased", "x")
    })
    .unwrap();
    kv.delete("k03", "");
    kv.compact(12).unwrap();
    kv.delete("k05", "k07");
    let txn = TxnRequest {
        compare: vec![cmp(
            "k00",
            CompareResult::Greater,
            CompareTarget::Version(0),
        )],
        success: vec![put_op("t1", "a"), put_op("t0", "b"), range_op("k", "l")],
        failure: vec![],
    };
    kv.apply_cmd(&Command::with_id(
        RequestId {
            proposer: 3,
            seq: 1,
        },
        Op::Txn(txn),
    ));
    kv.apply_cmd(&Command::with_id(
        RequestId {
            proposer: 3,
            seq: 2,
        },
        Op::Put(PutRequest {
            lease: 999,
            ..put_req("z", "z")
        }),
    ));
    kv.apply(Op::LeaseCheckpoint(LeaseCheckpointRequest {
        checkpoints: vec![LeaseCheckpoint {
            id: lease,
            remaining_ttl: 11,
        }],
    }));
    for seq in 0..keel_kv::DEDUP_WINDOW as u64 + 10 {
        kv.apply_cmd(&Command::with_id(RequestId { proposer: 4, seq }, Op::Noop));
    }
    kv.put("k01", "last");
    kv
}

#[test]
fn snapshot_restore_round_trips_everything() {
    let mut kv = rich();
    let snap = kv.store.snapshot();
    let mut restored = Store::restore(&snap).unwrap();
    assert_eq!(restored, kv.store);
    assert_eq!(restored.hash(), kv.store.hash());
    assert_eq!(restored.snapshot(), snap);
    for rev in kv.store.compact_revision()..=kv.store.revision() {
        assert_eq!(restored.hash_kv(rev), kv.store.hash_kv(rev), "at {rev}");
    }

    // Both go on identically, dedup table included.
    let more = [
        Command::with_id(
            RequestId {
                proposer: 3,
                seq: 2,
            },
            Op::Put(put_req("z", "z")),
        ),
        Command::new(Op::Put(put_req("k02", "after"))),
        Command::new(Op::LeaseRevoke(LeaseRevokeRequest { id: 1 })),
        Command::new(Op::Compact(CompactRequest {
            revision: kv.store.revision(),
        })),
    ];
    for cmd in &more {
        kv.index += 1;
        let a = kv.store.apply(kv.index, cmd);
        let b = restored.apply(kv.index, cmd);
        assert_eq!(a, b);
    }
    // The first of them was a retransmission the restored table recognised.
    assert_eq!(restored.get(b"z"), None);
    assert_eq!(restored, kv.store);
}

#[test]
fn an_image_encodes_the_state_it_was_taken_at_whatever_is_applied_after() {
    let mut kv = rich();
    let before = kv.store.clone();
    let expected = kv.store.snapshot();
    let image = kv.store.image();
    assert_eq!(image.applied_index(), before.applied_index());
    assert_eq!(image.revision(), before.revision());

    // Overwrites, new keys, deletes, a revoke and a compaction: every kind of change to the
    // shared key tree, the lease table and the dedup table.
    for i in 0..500 {
        kv.put(&format!("k{:02}", i % 40), &format!("after{i}"));
    }
    kv.delete("k1", "k2");
    kv.revoke(1);
    kv.apply_cmd(&Command::with_id(
        RequestId {
            proposer: 9,
            seq: 1,
        },
        Op::Noop,
    ));
    kv.compact(kv.store.revision() - 5).unwrap();
    assert_ne!(kv.store.snapshot(), expected);

    // Encoded elsewhere, as the node does, while the store is still being written here.
    let encoder = std::thread::spawn(move || image.encode());
    kv.put("k00", "during");
    let encoded = encoder.join().unwrap();
    assert_eq!(encoded, expected);
    assert_eq!(Store::restore(&encoded).unwrap(), before);
}

#[test]
fn snapshot_keeps_event_order_within_a_revision() {
    let mut kv = Kv::new();
    kv.txn(TxnRequest {
        success: vec![put_op("c", "1"), put_op("a", "1"), put_op("b", "1")],
        ..Default::default()
    })
    .unwrap();
    let restored = Store::restore(&kv.store.snapshot()).unwrap();
    let order = |s: &Store| {
        s.events_since(2, b"\0", b"\0")
            .unwrap()
            .into_iter()
            .map(|e| e.kv.key)
            .collect::<Vec<_>>()
    };
    assert_eq!(order(&restored), [b("c"), b("a"), b("b")]);
    assert_eq!(order(&restored), order(&kv.store));
}

#[test]
fn empty_store_round_trips() {
    let store = Store::new();
    assert_eq!(Store::restore(&store.snapshot()).unwrap(), store);
}

#[test]
fn truncated_snapshots_are_refused() {
    let snap = rich().store.snapshot();
    for len in 0..snap.len() {
        assert!(
            Store::restore(&snap[..len]).is_err(),
            "accepted a snapshot cut at {len} of {}",
            snap.len()
        );
    }
}

#[test]
fn every_single_bit_flip_is_refused() {
    let snap = rich().store.snapshot().to_vec();
    for i in 0..snap.len() {
        let mut bad = snap.clone();
        bad[i] ^= 1 << (i % 8);
        assert!(Store::restore(&bad).is_err(), "accepted a flip at byte {i}");
    }
}

#[test]
fn bad_magic_version_and_checksum_are_named() {
    let snap = Store::new().snapshot().to_vec();
    let mut bad = snap.clone();
    bad[0] = b'X';
    assert_eq!(Store::restore(&bad), Err(DecodeError::BadMagic));
    let mut bad = snap.clone();
    bad[8..12].copy_from_slice(&(SNAPSHOT_FORMAT_VERSION + 1).to_le_bytes());
    assert_eq!(
        Store::restore(&bad),
        Err(DecodeError::UnsupportedVersion(SNAPSHOT_FORMAT_VERSION + 1))
    );
    let mut bad = snap.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    assert!(matches!(
        Store::restore(&bad),
        Err(DecodeError::ChecksumMismatch { .. })
    ));
    let mut long = snap.clone();
    long.push(0);
    assert!(Store::restore(&long).is_err());
}

/// Rewrites one body byte of an empty store's snapshot and fixes the checksum, so that only the
/// content checks stand between the bytes and a store.
fn reseal(mut body_edit: impl FnMut(&mut Vec<u8>)) -> Result<Store, DecodeError> {
    let snap = Store::new().snapshot().to_vec();
    let mut covered = snap[..snap.len() - 4].to_vec();
    body_edit(&mut covered);
    let crc = crc32c::crc32c(&covered);
    covered.extend_from_slice(&crc.to_le_bytes());
    Store::restore(&covered)
}

#[test]
fn well_sealed_but_inconsistent_content_is_refused() {
    // Body of an empty store: applied index 0, revision 1 (zigzag 2), compact 0, next lease id 1
    // (zigzag 2), then empty key, lease and dedup tables.
    assert_eq!(&Store::new().snapshot()[12..19], [0, 2, 0, 2, 0, 0, 0]);
    assert!(reseal(|_| {}).is_ok());
    assert!(
        matches!(reseal(|b| b[13] = 0), Err(DecodeError::Inconsistent(_))),
        "revision 0"
    );
    assert!(
        matches!(reseal(|b| b[14] = 4), Err(DecodeError::Inconsistent(_))),
        "compaction above the revision"
    );
    assert!(
        matches!(reseal(|b| b[15] = 0), Err(DecodeError::Inconsistent(_))),
        "lease counter 0"
    );
    assert!(
        matches!(reseal(|b| b[16] = 1), Err(DecodeError::Inconsistent(_))),
        "one key, empty"
    );
}

#[test]
fn hash_follows_the_state() {
    let a = rich();
    let b = rich();
    assert_eq!(a.store.hash(), b.store.hash());
    let mut c = rich();
    let before = c.store.hash();
    c.apply(Op::Noop);
    assert_eq!(
        c.store.hash(),
        before,
        "a no-op changes nothing the hash covers"
    );
    c.put("k01", "other");
    assert_ne!(c.store.hash(), before);
    let mut d = rich();
    d.put("k01", "last");
    assert_ne!(d.store.hash(), c.store.hash(), "same keys, different value");
    let mut e = rich();
    e.apply(Op::LeaseCheckpoint(LeaseCheckpointRequest {
        checkpoints: vec![LeaseCheckpoint {
            id: 77,
            remaining_ttl: 1,
        }],
    }));
    assert_ne!(e.store.hash(), before, "leases are covered");
    let mut g = Kv::new();
    g.put("x", "1");
    g.delete("x", "");
    assert_eq!(g.store.len(), 0);
    assert_ne!(
        g.store.hash(),
        Store::new().hash(),
        "the revision is covered"
    );
    let mut f = rich();
    f.compact(f.store.revision()).unwrap();
    assert_ne!(f.store.hash(), before, "the compaction point is covered");
}

#[test]
fn hash_kv_covers_history_up_to_its_revision() {
    let mut kv = rich();
    let rev = kv.store.revision();
    let at = kv.store.hash_kv(rev).unwrap();
    assert_eq!((at.hash_revision, at.compact_revision), (rev, 12));
    let before = kv.store.hash_kv(rev - 1).unwrap();
    assert_ne!(before.hash, at.hash);
    kv.put("new", "x");
    assert_eq!(
        kv.store.hash_kv(rev).unwrap(),
        at,
        "later writes do not change a past hash"
    );
    assert_ne!(kv.store.hash_kv(0).unwrap().hash, at.hash);
    assert_eq!(
        kv.store.hash_kv(kv.store.revision() + 1),
        Err(Error::FutureRevision)
    );
    assert_eq!(kv.store.hash_kv(11), Err(Error::Compacted));
}

fn every_kind_of_command() -> Vec<Command> {
    let compares = vec![
        cmp("a", CompareResult::Equal, CompareTarget::Version(-1)),
        cmp("a", CompareResult::Greater, CompareTarget::Create(i64::MAX)),
        cmp("a", CompareResult::Less, CompareTarget::Mod(i64::MIN)),
        cmp(
            "a",
            CompareResult::NotEqual,
            CompareTarget::Value(Bytes::from_static(b"\0\xff")),
        ),
        Compare {
            range_end: b("\0"),
            ..cmp("a", CompareResult::Equal, CompareTarget::Lease(7))
        },
    ];
    let range = RangeRequest {
        key: b("a"),
        range_end: b("z"),
        limit: 10,
        revision: 5,
        sort_order: SortOrder::Descend,
        sort_target: SortTarget::Value,
        keys_only: true,
        count_only: true,
        min_mod_revision: 1,
        max_mod_revision: 2,
        min_create_revision: 3,
        max_create_revision: 4,
    };
    let put = PutRequest {
        key: b("k"),
        value: b("v"),
        lease: 3,
        prev_kv: true,
        ignore_value: true,
        ignore_lease: true,
    };
    let del = DeleteRangeRequest {
        key: b("a"),
        range_end: b("\0"),
        prev_kv: true,
    };
    let nested = TxnRequest {
        compare: compares.clone(),
        success: vec![RequestOp::Range(range.clone())],
        failure: vec![],
    };
    let txn = TxnRequest {
        compare: compares,
        success: vec![
            RequestOp::Range(range),
            RequestOp::Put(put.clone()),
            RequestOp::Txn(nested),
        ],
        failure: vec![RequestOp::DeleteRange(del.clone())],
    };
    let ops = vec![
        Op::Noop,
        Op::Put(put),
        Op::DeleteRange(del),
        Op::Txn(txn),
        Op::Compact(CompactRequest { revision: 42 }),
        Op::LeaseGrant(LeaseGrantRequest { id: -5, ttl: 60 }),
        Op::LeaseRevoke(LeaseRevokeRequest { id: 9 }),
        Op::LeaseCheckpoint(LeaseCheckpointRequest {
            checkpoints: vec![
                LeaseCheckpoint {
                    id: 1,
                    remaining_ttl: 2,
                },
                LeaseCheckpoint {
                    id: 3,
                    remaining_ttl: 4,
                },
            ],
        }),
    ];
    let mut cmds: Vec<Command> = ops.iter().cloned().map(Command::new).collect();
    cmds.extend(ops.into_iter().map(|op| {
        Command::with_id(
            RequestId {
                proposer: u64::MAX,
                seq: 1 << 40,
            },
            op,
        )
    }));
    cmds
}

#[test]
fn every_command_kind_round_trips() {
    for cmd in every_kind_of_command() {
        let bytes = cmd.encode();
        assert_eq!(bytes[0], COMMAND_FORMAT_VERSION);
        assert_eq!(Command::decode(&bytes).as_ref(), Ok(&cmd));
    }
}

#[test]
fn malformed_commands_are_refused() {
    for cmd in every_kind_of_command() {
        let bytes = cmd.encode().to_vec();
        for len in 0..bytes.len() {
            assert!(
                Command::decode(&bytes[..len]).is_err(),
                "{cmd:?} cut at {len}"
            );
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(Command::decode(&long), Err(DecodeError::TrailingBytes(1)));
        let mut version = bytes.clone();
        version[0] = COMMAND_FORMAT_VERSION + 1;
        assert_eq!(
            Command::decode(&version),
            Err(DecodeError::UnsupportedVersion(
                u32::from(COMMAND_FORMAT_VERSION) + 1
            ))
        );
    }
    assert!(matches!(
        Command::decode(&[COMMAND_FORMAT_VERSION, 0, 99]),
        Err(DecodeError::Invalid { what: "op", .. })
    ));
    assert!(matches!(
        Command::decode(&[COMMAND_FORMAT_VERSION, 2, 0]),
        Err(DecodeError::Invalid { what: "flags", .. })
    ));
}

fn arb_bytes() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..6).prop_map(Bytes::from)
}

fn arb_i64() -> impl Strategy<Value = i64> {
    prop_oneof![any::<i64>(), -2i64..50]
}

fn arb_range() -> impl Strategy<Value = RangeRequest> {
    let sort_order = prop_oneof![
        Just(SortOrder::None),
        Just(SortOrder::Ascend),
        Just(SortOrder::Descend)
    ];
    let sort_target = prop_oneof![
        Just(SortTarget::Key),
        Just(SortTarget::Version),
        Just(SortTarget::Create),
        Just(SortTarget::Mod),
        Just(SortTarget::Value)
    ];
    (
        (arb_bytes(), arb_bytes(), arb_i64(), arb_i64()),
        (sort_order, sort_target, any::<bool>(), any::<bool>()),
        (arb_i64(), arb_i64(), arb_i64(), arb_i64()),
    )
        .prop_map(
            |(
                (key, range_end, limit, revision),
                (sort_order, sort_target, keys_only, count_only),
                f,
            )| {
                RangeRequest {
                    key,
                    range_end,
                    limit,
                    revision,
                    sort_order,
                    sort_target,
                    keys_only,
                    count_only,
                    min_mod_revision: f.0,
                    max_mod_revision: f.1,
                    min_create_revision: f.2,
                    max_create_revision: f.3,
                }
            },
        )
}

fn arb_put() -> impl Strategy<Value = PutRequest> {
    (
        arb_bytes(),
        arb_bytes(),
        arb_i64(),
        any::<(bool, bool, bool)>(),
    )
        .prop_map(|(key, value, lease, f)| PutRequest {
            key,
            value,
            lease,
            prev_kv: f.0,
            ignore_value: f.1,
            ignore_lease: f.2,
        })
}

fn arb_delete() -> impl Strategy<Value = DeleteRangeRequest> {
    (arb_bytes(), arb_bytes(), any::<bool>()).prop_map(|(key, range_end, prev_kv)| {
        DeleteRangeRequest {
            key,
            range_end,
            prev_kv,
        }
    })
}

fn arb_compare() -> impl Strategy<Value = Compare> {
    let result = prop_oneof![
        Just(CompareResult::Equal),
        Just(CompareResult::Greater),
        Just(CompareResult::Less),
        Just(CompareResult::NotEqual)
    ];
    let target = prop_oneof![
        arb_i64().prop_map(CompareTarget::Version),
        arb_i64().prop_map(CompareTarget::Create),
        arb_i64().prop_map(CompareTarget::Mod),
        arb_bytes().prop_map(CompareTarget::Value),
        arb_i64().prop_map(CompareTarget::Lease),
    ];
    (result, target, arb_bytes(), arb_bytes()).prop_map(|(result, target, key, range_end)| {
        Compare {
            result,
            target,
            key,
            range_end,
        }
    })
}

fn arb_txn() -> impl Strategy<Value = TxnRequest> {
    let leaf = prop_oneof![
        arb_range().prop_map(RequestOp::Range),
        arb_put().prop_map(RequestOp::Put),
        arb_delete().prop_map(RequestOp::DeleteRange),
    ];
    let op = leaf.prop_recursive(3, 24, 4, |inner| {
        (
            prop::collection::vec(arb_compare(), 0..3),
            prop::collection::vec(inner.clone(), 0..4),
            prop::collection::vec(inner, 0..4),
        )
            .prop_map(|(compare, success, failure)| {
                RequestOp::Txn(TxnRequest {
                    compare,
                    success,
                    failure,
                })
            })
    });
    (
        prop::collection::vec(arb_compare(), 0..3),
        prop::collection::vec(op.clone(), 0..4),
        prop::collection::vec(op, 0..4),
    )
        .prop_map(|(compare, success, failure)| TxnRequest {
            compare,
            success,
            failure,
        })
}

fn arb_command() -> impl Strategy<Value = Command> {
    let op = prop_oneof![
        Just(Op::Noop),
        arb_put().prop_map(Op::Put),
        arb_delete().prop_map(Op::DeleteRange),
        arb_txn().prop_map(Op::Txn),
        arb_i64().prop_map(|revision| Op::Compact(CompactRequest { revision })),
        (arb_i64(), arb_i64()).prop_map(|(id, ttl)| Op::LeaseGrant(LeaseGrantRequest { id, ttl })),
        arb_i64().prop_map(|id| Op::LeaseRevoke(LeaseRevokeRequest { id })),
        prop::collection::vec((arb_i64(), arb_i64()), 0..4).prop_map(|cps| {
            Op::LeaseCheckpoint(LeaseCheckpointRequest {
                checkpoints: cps
                    .into_iter()
                    .map(|(id, remaining_ttl)| LeaseCheckpoint { id, remaining_ttl })
                    .collect(),
            })
        }),
    ];
    (prop::option::of(any::<(u64, u64)>()), op).prop_map(|(id, op)| Command {
        request_id: id.map(|(proposer, seq)| RequestId { proposer, seq }),
        op,
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn command_decode_of_random_bytes_never_panics(data in bytes_up_to(256)) {
        let _ = Command::decode(&data);
        // The version byte right, so that decoding gets past it.
        let mut versioned = vec![COMMAND_FORMAT_VERSION];
        versioned.extend_from_slice(&data);
        if let Ok(cmd) = Command::decode(&versioned) {
            prop_assert_eq!(Command::decode(&cmd.encode()), Ok(cmd));
        }
    }

    #[test]
    fn random_commands_round_trip(cmd in arb_command()) {
        prop_assert_eq!(Command::decode(&cmd.encode()), Ok(cmd));
    }

    #[test]
    fn mutated_commands_never_panic(cmd in arb_command(), edits in byte_edits(0..=255)) {
        let mut bytes = cmd.encode().to_vec();
        for (at, byte) in edits {
            let i = at % bytes.len();
            bytes[i] = byte;
        }
        if let Ok(decoded) = Command::decode(&bytes) {
            prop_assert_eq!(Command::decode(&decoded.encode()), Ok(decoded.clone()));
            // Whatever decodes also applies without panicking.
            let mut store = rich_store();
            let _ = store.apply(u64::MAX, &decoded);
        }
    }

    #[test]
    fn applying_random_commands_never_panics_and_failures_change_nothing(
        cmds in prop::collection::vec(arb_command(), 1..12),
    ) {
        let mut store = rich_store();
        let mut index = store.applied_index();
        for cmd in cmds {
            index += 1;
            let before = store.clone();
            let applied = store.apply(index, &cmd);
            // (With a request id even a failure is remembered, in the dedup table.)
            if applied.result.is_err() && cmd.request_id.is_none() {
                let mut expected = before;
                expected.apply(index, &Command::new(Op::Noop));
                prop_assert_eq!(&store, &expected);
            }
        }
        prop_assert_eq!(Store::restore(&store.snapshot()).unwrap(), store);
    }

    #[test]
    fn restore_of_random_bytes_never_panics(data in bytes_up_to(512)) {
        prop_assert!(Store::restore(&data).is_err());
        let mut headed = b"KEELKVSN".to_vec();
        headed.extend_from_slice(&SNAPSHOT_FORMAT_VERSION.to_le_bytes());
        headed.extend_from_slice(&data);
        let _ = Store::restore(&headed);
    }

    #[test]
    fn mutated_snapshots_are_refused(edits in byte_edits(1..=255)) {
        let original = rich_store().snapshot().to_vec();
        let mut snap = original.clone();
        for (at, flip) in edits {
            let i = at % snap.len();
            snap[i] ^= flip;
        }
        // Two edits of one byte can cancel out.
        prop_assume!(snap != original);
        prop_assert!(Store::restore(&snap).is_err());
    }
}

fn bytes_up_to(n: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..n)
}

/// One to three (position, byte) edits; positions are taken modulo the input's length.
fn byte_edits(bytes: std::ops::RangeInclusive<u8>) -> impl Strategy<Value = Vec<(usize, u8)>> {
    prop::collection::vec((any::<usize>(), bytes), 1..4)
}

fn rich_store() -> Store {
    thread_local! {
        static RICH: Store = rich().store;
    }
    RICH.with(Clone::clone)
}
