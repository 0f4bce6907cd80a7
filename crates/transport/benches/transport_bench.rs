//! Throughput between two transports on loopback. Prints figures, asserts nothing:
//! `cargo bench -p keel-transport --bench transport_bench`.
//!
//! One sender pushes messages to one receiver as fast as the receiver drains them, keeping at
//! most a queue's worth in flight so the figure is delivered throughput, not drop rate.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_proto::raftpb::{Entry, Message, MessageType};
use keel_transport::{Config, Stats, Transport};
use prost::Message as _;

/// Long enough to average out scheduling noise on a shared 2-core machine, short enough to
/// keep the bench under a minute.
const RUN_FOR: Duration = Duration::from_secs(3);

fn heartbeat() -> Message {
    Message {
        msg_type: MessageType::MsgHeartbeat as i32,
        to: 2,
        from: 1,
        term: 7,
        commit: 123_456,
        ..Default::default()
    }
}

fn append_4k() -> Message {
    Message {
        msg_type: MessageType::MsgAppend as i32,
        to: 2,
        from: 1,
        term: 7,
        log_term: 7,
        index: 1_000_000,
        commit: 999_999,
        entries: vec![Entry {
            term: 7,
            index: 1_000_001,
            entry_type: 0,
            data: Bytes::from(vec![0x5a; 4096]),
        }],
        ..Default::default()
    }
}

async fn run(name: &str, msg: Message) {
    let loopback: SocketAddr = "127.0.0.1:0".parse().expect("address");
    let (a, _a_inbox, _a_reports) = Transport::bind(Config::new(1, 1), loopback)
        .await
        .expect("bind a");
    let (b, mut b_inbox, _b_reports) = Transport::bind(Config::new(2, 1), loopback)
        .await
        .expect("bind b");
    a.add_peer(2, b.local_addr()).expect("add peer");
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let drain = tokio::spawn(async move {
        while b_inbox.recv().await.is_some() {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    let window = Config::new(1, 1).peer_queue_capacity as u64 / 2;
    let frame_len = msg.encoded_len() as u64 + 5;
    let mut sent = 0u64;
    let start = Instant::now();
    while start.elapsed() < RUN_FOR {
        while sent - received.load(Ordering::Relaxed) < window {
            if a.send(msg.clone()).is_ok() {
                sent += 1;
            }
        }
        tokio::task::yield_now().await;
    }
    let delivered = received.load(Ordering::Relaxed);
    let secs = start.elapsed().as_secs_f64();
    let stats = a.stats();
    let batches = Stats::get(&stats.write_batches).max(1);
    println!(
        "{name:<10} {frame_len:>5} B/frame {:>10.0} msgs/s {:>8.1} MB/s  ({} msgs in {secs:.1} s, {:.1} msgs/write, {} dropped)",
        delivered as f64 / secs,
        (delivered * frame_len) as f64 / secs / 1e6,
        delivered,
        Stats::get(&stats.sent) as f64 / batches as f64,
        Stats::get(&stats.dropped_queue_full),
    );
    a.shutdown().await;
    b.shutdown().await;
    drain.await.expect("drain task");
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        run("heartbeat", heartbeat()).await;
        run("append 4K", append_4k()).await;
    });
}
