//! The bytes on a peer connection. Pure: encoding and decoding only, no I/O, so every rule
//! here is tested on exact byte strings.
//!
//! A connection opens with a fixed-size [`Hello`] from the dialer (fixed so that an acceptor
//! can read it without trusting any length the other side claims). After that, both
//! directions carry frames: `len: u32 LE | kind: u8 | payload[len]`. Integers are little
//! endian like the WAL's records.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use keel_proto::raftpb::Message;
use prost::Message as _;

/// First bytes of every Keel peer connection: lets an acceptor tell a misdirected client
/// (an HTTP probe, a port scanner) from a peer on the first read.
pub const MAGIC: [u8; 4] = *b"KEEL";

/// The only protocol version this build speaks. A change to the hello layout, a frame kind's
/// payload or the meaning of a frame bumps it. [`FrameKind::Ok`] and [`FrameKind::Reject`]
/// keep their layout across versions so that a node can always say why it refuses another.
pub const VERSION: u16 = 1;

/// Size of the dialer's hello: magic(4) version(2) stream(1) reserved(1) cluster(8) from(8)
/// to(8).
pub const HELLO_LEN: usize = 32;

/// `len: u32 | kind: u8`.
pub const FRAME_HEADER_LEN: usize = 5;

/// Reject reasons are cut to this many bytes: they are for a log line, and the dialer reads
/// them under [`MAX_CONTROL_FRAME`].
pub const MAX_REASON_LEN: usize = 512;

/// Limit on frames a dialer reads back from an acceptor (only `Ok` and `Reject` travel that
/// way), so an acceptor can never make a dialer buffer more than this.
pub const MAX_CONTROL_FRAME: usize = 1024;

/// Which of a peer pair's connections this is. Snapshots have their own connection so that a
/// multi-megabyte stream never sits in front of a heartbeat in one TCP send buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    /// Raft messages other than snapshots, one frame each, in send order.
    Raft = 1,
    /// One snapshot: a header, chunks, an end marker, each acknowledged as documented on
    /// [`FrameKind`].
    Snapshot = 2,
}

/// The dialer's first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub stream: StreamKind,
    pub cluster_id: u64,
    /// The dialer's node id: every message on this connection must carry it as `from`.
    pub from: u64,
    /// The node id the dialer believes it is talking to.
    pub to: u64,
}

/// Why a hello could not be read. The acceptor logs it and closes the connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HelloError {
    #[error("bad magic {0:02x?}: not a Keel peer")]
    BadMagic([u8; 4]),
    #[error("unsupported protocol version {0} (this node speaks {VERSION})")]
    UnsupportedVersion(u16),
    #[error("unknown stream kind {0}")]
    UnknownStream(u8),
    #[error("reserved byte is {0}, not 0")]
    Reserved(u8),
}

impl Hello {
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[6] = self.stream as u8;
        b[7] = 0;
        b[8..16].copy_from_slice(&self.cluster_id.to_le_bytes());
        b[16..24].copy_from_slice(&self.from.to_le_bytes());
        b[24..32].copy_from_slice(&self.to.to_le_bytes());
        b
    }

    /// Checks the version before anything after it, because another version may lay out the
    /// rest differently.
    pub fn decode(b: &[u8; HELLO_LEN]) -> Result<Hello, HelloError> {
        let magic: [u8; 4] = b[0..4].try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(HelloError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != VERSION {
            return Err(HelloError::UnsupportedVersion(version));
        }
        let stream = match b[6] {
            1 => StreamKind::Raft,
            2 => StreamKind::Snapshot,
            k => return Err(HelloError::UnknownStream(k)),
        };
        if b[7] != 0 {
            return Err(HelloError::Reserved(b[7]));
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Ok(Hello {
            stream,
            cluster_id: u64_at(8),
            from: u64_at(16),
            to: u64_at(24),
        })
    }
}

/// What a frame carries.
///
/// On a [`StreamKind::Raft`] connection the dialer sends `Message` frames only. On a
/// [`StreamKind::Snapshot`] connection the dialer sends `SnapHeader`, waits for `Ok`, sends
/// `SnapChunk`s and `SnapEnd`, and waits for `Ok` (delivered to the node) or `Reject`.
/// In both, the acceptor answers the hello with `Ok` or `Reject`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// A prost-encoded `raftpb::Message`.
    Message = 1,
    /// `total_len: u64` of the snapshot data, then the `MsgSnapshot` message with its
    /// `snapshot.data` empty.
    SnapHeader = 2,
    /// The next bytes of `snapshot.data`.
    SnapChunk = 3,
    /// No payload: every chunk has been sent.
    SnapEnd = 4,
    /// No payload: accepted.
    Ok = 0x10,
    /// A UTF-8 reason, at most [`MAX_REASON_LEN`] bytes; the sender closes after it.
    Reject = 0x11,
}

