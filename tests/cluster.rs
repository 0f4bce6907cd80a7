//! Real `keel` processes on 127.0.0.1, driven over HTTP as a user would: the reference designs'
//! scenarios, restarts, crashes, a paused leader, joining by address, and bad input.

mod harness;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{free_ports, text, transient, wait_until, Cluster, Http, WAIT};

/// The seed design's end-to-end test: four nodes from a JSON config, one leader, a put through
/// node 1 and one through a follower (forwarded), gets from nodes 3 and 4, then the leader is
/// killed and a new one takes writes while the survivors agree.
#[test]
fn reference_scenario_four_nodes_from_a_json_config() {
    let mut c = Cluster::empty();
    let ports = free_ports(8);
    let nodes: Vec<String> = (0..4)
        .map(|i| {
            format!(
                r#"{{"ID": "node-0{}", "Endpoint": "127.0.0.1:{}", "Client": "127.0.0.1:{}"}}"#,
                i + 1,
                ports[2 * i],
                ports[2 * i + 1]
            )
        })
        .collect();
    for i in 1..=4u64 {
        let cfg = c.dir.path().join(format!("node-0{i}.json"));
        std::fs::write(
            &cfg,
            format!(r#"{{"ID": "node-0{i}", "Nodes": [{}]}}"#, nodes.join(",")),
        )
        .unwrap();
        let (peer, client) = (ports[2 * (i as usize - 1)], ports[2 * (i as usize - 1) + 1]);
        c.add(
            i,
            vec!["--config".into(), cfg.display().to_string()],
            client,
            peer,
        );
    }
    c.start_all();
    let all = [1, 2, 3, 4];
    let leader = c.leader_of(&all);
    let roles: Vec<String> = all
        .iter()
        .map(|&id| c.status(id).unwrap()["role"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        roles.iter().filter(|r| *r == "leader").count(),
        1,
        "exactly one leader: {roles:?}"
    );

    c.put(1, "key-01", "value-01");
    let follower = *all.iter().find(|&&id| id != leader && id != 1).unwrap();
    let (status, _) = c
        .http
        .put(&c.node(follower).url("/key-02"), "value-02")
        .unwrap();
    assert_eq!(status, 204, "a follower forwards the write to the leader");
    for id in [3, 4] {
        assert_eq!(c.get(id, "key-01").as_deref(), Some("value-01"));
        assert_eq!(c.get(id, "key-02").as_deref(), Some("value-02"));
    }
    let log = c.node(leader).log_text();
    assert!(
        log.contains("became leader at term"),
        "the leader logs its role change:\n{log}"
    );

    let killed_at = Instant::now();
    c.node_mut(leader).kill();
    let survivors: Vec<u64> = all.iter().copied().filter(|&id| id != leader).collect();
    let new_leader = c.leader_of(&survivors);
    let elected = killed_at.elapsed();
    assert_ne!(new_leader, leader);
    c.put(survivors[0], "key-03", "value-03");
    println!("re-election after kill -9 of the leader: {elected:?}");
    assert_eq!(c.get(survivors[2], "key-03").as_deref(), Some("value-03"));
    c.hashes_agree(&survivors);
    assert!(c
        .node(new_leader)
        .log_text()
        .contains("became leader at term"));
}

/// raftexample's README: three nodes with --id/--cluster/--port, PUT and GET, add node 4 with
/// `POST /4` and start it with --join (it catches up by snapshot, the log being compacted),
/// then `DELETE /3`, and the cluster keeps serving.
#[test]
fn raftexample_scenario_add_by_snapshot_and_remove() {
    let extra = ["--snapshot-count", "20"];
    let mut c = Cluster::raftexample(3, &extra);
    let leader = c.leader_of(&[1, 2, 3]);
    c.put(1, "my-key", "hello");
    assert_eq!(c.get(1, "my-key").as_deref(), Some("hello"));
    for i in 0..100 {
        c.put(1 + i % 3, &format!("k{i:03}"), &format!("v{i}"));
    }
    let snap = c.status(leader).unwrap()["snapshot_index"]
        .as_u64()
        .unwrap();
    assert!(
        snap > 60,
        "the leader compacted its log (snapshot at {snap})"
    );

    let ports = free_ports(2);
    let (peer4, client4) = (ports[0], ports[1]);
    let peer_url4 = format!("http://127.0.0.1:{peer4}");
    let (status, body) = c
        .http
        .post(&c.node(2).url("/4"), peer_url4.clone())
        .unwrap();
    assert_eq!(status, 204, "POST /4: {}", text(&body));
    let cluster = format!(
        "{},{},{},{peer_url4}",
        c.node(1).peer_url(),
        c.node(2).peer_url(),
        c.node(3).peer_url()
    );
    let mut args: Vec<String> = [
        "--id",
        "4",
        "--cluster",
        &cluster,
        "--port",
        &client4.to_string(),
        "--join",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    c.add(4, args, client4, peer4);
    c.node_mut(4).start();
    c.hashes_agree(&[1, 2, 3, 4]);
    assert_eq!(c.get_local(4, "k099").as_deref(), Some("v99"));
    assert_eq!(c.get_local(4, "my-key").as_deref(), Some("hello"));
    let log4 = c.node(4).log_text();
    assert!(
        log4.contains("installed snapshot at index"),
        "node 4 caught up by snapshot:\n{log4}"
    );

    let (status, body) = c.http.delete(&c.node(1).url("/3")).unwrap();
    assert_eq!(status, 204, "DELETE /3: {}", text(&body));
    let members = c.http.json(&c.node(1).url("/v1/members")).unwrap();
    let ids: Vec<u64> = members["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 2, 4]);
    c.node_mut(3).kill();
    c.put(4, "after-remove", "still-serving");
    assert_eq!(c.get(1, "after-remove").as_deref(), Some("still-serving"));
    c.hashes_agree(&[1, 2, 4]);
}

/// SIGTERM every node and restart: every acknowledged write is there. Then kill -9 a follower
/// under write load, restart it: it catches up and the hashes agree.
#[test]
fn restart_keeps_acknowledged_writes_and_a_crashed_follower_catches_up() {
    let mut c = Cluster::raftexample(3, &[]);
    c.leader_of(&[1, 2, 3]);
    for i in 0..30 {
        c.put(1 + i % 3, &format!("before-{i}"), &format!("{i}"));
    }
    for id in [1, 2, 3] {
        let st = c.node_mut(id).stop();
        assert!(st.success(), "node {id} exits cleanly on SIGTERM: {st}");
        assert!(c.node(id).log_text().contains("node shut down"));
    }
    c.start_all();
    let leader = c.leader_of(&[1, 2, 3]);
    for i in 0..30 {
        assert_eq!(
            c.get(1 + (i + 1) % 3, &format!("before-{i}")).as_deref(),
            Some(format!("{i}").as_str()),
            "write {i} survived the restart"
        );
    }

    let follower = [1, 2, 3].into_iter().find(|&id| id != leader).unwrap();
    let acked = Arc::new(AtomicU64::new(0));
    let writer = {
        let url = format!("http://127.0.0.1:{}", c.node(leader).client);
        let acked = acked.clone();
        std::thread::spawn(move || {
            let http = Http::default();
            let deadline = Instant::now() + WAIT;
            for i in 0..300u64 {
                loop {
                    assert!(Instant::now() < deadline, "writer stalled at {i}");
                    let a = http.put(&format!("{url}/load-{i}"), format!("{i}"));
                    if !transient(&a) {
                        assert_eq!(a.as_ref().unwrap().0, 204, "{a:?}");
                        break;
                    }
                }
                acked.store(i + 1, Ordering::SeqCst);
            }
        })
    };
    wait_until("50 writes under load", || {
        (acked.load(Ordering::SeqCst) >= 50).then_some(())
    });
    c.node_mut(follower).kill();
    let at_kill = acked.load(Ordering::SeqCst);
    wait_until("100 more writes with the follower down", || {
        (acked.load(Ordering::SeqCst) >= at_kill + 100).then_some(())
    });
    c.node_mut(follower).start();
    writer.join().expect("writer");
    c.hashes_agree(&[1, 2, 3]);
    for i in (0..300).step_by(7) {
        assert_eq!(
            c.get_local(follower, &format!("load-{i}")).as_deref(),
            Some(format!("{i}").as_str()),
            "the restarted follower has write {i}"
        );
    }
}

/// SIGSTOP the leader: the others elect a new one and take a write. SIGCONT: the old leader
/// steps down and never answers a linearizable read with the value it last knew.
#[test]
fn paused_leader_steps_down_and_serves_no_stale_read() {
    let c = Cluster::raftexample(3, &[]);
    let old = c.leader_of(&[1, 2, 3]);
    c.put(old, "x", "v1");
    c.node(old).signal(libc::SIGSTOP);
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|&id| id != old).collect();
    let new = c.leader_of(&others);
    assert_ne!(new, old);
    c.put(new, "x", "v2");
    c.node(old).signal(libc::SIGCONT);
    // Straight after waking up the old leader still believes it leads; a linearizable read
    // through it must either see v2 or fail, never return v1.
    let url = c.node(old).url("/x");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut answered = 0;
    while Instant::now() < deadline {
        // Errors (no leader, timeout) are allowed; only a stale value is not.
        if let Ok((200, b)) = c.http.get(&url) {
            assert_eq!(text(&b), "v2", "stale read from the old leader");
            answered += 1;
            if answered >= 20 {
                break;
            }
        }
    }
    assert!(
        answered > 0,
        "the old leader answered no read after rejoining"
    );
    let leader = c.leader_of(&[1, 2, 3]);
    assert_ne!(leader, old);
    assert_eq!(c.status(old).unwrap()["role"], "follower");
    assert_eq!(c.get(old, "x").as_deref(), Some("v2"));
    c.hashes_agree(&[1, 2, 3]);
}

fn dynamic_args(id_flag: &[&str], peer: u16, client: u16, mode: &[String]) -> Vec<String> {
    let mut v: Vec<String> = id_flag.iter().map(|s| s.to_string()).collect();
    v.extend([
        "--peer-url".to_string(),
        format!("http://127.0.0.1:{peer}"),
        "--port".to_string(),
        client.to_string(),
    ]);
    v.extend(mode.iter().cloned());
    v
}

/// Seed 001's start-up: one node waits for three (--bootstrap-expect), the others join by its
/// address; a fourth joins later through a follower and keeps its identity across a restart.
#[test]
fn bootstrap_expect_and_join_by_address() {
    let mut c = Cluster::empty();
    let p = free_ports(8);
    c.add(
        1,
        dynamic_args(
            &["--id", "1"],
            p[0],
            p[1],
            &["--bootstrap-expect".into(), "3".into()],
        ),
        p[1],
        p[0],
    );
    let join1 = vec!["--join-addr".to_string(), format!("127.0.0.1:{}", p[1])];
    c.add(
        2,
        dynamic_args(&["--id", "2"], p[2], p[3], &join1),
        p[3],
        p[2],
    );
    c.add(
        3,
        dynamic_args(&["--name", "node-3"], p[4], p[5], &join1),
        p[5],
        p[4],
    );
    c.start_all();
    let leader = c.leader_of(&[1, 2, 3]);
    let members = c.http.json(&c.node(leader).url("/v1/members")).unwrap();
    assert_eq!(members["members"].as_array().unwrap().len(), 3, "{members}");
    c.put(2, "formed", "yes");
    assert_eq!(c.get(3, "formed").as_deref(), Some("yes"));

    let follower = [1, 2, 3].into_iter().find(|&id| id != leader).unwrap();
    let via = vec![
        "--join-addr".to_string(),
        format!("127.0.0.1:{}", c.node(follower).client),
    ];
    c.add(
        4,
        dynamic_args(&["--name", "server4"], p[6], p[7], &via),
        p[7],
        p[6],
    );
    c.node_mut(4).start();
    c.hashes_agree(&[1, 2, 3, 4]);
    assert_eq!(c.get_local(4, "formed").as_deref(), Some("yes"));
    let st = c.status(4).unwrap();
    assert_eq!(st["id"], 4, "the id comes from the name's digits: {st}");

    assert!(c.node_mut(4).stop().success());
    c.node_mut(4).start();
    c.put(4, "after-restart", "ok");
    let members = c.http.json(&c.node(1).url("/v1/members")).unwrap();
    assert_eq!(
        members["members"].as_array().unwrap().len(),
        4,
        "a restarted joiner does not join again: {members}"
    );
    c.hashes_agree(&[1, 2, 3, 4]);
}

fn error_code(a: &harness::Answer) -> String {
    match a {
        Ok((_, b)) => serde_json::from_slice::<serde_json::Value>(b)
            .ok()
            .and_then(|v| v["code"].as_str().map(str::to_string))
            .unwrap_or_else(|| format!("not a JSON error: {}", text(b))),
        Err(e) => e.clone(),
    }
}

/// Every bad input gets a clear JSON error and changes nothing.
#[test]
fn bad_requests_are_refused_and_change_nothing() {
    let c = Cluster::raftexample(1, &["--max-request-bytes", "4096"]);
    c.leader_of(&[1]);
    let n = c.node(1);
    let h = &c.http;
    c.put(1, "k", "v");
    let rev = |c: &Cluster| c.status(1).unwrap()["applied"].as_u64().unwrap();
    let before = rev(&c);

    let a = h.put(&n.url("/big"), vec![b'x'; 5000]);
    assert_eq!(a.as_ref().unwrap().0, 413, "{a:?}");
    assert_eq!(error_code(&a), "request_too_large");
    let a = h.put(&n.url("/"), "v");
    assert_eq!(a.as_ref().unwrap().0, 400, "empty key: {a:?}");
    let a = h.post(&n.url("/abc"), "http://127.0.0.1:1");
    assert_eq!(a.as_ref().unwrap().0, 400, "non-numeric id: {a:?}");
    let a = h.post(&n.url("/2"), "not a url");
    assert_eq!(a.as_ref().unwrap().0, 400, "bad peer URL: {a:?}");
    let a = h.delete(&n.url("/99"));
    assert_eq!(a.as_ref().unwrap().0, 404, "unknown node: {a:?}");
    let a = h.delete(&n.url("/1"));
    assert_eq!(a.as_ref().unwrap().0, 409, "last voter: {a:?}");
    let a = h.post(&n.url("/v1/members"), "{not json");
    assert_eq!(a.as_ref().unwrap().0, 400, "malformed JSON: {a:?}");
    assert_eq!(c.get(1, "big"), None);
    assert_eq!(rev(&c), before, "nothing was applied");
    let members = h.json(&n.url("/v1/members")).unwrap();
    assert_eq!(members["members"].as_array().unwrap().len(), 1);

    // Garbage on the peer port is dropped with the connection; the node keeps serving.
    {
        use std::io::Write as _;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", n.peer)).unwrap();
        let _ = s.write_all(&[0xff; 4096]);
        let mut s = std::net::TcpStream::connect(("127.0.0.1", n.peer)).unwrap();
        let _ = s.write_all(&u32::MAX.to_le_bytes());
        let _ = s.write_all(&[7; 64]);
    }
    c.put(1, "after-garbage", "fine");
    assert_eq!(c.get(1, "after-garbage").as_deref(), Some("fine"));
}

/// A second membership change while one is pending is refused with 409.
#[test]
fn second_membership_change_while_one_is_pending_conflicts() {
    let c = Cluster::raftexample(1, &[]);
    c.leader_of(&[1]);
    let dead = free_ports(2);
    let h = &c.http;
    let n = c.node(1);
    // Node 2 never starts: once it is a voter, no quorum is left to commit another change.
    let a = h.post(&n.url("/2"), format!("http://127.0.0.1:{}", dead[0]));
    assert_eq!(a.as_ref().unwrap().0, 204, "{a:?}");
    let last = c.status(1).unwrap()["last_index"].as_u64().unwrap();
    let pending = {
        let url = n.url("/3");
        let body = format!("http://127.0.0.1:{}", dead[1]);
        std::thread::spawn(move || Http::default().post(&url, body))
    };
    wait_until("the second change to be proposed", || {
        (c.status(1)?["last_index"].as_u64()? > last).then_some(())
    });
    let a = h.delete(&n.url("/2"));
    assert_eq!(a.as_ref().unwrap().0, 409, "{a:?}");
    let pending = pending.join().unwrap();
    assert!(
        transient(&pending),
        "the stuck change times out: {pending:?}"
    );
    let members = h.json(&n.url("/v1/members")).unwrap();
    assert_eq!(members["members"].as_array().unwrap().len(), 2, "{members}");
}

/// A bad config file, a port in use and a damaged data dir each stop the process with a
/// message saying what is wrong.
#[test]
fn bad_start_ups_exit_with_a_clear_message() {
    let mut c = Cluster::empty();
    let p = free_ports(4);
    let cfg = c.dir.path().join("bad.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"ID": "node-01", "Nodes": [{{"ID": "node-01", "Endpont": "127.0.0.1:{}"}}]}}"#,
            p[0]
        ),
    )
    .unwrap();
    c.add(
        1,
        vec!["--config".into(), cfg.display().to_string()],
        p[1],
        p[0],
    );
    c.node_mut(1).start();
    assert!(!c.node_mut(1).wait_exit().success());
    let log = c.node(1).log_text();
    assert!(log.contains("Nodes[0]") && log.contains("Endpont"), "{log}");

    let busy = std::net::TcpListener::bind(("127.0.0.1", p[3])).unwrap();
    c.add(
        2,
        vec![
            "--id".into(),
            "2".into(),
            "--port".into(),
            p[3].to_string(),
            "--peer-url".into(),
            format!("127.0.0.1:{}", p[2]),
        ],
        p[3],
        p[2],
    );
    c.node_mut(2).start();
    assert!(!c.node_mut(2).wait_exit().success());
    let log = c.node(2).log_text();
    assert!(
        log.contains(&format!("cannot listen for clients on 127.0.0.1:{}", p[3]))
            && log.contains("in use"),
        "{log}"
    );
    drop(busy);

    // A damaged WAL: written by a clean run, then a byte flipped among the synced records.
    c.node_mut(2).start();
    c.leader_of(&[2]);
    for i in 0..40 {
        c.put(2, &format!("k{i}"), &"v".repeat(100));
    }
    let wal_bytes = c.status(2).unwrap()["wal_bytes"].as_u64().unwrap();
    assert!(c.node_mut(2).stop().success());
    let wal_dir = c.data_dir(2).join("wal");
    let seg = std::fs::read_dir(&wal_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .max()
        .expect("a WAL segment");
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = (wal_bytes / 2) as usize;
    bytes[at] ^= 0x40;
    std::fs::write(&seg, &bytes).unwrap();
    c.node_mut(2).start();
    assert!(
        !c.node_mut(2).wait_exit().success(),
        "a damaged WAL is refused"
    );
    let log = c.node(2).log_text();
    let tail = &log[log.len().saturating_sub(2000)..];
    assert!(
        tail.contains(&seg.file_name().unwrap().to_string_lossy().to_string()),
        "the error names the damaged file:\n{tail}"
    );
}

/// The README's "run it" command: `keel cluster --nodes 3` prints the endpoints and the
/// leader, serves, and stops every node on SIGINT.
#[test]
fn keel_cluster_launcher_starts_and_stops_three_nodes() {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir().unwrap();
    // Six consecutive free ports: the launcher lays nodes out from a base port.
    let base = wait_until("six consecutive free ports", || {
        let p = free_ports(1)[0];
        if p > 65000 {
            return None;
        }
        let held: Vec<_> = (0..6)
            .map(|i| std::net::TcpListener::bind(("127.0.0.1", p + i)))
            .collect();
        held.iter().all(|l| l.is_ok()).then_some(p)
    });
    let child = std::process::Command::new(harness::KEEL)
        .args(["cluster", "--nodes", "3", "--base-port", &base.to_string()])
        .arg("--dir")
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + WAIT;
    while !lines.iter().any(|l: &String| l.starts_with("leader: node")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => lines.push(l),
            Err(_) => panic!("no leader line from keel cluster: {lines:?}"),
        }
    }
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("node ")).count(),
        3,
        "{lines:?}"
    );
    let http = Http::default();
    let url = format!("http://127.0.0.1:{}/hello", base + 3);
    let put = wait_until("a write to node 2", || {
        let a = http.put(&url, "world");
        (!transient(&a)).then_some(a)
    });
    assert_eq!(put.unwrap().0, 204);
    let got = http
        .get(&format!("http://127.0.0.1:{}/hello", base + 5))
        .unwrap();
    assert_eq!((got.0, text(&got.1).as_str()), (200, "world"));
    // SAFETY: kill(2) on the launcher this test started and has not reaped.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGINT) };
    let st = wait_until("the launcher to exit", || child.0.try_wait().unwrap());
    assert!(st.success(), "{st}");
    wait_until("every node to stop listening", || {
        (0..3)
            .all(|i| std::net::TcpStream::connect(("127.0.0.1", base + 2 * i + 1)).is_err())
            .then_some(())
    });
}

/// Kills the launcher if the test ends while it still runs (a failed assertion).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
