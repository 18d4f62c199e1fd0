//! The periodic room report: this comet's member count per room goes to
//! logic, and the cluster-wide counts logic answers with are kept for
//! heartbeat replies.

use std::sync::Arc;

use rim_proto::pb::logic::v1::RenewOnlineRequest;
use tokio_util::sync::CancellationToken;

use crate::comet::Inner;

/// Reports room counts to logic every `comet.room_report_interval` until `stop`.
pub(crate) async fn report_rooms(inner: Arc<Inner>, stop: CancellationToken) {
    let period = inner.config.room_report_interval;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let room_count = inner
            .room_counts()
            .into_iter()
            .map(|(room, n)| (room, i32::try_from(n).unwrap_or(i32::MAX)))
            .collect();
        let req = RenewOnlineRequest {
            server: inner.id.clone(),
            room_count,
        };
        match tokio::time::timeout(period, inner.logic.renew_online(req)).await {
            Ok(Ok(reply)) => inner.set_online(reply.all_room_count),
            Ok(Err(err)) => tracing::warn!(reason = %err, "room counts not reported to logic"),
            Err(_) => tracing::warn!("logic did not answer renew_online in time"),
        }
    }
}
