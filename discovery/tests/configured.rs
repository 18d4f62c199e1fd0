//! Static discovery from a `[discovery]` section.

use rim_config::{DiscoveryBackend, DiscoveryConfig, StaticComet};
use rim_discovery::{Addrs, Discovery, Kind, NodeInfo, StaticDiscovery};

fn config() -> DiscoveryConfig {
    DiscoveryConfig {
        backend: DiscoveryBackend::Static,
        logics: vec!["127.0.0.1:3119".into(), "127.0.0.1:3019".into()],
        comets: vec![
            StaticComet {
                id: "comet-2".into(),
                region: "bj".into(),
                grpc: "127.0.0.1:3209".into(),
                tcp: "127.0.0.1:3201".into(),
                ws: String::new(),
                wss: String::new(),
                domain: String::new(),
                weight: 5,
            },
            StaticComet {
                id: "comet-1".into(),
                region: "sh".into(),
                grpc: "127.0.0.1:3109".into(),
                tcp: "127.0.0.1:3101".into(),
                ws: "127.0.0.1:3102".into(),
                wss: "127.0.0.1:3103".into(),
                domain: "comet-1.example.com".into(),
                weight: 10,
            },
        ],
        ..DiscoveryConfig::default()
    }
}

#[tokio::test]
async fn static_discovery_serves_the_configured_nodes() {
    let discovery = StaticDiscovery::new(&config());
    let comets = discovery.watch(Kind::Comet).await.unwrap();
    let comets = comets.borrow().clone();
    assert_eq!(
        comets[0],
        NodeInfo {
            id: "comet-1".into(),
            region: "sh".into(),
            zone: String::new(),
            addrs: Addrs {
                tcp: "127.0.0.1:3101".into(),
                ws: "127.0.0.1:3102".into(),
                wss: "127.0.0.1:3103".into(),
                grpc: "127.0.0.1:3109".into(),
            },
            domain: "comet-1.example.com".into(),
            weight: 10,
            conn_count: 0,
            ip_count: 0,
            updated: 0,
        }
    );
    assert_eq!(comets[1].id, "comet-2");
    assert_eq!(comets[1].region, "bj");
    assert_eq!(comets[1].weight, 5);

    let logics = discovery.watch(Kind::Logic).await.unwrap();
    let logics = logics.borrow().clone();
    let ids: Vec<&str> = logics.iter().map(|l| l.id.as_str()).collect();
    assert_eq!(ids, ["127.0.0.1:3019", "127.0.0.1:3119"], "sorted by id");
    assert_eq!(logics[0].addrs.grpc, "127.0.0.1:3019");
}

#[tokio::test]
async fn static_registration_is_a_no_op() {
    let discovery = rim_discovery::connect(&config()).await.unwrap();
    let info = NodeInfo {
        id: "comet-9".into(),
        ..NodeInfo::default()
    };
    let registration = discovery.register(Kind::Comet, info.clone()).await.unwrap();
    registration.update(info).await.unwrap();
    registration.deregister().await.unwrap();
    let comets = discovery.watch(Kind::Comet).await.unwrap();
    assert_eq!(comets.borrow().len(), 2, "the set stays the configured one");
    assert!(
        discovery
            .register(Kind::Comet, NodeInfo::default())
            .await
            .is_err(),
        "an empty id is refused"
    );
}
