//! The one consume loop: messages from the queue's [`Consumer`] (Kafka or
//! in-process, the loop does not know which) handed to the job, each
//! message's receipt handled once the job fully handled it, so that the
//! queue commits only what was delivered (at-least-once).

use std::time::Duration;

use rim_queue::{Consumer, Delivery};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::Job;
use crate::metrics::kind_label;

/// How long shutdown waits for messages in flight before the final commit.
pub const FINAL_WAIT: Duration = Duration::from_secs(10);

/// Hands every message of `consumer` to `job` until `stop` is cancelled or
/// the queue closes, then waits up to [`FINAL_WAIT`] for what is in flight
/// and commits it. The consumer bounds how many messages are in flight.
pub async fn consume<C: Consumer>(
    job: Job,
    mut consumer: C,
    stop: CancellationToken,
) -> rim_queue::Result<()> {
    job.metrics.watch_lag(consumer.lag());
    job.metrics.watch_held_bytes(consumer.held_bytes());
    loop {
        let received = tokio::select! {
            () = stop.cancelled() => break,
            received = consumer.recv() => received,
        };
        let Some(Delivery { msg, receipt }) = received? else {
            break;
        };
        let (partition, offset) = receipt.position();
        let span = tracing::debug_span!(
            "push",
            kind = kind_label(msg.r#type()),
            push.id = msg.accepted_unix_nanos,
            op = msg.operation,
            partition,
            offset,
        );
        let ticket = job.deliver(msg).instrument(span).await;
        tokio::spawn(async move {
            ticket.await;
            receipt.handled();
        });
    }
    consumer.close(FINAL_WAIT).await
}
