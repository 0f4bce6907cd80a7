//! WAL records: `len: u32 | crc: u32 | kind: u8 | payload`, little endian.
//!
//! `len` is the payload's length. `crc` is crc32c over `kind | payload`, started from the
//! previous record's crc, so a record that is intact but out of place (a stale block, a
//! segment from elsewhere) fails too. Every payload ends with `END`, a non-zero byte: a record
//! whose last byte is present was written completely, which is how recovery tells a torn write
//! (the tail of the record still reads as the zeros the file was preallocated with) from a
//! damaged one. One flipped bit cannot turn `END` into zero.

use bytes::{Buf, BufMut, Bytes};
use keel_proto::raftpb::{Entry, HardState};
use prost::Message as _;

pub const HEADER_LEN: usize = 9;

/// The last byte of every payload.
pub const END: u8 = 0xA5;

/// Upper bound on one record's payload. It bounds the memory recovery needs to read a record,
/// how much a damaged length field can make recovery look at, and the cost of reading one old
/// entry back (the whole record is read to verify its crc). Batches larger than
/// `TARGET_PAYLOAD` are split over several records; only a single entry larger than that gets
/// a record of its own, up to this limit.
pub const MAX_PAYLOAD: usize = 16 << 20;

/// Batches are cut into records of about this size, so reading one old entry back reads and
/// checks at most ~1 MiB, while a record still amortises its 9-byte header and crc setup.
pub const TARGET_PAYLOAD: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    SegmentHeader = 1,
    Entries = 2,
    HardState = 3,
    SnapshotMarker = 4,
}

impl Kind {
    pub fn from_u8(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::SegmentHeader),
            2 => Some(Kind::Entries),
            3 => Some(Kind::HardState),
            4 => Some(Kind::SnapshotMarker),
            _ => None,
        }
    }
}

pub const SEGMENT_MAGIC: u64 = u64::from_le_bytes(*b"KEELWAL\0");
/// Bumped whenever the on-disk format changes incompatibly; older builds refuse newer files.
pub const FORMAT_VERSION: u32 = 1;
/// The segment starts a new log (after a snapshot received from the leader): everything in
/// earlier segments is superseded.
pub const FLAG_RESET: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub version: u32,
    /// The crc of the record before this header (the previous segment's last), or 0 for the
    /// very first segment. Carried in the payload so the chain can be checked across segments
    /// and the oldest segment left after a purge can still verify its own header.
    pub prev_crc: u32,
    pub flags: u32,
    /// Bytes of the segment's head: this header and the hard state and snapshot marker that
    /// follow it. The head is durable before the segment gets its name, so damage inside it is
    /// never a torn write.
    pub head_len: u32,
    pub node_id: u64,
    pub cluster_id: u64,
    pub seq: u64,
    pub first_index: u64,
}

/// Size of the encoded header payload (fields plus `END`). Magic, version and `prev_crc` come
/// first and keep their places in every version, so any build can verify a newer header's crc
/// and then read its version.
pub const SEGMENT_HEADER_PAYLOAD: usize = 8 + 4 + 4 + 4 + 4 + 8 + 8 + 8 + 8 + 1;

/// Size of a hard state record and of a snapshot marker record.
pub const HARD_STATE_RECORD_LEN: usize = HEADER_LEN + 24 + 1;
pub const SNAPSHOT_MARKER_RECORD_LEN: usize = HEADER_LEN + 16 + 1;

/// Writes one record to `buf` and returns its crc (the seed of the next record).
pub fn encode(
    buf: &mut Vec<u8>,
    kind: Kind,
    prev_crc: u32,
    body: impl FnOnce(&mut Vec<u8>),
) -> u32 {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; 8]);
    buf.push(kind as u8);
    body(buf);
    buf.push(END);
    let payload_len = buf.len() - start - HEADER_LEN;
    assert!(
        payload_len <= MAX_PAYLOAD,
        "record payload of {payload_len} bytes exceeds MAX_PAYLOAD; callers split batches"
    );
    let crc = crc32c::crc32c_append(prev_crc, &buf[start + 8..]);
    buf[start..start + 4].copy_from_slice(&(payload_len as u32).to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    crc
}

