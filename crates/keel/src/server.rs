//! Running one node from a [`Plan`]: settle its identity (given, joined through a member, or
//! formed once `--bootstrap-expect` nodes arrived), start the driver, serve the client API,
//! and shut down cleanly on SIGINT or SIGTERM.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use axum::{Json, Router};
use keel_api::{code, serve, ApiConfig};
use keel_node::driver::{self, DriverConfig};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::client::{Client, ClientOptions, Member};
use crate::config::{cluster_id, id_from_name, listen_addr, peer_addr, Mode, Plan, MAX_NODE_ID};

/// Where a node that learned its membership at start (by joining or by bootstrap-expect)
/// keeps it, so that a restart neither asks again nor forms a second cluster.
const MEMBERSHIP_FILE: &str = "membership.json";

/// Pause between join attempts while the member asked has no leader or the cluster is still
/// forming: a few heartbeats, so a join lands soon after an election without flooding.
const JOIN_RETRY: Duration = Duration::from_millis(300);

/// How long a bootstrap-expect node holds a registration request open before answering
/// "still waiting" (the joiner asks again); short enough that a dead joiner's request is not
/// held for long, long enough that a cluster usually forms within one request.
const FORMING_POLL: Duration = Duration::from_secs(10);

/// Largest body the forming endpoint reads: a peer URL and a name.
const FORMING_MAX_BODY: usize = 4096;

/// Who this node is and who its peers are, once settled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub id: u64,
    pub cluster_id: u64,
    /// Peer address by id, this node's own included.
    pub peers: BTreeMap<u64, String>,
    /// Voters of the cluster to bootstrap when the data dir is new; empty to wait to be added.
    pub initial_members: Vec<u64>,
}

