//! Node-level log entries: what the node layer replicates besides the state machine, through
//! normal Raft entries that `NodeCore::apply_entry` takes before the state machine sees them.
//!
//! Two kinds, both about members rather than keys, so the key-value store never learns of
//! cluster membership:
//! - a member's published attributes (etcd's `publish`: name and client URLs);
//! - a member's new peer address (etcd's `MemberUpdate`).
//!
//! Why a normal entry and not a membership change: Keel's Raft core knows only add, remove and
//! promote, and neither kind changes who votes, so there is nothing for Raft to make effective;
//! a normal entry is applied in log order on every member alike, which is all they need.
//!
//! Layout: `NODE_ENTRY_TAG`, `FORMAT`, kind (u8), proposer (u64), sequence (u64), then the
//! kind's body; integers little-endian, strings `len: u16` then UTF-8 bytes.
//! - `KIND_ATTRIBUTES`: member id (u64), then `snapshot::MemberAttrs` as a snapshot holds it;
//! - `KIND_PEER_ADDR`: member id (u64), address (string).
//!
//! The tag cannot start a state machine command: `keel_kv::Command::decode` refuses any payload
//! whose first byte is not `keel_kv::COMMAND_FORMAT_VERSION` (1 today, counted up from 1 as the
//! format changes), and 0xFF is the far end of that range. The assertion below turns a kv
//! format that ever reached it into a build error rather than a misread log. An older Keel
//! reading this entry fails to decode it as a command and skips it, like every replica of that
//! version, so mixed versions still agree on the key space.

use bytes::{BufMut, Bytes, BytesMut};

use crate::snapshot::{Cursor, MemberAttrs, MAX_ADDR_LEN};

/// First byte of every node-level entry.
pub const NODE_ENTRY_TAG: u8 = 0xFF;
const _: () = assert!(NODE_ENTRY_TAG != keel_kv::COMMAND_FORMAT_VERSION);

/// Second byte: the layout version, so a later layout is refused (and skipped alike by every
/// replica) rather than misread.
const FORMAT: u8 = 1;

const KIND_ATTRIBUTES: u8 = 1;
const KIND_PEER_ADDR: u8 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEntry {
    /// Member `id` publishes its name and client URLs. Applied only while `id` is a member, so
    /// a late publish from a removed member does not bring it back.
    Attributes { id: u64, attrs: MemberAttrs },
    /// Member `id` now listens for peers at `addr` (`host:port`). Refused when applied if `id`
    /// left or another member took `addr` meanwhile.
    PeerAddr { id: u64, addr: String },
}

/// An entry and who proposed it: the proposer id and sequence number, so the proposing node
/// can answer its waiting caller (see `NodeCore`'s `request_context`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub proposer: u64,
    pub seq: u64,
    pub entry: NodeEntry,
}

/// Whether `data` is a node-level entry (and not a state machine command).
pub fn is_node_entry(data: &[u8]) -> bool {
    data.first() == Some(&NODE_ENTRY_TAG)
}

/// Refuses an entry that could not be stored or shown (see `MemberAttrs::validate`).
pub fn validate(e: &NodeEntry) -> Result<(), String> {
    match e {
        NodeEntry::Attributes { attrs, .. } => attrs.validate(),
        NodeEntry::PeerAddr { addr, .. } if addr.is_empty() || addr.len() > MAX_ADDR_LEN => {
            Err(format!("peer address must be 1 to {MAX_ADDR_LEN} bytes"))
        }
        NodeEntry::PeerAddr { .. } => Ok(()),
    }
}

