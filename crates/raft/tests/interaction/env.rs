//! The simulated cluster the scripts drive: nodes, their applications, and a network queue.

use crate::describe;
use crate::script::Cmd;
use bytes::Bytes;
use keel_raft::raftpb::{
    ConfChange, ConfChangeType, ConfState, Entry, EntryType, HardState, Message,
};
use keel_raft::{Config, MemStorage, ProgressState, RawNode, StateRole};
use prost::Message as _;
use std::collections::{BTreeMap, BTreeSet};

/// `stabilize` gives up after this many rounds: a cluster that keeps talking without any input
/// (a livelock) is a bug worth a failure, not an endless test.
const MAX_STABILIZE_ROUNDS: usize = 200;

/// A node and the application around it.
struct Node {
    raw: RawNode<MemStorage>,
    /// Kept to restart the node with the same configuration.
    cfg: Config,
    /// The state machine: every applied non-empty normal entry's payload, with its index.
    /// Entries restored from a snapshot carry the snapshot's index.
    app: Vec<(u64, Bytes)>,
    /// The configuration after each applied membership change, starting with the initial one,
    /// so that a snapshot at any applied index can record the configuration in force there.
    confs: Vec<(u64, ConfState)>,
    /// Highest index the application has applied.
    applied: u64,
    /// Role and leader as last reported by a Ready, to tell a role change from a leader change.
    soft: (StateRole, u64),
}

impl Node {
    fn app_data(&self, upto: u64) -> Bytes {
        // The snapshot format of this toy application: payloads joined by commas.
        let v: Vec<String> = self
            .app
            .iter()
            .filter(|(i, _)| *i <= upto)
            .map(|(_, d)| String::from_utf8_lossy(d).into_owned())
            .collect();
        Bytes::from(v.join(","))
    }

    fn conf_at(&self, index: u64) -> ConfState {
        self.confs
            .iter()
            .rev()
            .find(|(i, _)| *i <= index)
            .map(|(_, c)| c.clone())
            .unwrap_or_default()
    }
}

#[derive(Default)]
pub struct Env {
    nodes: BTreeMap<u64, Node>,
    /// Messages sent and not yet delivered, in the order they were sent.
    net: Vec<Message>,
    /// Nodes cut off from everyone: messages to or from them are dropped when sent.
    isolated: BTreeSet<u64>,
}

type Out = Vec<String>;

