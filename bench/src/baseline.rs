//! `rim-bench baseline`: the physical limit of room fan-out on this box —
//! a minimal, plain tokio program that accepts the same clients as a comet
//! and, for each message, writes the same frame bytes to every socket.
//!
//! One task per socket, fed by a tokio broadcast channel: the task answers
//! Auth (op 8) and heartbeats (op 3) itself and `write_all`s every message
//! it receives. Messages arrive through the same gRPC call the job uses on a
//! comet (`BroadcastRoom`), so the driver and the bytes on the wire are the
//! same for rim and the baseline: a single frame is encoded once and shared,
//! an op-9 batch is written as its body (its inner frames), as the comet
//! does over TCP. No batching, no write coalescing beyond what one
//! `write_all` per message does. It has one room: every client is in it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, ensure};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use rim_proto::api::{CometApi, CometGrpc, RpcError, RpcResult};
use rim_proto::pb::comet::v1 as pb;
use rim_proto::{Frame, FrameCodec, Op};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_util::codec::Decoder;

/// Messages a socket task may fall behind before it loses some (counted).
const CHANNEL: usize = 4096;
/// Largest client frame body accepted.
const MAX_CLIENT_BODY: usize = 4096;

/// Options of `rim-bench baseline`.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Client (goim TCP) listen address, loopback only.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub tcp: SocketAddr,
    /// gRPC listen address (the comet service's BroadcastRoom), loopback only.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub grpc: SocketAddr,
    /// The process exits after this many seconds, or when stdin closes.
    #[arg(long, default_value_t = 7200,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub max_secs: u64,
}

struct Baseline {
    tx: broadcast::Sender<Bytes>,
    members: AtomicU64,
    lagged: AtomicU64,
}

#[async_trait]
impl CometApi for Baseline {
    async fn push_msg(&self, _req: pb::PushMsgRequest) -> RpcResult<pb::Delivery> {
        Err(RpcError::InvalidArgument(
            "the baseline serves BroadcastRoom only".into(),
        ))
    }

    async fn broadcast(&self, _req: pb::BroadcastRequest) -> RpcResult<pb::Delivery> {
        Err(RpcError::InvalidArgument(
            "the baseline serves BroadcastRoom only".into(),
        ))
    }

    async fn broadcast_group(&self, _req: pb::BroadcastGroupRequest) -> RpcResult<pb::Delivery> {
        Err(RpcError::InvalidArgument(
            "the baseline serves BroadcastRoom only".into(),
        ))
    }

    async fn change_group(&self, _req: pb::ChangeGroupRequest) -> RpcResult<pb::ChangeGroupReply> {
        Err(RpcError::InvalidArgument(
            "the baseline serves BroadcastRoom only".into(),
        ))
    }

    async fn broadcast_room(&self, req: pb::BroadcastRoomRequest) -> RpcResult<pb::Delivery> {
        let proto = req
            .proto
            .ok_or_else(|| RpcError::InvalidArgument("proto is missing".into()))?;
        let frame = Frame::try_from(proto).map_err(|e| RpcError::InvalidArgument(e.to_string()))?;
        let bytes = if frame.is_batch() {
            frame.body
        } else {
            frame
                .to_bytes()
                .map_err(|e| RpcError::InvalidArgument(e.to_string()))?
        };
        // No receiver = no member: nothing delivered.
        let delivered = self.tx.send(bytes).unwrap_or(0) as u64;
        Ok(pb::Delivery {
            delivered,
            ..pb::Delivery::default()
        })
    }

    async fn rooms(&self) -> RpcResult<Vec<String>> {
        Ok(vec!["live://bench-0".into()])
    }

    async fn kick(&self, _keys: Vec<String>) -> RpcResult<u64> {
        Ok(0)
    }

    async fn stats(&self) -> RpcResult<pb::StatsReply> {
        Ok(pb::StatsReply {
            server_id: "baseline".into(),
            tcp_connections: self.members.load(Ordering::Relaxed),
            dropped_frames: self.lagged.load(Ordering::Relaxed),
            ..pb::StatsReply::default()
        })
    }
}

