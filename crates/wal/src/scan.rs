//! Walking the records of one segment image and deciding what the bytes after the last good
//! record are: the clean end of the log, a torn write, or damage.
//!
//! The model: the WAL only ever writes into space that reads as zeros (segments are
//! preallocated, and recovery zeroes a torn tail before writing over it), and writes records
//! in order. A crash before a sync may lose the unsynced writes or keep a prefix of them, torn
//! at any byte. Media damage flips bits anywhere.
//!
//! So after the last good record at offset `g`:
//! - all zeros: the clean end of the log;
//! - a record that is incomplete (its header cut short, it runs past the end of the file, or
//!   its last byte, which is `END` when written completely, reads zero), with nothing but
//!   zeros after its extent, and not explained by one flipped bit of its length field: a torn
//!   write, which recovery truncates;
//! - anything else (a complete record with a bad crc, data after a bad record, an impossible
//!   length): corruption, which recovery refuses to guess past.
//!
//! A disk that persisted a later part of the final write but not an earlier part produces
//! "data after a bad record" and is refused: safe, though it needs an operator.

use crate::record::{self, Invalid, RawRecord, HEADER_LEN, MAX_PAYLOAD};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tail {
    /// Nothing but zeros after the last good record.
    Clean,
    /// A torn write starts at `offset`; the non-zero bytes end before `nonzero_end`.
    Torn { offset: usize, nonzero_end: usize },
    /// Damage at `offset`.
    Corrupt { offset: usize, reason: String },
}

/// The end of the non-zero bytes in `buf` (0 if all zero).
pub fn nonzero_end(buf: &[u8]) -> usize {
    // Compare 8 bytes at a time: recovery runs this over the unused part of every segment.
    let mut end = buf.len();
    while end >= 8 {
        let w = u64::from_ne_bytes(buf[end - 8..end].try_into().expect("8 bytes"));
        if w != 0 {
            break;
        }
        end -= 8;
    }
    while end > 0 && buf[end - 1] == 0 {
        end -= 1;
    }
    end
}

