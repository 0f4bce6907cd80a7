//! Keel's client HTTP API over a running node.
//!
//! Two faces on one port:
//! - raftexample's (`PUT /<key>`, `GET /<key>`, `POST /<id>`, `DELETE /<id>`) and seed-style
//!   `/intern/join` and `/intern/leave`, so the reference designs' curl commands work unchanged;
//! - a JSON API under `/v1/` (keys, members, leader transfer, status, hash), plus `/health` and
//!   `/metrics`.
//!
//! Every error is a JSON body `{"error", "code"}` produced before anything is proposed, and every
//! resource a client can make the server hold is bounded (see [`ApiConfig`]). README.md lists
//! endpoints, errors and limits.

mod error;
pub mod grpc;
mod input;
mod members;
mod metrics;
mod raftexample;
mod serve;
mod v1;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get, post};
use axum::Router;
use keel_node::driver::NodeHandle;
use tokio::sync::Semaphore;

pub use error::{code, ApiError};
pub use input::{id_from_name, peer_addr, query_pairs, MAX_NODE_ID};
pub use serve::{serve, CoalescedWrites, LimitedListener};

/// The header naming the leader (its node id, 0 when none is known) on every answer.
pub const LEADER_HEADER: &str = "x-keel-leader";

/// Limits and identity of one API server. `ApiConfig::new` gives the defaults.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// This member's name, shown by `/v1/status`.
    pub name: String,
    /// Handed to nodes that join through this one, so they open their data dir and transport
    /// with the cluster's id.
    pub cluster_id: u64,
    /// Largest request body, and for writes the largest key plus value (etcd's
    /// `--max-request-bytes`, 1.5 MiB): a Raft entry holds the whole write, and every member
    /// keeps it in memory until it is applied and compacted.
    pub max_request_bytes: usize,
    /// Requests served at once (256). Past it a request is answered 503 at once rather than
    /// queued: each one can buffer up to `max_request_bytes`, so this bounds the memory bodies
    /// take (256 x 1.5 MiB = 384 MiB), and the driver refuses past its own queue anyway.
    pub max_concurrent_requests: usize,
    /// Open client connections (512). Past it new connections wait in the kernel's accept
    /// backlog: each one costs a file descriptor and a task, and idle keep-alive connections
    /// would otherwise let a client exhaust the descriptors the WAL and peers need.
    pub max_connections: usize,
    /// Keys one range read returns (1000); `"more": true` tells the client to continue from
    /// the last key. Bounds the answer a single prefix read can make the node build.
    pub max_range_keys: usize,
    /// Key and value bytes one range answer holds (16 MiB), for the same reason: 1000 keys of
    /// 1.5 MiB values would otherwise be a 1.5 GiB answer.
    pub max_range_bytes: usize,
    /// Operations one etcd txn may hold (etcd's `--max-txn-ops`, 128): a txn is applied in one
    /// Raft entry, which every member holds in memory until compaction.
    pub max_txn_ops: usize,
    /// This node's client URL as clients reach it, reported in its etcd `Member.clientURLs`.
    pub client_url: String,
    /// How often an idle watcher that asked for progress notifications gets one (etcd's
    /// `--experimental-watch-progress-notify-interval`, 10 minutes).
    pub watch_progress_interval: std::time::Duration,
}

impl ApiConfig {
    pub fn new(name: impl Into<String>, cluster_id: u64) -> ApiConfig {
        ApiConfig {
            name: name.into(),
            cluster_id,
            max_request_bytes: keel_kv::DEFAULT_MAX_REQUEST_BYTES,
            max_concurrent_requests: 256,
            max_connections: 512,
            max_range_keys: 1000,
            max_range_bytes: 16 << 20,
            max_txn_ops: keel_kv::DEFAULT_MAX_TXN_OPS,
            client_url: String::new(),
            watch_progress_interval: std::time::Duration::from_secs(600),
        }
    }
}

pub(crate) struct Inner {
    pub node: NodeHandle,
    pub cfg: ApiConfig,
    pub metrics: metrics::HttpMetrics,
    /// Permits for `max_concurrent_requests`.
    pub slots: Arc<Semaphore>,
    /// The leader id last seen, for answers that must not cost a status call (shed requests)
    /// or whose status call failed.
    pub last_leader: AtomicU64,
}

pub(crate) type App = Arc<Inner>;

/// The leader id a handler already learned while serving; spares the middleware a status call.
#[derive(Clone, Copy)]
pub(crate) struct LeaderHint(pub u64);

