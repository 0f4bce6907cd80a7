//! Paper tests: each checks one property stated in "In Search of an Understandable Consensus
//! Algorithm (Extended Version)", Ongaro & Ousterhout 2014 (cited as §x.y), or in Ongaro's PhD
//! thesis "Consensus: Bridging Theory and Practice", 2014 (cited as thesis §x.y).
//!
//! Every Ready in these tests goes through `common::handle_ready`, which also checks the
//! persistence contract (DESIGN §3) on all the traffic: acknowledgements and votes are sent only
//! after the state they vouch for is durable.

mod common;

use bytes::Bytes;
use common::*;
use keel_raft::raftpb::{
    ConfChangeType, ConfState, HardState, Message, MessageType, Snapshot, SnapshotMetadata,
};
use keel_raft::{
    Config, Error, MemStorage, ReadState, StateRole, Storage, CAMPAIGN_TRANSFER, NONE,
};
use std::collections::BTreeSet;

use MessageType::*;

const PEERS: [u64; 3] = [1, 2, 3];

fn node(id: u64, voters: &[u64]) -> Node {
    new_node(
        &raw_config(id),
        MemStorage::new_with_conf_state(voters.to_vec(), vec![]),
    )
}

fn vote_resp(from: u64, to: u64, term: u64, granted: bool) -> Message {
    let mut m = msg(MsgRequestVoteResponse, from, to, term);
    m.reject = !granted;
    m
}

fn append_resp(from: u64, to: u64, term: u64, index: u64) -> Message {
    let mut m = msg(MsgAppendResponse, from, to, term);
    m.index = index;
    m
}

fn heartbeat(from: u64, to: u64, term: u64, commit: u64) -> Message {
    let mut m = msg(MsgHeartbeat, from, to, term);
    m.commit = commit;
    m
}

/// Node 1 of `voters`, elected leader of term 1 by everyone; with `ack`, every follower has also
/// acknowledged the leader's first entry (so they are all in the Replicate state).
fn leader_of(voters: &[u64], ack: bool) -> Node {
    let mut n = node(1, voters);
    n.campaign().unwrap();
    drain(&mut n);
    for &v in &voters[1..] {
        n.step(vote_resp(v, 1, 1, true)).unwrap();
    }
    drain(&mut n);
    assert_eq!(n.raft.role, StateRole::Leader);
    if ack {
        for &v in &voters[1..] {
            n.step(append_resp(v, 1, 1, 1)).unwrap();
        }
        drain(&mut n);
        assert_eq!(n.raft.raft_log.committed, 1);
    }
    n
}

/// Node 1 of a 3-node cluster in `role`, at term 1.
fn in_role(role: StateRole) -> Node {
    match role {
        StateRole::Follower => {
            let mut n = node(1, &PEERS);
            n.step(heartbeat(2, 1, 1, 0)).unwrap();
            drain(&mut n);
            n
        }
        StateRole::Candidate => {
            let mut n = node(1, &PEERS);
            n.campaign().unwrap();
            drain(&mut n);
            n
        }
        StateRole::Leader => leader_of(&PEERS, true),
        StateRole::PreCandidate => unreachable!("plain Raft has no pre-candidates"),
    }
}

/// Ticks until the node's term changes; returns how many ticks that took.
fn ticks_until_term_changes(n: &mut Node) -> usize {
    let term = n.raft.term;
    for i in 1..=1000 {
        n.tick();
        if n.raft.term != term {
            return i;
        }
    }
    panic!("no election within 1000 ticks");
}

fn committed(n: &Node) -> u64 {
    n.raft.raft_log.committed
}

// ---------------------------------------------------------------------------------------------
// §5.1 Raft basics: terms

/// §5.1: "If one server's current term is smaller than the other's, then it updates its current
/// term to the larger value. If a candidate or leader discovers that its term is out of date, it
/// immediately reverts to follower state."
#[test]
fn s5_1_higher_term_is_adopted_and_reverts_to_follower() {
    for role in [StateRole::Follower, StateRole::Candidate, StateRole::Leader] {
        for t in [MsgAppend, MsgHeartbeat, MsgRequestVote, MsgAppendResponse] {
            let mut n = in_role(role);
            assert_eq!(n.raft.term, 1);
            let mut m = msg(t, 2, 1, 5);
            if t == MsgRequestVote {
                // Up to date, so the vote is granted; the term rule applies either way.
                m.index = 10;
                m.log_term = 4;
            }
            n.step(m).unwrap();
            assert_eq!(n.raft.term, 5, "{role} stepping {t:?}");
            assert_eq!(n.raft.role, StateRole::Follower, "{role} stepping {t:?}");
            // Only a message from the leader of the new term tells us who leads it.
            let lead = if matches!(t, MsgAppend | MsgHeartbeat) {
                2
            } else {
                NONE
            };
            assert_eq!(n.raft.leader_id, lead, "{role} stepping {t:?}");
            let h = handle_ready(&mut n).unwrap();
            assert_eq!(h.hard_state.map(|hs| hs.term), Some(5));
        }
    }
}

/// §5.1: "If a server receives a request with a stale term number, it rejects the request."
/// A stale AppendEntries changes nothing and a stale RequestVote is not granted.
#[test]
fn s5_1_stale_term_requests_are_rejected() {
    let mut n = new_node(&raw_config(1), store_with_log(&PEERS, &[1], 5));
    let before = log_terms(&n);
    n.step(append(2, 1, 3, 1, 1, &[entry(2, 3)])).unwrap();
    n.step(heartbeat(2, 1, 3, 1)).unwrap();
    n.step(vote_req(3, 1, 4, 9, 4)).unwrap();
    assert_eq!(n.raft.term, 5);
    assert_eq!(n.raft.vote, NONE);
    assert_eq!(n.raft.leader_id, NONE);
    assert_eq!(log_terms(&n), before);
    assert_eq!(committed(&n), 0);
    let msgs = drain(&mut n);
    assert!(
        msgs.iter()
            .all(|m| m.reject || m.msg_type() != MsgRequestVoteResponse)
            && of_type(&msgs, MsgAppendResponse)
                .iter()
                .all(|m| m.term == 5),
        "nothing acknowledges a stale request: {msgs:?}"
    );
}

/// §5.1: the stale side learns the current term from the reply ("Current terms are exchanged
/// whenever servers communicate"). With PreVote or CheckQuorum on, a deposed leader would never
/// hear a higher-term vote request, so the follower answers its stale append with its term.
#[test]
fn s5_1_stale_leader_learns_the_term_from_the_reply() {
    let mut cfg = raw_config(1);
    cfg.check_quorum = true;
    let mut follower = new_node(&cfg, store_with_log(&PEERS, &[1], 5));
    follower.step(heartbeat(2, 1, 3, 0)).unwrap();
    let msgs = drain(&mut follower);
    let resp = of_type(&msgs, MsgAppendResponse);
    assert_eq!(resp.len(), 1, "{msgs:?}");
    assert_eq!((resp[0].to, resp[0].term), (2, 5));

    let mut stale = leader_of(&PEERS, true);
    let mut r = resp[0].clone();
    r.from = 2;
    r.to = 1;
    stale.step(r).unwrap();
    assert_eq!(stale.raft.role, StateRole::Follower);
    assert_eq!(stale.raft.term, 5);
}

// ---------------------------------------------------------------------------------------------
// §5.2 Leader election

/// §5.2: "When servers start up, they begin as followers."
#[test]
fn s5_2_servers_start_as_followers() {
    let n = node(1, &PEERS);
    assert_eq!(n.raft.role, StateRole::Follower);
    assert_eq!(
        (n.raft.term, n.raft.vote, n.raft.leader_id),
        (0, NONE, NONE)
    );
}

