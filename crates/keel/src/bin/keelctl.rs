//! `keelctl`: the command-line client for a Keel cluster.

// Under keelctl/ rather than beside this file, where Cargo would take it for a binary.
#[path = "keelctl/histogram.rs"]
mod histogram;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io::{Read, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use keel::client::{
    parse_duration, Client, ClientOptions, Error, HashInfo, Member, RangeResponse, Status,
    DEFAULT_ENDPOINT,
};
use keel_etcdpb::etcdserverpb as etcdpb;
use keel_etcdpb::etcdserverpb::kv_client::KvClient;
use keel_etcdpb::etcdserverpb::watch_client::WatchClient;
use serde_json::json;
use tonic::transport::Channel;

use crate::histogram::{nearest_rank, Histogram};

#[derive(Parser, Debug)]
#[command(
    name = "keelctl",
    version,
    about = "Command-line client for a Keel cluster",
    after_help = "Any member answers any request: writes sent to a follower are forwarded to the leader."
)]
struct Cli {
    /// Client addresses of members (host:port or http://host:port), tried in order while
    /// they cannot be connected to.
    #[arg(
        long,
        global = true,
        env = "KEELCTL_ENDPOINTS",
        value_delimiter = ',',
        default_value = DEFAULT_ENDPOINT
    )]
    endpoints: Vec<String>,

    /// Print JSON instead of human-readable text.
    #[arg(long, global = true)]
    json: bool,

    /// Deadline for each request.
    #[arg(long, global = true, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,

    /// Retry transient failures (no leader, overloaded, timeout, unreachable) for up to this
    /// long. A retried write may be applied twice.
    #[arg(long, global = true, value_parser = parse_duration)]
    retry_for: Option<Duration>,

    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Write a key; the value comes from the argument or, when absent, from stdin.
    Put { key: String, value: Option<String> },
    /// Read a key (linearizable unless --serializable).
    Get {
        key: String,
        /// Every key starting with KEY.
        #[arg(long)]
        prefix: bool,
        /// Read the answering member's local state (may be stale).
        #[arg(long)]
        serializable: bool,
    },
    /// Delete a key.
    Del {
        key: String,
        /// Every key starting with KEY.
        #[arg(long)]
        prefix: bool,
    },
    /// List or change the membership.
    Members {
        #[command(subcommand)]
        cmd: Option<MembersCmd>,
    },
    /// Raft status of a member (of every endpoint with --all).
    Status {
        #[arg(long)]
        all: bool,
    },
    /// The current leader.
    Leader,
    /// Transfer leadership (to the most caught-up voter unless --to).
    Transfer {
        #[arg(long)]
        to: Option<u64>,
    },
    /// Compare the state machine hash of every endpoint at the leader's revision.
    Check {
        /// How long to wait for members that have not applied the leader's revision yet.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        wait: Duration,
    },
    /// Load generator: throughput and latency of puts, gets, compare-and-sets, or of puts
    /// delivered to many watchers.
    Bench {
        #[command(subcommand)]
        cmd: BenchCmd,
    },
}

#[derive(Subcommand, Debug)]
enum MembersCmd {
    /// List the members.
    List,
    /// Add a voter.
    Add {
        /// The new member's peer address.
        peer_url: String,
        /// Its id (default: the largest member id + 1).
        #[arg(long)]
        id: Option<u64>,
    },
    /// Add a learner (a non-voting member that receives the log).
    AddLearner {
        peer_url: String,
        #[arg(long)]
        id: Option<u64>,
    },
    /// Promote a learner to a voter.
    Promote { id: u64 },
    /// Remove a member.
    Remove { id: u64 },
}

#[derive(Subcommand, Debug)]
enum BenchCmd {
    /// Concurrent puts of random keys.
    Put(BenchArgs),
    /// Concurrent gets of random keys (written first).
    Get(BenchArgs),
    /// Concurrent compare-and-set of random keys (written first): a serializable read of the
    /// key's mod revision, then a txn that puts only if it is unchanged. Each attempt counts as
    /// one op, won or lost. etcd's gRPC API only (--protocol grpc).
    Cas(BenchArgs),
    /// Watch fan-out: --clients writers (default 1) put random keys under `bench/` as fast as
    /// they can, after --watchers watches of that prefix are all created; reports writes/s,
    /// events delivered per second over all watchers, the lag from a put's send to each
    /// watcher's receipt of its event, and events missed. Watchers share one Watch stream per
    /// gRPC connection (--conns), as etcd's clientv3 multiplexes the watches of one client on
    /// one stream. etcd's gRPC API only (--protocol grpc).
    Watch(WatchArgs),
}

#[derive(Args, Debug, Clone)]
struct WatchArgs {
    #[command(flatten)]
    load: BenchArgs,
    /// Watches of the whole key prefix, spread round-robin over the connections' streams.
    #[arg(long, default_value_t = 1000)]
    watchers: usize,
}

#[derive(Args, Debug, Clone)]
struct BenchArgs {
    /// Concurrent clients, spread over the endpoints.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Bytes per value.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Size of the key space.
    #[arg(long, default_value_t = 1000)]
    keys: u64,
    /// Gets read the answering member's local state instead of going through ReadIndex.
    #[arg(long)]
    serializable: bool,
    /// Gets: do not write every key first (a previous run filled the key space).
    #[arg(long)]
    skip_fill: bool,
    /// The API the load goes through: Keel's HTTP/JSON API, or the etcd v3 gRPC API (which
    /// etcd serves too, so the same load can be run against both).
    #[arg(long, value_enum, default_value_t = BenchProtocol::Http)]
    protocol: BenchProtocol,
    /// gRPC connections, shared by the clients round-robin (HTTP uses one per client). etcd's
    /// own benchmark tool defaults to 1; more spreads the load over server threads.
    #[arg(long, default_value_t = 16)]
    conns: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BenchProtocol {
    Http,
    Grpc,
}

/// What one bench client sends its requests through.
#[derive(Clone)]
enum BenchClient {
    Http(Arc<Client>),
    Grpc(KvClient<Channel>),
}

impl BenchClient {
    async fn put(&mut self, key: &str, value: bytes::Bytes) -> Result<(), String> {
        match self {
            BenchClient::Http(c) => c
                .put(key, value)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            BenchClient::Grpc(c) => c
                .put(etcdpb::PutRequest {
                    key: bytes::Bytes::copy_from_slice(key.as_bytes()),
                    value,
                    ..Default::default()
                })
                .await
                .map(|_| ())
                .map_err(|s| s.message().to_string()),
        }
    }

