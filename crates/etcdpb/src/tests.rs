//! Wire-contract tests: encodings are computed by hand from etcd's field numbers
//! (tag byte = field_number << 3 | wire_type; wire type 0 = varint, 2 = length-delimited),
//! so a wrong field number, field type or oneof member in the .proto files fails here.

use bytes::Bytes;
use prost::Message;

use crate::authpb::{permission, Permission};
use crate::etcdserverpb::*;
use crate::mvccpb::{event, Event, KeyValue};

fn b(s: &'static [u8]) -> Bytes {
    Bytes::from_static(s)
}

/// Asserts the exact encoding, then that it decodes back to the same message.
fn check<M: Message + Default + PartialEq + std::fmt::Debug>(msg: &M, want: &[u8]) {
    let got = msg.encode_to_vec();
    assert_eq!(got, want, "encoding of {msg:?}");
    assert_eq!(&M::decode(want).expect("decode"), msg);
}

#[test]
fn response_header() {
    let h = ResponseHeader {
        cluster_id: 1,
        member_id: 128,
        revision: 3,
        raft_term: 4,
    };
    check(&h, &[0x08, 0x01, 0x10, 0x80, 0x01, 0x18, 0x03, 0x20, 0x04]);
}

#[test]
fn put_request() {
    let p = PutRequest {
        key: b(b"foo"),
        value: b(b"bar"),
        lease: 0x1234,
        prev_kv: true,
        ignore_value: true,
        ignore_lease: true,
    };
    #[rustfmt::skip]
    let want = [
        0x0a, 3, b'f', b'o', b'o', // 1: key
        0x12, 3, b'b', b'a', b'r', // 2: value
        0x18, 0xb4, 0x24,          // 3: lease = 4660
        0x20, 1,                   // 4: prev_kv
        0x28, 1,                   // 5: ignore_value
        0x30, 1,                   // 6: ignore_lease
    ];
    check(&p, &want);
}

#[test]
fn range_request() {
    let r = RangeRequest {
        key: b(b"a"),
        range_end: b(b"b"),
        limit: 10,
        revision: 300,
        sort_order: range_request::SortOrder::Descend as i32,
        sort_target: range_request::SortTarget::Mod as i32,
        serializable: true,
        keys_only: true,
        count_only: true,
        min_mod_revision: 5,
        max_mod_revision: 6,
        min_create_revision: 7,
        max_create_revision: 8,
    };
    #[rustfmt::skip]
    let want = [
        0x0a, 1, b'a',    // 1: key
        0x12, 1, b'b',    // 2: range_end
        0x18, 10,         // 3: limit
        0x20, 0xac, 0x02, // 4: revision = 300
        0x28, 2,          // 5: sort_order = DESCEND
        0x30, 3,          // 6: sort_target = MOD
        0x38, 1,          // 7: serializable
        0x40, 1,          // 8: keys_only
        0x48, 1,          // 9: count_only
        0x50, 5,          // 10: min_mod_revision
        0x58, 6,          // 11: max_mod_revision
        0x60, 7,          // 12: min_create_revision
        0x68, 8,          // 13: max_create_revision
    ];
    check(&r, &want);
}

#[test]
fn range_response_with_key_value() {
    let kv = KeyValue {
        key: b(b"k"),
        create_revision: 2,
        mod_revision: 3,
        version: 4,
        value: b(b"v"),
        lease: 6,
    };
    #[rustfmt::skip]
    let kv_bytes = [
        0x0a, 1, b'k', // 1: key
        0x10, 2,       // 2: create_revision
        0x18, 3,       // 3: mod_revision
        0x20, 4,       // 4: version
        0x2a, 1, b'v', // 5: value
        0x30, 6,       // 6: lease
    ];
    check(&kv, &kv_bytes);

    let resp = RangeResponse {
        header: Some(ResponseHeader {
            revision: 9,
            ..Default::default()
        }),
        kvs: vec![kv],
        more: true,
        count: 2,
    };
    let mut want = vec![0x0a, 2, 0x18, 9]; // 1: header { 3: revision }
    want.extend_from_slice(&[0x12, kv_bytes.len() as u8]); // 2: kvs
    want.extend_from_slice(&kv_bytes);
    want.extend_from_slice(&[0x18, 1, 0x20, 2]); // 3: more, 4: count
    check(&resp, &want);
}

