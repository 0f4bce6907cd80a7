//! etcd v3 semantics of every op and error, through the public API.

mod common;

use bytes::Bytes;
use common::*;
use keel_kv::{
    Command, CompareResult as R, CompareTarget as T, DeleteRangeRequest, Error, EventKind,
    KeyValue, LeaseCheckpoint, LeaseCheckpointRequest, LeaseInfo, Op, PutRequest, RangeRequest,
    RequestId, RequestOp, Response, ResponseOp, SortOrder, SortTarget, Store, TxnRequest,
    DEDUP_MAX_PROPOSERS, DEDUP_WINDOW, MAX_LEASE_TTL, MAX_TXN_DEPTH,
};

fn all() -> RangeRequest {
    range_req("\0", "\0")
}

#[test]
fn empty_store_is_at_revision_1() {
    let kv = Kv::new();
    assert_eq!(kv.store.revision(), 1);
    assert_eq!(kv.store.compact_revision(), 0);
    assert_eq!(kv.store.applied_index(), 0);
    let r = kv.range(&all()).unwrap();
    assert_eq!((r.kvs.len(), r.count, r.more, r.revision), (0, 0, false, 1));
    assert!(kv.store.is_empty());
}

#[test]
fn put_twice_bumps_version_and_keeps_create_revision() {
    let mut kv = Kv::new();
    assert_eq!(kv.put("a", "1").revision, 2);
    assert_eq!(
        kv.get("a").unwrap(),
        KeyValue {
            key: b("a"),
            create_revision: 2,
            mod_revision: 2,
            version: 1,
            value: b("1"),
            lease: 0
        }
    );
    assert_eq!(kv.put("a", "2").revision, 3);
    assert_eq!(
        kv.get("a").unwrap(),
        KeyValue {
            key: b("a"),
            create_revision: 2,
            mod_revision: 3,
            version: 2,
            value: b("2"),
            lease: 0
        }
    );
    assert_eq!(kv.store.revision(), 3);
    assert_eq!(kv.store.len(), 1);
}

#[test]
fn delete_then_put_starts_a_new_incarnation() {
    let mut kv = Kv::new();
    kv.put("a", "1");
    kv.put("a", "2");
    let d = kv.delete("a", "");
    assert_eq!((d.deleted, d.revision), (1, 4));
    assert_eq!(values(&d.prev_kvs), ["2"]);
    assert_eq!(kv.get("a"), None);
    kv.put("a", "3");
    let a = kv.get("a").unwrap();
    assert_eq!((a.create_revision, a.mod_revision, a.version), (5, 5, 1));
}

#[test]
fn put_returns_prev_kv_only_when_asked() {
    let mut kv = Kv::new();
    let first = kv
        .put_with(PutRequest {
            prev_kv: true,
            ..put_req("a", "1")
        })
        .unwrap();
    assert_eq!(first.prev_kv, None);
    let second = kv
        .put_with(PutRequest {
            prev_kv: true,
            ..put_req("a", "2")
        })
        .unwrap();
    let prev = second.prev_kv.unwrap();
    assert_eq!(
        (prev.value, prev.version, prev.mod_revision),
        (b("1"), 1, 2)
    );
    let third = kv.put_with(put_req("a", "3")).unwrap();
    assert_eq!(third.prev_kv, None);
}

#[test]
fn put_ignore_value_and_ignore_lease() {
    let mut kv = Kv::new();
    let ignore_value = PutRequest {
        key: b("a"),
        ignore_value: true,
        ..Default::default()
    };
    let ignore_lease = PutRequest {
        key: b("a"),
        value: b("x"),
        ignore_lease: true,
        ..Default::default()
    };
    assert_eq!(kv.err(Op::Put(ignore_value.clone())), Error::KeyNotFound);
    assert_eq!(kv.err(Op::Put(ignore_lease.clone())), Error::KeyNotFound);

    let lease = kv.grant(0, 10).unwrap();
    kv.put_with(PutRequest {
        lease,
        ..put_req("a", "v")
    })
    .unwrap();

    // Keeps the value, takes the new (absent) lease.
    kv.put_with(ignore_value).unwrap();
    let a = kv.get("a").unwrap();
    assert_eq!((a.value, a.lease, a.version), (b("v"), 0, 2));

    kv.put_with(PutRequest {
        lease,
        ..put_req("a", "v")
    })
    .unwrap();
    kv.put_with(ignore_lease).unwrap();
    let a = kv.get("a").unwrap();
    assert_eq!((a.value, a.lease), (b("x"), lease));
    assert_eq!(kv.store.lease_keys(lease).unwrap(), [b("a")]);

    assert_eq!(
        kv.err(Op::Put(PutRequest {
            key: b("a"),
            value: b("x"),
            ignore_value: true,
            ..Default::default()
        })),
        Error::ValueProvided
    );
    assert_eq!(
        kv.err(Op::Put(PutRequest {
            key: b("a"),
            lease,
            ignore_lease: true,
            ..Default::default()
        })),
        Error::LeaseProvided
    );
}

#[test]
fn put_with_unknown_lease_is_refused() {
    let mut kv = Kv::new();
    assert_eq!(
        kv.err(Op::Put(PutRequest {
            lease: 42,
            ..put_req("a", "1")
        })),
        Error::LeaseNotFound
    );
    assert_eq!(kv.store.revision(), 1);
}

#[test]
fn empty_key_is_refused_everywhere() {
    let mut kv = Kv::new();
    assert_eq!(kv.err(Op::Put(put_req("", "v"))), Error::EmptyKey);
    assert_eq!(
        kv.err(Op::DeleteRange(DeleteRangeRequest::default())),
        Error::EmptyKey
    );
    assert_eq!(kv.range(&range_req("", "")), Err(Error::EmptyKey));
    assert_eq!(kv.range(&range_req("", "\0")), Err(Error::EmptyKey));
    let txn = TxnRequest {
        failure: vec![put_op("", "v")],
        ..Default::default()
    };
    assert_eq!(kv.err(Op::Txn(txn)), Error::EmptyKey);
    let txn = TxnRequest {
        success: vec![RequestOp::Range(RangeRequest::default())],
        ..Default::default()
    };
    assert_eq!(kv.err(Op::Txn(txn)), Error::EmptyKey);
}

fn abcd() -> Kv {
    let mut kv = Kv::new();
    for k in ["a", "b", "c", "d"] {
        kv.put(k, k);
    }
    kv
}

