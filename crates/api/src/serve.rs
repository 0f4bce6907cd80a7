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
    type Io = LimitedStream;
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
                        LimitedStream {
                            io,
                            _permit: permit,
                        },
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
