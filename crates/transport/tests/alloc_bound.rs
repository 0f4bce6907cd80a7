//! Declared lengths never turn into allocations: a peer that announces a huge frame or
//! snapshot and sends little costs about what it sent. Its own test binary, because it
//! watches every allocation of the process.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::BytesMut;
use common::*;
use keel_proto::raftpb::{Message, MessageType};
use keel_transport::wire::{self, FrameKind, Hello, StreamKind};
use keel_transport::Stats;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Records the largest single allocation (or reallocation) requested.
struct Largest;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Largest = Largest;

/// Well above the reader's per-read growth (256 KiB), far below any declared length below.
const BOUND: usize = 1 << 20;

async fn connect(addr: std::net::SocketAddr, stream: StreamKind) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let hello = Hello {
        stream,
        cluster_id: CLUSTER,
        from: 1,
        to: 2,
    };
    s.write_all(&hello.encode()).await.unwrap();
    let mut ok = [0u8; wire::FRAME_HEADER_LEN];
    s.read_exact(&mut ok).await.unwrap();
    assert_eq!(ok[4], FrameKind::Ok as u8);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_lengths_are_not_allocated() {
    let b = node(2).await;
    let addr = b.t.local_addr();
    let stats = b.t.stats().clone();
    LARGEST.store(0, Ordering::Relaxed);

    // A length far over the frame limit.
    let mut s = connect(addr, StreamKind::Raft).await;
    s.write_all(&[0xff, 0xff, 0xff, 0xff, FrameKind::Message as u8])
        .await
        .unwrap();
    wait_until("the oversized frame refused", || {
        Stats::get(&stats.protocol_errors) == 1
    })
    .await;

    // A length just under the limit, then a few bytes and silence, then a close.
    let mut s = connect(addr, StreamKind::Raft).await;
    let mut frame = BytesMut::new();
    wire::put_header(&mut frame, FrameKind::Message, (16 << 20) - 1);
    frame.extend_from_slice(&[0u8; 100]);
    s.write_all(&frame).await.unwrap();
    drop(s);
    wait_until("the truncated frame refused", || {
        Stats::get(&stats.protocol_errors) == 2
    })
    .await;

    // A snapshot announced at the size limit, followed by one small chunk and a close.
    let mut s = connect(addr, StreamKind::Snapshot).await;
    let header = Message {
        msg_type: MessageType::MsgSnapshot as i32,
        from: 1,
        to: 2,
        ..Default::default()
    };
    let mut frame = BytesMut::new();
    wire::put_snap_header(&mut frame, &header, config(2).max_snapshot_size, 1 << 20).unwrap();
    s.write_all(&frame).await.unwrap();
    let mut ok = [0u8; wire::FRAME_HEADER_LEN];
    s.read_exact(&mut ok).await.unwrap();
    assert_eq!(
        ok[4],
        FrameKind::Ok as u8,
        "the announced size is within the limit"
    );
    frame.clear();
    wire::put_header(&mut frame, FrameKind::SnapChunk, 1000);
    frame.extend_from_slice(&[7u8; 1000]);
    s.write_all(&frame).await.unwrap();
    drop(s);
    wait_until("the broken snapshot refused", || {
        Stats::get(&stats.snapshots_refused) == 1
    })
    .await;

    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest < BOUND,
        "an allocation of {largest} bytes; declared lengths must not be allocated up front"
    );
}
