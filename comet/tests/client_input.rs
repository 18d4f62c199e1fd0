//! What a client asks for — a room id, accepted ops — is checked the same
//! way whether it comes with Auth or later with ChangeRoom (op 12) or Sub
//! (op 14): the same limits, the same close reason in the log.

mod support;

use std::time::Duration;

use rim_comet::TransportKind;
use rim_proto::{Frame, Op};
use rim_testkit::Logs;
use support::*;

/// Returns the comet's `/metrics` text.
fn metrics(comet: &TestComet) -> String {
    let mut registry = rim_metrics::Registry::default();
    comet.comet.register_metrics(&mut registry);
    rim_metrics::encode(&registry)
}

/// Asserts the connection is closed without an Auth reply.
async fn assert_auth_refused(comet: &TestComet, room: &str, accepts: &[i32], key: &str) {
    let mut client = comet.raw(TransportKind::Tcp).await;
    let refused = within(
        Duration::from_secs(5),
        client.auth(&token(1, key, room, accepts)),
    )
    .await;
    assert!(refused.is_err(), "auth of {key} was accepted");
    // Logic had recorded the connection: the comet takes it back.
    eventually(Duration::from_secs(5), || {
        comet.logic.disconnects_of(key) == 1
    })
    .await;
}

#[tokio::test]
async fn auth_refuses_the_rooms_change_room_refuses() {
    let (logs, _guard) = Logs::capture(tracing::Level::DEBUG);
    let comet = start(test_config(), ScriptedLogic::default()).await;
    let long_room = "a".repeat(3907);
    let control_room = "live://1\u{1b}[2J\nx";

    assert_auth_refused(&comet, &long_room, &[], "long-room").await;
    assert_auth_refused(&comet, control_room, &[], "control-room").await;
    assert!(
        metrics(&comet).contains("rim_comet_auth_total{result=\"refused\"} 2"),
        "{}",
        metrics(&comet)
    );

    // The same rooms through op 12 close the connection with the same reason.
    for room in [long_room.as_str(), control_room] {
        let mut client = comet
            .client(TransportKind::Tcp, token(2, "mover", "", &[]))
            .await;
        client
            .send(Frame::new(Op::CHANGE_ROOM, 9, room.as_bytes().to_vec()))
            .await
            .unwrap();
        client
            .closed_within(Duration::from_secs(5))
            .await
            .expect("op 12 with a bad room closes the connection");
    }

    let text = logs.text();
    for reason in [
        "room id of 3907 bytes exceeds 256",
        "room id contains control characters",
    ] {
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(reason)).collect();
        assert!(
            lines.iter().any(|l| l.contains("auth refused")),
            "no auth refusal saying {reason:?} in:\n{text}"
        );
        assert!(
            lines.iter().any(|l| l.contains("protocol violation")),
            "no op-12 close saying {reason:?} in:\n{text}"
        );
    }
    comet.stop().await;
}

#[tokio::test]
async fn auth_refuses_the_accepted_ops_sub_refuses() {
    let (logs, _guard) = Logs::capture(tracing::Level::DEBUG);
    let comet = start(test_config(), ScriptedLogic::default()).await;

    // 600 accepted ops at auth: refused, not silently cut to 256.
    let six_hundred: Vec<i32> = (1000..1600).collect();
    assert_auth_refused(&comet, "", &six_hundred, "many-ops").await;

    // The same count reached through op 14 closes the connection.
    let mut client = comet
        .client(
            TransportKind::Tcp,
            token(3, "subber", "", &six_hundred[..200]),
        )
        .await;
    client.sub(&six_hundred[200..250]).await.unwrap();
    client
        .send(Frame::new(
            Op::SUB,
            7,
            six_hundred[250..]
                .iter()
                .map(i32::to_string)
                .collect::<Vec<_>>()
                .join(","),
        ))
        .await
        .unwrap();
    client
        .closed_within(Duration::from_secs(5))
        .await
        .expect("op 14 past the limit closes the connection");

    let text = logs.text();
    assert!(
        text.lines().any(|l| l.contains("auth refused")
            && l.contains("600 accepted ops exceed the limit of 256")),
        "no auth refusal naming the limit in:\n{text}"
    );
    assert!(
        text.lines().any(|l| l.contains("protocol violation")
            && l.contains("600 accepted ops exceed the limit of 256")),
        "no op-14 close naming the limit in:\n{text}"
    );
    comet.stop().await;
}

/// While logic is down every connecting client fails auth: the log gets one
/// line per 10 s for all of them, the counter counts each (issue #16, 8).
#[tokio::test]
async fn auth_failures_while_logic_is_down_write_one_line() {
    let (logs, _guard) = Logs::capture(tracing::Level::INFO);
    let logic = ScriptedLogic::default();
    logic.down.store(true, std::sync::atomic::Ordering::Release);
    let comet = start(test_config(), logic).await;
    for i in 0..50 {
        let mut client = comet.raw(TransportKind::Tcp).await;
        let failed = within(
            Duration::from_secs(5),
            client.auth(&token(i, &format!("down-{i}"), "", &[1000])),
        )
        .await;
        assert!(failed.is_err(), "auth succeeded with logic down");
    }
    let text = logs.text();
    let lines = text.lines().filter(|l| l.contains("auth failed")).count();
    assert_eq!(lines, 1, "{text}");
    assert!(
        metrics(&comet).contains("rim_comet_auth_total{result=\"failed\"} 50"),
        "{}",
        metrics(&comet)
    );
    comet.stop().await;
}