impl Env {
    pub fn exec(&mut self, c: &Cmd) -> Result<String, String> {
        let mut out = Out::new();
        if c.name != "add-nodes" {
            c.only_keys(&[])?;
        }
        match c.name.as_str() {
            "add-nodes" => self.add_nodes(c)?,
            "campaign" => {
                c.expect_pos(1, 1)?;
                let res = self.node(c.num(0)?)?.raw.campaign();
                push_err(&mut out, res);
            }
            "tick" => {
                c.expect_pos(1, 2)?;
                let n = if c.pos.len() == 2 { c.num(1)? } else { 1 };
                let node = self.node(c.num(0)?)?;
                for _ in 0..n {
                    node.raw.tick();
                }
            }
            "tick-heartbeat" => {
                c.expect_pos(1, 1)?;
                let node = self.node(c.num(0)?)?;
                for _ in 0..node.cfg.heartbeat_tick {
                    node.raw.tick();
                }
            }
            "tick-election" => {
                c.expect_pos(1, 1)?;
                let node = self.node(c.num(0)?)?;
                tick_election(node);
            }
            "propose" => {
                c.expect_pos(2, usize::MAX)?;
                let data: Vec<Bytes> = c.pos[1..].iter().map(|s| Bytes::from(s.clone())).collect();
                let raw = &mut self.node(c.num(0)?)?.raw;
                // Several payloads go through propose_batch: one append for all of them.
                let res = if data.len() == 1 {
                    raw.propose(data[0].clone())
                } else {
                    raw.propose_batch(data)
                };
                push_err(&mut out, res);
            }
            "propose-conf-change" => {
                c.expect_pos(3, 3)?;
                let change_type = match c.arg(1)? {
                    "add" => ConfChangeType::AddNode,
                    "add-learner" => ConfChangeType::AddLearnerNode,
                    "remove" => ConfChangeType::RemoveNode,
                    k => return Err(format!("unknown conf change `{k}`")),
                };
                let mut cc = ConfChange {
                    node_id: c.num(2)?,
                    ..Default::default()
                };
                cc.set_change_type(change_type);
                let res = self.node(c.num(0)?)?.raw.propose_conf_change(cc);
                push_err(&mut out, res);
            }
            "read-index" => {
                c.expect_pos(2, 2)?;
                let ctx = Bytes::from(c.arg(1)?.to_string());
                let res = self.node(c.num(0)?)?.raw.read_index(ctx);
                push_err(&mut out, res);
            }
            "transfer-leader" => {
                c.expect_pos(2, 2)?;
                let to = c.num(1)?;
                self.node(c.num(0)?)?.raw.transfer_leader(to);
            }
            "report-unreachable" => {
                c.expect_pos(2, 2)?;
                let peer = c.num(1)?;
                self.node(c.num(0)?)?.raw.report_unreachable(peer);
            }
            "report-snapshot" => {
                c.expect_pos(3, 3)?;
                let peer = c.num(1)?;
                let ok = match c.arg(2)? {
                    "ok" => true,
                    "fail" => false,
                    s => return Err(format!("report-snapshot takes ok|fail, got `{s}`")),
                };
                self.node(c.num(0)?)?.raw.report_snapshot(peer, ok);
            }
            "process-ready" => {
                for id in self.ids_or_all(c)? {
                    self.process_ready(id, &mut out);
                }
            }
            "deliver-msgs" => {
                let drop = c.pos.first().map(String::as_str) == Some("drop");
                let ids = if drop {
                    let mut c = c.clone();
                    c.pos.remove(0);
                    self.ids_or_all(&c)?
                } else {
                    self.ids_or_all(c)?
                };
                if drop {
                    self.drop_msgs(|m| ids.contains(&m.to), &mut out);
                } else {
                    self.deliver(&ids, &mut out);
                }
            }
            "stabilize" => {
                let ids = self.ids_or_all(c)?;
                self.stabilize(&ids, &mut out)?;
            }
            "isolate" => {
                c.expect_pos(1, 1)?;
                let id = c.num(0)?;
                self.node(id)?;
                self.isolated.insert(id);
                self.drop_msgs(|m| m.to == id || m.from == id, &mut out);
            }
            "heal" => {
                if c.pos.is_empty() {
                    self.isolated.clear();
                } else {
                    for id in c.ids()? {
                        self.isolated.remove(&id);
                    }
                }
            }
            "compact" => {
                c.expect_pos(2, 2)?;
                let idx = c.num(1)?;
                let node = self.node(c.num(0)?)?;
                if idx > node.applied {
                    out.push(format!("error: index {idx} is not applied yet"));
                } else {
                    let (cs, data) = (node.conf_at(idx), node.app_data(idx));
                    let store = node.raw.store_mut();
                    let res = store
                        .create_snapshot(idx, cs, data)
                        .and_then(|()| store.compact(idx));
                    if let Err(e) = res {
                        out.push(format!("error: {e}"));
                    }
                }
            }
            "restart" => {
                c.expect_pos(1, 1)?;
                restart(self.node(c.num(0)?)?)?;
            }
            "status" => {
                c.expect_pos(1, 1)?;
                let id = c.num(0)?;
                self.status(id, &mut out)?;
            }
            "raft-state" => {
                for (id, n) in &self.nodes {
                    out.push(self.summary(*id, n));
                }
            }
            "raft-log" => {
                c.expect_pos(1, 1)?;
                let id = c.num(0)?;
                raft_log(&self.node(id)?.raw, &mut out);
            }
            other => return Err(format!("unknown command `{other}`")),
        }
        Ok(out.join("\n"))
    }

    fn node(&mut self, id: u64) -> Result<&mut Node, String> {
        self.nodes
            .get_mut(&id)
            .ok_or_else(|| format!("no node {id}"))
    }

    fn ids_or_all(&self, c: &Cmd) -> Result<Vec<u64>, String> {
        let ids = c.ids()?;
        if ids.is_empty() {
            return Ok(self.nodes.keys().copied().collect());
        }
        for id in &ids {
            if !self.nodes.contains_key(id) {
                return Err(format!("no node {id}"));
            }
        }
        Ok(ids)
    }

