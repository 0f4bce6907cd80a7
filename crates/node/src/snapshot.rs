//! What a node's snapshot holds: the state machine, the members' peer addresses and their
//! published attributes (etcd's name and client URLs).
//!
//! Addresses travel with the membership changes that add members (see [`conf_context`]) and
//! with peer-address updates (`crate::entry`), attributes with the entries members publish
//! them in; the snapshot carries both, so a member that catches up from a snapshot (a new one,
//! or one far behind) learns them too.
//!
//! Layout (`KNS2`): `MAGIC`, a u32 count, then per member `id: u64, len: u16, address (UTF-8)`;
//! a u32 count, then per member `id: u64` and its [`MemberAttrs`] (`len: u16, name`, `count:
//! u16`, then per client URL `len: u16, url`); then the state machine's own snapshot. All
//! integers little-endian. The older `KNS1` layout (no attributes section) is still read, so a
//! data dir written before attributes existed opens; it is never written. Empty data is a fresh
//! node (a bootstrap snapshot written before any state existed).

use std::collections::BTreeMap;

use bytes::{BufMut, Bytes, BytesMut};
use keel_kv::StoreImage;

/// The layout written. Bumped from `KNS1` when the attributes section was added; a reader of
/// the old version would take the attributes for the state machine's bytes and refuse them.
const MAGIC: &[u8; 4] = b"KNS2";
/// The layout before member attributes: address book, then the state machine.
const MAGIC_V1: &[u8; 4] = b"KNS1";

/// A peer address is `host:port`; longer ones are refused rather than stored, so a peer cannot
/// grow every snapshot with one membership change.
pub const MAX_ADDR_LEN: usize = 256;

/// A member name is for people to read (etcd's `--name`); 256 bytes is far beyond any real
/// one, and every member keeps every name in memory and in every snapshot.
pub const MAX_NAME_LEN: usize = 256;

/// Client URLs one member may advertise. etcd members advertise one per interface or scheme,
/// a handful at most; the bound keeps one publish from growing every snapshot.
pub const MAX_CLIENT_URLS: usize = 16;

/// A client URL is `scheme://host:port`: the peer address bound plus room for the scheme.
pub const MAX_URL_LEN: usize = MAX_ADDR_LEN + 16;

/// Far above any real cluster (Raft clusters have a handful of voters), yet it bounds what a
/// damaged count makes the decoder believe.
const MAX_MEMBERS: u32 = 4096;

/// Peer addresses by node id.
pub type AddressBook = BTreeMap<u64, String>;

/// What a member publishes about itself once it runs (etcd's `publish`): how people and
/// clients know it. A member that never published has none, which etcd shows as "unstarted".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberAttrs {
    pub name: String,
    pub client_urls: Vec<String>,
}

impl MemberAttrs {
    /// Refuses what could not be stored or shown: over the bounds above, an empty URL, or one
    /// without a scheme (clients dial these as given).
    pub fn validate(&self) -> Result<(), String> {
        if self.name.len() > MAX_NAME_LEN {
            return Err(format!("member name longer than {MAX_NAME_LEN} bytes"));
        }
        if self.name.chars().any(char::is_control) {
            return Err("member name holds a control character".into());
        }
        if self.client_urls.len() > MAX_CLIENT_URLS {
            return Err(format!("more than {MAX_CLIENT_URLS} client URLs"));
        }
        for u in &self.client_urls {
            if u.len() > MAX_URL_LEN {
                return Err(format!("client URL longer than {MAX_URL_LEN} bytes"));
            }
            let ok = u
                .split_once("://")
                .is_some_and(|(scheme, rest)| !scheme.is_empty() && !rest.is_empty());
            if !ok || u.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!("client URL {u:?} is not scheme://host:port"));
            }
        }
        Ok(())
    }

    /// Nothing published: etcd's "unstarted" member.
    pub fn is_empty(&self) -> bool {
        self.name.is_empty() && self.client_urls.is_empty()
    }

    pub(crate) fn put(&self, b: &mut BytesMut) {
        put_str(b, &self.name);
        b.put_u16_le(self.client_urls.len() as u16);
        for u in &self.client_urls {
            put_str(b, u);
        }
    }

    pub(crate) fn encoded_len(&self) -> usize {
        2 + self.name.len() + 2 + self.client_urls.iter().map(|u| 2 + u.len()).sum::<usize>()
    }

    /// Reads what `put` wrote and checks it against the bounds, so a damaged or hostile input
    /// never yields attributes a proposer could not have made.
    pub(crate) fn get(r: &mut Cursor<'_>) -> Result<MemberAttrs, String> {
        let name = r.str("member name")?;
        let count = r.u16()? as usize;
        if count > MAX_CLIENT_URLS {
            return Err(format!("{count} client URLs"));
        }
        let mut client_urls = Vec::with_capacity(count);
        for _ in 0..count {
            client_urls.push(r.str("client URL")?);
        }
        let a = MemberAttrs { name, client_urls };
        a.validate()?;
        Ok(a)
    }
}