pub fn encode_segment_header(buf: &mut Vec<u8>, h: &SegmentHeader) -> u32 {
    encode(buf, Kind::SegmentHeader, h.prev_crc, |b| {
        b.put_u64_le(SEGMENT_MAGIC);
        b.put_u32_le(h.version);
        b.put_u32_le(h.prev_crc);
        b.put_u32_le(h.flags);
        b.put_u32_le(h.head_len);
        b.put_u64_le(h.node_id);
        b.put_u64_le(h.cluster_id);
        b.put_u64_le(h.seq);
        b.put_u64_le(h.first_index);
    })
}

pub fn encode_hard_state(buf: &mut Vec<u8>, prev_crc: u32, hs: &HardState) -> u32 {
    encode(buf, Kind::HardState, prev_crc, |b| {
        b.put_u64_le(hs.term);
        b.put_u64_le(hs.vote);
        b.put_u64_le(hs.commit);
    })
}

pub fn encode_snapshot_marker(buf: &mut Vec<u8>, prev_crc: u32, index: u64, term: u64) -> u32 {
    encode(buf, Kind::SnapshotMarker, prev_crc, |b| {
        b.put_u64_le(index);
        b.put_u64_le(term);
    })
}

/// Bytes an entry takes inside an entries payload.
pub fn entry_footprint(e: &Entry) -> usize {
    4 + e.encoded_len()
}

/// Overhead of an entries record around its entries: header, count, `END`.
pub const ENTRIES_OVERHEAD: usize = HEADER_LEN + 4 + 1;

/// Entries payload: `count: u32 | (len: u32 | prost Entry) * count | END`; indexes are
/// consecutive. Returns the crc and, for each entry, its byte offset from the record start.
pub fn encode_entries(
    buf: &mut Vec<u8>,
    prev_crc: u32,
    ents: &[Entry],
    positions: &mut Vec<u32>,
) -> u32 {
    let start = buf.len();
    encode(buf, Kind::Entries, prev_crc, |b| {
        b.put_u32_le(ents.len() as u32);
        for e in ents {
            let len = e.encoded_len();
            b.put_u32_le(len as u32);
            positions.push((b.len() - start) as u32);
            e.encode(b).expect("Vec<u8> grows as needed");
        }
    })
}

/// A record that passed its crc check.
#[derive(Debug)]
pub struct RawRecord<'a> {
    pub kind: u8,
    /// Payload without the trailing `END`.
    pub body: &'a [u8],
    pub crc: u32,
    /// Offset just past the record.
    pub end: usize,
}

/// Why the bytes at an offset are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalid {
    /// Fewer than `HEADER_LEN` bytes left.
    ShortHeader,
    /// A length of zero (the zero-filled preallocated space reads like this) or over the limit.
    BadLength(u32),
    /// The record runs past the end of the file.
    PastEof {
        len: u32,
    },
    BadCrc {
        len: u32,
    },
    /// The crc matches but the payload does not end with `END` (not written by this code).
    BadEnd,
}

/// Decodes and verifies the record at `off`.
pub fn decode(buf: &[u8], off: usize, prev_crc: u32) -> Result<RawRecord<'_>, Invalid> {
    let rest = &buf[off..];
    if rest.len() < HEADER_LEN {
        return Err(Invalid::ShortHeader);
    }
    let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes"));
    if len == 0 || len as usize > MAX_PAYLOAD {
        return Err(Invalid::BadLength(len));
    }
    let stored = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
    let total = HEADER_LEN + len as usize;
    if rest.len() < total {
        return Err(Invalid::PastEof { len });
    }
    if crc32c::crc32c_append(prev_crc, &rest[8..total]) != stored {
        return Err(Invalid::BadCrc { len });
    }
    if rest[total - 1] != END {
        return Err(Invalid::BadEnd);
    }
    Ok(RawRecord {
        kind: rest[8],
        body: &rest[HEADER_LEN..total - 1],
        crc: stored,
        end: off + total,
    })
}

