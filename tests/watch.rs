//! etcd's Watch service against a real 3-node Keel cluster: history from an old revision then
//! live changes, in revision order with no gap and no duplicate, on a follower while writes go
//! elsewhere and while the leadership moves; prev_kv, filters, cancel, progress, a compacted
//! start, bad creates, and a client too slow to read.

mod harness;

use std::time::Duration;

use bytes::Bytes;
use harness::{wait_until, Cluster, WAIT};
use keel_etcdpb::etcdserverpb as pb;
use keel_etcdpb::etcdserverpb::kv_client::KvClient;
use keel_etcdpb::etcdserverpb::maintenance_client::MaintenanceClient;
use keel_etcdpb::etcdserverpb::watch_client::WatchClient;
use keel_etcdpb::etcdserverpb::watch_create_request::FilterType;
use keel_etcdpb::etcdserverpb::watch_request::RequestUnion;
use keel_etcdpb::mvccpb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Streaming;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

use harness::{bytes_of as b, grpc_channel as channel};

/// One watch stream: requests go in through `tx`, answers come out of `rx`.
struct Stream {
    tx: mpsc::Sender<pb::WatchRequest>,
    rx: Streaming<pb::WatchResponse>,
}

impl Stream {
    async fn open(port: u16) -> Stream {
        let (tx, reqs) = mpsc::channel(16);
        let rx = WatchClient::new(channel(port).await)
            .watch(ReceiverStream::new(reqs))
            .await
            .unwrap()
            .into_inner();
        Stream { tx, rx }
    }

    async fn send(&self, r: RequestUnion) {
        self.tx
            .send(pb::WatchRequest {
                request_union: Some(r),
            })
            .await
            .unwrap();
    }

    async fn create(&mut self, c: pb::WatchCreateRequest) -> pb::WatchResponse {
        self.send(RequestUnion::CreateRequest(c)).await;
        let r = self.next().await;
        assert!(r.created, "expected a created answer, got {r:?}");
        r
    }

    async fn next(&mut self) -> pb::WatchResponse {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("a watch answer in time")
            .expect("the stream is healthy")
            .expect("the stream is open")
    }

    /// Events for `id` until one at or above `last_rev` arrives.
    async fn events_until(&mut self, id: i64, last_rev: i64) -> Vec<mvccpb::Event> {
        let mut out = Vec::new();
        loop {
            let r = self.next().await;
            assert_eq!(r.watch_id, id, "{r:?}");
            assert!(!r.canceled, "watch cancelled: {r:?}");
            let done = r
                .events
                .last()
                .is_some_and(|e| e.kv.as_ref().unwrap().mod_revision >= last_rev);
            out.extend(r.events);
            if done {
                return out;
            }
        }
    }
}

fn prefix(p: &str) -> pb::WatchCreateRequest {
    let mut end = p.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    pb::WatchCreateRequest {
        key: b(p),
        range_end: Bytes::from(end),
        ..Default::default()
    }
}

async fn put(kv: &mut KvClient<Channel>, key: &str, value: &str) -> i64 {
    let p = pb::PutRequest {
        key: b(key),
        value: b(value),
        ..Default::default()
    };
    for _ in 0..100 {
        match kv.put(p.clone()).await {
            Ok(r) => return r.into_inner().header.unwrap().revision,
            // A leader change in flight refused it before proposing: safe to retry. (A timeout
            // is not retried: the write may have applied, and the test counts revisions.)
            Err(s)
                if ["etcdserver: no leader", "etcdserver: leader changed"]
                    .contains(&s.message()) =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(s) => panic!("put {key}: {s}"),
        }
    }
    panic!("put {key}: no leader for 10 s");
}