    /// One compare-and-set attempt (gRPC only; `bench` refuses it over HTTP before starting).
    async fn cas(&mut self, key: &str, value: bytes::Bytes) -> Result<(), String> {
        let BenchClient::Grpc(c) = self else {
            return Err("cas needs --protocol grpc".into());
        };
        let k = bytes::Bytes::copy_from_slice(key.as_bytes());
        let read = c
            .range(etcdpb::RangeRequest {
                key: k.clone(),
                serializable: true,
                ..Default::default()
            })
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        let seen = read.kvs.first().map_or(0, |kv| kv.mod_revision);
        let txn = etcdpb::TxnRequest {
            compare: vec![etcdpb::Compare {
                result: etcdpb::compare::CompareResult::Equal as i32,
                target: etcdpb::compare::CompareTarget::Mod as i32,
                key: k.clone(),
                range_end: bytes::Bytes::new(),
                target_union: Some(etcdpb::compare::TargetUnion::ModRevision(seen)),
            }],
            success: vec![etcdpb::RequestOp {
                request: Some(etcdpb::request_op::Request::RequestPut(
                    etcdpb::PutRequest {
                        key: k,
                        value,
                        ..Default::default()
                    },
                )),
            }],
            failure: Vec::new(),
        };
        c.txn(txn)
            .await
            .map(|_| ())
            .map_err(|s| s.message().to_string())
    }

