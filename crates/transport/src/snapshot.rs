//! Where an outbound snapshot's data comes from.
//!
//! The transport never needs a snapshot's data in one piece on the sending side: it pulls
//! chunks and cuts them into frames. Today the data comes from the `MsgSnapshot` message
//! ([`BytesSource`]); a file-backed source (the WAL's snapshot reader yields checked chunks of
//! a snapshot file) plugs in through [`crate::Transport::send_snapshot`] without the
//! transport changing.

use bytes::Bytes;

/// A snapshot's data, pulled in chunks while it is streamed to a peer.
///
/// Called on tokio's blocking pool, one chunk at a time, so an implementation may do blocking
/// file reads.
pub trait SnapshotSource: Send + 'static {
    /// Total bytes the chunks will add up to. Sent to the receiver before any data, so it can
    /// refuse a snapshot over its limit without receiving it; a source that yields a different
    /// total fails the stream.
    fn len(&self) -> u64;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The next bytes, of any non-zero size (the transport cuts them into frames of its chunk
    /// size), or `None` once `len()` bytes have been yielded. An error fails the stream and is
    /// reported as a failed snapshot.
    fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>>;
}

/// A snapshot already in memory, such as the `data` of a `MsgSnapshot`. Yields it in one
/// piece: `Bytes` is reference-counted, so nothing is copied.
#[derive(Debug, Clone)]
pub struct BytesSource {
    /// Not yet yielded.
    rest: Option<Bytes>,
    len: u64,
}

impl BytesSource {
    pub fn new(data: Bytes) -> BytesSource {
        BytesSource {
            len: data.len() as u64,
            rest: (!data.is_empty()).then_some(data),
        }
    }
}

impl SnapshotSource for BytesSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        Ok(self.rest.take())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_source_yields_everything_once() {
        let mut s = BytesSource::new(Bytes::from_static(b"abcdef"));
        assert_eq!(s.len(), 6);
        assert_eq!(s.next_chunk().unwrap().as_deref(), Some(&b"abcdef"[..]));
        assert_eq!(s.next_chunk().unwrap(), None);
        let mut empty = BytesSource::new(Bytes::new());
        assert!(empty.is_empty());
        assert_eq!(empty.next_chunk().unwrap(), None);
    }
}
