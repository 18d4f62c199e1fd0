//! The flush rules driven directly: what the aggregator hands to delivery
//! for each message, answer and deadline, without comets.

use bytes::Bytes;
use rim_proto::Op;

use super::*;
use crate::Outcome;

const HOUR: Duration = Duration::from_secs(3600);

fn aggregator(
    rule: RoomFlushRule,
    batch_size: usize,
    max_wait: Duration,
) -> (Aggregator, mpsc::Receiver<Flush>) {
    let (out_tx, out_rx) = mpsc::channel(QUEUE);
    let batching = Batching {
        rule,
        batch_size,
        max_wait,
    };
    let metrics = Arc::new(JobMetrics::default());
    (Aggregator::new(batching, out_tx, metrics), out_rx)
}

fn room(name: &str) -> Target {
    Target::Room(format!("live://{name}"))
}

/// Takes one message; its ticket's receiver is kept so the batch can be
/// told.
async fn take(
    agg: &mut Aggregator,
    target: &Target,
    body: &str,
    tickets: &mut Vec<oneshot::Receiver<Outcome>>,
) {
    let (done, rx) = oneshot::channel();
    tickets.push(rx);
    let message = RoomMessage {
        target: target.clone(),
        frame: Frame::new(Op(1000), 0, Bytes::from(body.to_owned())),
        group: None,
        done,
    };
    assert!(agg.take(message).await.is_ok());
}

/// The batches handed to delivery since the last call: target, bodies,
/// and whether it went as an op-9 batch.
fn sent(out: &mut mpsc::Receiver<Flush>) -> Vec<(Target, Vec<String>, bool)> {
    let mut flushes = Vec::new();
    while let Ok(flush) = out.try_recv() {
        let bodies = if flush.frame.is_batch() {
            flush
                .frame
                .batch_frames()
                .map(|f| String::from_utf8_lossy(&f.unwrap().body).into_owned())
                .collect()
        } else {
            vec![String::from_utf8_lossy(&flush.frame.body).into_owned()]
        };
        assert_eq!(bodies.len(), flush.dones.len(), "a done per message");
        flushes.push((flush.target, bodies, flush.frame.is_batch()));
    }
    flushes
}

fn alone(target: &Target, body: &str) -> (Target, Vec<String>, bool) {
    (target.clone(), vec![body.to_owned()], false)
}

fn batch(target: &Target, bodies: &[&str]) -> (Target, Vec<String>, bool) {
    (
        target.clone(),
        bodies.iter().map(|b| (*b).to_owned()).collect(),
        true,
    )
}

#[test]
fn the_rule_flushes_full_batches_and_adaptive_ones_when_nothing_is_in_flight() {
    use RoomFlushRule::{Adaptive, Fixed};
    assert!(flush_now(Adaptive, 1, 20, 0));
    assert!(!flush_now(Adaptive, 1, 20, 1));
    assert!(!flush_now(Adaptive, 0, 20, 0), "nothing to send");
    assert!(flush_now(Adaptive, 20, 20, 3));
    assert!(!flush_now(Fixed, 1, 20, 0));
    assert!(flush_now(Fixed, 20, 20, 0));
}

/// A quiet room never waits: each message goes at once, as the frame
/// itself, when none of the room's batches is in flight.
#[tokio::test(start_paused = true)]
async fn adaptive_a_message_to_an_idle_room_goes_at_once_alone() {
    let (mut agg, mut out) = aggregator(RoomFlushRule::Adaptive, 20, HOUR);
    let mut tickets = Vec::new();
    let r = room("quiet");
    for i in 0..3 {
        let body = format!("m{i}");
        take(&mut agg, &r, &body, &mut tickets).await;
        assert_eq!(sent(&mut out), [alone(&r, &body)]);
        assert!(agg.answered(r.clone()).await.is_ok());
        assert!(agg.targets.is_empty(), "the answered room is retired");
    }
    assert!(
        agg.deadlines.is_empty(),
        "a message sent at once needs no timer"
    );
}

