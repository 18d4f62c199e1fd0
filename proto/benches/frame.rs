//! Frame codec micro-benchmarks: encode, stream decode (TCP), one-message
//! decode (WebSocket), and building / walking an op-9 batch.
//!
//! Run: `cargo bench -p rim-proto --bench frame`. Under `cargo test
//! --all-targets` each benchmark runs once, as a smoke test.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use rim_proto::{BatchBuilder, Frame, FrameCodec, HEADER_LEN, Op};
use tokio_util::codec::{Decoder, Encoder};

/// Body sizes: a small chat message, a typical push, the default limit.
const BODY_SIZES: [usize; 3] = [32, 256, 4096 - HEADER_LEN];

/// Frames per decode run: enough to amortise the buffer set-up.
const STREAM_FRAMES: usize = 64;

/// Frames in one op-9 batch (the job's default `job.room_batch`).
const BATCH_FRAMES: usize = 20;

fn frame(body_len: usize, seq: i32) -> Frame {
    Frame::new(Op::SEND_MSG_REPLY, seq, Bytes::from(vec![b'x'; body_len]))
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame/encode");
    for body_len in BODY_SIZES {
        let frame = frame(body_len, 7);
        group.throughput(Throughput::Bytes(frame.encoded_len() as u64));
        group.bench_function(format!("{body_len}B"), |b| {
            let mut codec = FrameCodec::default();
            let mut dst = BytesMut::with_capacity(frame.encoded_len() * 2);
            b.iter(|| {
                dst.clear();
                codec.encode(black_box(&frame), &mut dst).expect("encodes");
                black_box(dst.len())
            });
        });
    }
    group.finish();
}

fn decode_stream(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame/decode_stream");
    for body_len in BODY_SIZES {
        let mut wire = BytesMut::new();
        for seq in 0..STREAM_FRAMES {
            frame(body_len, seq as i32)
                .encode_into(&mut wire)
                .expect("encodes");
        }
        let wire = wire.freeze();
        group.throughput(Throughput::Elements(STREAM_FRAMES as u64));
        group.bench_function(format!("{body_len}B x{STREAM_FRAMES}"), |b| {
            b.iter_batched(
                || BytesMut::from(&wire[..]),
                |mut src| {
                    let mut codec = FrameCodec::default();
                    let mut frames = 0;
                    while let Some(frame) = codec.decode(&mut src).expect("decodes") {
                        black_box(&frame);
                        frames += 1;
                    }
                    assert_eq!(frames, STREAM_FRAMES);
                },
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

fn decode_message(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame/decode_message");
    for body_len in BODY_SIZES {
        let msg = frame(body_len, 7).to_bytes().expect("encodes");
        group.throughput(Throughput::Elements(1));
        group.bench_function(format!("{body_len}B"), |b| {
            let codec = FrameCodec::default();
            b.iter(|| {
                codec
                    .decode_message(black_box(msg.clone()))
                    .expect("decodes")
            });
        });
    }
    group.finish();
}

fn batch(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame/batch");
    let frames: Vec<Frame> = (0..BATCH_FRAMES)
        .map(|seq| frame(256, seq as i32))
        .collect();
    let body_len: usize = frames.iter().map(Frame::encoded_len).sum();
    group.throughput(Throughput::Elements(BATCH_FRAMES as u64));
    group.bench_function(format!("build 256B x{BATCH_FRAMES}"), |b| {
        b.iter(|| {
            let mut batch = BatchBuilder::with_capacity(body_len);
            for frame in &frames {
                batch.push(black_box(frame)).expect("fits");
            }
            black_box(batch.finish())
        });
    });
    let mut builder = BatchBuilder::with_capacity(body_len);
    for frame in &frames {
        builder.push(frame).expect("fits");
    }
    let batch = builder.finish();
    group.bench_function(format!("walk 256B x{BATCH_FRAMES}"), |b| {
        b.iter(|| {
            let mut count = 0;
            for inner in black_box(&batch).batch_frames() {
                black_box(inner.expect("well-formed"));
                count += 1;
            }
            assert_eq!(count, BATCH_FRAMES);
        });
    });
    group.finish();
}

criterion_group!(benches, encode, decode_stream, decode_message, batch);
criterion_main!(benches);