impl FrameKind {
    fn from_u8(k: u8) -> Option<FrameKind> {
        Some(match k {
            1 => FrameKind::Message,
            2 => FrameKind::SnapHeader,
            3 => FrameKind::SnapChunk,
            4 => FrameKind::SnapEnd,
            0x10 => FrameKind::Ok,
            0x11 => FrameKind::Reject,
            _ => return None,
        })
    }
}

/// A frame that must not be accepted; the connection carrying it is closed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes is over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("malformed {kind:?} frame: {reason}")]
    Malformed { kind: FrameKind, reason: String },
}

/// Appends a frame header for a payload of `len` bytes.
pub fn put_header(buf: &mut BytesMut, kind: FrameKind, len: usize) {
    let len = u32::try_from(len).expect("frame lengths are checked against a u32 limit first");
    buf.put_u32_le(len);
    buf.put_u8(kind as u8);
}

/// Appends `msg` as one `Message` frame. Refuses, leaving `buf` untouched, a message whose
/// encoding is over `max` bytes: the peer would close the connection on it.
pub fn put_message(buf: &mut BytesMut, msg: &Message, max: usize) -> Result<usize, FrameError> {
    let len = msg.encoded_len();
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    buf.reserve(FRAME_HEADER_LEN + len);
    put_header(buf, FrameKind::Message, len);
    msg.encode(buf).expect("reserved enough");
    Ok(FRAME_HEADER_LEN + len)
}

/// Appends a `Reject` frame, cutting the reason at a character boundary to fit.
pub fn put_reject(buf: &mut BytesMut, reason: &str) {
    let mut end = reason.len().min(MAX_REASON_LEN);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    put_header(buf, FrameKind::Reject, end);
    buf.put_slice(&reason.as_bytes()[..end]);
}

/// Appends a `SnapHeader` frame for `msg` (whose `snapshot.data` must already be empty) and
/// `total_len` bytes of data to follow.
pub fn put_snap_header(
    buf: &mut BytesMut,
    msg: &Message,
    total_len: u64,
    max: usize,
) -> Result<(), FrameError> {
    let len = 8 + msg.encoded_len();
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    put_header(buf, FrameKind::SnapHeader, len);
    buf.put_u64_le(total_len);
    msg.encode(buf).expect("BytesMut grows");
    Ok(())
}

