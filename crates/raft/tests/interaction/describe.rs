//! One-line renderings of entries, messages and configurations for script output.
//!
//! Conventions: `T/I` is term T, index I (entries, a message's previous entry `log=`, a
//! rejection hint `hint=`, a snapshot). Fields are printed only when they carry information
//! for that message type, so lines stay short enough to review.

use bytes::Bytes;
use keel_raft::raftpb::{
    ConfChange, ConfChangeType, ConfState, Entry, EntryType, Message, MessageType, Snapshot,
};
use prost::Message as _;

/// Data as a quoted string (escaped if not printable).
pub fn quote(b: &Bytes) -> String {
    format!("{:?}", String::from_utf8_lossy(b))
}

pub fn ids(v: &[u64]) -> String {
    let s: Vec<String> = v.iter().map(u64::to_string).collect();
    format!("({})", s.join(","))
}

pub fn conf(cs: &ConfState) -> String {
    let mut s = format!("voters={}", ids(&cs.voters));
    if !cs.learners.is_empty() {
        s.push_str(&format!(" learners={}", ids(&cs.learners)));
    }
    s
}

pub fn conf_change(cc: &ConfChange) -> String {
    let kind = match cc.change_type() {
        ConfChangeType::AddNode => "add",
        ConfChangeType::AddLearnerNode => "add-learner",
        ConfChangeType::RemoveNode => "remove",
    };
    format!("{kind}({})", cc.node_id)
}

pub fn entry(e: &Entry) -> String {
    // A forwarded proposal has no index or term yet: only its payload means anything.
    let mut s = if e.index == 0 && e.term == 0 {
        String::new()
    } else {
        format!("{}/{}", e.term, e.index)
    };
    let payload = match e.entry_type() {
        EntryType::EntryConfChange => match ConfChange::decode(e.data.as_ref()) {
            Ok(cc) => conf_change(&cc),
            Err(_) => format!("conf-change(undecodable {})", quote(&e.data)),
        },
        EntryType::EntryNormal if e.data.is_empty() => String::new(),
        EntryType::EntryNormal => quote(&e.data),
    };
    if !payload.is_empty() {
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(&payload);
    }
    s
}

pub fn entries(es: &[Entry]) -> String {
    let v: Vec<String> = es.iter().map(entry).collect();
    format!("[{}]", v.join(", "))
}

pub fn snapshot(s: &Snapshot) -> String {
    let meta = s.metadata.clone().unwrap_or_default();
    format!(
        "{}/{} {} data={}",
        meta.term,
        meta.index,
        conf(&meta.conf_state.unwrap_or_default()),
        quote(&s.data)
    )
}

/// `from->to Type term=N ...fields`.
pub fn message(m: &Message) -> String {
    let t = m.msg_type();
    let mut s = format!("{}->{} {:?}", m.from, m.to, t);
    // Forwarded proposals and reads carry no term: the receiver treats them as local requests.
    if !matches!(t, MessageType::MsgPropose | MessageType::MsgReadIndex) {
        s.push_str(&format!(" term={}", m.term));
    }
    match t {
        MessageType::MsgAppend => {
            s.push_str(&format!(
                " log={}/{} commit={}",
                m.log_term, m.index, m.commit
            ));
            if !m.entries.is_empty() {
                s.push_str(&format!(" entries={}", entries(&m.entries)));
            }
        }
        MessageType::MsgAppendResponse => {
            s.push_str(&format!(" index={}", m.index));
            if m.reject {
                s.push_str(&format!(
                    " reject hint={}/{}",
                    m.reject_hint_term, m.reject_hint
                ));
            }
        }
        MessageType::MsgRequestVote | MessageType::MsgRequestPreVote => {
            s.push_str(&format!(" log={}/{}", m.log_term, m.index));
        }
        MessageType::MsgRequestVoteResponse | MessageType::MsgRequestPreVoteResponse
            if m.reject =>
        {
            s.push_str(" reject");
        }
        MessageType::MsgHeartbeat => s.push_str(&format!(" commit={}", m.commit)),
        MessageType::MsgSnapshot => {
            if let Some(snap) = &m.snapshot {
                s.push_str(&format!(" snapshot={}", snapshot(snap)));
            }
        }
        MessageType::MsgPropose => s.push_str(&format!(" entries={}", entries(&m.entries))),
        MessageType::MsgReadIndexResp => s.push_str(&format!(" index={}", m.index)),
        _ => {}
    }
    if !m.context.is_empty() {
        s.push_str(&format!(" ctx={}", quote(&m.context)));
    }
    s
}
