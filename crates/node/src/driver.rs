//! The node runtime: `NodeCore` on its own OS thread, fed by the transport (its inbox and
//! reports) and, through one bounded channel, by a tick timer and clients.
//!
//! ```text
//!  transport inbox, reports ────────────────────────────┐
//!  tick timer task ─────────────────────┐               ▼
//!  NodeHandle (clients, try_send) ──────┴▶ input channel ──▶ Raft thread (NodeCore + WAL)
//!                                                            │ ready → send → persist (fsync)
//!                                                            │ → send → apply → answers
//!                                      oneshot replies ◀─────┘
//! ```
//!
//! Only the Raft thread touches `NodeCore`, so nothing is locked on the hot path. The fsync runs
//! inline on that thread, after the Ready's messages went to the transport, so a leader's
//! appends travel while its own flush is under way. Clients never wait for room: a full queue
//! is `DriverError::Overloaded` at once, and every request carries a deadline after which it is
//! answered `Timeout` and cancelled in the core.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_kv::{Op, PutRequest, RangeRequest, RangeResponse, Response};
use keel_proto::raftpb::{
    ConfChange, ConfChangeType, ConfState, Message, Snapshot, SnapshotMetadata,
};
use keel_raft::{DropReason, StateRole, Storage, StorageError};
use keel_transport::{Inbox, Report, Reports, Transport};
use keel_wal::{Fs, StdFs, StorageOptions, WalStorage};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use crate::core::{
    NodeConfig, NodeCore, NodeError, Outcome, PeerAddrError, SnapshotJob, Token, WatchFeed,
};
use crate::lessor::{LeaseChange, Lessor};
use crate::metrics::Metrics;
use crate::snapshot::{self, AddressBook, Attributes, MemberAttrs, NodeImage};
use crate::watch::{read_history, History, HistoryError, WatchHub};

/// Inputs the Raft thread handles before it takes a Ready. Every input taken before a Ready is
/// covered by that Ready's single fsync (group commit), so a larger batch means fewer syncs
/// under load; the bound keeps one iteration short (a few ms of stepping), so heartbeats and
/// answers are not held back behind a long queue.
const MAX_INPUT_BATCH: usize = 256;

/// Channel slots beyond the clients' share, for ticks, snapshot writers' reports and shutdown
/// (peer messages come through the transport's own bounded inbox). Clients can fill at most
/// `max_queued_requests` slots, so a client flood never crowds out the ticks that keep the
/// cluster alive.
const INTERNAL_HEADROOM: usize = 1024;

/// How long past its deadline a caller still waits for the Raft thread's own answer. The
/// thread answers expired requests on the next tick; this only covers a thread stuck in a
/// slow fsync, which it cannot interrupt.
const ANSWER_GRACE: Duration = Duration::from_secs(1);

/// Leader transfers waiting to complete. A transfer is an operator action; a handful at once is
/// plenty, and the bound keeps a script gone wrong from growing the list.
const MAX_TRANSFERS: usize = 16;

/// A Ready whose fsync takes longer is logged as a warning: at that latency every write waits
/// and heartbeats are late, so an operator wants to know about the disk.
const SLOW_FSYNC: Duration = Duration::from_millis(500);

/// Applied entries between snapshots, as etcd's default: see the server's `--snapshot-count`.
pub const DEFAULT_SNAPSHOT_COUNT: u64 = 100_000;

/// Snapshot streams (`NodeHandle::snapshot_data`) held at once. Each holds a whole copy of the
/// state in memory until its reader is done, and a slow reader can take long: one at a time
/// bounds that memory to one extra copy of the state.
const MAX_SNAPSHOT_STREAMS: usize = 1;

/// The boot counter, in the data dir; see [`next_boot`].
const BOOT_FILE: &str = "boot";
const BOOT_TMP: &str = "boot.tmp";

/// What `start` needs. `DriverConfig::new` gives the defaults; change fields, then `start`
/// validates them.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// Non-zero, and below 2^32: the proposer id is `id << 32 | boot`.
    pub id: u64,
    pub cluster_id: u64,
    pub data_dir: PathBuf,
    /// Every member's peer address (`host:port`, or a URL like `http://host:port`), by id. This
    /// node's own entry, if present, is the address it advertises to others.
    pub peers: BTreeMap<u64, String>,
    /// Where the transport listens for peers.
    pub listen: SocketAddr,
    /// Voters of a new cluster; used only when `data_dir` holds no WAL yet. Empty means this
    /// node joins an existing cluster and waits to be added and sent its state.
    pub initial_members: Vec<u64>,
    /// Time per Raft tick (100 ms here, as raftexample: with the election and heartbeat ticks
    /// a 1 to 2 s election timeout and 100 ms heartbeats). The `keel` server's own default is
    /// 50 ms with 6 election ticks, for failover within 300 to 600 ms.
    pub tick_interval: Duration,
    pub election_tick: usize,
    pub heartbeat_tick: usize,
    /// Applied entries between snapshots (and log compactions), on average: the node takes
    /// them at its own phase in the run (`core::snapshot_phase_for` of its id).
    pub snapshot_count: u64,
    /// Time a request may take before it is answered `Timeout` (5 s): several election
    /// timeouts, so a request survives one leader change.
    pub request_timeout: Duration,
    /// Client requests waiting in the input channel (1024). Past it, requests fail with
    /// `Overloaded` at once. Requests the core holds are bounded separately by its
    /// `max_pending_writes` and `max_pending_reads`.
    pub max_queued_requests: usize,
    /// This member's name and the URLs clients reach it at, published through Raft (etcd's
    /// `publish`) so every member lists them. Both empty: nothing is published, and the member
    /// shows as never started. Bounded by `snapshot::MAX_NAME_LEN`, `MAX_CLIENT_URLS` and
    /// `MAX_URL_LEN`.
    pub name: String,
    pub client_urls: Vec<String>,
}

impl DriverConfig {
    pub fn new(id: u64, cluster_id: u64, data_dir: impl Into<PathBuf>, listen: SocketAddr) -> Self {
        DriverConfig {
            id,
            cluster_id,
            data_dir: data_dir.into(),
            peers: BTreeMap::new(),
            listen,
            initial_members: Vec::new(),
            tick_interval: Duration::from_millis(100),
            election_tick: 10,
            heartbeat_tick: 1,
            snapshot_count: DEFAULT_SNAPSHOT_COUNT,
            request_timeout: Duration::from_secs(5),
            max_queued_requests: 1024,
            name: String::new(),
            client_urls: Vec::new(),
        }
    }

    /// What this member publishes about itself, if anything.
    fn attributes(&self) -> Option<MemberAttrs> {
        let a = MemberAttrs {
            name: self.name.clone(),
            client_urls: self.client_urls.clone(),
        };
        (!a.is_empty()).then_some(a)
    }

