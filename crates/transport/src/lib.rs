//! Keel's peer connections: how Raft messages get from one node to another.
//!
//! - Each node dials each peer: a connection per direction, so a node's outbound traffic never
//!   waits on what its peer sends back. Connections open with a handshake that names the
//!   cluster and both node ids ([`wire::Hello`]); the acceptor refuses strangers.
//! - [`Transport::send`] is synchronous and never blocks the Raft loop: it puts the message on
//!   the peer's bounded queue, or drops and counts it. A task per peer drains the queue,
//!   writing whatever is queued as one batch of length-prefixed frames per syscall.
//! - Connection failures are reported as [`Report::Unreachable`], once per failed batch or
//!   connection, and the peer is redialed with capped, jittered exponential backoff.
//! - Snapshots travel in chunks on a connection of their own, so heartbeats keep flowing
//!   beside a large transfer; the outcome is a [`Report::Snapshot`].
//! - Inbound messages are checked against the handshake and queued on a bounded [`Inbox`].
//!
//! The wire format and limits are in `README.md` and [`wire`]; every limit is a [`Config`]
//! field with its reason.

mod backoff;
mod config;
mod conn;
mod error;
mod inbound;
mod inbox;
mod peer;
mod snapshot;
mod stats;
mod transport;
pub mod wire;

pub use config::Config;
pub use error::{Error, SendError};
pub use inbox::{Inbox, Report, Reports};
pub use snapshot::{BytesSource, SnapshotSource};
pub use stats::Stats;
pub use transport::Transport;

#[cfg(test)]
mod tests {
    /// The node driver shares the transport with its Raft loop thread and hands the inbox and
    /// reports to tasks.
    #[test]
    fn handles_can_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<super::Transport>();
        send_sync::<super::Stats>();
        send::<super::Inbox>();
        send::<super::Reports>();
    }
}
