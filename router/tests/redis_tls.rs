//! The behavioural suite over TLS (`rediss://`): each test starts its own
//! redis-server with a TLS port and a fresh self-signed certificate, trusted
//! through `router.tls_ca`; plus what an untrusted certificate looks like.
//!
//! Needs the `redis-server` binary that deploy/test.sh installs; the tests
//! run when `RIM_TEST_REDIS` is set (deploy/test.sh sets it).

mod suite;

use std::ops::Deref;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rim_config::{RouterBackend, RouterConfig};
use rim_router::{Error, RedisOptions, RedisRouter};

/// A private redis-server listening only with TLS; killed (by PID) on drop.
struct TlsRedis {
    child: Child,
    port: u16,
    ca: PathBuf,
    /// Holds the certificate and data files until the server is dropped.
    _dir: tempfile::TempDir,
}

impl TlsRedis {
    fn start() -> TlsRedis {
        assert!(
            std::env::var_os("RIM_TEST_REDIS").is_some(),
            "RIM_TEST_REDIS is not set: run deploy/test.sh (it installs redis-server)"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()])
            .expect("certificate generated");
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, certified.cert.pem()).unwrap();
        std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
        let port = rim_testkit::free_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--tls-port")
            .arg(port.to_string())
            .arg("--tls-cert-file")
            .arg(&cert)
            .arg("--tls-key-file")
            .arg(&key)
            .arg("--tls-ca-cert-file")
            .arg(&cert)
            .args(["--tls-auth-clients", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server (run deploy/test.sh): {e}"));
        let server = TlsRedis {
            child,
            port,
            ca: cert,
            _dir: dir,
        };
        assert!(
            rim_testkit::wait_listening(port, Duration::from_secs(10)),
            "redis-server with TLS did not listen on {port}"
        );
        server
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A router over TLS that keeps its server alive as long as it lives.
struct TlsRouter {
    router: RedisRouter,
    _server: TlsRedis,
}

impl Deref for TlsRouter {
    type Target = RedisRouter;
    fn deref(&self) -> &RedisRouter {
        &self.router
    }
}

async fn router(max_age: Duration) -> TlsRouter {
    let server = TlsRedis::start();
    let ca = std::fs::read(&server.ca).unwrap();
    let options = RedisOptions::new(max_age)
        .with_prefix(suite::unique_prefix())
        .with_tls_ca(ca);
    let router = RedisRouter::connect(&[server.url()], options)
        .await
        .unwrap_or_else(|e| panic!("cannot reach the TLS Redis at {}: {e}", server.url()));
    TlsRouter {
        router,
        _server: server,
    }
}

suite::router_tests!(router, #[ignore = "needs redis-server: run deploy/test.sh"]);

#[tokio::test]
#[ignore = "needs redis-server: run deploy/test.sh"]
async fn connect_reads_router_tls_ca() {
    let server = TlsRedis::start();
    let config = RouterConfig {
        backend: RouterBackend::Redis,
        redis: vec![server.url()],
        online_max_age: Duration::from_secs(30),
        tls_ca: Some(server.ca.clone()),
    };
    let router = rim_router::connect(&config)
        .await
        .unwrap_or_else(|e| panic!("cannot reach the TLS Redis through router.tls_ca: {e}"));
    router.ping().await.unwrap();
}

#[tokio::test]
#[ignore = "needs redis-server: run deploy/test.sh"]
async fn an_untrusted_certificate_is_refused() {
    let server = TlsRedis::start();
    // No tls_ca: the system's roots do not know this self-signed certificate.
    let err = RedisRouter::connect(&[server.url()], RedisOptions::new(Duration::from_secs(30)))
        .await
        .expect_err("connected although the certificate is not trusted");
    let message = err.to_string();
    assert!(
        message.contains(&server.url()) && message.to_lowercase().contains("certificate"),
        "{message}"
    );
    assert!(!matches!(err, Error::Config(_)), "{err:?}");
}

#[tokio::test]
async fn an_unreadable_tls_ca_is_a_config_error() {
    let config = RouterConfig {
        backend: RouterBackend::Redis,
        redis: vec!["rediss://127.0.0.1:1".into()],
        online_max_age: Duration::from_secs(30),
        tls_ca: Some(PathBuf::from("/nonexistent/rim-ca.pem")),
    };
    let Err(err) = rim_router::connect(&config).await else {
        panic!("read a missing file");
    };
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    assert!(err.to_string().contains("router.tls_ca"), "{err}");
}
