//! The behaviour suite over the in-process queue.

mod suite;

use std::sync::Arc;

use async_trait::async_trait;
use rim_queue::{MemoryConsumer, MemoryProducer, MemoryQueue, Producer, memory_queue};
use suite::Backend;

struct Memory {
    producer: MemoryProducer,
    queue: MemoryQueue,
}

impl Memory {
    fn new() -> Memory {
        let (producer, queue) = memory_queue(1024, 64 << 20);
        Memory { producer, queue }
    }
}

#[async_trait]
impl Backend for Memory {
    type Consumer = MemoryConsumer;

    fn producer(&self) -> Arc<dyn Producer> {
        Arc::new(self.producer.clone())
    }

    async fn consumer(&self, max_in_flight: usize) -> MemoryConsumer {
        self.queue
            .consumer(max_in_flight)
            .expect("no other consumer")
    }
}

#[tokio::test]
async fn order_holds_per_key() {
    suite::order_holds_per_key(&Memory::new()).await;
}

#[tokio::test]
async fn a_crash_before_commit_redelivers() {
    suite::a_crash_before_commit_redelivers(&Memory::new()).await;
}

#[tokio::test]
async fn a_clean_close_resumes_after_the_handled_prefix() {
    suite::a_clean_close_resumes_after_the_handled_prefix(&Memory::new()).await;
}

#[tokio::test]
async fn in_flight_is_bounded() {
    suite::in_flight_is_bounded(&Memory::new()).await;
}
