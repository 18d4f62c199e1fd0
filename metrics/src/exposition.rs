//! The text exposition and helpers for collectors.

use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// The Content-Type of [`encode`]'s output (OpenMetrics text 1.0).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Encodes every metric of the registry in the OpenMetrics text format.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::with_capacity(16 * 1024);
    // Writing to a String cannot fail; an encoder error would be a bug in a
    // collector, and a partial exposition is still better than none.
    if let Err(err) = prometheus_client::encoding::text::encode(&mut text, registry) {
        tracing::warn!(reason = %err, "metrics exposition incomplete");
    }
    text
}

/// Histogram buckets for latencies, in seconds: 100 µs to about 26 s.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 19)
}

/// Histogram buckets for sizes and counts: 1 to 4096.
pub fn size_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 13)
}

/// Writes one counter (`<name>_total`) with no labels.
pub fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    metric.encode_counter::<NoLabelSet, u64, u64>(&value, None)
}

/// Writes one gauge with no labels.
pub fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: i64,
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    metric.encode_gauge(&value)
}

/// Writes a counter family with one label, one sample per `(value, count)`.
pub fn counter_family<'a>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    label: &str,
    samples: impl IntoIterator<Item = (&'a str, u64)>,
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, count) in samples {
        let labels = [(label, value)];
        metric
            .encode_family(&labels)?
            .encode_counter::<NoLabelSet, u64, u64>(&count, None)?;
    }
    Ok(())
}

/// Writes a gauge family with one label, one sample per `(value, level)`.
/// With no samples, only the family's HELP and TYPE lines are written.
pub fn gauge_family<V: AsRef<str>>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    label: &str,
    samples: impl IntoIterator<Item = (V, i64)>,
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (value, level) in samples {
        let labels = [(label, value.as_ref())];
        metric.encode_family(&labels)?.encode_gauge(&level)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use prometheus_client::collector::Collector;

    use super::*;

    #[derive(Debug)]
    struct Fixed;

    impl Collector for Fixed {
        fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
            counter(&mut encoder, "t_frames", "Frames.", 7)?;
            gauge(&mut encoder, "t_level", "Level.", -3)?;
            counter_family(
                &mut encoder,
                "t_auth",
                "Auths.",
                "result",
                [("ok", 2), ("failed", 1)],
            )?;
            gauge_family(
                &mut encoder,
                "t_lag",
                "Lag.",
                "partition",
                Vec::<(String, i64)>::new(),
            )
        }
    }

    #[test]
    fn collectors_write_openmetrics_families() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Fixed));
        let text = encode(&registry);
        for line in [
            "# TYPE t_frames counter",
            "t_frames_total 7",
            "t_level -3",
            "t_auth_total{result=\"ok\"} 2",
            "t_auth_total{result=\"failed\"} 1",
            "# TYPE t_lag gauge",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
    }

    #[test]
    fn latency_buckets_span_sub_millisecond_to_seconds() {
        let buckets: Vec<f64> = latency_buckets().collect();
        assert!(buckets[0] <= 0.0001 + f64::EPSILON);
        assert!(*buckets.last().unwrap() > 20.0);
    }
}
