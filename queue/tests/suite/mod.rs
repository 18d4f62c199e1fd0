//! The queue's behaviour suite, run over both implementations of its two
//! halves (tests/memory.rs, tests/kafka.rs): order per key, redelivery of
//! what was not committed after a crash, exact resumption after a clean
//! close, and a bounded number of messages in flight.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rim_queue::{Consumer, Delivery, Producer, PushMsg, PushType};

/// How long one message may take to arrive (a Kafka consumer joins its
/// group first).
const ARRIVAL: Duration = Duration::from_secs(60);

/// A queue under test: its producer and a way to start a consumer (one at a
/// time, as one member of one consumer group).
#[async_trait]
pub trait Backend: Sync {
    type Consumer: Consumer;
    fn producer(&self) -> Arc<dyn Producer>;
    async fn consumer(&self, max_in_flight: usize) -> Self::Consumer;
}

/// A push to one key whose body says which message it is.
pub fn push(key: &str, i: usize) -> PushMsg {
    PushMsg {
        r#type: PushType::Push as i32,
        operation: 1000,
        server: "comet-1".into(),
        keys: vec![key.into()],
        msg: Bytes::from(format!("{key}:{i}")),
        ..PushMsg::default()
    }
}

fn body(msg: &PushMsg) -> String {
    String::from_utf8_lossy(&msg.msg).into_owned()
}

/// Returns the next message, failing the test after ARRIVAL.
pub async fn next<C: Consumer>(consumer: &mut C) -> Delivery {
    tokio::time::timeout(ARRIVAL, consumer.recv())
        .await
        .expect("a message arrives")
        .expect("the queue answers")
        .expect("the queue is open")
}

async fn send_all(producer: &dyn Producer, msgs: impl IntoIterator<Item = PushMsg>) {
    for msg in msgs {
        producer.send(msg).await.expect("enqueued");
    }
}

/// Messages to one key come out in the order they went in, whatever the
/// other keys do.
pub async fn order_holds_per_key<B: Backend>(backend: &B) {
    const PER_KEY: usize = 30;
    let keys = ["alpha", "beta", "gamma"];
    let producer = backend.producer();
    send_all(
        producer.as_ref(),
        (0..PER_KEY).flat_map(|i| keys.iter().map(move |k| push(k, i))),
    )
    .await;
    let mut consumer = backend.consumer(64).await;
    let mut seen: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for _ in 0..PER_KEY * keys.len() {
        let Delivery { msg, receipt } = next(&mut consumer).await;
        receipt.handled();
        let text = body(&msg);
        let (key, i) = text.split_once(':').expect("key:i body");
        seen.entry(key.to_owned())
            .or_default()
            .push(i.parse().expect("a number"));
    }
    for key in keys {
        assert_eq!(
            seen.get(key).cloned().unwrap_or_default(),
            (0..PER_KEY).collect::<Vec<_>>(),
            "order of {key}"
        );
    }
    consumer.close(Duration::from_secs(5)).await.expect("close");
}

/// A consumer that stops without committing (a crash) leaves everything it
/// did not get handled to the next consumer, in order: nothing is lost.
pub async fn a_crash_before_commit_redelivers<B: Backend>(backend: &B) {
    const N: usize = 10;
    const HANDLED: usize = 4;
    let producer = backend.producer();
    send_all(producer.as_ref(), (0..N).map(|i| push("crash", i))).await;
    let mut first = backend.consumer(64).await;
    let mut receipts = Vec::new();
    for i in 0..N {
        let Delivery { msg, receipt } = next(&mut first).await;
        assert_eq!(body(&msg), format!("crash:{i}"));
        receipts.push(receipt);
    }
    for receipt in receipts.drain(..HANDLED) {
        receipt.handled();
    }
    // The crash: no close, the rest never handled.
    drop(receipts);
    drop(first);

    let mut second = backend.consumer(64).await;
    let mut again = Vec::new();
    // What was handled may or may not have been committed before the crash;
    // everything after it must come again, in order.
    while again.last().map(String::as_str) != Some("crash:9") {
        let Delivery { msg, receipt } = next(&mut second).await;
        receipt.handled();
        again.push(body(&msg));
        assert!(again.len() <= N, "more than the {N} messages: {again:?}");
    }
    let from = N - again.len();
    assert!(from <= HANDLED, "lost messages: only {again:?} came again");
    let expected: Vec<String> = (from..N).map(|i| format!("crash:{i}")).collect();
    assert_eq!(again, expected);
    second.close(Duration::from_secs(5)).await.expect("close");
}

/// A clean close commits exactly the handled prefix: the next consumer
/// starts right after it, with no duplicate and nothing lost.
pub async fn a_clean_close_resumes_after_the_handled_prefix<B: Backend>(backend: &B) {
    const N: usize = 8;
    const HANDLED: usize = 5;
    let producer = backend.producer();
    send_all(producer.as_ref(), (0..N).map(|i| push("close", i))).await;
    let mut first = backend.consumer(64).await;
    let mut receipts = Vec::new();
    for _ in 0..N {
        receipts.push(next(&mut first).await.receipt);
    }
    // Handled out of order: 1 and 3 first, then 0, 2 and 4; 5..8 never.
    let mut receipts: Vec<Option<_>> = receipts.into_iter().map(Some).collect();
    for i in [1, 3, 0, 2, 4] {
        if let Some(receipt) = receipts[i].take() {
            receipt.handled();
        }
    }
    drop(receipts);
    first.close(Duration::from_secs(5)).await.expect("close");

    let mut second = backend.consumer(64).await;
    let mut again = Vec::new();
    for _ in HANDLED..N {
        let Delivery { msg, receipt } = next(&mut second).await;
        receipt.handled();
        again.push(body(&msg));
    }
    let expected: Vec<String> = (HANDLED..N).map(|i| format!("close:{i}")).collect();
    assert_eq!(again, expected);
    second.close(Duration::from_secs(5)).await.expect("close");
}

/// At most `max_in_flight` messages are out: the next one waits until one
/// is handled.
pub async fn in_flight_is_bounded<B: Backend>(backend: &B) {
    const MAX: usize = 3;
    let producer = backend.producer();
    send_all(producer.as_ref(), (0..MAX + 2).map(|i| push("bound", i))).await;
    let mut consumer = backend.consumer(MAX).await;
    let mut out = Vec::new();
    for _ in 0..MAX {
        out.push(next(&mut consumer).await.receipt);
    }
    // A message is waiting, but every slot is taken.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), consumer.recv())
            .await
            .is_err(),
        "a fourth message was handed out with {MAX} in flight"
    );
    out.remove(0).handled();
    let fourth = next(&mut consumer).await;
    assert_eq!(body(&fourth.msg), format!("bound:{MAX}"));
    fourth.receipt.handled();
    for receipt in out {
        receipt.handled();
    }
    next(&mut consumer).await.receipt.handled();
    consumer.close(Duration::from_secs(5)).await.expect("close");
}
