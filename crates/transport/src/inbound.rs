//! Inbound side: the listener, the acceptor's half of the handshake, and one task per accepted
//! connection that turns frames into messages for the node.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use keel_proto::raftpb::MessageType;
use tokio::io::AsyncReadExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::timeout;
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::conn::{self, FrameReader};
use crate::error::Error;
use crate::inbox::InboxSender;
use crate::stats::Stats;
use crate::wire::{self, FrameKind, Hello, HelloError, StreamKind, FRAME_HEADER_LEN, HELLO_LEN};

/// Pause after a failed `accept` (out of file descriptors, typically): retrying at once would
/// spin on the same error.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// State shared by the listener and its connection tasks.
pub(crate) struct Acceptor {
    pub(crate) cfg: Arc<Config>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) inbox: InboxSender,
    /// One permit per open accepted connection (`max_inbound_connections`).
    pub(crate) connections: Arc<Semaphore>,
    /// One permit per snapshot being received or waiting in the inbox
    /// (`max_inbound_snapshots`).
    pub(crate) snapshots: Arc<Semaphore>,
    /// The live Raft connection from each peer, by its connection number. A peer dials one at
    /// a time, so a newer one means the older is dead on the peer's side (it may linger here
    /// after a crash that sent no FIN); registering the newer closes the older.
    pub(crate) raft_conns: Mutex<HashMap<u64, (u64, oneshot::Sender<()>)>>,
    pub(crate) next_conn: AtomicU64,
}

pub(crate) async fn run_listener(
    acceptor: Arc<Acceptor>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<()>,
    alive: mpsc::Sender<()>,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            r = listener.accept() => r,
        };
        let (tcp, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                warn!("accepting a peer connection failed: {e}");
                tokio::select! {
                    biased;
                    _ = shutdown.changed() => return,
                    _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                }
            }
        };
        let Ok(permit) = acceptor.connections.clone().try_acquire_owned() else {
            warn!(
                %remote,
                "refusing connection from {remote}: {} connections already open",
                acceptor.cfg.max_inbound_connections
            );
            continue;
        };
        tokio::spawn(serve(
            acceptor.clone(),
            tcp,
            remote,
            permit,
            shutdown.clone(),
            alive.clone(),
        ));
    }
}

/// Reads the magic first and stops there if it is wrong, so a stranger that sends fewer
/// bytes than a hello (an HTTP probe) is closed at once, not after the handshake timeout.
async fn read_hello(r: &mut OwnedReadHalf, hello: &mut [u8; HELLO_LEN]) -> std::io::Result<()> {
    r.read_exact(&mut hello[..wire::MAGIC.len()]).await?;
    if hello[..wire::MAGIC.len()] == wire::MAGIC {
        r.read_exact(&mut hello[wire::MAGIC.len()..]).await?;
    }
    Ok(())
}

/// Checks a hello against this node. The reason goes into the log and the reject frame.
pub(crate) fn check_hello(cfg: &Config, bytes: &[u8; HELLO_LEN]) -> Result<Hello, String> {
    let h = Hello::decode(bytes).map_err(|e| e.to_string())?;
    if h.cluster_id != cfg.cluster_id {
        return Err(format!(
            "cluster id {:#x} is not this node's cluster {:#x}",
            h.cluster_id, cfg.cluster_id
        ));
    }
    if h.to != cfg.id {
        return Err(format!(
            "addressed to node {}, but this is node {}",
            h.to, cfg.id
        ));
    }
    if h.from == 0 || h.from == cfg.id {
        return Err(format!("invalid sender id {}", h.from));
    }
    Ok(h)
}

async fn serve(
    acceptor: Arc<Acceptor>,
    tcp: TcpStream,
    remote: SocketAddr,
    _permit: OwnedSemaphorePermit,
    mut shutdown: watch::Receiver<()>,
    _alive: mpsc::Sender<()>,
) {
    let cfg = acceptor.cfg.clone();
    let stats = acceptor.stats.clone();
    let _ = tcp.set_nodelay(true);
    let (mut r, mut w) = tcp.into_split();
    let mut hello = [0u8; HELLO_LEN];
    let read = tokio::select! {
        biased;
        _ = shutdown.changed() => return,
        r = timeout(cfg.handshake_timeout, read_hello(&mut r, &mut hello)) => r,
    };
    match read {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            Stats::inc(&stats.rejected_handshakes);
            warn!(%remote, "connection from {remote} closed during the handshake: {e}");
            return;
        }
        Err(_) => {
            Stats::inc(&stats.rejected_handshakes);
            warn!(%remote, "connection from {remote} sent no hello within {:?}", cfg.handshake_timeout);
            return;
        }
    }
    let hello = match check_hello(&cfg, &hello) {
        Ok(h) => h,
        Err(reason) => {
            Stats::inc(&stats.rejected_handshakes);
            warn!(%remote, "refused connection from {remote}: {reason}");
            // Something that is not a Keel peer would not understand a reject frame.
            let not_keel = matches!(Hello::decode(&hello), Err(HelloError::BadMagic(_)));
            if !not_keel {
                conn::send_reject(&mut w, &reason, cfg.handshake_timeout).await;
            }
            return;
        }
    };
    let mut ok = BytesMut::new();
    wire::put_header(&mut ok, FrameKind::Ok, 0);
    if let Err(e) = conn::write_timed(&mut w, &ok, cfg.handshake_timeout, "handshake answer").await
    {
        warn!(%remote, peer = hello.from, "handshake with peer {} failed: {e}", hello.from);
        return;
    }
    let reader = FrameReader::new(r, cfg.max_frame_size);
    match hello.stream {
        StreamKind::Raft => serve_raft(&acceptor, hello.from, remote, reader, w, shutdown).await,
        StreamKind::Snapshot => {
            tokio::select! {
                biased;
                _ = shutdown.changed() => {}
                _ = serve_snapshot(&acceptor, hello.from, remote, reader, w) => {}
            }
        }
    }
}

