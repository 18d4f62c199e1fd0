//! Tickets: futures that complete when a message is fully handled.

use futures::future::BoxFuture;
use tokio::sync::oneshot;

use crate::Outcome;

/// Completes when a message is fully handled.
pub type Ticket = BoxFuture<'static, Outcome>;

/// A ticket that is already complete.
pub(crate) fn ready(outcome: Outcome) -> Ticket {
    Box::pin(std::future::ready(outcome))
}

/// A ticket completed by one call.
pub(crate) fn wait(rx: oneshot::Receiver<Outcome>) -> Ticket {
    // A dropped sender means the client or aggregator stopped: the message
    // was not delivered, and the comet set is going away.
    Box::pin(async move { rx.await.unwrap_or(Outcome::Gone) })
}

/// A ticket over several calls: Delivered if any comet took it, else the
/// first outcome.
pub(crate) fn wait_all(rxs: Vec<oneshot::Receiver<Outcome>>) -> Ticket {
    Box::pin(async move {
        let outcomes = futures::future::join_all(rxs).await;
        let outcomes: Vec<Outcome> = outcomes
            .into_iter()
            .map(|o| o.unwrap_or(Outcome::Gone))
            .collect();
        if outcomes.contains(&Outcome::Delivered) {
            Outcome::Delivered
        } else {
            outcomes.first().copied().unwrap_or(Outcome::Gone)
        }
    })
}
