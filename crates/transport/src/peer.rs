//! Outbound side: per peer, one task keeps a Raft connection and drains the peer's queue into
//! it in batches; another streams snapshots, one at a time, each on a connection of its own.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use keel_proto::raftpb::{Message, MessageType};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};
use tokio::time::timeout;
use tracing::{debug, error, info, warn};

use crate::backoff::Backoff;
use crate::config::Config;
use crate::conn::{self, FrameReader};
use crate::error::Error;
use crate::inbox::Reporter;
use crate::snapshot::SnapshotSource;
use crate::stats::Stats;
use crate::wire::{self, FrameKind, StreamKind};

/// Snapshots queued per peer behind the one being streamed. Raft has at most one snapshot in
/// flight per follower; one more covers a leader that re-sends right after a failure report.
pub(crate) const PENDING_SNAPSHOTS: usize = 2;

pub(crate) struct SnapshotJob {
    /// The `MsgSnapshot`, its `snapshot.data` empty: the data comes from `source`.
    pub(crate) msg: Message,
    pub(crate) source: Box<dyn SnapshotSource>,
}

/// The transport's handle on a peer's tasks. Dropping it (peer removed, transport dropped)
/// closes `addr` and the queues, and the tasks end.
pub(crate) struct PeerHandle {
    pub(crate) addr: watch::Sender<String>,
    pub(crate) queue: mpsc::Sender<Message>,
    pub(crate) snapshots: mpsc::Sender<SnapshotJob>,
}

/// What a peer's tasks share.
#[derive(Clone)]
pub(crate) struct PeerCtx {
    pub(crate) id: u64,
    pub(crate) cfg: Arc<Config>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) reporter: Reporter,
    /// Closed (never written) when the transport shuts down.
    pub(crate) shutdown: watch::Receiver<()>,
    /// Held, never used: `Transport::shutdown` waits until every task has dropped its clone.
    pub(crate) _alive: mpsc::Sender<()>,
}

pub(crate) fn spawn(rt: &Handle, ctx: PeerCtx, addr: String) -> PeerHandle {
    let (addr_tx, addr_rx) = watch::channel(addr);
    let (queue_tx, queue_rx) = mpsc::channel(ctx.cfg.peer_queue_capacity);
    let (snap_tx, snap_rx) = mpsc::channel(PENDING_SNAPSHOTS);
    let backoff = Backoff::new(
        ctx.cfg.initial_backoff,
        ctx.cfg.max_backoff,
        ctx.cfg.id,
        ctx.id,
    );
    rt.spawn(
        RaftStream {
            ctx: ctx.clone(),
            addr: addr_rx.clone(),
            queue: queue_rx,
            backoff,
            buf: BytesMut::new(),
        }
        .run(),
    );
    rt.spawn(run_snapshots(ctx, addr_rx, snap_rx));
    PeerHandle {
        addr: addr_tx,
        queue: queue_tx,
        snapshots: snap_tx,
    }
}

/// Why a connection stopped being used.
enum Stop {
    /// Transport shut down or peer removed: the task ends.
    End,
    AddrChanged,
    Lost(Error),
}

struct RaftStream {
    ctx: PeerCtx,
    addr: watch::Receiver<String>,
    queue: mpsc::Receiver<Message>,
    backoff: Backoff,
    /// The batch being written; kept to reuse its allocation.
    buf: BytesMut,
}

impl RaftStream {
    async fn run(mut self) {
        let id = self.ctx.id;
        let mut connected_before = false;
        // Dial failures since the last connection: only the first is logged at info, so a peer
        // that stays down does not flood the log.
        let mut failures = 0u32;
        loop {
            let addr = self.addr.borrow_and_update().clone();
            let dialed = tokio::select! {
                biased;
                _ = self.ctx.shutdown.changed() => return,
                r = conn::dial(&self.ctx.cfg, id, &addr, StreamKind::Raft) => r,
            };
            match dialed {
                Ok((reader, writer)) => {
                    if connected_before {
                        Stats::inc(&self.ctx.stats.reconnects);
                    }
                    connected_before = true;
                    failures = 0;
                    info!(peer = id, "connected to peer {id} at {addr}");
                    let up_since = Instant::now();
                    match self.pump(reader, writer).await {
                        Stop::End => return,
                        Stop::AddrChanged => {
                            info!(peer = id, "peer {id} moved, redialing");
                            continue;
                        }
                        Stop::Lost(e) => {
                            info!(peer = id, "lost connection to peer {id}: {e}");
                            // A connection that lived a while was healthy: start the delays
                            // over. One that dies at once (a peer that accepts and closes)
                            // keeps growing them instead of being redialed in a tight loop.
                            if up_since.elapsed() >= self.ctx.cfg.max_backoff {
                                self.backoff.reset();
                            }
                        }
                    }
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 {
                        info!(peer = id, "cannot connect to peer {id} at {addr}: {e}");
                    } else {
                        debug!(
                            peer = id,
                            failures, "cannot connect to peer {id} at {addr}: {e}"
                        );
                    }
                }
            }
            self.ctx.reporter.unreachable(id);
            if !self.back_off().await {
                return;
            }
        }
    }

