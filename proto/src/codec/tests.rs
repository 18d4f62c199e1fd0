use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};

use crate::{BatchBuilder, DEFAULT_MAX_BODY, Frame, FrameCodec, FrameError, HEADER_LEN, Op};

fn encode_all(frames: &[Frame]) -> BytesMut {
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::new();
    for frame in frames {
        codec.encode(frame, &mut buf).expect("encodable frame");
    }
    buf
}

fn raw_header(pack_len: i32, header_len: i16, ver: i16, op: i32, seq: i32) -> BytesMut {
    let mut buf = BytesMut::new();
    buf.put_i32(pack_len);
    buf.put_i16(header_len);
    buf.put_i16(ver);
    buf.put_i32(op);
    buf.put_i32(seq);
    buf
}

fn decode_all(codec: &mut FrameCodec, buf: &mut BytesMut) -> Result<Vec<Frame>, FrameError> {
    let mut out = Vec::new();
    while let Some(frame) = codec.decode(buf)? {
        out.push(frame);
    }
    Ok(out)
}

#[test]
fn every_op_round_trips_on_a_stream_and_as_a_message() {
    let mut ops: Vec<Op> = Op::KNOWN.to_vec();
    ops.extend(Op::IM);
    ops.extend([Op(1000), Op(1001), Op(-1), Op(i32::MAX), Op(i32::MIN)]);
    let frames: Vec<Frame> = ops
        .iter()
        .enumerate()
        .map(|(i, &op)| Frame::new(op, i as i32 * 7 - 3, format!("body-{i}").into_bytes()))
        .collect();

    let mut codec = FrameCodec::default();
    let mut buf = encode_all(&frames);
    assert_eq!(decode_all(&mut codec, &mut buf).unwrap(), frames);
    assert!(buf.is_empty());

    for frame in &frames {
        let msg = frame.to_bytes().unwrap();
        assert_eq!(msg.len(), frame.encoded_len());
        assert_eq!(&codec.decode_message(msg).unwrap(), frame);
    }
}

#[test]
fn header_fields_are_big_endian_at_their_offsets() {
    let frame = Frame {
        ver: 1,
        op: Op::AUTH,
        seq: 0x0102_0304,
        body: Bytes::from_static(b"{}"),
    };
    let bytes = frame.to_bytes().unwrap();
    assert_eq!(
        &bytes[..],
        &[0, 0, 0, 18, 0, 16, 0, 1, 0, 0, 0, 7, 1, 2, 3, 4, b'{', b'}']
    );
}

#[test]
fn input_fed_one_byte_at_a_time_decodes() {
    let frames = vec![
        Frame::new(Op::AUTH, 1, &b"{\"mid\":1}"[..]),
        Frame::new(Op::HEARTBEAT, 2, Bytes::new()),
        Frame::new(Op(1000), 0, vec![7u8; DEFAULT_MAX_BODY]),
    ];
    let encoded = encode_all(&frames);
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for byte in encoded.iter() {
        buf.put_u8(*byte);
        got.extend(decode_all(&mut codec, &mut buf).unwrap());
    }
    assert_eq!(got, frames);
    assert!(codec.decode_eof(&mut buf).unwrap().is_none());
}

#[test]
fn decoded_body_shares_the_read_buffer() {
    let frame = Frame::new(Op(1000), 9, vec![1u8; 100]);
    let mut buf = encode_all(&[frame]);
    let start = buf.as_ptr() as usize;
    let end = start + buf.len();
    let decoded = FrameCodec::default().decode(&mut buf).unwrap().unwrap();
    let body = decoded.body.as_ptr() as usize;
    assert!(body >= start && body + decoded.body.len() <= end);
}

#[test]
fn body_at_the_limit_is_accepted_and_one_over_is_rejected() {
    let mut codec = FrameCodec::new(10);
    let mut ok = encode_all(&[Frame::new(Op(1000), 0, vec![0u8; 10])]);
    assert_eq!(codec.decode(&mut ok).unwrap().unwrap().body.len(), 10);

    let mut over = raw_header(16 + 11, 16, 1, 1000, 0);
    match codec.decode(&mut over) {
        Err(FrameError::BodyTooLarge { len: 11, max: 10 }) => {}
        other => panic!("expected BodyTooLarge, got {other:?}"),
    }
}

