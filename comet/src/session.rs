//! One authenticated connection as the rest of the comet sees it: identity,
//! accepted ops, room, and the outbound queue pushes are written to.
//!
//! A push to a raw TCP connection that has nothing queued and is not being
//! written by its task goes straight to the socket from the pushing task (a
//! nonblocking write under the outbox lock), so the connection task is not
//! woken. Everything else is queued for the connection task. The outbox's
//! `writing` state keeps the two writers apart; see [`Session::push`].

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use parking_lot::Mutex;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::limits::{MAX_ACCEPTS, too_many_accepts};
use crate::transport::DirectWriter;

/// How the client is connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportKind {
    /// Raw TCP.
    Tcp,
    /// WebSocket (plain or over TLS).
    Ws,
}

/// Why the comet closes a connection on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum CloseReason {
    /// A new connection authenticated with the same key.
    Replaced = 1,
    /// An operator or the business kicked it.
    Kicked = 2,
    /// Its outbound queue stayed full too long.
    SlowConsumer = 3,
    /// The comet is shutting down.
    Drain = 4,
}

impl CloseReason {
    fn from_u8(v: u8) -> Option<CloseReason> {
        match v {
            1 => Some(CloseReason::Replaced),
            2 => Some(CloseReason::Kicked),
            3 => Some(CloseReason::SlowConsumer),
            4 => Some(CloseReason::Drain),
            _ => None,
        }
    }

    /// Returns the reason as a log field value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CloseReason::Replaced => "replaced by a newer connection with the same key",
            CloseReason::Kicked => "kicked",
            CloseReason::SlowConsumer => "slow consumer: outbound queue stayed full",
            CloseReason::Drain => "comet draining",
        }
    }
}

/// Outcome of pushing one frame to one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// The frame is queued for the connection task.
    Queued,
    /// The pushing task wrote the whole frame to the socket: `bytes` wire
    /// bytes; the connection task was not woken.
    Written {
        /// Bytes written (the TCP wire form: an op-9 batch without its header).
        bytes: usize,
    },
    /// The pushing task wrote the start of the frame; the rest is queued
    /// at the head of the queue for the connection task.
    Partial,
    /// The queue was full (or the connection closing): the frame is dropped
    /// for this connection.
    Dropped,
    /// The queue was full too long: the frame is dropped and the connection
    /// is now closing as a slow consumer.
    DroppedAndClosed,
}

/// An authenticated connection.
#[derive(Debug)]
pub(crate) struct Session {
    /// Unique within this comet process; tells a replaced session from its successor.
    pub(crate) id: u64,
    pub(crate) key: Box<str>,
    pub(crate) mid: i64,
    pub(crate) ip: IpAddr,
    /// Sorted, deduplicated.
    accepts: Mutex<Vec<i32>>,
    room: Mutex<Option<Arc<str>>>,
    outbox: Outbox,
}

/// The bounded outbound queue. It holds no allocation while empty, so an
/// idle connection costs nothing here; the connection task is woken through
/// one `Notify` for both "frames queued" and "close requested".
#[derive(Debug)]
struct Outbox {
    /// Everything both writers (pushers and the connection task) decide on,
    /// under one lock.
    state: Mutex<OutState>,
    capacity: usize,
    wake: Notify,
    close: AtomicU8,
    /// Milliseconds (comet clock) since the queue has been full; 0 = not full.
    full_since_ms: AtomicU64,
}

/// The outbox under its lock.
///
/// Invariants (all changed only under the lock):
/// - a pusher writes to the socket only while `frames` is empty, `writing`
///   is false and `direct` is set, and holds the lock for the whole write;
/// - the connection task sets `writing` before it owes the client anything
///   (it read a frame, or takes frames to write) and clears it only when it
///   finds `frames` empty and owes nothing, so the two never write at once
///   and a push never overtakes a reply the task owes or a frame it holds;
/// - `head_sent` > 0 only while `frames` is non-empty: the first frame's
///   first `head_sent` wire bytes are on the socket already, and the task
///   writes its rest before anything else.
#[derive(Debug)]
struct OutState {
    /// Full = pushes to this connection are dropped and counted.
    frames: VecDeque<Bytes>,
    /// Wire bytes of `frames[0]` a direct write already sent.
    head_sent: usize,
    /// The connection task is writing or owes the client frames: pushers
    /// queue. True from the start (the task owes the Auth reply).
    writing: bool,
    /// How pushers write straight to the socket; `None` for transports
    /// without one (WebSocket, TLS), before the task attaches it and after
    /// the connection closes.
    direct: Option<DirectWriter>,
}

