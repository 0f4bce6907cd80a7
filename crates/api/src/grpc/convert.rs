//! etcd's wire messages to and from the state machine's types. The state machine follows
//! etcd's field meanings one to one (see `keel_kv::types`), so this is a mechanical mapping;
//! the only judgement here is refusing enum values etcd does not define.

use keel_etcdpb::etcdserverpb as pb;
use keel_etcdpb::mvccpb;
use keel_kv as kv;
use tonic::Status;

pub fn kv_out(k: kv::KeyValue) -> mvccpb::KeyValue {
    mvccpb::KeyValue {
        key: k.key,
        create_revision: k.create_revision,
        mod_revision: k.mod_revision,
        version: k.version,
        value: k.value,
        lease: k.lease,
    }
}

fn invalid(what: &str, v: i32) -> Status {
    Status::invalid_argument(format!("etcdserver: invalid {what} {v}"))
}

pub fn range_in(r: pb::RangeRequest) -> Result<kv::RangeRequest, Status> {
    use pb::range_request::{SortOrder as O, SortTarget as T};
    let sort_order =
        match O::try_from(r.sort_order).map_err(|_| invalid("sort order", r.sort_order))? {
            O::None => kv::SortOrder::None,
            O::Ascend => kv::SortOrder::Ascend,
            O::Descend => kv::SortOrder::Descend,
        };
    let sort_target =
        match T::try_from(r.sort_target).map_err(|_| invalid("sort target", r.sort_target))? {
            T::Key => kv::SortTarget::Key,
            T::Version => kv::SortTarget::Version,
            T::Create => kv::SortTarget::Create,
            T::Mod => kv::SortTarget::Mod,
            T::Value => kv::SortTarget::Value,
        };
    Ok(kv::RangeRequest {
        key: r.key,
        range_end: r.range_end,
        limit: r.limit,
        revision: r.revision,
        sort_order,
        sort_target,
        keys_only: r.keys_only,
        count_only: r.count_only,
        min_mod_revision: r.min_mod_revision,
        max_mod_revision: r.max_mod_revision,
        min_create_revision: r.min_create_revision,
        max_create_revision: r.max_create_revision,
    })
}

pub fn range_out(r: kv::RangeResponse, header: Option<pb::ResponseHeader>) -> pb::RangeResponse {
    pb::RangeResponse {
        header,
        kvs: r.kvs.into_iter().map(kv_out).collect(),
        more: r.more,
        count: r.count,
    }
}

pub fn put_in(r: pb::PutRequest) -> kv::PutRequest {
    kv::PutRequest {
        key: r.key,
        value: r.value,
        lease: r.lease,
        prev_kv: r.prev_kv,
        ignore_value: r.ignore_value,
        ignore_lease: r.ignore_lease,
    }
}

pub fn put_out(r: kv::PutResponse, header: Option<pb::ResponseHeader>) -> pb::PutResponse {
    pb::PutResponse {
        header,
        prev_kv: r.prev_kv.map(kv_out),
    }
}

pub fn delete_in(r: pb::DeleteRangeRequest) -> kv::DeleteRangeRequest {
    kv::DeleteRangeRequest {
        key: r.key,
        range_end: r.range_end,
        prev_kv: r.prev_kv,
    }
}

pub fn delete_out(
    r: kv::DeleteRangeResponse,
    header: Option<pb::ResponseHeader>,
) -> pb::DeleteRangeResponse {
    pb::DeleteRangeResponse {
        header,
        deleted: r.deleted,
        prev_kvs: r.prev_kvs.into_iter().map(kv_out).collect(),
    }
}

fn compare_in(c: pb::Compare) -> Result<kv::Compare, Status> {
    use pb::compare::{CompareResult as R, CompareTarget as T, TargetUnion as U};
    let result = match R::try_from(c.result).map_err(|_| invalid("compare result", c.result))? {
        R::Equal => kv::CompareResult::Equal,
        R::Greater => kv::CompareResult::Greater,
        R::Less => kv::CompareResult::Less,
        R::NotEqual => kv::CompareResult::NotEqual,
    };
    // The union may be absent (a zero value is not sent); the target says which field is meant,
    // and an absent value is that field's zero, as in etcd.
    let num = |want: fn(&U) -> Option<i64>| c.target_union.as_ref().and_then(want).unwrap_or(0);
    let target = match T::try_from(c.target).map_err(|_| invalid("compare target", c.target))? {
        T::Version => kv::CompareTarget::Version(num(|u| match u {
            U::Version(v) => Some(*v),
            _ => None,
        })),
        T::Create => kv::CompareTarget::Create(num(|u| match u {
            U::CreateRevision(v) => Some(*v),
            _ => None,
        })),
        T::Mod => kv::CompareTarget::Mod(num(|u| match u {
            U::ModRevision(v) => Some(*v),
            _ => None,
        })),
        T::Lease => kv::CompareTarget::Lease(num(|u| match u {
            U::Lease(v) => Some(*v),
            _ => None,
        })),
        T::Value => kv::CompareTarget::Value(match &c.target_union {
            Some(U::Value(v)) => v.clone(),
            _ => Default::default(),
        }),
    };
    Ok(kv::Compare {
        result,
        target,
        key: c.key,
        range_end: c.range_end,
    })
}

