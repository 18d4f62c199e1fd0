//! Room broadcast micro-benchmark: one `BroadcastRoom` (encode once, queue
//! the shared bytes on every member's outbox) to rooms of N in-memory
//! members, for a single frame and for an op-9 batch of 20.
//!
//! Members are sessions without sockets (`Comet::attach_detached`); after
//! each timed broadcast their outboxes are drained, untimed, in place of the
//! connection write tasks. The socket writes themselves are measured by
//! `rim-bench fanout` (docs/benchmarks.md).
//!
//! Run: `cargo bench -p rim-comet --bench room`. Under `cargo test
//! --all-targets` each benchmark runs once, as a smoke test.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rim_comet::{Comet, DetachedSession, NoLogic};
use rim_config::{CometConfig, NodeConfig};
use rim_proto::api::CometApi;
use rim_proto::pb::comet::v1 as pb;
use rim_proto::{BatchBuilder, Frame, Op};

/// Room sizes, as in the fan-out benchmark of issue #7.
const MEMBERS: [usize; 3] = [1_000, 10_000, 50_000];
/// Messages in one op-9 batch (the job's default `job.room_batch`).
const BATCH: usize = 20;
/// The op business pushes use in the examples.
const PUSH_OP: i32 = 1000;
const ROOM: &str = "live://bench";

fn message(seq: i32) -> Frame {
    Frame::new(Op(PUSH_OP), seq, Bytes::from(vec![b'm'; 128]))
}

fn request(frame: Frame) -> pb::BroadcastRoomRequest {
    pb::BroadcastRoomRequest {
        room_id: ROOM.into(),
        proto: Some(frame.into()),
    }
}

fn room(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let single = request(message(1));
    let mut batch = BatchBuilder::new();
    for seq in 0..BATCH {
        batch.push(&message(seq as i32)).expect("fits");
    }
    let batched = request(batch.finish());

    let mut group = c.benchmark_group("comet/broadcast_room");
    group.sample_size(20);
    for members in MEMBERS {
        let comet = Comet::new(
            &NodeConfig::default(),
            CometConfig::default(),
            Arc::new(NoLogic),
        );
        let sessions: Vec<DetachedSession> = (0..members)
            .map(|i| comet.attach_detached(&format!("key-{i}"), i as i64, Some(ROOM), &[PUSH_OP]))
            .collect();
        for (name, req, messages) in [("1 frame", &single, 1), ("op-9 x20", &batched, BATCH)] {
            // Throughput in client messages delivered: members × messages per frame.
            group.throughput(Throughput::Elements((members * messages) as u64));
            group.bench_function(format!("{members} members, {name}"), |b| {
                b.iter_custom(|iters| {
                    let mut timed = Duration::ZERO;
                    for _ in 0..iters {
                        let started = Instant::now();
                        let delivery = rt
                            .block_on(comet.broadcast_room(req.clone()))
                            .expect("broadcast");
                        timed += started.elapsed();
                        assert_eq!(delivery.delivered, members as u64);
                        let drained: usize = sessions.iter().map(DetachedSession::drain).sum();
                        assert_eq!(drained, members);
                        black_box(delivery);
                    }
                    timed
                });
            });
        }
    }
    group.finish();
}

criterion_group!(benches, room);
criterion_main!(benches);