/// What the connection task takes to write.
#[derive(Debug, Default)]
pub(crate) struct Taken {
    /// Queued frames, oldest first.
    pub(crate) frames: VecDeque<Bytes>,
    /// Wire bytes of `frames[0]` a direct write already sent: the task
    /// writes the rest of that frame first, before anything it owes.
    pub(crate) head_sent: usize,
}

impl Session {
    /// Creates a session; `accepts` is a set checked by
    /// [`check_accepts`](crate::limits::check_accepts) (sorted, deduplicated, bounded).
    pub(crate) fn new(
        id: u64,
        key: &str,
        mid: i64,
        ip: IpAddr,
        accepts: Vec<i32>,
        capacity: usize,
    ) -> Session {
        Session {
            id,
            key: key.into(),
            mid,
            ip,
            accepts: Mutex::new(accepts),
            room: Mutex::new(None),
            outbox: Outbox {
                state: Mutex::new(OutState {
                    frames: VecDeque::new(),
                    head_sent: 0,
                    writing: true,
                    direct: None,
                }),
                capacity,
                wake: Notify::new(),
                close: AtomicU8::new(0),
                full_since_ms: AtomicU64::new(0),
            },
        }
    }

    /// Returns whether pushes with this op reach the connection.
    pub(crate) fn accepts(&self, op: i32) -> bool {
        self.accepts.lock().binary_search(&op).is_ok()
    }

    /// Adds ops to the accepted set; refuses (changing nothing) when the set
    /// would exceed [`MAX_ACCEPTS`], with the same reason an Auth gets.
    pub(crate) fn watch(&self, ops: &[i32]) -> Result<(), String> {
        let mut accepts = self.accepts.lock();
        let mut added: Vec<i32> = ops
            .iter()
            .copied()
            .filter(|op| accepts.binary_search(op).is_err())
            .collect();
        added.sort_unstable();
        added.dedup();
        let count = accepts.len() + added.len();
        if count > MAX_ACCEPTS {
            return Err(too_many_accepts(count));
        }
        for op in added {
            if let Err(at) = accepts.binary_search(&op) {
                accepts.insert(at, op);
            }
        }
        Ok(())
    }

    /// Removes ops from the accepted set.
    pub(crate) fn unwatch(&self, ops: &[i32]) {
        self.accepts.lock().retain(|op| !ops.contains(op));
    }

    /// Returns the room the connection is in.
    pub(crate) fn room(&self) -> Option<Arc<str>> {
        self.room.lock().clone()
    }

    /// Records the room; only the bucket calls this, under its own lock.
    pub(crate) fn set_room(&self, room: Option<Arc<str>>) {
        *self.room.lock() = room;
    }

    /// Delivers an encoded frame without waiting. `now_ms` and `slow_ms`
    /// decide when a queue that stays full closes the connection.
    ///
    /// When the connection has a direct writer, nothing queued and its task
    /// is neither writing nor owing a reply, the frame is written to the
    /// socket here, under the outbox lock, without waking the task. What
    /// the socket does not take at once (a partial write, WouldBlock, an
    /// error) is queued as before, and the task is woken to finish it or to
    /// find the error.
    pub(crate) fn push(&self, frame: &Bytes, now_ms: u64, slow_ms: u64) -> Pushed {
        if self.close_reason().is_some() {
            return Pushed::Dropped;
        }
        {
            let mut state = self.outbox.state.lock();
            if state.frames.len() < self.outbox.capacity {
                let mut pushed = Pushed::Queued;
                if state.frames.is_empty()
                    && !state.writing
                    && let Some(direct) = &state.direct
                {
                    match direct.write_now(frame) {
                        Ok(sent) if sent.is_whole() => {
                            return Pushed::Written { bytes: sent.bytes };
                        }
                        Ok(sent) if sent.bytes > 0 => {
                            state.head_sent = sent.bytes;
                            pushed = Pushed::Partial;
                        }
                        // Nothing sent (WouldBlock) or the socket failed:
                        // queued, and the task's own write waits for room
                        // or meets the error.
                        Ok(_) | Err(_) => {}
                    }
                }
                state.frames.push_back(frame.clone());
                drop(state);
                self.outbox.wake.notify_one();
                return pushed;
            }
        }
        // Full: remember since when, and give up on the connection once it
        // has stayed full for slow_ms.
        let now_ms = now_ms.max(1);
        match self.outbox.full_since_ms.compare_exchange(
            0,
            now_ms,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => Pushed::Dropped,
            Err(since) if now_ms.saturating_sub(since) >= slow_ms => {
                if self.close(CloseReason::SlowConsumer) {
                    Pushed::DroppedAndClosed
                } else {
                    Pushed::Dropped
                }
            }
            Err(_) => Pushed::Dropped,
        }
    }

