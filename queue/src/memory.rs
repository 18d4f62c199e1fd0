//! The bounded in-process queue of standalone mode, both halves.
//!
//! Like a Kafka consumer group with one member, the queue keeps what its
//! consumer took until it was handled: a consumer dropped without handling
//! its messages (a job task that died) leaves them to the next consumer of
//! the same queue, in order, ahead of newer messages. Nothing survives the
//! process itself.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::mpsc;

use prost::Message as _;

use crate::budget::Budget;
use crate::consumer::{Consumer, Delivery, HeldFor, Lag, Receipt, Slots};
use crate::tracker::Tracker;
use crate::{Error, HeldBytes, Producer, PushMsg, Result, partition_key};

/// How long a producer waits for room in a full queue before it reports the
/// queue full (HTTP 503 to the pusher) rather than block forever.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// The in-process queue has one partition.
const PARTITION: i32 = 0;

/// Creates a queue holding at most `capacity` messages not yet taken by its
/// consumer, and at most `max_bytes` bytes of messages (encoded size) not yet
/// handled by the job — waiting or in flight.
pub fn memory_queue(capacity: usize, max_bytes: usize) -> (MemoryProducer, MemoryQueue) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let budget = Budget::new(max_bytes);
    let queue = MemoryQueue {
        shared: Arc::new(Mutex::new(Shared {
            rx: Some(rx),
            redeliver: VecDeque::new(),
        })),
        depth: tx.downgrade(),
        budget: Arc::clone(&budget),
    };
    (MemoryProducer { tx, budget }, queue)
}

/// The sending side; cheap to clone.
#[derive(Clone, Debug)]
pub struct MemoryProducer {
    /// Full = producers wait up to SEND_TIMEOUT, then get `Error::Full`.
    tx: mpsc::Sender<PushMsg>,
    /// Over budget = the same.
    budget: Arc<Budget>,
}

#[async_trait]
impl Producer for MemoryProducer {
    async fn send(&self, msg: PushMsg) -> Result<()> {
        partition_key(&msg)?;
        if self.tx.is_closed() {
            return Err(Error::Closed("the in-process queue has no consumer"));
        }
        let bytes = msg.encoded_len();
        if !self.budget.take(bytes, SEND_TIMEOUT).await {
            return Err(Error::Full {
                limit: format!("queue.max_bytes ({} bytes held)", self.budget.limit()),
                waited: SEND_TIMEOUT,
            });
        }
        match self.tx.send_timeout(msg, SEND_TIMEOUT).await {
            Ok(()) => Ok(()),
            Err(err) => {
                self.budget.release(bytes);
                Err(match err {
                    mpsc::error::SendTimeoutError::Timeout(_) => Error::Full {
                        limit: format!(
                            "queue.capacity ({} messages waiting)",
                            self.tx.max_capacity()
                        ),
                        waited: SEND_TIMEOUT,
                    },
                    mpsc::error::SendTimeoutError::Closed(_) => {
                        Error::Closed("the in-process queue has no consumer")
                    }
                })
            }
        }
    }

    async fn ping(&self) -> Result<()> {
        if self.tx.is_closed() {
            return Err(Error::Closed("the in-process queue has no consumer"));
        }
        Ok(())
    }
}

/// The receiving side of an in-process queue, from which one consumer at a
/// time reads.
#[derive(Debug)]
pub struct MemoryQueue {
    shared: Arc<Mutex<Shared>>,
    depth: mpsc::WeakSender<PushMsg>,
    budget: Arc<Budget>,
}

#[derive(Debug)]
struct Shared {
    /// Taken by the current consumer, given back when it is dropped.
    rx: Option<mpsc::Receiver<PushMsg>>,
    /// What a dropped consumer took and did not get handled, oldest first.
    redeliver: VecDeque<PushMsg>,
}

impl MemoryQueue {
    /// Starts the queue's consumer, with at most `max_in_flight` messages
    /// out at once; fails while another consumer of this queue exists.
    pub fn consumer(&self, max_in_flight: usize) -> Result<MemoryConsumer> {
        let mut shared = self.shared.lock();
        let rx = shared
            .rx
            .take()
            .ok_or(Error::Closed("the in-process queue already has a consumer"))?;
        Ok(MemoryConsumer {
            rx: Some(rx),
            redeliver: std::mem::take(&mut shared.redeliver),
            shared: Arc::clone(&self.shared),
            depth: self.depth.clone(),
            budget: Arc::clone(&self.budget),
            tracker: Arc::new(Mutex::new(Tracker::default())),
            retained: BTreeMap::new(),
            next_offset: 0,
            slots: Slots::new(max_in_flight),
        })
    }
}

/// The consumer of an in-process queue.
#[derive(Debug)]
pub struct MemoryConsumer {
    rx: Option<mpsc::Receiver<PushMsg>>,
    /// Left by a previous consumer; handed out before `rx`.
    redeliver: VecDeque<PushMsg>,
    shared: Arc<Mutex<Shared>>,
    depth: mpsc::WeakSender<PushMsg>,
    /// Bytes reserved by the producer, given back when a message is handled.
    budget: Arc<Budget>,
    tracker: Arc<Mutex<Tracker>>,
    /// Messages handed out and not yet committed, by offset.
    retained: BTreeMap<i64, PushMsg>,
    next_offset: i64,
    slots: Slots,
}

impl MemoryConsumer {
    /// Forgets the messages whose handling is committed.
    fn commit(&mut self) {
        for (_, next) in self.tracker.lock().committable(None) {
            self.retained = self.retained.split_off(&next);
        }
    }
}

