//! File descriptors (issue #16, 7): with `comet.max_connections` at its
//! default of 1,000,000 and an open-file limit far below it, the comet used
//! to accept until the process ran out of descriptors — accept errors every
//! 50 ms and an HTTP API that no longer answered `/healthz`. The role now
//! lowers the cap at startup (saying so), keeping descriptors for the rest.

mod support;

use std::time::Duration;

use rim_client::{AuthToken, Client};
use support::{Proc, shipped_config, standalone_env};

/// The open-file limit the process gets; it keeps a quarter (64) in reserve.
const NOFILE: u64 = 256;
/// More clients than the limit.
const CLIENTS: usize = 400;

#[tokio::test(flavor = "multi_thread")]
async fn clients_cannot_take_the_descriptors_the_api_needs() {
    let config = shipped_config("standalone");
    let mut rim = Proc::start_with_nofile(
        NOFILE,
        &["standalone", "--config", &config],
        &standalone_env(
            "fd-test",
            &[("RIM_COMET__MAX_CONNECTIONS_PER_IP", "100000")],
        ),
    );
    let api = rim.addr_after("http api serving");
    let tcp = rim.addr_after("accepting clients listener=\"tcp\"");
    // Logged before anything serves.
    assert!(
        rim.log()
            .contains("comet.max_connections is more than the open-file limit allows"),
        "{}",
        rim.log()
    );

    let mut held = Vec::new();
    for i in 0..CLIENTS {
        let Ok(mut client) = Client::connect_tcp(tcp).await else {
            continue;
        };
        let token = AuthToken {
            mid: i as i64 + 1,
            key: format!("fd-{i}"),
            room_id: String::new(),
            platform: "test".into(),
            accepts: vec![1000],
        };
        // Over the cap the comet closes the connection: auth fails.
        if tokio::time::timeout(Duration::from_secs(5), client.auth(&token))
            .await
            .is_ok_and(|r| r.is_ok())
        {
            held.push(client);
        }
    }
    assert!(
        !held.is_empty() && held.len() < CLIENTS,
        "{} of {CLIENTS} clients held with {NOFILE} open files",
        held.len()
    );
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let health = reqwest::Client::new()
        .get(format!("http://{api}/healthz"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "/healthz did not answer with {} clients held: {e}; log:\n{}",
                held.len(),
                rim.log()
            )
        });
    assert_eq!(health.status(), 200);
    rim.stop();
}
