//! Raw sockets against a transport's listener: handshake refusals, garbage, oversized
//! lengths, misaddressed messages, connection limits. The listener must survive all of it.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use common::*;
use keel_proto::raftpb::Message;
use keel_transport::wire::{self, FrameKind, Hello, StreamKind};
use keel_transport::Stats;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn hello(from: u64, to: u64) -> Hello {
    Hello {
        stream: StreamKind::Raft,
        cluster_id: CLUSTER,
        from,
        to,
    }
}

/// Reads one frame as a dialer would (control-frame limit); `None` at end of stream.
async fn read_frame(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; wire::FRAME_HEADER_LEN];
    s.read_exact(&mut head).await.ok()?;
    let len = u32::from_le_bytes(head[0..4].try_into().unwrap()) as usize;
    assert!(
        len <= wire::MAX_CONTROL_FRAME,
        "control frame of {len} bytes"
    );
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.ok()?;
    Some((head[4], payload))
}

/// Connects and says hello; returns the socket and the acceptor's answer.
async fn dial_raw(addr: SocketAddr, hello_bytes: &[u8]) -> (TcpStream, Option<(u8, Vec<u8>)>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(hello_bytes).await.unwrap();
    let answer = within("the hello's answer", read_frame(&mut s)).await;
    (s, answer)
}

/// Waits for the other side to close: a read returns end of stream or a reset.
async fn assert_closed(s: &mut TcpStream) {
    within("the connection to close", async {
        let mut buf = [0u8; 256];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
}

fn reason(answer: Option<(u8, Vec<u8>)>) -> String {
    let (kind, payload) = answer.expect("an answer before the close");
    assert_eq!(kind, FrameKind::Reject as u8);
    String::from_utf8(payload).unwrap()
}

fn message_frame(m: &Message) -> BytesMut {
    let mut b = BytesMut::new();
    wire::put_message(&mut b, m, usize::MAX).unwrap();
    b
}

/// The listener still serves a real peer after whatever a test did to it.
async fn still_serves(target: &mut Node) {
    let a = node(1).await;
    a.t.add_peer(target.t.id(), target.t.local_addr()).unwrap();
    send_until_received(&a.t, target.t.id(), &mut target.inbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_closed_without_an_answer() {
    let mut b = node(2).await;
    let mut s = TcpStream::connect(b.t.local_addr()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: keel\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = within("the close", s.read(&mut buf)).await.unwrap_or(0);
    assert_eq!(n, 0, "a stranger gets no frame back");
    assert_eq!(Stats::get(&b.t.stats().rejected_handshakes), 1);
    still_serves(&mut b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_version_wrong_cluster_and_wrong_id_are_refused_with_a_reason() {
    let mut b = node(2).await;
    let addr = b.t.local_addr();

    let mut v2 = hello(1, 2).encode();
    v2[4] = 2;
    let (mut s, answer) = dial_raw(addr, &v2).await;
    assert_eq!(
        reason(answer),
        "unsupported protocol version 2 (this node speaks 1)"
    );
    assert_closed(&mut s).await;

    let mut other = hello(1, 2);
    other.cluster_id = CLUSTER + 1;
    let (mut s, answer) = dial_raw(addr, &other.encode()).await;
    assert!(reason(answer).starts_with("cluster id"));
    assert_closed(&mut s).await;

    let (mut s, answer) = dial_raw(addr, &hello(1, 3).encode()).await;
    assert_eq!(reason(answer), "addressed to node 3, but this is node 2");
    assert_closed(&mut s).await;

    assert_eq!(Stats::get(&b.t.stats().rejected_handshakes), 3);
    still_serves(&mut b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_length_prefix_closes_the_connection() {
    let mut b = node(2).await;
    let (mut s, answer) = dial_raw(b.t.local_addr(), &hello(1, 2).encode()).await;
    assert_eq!(answer, Some((FrameKind::Ok as u8, vec![])));
    s.write_all(&[0xff, 0xff, 0xff, 0xff, FrameKind::Message as u8])
        .await
        .unwrap();
    let why = reason(within("the reject", read_frame(&mut s)).await);
    assert!(why.contains("over the limit"), "{why}");
    assert_closed(&mut s).await;
    assert_eq!(Stats::get(&b.t.stats().protocol_errors), 1);
    still_serves(&mut b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_message_closes_the_connection() {
    let mut b = node(2).await;
    let (mut s, _) = dial_raw(b.t.local_addr(), &hello(1, 2).encode()).await;
    let mut frame = BytesMut::new();
    wire::put_header(&mut frame, FrameKind::Message, 4);
    frame.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
    s.write_all(&frame).await.unwrap();
    let why = reason(within("the reject", read_frame(&mut s)).await);
    assert!(why.contains("malformed"), "{why}");
    assert_closed(&mut s).await;
    assert_eq!(Stats::get(&b.t.stats().protocol_errors), 1);
    still_serves(&mut b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_claiming_another_sender_are_dropped() {
    let mut b = node(2).await;
    let (mut s, _) = dial_raw(b.t.local_addr(), &hello(3, 2).encode()).await;
    let forged = heartbeat(4, 2, 1);
    let misrouted = heartbeat(3, 5, 2);
    let honest = heartbeat(3, 2, 3);
    for m in [&forged, &misrouted, &honest] {
        s.write_all(&message_frame(m)).await.unwrap();
    }
    assert_eq!(recv(&mut b.inbox).await, honest);
    let stats = b.t.stats().clone();
    wait_until("all three frames", || {
        Stats::get(&stats.frames_received) == 3
    })
    .await;
    assert_eq!(Stats::get(&stats.dropped_misaddressed), 2);
    assert!(b.inbox.try_recv().is_none());
    // Dropping a misaddressed message does not end the connection.
    s.write_all(&message_frame(&heartbeat(3, 2, 4)))
        .await
        .unwrap();
    assert_eq!(recv(&mut b.inbox).await.commit, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_after_the_handshake_timeout() {
    let mut cfg = config(2);
    cfg.handshake_timeout = Duration::from_millis(200);
    let mut b = node_with(cfg, loopback()).await;
    let mut silent = TcpStream::connect(b.t.local_addr()).await.unwrap();
    assert_closed(&mut silent).await;
    assert_eq!(Stats::get(&b.t.stats().rejected_handshakes), 1);
    still_serves(&mut b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_closed_at_once() {
    let mut cfg = config(2);
    cfg.max_inbound_connections = 2;
    let mut b = node_with(cfg, loopback()).await;
    let addr = b.t.local_addr();
    // The listener accepts in connection order, so these two hold both slots (they say
    // nothing, and the handshake timeout is seconds away) when the third is accepted.
    let silent1 = TcpStream::connect(addr).await.unwrap();
    let silent2 = TcpStream::connect(addr).await.unwrap();
    let mut third = TcpStream::connect(addr).await.unwrap();
    let _ = third.write_all(&hello(1, 2).encode()).await;
    assert_eq!(
        within("the third's close", read_frame(&mut third)).await,
        None
    );
    // Freeing the slots lets a real peer in.
    drop((silent1, silent2));
    still_serves(&mut b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_connection_from_the_same_peer_replaces_the_older() {
    let mut b = node(2).await;
    let (mut old, _) = dial_raw(b.t.local_addr(), &hello(1, 2).encode()).await;
    let (mut new, _) = dial_raw(b.t.local_addr(), &hello(1, 2).encode()).await;
    assert_closed(&mut old).await;
    new.write_all(&message_frame(&heartbeat(1, 2, 9)))
        .await
        .unwrap();
    assert_eq!(recv(&mut b.inbox).await.commit, 9);
}
