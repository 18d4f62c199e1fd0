//! Latency histograms in microseconds, sharded so that many client tasks can
//! record at once without contending on one lock.

use parking_lot::Mutex;

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
        let mut shard = self.shards[who % self.shards.len()].lock();
        shard.interval.saturating_record(micros);
        if measured {
            shard.total.saturating_record(micros);
        }
    }

    /// Returns the samples since the last call, and starts a new interval.
    pub fn take_interval(&self) -> Histogram<u64> {
        let mut merged = histogram();
        for shard in &self.shards {
            let mut shard = shard.lock();
            // Same bounds on both sides: adding cannot fail.
            let _ = merged.add(&shard.interval);
            shard.interval.reset();
        }
        merged
    }

    /// Forgets every sample.
    pub fn reset(&self) {
        for shard in &self.shards {
            let mut shard = shard.lock();
            shard.total.reset();
            shard.interval.reset();
        }
    }

    /// The measured samples so far.
    pub fn total(&self) -> Histogram<u64> {
        let mut merged = histogram();
        for shard in &self.shards {
            let shard = shard.lock();
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

/// The recorded values of a histogram as (value µs, count) pairs, to carry
/// a histogram between processes as JSON.
pub fn to_pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

/// Adds (value µs, count) pairs to a histogram; values beyond the bounds
/// saturate.
pub fn add_pairs(h: &mut Histogram<u64>, pairs: &[(u64, u64)]) {
    for &(value, count) in pairs {
        // Clamped into the bounds, so recording cannot fail.
        let _ = h.record_n(value.clamp(1, MAX_US), count);
    }
}

/// The cumulative distribution as (latency ms, percent of samples at or
/// below it), at most about `max_points` points, for plotting.
pub fn cdf_points(h: &Histogram<u64>, max_points: usize) -> Vec<(f64, f64)> {
    let total = h.len();
    if total == 0 {
        return Vec::new();
    }
    let recorded: Vec<(u64, u64)> = to_pairs(h);
    let step = recorded.len().div_ceil(max_points.max(1)).max(1);
    let mut seen = 0u64;
    let mut points = Vec::with_capacity(recorded.len() / step + 2);
    for (i, (value, count)) in recorded.iter().enumerate() {
        seen += count;
        if i % step == 0 || i + 1 == recorded.len() {
            points.push((*value as f64 / 1e3, seen as f64 * 100.0 / total as f64));
        }
    }
    points
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
    fn histograms_travel_as_pairs() {
        let mut h = histogram();
        for v in [10, 10, 500, 20_000, 3_000_000] {
            h.record(v).unwrap();
        }
        let pairs = to_pairs(&h);
        assert_eq!(pairs.iter().map(|p| p.1).sum::<u64>(), 5);
        let mut back = histogram();
        add_pairs(&mut back, &pairs);
        add_pairs(&mut back, &[(0, 1), (u64::MAX, 1)]);
        assert_eq!(back.len(), 7);
        assert_eq!(back.value_at_quantile(0.5), h.value_at_quantile(0.5));
        assert!(back.max() >= MAX_US - MAX_US / 1000);
    }

    #[test]
    fn cdf_rises_to_one_hundred_percent() {
        assert!(cdf_points(&histogram(), 100).is_empty());
        let mut h = histogram();
        for v in 1..=10_000u64 {
            h.record(v).unwrap();
        }
        let cdf = cdf_points(&h, 50);
        assert!(cdf.len() <= 52, "{}", cdf.len());
        assert!(cdf.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
        let last = cdf.last().unwrap();
        assert!((last.1 - 100.0).abs() < 1e-9);
        assert!((last.0 - 10.0).abs() < 0.02, "{last:?}");
    }

    #[test]
    fn formats_durations() {
        assert_eq!(human(850), "850µs");
        assert_eq!(human(12_340), "12.3ms");
        assert_eq!(human(1_200_000), "1.20s");
    }
}
