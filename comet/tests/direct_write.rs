//! Pushes a pushing task writes straight to a raw TCP client's socket (the
//! direct path): taken when the connection is idle, never reordered or
//! interleaved with what the connection task writes, and whole under
//! backpressure.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use rim_client::AuthToken;
use rim_comet::{Comet, TransportKind};
use rim_metrics::Registry;
use rim_proto::api::{CometApi, LogicApi, RpcResult};
use rim_proto::pb::comet::v1 as pb;
use rim_proto::pb::logic::v1 as logic;
use rim_proto::{Frame, FrameCodec, Op};
use support::*;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::codec::{FramedRead, FramedWrite};

/// Largest frame body the raw client accepts.
const MAX_BODY: usize = 4 << 20;

/// A raw TCP client: frames as they come off the wire (nothing unpacked,
/// nothing reordered), with its socket options set before connecting.
struct Raw {
    rd: FramedRead<OwnedReadHalf, FrameCodec>,
    wr: FramedWrite<OwnedWriteHalf, FrameCodec>,
}

impl Raw {
    /// Connects to `addr`, with a receive buffer of `recv_buffer` bytes
    /// when given (the kernel doubles it and keeps a minimum).
    async fn connect(addr: SocketAddr, recv_buffer: Option<u32>) -> Raw {
        let socket = TcpSocket::new_v4().unwrap();
        if let Some(size) = recv_buffer {
            socket.set_recv_buffer_size(size).unwrap();
        }
        let stream = socket.connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (rd, wr) = stream.into_split();
        Raw {
            rd: FramedRead::new(rd, FrameCodec::new(MAX_BODY)),
            wr: FramedWrite::new(wr, FrameCodec::new(MAX_BODY)),
        }
    }

    async fn auth(&mut self, token: &AuthToken) {
        self.send(Frame::new(Op::AUTH, 1, token.to_body())).await;
        let reply = self.next().await;
        assert_eq!((reply.op, reply.seq), (Op::AUTH_REPLY, 1));
    }

    async fn send(&mut self, frame: Frame) {
        self.wr.send(frame).await.unwrap();
    }

    /// Returns the next frame (failing after 10 s or on a closed socket).
    async fn next(&mut self) -> Frame {
        within(Duration::from_secs(10), self.rd.next())
            .await
            .expect("connection open")
            .expect("a well-formed frame")
    }
}

fn registry(comet: &TestComet) -> Registry {
    let mut registry = Registry::default();
    comet.comet.register_metrics(&mut registry);
    registry
}