    /// `add-nodes N [voters=(..)] [learners=(..)] [log=(terms)] [term=T] [vote=V] [commit=C]
    /// [config options]`: new nodes get the next free ids.
    fn add_nodes(&mut self, c: &Cmd) -> Result<(), String> {
        c.expect_pos(1, 1)?;
        c.only_keys(&[
            "voters",
            "learners",
            "log",
            "term",
            "vote",
            "commit",
            "pre-vote",
            "check-quorum",
            "election",
            "heartbeat",
            "max-inflight",
            "max-size-per-msg",
            "max-uncommitted-size",
            "forwarding",
        ])?;
        let n = c.num(0)?;
        let first = self.nodes.keys().last().map_or(1, |id| id + 1);
        let new_ids: Vec<u64> = (first..first + n).collect();
        let voters = c.list("voters")?.unwrap_or_else(|| new_ids.clone());
        let learners = c.list("learners")?.unwrap_or_default();
        let log = c.list("log")?.unwrap_or_default();
        for id in new_ids {
            let mut store = MemStorage::new_with_conf_state(voters.clone(), learners.clone());
            // A pre-existing log, written as if by an earlier life of the node, for scenarios
            // (such as the paper's Figure 7) that start from divergent logs.
            let ents: Vec<Entry> = log
                .iter()
                .enumerate()
                .map(|(i, &term)| Entry {
                    term,
                    index: i as u64 + 1,
                    ..Default::default()
                })
                .collect();
            store.append(&ents).map_err(|e| e.to_string())?;
            let last_term = log.last().copied().unwrap_or(0);
            store.set_hard_state(HardState {
                term: c.u64_or("term", last_term)?,
                vote: c.u64_or("vote", 0)?,
                commit: c.u64_or("commit", 0)?,
            });
            let mut cfg = Config::new(id);
            // The application applied the committed part of a pre-existing log in its earlier
            // life; only what commits from now on is applied (and printed).
            let commit = c.u64_or("commit", 0)?;
            cfg.applied = commit;
            cfg.pre_vote = c.bool_or("pre-vote", cfg.pre_vote)?;
            cfg.check_quorum = c.bool_or("check-quorum", cfg.check_quorum)?;
            cfg.election_tick = c.u64_or("election", cfg.election_tick as u64)? as usize;
            cfg.heartbeat_tick = c.u64_or("heartbeat", cfg.heartbeat_tick as u64)? as usize;
            cfg.max_inflight_msgs =
                c.u64_or("max-inflight", cfg.max_inflight_msgs as u64)? as usize;
            cfg.max_size_per_msg = c.u64_or("max-size-per-msg", cfg.max_size_per_msg)?;
            cfg.max_uncommitted_size =
                c.u64_or("max-uncommitted-size", cfg.max_uncommitted_size)?;
            cfg.disable_proposal_forwarding = !c.bool_or("forwarding", true)?;
            let raw = RawNode::new(&cfg, store).map_err(|e| e.to_string())?;
            let node = Node {
                raw,
                cfg,
                app: Vec::new(),
                confs: vec![(
                    0,
                    ConfState {
                        voters: voters.clone(),
                        learners: learners.clone(),
                    },
                )],
                applied: commit,
                soft: (StateRole::Follower, 0),
            };
            self.nodes.insert(id, node);
        }
        Ok(())
    }

