//! A node's registration, alive until dropped or deregistered.

use crate::zookeeper::ZkRegistration;
use crate::{NodeInfo, Result};

/// Keeps a node registered while it lives.
///
/// Dropping it deregisters the node in the background (when a tokio runtime
/// is at hand; otherwise the node goes when the discovery's session ends);
/// [`Registration::deregister`] does so and waits for it.
#[derive(Debug)]
pub struct Registration {
    inner: Inner,
}

#[derive(Debug)]
enum Inner {
    /// Static discovery publishes nothing.
    Noop,
    ZooKeeper(ZkRegistration),
}

impl Registration {
    pub(crate) fn noop() -> Registration {
        Registration { inner: Inner::Noop }
    }

    pub(crate) fn zookeeper(registration: ZkRegistration) -> Registration {
        Registration {
            inner: Inner::ZooKeeper(registration),
        }
    }

    /// Replaces the registered data (same id); the stored copy is what gets
    /// re-registered after a session expiry.
    ///
    /// `info.updated` is set to the current time. An error means the write
    /// did not reach ZooKeeper now; the new data is kept all the same and
    /// written when the session is back.
    pub async fn update(&self, info: NodeInfo) -> Result<()> {
        match &self.inner {
            Inner::Noop => Ok(()),
            Inner::ZooKeeper(registration) => registration.update(info).await,
        }
    }

    /// Removes the node and stops keeping it registered.
    pub async fn deregister(self) -> Result<()> {
        match self.inner {
            Inner::Noop => Ok(()),
            Inner::ZooKeeper(registration) => registration.deregister().await,
        }
    }
}