    fn validate(&self) -> Result<(), DriverError> {
        let bad = |s: &str| Err(DriverError::Config(s.to_string()));
        if self.id == 0 || self.id > u64::from(u32::MAX) {
            return bad("id must be in 1..2^32 (the proposer id is id << 32 | boot)");
        }
        if self.tick_interval.is_zero() || self.request_timeout.is_zero() {
            return bad("tick_interval and request_timeout must be non-zero");
        }
        if self.max_queued_requests == 0 {
            return bad("max_queued_requests must be non-zero");
        }
        if self.election_tick <= self.heartbeat_tick || self.heartbeat_tick == 0 {
            return bad("election_tick must be above heartbeat_tick, which must be non-zero");
        }
        for (id, url) in &self.peers {
            if *id == 0 {
                return bad("peer id 0 is not valid");
            }
            if let Err(e) = peer_addr(url) {
                return Err(DriverError::Config(format!("peer {id}: {e}")));
            }
        }
        if let Some(a) = self.attributes() {
            a.validate().map_err(DriverError::Config)?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// No leader is known (an election is under way); retry shortly.
    #[error("no leader; retry later")]
    NoLeader,
    /// The leader is handing leadership over and refused the request before proposing it;
    /// retry shortly (it was not applied).
    #[error("leader changed; retry later")]
    LeaderChanged,
    /// The core refused the request (leader transfer, uncommitted-size limit, this node is not
    /// a member, a refused membership change).
    #[error("refused: {0}")]
    Refused(String),
    #[error("too many requests in flight; retry later")]
    Overloaded,
    /// The deadline passed. A write may still be applied later.
    #[error("request timed out")]
    Timeout,
    /// The state machine answered the request with an error (a failed compare, a missing key
    /// for `ignore_value`, ...).
    #[error(transparent)]
    Kv(#[from] keel_kv::Error),
    /// Opening the data dir failed at start.
    #[error("storage: {0}")]
    Storage(String),
    #[error("invalid config: {0}")]
    Config(String),
    #[error("transport: {0}")]
    Transport(String),
    /// A thread or task of the runtime could not be started.
    #[error("start: {0}")]
    Start(String),
    /// The node is shut down, or stopped itself after a storage error.
    #[error("node stopped")]
    Stopped,
    /// The request names a node that is not a member.
    #[error("node {0} is not a member")]
    UnknownMember(u64),
    /// The request conflicts with the cluster's state: a membership change is already under
    /// way, it would remove the last voter, the node is already a member.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The request is malformed (a bad peer address, a bad revision).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Only the leader can do this; `0` when no leader is known.
    #[error("not the leader (leader is {0})")]
    NotLeader(u64),
    /// A resource held one at a time is taken (a snapshot stream); retry once it is free.
    #[error("busy: {0}")]
    Busy(String),
}

pub type Result<T, E = DriverError> = std::result::Result<T, E>;

/// A snapshot of the node's Raft state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub id: u64,
    /// This process's proposer id (`id << 32 | boot`).
    pub proposer: u64,
    pub role: StateRole,
    pub term: u64,
    /// 0 when none is known.
    pub leader: u64,
    pub commit: u64,
    pub applied: u64,
    pub last_snapshot: u64,
    /// Last index of the log (persisted or not).
    pub last_index: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// Voters and learners, in id order.
    pub members: Vec<MemberStatus>,
    /// The leader's peer address, when known. Its client URLs are in its `members` entry
    /// (see `leader_client_urls`).
    pub leader_addr: Option<String>,
    /// Bytes of write-ahead log on disk.
    pub wal_bytes: u64,
    /// Requests the Raft thread holds for an answer.
    pub pending_requests: usize,
}

impl Status {
    /// The client URLs the leader published; empty when no leader is known or it has not
    /// published (yet). For layers that must reach the leader's client API (forwarding).
    pub fn leader_client_urls(&self) -> &[String] {
        self.members
            .iter()
            .find(|m| self.leader != 0 && m.id == self.leader)
            .map_or(&[], |m| &m.client_urls[..])
    }
}

/// A lease as its leader sees it (etcd's `LeaseTimeToLiveResponse`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseTtl {
    pub id: i64,
    /// Seconds left by the leader's clock, rounded up.
    pub ttl: i64,
    pub granted_ttl: i64,
    /// Attached keys, in key order, when asked for.
    pub keys: Vec<Bytes>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    pub id: u64,
    pub peer_url: Option<String>,
    /// What the member published (etcd's name and client URLs), as replicated; both empty
    /// for a member that never started (or has not published since being added).
    pub name: String,
    pub client_urls: Vec<String>,
    pub learner: bool,
    /// Replication progress; known only on the leader (0 elsewhere).
    pub matched: u64,
    pub next: u64,
}

/// A consistent copy of this node's state, the bytes a Raft snapshot of it would carry
/// (`snapshot::encode`: address book, attributes, state machine), for Maintenance.Snapshot.
/// Holds one of the `MAX_SNAPSHOT_STREAMS` slots until dropped.
#[derive(Debug)]
pub struct SnapshotData {
    pub data: Bytes,
    /// The log index and store revision the data is at.
    pub applied: u64,
    pub revision: i64,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// A hash of the state machine at a revision (etcd's HashKV), for comparing members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashInfo {
    /// The revision hashed.
    pub revision: i64,
    pub compact_revision: i64,
    pub hash: u32,
    /// The node's applied index when it answered.
    pub applied: u64,
}

type Reply<T> = oneshot::Sender<Result<T>>;

/// A read that came back `None` was dropped by a leadership change; the handle retries it.
type ReadReply = Reply<Option<RangeResponse>>;

enum Input {
    Tick,
    Peer(Message),
    Report(Report),
    Propose {
        op: Op,
        deadline: Instant,
        reply: Reply<Response>,
    },
    Read {
        range: RangeRequest,
        deadline: Instant,
        reply: ReadReply,
    },
    ConfChange {
        cc: ConfChange,
        /// Dialled before proposing, so the leader can reach a new member once it is added.
        addr: Option<String>,
        deadline: Instant,
        reply: Reply<ConfState>,
    },
    Status {
        reply: oneshot::Sender<Status>,
    },
    /// Member `id`'s new peer address (`host:port`), through a node entry.
    PeerAddr {
        id: u64,
        addr: String,
        deadline: Instant,
        reply: Reply<ConfState>,
    },
    /// This node's state encoded as a snapshot holds it: (data, applied index, revision).
    SnapshotData {
        reply: Reply<NodeImage>,
    },
    /// A serializable read of the local state.
    ReadLocal {
        range: RangeRequest,
        reply: Reply<RangeResponse>,
    },
    Hash {
        revision: i64,
        reply: Reply<HashInfo>,
    },
    /// A keep-alive, served by the leader's lease clock.
    LeaseRenew {
        id: i64,
        reply: Reply<Option<i64>>,
    },
    /// A lease's remaining TTL by the leader's clock, and optionally its keys.
    LeaseTimeToLive {
        id: i64,
        keys: bool,
        reply: Reply<Option<LeaseTtl>>,
    },
    /// Every lease in the local store.
    Leases {
        reply: Reply<Vec<keel_kv::LeaseInfo>>,
    },
    /// A slice of history for a watcher catching up (see `watch::read_history`).
    History {
        start: i64,
        key: Bytes,
        range_end: Bytes,
        reply: Reply<std::result::Result<History, HistoryError>>,
    },
    Transfer {
        to: u64,
        deadline: Instant,
        reply: Reply<u64>,
    },
    /// The snapshot writer thread finished a file (see `RaftLoop::write_snapshot`).
    SnapshotSaved {
        snap: Snapshot,
        result: Result<(), String>,
        took: Duration,
    },
    Shutdown,
}

impl Input {
    /// Client inputs count against `max_queued_requests`; internal ones use the headroom.
    fn is_client(&self) -> bool {
        !matches!(
            self,
            Input::Tick
                | Input::Peer(_)
                | Input::Report(_)
                | Input::SnapshotSaved { .. }
                | Input::Shutdown
        )
    }
}

enum Waiter {
    Write(Reply<Response>),
    Read(ReadReply),
    Conf(Reply<ConfState>),
}

impl Waiter {
    fn fail(self, e: DriverError) {
        // A caller that went away no longer wants the answer.
        let _ = match self {
            Waiter::Write(r) => r.send(Err(e)).is_ok(),
            Waiter::Read(r) => r.send(Err(e)).is_ok(),
            Waiter::Conf(r) => r.send(Err(e)).is_ok(),
        };
    }

    fn is_closed(&self) -> bool {
        match self {
            Waiter::Write(r) => r.is_closed(),
            Waiter::Read(r) => r.is_closed(),
            Waiter::Conf(r) => r.is_closed(),
        }
    }
}

struct Pending {
    deadline: Instant,
    waiter: Waiter,
}

/// The Raft thread's state. Invariant: every token in `pending` is held by the core (accepted
/// by `propose`, `read` or `propose_conf_change` and neither answered nor cancelled), so
/// `pending` is bounded by the core's `max_pending_writes + max_pending_reads`.
struct RaftLoop {
    id: u64,
    proposer: u64,
    core: NodeCore<WalStorage>,
    transport: Arc<Transport>,
    pending: HashMap<Token, Pending>,
    next_token: Token,
    queued: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
    /// Transfers waiting for the named node to lead. Invariant: `len() <= MAX_TRANSFERS`.
    transfers: Vec<(u64, Instant, Reply<u64>)>,
    /// The leader last seen, to count leader changes.
    last_leader: u64,
    /// For the snapshot writer to report back on; weak, so it never keeps the channel open.
    self_tx: mpsc::WeakSender<Input>,
    /// The commit index the `committed` counter has counted up to. Commit advances while
    /// inputs are stepped as well as during a Ready, so the counter follows this rather than
    /// the difference across one Ready.
    counted_commit: u64,
    hub: WatchHub,
    /// Deadlines of leases, kept while this node leads.
    lessor: Lessor,
    /// What a new leader adds to every lease it inherits (see `lessor`).
    election_timeout: Duration,
}

fn refusal(e: NodeError) -> DriverError {
    match e {
        NodeError::Overloaded(_) => DriverError::Overloaded,
        NodeError::Raft(keel_raft::Error::ProposalDropped(DropReason::NoLeader)) => {
            DriverError::NoLeader
        }
        NodeError::Raft(keel_raft::Error::ProposalDropped(DropReason::LeaderTransferring)) => {
            DriverError::LeaderChanged
        }
        NodeError::Raft(keel_raft::Error::ConfChangeRefused(why)) => DriverError::Conflict(why),
        NodeError::Invalid(why) => DriverError::Invalid(why),
        other => DriverError::Refused(other.to_string()),
    }
}

/// Errors after which the disk state is unknown: the node must stop (see `NodeError::Storage`).
fn is_fatal(e: &NodeError) -> bool {
    matches!(
        e,
        NodeError::Storage(_)
            | NodeError::Snapshot(_)
            | NodeError::Raft(keel_raft::Error::Storage(StorageError::Other(_)))
    )
}

impl RaftLoop {
    fn run(mut self, mut sources: Sources) {
        if let Err(e) = self.serve(&mut sources) {
            error!(node = self.id, "stopping after a storage error: {e}");
        }
        for (_, p) in self.pending.drain() {
            p.waiter.fail(DriverError::Stopped);
        }
        // Closing first makes new requests fail with `Stopped` at once; dropping what is still
        // queued drops its reply senders, which the callers also see as `Stopped`.
        sources.rx.close();
        while sources.rx.try_recv().is_ok() {}
        // Freeing a large state machine is millions of deallocations (1.9 s for 1M keys): a
        // thread of its own does it, so that stopping is not held up by it, and a process
        // that exits next never waits for it. The WAL is closed here, as before.
        let kv = self.core.take_kv();
        if let Err(e) = std::thread::Builder::new()
            .name(format!("keel-free-{}", self.id))
            .spawn(move || drop(kv))
        {
            warn!(node = self.id, "freeing the state machine here: {e}");
        }
        info!(node = self.id, "raft loop stopped");
    }