/// Calls `f(offset, seed, record)` for every good record from `start`, each checked against the
/// crc of the one before (`seed` for the first). Returns the offset after the last good record, its crc, and
/// what follows. `f` returning `Err` stops the scan with corruption at that record (a record
/// whose crc is right but whose content is invalid was not written by this code).
pub fn scan(
    buf: &[u8],
    start: usize,
    seed: u32,
    mut f: impl FnMut(usize, u32, &RawRecord<'_>) -> Result<(), String>,
) -> (usize, u32, Tail) {
    let mut off = start;
    let mut crc = seed;
    loop {
        match record::decode(buf, off, crc) {
            Ok(rec) => {
                if let Err(reason) = f(off, crc, &rec) {
                    return (
                        off,
                        crc,
                        Tail::Corrupt {
                            offset: off,
                            reason,
                        },
                    );
                }
                crc = rec.crc;
                off = rec.end;
            }
            Err(Invalid::BadEnd) => {
                let reason = "record passes its checksum but lacks the end marker".to_string();
                return (
                    off,
                    crc,
                    Tail::Corrupt {
                        offset: off,
                        reason,
                    },
                );
            }
            Err(invalid) => return (off, crc, classify(buf, off, crc, invalid)),
        }
    }
}

fn classify(buf: &[u8], g: usize, seed: u32, invalid: Invalid) -> Tail {
    let rest = &buf[g..];
    let nz = nonzero_end(rest);
    if nz == 0 {
        return Tail::Clean;
    }
    let torn = Tail::Torn {
        offset: g,
        nonzero_end: g + nz,
    };
    let corrupt = |reason: String| Tail::Corrupt { offset: g, reason };
    let len = match invalid {
        Invalid::ShortHeader => return torn,
        Invalid::BadLength(len) => {
            // A torn length field reads as a prefix of the true little-endian value, so it is
            // never larger than the true length and never zero with data after it.
            return corrupt(format!(
                "record length {len} is impossible (1..={MAX_PAYLOAD}) and data follows"
            ));
        }
        Invalid::PastEof { len } | Invalid::BadCrc { len } => len,
        Invalid::BadEnd => unreachable!("handled by scan"),
    };
    let extent = HEADER_LEN + len as usize;
    let complete = rest.len() >= extent && rest[extent - 1] != 0;
    if complete {
        return corrupt("checksum mismatch in a complete record".to_string());
    }
    if nz > extent {
        return corrupt(format!(
            "checksum mismatch, and {} bytes of data follow the record",
            nz - extent
        ));
    }
    for bit in 0..32 {
        let other = len ^ (1 << bit);
        if record::verifies_with_len(buf, g, seed, other) {
            return corrupt(format!(
                "record length field damaged (reads {len}, the record verifies as {other})"
            ));
        }
    }
    torn
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_proto::raftpb::HardState;

    fn log(n: u64) -> (Vec<u8>, Vec<usize>) {
        let mut buf = Vec::new();
        let mut ends = Vec::new();
        let mut crc = 0;
        for i in 0..n {
            crc = record::encode_hard_state(
                &mut buf,
                crc,
                &HardState {
                    term: i,
                    vote: 1,
                    commit: i,
                },
            );
            ends.push(buf.len());
        }
        (buf, ends)
    }

    fn run(buf: &[u8]) -> (usize, Tail) {
        let (end, _, tail) = scan(buf, 0, 0, |_, _, _| Ok(()));
        (end, tail)
    }

    #[test]
    fn zeros_after_the_log_are_a_clean_end() {
        let (mut buf, ends) = log(3);
        buf.resize(buf.len() + 100, 0);
        assert_eq!(run(&buf), (ends[2], Tail::Clean));
        assert_eq!(run(&buf[..ends[2]]), (ends[2], Tail::Clean));
    }

    #[test]
    fn every_cut_of_the_last_record_is_torn() {
        let (buf, ends) = log(3);
        for cut in ends[1] + 1..ends[2] {
            let mut img = buf[..cut].to_vec();
            let (end, tail) = run(&img);
            assert_eq!(end, ends[1], "cut at {cut}");
            assert!(
                matches!(tail, Tail::Torn { offset, .. } if offset == ends[1]),
                "cut at {cut}: {tail:?}"
            );
            // Same with the preallocated zeros still there.
            img.resize(buf.len() + 64, 0);
            let (end, tail) = run(&img);
            assert_eq!(end, ends[1]);
            assert!(
                matches!(tail, Tail::Torn { .. } | Tail::Clean),
                "cut at {cut}: {tail:?}"
            );
        }
    }

    #[test]
    fn a_flipped_bit_before_the_tail_is_corruption() {
        let (mut buf, ends) = log(4);
        buf.resize(buf.len() + 64, 0);
        for byte in 0..ends[3] {
            for bit in 0..8 {
                let mut img = buf.clone();
                img[byte] ^= 1 << bit;
                let (_, tail) = run(&img);
                assert!(
                    matches!(tail, Tail::Corrupt { .. }),
                    "flip of bit {bit} at byte {byte}: {tail:?}"
                );
            }
        }
    }

    #[test]
    fn garbage_past_a_zero_header_is_corruption() {
        let (mut buf, ends) = log(2);
        buf.resize(buf.len() + 64, 0);
        let at = ends[1] + 30;
        buf[at] = 7;
        let (end, tail) = run(&buf);
        assert_eq!(end, ends[1]);
        assert!(matches!(tail, Tail::Corrupt { offset, .. } if offset == ends[1]));
    }

    #[test]
    fn nonzero_end_finds_the_last_nonzero_byte() {
        assert_eq!(nonzero_end(&[0; 20]), 0);
        let mut b = [0u8; 20];
        b[0] = 1;
        assert_eq!(nonzero_end(&b), 1);
        b[13] = 1;
        assert_eq!(nonzero_end(&b), 14);
        b[19] = 1;
        assert_eq!(nonzero_end(&b), 20);
    }
}
