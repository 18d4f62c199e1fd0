//! Accept loops for the client listeners: admission limits, the WebSocket
//! upgrade on `/sub`, TLS for WSS, then one task per connection.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rim_shutdown::Shutdown;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::comet::{ConnSlot, Inner};
use crate::connection;
use crate::stats::{self, Wire};
use crate::transport::{TcpTransport, Transport, WsTransport};
use crate::{Error, Result};

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

/// Loads the WSS certificate chain and key.
pub(crate) fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            Error::Tls(format!(
                "cannot read certificates from {}: {e}",
                cert.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(Error::Tls(format!("no certificate in {}", cert.display())));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        Error::Tls(format!(
            "cannot read a private key from {}: {e}",
            key.display()
        ))
    })?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::Tls(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| Error::Tls(format!("certificate and key do not make a TLS config: {e}")))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Accepts connections until `stop` is cancelled.
pub(crate) async fn accept_loop(
    inner: Arc<Inner>,
    listener: TcpListener,
    protocol: Protocol,
    tasks: Shutdown,
    stop: CancellationToken,
    drain: CancellationToken,
) {
    let local = listener.local_addr().ok();
    tracing::info!(listener = protocol.name(), addr = ?local, "accepting clients");
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(reason = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
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

/// What every connection task needs besides its stream.
struct Accepted {
    inner: Arc<Inner>,
    peer: std::net::SocketAddr,
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
            tracing::debug!(reason = %err, "tls handshake failed");
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

async fn upgrade<S>(
    inner: &Inner,
    stream: S,
    timeout: Duration,
) -> Option<tokio_tungstenite::WebSocketStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // The error type is tungstenite's; its size is not ours to choose.
    #[allow(clippy::result_large_err)]
    let check_path = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() == WS_PATH {
            Ok(resp)
        } else {
            let mut refusal = ErrorResponse::new(Some(format!("websocket path is {WS_PATH}\n")));
            *refusal.status_mut() = StatusCode::NOT_FOUND;
            Err(refusal)
        }
    };
    let config = ws_config(inner.config.max_body);
    match tokio::time::timeout(
        timeout,
        tokio_tungstenite::accept_hdr_async_with_config(stream, check_path, Some(config)),
    )
    .await
    {
        Ok(Ok(ws)) => Some(ws),
        Ok(Err(err)) => {
            stats::incr(&inner.stats.bad_frames);
            tracing::debug!(reason = %err, "websocket upgrade refused");
            None
        }
        Err(_) => {
            stats::incr(&inner.stats.handshake_timeouts);
            tracing::debug!("websocket upgrade timed out");
            None
        }
    }
}

/// Binds a list of addresses.
pub(crate) async fn bind_all(addrs: &[std::net::SocketAddr]) -> io::Result<Vec<TcpListener>> {
    let mut listeners = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("cannot bind {addr}: {e}")))?;
        listeners.push(listener);
    }
    Ok(listeners)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::NoLogic;

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