/// Returns the value of `series` (name and labels, exactly as exposed).
fn sample(registry: &Registry, series: &str) -> f64 {
    let text = rim_metrics::encode(registry);
    text.lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// Returns how many delivered pushes went `path` (direct, partial, queued).
fn writes(registry: &Registry, path: &str) -> u64 {
    sample(
        registry,
        &format!("rim_comet_push_writes_total{{path=\"{path}\"}}"),
    ) as u64
}

fn push_request(key: &str, body: Bytes) -> pb::PushMsgRequest {
    pb::PushMsgRequest {
        keys: vec![key.to_owned()],
        proto_op: 1000,
        proto: Some(Frame::new(Op(1000), 0, body).into()),
        bodies: Vec::new(),
    }
}

/// Pushes to `key` and reads each push back until one was written
/// directly: the connection task hands the socket to pushers just after
/// it wrote its last reply, which the client may read before that. Returns
/// how many pushes it took.
async fn until_direct(comet: &TestComet, registry: &Registry, key: &str, client: &mut Raw) -> u64 {
    let before = writes(registry, "direct");
    for n in 1..=200 {
        let body = format!("warm-up {n}");
        assert_eq!(comet.push_keys(&[key], 1000, &body).await.delivered, 1);
        assert_eq!(client.next().await.body, body.as_bytes());
        if writes(registry, "direct") > before {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no push to an idle connection was written directly in 200 tries");
}

/// A room push to an idle raw TCP client is written by the pushing task
/// and counted as the connection task counts its own writes; the same push
/// to a WebSocket client is queued.
#[tokio::test]
async fn a_room_push_to_an_idle_tcp_client_is_written_by_the_pusher() {
    let comet = start(test_config(), ScriptedLogic::default()).await;
    let registry = registry(&comet);
    let mut tcp = Raw::connect(comet.tcp, None).await;
    tcp.auth(&token(1, "t", "live://d", &[1000])).await;
    let mut ws = comet
        .client(TransportKind::Ws, token(2, "w", "live://d", &[1000]))
        .await;

    let mut bodies = Vec::new();
    while writes(&registry, "direct") == 0 {
        assert!(
            bodies.len() < 200,
            "no room push to an idle connection was written directly"
        );
        let body = format!("room {}", bodies.len());
        assert_eq!(comet.push_room("live://d", 1000, &body).await.delivered, 2);
        assert_eq!(tcp.next().await.body, body.as_bytes());
        assert_eq!(next(&mut ws).await.body, body.as_bytes());
        bodies.push(body);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sent = bodies.len() as u64;
    let (direct, partial, queued) = (
        writes(&registry, "direct"),
        writes(&registry, "partial"),
        writes(&registry, "queued"),
    );
    assert_eq!(direct + partial + queued, 2 * sent, "one path per delivery");
    assert!(queued >= sent, "every WebSocket delivery is queued");
    assert_eq!(partial, 0, "small frames to an idle socket go out whole");

    // The auth reply and every push, whoever wrote them: a TCP client gets
    // a push as its inner frame (16-byte header and the body).
    let frames = 1 + sent;
    let bytes = 16 + bodies.iter().map(|b| 16 + b.len() as u64).sum::<u64>();
    eventually(Duration::from_secs(5), || {
        sample(&registry, "rim_comet_frames_out_total{transport=\"tcp\"}") == frames as f64
            && sample(&registry, "rim_comet_bytes_out_total{transport=\"tcp\"}") == bytes as f64
    })
    .await;
    comet.stop().await;
}

/// A client that sends heartbeats and room changes while pushes to it keep
/// coming gets every push once, in push order, and every reply, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_and_replies_keep_their_order_while_both_are_written() {
    const PUSHES: usize = 2_000;
    const REQUESTS: i32 = 300;
    let config = rim_config::CometConfig {
        // Nothing is dropped however far the pusher runs ahead.
        write_queue: 4_096,
        ..test_config()
    };
    let comet = start(config, ScriptedLogic::default()).await;
    let registry = registry(&comet);
    let mut client = Raw::connect(comet.tcp, None).await;
    client.auth(&token(1, "o", "live://o", &[1000])).await;
    let warm_up = until_direct(&comet, &registry, "o", &mut client).await;

    // One task sends a request, then pushes a few frames at once, so that
    // pushes land while the connection task reads, answers and writes.
    let Raw { mut rd, mut wr } = client;
    let writer = {
        let comet = comet.comet.clone();
        tokio::spawn(async move {
            let mut pushed = 0;
            for seq in 1..=REQUESTS {
                let frame = if seq % 3 == 0 {
                    Frame::new(Op::CHANGE_ROOM, seq, Bytes::from(format!("live://o{seq}")))
                } else {
                    Frame::new(Op::HEARTBEAT, seq, Bytes::new())
                };
                wr.send(frame).await.unwrap();
                let until = PUSHES * seq as usize / REQUESTS as usize;
                while pushed < until {
                    let req = push_request("o", Bytes::from(pushed.to_string()));
                    assert_eq!(comet.push_msg(req).await.unwrap().delivered, 1);
                    pushed += 1;
                }
                tokio::task::yield_now().await;
            }
            wr
        })
    };

    let (mut pushes, mut next_seq) = (0, 1);
    within(Duration::from_secs(60), async {
        while pushes < PUSHES || next_seq <= REQUESTS {
            let frame = rd
                .next()
                .await
                .expect("connection open")
                .expect("a well-formed frame");
            match frame.op {
                Op(1000) => {
                    assert_eq!(frame.body, pushes.to_string().as_bytes(), "push order");
                    pushes += 1;
                }
                Op::HEARTBEAT_REPLY => {
                    assert_eq!(frame.seq, next_seq, "reply order");
                    assert_ne!(next_seq % 3, 0);
                    next_seq += 1;
                }
                Op::CHANGE_ROOM_REPLY => {
                    assert_eq!(frame.seq, next_seq, "reply order");
                    assert_eq!(frame.body, format!("live://o{next_seq}").as_bytes());
                    next_seq += 1;
                }
                op => panic!("unexpected {op} after {pushes} pushes"),
            }
        }
    })
    .await;
    let _wr = writer.await.unwrap();

    let paths = ["direct", "partial", "queued"].map(|p| writes(&registry, p));
    println!("warm-up {warm_up}, then direct/partial/queued: {paths:?}");
    assert_eq!(paths.iter().sum::<u64>(), PUSHES as u64 + warm_up);
    comet.stop().await;
}

/// A logic that, asked an IM request, pushes a frame to the asking
/// connection before it answers, as a business reacting to a message may.
struct PushingLogic {
    scripted: Arc<ScriptedLogic>,
    comet: OnceLock<Comet>,
}

#[async_trait]
impl LogicApi for PushingLogic {
    async fn connect(&self, req: logic::ConnectRequest) -> RpcResult<logic::ConnectReply> {
        self.scripted.connect(req).await
    }

    async fn disconnect(&self, req: logic::DisconnectRequest) -> RpcResult<bool> {
        self.scripted.disconnect(req).await
    }

    async fn heartbeat(&self, req: logic::HeartbeatRequest) -> RpcResult<logic::HeartbeatReply> {
        self.scripted.heartbeat(req).await
    }

    async fn renew_online(
        &self,
        req: logic::RenewOnlineRequest,
    ) -> RpcResult<logic::RenewOnlineReply> {
        self.scripted.renew_online(req).await
    }

    async fn receive(&self, req: logic::ReceiveRequest) -> RpcResult<logic::ReceiveReply> {
        if let Some(comet) = self.comet.get() {
            let delivery = comet
                .push_msg(push_request(&req.key, Bytes::from_static(b"during")))
                .await?;
            assert_eq!(delivery.delivered, 1);
        }
        self.scripted.receive(req).await
    }

    async fn nodes(&self, req: logic::NodesRequest) -> RpcResult<logic::NodesReply> {
        self.scripted.nodes(req).await
    }
}

/// A push made while the connection task is answering a request reaches
/// the client after the answer, as it did before pushes could be written
/// directly: the task holds the socket from the moment it reads a frame.
#[tokio::test]
async fn a_push_made_while_a_request_is_answered_comes_after_the_answer() {
    let scripted = Arc::new(ScriptedLogic::default());
    let logic = Arc::new(PushingLogic {
        scripted: Arc::clone(&scripted),
        comet: OnceLock::new(),
    });
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let comet = start_custom(test_config(), scripted, logic.clone(), tcp).await;
    assert!(logic.comet.set(comet.comet.clone()).is_ok());
    let registry = registry(&comet);
    let mut client = Raw::connect(comet.tcp, None).await;
    client.auth(&token(1, "i", "", &[1000])).await;

    for round in 0..5 {
        // The connection is idle: a push now would be written directly.
        until_direct(&comet, &registry, "i", &mut client).await;
        let seq = 100 + round;
        client
            .send(Frame::new(Op::IM_SYNC, seq, Bytes::from_static(b"q")))
            .await;
        let reply = client.next().await;
        assert_eq!(
            (reply.op, reply.seq),
            (Op::IM_SYNC_REPLY, seq),
            "the answer first"
        );
        assert_eq!(&reply.body[..], b"re:q");
        assert_eq!(&client.next().await.body[..], b"during");
    }
    comet.stop().await;
}

/// Binds a raw TCP listener whose accepted sockets have a small send
/// buffer, so that a client that stops reading fills it quickly.
fn small_send_buffer_listener() -> TcpListener {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(4_096).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    socket.listen(128).unwrap()
}

/// Returns the body of numbered push `i`: its number, then filler that
/// depends on it, so that a byte out of place shows.
fn numbered(i: usize, len: usize) -> Bytes {
    let mut body = format!("{i:06}:").into_bytes();
    body.extend((0..len - body.len()).map(|j| b'a' + ((i + j) % 26) as u8));
    Bytes::from(body)
}

/// A client that stops reading makes a direct write go partial and later
/// pushes queue behind it; once it reads again it gets every byte in
/// order: every frame decodes and carries what was pushed.
#[tokio::test]
async fn a_client_that_stops_reading_gets_every_push_whole_and_in_order() {
    const SMALL: usize = 3;
    const LATER: usize = 300;
    let config = rim_config::CometConfig {
        write_queue: 1_024,
        slow_consumer_timeout: Duration::from_secs(60),
        ..test_config()
    };
    let scripted = Arc::new(ScriptedLogic::default());
    let comet = start_custom(
        config,
        Arc::clone(&scripted),
        scripted,
        small_send_buffer_listener(),
    )
    .await;
    let registry = registry(&comet);
    let mut client = Raw::connect(comet.tcp, Some(4_096)).await;
    client.auth(&token(1, "s", "", &[1000])).await;
    let warm_up = until_direct(&comet, &registry, "s", &mut client).await;

    // The client stops reading. A few small pushes fit in the socket
    // buffers; a big one cannot: it is begun by the pusher and finished by
    // the connection task; the pushes after it queue behind it.
    let mut expected = Vec::new();
    for i in 0..SMALL {
        expected.push(numbered(i, 100));
    }
    expected.push(numbered(SMALL, 2 << 20));
    for i in SMALL + 1..=SMALL + LATER {
        expected.push(numbered(i, 1_000));
    }
    for (i, body) in expected.iter().enumerate() {
        let delivery = comet
            .comet
            .push_msg(push_request("s", body.clone()))
            .await
            .unwrap();
        assert_eq!(delivery.delivered, 1, "push {i}");
        if i == SMALL - 1 {
            // The warm-up's last push and these went out whole.
            assert_eq!(writes(&registry, "direct"), 1 + SMALL as u64);
        }
    }
    assert_eq!(
        writes(&registry, "partial"),
        1,
        "the big push is begun directly"
    );
    // A heartbeat meanwhile: its reply goes out between pushes, whole.
    client
        .send(Frame::new(Op::HEARTBEAT, 7, Bytes::new()))
        .await;

    let mut heartbeat_replies = 0;
    let mut got = 0;
    while got < expected.len() || heartbeat_replies == 0 {
        let frame = client.next().await;
        match frame.op {
            Op(1000) => {
                assert!(
                    frame.body == expected[got],
                    "push {got} arrived corrupted ({} bytes, starts {:?})",
                    frame.body.len(),
                    String::from_utf8_lossy(&frame.body[..frame.body.len().min(16)])
                );
                got += 1;
            }
            Op::HEARTBEAT_REPLY => {
                assert_eq!(frame.seq, 7);
                heartbeat_replies += 1;
            }
            op => panic!("unexpected {op} after {got} pushes"),
        }
    }
    assert_eq!(heartbeat_replies, 1);
    let paths = ["direct", "partial", "queued"].map(|p| writes(&registry, p));
    assert_eq!(paths.iter().sum::<u64>(), warm_up + expected.len() as u64);
    assert!(
        paths[2] >= LATER as u64,
        "the pushes after the big one queue: {paths:?}"
    );

    // Idle again: pushes go the direct path once more.
    until_direct(&comet, &registry, "s", &mut client).await;
    comet.stop().await;
}

/// A client that never reads again is still closed as a slow consumer
/// after comet.slow_consumer_timeout, whether its pushes began directly or
/// queued.
#[tokio::test]
async fn a_stuck_client_on_the_direct_path_is_closed_as_a_slow_consumer() {
    let config = rim_config::CometConfig {
        write_queue: 8,
        slow_consumer_timeout: Duration::from_millis(300),
        ..test_config()
    };
    let scripted = Arc::new(ScriptedLogic::default());
    let comet = start_custom(
        config,
        Arc::clone(&scripted),
        scripted.clone(),
        small_send_buffer_listener(),
    )
    .await;
    let registry = registry(&comet);
    let mut client = Raw::connect(comet.tcp, Some(4_096)).await;
    client.auth(&token(1, "x", "", &[1000])).await;
    let warm_up = until_direct(&comet, &registry, "x", &mut client).await;

    let body = Bytes::from(vec![b'x'; 1_000]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut pushed = 0;
    while comet.comet.stats().await.unwrap().slow_consumer_closes == 0 {
        assert!(
            tokio::time::Instant::now() < deadline && pushed < 100_000,
            "never closed after {pushed} pushes"
        );
        comet
            .comet
            .push_msg(push_request("x", body.clone()))
            .await
            .unwrap();
        pushed += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(
        writes(&registry, "direct") > warm_up,
        "some pushes went out directly"
    );
    assert!(
        writes(&registry, "partial") + writes(&registry, "queued") > 0,
        "and some had to wait"
    );
    // The comet lets go of the connection: the key leaves and logic hears
    // of it once.
    eventually(Duration::from_secs(5), || {
        comet.logic.disconnects_of("x") == 1
    })
    .await;
    assert_eq!(comet.push_keys(&["x"], 1000, "late").await.missing, 1);
    drop(client);
    comet.stop().await;
}