/// Published attributes by node id. Invariant (kept by `NodeCore`): only members have an entry.
pub type Attributes = BTreeMap<u64, MemberAttrs>;

/// A decoded snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeSnapshot {
    pub peers: AddressBook,
    pub attrs: Attributes,
    /// The state machine's own snapshot (empty: a fresh store).
    pub kv: Bytes,
}

fn put_str(b: &mut BytesMut, s: &str) {
    b.put_u16_le(s.len() as u16);
    b.put_slice(s.as_bytes());
}

/// A bounds-checked reader: every read past the end is an error, never a panic.
pub(crate) struct Cursor<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Cursor<'a> {
        Cursor { data, at: 0 }
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            return Err("truncated".into());
        };
        let s = &self.data[self.at..end];
        self.at = end;
        Ok(s)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    pub(crate) fn str(&mut self, what: &str) -> Result<String, String> {
        let n = self.u16()? as usize;
        let raw = self.take(n)?;
        std::str::from_utf8(raw)
            .map(str::to_string)
            .map_err(|_| format!("{what} is not UTF-8"))
    }

    pub(crate) fn at(&self) -> usize {
        self.at
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.at == self.data.len()
    }
}

pub fn encode(book: &AddressBook, attrs: &Attributes, kv: &[u8]) -> Bytes {
    let mut b = header(book, attrs, kv.len());
    b.extend_from_slice(kv);
    Bytes::from(b)
}

/// The address book and attributes, with room reserved for `kv_len` more bytes.
fn header(book: &AddressBook, attrs: &Attributes, kv_len: usize) -> Vec<u8> {
    let book_len: usize = book.values().map(|a| 10 + a.len()).sum();
    let attrs_len: usize = attrs.values().map(|a| 8 + a.encoded_len()).sum();
    let mut b = BytesMut::with_capacity(12 + book_len + attrs_len + kv_len);
    b.put_slice(MAGIC);
    b.put_u32_le(book.len() as u32);
    for (&id, addr) in book {
        b.put_u64_le(id);
        put_str(&mut b, addr);
    }
    b.put_u32_le(attrs.len() as u32);
    for (&id, a) in attrs {
        b.put_u64_le(id);
        a.put(&mut b);
    }
    b.into()
}

/// A node's state as of one applied index, taken cheaply on the Raft thread (`NodeCore::image`)
/// and encoded into snapshot data on another thread (`encode`), so a snapshot of a large store
/// never stalls heartbeats and appends for as long as its encoding takes.
#[derive(Debug, Clone)]
pub struct NodeImage {
    /// The node's applied index, which can be past the state machine's own (conf changes and
    /// node entries are applied without a command to the store).
    applied: u64,
    book: AddressBook,
    attrs: Attributes,
    kv: StoreImage,
}

impl NodeImage {
    pub fn new(applied: u64, book: AddressBook, attrs: Attributes, kv: StoreImage) -> NodeImage {
        NodeImage {
            applied,
            book,
            attrs,
            kv,
        }
    }

    /// The applied index the image is of.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    pub fn revision(&self) -> i64 {
        self.kv.revision()
    }

    /// The same bytes as `encode(book, attrs, &kv.encode())`, written once.
    pub fn encode(&self) -> Bytes {
        let mut b = header(&self.book, &self.attrs, 0);
        self.kv.encode_into(&mut b);
        Bytes::from(b)
    }
}

