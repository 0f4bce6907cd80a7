//! A harness for real `keel` processes on 127.0.0.1: free ports, one log file per node, waits
//! on conditions with deadlines (never bare sleeps), and every child killed on drop.

#![allow(dead_code)] // Each test binary uses a different part of the harness.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const KEEL: &str = env!("CARGO_BIN_EXE_keel");

/// How long anything a test waits for may take: elections, catch-up, restarts. Far above what
/// a healthy cluster needs (a few seconds), so only a real failure reaches it, even on a loaded
/// 2-core CI machine running several clusters at once.
pub const WAIT: Duration = Duration::from_secs(45);

/// Between two checks of a condition.
const POLL: Duration = Duration::from_millis(50);

/// `n` distinct free ports on 127.0.0.1. The listeners are held until all ports are chosen so
/// the kernel cannot hand out one port twice.
pub fn free_ports(n: usize) -> Vec<u16> {
    let ls: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    ls.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// Polls `f` until it returns `Some`, or panics naming `what` once `WAIT` has passed.
pub fn wait_until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    wait_for(what, WAIT, &mut f)
}

pub fn wait_for<T>(what: &str, limit: Duration, f: &mut impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > limit {
            panic!("timed out after {:?} waiting for {what}", limit);
        }
        std::thread::sleep(POLL);
    }
}

/// One `keel` process: its flags, its ports and its log.
pub struct Node {
    pub id: u64,
    pub args: Vec<String>,
    pub client: u16,
    pub peer: u16,
    pub log: PathBuf,
    pub child: Option<Child>,
}

impl Node {
    pub fn new(id: u64, args: Vec<String>, client: u16, peer: u16, log: PathBuf) -> Node {
        Node {
            id,
            args,
            client,
            peer,
            log,
            child: None,
        }
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "node {} is already running", self.id);
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let err = out.try_clone().unwrap();
        let child = Command::new(KEEL)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn keel");
        self.child = Some(child);
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("node running").id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on a child this test started and has not reaped.
        let r = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(r, 0, "kill({}, {sig})", self.pid());
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then the exit status (killed if it does not stop within `WAIT`).
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        let mut c = self.child.take().unwrap();
        let status = wait_until(&format!("node {} to exit after SIGTERM", self.id), || {
            c.try_wait().unwrap()
        });
        status
    }

    /// Waits for the process to exit on its own (a refused start) and returns its status.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("node running");
        wait_until(&format!("node {} to exit", self.id), || {
            c.try_wait().unwrap()
        })
    }

    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.client)
    }

    pub fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer)
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// HTTP answers as (status, body).
pub struct Http {
    c: reqwest::blocking::Client,
}

pub type Answer = Result<(u16, Vec<u8>), String>;

impl Default for Http {
    fn default() -> Self {
        Http::new(Duration::from_secs(10))
    }
}

impl Http {
    pub fn new(timeout: Duration) -> Http {
        Http {
            c: reqwest::blocking::Client::builder()
                .timeout(timeout)
                .connect_timeout(Duration::from_secs(1))
                .no_proxy()
                .build()
                .unwrap(),
        }
    }

    fn send(&self, r: reqwest::blocking::RequestBuilder) -> Answer {
        let resp = r.send().map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp.bytes().map_err(|e| e.to_string())?.to_vec();
        Ok((status, body))
    }

    pub fn get(&self, url: &str) -> Answer {
        self.send(self.c.get(url))
    }

    pub fn put(&self, url: &str, body: impl Into<Vec<u8>>) -> Answer {
        self.send(self.c.put(url).body(body.into()))
    }

    pub fn post(&self, url: &str, body: impl Into<Vec<u8>>) -> Answer {
        self.send(self.c.post(url).body(body.into()))
    }

    pub fn delete(&self, url: &str) -> Answer {
        self.send(self.c.delete(url))
    }

    pub fn json(&self, url: &str) -> Option<Value> {
        match self.get(url) {
            Ok((200, b)) => serde_json::from_slice(&b).ok(),
            _ => None,
        }
    }
}

