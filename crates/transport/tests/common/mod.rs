//! Helpers shared by the integration tests: transports on 127.0.0.1 with free ports, and
//! waits that always end at a deadline.

#![allow(dead_code)] // each test binary uses its own subset

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use keel_proto::raftpb::{Entry, Message, MessageType};
use keel_transport::{Config, Inbox, Report, Reports, Transport};
use tokio::time::{timeout, Instant};

pub const CLUSTER: u64 = 0x6b65_656c;

/// Upper bound of every wait: far above what loopback needs, so a timeout means a bug.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Poll interval of `wait_until`.
const POLL: Duration = Duration::from_millis(5);

pub fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Fast redials, so reconnection tests take milliseconds.
pub fn config(id: u64) -> Config {
    let mut c = Config::new(id, CLUSTER);
    c.initial_backoff = Duration::from_millis(10);
    c.max_backoff = Duration::from_millis(100);
    c
}

pub struct Node {
    pub t: Transport,
    pub inbox: Inbox,
    pub reports: Reports,
}

pub async fn node_with(cfg: Config, addr: SocketAddr) -> Node {
    let (t, inbox, reports) = Transport::bind(cfg, addr).await.expect("bind");
    Node { t, inbox, reports }
}

pub async fn node(id: u64) -> Node {
    node_with(config(id), loopback()).await
}

/// Nodes that all know each other.
pub async fn mesh(ids: &[u64]) -> Vec<Node> {
    let mut nodes = Vec::new();
    for &id in ids {
        nodes.push(node(id).await);
    }
    for a in &nodes {
        for b in &nodes {
            if a.t.id() != b.t.id() {
                a.t.add_peer(b.t.id(), b.t.local_addr()).unwrap();
            }
        }
    }
    nodes
}

/// Nodes 1 and 2, knowing each other.
pub async fn pair() -> (Node, Node) {
    let mut nodes = mesh(&[1, 2]).await;
    let b = nodes.pop().unwrap();
    (nodes.pop().unwrap(), b)
}

pub fn msg(t: MessageType, from: u64, to: u64, seq: u64) -> Message {
    Message {
        msg_type: t as i32,
        from,
        to,
        term: seq + 1,
        log_term: seq,
        index: seq,
        commit: seq / 2,
        entries: vec![Entry {
            term: seq + 1,
            index: seq + 1,
            entry_type: 0,
            data: Bytes::from(format!("entry {seq}")),
        }],
        reject: seq % 2 == 1,
        reject_hint: seq * 3,
        reject_hint_term: seq * 5,
        context: Bytes::from(format!("ctx {seq}")),
        ..Default::default()
    }
}

pub fn heartbeat(from: u64, to: u64, seq: u64) -> Message {
    Message {
        msg_type: MessageType::MsgHeartbeat as i32,
        from,
        to,
        term: 1,
        commit: seq,
        ..Default::default()
    }
}

pub async fn within<F: Future>(what: &str, f: F) -> F::Output {
    timeout(DEADLINE, f)
        .await
        .unwrap_or_else(|_| panic!("timed out after {DEADLINE:?} waiting for {what}"))
}

pub async fn recv(inbox: &mut Inbox) -> Message {
    within("a message", inbox.recv())
        .await
        .expect("inbox closed")
}

/// Polls `cond` until it holds or the deadline passes.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !cond() {
        assert!(
            Instant::now() < end,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// The next report matching `want`, skipping others.
pub async fn report(reports: &mut Reports, want: Report) {
    within(&format!("{want:?}"), async {
        loop {
            if reports.recv().await.expect("reports closed") == want {
                return;
            }
        }
    })
    .await
}

/// Sends heartbeats from `from` to peer `to` until `inbox` receives one; for waiting out a
/// reconnection without knowing when it happens.
pub async fn send_until_received(from: &Transport, to: u64, inbox: &mut Inbox) -> Message {
    let end = Instant::now() + DEADLINE;
    let mut seq = 0;
    loop {
        assert!(
            Instant::now() < end,
            "no message got through within {DEADLINE:?}"
        );
        let _ = from.send(heartbeat(from.id(), to, seq));
        seq += 1;
        if let Ok(Some(m)) = timeout(Duration::from_millis(20), inbox.recv()).await {
            return m;
        }
    }
}
