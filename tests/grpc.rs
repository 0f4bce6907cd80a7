//! etcd's v3 gRPC API against a real 3-node Keel cluster, through gRPC stubs generated from
//! etcd's wire contract: headers, KV semantics, a txn compare-and-set race, compaction,
//! membership, maintenance, and the errors etcd clients match on.

mod harness;

use bytes::Bytes;
use harness::{free_ports, Cluster};
use keel_etcdpb::etcdserverpb as pb;
use keel_etcdpb::etcdserverpb::auth_client::AuthClient;
use keel_etcdpb::etcdserverpb::cluster_client::ClusterClient;
use keel_etcdpb::etcdserverpb::kv_client::KvClient;
use keel_etcdpb::etcdserverpb::maintenance_client::MaintenanceClient;
use keel_etcdpb::etcdserverpb::watch_client::WatchClient;
use tonic::transport::Channel;
use tonic::Code;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn channel(port: u16) -> Channel {
    Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn put(key: &str, value: &str) -> pb::PutRequest {
    pb::PutRequest {
        key: b(key),
        value: b(value),
        ..Default::default()
    }
}

fn get(key: &str) -> pb::RangeRequest {
    pb::RangeRequest {
        key: b(key),
        ..Default::default()
    }
}

/// The value of `key` in a range answer.
fn value(r: &pb::RangeResponse) -> Option<String> {
    r.kvs
        .first()
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
}

#[test]
fn kv_txn_compaction_and_errors_over_grpc() {
    let c = Cluster::raftexample(3, &[]);
    let leader = c.leader_of(&[1, 2, 3]);
    let follower = [1, 2, 3].into_iter().find(|&id| id != leader).unwrap();
    let cluster_id = c.status(1).unwrap()["cluster_id"].as_u64().unwrap();
    let (fport, lport) = (c.node(follower).client, c.node(leader).client);
    rt().block_on(async {
        let mut kv = KvClient::new(channel(fport).await);
        // A put through a follower: forwarded, answered with etcd's header.
        let p = kv.put(put("a", "1")).await.unwrap().into_inner();
        let h = p.header.unwrap();
        assert_eq!(h.cluster_id, cluster_id);
        assert_eq!(h.member_id, follower);
        assert!(h.raft_term >= 2, "{h:?}");
        let rev1 = h.revision;
        let p = kv
            .put(pb::PutRequest {
                prev_kv: true,
                ..put("a", "2")
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(p.prev_kv.unwrap().value, b("1"));
        let rev2 = p.header.unwrap().revision;
        assert_eq!(rev2, rev1 + 1, "one revision per write");
        kv.put(put("b", "3")).await.unwrap();

        let r = kv.range(get("a")).await.unwrap().into_inner();
        assert_eq!(value(&r).as_deref(), Some("2"));
        assert_eq!((r.kvs[0].version, r.kvs[0].create_revision), (2, rev1));
        let old = kv
            .range(pb::RangeRequest {
                revision: rev1,
                ..get("a")
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            value(&old).as_deref(),
            Some("1"),
            "a read at an old revision"
        );
        let all = kv
            .range(pb::RangeRequest {
                key: b("\0"),
                range_end: b("\0"),
                count_only: true,
                serializable: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(all.count, 2);

        // Two clients race the same compare-and-set: exactly one wins.
        let cas = |expect: &str, new: &str| pb::TxnRequest {
            compare: vec![pb::Compare {
                result: pb::compare::CompareResult::Equal as i32,
                target: pb::compare::CompareTarget::Value as i32,
                key: b("a"),
                target_union: Some(pb::compare::TargetUnion::Value(b(expect))),
                ..Default::default()
            }],
            success: vec![pb::RequestOp {
                request: Some(pb::request_op::Request::RequestPut(put("a", new))),
            }],
            failure: vec![pb::RequestOp {
                request: Some(pb::request_op::Request::RequestRange(get("a"))),
            }],
        };
        let mut other = KvClient::new(channel(lport).await);
        let (x, y) = tokio::join!(kv.txn(cas("2", "x")), other.txn(cas("2", "y")));
        let (x, y) = (x.unwrap().into_inner(), y.unwrap().into_inner());
        assert!(
            x.succeeded != y.succeeded,
            "exactly one CAS wins: {x:?} {y:?}"
        );
        let loser = if x.succeeded { &y } else { &x };
        let Some(pb::response_op::Response::ResponseRange(seen)) = &loser.responses[0].response
        else {
            panic!("the failure branch's range answer: {loser:?}");
        };
        let winner = if x.succeeded { "x" } else { "y" };
        assert_eq!(value(seen).as_deref(), Some(winner));

        // Compaction, then a read below it fails with etcd's error.
        let now = kv.range(get("a")).await.unwrap().into_inner();
        let head = now.header.unwrap().revision;
        kv.compact(pb::CompactionRequest {
            revision: head,
            physical: false,
        })
        .await
        .unwrap();
        let e = kv
            .range(pb::RangeRequest {
                revision: rev1,
                ..get("a")
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange);
        assert_eq!(
            e.message(),
            "etcdserver: mvcc: required revision has been compacted"
        );

        // Bad input: etcd's codes and messages, nothing applied.
        let e = kv.put(put("", "v")).await.unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (Code::InvalidArgument, "etcdserver: key is not provided")
        );
        let too_many = pb::TxnRequest {
            success: (0..129)
                .map(|i| pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestPut(put(
                        &format!("k{i}"),
                        "v",
                    ))),
                })
                .collect(),
            ..Default::default()
        };
        let e = kv.txn(too_many).await.unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (
                Code::InvalidArgument,
                "etcdserver: too many operations in txn request"
            )
        );
        let dup = pb::TxnRequest {
            success: vec![
                pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestPut(put("d", "1"))),
                },
                pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestPut(put("d", "2"))),
                },
            ],
            ..Default::default()
        };
        let e = kv.txn(dup).await.unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (
                Code::InvalidArgument,
                "etcdserver: duplicate key given in txn request"
            )
        );
        let big = "x".repeat(1536 * 1024);
        let e = kv.put(put("big", &big)).await.unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (Code::InvalidArgument, "etcdserver: request is too large")
        );
        let e = kv
            .range(pb::RangeRequest {
                sort_order: 9,
                ..get("a")
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        let e = kv
            .put(pb::PutRequest {
                lease: 12345,
                ..put("l", "v")
            })
            .await
            .unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (Code::NotFound, "etcdserver: requested lease not found")
        );
        let after = kv.range(get("a")).await.unwrap().into_inner();
        assert_eq!(
            after.header.unwrap().revision,
            head,
            "refused requests changed nothing"
        );
        for k in ["d", "big", "l", "k0"] {
            assert!(kv.range(get(k)).await.unwrap().into_inner().kvs.is_empty());
        }

        // Auth answers as an etcd with authentication disabled.
        let mut auth = AuthClient::new(channel(fport).await);
        let st = auth
            .auth_status(pb::AuthStatusRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(!st.enabled);
        let e = auth
            .authenticate(pb::AuthenticateRequest {
                name: "root".into(),
                password: "pw".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (
                Code::FailedPrecondition,
                "etcdserver: authentication is not enabled"
            )
        );
        let e = auth
            .auth_enable(pb::AuthEnableRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.message(), "etcdserver: root user does not exist");

        // A service not served yet answers as gRPC (Unimplemented), not as an HTTP key.
        let mut w = WatchClient::new(channel(fport).await);
        let req = pb::WatchRequest::default();
        let e = w
            .watch(tokio_stream::iter(vec![req]))
            .await
            .err()
            .map(|e| e.code());
        assert_eq!(e, Some(Code::Unimplemented));
    });
    // The HTTP API on the same port sees the same data.
    assert_eq!(c.get(follower, "b").as_deref(), Some("3"));
}

