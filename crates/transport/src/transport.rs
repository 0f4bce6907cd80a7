use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use keel_proto::raftpb::Message;
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::info;

use crate::config::Config;
use crate::error::{Error, SendError};
use crate::inbound::{self, Acceptor};
use crate::inbox::{self, Inbox, Report, Reporter, Reports};
use crate::peer::{self, PeerCtx, PeerHandle, SnapshotJob};
use crate::snapshot::{BytesSource, SnapshotSource};
use crate::stats::Stats;

/// A node's connections to its peers. See the crate documentation.
///
/// Dropping it stops every task (listener, connections, redials) without waiting for them;
/// [`Transport::shutdown`] also waits until they have ended.
pub struct Transport {
    cfg: Arc<Config>,
    stats: Arc<Stats>,
    local_addr: SocketAddr,
    /// Where peer tasks are spawned, so `add_peer` works from any thread (the Raft loop need
    /// not run on the runtime).
    runtime: Handle,
    /// Known peers by id. Invariant: never contains `cfg.id` or 0. Read-locked by `send`
    /// (the hot path), write-locked only by membership changes.
    peers: RwLock<HashMap<u64, PeerHandle>>,
    reporter: Reporter,
    shutdown_rx: watch::Receiver<()>,
    /// Never written: dropping it is the shutdown signal every task waits on.
    shutdown_tx: watch::Sender<()>,
    /// Every task holds a clone; `alive_rx.recv()` returns `None` once all have ended.
    alive_tx: mpsc::Sender<()>,
    alive_rx: mpsc::Receiver<()>,
}

impl Transport {
    /// Listens on `listen` (port 0 picks a free port; see [`Transport::local_addr`]) and
    /// returns the transport, the node's inbox, and the reports for its driver. Must be called
    /// within a tokio runtime, which then runs the transport's tasks.
    pub async fn bind(
        config: Config,
        listen: SocketAddr,
    ) -> Result<(Transport, Inbox, Reports), Error> {
        config.validate()?;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| Error::Bind {
                addr: listen,
                source,
            })?;
        let local_addr = listener.local_addr()?;
        let cfg = Arc::new(config);
        let stats = Arc::new(Stats::default());
        let (shutdown_tx, shutdown_rx) = watch::channel(());
        let (alive_tx, alive_rx) = mpsc::channel(1);
        let (report_tx, reports) = mpsc::channel(cfg.report_capacity);
        let (inbox_tx, inbox) = inbox::inbox(cfg.inbox_capacity, cfg.inbox_max_bytes);
        let acceptor = Arc::new(Acceptor {
            cfg: cfg.clone(),
            stats: stats.clone(),
            inbox: inbox_tx,
            connections: Arc::new(Semaphore::new(cfg.max_inbound_connections)),
            snapshots: Arc::new(Semaphore::new(cfg.max_inbound_snapshots)),
            raft_conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
        });
        tokio::spawn(inbound::run_listener(
            acceptor,
            listener,
            shutdown_rx.clone(),
            alive_tx.clone(),
        ));
        info!(node = cfg.id, "listening for peers on {local_addr}");
        let transport = Transport {
            reporter: Reporter::new(report_tx, stats.clone()),
            cfg,
            stats,
            local_addr,
            runtime: Handle::current(),
            peers: RwLock::new(HashMap::new()),
            shutdown_rx,
            shutdown_tx,
            alive_tx,
            alive_rx,
        };
        Ok((transport, inbox, reports))
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn id(&self) -> u64 {
        self.cfg.id
    }

    /// Counters for the metrics layer; keep a clone to read them after the transport is gone.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Adds a peer, or moves a known one to a new address (the current connection is closed
    /// and the new address dialed at once). `addr` is `host:port`, resolved at each dial so a
    /// DNS change is picked up on reconnection.
    pub fn add_peer(&self, id: u64, addr: impl ToString) -> Result<(), Error> {
        if id == 0 || id == self.cfg.id {
            return Err(Error::InvalidPeerId(id));
        }
        let addr = addr.to_string();
        let mut peers = self.peers.write().expect("peers lock");
        if let Some(p) = peers.get(&id) {
            let moved = p.addr.send_if_modified(|a| {
                let changed = *a != addr;
                if changed {
                    a.clone_from(&addr);
                }
                changed
            });
            if moved {
                info!(peer = id, "peer {id} is now at {addr}");
            }
            return Ok(());
        }
        let ctx = PeerCtx {
            id,
            cfg: self.cfg.clone(),
            stats: self.stats.clone(),
            reporter: self.reporter.clone(),
            shutdown: self.shutdown_rx.clone(),
            _alive: self.alive_tx.clone(),
        };
        info!(peer = id, "added peer {id} at {addr}");
        peers.insert(id, peer::spawn(&self.runtime, ctx, addr));
        Ok(())
    }