/// A status worth retrying: no leader, overloaded, or timed out (a timed-out write may still
/// apply, so only idempotent writes are retried).
pub fn transient(a: &Answer) -> bool {
    match a {
        Ok((s, _)) => matches!(s, 429 | 502 | 503 | 504),
        Err(_) => true,
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A set of nodes with their data under one temp dir.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: BTreeMap<u64, Node>,
    pub http: Http,
}

impl Cluster {
    pub fn empty() -> Cluster {
        Cluster {
            dir: tempfile::tempdir().unwrap(),
            nodes: BTreeMap::new(),
            http: Http::default(),
        }
    }

    /// raftexample's way: `--id i --cluster <all peer URLs> --port <client port>`.
    pub fn raftexample(n: u64, extra: &[&str]) -> Cluster {
        let mut c = Cluster::empty();
        let ports = free_ports(2 * n as usize);
        let urls: Vec<String> = (0..n as usize)
            .map(|i| format!("http://127.0.0.1:{}", ports[2 * i]))
            .collect();
        for i in 1..=n {
            let (peer, client) = (ports[2 * (i as usize - 1)], ports[2 * (i as usize - 1) + 1]);
            let mut args = vec![
                "--id".to_string(),
                i.to_string(),
                "--cluster".to_string(),
                urls.join(","),
                "--port".to_string(),
                client.to_string(),
            ];
            args.extend(extra.iter().map(|s| s.to_string()));
            c.add(i, args, client, peer);
        }
        c.start_all();
        c
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("node-{id}"))
    }

    /// Adds (does not start) a node; `--data-dir` is appended.
    pub fn add(&mut self, id: u64, mut args: Vec<String>, client: u16, peer: u16) {
        args.push("--data-dir".into());
        args.push(self.data_dir(id).display().to_string());
        let log = self.dir.path().join(format!("node-{id}.log"));
        self.nodes
            .insert(id, Node::new(id, args, client, peer, log));
    }

    pub fn start_all(&mut self) {
        for n in self.nodes.values_mut() {
            n.start();
        }
    }

    pub fn node(&self, id: u64) -> &Node {
        &self.nodes[&id]
    }

    pub fn node_mut(&mut self, id: u64) -> &mut Node {
        self.nodes.get_mut(&id).unwrap()
    }

    pub fn status(&self, id: u64) -> Option<Value> {
        self.http.json(&self.node(id).url("/v1/status"))
    }

    /// The leader all of `ids` agree on, once they do (and it is among them and says so).
    pub fn leader_of(&self, ids: &[u64]) -> u64 {
        wait_until(&format!("nodes {ids:?} to agree on a leader"), || {
            let mut leader = None;
            for &id in ids {
                let st = self.status(id)?;
                let l = st["leader"].as_u64()?;
                if l == 0 || leader.is_some_and(|x| x != l) {
                    return None;
                }
                leader = Some(l);
            }
            let l = leader?;
            if !ids.contains(&l) {
                return None;
            }
            (self.status(l)?["role"] == "leader").then_some(l)
        })
    }

    pub fn running_ids(&mut self) -> Vec<u64> {
        let mut v = Vec::new();
        for (id, n) in self.nodes.iter_mut() {
            if n.running() {
                v.push(*id);
            }
        }
        v
    }

    /// A raftexample PUT through node `id`, retried while the cluster has no leader.
    pub fn put(&self, id: u64, key: &str, value: &str) {
        let url = self.node(id).url(&format!("/{key}"));
        let a = wait_until(&format!("PUT {key} through node {id}"), || {
            let a = self.http.put(&url, value);
            (!transient(&a)).then_some(a)
        });
        match a {
            Ok((204, _)) => {}
            other => panic!("PUT {key} through node {id}: {other:?}"),
        }
    }

    /// A linearizable raftexample GET through node `id`; `None` for 404.
    pub fn get(&self, id: u64, key: &str) -> Option<String> {
        let url = self.node(id).url(&format!("/{key}"));
        let a = wait_until(&format!("GET {key} through node {id}"), || {
            let a = self.http.get(&url);
            (!transient(&a)).then_some(a)
        });
        match a {
            Ok((200, b)) => Some(text(&b)),
            Ok((404, _)) => None,
            other => panic!("GET {key} through node {id}: {other:?}"),
        }
    }

    /// Node `id`'s local state (serializable read).
    pub fn get_local(&self, id: u64, key: &str) -> Option<String> {
        match self
            .http
            .get(&self.node(id).url(&format!("/{key}?serializable=true")))
        {
            Ok((200, b)) => Some(text(&b)),
            Ok((404, _)) => None,
            other => panic!("serializable GET {key} on node {id}: {other:?}"),
        }
    }

    /// Waits until every node in `ids` has applied the leader's commit index, then checks that
    /// their state machine hashes at one revision are equal.
    pub fn hashes_agree(&self, ids: &[u64]) {
        let leader = self.leader_of(ids);
        let commit = self.status(leader).unwrap()["commit"].as_u64().unwrap();
        for &id in ids {
            wait_until(&format!("node {id} to apply index {commit}"), || {
                (self.status(id)?["applied"].as_u64()? >= commit).then_some(())
            });
        }
        let h = self.http.json(&self.node(leader).url("/v1/hash")).unwrap();
        let rev = h["revision"].as_i64().unwrap();
        for &id in ids {
            let url = self.node(id).url(&format!("/v1/hash?revision={rev}"));
            let got = wait_until(&format!("node {id} hash at revision {rev}"), || {
                self.http.json(&url)
            });
            assert_eq!(
                got["hash"], h["hash"],
                "node {id} disagrees with leader {leader} at revision {rev}: {got} vs {h}"
            );
        }
    }
}

/// Reads `path` whole; for test data written by the test.
pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A gRPC channel to a node's client port (etcd's API), connected.
pub async fn grpc_channel(port: u16) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Key and value bytes for etcd messages.
pub fn bytes_of(s: &str) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(s.as_bytes())
}