fn op_in(op: pb::RequestOp, depth: usize) -> Result<kv::RequestOp, Status> {
    use pb::request_op::Request as R;
    match op.request {
        Some(R::RequestRange(r)) => Ok(kv::RequestOp::Range(range_in(r)?)),
        Some(R::RequestPut(r)) => Ok(kv::RequestOp::Put(put_in(r))),
        Some(R::RequestDeleteRange(r)) => Ok(kv::RequestOp::DeleteRange(delete_in(r))),
        Some(R::RequestTxn(t)) => Ok(kv::RequestOp::Txn(txn_in_at(t, depth + 1)?)),
        None => Err(Status::invalid_argument("etcdserver: request op is empty")),
    }
}

/// Nesting is bounded here as well as in the state machine: conversion recurses too.
fn txn_in_at(t: pb::TxnRequest, depth: usize) -> Result<kv::TxnRequest, Status> {
    if depth > keel_kv::MAX_TXN_DEPTH {
        return Err(Status::invalid_argument(kv::Error::TxnTooDeep.to_string()));
    }
    Ok(kv::TxnRequest {
        compare: t
            .compare
            .into_iter()
            .map(compare_in)
            .collect::<Result<_, _>>()?,
        success: t
            .success
            .into_iter()
            .map(|o| op_in(o, depth))
            .collect::<Result<_, _>>()?,
        failure: t
            .failure
            .into_iter()
            .map(|o| op_in(o, depth))
            .collect::<Result<_, _>>()?,
    })
}

pub fn txn_in(t: pb::TxnRequest) -> Result<kv::TxnRequest, Status> {
    txn_in_at(t, 1)
}

/// Nested responses carry a header with only the txn's revision, as etcd's do.
pub fn txn_out(t: kv::TxnResponse, header: Option<pb::ResponseHeader>) -> pb::TxnResponse {
    use pb::response_op::Response as R;
    let inner = Some(pb::ResponseHeader {
        revision: t.revision,
        ..Default::default()
    });
    pb::TxnResponse {
        header,
        succeeded: t.succeeded,
        responses: t
            .responses
            .into_iter()
            .map(|r| pb::ResponseOp {
                response: Some(match r {
                    kv::ResponseOp::Range(r) => R::ResponseRange(range_out(r, inner)),
                    kv::ResponseOp::Put(r) => R::ResponsePut(put_out(r, inner)),
                    kv::ResponseOp::DeleteRange(r) => R::ResponseDeleteRange(delete_out(r, inner)),
                    kv::ResponseOp::Txn(t) => R::ResponseTxn(txn_out(t, inner)),
                }),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn enums_outside_etcds_are_refused() {
        let r = pb::RangeRequest {
            key: Bytes::from_static(b"a"),
            sort_order: 7,
            ..Default::default()
        };
        assert_eq!(
            range_in(r).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let c = pb::Compare {
            result: 9,
            ..Default::default()
        };
        let t = pb::TxnRequest {
            compare: vec![c],
            ..Default::default()
        };
        assert_eq!(txn_in(t).unwrap_err().code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn compare_targets_take_their_union_or_zero() {
        use pb::compare::{CompareTarget as T, TargetUnion as U};
        let c = pb::Compare {
            target: T::Mod as i32,
            target_union: Some(U::ModRevision(5)),
            key: Bytes::from_static(b"k"),
            ..Default::default()
        };
        let v = pb::Compare {
            target: T::Value as i32,
            key: Bytes::from_static(b"k"),
            ..Default::default()
        };
        let t = txn_in(pb::TxnRequest {
            compare: vec![c, v],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(t.compare[0].target, kv::CompareTarget::Mod(5));
        assert_eq!(t.compare[1].target, kv::CompareTarget::Value(Bytes::new()));
    }

    #[test]
    fn nesting_is_bounded() {
        let mut t = pb::TxnRequest::default();
        for _ in 0..keel_kv::MAX_TXN_DEPTH + 1 {
            t = pb::TxnRequest {
                success: vec![pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestTxn(t)),
                }],
                ..Default::default()
            };
        }
        assert_eq!(txn_in(t).unwrap_err().code(), tonic::Code::InvalidArgument);
    }
}