    fn serve(&mut self, sources: &mut Sources) -> Result<(), NodeError> {
        // Entries committed before a restart are re-applied through the first Readies.
        self.drain_ready()?;
        while let Some(first) = sources.wait() {
            let mut input = Some(first);
            let mut taken = 0;
            while let Some(i) = input {
                if !self.handle(i)? {
                    return Ok(());
                }
                taken += 1;
                if taken == MAX_INPUT_BATCH {
                    break;
                }
                input = sources.try_next();
            }
            self.drain_ready()?;
        }
        Ok(())
    }

    fn token(&mut self) -> Token {
        self.next_token += 1;
        self.next_token
    }

    /// Returns whether to go on.
    fn handle(&mut self, input: Input) -> Result<bool, NodeError> {
        if input.is_client() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
        match input {
            Input::Tick => {
                self.core.tick();
                let now = Instant::now();
                self.expire(now);
                self.revoke_expired(now)?;
            }
            Input::ReadLocal { range, reply } => {
                let _ = reply.send(self.core.kv().range(&range).map_err(DriverError::Kv));
            }
            Input::Hash { revision, reply } => {
                let kv = self.core.kv();
                let answer = kv
                    .hash_kv(revision)
                    .map(|h| HashInfo {
                        revision: h.hash_revision,
                        compact_revision: h.compact_revision,
                        hash: h.hash,
                        applied: self.core.applied(),
                    })
                    .map_err(DriverError::Kv);
                let _ = reply.send(answer);
            }
            Input::LeaseRenew { id, reply } => {
                let answer = if self.lessor.is_primary() {
                    Ok(self.lessor.renew(Instant::now(), id))
                } else {
                    Err(self.not_leader())
                };
                let _ = reply.send(answer);
            }
            Input::LeaseTimeToLive { id, keys, reply } => {
                let answer = if self.lessor.is_primary() {
                    let kv = self.core.kv();
                    Ok(kv.lease(id).map(|l| LeaseTtl {
                        id,
                        // A lease the clock does not hold yet (its grant is applied here but
                        // the change not taken) has its whole TTL ahead.
                        ttl: self.lessor.remaining(Instant::now(), id).unwrap_or(l.ttl),
                        granted_ttl: l.granted_ttl,
                        keys: if keys {
                            kv.lease_keys(id).unwrap_or_default()
                        } else {
                            Vec::new()
                        },
                    }))
                } else {
                    Err(self.not_leader())
                };
                let _ = reply.send(answer);
            }
            Input::Leases { reply } => {
                let _ = reply.send(Ok(self.core.kv().leases()));
            }
            Input::History {
                start,
                key,
                range_end,
                reply,
            } => {
                let _ = reply.send(Ok(read_history(self.core.kv(), start, &key, &range_end)));
            }
            Input::Transfer {
                to,
                deadline,
                reply,
            } => self.transfer(to, deadline, reply),
            Input::Peer(m) => {
                if let Err(e) = self.core.step(m) {
                    if is_fatal(&e) {
                        return Err(e);
                    }
                    debug!(node = self.id, "refused a peer message: {e}");
                }
            }
            Input::Report(Report::Unreachable(id)) => {
                self.metrics.peer_unreachable.inc();
                self.core.report_unreachable(id);
            }
            Input::Report(Report::Snapshot { to, ok }) => self.core.report_snapshot(to, ok),
            Input::Propose {
                op,
                deadline,
                reply,
            } => {
                let token = self.token();
                let r = self.core.propose(token, op);
                if r.is_ok() {
                    self.metrics.proposals.inc();
                } else {
                    self.metrics.proposals_failed.inc();
                }
                self.admit(token, deadline, Waiter::Write(reply), r)?;
            }
            Input::Read {
                range,
                deadline,
                reply,
            } => {
                let token = self.token();
                let r = self.core.read(token, range);
                if r.is_ok() {
                    self.metrics.reads.inc();
                }
                self.admit(token, deadline, Waiter::Read(reply), r)?;
            }
            Input::ConfChange {
                mut cc,
                addr,
                deadline,
                reply,
            } => {
                if let Err(e) = self.check_conf_change(&cc) {
                    let _ = reply.send(Err(e));
                    return Ok(true);
                }
                if let Some(addr) = addr {
                    // Dialled now so the leader reaches the new member as soon as the change
                    // applies; the address also rides in the change for the other members.
                    if cc.node_id != self.id {
                        if let Err(e) = self.transport.add_peer(cc.node_id, &addr) {
                            let _ = reply.send(Err(DriverError::Transport(e.to_string())));
                            return Ok(true);
                        }
                    }
                    cc.context = Bytes::from(addr);
                }
                let token = self.token();
                let r = self.core.propose_conf_change(token, cc);
                self.admit(token, deadline, Waiter::Conf(reply), r)?;
            }
            Input::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Input::PeerAddr {
                id,
                addr,
                deadline,
                reply,
            } => {
                if let Err(e) = self.check_peer_addr(id, &addr) {
                    let _ = reply.send(Err(e));
                    return Ok(true);
                }
                let token = self.token();
                let r = self.core.propose_peer_addr(token, id, addr);
                self.admit(token, deadline, Waiter::Conf(reply), r)?;
            }
            Input::SnapshotData { reply } => {
                // Taken here, between two Readies, so the image is of one applied index; the
                // caller encodes it, off this thread.
                let _ = reply.send(Ok(self.core.image()));
            }
            Input::SnapshotSaved { snap, result, took } => {
                let index = keel_raft::storage::snapshot_position(&snap).0;
                // A snapshot that could not be written leaves the disk in an unknown state,
                // like any failed write: fail-stop.
                result.map_err(NodeError::Storage)?;
                self.core.snapshot_saved(snap)?;
                let removed = self.core.take_removed();
                self.remove_files(removed);
                self.metrics.snapshots.inc();
                self.metrics
                    .wal_bytes
                    .set(self.core.raw().store().wal().bytes() as i64);
                info!(
                    node = self.id,
                    "snapshot at index {index}, written in {} ms off the raft thread",
                    took.as_millis()
                );
            }
            Input::Shutdown => return Ok(false),
        }
        Ok(true)
    }

    fn admit(
        &mut self,
        token: Token,
        deadline: Instant,
        waiter: Waiter,
        accepted: Result<(), NodeError>,
    ) -> Result<(), NodeError> {
        match accepted {
            Ok(()) => {
                self.pending.insert(token, Pending { deadline, waiter });
                Ok(())
            }
            Err(e) if is_fatal(&e) => {
                waiter.fail(DriverError::Stopped);
                Err(e)
            }
            Err(e) => {
                waiter.fail(refusal(e));
                Ok(())
            }
        }
    }

    /// The leader proposes the revoke of every lease its clock says is due (a bounded number
    /// per tick). A revoke that fails to propose is tried again on a later tick.
    fn revoke_expired(&mut self, now: Instant) -> Result<(), NodeError> {
        if !self.lessor.is_primary() {
            return Ok(());
        }
        for id in self.lessor.expired(now) {
            let token = self.token();
            match self
                .core
                .propose(token, Op::LeaseRevoke(keel_kv::LeaseRevokeRequest { id }))
            {
                Ok(()) => {
                    self.metrics.leases_expired.inc();
                    // Nobody waits for the answer: the core forgets the token once applied.
                    debug!(node = self.id, lease = id, "lease expired; revoke proposed");
                }
                Err(e) if is_fatal(&e) => return Err(e),
                Err(e) => debug!(node = self.id, lease = id, "lease revoke not proposed: {e}"),
            }
        }
        Ok(())
    }

    fn not_leader(&self) -> DriverError {
        match self.core.raw().raft.leader_id {
            0 => DriverError::NoLeader,
            l => DriverError::NotLeader(l),
        }
    }