/// Splits snapshot data into the address book, the attributes and the state machine's
/// snapshot. Reads both layouts (`KNS2` and the older `KNS1`).
pub fn decode(data: &Bytes) -> Result<NodeSnapshot, String> {
    if data.is_empty() {
        return Ok(NodeSnapshot::default());
    }
    let with_attrs = match data.get(..4) {
        Some(m) if m == MAGIC => true,
        Some(m) if m == MAGIC_V1 => false,
        _ => return Err("node snapshot has no valid header".into()),
    };
    let mut r = Cursor::new(&data[4..]);
    let ctx = |e: String| format!("node snapshot: {e}");
    let count = r.u32().map_err(ctx)?;
    if count > MAX_MEMBERS {
        return Err(format!("node snapshot claims {count} members"));
    }
    let mut out = NodeSnapshot::default();
    for _ in 0..count {
        let id = r.u64().map_err(ctx)?;
        let addr = r.str(&format!("address of node {id}")).map_err(ctx)?;
        out.peers.insert(id, addr);
    }
    if with_attrs {
        let count = r.u32().map_err(ctx)?;
        if count > MAX_MEMBERS {
            return Err(format!(
                "node snapshot claims attributes of {count} members"
            ));
        }
        for _ in 0..count {
            let id = r.u64().map_err(ctx)?;
            let a = MemberAttrs::get(&mut r).map_err(|e| ctx(format!("node {id}: {e}")))?;
            out.attrs.insert(id, a);
        }
    }
    out.kv = data.slice(4 + r.at()..);
    Ok(out)
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

    fn attrs(name: &str, urls: &[&str]) -> MemberAttrs {
        MemberAttrs {
            name: name.into(),
            client_urls: urls.iter().map(|u| u.to_string()).collect(),
        }
    }

    #[test]
    fn round_trips_and_refuses_damage() {
        let mut book = AddressBook::new();
        book.insert(1, "127.0.0.1:1".into());
        book.insert(7, "host.example:2380".into());
        let mut at = Attributes::new();
        at.insert(
            1,
            attrs("infra1", &["http://127.0.0.1:2379", "https://a:1"]),
        );
        at.insert(7, attrs("", &[]));
        let data = encode(&book, &at, b"kv-bytes");
        assert_eq!(&data[..4], b"KNS2");
        let got = decode(&data).unwrap();
        assert_eq!(got.peers, book);
        assert_eq!(got.attrs, at);
        assert_eq!(&got.kv[..], b"kv-bytes");
        for cut in 1..data.len() - 8 {
            assert!(decode(&data.slice(..cut)).is_err(), "cut at {cut}");
        }
        let mut bad = data.to_vec();
        bad[0] = b'X';
        assert!(decode(&Bytes::from(bad)).is_err());
        assert_eq!(decode(&Bytes::new()).unwrap(), NodeSnapshot::default());
    }

    /// Data dirs written before attributes existed hold `KNS1` snapshots: they still open,
    /// with no attributes (every member unstarted until it publishes again).
    #[test]
    fn reads_the_version_1_layout() {
        let mut v1 = b"KNS1".to_vec();
        v1.extend_from_slice(&2u32.to_le_bytes());
        for (id, addr) in [(1u64, "127.0.0.1:1"), (2, "10.0.0.2:2380")] {
            v1.extend_from_slice(&id.to_le_bytes());
            v1.extend_from_slice(&(addr.len() as u16).to_le_bytes());
            v1.extend_from_slice(addr.as_bytes());
        }
        v1.extend_from_slice(b"kv");
        let got = decode(&Bytes::from(v1)).unwrap();
        assert_eq!(
            got.peers.into_iter().collect::<Vec<_>>(),
            vec![(1, "127.0.0.1:1".into()), (2, "10.0.0.2:2380".into())]
        );
        assert!(got.attrs.is_empty());
        assert_eq!(&got.kv[..], b"kv");
    }

    #[test]
    fn attributes_are_bounded() {
        assert!(attrs("infra1", &["http://127.0.0.1:2379"])
            .validate()
            .is_ok());
        assert!(attrs("", &[]).validate().is_ok());
        let long = "x".repeat(MAX_NAME_LEN + 1);
        assert!(attrs(&long, &[]).validate().is_err());
        assert!(attrs("a\nb", &[]).validate().is_err());
        let many: Vec<&str> = vec!["http://a:1"; MAX_CLIENT_URLS + 1];
        assert!(attrs("n", &many).validate().is_err());
        let url = format!("http://{}", "h".repeat(MAX_URL_LEN));
        assert!(attrs("n", &[&url]).validate().is_err());
        for bad in ["", "127.0.0.1:2379", "http://", "://x", "http://a b:1"] {
            assert!(attrs("n", &[bad]).validate().is_err(), "{bad:?}");
        }
        // A snapshot holding attributes no proposer could have made is refused whole.
        let mut at = Attributes::new();
        at.insert(1, attrs(&long, &[]));
        assert!(decode(&encode(&AddressBook::new(), &at, b"")).is_err());
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
