//! Comet and logic wired as in a cluster: the comet reaches logic over gRPC
//! (RemoteLogic → LogicGrpc), logic keeps presence in the router.

use std::sync::Arc;
use std::time::Duration;

use rim_client::{AuthToken, Client};
use rim_comet::{Comet, Listeners};
use rim_config::{CometConfig, LogicConfig, NodeConfig, RouterBackend, RouterConfig};
use rim_logic::{Comets, HttpClient, Logic};
use rim_proto::api::RemoteLogic;
use rim_router::Router;
use rim_shutdown::Shutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

struct Cluster {
    router: Arc<dyn Router>,
    tcp: std::net::SocketAddr,
    shutdown: Shutdown,
    stop_logic: CancellationToken,
}

/// The cluster's gRPC token: logic requires it, the comet sends it.
const GRPC_TOKEN: &str = "s3cret-grpc-token";

async fn cluster() -> Cluster {
    let router = rim_router::connect(&RouterConfig {
        backend: RouterBackend::Memory,
        ..RouterConfig::default()
    })
    .await
    .unwrap();
    let logic = Arc::new(Logic::new(
        &LogicConfig::default(),
        Arc::clone(&router),
        Arc::new(Comets::new()),
        HttpClient::new().unwrap(),
    ));
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let logic_addr = grpc.local_addr().unwrap();
    let stop_logic = CancellationToken::new();
    tokio::spawn(rim_logic::serve_grpc(
        logic,
        Some(GRPC_TOKEN),
        None,
        grpc,
        stop_logic.clone(),
    ));

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{logic_addr}"))
        .unwrap()
        .connect_lazy();
    let config = CometConfig {
        room_report_interval: Duration::from_millis(100),
        drain_window: Duration::from_millis(50),
        ..CometConfig::default()
    };
    let node = NodeConfig {
        id: "comet-1".into(),
        grpc_token: Some(GRPC_TOKEN.into()),
        ..NodeConfig::default()
    };
    let logic = RemoteLogic::new(channel)
        .with_token(node.grpc_token.as_deref())
        .unwrap();
    let comet = Comet::new(&node, config, Arc::new(logic));
    let bind = || TcpListener::bind("127.0.0.1:0");
    let listeners = Listeners {
        tcp: vec![bind().await.unwrap()],
        ws: vec![],
        wss: vec![],
        grpc: bind().await.unwrap(),
    };
    let tcp = listeners.tcp[0].local_addr().unwrap();
    let shutdown = Shutdown::new();
    tokio::spawn(comet.run(listeners, shutdown.clone()));
    Cluster {
        router,
        tcp,
        shutdown,
        stop_logic,
    }
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn presence_follows_the_connection_through_grpc() {
    let cluster = cluster().await;
    let mut client = Client::connect_tcp(cluster.tcp).await.unwrap();
    let token = AuthToken {
        mid: 77,
        key: "dev-1".into(),
        room_id: "live://9".into(),
        ..AuthToken::default()
    };
    client.auth(&token).await.unwrap();
    let router = Arc::clone(&cluster.router);
    assert_eq!(
        router.servers_of_keys(&["dev-1".into()]).await.unwrap(),
        vec![Some("comet-1".to_string())]
    );
    // Room counts flow comet → logic → router, and back into heartbeats.
    eventually("room report", || {
        let router = Arc::clone(&router);
        async move { router.room_counts().await.unwrap().get("live://9") == Some(&1) }
    })
    .await;
    assert_eq!(client.heartbeat().await.unwrap(), 1);

    drop(client);
    eventually("disconnect", || {
        let router = Arc::clone(&router);
        async move { router.servers_of_keys(&["dev-1".into()]).await.unwrap() == vec![None] }
    })
    .await;
    cluster.shutdown.trigger();
    cluster.stop_logic.cancel();
}

#[tokio::test]
async fn a_token_logic_refuses_closes_the_connection() {
    let cluster = cluster().await;
    let mut client = Client::connect_tcp(cluster.tcp).await.unwrap();
    let err = client
        .auth_raw(bytes::Bytes::from_static(b"{not json"))
        .await
        .unwrap_err();
    assert!(matches!(err, rim_client::Error::Closed), "{err}");
    cluster.shutdown.trigger();
    cluster.stop_logic.cancel();
}

/// Issue #16, part 1: the logic gRPC answered any peer. With
/// `node.grpc_token` set, a call without it is refused as Unauthenticated.
#[tokio::test]
async fn logic_grpc_refuses_calls_without_the_grpc_token() {
    use rim_proto::api::{LogicApi, RpcError};
    use rim_proto::pb::logic::v1 as pb;

    let router = rim_router::connect(&RouterConfig::default()).await.unwrap();
    let logic = Arc::new(Logic::new(
        &LogicConfig::default(),
        router,
        Arc::new(Comets::new()),
        HttpClient::new().unwrap(),
    ));
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = grpc.local_addr().unwrap();
    let stop = CancellationToken::new();
    let served = tokio::spawn(rim_logic::serve_grpc(
        logic,
        Some(GRPC_TOKEN),
        None,
        grpc,
        stop.clone(),
    ));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let request = || pb::NodesRequest::default();
    for remote in [
        RemoteLogic::new(channel.clone()),
        RemoteLogic::new(channel.clone())
            .with_token(Some("wrong"))
            .unwrap(),
    ] {
        let err = remote.nodes(request()).await.unwrap_err();
        assert!(matches!(err, RpcError::Unauthenticated(_)), "{err}");
    }
    let remote = RemoteLogic::new(channel)
        .with_token(Some(GRPC_TOKEN))
        .unwrap();
    remote.nodes(request()).await.unwrap();
    stop.cancel();
    served.await.unwrap().unwrap();
}

/// Issue #15, part 5: comet and logic on mutual TLS (`node.tls_*`, with
/// certificates generated here). A client's auth travels comet → logic over
/// TLS, a push logic → comet too; a caller without a cluster certificate is
/// refused by the handshake even with the right token.
#[tokio::test]
async fn comet_and_logic_work_over_mutual_tls_and_refuse_outsiders() {
    use rim_proto::api::{CometApi, LogicApi, RemoteComet, RpcError};
    use rim_proto::pb::comet::v1 as comet_pb;
    use rim_proto::pb::logic::v1 as logic_pb;
    use rim_proto::{Frame, Op};
    use rim_testkit::TestCa;
    use rim_tls::{GrpcTls, GrpcTlsFiles};

    let ca = TestCa::new("cluster ca");
    let node_of = |id: &str| {
        let files = ca.issue(id);
        NodeConfig {
            id: id.into(),
            grpc_token: Some(GRPC_TOKEN.into()),
            tls_cert: Some(files.cert),
            tls_key: Some(files.key),
            tls_ca: Some(ca.ca()),
            tls_client_auth: true,
            ..NodeConfig::default()
        }
    };
    let (logic_node, comet_node) = (node_of("logic-1"), node_of("comet-1"));
    let logic_tls = GrpcTls::load(&GrpcTlsFiles::of(&logic_node)).unwrap();
    let comet_tls = GrpcTls::load(&GrpcTlsFiles::of(&comet_node)).unwrap();

    let router = rim_router::connect(&RouterConfig {
        backend: RouterBackend::Memory,
        ..RouterConfig::default()
    })
    .await
    .unwrap();
    let logic = Arc::new(Logic::new(
        &LogicConfig::default(),
        Arc::clone(&router),
        Arc::new(Comets::new()),
        HttpClient::new().unwrap(),
    ));
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let logic_addr = grpc.local_addr().unwrap().to_string();
    let stop = CancellationToken::new();
    tokio::spawn(rim_logic::serve_grpc(
        logic,
        Some(GRPC_TOKEN),
        logic_tls.server(),
        grpc,
        stop.clone(),
    ));

    // The comet dials logic as `rim comet` does: the endpoint from node.tls_*.
    let channel = comet_tls.endpoint(&logic_addr).unwrap().connect_lazy();
    let remote_logic = RemoteLogic::new(channel)
        .with_token(Some(GRPC_TOKEN))
        .unwrap();
    let comet = Comet::new(&comet_node, CometConfig::default(), Arc::new(remote_logic));
    let bind = || TcpListener::bind("127.0.0.1:0");
    let listeners = Listeners {
        tcp: vec![bind().await.unwrap()],
        ws: vec![],
        wss: vec![],
        grpc: bind().await.unwrap(),
    };
    let tcp = listeners.tcp[0].local_addr().unwrap();
    let comet_addr = listeners.grpc.local_addr().unwrap().to_string();
    let shutdown = Shutdown::new();
    tokio::spawn(comet.run(listeners, shutdown.clone()));

    // Auth goes through logic: the key is online on comet-1.
    let mut client = Client::connect_tcp(tcp).await.unwrap();
    let token = AuthToken {
        mid: 7,
        key: "tls-1".into(),
        accepts: vec![1000],
        ..AuthToken::default()
    };
    client.auth(&token).await.unwrap();
    assert_eq!(
        router.servers_of_keys(&["tls-1".into()]).await.unwrap(),
        vec![Some("comet-1".to_string())]
    );

    // Logic (or a job) pushes to the comet over mutual TLS.
    let to_comet = RemoteComet::connect_lazy_with_tls(&comet_addr, &logic_tls)
        .unwrap()
        .with_token(Some(GRPC_TOKEN))
        .unwrap();
    let delivery = to_comet
        .push_msg(comet_pb::PushMsgRequest {
            keys: vec!["tls-1".into()],
            proto_op: 1000,
            proto: Some(Frame::new(Op(1000), 0, bytes::Bytes::from_static(b"over tls")).into()),
            bodies: vec![],
        })
        .await
        .unwrap();
    assert_eq!(delivery.delivered, 1);
    let frame = tokio::time::timeout(Duration::from_secs(10), client.next_frame())
        .await
        .expect("the push arrives in time")
        .unwrap()
        .expect("a frame");
    assert_eq!((frame.op, &frame.body[..]), (Op(1000), &b"over tls"[..]));

    // An outsider with the token and the CA but no cluster certificate.
    let outsider = GrpcTls::load(&GrpcTlsFiles {
        ca: Some(ca.ca()),
        ..GrpcTlsFiles::default()
    })
    .unwrap();
    let to_logic = RemoteLogic::new(outsider.endpoint(&logic_addr).unwrap().connect_lazy())
        .with_token(Some(GRPC_TOKEN))
        .unwrap();
    let err = to_logic
        .nodes(logic_pb::NodesRequest::default())
        .await
        .unwrap_err();
    assert!(
        !matches!(err, RpcError::Unauthenticated(_)),
        "refused by TLS, not the token: {err}"
    );
    let to_comet = RemoteComet::connect_lazy_with_tls(&comet_addr, &outsider)
        .unwrap()
        .with_token(Some(GRPC_TOKEN))
        .unwrap();
    assert!(
        to_comet.stats().await.is_err(),
        "an outsider reached the comet"
    );
    // A plaintext caller of the TLS logic.
    let plain = RemoteLogic::new(
        GrpcTls::plaintext()
            .endpoint(&logic_addr)
            .unwrap()
            .connect_lazy(),
    )
    .with_token(Some(GRPC_TOKEN))
    .unwrap();
    assert!(
        plain
            .nodes(logic_pb::NodesRequest::default())
            .await
            .is_err()
    );

    shutdown.trigger();
    stop.cancel();
}