async fn serve_raft(
    acceptor: &Acceptor,
    from: u64,
    remote: SocketAddr,
    mut reader: FrameReader<OwnedReadHalf>,
    mut w: OwnedWriteHalf,
    mut shutdown: watch::Receiver<()>,
) {
    let cfg = &acceptor.cfg;
    let stats = &acceptor.stats;
    let conn_no = acceptor.next_conn.fetch_add(1, Ordering::Relaxed);
    let (replace_tx, mut replaced) = oneshot::channel();
    let older = acceptor
        .raft_conns
        .lock()
        .expect("raft_conns lock")
        .insert(from, (conn_no, replace_tx));
    // Dropping the older connection's sender is what tells it to close.
    drop(older);
    info!(
        peer = from,
        "accepted connection from peer {from} at {remote}"
    );
    // Only the first misaddressed message per connection is logged at warn: a confused peer
    // would otherwise log once per message.
    let mut misaddressed = 0u64;
    let err = loop {
        let frame = tokio::select! {
            biased;
            _ = shutdown.changed() => break None,
            _ = &mut replaced => {
                info!(peer = from, "connection from peer {from} at {remote} replaced by a newer one");
                break None;
            }
            f = reader.next() => f,
        };
        let (kind, payload) = match frame {
            Ok(Some(f)) => f,
            Ok(None) => {
                info!(
                    peer = from,
                    "peer {from} closed its connection from {remote}"
                );
                break None;
            }
            Err(e) => break Some(e),
        };
        Stats::inc(&stats.frames_received);
        Stats::add(
            &stats.bytes_received,
            (FRAME_HEADER_LEN + payload.len()) as u64,
        );
        if kind != FrameKind::Message {
            break Some(Error::Protocol(format!(
                "{kind:?} frame on a Raft connection"
            )));
        }
        let msg = match wire::decode_message(&payload) {
            Ok(m) => m,
            Err(e) => break Some(e.into()),
        };
        if msg.from != from || msg.to != cfg.id {
            Stats::inc(&stats.dropped_misaddressed);
            misaddressed += 1;
            if misaddressed == 1 {
                warn!(
                    peer = from,
                    "dropping a {:?} from {} to {} on the connection of peer {from} to node {}",
                    msg.msg_type(),
                    msg.from,
                    msg.to,
                    cfg.id
                );
            }
            continue;
        }
        if !acceptor
            .inbox
            .try_deliver(msg, FRAME_HEADER_LEN + payload.len())
        {
            Stats::inc(&stats.dropped_inbox_full);
        }
    };
    {
        let mut conns = acceptor.raft_conns.lock().expect("raft_conns lock");
        if conns.get(&from).is_some_and(|(n, _)| *n == conn_no) {
            conns.remove(&from);
        }
    }
    match err {
        None => {}
        Some(Error::Io(e)) => info!(
            peer = from,
            "lost connection from peer {from} at {remote}: {e}"
        ),
        Some(e) => {
            Stats::inc(&stats.protocol_errors);
            error!(
                peer = from,
                "closing connection from peer {from} at {remote}: {e}"
            );
            conn::send_reject(&mut w, &e.to_string(), cfg.handshake_timeout).await;
        }
    }
}

async fn serve_snapshot(
    acceptor: &Acceptor,
    from: u64,
    remote: SocketAddr,
    mut reader: FrameReader<OwnedReadHalf>,
    mut w: OwnedWriteHalf,
) {
    let cfg = &acceptor.cfg;
    let stats = &acceptor.stats;
    match receive_snapshot(acceptor, from, &mut reader, &mut w).await {
        Ok((index, len)) => {
            Stats::inc(&stats.snapshots_received);
            info!(
                peer = from,
                "received snapshot at index {index} ({len} bytes) from peer {from}"
            );
        }
        Err(e) => {
            Stats::inc(&stats.snapshots_refused);
            if matches!(e, Error::Frame(_)) {
                Stats::inc(&stats.protocol_errors);
            }
            warn!(
                peer = from,
                "refused snapshot from peer {from} at {remote}: {e}"
            );
            conn::send_reject(&mut w, &e.to_string(), cfg.handshake_timeout).await;
        }
    }
}

