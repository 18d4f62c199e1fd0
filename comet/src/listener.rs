//! The comet's listeners and the accept loops of its client listeners:
//! admission limits, the WebSocket upgrade on `/sub`, the TLS handshake for
//! WSS, then one task per connection.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rim_config::CometConfig;
use rim_shutdown::Shutdown;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::machine::TryParse;
use tokio_tungstenite::tungstenite::handshake::server::{Request, create_response, write_response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::comet::{ConnSlot, Inner};
use crate::connection;
use crate::log_limit::LogLimit;
use crate::stats::{self, Wire};
use crate::transport::{TcpTransport, Transport, WsTransport};

/// The WebSocket upgrade path goim clients use.
pub const WS_PATH: &str = "/sub";

/// What a listener speaks.
#[derive(Clone)]
pub(crate) enum Protocol {
    Tcp,
    Ws,
    Wss(TlsAcceptor),
}

impl Protocol {
    fn wire(&self) -> Wire {
        match self {
            Protocol::Tcp => Wire::Tcp,
            Protocol::Ws => Wire::Ws,
            Protocol::Wss(_) => Wire::Wss,
        }
    }

    fn name(&self) -> &'static str {
        self.wire().as_str()
    }
}

/// The comet's bound listeners.
#[derive(Debug)]
pub struct Listeners {
    /// Raw TCP client listeners.
    pub tcp: Vec<TcpListener>,
    /// WebSocket client listeners.
    pub ws: Vec<TcpListener>,
    /// WebSocket-over-TLS client listeners (need `tls_cert` and `tls_key`).
    pub wss: Vec<TcpListener>,
    /// The comet gRPC service.
    pub grpc: TcpListener,
}

impl Listeners {
    /// Binds every listener the config names (WSS only when TLS is
    /// configured), each with a listen backlog of `backlog`.
    pub fn bind(config: &CometConfig, backlog: u32) -> io::Result<Listeners> {
        let wss = if config.wss_enabled() {
            bind_all(&config.wss_bind, backlog)?
        } else {
            Vec::new()
        };
        Ok(Listeners {
            tcp: bind_all(&config.tcp_bind, backlog)?,
            ws: bind_all(&config.ws_bind, backlog)?,
            wss,
            grpc: listen(config.grpc_bind, backlog)?,
        })
    }

    /// Returns the local addresses of `list`, for the startup log.
    pub(crate) fn addrs(list: &[TcpListener]) -> Vec<SocketAddr> {
        list.iter().filter_map(|l| l.local_addr().ok()).collect()
    }
}

/// The running accept loops of the client listeners.
pub(crate) struct Accepting {
    loops: Vec<JoinHandle<()>>,
    /// Cancelled when accepting stops.
    stop: CancellationToken,
    /// Cancelled when the drain starts: connections still in their
    /// handshake give up, and late registrations close themselves.
    drain: CancellationToken,
}

impl Accepting {
    /// Starts one accept loop per client listener: `[tcp, ws, wss]`. WSS
    /// listeners need `tls` (see [`crate::tls::wss_acceptor`]).
    pub(crate) fn start(
        inner: &Arc<Inner>,
        [tcp, ws, wss]: [Vec<TcpListener>; 3],
        tls: Option<TlsAcceptor>,
        tasks: &Shutdown,
    ) -> Accepting {
        let stop = CancellationToken::new();
        let drain = CancellationToken::new();
        let protocols = tcp
            .into_iter()
            .map(|l| (l, Protocol::Tcp))
            .chain(ws.into_iter().map(|l| (l, Protocol::Ws)))
            .chain(
                wss.into_iter()
                    .filter_map(|l| tls.clone().map(|t| (l, Protocol::Wss(t)))),
            );
        let loops = protocols
            .map(|(listener, protocol)| {
                tokio::spawn(accept_loop(
                    Arc::clone(inner),
                    listener,
                    protocol,
                    tasks.clone(),
                    stop.clone(),
                    drain.clone(),
                ))
            })
            .collect();
        Accepting { loops, stop, drain }
    }