/// §5.2: "Leaders send periodic heartbeats (AppendEntries RPCs that carry no log entries) to all
/// followers in order to maintain their authority."
#[test]
fn s5_2_leader_sends_heartbeats_to_all_followers() {
    let mut cfg = raw_config(1);
    cfg.heartbeat_tick = 3;
    let mut n = new_node(
        &cfg,
        MemStorage::new_with_conf_state(PEERS.to_vec(), vec![]),
    );
    n.campaign().unwrap();
    drain(&mut n);
    n.step(vote_resp(2, 1, 1, true)).unwrap();
    drain(&mut n);
    for tick in 1..=6 {
        n.tick();
        let msgs = drain(&mut n);
        let beats = of_type(&msgs, MsgHeartbeat);
        if tick % 3 == 0 {
            let to: BTreeSet<u64> = beats.iter().map(|m| m.to).collect();
            assert_eq!(to, BTreeSet::from([2, 3]), "tick {tick}");
            assert!(beats.iter().all(|m| m.entries.is_empty() && m.term == 1));
        } else {
            assert!(beats.is_empty(), "tick {tick}: {msgs:?}");
        }
    }
}

/// §5.2: "If a follower receives no communication over a period of time called the election
/// timeout, then it ... begins an election": it increments its term, votes for itself and issues
/// RequestVote RPCs to each of the other servers. A candidate whose election times out does the
/// same ("start a new election by incrementing its term").
#[test]
fn s5_2_timeout_starts_an_election() {
    for role in [StateRole::Follower, StateRole::Candidate] {
        let mut n = in_role(role);
        let (last_index, last_term) = (n.raft.raft_log.last_index(), n.raft.raft_log.last_term());
        ticks_until_term_changes(&mut n);
        assert_eq!(n.raft.role, StateRole::Candidate, "{role}");
        assert_eq!((n.raft.term, n.raft.vote), (2, 1), "{role}");
        let h = handle_ready(&mut n).unwrap();
        assert_eq!(
            h.hard_state.map(|hs| (hs.term, hs.vote)),
            Some((2, 1)),
            "{role}"
        );
        let reqs = of_type(&h.persisted_messages, MsgRequestVote);
        let to: BTreeSet<u64> = reqs.iter().map(|m| m.to).collect();
        assert_eq!(to, BTreeSet::from([2, 3]), "{role}");
        for m in reqs {
            assert_eq!((m.term, m.index, m.log_term), (2, last_index, last_term));
        }
    }
}

/// §5.2: "Raft uses randomized election timeouts ... chosen randomly from a fixed interval"; in
/// this core `[election_tick, 2 * election_tick)`. Different seeds must spread over the whole
/// interval, and one node must draw a fresh timeout for every election (not once at start).
#[test]
fn s5_2_election_timeout_is_randomized_in_range() {
    let et = 10;
    let mut seen = BTreeSet::new();
    for seed in 0..200 {
        let mut cfg = raw_config(1);
        cfg.seed = seed;
        let mut n = new_node(
            &cfg,
            MemStorage::new_with_conf_state(PEERS.to_vec(), vec![]),
        );
        let t = ticks_until_term_changes(&mut n);
        assert!((et..2 * et).contains(&t), "seed {seed}: timeout {t}");
        seen.insert(t);
    }
    assert_eq!(seen.len(), et, "every timeout in range occurs: {seen:?}");

    let mut n = node(1, &PEERS);
    let mut per_election = BTreeSet::new();
    for _ in 0..50 {
        let t = ticks_until_term_changes(&mut n);
        assert!((et..2 * et).contains(&t));
        per_election.insert(t);
    }
    assert!(
        per_election.len() > 1,
        "a candidate re-draws its timeout: {per_election:?}"
    );
}