#[test]
fn negative_and_short_pack_lengths_are_rejected() {
    for pack_len in [-1, i32::MIN, 0, 15] {
        let mut buf = raw_header(pack_len, 16, 1, 2, 0);
        match FrameCodec::default().decode(&mut buf) {
            Err(FrameError::PackLenTooShort(got)) => assert_eq!(got, pack_len),
            other => panic!("pack_len {pack_len}: expected PackLenTooShort, got {other:?}"),
        }
    }
}

#[test]
fn header_length_other_than_16_is_rejected() {
    for header_len in [0, 15, 17, -16, i16::MAX] {
        let mut buf = raw_header(16, header_len, 1, 2, 0);
        match FrameCodec::default().decode(&mut buf) {
            Err(FrameError::BadHeaderLen(got)) => assert_eq!(got, header_len),
            other => panic!("header_len {header_len}: expected BadHeaderLen, got {other:?}"),
        }
    }
}

#[test]
fn a_huge_length_field_allocates_nothing() {
    let mut buf = raw_header(i32::MAX, 16, 1, 1000, 0);
    let capacity = buf.capacity();
    assert!(matches!(
        FrameCodec::default().decode(&mut buf),
        Err(FrameError::BodyTooLarge { .. })
    ));
    assert_eq!(buf.capacity(), capacity);
}

#[test]
fn a_partial_frame_reserves_at_most_one_maximal_frame() {
    let mut buf = raw_header(16 + 4096, 16, 1, 1000, 0);
    assert!(FrameCodec::default().decode(&mut buf).unwrap().is_none());
    assert!(buf.capacity() >= 16 + 4096);
    assert!(buf.capacity() <= 2 * (16 + 4096));
}

#[test]
fn eof_inside_a_frame_is_truncated() {
    let mut buf = encode_all(&[Frame::new(Op(1000), 0, vec![0u8; 20])]);
    buf.truncate(30);
    match FrameCodec::default().decode_eof(&mut buf) {
        Err(FrameError::Truncated { missing: 6 }) => {}
        other => panic!("expected Truncated, got {other:?}"),
    }
    let mut header_only = BytesMut::from(&[0u8, 0, 0][..]);
    assert!(matches!(
        FrameCodec::default().decode_eof(&mut header_only),
        Err(FrameError::Truncated { missing: 13 })
    ));
}

#[test]
fn a_message_must_hold_exactly_one_frame() {
    let codec = FrameCodec::default();
    let frame = Frame::new(Op::HEARTBEAT, 1, Bytes::new());
    let mut two = BytesMut::new();
    frame.encode_into(&mut two).unwrap();
    frame.encode_into(&mut two).unwrap();
    assert!(matches!(
        codec.decode_message(two.freeze()),
        Err(FrameError::TrailingBytes(16))
    ));
    assert!(matches!(
        codec.decode_message(Bytes::new()),
        Err(FrameError::Truncated { missing: 16 })
    ));
    let mut short = BytesMut::new();
    Frame::new(Op(1000), 1, vec![1u8; 8])
        .encode_into(&mut short)
        .unwrap();
    short.truncate(20);
    assert!(matches!(
        codec.decode_message(short.freeze()),
        Err(FrameError::Truncated { missing: 4 })
    ));
    let oversized = raw_header(16 + 5000, 16, 1, 1000, 0).freeze();
    assert!(matches!(
        codec.decode_message(oversized),
        Err(FrameError::BodyTooLarge { len: 5000, .. })
    ));
}