/// Splits the next whole frame off the front of `buf`, or returns `None` when more bytes are
/// needed. A declared length over `max` is an error as soon as the header is in, so a peer can
/// never make the reader wait for, or buffer, more than `max` bytes per frame.
pub fn decode_frame(
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<(FrameKind, Bytes)>, FrameError> {
    if buf.len() < FRAME_HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
    let kind = FrameKind::from_u8(buf[4]).ok_or(FrameError::UnknownKind(buf[4]))?;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    if buf.len() < FRAME_HEADER_LEN + len {
        return Ok(None);
    }
    buf.advance(FRAME_HEADER_LEN);
    Ok(Some((kind, buf.split_to(len).freeze())))
}

/// Bytes still missing for the frame at the front of `buf` (0 if none is started or it is
/// complete); lets a reader size its next read without trusting more than the checked length.
pub fn missing(buf: &BytesMut) -> usize {
    if buf.len() < FRAME_HEADER_LEN {
        return FRAME_HEADER_LEN - buf.len();
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
    (FRAME_HEADER_LEN + len).saturating_sub(buf.len())
}

pub fn decode_message(payload: &[u8]) -> Result<Message, FrameError> {
    Message::decode(payload).map_err(|e| FrameError::Malformed {
        kind: FrameKind::Message,
        reason: e.to_string(),
    })
}

/// Splits a `SnapHeader` payload into the announced data length and the message.
pub fn decode_snap_header(mut payload: Bytes) -> Result<(u64, Message), FrameError> {
    let malformed = |reason: String| FrameError::Malformed {
        kind: FrameKind::SnapHeader,
        reason,
    };
    if payload.len() < 8 {
        return Err(malformed(format!(
            "{} bytes, shorter than its length field",
            payload.len()
        )));
    }
    let total = payload.get_u64_le();
    let msg = Message::decode(payload).map_err(|e| malformed(e.to_string()))?;
    Ok((total, msg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_proto::raftpb::MessageType;

    #[test]
    fn hello_bytes_are_exact() {
        let h = Hello {
            stream: StreamKind::Snapshot,
            cluster_id: 0x0102,
            from: 3,
            to: 4,
        };
        let b = h.encode();
        assert_eq!(
            b.to_vec(),
            [
                b"KEEL".as_slice(),
                &[1, 0, 2, 0],
                &[2, 1, 0, 0, 0, 0, 0, 0],
                &[3, 0, 0, 0, 0, 0, 0, 0],
                &[4, 0, 0, 0, 0, 0, 0, 0],
            ]
            .concat()
        );
        assert_eq!(Hello::decode(&b), Ok(h));
    }

    #[test]
    fn hello_refusals() {
        let good = Hello {
            stream: StreamKind::Raft,
            cluster_id: 1,
            from: 1,
            to: 2,
        }
        .encode();
        let mut b = good;
        b[0] = b'G';
        assert_eq!(Hello::decode(&b), Err(HelloError::BadMagic(*b"GEEL")));
        let mut b = good;
        b[4] = 2;
        assert_eq!(Hello::decode(&b), Err(HelloError::UnsupportedVersion(2)));
        let mut b = good;
        b[6] = 9;
        assert_eq!(Hello::decode(&b), Err(HelloError::UnknownStream(9)));
        let mut b = good;
        b[7] = 1;
        assert_eq!(Hello::decode(&b), Err(HelloError::Reserved(1)));
    }

    #[test]
    fn message_frame_round_trips_and_is_length_prefixed() {
        let m = Message {
            msg_type: MessageType::MsgHeartbeat as i32,
            to: 2,
            from: 1,
            term: 5,
            ..Default::default()
        };
        let mut buf = BytesMut::new();
        let n = put_message(&mut buf, &m, 1024).unwrap();
        let body = m.encode_to_vec();
        assert_eq!(n, 5 + body.len());
        assert_eq!(&buf[..5], &[body.len() as u8, 0, 0, 0, 1]);
        assert_eq!(&buf[5..], &body[..]);
        let (kind, payload) = decode_frame(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(kind, FrameKind::Message);
        assert_eq!(decode_message(&payload).unwrap(), m);
        assert!(buf.is_empty());
    }

    #[test]
    fn too_large_message_is_refused_before_encoding() {
        let m = Message {
            context: Bytes::from(vec![0u8; 100]),
            ..Default::default()
        };
        let mut buf = BytesMut::new();
        assert!(matches!(
            put_message(&mut buf, &m, 50),
            Err(FrameError::TooLarge { max: 50, .. })
        ));
        assert!(buf.is_empty());
    }

    #[test]
    fn partial_frames_wait_for_more_bytes() {
        let mut whole = BytesMut::new();
        put_header(&mut whole, FrameKind::SnapChunk, 3);
        whole.put_slice(b"abc");
        for cut in 0..whole.len() {
            let mut part = BytesMut::from(&whole[..cut]);
            assert!(
                decode_frame(&mut part, 16).unwrap().is_none(),
                "cut at {cut}"
            );
            assert_eq!(missing(&part), if cut < 5 { 5 - cut } else { 8 - cut });
        }
        let (k, p) = decode_frame(&mut whole, 16).unwrap().unwrap();
        assert_eq!((k, &p[..]), (FrameKind::SnapChunk, &b"abc"[..]));
    }

    #[test]
    fn oversized_length_is_refused_on_the_header_alone() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 1][..]);
        match decode_frame(&mut buf, 16 << 20) {
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!((len, max), (u32::MAX as usize, 16 << 20))
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn unknown_kind_is_refused() {
        let mut buf = BytesMut::from(&[0, 0, 0, 0, 0x7f][..]);
        assert!(matches!(
            decode_frame(&mut buf, 16),
            Err(FrameError::UnknownKind(0x7f))
        ));
    }

    #[test]
    fn reject_reason_is_cut_at_a_char_boundary() {
        let reason = "é".repeat(MAX_REASON_LEN); // 2 bytes each
        let mut buf = BytesMut::new();
        put_reject(&mut buf, &reason);
        let (k, p) = decode_frame(&mut buf, MAX_CONTROL_FRAME).unwrap().unwrap();
        assert_eq!(k, FrameKind::Reject);
        assert_eq!(p.len(), MAX_REASON_LEN);
        assert!(std::str::from_utf8(&p).is_ok());
    }

    #[test]
    fn snap_header_round_trips() {
        let m = Message {
            msg_type: MessageType::MsgSnapshot as i32,
            to: 2,
            from: 1,
            ..Default::default()
        };
        let mut buf = BytesMut::new();
        put_snap_header(&mut buf, &m, 7 << 20, 1024).unwrap();
        let (k, p) = decode_frame(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(k, FrameKind::SnapHeader);
        assert_eq!(decode_snap_header(p).unwrap(), (7 << 20, m));
        assert!(decode_snap_header(Bytes::from_static(&[1, 2, 3])).is_err());
    }

    #[test]
    fn garbage_message_payload_is_malformed_not_a_panic() {
        assert!(decode_message(&[0xff; 16]).is_err());
    }
}
