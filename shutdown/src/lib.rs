//! rim-shutdown owns graceful shutdown: one [`Shutdown`] per process, made
//! of a `CancellationToken` that every role watches and a `TaskTracker` that
//! every spawned task joins, so the process can wait for its tasks to finish
//! within a grace period.
//!
//! It does not decide the order in which a role winds down (stop accepting,
//! deregister, drain, commit): each role's wiring in the binary
//! (`src/roles/`) does that, watching the token.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A process-wide shutdown signal plus the tasks that must finish before exit.
///
/// Cloning is cheap; clones share the signal and the tracker.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    token: CancellationToken,
    tracker: TaskTracker,
}

/// How a wait for tracked tasks ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drained {
    /// Every tracked task finished.
    Complete,
    /// The grace period ran out with this many tasks still running.
    TimedOut {
        /// Tasks still running.
        remaining: usize,
    },
}

impl Shutdown {
    /// Creates a shutdown signal that nothing has triggered yet.
    pub fn new() -> Self {
        Shutdown::default()
    }

    /// Triggers shutdown when the process gets SIGINT or SIGTERM.
    ///
    /// A second signal after the first is logged and ignored; the grace period
    /// bounds how long shutdown takes.
    pub fn on_signals(&self) -> std::io::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        let token = self.token.clone();
        tokio::spawn(async move {
            let name = tokio::select! {
                _ = sigint.recv() => "SIGINT",
                _ = sigterm.recv() => "SIGTERM",
                () = token.cancelled() => return,
            };
            tracing::info!(signal = name, "shutting down");
            token.cancel();
        });
        Ok(())
    }

    /// Triggers shutdown.
    pub fn trigger(&self) {
        self.token.cancel();
    }

    /// Returns whether shutdown has been triggered.
    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes when shutdown is triggered.
    pub async fn triggered(&self) {
        self.token.cancelled().await;
    }

    /// Returns the cancellation token, for APIs that take one.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Returns a child signal: cancelled with this one, or on its own
    /// (e.g. one connection's tasks) without affecting the parent.
    pub fn child(&self) -> Shutdown {
        Shutdown {
            token: self.token.child_token(),
            tracker: self.tracker.clone(),
        }
    }

    /// Spawns a task that shutdown waits for.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(task)
    }

    /// Returns how many tracked tasks are running.
    pub fn running_tasks(&self) -> usize {
        self.tracker.len()
    }

    /// Triggers shutdown and waits up to `grace` for every tracked task.
    pub async fn drain(&self, grace: Duration) -> Drained {
        self.token.cancel();
        self.tracker.close();
        match tokio::time::timeout(grace, self.tracker.wait()).await {
            Ok(()) => Drained::Complete,
            Err(_) => {
                let remaining = self.tracker.len();
                tracing::warn!(
                    remaining,
                    grace_ms = grace.as_millis() as u64,
                    "grace period over with tasks still running"
                );
                Drained::TimedOut { remaining }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_tasks_that_watch_the_signal() {
        let shutdown = Shutdown::new();
        let watcher = shutdown.clone();
        shutdown.spawn(async move {
            watcher.triggered().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        assert_eq!(shutdown.running_tasks(), 1);
        assert_eq!(
            shutdown.drain(Duration::from_secs(5)).await,
            Drained::Complete
        );
        assert_eq!(shutdown.running_tasks(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_gives_up_after_the_grace_period() {
        let shutdown = Shutdown::new();
        shutdown.spawn(tokio::time::sleep(Duration::from_secs(60)));
        assert_eq!(
            shutdown.drain(Duration::from_secs(2)).await,
            Drained::TimedOut { remaining: 1 }
        );
    }

    #[tokio::test]
    async fn a_child_cancels_alone_but_follows_its_parent() {
        let parent = Shutdown::new();
        let first = parent.child();
        let second = parent.child();
        first.trigger();
        assert!(first.is_triggered());
        assert!(!parent.is_triggered());
        assert!(!second.is_triggered());
        parent.trigger();
        assert!(second.is_triggered());
    }
}