/// Runs the baseline server until stdin closes or `max_secs` pass.
pub async fn run(args: Args) -> anyhow::Result<()> {
    ensure!(
        args.tcp.ip().is_loopback() && args.grpc.ip().is_loopback(),
        "the baseline listens on 127.0.0.0/8 only"
    );
    if let Err(err) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("baseline: cannot raise the open-file limit: {err}");
    }
    let tcp = TcpListener::bind(args.tcp)
        .await
        .with_context(|| format!("binding {}", args.tcp))?;
    let grpc = TcpListener::bind(args.grpc)
        .await
        .with_context(|| format!("binding {}", args.grpc))?;
    let (tcp_addr, grpc_addr) = (tcp.local_addr()?, grpc.local_addr()?);
    let (tx, _) = broadcast::channel(CHANNEL);
    let baseline = Arc::new(Baseline {
        tx,
        members: AtomicU64::new(0),
        lagged: AtomicU64::new(0),
    });
    let service = CometGrpc(Arc::clone(&baseline)).into_service();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(grpc)),
    );
    let accept = tokio::spawn(accept(tcp, Arc::clone(&baseline)));
    println!("READY {tcp_addr} {grpc_addr}");
    let stdin_closed = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {
            line.clear();
        }
    });
    let _ = tokio::time::timeout(Duration::from_secs(args.max_secs), stdin_closed).await;
    server.abort();
    accept.abort();
    Ok(())
}

