//! What a node's snapshot holds: the state machine and the members' peer addresses.
//!
//! Addresses travel with the membership changes that add members (see [`conf_context`]), so
//! every member learns where a new one listens; the snapshot carries the address book, so a
//! member that catches up from a snapshot (a new one, or one far behind) learns it too.
//!
//! Layout: `MAGIC`, a u32 count, then per member `id: u64, len: u16, address (UTF-8)`, then
//! the state machine's own snapshot. All integers little-endian. Empty data is a fresh node
//! (a bootstrap snapshot written before any state existed).

use std::collections::BTreeMap;

use bytes::{BufMut, Bytes, BytesMut};

const MAGIC: &[u8; 4] = b"KNS1";

/// A peer address is `host:port`; longer ones are refused rather than stored, so a peer cannot
/// grow every snapshot with one membership change.
pub const MAX_ADDR_LEN: usize = 256;

/// Far above any real cluster (Raft clusters have a handful of voters), yet it bounds what a
/// damaged count makes the decoder believe.
const MAX_MEMBERS: u32 = 4096;

/// Peer addresses by node id.
pub type AddressBook = BTreeMap<u64, String>;

pub fn encode(book: &AddressBook, kv: &[u8]) -> Bytes {
    let book_len: usize = book.values().map(|a| 10 + a.len()).sum();
    let mut b = BytesMut::with_capacity(8 + book_len + kv.len());
    b.put_slice(MAGIC);
    b.put_u32_le(book.len() as u32);
    for (&id, addr) in book {
        b.put_u64_le(id);
        b.put_u16_le(addr.len() as u16);
        b.put_slice(addr.as_bytes());
    }
    b.put_slice(kv);
    b.freeze()
}

/// Splits snapshot data into the address book and the state machine's snapshot.
pub fn decode(data: &Bytes) -> Result<(AddressBook, Bytes), String> {
    let mut book = AddressBook::new();
    if data.is_empty() {
        return Ok((book, Bytes::new()));
    }
    let short = || "node snapshot is truncated".to_string();
    if data.len() < 8 || &data[..4] != MAGIC {
        return Err("node snapshot has no valid header".into());
    }
    let count = u32::from_le_bytes(data[4..8].try_into().expect("4 bytes"));
    if count > MAX_MEMBERS {
        return Err(format!("node snapshot claims {count} members"));
    }
    let mut at = 8;
    for _ in 0..count {
        let head = data.get(at..at + 10).ok_or_else(short)?;
        let id = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        let len = u16::from_le_bytes(head[8..].try_into().expect("2 bytes")) as usize;
        at += 10;
        let raw = data.get(at..at + len).ok_or_else(short)?;
        let addr = std::str::from_utf8(raw)
            .map_err(|_| format!("node snapshot: address of node {id} is not UTF-8"))?;
        book.insert(id, addr.to_string());
        at += len;
    }
    Ok((book, data.slice(at..)))
}

/// A membership change's context: the request context (16 bytes, see `core`) followed by the
/// new member's peer address, if the change adds one.
pub fn conf_context(request: &[u8], addr: Option<&str>) -> Bytes {
    let mut b = BytesMut::with_capacity(request.len() + addr.map_or(0, str::len));
    b.put_slice(request);
    if let Some(a) = addr {
        b.put_slice(a.as_bytes());
    }
    b.freeze()
}

/// The (request context, address) of a membership change's context; either may be absent
/// (changes proposed by other tools carry neither).
pub fn parse_conf_context(c: &[u8]) -> (Option<&[u8]>, Option<&str>) {
    if c.len() < 16 {
        return (None, None);
    }
    let (req, rest) = c.split_at(16);
    let addr = std::str::from_utf8(rest)
        .ok()
        .filter(|a| !a.is_empty() && a.len() <= MAX_ADDR_LEN);
    (Some(req), addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_damage() {
        let mut book = AddressBook::new();
        book.insert(1, "127.0.0.1:1".into());
        book.insert(7, "host.example:2380".into());
        let data = encode(&book, b"kv-bytes");
        let (b2, kv) = decode(&data).unwrap();
        assert_eq!(b2, book);
        assert_eq!(&kv[..], b"kv-bytes");
        for cut in 1..data.len() - 8 {
            assert!(decode(&data.slice(..cut)).is_err(), "cut at {cut}");
        }
        let mut bad = data.to_vec();
        bad[0] = b'X';
        assert!(decode(&Bytes::from(bad)).is_err());
        assert_eq!(
            decode(&Bytes::new()).unwrap(),
            (AddressBook::new(), Bytes::new())
        );
    }

    #[test]
    fn conf_context_carries_request_and_address() {
        let req = [7u8; 16];
        let c = conf_context(&req, Some("10.0.0.1:2380"));
        assert_eq!(
            parse_conf_context(&c),
            (Some(&req[..]), Some("10.0.0.1:2380"))
        );
        let c = conf_context(&req, None);
        assert_eq!(parse_conf_context(&c), (Some(&req[..]), None));
        assert_eq!(parse_conf_context(b"short"), (None, None));
    }
}