/// §5.2: "A candidate wins an election if it receives votes from a majority of the servers in
/// the full cluster for the same term"; it stays a candidate while undecided, and (as in etcd,
/// an optimisation the paper allows) gives up once a majority refused.
/// Cluster size, votes received `(from, granted)`, expected role.
type ElectionCase = (u64, &'static [(u64, bool)], StateRole);

#[test]
fn s5_2_candidate_wins_only_with_a_majority() {
    let cases: &[ElectionCase] = &[
        (1, &[], StateRole::Leader),
        (3, &[(2, true), (3, true)], StateRole::Leader),
        (3, &[(2, true)], StateRole::Leader),
        (3, &[], StateRole::Candidate),
        (3, &[(2, false)], StateRole::Candidate),
        (3, &[(2, false), (3, false)], StateRole::Follower),
        (
            5,
            &[(2, true), (3, true), (4, true), (5, true)],
            StateRole::Leader,
        ),
        (5, &[(2, true), (3, true)], StateRole::Leader),
        (5, &[(2, true)], StateRole::Candidate),
        (5, &[(2, true), (3, false)], StateRole::Candidate),
        (
            5,
            &[(2, true), (3, false), (4, false)],
            StateRole::Candidate,
        ),
        (
            5,
            &[(2, false), (3, false), (4, false)],
            StateRole::Follower,
        ),
        // Votes from non-members count for nothing.
        (3, &[(7, true), (8, true)], StateRole::Candidate),
    ];
    for &(size, votes, want) in cases {
        let voters: Vec<u64> = (1..=size).collect();
        let mut n = node(1, &voters);
        n.campaign().unwrap();
        drain(&mut n);
        for &(from, granted) in votes {
            let _ = n.step(vote_resp(from, 1, 1, granted));
        }
        assert_eq!(n.raft.role, want, "size {size}, votes {votes:?}");
        assert_eq!(n.raft.term, 1);
    }
}

/// §5.2: "Each server will vote for at most one candidate in a given term, on a
/// first-come-first-served basis." A repeated request from the candidate it voted for is granted
/// again (it is a retransmission, §5.5).
#[test]
fn s5_2_at_most_one_vote_per_term_first_come_first_served() {
    // (already voted for, candidate, granted?)
    let cases = [
        (NONE, 2, true),
        (NONE, 3, true),
        (2, 2, true),
        (3, 3, true),
        (2, 3, false),
        (3, 2, false),
    ];
    for (voted, cand, want) in cases {
        let mut s = MemStorage::new_with_conf_state(PEERS.to_vec(), vec![]);
        s.set_hard_state(HardState {
            term: 1,
            vote: voted,
            commit: 0,
        });
        let mut n = new_node(&raw_config(1), s);
        n.step(vote_req(cand, 1, 1, 0, 0)).unwrap();
        let msgs = drain(&mut n);
        let r = of_type(&msgs, MsgRequestVoteResponse);
        assert_eq!(r.len(), 1);
        assert_eq!(!r[0].reject, want, "voted {voted}, candidate {cand}");
        let expect_vote = if want { cand } else { voted };
        assert_eq!(n.raft.vote, expect_vote);
        assert_eq!(
            n.store().hard_state.vote,
            expect_vote,
            "the vote is durable"
        );
    }

    // The same, as it happens: first come, first served, within one term.
    assert_eq!(
        votes_in_one_term(raw_config(1)),
        vec![true, false, true, false]
    );
}

/// Candidates 2, 3, 2, 3 ask for votes in term 1; returns which were granted.
fn votes_in_one_term(cfg: Config) -> Vec<bool> {
    let mut n = new_node(
        &cfg,
        MemStorage::new_with_conf_state(PEERS.to_vec(), vec![]),
    );
    let mut granted = Vec::new();
    for cand in [2, 3, 2, 3] {
        n.step(vote_req(cand, 1, 1, 0, 0)).unwrap();
        let msgs = drain(&mut n);
        let r = of_type(&msgs, MsgRequestVoteResponse);
        granted.push(!r[0].reject);
    }
    granted
}

#[cfg(feature = "bug-injection")]
#[test]
fn s5_2_vote_check_catches_the_planted_bug() {
    let mut cfg = raw_config(1);
    cfg.bugs.vote_twice = true;
    // Either the grants differ, or the durable-vote check in `handle_ready` trips first.
    let got = std::panic::catch_unwind(|| votes_in_one_term(cfg));
    assert!(got.map_or(true, |g| g != vec![true, false, true, false]));
}

/// §5.2: "If the leader's term (included in its RPC) is at least as large as the candidate's
/// current term, then the candidate recognizes the leader as legitimate and returns to follower
/// state. If the term in the RPC is smaller than the candidate's current term, then the candidate
/// rejects the RPC and continues in candidate state."
#[test]
fn s5_2_candidate_steps_down_for_a_legitimate_leader() {
    for (t, term, steps_down) in [
        (MsgAppend, 2, true),
        (MsgHeartbeat, 2, true),
        (MsgAppend, 3, true),
        (MsgHeartbeat, 3, true),
        (MsgAppend, 1, false),
        (MsgHeartbeat, 1, false),
    ] {
        let mut n = node(1, &PEERS);
        n.campaign().unwrap();
        n.campaign().unwrap();
        drain(&mut n);
        assert_eq!((n.raft.role, n.raft.term), (StateRole::Candidate, 2));
        n.step(msg(t, 2, 1, term)).unwrap();
        if steps_down {
            assert_eq!(n.raft.role, StateRole::Follower, "{t:?} term {term}");
            assert_eq!((n.raft.term, n.raft.leader_id), (term, 2));
        } else {
            assert_eq!(n.raft.role, StateRole::Candidate, "{t:?} term {term}");
            assert_eq!((n.raft.term, n.raft.leader_id), (2, NONE));
        }
    }
}

/// Every node campaigns at once, each votes for itself, and nobody wins. Then the cluster is
/// ticked in lockstep. Returns the leaders after `rounds` rounds.
fn split_vote_then_tick(same_seed: bool, rounds: usize) -> (Vec<(u64, u64)>, u64) {
    let mut c = Cluster::with_config(3, |cfg| {
        cfg.pre_vote = false;
        cfg.check_quorum = false;
        if same_seed {
            cfg.seed = 7;
        }
    });
    for id in 1..=3 {
        c.node_mut(id).campaign().unwrap();
    }
    c.stabilize();
    assert!(c.leaders().is_empty(), "the vote was split");
    for _ in 0..rounds {
        c.tick_all(1);
        if !c.leaders().is_empty() {
            break;
        }
    }
    let max_term = c.nodes.values().map(|n| n.raft.term).max().unwrap();
    (c.leaders(), max_term)
}

/// §5.2: "Raft uses randomized election timeouts to ensure that split votes are rare and that
/// they are resolved quickly."
#[test]
fn s5_2_split_votes_are_resolved() {
    let (leaders, term) = split_vote_then_tick(false, 100);
    assert_eq!(leaders.len(), 1, "one leader after a split vote");
    assert!(term >= 2);
    // The resolution is due to the randomness: nodes that draw identical timeouts and run in
    // lockstep split the vote forever.
    let (leaders, term) = split_vote_then_tick(true, 100);
    assert!(leaders.is_empty());
    assert!(term > 5, "they kept splitting (term {term})");
}

// ---------------------------------------------------------------------------------------------
// §5.3 Log replication

/// §5.3: "The leader appends the command to its log as a new entry, then issues AppendEntries
/// RPCs in parallel to each of the other servers to replicate the entry." The entry is handed to
/// the application for persistence in the same Ready as the appends go out.
#[test]
fn s5_3_leader_appends_then_replicates() {
    let mut n = leader_of(&PEERS, true);
    n.propose(Bytes::from_static(b"x")).unwrap();
    assert_eq!(log_terms(&n).last(), Some(&(2, 1)));
    let h = handle_ready(&mut n).unwrap();
    assert_eq!(h.entries.len(), 1);
    assert_eq!((h.entries[0].index, h.entries[0].term), (2, 1));
    assert_eq!(h.entries[0].data, Bytes::from_static(b"x"));
    let apps = of_type(&h.messages, MsgAppend);
    let to: BTreeSet<u64> = apps.iter().map(|m| m.to).collect();
    assert_eq!(to, BTreeSet::from([2, 3]));
    for m in apps {
        assert_eq!((m.term, m.index, m.log_term, m.commit), (1, 1, 1, 1));
        assert_eq!(m.entries, h.entries);
    }
    assert_eq!(
        committed(&n),
        1,
        "not committed before a majority stored it"
    );
}

/// §5.3: "A log entry is committed once the leader that created the entry has replicated it on a
/// majority of the servers", and the leader then applies it.
#[test]
fn s5_3_entry_commits_once_a_majority_stored_it() {
    for reachable in 0..=4u64 {
        let mut c = Cluster::raw(5);
        c.campaign(1);
        for id in (2 + reachable)..=5 {
            c.down.insert(id);
        }
        c.propose(1, b"x");
        let want = reachable >= 2;
        let idx = c.node(1).raft.raft_log.last_index();
        assert_eq!(
            committed(c.node(1)) == idx,
            want,
            "{reachable} followers reachable"
        );
        assert_eq!(c.applied_data(1).len(), usize::from(want));
        c.heal();
        c.tick_all(1);
        assert_eq!(committed(c.node(1)), idx, "commits once a majority is back");
        for id in 1..=5 {
            assert_eq!(c.applied_data(id), vec![Bytes::from_static(b"x")]);
        }
    }
}

/// §5.3 under Keel's durability rule (DESIGN §4: a write is acknowledged once it is durable on a
/// quorum): the leader's own copy counts toward the majority only after the leader persisted it.
#[test]
fn s5_3_leader_counts_its_own_entry_only_once_durable() {
    let mut n = leader_of(&PEERS, true);
    n.propose(Bytes::from_static(b"x")).unwrap();
    let rd = n.ready();
    assert_eq!(rd.entries.len(), 1);
    // One follower stored it, the leader's write is still in progress.
    n.step(append_resp(2, 1, 1, 2)).unwrap();
    assert_eq!(
        committed(&n),
        1,
        "the leader's unsynced copy does not count"
    );
    n.store_mut().append(&rd.entries).unwrap();
    n.advance(rd.number);
    assert_eq!(committed(&n), 2);
}

/// §5.3, Figure 2 AppendEntries receiver rule 2: "Reply false if log doesn't contain an entry at
/// prevLogIndex whose term matches prevLogTerm." A rejection changes nothing.
#[test]
fn s5_3_follower_rejects_append_with_mismatched_previous_entry() {
    // Follower log: terms 1, 2 at indices 1, 2.
    for (index, log_term, accept) in [
        (0, 0, true),
        (1, 1, true),
        (2, 2, true),
        (1, 2, false),
        (2, 1, false),
        (3, 2, false),
        (3, 3, false),
    ] {
        let mut n = new_node(&raw_config(1), store_with_log(&PEERS, &[1, 2], 2));
        n.step(append(2, 1, 3, index, log_term, &[entry(index + 1, 3)]))
            .unwrap();
        let msgs = drain(&mut n);
        let r = of_type(&msgs, MsgAppendResponse);
        assert_eq!(r.len(), 1);
        assert_eq!(!r[0].reject, accept, "prev ({index}, {log_term})");
        if accept {
            assert_eq!(r[0].index, index + 1);
        } else {
            assert_eq!(
                log_terms(&n),
                vec![(1, 1), (2, 2)],
                "rejection changed the log"
            );
            assert_eq!(r[0].index, index, "names the rejected previous index");
        }
    }
}

/// §5.3, Figure 2 AppendEntries receiver rules 3-5: a conflicting entry and all that follow it
/// are deleted, new entries appended, entries already present kept; and
/// `commitIndex = min(leaderCommit, index of last new entry)`.
#[test]
fn s5_3_follower_overwrites_conflicts_and_keeps_what_matches() {
    // (prev index, prev term, entries, leader commit) -> (log terms, commit)
    type Case = (u64, u64, &'static [(u64, u64)], u64, &'static [u64], u64);
    let cases: &[Case] = &[
        (2, 2, &[(3, 3)], 0, &[1, 2, 3], 0),
        (1, 1, &[(2, 3), (3, 4)], 0, &[1, 3, 4], 0),
        (0, 0, &[(1, 1)], 0, &[1, 2], 0),
        (0, 0, &[(1, 3)], 0, &[3], 0),
        (2, 2, &[(3, 3), (4, 3)], 9, &[1, 2, 3, 3], 4),
        // A leader cannot tell the follower to commit past what this append verified.
        (1, 1, &[], 9, &[1, 2], 1),
    ];
    for &(index, log_term, ents, commit, want, want_commit) in cases {
        let mut n = new_node(&raw_config(1), store_with_log(&PEERS, &[1, 2], 2));
        let ents: Vec<_> = ents.iter().map(|&(i, t)| entry(i, t)).collect();
        let mut m = append(2, 1, 4, index, log_term, &ents);
        m.commit = commit;
        n.step(m).unwrap();
        drain(&mut n);
        let got: Vec<u64> = log_terms(&n).iter().map(|&(_, t)| t).collect();
        assert_eq!(got, want, "append after ({index}, {log_term}) of {ents:?}");
        assert_eq!(committed(&n), want_commit);
        let stored: Vec<u64> = (1..=n.store().last_index().unwrap())
            .map(|i| n.store().term(i).unwrap())
            .collect();
        assert_eq!(stored, want, "the durable log matches");
    }
}

/// The logs of Figure 7: the leader's (term 8 leader) and followers (a) to (f).
const FIG7_LEADER: &[u64] = &[1, 1, 1, 4, 4, 5, 5, 6, 6, 6];
const FIG7_FOLLOWERS: [&[u64]; 6] = [
    &[1, 1, 1, 4, 4, 5, 5, 6, 6],
    &[1, 1, 1, 4],
    &[1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6],
    &[1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7],
    &[1, 1, 1, 4, 4, 4, 4],
    &[1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3],
];

/// §5.3, Figure 7: "the leader handles inconsistencies by forcing the followers' logs to
/// duplicate its own": missing entries are filled in, extraneous uncommitted ones removed.
#[test]
fn s5_3_leader_forces_follower_logs_to_match_figure_7() {
    for (case, follower_log) in FIG7_FOLLOWERS.iter().enumerate() {
        let lead = new_node(&raw_config(1), store_with_log(&PEERS, FIG7_LEADER, 7));
        let follower = new_node(&raw_config(2), store_with_log(&PEERS, follower_log, 7));
        // Node 3 has an empty log and votes for the leader.
        let voter = new_node(&raw_config(3), store_with_log(&PEERS, &[], 7));
        let mut c = Cluster::from_nodes(vec![(1, lead), (2, follower), (3, voter)]);
        c.campaign(1);
        assert_eq!(
            c.leader(),
            Some(1),
            "case ({})",
            (b'a' + case as u8) as char
        );
        assert_eq!(c.node(1).raft.term, 8);
        let want = log_terms(c.node(1));
        assert_eq!(want.len(), FIG7_LEADER.len() + 1);
        assert_eq!(
            log_terms(c.node(2)),
            want,
            "case ({})",
            (b'a' + case as u8) as char
        );
        assert_eq!(log_terms(c.node(3)), want);
    }
}

/// §5.3: "The leader keeps track of the highest index it knows to be committed, and it includes
/// that index in future AppendEntries RPCs (including heartbeats) so that the other servers
/// eventually find out."
#[test]
fn s5_3_heartbeats_carry_the_commit_index() {
    let mut c = Cluster::raw(3);
    c.campaign(1);
    // Node 3 stores the entry, but the append that would tell it the entry committed is lost.
    c.drop_rule = Some(Box::new(|m: &Message| {
        m.msg_type() == MsgAppend && m.to == 3 && m.entries.is_empty() && m.commit >= 2
    }));
    c.propose(1, b"x");
    assert_eq!(committed(c.node(1)), 2);
    assert_eq!(c.node(3).raft.raft_log.last_index(), 2);
    assert_eq!(committed(c.node(3)), 1);
    c.delivered.clear();
    c.tick(1);
    c.stabilize();
    let beat = c
        .delivered
        .iter()
        .find(|m| m.msg_type() == MsgHeartbeat && m.to == 3)
        .expect("a heartbeat to 3");
    assert_eq!(beat.commit, 2);
    assert_eq!(committed(c.node(3)), 2);
    assert_eq!(c.applied_data(3), vec![Bytes::from_static(b"x")]);
}

/// §5.3: "Once a follower learns that a log entry is committed, it applies the entry to its local
/// state machine (in log order)." Across leader changes, every node applies the same entries in
/// the same order (`handle_ready` also checks there are no gaps).
#[test]
fn s5_3_everyone_applies_committed_entries_in_log_order() {
    let mut c = Cluster::raw(3);
    c.campaign(1);
    let payloads: Vec<&'static [u8]> = vec![b"a", b"b", b"c", b"d", b"e", b"f", b"g", b"h"];
    for (i, p) in payloads.iter().enumerate() {
        if i == 4 {
            // Hand leadership elsewhere halfway through.
            c.campaign(2);
            assert_eq!(c.leader(), Some(2));
        }
        // Proposals arrive at different nodes and are forwarded.
        c.propose((i as u64 % 3) + 1, p);
    }
    let want: Vec<Bytes> = payloads.iter().map(|p| Bytes::from_static(p)).collect();
    for id in 1..=3 {
        assert_eq!(c.applied_data(id), want, "node {id}");
        let idx: Vec<u64> = c.applied[&id].iter().map(|e| e.index).collect();
        assert!(
            idx.windows(2).all(|w| w[1] == w[0] + 1),
            "node {id}: {idx:?}"
        );
    }
}

/// §5.3: committing an entry "also commits all preceding entries in the leader's log, including
/// entries created by previous leaders."
#[test]
fn s5_3_commit_includes_entries_of_previous_leaders() {
    let mut lead = new_node(&raw_config(1), store_with_log(&PEERS, &[1, 2, 2], 2));
    lead.campaign().unwrap();
    drain(&mut lead);
    lead.step(vote_resp(2, 1, 3, true)).unwrap();
    drain(&mut lead);
    assert_eq!(lead.raft.role, StateRole::Leader);
    lead.step(append_resp(2, 1, 3, 4)).unwrap();
    let h = handle_ready(&mut lead).unwrap();
    let got: Vec<(u64, u64)> = h
        .committed_entries
        .iter()
        .map(|e| (e.index, e.term))
        .collect();
    assert_eq!(got, vec![(1, 1), (2, 2), (3, 2), (4, 3)]);
}

// ---------------------------------------------------------------------------------------------
// §5.4 Safety

/// §5.4.1: "the voter denies its vote if its own log is more up-to-date than that of the
/// candidate": "If the logs have last entries with different terms, then the log with the later
/// term is more up-to-date. If the logs end with the same term, then whichever log is longer is
/// more up-to-date."
#[test]
fn s5_4_1_voter_denies_a_candidate_with_a_less_up_to_date_log() {
    // Voter log: terms 1, 2 (last entry index 2, term 2).
    for (last_index, last_term, granted) in [
        (2, 2, true),
        (3, 2, true),
        (1, 3, true),
        (0, 3, true),
        (1, 2, false),
        (3, 1, false),
        (9, 1, false),
        (0, 0, false),
    ] {
        let mut n = new_node(&raw_config(1), store_with_log(&PEERS, &[1, 2], 2));
        n.step(vote_req(2, 1, 3, last_index, last_term)).unwrap();
        let msgs = drain(&mut n);
        let r = of_type(&msgs, MsgRequestVoteResponse);
        assert_eq!(
            !r[0].reject, granted,
            "candidate log ({last_index}, {last_term})"
        );
        assert_eq!(n.raft.vote, if granted { 2 } else { NONE });
        // The term is adopted either way (§5.1).
        assert_eq!(n.raft.term, 3);
    }
}

/// §5.4.1 Election restriction: "a candidate must contact a majority of the cluster in order to
/// be elected, which means that every committed entry must be present in at least one of those
/// servers". A node missing a committed entry cannot win; one holding it can.
#[test]
fn s5_4_1_candidate_missing_committed_entries_cannot_win() {
    let mut c = Cluster::raw(3);
    c.campaign(1);
    c.down.insert(3);
    c.propose(1, b"x");
    let idx = committed(c.node(1));
    c.heal();
    c.campaign(3);
    assert_ne!(c.leader(), Some(3), "node 3 lacks committed entry {idx}");
    c.campaign(2);
    assert_eq!(c.leader(), Some(2));
    assert_eq!(c.applied_data(3), vec![Bytes::from_static(b"x")]);
}

/// Figure 8 in miniature: the term-4 leader holds entry 2 from term 2, stored on a majority
/// (itself and node 2) but never committed. Node 2 acknowledges only up to index 2. Returns the
/// leader's commit index then, and after node 2 acknowledges the leader's term-4 entry.
fn figure_8_commits(cfg: Config) -> (u64, u64) {
    let mut lead = new_node(&cfg, store_with_log(&PEERS, &[1, 2], 3));
    lead.campaign().unwrap();
    drain(&mut lead);
    lead.step(vote_resp(2, 1, 4, true)).unwrap();
    drain(&mut lead);
    assert_eq!((lead.raft.role, lead.raft.term), (StateRole::Leader, 4));
    assert_eq!(log_terms(&lead), vec![(1, 1), (2, 2), (3, 4)]);
    lead.step(append_resp(2, 1, 4, 2)).unwrap();
    drain(&mut lead);
    let before = committed(&lead);
    lead.step(append_resp(2, 1, 4, 3)).unwrap();
    drain(&mut lead);
    (before, committed(&lead))
}

/// §5.4.2, Figure 8: "Raft never commits log entries from previous terms by counting replicas.
/// Only log entries from the leader's current term are committed by counting replicas; once an
/// entry from the current term has been committed in this way, then all prior entries are
/// committed indirectly because of the Log Matching Property."
#[test]
fn s5_4_2_only_current_term_entries_commit_by_counting() {
    let (before, after) = figure_8_commits(raw_config(1));
    assert_eq!(
        before, 0,
        "entry 2 (term 2) is on a majority but must not commit"
    );
    assert_eq!(after, 3, "the term-4 entry commits, and entry 2 with it");
}

/// The Figure 8 test catches the planted bug.
#[cfg(feature = "bug-injection")]
#[test]
fn s5_4_2_figure_8_check_catches_the_planted_bug() {
    let mut cfg = raw_config(1);
    cfg.bugs.commit_old_term_entries = true;
    assert_eq!(figure_8_commits(cfg).0, 2);
}

// ---------------------------------------------------------------------------------------------
// §5.5 Follower and candidate crashes: retried RPCs are harmless

/// §5.5: "Raft RPCs are idempotent ... if a follower receives an AppendEntries request that
/// includes log entries already present in its log, it ignores those entries in the new
/// request." A duplicate changes nothing, and a delayed shorter copy does not truncate.
#[test]
fn s5_5_duplicate_and_delayed_appends_are_harmless() {
    let mut n = node(1, &PEERS);
    let full = append(2, 1, 1, 0, 0, &[entry(1, 1), entry(2, 1), entry(3, 1)]);
    n.step(full.clone()).unwrap();
    let first = handle_ready(&mut n).unwrap();
    assert_eq!(first.entries.len(), 3);
    for m in [
        full.clone(),
        full,
        append(2, 1, 1, 0, 0, &[entry(1, 1)]),
        append(2, 1, 1, 1, 1, &[entry(2, 1)]),
    ] {
        n.step(m).unwrap();
        let h = handle_ready(&mut n).unwrap();
        assert!(h.entries.is_empty(), "nothing new to persist");
        let r = of_type(&h.persisted_messages, MsgAppendResponse);
        assert!(!r[0].reject);
        assert_eq!(log_terms(&n), vec![(1, 1), (2, 1), (3, 1)]);
    }
}

/// §5.5 on the other side: duplicated and reordered responses leave the leader's and the
/// candidate's state as a single delivery would.
#[test]
fn s5_5_duplicate_responses_are_harmless() {
    // A duplicated vote is counted once: 5 voters need 3.
    let voters = [1, 2, 3, 4, 5];
    let mut n = node(1, &voters);
    n.campaign().unwrap();
    drain(&mut n);
    n.step(vote_resp(2, 1, 1, true)).unwrap();
    n.step(vote_resp(2, 1, 1, true)).unwrap();
    assert_eq!(n.raft.role, StateRole::Candidate);
    n.step(vote_resp(3, 1, 1, true)).unwrap();
    assert_eq!(n.raft.role, StateRole::Leader);

    // A duplicated or older acknowledgement does not move progress backwards or forwards.
    let mut n = leader_of(&voters, true);
    n.propose_batch(vec![Bytes::from_static(b"x"), Bytes::from_static(b"y")])
        .unwrap();
    drain(&mut n);
    n.step(append_resp(2, 1, 1, 3)).unwrap();
    drain(&mut n);
    let snapshot = |n: &Node| {
        let pr = &n.raft.trk.progress[&2];
        (pr.matched, pr.next_idx, committed(n))
    };
    let before = snapshot(&n);
    assert_eq!(before.0, 3);
    for index in [3, 2, 1, 3] {
        n.step(append_resp(2, 1, 1, index)).unwrap();
        drain(&mut n);
        assert_eq!(snapshot(&n), before, "after a repeated ack of {index}");
    }
    assert_eq!(before.2, 1, "one follower of four is no majority of five");
}

// ---------------------------------------------------------------------------------------------
// §6 Cluster membership changes (one server at a time, thesis §4.1)

/// Thesis §4.1 (the single-server form of §6 the thesis recommends): "The leader ... does not
/// start a new configuration change until the previous one is committed"; Keel waits until it is
/// applied.
#[test]
fn s6_one_membership_change_at_a_time() {
    let mut c = Cluster::raw(3);
    c.campaign(1);
    c.node_mut(1)
        .propose_conf_change(conf_change(ConfChangeType::AddLearnerNode, 4))
        .unwrap();
    let second = c
        .node_mut(1)
        .propose_conf_change(conf_change(ConfChangeType::AddLearnerNode, 5));
    assert!(
        matches!(second, Err(Error::ConfChangeRefused(_))),
        "{second:?}"
    );
    c.stabilize();
    assert_eq!(c.node(1).status().conf_state.learners, vec![4]);
    c.node_mut(1)
        .propose_conf_change(conf_change(ConfChangeType::AddLearnerNode, 5))
        .unwrap();
    c.stabilize();
    for id in 1..=3 {
        assert_eq!(c.node(id).status().conf_state.learners, vec![4, 5]);
    }
    // Two changes in one proposal (as a follower could forward them) are refused too.
    let two = [6, 7].map(|id| {
        let mut e = keel_raft::raftpb::Entry {
            data: prost::Message::encode_to_vec(&conf_change(ConfChangeType::AddLearnerNode, id))
                .into(),
            ..Default::default()
        };
        e.set_entry_type(keel_raft::raftpb::EntryType::EntryConfChange);
        e
    });
    let mut m = msg(MsgPropose, 2, 1, 0);
    m.entries = two.to_vec();
    let r = c.node_mut(1).step(m);
    assert!(matches!(r, Err(Error::ConfChangeRefused(_))), "{r:?}");
}

/// §6: "once a given server adds the new configuration entry to its log, it uses that
/// configuration for all future decisions" — in Keel a change takes effect when applied
/// (DESIGN §3). Before that the old majority rules; after, the new one does.
#[test]
fn s6_added_voter_counts_toward_the_majority_once_applied() {
    let mut c = Cluster::raw(3);
    c.campaign(1);
    let n4 = new_node(
        &raw_config(4),
        MemStorage::new_with_conf_state(PEERS.to_vec(), vec![]),
    );
    c.nodes.insert(4, n4);
    // With 2 and 3 down, the change cannot commit and so does not take effect.
    c.down.extend([2, 3]);
    c.node_mut(1)
        .propose_conf_change(conf_change(ConfChangeType::AddNode, 4))
        .unwrap();
    c.stabilize();
    assert_eq!(c.node(1).status().conf_state.voters, vec![1, 2, 3]);
    c.heal();
    c.tick_all(2);
    for id in 1..=4 {
        assert_eq!(
            c.node(id).status().conf_state.voters,
            vec![1, 2, 3, 4],
            "{id}"
        );
    }
    assert_eq!(log_terms(c.node(4)), log_terms(c.node(1)));
    // Under {1,2,3}, leader and node 2 would be a majority; under {1,2,3,4} they are not.
    c.down.extend([3, 4]);
    c.propose(1, b"x");
    assert!(c.applied_data(1).is_empty(), "2 of 4 is not a majority");
    c.down.remove(&4);
    c.tick_all(2);
    assert_eq!(c.applied_data(1), vec![Bytes::from_static(b"x")]);
    assert_eq!(c.applied_data(4), vec![Bytes::from_static(b"x")]);
}

/// §6: "the leader steps down (returns to follower state) once it has committed the C_new log
/// entry" when it is not part of the new configuration; the rest carry on.
#[test]
fn s6_removed_leader_steps_down_and_the_rest_continue() {
    let mut c = Cluster::raw(3);
    c.campaign(1);
    c.node_mut(1)
        .propose_conf_change(conf_change(ConfChangeType::RemoveNode, 1))
        .unwrap();
    c.stabilize();
    assert_eq!(c.node(1).raft.role, StateRole::Follower);
    for id in 2..=3 {
        assert_eq!(c.node(id).status().conf_state.voters, vec![2, 3], "{id}");
    }
    c.down.insert(1);
    c.tick_all(40);
    let new = c.leader().expect("a leader among 2 and 3");
    assert_ne!(new, 1);
    c.propose(new, b"after");
    assert_eq!(c.applied_data(2), vec![Bytes::from_static(b"after")]);
    assert_eq!(c.applied_data(3), vec![Bytes::from_static(b"after")]);
}

// ---------------------------------------------------------------------------------------------
// §7 Log compaction

/// §7: "the leader must occasionally send snapshots to followers that lag behind. This happens
/// when the leader has already discarded the next log entry that it needs to send to a
/// follower." The follower installs it and continues from there.
#[test]
fn s7_lagging_follower_is_brought_up_by_a_snapshot() {
    let mut c = Cluster::raw(3);
    c.campaign(1);
    c.down.insert(3);
    for p in [b"a", b"b", b"c"] {
        c.propose(1, p);
    }
    let applied = c.node(1).raft.raft_log.applied;
    let cs = c.node(1).status().conf_state;
    let store = c.node_mut(1).store_mut();
    store
        .create_snapshot(applied, cs, Bytes::from_static(b"state"))
        .unwrap();
    store.compact(applied).unwrap();
    c.down.remove(&3);
    c.tick_all(3);
    assert_eq!(c.snapshots.get(&3), Some(&vec![applied]));
    let n3 = c.node(3);
    assert_eq!(n3.store().snapshot_ref().data, Bytes::from_static(b"state"));
    assert_eq!(n3.raft.raft_log.first_index(), applied + 1);
    assert_eq!(committed(n3), applied);
    // Back in the normal flow afterwards.
    c.propose(1, b"d");
    assert_eq!(c.applied_data(3), vec![Bytes::from_static(b"d")]);
    assert_eq!(log_terms(c.node(3)), log_terms(c.node(1)));
}

fn snapshot_msg(from: u64, to: u64, term: u64, index: u64, snap_term: u64) -> Message {
    let mut m = msg(MsgSnapshot, from, to, term);
    m.snapshot = Some(Snapshot {
        data: Bytes::from_static(b"s"),
        metadata: Some(SnapshotMetadata {
            conf_state: Some(ConfState {
                voters: PEERS.to_vec(),
                learners: vec![],
            }),
            index,
            term: snap_term,
        }),
    });
    m
}

/// §7, InstallSnapshot receiver rules 6-7: "If existing log entry has same index and term as
/// snapshot's last included entry, retain log entries following it and reply"; otherwise
/// "discard the entire log". A snapshot behind the commit index is not installed.
#[test]
fn s7_follower_installs_only_snapshots_that_supersede_its_log() {
    // A prefix of our log: entries after it are kept, only the commit index moves.
    let mut n = new_node(&raw_config(1), store_with_log(&PEERS, &[1, 1, 1, 1, 1], 1));
    n.step(snapshot_msg(2, 1, 2, 3, 1)).unwrap();
    let h = handle_ready(&mut n).unwrap();
    assert!(h.snapshot.is_none());
    assert_eq!(n.raft.raft_log.last_index(), 5);
    assert_eq!(committed(&n), 3);

    // A conflicting log is replaced by the snapshot, and acknowledged only once it is durable.
    let mut n = new_node(&raw_config(1), store_with_log(&PEERS, &[1, 1, 1], 1));
    n.step(snapshot_msg(2, 1, 2, 5, 2)).unwrap();
    let h = handle_ready(&mut n).unwrap();
    assert_eq!(
        h.snapshot
            .as_ref()
            .and_then(|s| s.metadata.as_ref())
            .map(|m| m.index),
        Some(5)
    );
    assert!(of_type(&h.messages, MsgAppendResponse).is_empty());
    let r = of_type(&h.persisted_messages, MsgAppendResponse);
    assert_eq!((r[0].index, r[0].reject), (5, false));
    assert_eq!(n.raft.raft_log.first_index(), 6);
    assert_eq!((n.raft.raft_log.last_index(), committed(&n)), (5, 5));
    assert_eq!(n.raft.raft_log.last_term(), 2);

    // Behind the commit index: ignored, and the reply says where we are.
    n.step(snapshot_msg(2, 1, 2, 4, 2)).unwrap();
    let h = handle_ready(&mut n).unwrap();
    assert!(h.snapshot.is_none());
    let r = of_type(&h.persisted_messages, MsgAppendResponse);
    assert_eq!(r[0].index, 5);
    assert_eq!(n.raft.raft_log.first_index(), 6);
}

// ---------------------------------------------------------------------------------------------
// Persistence before answering (Figure 2: "Persistent state on all servers (Updated on stable
// storage before responding to RPCs)"), as the Ready contract expresses it (DESIGN §3).

/// Figure 2: currentTerm and votedFor are on stable storage before the vote is sent: they are in
/// the Ready's `hard_state` (with `must_sync`), and the response is in `persisted_messages`.
#[test]
fn fig2_term_and_vote_are_persisted_before_the_vote_goes_out() {
    let mut n = node(1, &PEERS);
    n.step(vote_req(2, 1, 3, 0, 0)).unwrap();
    let rd = n.ready();
    assert_eq!(
        rd.hard_state,
        Some(HardState {
            term: 3,
            vote: 2,
            commit: 0
        })
    );
    assert!(rd.must_sync);
    assert!(rd.messages.is_empty(), "{:?}", rd.messages);
    let r = of_type(&rd.persisted_messages, MsgRequestVoteResponse);
    assert_eq!(r.len(), 1);
    assert_eq!((r[0].to, r[0].term, r[0].reject), (2, 3, false));

    // The candidate's own vote, too, is durable before it asks for others'.
    let mut n = node(1, &PEERS);
    n.campaign().unwrap();
    let rd = n.ready();
    assert_eq!(rd.hard_state.map(|hs| (hs.term, hs.vote)), Some((1, 1)));
    assert!(rd.must_sync);
    assert!(of_type(&rd.messages, MsgRequestVote).is_empty());
    assert_eq!(of_type(&rd.persisted_messages, MsgRequestVote).len(), 2);
}

/// Figure 2 / §5.3: a follower acknowledges entries only after they are durable: the entries are
/// in the Ready, and the acknowledgement (and a rejection alike) in `persisted_messages`.
#[test]
fn fig2_append_responses_wait_for_the_entries_to_be_durable() {
    let mut n = node(1, &PEERS);
    n.step(append(2, 1, 1, 0, 0, &[entry(1, 1), entry(2, 1)]))
        .unwrap();
    let rd = n.ready();
    assert_eq!(rd.entries.len(), 2);
    assert!(rd.must_sync);
    assert!(of_type(&rd.messages, MsgAppendResponse).is_empty());
    let r = of_type(&rd.persisted_messages, MsgAppendResponse);
    assert_eq!((r[0].index, r[0].reject), (2, false));
    n.store_mut().append(&rd.entries).unwrap();
    if let Some(hs) = rd.hard_state {
        n.store_mut().set_hard_state(hs);
    }
    n.advance(rd.number);

    n.step(append(2, 1, 1, 5, 1, &[entry(6, 1)])).unwrap();
    let rd = n.ready();
    assert!(of_type(&rd.messages, MsgAppendResponse).is_empty());
    let r = of_type(&rd.persisted_messages, MsgAppendResponse);
    assert!(r[0].reject);
}

// ---------------------------------------------------------------------------------------------
// Thesis §6.4 ReadIndex

/// Thesis §6.4 steps 1-4 for one read in a 5-node cluster: the leader records its commit index
/// and the read waits for a heartbeat round to confirm leadership. Returns the read states the
/// leader produced while only node 2 could answer (2 of 5, no majority), then after node 3 could
/// answer too, and the commit index when the read arrived.
fn read_index_round(bug: bool) -> (Vec<ReadState>, Vec<ReadState>, u64) {
    let mut c = Cluster::with_config(5, |cfg| {
        cfg.pre_vote = false;
        cfg.check_quorum = false;
        #[cfg(feature = "bug-injection")]
        {
            cfg.bugs.read_index_without_heartbeat = bug;
        }
    });
    let _ = bug;
    c.campaign(1);
    let at_request = committed(c.node(1));
    c.cut.extend([(1, 3), (1, 4), (1, 5)]);
    c.node_mut(1).read_index(Bytes::from_static(b"r")).unwrap();
    c.stabilize();
    let minority = c.reads.get(&1).cloned().unwrap_or_default();
    c.cut.remove(&(1, 3));
    c.tick(1);
    c.stabilize();
    (minority, c.reads[&1].clone(), at_request)
}

/// Thesis §6.4: the leader "records its current commit index in a local variable readIndex"
/// and "sends a new round of heartbeats ... Once it receives acknowledgments from a majority of
/// the cluster, the leader knows that there could not have existed a leader for a greater term
/// at the moment it sent the heartbeats"; only then is the read served.
#[test]
fn thesis_6_4_read_index_waits_for_a_heartbeat_quorum() {
    let (minority, answered, at_request) = read_index_round(false);
    assert!(
        minority.is_empty(),
        "answered without a quorum: {minority:?}"
    );
    assert_eq!(
        answered,
        vec![ReadState {
            index: at_request,
            request_ctx: Bytes::from_static(b"r")
        }]
    );
}

#[cfg(feature = "bug-injection")]
#[test]
fn thesis_6_4_read_index_check_catches_the_planted_bug() {
    assert!(!read_index_round(true).0.is_empty());
}

/// Thesis §6.4 step 1: "If the leader has not yet marked an entry from its current term
/// committed, it waits until it has done so", since only then does it know the latest commit
/// index.
#[test]
fn thesis_6_4_new_leader_serves_reads_after_committing_an_entry_of_its_term() {
    let mut n = node(1, &PEERS);
    n.campaign().unwrap();
    drain(&mut n);
    n.step(vote_resp(2, 1, 1, true)).unwrap();
    drain(&mut n);
    n.read_index(Bytes::from_static(b"r")).unwrap();
    let msgs = drain(&mut n);
    assert!(
        of_type(&msgs, MsgHeartbeat).is_empty(),
        "no confirmation round before the term's first entry commits"
    );
    n.step(append_resp(2, 1, 1, 1)).unwrap();
    let msgs = drain(&mut n);
    assert_eq!(committed(&n), 1);
    let beats = of_type(&msgs, MsgHeartbeat);
    assert!(!beats.is_empty() && beats.iter().all(|m| m.context.as_ref() == b"r"));
    let mut ack = msg(MsgHeartbeatResponse, 3, 1, 1);
    ack.context = Bytes::from_static(b"r");
    n.step(ack).unwrap();
    let h = handle_ready(&mut n).unwrap();
    assert_eq!(h.read_states.len(), 1);
    assert_eq!(h.read_states[0].index, 1);
}

/// Thesis §6.4: "Followers ... can also serve read-only queries": a follower asks the leader
/// for a read index and serves once it has applied that far.
#[test]
fn thesis_6_4_follower_read_goes_through_the_leader() {
    let mut c = Cluster::raw(3);
    c.campaign(1);
    c.propose(1, b"x");
    c.node_mut(3).read_index(Bytes::from_static(b"f")).unwrap();
    c.stabilize();
    let rs = &c.reads[&3];
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0].index, committed(c.node(1)));
    assert!(c.node(3).raft.raft_log.applied >= rs[0].index);
}