    async fn get(&mut self, key: &str, serializable: bool) -> Result<(), String> {
        match self {
            BenchClient::Http(c) => c
                .get(key, false, serializable)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            BenchClient::Grpc(c) => c
                .range(etcdpb::RangeRequest {
                    key: bytes::Bytes::copy_from_slice(key.as_bytes()),
                    serializable,
                    ..Default::default()
                })
                .await
                .map(|_| ())
                .map_err(|s| s.message().to_string()),
        }
    }
}

/// `conns` gRPC channels spread over the endpoints, connected before the clock starts.
async fn grpc_channels(endpoints: &[String], conns: usize) -> Result<Vec<Channel>, Error> {
    let mut out = Vec::new();
    for i in 0..conns.max(1) {
        let url = &endpoints[i % endpoints.len()];
        let ch = tonic::transport::Endpoint::from_shared(url.clone())
            .map_err(|e| Error::Usage(format!("endpoint {url}: {e}")))?
            .connect_with_connector(tower::service_fn(coalesced_connect))
            .await
            .map_err(|e| Error::Usage(format!("connecting to {url}: {e}")))?;
        out.push(ch);
    }
    Ok(out)
}

/// A bench channel's connection. Its writes are coalesced as the server's are: the load
/// generator shares the cores with the servers it measures, and with one write per request
/// (h2 writes each as soon as its stream is ready) it spent a third of its CPU in `writev`.
async fn coalesced_connect(
    uri: tonic::transport::Uri,
) -> std::io::Result<hyper_util::rt::TokioIo<keel_api::CoalescedWrites<tokio::net::TcpStream>>> {
    // An IPv6 host comes bracketed in a URI, and unbracketed to the resolver.
    let host = uri
        .host()
        .unwrap_or("127.0.0.1")
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(80);
    let tcp = tokio::net::TcpStream::connect((host, port)).await?;
    // Requests are small and latency-bound; Nagle would hold them back.
    tcp.set_nodelay(true)?;
    Ok(hyper_util::rt::TokioIo::new(
        keel_api::CoalescedWrites::new(tcp),
    ))
}

/// What a command produced: text for people, JSON for programs, and whether it succeeded.
struct Output {
    text: String,
    json: serde_json::Value,
    ok: bool,
}

impl Output {
    fn ok(text: impl Into<String>, json: serde_json::Value) -> Output {
        Output {
            text: text.into(),
            json,
            ok: true,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json = cli.json;
    match rt.block_on(run(cli)) {
        Ok(out) => {
            let mut stdout = std::io::stdout().lock();
            // A closed pipe (keelctl ... | head) is not worth a panic.
            let _ = if json {
                writeln!(
                    stdout,
                    "{}",
                    serde_json::to_string_pretty(&out.json).expect("values serialize")
                )
            } else if out.text.is_empty() {
                Ok(())
            } else if out.text.ends_with('\n') {
                write!(stdout, "{}", out.text)
            } else {
                writeln!(stdout, "{}", out.text)
            };
            if out.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            if json {
                let v = match &e {
                    Error::Server {
                        endpoint,
                        status,
                        code,
                        message,
                    } => {
                        json!({"error": message, "code": code, "status": status, "endpoint": endpoint})
                    }
                    other => json!({"error": other.to_string()}),
                };
                eprintln!("{v}");
            } else {
                eprintln!("Error: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Runs `op` until it succeeds, fails for good, or `retry_for` has passed.
async fn retrying<T, F, Fut>(retry_for: Option<Duration>, mut op: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    let deadline = retry_for.map(|d| Instant::now() + d);
    let mut pause = Duration::from_millis(5);
    loop {
        match op().await {
            Err(e) if e.is_transient() && deadline.is_some_and(|d| Instant::now() + pause < d) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            r => return r,
        }
    }
}

async fn run(cli: Cli) -> Result<Output, Error> {
    let opts = ClientOptions {
        timeout: cli.timeout,
        ..ClientOptions::default()
    };
    let retry = cli.retry_for;
    match cli.cmd {
        Cmd::Bench { cmd } => {
            let (op, args) = match cmd {
                BenchCmd::Put(a) => (BenchOp::Put, a),
                BenchCmd::Get(a) => (BenchOp::Get, a),
                BenchCmd::Cas(a) => (BenchOp::Cas, a),
                BenchCmd::Watch(a) => (
                    BenchOp::Watch {
                        watchers: a.watchers,
                    },
                    a.load,
                ),
            };
            bench(&cli.endpoints, opts, op, args).await
        }
        cmd => {
            let client = Client::new(&cli.endpoints, &opts)?;
            run_cmd(&client, retry, cmd).await
        }
    }
}

async fn run_cmd(client: &Client, retry: Option<Duration>, cmd: Cmd) -> Result<Output, Error> {
    match cmd {
        Cmd::Put { key, value } => {
            let value = match value {
                Some(v) => v.into_bytes(),
                None => {
                    let mut buf = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut buf)
                        .map_err(|e| Error::Usage(format!("reading the value from stdin: {e}")))?;
                    buf
                }
            };
            let value = bytes::Bytes::from(value);
            let r = retrying(retry, || client.put(&key, value.clone())).await?;
            Ok(Output::ok(
                format!("OK (revision {})", r.revision),
                json!({"revision": r.revision}),
            ))
        }
        Cmd::Get {
            key,
            prefix,
            serializable,
        } => {
            let r = retrying(retry, || client.get(&key, prefix, serializable)).await?;
            Ok(Output::ok(
                render_range(&r, prefix),
                serde_json::to_value(&r).expect("serializes"),
            ))
        }
        Cmd::Del { key, prefix } => {
            let r = retrying(retry, || client.delete(&key, prefix)).await?;
            Ok(Output::ok(
                format!("deleted {} (revision {})", r.deleted, r.revision),
                json!({"deleted": r.deleted, "revision": r.revision}),
            ))
        }
        Cmd::Members { cmd } => members(client, retry, cmd.unwrap_or(MembersCmd::List)).await,
        Cmd::Status { all: false } => {
            let s = retrying(retry, || client.status()).await?;
            Ok(Output::ok(
                render_status(&s),
                serde_json::to_value(&s).expect("serializes"),
            ))
        }
        Cmd::Status { all: true } => status_all(client).await,
        Cmd::Leader => {
            let m = retrying(retry, || client.members()).await?;
            if m.leader == 0 {
                return Err(Error::Server {
                    endpoint: String::new(),
                    status: 503,
                    code: Some("no_leader".into()),
                    message: "no leader is known".into(),
                });
            }
            let peer = m
                .members
                .iter()
                .find(|x| x.id == m.leader)
                .and_then(|x| x.peer_url.clone());
            let text = match &peer {
                Some(p) => format!("{} (peer {p})", m.leader),
                None => m.leader.to_string(),
            };
            Ok(Output::ok(
                text,
                json!({"leader": m.leader, "peer_url": peer}),
            ))
        }
        Cmd::Transfer { to } => {
            // Only the leader can hand its role over; the endpoint that answers first may be a
            // follower, so send the request to whichever endpoint is the leader.
            let leader = leader_endpoint(client).await?;
            let r = retrying(retry, || leader.transfer_leader(to)).await?;
            Ok(Output::ok(
                format!("leader is now {}", r.leader),
                json!({"leader": r.leader}),
            ))
        }
        Cmd::Check { wait } => check(client, wait).await,
        Cmd::Bench { .. } => unreachable!("handled by run"),
    }
}

/// A client for the endpoint that is the leader, found by asking each endpoint who it is.
async fn leader_endpoint(client: &Client) -> Result<Client, Error> {
    let mut leader = 0;
    for e in client.endpoints() {
        let c = client.with_endpoint(e)?;
        let Ok(st) = c.status().await else { continue };
        if st.leader != 0 && st.id == st.leader {
            return Ok(c);
        }
        leader = leader.max(st.leader);
    }
    Err(Error::Usage(if leader == 0 {
        "no endpoint knows a leader; retry once one is elected".to_string()
    } else {
        format!("the leader (node {leader}) is not among --endpoints; add its client address")
    }))
}

fn render_range(r: &RangeResponse, prefix: bool) -> String {
    if !prefix {
        // A single key prints its bare value, so `keelctl get k` composes in scripts.
        return r.kvs.first().map(|kv| kv.value.clone()).unwrap_or_default();
    }
    let mut s = String::new();
    for kv in &r.kvs {
        s.push_str(&kv.key);
        s.push('\n');
        s.push_str(&kv.value);
        s.push('\n');
    }
    s
}

fn render_members(leader: u64, members: &[Member]) -> String {
    let mut rows = vec![[
        "ID".to_string(),
        "ROLE".to_string(),
        "PEER URL".to_string(),
        "MATCH".to_string(),
        "LAG".to_string(),
    ]];
    for m in members {
        let role = match (m.id == leader, m.learner) {
            (true, _) => "leader",
            (false, true) => "learner",
            (false, false) => "voter",
        };
        rows.push([
            m.id.to_string(),
            role.to_string(),
            m.peer_url.clone().unwrap_or_else(|| "-".into()),
            m.matched.to_string(),
            m.lag.to_string(),
        ]);
    }
    table(&rows)
}

/// Left-aligned columns separated by two spaces.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut s = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == N {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.push_str(line.trim_end());
        s.push('\n');
    }
    s
}

async fn members(
    client: &Client,
    retry: Option<Duration>,
    cmd: MembersCmd,
) -> Result<Output, Error> {
    let list = |members: Vec<Member>, leader: u64, extra: serde_json::Value, head: String| {
        let mut json = json!({"members": members});
        if leader != 0 {
            json["leader"] = json!(leader);
        }
        if let (Some(obj), Some(extra)) = (json.as_object_mut(), extra.as_object()) {
            obj.extend(extra.clone());
        }
        let mut text = head;
        text.push_str(&render_members(leader, &members));
        Output::ok(text, json)
    };
    match cmd {
        MembersCmd::List => {
            let m = retrying(retry, || client.members()).await?;
            Ok(list(m.members, m.leader, json!({}), String::new()))
        }
        MembersCmd::Add { peer_url, id } | MembersCmd::AddLearner { peer_url, id }
            if peer_url.is_empty() || id == Some(0) =>
        {
            Err(Error::Usage(
                "the peer URL must not be empty and the id must be non-zero".into(),
            ))
        }
        MembersCmd::Add { peer_url, id } => {
            let r = retrying(retry, || client.add_member(&peer_url, false, id)).await?;
            Ok(list(
                r.members,
                0,
                json!({"id": r.id}),
                format!("added voter {} ({peer_url})\n", r.id),
            ))
        }
        MembersCmd::AddLearner { peer_url, id } => {
            let r = retrying(retry, || client.add_member(&peer_url, true, id)).await?;
            Ok(list(
                r.members,
                0,
                json!({"id": r.id}),
                format!("added learner {} ({peer_url})\n", r.id),
            ))
        }
        MembersCmd::Promote { id } => {
            let r = retrying(retry, || client.promote(id)).await?;
            Ok(list(
                r.members,
                0,
                json!({}),
                format!("promoted {id} to voter\n"),
            ))
        }
        MembersCmd::Remove { id } => {
            let r = retrying(retry, || client.remove_member(id)).await?;
            Ok(list(r.members, 0, json!({}), format!("removed {id}\n")))
        }
    }
}

fn render_status(s: &Status) -> String {
    let members = s
        .members
        .iter()
        .map(|m| {
            if m.learner {
                format!("{} (learner)", m.id)
            } else {
                m.id.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    let mut rows = vec![["id".to_string(), s.id.to_string()]];
    if let Some(n) = &s.name {
        rows.push(["name".into(), n.clone()]);
    }
    rows.extend([
        ["role".into(), s.role.clone()],
        ["term".into(), s.term.to_string()],
        [
            "leader".into(),
            if s.leader == 0 {
                "none".into()
            } else {
                s.leader.to_string()
            },
        ],
        ["commit".into(), s.commit.to_string()],
        ["applied".into(), s.applied.to_string()],
        ["last index".into(), s.last_index.to_string()],
        ["snapshot index".into(), s.snapshot_index.to_string()],
        ["wal bytes".into(), s.wal_bytes.to_string()],
        ["members".into(), members],
    ]);
    let rows: Vec<[String; 2]> = rows
        .into_iter()
        .map(|[k, v]| [format!("{k}:"), v])
        .collect();
    table(&rows)
}

async fn status_all(client: &Client) -> Result<Output, Error> {
    let mut tasks = Vec::new();
    for e in client.endpoints() {
        let c = client.with_endpoint(e)?;
        tasks.push((e.clone(), tokio::spawn(async move { c.status().await })));
    }
    let mut rows = vec![[
        "ENDPOINT",
        "ID",
        "ROLE",
        "TERM",
        "LEADER",
        "COMMIT",
        "APPLIED",
        "SNAPSHOT",
        "WAL BYTES",
    ]
    .map(String::from)];
    let mut json = Vec::new();
    let mut ok = true;
    let mut errors = String::new();
    for (e, t) in tasks {
        match t.await.expect("status task panicked") {
            Ok(s) => {
                rows.push([
                    e.clone(),
                    s.id.to_string(),
                    s.role.clone(),
                    s.term.to_string(),
                    s.leader.to_string(),
                    s.commit.to_string(),
                    s.applied.to_string(),
                    s.snapshot_index.to_string(),
                    s.wal_bytes.to_string(),
                ]);
                json.push(json!({"endpoint": e, "status": s}));
            }
            Err(err) => {
                ok = false;
                errors.push_str(&format!("{e}: {err}\n"));
                json.push(json!({"endpoint": e, "error": err.to_string()}));
            }
        }
    }
    let mut text = table(&rows);
    text.push_str(&errors);
    Ok(Output {
        text,
        json: serde_json::Value::Array(json),
        ok,
    })
}

/// What `check` learnt about one endpoint.
struct Checked {
    endpoint: String,
    result: Result<HashInfo, Error>,
}

async fn check(client: &Client, wait: Duration) -> Result<Output, Error> {
    let deadline = Instant::now() + wait;
    // Who answers at each endpoint, and who they think leads.
    let mut statuses = Vec::new();
    for e in client.endpoints() {
        let c = client.with_endpoint(e)?;
        statuses.push((e.clone(), c.status().await));
    }
    let mut votes: BTreeMap<u64, usize> = BTreeMap::new();
    for (_, s) in &statuses {
        if let Ok(s) = s {
            if s.leader != 0 {
                *votes.entry(s.leader).or_default() += 1;
            }
        }
    }
    let leader = votes
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(id, _)| *id)
        .unwrap_or(0);
    let leader_endpoint = statuses
        .iter()
        .find(|(_, s)| s.as_ref().is_ok_and(|s| s.id == leader))
        .map(|(e, _)| e.clone());

    // The revision every member must reach: the leader's. If the leader is not among the
    // endpoints, the largest revision any endpoint has is the best available stand-in.
    let revision = match &leader_endpoint {
        Some(e) => client.with_endpoint(e)?.hash(None).await?.revision,
        None => {
            let mut best = None;
            for (e, s) in &statuses {
                if s.is_ok() {
                    if let Ok(h) = client.with_endpoint(e)?.hash(None).await {
                        best = best.max(Some(h.revision));
                    }
                }
            }
            best.ok_or_else(|| Error::Unreachable {
                endpoints: client.endpoints().join(","),
                last: "no endpoint answered /v1/hash".into(),
            })?
        }
    };

    let mut tasks = Vec::new();
    let mut seen_ids = BTreeSet::new();
    for (e, s) in statuses {
        if let Ok(st) = &s {
            // The same member listed twice is checked once.
            if !seen_ids.insert(st.id) {
                continue;
            }
        }
        let c = client.with_endpoint(&e)?;
        tasks.push(tokio::spawn(async move {
            let result = hash_at(&c, revision, deadline).await;
            Checked {
                endpoint: e,
                result,
            }
        }));
    }
    let mut checked = Vec::new();
    for t in tasks {
        checked.push(t.await.expect("check task panicked"));
    }

    // Members the endpoints do not cover cannot be checked from here: say so.
    let member_ids: BTreeSet<u64> = match client.members().await {
        Ok(m) => m.members.iter().map(|m| m.id).collect(),
        Err(_) => BTreeSet::new(),
    };
    let unchecked: Vec<u64> = member_ids.difference(&seen_ids).copied().collect();

    let hashes: BTreeSet<u32> = checked
        .iter()
        .filter_map(|c| c.result.as_ref().ok().map(|h| h.hash))
        .collect();
    let failed = checked.iter().filter(|c| c.result.is_err()).count();
    let agree = hashes.len() == 1 && failed == 0;

    let mut text = String::new();
    let mut rows = vec![["ENDPOINT", "ID", "REVISION", "COMPACTED", "HASH"].map(String::from)];
    let mut errors = String::new();
    let mut members_json = Vec::new();
    for c in &checked {
        match &c.result {
            Ok(h) => {
                rows.push([
                    c.endpoint.clone(),
                    h.id.to_string(),
                    h.revision.to_string(),
                    h.compact_revision.to_string(),
                    format!("{:08x}", h.hash),
                ]);
                members_json.push(
                    json!({"endpoint": c.endpoint, "id": h.id, "revision": h.revision,
                    "compact_revision": h.compact_revision, "hash": h.hash}),
                );
            }
            Err(e) => {
                errors.push_str(&format!("{}: {e}\n", c.endpoint));
                members_json.push(json!({"endpoint": c.endpoint, "error": e.to_string()}));
            }
        }
    }
    text.push_str(&table(&rows));
    text.push_str(&errors);
    if !unchecked.is_empty() {
        text.push_str(&format!(
            "not checked (no endpoint given): {}\n",
            unchecked
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let verdict = if agree {
        format!("OK: {} members agree at revision {revision}", checked.len())
    } else if hashes.len() > 1 {
        format!("MISMATCH at revision {revision}")
    } else {
        format!("INCOMPLETE: {failed} member(s) could not be checked at revision {revision}")
    };
    text.push_str(&verdict);
    Ok(Output {
        text,
        json: json!({"ok": agree, "revision": revision, "leader": leader, "members": members_json,
            "unchecked": unchecked}),
        ok: agree,
    })
}

/// The member's hash at `revision`, retried until `deadline` while the member has not applied
/// that revision yet (it answers an error, or a hash at an earlier revision).
async fn hash_at(c: &Client, revision: i64, deadline: Instant) -> Result<HashInfo, Error> {
    loop {
        let r = c.hash(Some(revision)).await;
        let done = match &r {
            Ok(h) => h.revision >= revision,
            Err(Error::Usage(_)) => true,
            Err(_) => false,
        };
        if done || Instant::now() >= deadline {
            return match r {
                Ok(h) if h.revision != revision => Err(Error::Decode {
                    endpoint: c.endpoints()[0].clone(),
                    message: format!("asked for revision {revision}, got {}", h.revision),
                }),
                r => r,
            };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BenchOp {
    Put,
    Get,
    Cas,
    /// Puts, each delivered to this many watchers.
    Watch {
        watchers: usize,
    },
}

impl BenchOp {
    fn name(self) -> &'static str {
        match self {
            BenchOp::Put => "put",
            BenchOp::Get => "get",
            BenchOp::Cas => "cas",
            BenchOp::Watch { .. } => "watch",
        }
    }

    /// Whether the load reads keys, which must exist first.
    fn reads(self) -> bool {
        matches!(self, BenchOp::Get | BenchOp::Cas)
    }
}

/// One bench client's results.
#[derive(Default)]
struct ClientRun {
    /// Microseconds per successful request.
    latencies: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

/// xorshift64*: key choice needs speed and spread, not quality.
fn next_rand(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// Every bench key starts with this, and the watchers of `bench watch` watch it.
const BENCH_PREFIX: &str = "bench/";
/// The range end of [`BENCH_PREFIX`]: its last byte plus one.
const BENCH_PREFIX_END: &str = "bench0";

fn bench_key(i: u64) -> String {
    format!("{BENCH_PREFIX}{i:08}")
}

async fn bench(
    endpoints: &[String],
    mut opts: ClientOptions,
    op: BenchOp,
    args: BenchArgs,
) -> Result<Output, Error> {
    if args.clients == 0 || args.keys == 0 || args.duration.is_zero() {
        return Err(Error::Usage(
            "--clients, --keys and --duration must be positive".into(),
        ));
    }
    if let BenchOp::Watch { watchers } = op {
        if watchers == 0 || args.value_size < STAMP_BYTES {
            return Err(Error::Usage(format!(
                "bench watch needs --watchers of at least 1 and --value-size of at least \
                 {STAMP_BYTES} (each value carries its send time)"
            )));
        }
    }
    // What the watch op's values are stamped against: one clock for the writers and the
    // watchers, which live in this process.
    let epoch = Instant::now();
    opts.pool_max_idle_per_host = args.clients;
    let base = Client::new(endpoints, &opts)?;
    let per_endpoint: Vec<Arc<Client>> = base
        .endpoints()
        .iter()
        .map(|e| base.with_endpoint(e).map(Arc::new))
        .collect::<Result<_, _>>()?;
    // Printable values: the JSON API carries values as strings.
    let value = bytes::Bytes::from(
        (0..args.value_size)
            .map(|i| b'a' + (i % 26) as u8)
            .collect::<Vec<u8>>(),
    );

    let channels = match args.protocol {
        BenchProtocol::Grpc => grpc_channels(base.endpoints(), args.conns).await?,
        BenchProtocol::Http => Vec::new(),
    };
    let grpc: Vec<KvClient<Channel>> = channels.iter().cloned().map(KvClient::new).collect();
    let client_for = |n: usize| {
        if grpc.is_empty() {
            BenchClient::Http(per_endpoint[n % per_endpoint.len()].clone())
        } else {
            BenchClient::Grpc(grpc[n % grpc.len()].clone())
        }
    };

    if args.protocol != BenchProtocol::Grpc {
        match op {
            BenchOp::Cas => {
                return Err(Error::Usage(
                    "bench cas speaks etcd's txn: use --protocol grpc".into(),
                ))
            }
            BenchOp::Watch { .. } => {
                return Err(Error::Usage(
                    "bench watch speaks etcd's Watch service (Keel's HTTP API has no watch): \
                     use --protocol grpc"
                        .into(),
                ))
            }
            BenchOp::Put | BenchOp::Get => {}
        }
    }
    let mut fill_time = None;
    if op.reads() && !args.skip_fill {
        // Every key a get may pick exists, so gets measure reads and not misses. Through the
        // same API as the load, so that the fill works against etcd too.
        let fill_start = Instant::now();
        let fill = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut tasks = Vec::new();
        // As many writers as clients, up to 256: compare-etcd.sh fills 1M keys this way, and
        // fewer writers would leave the fill waiting on round trips rather than the cluster.
        for w in 0..args.clients.clamp(1, 256) {
            let mut c = client_for(w);
            let fill = fill.clone();
            let value = value.clone();
            let keys = args.keys;
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = fill.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= keys {
                        return Ok(());
                    }
                    let key = bench_key(i);
                    let mut tries = 0;
                    // A leader change during the fill refuses some puts; each is retried a
                    // bounded number of times (a put of the same value twice is harmless).
                    while let Err(e) = c.put(&key, value.clone()).await {
                        tries += 1;
                        if tries == 100 {
                            return Err(Error::Usage(format!("filling {key}: {e}")));
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }));
        }
        for t in tasks {
            t.await.expect("fill task panicked")?;
        }
        fill_time = Some(fill_start.elapsed());
    }

    // The writers start once every watcher is created, so each watcher must get every put.
    let fanout = match op {
        BenchOp::Watch { watchers } => {
            Some(Fanout::start(&channels, watchers, epoch, opts.timeout).await?)
        }
        _ => None,
    };

    let start = Instant::now();
    let deadline = start + args.duration;
    let mut tasks = Vec::new();
    for n in 0..args.clients {
        let mut c = client_for(n);
        let value = value.clone();
        let args = args.clone();
        tasks.push(tokio::spawn(async move {
            let mut run = ClientRun::default();
            let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ ((n as u64 + 1) << 17);
            while Instant::now() < deadline {
                let key = bench_key(next_rand(&mut rng) % args.keys);
                let t0 = Instant::now();
                let r = match op {
                    BenchOp::Put => c.put(&key, value.clone()).await,
                    BenchOp::Get => c.get(&key, args.serializable).await,
                    BenchOp::Cas => c.cas(&key, value.clone()).await,
                    BenchOp::Watch { .. } => {
                        c.put(&key, stamped(&value, t0.duration_since(epoch))).await
                    }
                };
                let us = t0.elapsed().as_micros() as u64;
                match r {
                    Ok(()) => run.latencies.push(us),
                    Err(e) => {
                        run.errors += 1;
                        if run.first_error.is_none() {
                            run.first_error = Some(e);
                        }
                        // A failing cluster answers instantly; without a pause the loop
                        // would only measure how fast errors come back.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            run
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for t in tasks {
        let r = t.await.expect("bench client panicked");
        lat.extend(r.latencies);
        errors += r.errors;
        if first_error.is_none() {
            first_error = r.first_error;
        }
    }
    let elapsed = start.elapsed();
    lat.sort_unstable();
    let ok_ops = lat.len() as u64;
    let throughput = ok_ops as f64 / elapsed.as_secs_f64();
    let watch = match fanout {
        // Events still on their way get up to --timeout after the last put.
        Some(f) => Some(f.finish(ok_ops, start, opts.timeout).await),
        None => None,
    };
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        lat[nearest_rank(lat.len(), p) - 1] as f64 / 1000.0
    };
    let (p50, p90, p99) = (pct(50.0), pct(90.0), pct(99.0));
    let max = lat.last().copied().unwrap_or(0) as f64 / 1000.0;
    let mut text = format!(
        "bench {} over {}: {} clients, {}-byte values, {} keys, {} endpoint(s), {:.1}s{}\n",
        op.name(),
        match args.protocol {
            BenchProtocol::Http => "http".to_string(),
            BenchProtocol::Grpc => format!("grpc ({} conns)", grpc.len()),
        },
        args.clients,
        args.value_size,
        args.keys,
        per_endpoint.len(),
        elapsed.as_secs_f64(),
        if op == BenchOp::Get && args.serializable {
            ", serializable"
        } else {
            ""
        }
    );
    if let Some(t) = fill_time {
        text.push_str(&format!(
            "  fill:       {} keys in {:.1}s\n",
            args.keys,
            t.as_secs_f64()
        ));
    }
    text.push_str(&format!("  requests:   {ok_ops} ok, {errors} failed\n"));
    text.push_str(&format!("  throughput: {throughput:.1} ops/s\n"));
    text.push_str(&format!(
        "  latency:    p50 {p50:.3} ms  p90 {p90:.3} ms  p99 {p99:.3} ms  max {max:.3} ms"
    ));
    if let Some(w) = &watch {
        text.push_str(&format!(
            "\n  watchers:   {} on {} stream(s), all created before the first put; {} cancelled \
             by the server",
            w.watchers, w.streams, w.canceled
        ));
        text.push_str(&format!(
            "\n  events:     {} delivered, {:.1} events/s, {} missed",
            w.events, w.events_per_sec, w.missed
        ));
        text.push_str(&format!(
            "\n  lag:        p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms (put sent to event received)",
            w.lag_ms(50.0),
            w.lag_ms(99.0),
            w.lags.max() as f64 / 1000.0
        ));
        if let Some(e) = &w.first_error {
            text.push_str(&format!("\n  first watch error: {e}"));
        }
    }
    if let Some(e) = &first_error {
        text.push_str(&format!("\n  first error: {e}"));
    }
    let mut json = json!({
        "op": op.name(),
        "protocol": match args.protocol { BenchProtocol::Http => "http", BenchProtocol::Grpc => "grpc" },
        "clients": args.clients,
        "value_size": args.value_size,
        "keys": args.keys,
        "endpoints": per_endpoint.len(),
        "serializable": op == BenchOp::Get && args.serializable,
        "fill_s": fill_time.map(|t| t.as_secs_f64()),
        "duration_s": elapsed.as_secs_f64(),
        "ok": ok_ops,
        "errors": errors,
        "first_error": first_error,
        "throughput_ops_s": throughput,
        "latency_ms": {"p50": p50, "p90": p90, "p99": p99, "max": max},
    });
    if let (Some(w), Some(fields)) = (&watch, json.as_object_mut()) {
        fields.extend([
            ("watchers".to_string(), json!(w.watchers)),
            ("watch_streams".to_string(), json!(w.streams)),
            ("events".to_string(), json!(w.events)),
            ("events_per_sec".to_string(), json!(w.events_per_sec)),
            ("lag_p50_ms".to_string(), json!(w.lag_ms(50.0))),
            ("lag_p99_ms".to_string(), json!(w.lag_ms(99.0))),
            (
                "lag_max_ms".to_string(),
                json!(w.lags.max() as f64 / 1000.0),
            ),
            ("missed".to_string(), json!(w.missed)),
            ("watchers_canceled".to_string(), json!(w.canceled)),
            ("first_watch_error".to_string(), json!(w.first_error)),
        ]);
    }
    Ok(Output {
        text,
        json,
        ok: ok_ops > 0,
    })
}

/// Bytes at the start of a `bench watch` value that carry its send time.
const STAMP_BYTES: usize = 8;

/// `value` with its first [`STAMP_BYTES`] replaced by `sent` (since the run's epoch) in
/// nanoseconds, little endian, so that a watcher can tell each event's lag without a table of
/// send times shared with the writers.
fn stamped(value: &bytes::Bytes, sent: Duration) -> bytes::Bytes {
    let mut v = bytes::BytesMut::from(&value[..]);
    v[..STAMP_BYTES].copy_from_slice(&(sent.as_nanos() as u64).to_le_bytes());
    v.freeze()
}

/// The send time a [`stamped`] value carries (`None` if it is too short to be one).
fn stamp_of(value: &[u8]) -> Option<Duration> {
    let b: [u8; STAMP_BYTES] = value.get(..STAMP_BYTES)?.try_into().ok()?;
    Some(Duration::from_nanos(u64::from_le_bytes(b)))
}

/// The watchers of `bench watch`: one Watch stream per gRPC connection, each carrying its share
/// of the watchers. That is what etcd's clientv3 does (every watch of one client made with the
/// same context shares one stream), so a server is measured on the layout real clients give it:
/// many watch ids per stream, not a stream per watcher.
struct Fanout {
    streams: Vec<tokio::task::JoinHandle<StreamRun>>,
    watchers: usize,
    /// Set once the writers have stopped: how many events every watcher is owed, and until
    /// when it waits for them.
    owed: tokio::sync::watch::Sender<Option<(u64, Instant)>>,
}

/// What one watch stream saw.
struct StreamRun {
    /// Events received, per watcher of the stream.
    events: Vec<u64>,
    /// Microseconds from each event's put being sent to its receipt.
    lags: Histogram,
    last_event: Option<Instant>,
    /// Watchers the server cancelled.
    canceled: usize,
    /// The first cancel reason or stream error.
    error: Option<String>,
}

/// The fan-out's totals over every watcher.
struct FanoutReport {
    watchers: usize,
    streams: usize,
    events: u64,
    /// Events over the time from the writers' start to the last event received.
    events_per_sec: f64,
    lags: Histogram,
    /// Events owed (successful puts, for each watcher) and never received, cancelled
    /// watchers' included.
    missed: u64,
    canceled: usize,
    first_error: Option<String>,
}

impl FanoutReport {
    fn lag_ms(&self, p: f64) -> f64 {
        self.lags.percentile(p) as f64 / 1000.0
    }
}

impl Fanout {
    /// Opens the streams and returns once every watcher has its created answer, so that no put
    /// the writers send can precede a watcher.
    async fn start(
        channels: &[Channel],
        watchers: usize,
        epoch: Instant,
        timeout: Duration,
    ) -> Result<Fanout, Error> {
        let n_streams = channels.len().min(watchers);
        let (owed, owed_rx) = tokio::sync::watch::channel(None);
        let mut streams = Vec::new();
        let mut created = Vec::new();
        for (s, ch) in channels.iter().take(n_streams).enumerate() {
            // Watcher i is on stream i % n_streams.
            let n = watchers / n_streams + usize::from(s < watchers % n_streams);
            let (tx, rx) = tokio::sync::oneshot::channel();
            let stream = watch_stream(ch.clone(), n, epoch, timeout, tx, owed_rx.clone());
            streams.push(tokio::spawn(stream));
            created.push(rx);
        }
        for rx in created {
            match rx.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(Error::Usage(format!("creating watchers: {e}"))),
                Err(_) => panic!("a watch stream task ended before answering"),
            }
        }
        Ok(Fanout {
            streams,
            watchers,
            owed,
        })
    }

    /// Tells the streams that every watcher is owed `writes` events, waits up to `grace` for
    /// them, and adds up what they saw.
    async fn finish(self, writes: u64, start: Instant, grace: Duration) -> FanoutReport {
        // No receiver left means every stream has already ended (each on an error).
        let _ = self.owed.send(Some((writes, Instant::now() + grace)));
        let mut report = FanoutReport {
            watchers: self.watchers,
            streams: self.streams.len(),
            events: 0,
            events_per_sec: 0.0,
            lags: Histogram::default(),
            missed: 0,
            canceled: 0,
            first_error: None,
        };
        let mut last_event = None;
        for t in self.streams {
            let run = t.await.expect("watch stream task panicked");
            report.events += run.events.iter().sum::<u64>();
            report.missed += run
                .events
                .iter()
                .map(|&got| writes.saturating_sub(got))
                .sum::<u64>();
            report.lags.merge(&run.lags);
            report.canceled += run.canceled;
            last_event = last_event.max(run.last_event);
            if report.first_error.is_none() {
                report.first_error = run.error;
            }
        }
        if let Some(last) = last_event {
            report.events_per_sec = report.events as f64 / last.duration_since(start).as_secs_f64();
        }
        report
    }
}

/// One Watch stream with `watchers` watches of [`BENCH_PREFIX`]. Answers `created` once they
/// are all created (or could not be), then records events until every watcher has the number
/// `owed` announces, or its deadline passes.
async fn watch_stream(
    ch: Channel,
    watchers: usize,
    epoch: Instant,
    timeout: Duration,
    created: tokio::sync::oneshot::Sender<Result<(), String>>,
    mut owed: tokio::sync::watch::Receiver<Option<(u64, Instant)>>,
) -> StreamRun {
    let mut run = StreamRun {
        events: vec![0; watchers],
        lags: Histogram::default(),
        last_event: None,
        canceled: 0,
        error: None,
    };
    // The only requests are the creates, one at a time; `_requests` lives as long as the
    // stream, since closing it would half-close the stream.
    let (_requests, mut inbound, ids) = match create_watchers(ch, watchers, timeout).await {
        Ok(x) => x,
        Err(e) => {
            let _ = created.send(Err(e));
            return run;
        }
    };
    let _ = created.send(Ok(()));

    let mut alive = vec![true; watchers];
    let mut target: Option<(u64, Instant)> = None;
    loop {
        if let Some((n, _)) = target {
            if run.events.iter().zip(&alive).all(|(&e, &a)| e >= n || !a) {
                break;
            }
        }
        let next = match target {
            None => tokio::select! {
                m = inbound.message() => m,
                changed = owed.changed() => {
                    if changed.is_err() {
                        // The bench gave up on the run.
                        break;
                    }
                    target = *owed.borrow_and_update();
                    continue;
                }
            },
            Some((_, deadline)) => {
                let deadline = tokio::time::Instant::from_std(deadline);
                match tokio::time::timeout_at(deadline, inbound.message()).await {
                    Ok(m) => m,
                    // What has not come by now counts as missed.
                    Err(_) => break,
                }
            }
        };
        let r = match next {
            Ok(Some(r)) => r,
            Ok(None) => {
                run.error
                    .get_or_insert_with(|| "the server ended the watch stream".into());
                break;
            }
            Err(s) => {
                run.error.get_or_insert_with(|| s.message().to_string());
                break;
            }
        };
        let now = Instant::now();
        // Progress notifications answer for no watcher (id -1).
        let Some(&i) = ids.get(&r.watch_id) else {
            continue;
        };
        if r.canceled {
            if std::mem::replace(&mut alive[i], false) {
                run.canceled += 1;
                run.error
                    .get_or_insert_with(|| format!("watch cancelled: {}", r.cancel_reason));
            }
            continue;
        }
        if r.events.is_empty() {
            continue;
        }
        run.last_event = Some(now);
        let at = now.duration_since(epoch);
        for e in &r.events {
            run.events[i] += 1;
            if let Some(sent) = e.kv.as_ref().and_then(|kv| stamp_of(&kv.value)) {
                run.lags.record(at.saturating_sub(sent).as_micros() as u64);
            }
        }
    }
    run
}

type WatchRequests = tokio::sync::mpsc::Sender<etcdpb::WatchRequest>;

/// Opens a Watch stream on `ch` and creates `watchers` watches of [`BENCH_PREFIX`] on it, each
/// sent after the previous one's created answer, as clientv3 does; the server assigns the ids.
/// Returns the request side, the response side and each watch id's index.
async fn create_watchers(
    ch: Channel,
    watchers: usize,
    timeout: Duration,
) -> Result<
    (
        WatchRequests,
        tonic::Streaming<etcdpb::WatchResponse>,
        std::collections::HashMap<i64, usize>,
    ),
    String,
> {
    let create = || etcdpb::WatchRequest {
        request_union: Some(etcdpb::watch_request::RequestUnion::CreateRequest(
            etcdpb::WatchCreateRequest {
                key: bytes::Bytes::from_static(BENCH_PREFIX.as_bytes()),
                range_end: bytes::Bytes::from_static(BENCH_PREFIX_END.as_bytes()),
                ..Default::default()
            },
        )),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    // The first create is queued before the call: tonic's call returns only once the server
    // has sent its response headers, and etcd (grpc-go) sends them with its first message, which
    // answers the first request.
    tx.try_send(create()).expect("the channel is empty");
    let mut client = WatchClient::new(ch);
    let call = client.watch(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut inbound = tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| format!("no watch stream within {timeout:?}"))?
        .map_err(|s| format!("opening a watch stream: {}", s.message()))?
        .into_inner();
    let mut ids = std::collections::HashMap::with_capacity(watchers);
    for i in 0..watchers {
        if i > 0 {
            tx.send(create())
                .await
                .map_err(|_| "the watch stream closed".to_string())?;
        }
        let answer = loop {
            match tokio::time::timeout(timeout, inbound.message()).await {
                Err(_) => return Err(format!("no created answer within {timeout:?}")),
                Ok(Err(s)) => return Err(s.message().to_string()),
                Ok(Ok(None)) => return Err("the server ended the watch stream".into()),
                Ok(Ok(Some(r))) if r.created => break r,
                // Nothing writes under the prefix yet; anything else is not ours to count.
                Ok(Ok(Some(_))) => continue,
            }
        };
        if answer.canceled {
            return Err(format!("watch refused: {}", answer.cancel_reason));
        }
        if ids.insert(answer.watch_id, i).is_some() {
            return Err(format!("watch id {} given twice", answer.watch_id));
        }
    }
    Ok((tx, inbound, ids))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_survives_the_value_and_keeps_its_length() {
        let value = bytes::Bytes::from(vec![b'a'; 256]);
        let sent = Duration::from_nanos(1_234_567_890_123);
        let v = stamped(&value, sent);
        assert_eq!(v.len(), 256);
        assert_eq!(&v[STAMP_BYTES..], &value[STAMP_BYTES..]);
        assert_eq!(stamp_of(&v), Some(sent));
        assert_eq!(stamp_of(b"short"), None);
    }

    #[test]
    fn the_prefix_end_bounds_exactly_the_bench_keys() {
        let (start, end) = (BENCH_PREFIX.as_bytes(), BENCH_PREFIX_END.as_bytes());
        let mut want = start.to_vec();
        *want.last_mut().unwrap() += 1;
        assert_eq!(end, &want[..]);
        let key = bench_key(u64::MAX);
        assert!(key.as_bytes() >= start && key.as_bytes() < end);
    }
}
