//! The API's HTTP/1.1 connections, served one task each so that every
//! connection is bounded: a header-read timeout (hyper's), a keep-alive
//! idle timeout (here), a cap on how many are served at once, and a drain
//! deadline on shutdown after which whatever is still open is closed. The
//! body-read timeout is applied where bodies are read (`Api::read_body`).

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
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

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
pub(crate) async fn serve(
    routes: Router,
    listener: TcpListener,
    limits: Limits,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let tracker = TaskTracker::new();
    let force = CancellationToken::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
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
            keep_alive_timeout: limits.keep_alive_timeout,
            stop: stop.clone(),
            force: force.clone(),
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
    keep_alive_timeout: Duration,
    stop: CancellationToken,
    force: CancellationToken,
}

impl Connection {
    /// Serves one connection until the client closes it, an error or a
    /// timeout ends it, or shutdown closes it.
    async fn serve(self, stream: TcpStream, peer: SocketAddr) {
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
            let idle_at = activity.idle_deadline(self.keep_alive_timeout);
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
                () = self.force.cancelled() => return,
                () = tokio::time::sleep_until(idle_at) => {
                    if activity.idle_for() >= self.keep_alive_timeout && !activity.is_busy() {
                        tracing::debug!(peer = %peer, "closing an idle http api connection");
                        return;
                    }
                }
            }
        }
    }
}

/// When a connection last read or wrote a byte, and how many of its
/// requests are being handled.
#[derive(Debug)]
struct Activity {
    start: Instant,
    /// Milliseconds from `start` to the last read or write.
    last_ms: AtomicU64,
    busy: AtomicUsize,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
        }
    }

    /// Records a read or a write now.
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    fn idle_for(&self) -> Duration {
        self.last().elapsed()
    }

    fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Relaxed) > 0
    }

    /// When the connection would next be idle for `timeout`: from its last
    /// byte, or a whole `timeout` from now while a request is handled (the
    /// handler's own limits bound that).
    fn idle_deadline(&self, timeout: Duration) -> Instant {
        if self.is_busy() {
            Instant::now() + timeout
        } else {
            self.last() + timeout
        }
    }

    /// Counts a request as handled until the returned guard is dropped.
    fn busy(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        Busy(Arc::clone(self))
    }
}

/// A request being handled (see [`Activity::busy`]).
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// A stream that records its reads and writes in an [`Activity`].
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
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
            self.activity.touch();
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
