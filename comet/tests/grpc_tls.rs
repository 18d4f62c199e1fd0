//! The comet's own gRPC server with `node.tls_*` (certificates generated in
//! the test): with mutual TLS, a caller of the cluster (a certificate from
//! `node.tls_ca`) reaches it; one without a certificate, with one from
//! another CA, or in plaintext does not.

mod support;

use std::time::Duration;

use rim_config::NodeConfig;
use rim_proto::api::{CometApi, RemoteComet, RpcResult};
use rim_testkit::TestCa;
use rim_tls::{GrpcTls, GrpcTlsFiles};
use support::{ScriptedLogic, start_as, test_config};

/// `stats` of the comet at `addr` as a caller with `files`, bounded in time.
async fn stats(addr: &str, files: GrpcTlsFiles) -> RpcResult<String> {
    let tls = GrpcTls::load(&files).expect("client tls settings");
    let client = RemoteComet::connect_lazy_with_tls(addr, &tls)?;
    let reply = tokio::time::timeout(Duration::from_secs(20), client.stats())
        .await
        .expect("stats ends within 20 s");
    reply.map(|r| r.server_id)
}

#[tokio::test]
async fn a_comet_with_mutual_tls_serves_only_the_cluster() {
    let ca = TestCa::new("cluster ca");
    let own = ca.issue("comet");
    let node = NodeConfig {
        id: "comet-tls".into(),
        tls_cert: Some(own.cert),
        tls_key: Some(own.key),
        tls_ca: Some(ca.ca()),
        tls_client_auth: true,
        ..NodeConfig::default()
    };
    let comet = start_as(node, test_config(), ScriptedLogic::default(), vec![]).await;
    let addr = comet.grpc.to_string();

    let job = ca.issue("job");
    let member = GrpcTlsFiles {
        cert: Some(job.cert),
        key: Some(job.key),
        ca: Some(ca.ca()),
        client_auth: false,
    };
    assert_eq!(stats(&addr, member).await.unwrap(), "comet-tls");

    let no_cert = GrpcTlsFiles {
        ca: Some(ca.ca()),
        ..GrpcTlsFiles::default()
    };
    let refused = stats(&addr, no_cert).await;
    assert!(
        refused.is_err(),
        "a caller without a certificate got through"
    );

    let stranger_ca = TestCa::new("stranger ca");
    let stranger = stranger_ca.issue("stranger");
    let wrong = GrpcTlsFiles {
        cert: Some(stranger.cert),
        key: Some(stranger.key),
        ca: Some(ca.ca()),
        client_auth: false,
    };
    let refused = stats(&addr, wrong).await;
    assert!(
        refused.is_err(),
        "a certificate from another CA got through"
    );

    let plain = stats(&addr, GrpcTlsFiles::default()).await;
    assert!(plain.is_err(), "a plaintext caller got through");
}