// ---------------------------------------------------------------------------------------------
// Thesis §9.6 PreVote

/// Isolates node 3 for 50 rounds of ticks, heals and ticks 30 more. Returns node 3's term while
/// isolated, and the leaders and their terms afterwards.
fn partition_and_rejoin(pre_vote: bool) -> (u64, u64, Vec<(u64, u64)>) {
    let mut c = Cluster::with_config(3, |cfg| {
        cfg.pre_vote = pre_vote;
        cfg.check_quorum = false;
    });
    c.campaign(1);
    let term = c.node(1).raft.term;
    c.isolate(3);
    c.tick_all(50);
    let isolated_term = c.node(3).raft.term;
    c.heal();
    c.tick_all(30);
    (term, isolated_term, c.leaders())
}

/// Thesis §9.6: "in the PreVote algorithm, a candidate only increments its term if it first
/// learns from a majority of the cluster that they would be willing to grant the candidate their
/// votes" — so a partitioned server rejoining does not disrupt the leader.
#[test]
fn thesis_9_6_prevote_keeps_a_rejoining_node_from_disrupting_the_leader() {
    let (term, isolated_term, leaders) = partition_and_rejoin(true);
    assert_eq!(
        isolated_term, term,
        "no term bump without a pre-vote majority"
    );
    assert_eq!(leaders, vec![(1, term)]);
    // Without PreVote the same partition deposes the leader: the property is PreVote's.
    let (term, isolated_term, leaders) = partition_and_rejoin(false);
    assert!(isolated_term > term);
    assert!(leaders.iter().all(|&(_, t)| t > term), "{leaders:?}");
}

