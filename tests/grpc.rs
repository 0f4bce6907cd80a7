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
use tonic::transport::Channel;
use tonic::Code;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

use harness::{bytes_of as b, grpc_channel as channel};

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

        // A service Keel does not serve answers as gRPC (Unimplemented), not as an HTTP key.
        // etcd's Lock service, which Keel does not serve, called by its path.
        let mut g = tonic::client::Grpc::new(channel(fport).await);
        g.ready().await.unwrap();
        let codec = tonic_prost::ProstCodec::<pb::RangeRequest, pb::RangeResponse>::default();
        let path = http::uri::PathAndQuery::from_static("/v3lockpb.Lock/Lock");
        let e = g
            .unary(tonic::Request::new(get("l")), path, codec)
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

/// Polls Cluster.MemberList on `port` until `ok` holds, or panics naming `what` after WAIT.
async fn list_until(
    port: u16,
    what: &str,
    ok: impl Fn(&pb::MemberListResponse) -> bool,
) -> pb::MemberListResponse {
    let mut cl = ClusterClient::new(channel(port).await);
    let deadline = std::time::Instant::now() + harness::WAIT;
    loop {
        let list = cl.member_list(pb::MemberListRequest::default()).await;
        match list {
            Ok(l) if ok(l.get_ref()) => return l.into_inner(),
            _ if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            other => panic!("timed out waiting for {what}: {other:?}"),
        }
    }
}