#[test]
fn range_selects_keys_like_etcd() {
    let kv = abcd();
    let ks = |k: &str, e: &str| keys(&kv.range(&range_req(k, e)).unwrap().kvs);
    assert_eq!(ks("b", ""), ["b"]);
    assert_eq!(ks("bb", ""), Vec::<String>::new());
    assert_eq!(ks("b", "d"), ["b", "c"]);
    assert_eq!(ks("c", "\0"), ["c", "d"]);
    assert_eq!(ks("\0", "\0"), ["a", "b", "c", "d"]);
    assert_eq!(ks("c", "b"), Vec::<String>::new());
    assert_eq!(ks("c", "c"), Vec::<String>::new());
    assert_eq!(ks("a", "b"), ["a"]);
}

#[test]
fn range_limit_more_and_count() {
    let kv = abcd();
    let r = kv.range(&RangeRequest { limit: 2, ..all() }).unwrap();
    assert_eq!(
        (keys(&r.kvs), r.more, r.count),
        (vec!["a".to_string(), "b".to_string()], true, 4)
    );
    let r = kv.range(&RangeRequest { limit: 4, ..all() }).unwrap();
    assert_eq!((r.kvs.len(), r.more, r.count), (4, false, 4));
    let r = kv.range(&RangeRequest { limit: 0, ..all() }).unwrap();
    assert_eq!((r.kvs.len(), r.more), (4, false));
    let r = kv.range(&RangeRequest { limit: -3, ..all() }).unwrap();
    assert_eq!((r.kvs.len(), r.more), (4, false));
    let r = kv
        .range(&RangeRequest {
            limit: 1,
            ..range_req("b", "d")
        })
        .unwrap();
    assert_eq!(
        (keys(&r.kvs), r.more, r.count),
        (vec!["b".to_string()], true, 2)
    );
}

#[test]
fn range_count_only_and_keys_only() {
    let kv = abcd();
    let r = kv
        .range(&RangeRequest {
            count_only: true,
            limit: 1,
            ..all()
        })
        .unwrap();
    assert_eq!((r.kvs.len(), r.count, r.more), (0, 4, false));
    let r = kv
        .range(&RangeRequest {
            keys_only: true,
            ..range_req("b", "")
        })
        .unwrap();
    assert_eq!(
        r.kvs,
        [KeyValue {
            key: b("b"),
            create_revision: 3,
            mod_revision: 3,
            version: 1,
            value: Bytes::new(),
            lease: 0
        }]
    );
}

/// Keys whose version, create, mod revision and value order differently from their names.
fn sortable() -> Kv {
    let mut kv = Kv::new();
    kv.put("c", "1"); // rev 2
    kv.put("a", "3"); // rev 3
    kv.put("b", "2"); // rev 4
    kv.put("c", "1"); // rev 5, c version 2
    kv.put("c", "1"); // rev 6, c version 3
    kv.put("b", "2"); // rev 7, b version 2
    kv
}

fn sorted(kv: &Kv, target: SortTarget, order: SortOrder) -> Vec<String> {
    keys(
        &kv.range(&RangeRequest {
            sort_target: target,
            sort_order: order,
            ..all()
        })
        .unwrap()
        .kvs,
    )
}

#[test]
fn range_sorts_by_every_target() {
    let kv = sortable();
    use SortOrder::*;
    use SortTarget::*;
    assert_eq!(sorted(&kv, Key, Descend), ["c", "b", "a"]);
    assert_eq!(sorted(&kv, Key, Ascend), ["a", "b", "c"]);
    assert_eq!(sorted(&kv, Version, Ascend), ["a", "b", "c"]);
    assert_eq!(sorted(&kv, Version, Descend), ["c", "b", "a"]);
    assert_eq!(sorted(&kv, Create, Ascend), ["c", "a", "b"]);
    assert_eq!(sorted(&kv, Create, Descend), ["b", "a", "c"]);
    assert_eq!(sorted(&kv, Mod, Ascend), ["a", "c", "b"]);
    assert_eq!(sorted(&kv, Mod, Descend), ["b", "c", "a"]);
    assert_eq!(sorted(&kv, Value, Descend), ["a", "b", "c"]);
    // etcd: a target other than the key with no order means ascending.
    assert_eq!(sorted(&kv, Create, None), ["c", "a", "b"]);
    assert_eq!(sorted(&kv, Value, None), ["c", "b", "a"]);
}

#[test]
fn range_sort_then_limit_and_keys_only_sorts_on_values() {
    let kv = sortable();
    let req = RangeRequest {
        sort_target: SortTarget::Value,
        sort_order: SortOrder::Descend,
        limit: 2,
        keys_only: true,
        ..all()
    };
    let r = kv.range(&req).unwrap();
    assert_eq!(
        (keys(&r.kvs), r.more, r.count),
        (vec!["a".to_string(), "b".to_string()], true, 3)
    );
    assert!(r.kvs.iter().all(|kv| kv.value.is_empty()));
}

#[test]
fn sort_ties_stay_in_key_order() {
    let kv = abcd();
    // Every key has version 1.
    assert_eq!(
        sorted(&kv, SortTarget::Version, SortOrder::Descend),
        ["a", "b", "c", "d"]
    );
}

#[test]
fn range_revision_filters_apply_before_limit_not_to_count() {
    let kv = sortable(); // a: create 3 mod 3; b: create 4 mod 7; c: create 2 mod 6
    let f = |req: RangeRequest| {
        let r = kv.range(&req).unwrap();
        (keys(&r.kvs), r.count, r.more)
    };
    assert_eq!(
        f(RangeRequest {
            min_mod_revision: 6,
            ..all()
        })
        .0,
        ["b", "c"]
    );
    assert_eq!(
        f(RangeRequest {
            max_mod_revision: 6,
            ..all()
        })
        .0,
        ["a", "c"]
    );
    assert_eq!(
        f(RangeRequest {
            min_create_revision: 3,
            ..all()
        })
        .0,
        ["a", "b"]
    );
    assert_eq!(
        f(RangeRequest {
            max_create_revision: 3,
            ..all()
        })
        .0,
        ["a", "c"]
    );
    assert_eq!(
        f(RangeRequest {
            min_create_revision: 3,
            max_mod_revision: 6,
            ..all()
        })
        .0,
        ["a"]
    );
    let (ks, count, more) = f(RangeRequest {
        min_mod_revision: 6,
        limit: 1,
        ..all()
    });
    assert_eq!((ks, count, more), (vec!["b".to_string()], 3, true));
}