/// Whether the `len` bytes of payload at `off` verify against the crc stored there; used to
/// recognise a record whose length field alone was damaged.
pub fn verifies_with_len(buf: &[u8], off: usize, prev_crc: u32, len: u32) -> bool {
    let total = HEADER_LEN + len as usize;
    if len == 0 || len as usize > MAX_PAYLOAD || buf.len() - off < total {
        return false;
    }
    let stored = u32::from_le_bytes(buf[off + 4..off + 8].try_into().expect("4 bytes"));
    crc32c::crc32c_append(prev_crc, &buf[off + 8..off + total]) == stored
}

#[derive(Debug, PartialEq, Eq)]
pub struct BodyError(pub String);

fn need(body: &[u8], n: usize, what: &str) -> Result<(), BodyError> {
    if body.len() < n {
        return Err(BodyError(format!(
            "{what} payload is {} bytes, expected at least {n}",
            body.len()
        )));
    }
    Ok(())
}

/// Decodes a verified header payload. A newer version's header is returned with only
/// `version` and `prev_crc` filled in: the caller refuses it.
pub fn decode_segment_header(mut body: &[u8]) -> Result<SegmentHeader, BodyError> {
    need(body, 16, "segment header")?;
    let magic = body.get_u64_le();
    if magic != SEGMENT_MAGIC {
        return Err(BodyError("not a keel WAL segment (bad magic)".into()));
    }
    let version = body.get_u32_le();
    let prev_crc = body.get_u32_le();
    let mut h = SegmentHeader {
        version,
        prev_crc,
        flags: 0,
        head_len: 0,
        node_id: 0,
        cluster_id: 0,
        seq: 0,
        first_index: 0,
    };
    if version > FORMAT_VERSION {
        return Ok(h);
    }
    if body.len() != SEGMENT_HEADER_PAYLOAD - 1 - 16 {
        return Err(BodyError(format!(
            "segment header payload is {} bytes, expected {}",
            body.len() + 16,
            SEGMENT_HEADER_PAYLOAD - 1
        )));
    }
    h.flags = body.get_u32_le();
    h.head_len = body.get_u32_le();
    h.node_id = body.get_u64_le();
    h.cluster_id = body.get_u64_le();
    h.seq = body.get_u64_le();
    h.first_index = body.get_u64_le();
    Ok(h)
}

/// The seed a header record was written with, read from its (not yet verified) payload; its
/// place is the same in every version.
pub fn header_seed(buf: &[u8]) -> Option<u32> {
    let at = HEADER_LEN + 12;
    if buf.len() < at + 4 || buf[8] != Kind::SegmentHeader as u8 {
        return None;
    }
    Some(u32::from_le_bytes(
        buf[at..at + 4].try_into().expect("4 bytes"),
    ))
}

pub fn decode_hard_state(mut body: &[u8]) -> Result<HardState, BodyError> {
    if body.len() != 24 {
        return Err(BodyError(format!(
            "hard state payload is {} bytes, expected 24",
            body.len()
        )));
    }
    Ok(HardState {
        term: body.get_u64_le(),
        vote: body.get_u64_le(),
        commit: body.get_u64_le(),
    })
}

pub fn decode_snapshot_marker(mut body: &[u8]) -> Result<(u64, u64), BodyError> {
    if body.len() != 16 {
        return Err(BodyError(format!(
            "snapshot marker payload is {} bytes, expected 16",
            body.len()
        )));
    }
    Ok((body.get_u64_le(), body.get_u64_le()))
}

/// What recovery needs of an entry without decoding its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryInfo {
    pub index: u64,
    pub term: u64,
    /// Byte offset of the encoded entry from the start of the record.
    pub pos: u32,
    pub len: u32,
}

fn read_varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at)?;
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(v);
        }
    }
    None
}

/// Reads term and index of a prost-encoded `Entry` without copying its data; recovery calls
/// this for every entry in the log, so it must not allocate.
fn entry_term_index(b: &[u8]) -> Option<(u64, u64)> {
    let (mut term, mut index) = (0, 0);
    let mut at = 0;
    while at < b.len() {
        let key = read_varint(b, &mut at)?;
        match (key >> 3, key & 7) {
            (1, 0) => term = read_varint(b, &mut at)?,
            (2, 0) => index = read_varint(b, &mut at)?,
            (_, 0) => {
                read_varint(b, &mut at)?;
            }
            (_, 2) => {
                let n = read_varint(b, &mut at)? as usize;
                at = at.checked_add(n).filter(|&e| e <= b.len())?;
            }
            (_, 1) => at = at.checked_add(8).filter(|&e| e <= b.len())?,
            (_, 5) => at = at.checked_add(4).filter(|&e| e <= b.len())?,
            _ => return None,
        }
    }
    Some((term, index))
}

