//! The server's settings: command-line flags, an optional config file (JSON or TOML), and the
//! [`Plan`] they resolve to. Everything here is pure, so every rule has a unit test; the
//! server (`crate::server`) only carries a plan out.
//!
//! Flags win over the file. The file accepts the reference design's shape
//! (`{"ID": "node-01", "Nodes": [{"ID": "node-01", "Endpoint": "127.0.0.1:3331"}]}`) and
//! Keel's own settings beside it.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

use crate::client::parse_duration;
use keel_node::compactor::AutoCompaction;

/// Node ids are below 2^32 (the driver builds proposer ids as `id << 32 | boot`); a name's
/// trailing digits are its id (`node-03` -> 3). The API applies the same rules to joiners.
pub use keel_api::{id_from_name, MAX_NODE_ID};

/// A name is shown in status and sent to the member a node joins through; it stays short and
/// printable so it can go into a URL query and a directory name unescaped.
const MAX_NAME_LEN: usize = 64;

/// Largest config file read. A membership list of a few hundred nodes is a few tens of KiB;
/// the bound keeps a wrong path (a log file, a device) from being read whole into memory.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The cluster token when none is given. Members of one cluster must share it: the cluster id
/// every peer connection is checked against is derived from it.
pub const DEFAULT_CLUSTER_TOKEN: &str = "keel";

/// The flags of `keel` (serving one node).
#[derive(Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// This node's id (1..2^32). With --cluster it is the 1-based position of its own peer URL.
    #[arg(long)]
    pub id: Option<u64>,

    /// This node's name (default node-<id>), shown by status; with --join-addr or
    /// --bootstrap-expect the id is taken from its trailing digits when --id is absent.
    #[arg(long)]
    pub name: Option<String>,

    /// Comma-separated peer URLs of the cluster's members; the i-th is member i (raftexample).
    #[arg(long)]
    pub cluster: Option<String>,

    /// Client HTTP port, on --host (default 2379).
    #[arg(long)]
    pub port: Option<u16>,

    /// Address the client HTTP API binds to.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,

    /// Join a running cluster instead of forming a new one (raftexample: the node was added
    /// with `POST /<id>` first).
    #[arg(long)]
    pub join: bool,

    /// Client address of any running member: ask it to add this node, then join.
    #[arg(long, value_name = "ADDR")]
    pub join_addr: Option<String>,

    /// The peer URL this node listens on and advertises, with --join-addr or
    /// --bootstrap-expect (with --cluster or --config it comes from there).
    #[arg(long, value_name = "URL")]
    pub peer_url: Option<String>,

    /// Wait until this many nodes (this one included) have joined through --join-addr, then
    /// form the cluster with all of them as voters.
    #[arg(long, value_name = "N")]
    pub bootstrap_expect: Option<usize>,

    /// How long --join-addr keeps asking before giving up.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub join_timeout: Duration,

    /// Where the WAL, snapshots and membership live (default ./keel-data for a node started
    /// without cluster flags, ./keel-<name> otherwise).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,

    /// A JSON or TOML file (by extension) with the node's id, the members and settings.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Members of one cluster share a token; a peer with another token is refused.
    #[arg(long)]
    pub cluster_token: Option<String>,

    /// Raft tick interval in milliseconds; 50 by default.
    #[arg(long)]
    pub tick_ms: Option<u64>,

    /// Ticks without a leader before an election (the timeout is randomized in [n, 2n)); 6 by
    /// default.
    #[arg(long)]
    pub election_ticks: Option<usize>,

    /// Ticks between heartbeats; 1 by default.
    #[arg(long)]
    pub heartbeat_ticks: Option<usize>,

    /// Applied entries between snapshots (and log compactions), on average; 100000 by default.
    /// Each member snapshots at its own offset in the run, so members do not all write at once.
    #[arg(long)]
    pub snapshot_count: Option<u64>,

    /// Largest client request (key plus value for a write), in bytes.
    #[arg(long)]
    pub max_request_bytes: Option<usize>,

    /// Most operations in one etcd txn (etcd's --max-txn-ops).
    #[arg(long)]
    pub max_txn_ops: Option<usize>,

    /// How history is compacted automatically (etcd's flag): `periodic` keeps the revisions of
    /// the last --auto-compaction-retention, `revision` keeps that many revisions.
    #[arg(long, default_value = "periodic", value_parser = ["periodic", "revision"])]
    pub auto_compaction_mode: String,

    /// `0` (the default) keeps all history. Periodic: a duration (`30m`, `1h`) or a number of
    /// hours, as etcd; revision: a number of revisions.
    #[arg(long, default_value = "0")]
    pub auto_compaction_retention: String,

    /// Where clients connect, as etcd names it (http://host:port); the HTTP API and etcd's
    /// gRPC API share it. Overrides --host and --port.
    #[arg(long, value_name = "URL")]
    pub listen_client_urls: Option<String>,

    /// How often an idle watcher that asked for progress notifications gets one (etcd's flag
    /// and default).
    #[arg(
        long = "experimental-watch-progress-notify-interval",
        default_value = "10m",
        value_parser = parse_duration
    )]
    pub watch_progress_notify_interval: Duration,
}

