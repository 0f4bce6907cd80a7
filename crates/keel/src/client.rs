//! An async client for Keel's HTTP API, shared by `keelctl` and the tests.
//!
//! A `Client` holds an ordered list of endpoints (client HTTP addresses of members). Each
//! request goes to the endpoint that answered last; when that one cannot be connected to, the
//! next ones are tried in order. Only connection failures move on: a request that reached a
//! server and failed (or timed out) may have taken effect, so repeating it elsewhere could apply
//! a write twice.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use reqwest::{Method, StatusCode};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// The server's default client address (`keel` with no flags).
pub const DEFAULT_ENDPOINT: &str = "127.0.0.1:2379";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered with an error status and (normally) a JSON error body.
    #[error("{message} (HTTP {status}{})", code.as_deref().map(|c| format!(", {c}")).unwrap_or_default())]
    Server {
        endpoint: String,
        status: u16,
        code: Option<String>,
        message: String,
    },
    /// No endpoint could be reached.
    #[error("cannot connect to any endpoint ({endpoints}): {last}")]
    Unreachable { endpoints: String, last: String },
    /// The request reached a server but no complete answer came back (timeout, reset).
    #[error("{endpoint}: {message}")]
    Transport { endpoint: String, message: String },
    /// The server answered 2xx with a body this client does not understand.
    #[error("{endpoint}: bad response: {message}")]
    Decode { endpoint: String, message: String },
    #[error("{0}")]
    Usage(String),
}

