//! A TCP proxy in front of ZooKeeper that a test can cut, so that a
//! client's session really expires on the server while the server and
//! every other client carry on.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Forwards 127.0.0.1:port to an upstream; while cut, closes every
/// connection, open or new.
pub struct Proxy {
    addr: SocketAddr,
    /// Cancelled to cut; replaced by a fresh token to restore.
    link: Arc<Mutex<Option<CancellationToken>>>,
    stop: CancellationToken,
}

impl Proxy {
    /// Starts forwarding to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let link = Arc::new(Mutex::new(Some(CancellationToken::new())));
        let stop = CancellationToken::new();
        let upstream = upstream.to_owned();
        let accepting = Arc::clone(&link);
        let stopped = stop.clone();
        tokio::spawn(async move {
            loop {
                let (mut client, _) = tokio::select! {
                    _ = stopped.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(_) => continue,
                    },
                };
                // Cut: the connection is closed at once.
                let Some(open) = accepting.lock().unwrap().clone() else {
                    continue;
                };
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = open.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
        Proxy { addr, link, stop }
    }

    /// The address clients connect to.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Closes every proxied connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        if let Some(open) = self.link.lock().unwrap().take() {
            open.cancel();
        }
    }

    /// Forwards again.
    pub fn restore(&self) {
        self.link
            .lock()
            .unwrap()
            .get_or_insert_with(CancellationToken::new);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut();
    }
}