async fn accept(listener: TcpListener, baseline: Arc<Baseline>) {
    // Ends when the task is aborted.
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let rx = baseline.tx.subscribe();
                tokio::spawn(serve(stream, rx, Arc::clone(&baseline)));
            }
            Err(err) => {
                eprintln!("baseline: accept: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Answers a client frame: Auth → op 8, heartbeat → op 3 with the member
/// count; anything else is ignored.
fn answer(frame: &Frame, members: u64) -> Option<Bytes> {
    let reply = match frame.op {
        Op::AUTH => Frame::new(Op::AUTH_REPLY, frame.seq, Bytes::new()),
        Op::HEARTBEAT => {
            let count = i32::try_from(members).unwrap_or(i32::MAX);
            Frame::new(Op::HEARTBEAT_REPLY, frame.seq, count.to_be_bytes().to_vec())
        }
        _ => return None,
    };
    reply.to_bytes().ok()
}

async fn serve(mut stream: TcpStream, mut rx: broadcast::Receiver<Bytes>, baseline: Arc<Baseline>) {
    let _ = stream.set_nodelay(true);
    baseline.members.fetch_add(1, Ordering::Relaxed);
    let mut codec = FrameCodec::new(MAX_CLIENT_BODY);
    let mut buf = BytesMut::new();
    loop {
        tokio::select! {
            message = rx.recv() => match message {
                Ok(bytes) => {
                    if stream.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    baseline.lagged.fetch_add(n, Ordering::Relaxed);
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            read = stream.read_buf(&mut buf) => {
                match read {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let mut failed = false;
                // Bounded by the bytes just read.
                loop {
                    match codec.decode(&mut buf) {
                        Ok(Some(frame)) => {
                            let members = baseline.members.load(Ordering::Relaxed);
                            if let Some(reply) = answer(&frame, members)
                                && stream.write_all(&reply).await.is_err()
                            {
                                failed = true;
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(_) => {
                            failed = true;
                            break;
                        }
                    }
                }
                if failed {
                    break;
                }
            }
        }
    }
    baseline.members.fetch_sub(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_auth_and_heartbeats_only() {
        let mut codec = FrameCodec::new(MAX_CLIENT_BODY);
        let auth = answer(&Frame::new(Op::AUTH, 7, Bytes::from_static(b"{}")), 3).unwrap();
        let reply = codec
            .decode(&mut BytesMut::from(&auth[..]))
            .unwrap()
            .unwrap();
        assert_eq!((reply.op, reply.seq), (Op::AUTH_REPLY, 7));
        let hb = answer(&Frame::new(Op::HEARTBEAT, 2, Bytes::new()), 3).unwrap();
        let reply = codec.decode(&mut BytesMut::from(&hb[..])).unwrap().unwrap();
        assert_eq!(
            (reply.op, &reply.body[..]),
            (Op::HEARTBEAT_REPLY, &3i32.to_be_bytes()[..])
        );
        assert!(answer(&Frame::new(Op(1000), 1, Bytes::new()), 3).is_none());
    }

    #[tokio::test]
    async fn serves_real_clients_over_loopback() {
        use crate::wire::{self, Conn, Transport};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, _) = broadcast::channel(CHANNEL);
        let b = Arc::new(Baseline {
            tx,
            members: AtomicU64::new(0),
            lagged: AtomicU64::new(0),
        });
        let accepting = tokio::spawn(accept(listener, Arc::clone(&b)));
        let mut clients = Vec::new();
        for i in 0..3 {
            let mut c = Conn::connect(Transport::Tcp, addr, None).await.unwrap();
            let token = wire::token(i + 1, &format!("k{i}"), "live://bench-0", 1000);
            c.auth(token, Duration::from_secs(5)).await.unwrap();
            clients.push(c);
        }
        // Every member is subscribed once its task runs: wait until it is.
        for _ in 0..100 {
            if b.members.load(Ordering::Relaxed) == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut batch = rim_proto::BatchBuilder::new();
        for seq in 0..2 {
            batch
                .push(&Frame::new(Op(1000), 0, wire::body(1, seq, 32)))
                .unwrap();
        }
        let d = b
            .broadcast_room(pb::BroadcastRoomRequest {
                room_id: "live://bench-0".into(),
                proto: Some(batch.finish().into()),
            })
            .await
            .unwrap();
        assert_eq!(d.delivered, 3);
        for c in &mut clients {
            for seq in 0..2 {
                let f = tokio::time::timeout(Duration::from_secs(5), c.next_frame())
                    .await
                    .unwrap()
                    .unwrap()
                    .unwrap();
                assert_eq!(f.op, Op(1000));
                assert_eq!(wire::parse_body(&f.body), Some((1, seq)));
            }
            c.heartbeat().await.unwrap();
            let reply = c.next_frame().await.unwrap().unwrap();
            assert_eq!(reply.op, Op::HEARTBEAT_REPLY);
        }
        accepting.abort();
    }

    #[tokio::test]
    async fn writes_frames_and_batch_bodies_to_every_member() {
        let (tx, mut rx1) = broadcast::channel(16);
        let mut rx2 = tx.subscribe();
        let b = Baseline {
            tx,
            members: AtomicU64::new(2),
            lagged: AtomicU64::new(0),
        };
        let frame = Frame::new(Op(1000), 0, Bytes::from_static(b"hello"));
        let req = |f: Frame| pb::BroadcastRoomRequest {
            room_id: "live://bench-0".into(),
            proto: Some(f.into()),
        };
        let d = b.broadcast_room(req(frame.clone())).await.unwrap();
        assert_eq!(d.delivered, 2);
        let expected = frame.to_bytes().unwrap();
        assert_eq!(rx1.recv().await.unwrap(), expected);
        assert_eq!(rx2.recv().await.unwrap(), expected);
        let mut batch = rim_proto::BatchBuilder::new();
        batch.push(&frame).unwrap();
        batch.push(&frame).unwrap();
        b.broadcast_room(req(batch.finish())).await.unwrap();
        let body = rx1.recv().await.unwrap();
        assert_eq!(body.len(), 2 * expected.len());
        assert!(
            b.broadcast_room(pb::BroadcastRoomRequest::default())
                .await
                .is_err()
        );
    }
}
