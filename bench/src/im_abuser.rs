//! The abusive user of `rim-bench im-send --abuser-rate R`: one more user,
//! on one connection, sends R SENDs per second open loop beside the pairs,
//! ignoring every `retry_ms` (as a broken or hostile client would), for
//! the same warmup and measured window as the pairs. Its measured replies
//! are counted by code; what it costs the other users is their SEND →
//! SEND_REPLY of the same rate measured without it (the step before).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rim_client::Client;
use rim_proto::im::{Body, SendReply, SendRequest};
use rim_proto::{Frame, Op};
use serde::Serialize;
use tokio::time::{Instant, MissedTickBehavior};

use crate::pacing::Pacer;

/// The abuser's user id and the (never connected) user it writes to, below
/// the pairs' ids.
pub const ABUSER_MID: i64 = 99_998;
const ABUSER_TO: i64 = 99_999;
/// Unanswered SENDs the abuser keeps at most; beyond, a send is skipped
/// and counted (a bound on the benchmark's own memory).
const MAX_IN_FLIGHT: usize = 10_000;
/// How often the abuser heartbeats (well inside the server's limit).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(60);

/// The abuser's counters of one step (measured sends only).
#[derive(Debug, Default)]
pub struct AbuserStats {
    sent: AtomicU64,
    ok: AtomicU64,
    limited: AtomicU64,
    other: AtomicU64,
    skipped: AtomicU64,
    missing_replies: AtomicU64,
    retry_ms_max: AtomicU64,
}

/// The abuser's figures of one step.
#[derive(Debug, Serialize)]
pub struct AbuserReport {
    /// SENDs per second it offered.
    pub rate: f64,
    /// Measured SENDs sent.
    pub sent: u64,
    /// Code 0 (stored).
    pub ok: u64,
    /// Code 3 (rate limited).
    pub limited: u64,
    /// Any other refusal.
    pub other_refused: u64,
    /// Not sent: too many unanswered.
    pub skipped: u64,
    /// Sent but not answered by the end of the drain.
    pub missing_replies: u64,
    /// Code-3 replies as a share of its answered measured SENDs, %.
    pub limited_pct: f64,
    /// The longest `retry_ms` it was told.
    pub retry_ms_max: u64,
}

impl AbuserStats {
    /// The figures of the step.
    pub fn report(&self, rate: f64) -> AbuserReport {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (ok, limited, other) = (get(&self.ok), get(&self.limited), get(&self.other));
        let answered = ok + limited + other;
        AbuserReport {
            rate,
            sent: get(&self.sent),
            ok,
            limited,
            other_refused: other,
            skipped: get(&self.skipped),
            missing_replies: get(&self.missing_replies),
            limited_pct: if answered == 0 {
                0.0
            } else {
                limited as f64 * 100.0 / answered as f64
            },
            retry_ms_max: get(&self.retry_ms_max),
        }
    }
}

/// How one step of the abuser runs.
#[derive(Clone, Copy, Debug)]
pub struct AbuserPlan {
    /// The step's index (in cmids).
    pub step: usize,
    /// SENDs per second.
    pub rate: f64,
    /// When the step's sends begin.
    pub start: Instant,
    /// Seconds of sends not counted, then counted.
    pub warmup: u64,
    /// Seconds of counted sends.
    pub duration: u64,
    /// Seconds to wait for replies after the last send.
    pub drain: u64,
    /// Prefix of every cmid (a cluster's store outlives one run).
    pub cmid_prefix: Option<u64>,
}

/// One side of the abuse comparison at one offered rate.
#[derive(Debug, Serialize)]
pub struct AbuseComparison {
    /// The pairs' offered rate, msg/s in all.
    pub offered_rate: f64,
    /// The abuser's rate.
    pub abuser_rate: f64,
    /// The abuser's code-3 share of its answered SENDs, %.
    pub abuser_limited_pct: f64,
    /// Issue #14's goal for that share, %.
    pub goal_abuser_limited_pct: f64,
    /// The other users' p99 SEND → SEND_REPLY without the abuser (the mean
    /// of the steps before and after it) and with it.
    pub others_p99_reply_ms_without: f64,
    pub others_p99_reply_ms_with: f64,
    /// (with − without) ÷ without, %.
    pub others_p99_change_pct: f64,
    /// Issue #14's bound on that change, %.
    pub goal_change_pct: f64,
    /// The other users' refusals (any code) with the abuser: a limit that
    /// caught normal users would show here.
    pub others_refused_with: u64,
}

