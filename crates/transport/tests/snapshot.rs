//! Snapshot streaming: chunks on their own connection, heartbeats beside it, size limit,
//! outcome reports.

mod common;

use std::sync::mpsc as std_mpsc;

use bytes::Bytes;
use common::*;
use keel_proto::raftpb::{Message, MessageType, Snapshot, SnapshotMetadata};
use keel_transport::{Report, SnapshotSource, Stats};

fn snapshot_msg(from: u64, to: u64, index: u64, data: Bytes) -> Message {
    Message {
        msg_type: MessageType::MsgSnapshot as i32,
        from,
        to,
        term: 3,
        snapshot: Some(Snapshot {
            data,
            metadata: Some(SnapshotMetadata {
                conf_state: None,
                index,
                term: 3,
            }),
        }),
        ..Default::default()
    }
}

fn pattern(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i * 31 % 251) as u8)
        .collect::<Vec<_>>()
        .into()
}

/// Yields its data in pieces and stops halfway until the test opens the gate, so the test
/// can act while a stream is provably in progress.
struct GatedSource {
    total: u64,
    /// Not yet yielded.
    rest: Bytes,
    piece: usize,
    gate_at: u64,
    gate: Option<std_mpsc::Receiver<()>>,
}

impl SnapshotSource for GatedSource {
    fn len(&self) -> u64 {
        self.total
    }

    fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        if self.rest.is_empty() {
            return Ok(None);
        }
        let yielded = self.total - self.rest.len() as u64;
        if yielded >= self.gate_at {
            if let Some(gate) = self.gate.take() {
                gate.recv_timeout(DEADLINE).map_err(std::io::Error::other)?;
            }
        }
        let n = self.piece.min(self.rest.len());
        Ok(Some(self.rest.split_to(n)))
    }
}

const TOTAL: usize = 8 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_streams_in_chunks_while_heartbeats_flow() {
    let mut cfg1 = config(1);
    cfg1.snapshot_chunk_size = 64 << 10;
    let mut a = node_with(cfg1, loopback()).await;
    let mut b = node(2).await;
    a.t.add_peer(2, b.t.local_addr()).unwrap();
    b.t.add_peer(1, a.t.local_addr()).unwrap();

    let data = pattern(TOTAL);
    let (open, gate) = std_mpsc::channel();
    let source = GatedSource {
        total: TOTAL as u64,
        rest: data.clone(),
        piece: 256 << 10,
        gate_at: TOTAL as u64 / 2,
        gate: Some(gate),
    };
    assert_eq!(source.len(), TOTAL as u64);
    a.t.send_snapshot(snapshot_msg(1, 2, 100, Bytes::new()), Box::new(source))
        .unwrap();

    // Half the snapshot is across and the rest is held back: the stream is in progress.
    let b_stats = b.t.stats().clone();
    wait_until("half the chunks", || {
        Stats::get(&b_stats.snapshot_chunks_received) >= (TOTAL / 2 / (64 << 10)) as u64
    })
    .await;
    for seq in 0..50 {
        a.t.send(heartbeat(1, 2, seq)).unwrap();
        b.t.send(heartbeat(2, 1, seq)).unwrap();
    }
    for seq in 0..50 {
        let m = recv(&mut b.inbox).await;
        assert_eq!((m.msg_type(), m.commit), (MessageType::MsgHeartbeat, seq));
        assert_eq!(recv(&mut a.inbox).await.commit, seq);
    }
    assert_eq!(
        Stats::get(&b_stats.snapshots_received),
        0,
        "the stream is still held"
    );

    open.send(()).unwrap();
    let m = recv(&mut b.inbox).await;
    assert_eq!(m.msg_type(), MessageType::MsgSnapshot);
    assert_eq!(m, snapshot_msg(1, 2, 100, data));
    report(&mut a.reports, Report::Snapshot { to: 2, ok: true }).await;
    assert_eq!(
        Stats::get(&b_stats.snapshot_chunks_received),
        (TOTAL / (64 << 10)) as u64
    );
    assert_eq!(Stats::get(&a.t.stats().snapshots_sent), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_in_a_message_is_delivered_whole() {
    let mut nodes = mesh(&[1, 2]).await;
    let data = pattern(5 << 20);
    let snap = snapshot_msg(1, 2, 7, data);
    nodes[0].t.send(snap.clone()).unwrap();
    nodes[0].t.send(heartbeat(1, 2, 1)).unwrap();
    let mut got_snapshot = false;
    let mut got_heartbeat = false;
    while !(got_snapshot && got_heartbeat) {
        let m = recv(&mut nodes[1].inbox).await;
        if m.msg_type() == MessageType::MsgSnapshot {
            assert_eq!(m, snap);
            got_snapshot = true;
        } else {
            got_heartbeat = true;
        }
    }
    report(&mut nodes[0].reports, Report::Snapshot { to: 2, ok: true }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_snapshot_is_refused_and_reported_failed() {
    let mut small = config(2);
    small.max_snapshot_size = 1 << 20;
    let mut a = node(1).await;
    let mut b = node_with(small, loopback()).await;
    a.t.add_peer(2, b.t.local_addr()).unwrap();
    a.t.send(snapshot_msg(1, 2, 5, pattern(2 << 20))).unwrap();
    report(&mut a.reports, Report::Snapshot { to: 2, ok: false }).await;
    assert_eq!(Stats::get(&a.t.stats().snapshots_failed), 1);
    let b_stats = b.t.stats().clone();
    assert_eq!(Stats::get(&b_stats.snapshots_refused), 1);
    assert_eq!(
        Stats::get(&b_stats.snapshot_chunks_received),
        0,
        "refused on the header, before any data moved"
    );
    // One at the limit is fine.
    a.t.send(snapshot_msg(1, 2, 6, pattern(1 << 20))).unwrap();
    report(&mut a.reports, Report::Snapshot { to: 2, ok: true }).await;
    let m = recv(&mut b.inbox).await;
    assert_eq!(m.snapshot.unwrap().metadata.unwrap().index, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_to_an_absent_peer_is_reported_failed() {
    let free = tokio::net::TcpListener::bind(loopback())
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let mut a = node(1).await;
    a.t.add_peer(2, free).unwrap();
    a.t.send(snapshot_msg(1, 2, 5, pattern(1000))).unwrap();
    report(&mut a.reports, Report::Snapshot { to: 2, ok: false }).await;
    assert_eq!(Stats::get(&a.t.stats().snapshots_failed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_to_an_unknown_peer_is_reported_failed_at_once() {
    let mut a = node(1).await;
    assert!(a.t.send(snapshot_msg(1, 9, 5, pattern(10))).is_err());
    report(&mut a.reports, Report::Snapshot { to: 9, ok: false }).await;
}

/// A source that announces more than it yields must fail the stream, not hang the receiver.
struct ShortSource;

impl SnapshotSource for ShortSource {
    fn len(&self) -> u64 {
        100
    }
    fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        Ok(None)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_falls_short_fails_the_stream() {
    let mut nodes = mesh(&[1, 2]).await;
    nodes[0]
        .t
        .send_snapshot(snapshot_msg(1, 2, 5, Bytes::new()), Box::new(ShortSource))
        .unwrap();
    report(&mut nodes[0].reports, Report::Snapshot { to: 2, ok: false }).await;
    let b_stats = nodes[1].t.stats().clone();
    // The receiver sees the connection end mid-snapshot and refuses it.
    wait_until("the receiver to give up", || {
        Stats::get(&b_stats.snapshots_refused) == 1
    })
    .await;
    assert!(nodes[1].inbox.try_recv().is_none());
}