    /// The lease clock follows leadership and what the store applied.
    fn follow_leases(&mut self) {
        let now = Instant::now();
        let raft = &self.core.raw().raft;
        let leader = raft.role == StateRole::Leader;
        if leader && !self.lessor.is_primary() {
            let leases = self.core.kv().leases();
            info!(
                node = self.id,
                "lease clock started for {} leases, each extended by {} ms",
                leases.len(),
                self.election_timeout.as_millis()
            );
            self.lessor.promote(now, &leases, self.election_timeout);
            // Grants applied before this moment are in the store already.
            self.core.take_lease_changes();
        } else if !leader && self.lessor.is_primary() {
            self.lessor.demote();
        }
        for change in self.core.take_lease_changes() {
            let leases = match change {
                LeaseChange::Reset => self.core.kv().leases(),
                _ => Vec::new(),
            };
            self.lessor.applied(now, change, &leases);
        }
        self.metrics.leases.set(self.core.kv().lease_count() as i64);
    }

    /// Answers requests past their deadline, and forgets those whose caller went away, so
    /// neither holds a slot of the core's bounded tables.
    fn expire(&mut self, now: Instant) {
        let done: Vec<Token> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now || p.waiter.is_closed())
            .map(|(t, _)| *t)
            .collect();
        for token in done {
            if let Some(p) = self.pending.remove(&token) {
                self.core.cancel(token);
                p.waiter.fail(DriverError::Timeout);
            }
        }
        let (late, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.transfers)
            .into_iter()
            .partition(|(_, deadline, reply)| *deadline <= now || reply.is_closed());
        self.transfers = waiting;
        for (_, _, reply) in late {
            let _ = reply.send(Err(DriverError::Timeout));
        }
    }

    /// Refuses a membership change that cannot succeed, with the reason a client can act on,
    /// before it reaches the log. The leader checks again when it is proposed (its view of
    /// the configuration is the one that counts); this check makes the common mistakes a
    /// clear answer on any member rather than a timeout.
    fn check_conf_change(&self, cc: &ConfChange) -> Result<()> {
        let cs = self.core.raw().raft.trk.conf_state();
        let id = cc.node_id;
        let voter = cs.voters.contains(&id);
        let learner = cs.learners.contains(&id);
        if id == 0 {
            return Err(DriverError::Invalid("node id 0 is not valid".into()));
        }
        match cc.change_type() {
            ConfChangeType::RemoveNode if !voter && !learner => Err(DriverError::UnknownMember(id)),
            ConfChangeType::RemoveNode if voter && cs.voters.len() == 1 => Err(
                DriverError::Conflict(format!("node {id} is the last voter")),
            ),
            ConfChangeType::AddNode if voter => Err(DriverError::Conflict(format!(
                "node {id} is already a voter"
            ))),
            ConfChangeType::AddLearnerNode if voter || learner => Err(DriverError::Conflict(
                format!("node {id} is already a member"),
            )),
            _ => {
                let raft = &self.core.raw().raft;
                if raft.role == StateRole::Leader && raft.pending_conf_index > self.core.applied() {
                    return Err(DriverError::Conflict(
                        "another membership change is in progress".into(),
                    ));
                }
                Ok(())
            }
        }
    }

    /// Refuses an address change that cannot succeed, as `check_conf_change` does; applying
    /// it checks the same against the log's view, for a change committed meanwhile.
    fn check_peer_addr(&self, id: u64, addr: &str) -> Result<()> {
        let cs = self.core.raw().raft.trk.conf_state();
        let member = |id: u64| cs.voters.contains(&id) || cs.learners.contains(&id);
        if !member(id) {
            return Err(DriverError::UnknownMember(id));
        }
        let taken = self
            .core
            .peers()
            .iter()
            .any(|(&o, a)| o != id && a == addr && member(o));
        if taken {
            // etcd's words: clients match on them.
            return Err(DriverError::Conflict("Peer URLs already exists".into()));
        }
        Ok(())
    }

    fn transfer(&mut self, to: u64, deadline: Instant, reply: Reply<u64>) {
        let raft = &self.core.raw().raft;
        let cs = raft.trk.conf_state();
        let to = if to != 0 {
            to
        } else if raft.role != StateRole::Leader {
            let _ = reply.send(Err(DriverError::NotLeader(raft.leader_id)));
            return;
        } else {
            // The most caught-up other voter takes over with the least catching up.
            let best = cs
                .voters
                .iter()
                .filter(|&&v| v != self.id)
                .max_by_key(|&&v| raft.trk.progress.get(&v).map_or(0, |p| p.matched));
            match best {
                Some(&v) => v,
                None => {
                    let _ = reply.send(Err(DriverError::Conflict(
                        "there is no other voter to transfer to".into(),
                    )));
                    return;
                }
            }
        };
        if !cs.voters.contains(&to) {
            let _ = reply.send(Err(if cs.learners.contains(&to) {
                DriverError::Conflict(format!("node {to} is a learner; promote it first"))
            } else {
                DriverError::UnknownMember(to)
            }));
            return;
        }
        if raft.leader_id == to {
            let _ = reply.send(Ok(to));
            return;
        }
        if raft.leader_id == 0 {
            let _ = reply.send(Err(DriverError::NoLeader));
            return;
        }
        if self.transfers.len() >= MAX_TRANSFERS {
            let _ = reply.send(Err(DriverError::Overloaded));
            return;
        }
        info!(node = self.id, "transferring leadership to {to}");
        self.core.transfer_leader(to);
        self.transfers.push((to, deadline, reply));
    }

