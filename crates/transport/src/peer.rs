//! Outbound side: per peer, one task keeps a Raft connection, which the sender writes to
//! directly while the task writes only what the socket could not take at once; another task
//! streams snapshots, one at a time, each on a connection of its own.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use keel_proto::raftpb::{Message, MessageType};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::timeout;
use tracing::{debug, error, info, warn};

use crate::backoff::Backoff;
use crate::config::Config;
use crate::conn::{self, FrameReader};
use crate::error::{Error, SendError};
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
/// closes `addr` and the snapshot queue, and the tasks end.
pub(crate) struct PeerHandle {
    pub(crate) addr: watch::Sender<String>,
    pub(crate) outbox: Arc<Outbox>,
    pub(crate) snapshots: mpsc::Sender<SnapshotJob>,
}

/// What the sender (the Raft thread) and the peer's connection task share. The sender writes
/// its frames to the socket itself whenever nothing is ahead of them, so a message to a peer
/// costs no wake-up of another thread; the task writes only what the socket did not take at
/// once (its buffer was full) or what was queued while there was no connection.
pub(crate) struct Outbox {
    state: Mutex<OutState>,
    /// Rung when the task has bytes to write that the sender could not.
    ready: Notify,
    /// Closed when the peer's handle is dropped, so a task waiting only on `ready` ends.
    gone: watch::Sender<()>,
}

struct OutState {
    /// The connection's write half, while the task has one.
    conn: Option<Arc<OwnedWriteHalf>>,
    /// Encoded frames not yet written, oldest first. Invariant: while this is non-empty or
    /// `task_writing` is set, only the task writes to `conn`, so frames never interleave and
    /// stay in order.
    pending: BytesMut,
    /// Messages in `pending`, for the counters. Invariant: at most `peer_queue_capacity`.
    pending_msgs: u64,
    /// The task took a batch out of `pending` and is writing it.
    task_writing: bool,
    /// Set by `close` (the peer is gone): further messages are refused.
    closed: bool,
}