#[test]
fn cluster_and_maintenance_over_grpc() {
    let mut c = Cluster::raftexample(3, &[]);
    let leader = c.leader_of(&[1, 2, 3]);
    let other = [1, 2, 3].into_iter().find(|&id| id != leader).unwrap();
    let port = c.node(other).client;
    let new_peer = free_ports(2);
    let new_url = format!("http://127.0.0.1:{}", new_peer[0]);
    let added = rt().block_on(async {
        let mut cl = ClusterClient::new(channel(port).await);
        let list = cl
            .member_list(pb::MemberListRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(list.members.len(), 3);
        let me = list.members.iter().find(|m| m.id == other).unwrap();
        assert_eq!(me.client_ur_ls, vec![format!("http://127.0.0.1:{port}")]);
        assert!(me.peer_ur_ls[0].starts_with("http://127.0.0.1:"));

        // A learner is added, refused promotion twice over, then removed.
        let add = cl
            .member_add(pb::MemberAddRequest {
                peer_ur_ls: vec![new_url.clone()],
                is_learner: true,
            })
            .await
            .unwrap()
            .into_inner();
        let m = add.member.unwrap();
        assert!(m.is_learner);
        assert_eq!(add.members.len(), 4);
        let e = cl
            .member_promote(pb::MemberPromoteRequest { id: leader })
            .await
            .unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (
                Code::FailedPrecondition,
                "etcdserver: can only promote a learner member"
            )
        );
        let e = cl
            .member_add(pb::MemberAddRequest {
                peer_ur_ls: vec![new_url.clone()],
                is_learner: false,
            })
            .await
            .unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (
                Code::FailedPrecondition,
                "etcdserver: Peer URLs already exists"
            )
        );
        let e = cl
            .member_add(pb::MemberAddRequest {
                peer_ur_ls: vec![format!("http://127.0.0.1:{}", new_peer[1])],
                is_learner: true,
            })
            .await
            .unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (
                Code::FailedPrecondition,
                "etcdserver: too many learner members in cluster"
            )
        );
        let e = cl
            .member_add(pb::MemberAddRequest {
                peer_ur_ls: vec!["not a url".into()],
                is_learner: false,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        let e = cl
            .member_remove(pb::MemberRemoveRequest { id: 99 })
            .await
            .unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (Code::NotFound, "etcdserver: member not found")
        );

        let mut mt = MaintenanceClient::new(channel(port).await);
        let st = mt
            .status(pb::StatusRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(st.leader, leader);
        assert!(
            st.raft_applied_index <= st.raft_index && st.raft_term >= 2,
            "{st:?}"
        );
        assert_eq!(st.header.unwrap().member_id, other);
        let a = mt
            .alarm(pb::AlarmRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(a.alarms.is_empty());
        m.id
    });
    // Start the learner, so it can catch up and be promoted.
    let cluster = format!(
        "{},{},{},{new_url}",
        c.node(1).peer_url(),
        c.node(2).peer_url(),
        c.node(3).peer_url()
    );
    c.add(
        added,
        vec![
            "--id".into(),
            added.to_string(),
            "--cluster".into(),
            cluster,
            "--port".into(),
            new_peer[1].to_string(),
            "--join".into(),
        ],
        new_peer[1],
        new_peer[0],
    );
    c.node_mut(added).start();
    c.put(leader, "before-promote", "v");
    harness::wait_until("the learner to catch up", || {
        let st = c.status(added)?;
        (c.get_local(added, "before-promote").is_some() && st["leader"] == leader).then_some(())
    });
    rt().block_on(async {
        let mut cl = ClusterClient::new(channel(port).await);
        let p = harness_promote(&mut cl, added).await;
        assert!(p.members.iter().all(|m| !m.is_learner), "{p:?}");
        let mut mt = MaintenanceClient::new(channel(c.node(leader).client).await);
        // Hashes of all four members agree at one revision.
        let rev = mt
            .hash_kv(pb::HashKvRequest { revision: 0 })
            .await
            .unwrap()
            .into_inner();
        let at = rev.header.unwrap().revision;
        for id in [1, 2, 3, added] {
            let mut m = MaintenanceClient::new(channel(c.node(id).client).await);
            let deadline = std::time::Instant::now() + harness::WAIT;
            let h = loop {
                match m.hash_kv(pb::HashKvRequest { revision: at }).await {
                    Ok(h) => break h.into_inner(),
                    // Not applied that far yet.
                    Err(e)
                        if e.code() == Code::OutOfRange && std::time::Instant::now() < deadline =>
                    {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await
                    }
                    Err(e) => panic!("hash_kv on {id}: {e}"),
                }
            };
            assert_eq!(h.hash, rev.hash, "member {id} at revision {at}");
        }
        // Leadership moves to the new voter, and is refused when asked of a follower.
        let e = MaintenanceClient::new(channel(port).await)
            .move_leader(pb::MoveLeaderRequest { target_id: added })
            .await
            .unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (Code::FailedPrecondition, "etcdserver: not leader")
        );
        let e = mt
            .move_leader(pb::MoveLeaderRequest { target_id: 99 })
            .await
            .unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (
                Code::FailedPrecondition,
                "etcdserver: bad leader transferee"
            )
        );
        mt.move_leader(pb::MoveLeaderRequest { target_id: added })
            .await
            .unwrap();
    });
    assert_eq!(c.leader_of(&[1, 2, 3, added]), added);
    rt().block_on(async {
        let mut cl = ClusterClient::new(channel(port).await);
        let r = cl
            .member_remove(pb::MemberRemoveRequest { id: added })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.members.len(), 3);
    });
    c.node_mut(added).kill();
    c.leader_of(&[1, 2, 3]);
    c.hashes_agree(&[1, 2, 3]);
}

