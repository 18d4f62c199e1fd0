//! The push benchmarks' client side: the loop that receives a client's
//! frames and sends its heartbeats, started for every client that connected.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rim_client::Client;
use rim_proto::{Frame, Op};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Where the clients' frames are recorded.
pub(crate) trait FrameSink: Send + Sync + 'static {
    /// A frame client `client` received.
    fn on_frame(&self, client: usize, frame: &Frame);
    /// A client's connection ended before the benchmark stopped it.
    fn on_lost(&self);
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