impl Error {
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Server { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Worth retrying after a pause: no leader yet, overloaded, a timeout, or nobody reachable.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Server { status, .. } => matches!(status, 429 | 502 | 503 | 504),
            Error::Unreachable { .. } | Error::Transport { .. } => true,
            Error::Decode { .. } | Error::Usage(_) => false,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
    #[serde(default)]
    pub create_revision: i64,
    #[serde(default)]
    pub mod_revision: i64,
    #[serde(default)]
    pub version: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RangeResponse {
    #[serde(default)]
    pub kvs: Vec<KeyValue>,
    pub revision: i64,
    #[serde(default)]
    pub count: i64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct PutResponse {
    pub revision: i64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeleteResponse {
    pub deleted: i64,
    pub revision: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Member {
    pub id: u64,
    #[serde(default)]
    pub peer_url: Option<String>,
    #[serde(default)]
    pub learner: bool,
    #[serde(default, rename = "match")]
    pub matched: u64,
    #[serde(default)]
    pub next: u64,
    #[serde(default)]
    pub lag: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MembersResponse {
    /// 0 when no leader is known.
    #[serde(default)]
    pub leader: u64,
    pub members: Vec<Member>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AddMemberResponse {
    pub id: u64,
    pub members: Vec<Member>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemberListResponse {
    pub members: Vec<Member>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct TransferResponse {
    pub leader: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    pub id: u64,
    #[serde(default)]
    pub name: Option<String>,
    pub role: String,
    pub term: u64,
    #[serde(default)]
    pub leader: u64,
    pub commit: u64,
    pub applied: u64,
    #[serde(default)]
    pub last_index: u64,
    #[serde(default)]
    pub snapshot_index: u64,
    #[serde(default)]
    pub wal_bytes: u64,
    #[serde(default)]
    pub members: Vec<Member>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct HashInfo {
    pub id: u64,
    pub revision: i64,
    #[serde(default)]
    pub compact_revision: i64,
    pub hash: u32,
    #[serde(default)]
    pub applied: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Health {
    pub health: bool,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
    #[serde(default)]
    code: Option<String>,
}

#[derive(Serialize)]
struct AddMemberRequest<'a> {
    peer_url: &'a str,
    learner: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<u64>,
}

#[derive(Serialize)]
struct TransferRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    to: Option<u64>,
}

/// `host:port` or `http://host:port` (a trailing slash is dropped) to a base URL.
pub fn normalize_endpoint(e: &str) -> Result<String> {
    let e = e.trim().trim_end_matches('/');
    if e.is_empty() {
        return Err(Error::Usage("empty endpoint".into()));
    }
    if e.starts_with("https://") {
        return Err(Error::Usage(format!("{e}: TLS is not supported")));
    }
    if e.starts_with("http://") {
        Ok(e.to_string())
    } else {
        Ok(format!("http://{e}"))
    }
}

/// Keys go into the URL path; escape everything but unreserved characters and '/', which the
/// server treats as part of the key.
pub fn escape_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Per-request deadline, connection included.
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Idle connections kept per endpoint: the bench sets it to its client count so every
    /// concurrent client keeps its connection.
    pub pool_max_idle_per_host: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            pool_max_idle_per_host: 32,
        }
    }
}

pub struct Client {
    http: reqwest::Client,
    endpoints: Vec<String>,
    /// Index of the endpoint that answered last: start there next time.
    preferred: AtomicUsize,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

impl Client {
    pub fn new<S: AsRef<str>>(endpoints: &[S], opts: &ClientOptions) -> Result<Client> {
        let endpoints = endpoints
            .iter()
            .map(|e| normalize_endpoint(e.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        if endpoints.is_empty() {
            return Err(Error::Usage("no endpoints given".into()));
        }
        let http = reqwest::Client::builder()
            .timeout(opts.timeout)
            .connect_timeout(opts.connect_timeout)
            .pool_max_idle_per_host(opts.pool_max_idle_per_host)
            .tcp_nodelay(true)
            .no_proxy()
            .build()
            .map_err(|e| Error::Usage(format!("building the HTTP client: {e}")))?;
        Ok(Client {
            http,
            endpoints,
            preferred: AtomicUsize::new(0),
        })
    }

    /// A client for one endpoint of this one, sharing its connection pool.
    pub fn with_endpoint(&self, endpoint: &str) -> Result<Client> {
        Ok(Client {
            http: self.http.clone(),
            endpoints: vec![normalize_endpoint(endpoint)?],
            preferred: AtomicUsize::new(0),
        })
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Sends one request, trying the endpoints in order (from the preferred one) while they
    /// cannot be connected to. Returns the endpoint that answered and the raw answer.
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Bytes>,
        json: bool,
    ) -> Result<(String, StatusCode, Bytes)> {
        let n = self.endpoints.len();
        let start = self.preferred.load(Ordering::Relaxed) % n;
        let mut last = String::new();
        for i in 0..n {
            let idx = (start + i) % n;
            let endpoint = &self.endpoints[idx];
            let url = format!("{endpoint}{path_and_query}");
            let mut req = self.http.request(method.clone(), &url);
            if let Some(b) = &body {
                req = req.body(b.clone());
                if json {
                    req = req.header("content-type", "application/json");
                }
            }
            match req.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    let bytes = resp.bytes().await.map_err(|e| Error::Transport {
                        endpoint: endpoint.clone(),
                        message: describe(&e),
                    })?;
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Ok((endpoint.clone(), status, bytes));
                }
                Err(e) if e.is_connect() => {
                    last = format!("{endpoint}: {}", describe(&e));
                }
                Err(e) => {
                    return Err(Error::Transport {
                        endpoint: endpoint.clone(),
                        message: describe(&e),
                    })
                }
            }
        }
        Err(Error::Unreachable {
            endpoints: self.endpoints.join(","),
            last,
        })
    }

    /// Sends a request and decodes a 2xx JSON answer; any other status becomes `Error::Server`.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Bytes>,
        json: bool,
    ) -> Result<T> {
        let (endpoint, status, bytes) = self.send(method, path_and_query, body, json).await?;
        if !status.is_success() {
            return Err(server_error(endpoint, status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| Error::Decode {
            endpoint,
            message: format!("{e}: {}", String::from_utf8_lossy(&bytes)),
        })
    }

    fn json_body<B: Serialize>(b: &B) -> Option<Bytes> {
        Some(Bytes::from(
            serde_json::to_vec(b).expect("request bodies always serialize"),
        ))
    }

    pub async fn put(&self, key: &str, value: impl Into<Bytes>) -> Result<PutResponse> {
        check_key(key)?;
        let path = format!("/v1/kv/{}", escape_key(key));
        self.call(Method::PUT, &path, Some(value.into()), false)
            .await
    }

    /// A single key (`prefix = false`) that is absent is an `Error::Server` with status 404.
    pub async fn get(&self, key: &str, prefix: bool, serializable: bool) -> Result<RangeResponse> {
        if !prefix {
            check_key(key)?;
        }
        let mut path = format!("/v1/kv/{}", escape_key(key));
        let mut q = Vec::new();
        if prefix {
            q.push("prefix=true");
        }
        if serializable {
            q.push("serializable=true");
        }
        if !q.is_empty() {
            path.push('?');
            path.push_str(&q.join("&"));
        }
        self.call(Method::GET, &path, None, false).await
    }

    pub async fn delete(&self, key: &str, prefix: bool) -> Result<DeleteResponse> {
        if !prefix {
            check_key(key)?;
        }
        let mut path = format!("/v1/kv/{}", escape_key(key));
        if prefix {
            path.push_str("?prefix=true");
        }
        self.call(Method::DELETE, &path, None, false).await
    }

    pub async fn members(&self) -> Result<MembersResponse> {
        self.call(Method::GET, "/v1/members", None, false).await
    }

    pub async fn add_member(
        &self,
        peer_url: &str,
        learner: bool,
        id: Option<u64>,
    ) -> Result<AddMemberResponse> {
        let body = Self::json_body(&AddMemberRequest {
            peer_url,
            learner,
            id,
        });
        self.call(Method::POST, "/v1/members", body, true).await
    }

    pub async fn promote(&self, id: u64) -> Result<MemberListResponse> {
        let path = format!("/v1/members/{id}/promote");
        self.call(Method::POST, &path, None, false).await
    }

    pub async fn remove_member(&self, id: u64) -> Result<MemberListResponse> {
        let path = format!("/v1/members/{id}");
        self.call(Method::DELETE, &path, None, false).await
    }

    pub async fn status(&self) -> Result<Status> {
        self.call(Method::GET, "/v1/status", None, false).await
    }

    pub async fn transfer_leader(&self, to: Option<u64>) -> Result<TransferResponse> {
        let body = Self::json_body(&TransferRequest { to });
        self.call(Method::POST, "/v1/leader/transfer", body, true)
            .await
    }

    /// `revision = None` asks for the hash at the member's current revision.
    pub async fn hash(&self, revision: Option<i64>) -> Result<HashInfo> {
        let path = match revision {
            Some(r) => format!("/v1/hash?revision={r}"),
            None => "/v1/hash".to_string(),
        };
        self.call(Method::GET, &path, None, false).await
    }

    /// Health answers 503 with a JSON body when unhealthy; both are an answer, not an error.
    pub async fn health(&self) -> Result<Health> {
        let (endpoint, status, bytes) = self.send(Method::GET, "/health", None, false).await?;
        if !status.is_success() && status != StatusCode::SERVICE_UNAVAILABLE {
            return Err(server_error(endpoint, status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| Error::Decode {
            endpoint,
            message: e.to_string(),
        })
    }
}

fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::Usage("the key must not be empty".into()));
    }
    Ok(())
}

fn server_error(endpoint: String, status: StatusCode, body: &[u8]) -> Error {
    let (code, message) = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) => (b.code, b.error),
        Err(_) => {
            let text = String::from_utf8_lossy(body).trim().to_string();
            let message = if text.is_empty() {
                status
                    .canonical_reason()
                    .unwrap_or("error")
                    .to_ascii_lowercase()
            } else {
                text
            };
            (None, message)
        }
    };
    Error::Server {
        endpoint,
        status: status.as_u16(),
        code,
        message,
    }
}

/// reqwest's Display stops at the outermost layer ("error sending request"); the cause chain
/// says what actually happened (connection refused, timed out).
fn describe(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(cause) = src {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        src = cause.source();
    }
    s
}

/// Parses "10s", "250ms", "2m", "1.5s" or a bare number of seconds.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (examples: 10s, 250ms, 2m)"))?;
    let secs = match unit.trim() {
        "" | "s" | "sec" | "secs" => n,
        "ms" => n / 1e3,
        "us" | "µs" => n / 1e6,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        u => return Err(format!("invalid duration unit {u:?} in {s:?}")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("invalid duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn endpoints_and_keys() {
        assert_eq!(
            normalize_endpoint("127.0.0.1:1").unwrap(),
            "http://127.0.0.1:1"
        );
        assert_eq!(normalize_endpoint("http://h:2/").unwrap(), "http://h:2");
        assert!(normalize_endpoint("https://h:2").is_err());
        assert_eq!(escape_key("a/b c?"), "a/b%20c%3F");
    }

    #[test]
    fn server_errors_keep_the_message() {
        let e = server_error(
            "x".into(),
            StatusCode::CONFLICT,
            br#"{"error":"a membership change is pending","code":"conflict"}"#,
        );
        assert_eq!(e.status(), Some(409));
        assert_eq!(
            e.to_string(),
            "a membership change is pending (HTTP 409, conflict)"
        );
        let e = server_error("x".into(), StatusCode::BAD_GATEWAY, b"");
        assert_eq!(e.to_string(), "bad gateway (HTTP 502)");
        assert!(e.is_transient());
    }
}