#[test]
fn a_batch_carries_its_frames_in_order() {
    let inner: Vec<Frame> = (0..5)
        .map(|i| Frame::new(Op(1000 + i), 0, format!("msg {i}").into_bytes()))
        .collect();
    let mut builder = BatchBuilder::new();
    for frame in &inner {
        builder.push(frame).unwrap();
    }
    assert_eq!(builder.len(), 5);
    let batch = builder.finish();
    assert!(batch.is_batch());
    assert_eq!(batch.seq, 0);
    let got: Vec<Frame> = batch.batch_frames().collect::<Result<_, _>>().unwrap();
    assert_eq!(got, inner);

    // The batch body is the inner frames back to back: a TCP writer can send
    // it as is and the client sees N ordinary frames.
    let mut stream = BytesMut::from(&batch.body[..]);
    assert_eq!(
        decode_all(&mut FrameCodec::default(), &mut stream).unwrap(),
        inner
    );

    // Over WebSocket the batch is one message that decodes to the op-9 frame.
    let msg = batch.to_bytes().unwrap();
    let decoded = FrameCodec::new(usize::MAX).decode_message(msg).unwrap();
    assert_eq!(decoded, batch);
}

#[test]
fn an_empty_batch_has_no_frames() {
    let batch = BatchBuilder::new().finish();
    assert_eq!(batch.batch_frames().count(), 0);
}

#[test]
fn a_truncated_inner_frame_yields_one_error_and_stops() {
    let mut builder = BatchBuilder::new();
    builder.push(&Frame::new(Op(1000), 0, &b"ok"[..])).unwrap();
    builder
        .push(&Frame::new(Op(1001), 0, &b"cut short"[..]))
        .unwrap();
    let mut batch = builder.finish();
    batch.body.truncate(batch.body.len() - 3);
    let mut frames = batch.batch_frames();
    assert_eq!(
        frames.next().unwrap().unwrap().body,
        Bytes::from_static(b"ok")
    );
    assert!(matches!(
        frames.next(),
        Some(Err(FrameError::Truncated { missing: 3 }))
    ));
    assert!(frames.next().is_none());
}

#[test]
fn protobuf_frames_convert_both_ways() {
    let frame = Frame::new(Op(1000), 42, &b"hello"[..]);
    let proto = crate::pb::frame::v1::Proto::from(frame.clone());
    assert_eq!(Frame::try_from(proto).unwrap(), frame);
    let bad = crate::pb::frame::v1::Proto {
        ver: 70_000,
        op: 1,
        seq: 0,
        body: Bytes::new(),
    };
    assert!(matches!(
        Frame::try_from(bad),
        Err(FrameError::BadVersion(70_000))
    ));
}

fn arb_frame(max_body: usize) -> impl Strategy<Value = Frame> {
    (
        any::<i16>(),
        any::<i32>(),
        any::<i32>(),
        proptest::collection::vec(any::<u8>(), 0..=max_body),
    )
        .prop_map(|(ver, op, seq, body)| Frame {
            ver,
            op: Op(op),
            seq,
            body: body.into(),
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Decoding any chunking of a stream of encoded frames gives back the frames.
    #[test]
    fn any_chunking_decodes_to_the_same_frames(
        frames in proptest::collection::vec(arb_frame(300), 0..12),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..24),
    ) {
        let encoded = encode_all(&frames).freeze();
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(encoded.len() + 1)).collect();
        points.push(0);
        points.push(encoded.len());
        points.sort_unstable();
        points.dedup();

        let mut codec = FrameCodec::new(300);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for pair in points.windows(2) {
            buf.extend_from_slice(&encoded[pair[0]..pair[1]]);
            got.extend(decode_all(&mut codec, &mut buf).unwrap());
        }
        prop_assert!(codec.decode_eof(&mut buf).unwrap().is_none());
        prop_assert_eq!(got, frames);
    }

    /// Garbage never panics, never yields a body over the limit, and never
    /// grows the buffer past one maximal frame.
    #[test]
    fn garbage_is_an_error_or_frames_within_the_limit(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048),
        max_body in 0usize..600,
    ) {
        let mut codec = FrameCodec::new(max_body);
        let mut buf = BytesMut::from(&bytes[..]);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => prop_assert!(frame.body.len() <= max_body),
                Ok(None) => {
                    prop_assert!(buf.capacity() <= bytes.len().max(2 * (HEADER_LEN + max_body)));
                    break;
                }
                Err(_) => break,
            }
        }
        let _ = codec.decode_message(Bytes::from(bytes.clone()));
        for inner in Frame::new(Op::RAW, 0, bytes).batch_frames() {
            if inner.is_err() {
                break;
            }
        }
    }
}