/// Sends `plan.rate` SENDs per second for the step, counting the measured
/// ones' replies into `stats`; hands the connection back (`None` when it
/// was lost).
pub async fn abuser(
    mut client: Client,
    plan: AbuserPlan,
    stats: Arc<AbuserStats>,
) -> Option<Client> {
    let planned = Pacer::planned_for(plan.rate, (plan.warmup + plan.duration) as f64);
    let warm = Pacer::planned_for(plan.rate, plan.warmup as f64);
    let pacer = Pacer::new(plan.rate, planned);
    tokio::time::sleep_until(plan.start).await;
    let mut tick = tokio::time::interval(pacer.tick());
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut heartbeat = tokio::time::interval_at(plan.start + HEARTBEAT_EVERY, HEARTBEAT_EVERY);
    let hard_stop = plan.start + Duration::from_secs(plan.warmup + plan.duration + plan.drain + 5);
    let mut drain_until = hard_stop;
    let mut in_flight: HashMap<i32, bool> = HashMap::new();
    let mut n = 0u64;
    while n < planned || !in_flight.is_empty() {
        tokio::select! {
            biased;
            frame = client.next_frame() => {
                let Ok(Some(frame)) = frame else {
                    return None;
                };
                if frame.op != Op::IM_SEND_REPLY {
                    continue;
                }
                if in_flight.remove(&frame.seq) != Some(true) {
                    continue;
                }
                let counter = match SendReply::decode(&frame.body) {
                    Ok(reply) if reply.code.0 == 0 => &stats.ok,
                    Ok(reply) if reply.code.0 == 3 => {
                        stats
                            .retry_ms_max
                            .fetch_max(reply.retry_ms.unwrap_or(0), Ordering::Relaxed);
                        &stats.limited
                    }
                    _ => &stats.other,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            _ = tick.tick(), if n < planned => {
                let due = pacer.due(plan.start.elapsed().as_secs_f64());
                while n < due {
                    let measured = n >= warm;
                    n += 1;
                    if measured {
                        stats.sent.fetch_add(1, Ordering::Relaxed);
                    }
                    if in_flight.len() >= MAX_IN_FLIGHT {
                        if measured {
                            stats.skipped.fetch_add(1, Ordering::Relaxed);
                        }
                        continue;
                    }
                    let req = SendRequest {
                        cmid: match plan.cmid_prefix {
                            Some(run) => format!("r{run}-abuse-{}-{n}", plan.step),
                            None => format!("abuse-{}-{n}", plan.step),
                        },
                        to: Some(ABUSER_TO),
                        body: "abuse".into(),
                        ..SendRequest::default()
                    };
                    let seq = client.send_im(&req).await.ok()?;
                    in_flight.insert(seq, measured);
                }
                if n >= planned {
                    drain_until = Instant::now() + Duration::from_secs(plan.drain);
                }
            }
            _ = heartbeat.tick() => {
                client
                    .send(Frame::new(Op::HEARTBEAT, 0, bytes::Bytes::new()))
                    .await
                    .ok()?;
            }
            () = tokio::time::sleep_until(drain_until) => break,
        }
    }
    let missing = in_flight.values().filter(|measured| **measured).count();
    stats
        .missing_replies
        .fetch_add(missing as u64, Ordering::Relaxed);
    Some(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limited_share_is_of_answered_sends() {
        let stats = AbuserStats::default();
        stats.sent.store(100, Ordering::Relaxed);
        stats.ok.store(10, Ordering::Relaxed);
        stats.limited.store(85, Ordering::Relaxed);
        stats.other.store(5, Ordering::Relaxed);
        let r = stats.report(200.0);
        assert_eq!((r.ok, r.limited, r.other_refused), (10, 85, 5));
        assert!((r.limited_pct - 85.0).abs() < 1e-9);
        assert_eq!(AbuserStats::default().report(1.0).limited_pct, 0.0);
    }
}