/// Runs the node until a signal asks it to stop.
pub async fn run(plan: Plan) -> anyhow::Result<()> {
    let listener = TcpListener::bind(plan.client_addr)
        .await
        .with_context(|| format!("cannot listen for clients on {}", plan.client_addr))?;
    std::fs::create_dir_all(&plan.data_dir)
        .with_context(|| format!("cannot create data dir {}", plan.data_dir.display()))?;
    let saved = load_identity(&plan.data_dir)?;
    let (ident, listener) = match (&plan.mode, saved) {
        (Mode::Static { join }, _) => {
            let id = plan.id.expect("a static plan has an id");
            let ident = Identity {
                id,
                cluster_id: cluster_id(&plan.cluster_token),
                peers: plan.peers.clone(),
                initial_members: if *join {
                    Vec::new()
                } else {
                    plan.peers.keys().copied().collect()
                },
            };
            (ident, listener)
        }
        (_, Some(saved)) => {
            info!(
                node = saved.id,
                "membership from {}",
                plan.data_dir.join(MEMBERSHIP_FILE).display()
            );
            (saved, listener)
        }
        (Mode::JoinAddr(addr), None) => {
            let ident = ask_to_join(&plan, addr).await?;
            save_identity(&plan.data_dir, &ident)?;
            (ident, listener)
        }
        (Mode::BootstrapExpect(n), None) => {
            let (ident, listener) = form_cluster(&plan, *n, listener).await?;
            save_identity(&plan.data_dir, &ident)?;
            (ident, listener)
        }
    };
    if let Some(id) = plan.id {
        if id != ident.id {
            bail!(
                "this node is {id} by its flags, but its data dir {} belongs to node {}",
                plan.data_dir.display(),
                ident.id
            );
        }
    }

    let listen = listen_addr(&plan.peer_addr).map_err(|e| anyhow!("peer address: {e}"))?;
    let mut cfg = DriverConfig::new(ident.id, ident.cluster_id, &plan.data_dir, listen);
    cfg.peers = ident.peers.clone();
    cfg.peers.insert(ident.id, plan.peer_addr.clone());
    cfg.initial_members = ident.initial_members.clone();
    cfg.tick_interval = plan.tick;
    cfg.election_tick = plan.election_ticks;
    cfg.heartbeat_tick = plan.heartbeat_ticks;
    cfg.snapshot_count = plan.snapshot_count;
    // Published through Raft, so every member lists this one by name with its client URL.
    let client_url = format!("http://{}", plan.client_addr);
    cfg.name = plan.name.clone();
    cfg.client_urls = vec![client_url.clone()];
    let node = driver::start(cfg)
        .await
        .with_context(|| format!("node {} could not start", ident.id))?;
    if let Some(mode) = plan.auto_compaction {
        info!(node = ident.id, "auto-compaction: {mode:?}");
        tokio::spawn(keel_node::compactor::run(node.clone(), mode));
    }
    let mut api = ApiConfig::new(plan.name.clone(), ident.cluster_id);
    api.max_request_bytes = plan.max_request_bytes;
    api.max_txn_ops = plan.max_txn_ops;
    api.watch_progress_interval = plan.watch_progress_notify_interval;
    api.client_url = client_url;
    info!(
        node = ident.id,
        "serving clients on http://{}, peers on {}",
        plan.client_addr,
        node.local_addr()
    );
    let served = serve(listener, node.clone(), api, shutdown_signal()).await;
    info!(node = ident.id, "shutting down");
    node.shutdown().await;
    served.context("client API")?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            warn!("cannot watch SIGTERM ({e}); only Ctrl-C stops this process");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn load_identity(dir: &Path) -> anyhow::Result<Option<Identity>> {
    let path = dir.join(MEMBERSHIP_FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .with_context(|| format!("{} is damaged", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Written durably (temp file, fsync, rename, directory fsync) before the node starts, so a
/// crash right after leaves either no file (ask again: joins are idempotent) or the whole one.
fn save_identity(dir: &Path, ident: &Identity) -> anyhow::Result<()> {
    let path = dir.join(MEMBERSHIP_FILE);
    let tmp = dir.join(format!("{MEMBERSHIP_FILE}.tmp"));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(ident).expect("identity serializes"))?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().with_context(|| format!("writing {}", path.display()))
}

/// The answer to a join: the forming endpoint's and the API's `POST /v1/members`.
#[derive(Debug, Deserialize)]
struct JoinAnswer {
    id: u64,
    cluster_id: u64,
    members: Vec<Member>,
    /// Set by a node forming a cluster: every member listed bootstraps with all of them.
    #[serde(default)]
    bootstrap: bool,
}

#[derive(Serialize)]
struct JoinRequest<'a> {
    peer_url: &'a str,
    learner: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<u64>,
    name: &'a str,
}

/// Asks the member at `addr` to add this node, retrying while it has no leader (or, for a
/// forming cluster, until enough nodes arrived), up to `--join-timeout`.
async fn ask_to_join(plan: &Plan, addr: &str) -> anyhow::Result<Identity> {
    let opts = ClientOptions {
        // Above FORMING_POLL, so a forming node answers before the client gives up.
        timeout: FORMING_POLL + Duration::from_secs(10),
        ..ClientOptions::default()
    };
    let client = Client::new(&[addr], &opts).map_err(|e| anyhow!("--join-addr: {e}"))?;
    let body = serde_json::to_vec(&JoinRequest {
        peer_url: &plan.peer_addr,
        learner: false,
        id: plan.id,
        name: &plan.name,
    })
    .expect("join request serializes");
    let deadline = Instant::now() + plan.join_timeout;
    info!("asking {addr} to add this node ({})", plan.peer_addr);
    let answer: JoinAnswer = loop {
        match client
            .call(
                reqwest::Method::POST,
                "/v1/members",
                Some(body.clone().into()),
                true,
            )
            .await
        {
            Ok(a) => break a,
            Err(e) if e.is_transient() && Instant::now() < deadline => {
                info!("join through {addr} not done yet ({e}); retrying");
                tokio::time::sleep(JOIN_RETRY).await;
            }
            Err(e) => bail!("joining through {addr}: {e}"),
        }
    };
    identity_from_answer(plan, answer)
}

fn identity_from_answer(plan: &Plan, a: JoinAnswer) -> anyhow::Result<Identity> {
    if a.id == 0 || a.id > MAX_NODE_ID || a.cluster_id == 0 {
        bail!(
            "the member asked answered an invalid id {} or cluster id",
            a.id
        );
    }
    if plan.id.is_some_and(|i| i != a.id) {
        bail!(
            "asked to join as node {}, the cluster added node {}",
            plan.id.unwrap_or(0),
            a.id
        );
    }
    let mut peers = BTreeMap::new();
    for m in &a.members {
        if let Some(url) = &m.peer_url {
            let addr = peer_addr(url).map_err(|e| anyhow!("member {}: {e}", m.id))?;
            peers.insert(m.id, addr);
        }
    }
    peers.insert(a.id, plan.peer_addr.clone());
    let initial_members = if a.bootstrap {
        a.members.iter().map(|m| m.id).collect()
    } else {
        Vec::new()
    };
    info!(
        node = a.id,
        "joined cluster {:x} with members {:?}{}",
        a.cluster_id,
        peers.keys().collect::<Vec<_>>(),
        if a.bootstrap { " (forming it)" } else { "" }
    );
    Ok(Identity {
        id: a.id,
        cluster_id: a.cluster_id,
        peers,
        initial_members,
    })
}

/// Registrations of a cluster being formed by a `--bootstrap-expect` node.
struct Forming {
    expected: usize,
    cluster_id: u64,
    /// Invariant: at most `expected` entries, this node's among them; addresses are unique.
    members: BTreeMap<u64, String>,
}

impl Forming {
    fn formed(&self) -> bool {
        self.members.len() >= self.expected
    }

    /// Registers a node (idempotent for the same address) and returns its id.
    fn register(&mut self, id: Option<u64>, addr: &str) -> Result<u64, (StatusCode, String)> {
        if let Some((&have, _)) = self.members.iter().find(|(_, a)| a.as_str() == addr) {
            return match id {
                Some(i) if i != have => Err((
                    StatusCode::CONFLICT,
                    format!("{addr} is already the address of member {have}"),
                )),
                _ => Ok(have),
            };
        }
        if self.formed() {
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "the cluster is formed and starting; retry".into(),
            ));
        }
        let id = match id {
            Some(i) if self.members.contains_key(&i) => {
                return Err((
                    StatusCode::CONFLICT,
                    format!("member {i} already exists at {}", self.members[&i]),
                ))
            }
            Some(i) => i,
            None => self.members.keys().max().copied().unwrap_or(0) + 1,
        };
        if id == 0 || id > MAX_NODE_ID {
            return Err((
                StatusCode::BAD_REQUEST,
                format!("node id {id} not in 1..2^32"),
            ));
        }
        self.members.insert(id, addr.to_string());
        Ok(id)
    }

    fn answer(&self, id: u64) -> serde_json::Value {
        let members: Vec<_> = self
            .members
            .iter()
            .map(|(id, a)| json!({"id": id, "peer_url": a, "learner": false}))
            .collect();
        json!({"id": id, "cluster_id": self.cluster_id, "members": members, "bootstrap": true})
    }
}

type FormingState = Arc<(Mutex<Forming>, watch::Sender<bool>)>;

fn forming_error(status: StatusCode, code: &'static str, msg: impl Into<String>) -> Response {
    keel_api::ApiError::new(status, code, msg).into_response()
}

async fn forming_register(st: FormingState, id: Option<u64>, host: &str) -> Response {
    let addr = match keel_api::peer_addr(host) {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let (lock, tx) = &*st;
    let id = {
        let mut f = lock.lock().expect("forming lock");
        match f.register(id, &addr) {
            Ok(id) => {
                info!(
                    "node {id} at {addr} registered ({} of {})",
                    f.members.len(),
                    f.expected
                );
                if f.formed() {
                    tx.send_replace(true);
                }
                id
            }
            Err((s, m)) => {
                let code = match s {
                    StatusCode::CONFLICT => code::CONFLICT,
                    StatusCode::BAD_REQUEST => code::BAD_REQUEST,
                    _ => code::NO_LEADER,
                };
                return forming_error(s, code, m);
            }
        }
    };
    let mut rx = tx.subscribe();
    let formed = tokio::time::timeout(FORMING_POLL, rx.wait_for(|f| *f)).await;
    let f = lock.lock().expect("forming lock");
    match formed {
        Ok(Ok(_)) => Json(f.answer(id)).into_response(),
        _ => forming_error(
            StatusCode::SERVICE_UNAVAILABLE,
            code::NO_LEADER,
            format!(
                "the cluster is not formed yet: {} of {} nodes; retry",
                f.members.len(),
                f.expected
            ),
        ),
    }
}

#[derive(Deserialize)]
struct FormingJoin {
    peer_url: String,
    #[serde(default)]
    learner: bool,
    id: Option<u64>,
    name: Option<String>,
}

async fn forming_members(State(st): State<FormingState>, body: axum::body::Bytes) -> Response {
    let req: FormingJoin = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return forming_error(
                StatusCode::BAD_REQUEST,
                code::BAD_REQUEST,
                format!("body: {e}"),
            )
        }
    };
    if req.learner {
        return forming_error(
            StatusCode::BAD_REQUEST,
            code::BAD_REQUEST,
            "a cluster being formed takes voters only; add learners once it runs",
        );
    }
    let id = req
        .id
        .or_else(|| req.name.as_deref().and_then(id_from_name));
    forming_register(st, id, &req.peer_url).await
}

