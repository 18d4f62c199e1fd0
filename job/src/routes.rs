//! Room routing: which comets host which rooms, so that a room's batch goes
//! only to the comets with a member of it, not to every comet of the
//! region.
//!
//! It applies once the region has `job.room_routes_min_comets` comets (4):
//! with fewer there is little to save.
//!
//! The job asks every comet for its rooms (`CometApi::rooms`, the comet's
//! own list, kept current as connections join and leave) every
//! `job.room_routes_interval` (1 s by default), all comets at once, each
//! answer bounded by the interval. A comet the job has not heard from yet
//! (just discovered, or its last answer failed) gets every room's batches,
//! as without routing, so a lost answer never loses a delivery.
//!
//! The bound: a connection that joins a room on a comet where the room had
//! no member receives the room's batches flushed from the next poll's
//! answer on, at most one interval plus one answer later; batches flushed
//! before that do not reach it (room pushes are not stored: a goim client
//! joining a room gets what is pushed from then on). Rooms that empty out
//! keep their batches going to the comet until the next poll, which is
//! only a wasted call.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::future::join_all;
use parking_lot::RwLock;

use crate::comets::Comets;

/// The rooms each comet hosts, as last heard.
#[derive(Default)]
pub(crate) struct RoomRoutes {
    /// comet id → its rooms; a comet not in the map is unknown (it gets
    /// every room).
    known: RwLock<HashMap<String, HashSet<String>>>,
    /// Routing is on (`job.room_routes_interval` > 0).
    on: bool,
    /// `job.room_routes_min_comets`.
    min_comets: usize,
}

impl RoomRoutes {
    pub(crate) fn new(on: bool, min_comets: usize) -> RoomRoutes {
        RoomRoutes {
            known: RwLock::default(),
            on,
            min_comets,
        }
    }

    /// Whether routing applies to a region of `comets` comets.
    pub(crate) fn applies(&self, comets: usize) -> bool {
        self.on && comets >= self.min_comets
    }

    /// Whether `comet` must get `room`'s batches: it hosts the room, or
    /// its rooms are not known, or routing is off.
    pub(crate) fn hosts(&self, comet: &str, room: &str) -> bool {
        if !self.on {
            return true;
        }
        self.known
            .read()
            .get(comet)
            .is_none_or(|rooms| rooms.contains(room))
    }

    /// Asks every comet for its rooms now, each answer bounded by `limit`;
    /// a comet that does not answer becomes unknown.
    pub(crate) async fn refresh(&self, comets: &Comets, limit: Duration) {
        let asks = comets.all().into_iter().map(|(id, client)| async move {
            let answer = tokio::time::timeout(limit, client.api().rooms()).await;
            (id, answer)
        });
        let answers = join_all(asks).await;
        let mut known = HashMap::with_capacity(answers.len());
        for (id, answer) in answers {
            match answer {
                Ok(Ok(rooms)) => {
                    known.insert(id, rooms.into_iter().collect());
                }
                Ok(Err(err)) => {
                    tracing::debug!(comet = %id, %err, "comet's rooms unknown: it gets every room");
                }
                Err(_) => {
                    tracing::debug!(comet = %id, "comet did not list its rooms in time: it gets every room");
                }
            }
        }
        *self.known.write() = known;
    }
}

/// Refreshes `routes` every `every` until the comet set is gone.
pub(crate) async fn poll(routes: Arc<RoomRoutes>, comets: Weak<Comets>, every: Duration) {
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(comets) = comets.upgrade() else {
            return;
        };
        routes.refresh(&comets, every).await;
    }
}
