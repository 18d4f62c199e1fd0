//! The sharded message store through a real `rim` process, SIGKILLed in
//! the window between a message's commit on its primary and the append of
//! its members' inbox entries on the other primary (deploy/test.sh starts
//! both: RIM_TEST_POSTGRES and RIM_TEST_POSTGRES_2).
//!
//! The second primary is made to take no writes (a session holds a lock on
//! its inbox tables), so every send to a conversation of the first primary
//! whose members' inboxes are on the second commits, is acknowledged, and
//! leaves its entries in the outbox. The process is killed with SIGKILL,
//! the lock released, a new process started on the same primaries: its
//! relay appends every entry — each exactly once, every inbox dense.

mod support;

use std::time::{Duration, Instant};

use rim_im::{ConvId, ShardMap};
use serde_json::{Value, json};
use support::{Proc, get_json, start_standalone};

/// Pairs (1, m) whose conversation is on primary 0 and whose two users'
/// inboxes are on primary 1.
fn crossing_pairs(n: i64) -> Vec<(ConvId, i64)> {
    let map = ShardMap::even(2).unwrap();
    assert_eq!(map.mid_shard(1), 1, "user 1's inbox is on primary 1");
    (2..=n)
        .filter_map(|m| {
            let conv = ConvId::peer(1, m).unwrap();
            (map.conv_shard(&conv) == 0 && map.mid_shard(m) == 1).then_some((conv, m))
        })
        .collect()
}

async fn send(http: &reqwest::Client, api: std::net::SocketAddr, to: i64, cmid: &str) -> Value {
    let answer: Value = http
        .post(format!("http://{api}/im/v1/messages"))
        .json(&json!({ "from": 1, "to": to, "cmid": cmid, "body": cmid }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["code"], 0, "{answer}");
    answer["data"].clone()
}

fn start(id: &str, stores: &str) -> (Proc, std::net::SocketAddr) {
    let mut rim = start_standalone(
        id,
        &[("RIM_IM__STORE", "postgres"), ("RIM_IM__POSTGRES", stores)],
    );
    let api = rim.addr_after("http api serving");
    (rim, api)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs two PostgreSQL primaries: run deploy/test.sh"]
async fn a_kill_between_the_commit_and_the_other_primary_loses_no_inbox_entry() {
    let run = format!("shk{}", std::process::id());
    let first = support::postgres_schema(&format!("rim_{run}_a")).await;
    let second = support::postgres_schema_on("RIM_TEST_POSTGRES_2", &format!("rim_{run}_b")).await;
    let stores = format!("{first},{second}");
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let (rim, api) = start(&format!("{run}-1"), &stores);

    // The second primary takes no writes to inboxes from here on.
    let (blocker, connection) = tokio_postgres::connect(&second, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    blocker
        .batch_execute("BEGIN; LOCK TABLE users, inbox, inbox_remote IN EXCLUSIVE MODE")
        .await
        .unwrap();
    let pairs = crossing_pairs(40);
    assert!(pairs.len() >= 3, "{} crossing pairs", pairs.len());
    let mut acked = Vec::new();
    for (conv, m) in &pairs {
        let sent = send(&http, api, *m, &format!("c{m}")).await;
        assert_eq!(sent["conv"], conv.to_string());
        acked.push((conv.to_string(), *m, sent["seq"].as_u64().unwrap()));
    }
    let (outbox, connection) = tokio_postgres::connect(&first, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let owed = || async {
        outbox
            .query_one("SELECT count(*) FROM inbox_outbox", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    assert_eq!(
        owed().await,
        acked.len() as i64,
        "every message's appends are owed"
    );
    rim.crash();
    blocker.batch_execute("ROLLBACK").await.unwrap();

    // Another process on the same primaries relays what was owed.
    let (rim, api) = start(&format!("{run}-2"), &stores);
    let started = Instant::now();
    while owed().await > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the relay did not append the owed entries"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "the relay appended every owed entry within {:?}",
        started.elapsed()
    );
    for (conv, m, seq) in &acked {
        let page = get_json(&http, &format!("http://{api}/im/v1/users/{m}/sync")).await;
        let msgs = page["data"]["msgs"].as_array().unwrap();
        let got: Vec<(String, u64, u64)> = msgs
            .iter()
            .map(|x| {
                (
                    x["conv"].as_str().unwrap().to_owned(),
                    x["seq"].as_u64().unwrap(),
                    x["sync"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(got, [(conv.clone(), *seq, 1)], "{m}'s inbox");
    }
    let page = get_json(&http, &format!("http://{api}/im/v1/users/1/sync?limit=200")).await;
    let msgs = page["data"]["msgs"].as_array().unwrap();
    let syncs: Vec<u64> = msgs.iter().map(|x| x["sync"].as_u64().unwrap()).collect();
    assert_eq!(
        syncs,
        (1..=acked.len() as u64).collect::<Vec<_>>(),
        "1's inbox is dense"
    );
    let mut convs: Vec<&str> = msgs.iter().map(|x| x["conv"].as_str().unwrap()).collect();
    convs.sort_unstable();
    let mut want: Vec<&str> = acked.iter().map(|(c, _, _)| c.as_str()).collect();
    want.sort_unstable();
    assert_eq!(convs, want, "each of 1's entries once");
    rim.stop();
}