    /// Waits before the next dial. Messages queued meanwhile cannot be delivered: they fail
    /// now (counted) rather than fill the queue and go out stale after the reconnection. They
    /// are covered by the report just made for the failure that started this wait, so a
    /// dead peer costs one report per dial attempt however much the Raft loop sends it.
    /// Returns false when the task must end.
    async fn back_off(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + self.backoff.next_delay();
        let mut discarded = Vec::new();
        loop {
            tokio::select! {
                biased;
                _ = self.ctx.shutdown.changed() => return false,
                r = self.addr.changed() => return r.is_ok(),
                _ = tokio::time::sleep_until(deadline) => return true,
                n = self.queue.recv_many(&mut discarded, self.ctx.cfg.max_batch_messages) => {
                    if n == 0 {
                        return false;
                    }
                    Stats::add(&self.ctx.stats.send_failures, n as u64);
                    discarded.clear();
                }
            }
        }
    }

    /// Drains the queue into the connection until it fails or is no longer wanted.
    async fn pump(
        &mut self,
        mut reader: FrameReader<OwnedReadHalf>,
        mut writer: OwnedWriteHalf,
    ) -> Stop {
        let cfg = self.ctx.cfg.clone();
        let stop = loop {
            let first = tokio::select! {
                biased;
                _ = self.ctx.shutdown.changed() => break Stop::End,
                r = self.addr.changed() => {
                    break if r.is_ok() { Stop::AddrChanged } else { Stop::End };
                }
                // The acceptor writes nothing after its Ok but a reject before closing (for a
                // frame it refused), so anything read here, or the end of the stream, means
                // the connection is over.
                f = reader.next() => break Stop::Lost(match f {
                    Ok(Some((FrameKind::Reject, reason))) => conn::rejected(&reason),
                    Ok(Some((kind, _))) => Error::Protocol(format!("unexpected {kind:?} frame")),
                    Ok(None) => Error::Closed,
                    Err(e) => e,
                }),
                m = self.queue.recv() => match m {
                    Some(m) => m,
                    None => break Stop::End,
                },
            };
            self.buf.clear();
            let mut batch = 0u64;
            let mut next = Some(first);
            while let Some(m) = next {
                self.encode(&m, &mut batch);
                next = if batch < cfg.max_batch_messages as u64
                    && self.buf.len() < cfg.max_batch_bytes
                {
                    self.queue.try_recv().ok()
                } else {
                    None
                };
            }
            if batch == 0 {
                continue;
            }
            let written = tokio::select! {
                biased;
                _ = self.ctx.shutdown.changed() => break Stop::End,
                r = conn::write_timed(&mut writer, &self.buf, cfg.write_timeout, "write") => r,
            };
            let stats = &self.ctx.stats;
            match written {
                Ok(()) => {
                    Stats::add(&stats.sent, batch);
                    Stats::inc(&stats.write_batches);
                    Stats::add(&stats.bytes_sent, self.buf.len() as u64);
                }
                Err(e) => {
                    Stats::add(&stats.send_failures, batch);
                    break Stop::Lost(e);
                }
            }
        };
        // A clean FIN lets the acceptor log a close rather than a reset.
        let _ = timeout(cfg.write_timeout, writer.shutdown()).await;
        stop
    }

    fn encode(&mut self, m: &Message, batch: &mut u64) {
        match wire::put_message(&mut self.buf, m, self.ctx.cfg.max_frame_size) {
            Ok(_) => *batch += 1,
            Err(e) => {
                Stats::inc(&self.ctx.stats.dropped_too_large);
                error!(
                    peer = self.ctx.id,
                    "dropping a {:?} to peer {}: {e}; the Raft core's message size limit must be \
                     below the transport's frame limit",
                    m.msg_type(),
                    self.ctx.id
                );
            }
        }
    }
}

