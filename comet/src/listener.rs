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
use crate::session::TransportKind;
use crate::stats;
use crate::transport::{TcpTransport, WsTransport};
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
    fn name(&self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Ws => "ws",
            Protocol::Wss(_) => "wss",
        }
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
        let span = tracing::debug_span!("conn", conn.id = id, peer.addr = %peer, transport = protocol.name());
        let task = handle(
            Arc::clone(&inner),
            stream,
            peer,
            protocol.clone(),
            id,
            slot,
            drain.clone(),
        );
        tasks.spawn(task.instrument(span));
    }
    tracing::info!(listener = protocol.name(), addr = ?local, "stopped accepting");
}

async fn handle(
    inner: Arc<Inner>,
    stream: TcpStream,
    peer: std::net::SocketAddr,
    protocol: Protocol,
    id: u64,
    slot: ConnSlot,
    drain: CancellationToken,
) {
    let max_body = inner.config.max_body;
    let timeout = inner.config.handshake_timeout;
    match protocol {
        Protocol::Tcp => {
            let transport = TcpTransport::new(stream, max_body);
            connection::serve(inner, transport, id, peer, TransportKind::Tcp, slot, drain).await;
        }
        Protocol::Ws => {
            let Some(ws) = upgrade(&inner, stream, timeout).await else {
                return;
            };
            connection::serve(
                inner,
                WsTransport::new(ws, max_body),
                id,
                peer,
                TransportKind::Ws,
                slot,
                drain,
            )
            .await;
        }
        Protocol::Wss(tls) => {
            let stream = match tokio::time::timeout(timeout, tls.accept(stream)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(err)) => {
                    tracing::debug!(reason = %err, "tls handshake failed");
                    return;
                }
                Err(_) => {
                    stats::incr(&inner.stats.handshake_timeouts);
                    tracing::debug!("tls handshake timed out");
                    return;
                }
            };
            let Some(ws) = upgrade(&inner, stream, timeout).await else {
                return;
            };
            connection::serve(
                inner,
                WsTransport::new(ws, max_body),
                id,
                peer,
                TransportKind::Ws,
                slot,
                drain,
            )
            .await;
        }
    }
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