#[async_trait]
impl Consumer for MemoryConsumer {
    async fn recv(&mut self) -> Result<Option<Delivery>> {
        let slot = self.slots.acquire().await?;
        self.commit();
        let msg = match self.redeliver.pop_front() {
            Some(msg) => msg,
            None => match self.rx.as_mut() {
                Some(rx) => match rx.recv().await {
                    Some(msg) => msg,
                    None => return Ok(None),
                },
                None => return Ok(None),
            },
        };
        let offset = self.next_offset;
        self.next_offset += 1;
        let at = self.tracker.lock().start(PARTITION, offset);
        // The producer reserved the bytes; an unhandled receipt keeps them
        // (the message goes to the next consumer).
        let held = HeldFor::new(Arc::clone(&self.budget), msg.encoded_len(), false);
        self.retained.insert(offset, msg.clone());
        Ok(Some(Delivery {
            msg,
            receipt: Receipt::new(Arc::clone(&self.tracker), at, held, slot),
        }))
    }

    fn lag(&self) -> Lag {
        let depth = self.depth.clone();
        let shared = Arc::clone(&self.shared);
        Lag::new(move || {
            let queued = depth
                .upgrade()
                .map_or(0, |tx| tx.max_capacity() - tx.capacity());
            let left = shared.lock().redeliver.len();
            vec![(
                "memory".to_owned(),
                i64::try_from(queued + left).unwrap_or(i64::MAX),
            )]
        })
    }

    fn held_bytes(&self) -> HeldBytes {
        self.budget.held()
    }

    async fn close(mut self, grace: Duration) -> Result<()> {
        self.slots.drain(grace, &self.tracker).await;
        self.commit();
        Ok(())
    }
}

impl Drop for MemoryConsumer {
    fn drop(&mut self) {
        self.commit();
        let mut shared = self.shared.lock();
        // What was taken and not committed goes back first, in order: like a
        // Kafka partition read again from its committed offset.
        let mut back: VecDeque<PushMsg> =
            std::mem::take(&mut self.retained).into_values().collect();
        back.extend(self.redeliver.drain(..));
        back.extend(shared.redeliver.drain(..));
        shared.redeliver = back;
        shared.rx = self.rx.take();
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

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_reports_full_instead_of_blocking_forever() {
        let (producer, _queue) = memory_queue(1, 1 << 20);
        producer.send(push("a")).await.unwrap();
        let full = producer.send(push("b")).await.unwrap_err();
        assert!(full.to_string().contains("queue.capacity"), "{full}");
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_are_held_until_the_job_handled_them() {
        let big = |i: usize| PushMsg {
            msg: bytes::Bytes::from(vec![b'x'; 64 << 10]),
            ..push(&format!("k{i}"))
        };
        let (producer, queue) = memory_queue(1024, 256 << 10);
        let mut consumer = queue.consumer(1024).unwrap();
        let held = consumer.held_bytes();
        for i in 0..3 {
            producer.send(big(i)).await.unwrap();
        }
        // Taken by the consumer but not handled: still held.
        let first = consumer.recv().await.unwrap().unwrap();
        let full = producer.send(big(3)).await.unwrap_err();
        assert!(full.to_string().contains("queue.max_bytes"), "{full}");
        assert!(held.get() > 3 * (64 << 10), "{}", held.get());
        first.receipt.handled();
        producer.send(big(3)).await.unwrap();
    }

    #[tokio::test]
    async fn the_lag_counts_queued_and_left_messages() {
        let (producer, queue) = memory_queue(8, 1 << 20);
        let consumer = queue.consumer(4).unwrap();
        let lag = consumer.lag();
        assert_eq!(lag.read(), vec![("memory".to_owned(), 0)]);
        producer.send(push("a")).await.unwrap();
        producer.send(push("b")).await.unwrap();
        assert_eq!(lag.read(), vec![("memory".to_owned(), 2)]);
        let mut consumer = consumer;
        consumer.recv().await.unwrap().unwrap().receipt.handled();
        assert_eq!(lag.read(), vec![("memory".to_owned(), 1)]);
    }

    #[tokio::test]
    async fn without_a_consumer_the_queue_is_unavailable() {
        let (producer, queue) = memory_queue(1, 1 << 20);
        drop(queue);
        assert!(matches!(producer.ping().await, Err(Error::Closed(_))));
        assert!(matches!(
            producer.send(push("a")).await,
            Err(Error::Closed(_))
        ));
    }

    #[tokio::test]
    async fn one_consumer_at_a_time() {
        let (_producer, queue) = memory_queue(1, 1 << 20);
        let first = queue.consumer(1).unwrap();
        assert!(matches!(queue.consumer(1), Err(Error::Closed(_))));
        drop(first);
        assert!(queue.consumer(1).is_ok());
    }

    #[tokio::test]
    async fn invalid_messages_are_refused() {
        let (producer, _queue) = memory_queue(1, 1 << 20);
        assert!(matches!(
            producer.send(PushMsg::default()).await,
            Err(Error::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn the_queue_ends_when_every_producer_is_gone() {
        let (producer, queue) = memory_queue(4, 1 << 20);
        producer.send(push("a")).await.unwrap();
        drop(producer);
        let mut consumer = queue.consumer(4).unwrap();
        consumer.recv().await.unwrap().unwrap().receipt.handled();
        assert!(consumer.recv().await.unwrap().is_none());
    }
}