    /// Takes every queued frame, leaving the queue empty and unallocated
    /// (for sessions without a connection task).
    pub(crate) fn take_queued(&self) -> VecDeque<Bytes> {
        self.take_for_write(false).frames
    }

    /// Takes every queued frame for the connection task to write. The task
    /// keeps the socket to itself (pushers queue) while it takes frames or
    /// `owes` the client replies; it hands the socket back to direct
    /// writes only when it finds nothing queued and owes nothing.
    pub(crate) fn take_for_write(&self, owes: bool) -> Taken {
        let mut state = self.outbox.state.lock();
        let taken = Taken {
            frames: std::mem::take(&mut state.frames),
            head_sent: std::mem::take(&mut state.head_sent),
        };
        state.writing = owes || !taken.frames.is_empty();
        drop(state);
        self.outbox.full_since_ms.store(0, Ordering::Release);
        taken
    }

    /// Keeps pushes from writing directly from now until the task's next
    /// [`take_for_write`](Self::take_for_write): the task read a frame and
    /// may owe a reply, which must reach the client before any push that
    /// comes after it.
    pub(crate) fn hold_direct(&self) {
        self.outbox.state.lock().writing = true;
    }

    /// Lets pushers write straight to the connection's socket.
    pub(crate) fn attach_direct(&self, writer: DirectWriter) {
        self.outbox.state.lock().direct = Some(writer);
    }

    /// Stops direct writes for good (the connection is closing); returns
    /// once none is in progress.
    pub(crate) fn detach_direct(&self) {
        let mut state = self.outbox.state.lock();
        state.writing = true;
        state.direct = None;
    }

    /// Completes when frames were queued or a close was requested since the
    /// last call (a wake-up that came before the wait is not lost).
    pub(crate) async fn woken(&self) {
        self.outbox.wake.notified().await;
    }

    /// Asks the connection to close; true if this call set the reason.
    pub(crate) fn close(&self, reason: CloseReason) -> bool {
        let set = self
            .outbox
            .close
            .compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if set {
            // No direct write starts once this returns, and none is under way.
            self.detach_direct();
            self.outbox.wake.notify_one();
        }
        set
    }

