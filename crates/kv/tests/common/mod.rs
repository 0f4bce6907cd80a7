//! Shorthands shared by the integration tests.
#![allow(dead_code)]

use bytes::Bytes;
use keel_kv::{
    Applied, Command, CompactRequest, Compare, CompareResult, CompareTarget, DeleteRangeRequest,
    DeleteRangeResponse, Error, KeyValue, LeaseGrantRequest, LeaseRevokeRequest, Op, PutRequest,
    PutResponse, RangeRequest, RangeResponse, RequestOp, Response, Store, TxnRequest, TxnResponse,
};

pub fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

pub fn put_req(k: &str, v: &str) -> PutRequest {
    PutRequest {
        key: b(k),
        value: b(v),
        ..Default::default()
    }
}

pub fn put_op(k: &str, v: &str) -> RequestOp {
    RequestOp::Put(put_req(k, v))
}

pub fn del_op(k: &str, end: &str) -> RequestOp {
    RequestOp::DeleteRange(DeleteRangeRequest {
        key: b(k),
        range_end: b(end),
        prev_kv: false,
    })
}

pub fn range_req(k: &str, end: &str) -> RangeRequest {
    RangeRequest {
        key: b(k),
        range_end: b(end),
        ..Default::default()
    }
}

pub fn range_op(k: &str, end: &str) -> RequestOp {
    RequestOp::Range(range_req(k, end))
}

pub fn cmp(k: &str, result: CompareResult, target: CompareTarget) -> Compare {
    Compare {
        result,
        target,
        key: b(k),
        range_end: Bytes::new(),
    }
}

pub fn keys(kvs: &[KeyValue]) -> Vec<String> {
    kvs.iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect()
}

pub fn values(kvs: &[KeyValue]) -> Vec<String> {
    kvs.iter()
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
        .collect()
}

/// A store with its own index counter, so that tests read as a list of writes.
pub struct Kv {
    pub store: Store,
    pub index: u64,
}

impl Default for Kv {
    fn default() -> Self {
        Kv::new()
    }
}

impl Kv {
    pub fn new() -> Kv {
        Kv {
            store: Store::new(),
            index: 0,
        }
    }

    pub fn apply_cmd(&mut self, cmd: &Command) -> Applied {
        self.index += 1;
        self.store.apply(self.index, cmd)
    }

    pub fn apply(&mut self, op: Op) -> Applied {
        self.apply_cmd(&Command::new(op))
    }

    pub fn ok(&mut self, op: Op) -> Response {
        let applied = self.apply(op);
        applied
            .result
            .unwrap_or_else(|e| panic!("unexpected error {e}"))
    }

    pub fn err(&mut self, op: Op) -> Error {
        let mut expected = self.store.clone();
        let applied = self.apply(op);
        assert!(applied.events.is_empty(), "a failed op produced events");
        // A refused op changes nothing but the applied index, exactly like a no-op.
        expected.apply(self.index, &Command::new(Op::Noop));
        assert_eq!(self.store, expected, "a failed op changed the store");
        applied.result.expect_err("expected an error")
    }

    pub fn put(&mut self, k: &str, v: &str) -> PutResponse {
        match self.ok(Op::Put(put_req(k, v))) {
            Response::Put(r) => r,
            other => panic!("{other:?}"),
        }
    }

    pub fn put_with(&mut self, p: PutRequest) -> Result<PutResponse, Error> {
        self.apply(Op::Put(p)).result.map(|r| match r {
            Response::Put(r) => r,
            other => panic!("{other:?}"),
        })
    }

    pub fn delete(&mut self, k: &str, end: &str) -> DeleteRangeResponse {
        let req = DeleteRangeRequest {
            key: b(k),
            range_end: b(end),
            prev_kv: true,
        };
        match self.ok(Op::DeleteRange(req)) {
            Response::DeleteRange(r) => r,
            other => panic!("{other:?}"),
        }
    }

    pub fn txn(&mut self, t: TxnRequest) -> Result<TxnResponse, Error> {
        self.apply(Op::Txn(t)).result.map(|r| match r {
            Response::Txn(r) => r,
            other => panic!("{other:?}"),
        })
    }

    pub fn compact(&mut self, revision: i64) -> Result<Response, Error> {
        self.apply(Op::Compact(CompactRequest { revision })).result
    }

    pub fn grant(&mut self, id: i64, ttl: i64) -> Result<i64, Error> {
        self.apply(Op::LeaseGrant(LeaseGrantRequest { id, ttl }))
            .result
            .map(|r| match r {
                Response::LeaseGrant(g) => g.id,
                other => panic!("{other:?}"),
            })
    }

    pub fn revoke(&mut self, id: i64) -> Applied {
        self.apply(Op::LeaseRevoke(LeaseRevokeRequest { id }))
    }

    pub fn get(&self, k: &str) -> Option<KeyValue> {
        self.store.get(k.as_bytes())
    }

    pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse, Error> {
        self.store.range(req)
    }
}
