//! The layout of a Maintenance.Snapshot stream, and of the file `etcdctl snapshot save` writes
//! from it.
//!
//! ```text
//! data | zero padding | data length: u64 LE | sha256 of everything before it (32 bytes)
//! ```
//!
//! `data` is the node's state as a Raft snapshot carries it (`keel_node::snapshot::encode`:
//! address book, member attributes, state machine). etcd streams its bbolt file and then its
//! sha256; etcdctl 3.4's `snapshot save` refuses a download whose size is not a multiple of
//! 512 plus 32 (its `hasChecksum`: a bbolt file is whole pages). The padding makes Keel's
//! body such a size, and the length, stored last so the file starts with the snapshot's own
//! bytes, tells a reader where the data ends ([`parse`]).

use bytes::{BufMut, Bytes, BytesMut};
use keel_etcdpb::etcdserverpb as pb;
use sha2::{Digest as _, Sha256};

/// Bytes per `SnapshotResponse`: etcd's `snapshotSendBufferSize`. Far below gRPC's default
/// 4 MiB receive limit, which clients apply to each message, and below HTTP/2's 64 KiB initial
/// flow-control window, so a chunk never trips a client's limit and a slow reader holds back
/// the stream chunk by chunk. Larger chunks would save only per-message overhead.
pub const CHUNK: usize = 32 * 1024;

/// The body's size is a multiple of this (see the module doc).
const ALIGN: usize = 512;
const LEN_BYTES: usize = 8;
const SHA_BYTES: usize = 32;

/// The padding and length that follow `len` bytes of data.
fn tail(len: usize) -> Bytes {
    let pad = (ALIGN - (len + LEN_BYTES) % ALIGN) % ALIGN;
    let mut b = BytesMut::with_capacity(pad + LEN_BYTES);
    b.put_bytes(0, pad);
    b.put_u64_le(len as u64);
    b.freeze()
}

/// The stream for `data`: the body in chunks of at most `CHUNK` bytes, each with the body bytes
/// still to come after it in `remaining_bytes` (0 after the last), then the sha256 alone (also
/// 0), as etcd sends them. The data chunks share `data`'s buffer.
pub fn responses(data: &Bytes, header: Option<pb::ResponseHeader>) -> Vec<pb::SnapshotResponse> {
    let tail = tail(data.len());
    let total = data.len() + tail.len();
    let mut sha = Sha256::new();
    sha.update(data);
    sha.update(&tail);
    let mut out = Vec::with_capacity(total.div_ceil(CHUNK) + 2);
    let mut sent = 0;
    let mut push = |blob: Bytes, sent: &mut usize| {
        *sent += blob.len();
        out.push(pb::SnapshotResponse {
            header,
            remaining_bytes: (total - *sent) as u64,
            blob,
        });
    };
    let mut at = 0;
    while at < data.len() {
        let end = (at + CHUNK).min(data.len());
        push(data.slice(at..end), &mut sent);
        at = end;
    }
    // Below CHUNK: at most ALIGN - 1 + LEN_BYTES bytes.
    push(tail, &mut sent);
    out.push(pb::SnapshotResponse {
        header,
        remaining_bytes: 0,
        blob: Bytes::copy_from_slice(&sha.finalize()),
    });
    out
}

/// The data of a saved stream, after checking its checksum, length and padding.
pub fn parse(file: &[u8]) -> Result<&[u8], String> {
    if file.len() < LEN_BYTES + SHA_BYTES || (file.len() - SHA_BYTES) % ALIGN != 0 {
        return Err(format!(
            "{} bytes is not a Keel snapshot's size",
            file.len()
        ));
    }
    let (body, sum) = file.split_at(file.len() - SHA_BYTES);
    if Sha256::digest(body)[..] != *sum {
        return Err("the snapshot's sha256 does not match".into());
    }
    let (rest, len) = body.split_at(body.len() - LEN_BYTES);
    let len = u64::from_le_bytes(len.try_into().expect("8 bytes"));
    let len = usize::try_from(len)
        .ok()
        .filter(|&l| l <= rest.len())
        .ok_or("the snapshot's length is past its end")?;
    let (data, pad) = rest.split_at(len);
    if pad.len() >= ALIGN || pad.iter().any(|&b| b != 0) {
        return Err("the snapshot's padding is damaged".into());
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joined(out: &[pb::SnapshotResponse]) -> Vec<u8> {
        out.iter().flat_map(|r| r.blob.to_vec()).collect()
    }

    /// etcd's layout: chunks of at most 32 KiB counting down to 0, then the sha256 alone; the
    /// file etcdctl writes from it has the size its `hasChecksum` wants, and gives back the data.
    #[test]
    fn chunks_count_down_then_carry_the_sha256() {
        let header = Some(pb::ResponseHeader {
            revision: 9,
            ..Default::default()
        });
        let data = Bytes::from((0..70_000u32).map(|i| i as u8).collect::<Vec<u8>>());
        let out = responses(&data, header);
        let body = 70_000usize.div_ceil(ALIGN) * ALIGN;
        let sizes: Vec<(usize, u64)> = out
            .iter()
            .map(|r| (r.blob.len(), r.remaining_bytes))
            .collect();
        assert_eq!(
            sizes,
            vec![
                (CHUNK, (body - CHUNK) as u64),
                (CHUNK, (body - 2 * CHUNK) as u64),
                (70_000 - 2 * CHUNK, (body - 70_000) as u64),
                (body - 70_000, 0),
                (32, 0),
            ]
        );
        assert!(out.iter().all(|r| r.header == header));
        let file = joined(&out);
        assert_eq!(file.len() % 512, 32, "etcdctl's hasChecksum");
        assert_eq!(&file[file.len() - 32..], &Sha256::digest(&file[..body])[..]);
        assert_eq!(parse(&file).unwrap(), &data[..]);
    }

    #[test]
    fn every_size_is_aligned_and_parses_back() {
        for len in [0, 1, 503, 504, 505, 512, 1016, CHUNK, 2 * CHUNK + 7] {
            let data = Bytes::from(vec![7u8; len]);
            let out = responses(&data, None);
            assert!(out.iter().all(|r| r.blob.len() <= CHUNK), "{len}");
            let file = joined(&out);
            assert_eq!(file.len() % 512, 32, "{len}");
            assert_eq!(parse(&file).unwrap().len(), len);
        }
    }

    #[test]
    fn damage_is_refused() {
        let file = joined(&responses(&Bytes::from_static(b"keel state"), None));
        for at in [0, 5, file.len() - 40, file.len() - 1] {
            let mut bad = file.clone();
            bad[at] ^= 1;
            assert!(parse(&bad).is_err(), "flipped byte {at}");
        }
        assert!(parse(&file[..file.len() - 1]).is_err());
        assert!(parse(&[]).is_err());
    }
}