async fn forming_intern_join(State(st): State<FormingState>, uri: Uri) -> Response {
    let q = keel_api::query_pairs(&uri);
    let param = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let (name, host) = (param("name"), param("host"));
    let Some(host) = host else {
        return forming_error(
            StatusCode::BAD_REQUEST,
            code::BAD_REQUEST,
            "query parameter host (the new node's peer address) is required",
        );
    };
    let id = name.as_deref().and_then(id_from_name);
    forming_register(st, id, &host).await
}

async fn forming_other(State(st): State<FormingState>) -> Response {
    let f = st.0.lock().expect("forming lock");
    forming_error(
        StatusCode::SERVICE_UNAVAILABLE,
        code::NO_LEADER,
        format!(
            "the cluster is not formed yet: {} of {} nodes joined",
            f.members.len(),
            f.expected
        ),
    )
}

/// Serves registrations on the client port until `expected` nodes (this one included) are
/// known, then hands the same listening socket back for the real API.
async fn form_cluster(
    plan: &Plan,
    expected: usize,
    listener: TcpListener,
) -> anyhow::Result<(Identity, TcpListener)> {
    let id = plan.id.expect("bootstrap-expect plans have an id");
    let cid = cluster_id(&plan.cluster_token);
    let mut members = BTreeMap::new();
    members.insert(id, plan.peer_addr.clone());
    let (tx, mut rx) = watch::channel(expected <= 1);
    let st: FormingState = Arc::new((
        Mutex::new(Forming {
            expected,
            cluster_id: cid,
            members,
        }),
        tx,
    ));
    let std_listener = listener.into_std().context("client listener")?;
    let pre = TcpListener::from_std(std_listener.try_clone().context("client listener")?)
        .context("client listener")?;
    let app = Router::new()
        .route("/v1/members", post(forming_members))
        .route("/intern/join", any(forming_intern_join))
        .fallback(forming_other)
        .layer(DefaultBodyLimit::max(FORMING_MAX_BODY))
        .with_state(st.clone());
    info!(
        node = id,
        "waiting for {expected} nodes to join through http://{}", plan.client_addr
    );
    let formed = async move {
        let _ = rx.wait_for(|f| *f).await;
    };
    let serving = axum::serve(pre, app).with_graceful_shutdown(formed);
    tokio::select! {
        r = serving => r.context("serving registrations")?,
        _ = shutdown_signal() => bail!("stopped before the cluster formed"),
    }
    let f = st.0.lock().expect("forming lock");
    let ident = Identity {
        id,
        cluster_id: cid,
        peers: f.members.clone(),
        initial_members: f.members.keys().copied().collect(),
    };
    info!(
        node = id,
        "forming cluster {cid:x} with voters {:?}", ident.initial_members
    );
    let listener = TcpListener::from_std(std_listener).context("client listener")?;
    Ok((ident, listener))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forming(expected: usize) -> Forming {
        let mut members = BTreeMap::new();
        members.insert(1, "127.0.0.1:1".to_string());
        Forming {
            expected,
            cluster_id: 7,
            members,
        }
    }

    #[test]
    fn registration_is_idempotent_and_bounded() {
        let mut f = forming(3);
        assert_eq!(f.register(None, "127.0.0.1:2"), Ok(2));
        assert_eq!(f.register(None, "127.0.0.1:2"), Ok(2));
        assert!(!f.formed());
        assert_eq!(
            f.register(Some(2), "127.0.0.1:9").unwrap_err().0,
            StatusCode::CONFLICT
        );
        assert_eq!(
            f.register(Some(5), "127.0.0.1:2").unwrap_err().0,
            StatusCode::CONFLICT
        );
        assert_eq!(f.register(Some(7), "127.0.0.1:3"), Ok(7));
        assert!(f.formed());
        // Full: a fourth node waits for the running cluster; a known one still gets its id.
        assert_eq!(
            f.register(None, "127.0.0.1:4").unwrap_err().0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(f.register(None, "127.0.0.1:3"), Ok(7));
        assert_eq!(f.members.len(), 3);
        let a = f.answer(7);
        assert_eq!(a["bootstrap"], true);
        assert_eq!(a["members"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn identity_file_round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_identity(dir.path()).unwrap(), None);
        let ident = Identity {
            id: 3,
            cluster_id: 9,
            peers: [(1, "a:1".to_string()), (3, "c:3".to_string())].into(),
            initial_members: vec![1, 3],
        };
        save_identity(dir.path(), &ident).unwrap();
        assert_eq!(load_identity(dir.path()).unwrap(), Some(ident));
        std::fs::write(dir.path().join(MEMBERSHIP_FILE), b"{\"id\": ").unwrap();
        let e = load_identity(dir.path()).unwrap_err();
        assert!(format!("{e:#}").contains("damaged"), "{e:#}");
    }
}
