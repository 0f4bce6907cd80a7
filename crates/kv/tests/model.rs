//! Model check: random op sequences applied to the store and to a reference model that keeps a full
//! copy of the key space for every revision. After every op they must agree on the outcome, on
//! every range at every revision the store can still serve, on the watch history, and on leases;
//! snapshot/restore in the middle changes nothing.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use common::Kv;
use keel_kv::{
    Command, CompactRequest, Compare, CompareResult, CompareTarget, DeleteRangeRequest, Error,
    Event, EventKind, KeyValue, LeaseGrantRequest, LeaseRevokeRequest, Op, PutRequest,
    RangeRequest, RequestOp, Response, Store, TxnRequest,
};
use proptest::prelude::*;

const KEYS: u8 = 6;
/// Lease slots: slot `i` is lease id `i + 1`, which exists only once granted (ids are handed out
/// from 1 up).
const LEASE_SLOTS: u8 = 4;

fn key(i: u8) -> Bytes {
    Bytes::from(vec![b'a' + i])
}

/// `KEYS` stands for "\0", i.e. to the end of the key space.
fn range_end(i: u8) -> Bytes {
    if i >= KEYS {
        Bytes::from_static(b"\0")
    } else {
        key(i)
    }
}

#[derive(Debug, Clone)]
enum TxnStep {
    Put(u8, u8),
    Del(u8),
}

#[derive(Debug, Clone)]
enum Step {
    Put {
        key: u8,
        value: u8,
        lease: Option<u8>,
    },
    Delete {
        key: u8,
        end: Option<u8>,
    },
    Txn {
        key: u8,
        version: i64,
        success: Vec<TxnStep>,
        failure: Vec<TxnStep>,
    },
    /// Compacts at `current - back`; -1 asks for a future revision.
    Compact {
        back: i64,
    },
    Grant,
    Revoke {
        slot: u8,
    },
    SnapshotRestore,
}

fn arb_txn_step() -> impl Strategy<Value = TxnStep> {
    prop_oneof![
        3 => (0..KEYS, any::<u8>()).prop_map(|(k, v)| TxnStep::Put(k, v)),
        1 => (0..KEYS).prop_map(TxnStep::Del),
    ]
}

fn txn_steps(max: usize) -> impl Strategy<Value = Vec<TxnStep>> {
    prop::collection::vec(arb_txn_step(), 0..max)
}

fn arb_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (0..KEYS, any::<u8>(), prop::option::weighted(0.25, 0..LEASE_SLOTS))
            .prop_map(|(key, value, lease)| Step::Put { key, value, lease }),
        3 => (0..KEYS, prop::option::of(0..=KEYS)).prop_map(|(key, end)| Step::Delete { key, end }),
        3 => (0..KEYS, 0..3i64, txn_steps(4), txn_steps(3))
            .prop_map(|(key, version, success, failure)| {
                Step::Txn { key, version, success, failure }
            }),
        1 => (-1..8i64).prop_map(|back| Step::Compact { back }),
        1 => Just(Step::Grant),
        1 => (0..LEASE_SLOTS).prop_map(|slot| Step::Revoke { slot }),
        1 => Just(Step::SnapshotRestore),
    ]
}

type State = BTreeMap<Bytes, KeyValue>;

/// The obviously-correct version: a whole copy of the key space per revision.
struct Model {
    /// `states[r]` is the key space at revision `r`; revision 0 does not exist and 1 is the empty
    /// store.
    states: Vec<State>,
    compacted: i64,
    leases: BTreeSet<i64>,
    granted: i64,
    events: Vec<Event>,
}

impl Model {
    fn new() -> Model {
        Model {
            states: vec![State::new(), State::new()],
            compacted: 0,
            leases: BTreeSet::new(),
            granted: 0,
            events: vec![],
        }
    }

    fn revision(&self) -> i64 {
        self.states.len() as i64 - 1
    }

    fn current(&self) -> &State {
        &self.states[self.states.len() - 1]
    }

    fn put(
        state: &mut State,
        events: &mut Vec<Event>,
        rev: i64,
        k: Bytes,
        value: Bytes,
        lease: i64,
    ) {
        let prev = state.get(&k).cloned();
        let kv = KeyValue {
            key: k.clone(),
            create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
            mod_revision: rev,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
            value,
            lease,
        };
        state.insert(k, kv.clone());
        events.push(Event {
            kind: EventKind::Put,
            kv,
            prev_kv: prev,
        });
    }

    fn delete(state: &mut State, events: &mut Vec<Event>, rev: i64, k: &Bytes) {
        if let Some(prev) = state.remove(k) {
            let kv = KeyValue {
                key: k.clone(),
                mod_revision: rev,
                ..Default::default()
            };
            events.push(Event {
                kind: EventKind::Delete,
                kv,
                prev_kv: Some(prev),
            });
        }
    }