/// A node reference in the file: a number, or a name whose trailing digits are the id.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum FileId {
    Number(u64),
    Name(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileNode {
    #[serde(rename = "ID", alias = "id")]
    pub id: FileId,
    /// The node's peer address.
    #[serde(rename = "Endpoint", alias = "endpoint", alias = "peer_url")]
    pub endpoint: String,
    /// The node's client HTTP address; only this node's own entry is used (to listen on).
    #[serde(rename = "Client", alias = "client", alias = "client_url", default)]
    pub client: Option<String>,
}

/// The config file. Field names follow the reference design (`ID`, `Nodes`) or snake case.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(rename = "ID", alias = "id", default)]
    pub id: Option<FileId>,
    #[serde(rename = "Nodes", alias = "nodes", default)]
    pub nodes: Vec<FileNode>,
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    #[serde(default)]
    pub cluster_token: Option<String>,
    #[serde(default)]
    pub tick_ms: Option<u64>,
    #[serde(default)]
    pub election_ticks: Option<usize>,
    #[serde(default)]
    pub heartbeat_ticks: Option<usize>,
    #[serde(default)]
    pub snapshot_count: Option<u64>,
    #[serde(default)]
    pub max_request_bytes: Option<usize>,
    #[serde(default)]
    pub max_txn_ops: Option<usize>,
}

/// Reads a config file, JSON or TOML by its extension. Errors name the file and the field.
pub fn load_file(path: &Path) -> Result<FileConfig, String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("config {shown}: {e}"))?;
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(format!(
            "config {shown}: {} bytes, more than the {MAX_CONFIG_BYTES} a config file may hold",
            meta.len()
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("config {shown}: {e}"))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    parse_file(&text, ext).map_err(|e| format!("config {shown}: {e}"))
}

/// Parses config text; `ext` is `json` or `toml`.
pub fn parse_file(text: &str, ext: &str) -> Result<FileConfig, String> {
    match ext.to_ascii_lowercase().as_str() {
        "json" => {
            let de = &mut serde_json::Deserializer::from_str(text);
            serde_path_to_error::deserialize(de).map_err(|e| {
                let path = e.path().to_string();
                if path == "." {
                    e.inner().to_string()
                } else {
                    format!("field {path}: {}", e.inner())
                }
            })
        }
        "toml" => toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string()),
        other => Err(format!(
            "unknown config format {other:?}: the file name must end in .json or .toml"
        )),
    }
}

/// How the node comes to be a member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// The membership is given (--cluster or a config file). A fresh data dir bootstraps with
    /// every listed node as a voter, unless `join` (the node was added to a running cluster).
    Static { join: bool },
    /// Ask the member at this client address to add this node.
    JoinAddr(String),
    /// Collect this many nodes, then form the cluster with all of them.
    BootstrapExpect(usize),
}