    /// Answers transfers whose target now leads.
    fn finish_transfers(&mut self) {
        if self.transfers.is_empty() {
            return;
        }
        let leader = self.core.raw().raft.leader_id;
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.transfers)
            .into_iter()
            .partition(|(to, _, _)| *to == leader);
        self.transfers = waiting;
        for (to, _, reply) in done {
            let _ = reply.send(Ok(to));
        }
    }

    /// Brings the transport's peers in line with the replicated address book: members it
    /// learned of are dialled, a removed member is dropped. Peers given at start are kept.
    fn reconcile_peers(&mut self, removed: Option<u64>) {
        let known: BTreeMap<u64, String> = self.transport.peers().into_iter().collect();
        for (&id, addr) in self.core.peers() {
            if id == self.id || known.get(&id) == Some(addr) {
                continue;
            }
            // The transport logs the new address, or moves a known peer to it.
            if let Err(e) = self.transport.add_peer(id, addr) {
                warn!(node = self.id, "cannot add peer {id} at {addr}: {e}");
            }
        }
        if let Some(id) = removed {
            if id == self.id {
                warn!(node = self.id, "this node was removed from the cluster");
            } else {
                self.transport.remove_peer(id);
            }
        }
    }

    fn send(&self, messages: Vec<Message>) {
        // A message the transport cannot queue is dropped and counted there; Raft
        // retransmits, so the loop never waits for a peer.
        self.transport.send_all(messages, |e| {
            self.metrics.peer_send_failures.inc();
            debug!(node = self.id, "message not sent: {e}");
        });
    }

    fn drain_ready(&mut self) -> Result<(), NodeError> {
        let (applied0, snap0, installed0) = (
            self.core.applied(),
            self.core.last_snapshot(),
            self.core.snapshots_installed(),
        );
        while let Some(out) = self.core.ready()? {
            self.send(out.messages);
            let started = Instant::now();
            let after_sync = self.core.persist()?;
            if out.must_sync {
                let took = started.elapsed();
                self.metrics.fsync_seconds.observe(took.as_secs_f64());
                if took >= SLOW_FSYNC {
                    warn!(node = self.id, "slow fsync: {} ms", took.as_millis());
                }
            }
            self.send(after_sync);
            self.core.apply()?;
        }
        // Before the answers: a client that sees its write acknowledged and then asks a watcher
        // on this node for the current revision finds the write's events already published.
        self.hub.publish(self.core.take_watch_feed());
        self.follow_leases();
        for o in self.core.take_outcomes() {
            self.deliver(o);
        }
        self.finish_transfers();
        if let Some(job) = self.core.take_snapshot_job() {
            self.write_snapshot(job)?;
        }
        let raft = &self.core.raw().raft;
        let m = &self.metrics;
        m.committed
            .inc_by(raft.raft_log.committed.saturating_sub(self.counted_commit));
        self.counted_commit = self.counted_commit.max(raft.raft_log.committed);
        m.applied
            .inc_by(self.core.applied().saturating_sub(applied0));
        m.term.set(raft.term as i64);
        m.is_leader.set(i64::from(raft.role == StateRole::Leader));
        m.commit_index.set(raft.raft_log.committed as i64);
        m.applied_index.set(self.core.applied() as i64);
        let snap = self.core.last_snapshot();
        if snap != snap0 {
            m.snapshots.inc();
            m.wal_bytes
                .set(self.core.raw().store().wal().bytes() as i64);
            if self.core.snapshots_installed() != installed0 {
                m.snapshots_installed.inc();
                info!(
                    node = self.id,
                    "installed snapshot at index {snap} from the leader"
                );
            } else {
                info!(node = self.id, "snapshot at index {snap}");
            }
        }
        Ok(())
    }

    /// Encodes and writes a snapshot file on a thread of its own (encoding the whole state, and
    /// an fsync of it, would stall heartbeats here), and reports back through the input channel.
    fn write_snapshot(&self, job: SnapshotJob) -> Result<(), NodeError> {
        let store = self.core.raw().store().snap_store().clone();
        let tx = self.self_tx.clone();
        std::thread::Builder::new()
            .name(format!("keel-snap-{}", self.id))
            .spawn(move || {
                lower_priority();
                let started = Instant::now();
                let mut snap = job.build();
                let result = store.save(&snap).map(|_| ()).map_err(|e| e.to_string());
                // The Raft thread keeps the data as a mapping of the file it was just written
                // to; swapping here frees the encoded copy on this thread. Freed there, hundreds
                // of MB went back to the system in the middle of a Ready (2 to 11 ms at 100,000
                // keys with their history). If the file cannot be mapped, the Raft thread keeps
                // the copy, as before.
                if result.is_ok() {
                    if let Ok(mapped) = store.map_data(&snap) {
                        snap.data = mapped;
                    }
                }
                // Gone only when the node is shutting down; the file is then adopted (or
                // removed as unrecorded) when the data dir is next opened.
                if let Some(tx) = tx.upgrade() {
                    let _ = tx.blocking_send(Input::SnapshotSaved {
                        snap,
                        result,
                        took: started.elapsed(),
                    });
                }
            })
            .map(|_| ())
            .map_err(|e| NodeError::Storage(format!("starting the snapshot writer: {e}")))
    }

    /// Deletes the old snapshot files and compacted WAL segments a snapshot left behind, on a
    /// thread of its own: unlinking them and syncing their directories took up to 50 and 99 ms
    /// of this thread while the disk was busy (docs/BENCHMARKS.md). A crash before they go
    /// leaves files that recovery reads past and the next compaction drops.
    fn remove_files(&self, paths: Vec<PathBuf>) {
        if paths.is_empty() {
            return;
        }
        let id = self.id;
        let spawned = std::thread::Builder::new()
            .name(format!("keel-rm-{id}"))
            .spawn(move || {
                lower_priority();
                if let Err(e) = keel_wal::remove_files(&StdFs, &paths) {
                    warn!(node = id, "deleting files the log no longer needs: {e}");
                }
            });
        if let Err(e) = spawned {
            warn!(node = id, "cannot start a thread to delete old files: {e}");
        }
    }

    fn deliver(&mut self, o: Outcome) {
        let (token, answer) = match o {
            Outcome::RoleChanged { role, term, leader } => {
                log_role(self.id, role, term, leader);
                if leader != self.last_leader && leader != 0 {
                    self.metrics.leader_changes.inc();
                }
                if leader != 0 {
                    self.last_leader = leader;
                }
                return;
            }
            Outcome::Members {
                conf_state,
                removed,
            } => {
                info!(
                    node = self.id,
                    "membership: voters {:?}, learners {:?}",
                    conf_state.voters,
                    conf_state.learners
                );
                self.reconcile_peers(removed);
                return;
            }
            Outcome::Write { token, result } => (token, Answer::Write(result)),
            Outcome::Read { token, result } => (token, Answer::Read(result.map(Some))),
            Outcome::ReadDropped { token } => (token, Answer::Read(Ok(None))),
            Outcome::ConfChange { token, conf_state } => (token, Answer::Conf(conf_state)),
            Outcome::PeerAddrChanged { token, result } => (token, Answer::PeerAddr(result)),
        };
        // Absent when the request timed out; the core forgot it then, so this is a late
        // answer from an outcome produced in the same Ready.
        let Some(p) = self.pending.remove(&token) else {
            return;
        };
        // Callers that went away are fine: nobody wants the answer.
        match (p.waiter, answer) {
            (Waiter::Write(r), Answer::Write(res)) => {
                let _ = r.send(res.map_err(DriverError::Kv));
            }
            (Waiter::Read(r), Answer::Read(res)) => {
                let _ = r.send(res.map_err(DriverError::Kv));
            }
            (Waiter::Conf(r), Answer::Conf(cs)) => {
                let _ = r.send(Ok(cs));
            }
            (Waiter::Conf(r), Answer::PeerAddr(res)) => {
                let _ = r.send(res.map_err(|e| match e {
                    PeerAddrError::NotMember(id) => DriverError::UnknownMember(id),
                    PeerAddrError::AddressInUse { addr, owner } => {
                        info!(node = self.id, "{addr} was taken by member {owner} first");
                        DriverError::Conflict("Peer URLs already exists".into())
                    }
                }));
            }
            (w, _) => {
                // Tokens are unique per request, so the core answered a token with another
                // kind of answer than it was asked: a bug in the core, not worth a crash here.
                error!(node = self.id, token, "answer of the wrong kind");
                w.fail(DriverError::Refused(
                    "internal: answer of the wrong kind".into(),
                ));
            }
        }
    }

    fn status(&self) -> Status {
        let raft = &self.core.raw().raft;
        let cs = raft.trk.conf_state();
        let transport: BTreeMap<u64, String> = self.transport.peers().into_iter().collect();
        let url = |id: u64| {
            self.core
                .peers()
                .get(&id)
                .or_else(|| transport.get(&id))
                .cloned()
        };
        let leading = raft.role == StateRole::Leader;
        let attrs = self.core.attributes();
        let mut members: Vec<MemberStatus> = cs
            .voters
            .iter()
            .map(|&v| (v, false))
            .chain(cs.learners.iter().map(|&l| (l, true)))
            .map(|(id, learner)| {
                let (matched, next) = match raft.trk.progress.get(&id) {
                    Some(p) if leading => (p.matched, p.next_idx),
                    _ => (0, 0),
                };
                let a = attrs.get(&id).cloned().unwrap_or_default();
                MemberStatus {
                    id,
                    peer_url: url(id),
                    name: a.name,
                    client_urls: a.client_urls,
                    learner,
                    matched,
                    next,
                }
            })
            .collect();
        members.sort_by_key(|m| m.id);
        Status {
            id: self.id,
            proposer: self.proposer,
            role: raft.role,
            term: raft.term,
            leader: raft.leader_id,
            commit: raft.raft_log.committed,
            applied: self.core.applied(),
            last_snapshot: self.core.last_snapshot(),
            last_index: raft.raft_log.last_index(),
            voters: cs.voters.clone(),
            learners: cs.learners.clone(),
            members,
            leader_addr: (raft.leader_id != 0).then(|| url(raft.leader_id)).flatten(),
            wal_bytes: self.core.raw().store().wal().bytes(),
            pending_requests: self.pending.len(),
        }
    }
}

enum Answer {
    Write(Result<Response, keel_kv::Error>),
    Read(Result<Option<RangeResponse>, keel_kv::Error>),
    Conf(ConfState),
    PeerAddr(std::result::Result<ConfState, PeerAddrError>),
}

fn log_role(id: u64, role: StateRole, term: u64, leader: u64) {
    match role {
        StateRole::Leader => info!(node = id, "became leader at term {term}"),
        StateRole::Follower => info!(node = id, "became follower at term {term}, leader {leader}"),
        StateRole::Candidate => info!(node = id, "became candidate at term {term}"),
        StateRole::PreCandidate => info!(node = id, "became pre-candidate at term {term}"),
    }
}