/// etcd's publish: every member lists every other by the name and client URL it published
/// through Raft, and a member added but never started with neither (etcdctl: "unstarted").
#[test]
fn member_list_shows_published_attributes_and_unstarted_members() {
    let c = Cluster::raftexample(3, &[]);
    let leader = c.leader_of(&[1, 2, 3]);
    let client_url = |id: u64| format!("http://127.0.0.1:{}", c.node(id).client);
    let new_url = format!("http://127.0.0.1:{}", free_ports(1)[0]);
    rt().block_on(async {
        for id in [1, 2, 3] {
            let list = list_until(c.node(id).client, "every member's client URL", |l| {
                l.members.len() == 3 && l.members.iter().all(|m| !m.client_ur_ls.is_empty())
            })
            .await;
            for m in &list.members {
                assert_eq!(m.name, format!("node-{}", m.id), "on node {id}: {m:?}");
                assert_eq!(m.client_ur_ls, vec![client_url(m.id)], "on node {id}");
                assert_eq!(m.peer_ur_ls, vec![c.node(m.id).peer_url()], "on node {id}");
            }
        }
        let mut cl = ClusterClient::new(channel(c.node(leader).client).await);
        let added = cl
            .member_add(pb::MemberAddRequest {
                peer_ur_ls: vec![new_url.clone()],
                is_learner: true,
            })
            .await
            .unwrap()
            .into_inner()
            .member
            .unwrap();
        for id in [1, 2, 3] {
            let list = list_until(c.node(id).client, "the added member", |l| {
                l.members.iter().any(|m| m.id == added.id)
            })
            .await;
            let m = list.members.iter().find(|m| m.id == added.id).unwrap();
            assert_eq!(
                (m.name.as_str(), m.client_ur_ls.len(), &m.peer_ur_ls[..]),
                ("", 0, &[new_url.clone()][..]),
                "on node {id}"
            );
            assert!(m.is_learner);
        }
    });
    // The HTTP status tells where the leader serves clients (for forwarding to it).
    let st = c.status(1).unwrap();
    assert_eq!(
        st["leader_client_urls"],
        serde_json::json!([client_url(leader)])
    );
    let me = st["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == 2);
    assert_eq!(me.unwrap()["name"], "node-2");
}

/// etcd's MemberUpdate: its errors, then a member's peer URL moved while it is down; every
/// member records it, the cluster keeps writing meanwhile, and the member restarted on the new
/// address is reached there (the leader redialled it) and catches up.
#[test]
fn member_update_moves_a_peer_url_everywhere() {
    let mut c = Cluster::raftexample(3, &[]);
    let leader = c.leader_of(&[1, 2, 3]);
    let moved = [1, 2, 3].into_iter().find(|&id| id != leader).unwrap();
    let other = [1, 2, 3]
        .into_iter()
        .find(|&id| id != leader && id != moved)
        .unwrap();
    let new_port = free_ports(1)[0];
    let new_url = format!("http://127.0.0.1:{new_port}");
    let lport = c.node(leader).client;
    let update = |id: u64, urls: Vec<String>| pb::MemberUpdateRequest {
        id,
        peer_ur_ls: urls,
    };
    rt().block_on(async {
        let mut cl = ClusterClient::new(channel(lport).await);
        let e = cl
            .member_update(update(99, vec![new_url.clone()]))
            .await
            .unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (Code::NotFound, "etcdserver: member not found")
        );
        let e = cl
            .member_update(update(moved, vec![c.node(other).peer_url()]))
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
            .member_update(update(moved, vec!["not a url".into()]))
            .await
            .unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (
                Code::InvalidArgument,
                "etcdserver: given member URLs are invalid"
            )
        );
        let e = cl
            .member_update(update(moved, vec![new_url.clone(), new_url.clone()]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        // Its own URL again: nothing to refuse, nothing changes.
        let same = cl
            .member_update(update(moved, vec![c.node(moved).peer_url()]))
            .await
            .unwrap()
            .into_inner();
        let m = same.members.iter().find(|m| m.id == moved).unwrap();
        assert_eq!(m.peer_ur_ls, vec![c.node(moved).peer_url()]);
    });

    c.node_mut(moved).stop();
    c.put(leader, "while-down", "1");
    rt().block_on(async {
        let mut cl = ClusterClient::new(channel(lport).await);
        let r = cl
            .member_update(update(moved, vec![new_url.clone()]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.members.len(), 3);
        let m = r.members.iter().find(|m| m.id == moved).unwrap();
        assert_eq!(m.peer_ur_ls, vec![new_url.clone()]);
        assert_eq!(r.header.unwrap().member_id, leader);
        list_until(
            c.node(other).client,
            "the new peer URL on the other member",
            |l| {
                l.members
                    .iter()
                    .any(|m| m.id == moved && m.peer_ur_ls == [new_url.clone()])
            },
        )
        .await;
    });

    // Restarted on the new address (its own entry of --cluster is where it listens).
    let n = c.node_mut(moved);
    let at = n.args.iter().position(|a| a == "--cluster").unwrap() + 1;
    let mut urls: Vec<String> = n.args[at].split(',').map(str::to_string).collect();
    urls[moved as usize - 1] = new_url.clone();
    n.args[at] = urls.join(",");
    n.peer = new_port;
    n.start();
    c.put(leader, "after-move", "2");
    harness::wait_until("the moved member to catch up on its new address", || {
        let st = c.status(moved)?;
        let caught_up = c.get_local(moved, "while-down").is_some()
            && c.get_local(moved, "after-move").is_some();
        (caught_up && st["leader"].as_u64()? != 0).then_some(())
    });
    c.hashes_agree(&[1, 2, 3]);
    let log = c.node(leader).log_text();
    assert!(
        log.contains(&format!("peer {moved} is now at 127.0.0.1:{new_port}")),
        "the leader's transport moved to the new address"
    );
}

/// Maintenance.Snapshot: this node's state in chunks of at most 32 KiB counting down to 0, then
/// the sha256 of what came before; one stream at a time; and etcdctl saves it.
#[test]
fn snapshot_streams_the_state_with_a_sha256_trailer() {
    use sha2::Digest as _;
    let c = Cluster::raftexample(3, &[]);
    let leader = c.leader_of(&[1, 2, 3]);
    let follower = [1, 2, 3].into_iter().find(|&id| id != leader).unwrap();
    let port = c.node(follower).client;
    c.put(leader, "snap-key", "snap-value-0123456789");
    harness::wait_until("the follower to apply the put", || {
        c.get_local(follower, "snap-key")
    });
    let fetch = |port: u16| async move {
        let mut mt = MaintenanceClient::new(channel(port).await);
        let mut s = mt
            .snapshot(pb::SnapshotRequest::default())
            .await
            .unwrap()
            .into_inner();
        let mut msgs = Vec::new();
        while let Some(m) = s.message().await.unwrap() {
            msgs.push(m);
        }
        msgs
    };
    let file = rt().block_on(async {
        let msgs = fetch(port).await;
        let (last, data) = msgs.split_last().unwrap();
        assert_eq!((last.blob.len(), last.remaining_bytes), (32, 0));
        let body: Vec<u8> = data.iter().flat_map(|m| m.blob.to_vec()).collect();
        assert_eq!(&last.blob[..], &sha2::Sha256::digest(&body)[..]);
        let mut left = body.len() as u64;
        for m in data {
            assert!(m.blob.len() <= 32 * 1024 && !m.blob.is_empty());
            left -= m.blob.len() as u64;
            assert_eq!(m.remaining_bytes, left);
            assert_eq!(m.header.unwrap().member_id, follower);
        }
        let mut file = body;
        file.extend_from_slice(&last.blob);
        file
    });
    let check = |file: &[u8]| {
        let data = keel_api::grpc::snapshot::parse(file).unwrap();
        let snap = keel_node::snapshot::decode(&Bytes::copy_from_slice(data)).unwrap();
        assert_eq!(snap.peers.len(), 3);
        assert!(
            data.windows(21).any(|w| w == b"snap-value-0123456789"),
            "the snapshot holds the value put"
        );
        // The state is a few hundred bytes; the padding adds under 512.
        assert!(file.len() < 16 * 1024, "{} bytes", file.len());
    };
    check(&file);

    // A second stream while one is held is refused; once the first is gone, served again.
    let big = "x".repeat(1 << 20);
    for i in 0..8 {
        c.put(leader, &format!("big{i}"), &big);
    }
    harness::wait_until("the follower to apply the big values", || {
        c.get_local(follower, "big7")
    });
    rt().block_on(async {
        let mut mt = MaintenanceClient::new(channel(port).await);
        // 8 MiB is beyond the client's flow-control window: unread, the stream stays open.
        let held = mt.snapshot(pb::SnapshotRequest::default()).await.unwrap();
        let mut other = MaintenanceClient::new(channel(port).await);
        let e = other
            .snapshot(pb::SnapshotRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
        drop(held);
        let deadline = std::time::Instant::now() + harness::WAIT;
        loop {
            match other.snapshot(pb::SnapshotRequest::default()).await {
                Ok(_) => break,
                Err(e) if e.code() == Code::ResourceExhausted => {
                    assert!(std::time::Instant::now() < deadline, "slot never freed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
    });

    // etcdctl saves it: its `snapshot save` checks the size etcd's layout gives.
    let etcdctl = std::env::var("ETCDCTL").unwrap_or_else(|_| "etcdctl".to_string());
    let path = c.dir.path().join("x.db");
    let out = match std::process::Command::new(&etcdctl)
        .env("ETCDCTL_API", "3")
        .args([
            &format!("--endpoints=127.0.0.1:{port}"),
            "--command-timeout=30s",
            "snapshot",
            "save",
            path.to_str().unwrap(),
        ])
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            eprintln!("skipping etcdctl snapshot save: {etcdctl}: {e}");
            return;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&format!("Snapshot saved at {}", path.display())),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let saved = std::fs::read(&path).unwrap();
    let data = keel_api::grpc::snapshot::parse(&saved).unwrap();
    assert!(
        data.len() > 8 << 20,
        "the big values are in it: {}",
        data.len()
    );
}
