//! Socket helpers shared by both directions: a buffered frame reader, the dialer's side of
//! the handshake, and writes with a deadline.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::config::Config;
use crate::error::Error;
use crate::wire::{self, FrameKind, Hello, StreamKind, MAX_CONTROL_FRAME};

/// Smallest read: many small frames (heartbeats) arrive per syscall.
const READ_MIN: usize = 8 << 10;
/// Largest growth of the read buffer per read, so that the buffer follows the bytes that have
/// actually arrived, never the length a frame header claims.
const READ_MAX: usize = 256 << 10;

/// Reads whole frames, several per syscall when they are small.
pub(crate) struct FrameReader<R> {
    inner: R,
    /// Bytes read but not yet returned. Invariant: holds at most one partial frame after the
    /// complete ones, and that frame's declared length has been checked against `max`.
    buf: BytesMut,
    max: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(crate) fn new(inner: R, max: usize) -> FrameReader<R> {
        FrameReader {
            inner,
            buf: BytesMut::new(),
            max,
        }
    }

    /// The next frame, or `None` on a clean end of stream between frames. Cancel-safe: bytes
    /// read before a cancellation stay buffered, so it can sit in a `select!`.
    pub(crate) async fn next(&mut self) -> Result<Option<(FrameKind, Bytes)>, Error> {
        loop {
            if let Some(frame) = wire::decode_frame(&mut self.buf, self.max)? {
                return Ok(Some(frame));
            }
            self.buf
                .reserve(wire::missing(&self.buf).clamp(READ_MIN, READ_MAX));
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(Error::Protocol(format!(
                        "connection closed {} bytes into a frame",
                        self.buf.len()
                    )))
                };
            }
        }
    }
}

/// Opens a connection to peer `to` at `addr` and completes the handshake: returns once the
/// acceptor has said `Ok`, so the caller only ever writes to a connection that was accepted.
pub(crate) async fn dial(
    cfg: &Config,
    to: u64,
    addr: &str,
    stream: StreamKind,
) -> Result<(FrameReader<OwnedReadHalf>, OwnedWriteHalf), Error> {
    let tcp = timeout(cfg.dial_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| Error::Timeout("dial"))??;
    // Batching is done here, per write; Nagle would only add latency to heartbeats.
    tcp.set_nodelay(true)?;
    let (r, mut w) = tcp.into_split();
    let mut reader = FrameReader::new(r, MAX_CONTROL_FRAME);
    let hello = Hello {
        stream,
        cluster_id: cfg.cluster_id,
        from: cfg.id,
        to,
    };
    timeout(cfg.handshake_timeout, async {
        w.write_all(&hello.encode()).await?;
        expect_ok(&mut reader).await
    })
    .await
    .map_err(|_| Error::Timeout("handshake"))??;
    Ok((reader, w))
}

/// Waits for the other side's verdict.
pub(crate) async fn expect_ok<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
) -> Result<(), Error> {
    match reader.next().await? {
        Some((FrameKind::Ok, _)) => Ok(()),
        Some((FrameKind::Reject, reason)) => Err(rejected(&reason)),
        Some((kind, _)) => Err(Error::Protocol(format!(
            "expected Ok or Reject, got {kind:?}"
        ))),
        None => Err(Error::Closed),
    }
}

pub(crate) fn rejected(reason: &[u8]) -> Error {
    Error::Rejected(String::from_utf8_lossy(reason).into_owned())
}

pub(crate) async fn write_timed<W: AsyncWrite + Unpin>(
    w: &mut W,
    bytes: &[u8],
    limit: Duration,
    what: &'static str,
) -> Result<(), Error> {
    timeout(limit, w.write_all(bytes))
        .await
        .map_err(|_| Error::Timeout(what))?
        .map_err(Error::from)
}

/// Tells the other side why the connection is being closed. Best effort: the other side may
/// already be gone, and a reject must never hold a task longer than `limit`.
pub(crate) async fn send_reject<W: AsyncWrite + Unpin>(w: &mut W, reason: &str, limit: Duration) {
    let mut buf = BytesMut::new();
    wire::put_reject(&mut buf, reason);
    let _ = write_timed(w, &buf, limit, "reject").await;
    let _ = timeout(limit, w.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    #[tokio::test]
    async fn reads_many_frames_from_one_buffer_and_ends_cleanly() {
        let mut bytes = BytesMut::new();
        for i in 0..100u8 {
            wire::put_header(&mut bytes, FrameKind::SnapChunk, 1);
            bytes.put_u8(i);
        }
        let mut r = FrameReader::new(&bytes[..], 16);
        for i in 0..100u8 {
            let (k, p) = r.next().await.unwrap().unwrap();
            assert_eq!((k, &p[..]), (FrameKind::SnapChunk, &[i][..]));
        }
        assert!(r.next().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn eof_inside_a_frame_is_an_error() {
        let mut bytes = BytesMut::new();
        wire::put_header(&mut bytes, FrameKind::SnapChunk, 10);
        bytes.put_slice(b"abc");
        let mut r = FrameReader::new(&bytes[..], 16);
        assert!(matches!(r.next().await, Err(Error::Protocol(_))));
    }

    #[tokio::test]
    async fn oversized_declared_length_fails_without_reading_on() {
        let bytes = [0xff, 0xff, 0xff, 0x7f, FrameKind::Message as u8, 1, 2, 3];
        let mut r = FrameReader::new(&bytes[..], 1 << 20);
        assert!(matches!(
            r.next().await,
            Err(Error::Frame(wire::FrameError::TooLarge { .. }))
        ));
        assert!(
            r.buf.capacity() <= READ_MAX,
            "{} bytes reserved",
            r.buf.capacity()
        );
    }
}