/// Increments the boot counter in `dir` durably and returns it. The proposer id must differ at
/// every process start (see `NodeConfig::proposer`), so the new value is on disk (temp file,
/// fsync, rename, directory fsync) before the node proposes anything with it.
fn next_boot(dir: &Path) -> std::io::Result<u64> {
    let path = dir.join(BOOT_FILE);
    let prev = match std::fs::read_to_string(&path) {
        Ok(s) => s.trim().parse::<u64>().map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    let boot = prev + 1;
    if boot > u64::from(u32::MAX) {
        return Err(std::io::Error::other(
            "boot counter exhausted (the proposer id holds 32 bits of it)",
        ));
    }
    let tmp = dir.join(BOOT_TMP);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(format!("{boot}\n").as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(boot)
}

/// The seed of this process's randomized election timeouts. The core's default (the node id)
/// keeps simulations reproducible, but in production it would give every run of a cluster the
/// same timeout sequence, so that the same node wins every first election and split votes
/// repeat; the clock and the process id make each start draw its own.
fn election_seed(id: u64, boot: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut x = nanos ^ (u64::from(std::process::id()) << 32) ^ id.rotate_left(17) ^ boot;
    // splitmix64's finalizer: nearby inputs (two nodes started in the same microsecond) give
    // unrelated seeds.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// `host:port` from a peer URL as raftexample writes them (`http://127.0.0.1:12379`) or a
/// bare address. The transport speaks its own protocol whatever the scheme says.
pub fn peer_addr(url: &str) -> Result<String, String> {
    let s = url.trim();
    let s = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .or_else(|| s.strip_prefix("tcp://"))
        .unwrap_or(s);
    let s = s.trim_end_matches('/');
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("peer address {url:?} is not host:port"))?;
    if host.is_empty() || host.contains('/') || s.len() > snapshot::MAX_ADDR_LEN {
        return Err(format!("peer address {url:?} is not host:port"));
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(s.to_string()),
        _ => Err(format!("peer address {url:?} has no valid port")),
    }
}

/// The snapshot a new cluster starts from, at index 1 term 1 on every initial member. It sits
/// at index 1 rather than 0 so that a member added later, whose log is empty, needs entry 1,
/// which no log holds: the leader sends it a snapshot, and with it the configuration and the
/// address book, instead of replaying a log that lacks the initial configuration.
fn bootstrap_snapshot(voters: &[u64], book: &AddressBook) -> Snapshot {
    Snapshot {
        data: snapshot::encode(book, &Attributes::new(), &[]),
        metadata: Some(SnapshotMetadata {
            conf_state: Some(ConfState {
                voters: voters.to_vec(),
                learners: vec![],
            }),
            index: 1,
            term: 1,
        }),
    }
}

/// A store that has never held anything: no entries, no snapshot, no vote.
fn is_pristine(store: &WalStorage) -> Result<bool, String> {
    let snap = store.snapshot(0).map_err(|e| e.to_string())?;
    let last = store.last_index().map_err(|e| e.to_string())?;
    Ok(keel_raft::storage::snapshot_position(&snap).0 == 0
        && last == 0
        && *store.hard_state() == Default::default())
}

/// Opens (or bootstraps) the data dir and builds the core. Blocking file I/O. `book` is the
/// address book a new cluster starts with.
fn open_core(cfg: &DriverConfig, book: &AddressBook) -> Result<(NodeCore<WalStorage>, u64)> {
    let dir = cfg.data_dir.as_path();
    let io = |e: std::io::Error| DriverError::Storage(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let boot = next_boot(dir).map_err(io)?;
    let proposer = (cfg.id << 32) | boot;
    let fs: Arc<dyn Fs> = Arc::new(StdFs);
    let mut opts = StorageOptions::new(cfg.id, cfg.cluster_id);
    // Compacted segments and old snapshot files are deleted off the Raft thread
    // (`RaftLoop::remove_files`).
    opts.wal.defer_removal = true;
    let storage = |e: String| DriverError::Storage(format!("{}: {e}", dir.display()));
    let mut store = WalStorage::open(fs, dir, opts).map_err(|e| storage(e.to_string()))?;
    // Checked on every start rather than only when the directory is new, so that a crash in
    // the middle of a bootstrap is finished on the next start instead of leaving a node that
    // waits forever to be added.
    if !cfg.initial_members.is_empty() && is_pristine(&store).map_err(storage)? {
        info!(
            node = cfg.id,
            "bootstrapping a new cluster with voters {:?}", cfg.initial_members
        );
        store
            .apply_snapshot(bootstrap_snapshot(&cfg.initial_members, book))
            .map_err(|e| storage(e.to_string()))?;
    }
    let mut nc = NodeConfig::new(cfg.id, proposer);
    nc.raft.seed = election_seed(cfg.id, boot);
    nc.raft.election_tick = cfg.election_tick;
    nc.raft.heartbeat_tick = cfg.heartbeat_tick;
    nc.snapshot_count = cfg.snapshot_count;
    nc.snapshot_phase = crate::core::snapshot_phase_for(cfg.id, cfg.snapshot_count);
    nc.compaction_margin = nc.compaction_margin.min(cfg.snapshot_count);
    nc.background_snapshots = true;
    nc.attributes = cfg.attributes();
    nc.collect_events = true;
    let core = NodeCore::new(nc, store).map_err(|e| match e {
        NodeError::Config(s) => DriverError::Config(s),
        NodeError::Raft(keel_raft::Error::ConfigInvalid(s)) => DriverError::Config(s),
        other => DriverError::Storage(other.to_string()),
    })?;
    info!(node = cfg.id, boot, "opened {}", dir.display());
    Ok((core, proposer))
}

/// Makes the calling thread yield the CPU to the node's other threads (Linux: nice 19 for
/// this thread alone). Writing a snapshot encodes the whole state, hundreds of ms of CPU with
/// a large history, and (before members took their snapshots at different indexes) all
/// members reached the snapshot index at about the same time: at normal priority the three
/// writers of a local cluster took the cores from the Raft threads and the API, and puts at
/// 256 clients had a p99 of 40 to 44 ms against 29 to 35 at nice 19 (docs/BENCHMARKS.md).
/// The price is a slower snapshot on a saturated machine; a node writes one snapshot at a
/// time, so a slow one delays the next and the log compaction after it, never the writes.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setpriority takes no pointers; on Linux, PRIO_PROCESS with who = 0 is the
        // calling thread.
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
        if rc != 0 {
            debug!(
                "snapshot writer keeps its priority: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// What the Raft thread waits on: the input channel, and the transport's inbox and reports
/// taken directly. A task that forwarded peer messages into the input channel made every
/// message from a peer wake two threads (a tokio worker, then this one) instead of one.
struct Sources {
    rx: mpsc::Receiver<Input>,
    /// `None` once the transport has shut down and the channel ended.
    inbox: Option<Inbox>,
    reports: Option<Reports>,
    /// Which source `try_next` tries first; it rotates so that a flood on one (a peer
    /// catching up, a client burst) cannot keep the others waiting beyond one batch.
    turn: usize,
    /// Unparks the Raft thread; made once on it, in `new`.
    waker: Waker,
}

impl Sources {
    /// Must be called on the Raft thread: the waker it makes unparks the calling thread.
    fn new(rx: mpsc::Receiver<Input>, inbox: Inbox, reports: Reports) -> Sources {
        Sources {
            rx,
            inbox: Some(inbox),
            reports: Some(reports),
            turn: 0,
            waker: Waker::from(Arc::new(Unpark(std::thread::current()))),
        }
    }

    /// Polls each source once, starting from `turn`. `Ready(None)` means the input channel
    /// is closed: the node is stopping. An ended inbox or report channel is dropped and
    /// the others still served.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Input>> {
        for k in 0..3 {
            let which = (self.turn + k) % 3;
            let polled = match which {
                0 => match self.rx.poll_recv(cx) {
                    Poll::Ready(None) => return Poll::Ready(None),
                    p => p,
                },
                1 => match self.inbox.as_mut().map(|i| i.poll_recv(cx)) {
                    Some(Poll::Ready(None)) => {
                        self.inbox = None;
                        Poll::Pending
                    }
                    Some(p) => p.map(|m| m.map(Input::Peer)),
                    None => Poll::Pending,
                },
                _ => match self.reports.as_mut().map(|r| r.poll_recv(cx)) {
                    Some(Poll::Ready(None)) => {
                        self.reports = None;
                        Poll::Pending
                    }
                    Some(p) => p.map(|r| r.map(Input::Report)),
                    None => Poll::Pending,
                },
            };
            if polled.is_ready() {
                self.turn = (which + 1) % 3;
                return polled;
            }
        }
        Poll::Pending
    }

    /// An input if one is waiting, or `None`. A closed input channel also gives `None`; the
    /// next `wait` reports it.
    fn try_next(&mut self) -> Option<Input> {
        // No waker is needed: nothing waits on this poll, and `wait` registers the real one
        // before it parks.
        match self.poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(i) => i,
            Poll::Pending => None,
        }
    }

    /// Blocks until an input arrives; `None` once the input channel is closed and empty.
    fn wait(&mut self) -> Option<Input> {
        let waker = self.waker.clone();
        let mut cx = Context::from_waker(&waker);
        loop {
            if let Poll::Ready(i) = self.poll(&mut cx) {
                return i;
            }
            // A wake between the poll and the park leaves the token set, so this returns at
            // once; spurious returns just poll again.
            std::thread::park();
        }
    }
}

struct Unpark(std::thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

async fn ticker(tx: mpsc::Sender<Input>, every: Duration) {
    let mut interval = tokio::time::interval(every);
    // After a pause, catch-up ticks in a burst would expire election timeouts all at once.
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        match tx.try_send(Input::Tick) {
            // A loop with the whole headroom queued is far behind; a lost tick only delays
            // timeouts by one interval.
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}

struct Parts {
    thread: std::thread::JoinHandle<()>,
    /// Resolves (with an error) when the Raft thread has dropped everything it owned.
    done: oneshot::Receiver<()>,
    ticker: JoinHandle<()>,
    transport: Arc<Transport>,
}

struct Shared {
    id: u64,
    local_addr: SocketAddr,
    tick_interval: Duration,
    election_tick: usize,
    request_timeout: Duration,
    max_queued_requests: usize,
    /// `MAX_SNAPSHOT_STREAMS` permits, one per `SnapshotData` alive.
    snapshot_slots: Arc<tokio::sync::Semaphore>,
    metrics: Arc<Metrics>,
    /// Client inputs in the channel. Invariant: at most `max_queued_requests` once a
    /// `submit` that overshot has undone its increment.
    queued: Arc<AtomicUsize>,
    hub: WatchHub,
    parts: tokio::sync::Mutex<Option<Parts>>,
}

/// A cheap, cloneable handle to a running node.
#[derive(Clone)]
pub struct NodeHandle {
    tx: mpsc::Sender<Input>,
    shared: Arc<Shared>,
}

/// Starts a node: opens or bootstraps its data dir, binds its transport, and starts the Raft
/// thread and the tick timer. Must be called within a tokio runtime.
pub async fn start(cfg: DriverConfig) -> Result<NodeHandle> {
    cfg.validate()?;
    let tcfg = keel_transport::Config::new(cfg.id, cfg.cluster_id);
    let (transport, inbox, reports) = Transport::bind(tcfg, cfg.listen)
        .await
        .map_err(|e| DriverError::Transport(format!("listening on {}: {e}", cfg.listen)))?;
    let local_addr = transport.local_addr();
    let mut book: AddressBook = AddressBook::new();
    for (&id, url) in &cfg.peers {
        book.insert(id, peer_addr(url).map_err(DriverError::Config)?);
    }
    book.entry(cfg.id).or_insert_with(|| local_addr.to_string());
    let opened = {
        let (cfg, book) = (cfg.clone(), book.clone());
        tokio::task::spawn_blocking(move || open_core(&cfg, &book))
            .await
            .map_err(|e| DriverError::Start(format!("opening the data dir: {e}")))??
    };
    let (core, proposer) = opened;
    // Addresses given at start win over the replicated book, which fills in the rest.
    let mut dial = core.peers().clone();
    dial.extend(book);
    for (&id, addr) in &dial {
        if id != cfg.id {
            transport
                .add_peer(id, addr)
                .map_err(|e| DriverError::Transport(e.to_string()))?;
        }
    }
    let transport = Arc::new(transport);
    let (tx, rx) = mpsc::channel(cfg.max_queued_requests + INTERNAL_HEADROOM);
    let queued = Arc::new(AtomicUsize::new(0));
    let metrics = Arc::new(Metrics::new());
    let hub = WatchHub::new();
    // Entries committed before this start were counted by an earlier process.
    let counted_commit = core.raw().raft.raft_log.committed;
    let raft_loop = RaftLoop {
        id: cfg.id,
        proposer,
        core,
        transport: transport.clone(),
        pending: HashMap::new(),
        next_token: 0,
        queued: queued.clone(),
        metrics: metrics.clone(),
        transfers: Vec::new(),
        last_leader: 0,
        counted_commit,
        self_tx: tx.downgrade(),
        hub: hub.clone(),
        lessor: Lessor::default(),
        election_timeout: cfg.tick_interval * cfg.election_tick as u32,
    };
    let (done_tx, done_rx) = oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(format!("keel-raft-{}", cfg.id))
        .spawn(move || {
            raft_loop.run(Sources::new(rx, inbox, reports));
            drop(done_tx);
        })
        .map_err(|e| DriverError::Start(format!("spawning the raft thread: {e}")))?;
    let ticker = tokio::spawn(ticker(tx.clone(), cfg.tick_interval));
    info!(
        node = cfg.id,
        proposer, "node started, peers on {local_addr}"
    );
    Ok(NodeHandle {
        tx,
        shared: Arc::new(Shared {
            id: cfg.id,
            local_addr,
            tick_interval: cfg.tick_interval,
            election_tick: cfg.election_tick,
            request_timeout: cfg.request_timeout,
            max_queued_requests: cfg.max_queued_requests,
            snapshot_slots: Arc::new(tokio::sync::Semaphore::new(MAX_SNAPSHOT_STREAMS)),
            queued,
            metrics,
            hub,
            parts: tokio::sync::Mutex::new(Some(Parts {
                thread,
                done: done_rx,
                ticker,
                transport,
            })),
        }),
    })
}

impl NodeHandle {
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// The transport's listening address (useful when `listen` had port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    fn submit(&self, input: Input) -> Result<()> {
        let q = &self.shared.queued;
        if q.fetch_add(1, Ordering::AcqRel) >= self.shared.max_queued_requests {
            q.fetch_sub(1, Ordering::AcqRel);
            return Err(DriverError::Overloaded);
        }
        self.tx.try_send(input).map_err(|e| {
            q.fetch_sub(1, Ordering::AcqRel);
            match e {
                mpsc::error::TrySendError::Full(_) => DriverError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => DriverError::Stopped,
            }
        })
    }

    async fn call<T>(&self, deadline: Instant, make: impl FnOnce(Reply<T>) -> Input) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        self.submit(make(reply))?;
        let wait = deadline.saturating_duration_since(Instant::now()) + ANSWER_GRACE;
        match tokio::time::timeout(wait, answer).await {
            Ok(Ok(r)) => r,
            // The Raft thread dropped the reply: it stopped.
            Ok(Err(_)) => Err(DriverError::Stopped),
            Err(_) => Err(DriverError::Timeout),
        }
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.shared.request_timeout
    }

    /// Proposes a write and waits until it is applied on this node (after a quorum made it
    /// durable). A follower forwards it to the leader inside Raft.
    pub async fn propose(&self, op: Op) -> Result<Response> {
        let deadline = self.deadline();
        self.call(deadline, |reply| Input::Propose {
            op,
            deadline,
            reply,
        })
        .await
    }

    /// Puts `key`; returns the revision of the write.
    pub async fn put(&self, key: impl Into<Bytes>, value: impl Into<Bytes>) -> Result<i64> {
        let op = Op::Put(PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        });
        match self.propose(op).await? {
            Response::Put(p) => Ok(p.revision),
            other => Err(DriverError::Refused(format!(
                "internal: a put answered with {other:?}"
            ))),
        }
    }

    /// A linearizable range read (ReadIndex). A read dropped by a leadership change is retried
    /// until the request deadline.
    pub async fn read(&self, range: RangeRequest) -> Result<RangeResponse> {
        let deadline = self.deadline();
        loop {
            let range = range.clone();
            let answer = self
                .call(deadline, |reply| Input::Read {
                    range,
                    deadline,
                    reply,
                })
                .await?;
            if let Some(r) = answer {
                return Ok(r);
            }
            // Dropped: leadership is changing, which takes at least a tick to settle.
            let pause = self.shared.tick_interval;
            if Instant::now() + pause >= deadline {
                return Err(DriverError::Timeout);
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// A linearizable get of one key.
    pub async fn get(&self, key: impl Into<Bytes>) -> Result<Option<Bytes>> {
        let r = self
            .read(RangeRequest {
                key: key.into(),
                ..Default::default()
            })
            .await?;
        Ok(r.kvs.into_iter().next().map(|kv| kv.value))
    }

    /// Proposes a membership change and waits until it is applied here; returns the
    /// configuration then in force. With `addr`, the transport dials `cc.node_id` there first.
    pub async fn conf_change(&self, cc: ConfChange, addr: Option<String>) -> Result<ConfState> {
        let addr = addr
            .map(|a| peer_addr(&a))
            .transpose()
            .map_err(DriverError::Invalid)?;
        let deadline = self.deadline();
        self.call(deadline, |reply| Input::ConfChange {
            cc,
            addr,
            deadline,
            reply,
        })
        .await
    }

    /// Adds a voter reachable at `addr` (`host:port` or a URL like `http://host:port`).
    pub async fn add_member(&self, id: u64, addr: impl Into<String>) -> Result<ConfState> {
        let mut cc = ConfChange {
            node_id: id,
            ..Default::default()
        };
        cc.set_change_type(ConfChangeType::AddNode);
        self.conf_change(cc, Some(addr.into())).await
    }

    /// Adds a learner (a non-voting member that receives the log) reachable at `addr`.
    pub async fn add_learner(&self, id: u64, addr: impl Into<String>) -> Result<ConfState> {
        let mut cc = ConfChange {
            node_id: id,
            ..Default::default()
        };
        cc.set_change_type(ConfChangeType::AddLearnerNode);
        self.conf_change(cc, Some(addr.into())).await
    }

    /// Makes a learner a voter.
    pub async fn promote(&self, id: u64) -> Result<ConfState> {
        let status = self.status().await?;
        if !status.learners.contains(&id) {
            return Err(if status.voters.contains(&id) {
                DriverError::Conflict(format!("node {id} is already a voter"))
            } else {
                DriverError::UnknownMember(id)
            });
        }
        let mut cc = ConfChange {
            node_id: id,
            ..Default::default()
        };
        cc.set_change_type(ConfChangeType::AddNode);
        self.conf_change(cc, None).await
    }

    /// Moves member `id`'s peer address to `url` (`host:port` or `http://host:port`; etcd's
    /// MemberUpdate) and waits until the change is applied here; returns the configuration.
    /// Every member records the new address when it applies the change and dials it from then
    /// on; the member itself must be (re)started listening there.
    pub async fn update_peer_addr(&self, id: u64, url: &str) -> Result<ConfState> {
        let addr = peer_addr(url).map_err(DriverError::Invalid)?;
        let deadline = self.deadline();
        self.call(deadline, |reply| Input::PeerAddr {
            id,
            addr,
            deadline,
            reply,
        })
        .await
    }

    /// A consistent copy of this node's state (see [`SnapshotData`]). At most
    /// `MAX_SNAPSHOT_STREAMS` are alive at once; past that, `Busy` at once.
    pub async fn snapshot_data(&self) -> Result<SnapshotData> {
        let slot = self
            .shared
            .snapshot_slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                DriverError::Busy("a snapshot is already being sent from this member".into())
            })?;
        let image = self
            .call(self.deadline(), |reply| Input::SnapshotData { reply })
            .await?;
        let (applied, revision) = (image.applied(), image.revision());
        // Encoding grows with the store: a blocking thread's work, not the runtime's.
        let data = tokio::task::spawn_blocking(move || image.encode())
            .await
            .map_err(|e| DriverError::Storage(format!("encoding a snapshot: {e}")))?;
        Ok(SnapshotData {
            data,
            applied,
            revision,
            _slot: slot,
        })
    }

    /// Hands leadership to `to` (0: the most caught-up other voter) and waits until it leads;
    /// returns the new leader. `to = 0` must be asked of the leader.
    pub async fn transfer_leader(&self, to: u64) -> Result<u64> {
        let deadline = self.deadline();
        self.call(deadline, |reply| Input::Transfer {
            to,
            deadline,
            reply,
        })
        .await
    }

    /// A serializable read: the local state machine as applied here, without asking the
    /// leader. May be stale.
    pub async fn read_local(&self, range: RangeRequest) -> Result<RangeResponse> {
        self.call(self.deadline(), |reply| Input::ReadLocal { range, reply })
            .await
    }

    /// The local store's current revision: a one-key serializable read, so no hashing and no
    /// ReadIndex round (for response headers and the compactor).
    pub async fn revision(&self) -> Result<i64> {
        let r = self
            .read_local(RangeRequest {
                key: Bytes::from_static(b"\0"),
                count_only: true,
                ..Default::default()
            })
            .await?;
        Ok(r.revision)
    }

    /// etcd's HashKV of the local state at `revision` (0: the current one).
    pub async fn hash(&self, revision: i64) -> Result<HashInfo> {
        self.call(self.deadline(), |reply| Input::Hash { revision, reply })
            .await
    }

    /// The Raft term the Raft thread last published. Cheap (no round trip to that thread), for
    /// response headers that carry the term on every answer; may lag by one Ready.
    pub fn term(&self) -> u64 {
        self.shared.metrics.term.get().max(0) as u64
    }

    /// Grants a lease of `ttl` seconds (0 for `id`: the store picks one). A TTL below the
    /// minimum is raised to it, as etcd does: a lease must outlive an election, or a leader
    /// change alone would expire it.
    pub async fn lease_grant(&self, id: i64, ttl: i64) -> Result<keel_kv::LeaseGrantResponse> {
        let ttl = ttl.max(self.min_lease_ttl());
        match self
            .propose(Op::LeaseGrant(keel_kv::LeaseGrantRequest { id, ttl }))
            .await?
        {
            Response::LeaseGrant(g) => Ok(g),
            other => Err(DriverError::Refused(format!(
                "internal: a lease grant answered with {other:?}"
            ))),
        }
    }

    /// How long a request may wait for its answer.
    pub fn request_timeout(&self) -> Duration {
        self.shared.request_timeout
    }

    /// etcd's `minTTL`: 1.5 election timeouts, in whole seconds rounded up.
    pub fn min_lease_ttl(&self) -> i64 {
        let election = self.shared.tick_interval * self.shared.election_tick as u32;
        let ms = election.as_millis() as i64 * 3 / 2;
        (ms + 999) / 1000
    }

    /// Revokes a lease, deleting its keys at one revision.
    pub async fn lease_revoke(&self, id: i64) -> Result<i64> {
        match self
            .propose(Op::LeaseRevoke(keel_kv::LeaseRevokeRequest { id }))
            .await?
        {
            Response::LeaseRevoke(r) => Ok(r.revision),
            other => Err(DriverError::Refused(format!(
                "internal: a lease revoke answered with {other:?}"
            ))),
        }
    }

    /// A keep-alive on the leader: the lease's TTL from now, or `None` for a lease that is
    /// unknown or already due. `NotLeader` on a follower: the caller forwards it.
    pub async fn lease_renew(&self, id: i64) -> Result<Option<i64>> {
        self.call(self.deadline(), |reply| Input::LeaseRenew { id, reply })
            .await
    }

    /// A lease's remaining TTL on the leader (`None`: unknown). `NotLeader` on a follower.
    pub async fn lease_time_to_live(&self, id: i64, keys: bool) -> Result<Option<LeaseTtl>> {
        self.call(self.deadline(), |reply| Input::LeaseTimeToLive {
            id,
            keys,
            reply,
        })
        .await
    }

    /// Every lease in this node's store.
    pub async fn leases(&self) -> Result<Vec<keel_kv::LeaseInfo>> {
        self.call(self.deadline(), |reply| Input::Leases { reply })
            .await
    }

    /// Every change this node applies from now on (see [`crate::watch`]).
    pub fn subscribe_watch(&self) -> tokio::sync::broadcast::Receiver<Arc<WatchFeed>> {
        self.shared.hub.subscribe()
    }

    /// A slice of the local store's history from `start`, for a watcher catching up.
    pub async fn history(
        &self,
        start: i64,
        key: Bytes,
        range_end: Bytes,
    ) -> Result<std::result::Result<History, HistoryError>> {
        self.call(self.deadline(), |reply| Input::History {
            start,
            key,
            range_end,
            reply,
        })
        .await
    }

    /// The node's metrics in Prometheus text format.
    pub fn metrics_text(&self) -> String {
        self.shared.metrics.encode()
    }

    pub async fn remove_member(&self, id: u64) -> Result<ConfState> {
        let mut cc = ConfChange {
            node_id: id,
            ..Default::default()
        };
        cc.set_change_type(ConfChangeType::RemoveNode);
        self.conf_change(cc, None).await
    }

    pub async fn status(&self) -> Result<Status> {
        let (reply, answer) = oneshot::channel();
        self.submit(Input::Status { reply })?;
        match tokio::time::timeout(self.shared.request_timeout, answer).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(_)) => Err(DriverError::Stopped),
            Err(_) => Err(DriverError::Timeout),
        }
    }

    /// Stops the node and waits until the Raft thread, its tasks and the transport are gone
    /// (the data dir is closed and the port free). Pending requests get `Stopped`. Later
    /// calls, from any clone, return at once.
    pub async fn shutdown(&self) {
        let Some(parts) = self.shared.parts.lock().await.take() else {
            return;
        };
        // `send` waits for room rather than failing: shutdown must get through a full queue.
        // It fails only when the thread already stopped on its own.
        let _ = self.tx.send(Input::Shutdown).await;
        let _ = parts.done.await;
        let thread = parts.thread;
        if let Ok(Err(_)) = tokio::task::spawn_blocking(move || thread.join()).await {
            warn!(node = self.shared.id, "raft thread panicked");
        }
        parts.ticker.abort();
        let _ = parts.ticker.await;
        match Arc::try_unwrap(parts.transport) {
            Ok(t) => t.shutdown().await,
            Err(_) => warn!(
                node = self.shared.id,
                "transport still shared at shutdown; dropped without waiting"
            ),
        }
        info!(node = self.shared.id, "node shut down");
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::lower_priority;

    fn own_nice() -> i32 {
        // SAFETY: getpriority takes no pointers; -1 can be a valid answer, and 19 or the
        // caller's own level is all this test looks for.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
    }

    #[test]
    fn lower_priority_lowers_the_calling_thread_only() {
        let before = own_nice();
        let (inside, after) = std::thread::spawn(|| {
            lower_priority();
            own_nice()
        })
        .join()
        .map(|n| (n, own_nice()))
        .unwrap();
        assert_eq!(inside, 19);
        assert_eq!(after, before, "the spawning thread's priority changed");
    }
}