#[test]
fn range_at_past_revisions() {
    let mut kv = Kv::new();
    kv.put("a", "1"); // 2
    kv.put("a", "2"); // 3
    kv.put("b", "1"); // 4
    kv.delete("a", ""); // 5
    let at = |rev: i64| {
        let r = kv
            .range(&RangeRequest {
                revision: rev,
                ..all()
            })
            .unwrap();
        assert_eq!(r.revision, 5, "the header carries the current revision");
        r.kvs
            .iter()
            .map(|kv| {
                format!(
                    "{}={}",
                    String::from_utf8_lossy(&kv.key),
                    String::from_utf8_lossy(&kv.value)
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(at(1), Vec::<String>::new());
    assert_eq!(at(2), ["a=1"]);
    assert_eq!(at(3), ["a=2"]);
    assert_eq!(at(4), ["a=2", "b=1"]);
    assert_eq!(at(5), ["b=1"]);
    assert_eq!(at(0), ["b=1"]);
    let old = kv
        .range(&RangeRequest {
            revision: 2,
            ..range_req("a", "")
        })
        .unwrap();
    assert_eq!((old.kvs[0].version, old.kvs[0].mod_revision), (1, 2));
    assert_eq!(
        kv.range(&RangeRequest {
            revision: 6,
            ..all()
        }),
        Err(Error::FutureRevision)
    );
}

#[test]
fn delete_of_nothing_keeps_the_revision() {
    let mut kv = abcd();
    let applied = kv.apply(Op::DeleteRange(DeleteRangeRequest {
        key: b("x"),
        range_end: b("z"),
        prev_kv: true,
    }));
    assert!(applied.events.is_empty());
    match applied.result.unwrap() {
        Response::DeleteRange(d) => {
            assert_eq!((d.deleted, d.revision, d.prev_kvs.len()), (0, 5, 0))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(kv.store.revision(), 5);
}

#[test]
fn delete_range_deletes_at_one_revision_in_key_order() {
    let mut kv = abcd();
    let applied = kv.apply(Op::DeleteRange(DeleteRangeRequest {
        key: b("b"),
        range_end: b("\0"),
        prev_kv: true,
    }));
    let Ok(Response::DeleteRange(d)) = applied.result else {
        panic!()
    };
    assert_eq!((d.deleted, d.revision), (3, 6));
    assert_eq!(keys(&d.prev_kvs), ["b", "c", "d"]);
    assert!(applied
        .events
        .iter()
        .all(|e| e.kind == EventKind::Delete && e.kv.mod_revision == 6));
    assert_eq!(
        keys(
            &applied
                .events
                .iter()
                .map(|e| e.kv.clone())
                .collect::<Vec<_>>()
        ),
        ["b", "c", "d"]
    );
    assert_eq!(keys(&kv.range(&all()).unwrap().kvs), ["a"]);
    // Without prev_kv the count is still right.
    let applied = kv.apply(Op::DeleteRange(DeleteRangeRequest {
        key: b("a"),
        range_end: Bytes::new(),
        prev_kv: false,
    }));
    let Ok(Response::DeleteRange(d)) = applied.result else {
        panic!()
    };
    assert_eq!((d.deleted, d.prev_kvs.len()), (1, 0));
}

#[test]
fn apply_returns_put_and_delete_events() {
    let mut kv = Kv::new();
    let e = kv.apply(Op::Put(put_req("a", "1"))).events;
    assert_eq!(e.len(), 1);
    assert_eq!(
        (
            e[0].kind,
            e[0].kv.value.clone(),
            e[0].kv.mod_revision,
            e[0].prev_kv.clone()
        ),
        (EventKind::Put, b("1"), 2, None)
    );
    let e = kv.apply(Op::Put(put_req("a", "2"))).events;
    assert_eq!(e[0].prev_kv.as_ref().unwrap().value, b("1"));
    assert_eq!(e[0].kv.version, 2);
    let e = kv
        .apply(Op::DeleteRange(DeleteRangeRequest {
            key: b("a"),
            ..Default::default()
        }))
        .events;
    assert_eq!(e[0].kind, EventKind::Delete);
    // etcd's delete event carries only the key and the delete's revision.
    assert_eq!(
        e[0].kv,
        KeyValue {
            key: b("a"),
            mod_revision: 4,
            ..Default::default()
        }
    );
    assert_eq!(e[0].prev_kv.as_ref().unwrap().value, b("2"));
}

fn holds(kv: &mut Kv, c: keel_kv::Compare) -> bool {
    kv.txn(TxnRequest {
        compare: vec![c],
        ..Default::default()
    })
    .unwrap()
    .succeeded
}

#[test]
fn txn_compares_every_target_and_result() {
    let mut kv = Kv::new();
    let lease = kv.grant(7, 10).unwrap();
    kv.put("a", "x"); // 2
    kv.put_with(PutRequest {
        lease,
        ..put_req("a", "x")
    })
    .unwrap(); // 3: version 2, create 2, mod 3
    let cases = [
        (T::Version(2), R::Equal, true),
        (T::Version(1), R::Greater, true),
        (T::Version(3), R::Less, true),
        (T::Version(2), R::NotEqual, false),
        (T::Version(2), R::Greater, false),
        (T::Create(2), R::Equal, true),
        (T::Create(3), R::Less, true),
        (T::Mod(3), R::Equal, true),
        (T::Mod(2), R::Greater, true),
        (T::Mod(3), R::NotEqual, false),
        (T::Value(b("x")), R::Equal, true),
        (T::Value(b("w")), R::Greater, true),
        (T::Value(b("xa")), R::Less, true),
        (T::Value(b("y")), R::NotEqual, true),
        (T::Lease(7), R::Equal, true),
        (T::Lease(0), R::Greater, true),
        (T::Lease(8), R::Equal, false),
    ];
    for (target, result, want) in cases {
        assert_eq!(
            holds(&mut kv, cmp("a", result, target.clone())),
            want,
            "{target:?} {result:?}"
        );
    }
}

#[test]
fn txn_compare_on_a_missing_key() {
    let mut kv = Kv::new();
    assert!(holds(&mut kv, cmp("a", R::Equal, T::Version(0))));
    assert!(holds(&mut kv, cmp("a", R::Equal, T::Create(0))));
    assert!(holds(&mut kv, cmp("a", R::Equal, T::Mod(0))));
    assert!(holds(&mut kv, cmp("a", R::Equal, T::Lease(0))));
    assert!(!holds(&mut kv, cmp("a", R::Greater, T::Version(0))));
    // A value comparison on a missing key always fails, whatever the operator.
    assert!(!holds(&mut kv, cmp("a", R::Equal, T::Value(Bytes::new()))));
    assert!(!holds(&mut kv, cmp("a", R::NotEqual, T::Value(b("x")))));
}

#[test]
fn txn_compare_over_a_range_needs_every_key() {
    let mut kv = Kv::new();
    kv.put("k1", "v");
    kv.put("k2", "v");
    kv.put("k2", "v");
    let over = |result, target| keel_kv::Compare {
        result,
        target,
        key: b("k"),
        range_end: b("l"),
    };
    assert!(holds(&mut kv, over(R::Greater, T::Version(0))));
    assert!(!holds(&mut kv, over(R::Equal, T::Version(1))));
    assert!(holds(&mut kv, over(R::Equal, T::Value(b("v")))));
    let empty = keel_kv::Compare {
        result: R::Equal,
        target: T::Version(0),
        key: b("x"),
        range_end: b("\0"),
    };
    assert!(holds(&mut kv, empty));
}

#[test]
fn txn_runs_one_branch_at_one_revision() {
    let mut kv = Kv::new();
    kv.put("z", "1"); // 2
    let txn = TxnRequest {
        compare: vec![cmp("z", R::Equal, T::Value(b("1")))],
        success: vec![put_op("y", "s"), put_op("x", "s"), del_op("z", "")],
        failure: vec![put_op("w", "f")],
    };
    let applied = kv.apply(Op::Txn(txn.clone()));
    let Ok(Response::Txn(t)) = applied.result else {
        panic!()
    };
    assert!(t.succeeded);
    assert_eq!(t.revision, 3);
    assert_eq!(t.responses.len(), 3);
    assert_eq!(kv.store.revision(), 3);
    // Events in op order (sub-revision order), all at revision 3.
    let order: Vec<_> = applied
        .events
        .iter()
        .map(|e| (e.kind, e.kv.key.clone(), e.kv.mod_revision))
        .collect();
    assert_eq!(
        order,
        [
            (EventKind::Put, b("y"), 3),
            (EventKind::Put, b("x"), 3),
            (EventKind::Delete, b("z"), 3)
        ]
    );

    // Now the compare fails: the failure branch runs.
    let t = kv.txn(txn).unwrap();
    assert!(!t.succeeded);
    assert_eq!(t.revision, 4);
    assert_eq!(kv.get("w").unwrap().mod_revision, 4);
    assert_eq!(kv.get("y").unwrap().mod_revision, 3);
}

#[test]
fn txn_reads_see_earlier_writes_of_the_same_txn() {
    let mut kv = Kv::new();
    kv.put("a", "old");
    let t = kv
        .txn(TxnRequest {
            success: vec![range_op("a", ""), put_op("a", "new"), range_op("a", "")],
            ..Default::default()
        })
        .unwrap();
    let ResponseOp::Range(before) = &t.responses[0] else {
        panic!()
    };
    let ResponseOp::Range(after) = &t.responses[2] else {
        panic!()
    };
    assert_eq!(
        (values(&before.kvs), before.revision),
        (vec!["old".to_string()], 2)
    );
    assert_eq!(
        (values(&after.kvs), after.revision),
        (vec!["new".to_string()], 3)
    );
    let ResponseOp::Put(put) = &t.responses[1] else {
        panic!()
    };
    assert_eq!(put.revision, 3);
}

#[test]
fn txn_that_only_reads_keeps_the_revision() {
    let mut kv = abcd();
    let applied = kv.apply(Op::Txn(TxnRequest {
        success: vec![range_op("a", "\0")],
        ..Default::default()
    }));
    assert!(applied.events.is_empty());
    let Ok(Response::Txn(t)) = applied.result else {
        panic!()
    };
    assert_eq!(t.revision, 5);
    assert_eq!(kv.store.revision(), 5);
}

#[test]
fn nested_txn_compares_see_the_state_before_the_txn() {
    let mut kv = Kv::new();
    kv.put("k", "old"); // 2
    let nested = TxnRequest {
        compare: vec![cmp("k", R::Equal, T::Value(b("old")))],
        success: vec![put_op("saw", "old")],
        failure: vec![put_op("saw", "new")],
    };
    let t = kv
        .txn(TxnRequest {
            success: vec![put_op("k", "new"), RequestOp::Txn(nested)],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(kv.get("saw").unwrap().value, b("old"));
    assert_eq!(kv.get("saw").unwrap().mod_revision, 3);
    let ResponseOp::Txn(inner) = &t.responses[1] else {
        panic!()
    };
    assert!(inner.succeeded);
    assert_eq!(inner.revision, 3);
}

#[test]
fn nested_txn_takes_its_own_branch() {
    let mut kv = Kv::new();
    let inner = |v: &str| TxnRequest {
        compare: vec![cmp("missing", R::Greater, T::Version(0))],
        success: vec![put_op("inner", "then")],
        failure: vec![put_op("inner", v)],
    };
    let outer = TxnRequest {
        compare: vec![cmp("missing", R::Equal, T::Version(0))],
        success: vec![RequestOp::Txn(inner("else")), put_op("outer", "then")],
        failure: vec![RequestOp::Txn(inner("never"))],
    };
    let t = kv.txn(outer).unwrap();
    assert!(t.succeeded);
    assert_eq!(kv.get("inner").unwrap().value, b("else"));
    assert_eq!(kv.get("outer").unwrap().value, b("then"));
    assert_eq!(kv.store.revision(), 2);
}

#[test]
fn duplicate_keys_in_a_txn_are_refused() {
    let mut kv = Kv::new();
    let dup = |kv: &mut Kv, success: Vec<RequestOp>| {
        kv.txn(TxnRequest {
            success,
            ..Default::default()
        })
        .err()
    };
    assert_eq!(
        dup(&mut kv, vec![put_op("a", "1"), put_op("a", "2")]),
        Some(Error::DuplicateKey)
    );
    assert_eq!(
        dup(&mut kv, vec![put_op("b", "1"), del_op("a", "c")]),
        Some(Error::DuplicateKey)
    );
    assert_eq!(
        dup(&mut kv, vec![del_op("a", ""), put_op("a", "1")]),
        Some(Error::DuplicateKey)
    );
    assert_eq!(
        dup(&mut kv, vec![del_op("a", "\0"), put_op("zz", "1")]),
        Some(Error::DuplicateKey)
    );
    let nested = |k: &str| {
        RequestOp::Txn(TxnRequest {
            success: vec![put_op(k, "n")],
            ..Default::default()
        })
    };
    assert_eq!(
        dup(&mut kv, vec![nested("a"), put_op("a", "1")]),
        Some(Error::DuplicateKey)
    );
    assert_eq!(
        dup(&mut kv, vec![nested("a"), nested("a")]),
        Some(Error::DuplicateKey)
    );
    assert_eq!(
        dup(&mut kv, vec![del_op("a", "b"), nested("a")]),
        Some(Error::DuplicateKey)
    );
    let nested_del = RequestOp::Txn(TxnRequest {
        failure: vec![del_op("a", "b")],
        ..Default::default()
    });
    assert_eq!(
        dup(&mut kv, vec![nested_del, put_op("a", "1")]),
        Some(Error::DuplicateKey)
    );
    assert_eq!(kv.store.revision(), 1);

    // Allowed: overlapping deletes; puts of one key on both branches; a nested txn putting one key
    // in then and else.
    assert_eq!(dup(&mut kv, vec![del_op("a", "c"), del_op("b", "")]), None);
    assert!(kv
        .txn(TxnRequest {
            success: vec![put_op("a", "1")],
            failure: vec![put_op("a", "2")],
            ..Default::default()
        })
        .is_ok());
    let both = RequestOp::Txn(TxnRequest {
        success: vec![put_op("a", "t")],
        failure: vec![put_op("a", "f")],
        ..Default::default()
    });
    assert_eq!(dup(&mut kv, vec![both.clone()]), None);
    assert_eq!(
        dup(&mut kv, vec![both, put_op("a", "1")]),
        Some(Error::DuplicateKey)
    );
    // The refusal is structural: it applies to the branch that does not run, too.
    let t = TxnRequest {
        failure: vec![put_op("a", "1"), put_op("a", "2")],
        ..Default::default()
    };
    assert_eq!(kv.err(Op::Txn(t)), Error::DuplicateKey);
}

#[test]
fn txn_is_atomic_when_an_op_fails() {
    let mut kv = Kv::new();
    kv.put("a", "0");
    let t = TxnRequest {
        success: vec![
            put_op("a", "1"),
            RequestOp::Put(PutRequest {
                lease: 99,
                ..put_req("b", "1")
            }),
        ],
        ..Default::default()
    };
    assert_eq!(kv.err(Op::Txn(t)), Error::LeaseNotFound);
    let t = TxnRequest {
        success: vec![
            del_op("a", ""),
            RequestOp::Txn(TxnRequest {
                success: vec![RequestOp::Put(PutRequest {
                    key: b("c"),
                    ignore_value: true,
                    ..Default::default()
                })],
                ..Default::default()
            }),
        ],
        ..Default::default()
    };
    assert_eq!(kv.err(Op::Txn(t)), Error::KeyNotFound);
    // A bad op on the branch that does not run is not an error (only structural checks cover both
    // branches).
    let t = TxnRequest {
        failure: vec![RequestOp::Put(PutRequest {
            lease: 99,
            ..put_req("b", "1")
        })],
        ..Default::default()
    };
    assert!(kv.txn(t).unwrap().succeeded);
}

#[test]
fn txn_range_revisions_are_checked() {
    let mut kv = Kv::new();
    kv.put("a", "1");
    let future = TxnRequest {
        success: vec![
            put_op("b", "1"),
            RequestOp::Range(RangeRequest {
                revision: 3,
                ..range_req("a", "")
            }),
        ],
        ..Default::default()
    };
    assert_eq!(kv.err(Op::Txn(future)), Error::FutureRevision);
    kv.put("a", "2");
    kv.compact(3).unwrap();
    let old = TxnRequest {
        success: vec![RequestOp::Range(RangeRequest {
            revision: 2,
            ..range_req("a", "")
        })],
        ..Default::default()
    };
    assert_eq!(kv.err(Op::Txn(old)), Error::Compacted);
    let past = TxnRequest {
        success: vec![RequestOp::Range(RangeRequest {
            revision: 3,
            ..range_req("a", "")
        })],
        ..Default::default()
    };
    let t = kv.txn(past).unwrap();
    let ResponseOp::Range(r) = &t.responses[0] else {
        panic!()
    };
    assert_eq!(values(&r.kvs), ["2"]);
}

#[test]
fn txn_op_limit_and_count() {
    let t = TxnRequest {
        compare: vec![cmp("a", R::Equal, T::Version(0))],
        success: vec![put_op("a", "1"), put_op("b", "1")],
        failure: vec![RequestOp::Txn(TxnRequest {
            success: vec![put_op("c", "1"), put_op("d", "1"), put_op("e", "1")],
            ..Default::default()
        })],
    };
    assert_eq!(t.op_count(), 7);
    assert_eq!(t.check_op_limit(3), Ok(()));
    assert_eq!(t.check_op_limit(2), Err(Error::TooManyOps));
    let many_compares = TxnRequest {
        compare: vec![cmp("a", R::Equal, T::Version(0)); 3],
        ..Default::default()
    };
    assert_eq!(many_compares.check_op_limit(2), Err(Error::TooManyOps));
}

fn nested_depth(depth: usize) -> TxnRequest {
    let mut t = TxnRequest {
        success: vec![put_op("leaf", "v")],
        ..Default::default()
    };
    for _ in 1..depth {
        t = TxnRequest {
            success: vec![RequestOp::Txn(t)],
            ..Default::default()
        };
    }
    t
}

#[test]
fn txn_nesting_is_bounded() {
    let mut kv = Kv::new();
    assert!(kv.txn(nested_depth(MAX_TXN_DEPTH)).is_ok());
    assert_eq!(kv.get("leaf").unwrap().value, b("v"));
    assert_eq!(
        kv.err(Op::Txn(nested_depth(MAX_TXN_DEPTH + 1))),
        Error::TxnTooDeep
    );
    assert_eq!(
        nested_depth(MAX_TXN_DEPTH + 1).check_op_limit(100),
        Err(Error::TxnTooDeep)
    );
}

#[test]
fn txn_read_serves_read_only_txns_without_the_log() {
    let kv = abcd();
    let t = TxnRequest {
        compare: vec![cmp("a", R::Equal, T::Version(1))],
        success: vec![
            range_op("a", "c"),
            RequestOp::Txn(TxnRequest {
                success: vec![range_op("d", "")],
                ..Default::default()
            }),
        ],
        failure: vec![],
    };
    let r = kv.store.txn_read(&t).unwrap();
    assert!(r.succeeded);
    assert_eq!(r.revision, 5);
    let ResponseOp::Range(first) = &r.responses[0] else {
        panic!()
    };
    assert_eq!(keys(&first.kvs), ["a", "b"]);
    let ResponseOp::Txn(inner) = &r.responses[1] else {
        panic!()
    };
    let ResponseOp::Range(d) = &inner.responses[0] else {
        panic!()
    };
    assert_eq!(keys(&d.kvs), ["d"]);
    let writes = TxnRequest {
        failure: vec![put_op("a", "1")],
        ..Default::default()
    };
    assert_eq!(kv.store.txn_read(&writes), Err(Error::TxnNotReadOnly));
    assert!(!writes.is_read_only());
}

#[test]
fn compaction_refuses_old_reads_and_keeps_the_state_at_its_revision() {
    let mut kv = Kv::new();
    kv.put("a", "1"); // 2
    kv.put("a", "2"); // 3
    kv.put("b", "1"); // 4
    kv.delete("b", ""); // 5
    kv.put("c", "1"); // 6
    assert_eq!(kv.store.uncompacted_entries(), 5);
    assert!(matches!(kv.compact(5), Ok(Response::Compact(c)) if c.revision == 6));
    assert_eq!(kv.store.compact_revision(), 5);
    // The delete at the compaction point stays visible to a watch from there.
    assert_eq!(kv.store.uncompacted_entries(), 2);
    assert_eq!(
        kv.range(&RangeRequest {
            revision: 4,
            ..all()
        }),
        Err(Error::Compacted)
    );
    assert_eq!(
        kv.range(&RangeRequest {
            revision: 1,
            ..all()
        }),
        Err(Error::Compacted)
    );
    let at5 = kv
        .range(&RangeRequest {
            revision: 5,
            ..all()
        })
        .unwrap();
    assert_eq!(values(&at5.kvs), ["2"]);
    assert_eq!(at5.kvs[0].version, 2);
    assert_eq!(keys(&kv.range(&all()).unwrap().kvs), ["a", "c"]);

    assert_eq!(
        kv.err(Op::Compact(keel_kv::CompactRequest { revision: 5 })),
        Error::Compacted
    );
    assert_eq!(
        kv.err(Op::Compact(keel_kv::CompactRequest { revision: 3 })),
        Error::Compacted
    );
    assert_eq!(
        kv.err(Op::Compact(keel_kv::CompactRequest { revision: 7 })),
        Error::FutureRevision
    );
    assert!(kv.compact(6).is_ok());
    assert_eq!(kv.store.uncompacted_entries(), 1);
    assert_eq!(
        kv.range(&RangeRequest {
            revision: 5,
            ..all()
        }),
        Err(Error::Compacted)
    );
}

#[test]
fn compaction_keeps_prev_kv_for_later_events() {
    let mut kv = Kv::new();
    kv.put("a", "1"); // 2
    kv.put("a", "2"); // 3
    kv.compact(3).unwrap();
    kv.put("a", "3"); // 4
    let events = kv.store.events_since(4, b"a", b"").unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].prev_kv.as_ref().unwrap().value, b("2"));
    // A delete at the compaction point is still reported to a watch from there, without the
    // version it ended (compacted, as in etcd); once compacted past, the key is gone.
    kv.delete("a", ""); // 5
    kv.compact(5).unwrap();
    let at = kv.store.events_since(5, b"a", b"").unwrap();
    assert_eq!(at.len(), 1);
    assert_eq!((at[0].kind, at[0].kv.mod_revision), (EventKind::Delete, 5));
    assert!(at[0].prev_kv.is_none());
    assert_eq!(kv.store.events_since(4, b"a", b""), Err(Error::Compacted));
    let all_at = kv.store.events_since(5, b"\0", b"\0").unwrap();
    assert_eq!(all_at, at);
    assert_eq!(
        kv.range(&RangeRequest {
            revision: 5,
            ..all()
        })
        .unwrap()
        .count,
        0
    );
    let restored = Store::restore(&kv.store.snapshot()).unwrap();
    assert_eq!(
        restored, kv.store,
        "a snapshot keeps the change at the compaction point"
    );
    kv.put("z", "1"); // 6
    kv.compact(6).unwrap();
    assert!(kv.store.events_since(6, b"a", b"").unwrap().is_empty());
    assert_eq!(
        kv.store.get(b"a"),
        None,
        "the key is gone once compacted past its delete"
    );
    assert_eq!(Store::restore(&kv.store.snapshot()).unwrap(), kv.store);
}

#[test]
fn events_since_reads_history_in_revision_order() {
    let mut kv = Kv::new();
    let mut from_apply = Vec::new();
    from_apply.extend(kv.apply(Op::Put(put_req("b", "1"))).events); // 2
    let txn = TxnRequest {
        success: vec![put_op("c", "1"), put_op("a", "1"), del_op("b", "")],
        ..Default::default()
    };
    from_apply.extend(kv.apply(Op::Txn(txn)).events); // 3
    from_apply.extend(kv.apply(Op::Put(put_req("a", "2"))).events); // 4
    from_apply.extend(kv.apply(Op::Put(put_req("x", "1"))).events); // 5

    assert_eq!(kv.store.events_since(2, b"\0", b"\0").unwrap(), from_apply);
    let order: Vec<_> = from_apply
        .iter()
        .map(|e| (e.kv.mod_revision, e.kv.key.clone()))
        .collect();
    assert_eq!(
        order,
        [
            (2, b("b")),
            (3, b("c")),
            (3, b("a")),
            (3, b("b")),
            (4, b("a")),
            (5, b("x"))
        ]
    );

    let since3: Vec<_> = kv
        .store
        .events_since(3, b"a", b"c")
        .unwrap()
        .iter()
        .map(|e| (e.kind, e.kv.key.clone()))
        .collect();
    assert_eq!(
        since3,
        [
            (EventKind::Put, b("a")),
            (EventKind::Delete, b("b")),
            (EventKind::Put, b("a"))
        ]
    );
    let one_key = kv.store.events_since(1, b"a", b"").unwrap();
    assert_eq!(
        one_key
            .iter()
            .map(|e| e.kv.mod_revision)
            .collect::<Vec<_>>(),
        [3, 4]
    );
    assert_eq!(one_key[1].prev_kv.as_ref().unwrap().value, b("1"));
    let bounded = kv.store.events_between(3, 4, b"\0", b"\0").unwrap();
    assert_eq!(bounded.len(), 3);
    assert_eq!(kv.store.events_since(6, b"\0", b"\0").unwrap(), []);
    assert_eq!(kv.store.events_since(0, b"\0", b"\0").unwrap(), []);

    kv.compact(3).unwrap();
    // From the compaction point: the txn's three changes, without what they replaced.
    let at_point: Vec<_> = from_apply[1..4]
        .iter()
        .cloned()
        .map(|mut e| {
            e.prev_kv = None;
            e
        })
        .collect();
    assert_eq!(
        kv.store.events_between(3, 4, b"\0", b"\0").unwrap(),
        at_point
    );
    assert_eq!(kv.store.events_since(2, b"a", b""), Err(Error::Compacted));
    assert_eq!(
        kv.store.events_since(4, b"\0", b"\0").unwrap(),
        from_apply[4..]
    );
}

#[test]
fn lease_grant_ids_and_limits() {
    let mut kv = Kv::new();
    assert_eq!(kv.grant(0, 10), Ok(1));
    assert_eq!(kv.grant(3, 10), Ok(3));
    assert_eq!(kv.grant(0, 10), Ok(2));
    // The counter skips ids already taken.
    assert_eq!(kv.grant(0, 10), Ok(4));
    assert_eq!(
        kv.err(Op::LeaseGrant(keel_kv::LeaseGrantRequest { id: 3, ttl: 5 })),
        Error::LeaseExists
    );
    assert_eq!(
        kv.err(Op::LeaseGrant(keel_kv::LeaseGrantRequest {
            id: 9,
            ttl: MAX_LEASE_TTL + 1
        })),
        Error::LeaseTtlTooLarge
    );
    assert_eq!(kv.grant(9, MAX_LEASE_TTL), Ok(9));
    assert_eq!(
        kv.store.leases().iter().map(|l| l.id).collect::<Vec<_>>(),
        [1, 2, 3, 4, 9]
    );
    // Grants do not touch the key space.
    assert_eq!(kv.store.revision(), 1);
}

#[test]
fn lease_attachment_follows_puts_and_deletes() {
    let mut kv = Kv::new();
    let l1 = kv.grant(0, 10).unwrap();
    let l2 = kv.grant(0, 10).unwrap();
    kv.put_with(PutRequest {
        lease: l1,
        ..put_req("a", "1")
    })
    .unwrap();
    kv.put_with(PutRequest {
        lease: l1,
        ..put_req("b", "1")
    })
    .unwrap();
    assert_eq!(kv.store.lease_keys(l1).unwrap(), [b("a"), b("b")]);
    kv.put("a", "2");
    assert_eq!(kv.store.lease_keys(l1).unwrap(), [b("b")]);
    kv.put_with(PutRequest {
        lease: l2,
        ..put_req("b", "2")
    })
    .unwrap();
    assert_eq!(kv.store.lease_keys(l1).unwrap(), Vec::<Bytes>::new());
    assert_eq!(kv.store.lease_keys(l2).unwrap(), [b("b")]);
    kv.delete("b", "");
    assert_eq!(kv.store.lease_keys(l2).unwrap(), Vec::<Bytes>::new());
    assert_eq!(kv.store.lease_keys(99), None);
}

#[test]
fn lease_revoke_deletes_its_keys_at_one_revision() {
    let mut kv = Kv::new();
    let lease = kv.grant(0, 10).unwrap();
    kv.put_with(PutRequest {
        lease,
        ..put_req("c", "1")
    })
    .unwrap(); // 2
    kv.put("b", "1"); // 3
    kv.put_with(PutRequest {
        lease,
        ..put_req("a", "1")
    })
    .unwrap(); // 4
    let applied = kv.revoke(lease);
    assert!(matches!(applied.result, Ok(Response::LeaseRevoke(r)) if r.revision == 5));
    let deleted: Vec<_> = applied
        .events
        .iter()
        .map(|e| (e.kind, e.kv.key.clone(), e.kv.mod_revision))
        .collect();
    assert_eq!(
        deleted,
        [
            (EventKind::Delete, b("a"), 5),
            (EventKind::Delete, b("c"), 5)
        ]
    );
    assert_eq!(keys(&kv.range(&all()).unwrap().kvs), ["b"]);
    assert_eq!(kv.store.lease(lease), None);
    assert_eq!(
        kv.err(Op::LeaseRevoke(keel_kv::LeaseRevokeRequest { id: lease })),
        Error::LeaseNotFound
    );

    let empty = kv.grant(0, 10).unwrap();
    let applied = kv.revoke(empty);
    assert!(applied.events.is_empty());
    assert_eq!(kv.store.revision(), 5);
}

#[test]
fn lease_checkpoint_sets_the_remaining_ttl() {
    let mut kv = Kv::new();
    let lease = kv.grant(0, 60).unwrap();
    assert_eq!(
        kv.store.lease(lease),
        Some(LeaseInfo {
            id: lease,
            ttl: 60,
            granted_ttl: 60
        })
    );
    let cps = vec![
        LeaseCheckpoint {
            id: lease,
            remaining_ttl: 42,
        },
        LeaseCheckpoint {
            id: 777,
            remaining_ttl: 1,
        },
    ];
    kv.ok(Op::LeaseCheckpoint(LeaseCheckpointRequest {
        checkpoints: cps,
    }));
    assert_eq!(
        kv.store.lease(lease),
        Some(LeaseInfo {
            id: lease,
            ttl: 42,
            granted_ttl: 60
        })
    );
    assert_eq!(kv.store.lease(777), None);
    assert_eq!(
        kv.store.leases(),
        [LeaseInfo {
            id: lease,
            ttl: 42,
            granted_ttl: 60
        }]
    );
}

fn with_id(proposer: u64, seq: u64, op: Op) -> Command {
    Command::with_id(RequestId { proposer, seq }, op)
}

#[test]
fn a_retransmitted_request_takes_effect_once_and_replays_its_result() {
    let mut kv = Kv::new();
    let cmd = with_id(
        1,
        10,
        Op::Put(PutRequest {
            prev_kv: true,
            ..put_req("a", "1")
        }),
    );
    let first = kv.apply_cmd(&cmd);
    assert!(!first.duplicate);
    assert_eq!(first.events.len(), 1);
    let again = kv.apply_cmd(&cmd);
    assert!(again.duplicate);
    assert_eq!(again.result, first.result);
    assert!(again.events.is_empty());
    assert_eq!(kv.store.revision(), 2);
    assert_eq!(kv.get("a").unwrap().version, 1);
    assert_eq!(kv.store.applied_index(), 2);

    // Another seq or another proposer is another request.
    kv.apply_cmd(&with_id(1, 11, Op::Put(put_req("a", "1"))));
    kv.apply_cmd(&with_id(2, 10, Op::Put(put_req("a", "1"))));
    assert_eq!(kv.get("a").unwrap().version, 3);
}

#[test]
fn a_retransmitted_failure_replays_the_error() {
    let mut kv = Kv::new();
    let cmd = with_id(
        1,
        1,
        Op::Put(PutRequest {
            lease: 5,
            ..put_req("a", "1")
        }),
    );
    assert_eq!(kv.apply_cmd(&cmd).result, Err(Error::LeaseNotFound));
    kv.grant(5, 10).unwrap();
    let again = kv.apply_cmd(&cmd);
    assert!(again.duplicate);
    assert_eq!(again.result, Err(Error::LeaseNotFound));
    assert_eq!(kv.get("a"), None);
}

#[test]
fn a_request_older_than_the_window_is_refused_not_reapplied() {
    let mut kv = Kv::new();
    let n = DEDUP_WINDOW as u64 + 1;
    for seq in 0..n {
        kv.apply_cmd(&with_id(9, seq, Op::Put(put_req("a", "v"))));
    }
    assert_eq!(kv.get("a").unwrap().version, n as i64);
    let stale = kv.apply_cmd(&with_id(9, 0, Op::Put(put_req("a", "v"))));
    assert_eq!(
        stale.result,
        Err(Error::StaleRequest {
            proposer: 9,
            seq: 0
        })
    );
    assert!(!stale.duplicate);
    assert!(
        kv.apply_cmd(&with_id(9, 1, Op::Put(put_req("a", "v"))))
            .duplicate
    );
    assert_eq!(kv.get("a").unwrap().version, n as i64);
    // Newer seqs still apply.
    assert!(kv
        .apply_cmd(&with_id(9, n + 5, Op::Put(put_req("a", "v"))))
        .result
        .is_ok());
    assert_eq!(kv.get("a").unwrap().version, n as i64 + 1);
}

#[test]
fn a_request_overtaken_within_the_window_still_applies() {
    let mut kv = Kv::new();
    kv.apply_cmd(&with_id(5, 1, Op::Put(put_req("a", "1"))));
    kv.apply_cmd(&with_id(5, 3, Op::Put(put_req("c", "3"))));
    // Seq 2 was dropped on its first way to the leader and arrives after seq 3.
    let late = kv.apply_cmd(&with_id(5, 2, Op::Put(put_req("b", "2"))));
    assert!(!late.duplicate);
    assert!(late.result.is_ok());
    assert_eq!(kv.get("b").unwrap().mod_revision, 4);
}

#[test]
fn the_proposer_silent_longest_is_forgotten_when_the_table_is_full() {
    let mut kv = Kv::new();
    for proposer in 0..=DEDUP_MAX_PROPOSERS as u64 {
        kv.apply_cmd(&with_id(proposer, 1, Op::Noop));
    }
    // Proposer 0 was dropped; the most recent ones are remembered.
    assert!(!kv.apply_cmd(&with_id(0, 1, Op::Noop)).duplicate);
    assert!(
        kv.apply_cmd(&with_id(DEDUP_MAX_PROPOSERS as u64, 1, Op::Noop))
            .duplicate
    );
}

#[test]
fn applied_index_tracks_the_last_entry_and_allows_gaps() {
    let mut store = Store::new();
    store.apply(3, &Command::new(Op::Noop));
    assert_eq!(store.applied_index(), 3);
    let applied = store.apply(7, &Command::new(Op::Put(put_req("a", "1"))));
    assert!(applied.result.is_ok());
    assert_eq!(store.applied_index(), 7);
    // A failed op still consumes its index.
    store.apply(8, &Command::new(Op::Put(put_req("", "1"))));
    assert_eq!(store.applied_index(), 8);
}

#[test]
#[should_panic(expected = "already applied")]
fn applying_an_index_twice_is_a_bug() {
    let mut store = Store::new();
    store.apply(1, &Command::new(Op::Noop));
    store.apply(1, &Command::new(Op::Noop));
}

#[test]
fn error_messages_are_etcds() {
    let cases = [
        (Error::EmptyKey, "etcdserver: key is not provided", 3),
        (Error::KeyNotFound, "etcdserver: key not found", 3),
        (
            Error::DuplicateKey,
            "etcdserver: duplicate key given in txn request",
            3,
        ),
        (
            Error::TooManyOps,
            "etcdserver: too many operations in txn request",
            3,
        ),
        (
            Error::Compacted,
            "etcdserver: mvcc: required revision has been compacted",
            11,
        ),
        (
            Error::FutureRevision,
            "etcdserver: mvcc: required revision is a future revision",
            11,
        ),
        (
            Error::LeaseNotFound,
            "etcdserver: requested lease not found",
            5,
        ),
        (Error::LeaseExists, "etcdserver: lease already exists", 9),
        (
            Error::LeaseTtlTooLarge,
            "etcdserver: too large lease TTL",
            11,
        ),
        (Error::ValueProvided, "etcdserver: value is provided", 3),
        (Error::LeaseProvided, "etcdserver: lease is provided", 3),
    ];
    for (e, msg, code) in cases {
        assert_eq!(e.to_string(), msg);
        assert_eq!(e.grpc_code(), code, "{e}");
    }
}
