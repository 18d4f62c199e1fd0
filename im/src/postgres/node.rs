//! The message-id node a store holds in its database.
//!
//! Message ids are unique only while every process writing to one database
//! issues them from a node of its own (id.rs). A derived node (a hash of
//! the process's name) can collide, and a configured one can be mistyped,
//! so the store takes a session-level advisory lock on its node number —
//! keyed by the schema, like the migrations — on a connection of its own,
//! and keeps it for as long as the store lives. A node already held by
//! another process is skipped for the next free one, or, when the node was
//! configured, refused with an error naming it.
//!
//! If the holding connection ends (the server restarted, the network
//! failed), the lock may go to another process, so sends wait until it is
//! held again — the same node if it is still free, else (unless
//! configured) the next free one, with the generator switched to it — and
//! fail with code 5 (nothing stored, resend) if that takes longer than the
//! store timeout.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use crate::error::{Error, Result, StoreFailure};
use crate::id::{IdGenerator, MAX_NODE};

use super::db;

/// The longest wait between two attempts to take the node back.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The lock: one per node number and schema.
const TRY_LOCK: &str =
    "SELECT pg_try_advisory_lock(hashtext('rim_im_node ' || coalesce(current_schema(), '')), $1)";

/// Keeps the store's node locked; dropping it ends the holding task and so
/// releases the lock.
pub(super) struct NodeHold {
    held: watch::Receiver<bool>,
    _stop: oneshot::Sender<()>,
}

/// How the node may be chosen.
#[derive(Clone, Copy)]
struct Rules {
    /// Only the generator's node (it was configured).
    exact: bool,
    timeout: Duration,
}

impl NodeHold {
    /// Locks the generator's node (or, unless `exact`, the first free one
    /// after it, switching the generator to it) and starts the task that
    /// keeps it.
    pub(super) async fn take(
        config: tokio_postgres::Config,
        ids: Arc<IdGenerator>,
        exact: bool,
        timeout: Duration,
    ) -> Result<NodeHold> {
        let rules = Rules { exact, timeout };
        let holder = claim(&config, &ids, rules).await?;
        let (held_tx, held) = watch::channel(true);
        let (stop_tx, stop_rx) = oneshot::channel();
        tokio::spawn(keep(config, ids, rules, holder, held_tx, stop_rx));
        Ok(NodeHold {
            held,
            _stop: stop_tx,
        })
    }

    /// Waits up to `timeout` while the node is not held (its connection was
    /// lost and it is being taken back).
    pub(super) async fn held(&self, timeout: Duration) -> Result<()> {
        let mut held = self.held.clone();
        match tokio::time::timeout(timeout, held.wait_for(|held| *held)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(Error::Unavailable(StoreFailure::bare(
                "the connection holding this process's message-id node was lost and \
                 the node is not held again yet",
            ))),
        }
    }
}

/// A connection holding the lock, and what tells that it ended.
struct Holder {
    _client: tokio_postgres::Client,
    ended: oneshot::Receiver<()>,
}

/// Connects and locks a node by the rules.
async fn claim(config: &tokio_postgres::Config, ids: &IdGenerator, rules: Rules) -> Result<Holder> {
    let (client, connection) =
        tokio::time::timeout(rules.timeout, config.connect(tokio_postgres::NoTls))
            .await
            .map_err(|elapsed| {
                Error::unavailable("connecting to hold the message-id node", elapsed)
            })?
            .map_err(db("connecting to hold the message-id node"))?;
    let (ended_tx, ended) = oneshot::channel();
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(%err, "the connection holding the message-id node ended");
        }
        let _ = ended_tx.send(());
    });
    let lock = client
        .prepare(TRY_LOCK)
        .await
        .map_err(db("preparing the message-id node lock"))?;
    let first = ids.node();
    let candidates = if rules.exact {
        1
    } else {
        u32::from(MAX_NODE) + 1
    };
    for step in 0..candidates {
        // Below MAX_NODE + 1 after the modulo: fits.
        let node = ((u32::from(first) + step) % (u32::from(MAX_NODE) + 1)) as u16;
        let row = tokio::time::timeout(rules.timeout, client.query_one(&lock, &[&i32::from(node)]))
            .await
            .map_err(|elapsed| Error::unavailable("locking the message-id node", elapsed))?
            .map_err(db("locking the message-id node"))?;
        let locked: bool = row.try_get(0).map_err(db("locking the message-id node"))?;
        if locked {
            if node != first {
                tracing::warn!(
                    wanted = first,
                    node,
                    "message-id node {first} is held by another process writing to this \
                     database: using node {node}"
                );
                ids.set_node(node);
            }
            return Ok(Holder {
                _client: client,
                ended,
            });
        }
    }
    Err(Error::Unavailable(StoreFailure::bare(if rules.exact {
        format!(
            "message-id node {first} (im.node) is held by another process writing to this \
             database: give every process its own im.node, or leave it unset"
        )
    } else {
        format!("every message-id node (0..={MAX_NODE}) is held by another process")
    })))
}

/// Holds the node until the store is dropped, taking it back whenever its
/// connection ends.
async fn keep(
    config: tokio_postgres::Config,
    ids: Arc<IdGenerator>,
    rules: Rules,
    mut holder: Holder,
    held: watch::Sender<bool>,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = &mut holder.ended => {}
        }
        held.send_replace(false);
        tracing::warn!(
            node = ids.node(),
            "lost the connection holding the message-id node: sends are refused until it is held again"
        );
        let mut backoff = Duration::from_millis(50);
        holder = loop {
            tokio::select! {
                _ = &mut stop => return,
                () = tokio::time::sleep(backoff) => {}
            }
            match claim(&config, &ids, rules).await {
                Ok(holder) => break holder,
                Err(err) => {
                    tracing::warn!(%err, "cannot hold the message-id node yet; retrying");
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        };
        held.send_replace(true);
        tracing::info!(node = ids.node(), "holding the message-id node again");
    }
}