/// `tasks` concurrent writers of `per_task` puts each under `prefix` (a few keys per writer, so
/// keys get new versions); the revisions of every put.
async fn writers(port: u16, prefix: &str, tasks: usize, per_task: usize) -> Vec<i64> {
    let mut handles = Vec::new();
    for t in 0..tasks {
        let prefix = prefix.to_string();
        handles.push(tokio::spawn(async move {
            let mut kv = KvClient::new(channel(port).await);
            let mut revs = Vec::new();
            for i in 0..per_task {
                revs.push(put(&mut kv, &format!("{prefix}{t}/{}", i % 5), &i.to_string()).await);
            }
            revs
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    all.sort_unstable();
    all
}

fn revisions(events: &[mvccpb::Event]) -> Vec<i64> {
    events
        .iter()
        .map(|e| e.kv.as_ref().unwrap().mod_revision)
        .collect()
}

#[test]
fn watch_replays_history_then_follows_live_writes_without_gaps_across_a_leader_change() {
    let c = Cluster::raftexample(3, &[]);
    let leader = c.leader_of(&[1, 2, 3]);
    let follower = [1, 2, 3].into_iter().find(|&id| id != leader).unwrap();
    let other = [1, 2, 3]
        .into_iter()
        .find(|&id| id != leader && id != follower)
        .unwrap();
    let (lport, fport) = (c.node(leader).client, c.node(follower).client);
    rt().block_on(async {
        let mut kv = KvClient::new(channel(lport).await);
        // History: more than one slice of it (1000 revisions), to the watched prefix and around.
        let mut want = writers(lport, "w/", 8, 150).await;
        want.extend(writers(lport, "x/", 2, 20).await.iter().map(|_| 0));
        want.retain(|&r| r != 0);
        let del = kv
            .delete_range(pb::DeleteRangeRequest {
                key: b("w/3/0"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        want.push(del.header.unwrap().revision);

        // Live writes start first, so that they land while the watcher reads history: the
        // changes it then finds both in history and in the feed must come once.
        let live = tokio::spawn(writers(lport, "w/", 2, 150));
        let mut s = Stream::open(fport).await;
        let created = s
            .create(pb::WatchCreateRequest {
                start_revision: want[0],
                prev_kv: true,
                ..prefix("w/")
            })
            .await;
        let id = created.watch_id;
        assert!(created.header.unwrap().revision >= *want.last().unwrap());
        // And the leadership moves to the third node meanwhile.
        let mut m = MaintenanceClient::new(channel(lport).await);
        m.move_leader(pb::MoveLeaderRequest { target_id: other })
            .await
            .unwrap();
        want.extend(live.await.unwrap());
        want.sort_unstable();

        let events = s.events_until(id, *want.last().unwrap()).await;
        assert_eq!(revisions(&events), want, "every change once, in order");
        // The delete carries the deleted version as prev_kv; puts over live keys theirs.
        let d = events
            .iter()
            .find(|e| e.r#type == mvccpb::event::EventType::Delete as i32)
            .unwrap();
        assert_eq!(d.kv.as_ref().unwrap().key, b("w/3/0"));
        assert_eq!(d.prev_kv.as_ref().unwrap().key, b("w/3/0"));
        let again = events
            .iter()
            .find(|e| e.kv.as_ref().unwrap().version == 2)
            .unwrap();
        assert_eq!(again.prev_kv.as_ref().unwrap().version, 1);
    });
}

#[test]
fn watch_options_cancel_progress_compaction_and_bad_creates() {
    let c = Cluster::raftexample(3, &[]);
    let leader = c.leader_of(&[1, 2, 3]);
    let port = c.node(leader).client;
    rt().block_on(async {
        let mut kv = KvClient::new(channel(port).await);
        let mut s = Stream::open(port).await;

        // From now, puts only, no prev_kv; and a second watcher with a chosen id.
        let a = s
            .create(pb::WatchCreateRequest {
                filters: vec![FilterType::Nodelete as i32],
                ..prefix("f/")
            })
            .await;
        let b_ = s
            .create(pb::WatchCreateRequest {
                key: b("f/one"),
                watch_id: 77,
                filters: vec![FilterType::Noput as i32],
                ..Default::default()
            })
            .await;
        assert_eq!(b_.watch_id, 77);
        assert_ne!(a.watch_id, b_.watch_id);
        let r1 = put(&mut kv, "f/one", "1").await;
        let r = s.next().await;
        assert_eq!((r.watch_id, revisions(&r.events)), (a.watch_id, vec![r1]));
        assert!(r.events[0].prev_kv.is_none(), "prev_kv not asked for");
        let d = kv
            .delete_range(pb::DeleteRangeRequest {
                key: b("f/one"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let r = s.next().await;
        assert_eq!(r.watch_id, 77, "the delete reaches only the NOPUT watcher");
        assert_eq!(revisions(&r.events), vec![d.header.unwrap().revision]);

        // A chosen id already in use, an empty range, a negative start.
        for (c, reason) in [
            (
                pb::WatchCreateRequest {
                    key: b("z"),
                    watch_id: 77,
                    ..Default::default()
                },
                "mvcc: duplicate watch ID provided on the WatchStream",
            ),
            (
                pb::WatchCreateRequest {
                    key: b("z"),
                    range_end: b("a"),
                    ..Default::default()
                },
                "mvcc: watcher range is empty",
            ),
            (
                pb::WatchCreateRequest {
                    key: b("z"),
                    start_revision: -1,
                    ..Default::default()
                },
                "etcdserver: mvcc: required revision has been compacted",
            ),
        ] {
            let r = s.create(c).await;
            assert!(r.canceled, "{r:?}");
            assert_eq!((r.watch_id, r.cancel_reason.as_str()), (-1, reason));
        }

        // Progress: every watcher is synced, so the answer vouches for the current revision.
        s.send(RequestUnion::ProgressRequest(pb::WatchProgressRequest {}))
            .await;
        let p = s.next().await;
        assert_eq!(p.watch_id, -1);
        assert!(p.events.is_empty());
        assert_eq!(p.header.unwrap().revision, d.header.unwrap().revision);

        // Cancel: answered once; nothing more for that watcher.
        s.send(RequestUnion::CancelRequest(pb::WatchCancelRequest {
            watch_id: a.watch_id,
        }))
        .await;
        let r = s.next().await;
        assert!(r.canceled && r.watch_id == a.watch_id, "{r:?}");
        let r2 = put(&mut kv, "f/two", "2").await;
        let r3 = kv
            .delete_range(pb::DeleteRangeRequest {
                key: b("f/one"),
                prev_kv: true,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(r3.into_inner().deleted, 0);
        s.send(RequestUnion::ProgressRequest(pb::WatchProgressRequest {}))
            .await;
        let p = s.next().await;
        assert_eq!((p.watch_id, p.header.unwrap().revision), (-1, r2));

        // Compaction: a start below the compaction point is cancelled with the compaction
        // point, as etcd does; from the compaction point itself the history replays.
        let mut revs = Vec::new();
        for i in 0..5 {
            revs.push(put(&mut kv, "c", &i.to_string()).await);
        }
        kv.compact(pb::CompactionRequest {
            revision: revs[2],
            physical: false,
        })
        .await
        .unwrap();
        let r = s
            .create(pb::WatchCreateRequest {
                key: b("c"),
                start_revision: revs[0],
                ..Default::default()
            })
            .await;
        assert!(!r.canceled);
        let r = s.next().await;
        assert!(r.canceled, "{r:?}");
        assert_eq!(r.compact_revision, revs[2]);
        let r = s
            .create(pb::WatchCreateRequest {
                key: b("c"),
                start_revision: revs[2],
                ..Default::default()
            })
            .await;
        let events = s.events_until(r.watch_id, revs[4]).await;
        assert_eq!(revisions(&events), revs[2..].to_vec());
    });
}

#[test]
fn a_client_that_stops_reading_loses_its_watchers_with_a_reason() {
    let c = Cluster::raftexample(3, &[]);
    let leader = c.leader_of(&[1, 2, 3]);
    let port = c.node(leader).client;
    let metrics = c.node(leader).url("/metrics");
    // Made outside the runtime: its blocking client owns a runtime of its own.
    let http = harness::Http::default();
    rt().block_on(async {
        let mut s = Stream::open(port).await;
        let w = s.create(prefix("s/")).await;
        // 40 MiB of changes, unread: more than the stream's 16 MiB and the connection's
        // flow-control windows hold.
        let value = "v".repeat(64 << 10);
        let mut writers = Vec::new();
        for t in 0..16 {
            let value = value.clone();
            writers.push(tokio::spawn(async move {
                let mut kv = KvClient::new(channel(port).await);
                for i in 0..40 {
                    put(&mut kv, &format!("s/{t}/{i}"), &value).await;
                }
            }));
        }
        for w in writers {
            w.await.unwrap();
        }
        let cancelled = |t: &str| {
            t.lines()
                .find(|l| l.starts_with("keel_http_watch_slow_cancels_total "))
                .and_then(|l| l.split(' ').nth(1)?.parse::<f64>().ok())
        };
        tokio::task::spawn_blocking(move || {
            wait_until("the slow watcher to be cancelled", || {
                let (code, body) = http.get(&metrics).ok()?;
                (code == 200 && cancelled(&harness::text(&body))? >= 1.0).then_some(())
            })
        })
        .await
        .unwrap();
        // The client reads again: the events it was sent, then the cancellation and why.
        loop {
            let r = s.next().await;
            assert_eq!(r.watch_id, w.watch_id);
            if r.canceled {
                assert!(r.cancel_reason.contains("too slow"), "{r:?}");
                break;
            }
            assert!(!r.events.is_empty());
        }
    });
}

#[test]
fn an_idle_watcher_that_asked_gets_progress_notifications() {
    let c = Cluster::raftexample(
        3,
        &["--experimental-watch-progress-notify-interval", "300ms"],
    );
    let leader = c.leader_of(&[1, 2, 3]);
    let follower = [1, 2, 3].into_iter().find(|&id| id != leader).unwrap();
    let (lport, fport) = (c.node(leader).client, c.node(follower).client);
    rt().block_on(async {
        let mut kv = KvClient::new(channel(lport).await);
        let rev = put(&mut kv, "elsewhere", "1").await;
        let mut s = Stream::open(fport).await;
        let w = s
            .create(pb::WatchCreateRequest {
                key: b("quiet"),
                progress_notify: true,
                ..Default::default()
            })
            .await;
        // Nothing happens to "quiet": what comes is a notification naming the store's
        // revision, once the follower has applied the write above.
        loop {
            let r = s.next().await;
            assert_eq!(r.watch_id, w.watch_id, "{r:?}");
            assert!(r.events.is_empty() && !r.canceled, "{r:?}");
            if r.header.unwrap().revision >= rev {
                break;
            }
        }
        // A write to it comes as an event, not as a notification.
        let r2 = put(&mut kv, "quiet", "x").await;
        loop {
            let r = s.next().await;
            if !r.events.is_empty() {
                assert_eq!(revisions(&r.events), vec![r2]);
                break;
            }
        }
    });
}
