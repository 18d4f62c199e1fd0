//! The API's HTTP/1.1 connections, served one task each so that every
//! connection is bounded the way nginx bounds them: a header-read timeout
//! from connect, or from the first byte of a later request, until its head
//! is in; a keep-alive idle timeout between requests; a cap on how many are
//! served at once; and a drain deadline on shutdown after which whatever is
//! still open is closed. The body-read timeout is applied where bodies are
//! read (`Api::read_body`).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

pub use rim_tls::TlsAcceptor;

use crate::metrics::ConnectionMetrics;

/// How long the accept loop pauses after an accept error (e.g. out of file
/// descriptors), so that it neither spins nor floods the log.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How often, at most, the accept loop logs that the connection cap is reached.
const FULL_LOG_EVERY: Duration = Duration::from_secs(10);

/// The limits every connection is served under (the `[api]` keys of the
/// same names).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// `api.header_read_timeout`.
    pub(crate) header_read_timeout: Duration,
    /// `api.keep_alive_timeout`.
    pub(crate) keep_alive_timeout: Duration,
    /// `api.max_connections`.
    pub(crate) max_connections: usize,
    /// `api.drain_timeout`.
    pub(crate) drain_timeout: Duration,
}

/// Serves `routes` on `listener` until `stop` is cancelled, then stops
/// accepting, lets open connections finish their requests for at most
/// `limits.drain_timeout` and closes the rest.
///
/// Over `limits.max_connections`, new connections are not accepted: they
/// wait in the listen backlog (and the kernel refuses them when that is
/// full) until a served connection closes.
///
/// With `tls` (`api.tls_cert`), every connection first completes a TLS
/// handshake, within `limits.header_read_timeout` (the handshake counts as
/// part of the first head); one that fails is closed.
pub(crate) async fn serve(
    routes: Router,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    metrics: ConnectionMetrics,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let tracker = TaskTracker::new();
    let force = CancellationToken::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    // hyper's own header timer also runs while a kept-alive connection is
    // idle; the connection's watchdog below times heads and idleness apart.
    http.header_read_timeout(None);
    let mut full_logged: Option<Instant> = None;
    loop {
        let permit = match Arc::clone(&slots).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if full_logged.is_none_or(|at| at.elapsed() >= FULL_LOG_EVERY) {
                    full_logged = Some(Instant::now());
                    tracing::warn!(
                        max = limits.max_connections,
                        "http api at api.max_connections; new connections wait in the backlog"
                    );
                }
                tokio::select! {
                    () = stop.cancelled() => break,
                    permit = Arc::clone(&slots).acquire_owned() => match permit {
                        Ok(permit) => permit,
                        // The semaphore is never closed.
                        Err(_) => break,
                    },
                }
            }
        };
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(reason = %err, "http api accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let connection = Connection {
            routes: routes.clone(),
            http: http.clone(),
            header_read_timeout: limits.header_read_timeout,
            keep_alive_timeout: limits.keep_alive_timeout,
            stop: stop.clone(),
            force: force.clone(),
            metrics: metrics.clone(),
            tls: tls.clone(),
        };
        tracker.spawn(async move {
            connection.serve(stream, peer).await;
            drop(permit);
        });
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(limits.drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = tracker.len(),
            "http api connections still open after api.drain_timeout; closing them"
        );
        force.cancel();
        tracker.wait().await;
    }
    Ok(())
}

/// What one connection's task needs.
struct Connection {
    routes: Router,
    http: hyper::server::conn::http1::Builder,
    header_read_timeout: Duration,
    keep_alive_timeout: Duration,
    stop: CancellationToken,
    force: CancellationToken,
    metrics: ConnectionMetrics,
    tls: Option<TlsAcceptor>,
}

impl Connection {
    /// Serves one connection until the client closes it, an error or a
    /// timeout ends it, or shutdown closes it; over TLS when configured.
    async fn serve(self, stream: TcpStream, peer: SocketAddr) {
        let _open = self.metrics.opened();
        let Some(tls) = self.tls.clone() else {
            return self.serve_io(stream, peer).await;
        };
        let handshake = tokio::select! {
            done = tokio::time::timeout(self.header_read_timeout, tls.accept(stream)) => done,
            () = self.stop.cancelled() => return,
        };
        match handshake {
            Ok(Ok(stream)) => self.serve_io(stream, peer).await,
            Ok(Err(err)) => {
                // A plaintext request or a client that does not trust the
                // certificate ends here.
                tracing::debug!(peer = %peer, reason = %err, "http api tls handshake failed");
                self.metrics.closed("tls_handshake");
            }
            Err(_) => {
                tracing::debug!(peer = %peer, "http api tls handshake timed out");
                self.metrics.closed("header_timeout");
            }
        }
    }