    /// Returns why the connection was asked to close, if it was.
    pub(crate) fn close_reason(&self) -> Option<CloseReason> {
        CloseReason::from_u8(self.outbox.close.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(capacity: usize) -> Session {
        Session::new(
            1,
            "k",
            7,
            IpAddr::from([127, 0, 0, 1]),
            crate::limits::check_accepts(&[1001, 1000, 1000]).unwrap(),
            capacity,
        )
    }

    #[test]
    fn accepts_are_a_bounded_sorted_set() {
        let s = session(4);
        assert!(s.accepts(1000) && s.accepts(1001) && !s.accepts(1002));
        assert!(s.watch(&[1002, 1000]).is_ok());
        assert!(s.accepts(1002));
        s.unwatch(&[1000]);
        assert!(!s.accepts(1000));
        let many: Vec<i32> = (0..MAX_ACCEPTS as i32 + 1).collect();
        assert_eq!(
            s.watch(&many).unwrap_err(),
            format!("{} accepted ops exceed the limit of 256", MAX_ACCEPTS + 3)
        );
        assert!(!s.accepts(0), "a refused sub changes nothing");
    }

    #[test]
    fn a_full_queue_drops_then_closes_after_the_slow_limit() {
        let s = session(2);
        let frame = Bytes::from_static(b"x");
        assert_eq!(s.push(&frame, 10, 100), Pushed::Queued);
        assert_eq!(s.push(&frame, 10, 100), Pushed::Queued);
        assert_eq!(s.push(&frame, 10, 100), Pushed::Dropped);
        assert_eq!(s.push(&frame, 109, 100), Pushed::Dropped);
        assert_eq!(s.push(&frame, 110, 100), Pushed::DroppedAndClosed);
        assert_eq!(s.close_reason(), Some(CloseReason::SlowConsumer));
        assert_eq!(s.push(&frame, 111, 100), Pushed::Dropped);
    }

    #[test]
    fn draining_the_queue_resets_the_full_clock() {
        let s = session(1);
        let frame = Bytes::from_static(b"x");
        assert_eq!(s.push(&frame, 10, 100), Pushed::Queued);
        assert_eq!(s.push(&frame, 10, 100), Pushed::Dropped);
        assert_eq!(s.take_queued().len(), 1);
        assert_eq!(s.push(&frame, 200, 100), Pushed::Queued);
        assert_eq!(s.push(&frame, 250, 100), Pushed::Dropped);
        assert_eq!(s.close_reason(), None);
    }

    #[test]
    fn the_first_close_reason_wins() {
        let s = session(1);
        assert!(s.close(CloseReason::Kicked));
        assert!(!s.close(CloseReason::Drain));
        assert_eq!(s.close_reason(), Some(CloseReason::Kicked));
    }

    mod direct {
        use std::time::Duration;

        use rim_proto::{BatchBuilder, Frame, Op};
        use tokio::io::AsyncReadExt;
        use tokio::net::{TcpSocket, TcpStream};

        use super::*;
        use crate::transport::{TcpTransport, Transport};

        /// A connection on loopback: the comet's end as a transport and
        /// the client's stream; with `small`, both buffers are small.
        async fn pair(small: bool) -> (TcpTransport, TcpStream) {
            let listening = TcpSocket::new_v4().unwrap();
            let client = TcpSocket::new_v4().unwrap();
            if small {
                listening.set_send_buffer_size(4096).unwrap();
                client.set_recv_buffer_size(4096).unwrap();
            }
            listening.bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let listener = listening.listen(1).unwrap();
            let addr = listener.local_addr().unwrap();
            let (connected, accepted) = tokio::join!(client.connect(addr), listener.accept());
            let (server, _) = accepted.unwrap();
            (TcpTransport::new(server, 4096), connected.unwrap())
        }

        fn frame(op: i32, body: &[u8]) -> Bytes {
            Frame::new(Op(op), 0, Bytes::copy_from_slice(body))
                .to_bytes()
                .unwrap()
        }

        /// Reads exactly `len` bytes (failing after 10 s).
        async fn read(peer: &mut TcpStream, len: usize) -> Vec<u8> {
            let mut buf = vec![0; len];
            tokio::time::timeout(Duration::from_secs(10), peer.read_exact(&mut buf))
                .await
                .expect("bytes arrive in time")
                .unwrap();
            buf
        }

        /// Asserts the client has nothing more to read.
        async fn nothing_more(peer: &mut TcpStream) {
            // A loopback write is in the peer's buffer when it returns.
            let mut buf = [0; 1];
            assert_eq!(
                peer.try_read(&mut buf).unwrap_err().kind(),
                std::io::ErrorKind::WouldBlock
            );
        }

        #[tokio::test]
        async fn a_push_goes_straight_out_only_while_the_task_lets_it() {
            let s = session(8);
            let (transport, mut peer) = pair(false).await;
            s.attach_direct(transport.direct_writer().unwrap());
            let (a, b, c) = (frame(1000, b"a"), frame(1000, b"bb"), frame(1000, b"ccc"));

            // The task owes its auth reply from the start.
            assert_eq!(s.push(&a, 1, 100), Pushed::Queued);
            // Taking frames keeps the socket the task's until a take finds
            // nothing.
            assert_eq!(s.take_for_write(false).frames, [&a]);
            assert_eq!(s.push(&b, 1, 100), Pushed::Queued);
            assert_eq!(s.take_for_write(false).frames, [&b]);
            assert!(s.take_for_write(false).frames.is_empty());
            assert_eq!(s.push(&c, 1, 100), Pushed::Written { bytes: c.len() });
            assert_eq!(read(&mut peer, c.len()).await, c);

            // A frame read (a reply may be owed) holds pushes back until the
            // task's next take; owing replies keeps them back too.
            s.hold_direct();
            assert_eq!(s.push(&a, 1, 100), Pushed::Queued);
            assert_eq!(s.take_for_write(true).frames, [&a]);
            assert_eq!(s.push(&b, 1, 100), Pushed::Queued);
            assert_eq!(s.take_for_write(false).frames, [&b]);
            assert!(s.take_for_write(false).frames.is_empty());

            // An op-9 batch goes out as its inner frames.
            let mut batch = BatchBuilder::new();
            batch
                .push(&Frame::new(Op(1000), 1, Bytes::from_static(b"x")))
                .unwrap();
            batch
                .push(&Frame::new(Op(1000), 2, Bytes::from_static(b"yz")))
                .unwrap();
            let batch = batch.finish().to_bytes().unwrap();
            let inner = &batch[rim_proto::HEADER_LEN..];
            assert_eq!(
                s.push(&batch, 1, 100),
                Pushed::Written { bytes: inner.len() }
            );
            assert_eq!(read(&mut peer, inner.len()).await, inner);

            // A kicked session takes no push at all, and lets go of the
            // socket.
            assert!(s.close(CloseReason::Kicked));
            assert_eq!(s.push(&c, 1, 100), Pushed::Dropped);
            assert!(s.outbox.state.lock().direct.is_none());
            nothing_more(&mut peer).await;
        }

        #[tokio::test]
        async fn a_detached_session_queues_even_when_idle() {
            let s = session(8);
            let (transport, mut peer) = pair(false).await;
            s.attach_direct(transport.direct_writer().unwrap());
            assert!(s.take_for_write(false).frames.is_empty());
            s.detach_direct();
            let a = frame(1000, b"a");
            assert_eq!(s.push(&a, 1, 100), Pushed::Queued);
            assert_eq!(s.take_queued(), [a]);
            nothing_more(&mut peer).await;
        }

        /// A push the socket takes only in part is finished by the task,
        /// before anything else; nothing is written directly meanwhile,
        /// even once the socket has room again.
        #[tokio::test]
        async fn a_partial_direct_write_is_finished_first_by_the_task() {
            let s = session(8);
            let (mut transport, mut peer) = pair(true).await;
            s.attach_direct(transport.direct_writer().unwrap());
            assert!(s.take_for_write(false).frames.is_empty());

            let mut batch = BatchBuilder::new();
            let body: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
            batch
                .push(&Frame::new(Op(1000), 1, Bytes::from(body)))
                .unwrap();
            let big = batch.finish().to_bytes().unwrap();
            let big_wire = big[rim_proto::HEADER_LEN..].to_vec();
            assert_eq!(s.push(&big, 1, 100), Pushed::Partial);
            let sent = s.outbox.state.lock().head_sent;
            assert!(sent > 0 && sent < big_wire.len(), "{sent}");

            // The client reads what was sent: the socket has room again,
            // but the rest of the big frame must come first.
            assert_eq!(read(&mut peer, sent).await, big_wire[..sent]);
            let small = frame(1000, b"after");
            assert_eq!(s.push(&small, 1, 100), Pushed::Queued);
            nothing_more(&mut peer).await;

            let taken = s.take_for_write(false);
            assert_eq!(taken.head_sent, sent);
            let frames: Vec<Bytes> = taken.frames.into_iter().collect();
            assert_eq!(frames, [big.clone(), small.clone()]);
            let rest = big_wire.len() - sent + small.len();
            let (written, received) = tokio::join!(
                transport.write_frames(taken.head_sent, &frames),
                read(&mut peer, rest)
            );
            // Each frame counted whole, once.
            assert_eq!(written.unwrap(), big_wire.len() + small.len());
            let mut expected = big_wire[sent..].to_vec();
            expected.extend_from_slice(&small);
            assert!(received == expected, "the rest arrived out of order");
            nothing_more(&mut peer).await;
        }
    }
}