/// Scans an entries body, calling `f` for each entry. Checks that indexes are consecutive.
pub fn scan_entries(body: &[u8], mut f: impl FnMut(EntryInfo)) -> Result<(), BodyError> {
    let mut b = body;
    need(b, 4, "entries")?;
    let count = b.get_u32_le();
    if count == 0 {
        return Err(BodyError("entries record holds no entries".into()));
    }
    let mut at = 4usize;
    let mut prev: Option<u64> = None;
    for i in 0..count {
        if body.len() - at < 4 {
            return Err(BodyError(format!("entry {i} of {count}: truncated length")));
        }
        let len = u32::from_le_bytes(body[at..at + 4].try_into().expect("4 bytes")) as usize;
        at += 4;
        if body.len() - at < len {
            return Err(BodyError(format!("entry {i} of {count}: truncated")));
        }
        let (term, index) = entry_term_index(&body[at..at + len])
            .ok_or_else(|| BodyError(format!("entry {i} of {count}: not a valid Entry")))?;
        if let Some(p) = prev {
            if index != p + 1 {
                return Err(BodyError(format!(
                    "entry {i} of {count}: index {index} does not follow {p}"
                )));
            }
        }
        prev = Some(index);
        // The body starts HEADER_LEN bytes into the record.
        f(EntryInfo {
            index,
            term,
            pos: (HEADER_LEN + at) as u32,
            len: len as u32,
        });
        at += len;
    }
    if at != body.len() {
        return Err(BodyError(format!(
            "{} stray bytes after {count} entries",
            body.len() - at
        )));
    }
    Ok(())
}

