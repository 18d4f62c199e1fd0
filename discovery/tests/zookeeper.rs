//! ZooKeeper discovery against real servers: the shared one from
//! `RIM_TEST_ZK` (deploy/test.sh) and, for restarts, private ones started
//! here.

mod support;

use std::time::Duration;

use rim_discovery::{Discovery, Error, Kind, ZkDiscovery, in_region};
use rim_testkit::ZkServer;
use support::proxy::Proxy;
use support::{
    SESSION_TIMEOUT, WAIT, comet, discovery, holds, ids, logic, owner, raw_client, remove_tree,
    shared_zk, unique_root, wait_until, wait_view,
};
use tokio::task::block_in_place;
use zookeeper_client as zk;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs ZooKeeper: run deploy/test.sh"]
async fn watchers_see_registrations_updates_and_removals() {
    let addr = shared_zk();
    let root = unique_root();
    let this = discovery(&addr, &root, SESSION_TIMEOUT).await;
    // Another "process" that only watches.
    let other = discovery(&addr, &root, SESSION_TIMEOUT).await;
    let mut comets = other.watch(Kind::Comet).await.unwrap();
    let mut logics = other.watch(Kind::Logic).await.unwrap();
    let mut own_comets = this.watch(Kind::Comet).await.unwrap();
    assert!(comets.borrow().is_empty(), "a fresh root has no comets");

    let a = comet("comet-a", "sh");
    let b = comet("comet-b", "bj");
    let l = logic("logic-1");
    let reg_b = this.register(Kind::Comet, b.clone()).await.unwrap();
    let reg_a = this.register(Kind::Comet, a.clone()).await.unwrap();
    let reg_l = this.register(Kind::Logic, l.clone()).await.unwrap();

    let seen = wait_view(&mut comets, "both comets", |n| holds(n, &a) && holds(n, &b)).await;
    assert_eq!(ids(&seen), ["comet-a", "comet-b"], "sorted by id");
    assert_eq!(ids(&in_region(&seen, "sh")), ["comet-a"]);
    wait_view(&mut own_comets, "both comets, locally", |n| n.len() == 2).await;
    let seen = wait_view(&mut logics, "the logic", |n| holds(n, &l)).await;
    assert_eq!(ids(&seen), ["logic-1"]);

    let loaded = rim_discovery::NodeInfo {
        conn_count: 42,
        ip_count: 7,
        weight: 5,
        ..a.clone()
    };
    reg_a.update(loaded.clone()).await.unwrap();
    wait_view(&mut comets, "the update of comet-a", |n| holds(n, &loaded)).await;
    let err = reg_a
        .update(comet("comet-z", "sh"))
        .await
        .expect_err("an update may not change the id");
    assert!(matches!(err, Error::Invalid(_)), "{err}");

    reg_b.deregister().await.unwrap();
    wait_view(&mut comets, "comet-b deregistered", |n| {
        ids(n) == ["comet-a"]
    })
    .await;

    drop(reg_a);
    wait_view(&mut comets, "comet-a dropped", |n| n.is_empty()).await;
    wait_view(&mut own_comets, "comet-a dropped, locally", |n| {
        n.is_empty()
    })
    .await;

    // Closing the discovery (its session) removes the rest for the others.
    let _kept = reg_l;
    drop(this);
    wait_view(&mut logics, "the logic gone with its session", |n| {
        n.is_empty()
    })
    .await;
    let closed = tokio::time::timeout(WAIT, own_comets.changed()).await;
    assert!(
        matches!(closed, Ok(Err(_))),
        "a dropped discovery closes its views"
    );

    remove_tree(&raw_client(&addr).await, &root).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs ZooKeeper: run deploy/test.sh"]
async fn registrations_are_checked_and_existing_nodes_replaced() {
    let addr = shared_zk();
    let root = unique_root();
    let this = discovery(&addr, &root, SESSION_TIMEOUT).await;
    let raw = raw_client(&addr).await;

    for bad in ["", "a/b", ".."] {
        let err = this
            .register(Kind::Comet, comet(bad, "sh"))
            .await
            .expect_err("a bad id is refused");
        assert!(matches!(err, Error::Invalid(_)), "{bad:?}: {err}");
    }
    let _a = this.register(Kind::Comet, comet("a", "sh")).await.unwrap();
    let err = this
        .register(Kind::Comet, comet("a", "sh"))
        .await
        .expect_err("one registration per id");
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    // The same id as another kind is another node.
    let _a_logic = this.register(Kind::Logic, logic("a")).await.unwrap();

    // A node left by someone else (say our previous session, not yet
    // expired) is replaced, not an error.
    let path = format!("{root}/comets/b");
    raw.create(
        &path,
        b"{\"id\":\"b\",\"region\":\"stale\"}",
        &zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all()),
    )
    .await
    .unwrap();
    let b = comet("b", "sh");
    let _b = this.register(Kind::Comet, b.clone()).await.unwrap();
    assert_eq!(owner(&raw, &path).await, this.session_id());
    let mut comets = this.watch(Kind::Comet).await.unwrap();
    wait_view(&mut comets, "the replaced node", |n| holds(n, &b)).await;

    // Deleted behind its back: the periodic refresh puts it back.
    raw.delete(&path, None).await.unwrap();
    wait_view(&mut comets, "comet b deleted", |n| !holds(n, &b)).await;
    wait_view(&mut comets, "comet b restored", |n| holds(n, &b)).await;

    drop(this);
    remove_tree(&raw, &root).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs ZooKeeper: run deploy/test.sh"]
async fn bad_node_data_is_skipped() {
    let addr = shared_zk();
    let root = unique_root();
    let this = discovery(&addr, &root, SESSION_TIMEOUT).await;
    let raw = raw_client(&addr).await;
    let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    raw.create(&format!("{root}/comets/bad"), b"{not json", &persistent)
        .await
        .unwrap();
    raw.create(
        &format!("{root}/comets/liar"),
        b"{\"id\":\"someone-else\"}",
        &persistent,
    )
    .await
    .unwrap();
    let good = comet("good", "sh");
    let _good = this.register(Kind::Comet, good.clone()).await.unwrap();

    let mut comets = this.watch(Kind::Comet).await.unwrap();
    let seen = wait_view(&mut comets, "the good comet", |n| holds(n, &good)).await;
    assert_eq!(
        ids(&seen),
        ["good"],
        "bad JSON and a mismatched id are skipped"
    );

    // Fixed data is picked up: the skipped node stays watched.
    raw.set_data(
        &format!("{root}/comets/bad"),
        b"{\"id\":\"bad\",\"region\":\"sh\"}",
        None,
    )
    .await
    .unwrap();
    wait_view(&mut comets, "the fixed node", |n| ids(n) == ["bad", "good"]).await;

    drop(this);
    remove_tree(&raw, &root).await;
}

/// Session expiry is real: the discovery reaches ZooKeeper through a proxy
/// that the test cuts for longer than the session timeout, so the server
/// expires the session (and deletes its nodes, which another client sees)
/// while the discovery's client gives it up too; the discovery must open a
/// new session, restore the registration and keep its views going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs ZooKeeper: run deploy/test.sh"]
async fn an_expired_session_is_replaced_and_registrations_restored() {
    let addr = shared_zk();
    let root = unique_root();
    let proxy = Proxy::start(&addr).await;
    let session_timeout = Duration::from_secs(2);
    let this = discovery(&proxy.addr(), &root, session_timeout).await;
    let other = discovery(&addr, &root, SESSION_TIMEOUT).await;
    let raw = raw_client(&addr).await;
    let a = comet("a", "sh");
    let reg_a = this.register(Kind::Comet, a.clone()).await.unwrap();
    let mut own_view = this.watch(Kind::Comet).await.unwrap();
    let mut other_view = other.watch(Kind::Comet).await.unwrap();
    wait_view(&mut other_view, "comet a", |n| holds(n, &a)).await;
    let before = this.session_id().expect("a session");

    proxy.cut();
    // The server expires the session: its node goes.
    wait_view(
        &mut other_view,
        "comet a gone with the expired session",
        |n| n.is_empty(),
    )
    .await;
    // Past 7/5 of the timeout the client has given the session up as well.
    tokio::time::sleep(session_timeout * 2).await;
    proxy.restore();

    wait_until("a new session", WAIT, || {
        this.session_id().is_some_and(|s| s != before)
    })
    .await;
    let after = this.session_id().unwrap();
    wait_view(&mut other_view, "comet a restored", |n| holds(n, &a)).await;
    assert_eq!(owner(&raw, &format!("{root}/comets/a")).await, Some(after));

    // Updates and new registrations go through the new session, and both
    // views (the expired discovery's own too) follow.
    let loaded = rim_discovery::NodeInfo {
        conn_count: 9,
        ..a.clone()
    };
    reg_a.update(loaded.clone()).await.unwrap();
    let b = comet("b", "bj");
    let _b = this.register(Kind::Comet, b.clone()).await.unwrap();
    for view in [&mut own_view, &mut other_view] {
        wait_view(view, "the update and comet b after expiry", |n| {
            holds(n, &loaded) && holds(n, &b)
        })
        .await;
    }

    drop(this);
    wait_view(&mut other_view, "nodes gone with the new session", |n| {
        n.is_empty()
    })
    .await;
    remove_tree(&raw, &root).await;
}

/// Writes that fail while the connection is down (the session living on)
/// are not lost: the update is kept and written, the deregistration retried,
/// once the connection is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs ZooKeeper: run deploy/test.sh"]
async fn writes_during_an_outage_complete_after_it() {
    let addr = shared_zk();
    let root = unique_root();
    let proxy = Proxy::start(&addr).await;
    let this = discovery(&proxy.addr(), &root, Duration::from_secs(30)).await;
    let other = discovery(&addr, &root, SESSION_TIMEOUT).await;
    let a = comet("a", "sh");
    let b = comet("b", "sh");
    let reg_a = this.register(Kind::Comet, a.clone()).await.unwrap();
    let reg_b = this.register(Kind::Comet, b.clone()).await.unwrap();
    let mut other_view = other.watch(Kind::Comet).await.unwrap();
    wait_view(&mut other_view, "comets a and b", |n| {
        holds(n, &a) && holds(n, &b)
    })
    .await;
    let before = this.session_id();

    proxy.cut();
    let loaded = rim_discovery::NodeInfo {
        conn_count: 5,
        ..a.clone()
    };
    let (updated, deregistered) = tokio::join!(reg_a.update(loaded.clone()), reg_b.deregister());
    assert!(matches!(updated, Err(Error::Unavailable(_))), "{updated:?}");
    assert!(
        matches!(deregistered, Err(Error::Unavailable(_))),
        "{deregistered:?}"
    );
    proxy.restore();

    let seen = wait_view(&mut other_view, "the update and b's removal", |n| {
        holds(n, &loaded) && !holds(n, &b)
    })
    .await;
    assert_eq!(ids(&seen), ["a"]);
    assert_eq!(
        this.session_id(),
        before,
        "the session lived through the outage"
    );

    drop(this);
    remove_tree(&raw_client(&addr).await, &root).await;
}

/// Stops a private ZooKeeper for `downtime`, starts it again on the same
/// port and data dir, and checks that registrations come back and views
/// still follow changes. Returns whether `this` kept its session.
async fn restart_and_check(session_timeout: Duration, downtime: Duration) -> bool {
    let server = block_in_place(ZkServer::start_new);
    let addr = server.addr();
    let root = unique_root();
    let this = discovery(&addr, &root, session_timeout).await;
    let other = discovery(&addr, &root, session_timeout).await;
    let a = comet("a", "sh");
    let _a = this.register(Kind::Comet, a.clone()).await.unwrap();
    let mut own_view = this.watch(Kind::Comet).await.unwrap();
    let mut other_view = other.watch(Kind::Comet).await.unwrap();
    wait_view(&mut other_view, "comet a", |n| holds(n, &a)).await;
    let before = this.session_id().expect("a session");

    block_in_place(|| server.stop());
    tokio::time::sleep(downtime).await;
    block_in_place(|| server.start());

    // Connected again: a session whose registrations hold (the old one, or
    // a new one that restored them).
    let raw = raw_client(&addr).await;
    let path = format!("{root}/comets/a");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let session = this.session_id();
        if session.is_some() && owner(&raw, &path).await == session {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "comet a was not registered again after the restart (session {session:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kept = this.session_id() == Some(before);

    let c = comet("c", "sh");
    let _c = this.register(Kind::Comet, c.clone()).await.unwrap();
    for view in [&mut own_view, &mut other_view] {
        let seen = wait_view(view, "comet c registered after the restart", |n| {
            holds(n, &a) && holds(n, &c)
        })
        .await;
        assert_eq!(ids(&seen), ["a", "c"]);
    }
    drop((this, other));
    drop(server);
    kept
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs ZooKeeper: run deploy/test.sh"]
async fn a_zookeeper_restart_within_the_session_timeout_keeps_the_session() {
    let kept = restart_and_check(Duration::from_secs(20), Duration::from_millis(500)).await;
    assert!(kept, "a short restart should not end the session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs ZooKeeper: run deploy/test.sh"]
async fn a_zookeeper_restart_past_the_session_timeout_restores_registrations() {
    // The client gives a session up after 7/5 of its timeout without the
    // server: 2.8 s here, well inside the downtime.
    let kept = restart_and_check(Duration::from_secs(2), Duration::from_secs(6)).await;
    assert!(!kept, "the session should have expired during the downtime");
}

#[tokio::test]
async fn an_unreachable_zookeeper_is_unavailable() {
    // A listener that accepts but never answers: the handshake times out.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let started = std::time::Instant::now();
    let err = ZkDiscovery::connect(&addr, "/rim", Duration::from_secs(1))
        .await
        .expect_err("nothing answers there");
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
    assert!(err.to_string().contains(&addr), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "connect must be bounded"
    );
}

/// A node started while its ZooKeeper is not up yet (compose, Kubernetes,
/// both restarted together) waits for it within the connect timeout instead
/// of failing at the first refused connection; past the timeout it fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs ZooKeeper: run deploy/test.sh"]
async fn the_first_session_waits_for_a_zookeeper_that_comes_up() {
    let addr = shared_zk();
    let root = unique_root();
    let proxy = Proxy::start(&addr).await;
    proxy.cut();
    let connecting = tokio::spawn({
        let (addr, root) = (proxy.addr(), root.clone());
        async move { ZkDiscovery::connect(&addr, &root, SESSION_TIMEOUT).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !connecting.is_finished(),
        "connect gave up while ZooKeeper was down"
    );
    proxy.restore();
    let this = connecting
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("no session once ZooKeeper came up: {e}"));
    this.register(Kind::Comet, comet("a", "sh")).await.unwrap();
    drop(this);

    // Never up: the error comes once the connect timeout has passed.
    proxy.cut();
    let err = ZkDiscovery::connect(&proxy.addr(), &root, Duration::from_secs(1))
        .await
        .expect_err("connected through a cut proxy");
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    remove_tree(&raw_client(&addr).await, &root).await;
}