/// While a batch is in flight the room's messages gather into one batch,
/// which goes when the batch in flight is answered.
#[tokio::test(start_paused = true)]
async fn adaptive_messages_gather_while_a_batch_is_in_flight() {
    let (mut agg, mut out) = aggregator(RoomFlushRule::Adaptive, 20, HOUR);
    let mut tickets = Vec::new();
    let r = room("busy");
    take(&mut agg, &r, "m1", &mut tickets).await;
    assert_eq!(sent(&mut out), [alone(&r, "m1")]);
    for body in ["m2", "m3", "m4"] {
        take(&mut agg, &r, body, &mut tickets).await;
    }
    assert!(sent(&mut out).is_empty(), "gathering while m1 is in flight");
    // Another room is not held back by this one's batch in flight.
    let other = room("other");
    take(&mut agg, &other, "o1", &mut tickets).await;
    assert_eq!(sent(&mut out), [alone(&other, "o1")]);

    assert!(agg.answered(r.clone()).await.is_ok());
    assert_eq!(sent(&mut out), [batch(&r, &["m2", "m3", "m4"])]);
    assert!(agg.answered(r.clone()).await.is_ok());
    assert!(agg.answered(other.clone()).await.is_ok());
    assert!(sent(&mut out).is_empty());
    assert!(agg.targets.is_empty(), "both rooms idle, both retired");
}

/// A full batch goes at once, even while another is in flight; what
/// gathers after it waits until no batch of the room is in flight.
#[tokio::test(start_paused = true)]
async fn adaptive_a_full_batch_goes_at_once_even_with_one_in_flight() {
    let (mut agg, mut out) = aggregator(RoomFlushRule::Adaptive, 3, HOUR);
    let mut tickets = Vec::new();
    let r = room("hot");
    take(&mut agg, &r, "m1", &mut tickets).await;
    assert_eq!(sent(&mut out), [alone(&r, "m1")]);
    for body in ["m2", "m3", "m4"] {
        take(&mut agg, &r, body, &mut tickets).await;
    }
    assert_eq!(sent(&mut out), [batch(&r, &["m2", "m3", "m4"])]);
    take(&mut agg, &r, "m5", &mut tickets).await;
    assert!(agg.answered(r.clone()).await.is_ok());
    assert!(sent(&mut out).is_empty(), "m2..m4 still in flight");
    assert!(agg.answered(r.clone()).await.is_ok());
    assert_eq!(sent(&mut out), [alone(&r, "m5")]);
    assert!(agg.answered(r.clone()).await.is_ok());
    assert!(agg.targets.is_empty());
}

/// When the batch in flight is never answered (a comet slow or failing),
/// the gathered batch goes once its oldest message has waited room_flush.
#[tokio::test(start_paused = true)]
async fn adaptive_gathering_is_bounded_by_room_flush() {
    let wait = Duration::from_millis(50);
    let (mut agg, mut out) = aggregator(RoomFlushRule::Adaptive, 20, wait);
    let mut tickets = Vec::new();
    let r = room("stuck");
    take(&mut agg, &r, "m1", &mut tickets).await;
    assert_eq!(sent(&mut out), [alone(&r, "m1")]);
    tokio::time::advance(Duration::from_millis(10)).await;
    take(&mut agg, &r, "m2", &mut tickets).await;
    tokio::time::advance(Duration::from_millis(30)).await;
    take(&mut agg, &r, "m3", &mut tickets).await;
    assert!(agg.fire_due(Instant::now()).await.is_ok());
    assert!(sent(&mut out).is_empty(), "m2 has waited 30 ms of 50");
    tokio::time::advance(Duration::from_millis(20)).await;
    assert!(agg.fire_due(Instant::now()).await.is_ok());
    assert_eq!(sent(&mut out), [batch(&r, &["m2", "m3"])]);
    // Two in flight now; the next message gathers again, bounded again.
    take(&mut agg, &r, "m4", &mut tickets).await;
    assert!(sent(&mut out).is_empty());
    tokio::time::advance(wait).await;
    assert!(agg.fire_due(Instant::now()).await.is_ok());
    assert_eq!(sent(&mut out), [alone(&r, "m4")]);
    for _ in 0..3 {
        assert!(agg.answered(r.clone()).await.is_ok());
    }
    assert!(agg.targets.is_empty());
}

