//! Latency histograms in microseconds, sharded so that many client tasks can
//! record at once without contending on one lock.

use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest latency recorded exactly, in microseconds (larger ones saturate).
const MAX_US: u64 = 120_000_000;
/// Significant decimal digits kept (0.1 % resolution).
const SIGFIGS: u8 = 3;

/// A new, empty histogram with the benchmark's bounds.
pub fn histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts.
    Histogram::new_with_bounds(1, MAX_US, SIGFIGS).expect("valid histogram bounds")
}

struct Shard {
    /// Samples of the measured window.
    total: Histogram<u64>,
    /// Every sample since the last progress line.
    interval: Histogram<u64>,
}

/// Histograms shared by many recorders.
pub struct Recorder {
    shards: Vec<Mutex<Shard>>,
}

impl Recorder {
    /// A recorder with `shards` shards.
    pub fn new(shards: usize) -> Recorder {
        Recorder {
            shards: (0..shards.max(1))
                .map(|_| {
                    Mutex::new(Shard {
                        total: histogram(),
                        interval: histogram(),
                    })
                })
                .collect(),
        }
    }

    /// Records one sample from recorder number `who`; `measured` samples also
    /// go into the totals.
    pub fn record(&self, who: usize, micros: u64, measured: bool) {
        let micros = micros.max(1);
        let mut shard = self.shards[who % self.shards.len()]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        shard.interval.saturating_record(micros);
        if measured {
            shard.total.saturating_record(micros);
        }
    }

    /// Returns the samples since the last call, and starts a new interval.
    pub fn take_interval(&self) -> Histogram<u64> {
        let mut merged = histogram();
        for shard in &self.shards {
            let mut shard = shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Same bounds on both sides: adding cannot fail.
            let _ = merged.add(&shard.interval);
            shard.interval.reset();
        }
        merged
    }

    /// The measured samples so far.
    pub fn total(&self) -> Histogram<u64> {
        let mut merged = histogram();
        for shard in &self.shards {
            let shard = shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let _ = merged.add(&shard.total);
        }
        merged
    }
}

/// Summary of a histogram, in microseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest sample.
    pub max: u64,
}

impl Percentiles {
    /// Summarizes `h`.
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            mean: h.mean(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// Formats microseconds for humans: `850µs`, `12.3ms`, `1.20s`.
pub fn human(micros: u64) -> String {
    let us = micros as f64;
    if micros < 1_000 {
        format!("{micros}µs")
    } else if micros < 1_000_000 {
        format!("{:.1}ms", us / 1e3)
    } else {
        format!("{:.2}s", us / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_reset_and_totals_keep_only_measured_samples() {
        let r = Recorder::new(4);
        for i in 0..100 {
            r.record(i, 1_000, i >= 50);
        }
        assert_eq!(r.take_interval().len(), 100);
        assert_eq!(r.take_interval().len(), 0);
        let total = r.total();
        assert_eq!(total.len(), 50);
        let p = Percentiles::of(&total);
        assert!((999..=1_001).contains(&p.p50), "{p:?}");
    }

    #[test]
    fn formats_durations() {
        assert_eq!(human(850), "850µs");
        assert_eq!(human(12_340), "12.3ms");
        assert_eq!(human(1_200_000), "1.20s");
    }
}