    /// Handles one Ready of `id`, in the order the Ready contract prescribes: persist, send,
    /// apply, hand out reads, advance.
    fn process_ready(&mut self, id: u64, out: &mut Out) {
        let node = self.nodes.get_mut(&id).expect("caller checked the id");
        if !node.raw.has_ready() {
            return;
        }
        let rd = node.raw.ready();
        let term = node.raw.raft.term;
        if let Some(ss) = rd.soft_state {
            out.push(role_line(id, node.soft, (ss.role, ss.leader_id), term));
            node.soft = (ss.role, ss.leader_id);
        }

        let store = node.raw.store_mut();
        let mut persist = Vec::new();
        if let Some(hs) = rd.hard_state {
            let old = store.hard_state;
            if (hs.term, hs.vote) != (old.term, old.vote) {
                persist.push(format!("term={} vote={}", hs.term, hs.vote));
            }
        }
        if let Some(snap) = &rd.snapshot {
            store
                .apply_snapshot(snap.clone())
                .expect("MemStorage accepts a snapshot the core handed out");
        }
        if !rd.entries.is_empty() {
            persist.push(format!("entries={}", describe::entries(&rd.entries)));
            store
                .append(&rd.entries)
                .expect("MemStorage accepts entries the core handed out");
        }
        if let Some(hs) = rd.hard_state {
            store.set_hard_state(hs);
        }
        if !persist.is_empty() {
            out.push(format!("{id} persist {}", persist.join(" ")));
        }

        // This harness persists synchronously, so messages that must wait for persistence can
        // be queued together with the others.
        for m in rd.messages.into_iter().chain(rd.persisted_messages) {
            let line = describe::message(&m);
            if self.isolated.contains(&m.from) || self.isolated.contains(&m.to) {
                out.push(format!("{line} (dropped)"));
            } else {
                out.push(line);
                self.net.push(m);
            }
        }

        let node = self.nodes.get_mut(&id).expect("caller checked the id");
        if let Some(snap) = rd.snapshot {
            let meta = snap.metadata.clone().unwrap_or_default();
            node.app = restore_app(&snap.data, meta.index);
            node.confs = vec![(meta.index, meta.conf_state.clone().unwrap_or_default())];
            node.applied = meta.index;
            out.push(format!(
                "{id} installed snapshot {}",
                describe::snapshot(&snap)
            ));
        }
        // Normal entries applied in a row share a line; a membership change gets its own, with
        // the configuration it results in.
        let mut run = Vec::new();
        for e in rd.committed_entries {
            assert_eq!(
                e.index,
                node.applied + 1,
                "node {id}: committed entries must be applied in order, without gaps"
            );
            node.applied = e.index;
            match e.entry_type() {
                EntryType::EntryNormal => {
                    if !e.data.is_empty() {
                        node.app.push((e.index, e.data.clone()));
                    }
                    run.push(describe::entry(&e));
                }
                EntryType::EntryConfChange => {
                    flush_applied(id, &mut run, out);
                    let cc = ConfChange::decode(e.data.as_ref())
                        .expect("a committed conf change decodes");
                    let cs = node.raw.apply_conf_change(&cc);
                    out.push(format!(
                        "{id} applied {} -> {}",
                        describe::entry(&e),
                        describe::conf(&cs)
                    ));
                    node.confs.push((e.index, cs));
                }
            }
        }
        flush_applied(id, &mut run, out);
        for rs in rd.read_states {
            out.push(format!(
                "{id} read-state index={} ctx={}",
                rs.index,
                describe::quote(&rs.request_ctx)
            ));
        }
        node.raw.advance(rd.number);
    }

    /// Steps every queued message addressed to one of `ids`, in the order sent. Messages a
    /// step produces wait for the next Ready.
    fn deliver(&mut self, ids: &[u64], out: &mut Out) {
        let (now, later): (Vec<Message>, Vec<Message>) = std::mem::take(&mut self.net)
            .into_iter()
            .partition(|m| ids.contains(&m.to));
        self.net = later;
        for m in now {
            let line = describe::message(&m);
            let Some(node) = self.nodes.get_mut(&m.to) else {
                out.push(format!("{line} (no such node)"));
                continue;
            };
            if let Err(e) = node.raw.step(m) {
                out.push(format!("{line} refused: {e}"));
            }
        }
    }

    fn drop_msgs(&mut self, pred: impl Fn(&Message) -> bool, out: &mut Out) {
        let (dropped, kept): (Vec<Message>, Vec<Message>) =
            std::mem::take(&mut self.net).into_iter().partition(pred);
        self.net = kept;
        for m in dropped {
            out.push(format!("{} (dropped)", describe::message(&m)));
        }
    }

    /// Rounds of "every node handles its Ready, then every queued message is delivered" until
    /// nothing is left to do for `ids`.
    fn stabilize(&mut self, ids: &[u64], out: &mut Out) -> Result<(), String> {
        for _ in 0..MAX_STABILIZE_ROUNDS {
            let busy = ids.iter().any(|id| self.nodes[id].raw.has_ready())
                || self.net.iter().any(|m| ids.contains(&m.to));
            if !busy {
                return Ok(());
            }
            for &id in ids {
                self.process_ready(id, out);
            }
            self.deliver(ids, out);
        }
        Err(format!(
            "not stable after {MAX_STABILIZE_ROUNDS} rounds:\n{}",
            out.join("\n")
        ))
    }

    fn summary(&self, id: u64, n: &Node) -> String {
        let st = n.raw.status();
        let mut s = format!(
            "{id}: {} term={} lead={} commit={} applied={} last={}",
            st.soft_state.role,
            st.hard_state.term,
            st.soft_state.leader_id,
            st.hard_state.commit,
            st.applied,
            st.last_index
        );
        if n.raw.raft.is_learner {
            s.push_str(" learner");
        }
        if self.isolated.contains(&id) {
            s.push_str(" (isolated)");
        }
        s
    }