    /// Runs `f` on a copy of the current state at the next revision; keeps the result only if it
    /// changed something.
    fn write(&mut self, f: impl FnOnce(&mut State, &mut Vec<Event>, i64)) {
        let mut state = self.current().clone();
        let mut events = Vec::new();
        f(&mut state, &mut events, self.revision() + 1);
        if !events.is_empty() {
            self.states.push(state);
            self.events.extend(events);
        }
    }

    fn apply(&mut self, step: &Step) -> Result<(), Error> {
        match step {
            Step::Put {
                key: k,
                value,
                lease,
            } => {
                let lease = lease.map_or(0, |slot| i64::from(slot) + 1);
                if lease != 0 && !self.leases.contains(&lease) {
                    return Err(Error::LeaseNotFound);
                }
                self.write(|s, e, rev| {
                    Model::put(s, e, rev, key(*k), Bytes::from(vec![*value]), lease)
                });
            }
            Step::Delete { key: k, end } => {
                let start = key(*k);
                let doomed: Vec<Bytes> = match end {
                    None => vec![start],
                    Some(e) if *e >= KEYS => self
                        .current()
                        .range(start..)
                        .map(|(k, _)| k.clone())
                        .collect(),
                    Some(e) if key(*e) > start => self
                        .current()
                        .range(start..key(*e))
                        .map(|(k, _)| k.clone())
                        .collect(),
                    Some(_) => vec![],
                };
                self.write(|s, e, rev| doomed.iter().for_each(|k| Model::delete(s, e, rev, k)));
            }
            Step::Txn {
                key: k,
                version,
                success,
                failure,
            } => {
                let duplicate = |steps: &[TxnStep]| {
                    let mut puts = BTreeSet::new();
                    let dels: BTreeSet<u8> = steps
                        .iter()
                        .filter_map(|s| {
                            if let TxnStep::Del(k) = s {
                                Some(*k)
                            } else {
                                None
                            }
                        })
                        .collect();
                    steps.iter().any(
                        |s| matches!(s, TxnStep::Put(k, _) if !puts.insert(*k) || dels.contains(k)),
                    )
                };
                if duplicate(success) || duplicate(failure) {
                    return Err(Error::DuplicateKey);
                }
                let current_version = self.current().get(&key(*k)).map_or(0, |kv| kv.version);
                let steps = if current_version == *version {
                    success
                } else {
                    failure
                };
                self.write(|s, e, rev| {
                    for step in steps {
                        match step {
                            TxnStep::Put(k, v) => {
                                Model::put(s, e, rev, key(*k), Bytes::from(vec![*v]), 0)
                            }
                            TxnStep::Del(k) => Model::delete(s, e, rev, &key(*k)),
                        }
                    }
                });
            }
            Step::Compact { back } => {
                let rev = self.revision() - back;
                if rev <= self.compacted {
                    return Err(Error::Compacted);
                }
                if rev > self.revision() {
                    return Err(Error::FutureRevision);
                }
                self.compacted = rev;
            }
            Step::Grant => {
                self.granted += 1;
                self.leases.insert(self.granted);
            }
            Step::Revoke { slot } => {
                let id = i64::from(*slot) + 1;
                if !self.leases.remove(&id) {
                    return Err(Error::LeaseNotFound);
                }
                let doomed: Vec<Bytes> = self
                    .current()
                    .values()
                    .filter(|kv| kv.lease == id)
                    .map(|kv| kv.key.clone())
                    .collect();
                self.write(|s, e, rev| doomed.iter().for_each(|k| Model::delete(s, e, rev, k)));
            }
            Step::SnapshotRestore => {}
        }
        Ok(())
    }
}

fn to_op(step: &Step) -> Option<Op> {
    let txn_op = |s: &TxnStep| match s {
        TxnStep::Put(k, v) => RequestOp::Put(PutRequest {
            key: key(*k),
            value: Bytes::from(vec![*v]),
            ..Default::default()
        }),
        TxnStep::Del(k) => RequestOp::DeleteRange(DeleteRangeRequest {
            key: key(*k),
            ..Default::default()
        }),
    };
    Some(match step {
        Step::Put {
            key: k,
            value,
            lease,
        } => Op::Put(PutRequest {
            key: key(*k),
            value: Bytes::from(vec![*value]),
            lease: lease.map_or(0, |slot| i64::from(slot) + 1),
            ..Default::default()
        }),
        Step::Delete { key: k, end } => Op::DeleteRange(DeleteRangeRequest {
            key: key(*k),
            range_end: end.map_or(Bytes::new(), range_end),
            prev_kv: true,
        }),
        Step::Txn {
            key: k,
            version,
            success,
            failure,
        } => Op::Txn(TxnRequest {
            compare: vec![Compare {
                result: CompareResult::Equal,
                target: CompareTarget::Version(*version),
                key: key(*k),
                range_end: Bytes::new(),
            }],
            success: success.iter().map(txn_op).collect(),
            failure: failure.iter().map(txn_op).collect(),
        }),
        Step::Compact { .. } => return None,
        Step::Grant => Op::LeaseGrant(LeaseGrantRequest { id: 0, ttl: 10 }),
        Step::Revoke { slot } => Op::LeaseRevoke(LeaseRevokeRequest {
            id: i64::from(*slot) + 1,
        }),
        Step::SnapshotRestore => return None,
    })
}