/// What the server does, resolved from flags and file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// `None` only with --join-addr, where the member asked assigns one.
    pub id: Option<u64>,
    pub name: String,
    pub mode: Mode,
    /// Peer address (`host:port`) by id, as given; empty with --join-addr.
    pub peers: BTreeMap<u64, String>,
    /// This node's own peer address (`host:port`).
    pub peer_addr: String,
    pub client_addr: SocketAddr,
    pub data_dir: PathBuf,
    pub cluster_token: String,
    pub join_timeout: Duration,
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    pub snapshot_count: u64,
    pub max_request_bytes: usize,
    pub max_txn_ops: usize,
    pub auto_compaction: Option<AutoCompaction>,
    pub watch_progress_notify_interval: Duration,
}

/// The client port of a node given no --port.
pub const DEFAULT_CLIENT_PORT: u16 = 2379;
/// The peer URL of a node given no cluster flags at all.
pub const DEFAULT_PEER_URL: &str = "http://127.0.0.1:2380";

/// `http://host:port`, `tcp://host:port` or `host:port` -> `host:port`.
pub fn peer_addr(url: &str) -> Result<String, String> {
    keel_node::driver::peer_addr(url)
}

fn check_id(id: u64, what: &str) -> Result<u64, String> {
    if id == 0 || id > MAX_NODE_ID {
        return Err(format!("{what}: node id {id} is not in 1..2^32"));
    }
    Ok(id)
}

fn file_id(r: &FileId, field: &str) -> Result<u64, String> {
    match r {
        FileId::Number(n) => check_id(*n, field),
        FileId::Name(s) => match s.trim().parse::<u64>() {
            Ok(n) => check_id(n, field),
            Err(_) => id_from_name(s)
                .ok_or_else(|| format!("{field}: {s:?} does not end in a node id (1..2^32)")),
        },
    }
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "--name {name:?}: use 1 to {MAX_NAME_LEN} letters, digits, '-', '_' or '.'"
        ))
    }
}

/// Resolves `host:port` to the socket address to listen on.
pub fn listen_addr(addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("{addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr}: resolves to no address"))
}

fn client_listen(
    host: &str,
    port: Option<u16>,
    file: Option<SocketAddr>,
) -> Result<SocketAddr, String> {
    match (port, file) {
        (Some(p), _) => {
            listen_addr(&format!("{host}:{p}")).map_err(|e| format!("--host/--port: {e}"))
        }
        (None, Some(a)) => Ok(a),
        (None, None) => listen_addr(&format!("{host}:{DEFAULT_CLIENT_PORT}"))
            .map_err(|e| format!("--host: {e}")),
    }
}