/// The fixed rule is the window alone: nothing goes at once unless the
/// batch is full, answers change nothing, a flushed room is retired.
#[tokio::test(start_paused = true)]
async fn fixed_batches_go_when_full_or_after_the_window_only() {
    let wait = Duration::from_millis(50);
    let (mut agg, mut out) = aggregator(RoomFlushRule::Fixed, 3, wait);
    let mut tickets = Vec::new();
    let r = room("fixed");
    take(&mut agg, &r, "m1", &mut tickets).await;
    assert!(sent(&mut out).is_empty(), "the fixed rule waits");
    assert!(agg.answered(r.clone()).await.is_ok());
    assert!(sent(&mut out).is_empty(), "answers are not waited for");
    tokio::time::advance(Duration::from_millis(49)).await;
    assert!(agg.fire_due(Instant::now()).await.is_ok());
    assert!(sent(&mut out).is_empty());
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(agg.fire_due(Instant::now()).await.is_ok());
    assert_eq!(sent(&mut out), [alone(&r, "m1")]);
    assert!(agg.targets.is_empty(), "retired once flushed");
    for body in ["m2", "m3", "m4"] {
        take(&mut agg, &r, body, &mut tickets).await;
    }
    assert_eq!(sent(&mut out), [batch(&r, &["m2", "m3", "m4"])]);
    assert!(agg.targets.is_empty());
}

/// Whatever the interleaving of messages, answers and deadlines over
/// several rooms, each room's messages are handed to delivery exactly
/// once, in the order they came, and every room is retired at the end.
#[tokio::test(start_paused = true)]
async fn adaptive_keeps_each_rooms_order_and_retires_every_room() {
    let rooms: Vec<Target> = (0..3).map(|i| room(&format!("r{i}"))).collect();
    for seed in 1..=20u64 {
        let (mut agg, mut out) = aggregator(RoomFlushRule::Adaptive, 4, Duration::from_millis(5));
        let mut tickets = Vec::new();
        let mut taken: Vec<Vec<String>> = vec![Vec::new(); rooms.len()];
        let mut got: Vec<Vec<String>> = vec![Vec::new(); rooms.len()];
        let mut in_flight = vec![0u32; rooms.len()];
        let mut rng = seed;
        let mut next = || {
            // A small LCG: the same interleavings on every run.
            rng = rng
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (rng >> 33) as usize
        };
        let mut record = |out: &mut mpsc::Receiver<Flush>, in_flight: &mut Vec<u32>| {
            for (target, bodies, _) in sent(out) {
                let i = rooms.iter().position(|r| *r == target).unwrap();
                in_flight[i] += 1;
                got[i].extend(bodies);
            }
        };
        for step in 0..300 {
            let i = next() % rooms.len();
            match next() % 10 {
                0..=5 => {
                    let body = format!("{i}-{step}");
                    taken[i].push(body.clone());
                    take(&mut agg, &rooms[i], &body, &mut tickets).await;
                }
                6..=8 if in_flight[i] > 0 => {
                    in_flight[i] -= 1;
                    assert!(agg.answered(rooms[i].clone()).await.is_ok());
                }
                _ => {
                    tokio::time::advance(Duration::from_millis(2)).await;
                    assert!(agg.fire_due(Instant::now()).await.is_ok());
                }
            }
            record(&mut out, &mut in_flight);
        }
        // Answer everything in flight until nothing is left.
        for _ in 0..1000 {
            let Some(i) = in_flight.iter().position(|n| *n > 0) else {
                break;
            };
            in_flight[i] -= 1;
            assert!(agg.answered(rooms[i].clone()).await.is_ok());
            record(&mut out, &mut in_flight);
        }
        assert_eq!(got, taken, "seed {seed}");
        assert!(agg.targets.is_empty(), "seed {seed}: every room retired");
    }
}

/// Many rooms with one message each leave nothing behind once answered:
/// the aggregator's state is bounded by the rooms active right now.
#[tokio::test(start_paused = true)]
async fn adaptive_answered_rooms_leave_no_state() {
    let (mut agg, mut out) = aggregator(RoomFlushRule::Adaptive, 20, HOUR);
    let mut tickets = Vec::new();
    for i in 0..1000 {
        take(&mut agg, &room(&format!("r{i}")), "x", &mut tickets).await;
    }
    assert_eq!(sent(&mut out).len(), 1000);
    assert_eq!(agg.targets.len(), 1000, "each in flight");
    for i in 0..1000 {
        assert!(agg.answered(room(&format!("r{i}"))).await.is_ok());
    }
    assert!(agg.targets.is_empty());
    assert!(agg.deadlines.is_empty());
    // An answer for a room the aggregator forgot changes nothing.
    assert!(agg.answered(room("r0")).await.is_ok());
    assert!(agg.targets.is_empty());
}