    /// Serves HTTP/1.1 on `stream` (TCP, or TLS over it).
    async fn serve_io<S>(self, stream: S, peer: SocketAddr)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity::new());
        let io = TokioIo::new(Watched {
            inner: stream,
            activity: Arc::clone(&activity),
        });
        let routes = self.routes;
        let requests = Arc::clone(&activity);
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let routes = routes.clone();
            let busy = requests.busy();
            async move {
                let mut request = request.map(Body::new);
                request.extensions_mut().insert(ConnectInfo(peer));
                let response = routes.oneshot(request).await;
                drop(busy);
                response
            }
        });
        let conn = self.http.serve_connection(io, service);
        tokio::pin!(conn);
        let mut draining = false;
        loop {
            let (at, why) = activity.deadline(self.header_read_timeout, self.keep_alive_timeout);
            tokio::select! {
                served = conn.as_mut() => {
                    if let Err(err) = served {
                        tracing::debug!(peer = %peer, reason = %err, "http api connection ended");
                    }
                    return;
                }
                () = self.stop.cancelled(), if !draining => {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
                () = self.force.cancelled() => {
                    self.metrics.closed("drain");
                    return;
                }
                // A request started or ended: the deadline moved.
                () = activity.changed.notified() => {}
                () = tokio::time::sleep_until(at) => {
                    if let Some(reason) = why {
                        tracing::debug!(peer = %peer, reason, "closing an http api connection");
                        self.metrics.closed(reason);
                        return;
                    }
                }
            }
        }
    }
}

/// Marks "no request head is being read" in [`Activity::head_ms`].
const NO_HEAD: u64 = u64::MAX;

/// What a connection is doing, for its watchdog: when it last read or
/// wrote a byte, when the head it is reading began, and how many of its
/// requests are being handled.
#[derive(Debug)]
struct Activity {
    start: Instant,
    /// Milliseconds from `start` to the last read or write.
    last_ms: AtomicU64,
    /// Milliseconds from `start` to the beginning of the request head being
    /// read: the connect for the first request, the first byte after the
    /// previous answer for later ones; [`NO_HEAD`] when none is.
    head_ms: AtomicU64,
    busy: AtomicUsize,
    /// Wakes the watchdog when a head starts or a request starts or ends.
    changed: Notify,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            // A new connection is reading its first head from the start.
            head_ms: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            changed: Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    fn at(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms)
    }

    /// Records bytes read now: the start of a head if the connection was
    /// between requests.
    fn read(&self) {
        let now = self.now_ms();
        self.last_ms.store(now, Ordering::Relaxed);
        if !self.is_busy() && self.head_ms.load(Ordering::Relaxed) == NO_HEAD {
            self.head_ms.store(now, Ordering::Relaxed);
            self.changed.notify_one();
        }
    }

    /// Records bytes written now.
    fn wrote(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Relaxed) > 0
    }

    /// When the connection is to be closed, and why (`header_timeout` or
    /// `idle`, or `None`: not a close, look again then). A request being handled is bounded by its
    /// handler (`api.body_read_timeout` for bodies), not here.
    fn deadline(&self, header: Duration, keep_alive: Duration) -> (Instant, Option<&'static str>) {
        if self.is_busy() {
            return (Instant::now() + keep_alive, None);
        }
        match self.head_ms.load(Ordering::Relaxed) {
            NO_HEAD => (
                self.at(self.last_ms.load(Ordering::Relaxed)) + keep_alive,
                Some("idle"),
            ),
            head => (self.at(head) + header, Some("header_timeout")),
        }
    }

    /// Counts a request as handled (its head is in) until the returned
    /// guard is dropped.
    fn busy(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        self.head_ms.store(NO_HEAD, Ordering::Relaxed);
        self.changed.notify_one();
        Busy(Arc::clone(self))
    }
}

/// A request being handled (see [`Activity::busy`]).
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
        // The next request's head starts with its first byte.
        self.0.head_ms.store(NO_HEAD, Ordering::Relaxed);
        self.0.wrote();
        self.0.changed.notify_one();
    }
}

/// A stream that records its reads and writes in an [`Activity`].
struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.read();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