#[test]
fn compare_mod_revision_and_range_end() {
    let c = Compare {
        result: compare::CompareResult::Greater as i32,
        target: compare::CompareTarget::Mod as i32,
        key: b(b"k"),
        target_union: Some(compare::TargetUnion::ModRevision(100)),
        range_end: b(b"z"),
    };
    #[rustfmt::skip]
    let want = [
        0x08, 1,             // 1: result = GREATER
        0x10, 2,             // 2: target = MOD
        0x1a, 1, b'k',       // 3: key
        0x30, 100,           // 6: mod_revision
        0x82, 0x04, 1, b'z', // 64: range_end (tag 514 as a varint)
    ];
    check(&c, &want);

    // The other members of target_union: 4 version, 5 create_revision, 7 value, 8 lease.
    let member = |u: compare::TargetUnion| Compare {
        target_union: Some(u),
        ..Default::default()
    };
    check(&member(compare::TargetUnion::Version(1)), &[0x20, 1]);
    check(&member(compare::TargetUnion::CreateRevision(1)), &[0x28, 1]);
    check(
        &member(compare::TargetUnion::Value(b(b"x"))),
        &[0x3a, 1, b'x'],
    );
    check(&member(compare::TargetUnion::Lease(1)), &[0x40, 1]);
}

#[test]
fn txn_request_ops() {
    let put = |k: &'static [u8]| RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: b(k),
            ..Default::default()
        })),
    };
    let t = TxnRequest {
        compare: vec![Compare {
            target: compare::CompareTarget::Version as i32,
            key: b(b"a"),
            target_union: Some(compare::TargetUnion::Version(0)),
            ..Default::default()
        }],
        success: vec![put(b"s")],
        failure: vec![RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest {
                key: b(b"f"),
                ..Default::default()
            })),
        }],
    };
    #[rustfmt::skip]
    let want = [
        0x0a, 5, 0x1a, 1, b'a', 0x20, 0,       // 1: compare { 3: key, 4: version = 0 }
        0x12, 5, 0x12, 3, 0x0a, 1, b's',       // 2: success { 2: request_put { 1: key } }
        0x1a, 5, 0x0a, 3, 0x0a, 1, b'f',       // 3: failure { 1: request_range { 1: key } }
    ];
    check(&t, &want);

    let r = TxnResponse {
        header: None,
        succeeded: true,
        responses: vec![
            ResponseOp {
                response: Some(response_op::Response::ResponseDeleteRange(
                    DeleteRangeResponse {
                        deleted: 1,
                        ..Default::default()
                    },
                )),
            },
            ResponseOp {
                response: Some(response_op::Response::ResponseTxn(TxnResponse::default())),
            },
        ],
    };
    #[rustfmt::skip]
    let want = [
        0x10, 1,                         // 2: succeeded
        0x1a, 4, 0x1a, 2, 0x10, 1,       // 3: responses { 3: response_delete_range { 2: deleted } }
        0x1a, 2, 0x22, 0,                // 3: responses { 4: response_txn {} }
    ];
    check(&r, &want);
}

#[test]
fn watch_requests() {
    let create = WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: b(b"k"),
                range_end: b(b"l"),
                start_revision: 7,
                progress_notify: true,
                filters: vec![watch_create_request::FilterType::Nodelete as i32],
                prev_kv: true,
                watch_id: 9,
                fragment: true,
            },
        )),
    };
    #[rustfmt::skip]
    let want = [
        0x0a, 19,       // 1: create_request
        0x0a, 1, b'k',  //   1: key
        0x12, 1, b'l',  //   2: range_end
        0x18, 7,        //   3: start_revision
        0x20, 1,        //   4: progress_notify
        0x2a, 1, 1,     //   5: filters = [NODELETE], packed
        0x30, 1,        //   6: prev_kv
        0x38, 9,        //   7: watch_id
        0x40, 1,        //   8: fragment
    ];
    check(&create, &want);

    let cancel = WatchRequest {
        request_union: Some(watch_request::RequestUnion::CancelRequest(
            WatchCancelRequest { watch_id: 5 },
        )),
    };
    check(&cancel, &[0x12, 2, 0x08, 5]);

    let progress = WatchRequest {
        request_union: Some(watch_request::RequestUnion::ProgressRequest(
            WatchProgressRequest {},
        )),
    };
    check(&progress, &[0x1a, 0]);
}