impl Outbox {
    fn new() -> Outbox {
        Outbox {
            state: Mutex::new(OutState {
                conn: None,
                pending: BytesMut::new(),
                pending_msgs: 0,
                task_writing: false,
                closed: false,
            }),
            ready: Notify::new(),
            gone: watch::channel(()).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OutState> {
        // Nothing panics while holding it; a poisoned lock still holds consistent state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends `msgs` to what goes to the peer, then writes as much as the socket takes at
    /// once if nothing is ahead of them. Never blocks. `refused` is called for each message
    /// not queued (too large, queue full, peer gone).
    pub(crate) fn send(
        &self,
        cfg: &Config,
        stats: &Stats,
        msgs: impl IntoIterator<Item = Message>,
        mut refused: impl FnMut(SendError),
    ) {
        let mut st = self.lock();
        let start = st.pending.len();
        let mut added = 0u64;
        for m in msgs {
            if st.closed {
                refused(SendError::Closed);
                continue;
            }
            if st.pending_msgs >= cfg.peer_queue_capacity as u64 {
                Stats::inc(&stats.dropped_queue_full);
                refused(SendError::QueueFull(m.to));
                continue;
            }
            match wire::put_message(&mut st.pending, &m, cfg.max_frame_size) {
                Ok(_) => {
                    st.pending_msgs += 1;
                    added += 1;
                }
                Err(e) => {
                    Stats::inc(&stats.dropped_too_large);
                    error!(
                        peer = m.to,
                        "dropping a {:?} to peer {}: {e}; the Raft core's message size limit \
                         must be below the transport's frame limit",
                        m.msg_type(),
                        m.to
                    );
                    refused(SendError::TooLarge(m.to));
                }
            }
        }
        if added == 0 {
            return;
        }
        let st = &mut *st;
        let idle = start == 0 && !st.task_writing;
        let Some(conn) = st.conn.as_ref().filter(|_| idle) else {
            // The task is writing (it takes these next), or dialing: wake it either way.
            self.ready.notify_one();
            return;
        };
        match conn.try_write(&st.pending) {
            Ok(n) if n == st.pending.len() => {
                Stats::add(&stats.sent, st.pending_msgs);
                Stats::inc(&stats.write_batches);
                Stats::add(&stats.bytes_sent, n as u64);
                st.pending.clear();
                st.pending_msgs = 0;
            }
            Ok(n) => {
                // The rest waits for room in the socket, which only the task can wait for.
                // Counted when the task has written it.
                Stats::add(&stats.bytes_sent, n as u64);
                let _ = st.pending.split_to(n);
                self.ready.notify_one();
            }
            // Full socket buffer, or a failed connection: the task's write waits for room or
            // sees the same error and handles it.
            Err(_) => self.ready.notify_one(),
        }
    }

    /// Refuses all further messages and ends the task.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.gone.send_replace(());
        self.ready.notify_one();
    }

    /// Drops what is queued, counting it as failed sends.
    fn discard(&self, stats: &Stats) {
        let mut st = self.lock();
        Stats::add(&stats.send_failures, st.pending_msgs);
        st.pending.clear();
        st.pending_msgs = 0;
    }
}

impl Drop for PeerHandle {
    fn drop(&mut self) {
        self.outbox.close();
    }
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
    let (snap_tx, snap_rx) = mpsc::channel(PENDING_SNAPSHOTS);
    let outbox = Arc::new(Outbox::new());
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
            gone: outbox.gone.subscribe(),
            outbox: outbox.clone(),
            backoff,
            spare: BytesMut::new(),
        }
        .run(),
    );
    rt.spawn(run_snapshots(ctx, addr_rx, snap_rx));
    PeerHandle {
        addr: addr_tx,
        outbox,
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
    outbox: Arc<Outbox>,
    /// Changes (closes) when the peer is removed.
    gone: watch::Receiver<()>,
    backoff: Backoff,
    /// Swapped with the outbox's buffer to take a batch out; kept to reuse its allocation.
    spare: BytesMut,
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
                _ = self.gone.changed() => return,
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
                    let stop = self.pump(reader, Arc::new(writer)).await;
                    // Dropping the last handle on the write half sends a FIN, so the acceptor
                    // logs a close rather than a reset.
                    let mut st = self.outbox.lock();
                    st.conn = None;
                    st.task_writing = false;
                    drop(st);
                    match stop {
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
        loop {
            self.outbox.discard(&self.ctx.stats);
            tokio::select! {
                biased;
                _ = self.ctx.shutdown.changed() => return false,
                _ = self.gone.changed() => return false,
                r = self.addr.changed() => return r.is_ok(),
                _ = tokio::time::sleep_until(deadline) => return true,
                _ = self.outbox.ready.notified() => {}
            }
        }
    }

    /// Writes what the sender could not, until the connection fails or is no longer wanted.
    async fn pump(
        &mut self,
        mut reader: FrameReader<OwnedReadHalf>,
        writer: Arc<OwnedWriteHalf>,
    ) -> Stop {
        self.outbox.lock().conn = Some(writer.clone());
        // Anything queued while dialing goes first: no sender writes while it is pending.
        self.outbox.ready.notify_one();
        loop {
            tokio::select! {
                biased;
                _ = self.ctx.shutdown.changed() => return Stop::End,
                _ = self.gone.changed() => return Stop::End,
                r = self.addr.changed() => {
                    return if r.is_ok() { Stop::AddrChanged } else { Stop::End };
                }
                // The acceptor writes nothing after its Ok but a reject before closing (for a
                // frame it refused), so anything read here, or the end of the stream, means
                // the connection is over.
                f = reader.next() => return Stop::Lost(match f {
                    Ok(Some((FrameKind::Reject, reason))) => conn::rejected(&reason),
                    Ok(Some((kind, _))) => Error::Protocol(format!("unexpected {kind:?} frame")),
                    Ok(None) => Error::Closed,
                    Err(e) => e,
                }),
                _ = self.outbox.ready.notified() => {}
            }
            if let Err(stop) = self.flush(&writer).await {
                return stop;
            }
        }
    }

    /// Writes batches out of the outbox until it is empty, then hands writing back to the
    /// sender.
    async fn flush(&mut self, writer: &OwnedWriteHalf) -> Result<(), Stop> {
        let cfg = self.ctx.cfg.clone();
        loop {
            let batch = {
                let mut st = self.outbox.lock();
                if st.pending.is_empty() {
                    st.task_writing = false;
                    return Ok(());
                }
                st.task_writing = true;
                self.spare.clear();
                std::mem::swap(&mut self.spare, &mut st.pending);
                std::mem::take(&mut st.pending_msgs)
            };
            let written = tokio::select! {
                biased;
                _ = self.ctx.shutdown.changed() => return Err(Stop::End),
                r = write_timed(writer, &self.spare, &cfg) => r,
            };
            let stats = &self.ctx.stats;
            match written {
                Ok(()) => {
                    Stats::add(&stats.sent, batch);
                    Stats::inc(&stats.write_batches);
                    Stats::add(&stats.bytes_sent, self.spare.len() as u64);
                }
                Err(e) => {
                    Stats::add(&stats.send_failures, batch);
                    return Err(Stop::Lost(e));
                }
            }
        }
    }
}

/// Writes `buf` to a shared write half (the sender holds it too, and writes only while this
/// is not running), giving each `max_batch_bytes` of it `write_timeout`.
async fn write_timed(w: &OwnedWriteHalf, buf: &[u8], cfg: &Config) -> Result<(), Error> {
    for chunk in buf.chunks(cfg.max_batch_bytes) {
        timeout(cfg.write_timeout, write_all(w, chunk))
            .await
            .map_err(|_| Error::Timeout("write"))??;
    }
    Ok(())
}

async fn write_all(w: &OwnedWriteHalf, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        w.writable().await?;
        match w.try_write(buf) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
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
