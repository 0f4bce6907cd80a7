//! Interaction scripts: a cluster of `RawNode`s driven step by step from `testdata/*.txt`, with
//! the exact output of every step checked against the script.
//!
//! Each file is one scenario. A block is a command, a `----` line, and the expected output up
//! to the next blank line; `#` lines are comments. Run with `REWRITE=1` to replace the expected
//! outputs with the actual ones (then read the diff before committing: the outputs are the
//! specification).
//!
//! Commands (ids are node ids; `[ID...]` empty means every node):
//!
//! - `add-nodes N [voters=(1,2,3)] [learners=(4)] [log=(1,1,2)] [term=T] [vote=V] [commit=C]
//!   [pre-vote=B] [check-quorum=B] [election=10] [heartbeat=1] [max-inflight=N]
//!   [max-size-per-msg=BYTES] [max-uncommitted-size=BYTES] [forwarding=B]`: creates N nodes with
//!   the next free ids, each on a `MemStorage` bootstrapped with the given membership (default:
//!   the new nodes themselves as voters; `voters=()` is a node that has yet to join). `log=`
//!   writes entries of those terms at indices 1.. before the node starts; `term`, `vote` and
//!   `commit` set its hard state (term defaults to the last log term). Config options default to
//!   `Config::new(id)`, so seeds are the ids and every run is identical.
//! - `campaign ID`: the node times out at once (a pre-election first if PreVote is on).
//! - `tick ID [N]`, `tick-heartbeat ID` (heartbeat_tick ticks), `tick-election ID` (a leader:
//!   election_tick ticks; anyone else: until it campaigns, at most its randomized timeout).
//! - `propose ID DATA...` (several payloads are one `propose_batch`),
//!   `propose-conf-change ID add|add-learner|remove NODE`, `read-index ID CTX`,
//!   `transfer-leader LEADER TO`, `report-unreachable ID PEER`, `report-snapshot ID PEER ok|fail`.
//! - `process-ready [ID...]`: handle one Ready of each node: persist to its `MemStorage` (a
//!   snapshot through `apply_snapshot`), send its messages (queued; dropped at once if either end
//!   is isolated), apply committed entries (conf changes through `apply_conf_change`; a snapshot
//!   replaces the application's state), report read states, `advance`.
//! - `deliver-msgs [drop] [ID...]`: step (or drop) the queued messages addressed to those nodes.
//! - `stabilize [ID...]`: process-ready and deliver among those nodes until nothing is left.
//! - `isolate ID`, `heal [ID...]`: cut a node off from everyone (queued messages to or from it
//!   are dropped too), and undo it.
//! - `restart ID`: crash and restart: the node keeps only its `MemStorage`, and its application
//!   starts again from the storage's snapshot.
//! - `compact ID INDEX`: the application snapshots its state at an applied INDEX
//!   (`create_snapshot` with the configuration in force there) and compacts the log up to it.
//! - `status ID` (hard and soft state, configuration, the leader's view of progress, the
//!   application's state), `raft-state` (one line per node), `raft-log ID`.
//!
//! Output: a message as `from->to Type term=.. fields` where `T/I` is term T index I
//! (`log=` the entry before an append's entries, `hint=` a rejection's hint); `N persist ..` for
//! new entries and term/vote changes; `N became ROLE at term T` (or `follows L` / `lost its
//! leader`) when a Ready reports a new role or leader; `N applied T/I .., T/I ..` for the normal
//! entries a Ready applies (a conf change gets a line of its own, decoded, with the configuration
//! it results in); `N installed snapshot ..`; `N read-state index=.. ctx=..`.
//! A command with nothing to say prints `ok`; an error the core returns prints `error: ..`.

#[path = "interaction/describe.rs"]
mod describe;
#[path = "interaction/env.rs"]
mod env;
#[path = "interaction/script.rs"]
mod script;

use std::path::Path;

#[test]
fn interaction_scripts() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let rewrite = std::env::var_os("REWRITE").is_some_and(|v| v == "1");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("testdata directory")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no scripts in testdata");
    let mut failures = Vec::new();
    for path in &files {
        let name = path
            .strip_prefix(Path::new(env!("CARGO_MANIFEST_DIR")))
            .unwrap_or(path)
            .display()
            .to_string();
        let text = std::fs::read_to_string(path).expect("readable script");
        let mut env = env::Env::default();
        let outcome = script::run(&name, &text, |c| env.exec(c));
        if let Some(err) = &outcome.aborted {
            failures.push(format!("{err}\n"));
            continue;
        }
        if rewrite {
            if outcome.rewritten != text {
                std::fs::write(path, &outcome.rewritten).expect("rewrite script");
                eprintln!("rewrote {name}");
            }
            continue;
        }
        for m in &outcome.mismatches {
            failures.push(format!(
                "{}: `{}` output differs (- expected, + actual):\n{}",
                m.loc,
                m.command,
                script::diff(&m.expected, &m.actual)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failure(s); REWRITE=1 regenerates outputs:\n\n{}",
        failures.len(),
        failures.join("\n")
    );
}
