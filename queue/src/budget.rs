//! A byte budget: how many bytes of push messages this process holds for the
//! queue, bounded by `queue.max_bytes`. The in-process queue reserves a
//! message's bytes when it is sent and releases them when the job handled
//! it (so the bound covers what waits and what is in flight); the Kafka
//! consumer counts what it handed out and not yet handled. One message
//! always fits, however large, so that nothing is refused forever.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// Bytes held against a limit.
#[derive(Debug)]
pub(crate) struct Budget {
    used: AtomicUsize,
    limit: usize,
    released: Notify,
}

/// Reads how many bytes a queue holds in this process, and its limit.
#[derive(Clone, Debug)]
pub struct HeldBytes(Arc<Budget>);

impl HeldBytes {
    /// Returns the bytes held now.
    pub fn get(&self) -> usize {
        self.0.used.load(Ordering::Acquire)
    }

    /// Returns the limit (`queue.max_bytes`).
    pub fn limit(&self) -> usize {
        self.0.limit
    }
}

impl Budget {
    /// Creates an empty budget of `limit` bytes (at least 1).
    pub(crate) fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            used: AtomicUsize::new(0),
            limit: limit.max(1),
            released: Notify::new(),
        })
    }

    /// Returns a read handle (for metrics).
    pub(crate) fn held(self: &Arc<Self>) -> HeldBytes {
        HeldBytes(Arc::clone(self))
    }

    /// Returns the limit.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Takes `bytes` if they fit (or if nothing is held); false otherwise.
    fn try_take(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used == 0 || used.saturating_add(bytes) <= self.limit)
                    .then(|| used.saturating_add(bytes))
            })
            .is_ok()
    }

    /// Takes `bytes`, waiting up to `wait` for enough to be released;
    /// false when they did not fit in time.
    pub(crate) async fn take(&self, bytes: usize, wait: Duration) -> bool {
        tokio::time::timeout(wait, async {
            loop {
                let released = self.released.notified();
                tokio::pin!(released);
                released.as_mut().enable();
                if self.try_take(bytes) {
                    return;
                }
                released.await;
            }
        })
        .await
        .is_ok()
    }

    /// Waits until less than the limit is held (something may be added).
    pub(crate) async fn below_limit(&self) {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if self.used.load(Ordering::Acquire) < self.limit {
                return;
            }
            released.await;
        }
    }

    /// Adds `bytes` without a check (the caller waited for `below_limit`).
    pub(crate) fn add(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Gives `bytes` back.
    pub(crate) fn release(&self, bytes: usize) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(bytes))
            });
        self.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bytes_over_the_limit_wait_for_a_release() {
        let budget = Budget::new(100);
        assert!(budget.take(60, Duration::ZERO).await);
        assert!(!budget.take(60, Duration::from_secs(1)).await, "160 > 100");
        let waiting = {
            let budget = Arc::clone(&budget);
            tokio::spawn(async move { budget.take(60, Duration::from_secs(5)).await })
        };
        tokio::task::yield_now().await;
        budget.release(60);
        assert!(waiting.await.unwrap());
        assert_eq!(budget.held().get(), 60);
    }

    #[tokio::test]
    async fn one_message_always_fits() {
        let budget = Budget::new(10);
        assert!(budget.take(1_000, Duration::ZERO).await);
        assert!(!budget.take(1, Duration::ZERO).await);
        budget.release(1_000);
        assert!(budget.take(1, Duration::ZERO).await);
    }
}
