//! The comet's metrics move with what its clients and push RPCs do.

mod support;

use std::sync::Arc;
use std::time::Duration;

use rim_comet::TransportKind;
use rim_metrics::Registry;
use support::*;

/// Returns the value of the sample written exactly as `series` (name and
/// labels), if the exposition has it.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
    })
}

struct Scrape(Arc<Registry>);

impl Scrape {
    fn get(&self, series: &str) -> f64 {
        let text = rim_metrics::encode(&self.0);
        sample(&text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
    }

    /// Waits until `series` has `value` (counters move after the socket
    /// write returns, which may be after the client read the bytes).
    async fn wait_for(&self, series: &str, value: f64) {
        let registry = Arc::clone(&self.0);
        let series_owned = series.to_owned();
        let reached = tokio::time::timeout(Duration::from_secs(5), async move {
            loop {
                let text = rim_metrics::encode(&registry);
                if sample(&text, &series_owned) == Some(value) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            reached.is_ok(),
            "{series} never reached {value}; now {}",
            self.get(series)
        );
    }
}

#[tokio::test]
async fn connections_auths_frames_and_push_rpcs_are_counted() {
    let comet = start(test_config(), ScriptedLogic::default()).await;
    let mut registry = Registry::default();
    comet.comet.register_metrics(&mut registry);
    let scrape = Scrape(Arc::new(registry));
    scrape
        .wait_for("rim_comet_connections{transport=\"tcp\"}", 0.0)
        .await;

    let mut a = comet
        .client(TransportKind::Tcp, token(1, "a", "live://m", &[1000]))
        .await;
    let mut b = comet
        .client(TransportKind::Ws, token(2, "b", "live://m", &[1000]))
        .await;
    let mut refused = comet.raw(TransportKind::Ws).await;
    assert!(refused.auth(&token(-1, "r", "", &[])).await.is_err());

    assert_eq!(comet.push_keys(&["a"], 1000, "hello").await.delivered, 1);
    assert_eq!(
        comet.push_room("live://m", 1000, "to-room").await.delivered,
        2
    );
    assert_eq!(&next(&mut a).await.body[..], b"hello");
    assert_eq!(&next(&mut a).await.body[..], b"to-room");
    assert_eq!(&next(&mut b).await.body[..], b"to-room");
    assert_eq!(a.heartbeat().await.unwrap(), 2);

    assert_eq!(scrape.get("rim_comet_connections{transport=\"tcp\"}"), 1.0);
    assert_eq!(scrape.get("rim_comet_connections{transport=\"ws\"}"), 1.0);
    assert_eq!(scrape.get("rim_comet_connections{transport=\"wss\"}"), 0.0);
    assert_eq!(scrape.get("rim_comet_auth_total{result=\"ok\"}"), 2.0);
    assert_eq!(scrape.get("rim_comet_auth_total{result=\"refused\"}"), 1.0);
    assert_eq!(scrape.get("rim_comet_auth_total{result=\"failed\"}"), 0.0);
    assert_eq!(scrape.get("rim_comet_rooms"), 1.0);
    // a: Auth and a heartbeat in; the auth reply, two pushes and the
    // heartbeat reply out (16 + 21 + 23 + 20 bytes).
    assert_eq!(
        scrape.get("rim_comet_frames_in_total{transport=\"tcp\"}"),
        2.0
    );
    scrape
        .wait_for("rim_comet_frames_out_total{transport=\"tcp\"}", 4.0)
        .await;
    assert_eq!(
        scrape.get("rim_comet_bytes_out_total{transport=\"tcp\"}"),
        80.0
    );
    assert!(scrape.get("rim_comet_bytes_in_total{transport=\"tcp\"}") > 32.0);
    // b and the refused client each sent an Auth; b got its reply and the
    // room push, wrapped in an op-9 frame as every WebSocket push is
    // (16 + 16 + 23 bytes).
    assert_eq!(
        scrape.get("rim_comet_frames_in_total{transport=\"ws\"}"),
        2.0
    );
    scrape
        .wait_for("rim_comet_frames_out_total{transport=\"ws\"}", 2.0)
        .await;
    assert_eq!(
        scrape.get("rim_comet_bytes_out_total{transport=\"ws\"}"),
        55.0
    );
    assert_eq!(scrape.get("rim_comet_push_rpc_total{rpc=\"push\"}"), 1.0);
    assert_eq!(scrape.get("rim_comet_push_rpc_total{rpc=\"room\"}"), 1.0);
    assert_eq!(
        scrape.get("rim_comet_push_rpc_total{rpc=\"broadcast\"}"),
        0.0
    );
    assert_eq!(
        scrape.get("rim_comet_push_rpc_duration_seconds_count{rpc=\"room\"}"),
        1.0
    );
    assert_eq!(
        scrape.get("rim_comet_push_recipients_total{result=\"delivered\"}"),
        3.0
    );
    assert_eq!(scrape.get("rim_comet_dropped_frames_total"), 0.0);

    // A missing key is counted as such; a closed client leaves the gauge.
    comet.push_keys(&["nobody"], 1000, "x").await;
    assert_eq!(
        scrape.get("rim_comet_push_recipients_total{result=\"missing\"}"),
        1.0
    );
    drop(a);
    scrape
        .wait_for("rim_comet_connections{transport=\"tcp\"}", 0.0)
        .await;
    drop((b, refused));
    comet.stop().await;
}
