//! TLS material for rim's listeners and clients: PEM certificate chains,
//! private keys and CA bundles are read and checked here, once, for the WSS
//! listeners (`comet.tls_*`), the HTTP API (`api.tls_*`) and the internal
//! gRPC between roles (`node.tls_*`). It owns no socket: the comet and the
//! API run their handshakes with the acceptor built here, tonic runs the
//! gRPC ones with the settings built here. rustls with the ring provider
//! everywhere. What `rediss://` needs is the router's (`router.tls_ca`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
pub use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

#[cfg(test)]
mod tests;

/// How long a gRPC TLS handshake may take, on either side.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a certificate, key or CA file does not make a TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate file could not be read or parsed as PEM.
    #[error("cannot read certificates from {}", path.display())]
    ReadCertificates {
        /// The certificate (or CA) file.
        path: PathBuf,
        /// What went wrong reading it.
        #[source]
        source: pem::Error,
    },
    /// A certificate file holds no certificate.
    #[error("no certificate in {}", path.display())]
    NoCertificate {
        /// The certificate (or CA) file.
        path: PathBuf,
    },
    /// The key file could not be read or holds no private key.
    #[error("cannot read a private key from {}", path.display())]
    ReadKey {
        /// The key file.
        path: PathBuf,
        /// What went wrong reading it.
        #[source]
        source: pem::Error,
    },
    /// The TLS provider offers no safe protocol version.
    #[error("the tls provider offers no safe protocol version")]
    Provider(#[source] rustls::Error),
    /// The certificate and key do not make a server configuration (e.g. the
    /// key does not match the certificate).
    #[error("the certificate and key do not make a tls configuration")]
    Config(#[source] rustls::Error),
    /// The `node.tls_*` files given do not make a whole setting.
    #[error("{0}")]
    Incomplete(&'static str),
    /// A peer's gRPC address does not make an endpoint URI.
    #[error("bad grpc address {addr:?}")]
    BadAddress {
        /// The address (`host:port`).
        addr: String,
        /// What tonic said about it.
        #[source]
        source: tonic::transport::Error,
    },
}

/// Result of building TLS settings.
pub type Result<T, E = TlsError> = std::result::Result<T, E>;

/// A PEM file's bytes and the certificates in it.
fn read_certificates(path: &Path) -> Result<(Vec<u8>, Vec<CertificateDer<'static>>)> {
    let failed = |source| TlsError::ReadCertificates {
        path: path.to_path_buf(),
        source,
    };
    let pem = std::fs::read(path).map_err(|e| failed(pem::Error::Io(e)))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(failed)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok((pem, certs))
}

/// A PEM file's bytes and the private key in it.
fn read_key(path: &Path) -> Result<(Vec<u8>, PrivateKeyDer<'static>)> {
    let failed = |source| TlsError::ReadKey {
        path: path.to_path_buf(),
        source,
    };
    let pem = std::fs::read(path).map_err(|e| failed(pem::Error::Io(e)))?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(failed)?;
    Ok((pem, key))
}

/// Returns the acceptor of a server presenting the chain in `cert` with the
/// key in `key`, asking clients for no certificate (the WSS listeners and
/// the HTTP API, whose callers authenticate with tokens).
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor> {
    let (_, certs) = read_certificates(cert)?;
    let (_, key) = read_key(key)?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(TlsError::Provider)?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(TlsError::Config)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The `node.tls_*` files: the TLS of the internal gRPC between roles.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GrpcTlsFiles {
    /// `node.tls_cert`: the chain this node's gRPC server presents (and its
    /// clients, to servers that ask for one).
    pub cert: Option<PathBuf>,
    /// `node.tls_key`: the key of `cert`.
    pub key: Option<PathBuf>,
    /// `node.tls_ca`: the CA peers' certificates must be signed by; when set,
    /// this node's gRPC clients connect with TLS.
    pub ca: Option<PathBuf>,
    /// `node.tls_client_auth`: this node's gRPC server refuses clients
    /// without a certificate signed by `ca` (mutual TLS).
    pub client_auth: bool,
}

/// The TLS of the internal gRPC, built from [`GrpcTlsFiles`]: what a server
/// serves with and what a client dials with. The default is plaintext both
/// ways.
#[derive(Clone, Debug, Default)]
pub struct GrpcTls {
    server: Option<ServerTlsConfig>,
    client: Option<ClientTlsConfig>,
}

impl GrpcTlsFiles {
    /// The files `[node]` names.
    pub fn of(node: &rim_config::NodeConfig) -> GrpcTlsFiles {
        GrpcTlsFiles {
            cert: node.tls_cert.clone(),
            key: node.tls_key.clone(),
            ca: node.tls_ca.clone(),
            client_auth: node.tls_client_auth,
        }
    }
}

impl GrpcTls {
    /// Plaintext gRPC, as without any `node.tls_*` key.
    pub fn plaintext() -> GrpcTls {
        GrpcTls::default()
    }

    /// Reads and checks the files: a server certificate makes the gRPC
    /// server speak TLS; a CA makes the clients speak TLS, trusting only
    /// servers it signed and presenting the certificate, when there is one,
    /// to servers that ask; `client_auth` makes the server require such a
    /// client certificate.
    pub fn load(files: &GrpcTlsFiles) -> Result<GrpcTls> {
        let identity = match (&files.cert, &files.key) {
            (Some(cert), Some(key)) => {
                let (cert_pem, certs) = read_certificates(cert)?;
                let (key_pem, key_der) = read_key(key)?;
                // tonic builds its rustls configuration only when it serves
                // or dials; build one now so that a key that does not match
                // its certificate stops the process at start.
                rustls::ServerConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map_err(TlsError::Provider)?
                .with_no_client_auth()
                .with_single_cert(certs, key_der)
                .map_err(TlsError::Config)?;
                Some(Identity::from_pem(cert_pem, key_pem))
            }
            (None, None) => None,
            _ => {
                return Err(TlsError::Incomplete(
                    "node.tls_cert and node.tls_key are set together or not at all",
                ));
            }
        };
        let ca = match &files.ca {
            Some(ca) => Some(Certificate::from_pem(read_certificates(ca)?.0)),
            None => None,
        };
        if files.client_auth && (ca.is_none() || identity.is_none()) {
            return Err(TlsError::Incomplete(
                "node.tls_client_auth needs node.tls_ca, node.tls_cert and node.tls_key",
            ));
        }
        let server = identity.clone().map(|identity| {
            let server = ServerTlsConfig::new()
                .identity(identity)
                .timeout(HANDSHAKE_TIMEOUT);
            match (&ca, files.client_auth) {
                (Some(ca), true) => server.client_ca_root(ca.clone()),
                _ => server,
            }
        });
        let client = ca.map(|ca| {
            let client = ClientTlsConfig::new()
                .ca_certificate(ca)
                .timeout(HANDSHAKE_TIMEOUT);
            match identity {
                Some(identity) => client.identity(identity),
                None => client,
            }
        });
        Ok(GrpcTls { server, client })
    }

    /// What a gRPC server serves with: `None` = plaintext.
    pub fn server(&self) -> Option<ServerTlsConfig> {
        self.server.clone()
    }

    /// Returns whether this node's gRPC clients speak TLS.
    pub fn client_tls(&self) -> bool {
        self.client.is_some()
    }

    /// Returns the endpoint of the gRPC server at `addr` (`host:port`, as
    /// discovery holds it): `https://` verified against `node.tls_ca` when
    /// a CA is set, `http://` otherwise. The server's certificate must name
    /// `host` (a DNS name or an IP address).
    pub fn endpoint(&self, addr: &str) -> Result<Endpoint> {
        let bad = |source| TlsError::BadAddress {
            addr: addr.to_owned(),
            source,
        };
        match &self.client {
            Some(client) => Endpoint::from_shared(format!("https://{addr}"))
                .and_then(|endpoint| endpoint.tls_config(client.clone()))
                .map_err(bad),
            None => Endpoint::from_shared(format!("http://{addr}")).map_err(bad),
        }
    }
}