    fn status(&mut self, id: u64, out: &mut Out) -> Result<(), String> {
        let n = self.nodes.get(&id).ok_or_else(|| format!("no node {id}"))?;
        let st = n.raw.status();
        out.push(format!(
            "{} vote={} first={} {}",
            self.summary(id, n),
            st.hard_state.vote,
            st.first_index,
            describe::conf(&st.conf_state)
        ));
        if let Some(t) = st.lead_transferee {
            out.push(format!("transferring leadership to {t}"));
        }
        for (pid, pr) in &st.progress {
            let state = match pr.state {
                ProgressState::Probe => "probe",
                ProgressState::Replicate => "replicate",
                ProgressState::Snapshot => "snapshot",
            };
            let mut s = format!("  {pid}: {state} match={} next={}", pr.matched, pr.next_idx);
            if pr.state == ProgressState::Snapshot {
                s.push_str(&format!(" pending-snapshot={}", pr.pending_snapshot));
            }
            if pr.inflights.count() > 0 {
                s.push_str(&format!(" inflight={}", pr.inflights.count()));
            }
            if pr.is_paused() {
                s.push_str(" paused");
            }
            if pr.is_learner {
                s.push_str(" learner");
            }
            out.push(s);
        }
        out.push(format!("  app={}", describe::quote(&n.app_data(u64::MAX))));
        Ok(())
    }
}

/// A crash and restart: everything not in the node's `MemStorage` (which this harness writes
/// synchronously, so it holds all the node ever persisted) is lost, and the application starts
/// again from the storage's snapshot.
fn restart(node: &mut Node) -> Result<(), String> {
    let store = node.raw.store().clone();
    let snap = store.snapshot_ref().clone();
    let meta = snap.metadata.clone().unwrap_or_default();
    let mut cfg = node.cfg.clone();
    cfg.applied = meta.index;
    node.raw = RawNode::new(&cfg, store).map_err(|e| e.to_string())?;
    node.app = restore_app(&snap.data, meta.index);
    node.confs = vec![(meta.index, meta.conf_state.unwrap_or_default())];
    node.applied = meta.index;
    node.soft = (StateRole::Follower, 0);
    Ok(())
}

/// The application's state from its snapshot format (payloads joined by commas).
fn restore_app(data: &Bytes, index: u64) -> Vec<(u64, Bytes)> {
    if data.is_empty() {
        return Vec::new();
    }
    data.split(|&b| b == b',')
        .map(|d| (index, Bytes::copy_from_slice(d)))
        .collect()
}

/// Ticks until the node's timer fires once: for a leader, one election timeout (when
/// CheckQuorum runs and a stalled transfer is abandoned); for anyone else, until it campaigns,
/// but at most its randomized election timeout (a learner or a node in a lease never does).
fn tick_election(node: &mut Node) {
    let raw = &mut node.raw;
    if raw.raft.role == StateRole::Leader {
        for _ in 0..node.cfg.election_tick {
            raw.tick();
        }
        return;
    }
    let before = (raw.raft.role, raw.raft.term);
    for _ in 0..raw.raft.randomized_election_timeout() {
        raw.tick();
        if (raw.raft.role, raw.raft.term) != before {
            return;
        }
    }
}

fn role_line(id: u64, old: (StateRole, u64), new: (StateRole, u64), term: u64) -> String {
    let (role, lead) = new;
    let mut s = if role != old.0 {
        format!("{id} became {role} at term {term}")
    } else if lead == 0 {
        format!("{id} lost its leader at term {term}")
    } else {
        format!("{id} follows {lead} at term {term}")
    };
    if role != old.0 && role == StateRole::Follower && lead != 0 {
        s.push_str(&format!(", leader {lead}"));
    }
    s
}

fn raft_log(raw: &RawNode<MemStorage>, out: &mut Out) {
    let log = &raw.raft.raft_log;
    let (first, last) = (log.first_index(), log.last_index());
    if first > 1 {
        out.push(format!(
            "compacted through {}/{}",
            log.term(first - 1)
                .expect("the term before the first index is known"),
            first - 1
        ));
    }
    if first > last {
        out.push("no entries".into());
        return;
    }
    let ents = log
        .slice(first, last + 1, u64::MAX)
        .expect("the whole log is readable");
    for e in ents {
        out.push(describe::entry(&e));
    }
}

fn flush_applied(id: u64, run: &mut Vec<String>, out: &mut Out) {
    if !run.is_empty() {
        out.push(format!("{id} applied {}", run.join(", ")));
        run.clear();
    }
}

fn push_err(out: &mut Out, res: keel_raft::Result<()>) {
    if let Err(e) = res {
        out.push(format!("error: {e}"));
    }
}
