//! The consuming half: messages handed out with a receipt, at most a bounded
//! number at a time, committed once handled.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::budget::Budget;
use crate::tracker::{Position, Tracker};
use crate::{Error, HeldBytes, PushMsg, Result};

/// Reads push messages from the queue.
///
/// Every message comes with a [`Receipt`]. A message's position is committed
/// once its receipt, and the receipt of every earlier message of its
/// partition, is [handled](Receipt::handled); a consumer that stops without
/// committing (a crash) leaves the rest to be delivered again to the next
/// consumer (at-least-once). At most `max_in_flight` receipts are out at
/// once: [`Consumer::recv`] waits for one to be handled before handing out
/// another.
#[async_trait]
pub trait Consumer: Send + 'static {
    /// Returns the next message; `Ok(None)` when the queue is closed for good
    /// (the in-process queue lost every producer).
    ///
    /// Cancel-safe: a message whose `recv` is dropped is never lost; it is
    /// handed out again after a restart.
    async fn recv(&mut self) -> Result<Option<Delivery>>;

    /// Returns a handle that reads how far behind this consumer is.
    fn lag(&self) -> Lag;

    /// Returns a handle that reads the bytes of push messages the queue
    /// holds in this process (in-process: waiting and in flight; Kafka: in
    /// flight), against `queue.max_bytes`.
    fn held_bytes(&self) -> HeldBytes;

    /// Stops consuming: waits up to `grace` for the receipts still out to be
    /// handled, then commits what was handled.
    async fn close(self, grace: Duration) -> Result<()>
    where
        Self: Sized;
}

/// A message taken from the queue and the receipt that acknowledges it.
#[derive(Debug)]
pub struct Delivery {
    /// The push message.
    pub msg: PushMsg,
    /// Acknowledges the message once handled.
    pub receipt: Receipt,
}

/// Acknowledges one message. [`Receipt::handled`] lets its position be
/// committed; dropping a receipt unhandled keeps the message (and every later
/// one of its partition) uncommitted, so it is delivered again after a
/// restart. Holding a receipt holds one of the consumer's in-flight slots
/// and the message's bytes in the queue's byte budget.
#[derive(Debug)]
pub struct Receipt {
    tracker: Arc<Mutex<Tracker>>,
    at: Position,
    bytes: HeldFor,
    _slot: OwnedSemaphorePermit,
}

/// A message's bytes in a budget, given back when it is handled — and when
/// its receipt is dropped, if `on_drop` (a Kafka message: it is read again
/// from the broker; an in-process message stays held until delivered).
#[derive(Debug)]
pub(crate) struct HeldFor {
    budget: Arc<Budget>,
    bytes: usize,
    on_drop: bool,
}

impl HeldFor {
    pub(crate) fn new(budget: Arc<Budget>, bytes: usize, on_drop: bool) -> HeldFor {
        HeldFor {
            budget,
            bytes,
            on_drop,
        }
    }

    fn release(&mut self) {
        self.budget.release(std::mem::take(&mut self.bytes));
    }
}

impl Drop for HeldFor {
    fn drop(&mut self) {
        if self.on_drop {
            self.release();
        }
    }
}

impl Receipt {
    pub(crate) fn new(
        tracker: Arc<Mutex<Tracker>>,
        at: Position,
        bytes: HeldFor,
        slot: OwnedSemaphorePermit,
    ) -> Receipt {
        Receipt {
            tracker,
            at,
            bytes,
            _slot: slot,
        }
    }

    /// Returns the message's partition and offset (for logs).
    pub fn position(&self) -> (i32, i64) {
        (self.at.partition, self.at.offset)
    }

    /// Marks the message handled: delivered, refused as invalid, or its
    /// destination gone — anything that must not be retried.
    pub fn handled(mut self) {
        self.tracker.lock().done(self.at);
        self.bytes.release();
    }
}

/// Reads a consumer's lag: messages not yet consumed, by partition label
/// (Kafka partition numbers; `memory` for the in-process queue).
#[derive(Clone)]
pub struct Lag(Arc<dyn Fn() -> Vec<(String, i64)> + Send + Sync>);

impl std::fmt::Debug for Lag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Lag").field(&self.read()).finish()
    }
}

impl Lag {
    /// Creates a lag handle that calls `read` on each read.
    pub fn new(read: impl Fn() -> Vec<(String, i64)> + Send + Sync + 'static) -> Lag {
        Lag(Arc::new(read))
    }

    /// Returns the lag of each partition known so far.
    pub fn read(&self) -> Vec<(String, i64)> {
        (self.0)()
    }
}

/// A consumer's in-flight slots: one per receipt out.
#[derive(Debug)]
pub(crate) struct Slots {
    semaphore: Arc<Semaphore>,
    max: usize,
}

impl Slots {
    /// Creates `max` slots (at least one).
    pub(crate) fn new(max: usize) -> Slots {
        let max = max.max(1);
        Slots {
            semaphore: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// Waits for a free slot; it is freed when the permit (held by a
    /// receipt) is dropped.
    pub(crate) async fn acquire(&self) -> Result<OwnedSemaphorePermit> {
        Arc::clone(&self.semaphore)
            .acquire_owned()
            .await
            .map_err(|_| Error::Closed("the consumer's in-flight slots are closed"))
    }

    /// Waits up to `grace` for every slot to be free (every receipt handled
    /// or dropped); logs how many messages are still out otherwise.
    pub(crate) async fn drain(&self, grace: Duration, tracker: &Mutex<Tracker>) {
        let all = u32::try_from(self.max).unwrap_or(u32::MAX);
        if tokio::time::timeout(grace, self.semaphore.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!(
                in_flight = tracker.lock().outstanding(),
                "consumer closed with messages still in flight; they will be delivered again"
            );
        }
    }
}
