//! `keel cluster --nodes N`: a local cluster of N `keel` processes on 127.0.0.1, for trying Keel
//! out. Prints each node's endpoints and the leader, and stops them all on Ctrl-C.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Args;
use tokio::process::{Child, Command};

use crate::client::{Client, ClientOptions};
use crate::server::shutdown_signal;

/// Nodes one local cluster may have: Raft clusters are 3, 5 or 7 voters; beyond that every
/// write waits on more fsyncs without adding availability worth having on one machine.
const MAX_NODES: usize = 9;

/// How long the nodes get to elect a leader before the launcher gives up: many election
/// timeouts, so only a cluster that cannot form hits it.
const LEADER_WAIT: Duration = Duration::from_secs(30);

/// How long a node gets to finish after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

#[derive(Args, Debug, Clone)]
pub struct ClusterArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Node i listens for peers on BASE + 2(i-1) and for clients on the port above it
    /// (raftexample's 12379/12380 for node 1).
    #[arg(long, default_value_t = 12379)]
    pub base_port: u16,
    /// Parent of the nodes' data dirs and log files.
    #[arg(long, default_value = "keel-cluster")]
    pub dir: PathBuf,
    /// Further flags for every node (after `--`), e.g. `-- --snapshot-count 1000`.
    #[arg(last = true)]
    pub node_args: Vec<String>,
}

struct Node {
    id: usize,
    client: String,
    peer: String,
    log: PathBuf,
    child: Child,
}

/// The peer and client ports of node `i` (1-based).
pub fn ports(base: u16, i: usize) -> Option<(u16, u16)> {
    let peer = u32::from(base) + 2 * (i as u32 - 1);
    let client = peer + 1;
    if client > u32::from(u16::MAX) {
        return None;
    }
    Some((peer as u16, client as u16))
}

pub async fn run(args: ClusterArgs) -> anyhow::Result<()> {
    if args.nodes == 0 || args.nodes > MAX_NODES {
        bail!("--nodes must be in 1..={MAX_NODES}");
    }
    let mut urls = Vec::new();
    let mut client_ports = Vec::new();
    for i in 1..=args.nodes {
        let (peer, client) = ports(args.base_port, i).with_context(|| {
            format!("--base-port {} leaves no port for node {i}", args.base_port)
        })?;
        urls.push(format!("http://127.0.0.1:{peer}"));
        client_ports.push(client);
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let exe = std::env::current_exe().context("locating the keel binary")?;
    let cluster = urls.join(",");
    let mut nodes = Vec::new();
    for i in 1..=args.nodes {
        let log = args.dir.join(format!("node-{i}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let err = out.try_clone().context("log file")?;
        let mut cmd = Command::new(&exe);
        cmd.arg("--id")
            .arg(i.to_string())
            .arg("--cluster")
            .arg(&cluster)
            .arg("--port")
            .arg(client_ports[i - 1].to_string())
            .arg("--data-dir")
            .arg(args.dir.join(format!("node-{i}")))
            .args(&args.node_args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // A launcher that fails leaves no orphans behind.
            .kill_on_drop(true);
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe, and the closure touches nothing else.
        unsafe {
            // Nor one that is killed: the kernel stops each node when the launcher dies.
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting node {i}"))?;
        nodes.push(Node {
            id: i,
            client: format!("http://127.0.0.1:{}", client_ports[i - 1]),
            peer: urls[i - 1].clone(),
            log,
            child,
        });
    }
    for n in &nodes {
        println!(
            "node {}: client {}  peer {}  log {}",
            n.id,
            n.client,
            n.peer,
            n.log.display()
        );
    }
    let result = supervise(&mut nodes).await;
    stop_all(&mut nodes).await;
    result
}

/// Waits for a leader and prints it, then for Ctrl-C or a node exiting.
async fn supervise(nodes: &mut [Node]) -> anyhow::Result<()> {
    let endpoints: Vec<String> = nodes.iter().map(|n| n.client.clone()).collect();
    let opts = ClientOptions {
        timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_millis(200),
        ..ClientOptions::default()
    };
    let deadline = Instant::now() + LEADER_WAIT;
    let leader = loop {
        if let Some(l) = agreed_leader(&endpoints, &opts).await {
            break l;
        }
        for n in nodes.iter_mut() {
            if let Some(status) = n.child.try_wait().context("checking a node")? {
                bail!(
                    "node {} exited ({status}) before a leader was elected; see {}",
                    n.id,
                    n.log.display()
                );
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "no leader after {}s; see the node logs",
                LEADER_WAIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let at = nodes
        .iter()
        .find(|n| n.id as u64 == leader)
        .map(|n| n.client.as_str())
        .unwrap_or("?");
    println!("leader: node {leader} ({at})");
    println!("try:    curl -L {at}/my-key -XPUT -d hello && curl -L {at}/my-key");
    println!("Ctrl-C stops every node.");
    let exited = async {
        let waits = nodes.iter_mut().map(|n| {
            let id = n.id;
            Box::pin(async move { (id, n.child.wait().await) })
        });
        futures_select_all(waits).await
    };
    tokio::select! {
        _ = shutdown_signal() => {
            println!("stopping");
            Ok(())
        }
        (id, status) = exited => {
            bail!("node {id} exited ({}); stopping the others", match status {
                Ok(s) => s.to_string(),
                Err(e) => e.to_string(),
            })
        }
    }
}

/// The first of `futs` to finish.
async fn futures_select_all<F, T>(futs: impl Iterator<Item = F>) -> T
where
    F: std::future::Future<Output = T> + Unpin,
{
    let mut futs: Vec<F> = futs.collect();
    std::future::poll_fn(move |cx| {
        for f in futs.iter_mut() {
            if let std::task::Poll::Ready(v) = std::pin::Pin::new(f).poll(cx) {
                return std::task::Poll::Ready(v);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// The leader every node names, once they all answer and agree.
async fn agreed_leader(endpoints: &[String], opts: &ClientOptions) -> Option<u64> {
    let mut leader = None;
    for e in endpoints {
        let c = Client::new(&[e], opts).ok()?;
        let st = c.status().await.ok()?;
        if st.leader == 0 || leader.is_some_and(|l| l != st.leader) {
            return None;
        }
        leader = Some(st.leader);
    }
    leader
}

async fn stop_all(nodes: &mut [Node]) {
    for n in nodes.iter() {
        if let Some(pid) = n.child.id() {
            // SAFETY: kill(2) with a pid this process started and has not reaped.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
    }
    for n in nodes.iter_mut() {
        match tokio::time::timeout(STOP_GRACE, n.child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                eprintln!("node {} did not stop in time; killing it", n.id);
                let _ = n.child.kill().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_layout() {
        assert_eq!(ports(12379, 1), Some((12379, 12380)));
        assert_eq!(ports(12379, 3), Some((12383, 12384)));
        assert_eq!(ports(65533, 2), None);
        assert_eq!(ports(65534, 1), Some((65534, 65535)));
    }
}
