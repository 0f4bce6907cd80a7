//! Transports talking to transports on 127.0.0.1: delivery, order, batching, drops,
//! reconnection, membership, shutdown.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use keel_proto::raftpb::MessageType;
use keel_transport::{Report, SendError, Stats};
use tokio::net::TcpListener;

fn every_type_but_snapshot() -> Vec<MessageType> {
    (0..=19)
        .map(|t| MessageType::try_from(t).unwrap())
        .filter(|t| *t != MessageType::MsgSnapshot)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_transports_exchange_every_message_type_in_order() {
    let mut nodes = mesh(&[1, 2]).await;
    let types = every_type_but_snapshot();
    let mut expected = vec![Vec::new(), Vec::new()];
    for round in 0..3u64 {
        for (i, t) in types.iter().enumerate() {
            let seq = round * 100 + i as u64;
            let (a, b) = (msg(*t, 1, 2, seq), msg(*t, 2, 1, seq));
            nodes[0].t.send(a.clone()).unwrap();
            nodes[1].t.send(b.clone()).unwrap();
            expected[1].push(a);
            expected[0].push(b);
        }
    }
    for (n, want) in nodes.iter_mut().zip(expected) {
        for w in want {
            assert_eq!(recv(&mut n.inbox).await, w);
        }
    }
    // Snapshots take their own connection; they arrive whole, data included.
    let mut snap = msg(MessageType::MsgSnapshot, 1, 2, 9);
    snap.snapshot = Some(keel_proto::raftpb::Snapshot {
        data: Bytes::from_static(b"state machine"),
        metadata: Some(keel_proto::raftpb::SnapshotMetadata {
            conf_state: None,
            index: 9,
            term: 2,
        }),
    });
    nodes[0].t.send(snap.clone()).unwrap();
    assert_eq!(recv(&mut nodes[1].inbox).await, snap);
    report(&mut nodes[0].reports, Report::Snapshot { to: 2, ok: true }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_transports_deliver_in_order_per_peer() {
    const N: u64 = 300;
    let mut nodes = mesh(&[1, 2, 3]).await;
    let types = every_type_but_snapshot();
    for seq in 0..N {
        for a in &nodes {
            for b in [1, 2, 3].into_iter().filter(|b| *b != a.t.id()) {
                let t = types[seq as usize % types.len()];
                a.t.send(msg(t, a.t.id(), b, seq)).unwrap();
            }
        }
    }
    for n in &mut nodes {
        let mut next: HashMap<u64, u64> = HashMap::new();
        for _ in 0..2 * N {
            let m = recv(&mut n.inbox).await;
            let want = next.entry(m.from).or_default();
            assert_eq!(
                m.index,
                *want,
                "node {} from {}: out of order",
                n.t.id(),
                m.from
            );
            assert_eq!(m, msg(m.msg_type(), m.from, n.t.id(), *want));
            *want += 1;
        }
        assert_eq!(next.len(), 2);
        assert!(next.values().all(|v| *v == N));
    }
}

#[tokio::test]
async fn a_burst_goes_out_in_few_writes() {
    const N: u64 = 2000;
    let (a, mut b) = pair().await;
    // Connect first, so that the burst below meets an open connection.
    send_until_received(&a.t, 2, &mut b.inbox).await;
    while b.inbox.try_recv().is_some() {}
    let stats = a.t.stats().clone();
    let (sent0, batches0) = (Stats::get(&stats.sent), Stats::get(&stats.write_batches));
    a.t.send_all((0..N).map(|seq| heartbeat(1, 2, seq)), |e| {
        panic!("refused: {e}")
    });
    for seq in 0..N {
        assert_eq!(recv(&mut b.inbox).await.commit, seq);
    }
    let sent = Stats::get(&stats.sent) - sent0;
    let batches = Stats::get(&stats.write_batches) - batches0;
    assert_eq!(sent, N);
    assert!(
        batches * 100 <= sent,
        "{sent} frames took {batches} writes; expected batches of hundreds"
    );
}

#[tokio::test]
async fn interleaved_messages_go_out_in_one_write_per_peer() {
    const N: u64 = 500;
    let mut nodes = mesh(&[1, 2, 3]).await;
    let (a, rest) = nodes.split_first_mut().unwrap();
    for b in rest.iter_mut() {
        send_until_received(&a.t, b.t.id(), &mut b.inbox).await;
        while b.inbox.try_recv().is_some() {}
    }
    let stats = a.t.stats().clone();
    let batches0 = Stats::get(&stats.write_batches);
    // As a Ready may list them: messages to the two peers, alternating.
    let msgs = (0..N).flat_map(|seq| [heartbeat(1, 2, seq), heartbeat(1, 3, seq)]);
    a.t.send_all(msgs, |e| panic!("refused: {e}"));
    assert_eq!(Stats::get(&stats.write_batches) - batches0, 2);
    for b in rest.iter_mut() {
        for seq in 0..N {
            assert_eq!(recv(&mut b.inbox).await.commit, seq);
        }
    }
}

#[tokio::test]
async fn the_sending_thread_writes_to_an_idle_connection_itself() {
    let (a, mut b) = pair().await;
    send_until_received(&a.t, 2, &mut b.inbox).await;
    while b.inbox.try_recv().is_some() {}
    let stats = a.t.stats().clone();
    let sent0 = Stats::get(&stats.sent);
    // On this single-threaded runtime no task runs until the test awaits: a message counted
    // as sent right after `send` returned was written by this thread, without a wake-up of
    // the peer's task.
    for seq in 0..10 {
        a.t.send(heartbeat(1, 2, seq)).unwrap();
        assert_eq!(Stats::get(&stats.sent), sent0 + seq + 1);
    }
    for seq in 0..10 {
        assert_eq!(recv(&mut b.inbox).await.commit, seq);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_socket_cannot_take_at_once_follows_in_order() {
    // 200 frames of 200 KB are far more than a loopback socket buffers, so most writes are
    // partial and the peer's task finishes them while the sender keeps adding more.
    const N: u64 = 200;
    let (a, mut b) = pair().await;
    send_until_received(&a.t, 2, &mut b.inbox).await;
    while b.inbox.try_recv().is_some() {}
    let big = |seq| {
        let mut m = heartbeat(1, 2, seq);
        m.context = Bytes::from(vec![seq as u8; 200_000]);
        m
    };
    let sender = tokio::task::spawn_blocking(move || {
        for seq in 0..N {
            a.t.send(big(seq)).unwrap();
        }
        a
    });
    for seq in 0..N {
        assert_eq!(recv(&mut b.inbox).await, big(seq));
    }
    let a = sender.await.unwrap();
    assert_eq!(Stats::get(&a.t.stats().send_failures), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_drops_instead_of_blocking() {
    // Completes TCP handshakes (the kernel does) but never answers the hello: the writer sits
    // in its handshake and drains nothing.
    let silent = TcpListener::bind(loopback()).await.unwrap();
    let n = node(1).await;
    n.t.add_peer(2, silent.local_addr().unwrap()).unwrap();
    let capacity = config(1).peer_queue_capacity as u64;
    let start = Instant::now();
    let mut full = 0u64;
    for seq in 0..100_000 {
        match n.t.send(heartbeat(1, 2, seq)) {
            Ok(()) => {}
            Err(SendError::QueueFull(2)) => full += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    let took = start.elapsed();
    assert!(took < Duration::from_secs(2), "100k sends took {took:?}");
    assert_eq!(full, 100_000 - capacity);
    assert_eq!(Stats::get(&n.t.stats().dropped_queue_full), full);
    assert_eq!(Stats::get(&n.t.stats().sent), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sending_to_an_absent_peer_returns_promptly_and_accounts_for_everything() {
    let free = TcpListener::bind(loopback())
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let mut n = node(1).await;
    n.t.add_peer(2, free).unwrap(); // nothing listens there any more
    let start = Instant::now();
    for seq in 0..100_000 {
        let _ = n.t.send(heartbeat(1, 2, seq));
    }
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    let stats = n.t.stats().clone();
    wait_until("every message dropped or failed", || {
        Stats::get(&stats.dropped_queue_full) + Stats::get(&stats.send_failures) == 100_000
    })
    .await;
    report(&mut n.reports, Report::Unreachable(2)).await;
    let mut reports = 1;
    while n.reports.try_recv().is_ok() {
        reports += 1;
    }
    assert!(
        reports < 100,
        "{reports} reports for 100k messages: not once per failure"
    );
    assert_eq!(Stats::get(&stats.reports_dropped), 0);
}

#[tokio::test]
async fn unreachable_once_per_failure_then_reconnect_after_restart() {
    let (mut a, mut b) = pair().await;
    send_until_received(&a.t, 2, &mut b.inbox).await;
    let b_addr = b.t.local_addr();
    b.t.shutdown().await;
    // The connection's end alone tells the writer; no message needs to fail first.
    report(&mut a.reports, Report::Unreachable(2)).await;
    let stats = a.t.stats().clone();
    let failed0 = Stats::get(&stats.send_failures);
    while a.reports.try_recv().is_ok() {}
    for seq in 0..1000 {
        a.t.send(heartbeat(1, 2, seq)).unwrap();
    }
    wait_until("the burst to fail", || {
        Stats::get(&stats.send_failures) >= failed0 + 1000
    })
    .await;
    // One report per failed dial, however many messages were lost meanwhile.
    report(&mut a.reports, Report::Unreachable(2)).await;
    let mut reports = 1;
    while let Ok(r) = a.reports.try_recv() {
        assert_eq!(r, Report::Unreachable(2));
        reports += 1;
    }
    assert!(reports <= 10, "{reports} reports for 1000 failed messages");

    // The peer comes back on the same port: the redial finds it and delivery resumes.
    let mut b = node_with(config(2), b_addr).await;
    let m = send_until_received(&a.t, 2, &mut b.inbox).await;
    assert_eq!(m.from, 1);
    assert!(Stats::get(&stats.reconnects) >= 1);
    a.t.send(heartbeat(1, 2, 424242)).unwrap();
    within("delivery after reconnection", async {
        while recv(&mut b.inbox).await.commit != 424242 {}
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_can_be_added_moved_and_removed() {
    let a = node(1).await;
    let mut b1 = node(2).await;
    assert!(matches!(
        a.t.add_peer(1, b1.t.local_addr()),
        Err(keel_transport::Error::InvalidPeerId(1))
    ));
    assert!(a.t.add_peer(0, b1.t.local_addr()).is_err());
    assert_eq!(a.t.send(heartbeat(1, 2, 0)), Err(SendError::UnknownPeer(2)));

    a.t.add_peer(2, b1.t.local_addr()).unwrap();
    send_until_received(&a.t, 2, &mut b1.inbox).await;

    // Node 2 moves to another address while node 1 is connected to the old one.
    let mut b2 = node(2).await;
    a.t.add_peer(2, b2.t.local_addr()).unwrap();
    assert_eq!(a.t.peers(), vec![(2, b2.t.local_addr().to_string())]);
    send_until_received(&a.t, 2, &mut b2.inbox).await;
    a.t.send(heartbeat(1, 2, 77)).unwrap();
    within("delivery at the new address", async {
        while recv(&mut b2.inbox).await.commit != 77 {}
    })
    .await;
    // Heartbeats written to the old connection before the move may still trickle in there;
    // nothing sent after it may.
    while let Some(m) = b1.inbox.try_recv() {
        assert_ne!(m.commit, 77, "the old address still gets messages");
    }

    assert!(a.t.remove_peer(2));
    assert!(!a.t.remove_peer(2));
    assert_eq!(a.t.send(heartbeat(1, 2, 1)), Err(SendError::UnknownPeer(2)));
    assert_eq!(Stats::get(&a.t.stats().dropped_unknown_peer), 2);
    assert!(a.t.peers().is_empty());
    // Re-adding after a removal starts afresh.
    a.t.add_peer(2, b2.t.local_addr()).unwrap();
    send_until_received(&a.t, 2, &mut b2.inbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_inbox_drops_without_stalling_the_connection() {
    let mut cfg = config(2);
    cfg.inbox_capacity = 8;
    let mut a = node(1).await;
    let mut b = node_with(cfg, loopback()).await;
    a.t.add_peer(2, b.t.local_addr()).unwrap();
    for seq in 0..100 {
        a.t.send(heartbeat(1, 2, seq)).unwrap();
    }
    let stats = b.t.stats().clone();
    wait_until("all 100 frames read", || {
        Stats::get(&stats.frames_received) == 100
    })
    .await;
    assert_eq!(Stats::get(&stats.dropped_inbox_full), 92);
    for seq in 0..8 {
        assert_eq!(recv(&mut b.inbox).await.commit, seq);
    }
    a.t.send(heartbeat(1, 2, 1000)).unwrap();
    assert_eq!(recv(&mut b.inbox).await.commit, 1000);
    assert!(
        a.reports.try_recv().is_err(),
        "no message was lost on the way"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_dropped_by_the_sender() {
    let (a, mut b) = pair().await;
    let mut big = heartbeat(1, 2, 1);
    big.context = Bytes::from(vec![0u8; config(1).max_frame_size + 1]);
    assert!(matches!(a.t.send(big), Err(SendError::TooLarge(2))));
    a.t.send(heartbeat(1, 2, 2)).unwrap();
    assert_eq!(recv(&mut b.inbox).await.commit, 2);
    assert_eq!(Stats::get(&a.t.stats().dropped_too_large), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_over_the_receivers_limit_closes_only_that_connection() {
    let mut small = config(2);
    small.max_frame_size = 64 << 10;
    small.snapshot_chunk_size = 64 << 10;
    let mut a = node(1).await;
    let mut b = node_with(small, loopback()).await;
    a.t.add_peer(2, b.t.local_addr()).unwrap();
    send_until_received(&a.t, 2, &mut b.inbox).await;
    let mut big = heartbeat(1, 2, 1);
    big.context = Bytes::from(vec![0u8; 100 << 10]);
    a.t.send(big).unwrap();
    report(&mut a.reports, Report::Unreachable(2)).await;
    assert_eq!(Stats::get(&b.t.stats().protocol_errors), 1);
    // The sender redials and normal traffic resumes.
    send_until_received(&a.t, 2, &mut b.inbox).await;
    assert!(Stats::get(&a.t.stats().reconnects) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_cluster_is_refused() {
    let mut a = node(1).await;
    let mut other = config(2);
    other.cluster_id = CLUSTER + 1;
    let mut b = node_with(other, loopback()).await;
    a.t.add_peer(2, b.t.local_addr()).unwrap();
    a.t.send(heartbeat(1, 2, 0)).unwrap();
    report(&mut a.reports, Report::Unreachable(2)).await;
    let stats = b.t.stats().clone();
    wait_until("a refused handshake", || {
        Stats::get(&stats.rejected_handshakes) >= 1
    })
    .await;
    assert!(b.inbox.try_recv().is_none());
    assert_eq!(Stats::get(&stats.frames_received), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_node_id_is_refused() {
    let mut a = node(1).await;
    let mut b = node(2).await;
    // Node 1 believes node 3 lives at node 2's address.
    a.t.add_peer(3, b.t.local_addr()).unwrap();
    a.t.send(heartbeat(1, 3, 0)).unwrap();
    report(&mut a.reports, Report::Unreachable(3)).await;
    let stats = b.t.stats().clone();
    wait_until("a refused handshake", || {
        Stats::get(&stats.rejected_handshakes) >= 1
    })
    .await;
    assert!(b.inbox.try_recv().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_everything_and_drop_does_too() {
    let (mut a, mut b) = pair().await;
    send_until_received(&a.t, 2, &mut b.inbox).await;
    send_until_received(&b.t, 1, &mut a.inbox).await;
    let Node {
        t,
        mut inbox,
        mut reports,
    } = a;
    let addr = t.local_addr();
    let stats = t.stats().clone();
    within("shutdown", t.shutdown()).await;
    // Every task is gone: the node's channels end and its port is free again.
    while inbox.try_recv().is_some() {}
    assert!(within("inbox to end", inbox.recv()).await.is_none());
    while reports.try_recv().is_ok() {}
    assert!(within("reports to end", reports.recv()).await.is_none());
    TcpListener::bind(addr)
        .await
        .expect("port still held after shutdown");
    let sent = Stats::get(&stats.sent);
    assert!(sent >= 1, "stats outlive the transport");

    // Dropping without `shutdown` stops the tasks too, just without waiting for them.
    let Node { t, mut inbox, .. } = b;
    let addr = t.local_addr();
    drop(t);
    while inbox.try_recv().is_some() {}
    assert!(within("inbox to end after drop", inbox.recv())
        .await
        .is_none());
    wait_until_bindable(addr).await;
}

async fn wait_until_bindable(addr: std::net::SocketAddr) {
    within("the port to be released", async {
        loop {
            if TcpListener::bind(addr).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}