/// Keel's timing: a 50 ms tick, a heartbeat every tick, an election after 6 ticks of silence
/// (randomized to 300..600 ms). A follower gives up on a silent leader within that window, so
/// a kill -9 of the leader costs a median of about 370 ms of write unavailability
/// (bench/failover.sh), against about 1.2 s at etcd's 100 ms heartbeat and 1 s election
/// timeout. Six heartbeats per timeout leave room for late ones: under 256-client put loads and
/// a 1M-key fill with its snapshots, no member started an election (docs/BENCHMARKS.md). A
/// disk whose fsyncs stall for hundreds of ms (the Raft thread syncs, so its heartbeats wait)
/// or a slower network wants etcd's timing: `--tick-ms 100 --election-ticks 10`.
pub const DEFAULT_TICK_MS: u64 = 50;
pub const DEFAULT_ELECTION_TICKS: usize = 6;
pub const DEFAULT_HEARTBEAT_TICKS: usize = 1;
/// Resolves flags and an optional file into a plan, or says which flag or field is wrong.
pub fn resolve(args: &ServeArgs, file: Option<&FileConfig>) -> Result<Plan, String> {
    let dynamic = args.join_addr.is_some() || args.bootstrap_expect.is_some();
    if args.join_addr.is_some() && args.bootstrap_expect.is_some() {
        return Err(
            "--join-addr and --bootstrap-expect exclude each other: the node that \
                    waits is given --bootstrap-expect, the others --join-addr"
                .into(),
        );
    }
    if dynamic && (args.cluster.is_some() || args.join) {
        return Err(
            "--cluster and --join give a fixed membership; --join-addr and --bootstrap-expect \
             build it at start: use one or the other"
                .into(),
        );
    }
    if args.cluster.is_some() && file.is_some_and(|f| !f.nodes.is_empty()) {
        return Err("both --cluster and the config file's Nodes list the members; keep one".into());
    }

    let mut peers = BTreeMap::new();
    let mut client_from_file = None;
    let mut id = args.id.map(|i| check_id(i, "--id")).transpose()?;
    if let Some(f) = file {
        if id.is_none() {
            id = f.id.as_ref().map(|r| file_id(r, "ID")).transpose()?;
        }
        for (i, n) in f.nodes.iter().enumerate() {
            let nid = file_id(&n.id, &format!("Nodes[{i}].ID"))?;
            let addr = peer_addr(&n.endpoint).map_err(|e| format!("Nodes[{i}].Endpoint: {e}"))?;
            if peers.insert(nid, addr).is_some() {
                return Err(format!("Nodes[{i}].ID: node {nid} is listed twice"));
            }
            if Some(nid) == id {
                if let Some(c) = &n.client {
                    client_from_file = Some(
                        peer_addr(c)
                            .and_then(|a| listen_addr(&a))
                            .map_err(|e| format!("Nodes[{i}].Client: {e}"))?,
                    );
                }
            }
        }
    }
    if let Some(c) = &args.cluster {
        for (i, url) in c.split(',').enumerate() {
            let addr = peer_addr(url).map_err(|e| format!("--cluster: {e}"))?;
            peers.insert(i as u64 + 1, addr);
        }
    }
    let has_cluster = !peers.is_empty();
    if dynamic && has_cluster {
        return Err(
            "the config file lists the members; --join-addr and --bootstrap-expect find them \
             at start: use one or the other"
                .into(),
        );
    }
    // Reverse lookups must agree with forward ones: two ids on one address would be two
    // members a peer connection cannot tell apart.
    let mut seen = BTreeMap::new();
    for (nid, addr) in &peers {
        if let Some(other) = seen.insert(addr.clone(), *nid) {
            return Err(format!(
                "nodes {other} and {nid} have the same peer address {addr}"
            ));
        }
    }

    let no_cluster_flags = !has_cluster && !dynamic && file.is_none();
    let (mode, peer_addr_own) = if dynamic {
        let url = args
            .peer_url
            .as_deref()
            .ok_or("--join-addr and --bootstrap-expect need --peer-url (this node's peer URL)")?;
        let own = peer_addr(url).map_err(|e| format!("--peer-url: {e}"))?;
        let mode = match (&args.join_addr, args.bootstrap_expect) {
            (Some(a), _) => Mode::JoinAddr(a.clone()),
            (None, Some(n)) if n >= 1 => Mode::BootstrapExpect(n),
            _ => return Err("--bootstrap-expect must be at least 1".into()),
        };
        if matches!(mode, Mode::BootstrapExpect(_)) && id.is_none() {
            id = Some(args.name.as_deref().and_then(id_from_name).unwrap_or(1));
        }
        (mode, own)
    } else {
        if !has_cluster {
            // No membership given: a single-node cluster, as raftexample's defaults.
            let url = args.peer_url.as_deref().unwrap_or(DEFAULT_PEER_URL);
            let own = peer_addr(url).map_err(|e| format!("--peer-url: {e}"))?;
            let me = id.unwrap_or(1);
            peers.insert(me, own);
            id = Some(me);
        }
        let me = match id {
            Some(i) => i,
            None if peers.len() == 1 => *peers.keys().next().expect("one peer"),
            None => return Err("--id is required with a cluster of several nodes".into()),
        };
        let own = peers.get(&me).cloned().ok_or_else(|| {
            let known: Vec<String> = peers.keys().map(u64::to_string).collect();
            format!(
                "node {me} is not in the cluster (members: {}); with --cluster, --id is the \
                 position of this node's own URL, counting from 1",
                known.join(", ")
            )
        })?;
        if let Some(url) = &args.peer_url {
            let given = peer_addr(url).map_err(|e| format!("--peer-url: {e}"))?;
            if given != own {
                return Err(format!(
                    "--peer-url {given} differs from node {me}'s address {own} in the cluster"
                ));
            }
        }
        id = Some(me);
        (Mode::Static { join: args.join }, own)
    };

    let name = match (&args.name, id) {
        (Some(n), _) => n.clone(),
        (None, Some(i)) => format!("node-{i}"),
        (None, None) => {
            return Err(
                "--join-addr needs --id or --name (the id is the name's trailing digits, or \
                 the next free one)"
                    .into(),
            )
        }
    };
    check_name(&name)?;

    let client_addr = match (&args.listen_client_urls, args.port, client_from_file) {
        (Some(url), _, _) => {
            if url.contains(',') {
                return Err("--listen-client-urls: Keel listens on one client URL".into());
            }
            peer_addr(url)
                .and_then(|a| listen_addr(&a))
                .map_err(|e| format!("--listen-client-urls: {e}"))?
        }
        (None, port, file) => client_listen(&args.host, port, file)?,
    };

    let pick = |flag: Option<u64>, f: Option<u64>, default: u64| flag.or(f).unwrap_or(default);
    let tick_ms = pick(args.tick_ms, file.and_then(|f| f.tick_ms), DEFAULT_TICK_MS);
    let election_ticks = args
        .election_ticks
        .or(file.and_then(|f| f.election_ticks))
        .unwrap_or(DEFAULT_ELECTION_TICKS);
    let heartbeat_ticks = args
        .heartbeat_ticks
        .or(file.and_then(|f| f.heartbeat_ticks))
        .unwrap_or(DEFAULT_HEARTBEAT_TICKS);
    // etcd's default. Each snapshot writes the whole state (with its uncompacted history), so
    // at 10,000 a node under a steady write load was writing one about every second: puts at
    // 256 clients ran 26% faster with a p99 of 55 rather than 87 ms at 100,000
    // (docs/BENCHMARKS.md). The cost is a longer tail of log to replay at restart.
    let snapshot_count = pick(
        args.snapshot_count,
        file.and_then(|f| f.snapshot_count),
        keel_node::driver::DEFAULT_SNAPSHOT_COUNT,
    );
    let max_request_bytes = args
        .max_request_bytes
        .or(file.and_then(|f| f.max_request_bytes))
        .unwrap_or(keel_kv::DEFAULT_MAX_REQUEST_BYTES);
    if tick_ms == 0 || tick_ms > 60_000 {
        return Err(format!("--tick-ms {tick_ms}: must be in 1..=60000"));
    }
    if heartbeat_ticks == 0 || election_ticks <= heartbeat_ticks {
        return Err(format!(
            "--election-ticks {election_ticks} must be above --heartbeat-ticks {heartbeat_ticks}, \
             which must be at least 1"
        ));
    }
    if snapshot_count == 0 {
        return Err("--snapshot-count must be at least 1".into());
    }
    // Below this even an empty write does not fit; above it, one entry is more than a peer
    // message may carry (the transport's frame limit is 16 MiB, and an append carries
    // more than one entry).
    if !(64..=8 << 20).contains(&max_request_bytes) {
        return Err(format!(
            "--max-request-bytes {max_request_bytes}: must be in 64..={}",
            8 << 20
        ));
    }
    let max_txn_ops = args
        .max_txn_ops
        .or(file.and_then(|f| f.max_txn_ops))
        .unwrap_or(keel_kv::DEFAULT_MAX_TXN_OPS);
    // etcd's own floor: a txn must be able to hold at least a few operations, and a ceiling
    // keeps one txn's apply (a single Raft entry) short.
    if !(1..=1_000_000).contains(&max_txn_ops) {
        return Err(format!(
            "--max-txn-ops {max_txn_ops}: must be in 1..=1000000"
        ));
    }
    let auto_compaction =
        auto_compaction(&args.auto_compaction_mode, &args.auto_compaction_retention)?;
    let cluster_token = args
        .cluster_token
        .clone()
        .or_else(|| file.and_then(|f| f.cluster_token.clone()))
        .unwrap_or_else(|| DEFAULT_CLUSTER_TOKEN.to_string());
    if cluster_token.is_empty() || cluster_token.len() > 256 {
        return Err("--cluster-token: 1 to 256 bytes".into());
    }
    let data_dir = args
        .data_dir
        .clone()
        .or_else(|| file.and_then(|f| f.data_dir.clone()))
        .unwrap_or_else(|| {
            if no_cluster_flags {
                PathBuf::from("keel-data")
            } else {
                PathBuf::from(format!("keel-{name}"))
            }
        });
    // A floor so that a typo cannot make every stream notify continuously; a day is far
    // beyond any use of notifications.
    let progress = args.watch_progress_notify_interval;
    if progress < Duration::from_millis(100) || progress > Duration::from_secs(86_400) {
        return Err("--experimental-watch-progress-notify-interval: must be in 100ms..=24h".into());
    }
    if args.join_timeout.is_zero() {
        return Err("--join-timeout must be positive".into());
    }
    Ok(Plan {
        id,
        name,
        mode,
        peers,
        peer_addr: peer_addr_own,
        client_addr,
        data_dir,
        cluster_token,
        join_timeout: args.join_timeout,
        tick: Duration::from_millis(tick_ms),
        election_ticks,
        heartbeat_ticks,
        snapshot_count,
        max_request_bytes,
        max_txn_ops,
        auto_compaction,
        watch_progress_notify_interval: progress,
    })
}