/// Thesis §9.6: a pre-election asks with the next term but changes neither term nor vote, and
/// a pre-vote changes nothing on the voters either.
#[test]
fn thesis_9_6_pre_election_changes_no_term_or_vote() {
    let mut cfg = raw_config(1);
    cfg.pre_vote = true;
    let mut n = new_node(
        &cfg,
        MemStorage::new_with_conf_state(PEERS.to_vec(), vec![]),
    );
    n.campaign().unwrap();
    assert_eq!(n.raft.role, StateRole::PreCandidate);
    assert_eq!((n.raft.term, n.raft.vote), (0, NONE));
    let h = handle_ready(&mut n).unwrap();
    assert!(h.hard_state.is_none());
    let reqs = of_type(&h.messages, MsgRequestPreVote);
    assert_eq!(reqs.len(), 2);
    assert!(reqs.iter().all(|m| m.term == 1));

    let mut voter = new_node(
        &raw_config(2),
        MemStorage::new_with_conf_state(PEERS.to_vec(), vec![]),
    );
    let mut req = reqs[0].clone();
    req.to = 2;
    voter.step(req).unwrap();
    assert_eq!((voter.raft.term, voter.raft.vote), (0, NONE));
    let msgs = drain(&mut voter);
    let r = of_type(&msgs, MsgRequestPreVoteResponse);
    assert_eq!((r[0].term, r[0].reject), (1, false));

    // With a majority of pre-votes, the real election follows.
    n.step(vote_resp_pre(2, 1, 1)).unwrap();
    assert_eq!(
        (n.raft.role, n.raft.term, n.raft.vote),
        (StateRole::Candidate, 1, 1)
    );
}