/// The API's routes over `node`: etcd's gRPC services on their `/etcdserverpb.*` paths, the
/// HTTP API on every other. Serve it with [`serve`] (which also bounds connections).
pub fn router(node: NodeHandle, cfg: ApiConfig) -> Router {
    let client_url = cfg.client_url.clone();
    let app: App = Arc::new(Inner {
        slots: Arc::new(Semaphore::new(cfg.max_concurrent_requests.max(1))),
        node,
        cfg,
        metrics: metrics::HttpMetrics::new(),
        last_leader: AtomicU64::new(0),
    });
    grpc::routes(app.clone(), client_url).fallback_service(http_router(app))
}

fn http_router(app: App) -> Router {
    Router::new()
        .route("/health", get(v1::health))
        .route("/metrics", get(v1::metrics))
        .route(
            "/intern/join",
            get(raftexample::intern_join).post(raftexample::intern_join),
        )
        .route(
            "/intern/leave",
            get(raftexample::intern_leave).post(raftexample::intern_leave),
        )
        // The key is taken from the raw path (not a `Path` extractor) so that any byte
        // string, including invalid UTF-8, can be a key; the bare prefixes answer "empty key".
        .route("/v1/kv", any(v1::kv))
        .route("/v1/kv/", any(v1::kv))
        .route("/v1/kv/{*key}", any(v1::kv))
        .route("/v1/members", get(v1::list_members).post(v1::add_member))
        .route("/v1/members/{id}", delete(v1::remove_member))
        .route("/v1/members/{id}/promote", post(v1::promote))
        .route("/v1/leader/transfer", post(v1::transfer_leader))
        .route("/v1/status", get(v1::status))
        .route("/v1/hash", get(v1::hash))
        .fallback(raftexample::keys_and_members)
        .layer(from_fn_with_state(app.clone(), observe))
        .with_state(app)
}

/// Around every request: the concurrency limit, JSON for errors produced outside the handlers
/// (axum's own 404/405/extractor rejections), the leader header and the HTTP metrics.
async fn observe(State(app): State<App>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        // The fallback serves raftexample's `/<key>` and `/<id>`.
        .unwrap_or_else(|| "/{key}".to_owned());
    let method = metrics::method_label(req.method());
    app.metrics.in_flight.inc();
    let (resp, shed) = match app.slots.clone().try_acquire_owned() {
        Ok(permit) => {
            let r = next.run(req).await;
            drop(permit);
            (r, false)
        }
        Err(_) => {
            app.metrics.shed.inc();
            let e = ApiError::overloaded(format!(
                "more than {} requests in flight; retry later",
                app.cfg.max_concurrent_requests
            ));
            (e.into_response(), true)
        }
    };
    app.metrics.in_flight.dec();
    let mut resp = json_errors(resp).await;

    let leader = match resp.extensions().get::<LeaderHint>() {
        Some(h) => Some(h.0),
        // A shed request must not add to the load that shed it.
        None if shed => None,
        None => app.node.status().await.ok().map(|s| s.leader),
    };
    let leader = match leader {
        Some(l) => {
            app.last_leader.store(l, Ordering::Relaxed);
            l
        }
        None => app.last_leader.load(Ordering::Relaxed),
    };
    resp.headers_mut()
        .insert(LEADER_HEADER, HeaderValue::from(leader));

    app.metrics
        .requests
        .get_or_create(&metrics::RequestLabels {
            route: route.clone(),
            method,
            code: resp.status().as_u16().to_string(),
        })
        .inc();
    app.metrics
        .latency
        .get_or_create(&metrics::RouteLabels { route })
        .observe(started.elapsed().as_secs_f64());
    resp
}

/// Largest non-JSON error body rewritten into the JSON shape; axum's rejection texts are short.
const MAX_REWRITTEN_ERROR: usize = 4096;

/// Rewrites error answers that are not JSON (axum's 404/405, extractor rejections) into the
/// API's `{"error", "code"}` shape, so clients can rely on it for every 4xx and 5xx.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = match axum::body::to_bytes(body, MAX_REWRITTEN_ERROR).await {
        Ok(b) if !b.is_empty() => String::from_utf8_lossy(&b).into_owned(),
        _ => status.canonical_reason().unwrap_or("error").to_owned(),
    };
    let kind = match status {
        StatusCode::NOT_FOUND => code::NOT_FOUND,
        StatusCode::METHOD_NOT_ALLOWED => code::METHOD_NOT_ALLOWED,
        StatusCode::PAYLOAD_TOO_LARGE => code::TOO_LARGE,
        s if s.is_client_error() => code::BAD_REQUEST,
        _ => code::INTERNAL,
    };
    let mut out = error::json_error(status, kind, &text);
    // Keep `Allow` and the like; only the body and its type change.
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}