    /// Returns a token cancelled when accepting stops.
    pub(crate) fn stopped_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Stops accepting and waits for every accept loop to end; returns the
    /// token that starts the drain of the accepted connections.
    pub(crate) async fn stop(self) -> CancellationToken {
        self.stop.cancel();
        for accept_loop in self.loops {
            let _ = accept_loop.await;
        }
        self.drain
    }
}

/// Accepts connections until `stop` is cancelled.
async fn accept_loop(
    inner: Arc<Inner>,
    listener: TcpListener,
    protocol: Protocol,
    tasks: Shutdown,
    stop: CancellationToken,
    drain: CancellationToken,
) {
    let local = listener.local_addr().ok();
    tracing::info!(listener = protocol.name(), addr = ?local, "accepting clients");
    let mut errors = AcceptErrors::default();
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Usually EMFILE: back off instead of spinning.
                    let pause = errors.failed(&err, protocol.name(), inner.now_ms());
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(pause) => continue,
                    }
                }
            },
        };
        errors.succeeded();
        let Some(slot) = inner.try_admit(peer.ip()) else {
            stats::incr(&inner.stats.refused_connections);
            tracing::debug!(peer.addr = %peer, "connection refused: limit reached or draining");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let id = inner.next_session_id();
        // One span per connection; mid and key are recorded once authenticated.
        let span = tracing::debug_span!(
            "conn",
            conn.id = id,
            peer.addr = %peer,
            transport = protocol.name(),
            mid = tracing::field::Empty,
            key = tracing::field::Empty,
        );
        let accepted = Accepted {
            inner: Arc::clone(&inner),
            peer,
            id,
            wire: protocol.wire(),
            slot,
            drain: drain.clone(),
        };
        spawn_connection(&tasks, stream, &protocol, accepted, span);
    }
    tracing::info!(listener = protocol.name(), addr = ?local, "stopped accepting");
}

/// Accept errors in a row (usually EMFILE: out of file descriptors). The
/// loop backs off from 10 ms, doubling to 1 s, while they last, and logs at
/// most one line per 10 s, with how many failed since.
#[derive(Debug)]
struct AcceptErrors {
    in_a_row: u32,
    log: LogLimit,
}

impl Default for AcceptErrors {
    fn default() -> Self {
        AcceptErrors {
            in_a_row: 0,
            log: LogLimit::new(10_000),
        }
    }
}

impl AcceptErrors {
    const FIRST_PAUSE: Duration = Duration::from_millis(10);
    const MAX_PAUSE: Duration = Duration::from_secs(1);

    /// Counts a failed accept at `now_ms`; returns how long to pause before
    /// the next.
    fn failed(&mut self, err: &io::Error, listener: &str, now_ms: u64) -> Duration {
        self.in_a_row = self.in_a_row.saturating_add(1);
        if let Some(failed) = self.log.event(now_ms) {
            tracing::warn!(listener, reason = %err, failed, "accept failed; backing off (one line per 10 s)");
        }
        (Self::FIRST_PAUSE * 2u32.saturating_pow(self.in_a_row - 1)).min(Self::MAX_PAUSE)
    }

    /// Resets the backoff after a successful accept.
    fn succeeded(&mut self) {
        self.in_a_row = 0;
    }
}

/// What every connection task needs besides its stream.
struct Accepted {
    inner: Arc<Inner>,
    peer: SocketAddr,
    id: u64,
    wire: Wire,
    slot: ConnSlot,
    drain: CancellationToken,
}

impl Accepted {
    async fn serve<T: Transport>(self, transport: T) {
        connection::serve(
            self.inner, transport, self.id, self.peer, self.wire, self.slot, self.drain,
        )
        .await;
    }
}