#[test]
fn watch_response_with_event() {
    let w = WatchResponse {
        header: None,
        watch_id: 2,
        created: true,
        canceled: true,
        compact_revision: 5,
        cancel_reason: "x".into(),
        fragment: true,
        events: vec![Event {
            r#type: event::EventType::Delete as i32,
            kv: Some(KeyValue {
                key: b(b"k"),
                ..Default::default()
            }),
            prev_kv: Some(KeyValue::default()),
        }],
    };
    #[rustfmt::skip]
    let want = [
        0x10, 2,          // 2: watch_id
        0x18, 1,          // 3: created
        0x20, 1,          // 4: canceled
        0x28, 5,          // 5: compact_revision
        0x32, 1, b'x',    // 6: cancel_reason
        0x38, 1,          // 7: fragment
        0x5a, 9,          // 11: events
        0x08, 1,          //   1: type = DELETE
        0x12, 3, 0x0a, 1, b'k', // 2: kv { 1: key }
        0x1a, 0,          //   3: prev_kv {}
    ];
    check(&w, &want);
}

#[test]
fn lease_messages() {
    check(
        &LeaseGrantRequest { ttl: 60, id: 16 },
        &[0x08, 60, 0x10, 16],
    );
    check(
        &LeaseKeepAliveResponse {
            header: None,
            id: 1,
            ttl: 2,
        },
        &[0x10, 1, 0x18, 2],
    );
    // int64 (not sint64): -1 is a ten-byte varint.
    let ttl = LeaseTimeToLiveResponse {
        header: None,
        id: 7,
        ttl: -1,
        granted_ttl: 10,
        keys: vec![b(b"a")],
    };
    #[rustfmt::skip]
    let want = [
        0x10, 7,                                                      // 2: ID
        0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, // 3: TTL = -1
        0x20, 10,                                                     // 4: grantedTTL
        0x2a, 1, b'a',                                                // 5: keys
    ];
    check(&ttl, &want);
}

#[test]
fn cluster_and_maintenance_messages() {
    let m = Member {
        id: 1,
        name: "n".into(),
        peer_ur_ls: vec!["p".into()],
        client_ur_ls: vec!["c".into()],
        is_learner: true,
    };
    #[rustfmt::skip]
    let want = [0x08, 1, 0x12, 1, b'n', 0x1a, 1, b'p', 0x22, 1, b'c', 0x28, 1];
    check(&m, &want);

    check(&MemberListRequest { linearizable: true }, &[0x08, 1]);

    let s = StatusResponse {
        header: None,
        version: "3".into(),
        db_size: 3,
        leader: 4,
        raft_index: 5,
        raft_term: 6,
        raft_applied_index: 7,
        errors: vec!["e".into()],
        db_size_in_use: 9,
        is_learner: true,
    };
    #[rustfmt::skip]
    let want = [
        0x12, 1, b'3', 0x18, 3, 0x20, 4, 0x28, 5, 0x30, 6, 0x38, 7,
        0x42, 1, b'e', 0x48, 9, 0x50, 1,
    ];
    check(&s, &want);

    let a = AlarmRequest {
        action: alarm_request::AlarmAction::Deactivate as i32,
        member_id: 3,
        alarm: AlarmType::Corrupt as i32,
    };
    check(&a, &[0x08, 2, 0x10, 3, 0x18, 2]);
}

#[test]
fn auth_messages() {
    let g = AuthRoleGrantPermissionRequest {
        name: "r".into(),
        perm: Some(Permission {
            perm_type: permission::Type::Readwrite as i32,
            key: b(b"a"),
            range_end: b(b"b"),
        }),
    };
    #[rustfmt::skip]
    let want = [
        0x0a, 1, b'r',                                 // 1: name
        0x12, 8, 0x08, 2, 0x12, 1, b'a', 0x1a, 1, b'b', // 2: perm { 1: permType, 2: key, 3: range_end }
    ];
    check(&g, &want);

    check(
        &AuthUserAddRequest {
            name: "u".into(),
            password: "p".into(),
            options: Some(crate::authpb::UserAddOptions { no_password: true }),
            hashed_password: "h".into(),
        },
        &[
            0x0a, 1, b'u', 0x12, 1, b'p', 0x1a, 2, 0x08, 1, 0x22, 1, b'h',
        ],
    );
}

