use std::net::SocketAddr;

use crate::wire::{FrameError, HelloError};

/// Errors at the crate boundary and, internally, why a connection ended (logged, then the
/// connection is closed or redialed).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid transport config: {0}")]
    InvalidConfig(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("peer id {0} is this node's own id or 0")]
    InvalidPeerId(u64),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("bad hello: {0}")]
    Hello(#[from] HelloError),
    #[error("refused by the other side: {0}")]
    Rejected(String),
    #[error("{0} timed out")]
    Timeout(&'static str),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("connection closed by the other side")]
    Closed,
    #[error("snapshot source failed: {0}")]
    SnapshotSource(std::io::Error),
}

/// Why `send` did not queue a message. The message is gone either way (Raft retransmits), and
/// the reason is also counted in [`crate::Stats`]; callers on the Raft loop may ignore it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SendError {
    #[error("no peer {0}")]
    UnknownPeer(u64),
    #[error("queue to peer {0} is full")]
    QueueFull(u64),
    #[error("message to peer {0} is over the frame size limit")]
    TooLarge(u64),
    #[error("the transport is shutting down")]
    Closed,
}
