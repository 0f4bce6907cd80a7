//! etcd's own CLI against a real 3-node Keel cluster: `tests/etcdctl/session.sh` runs a fixed
//! etcdctl (v3 API) session, `normalize.sh` replaces what differs between servers and runs (IDs,
//! terms, sizes, ports, versions, hashes), and the result must equal `expected.txt`, the same
//! session recorded against a real etcd 3.4 cluster by `tests/etcdctl/run-against-etcd.sh`.
//!
//! Needs `etcdctl` 3.4 on PATH (Debian: `apt-get install etcd-client`; `ETCDCTL` names another
//! binary). Without it the test is skipped, unless `KEEL_REQUIRE_ETCDCTL=1` makes that a failure.

mod harness;

use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::{wait_for, Cluster, WAIT};

/// The whole session takes about ten seconds; every etcdctl call in it is bounded too.
const SESSION_LIMIT: Duration = Duration::from_secs(300);

fn scripts() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/etcdctl");
    dir.canonicalize().unwrap_or(dir)
}

fn etcdctl() -> String {
    std::env::var("ETCDCTL").unwrap_or_else(|_| "etcdctl".to_string())
}

/// `etcdctl version` runs (it talks to no server).
fn etcdctl_installed() -> bool {
    Command::new(etcdctl())
        .arg("version")
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `bash script args...` with stdin from `input` (or nothing) and stdout and stderr into
/// `out`, in its own process group, killed whole if it outlives `limit`.
fn bash(script: &Path, args: &[&str], input: Option<&Path>, out: &Path, limit: Duration) {
    let stdout = File::create(out).unwrap();
    let stderr = stdout.try_clone().unwrap();
    let stdin = match input {
        Some(p) => Stdio::from(File::open(p).unwrap()),
        None => Stdio::null(),
    };
    let mut child = Command::new("bash")
        .arg(script)
        .args(args)
        .env("ETCDCTL", etcdctl())
        .stdin(stdin)
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .spawn()
        .expect("spawn bash");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            // SAFETY: kill(2) on the process group of a child this test started (bash and the
            // etcdctl processes it runs).
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            panic!(
                "{} did not finish within {limit:?}; its output:\n{}",
                script.display(),
                harness::read(out)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "{} failed ({status}):\n{}",
        script.display(),
        harness::read(out)
    );
}

/// A unified diff of `expected` against `actual` (by `diff -u`, else line by line).
fn unified_diff(expected: &Path, actual: &Path) -> String {
    if let Ok(o) = Command::new("diff")
        .arg("-u")
        .arg(expected)
        .arg(actual)
        .output()
    {
        if !o.stdout.is_empty() {
            return String::from_utf8_lossy(&o.stdout).into_owned();
        }
    }
    let (e, a) = (harness::read(expected), harness::read(actual));
    let (e, a): (Vec<&str>, Vec<&str>) = (e.lines().collect(), a.lines().collect());
    let mut d = String::new();
    for i in 0..e.len().max(a.len()) {
        let (x, y) = (e.get(i), a.get(i));
        if x != y {
            d.push_str(&format!("@@ line {} @@\n", i + 1));
            if let Some(x) = x {
                d.push_str(&format!("-{x}\n"));
            }
            if let Some(y) = y {
                d.push_str(&format!("+{y}\n"));
            }
        }
    }
    d
}

#[test]
fn etcdctl_session_matches_etcd() {
    if !etcdctl_installed() {
        if std::env::var("KEEL_REQUIRE_ETCDCTL").as_deref() == Ok("1") {
            panic!(
                "KEEL_REQUIRE_ETCDCTL=1 but `{}` is not installed: install Debian's etcd-client (apt-get install etcd-client)",
                etcdctl()
            );
        }
        println!("skipped: etcdctl not installed (apt-get install etcd-client)");
        return;
    }

    let c = Cluster::raftexample(3, &[]);
    c.leader_of(&[1, 2, 3]);
    let endpoints = c
        .nodes
        .values()
        .map(|n| format!("127.0.0.1:{}", n.client))
        .collect::<Vec<_>>()
        .join(",");
    // Every member serves etcd's gRPC API (a read, so the store stays at revision 1).
    wait_for("etcdctl endpoint health on every member", WAIT, &mut || {
        Command::new(etcdctl())
            .env("ETCDCTL_API", "3")
            .env_remove("ETCDCTL_ENDPOINTS")
            .args([
                &format!("--endpoints={endpoints}"),
                "--dial-timeout=1s",
                "--command-timeout=2s",
                "endpoint",
                "health",
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap()
            .status
            .success()
            .then_some(())
    });

    let dir = scripts();
    let raw = c.dir.path().join("etcdctl-raw.txt");
    let actual = c.dir.path().join("etcdctl-actual.txt");
    bash(
        &dir.join("session.sh"),
        &[&endpoints],
        None,
        &raw,
        SESSION_LIMIT,
    );
    bash(
        &dir.join("normalize.sh"),
        &[],
        Some(&raw),
        &actual,
        Duration::from_secs(60),
    );

    let expected = dir.join("expected.txt");
    if harness::read(&actual) != harness::read(&expected) {
        panic!(
            "etcdctl against Keel differs from etcd 3.4 ({}):\n{}",
            expected.display(),
            unified_diff(&expected, &actual)
        );
    }
}
