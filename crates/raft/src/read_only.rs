//! Pending ReadIndex requests on the leader, waiting for a heartbeat round to confirm that the
//! leader was still the leader when they arrived.

use bytes::Bytes;
use keel_proto::raftpb::Message;
use std::collections::{BTreeSet, HashMap, VecDeque};

/// The answer to a read_index call: reads with context `request_ctx` may be served once the
/// state machine has applied `index`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadState {
    pub index: u64,
    pub request_ctx: Bytes,
}

#[derive(Debug)]
pub struct ReadIndexStatus {
    /// The request as received (`from` says whom to answer; the leader itself, or a follower).
    pub req: Message,
    /// The commit index when the request arrived.
    pub index: u64,
    pub acks: BTreeSet<u64>,
}

/// Requests in arrival order. A heartbeat acknowledgement for one request also confirms every
/// earlier one, so they are released in order.
#[derive(Debug, Default)]
pub struct ReadOnly {
    pending: HashMap<Bytes, ReadIndexStatus>,
    queue: VecDeque<Bytes>,
}

impl ReadOnly {
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Adds a request; a duplicate context is ignored (it will be answered with the first).
    pub fn add_request(&mut self, index: u64, ctx: Bytes, req: Message) {
        if self.pending.contains_key(&ctx) {
            return;
        }
        self.pending.insert(
            ctx.clone(),
            ReadIndexStatus {
                req,
                index,
                acks: BTreeSet::new(),
            },
        );
        self.queue.push_back(ctx);
    }

    /// Records that `id` acknowledged the heartbeat carrying `ctx`; returns the acks so far.
    pub fn recv_ack(&mut self, id: u64, ctx: &[u8]) -> Option<&BTreeSet<u64>> {
        let st = self.pending.get_mut(ctx)?;
        st.acks.insert(id);
        Some(&st.acks)
    }

    /// Removes and returns every request up to and including `ctx`.
    pub fn advance(&mut self, ctx: &[u8]) -> Vec<ReadIndexStatus> {
        let Some(pos) = self.queue.iter().position(|c| c.as_ref() == ctx) else {
            return Vec::new();
        };
        self.queue
            .drain(..=pos)
            .filter_map(|c| self.pending.remove(&c))
            .collect()
    }

    /// The context of the newest request: heartbeats carry it so one round confirms them all.
    pub fn last_pending_ctx(&self) -> Option<Bytes> {
        self.queue.back().cloned()
    }

    pub fn clear(&mut self) {
        self.pending.clear();
        self.queue.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_releases_in_order() {
        let mut ro = ReadOnly::default();
        for (i, c) in ["a", "b", "c"].iter().enumerate() {
            ro.add_request(
                i as u64 + 10,
                Bytes::from_static(c.as_bytes()),
                Message::default(),
            );
        }
        ro.add_request(99, Bytes::from_static(b"b"), Message::default());
        assert_eq!(ro.len(), 3, "duplicate context ignored");
        assert_eq!(ro.recv_ack(2, b"b").unwrap().len(), 1);
        assert!(ro.recv_ack(2, b"zz").is_none());
        let done = ro.advance(b"b");
        assert_eq!(
            done.iter().map(|s| s.index).collect::<Vec<_>>(),
            vec![10, 11]
        );
        assert_eq!(ro.last_pending_ctx(), Some(Bytes::from_static(b"c")));
        assert!(ro.advance(b"nope").is_empty());
    }
}
