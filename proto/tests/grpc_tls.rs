//! The internal gRPC over TLS (`node.tls_*`), with certificates generated in
//! the test: a client trusting the cluster's CA reaches a TLS server, a
//! plaintext client or one trusting another CA does not; with mutual TLS
//! only a client presenting a certificate the CA signed gets through, and
//! `node.grpc_token` is still checked behind TLS.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rim_proto::api::{CometApi, CometGrpc, RemoteComet, RpcError, RpcResult};
use rim_proto::pb::comet::v1 as comet;
use rim_testkit::TestCa;
use rim_tls::{GrpcTls, GrpcTlsFiles};
use tokio::net::TcpListener;

/// A comet that only answers `stats`, with its id.
struct StatsOnly;

#[async_trait]
impl CometApi for StatsOnly {
    async fn push_msg(&self, _: comet::PushMsgRequest) -> RpcResult<comet::Delivery> {
        Err(RpcError::Internal("not in this test".into()))
    }
    async fn broadcast(&self, _: comet::BroadcastRequest) -> RpcResult<comet::Delivery> {
        Err(RpcError::Internal("not in this test".into()))
    }
    async fn broadcast_room(&self, _: comet::BroadcastRoomRequest) -> RpcResult<comet::Delivery> {
        Err(RpcError::Internal("not in this test".into()))
    }
    async fn broadcast_group(&self, _: comet::BroadcastGroupRequest) -> RpcResult<comet::Delivery> {
        Err(RpcError::Internal("not in this test".into()))
    }
    async fn change_group(
        &self,
        _: comet::ChangeGroupRequest,
    ) -> RpcResult<comet::ChangeGroupReply> {
        Err(RpcError::Internal("not in this test".into()))
    }
    async fn rooms(&self) -> RpcResult<Vec<String>> {
        Ok(vec![])
    }
    async fn kick(&self, _: Vec<String>) -> RpcResult<u64> {
        Ok(0)
    }
    async fn stats(&self) -> RpcResult<comet::StatsReply> {
        Ok(comet::StatsReply {
            server_id: "comet-tls".into(),
            ..comet::StatsReply::default()
        })
    }
}

const TOKEN: &str = "grpc-secret";

/// Serves [`StatsOnly`] with `files` (requiring [`TOKEN`]) on 127.0.0.1;
/// returns its address.
async fn serve(files: &GrpcTlsFiles) -> String {
    let tls = GrpcTls::load(files).expect("server tls settings");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut builder = tonic::transport::Server::builder();
    if let Some(server) = tls.server() {
        builder = builder
            .tls_config(server)
            .expect("tonic accepts the settings");
    }
    let service = CometGrpc(Arc::new(StatsOnly)).into_guarded_service(Some(TOKEN));
    tokio::spawn(
        builder
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

/// Calls `stats` on `addr` as a client with `files` and `token`, bounded
/// in time.
async fn stats(addr: &str, files: &GrpcTlsFiles, token: Option<&str>) -> RpcResult<String> {
    let tls = GrpcTls::load(files).expect("client tls settings");
    let client = RemoteComet::connect_lazy_with_tls(addr, &tls)?.with_token(token)?;
    match tokio::time::timeout(Duration::from_secs(20), client.stats()).await {
        Ok(reply) => reply.map(|r| r.server_id),
        Err(_) => panic!("stats on {addr} did not end within 20 s"),
    }
}

#[tokio::test]
async fn a_client_trusting_the_ca_reaches_a_tls_server_and_others_are_refused() {
    let ca = TestCa::new("rim test ca");
    let server = ca.issue("comet");
    let addr = serve(&GrpcTlsFiles {
        cert: Some(server.cert),
        key: Some(server.key),
        ca: Some(ca.ca()),
        client_auth: false,
    })
    .await;

    // A job: only the CA, no certificate of its own (none is asked for).
    let trusting = GrpcTlsFiles {
        ca: Some(ca.ca()),
        ..GrpcTlsFiles::default()
    };
    assert_eq!(
        stats(&addr, &trusting, Some(TOKEN)).await.unwrap(),
        "comet-tls"
    );

    let plaintext = stats(&addr, &GrpcTlsFiles::default(), Some(TOKEN)).await;
    assert!(
        matches!(
            plaintext,
            Err(RpcError::Unavailable(_) | RpcError::Internal(_))
        ),
        "a plaintext client must not get through: {plaintext:?}"
    );

    let other_ca = TestCa::new("another ca");
    let distrusting = GrpcTlsFiles {
        ca: Some(other_ca.ca()),
        ..GrpcTlsFiles::default()
    };
    let refused = stats(&addr, &distrusting, Some(TOKEN)).await;
    assert!(
        matches!(
            refused,
            Err(RpcError::Unavailable(_) | RpcError::Internal(_))
        ),
        "a client must not accept a server its CA did not sign: {refused:?}"
    );
}

#[tokio::test]
async fn mutual_tls_lets_only_clients_with_a_certificate_from_the_ca_in() {
    let ca = TestCa::new("rim test ca");
    let server = ca.issue("comet");
    let addr = serve(&GrpcTlsFiles {
        cert: Some(server.cert),
        key: Some(server.key),
        ca: Some(ca.ca()),
        client_auth: true,
    })
    .await;

    // A logic of the cluster: its own certificate from the same CA.
    let logic = ca.issue("logic");
    let member = GrpcTlsFiles {
        cert: Some(logic.cert),
        key: Some(logic.key),
        ca: Some(ca.ca()),
        client_auth: true,
    };
    assert_eq!(
        stats(&addr, &member, Some(TOKEN)).await.unwrap(),
        "comet-tls"
    );
    // TLS does not replace the token: the server still checks it.
    let without_token = stats(&addr, &member, None).await;
    assert!(
        matches!(without_token, Err(RpcError::Unauthenticated(_))),
        "{without_token:?}"
    );

    // Trusts the server, but has no certificate to show.
    let no_cert = GrpcTlsFiles {
        ca: Some(ca.ca()),
        ..GrpcTlsFiles::default()
    };
    let refused = stats(&addr, &no_cert, Some(TOKEN)).await;
    assert!(
        !matches!(refused, Ok(_) | Err(RpcError::Unauthenticated(_))),
        "a client without a certificate must be refused by TLS: {refused:?}"
    );

    // Trusts the server, but shows a certificate another CA signed.
    let stranger_ca = TestCa::new("stranger ca");
    let stranger = stranger_ca.issue("stranger");
    let wrong_ca = GrpcTlsFiles {
        cert: Some(stranger.cert),
        key: Some(stranger.key),
        ca: Some(ca.ca()),
        client_auth: false,
    };
    let refused = stats(&addr, &wrong_ca, Some(TOKEN)).await;
    assert!(
        !matches!(refused, Ok(_) | Err(RpcError::Unauthenticated(_))),
        "a certificate from another CA must be refused by TLS: {refused:?}"
    );

    let plaintext = stats(&addr, &GrpcTlsFiles::default(), Some(TOKEN)).await;
    assert!(plaintext.is_err(), "{plaintext:?}");
}