/// Promotion can be refused while the learner is still catching up; retried until it lands.
async fn harness_promote(cl: &mut ClusterClient<Channel>, id: u64) -> pb::MemberPromoteResponse {
    let deadline = std::time::Instant::now() + harness::WAIT;
    loop {
        match cl.member_promote(pb::MemberPromoteRequest { id }).await {
            Ok(r) => return r.into_inner(),
            Err(e) if std::time::Instant::now() < deadline => {
                assert_ne!(e.code(), Code::NotFound, "{e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("promote {id}: {e}"),
        }
    }
}

/// `--auto-compaction-retention 1s` (periodic, as etcd): history older than a second is
/// compacted by the leader; the current data stays.
#[test]
fn periodic_auto_compaction_drops_old_history() {
    let c = Cluster::raftexample(1, &["--auto-compaction-retention", "1s"]);
    c.leader_of(&[1]);
    rt().block_on(async {
        let mut kv = KvClient::new(channel(c.node(1).client).await);
        let first = kv.put(put("a", "1")).await.unwrap().into_inner();
        let first = first.header.unwrap().revision;
        kv.put(put("a", "2")).await.unwrap();
        let old = pb::RangeRequest {
            revision: first,
            ..get("a")
        };
        let deadline = std::time::Instant::now() + harness::WAIT;
        loop {
            match kv.range(old.clone()).await {
                Err(e) if e.code() == Code::OutOfRange => break,
                Ok(r) if std::time::Instant::now() < deadline => {
                    assert_eq!(value(&r.into_inner()).as_deref(), Some("1"));
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                other => panic!("revision {first} was never compacted: {other:?}"),
            }
        }
        let now = kv.range(get("a")).await.unwrap().into_inner();
        assert_eq!(value(&now).as_deref(), Some("2"));
    });
}