impl Envelope {
    /// The entry's log payload. Call `validate` first: lengths past the bounds do not fit.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(64);
        b.put_u8(NODE_ENTRY_TAG);
        b.put_u8(FORMAT);
        let kind = match &self.entry {
            NodeEntry::Attributes { .. } => KIND_ATTRIBUTES,
            NodeEntry::PeerAddr { .. } => KIND_PEER_ADDR,
        };
        b.put_u8(kind);
        b.put_u64_le(self.proposer);
        b.put_u64_le(self.seq);
        match &self.entry {
            NodeEntry::Attributes { id, attrs } => {
                b.put_u64_le(*id);
                attrs.put(&mut b);
            }
            NodeEntry::PeerAddr { id, addr } => {
                b.put_u64_le(*id);
                b.put_u16_le(addr.len() as u16);
                b.put_slice(addr.as_bytes());
            }
        }
        b.freeze()
    }

    /// Reads back what `encode` wrote; anything else (another version, trailing bytes, values
    /// past the bounds) is an error, never a panic, so every replica skips it alike.
    pub fn decode(data: &[u8]) -> Result<Envelope, String> {
        let mut r = Cursor::new(data);
        if r.u8()? != NODE_ENTRY_TAG {
            return Err("not a node entry".into());
        }
        let format = r.u8()?;
        if format != FORMAT {
            return Err(format!("node entry format {format} is not known"));
        }
        let kind = r.u8()?;
        let proposer = r.u64()?;
        let seq = r.u64()?;
        let entry = match kind {
            KIND_ATTRIBUTES => NodeEntry::Attributes {
                id: r.u64()?,
                attrs: MemberAttrs::get(&mut r)?,
            },
            KIND_PEER_ADDR => NodeEntry::PeerAddr {
                id: r.u64()?,
                addr: r.str("peer address")?,
            },
            k => return Err(format!("node entry kind {k} is not known")),
        };
        if !r.is_empty() {
            return Err("node entry has trailing bytes".into());
        }
        validate(&entry)?;
        Ok(Envelope {
            proposer,
            seq,
            entry,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs() -> NodeEntry {
        NodeEntry::Attributes {
            id: 3,
            attrs: MemberAttrs {
                name: "infra3".into(),
                client_urls: vec!["http://127.0.0.1:2379".into()],
            },
        }
    }

    #[test]
    fn round_trips_and_refuses_damage() {
        for entry in [
            attrs(),
            NodeEntry::PeerAddr {
                id: 2,
                addr: "10.0.0.2:2380".into(),
            },
        ] {
            let env = Envelope {
                proposer: 7 << 32 | 1,
                seq: 42,
                entry,
            };
            let data = env.encode();
            assert!(is_node_entry(&data));
            assert_eq!(Envelope::decode(&data).unwrap(), env);
            for cut in 0..data.len() {
                assert!(Envelope::decode(&data[..cut]).is_err(), "cut at {cut}");
            }
            let mut long = data.to_vec();
            long.push(0);
            assert!(Envelope::decode(&long).is_err());
            let mut other = data.to_vec();
            other[1] = FORMAT + 1;
            assert!(Envelope::decode(&other).is_err());
            other[1] = FORMAT;
            other[2] = 9;
            assert!(Envelope::decode(&other).is_err());
        }
    }

    /// The state machine never takes a node entry for a command, nor the reverse: the first
    /// byte tells them apart.
    #[test]
    fn never_a_state_machine_command() {
        let data = Envelope {
            proposer: 1,
            seq: 1,
            entry: attrs(),
        }
        .encode();
        assert!(keel_kv::Command::decode(&data).is_err());
        let cmd = keel_kv::Command::with_id(
            keel_kv::RequestId {
                proposer: 1,
                seq: 1,
            },
            keel_kv::Op::Put(keel_kv::PutRequest::default()),
        )
        .encode();
        assert!(!is_node_entry(&cmd));
        assert!(Envelope::decode(&cmd).is_err());
    }

    #[test]
    fn refuses_entries_past_the_bounds() {
        let long = NodeEntry::PeerAddr {
            id: 1,
            addr: "h".repeat(MAX_ADDR_LEN + 1),
        };
        assert!(validate(&long).is_err());
        let empty = NodeEntry::PeerAddr {
            id: 1,
            addr: String::new(),
        };
        assert!(validate(&empty).is_err());
        // Encoded anyway (bypassing validate): the decoder refuses it, so no replica applies it.
        let data = Envelope {
            proposer: 1,
            seq: 1,
            entry: long,
        }
        .encode();
        assert!(Envelope::decode(&data).is_err());
        let bad = NodeEntry::Attributes {
            id: 1,
            attrs: MemberAttrs {
                name: "x".repeat(crate::snapshot::MAX_NAME_LEN + 1),
                client_urls: vec![],
            },
        };
        assert!(validate(&bad).is_err());
    }
}