/// Spawns the connection task. Each protocol gets its own task type, so
/// that a TCP connection's task is sized for TCP, not for TLS + WebSocket.
fn spawn_connection(
    tasks: &Shutdown,
    stream: TcpStream,
    protocol: &Protocol,
    accepted: Accepted,
    span: tracing::Span,
) {
    let max_body = accepted.inner.config.max_body;
    let timeout = accepted.inner.config.handshake_timeout;
    match protocol {
        Protocol::Tcp => {
            tasks.spawn(
                accepted
                    .serve(TcpTransport::new(stream, max_body))
                    .instrument(span),
            );
        }
        Protocol::Ws => {
            let task = async move {
                // Boxed: the upgrade's state is freed once it is done.
                let Some(ws) = Box::pin(upgrade(&accepted.inner, stream, timeout)).await else {
                    return;
                };
                accepted.serve(WsTransport::new(ws, max_body)).await;
            };
            tasks.spawn(task.instrument(span));
        }
        Protocol::Wss(tls) => {
            let tls = tls.clone();
            let task = async move {
                let Some(ws) = Box::pin(upgrade_tls(&accepted.inner, tls, stream, timeout)).await
                else {
                    return;
                };
                accepted.serve(WsTransport::new(ws, max_body)).await;
            };
            tasks.spawn(task.instrument(span));
        }
    }
}

async fn upgrade_tls(
    inner: &Inner,
    tls: TlsAcceptor,
    stream: TcpStream,
    timeout: Duration,
) -> Option<tokio_tungstenite::WebSocketStream<tokio_rustls::server::TlsStream<TcpStream>>> {
    let stream = match tokio::time::timeout(timeout, tls.accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => {
            stats::incr(&inner.stats.bad_frames);
            tracing::debug!(reason = ?err.to_string(), "tls handshake failed");
            return None;
        }
        Err(_) => {
            stats::incr(&inner.stats.handshake_timeouts);
            tracing::debug!("tls handshake timed out");
            return None;
        }
    };
    upgrade(inner, stream, timeout).await
}

/// Buffers sized for many idle connections: tungstenite's defaults
/// (128 KiB read, 128 KiB write) would cost megabytes per thousand clients.
fn ws_config(max_body: usize) -> WebSocketConfig {
    let max_message = max_body + rim_proto::HEADER_LEN;
    WebSocketConfig::default()
        .read_buffer_size(256)
        .write_buffer_size(8 * 1024)
        .max_write_buffer_size(1 << 20)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
}

/// Largest HTTP upgrade request head read, in bytes (browsers send ~1 KiB).
const MAX_UPGRADE_HEAD: usize = 8 * 1024;

/// Why an upgrade request was refused, as the HTTP answer says it.
struct Refusal {
    status: StatusCode,
    reason: String,
}

impl Refusal {
    fn bad_request(reason: impl Into<String>) -> Refusal {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            reason: reason.into(),
        }
    }
}

/// Upgrades an accepted stream to WebSocket on `/sub`; a bad request gets
/// an HTTP error status (400, or 404 for another path) before the close.
async fn upgrade<S>(
    inner: &Inner,
    mut stream: S,
    timeout: Duration,
) -> Option<tokio_tungstenite::WebSocketStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let answered = tokio::time::timeout(timeout, read_upgrade_request(&mut stream)).await;
    let (response, tail) = match answered {
        Ok(Ok(Ok(accepted))) => accepted,
        Ok(Ok(Err(refusal))) => {
            stats::incr(&inner.stats.bad_frames);
            tracing::debug!(status = refusal.status.as_u16(), reason = ?refusal.reason, "websocket upgrade refused");
            let answer = format!(
                "HTTP/1.1 {}\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{}\n",
                refusal.status,
                refusal.reason.len() + 1,
                refusal.reason
            );
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                let _ = stream.write_all(answer.as_bytes()).await;
                let _ = stream.shutdown().await;
            })
            .await;
            return None;
        }
        Ok(Err(err)) => {
            tracing::debug!(reason = ?err.to_string(), "websocket upgrade failed");
            return None;
        }
        Err(_) => {
            stats::incr(&inner.stats.handshake_timeouts);
            tracing::debug!("websocket upgrade timed out");
            return None;
        }
    };
    let written = tokio::time::timeout(timeout, async {
        stream.write_all(&response).await?;
        stream.flush().await
    })
    .await;
    if !matches!(written, Ok(Ok(()))) {
        tracing::debug!("websocket upgrade answer not written");
        return None;
    }
    let config = ws_config(inner.config.max_body);
    Some(
        tokio_tungstenite::WebSocketStream::from_partially_read(
            stream,
            tail,
            Role::Server,
            Some(config),
        )
        .await,
    )
}