async fn run_snapshots(
    mut ctx: PeerCtx,
    mut addr: watch::Receiver<String>,
    mut jobs: mpsc::Receiver<SnapshotJob>,
) {
    let to = ctx.id;
    loop {
        let job = tokio::select! {
            biased;
            _ = ctx.shutdown.changed() => return,
            r = addr.changed() => {
                if r.is_err() {
                    return;
                }
                continue;
            }
            j = jobs.recv() => match j {
                Some(j) => j,
                None => return,
            },
        };
        let target = addr.borrow_and_update().clone();
        let index = job
            .msg
            .snapshot
            .as_ref()
            .and_then(|s| s.metadata.as_ref())
            .map_or(0, |m| m.index);
        let streamed = tokio::select! {
            biased;
            _ = ctx.shutdown.changed() => return,
            r = stream_snapshot(&ctx.cfg, to, &target, job) => r,
        };
        let ok = match streamed {
            Ok(len) => {
                Stats::inc(&ctx.stats.snapshots_sent);
                info!(
                    peer = to,
                    "sent snapshot at index {index} ({len} bytes) to peer {to}"
                );
                true
            }
            Err(e) => {
                Stats::inc(&ctx.stats.snapshots_failed);
                warn!(
                    peer = to,
                    "sending snapshot at index {index} to peer {to} failed: {e}"
                );
                false
            }
        };
        tokio::select! {
            biased;
            _ = ctx.shutdown.changed() => return,
            _ = ctx.reporter.snapshot(to, ok) => {}
        }
    }
}

/// Streams one snapshot and waits until the peer says its node has it. Returns the data
/// length.
async fn stream_snapshot(
    cfg: &Config,
    to: u64,
    addr: &str,
    job: SnapshotJob,
) -> Result<u64, Error> {
    let SnapshotJob { msg, mut source } = job;
    let total = source.len();
    let (mut reader, mut w) = conn::dial(cfg, to, addr, StreamKind::Snapshot).await?;
    let mut head = BytesMut::new();
    wire::put_snap_header(&mut head, &msg, total, cfg.max_frame_size)?;
    conn::write_timed(&mut w, &head, cfg.write_timeout, "snapshot header").await?;
    // The receiver checks the header (size limit, ids) before any data moves.
    timeout(cfg.snapshot_idle_timeout, conn::expect_ok(&mut reader))
        .await
        .map_err(|_| Error::Timeout("snapshot header answer"))??;
    let mut sent = 0u64;
    loop {
        let (back, chunk) = next_chunk(source).await?;
        source = back;
        let Some(mut chunk) = chunk else { break };
        if chunk.is_empty() {
            return Err(source_error("the source yielded an empty chunk"));
        }
        sent += chunk.len() as u64;
        if sent > total {
            return Err(source_error(
                "the source yielded more than its announced length",
            ));
        }
        while !chunk.is_empty() {
            let part = chunk.split_to(chunk.len().min(cfg.snapshot_chunk_size));
            head.clear();
            wire::put_header(&mut head, FrameKind::SnapChunk, part.len());
            // Anything the receiver says mid-stream is a refusal; stop at once rather than
            // push the rest into a closing socket.
            tokio::select! {
                biased;
                f = reader.next() => return Err(match f {
                    Ok(Some((FrameKind::Reject, reason))) => conn::rejected(&reason),
                    Ok(_) => Error::Closed,
                    Err(e) => e,
                }),
                r = async {
                    conn::write_timed(&mut w, &head, cfg.write_timeout, "snapshot chunk").await?;
                    conn::write_timed(&mut w, &part, cfg.write_timeout, "snapshot chunk").await
                } => r?,
            }
        }
    }
    if sent != total {
        return Err(source_error("the source ended before its announced length"));
    }
    head.clear();
    wire::put_header(&mut head, FrameKind::SnapEnd, 0);
    conn::write_timed(&mut w, &head, cfg.write_timeout, "snapshot end").await?;
    // The receiver may wait up to its deliver timeout for room in its node's inbox.
    timeout(
        cfg.snapshot_deliver_timeout + cfg.snapshot_idle_timeout,
        conn::expect_ok(&mut reader),
    )
    .await
    .map_err(|_| Error::Timeout("snapshot delivery answer"))??;
    let _ = timeout(cfg.write_timeout, w.shutdown()).await;
    Ok(total)
}

type Chunk = (Box<dyn SnapshotSource>, Option<Bytes>);

/// Pulls one chunk on the blocking pool, since a file-backed source reads the disk.
async fn next_chunk(mut source: Box<dyn SnapshotSource>) -> Result<Chunk, Error> {
    let (source, r) = tokio::task::spawn_blocking(move || {
        let r = source.next_chunk();
        (source, r)
    })
    .await
    .map_err(|e| Error::SnapshotSource(std::io::Error::other(e.to_string())))?;
    Ok((source, r.map_err(Error::SnapshotSource)?))
}

fn source_error(what: &str) -> Error {
    Error::SnapshotSource(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        what.to_string(),
    ))
}

/// Whether `send` routes this message to the snapshot stream.
pub(crate) fn is_snapshot(m: &Message) -> bool {
    m.msg_type() == MessageType::MsgSnapshot
}
