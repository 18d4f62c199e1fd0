//! The bounded in-process queue of standalone mode.

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::{Error, Producer, PushMsg, Result, partition_key};

/// How long a producer waits for room in a full queue before it reports the
/// queue full (HTTP 503 to the pusher) rather than block forever.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Creates a queue holding at most `capacity` messages.
pub fn memory_queue(capacity: usize) -> (MemoryProducer, MemoryConsumer) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let depth = QueueDepth(tx.downgrade());
    (MemoryProducer { tx }, MemoryConsumer { rx, depth })
}

/// The sending side; cheap to clone.
#[derive(Clone, Debug)]
pub struct MemoryProducer {
    /// Full = producers wait up to SEND_TIMEOUT, then get `Error::Full`.
    tx: mpsc::Sender<PushMsg>,
}

/// The receiving side, for the job of the same process.
#[derive(Debug)]
pub struct MemoryConsumer {
    rx: mpsc::Receiver<PushMsg>,
    depth: QueueDepth,
}

/// Reads how many messages wait in an in-process queue (for metrics); it
/// does not keep the queue open.
#[derive(Clone, Debug)]
pub struct QueueDepth(mpsc::WeakSender<PushMsg>);

impl QueueDepth {
    /// Returns the number of queued messages; 0 once every producer is gone.
    pub fn get(&self) -> usize {
        self.0
            .upgrade()
            .map_or(0, |tx| tx.max_capacity() - tx.capacity())
    }
}

impl MemoryConsumer {
    /// Returns a handle reading this queue's depth.
    pub fn depth(&self) -> QueueDepth {
        self.depth.clone()
    }

    /// Returns the next message; `None` once every producer is gone.
    pub async fn recv(&mut self) -> Option<PushMsg> {
        self.rx.recv().await
    }
}

#[async_trait]
impl Producer for MemoryProducer {
    async fn send(&self, msg: PushMsg) -> Result<()> {
        partition_key(&msg)?;
        match self.tx.send_timeout(msg, SEND_TIMEOUT).await {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => Err(Error::Full(format!(
                "in-process queue stayed full for {SEND_TIMEOUT:?}"
            ))),
            Err(mpsc::error::SendTimeoutError::Closed(_)) => Err(Error::Unavailable(
                "in-process queue has no consumer".into(),
            )),
        }
    }

    async fn ping(&self) -> Result<()> {
        if self.tx.is_closed() {
            return Err(Error::Unavailable(
                "in-process queue has no consumer".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PushType;

    fn push(key: &str) -> PushMsg {
        PushMsg {
            r#type: PushType::Push as i32,
            keys: vec![key.into()],
            ..PushMsg::default()
        }
    }

    #[tokio::test]
    async fn messages_arrive_in_order() {
        let (producer, mut consumer) = memory_queue(8);
        for i in 0..5 {
            producer.send(push(&format!("k{i}"))).await.unwrap();
        }
        for i in 0..5 {
            assert_eq!(consumer.recv().await.unwrap().keys, vec![format!("k{i}")]);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_reports_full_instead_of_blocking_forever() {
        let (producer, _consumer) = memory_queue(1);
        producer.send(push("a")).await.unwrap();
        assert!(matches!(
            producer.send(push("b")).await,
            Err(Error::Full(_))
        ));
    }

    #[tokio::test]
    async fn the_depth_counts_queued_messages() {
        let (producer, mut consumer) = memory_queue(8);
        let depth = consumer.depth();
        assert_eq!(depth.get(), 0);
        producer.send(push("a")).await.unwrap();
        producer.send(push("b")).await.unwrap();
        assert_eq!(depth.get(), 2);
        consumer.recv().await.unwrap();
        assert_eq!(depth.get(), 1);
        drop(producer);
        assert_eq!(depth.get(), 0);
    }

    #[tokio::test]
    async fn without_a_consumer_the_queue_is_unavailable() {
        let (producer, consumer) = memory_queue(1);
        drop(consumer);
        assert!(matches!(producer.ping().await, Err(Error::Unavailable(_))));
        assert!(matches!(
            producer.send(push("a")).await,
            Err(Error::Unavailable(_))
        ));
    }

    #[tokio::test]
    async fn invalid_messages_are_refused() {
        let (producer, _consumer) = memory_queue(1);
        assert!(matches!(
            producer.send(PushMsg::default()).await,
            Err(Error::Invalid(_))
        ));
    }
}
