//! Prometheus metrics end to end: `rim standalone` serves /metrics on its
//! API listener, the exposition is valid text format, and its counters move
//! by exactly what a client and a few pushes do; the Grafana dashboard
//! shipped in deploy/grafana only queries metrics rim exposes.
//! (`rim comet` and `rim job` are scraped in tests/processes.rs and
//! tests/cluster.rs.)

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use rim_client::{AuthToken, Client};
use support::exposition::{Exposition, scrape};
use support::{Proc, next_push, post_ok};

fn start_standalone() -> (Proc, SocketAddr, SocketAddr, SocketAddr) {
    let mut rim = support::start_standalone("metrics-test", &[]);
    let tcp = rim.addr_after("accepting clients listener=\"tcp\"");
    let ws = rim.addr_after("accepting clients listener=\"ws\"");
    let api = rim.addr_after("http api serving");
    (rim, tcp, ws, api)
}

fn http() -> reqwest::Client {
    // reqwest is built without a default TLS provider (rim uses ring).
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// Scrapes until `check` holds (counters move once the socket write or the
/// comets' answer completes, which may be just after a client saw the
/// frame), failing after 10 s with the last exposition.
async fn scrape_until(
    http: &reqwest::Client,
    addr: SocketAddr,
    what: &str,
    check: impl Fn(&Exposition) -> bool,
) -> Exposition {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = scrape(http, addr).await;
        if check(&metrics) {
            return metrics;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} never held; last scrape: {:?}",
            metrics.samples
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn token(mid: i64, key: &str) -> AuthToken {
    AuthToken {
        mid,
        key: key.into(),
        room_id: "live://metrics".into(),
        platform: "test".into(),
        accepts: vec![1000],
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn standalone_metrics_count_connections_auths_frames_pushes_and_latency() {
    let (rim, tcp, ws, api) = start_standalone();
    let http = http();

    let mut a = Client::connect_tcp(tcp).await.unwrap();
    a.auth(&token(1, "a")).await.unwrap();
    let mut b = Client::connect_ws(&format!("ws://{ws}/sub")).await.unwrap();
    b.auth(&token(2, "b")).await.unwrap();

    // Before any push: two connections, two auths, one reply frame each.
    let before = scrape_until(&http, api, "the auth replies to be counted", |m| {
        m.get("rim_comet_frames_out_total", &[("transport", "tcp")]) == Some(1.0)
            && m.get("rim_comet_frames_out_total", &[("transport", "ws")]) == Some(1.0)
    })
    .await;
    assert_eq!(
        before.get("rim_build_info", &[("role", "standalone")]),
        Some(1.0)
    );
    assert_eq!(
        before.get("rim_comet_connections", &[("transport", "tcp")]),
        Some(1.0)
    );
    assert_eq!(
        before.get("rim_comet_connections", &[("transport", "ws")]),
        Some(1.0)
    );
    assert_eq!(
        before.get("rim_comet_auth_total", &[("result", "ok")]),
        Some(2.0)
    );
    assert_eq!(before.get("rim_comet_rooms", &[]), Some(1.0));
    assert_eq!(before.sum("rim_api_pushes_total"), 0.0);
    assert_eq!(before.sum("rim_job_push_latency_seconds_count"), 0.0);
    assert!(
        before
            .get("rim_job_consumer_lag", &[("partition", "memory")])
            .is_some()
    );
    assert!(
        before
            .get("rim_process_resident_memory_bytes", &[])
            .unwrap()
            > 0.0
    );

    // a gets four pushes (by key, by user, room, everyone), b two.
    let base = format!("http://{api}/goim/push");
    post_ok(&http, &format!("{base}/keys?operation=1000&keys=a"), "k").await;
    post_ok(&http, &format!("{base}/mids?operation=1000&mids=1"), "m").await;
    post_ok(
        &http,
        &format!("{base}/room?operation=1000&type=live&room=metrics"),
        "r",
    )
    .await;
    post_ok(&http, &format!("{base}/all?operation=1000"), "all").await;
    // Room messages wait up to job.room_flush for a batch: "r" and "all"
    // may arrive in either order.
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(next_push(&mut a).await);
    }
    assert_eq!(got[..2], ["k", "m"]);
    got.sort();
    assert_eq!(got, ["all", "k", "m", "r"]);
    let mut got = vec![next_push(&mut b).await, next_push(&mut b).await];
    got.sort();
    assert_eq!(got, ["all", "r"]);

    let after = scrape_until(&http, api, "the pushes to be counted", |m| {
        m.get("rim_comet_frames_out_total", &[("transport", "tcp")]) == Some(5.0)
            && m.get("rim_comet_frames_out_total", &[("transport", "ws")]) == Some(3.0)
            && m.sum("rim_job_push_latency_seconds_count") == 4.0
    })
    .await;
    for kind in ["keys", "mids", "room", "all"] {
        assert_eq!(
            after.get("rim_api_pushes_total", &[("kind", kind)]),
            Some(1.0),
            "{kind}"
        );
    }
    assert_eq!(
        after.get(
            "rim_api_requests_total",
            &[("endpoint", "/goim/push/keys"), ("status", "200")]
        ),
        Some(1.0)
    );
    assert_eq!(
        after.get(
            "rim_api_request_duration_seconds_count",
            &[("endpoint", "/goim/push/room")]
        ),
        Some(1.0)
    );
    // keys and mids are PUSH messages, one per comet; room and all one each.
    for (kind, count) in [("push", 2.0), ("room", 1.0), ("broadcast", 1.0)] {
        assert_eq!(
            after.get("rim_job_push_latency_seconds_count", &[("kind", kind)]),
            Some(count),
            "{kind}"
        );
        assert_eq!(
            after.get(
                "rim_job_messages_total",
                &[("kind", kind), ("result", "delivered")]
            ),
            Some(count),
            "{kind}"
        );
    }
    // The histogram is cumulative: its +Inf bucket holds every observation,
    // and the latency of a local push is well under the top bucket.
    let inf = after
        .get(
            "rim_job_push_latency_seconds_bucket",
            &[("kind", "push"), ("le", "+Inf")],
        )
        .unwrap();
    assert_eq!(inf, 2.0);
    assert!(after.sum("rim_job_push_latency_seconds_sum") > 0.0);
    assert_eq!(
        after.get("rim_comet_push_rpc_total", &[("rpc", "push")]),
        Some(2.0)
    );
    assert_eq!(
        after.get("rim_comet_push_rpc_total", &[("rpc", "room")]),
        Some(1.0)
    );
    assert_eq!(
        after.get("rim_comet_push_rpc_total", &[("rpc", "broadcast")]),
        Some(1.0)
    );
    assert_eq!(
        after.get(
            "rim_comet_push_recipients_total",
            &[("result", "delivered")]
        ),
        Some(6.0)
    );
    assert_eq!(
        after.get("rim_logic_connects_total", &[("result", "ok")]),
        Some(2.0)
    );
    // Each push body is 16 bytes of header plus the body.
    let bytes_out = |m: &Exposition| {
        m.get("rim_comet_bytes_out_total", &[("transport", "tcp")])
            .unwrap()
    };
    assert_eq!(
        bytes_out(&after) - bytes_out(&before),
        (16 + 1 + 16 + 1 + 16 + 1 + 16 + 3) as f64
    );
    assert_eq!(after.get("rim_job_in_flight", &[]), Some(0.0));
    assert_eq!(after.sum("rim_comet_dropped_frames_total"), 0.0);

    // A client that leaves is no longer counted.
    drop(a);
    scrape_until(&http, api, "the TCP gauge to drop", |m| {
        m.get("rim_comet_connections", &[("transport", "tcp")]) == Some(0.0)
    })
    .await;
    drop(b);
    rim.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn standalone_serves_the_same_metrics_on_metrics_bind_when_set() {
    // `Proc::start` sets RIM_METRICS__BIND=127.0.0.1:0, which standalone
    // applies: a listener of its own next to /metrics on the API listener.
    let (mut rim, _, _, api) = start_standalone();
    let own = rim.addr_after("metrics serving");
    assert_ne!(own, api);
    let http = http();
    // Every role's metrics, the API's included; scraping the API listener
    // first, as it counts its own requests.
    let on_api = scrape(&http, api).await.names();
    let on_own = scrape(&http, own).await.names();
    for name in [
        "rim_comet_connections",
        "rim_api_pushes_total",
        "rim_job_in_flight",
    ] {
        assert!(on_own.contains(name), "{name} missing in {on_own:?}");
    }
    let missing: Vec<_> = on_api.difference(&on_own).collect();
    assert!(missing.is_empty(), "not on metrics.bind: {missing:?}");
    rim.stop();
}

/// The metric names a PromQL expression uses (identifiers starting `rim_`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.starts_with("rim_"))
        .map(str::to_owned)
        .collect()
}

fn dashboard() -> serde_json::Value {
    let path = format!(
        "{}/deploy/grafana/rim-dashboard.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} is not JSON: {e}"))
}

#[test]
fn the_dashboard_is_a_grafana_dashboard_with_the_promised_panels() {
    let dash = dashboard();
    assert!(dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    assert!(dash["title"].is_string() && dash["uid"].is_string());
    let variables = dash["templating"]["list"].as_array().unwrap();
    assert!(
        variables.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "no datasource variable: {variables:?}"
    );
    let panels = dash["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap();
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "duplicate id: {title}"
        );
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        for key in ["h", "w", "x", "y"] {
            assert!(panel["gridPos"][key].is_u64(), "{title}: gridPos.{key}");
        }
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title} has no targets");
        for target in targets {
            assert!(target["refId"].is_string(), "{title}");
            let expr = target["expr"].as_str().unwrap();
            assert!(!metric_names(expr).is_empty(), "{title}: {expr}");
        }
    }
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for wanted in [
        "Connections by transport",
        "Auth rate by result",
        "Rooms per comet",
        "Frames in/out per second",
        "Bytes in/out per second",
        "Push rate by kind",
        "API latency p50 / p99",
        "Job push latency p50 / p99",
        "Consumer lag",
        "Comet RPC errors by comet",
        "Dropped frames and slow-consumer closes",
    ] {
        assert!(
            titles.contains(&wanted),
            "no panel {wanted:?} in {titles:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metric_the_dashboard_queries_is_exposed() {
    // Standalone registers every role's metrics (comet, logic, api, job).
    let (rim, _, _, api) = start_standalone();
    let exposed = scrape(&http(), api).await.names();
    let dash = dashboard();
    let mut missing = BTreeSet::new();
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            missing.extend(
                metric_names(expr)
                    .into_iter()
                    .filter(|name| !exposed.contains(name)),
            );
        }
    }
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics rim does not expose: {missing:?}"
    );
    rim.stop();
}

#[test]
fn the_exposition_parser_refuses_what_prometheus_would() {
    let text = "# HELP a x\n# TYPE a counter\na_total{k=\"v\\\"q\"} 3\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 0.5\nh_count 1\n# EOF\n";
    let parsed = Exposition::parse(text).unwrap();
    assert_eq!(parsed.get("a_total", &[("k", "v\"q")]), Some(3.0));
    assert_eq!(parsed.get("h_count", &[]), Some(1.0));
    for bad in [
        "a_total 1\n",                        // no family declared
        "# TYPE a counter\na_total{k=v} 1\n", // unquoted label value
        "# TYPE a counter\na_total x\n",      // not a number
        "# TYPE a bogus\n",
        "# EOF\n# TYPE a counter\n",
    ] {
        assert!(Exposition::parse(bad).is_err(), "{bad:?} parsed");
    }
}