/// Service and RPC names (and which side streams) form the gRPC paths clients call.
#[test]
fn services_and_rpcs() {
    let fds = prost_types::FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET).unwrap();
    let mut got = Vec::new();
    for file in &fds.file {
        for svc in &file.service {
            for m in &svc.method {
                got.push(format!(
                    "/{}.{}/{}{}{}",
                    file.package(),
                    svc.name(),
                    m.name(),
                    if m.client_streaming() {
                        " client-stream"
                    } else {
                        ""
                    },
                    if m.server_streaming() {
                        " server-stream"
                    } else {
                        ""
                    },
                ));
            }
        }
    }
    let want = [
        "/etcdserverpb.KV/Range",
        "/etcdserverpb.KV/Put",
        "/etcdserverpb.KV/DeleteRange",
        "/etcdserverpb.KV/Txn",
        "/etcdserverpb.KV/Compact",
        "/etcdserverpb.Watch/Watch client-stream server-stream",
        "/etcdserverpb.Lease/LeaseGrant",
        "/etcdserverpb.Lease/LeaseRevoke",
        "/etcdserverpb.Lease/LeaseKeepAlive client-stream server-stream",
        "/etcdserverpb.Lease/LeaseTimeToLive",
        "/etcdserverpb.Lease/LeaseLeases",
        "/etcdserverpb.Cluster/MemberAdd",
        "/etcdserverpb.Cluster/MemberRemove",
        "/etcdserverpb.Cluster/MemberUpdate",
        "/etcdserverpb.Cluster/MemberList",
        "/etcdserverpb.Cluster/MemberPromote",
        "/etcdserverpb.Maintenance/Alarm",
        "/etcdserverpb.Maintenance/Status",
        "/etcdserverpb.Maintenance/Defragment",
        "/etcdserverpb.Maintenance/Hash",
        "/etcdserverpb.Maintenance/HashKV",
        "/etcdserverpb.Maintenance/Snapshot server-stream",
        "/etcdserverpb.Maintenance/MoveLeader",
        "/etcdserverpb.Maintenance/Downgrade",
        "/etcdserverpb.Auth/AuthEnable",
        "/etcdserverpb.Auth/AuthDisable",
        "/etcdserverpb.Auth/AuthStatus",
        "/etcdserverpb.Auth/Authenticate",
        "/etcdserverpb.Auth/UserAdd",
        "/etcdserverpb.Auth/UserGet",
        "/etcdserverpb.Auth/UserList",
        "/etcdserverpb.Auth/UserDelete",
        "/etcdserverpb.Auth/UserChangePassword",
        "/etcdserverpb.Auth/UserGrantRole",
        "/etcdserverpb.Auth/UserRevokeRole",
        "/etcdserverpb.Auth/RoleAdd",
        "/etcdserverpb.Auth/RoleGet",
        "/etcdserverpb.Auth/RoleList",
        "/etcdserverpb.Auth/RoleDelete",
        "/etcdserverpb.Auth/RoleGrantPermission",
        "/etcdserverpb.Auth/RoleRevokePermission",
    ];
    assert_eq!(got, want);

    // The generated servers register under the same names.
    assert_eq!(kv_server::SERVICE_NAME, "etcdserverpb.KV");
    assert_eq!(watch_server::SERVICE_NAME, "etcdserverpb.Watch");
    assert_eq!(lease_server::SERVICE_NAME, "etcdserverpb.Lease");
    assert_eq!(cluster_server::SERVICE_NAME, "etcdserverpb.Cluster");
    assert_eq!(maintenance_server::SERVICE_NAME, "etcdserverpb.Maintenance");
    assert_eq!(auth_server::SERVICE_NAME, "etcdserverpb.Auth");
}
