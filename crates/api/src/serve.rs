//! Serving the router with a bound on open connections.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::serve::Listener;
use keel_node::driver::NodeHandle;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use crate::{router, ApiConfig};

/// Serves the API on `listener` until `shutdown` resolves, then lets requests in flight finish
/// (each is bounded by the node's request timeout) and returns.
pub async fn serve<F>(
    listener: TcpListener,
    node: NodeHandle,
    cfg: ApiConfig,
    shutdown: F,
) -> io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let limited = LimitedListener::new(listener, cfg.max_connections);
    let app = router(node, cfg);
    axum::serve(limited, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// A listener that holds at most `max` accepted connections open. At the limit it stops
/// accepting, so further clients wait in the kernel backlog (and time out there) instead of
/// each costing a descriptor and a task here.
pub struct LimitedListener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
}

impl LimitedListener {
    pub fn new(inner: TcpListener, max: usize) -> LimitedListener {
        LimitedListener {
            inner,
            slots: Arc::new(Semaphore::new(max.max(1))),
        }
    }
}

/// Accept errors that concern one connection (the peer went away during the handshake);
/// anything else (out of descriptors) is the process's state and worth a pause.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

impl Listener for LimitedListener {
    type Io = CoalescedWrites<LimitedStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // The semaphore is never closed, so this waits for a permit and never fails; if it ever
        // did, accepting nothing more is the safe reading.
        let Ok(permit) = self.slots.clone().acquire_owned().await else {
            return std::future::pending().await;
        };
        loop {
            match self.inner.accept().await {
                Ok((io, addr)) => {
                    // Answers are small and latency-bound; Nagle would hold them back.
                    let _ = io.set_nodelay(true);
                    return (
                        CoalescedWrites::new(LimitedStream {
                            io,
                            _permit: permit,
                        }),
                        addr,
                    );
                }
                Err(e) if is_connection_error(&e) => debug!("accept: {e}"),
                Err(e) => {
                    // Out of descriptors: retrying at once would spin.
                    warn!("accept failed: {e}; pausing");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// An accepted connection; its slot is released when the connection is dropped.
pub struct LimitedStream {
    io: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// A connection whose writes are coalesced, for HTTP/2 (the server's client connections, and
/// `keelctl`'s gRPC channels, which have the same problem from the other side).
///
/// h2 writes whatever frames its streams have queued each time the connection task runs, and
/// that task runs right after each stream task that wakes it (tokio polls a task woken by the
/// running one next), so under load every small message cost a syscall of its own (1.8 writes
/// per get on the leader at 256 clients). Each write first yields once, which lets the other
/// streams whose messages are ready (a batch of answers from the Raft thread, a batch of
/// requests from the clients) queue their frames; the next poll writes them all at once (0.17
/// writes per get).
pub struct CoalescedWrites<T> {
    io: T,
    /// True after a write yielded and woke its task; the next write goes to the socket and
    /// clears it. So a write is put off by at most one turn of the scheduler, never more.
    yielded: bool,
}

impl<T> CoalescedWrites<T> {
    pub fn new(io: T) -> CoalescedWrites<T> {
        CoalescedWrites { io, yielded: false }
    }

    /// True when this write should yield first (and the task has been woken to retry it).
    fn yield_first(&mut self, cx: &mut Context<'_>) -> bool {
        self.yielded = !self.yielded;
        if self.yielded {
            cx.waker().wake_by_ref();
        }
        self.yielded
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CoalescedWrites<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CoalescedWrites<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if me.yield_first(cx) {
            return Poll::Pending;
        }
        Pin::new(&mut me.io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if me.yield_first(cx) {
            return Poll::Pending;
        }
        Pin::new(&mut me.io).poll_write_vectored(cx, bufs)
    }

    /// Not vectored, on purpose: h2 then copies data frames of up to 1 KiB into its write
    /// buffer instead of chaining each one as an I/O slice of its own, and a chained frame
    /// fills the buffer, so every message of a few hundred bytes forced a write by itself.
    /// Larger frames (snapshot chunks, big ranges) are still written from their own buffer.
    fn is_write_vectored(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    struct CountWakes(AtomicUsize);

    impl Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    async fn pair() -> (CoalescedWrites<LimitedStream>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let mut limited = LimitedListener::new(listener, 1);
        let (server, _) = limited.accept().await;
        (server, client)
    }

    #[tokio::test]
    async fn a_write_yields_once_then_goes_to_the_socket() {
        let (mut server, mut client) = pair().await;
        assert!(!server.is_write_vectored());
        let wakes = Arc::new(CountWakes(AtomicUsize::new(0)));
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);

        let first = Pin::new(&mut server).poll_write(&mut cx, b"answer");
        assert!(first.is_pending());
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            1,
            "the yield must wake its task"
        );
        match Pin::new(&mut server).poll_write(&mut cx, b"answer") {
            Poll::Ready(Ok(6)) => {}
            other => panic!("the retried write must reach the socket: {other:?}"),
        }
        // The next write yields again: each batch gets its turn to gather.
        assert!(Pin::new(&mut server).poll_write(&mut cx, b"!").is_pending());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 2);

        let mut got = [0u8; 6];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"answer");
    }

    #[tokio::test]
    async fn a_large_write_arrives_whole() {
        let (mut server, mut client) = pair().await;
        // Larger than the socket buffers, so writes also wait for the peer to read.
        let data: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            server.write_all(&data).await.unwrap();
            server.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "bytes changed on the way");
    }
}