/// etcd's `--auto-compaction-mode` and `--auto-compaction-retention`; `None` keeps all history.
pub fn auto_compaction(mode: &str, retention: &str) -> Result<Option<AutoCompaction>, String> {
    let r = retention.trim();
    if r == "0" || r.is_empty() {
        return Ok(None);
    }
    let bad = |why: &str| format!("--auto-compaction-retention {r:?}: {why}");
    match mode {
        "periodic" => {
            // A bare number is hours, as etcd reads it.
            let d = match r.parse::<u64>() {
                Ok(h) => Duration::from_secs(h.saturating_mul(3600)),
                Err(_) => parse_duration(r).map_err(|e| bad(&e))?,
            };
            if d < Duration::from_secs(1) {
                return Err(bad("must be at least 1s"));
            }
            Ok(Some(AutoCompaction::Periodic(d)))
        }
        "revision" => match r.parse::<i64>() {
            Ok(n) if n > 0 => Ok(Some(AutoCompaction::Revision(n))),
            _ => Err(bad("a positive number of revisions")),
        },
        other => Err(format!(
            "--auto-compaction-mode {other:?}: periodic or revision"
        )),
    }
}

/// The cluster id for a token: FNV-1a, never 0 (0 means "unknown" on the wire).
pub fn cluster_id(token: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in b"keel-cluster/".iter().chain(token.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: ServeArgs,
    }

    fn args(list: &[&str]) -> ServeArgs {
        let mut v = vec!["keel"];
        v.extend_from_slice(list);
        T::try_parse_from(v).unwrap().a
    }

    #[test]
    fn no_flags_is_a_single_node_on_loopback() {
        let p = resolve(&args(&[]), None).unwrap();
        assert_eq!(p.id, Some(1));
        assert_eq!(p.mode, Mode::Static { join: false });
        assert_eq!(p.peer_addr, "127.0.0.1:2380");
        assert_eq!(p.client_addr, "127.0.0.1:2379".parse().unwrap());
        assert_eq!(p.data_dir, PathBuf::from("keel-data"));
        assert_eq!(p.peers.len(), 1);
    }

    #[test]
    fn raftexample_flags() {
        let p = resolve(
            &args(&[
                "--id",
                "2",
                "--cluster",
                "http://127.0.0.1:12379,http://127.0.0.1:22379,http://127.0.0.1:32379",
                "--port",
                "22380",
            ]),
            None,
        )
        .unwrap();
        assert_eq!(p.id, Some(2));
        assert_eq!(p.peer_addr, "127.0.0.1:22379");
        assert_eq!(p.client_addr.port(), 22380);
        assert_eq!(p.peers.len(), 3);
        assert_eq!(p.peers[&3], "127.0.0.1:32379");
        assert_eq!(p.data_dir, PathBuf::from("keel-node-2"));
        let j = resolve(
            &args(&["--id", "1", "--cluster", "127.0.0.1:1", "--join"]),
            None,
        )
        .unwrap();
        assert_eq!(j.mode, Mode::Static { join: true });
    }

    #[test]
    fn watch_progress_interval_is_etcds_and_bounded() {
        let p = resolve(&args(&[]), None).unwrap();
        assert_eq!(p.watch_progress_notify_interval, Duration::from_secs(600));
        let flag = "--experimental-watch-progress-notify-interval";
        let p = resolve(&args(&[flag, "300ms"]), None).unwrap();
        assert_eq!(p.watch_progress_notify_interval, Duration::from_millis(300));
        for bad in ["10ms", "48h"] {
            let e = resolve(&args(&[flag, bad]), None).unwrap_err();
            assert!(e.contains("100ms..=24h"), "{e}");
        }
    }

    #[test]
    fn id_outside_the_cluster_is_refused() {
        let e = resolve(&args(&["--id", "4", "--cluster", "a:1,b:2,c:3"]), None).unwrap_err();
        assert!(e.contains("node 4 is not in the cluster"), "{e}");
        let e = resolve(&args(&["--cluster", "a:1,b:2"]), None).unwrap_err();
        assert!(e.contains("--id is required"), "{e}");
        let e = resolve(&args(&["--id", "0"]), None).unwrap_err();
        assert!(e.contains("not in 1..2^32"), "{e}");
        let e = resolve(&args(&["--id", "1", "--cluster", "a:1,a:1"]), None).unwrap_err();
        assert!(e.contains("same peer address"), "{e}");
        let e = resolve(&args(&["--id", "1", "--cluster", "a:0"]), None).unwrap_err();
        assert!(e.contains("--cluster"), "{e}");
    }

    #[test]
    fn the_reference_json_shape_is_accepted() {
        let text = r#"{"ID": "node-02", "Nodes": [
            {"ID": "node-01", "Endpoint": "127.0.0.1:3331"},
            {"ID": "node-02", "Endpoint": "127.0.0.1:3332", "Client": "127.0.0.1:4332"},
            {"ID": "node-03", "Endpoint": "localhost:3333"}]}"#;
        let f = parse_file(text, "json").unwrap();
        let p = resolve(&args(&[]), Some(&f)).unwrap();
        assert_eq!(p.id, Some(2));
        assert_eq!(p.name, "node-2");
        assert_eq!(p.peer_addr, "127.0.0.1:3332");
        assert_eq!(p.client_addr, "127.0.0.1:4332".parse().unwrap());
        assert_eq!(p.peers.len(), 3);
        // A flag wins over the file.
        let p = resolve(&args(&["--port", "5000"]), Some(&f)).unwrap();
        assert_eq!(p.client_addr.port(), 5000);
    }

    #[test]
    fn toml_config_with_settings() {
        let text = r#"
            id = 1
            snapshot_count = 50
            tick_ms = 20
            [[nodes]]
            id = 1
            endpoint = "127.0.0.1:7001"
        "#;
        let f = parse_file(text, "toml").unwrap();
        let p = resolve(&args(&[]), Some(&f)).unwrap();
        assert_eq!(p.snapshot_count, 50);
        assert_eq!(p.tick, Duration::from_millis(20));
        assert_eq!(p.peer_addr, "127.0.0.1:7001");
    }

    #[test]
    fn bad_config_files_name_the_field() {
        let e = parse_file(
            r#"{"ID": "n1", "Nodes": [{"ID": "n1", "Endpont": "x:1"}]}"#,
            "json",
        )
        .unwrap_err();
        assert!(e.contains("Nodes[0]") && e.contains("Endpont"), "{e}");
        let f = parse_file(
            r#"{"ID": "n1", "Nodes": [{"ID": "nx", "Endpoint": "x:1"}]}"#,
            "json",
        )
        .unwrap();
        let e = resolve(&args(&[]), Some(&f)).unwrap_err();
        assert!(e.starts_with("Nodes[0].ID"), "{e}");
        let f = parse_file(
            r#"{"ID": 1, "Nodes": [{"ID": 1, "Endpoint": "x"}]}"#,
            "json",
        )
        .unwrap();
        let e = resolve(&args(&[]), Some(&f)).unwrap_err();
        assert!(e.starts_with("Nodes[0].Endpoint"), "{e}");
        let e = parse_file("{", "json").unwrap_err();
        assert!(e.contains("EOF"), "{e}");
        let e = parse_file("id = ", "toml").unwrap_err();
        assert!(!e.is_empty());
        let e = parse_file("{}", "yaml").unwrap_err();
        assert!(e.contains(".json or .toml"), "{e}");
        let e = parse_file(r#"{"snapshot_count": "many"}"#, "json").unwrap_err();
        assert!(e.contains("snapshot_count"), "{e}");
    }

    #[test]
    fn dynamic_membership_flags() {
        let p = resolve(
            &args(&[
                "--name",
                "server3",
                "--join-addr",
                "127.0.0.1:2379",
                "--peer-url",
                "127.0.0.1:3003",
            ]),
            None,
        )
        .unwrap();
        assert_eq!(p.mode, Mode::JoinAddr("127.0.0.1:2379".into()));
        assert_eq!(p.id, None);
        assert_eq!(p.data_dir, PathBuf::from("keel-server3"));
        let e = resolve(&args(&["--join-addr", "a:1"]), None).unwrap_err();
        assert!(e.contains("--peer-url"), "{e}");
        let e = resolve(&args(&["--join-addr", "a:1", "--peer-url", "b:2"]), None).unwrap_err();
        assert!(e.contains("--id or --name"), "{e}");
        let p = resolve(
            &args(&["--bootstrap-expect", "3", "--peer-url", "127.0.0.1:3001"]),
            None,
        )
        .unwrap();
        assert_eq!(p.mode, Mode::BootstrapExpect(3));
        assert_eq!(p.id, Some(1));
        let e = resolve(
            &args(&[
                "--bootstrap-expect",
                "3",
                "--join-addr",
                "a:1",
                "--peer-url",
                "b:2",
            ]),
            None,
        )
        .unwrap_err();
        assert!(e.contains("exclude each other"), "{e}");
        let e = resolve(
            &args(&[
                "--cluster",
                "a:1",
                "--join-addr",
                "a:1",
                "--peer-url",
                "b:2",
            ]),
            None,
        )
        .unwrap_err();
        assert!(e.contains("one or the other"), "{e}");
    }

    #[test]
    fn settings_are_checked() {
        for bad in [
            &["--tick-ms", "0"][..],
            &["--election-ticks", "1", "--heartbeat-ticks", "1"],
            &["--snapshot-count", "0"],
            &["--max-request-bytes", "10"],
            &["--name", "a b"],
            &["--cluster-token", ""],
        ] {
            assert!(resolve(&args(bad), None).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn auto_compaction_reads_etcds_flags() {
        assert_eq!(auto_compaction("periodic", "0"), Ok(None));
        assert_eq!(
            auto_compaction("periodic", "2"),
            Ok(Some(AutoCompaction::Periodic(Duration::from_secs(7200))))
        );
        assert_eq!(
            auto_compaction("periodic", "30m"),
            Ok(Some(AutoCompaction::Periodic(Duration::from_secs(1800))))
        );
        assert_eq!(
            auto_compaction("revision", "1000"),
            Ok(Some(AutoCompaction::Revision(1000)))
        );
        assert!(auto_compaction("revision", "-5").is_err());
        assert!(auto_compaction("periodic", "soon").is_err());
        assert!(auto_compaction("periodic", "10ms").is_err());
    }

    #[test]
    fn names_and_tokens() {
        assert_eq!(id_from_name("node-03"), Some(3));
        assert_eq!(id_from_name("server"), None);
        assert_eq!(id_from_name("n0"), None);
        assert_ne!(cluster_id("a"), cluster_id("b"));
        assert_eq!(cluster_id("a"), cluster_id("a"));
    }
}
