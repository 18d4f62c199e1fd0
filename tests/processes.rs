//! `rim logic` and `rim comet` as separate processes against the real Redis
//! and Kafka-protocol broker that deploy/test.sh starts.

mod support;

use rim_client::{AuthToken, Client};
use support::exposition::scrape;
use support::{Proc, post_ok, service, shipped_config, start_static_comet};

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Redis and Kafka: run deploy/test.sh"]
async fn a_client_of_a_comet_process_is_pushed_to_through_the_logic_process() {
    let (redis, kafka) = (service("RIM_TEST_REDIS"), service("RIM_TEST_KAFKA"));
    let run = std::process::id();
    let logic_config = shipped_config("logic");
    let mut logic = Proc::start(
        &["logic", "--config", &logic_config],
        &[
            ("RIM_NODE__ID", format!("logic-{run}")),
            ("RIM_LOGIC__GRPC_BIND", "127.0.0.1:0".into()),
            ("RIM_API__HTTP_BIND", "127.0.0.1:0".into()),
            ("RIM_LOGIC__AUTH__POLICY", "none".into()),
            ("RIM_ROUTER__REDIS", redis),
            ("RIM_QUEUE__BROKERS", kafka),
            ("RIM_DISCOVERY__BACKEND", "static".into()),
        ],
    );
    let grpc = logic.addr_after("logic grpc serving");
    let http = logic.addr_after("http api serving");

    let comet_id = format!("proc-comet-{run}");
    let mut comet = start_static_comet(&comet_id, grpc);
    let tcp = comet.addr_after("accepting clients listener=\"tcp\"");
    let comet_metrics = comet.addr_after("metrics serving");

    let key = format!("proc-key-{run}");
    let mut client = Client::connect_tcp(tcp).await.unwrap();
    let token = AuthToken {
        mid: 4242,
        key: key.clone(),
        accepts: vec![1000],
        ..AuthToken::default()
    };
    client
        .auth(&token)
        .await
        .expect("logic accepts the goim token");

    // reqwest is built without a default TLS provider (rim uses ring).
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let http_client = reqwest::Client::new();
    let url = format!("http://{http}/goim/push/keys?operation=1000&keys={key}");
    let answer = post_ok(&http_client, &url, "hello").await;
    assert_eq!(answer["data"]["connections"], 1, "{answer}");
    assert_eq!(answer["data"]["comets"], 1, "{answer}");

    let ready = http_client
        .get(format!("http://{http}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);

    // The comet serves its metrics on metrics.bind, logic on the API listener.
    let metrics = scrape(&http_client, comet_metrics).await;
    assert_eq!(
        metrics.get("rim_build_info", &[("role", "comet")]),
        Some(1.0)
    );
    assert_eq!(
        metrics.get("rim_comet_connections", &[("transport", "tcp")]),
        Some(1.0)
    );
    assert_eq!(
        metrics.get("rim_comet_auth_total", &[("result", "ok")]),
        Some(1.0)
    );
    let metrics = scrape(&http_client, http).await;
    assert_eq!(
        metrics.get("rim_build_info", &[("role", "logic")]),
        Some(1.0)
    );
    assert_eq!(
        metrics.get("rim_logic_connects_total", &[("result", "ok")]),
        Some(1.0)
    );
    assert_eq!(
        metrics.get("rim_api_pushes_total", &[("kind", "keys")]),
        Some(1.0)
    );
    assert_eq!(
        metrics.get("rim_api_push_messages_total", &[("kind", "keys")]),
        Some(1.0)
    );

    drop(client);
    comet.stop();
    logic.stop();
}