fn all_at(revision: i64) -> RangeRequest {
    RangeRequest {
        key: Bytes::from_static(b"\0"),
        range_end: Bytes::from_static(b"\0"),
        revision,
        ..Default::default()
    }
}

fn check_agreement(store: &Store, model: &Model) -> Result<(), TestCaseError> {
    prop_assert_eq!(store.revision(), model.revision());
    prop_assert_eq!(store.compact_revision(), model.compacted);
    prop_assert_eq!(store.len(), model.current().len());
    for rev in model.compacted.max(1)..=model.revision() {
        let want: Vec<KeyValue> = model.states[rev as usize].values().cloned().collect();
        let got = store
            .range(&all_at(rev))
            .map_err(|e| TestCaseError::fail(format!("range at {rev}: {e}")))?;
        prop_assert_eq!(&got.kvs, &want, "all keys at revision {}", rev);
        prop_assert_eq!(got.count, want.len() as i64);
        prop_assert_eq!(got.revision, model.revision());
        // A bounded range with a limit: [b, e), at most one key.
        let sub = RangeRequest {
            key: key(1),
            range_end: key(4),
            limit: 1,
            ..all_at(rev)
        };
        let in_sub: Vec<&KeyValue> = want
            .iter()
            .filter(|kv| kv.key >= key(1) && kv.key < key(4))
            .collect();
        let got = store.range(&sub).unwrap();
        prop_assert_eq!(got.kvs.first(), in_sub.first().copied());
        prop_assert_eq!(
            (got.count, got.more),
            (in_sub.len() as i64, in_sub.len() > 1)
        );
    }
    if model.compacted > 1 {
        prop_assert_eq!(
            store.range(&all_at(model.compacted - 1)),
            Err(Error::Compacted)
        );
    }
    prop_assert_eq!(
        store.range(&all_at(model.revision() + 1)),
        Err(Error::FutureRevision)
    );

    let since = model.compacted + 1;
    let want: Vec<Event> = model
        .events
        .iter()
        .filter(|e| e.kv.mod_revision >= since)
        .cloned()
        .collect();
    prop_assert_eq!(
        store.events_since(since, b"\0", b"\0").unwrap(),
        want.clone()
    );
    let one_key: Vec<Event> = want
        .iter()
        .filter(|e| e.kv.key == key(2))
        .cloned()
        .collect();
    prop_assert_eq!(store.events_since(since, &key(2), b"").unwrap(), one_key);
    if model.compacted > 0 {
        // From the compaction point itself, as in etcd: its changes, without the versions they
        // replaced (compacted away).
        let at_point: Vec<Event> = model
            .events
            .iter()
            .filter(|e| e.kv.mod_revision >= model.compacted)
            .cloned()
            .map(|mut e| {
                if e.kv.mod_revision == model.compacted {
                    e.prev_kv = None;
                }
                e
            })
            .collect();
        prop_assert_eq!(
            store.events_since(model.compacted, b"\0", b"\0").unwrap(),
            at_point
        );
    }
    if model.compacted > 1 {
        prop_assert_eq!(
            store.events_since(model.compacted - 1, b"\0", b"\0"),
            Err(Error::Compacted)
        );
    }

    prop_assert_eq!(
        store.leases().iter().map(|l| l.id).collect::<BTreeSet<_>>(),
        model.leases.clone()
    );
    for &id in &model.leases {
        let want: Vec<Bytes> = model
            .current()
            .values()
            .filter(|kv| kv.lease == id)
            .map(|kv| kv.key.clone())
            .collect();
        prop_assert_eq!(store.lease_keys(id).unwrap(), want);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 1000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn store_agrees_with_the_model(steps in prop::collection::vec(arb_step(), 1..80)) {
        let mut kv = Kv::new();
        let mut model = Model::new();
        for step in &steps {
            let events_before = model.events.len();
            let want = model.apply(step);
            match step {
                Step::SnapshotRestore => {
                    let restored = Store::restore(&kv.store.snapshot()).unwrap();
                    prop_assert_eq!(restored.hash(), kv.store.hash());
                    prop_assert_eq!(&restored, &kv.store);
                    kv.store = restored;
                }
                Step::Compact { back } => {
                    let revision = kv.store.revision() - back;
                    let got = kv.apply(Op::Compact(CompactRequest { revision })).result;
                    prop_assert_eq!(got.map(|_| ()), want);
                }
                _ => {
                    let op = to_op(step).expect("every other step is an op");
                    let applied = kv.apply_cmd(&Command::new(op));
                    let outcome = applied.result.as_ref().map(|_| ()).map_err(Clone::clone);
                    prop_assert_eq!(outcome, want);
                    prop_assert_eq!(&applied.events[..], &model.events[events_before..]);
                    if let Ok(Response::Put(p)) = &applied.result {
                        prop_assert_eq!(p.revision, model.revision());
                    }
                }
            }
            check_agreement(&kv.store, &model)?;
        }
    }
}