    /// Forgets a peer: its queued messages are dropped and its outbound connections closed.
    /// Connections the peer opened to this node stay until it closes them; they are its
    /// business. Returns whether the peer was known.
    pub fn remove_peer(&self, id: u64) -> bool {
        let removed = self
            .peers
            .write()
            .expect("peers lock")
            .remove(&id)
            .is_some();
        if removed {
            info!(peer = id, "removed peer {id}");
        }
        removed
    }

    /// Known peers and their addresses, sorted by id.
    pub fn peers(&self) -> Vec<(u64, String)> {
        let peers = self.peers.read().expect("peers lock");
        let mut v: Vec<_> = peers
            .iter()
            .map(|(id, p)| (*id, p.addr.borrow().clone()))
            .collect();
        v.sort_unstable();
        v
    }

    /// Sends `msg` to `msg.to` and returns at once; never blocks. See [`Transport::send_all`].
    pub fn send(&self, msg: Message) -> Result<(), SendError> {
        let mut result = Ok(());
        self.send_all(std::iter::once(msg), |e| result = Err(e));
        result
    }

    /// Sends each message to its `to` and returns at once; never blocks. The messages to one
    /// peer are written to its connection in order, together in as few writes as the socket
    /// allows, by the calling thread when nothing is queued ahead of them (no other thread is
    /// woken), else by the peer's task. A `MsgSnapshot` goes to the peer's snapshot stream,
    /// its `snapshot.data` streamed in chunks. A message that cannot be queued is dropped and
    /// counted, and `refused` says why; Raft retransmits.
    pub fn send_all(
        &self,
        msgs: impl IntoIterator<Item = Message>,
        mut refused: impl FnMut(SendError),
    ) {
        let peers = self.peers.read().expect("peers lock");
        // Each peer's messages, in their order, go out in one write. A Ready addresses a few
        // peers, so a linear search beats a map here.
        let mut by_peer: Vec<(u64, Vec<Message>)> = Vec::new();
        for mut msg in msgs {
            if peer::is_snapshot(&msg) {
                let data = msg
                    .snapshot
                    .as_mut()
                    .map(|s| std::mem::take(&mut s.data))
                    .unwrap_or_default();
                if let Err(e) = self.queue_snapshot(&peers, msg, Box::new(BytesSource::new(data))) {
                    refused(e);
                }
                continue;
            }
            match by_peer.iter_mut().find(|(to, _)| *to == msg.to) {
                Some((_, batch)) => batch.push(msg),
                None => by_peer.push((msg.to, vec![msg])),
            }
        }
        for (to, batch) in by_peer {
            match peers.get(&to) {
                Some(p) => p.outbox.send(&self.cfg, &self.stats, batch, &mut refused),
                None => {
                    Stats::add(&self.stats.dropped_unknown_peer, batch.len() as u64);
                    for _ in batch {
                        refused(SendError::UnknownPeer(to));
                    }
                }
            }
        }
    }

    /// Queues a `MsgSnapshot` whose data comes from `source` (its own `snapshot.data` is
    /// ignored). The outcome arrives as [`Report::Snapshot`], also when it cannot be queued,
    /// so the Raft core never waits on a snapshot that is not on its way.
    pub fn send_snapshot(
        &self,
        msg: Message,
        source: Box<dyn SnapshotSource>,
    ) -> Result<(), SendError> {
        let peers = self.peers.read().expect("peers lock");
        self.queue_snapshot(&peers, msg, source)
    }

    fn queue_snapshot(
        &self,
        peers: &HashMap<u64, PeerHandle>,
        mut msg: Message,
        source: Box<dyn SnapshotSource>,
    ) -> Result<(), SendError> {
        let to = msg.to;
        if let Some(s) = msg.snapshot.as_mut() {
            s.data = Bytes::new();
        }
        let refused = |e: SendError| {
            Stats::inc(&self.stats.snapshots_failed);
            self.reporter.try_report(Report::Snapshot { to, ok: false });
            Err(e)
        };
        let Some(p) = peers.get(&to) else {
            Stats::inc(&self.stats.dropped_unknown_peer);
            return refused(SendError::UnknownPeer(to));
        };
        match p.snapshots.try_send(SnapshotJob { msg, source }) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                Stats::inc(&self.stats.dropped_queue_full);
                refused(SendError::QueueFull(to))
            }
            Err(TrySendError::Closed(_)) => refused(SendError::Closed),
        }
    }

    /// Stops every task and waits until they have ended: afterwards no connection of this
    /// transport is open, the listener's port is free, and the inbox and reports end.
    pub async fn shutdown(self) {
        let Transport {
            shutdown_tx,
            alive_tx,
            mut alive_rx,
            peers,
            ..
        } = self;
        drop(shutdown_tx);
        drop(peers);
        drop(alive_tx);
        // Nothing is ever sent on this channel: `None` means every sender (task) is gone.
        while alive_rx.recv().await.is_some() {}
    }
}
