//! Feeds arbitrary bytes to every client-frame decoding path: the stream
//! decoder (in chunks whose sizes the input chooses), the one-frame
//! WebSocket decoder, and the op-9 batch iterator. None may panic, yield a
//! body over the limit, or grow the read buffer past one maximal frame.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use rim_proto::{Frame, FrameCodec, HEADER_LEN, Op};
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let Some((&control, input)) = data.split_first() else {
        return;
    };
    let max_body = usize::from(control) * 16;
    let chunk = usize::from(control % 17) + 1;
    let mut codec = FrameCodec::new(max_body);

    let mut buf = BytesMut::new();
    'feed: for piece in input.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => assert!(frame.body.len() <= max_body),
                Ok(None) => break,
                Err(_) => break 'feed,
            }
        }
        // Growth from appending input is at most doubling; the decoder itself
        // may reserve no more than one maximal frame.
        assert!(buf.capacity() <= 2 * (input.len() + HEADER_LEN + max_body) + 64);
    }
    let _ = codec.decode_eof(&mut buf);

    if let Ok(frame) = codec.decode_message(Bytes::copy_from_slice(input)) {
        assert!(frame.body.len() <= max_body);
        assert_eq!(frame.encoded_len(), input.len());
    }

    let batch = Frame::new(Op::RAW, 0, Bytes::copy_from_slice(input));
    let mut seen = 0;
    for inner in batch.batch_frames() {
        match inner {
            Ok(frame) => seen += frame.encoded_len(),
            Err(_) => break,
        }
    }
    assert!(seen <= input.len());
});