/// Receives one snapshot and hands it to the node. Returns its index and data length.
async fn receive_snapshot(
    acceptor: &Acceptor,
    from: u64,
    reader: &mut FrameReader<OwnedReadHalf>,
    w: &mut OwnedWriteHalf,
) -> Result<(u64, u64), Error> {
    let cfg = &acceptor.cfg;
    let stats = &acceptor.stats;
    let permit = acceptor
        .snapshots
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            Error::Protocol(format!(
                "{} snapshots are already being received or waiting",
                cfg.max_inbound_snapshots
            ))
        })?;
    let (kind, payload) = next_snapshot_frame(reader, cfg.snapshot_idle_timeout, stats).await?;
    if kind != FrameKind::SnapHeader {
        return Err(Error::Protocol(format!(
            "expected a snapshot header, got {kind:?}"
        )));
    }
    let (total, mut msg) = wire::decode_snap_header(payload)?;
    if msg.msg_type() != MessageType::MsgSnapshot || msg.from != from || msg.to != cfg.id {
        Stats::inc(&stats.dropped_misaddressed);
        return Err(Error::Protocol(format!(
            "header carries a {:?} from {} to {} on a snapshot connection from peer {from} to node {}",
            msg.msg_type(),
            msg.from,
            msg.to,
            cfg.id
        )));
    }
    if total > cfg.max_snapshot_size {
        return Err(Error::Protocol(format!(
            "snapshot of {total} bytes is over the limit of {}",
            cfg.max_snapshot_size
        )));
    }
    let mut ok = BytesMut::new();
    wire::put_header(&mut ok, FrameKind::Ok, 0);
    conn::write_timed(w, &ok, cfg.write_timeout, "snapshot header answer").await?;
    // Grows with the chunks that arrive, never to the announced total up front: a sender that
    // announces the limit and then stalls costs only what it sent.
    let mut data = BytesMut::new();
    loop {
        let (kind, payload) = next_snapshot_frame(reader, cfg.snapshot_idle_timeout, stats).await?;
        match kind {
            FrameKind::SnapChunk => {
                if data.len() as u64 + payload.len() as u64 > total {
                    return Err(Error::Protocol(format!(
                        "more data than the {total} bytes announced"
                    )));
                }
                data.extend_from_slice(&payload);
                Stats::inc(&stats.snapshot_chunks_received);
            }
            FrameKind::SnapEnd => break,
            k => return Err(Error::Protocol(format!("{k:?} frame inside a snapshot"))),
        }
    }
    if data.len() as u64 != total {
        return Err(Error::Protocol(format!(
            "stream ended after {} of {total} bytes",
            data.len()
        )));
    }
    let snap = msg.snapshot.get_or_insert_with(Default::default);
    snap.data = data.freeze();
    let index = snap.metadata.as_ref().map_or(0, |m| m.index);
    if !acceptor
        .inbox
        .deliver_snapshot(msg, permit, cfg.snapshot_deliver_timeout)
        .await
    {
        return Err(Error::Protocol(format!(
            "the node did not take the snapshot within {:?}",
            cfg.snapshot_deliver_timeout
        )));
    }
    conn::write_timed(w, &ok, cfg.write_timeout, "snapshot delivered answer").await?;
    debug!(peer = from, "snapshot from peer {from} delivered");
    Ok((index, total))
}

async fn next_snapshot_frame(
    reader: &mut FrameReader<OwnedReadHalf>,
    idle: Duration,
    stats: &Stats,
) -> Result<(FrameKind, bytes::Bytes), Error> {
    let f = timeout(idle, reader.next())
        .await
        .map_err(|_| Error::Timeout("snapshot stream"))??
        .ok_or(Error::Closed)?;
    Stats::inc(&stats.frames_received);
    Stats::add(&stats.bytes_received, (FRAME_HEADER_LEN + f.1.len()) as u64);
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(cluster_id: u64, from: u64, to: u64) -> [u8; HELLO_LEN] {
        Hello {
            stream: StreamKind::Raft,
            cluster_id,
            from,
            to,
        }
        .encode()
    }

    #[test]
    fn hello_checks_name_the_reason() {
        let cfg = Config::new(2, 7);
        assert_eq!(check_hello(&cfg, &hello(7, 1, 2)).unwrap().from, 1);
        let err = |b| check_hello(&cfg, &b).unwrap_err();
        assert_eq!(
            err(hello(8, 1, 2)),
            "cluster id 0x8 is not this node's cluster 0x7"
        );
        assert_eq!(
            err(hello(7, 1, 3)),
            "addressed to node 3, but this is node 2"
        );
        assert_eq!(err(hello(7, 0, 2)), "invalid sender id 0");
        assert_eq!(err(hello(7, 2, 2)), "invalid sender id 2");
        let mut v2 = hello(7, 1, 2);
        v2[4] = 2;
        assert_eq!(
            err(v2),
            "unsupported protocol version 2 (this node speaks 1)"
        );
    }
}
