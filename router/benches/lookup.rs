//! Router micro-benchmarks: the lookups a push plans with
//! (`servers_of_keys`, `keys_by_server`) and the writes every connection
//! makes (`add`, `renew`), on the in-memory router and on Redis.
//!
//! Run: `cargo bench -p rim-router --bench lookup`. The Redis group runs when
//! `RIM_BENCH_REDIS` (or `RIM_TEST_REDIS`, which deploy/test.sh sets) names a
//! redis:// URL, e.g.
//! `RIM_BENCH_REDIS=redis://127.0.0.1:16379 cargo bench -p rim-router --bench lookup`;
//! without one it prints that it was not run. Keys it writes carry a
//! per-process prefix and a 60 s lease, so they expire on their own. Under
//! `cargo test --all-targets` each benchmark runs once, as a smoke test.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rim_router::{MemoryRouter, RedisOptions, RedisRouter, Router};
use tokio::runtime::Runtime;

/// Sessions preloaded before the lookups: one per user, spread over comets.
const SESSIONS: usize = 10_000;
/// Comets the sessions are spread over.
const COMETS: usize = 8;
/// Lease written with every entry; long enough for a run, short enough to clean up.
const LEASE: Duration = Duration::from_secs(60);
/// Batch sizes a push by keys or by user ids plans with.
const BATCHES: [usize; 3] = [1, 10, 100];

struct Fixture {
    router: Arc<dyn Router>,
    keys: Vec<String>,
    mids: Vec<i64>,
    prefix: String,
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Loads `SESSIONS` entries (key `<prefix>-<i>`, mid `base + i`) into `router`.
fn fixture(rt: &Runtime, router: Arc<dyn Router>) -> Fixture {
    let pid = std::process::id();
    let prefix = format!("bench-{pid}");
    let base = i64::from(pid) * 1_000_000;
    let keys: Vec<String> = (0..SESSIONS).map(|i| format!("{prefix}-{i}")).collect();
    let mids: Vec<i64> = (0..SESSIONS as i64).map(|i| base + i).collect();
    rt.block_on(async {
        for (i, (key, mid)) in keys.iter().zip(&mids).enumerate() {
            let server = format!("comet-{}", i % COMETS);
            router
                .add(*mid, key, &server, LEASE)
                .await
                .expect("router add");
        }
    });
    Fixture {
        router,
        keys,
        mids,
        prefix,
    }
}

fn bench_router(c: &mut Criterion, backend: &str, rt: &Runtime, fx: &Fixture) {
    let mut group = c.benchmark_group(format!("router/{backend}"));
    for batch in BATCHES {
        // A different slice of keys each iteration, so no lookup is cached by position.
        let mut at = 0usize;
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(format!("servers_of_keys x{batch}"), |b| {
            b.iter(|| {
                let start = at % (SESSIONS - batch);
                at += batch;
                let servers = rt
                    .block_on(fx.router.servers_of_keys(&fx.keys[start..start + batch]))
                    .expect("lookup");
                assert!(servers.iter().all(Option::is_some));
                black_box(servers)
            });
        });
        let mut at = 0usize;
        group.bench_function(format!("keys_by_server x{batch}"), |b| {
            b.iter(|| {
                let start = at % (SESSIONS - batch);
                at += batch;
                let by_server = rt
                    .block_on(fx.router.keys_by_server(&fx.mids[start..start + batch]))
                    .expect("lookup");
                assert_eq!(by_server.values().map(Vec::len).sum::<usize>(), batch);
                black_box(by_server)
            });
        });
    }
    group.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    group.bench_function("renew", |b| {
        b.iter(|| {
            let n = i % SESSIONS;
            i += 1;
            let server = format!("comet-{}", n % COMETS);
            let renewed = rt
                .block_on(fx.router.renew(fx.mids[n], &fx.keys[n], &server, LEASE))
                .expect("renew");
            assert!(renewed, "entry {n} should still be owned by {server}");
        });
    });
    // A new connection of a new user each time: the Redis add script walks
    // the user's devices (to drop expired ones), so piling every add onto one
    // user would measure that user's device count instead.
    let mut i = 0i64;
    group.bench_function("add", |b| {
        b.iter(|| {
            i += 1;
            let key = format!("{}-new-{i}", fx.prefix);
            let mid = fx.mids[SESSIONS - 1] + i;
            rt.block_on(fx.router.add(mid, &key, "comet-0", LEASE))
                .expect("add");
        });
    });
    group.finish();
}

fn memory(c: &mut Criterion) {
    let rt = runtime();
    let router: Arc<dyn Router> = Arc::new(MemoryRouter::new(Duration::from_secs(30)));
    let fx = fixture(&rt, router);
    bench_router(c, "memory", &rt, &fx);
}

fn redis(c: &mut Criterion) {
    let Some(url) = std::env::var("RIM_BENCH_REDIS")
        .or_else(|_| std::env::var("RIM_TEST_REDIS"))
        .ok()
        .filter(|url| !url.is_empty())
    else {
        eprintln!("router/redis: not run (set RIM_BENCH_REDIS=redis://HOST:PORT)");
        return;
    };
    let rt = runtime();
    let router = rt
        .block_on(RedisRouter::connect(
            std::slice::from_ref(&url),
            RedisOptions::new(Duration::from_secs(30)),
        ))
        .unwrap_or_else(|err| panic!("RIM_BENCH_REDIS={url} is set but unreachable: {err}"));
    let fx = fixture(&rt, Arc::new(router));
    bench_router(c, "redis", &rt, &fx);
}

criterion_group!(benches, memory, redis);
criterion_main!(benches);