/// Reads an upgrade request head and checks it; returns the 101 answer to
/// write and the bytes the client sent after the head, or why it is refused.
/// An I/O error or an early EOF is an `Err`: there is nobody to answer.
async fn read_upgrade_request<S>(stream: &mut S) -> io::Result<Result<(Vec<u8>, Vec<u8>), Refusal>>
where
    S: AsyncRead + Unpin,
{
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    loop {
        if buf.len() >= MAX_UPGRADE_HEAD {
            return Ok(Err(Refusal {
                status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                reason: format!("request head exceeds {MAX_UPGRADE_HEAD} bytes"),
            }));
        }
        let room = MAX_UPGRADE_HEAD - buf.len();
        let read = (&mut *stream).take(room as u64).read_buf(&mut buf).await?;
        if read == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        match Request::try_parse(&buf) {
            Ok(None) => continue,
            Ok(Some((len, request))) => return Ok(check_upgrade(&request, buf.split_off(len))),
            Err(err) => {
                return Ok(Err(Refusal::bad_request(format!(
                    "bad upgrade request: {err}"
                ))));
            }
        }
    }
}

/// Checks a parsed upgrade request: the path, then what RFC 6455 requires.
fn check_upgrade(request: &Request, tail: Vec<u8>) -> Result<(Vec<u8>, Vec<u8>), Refusal> {
    if request.uri().path() != WS_PATH {
        return Err(Refusal {
            status: StatusCode::NOT_FOUND,
            reason: format!("websocket path is {WS_PATH}"),
        });
    }
    let response = create_response(request)
        .map_err(|err| Refusal::bad_request(format!("bad upgrade request: {err}")))?;
    let mut answer = Vec::with_capacity(256);
    write_response(&mut answer, &response)
        .map_err(|err| Refusal::bad_request(format!("bad upgrade request: {err}")))?;
    Ok((answer, tail))
}

/// Binds a list of addresses.
fn bind_all(addrs: &[SocketAddr], backlog: u32) -> io::Result<Vec<TcpListener>> {
    addrs.iter().map(|&addr| listen(addr, backlog)).collect()
}

/// Binds `addr` with a listen backlog of `backlog` (node.listen_backlog;
/// tokio's `TcpListener::bind` uses 128, which a reconnect storm overflows).
/// Every listener of a rim process is bound here.
pub fn listen(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let bound = (|| {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(backlog)
    })();
    bound.map_err(|e| io::Error::new(e.kind(), format!("cannot bind {addr}: {e}")))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::NoLogic;

    #[test]
    fn accept_errors_back_off_while_they_last() {
        let mut errors = AcceptErrors::default();
        let emfile = io::Error::from_raw_os_error(24);
        let pauses: Vec<Duration> = (0..9).map(|t| errors.failed(&emfile, "tcp", t)).collect();
        assert_eq!(pauses[0], Duration::from_millis(10));
        assert_eq!(pauses[1], Duration::from_millis(20));
        assert_eq!(pauses[8], Duration::from_secs(1), "capped");
        errors.succeeded();
        assert_eq!(errors.failed(&emfile, "tcp", 10), Duration::from_millis(10));
    }

    /// Every idle connection pays for its task's future: one-off phases are
    /// boxed so that it stays small (it was 10 KB before they were).
    #[tokio::test]
    async fn a_tcp_connection_task_stays_small() {
        let comet = crate::Comet::new(
            &rim_config::NodeConfig::default(),
            rim_config::CometConfig::default(),
            Arc::new(NoLogic),
        );
        let inner = Arc::clone(&comet.inner);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let slot = inner.try_admit(peer.ip()).unwrap();
        let accepted = Accepted {
            inner,
            peer,
            id: 1,
            wire: Wire::Tcp,
            slot,
            drain: CancellationToken::new(),
        };
        let task = accepted.serve(TcpTransport::new(stream, 4096));
        let size = std::mem::size_of_val(&task);
        assert!(
            size <= 2048,
            "the TCP connection future grew to {size} bytes"
        );
    }
}