fn vote_resp_pre(from: u64, to: u64, term: u64) -> Message {
    msg(MsgRequestPreVoteResponse, from, to, term)
}

// ---------------------------------------------------------------------------------------------
// Thesis §6.2 CheckQuorum and the leader lease

/// Isolates the leader and ticks it `ticks` times; returns its role.
fn isolated_leader_role(check_quorum: bool, ticks: usize) -> StateRole {
    let mut c = Cluster::with_config(3, |cfg| {
        cfg.pre_vote = false;
        cfg.check_quorum = check_quorum;
    });
    c.campaign(1);
    c.isolate(1);
    for _ in 0..ticks {
        c.tick(1);
        c.stabilize();
    }
    c.node(1).raft.role
}

/// Thesis §6.2: "a leader steps down if an election timeout elapses without a successful round
/// of heartbeats to a majority of its cluster".
#[test]
fn thesis_6_2_leader_without_a_quorum_steps_down() {
    let et = 10;
    assert_eq!(isolated_leader_role(true, et - 1), StateRole::Leader);
    assert_eq!(isolated_leader_role(true, 2 * et), StateRole::Follower);
    assert_eq!(isolated_leader_role(false, 10 * et), StateRole::Leader);

    // Connected, it stays leader indefinitely.
    let mut c = Cluster::new(3);
    c.campaign(1);
    c.tick_all(10 * et);
    assert_eq!(c.leaders(), vec![(1, c.node(1).raft.term)]);
}

