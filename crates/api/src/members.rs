//! Membership changes shared by raftexample's `POST/DELETE /<id>`, seed-style `/intern/*` and
//! `/v1/members`. The checks here run against this node's view of the configuration before
//! anything is proposed, so a refused request changes nothing; Raft itself still refuses a
//! second change while one is pending (answered 409 through the driver's error).

use keel_node::driver::{MemberStatus, Status};
use keel_raft::StateRole;
use serde::Serialize;

use crate::error::{ApiError, ApiResult};
use crate::input::{check_node_id, peer_addr, MAX_NODE_ID};
use crate::Inner;

#[derive(Debug, Serialize)]
pub struct MemberJson {
    pub id: u64,
    /// What the member published through Raft (etcd's name and client URLs); empty for a
    /// member that has not started since it was added.
    pub name: String,
    pub client_urls: Vec<String>,
    pub peer_url: Option<String>,
    pub learner: bool,
    /// Highest log index known to be replicated on the member; like `next` and `lag`, only the
    /// leader tracks it, so other nodes answer 0.
    #[serde(rename = "match")]
    pub matched: u64,
    pub next: u64,
    /// Entries the member is behind the leader's last index.
    pub lag: u64,
}

pub fn members_json(st: &Status) -> Vec<MemberJson> {
    let leader = st.role == StateRole::Leader;
    st.members
        .iter()
        .map(|m| MemberJson {
            id: m.id,
            name: m.name.clone(),
            client_urls: m.client_urls.clone(),
            peer_url: m.peer_url.clone(),
            learner: m.learner,
            matched: m.matched,
            next: m.next,
            lag: if leader {
                st.last_index.saturating_sub(m.matched)
            } else {
                0
            },
        })
        .collect()
}

pub fn role_name(role: StateRole) -> &'static str {
    match role {
        StateRole::Leader => "leader",
        StateRole::Follower => "follower",
        StateRole::Candidate => "candidate",
        StateRole::PreCandidate => "pre-candidate",
    }
}

pub fn find(st: &Status, id: u64) -> Option<&MemberStatus> {
    st.members.iter().find(|m| m.id == id)
}

fn same_addr(url: Option<&str>, addr: &str) -> bool {
    url.and_then(|u| peer_addr(u).ok()).as_deref() == Some(addr)
}

/// The member listening at `addr` (compared in `host:port` form).
pub fn find_by_addr<'a>(st: &'a Status, addr: &str) -> Option<&'a MemberStatus> {
    st.members
        .iter()
        .find(|m| same_addr(m.peer_url.as_deref(), addr))
}

/// The id a member added without one gets: one above every id in the configuration.
pub fn next_id(st: &Status) -> ApiResult<u64> {
    let max = st.members.iter().map(|m| m.id).chain([st.id]).max();
    let id = max.unwrap_or(0) + 1;
    if id > MAX_NODE_ID {
        return Err(ApiError::conflict("no node id left below 2^32"));
    }
    Ok(id)
}

/// Adds a voter (or learner) at `peer_url` and waits until the change is applied here.
/// Returns the id and whether anything changed: asking again for a member that already exists
/// with the same address and kind succeeds without a change, so a joiner can retry a request
/// whose answer it lost.
pub async fn add(
    app: &Inner,
    id: Option<u64>,
    peer_url: &str,
    learner: bool,
) -> ApiResult<(u64, bool)> {
    let addr = peer_addr(peer_url)?;
    let st = app.node.status().await?;
    let id = match id {
        Some(id) => check_node_id(id)?,
        None => next_id(&st)?,
    };
    if let Some(m) = find(&st, id) {
        if same_addr(m.peer_url.as_deref(), &addr) && m.learner == learner {
            return Ok((id, false));
        }
        let kind = if m.learner { "learner" } else { "voter" };
        return Err(ApiError::conflict(format!(
            "member {id} already exists ({kind} at {})",
            m.peer_url.as_deref().unwrap_or("an unknown address")
        )));
    }
    if let Some(m) = find_by_addr(&st, &addr) {
        return Err(ApiError::conflict(format!(
            "{addr} is already the address of member {}",
            m.id
        )));
    }
    if learner {
        if let Some(l) = st.members.iter().find(|m| m.learner) {
            // etcd's default (--max-learners 1): a learner is a member on its way in; two at
            // once would mean two voters' worth of catch-up traffic on the leader.
            // The message is etcd's, which clients match on; the learner's id is in the log.
            tracing::debug!("refusing a second learner; member {} is one", l.id);
            return Err(ApiError::conflict(
                "etcdserver: too many learner members in cluster",
            ));
        }
        app.node.add_learner(id, addr).await?;
    } else {
        app.node.add_member(id, addr).await?;
    }
    Ok((id, true))
}

/// Removes member `id` and waits until the change is applied here.
pub async fn remove(app: &Inner, id: u64) -> ApiResult<()> {
    let st = app.node.status().await?;
    let Some(m) = find(&st, id) else {
        return Err(ApiError::unknown_member(id));
    };
    if !m.learner && st.voters.len() <= 1 {
        // A cluster without voters can never commit again, including a change to undo this.
        return Err(ApiError::conflict(format!(
            "member {id} is the last voter; removing it would leave a cluster that cannot commit"
        )));
    }
    app.node.remove_member(id).await?;
    Ok(())
}

/// A learner may become a voter only once it holds most of the log: a voter that is far behind
/// (or was never started) counts toward the quorum without being able to acknowledge, which
/// can stall every write. etcd's rule: the learner's match index is at least 90% of the
/// leader's. Only the leader tracks match indexes; elsewhere the check cannot be made here and
/// is left to the caller to make on the leader.
pub fn check_learner_ready(st: &Status, id: u64) -> ApiResult<()> {
    if st.role != StateRole::Leader {
        return Ok(());
    }
    let Some(m) = find(st, id) else {
        return Err(ApiError::unknown_member(id));
    };
    let leader_match = st.last_index;
    if (m.matched as f64) < (leader_match as f64) * 0.9 {
        tracing::debug!(
            "learner {id} not promoted: {} of {leader_match} entries",
            m.matched
        );
        return Err(ApiError::conflict(
            "etcdserver: can only promote a learner member which is in sync with leader",
        ));
    }
    Ok(())
}