/// Decodes one entry from a verified record held in `record` (zero-copy for the data).
pub fn decode_entry(record: &Bytes, pos: u32, len: u32) -> Result<Entry, BodyError> {
    let (pos, len) = (pos as usize, len as usize);
    if pos + len > record.len() {
        return Err(BodyError("entry position outside its record".into()));
    }
    Entry::decode(record.slice(pos..pos + len))
        .map_err(|e| BodyError(format!("entry does not decode: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_proto::raftpb::EntryType;

    fn ent(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            entry_type: EntryType::EntryNormal as i32,
            data: Bytes::copy_from_slice(data),
        }
    }

    #[test]
    fn record_layout_is_exact() {
        let mut buf = Vec::new();
        let crc = encode_snapshot_marker(&mut buf, 0, 7, 3);
        assert_eq!(buf.len(), HEADER_LEN + 16 + 1);
        assert_eq!(&buf[0..4], &17u32.to_le_bytes());
        assert_eq!(&buf[4..8], &crc.to_le_bytes());
        assert_eq!(buf[8], Kind::SnapshotMarker as u8);
        assert_eq!(&buf[9..17], &7u64.to_le_bytes());
        assert_eq!(&buf[17..25], &3u64.to_le_bytes());
        assert_eq!(buf[25], END);
        assert_eq!(crc, crc32c::crc32c(&buf[8..]));
    }

    #[test]
    fn crc_chains_from_the_previous_record() {
        let mut buf = Vec::new();
        let c1 = encode_hard_state(
            &mut buf,
            0,
            &HardState {
                term: 1,
                vote: 2,
                commit: 3,
            },
        );
        let second = buf.len();
        let c2 = encode_hard_state(
            &mut buf,
            c1,
            &HardState {
                term: 1,
                vote: 2,
                commit: 3,
            },
        );
        // Identical content, different crc: the chain makes each record's place part of it.
        assert_ne!(c1, c2);
        let r1 = decode(&buf, 0, 0).unwrap();
        assert_eq!(r1.crc, c1);
        assert_eq!(r1.end, second);
        assert_eq!(decode(&buf, second, c1).unwrap().crc, c2);
        // The second record does not verify without its predecessor's crc.
        assert!(matches!(
            decode(&buf, second, 0),
            Err(Invalid::BadCrc { .. })
        ));
        assert_eq!(
            decode_hard_state(r1.body).unwrap(),
            HardState {
                term: 1,
                vote: 2,
                commit: 3
            }
        );
    }

    #[test]
    fn entries_round_trip_with_positions() {
        let ents: Vec<Entry> = (5..9)
            .map(|i| ent(i, 2, &vec![i as u8; i as usize]))
            .collect();
        let mut buf = vec![0xEE; 3]; // records are found at any offset
        let mut pos = Vec::new();
        let crc = encode_entries(&mut buf, 42, &ents, &mut pos);
        let rec = decode(&buf, 3, 42).unwrap();
        assert_eq!(rec.crc, crc);
        assert_eq!(rec.kind, Kind::Entries as u8);
        let mut infos = Vec::new();
        scan_entries(rec.body, |i| infos.push(i)).unwrap();
        assert_eq!(infos.len(), 4);
        let record = Bytes::copy_from_slice(&buf[3..rec.end]);
        for (i, info) in infos.iter().enumerate() {
            assert_eq!(info.pos, pos[i]);
            assert_eq!((info.index, info.term), (ents[i].index, ents[i].term));
            assert_eq!(decode_entry(&record, info.pos, info.len).unwrap(), ents[i]);
        }
    }

    #[test]
    fn invalid_records_are_classified() {
        let mut buf = Vec::new();
        encode_snapshot_marker(&mut buf, 9, 1, 1);
        assert_eq!(decode(&buf[..5], 0, 9).unwrap_err(), Invalid::ShortHeader);
        assert_eq!(
            decode(&buf[..20], 0, 9).unwrap_err(),
            Invalid::PastEof { len: 17 }
        );
        assert_eq!(decode(&[0u8; 32], 0, 9).unwrap_err(), Invalid::BadLength(0));
        let mut huge = buf.clone();
        huge[0..4].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        assert!(matches!(decode(&huge, 0, 9), Err(Invalid::BadLength(_))));
        let mut flipped = buf.clone();
        flipped[12] ^= 0x10;
        assert_eq!(
            decode(&flipped, 0, 9).unwrap_err(),
            Invalid::BadCrc { len: 17 }
        );
        // A damaged length is recognisable: the true length still verifies.
        let mut badlen = buf.clone();
        badlen[1] ^= 0x01;
        assert!(decode(&badlen, 0, 9).is_err());
        assert!(verifies_with_len(&badlen, 0, 9, 17));
    }

    #[test]
    fn scan_entries_rejects_gaps_and_garbage() {
        let ents = vec![ent(1, 1, b"a"), ent(3, 1, b"b")];
        let mut buf = Vec::new();
        encode_entries(&mut buf, 0, &ents, &mut Vec::new());
        let rec = decode(&buf, 0, 0).unwrap();
        let err = scan_entries(rec.body, |_| {}).unwrap_err();
        assert!(err.0.contains("does not follow"), "{}", err.0);
        assert!(scan_entries(&[0, 0, 0, 0], |_| {}).is_err());
        assert!(scan_entries(&[1, 0, 0, 0, 200, 0, 0, 0, 1], |_| {}).is_err());
    }

    #[test]
    fn segment_header_round_trip_and_seed() {
        let h = SegmentHeader {
            version: FORMAT_VERSION,
            prev_crc: 0xdead_beef,
            flags: FLAG_RESET,
            head_len: 80,
            node_id: 3,
            cluster_id: 0xabc,
            seq: 9,
            first_index: 100,
        };
        let mut buf = Vec::new();
        encode_segment_header(&mut buf, &h);
        assert_eq!(buf.len(), HEADER_LEN + SEGMENT_HEADER_PAYLOAD);
        assert_eq!(header_seed(&buf), Some(0xdead_beef));
        let rec = decode(&buf, 0, 0xdead_beef).unwrap();
        assert_eq!(decode_segment_header(rec.body).unwrap(), h);
    }
}