/// Thesis §6.2 (and §4.2.3): "if a server receives a RequestVote request within the minimum
/// election timeout of hearing from a current leader, it does not update its term or grant its
/// vote" — except for a leadership transfer, which the leader itself asked for.
#[test]
fn thesis_6_2_follower_in_lease_ignores_vote_requests() {
    let mut c = Cluster::with_config(3, |cfg| {
        cfg.pre_vote = false;
        cfg.check_quorum = true;
    });
    c.campaign(1);
    let term = c.node(1).raft.term;
    let last = c.node(2).raft.raft_log.last_index();
    let n2 = c.node_mut(2);
    n2.step(vote_req(3, 2, term + 1, last, term)).unwrap();
    assert_eq!(
        (n2.raft.term, n2.raft.vote, n2.raft.leader_id),
        (term, 1, 1)
    );
    assert!(drain(n2).is_empty(), "not even a rejection");

    let mut forced = vote_req(3, 2, term + 1, last, term);
    forced.context = Bytes::from_static(CAMPAIGN_TRANSFER);
    n2.step(forced).unwrap();
    assert_eq!((n2.raft.term, n2.raft.vote), (term + 1, 3));
}

/// Thesis §3.10 leadership transfer: the leader brings the target up to date and sends it
/// TimeoutNow; the target wins at once even with leases (CheckQuorum) on everywhere.
#[test]
fn thesis_3_10_leadership_transfer() {
    let mut c = Cluster::new(3);
    c.campaign(1);
    c.down.insert(3);
    c.propose(1, b"x");
    c.heal();
    let term = c.node(1).raft.term;
    c.node_mut(1).transfer_leader(3);
    c.stabilize();
    assert_eq!(c.leaders(), vec![(3, term + 1)]);
    c.propose(2, b"y");
    assert_eq!(
        c.applied_data(3),
        vec![Bytes::from_static(b"x"), Bytes::from_static(b"y")]
    );
}

/// Thesis §4.2.1: learners ("non-voting members") receive the log but never campaign, and their
/// acknowledgements do not count toward a majority.
#[test]
fn thesis_4_2_1_learners_replicate_but_do_not_vote_or_count() {
    let nodes: Vec<(u64, Node)> = (1..=4)
        .map(|id| {
            let s = MemStorage::new_with_conf_state(PEERS.to_vec(), vec![4]);
            (id, new_node(&raw_config(id), s))
        })
        .collect();
    let mut c = Cluster::from_nodes(nodes);
    c.campaign(1);
    c.propose(1, b"x");
    assert_eq!(c.applied_data(4), vec![Bytes::from_static(b"x")]);
    c.down.extend([1, 2, 3]);
    for _ in 0..100 {
        c.node_mut(4).tick();
    }
    assert_eq!(c.node(4).raft.role, StateRole::Follower);
    assert!(c.node_mut(4).campaign().is_ok());
    assert_eq!(c.node(4).raft.role, StateRole::Follower);
    c.heal();
    c.down.extend([2, 3]);
    c.propose(1, b"y");
    assert_eq!(
        c.applied_data(1).len(),
        1,
        "leader + learner is no majority"
    );
}
