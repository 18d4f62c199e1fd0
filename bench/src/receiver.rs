//! The push benchmarks' client side: the loop that receives a client's
//! frames and sends its heartbeats, started for every client that connected.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rim_client::Client;
use rim_proto::{Frame, Op};

use crate::wire::{now_nanos, parse_body};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// What every push benchmark counts of its clients' frames.
#[derive(Default)]
pub(crate) struct FrameCounts {
    /// Every push frame received (warmup included).
    pub(crate) deliveries: AtomicU64,
    /// Push frames whose body was not `"<nanos> <seq>"`.
    pub(crate) bad_bodies: AtomicU64,
    /// Frames with another op (heartbeat replies and the like).
    pub(crate) other_frames: AtomicU64,
    /// Received before they were sent (clock stepped): recorded as 1 µs.
    pub(crate) negative: AtomicU64,
    /// Clients whose connection ended before the benchmark did.
    pub(crate) lost_clients: AtomicU64,
}

impl FrameCounts {
    /// Counts a received frame; a push frame (op `push_op`, a well-formed
    /// body) gives its seq and its send → receipt time in µs.
    pub(crate) fn push(&self, push_op: Op, frame: &Frame) -> Option<(u64, u64)> {
        let received = now_nanos();
        if frame.op != push_op {
            self.other_frames.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let Some((sent, seq)) = parse_body(&frame.body) else {
            self.bad_bodies.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        self.deliveries.fetch_add(1, Ordering::Relaxed);
        let micros = if received >= sent {
            (received - sent) / 1_000
        } else {
            self.negative.fetch_add(1, Ordering::Relaxed);
            1
        };
        Some((seq, micros))
    }
}

/// Where the clients' frames are recorded.
pub(crate) trait FrameSink: Send + Sync + 'static {
    /// The counts kept of every client's frames.
    fn counts(&self) -> &FrameCounts;
    /// A frame client `client` received.
    fn on_frame(&self, client: usize, frame: &Frame);
    /// A client's connection ended before the benchmark stopped it.
    fn on_lost(&self) {
        self.counts().lost_clients.fetch_add(1, Ordering::Relaxed);
    }
}

/// Takes the connect results as they come (`(index, what the caller keeps,
/// client)` or a reason), starts a receive loop per connected client, and
/// returns what the connected clients carried and their loops.
pub(crate) async fn start_receivers<S: FrameSink, T: Send + 'static>(
    mut connecting: JoinSet<Result<(usize, T, Client), String>>,
    sink: &Arc<S>,
    stop: &watch::Receiver<bool>,
    heartbeat: Duration,
    deadline: Instant,
) -> (Vec<T>, JoinSet<()>) {
    let mut kept = Vec::new();
    let mut loops = JoinSet::new();
    let mut failures = 0usize;
    while let Some(done) = connecting.join_next().await {
        match done {
            Ok(Ok((i, keep, client))) => {
                kept.push(keep);
                loops.spawn(receive(
                    client,
                    i,
                    Arc::clone(sink),
                    stop.clone(),
                    heartbeat,
                    deadline,
                ));
            }
            Ok(Err(err)) => {
                failures += 1;
                if failures <= 5 {
                    eprintln!("warning: {err}");
                }
            }
            Err(err) => {
                failures += 1;
                eprintln!("warning: connect task: {err}");
            }
        }
    }
    if failures > 5 {
        eprintln!("warning: {failures} clients failed to connect in all");
    }
    (kept, loops)
}

/// One client's receive loop: records every frame, heartbeats, ends on
/// `stop`, on the deadline or when the server closes.
async fn receive<S: FrameSink>(
    mut client: Client,
    index: usize,
    sink: Arc<S>,
    mut stop: watch::Receiver<bool>,
    heartbeat: Duration,
    deadline: Instant,
) {
    let mut beat = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
    let end = tokio::time::sleep_until(deadline);
    tokio::pin!(end);
    loop {
        tokio::select! {
            () = &mut end => return,
            _ = stop.changed() => return,
            _ = beat.tick() => {
                if client.send(Frame::new(Op::HEARTBEAT, 0, Bytes::new())).await.is_err() {
                    break;
                }
            }
            // next_frame is cancel-safe: a partial frame stays in the codec's buffer.
            frame = client.next_frame() => match frame {
                Ok(Some(frame)) => sink.on_frame(index, &frame),
                Ok(None) | Err(_) => break,
            },
        }
    }
    if !*stop.borrow() {
        sink.on_lost();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_push_frames_count_as_deliveries() {
        let counts = FrameCounts::default();
        let push = |body: Bytes| Frame::new(Op(1000), 0, body);
        let sent = now_nanos() - 2_000_000;
        let (seq, micros) = counts
            .push(Op(1000), &push(Bytes::from(format!("{sent} 7"))))
            .unwrap();
        assert_eq!(seq, 7);
        assert!(micros >= 2_000, "{micros} µs since a send 2 ms ago");
        assert!(
            counts
                .push(Op(1000), &push(Bytes::from_static(b"7")))
                .is_none()
        );
        let later = now_nanos() + 60_000_000_000;
        assert_eq!(
            counts.push(Op(1000), &push(Bytes::from(format!("{later} 8")))),
            Some((8, 1)),
            "a send time in the future reads as 1 µs"
        );
        let other = Frame::new(Op::HEARTBEAT_REPLY, 0, Bytes::new());
        assert!(counts.push(Op(1000), &other).is_none());
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        assert_eq!(load(&counts.deliveries), 2);
        assert_eq!(load(&counts.bad_bodies), 1);
        assert_eq!(load(&counts.negative), 1);
        assert_eq!(load(&counts.other_frames), 1);
    }
}
