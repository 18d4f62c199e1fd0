//! Metrics every role has: what build it is and what the process costs.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::exposition::gauge;

/// Registers `rim_build_info{version, role}` (always 1) and the process
/// metrics read from `/proc/self` at scrape time.
pub fn register_common(registry: &mut Registry, role: &'static str) {
    let info: Family<[(&'static str, &'static str); 2], Gauge> = Family::default();
    info.get_or_create(&[("version", env!("CARGO_PKG_VERSION")), ("role", role)])
        .set(1);
    registry.register(
        "rim_build_info",
        "Always 1; the labels say which rim version runs which role",
        info,
    );
    registry.register_collector(Box::new(ProcessCollector));
}

/// Reads `/proc/self` on each scrape; on systems without it, writes nothing.
#[derive(Debug)]
struct ProcessCollector;

/// Kernel clock ticks per second in /proc/self/stat (USER_HZ, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        if let Some(bytes) = resident_bytes() {
            gauge(
                &mut encoder,
                "rim_process_resident_memory_bytes",
                "Resident memory of the process, in bytes.",
                i64::try_from(bytes).unwrap_or(i64::MAX),
            )?;
        }
        if let Some(ticks) = cpu_ticks() {
            let mut metric = encoder.encode_descriptor(
                "rim_process_cpu_seconds",
                "User and system CPU time the process used, in seconds.",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            metric.encode_counter::<prometheus_client::encoding::NoLabelSet, f64, u64>(
                &(ticks as f64 / TICKS_PER_SECOND),
                None,
            )?;
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            gauge(
                &mut encoder,
                "rim_process_open_fds",
                "Open file descriptors (every client connection is one).",
                fds.count() as i64,
            )?;
        }
        if let Some(threads) = threads() {
            gauge(
                &mut encoder,
                "rim_process_threads",
                "Threads of the process.",
                i64::try_from(threads).unwrap_or(i64::MAX),
            )?;
        }
        Ok(())
    }
}

/// VmRSS from /proc/self/status, in bytes.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// utime + stime from /proc/self/stat, in clock ticks.
fn cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may contain spaces: count after its ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn threads() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Threads:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_info_and_process_metrics_are_exposed() {
        let mut registry = Registry::default();
        register_common(&mut registry, "comet");
        let text = crate::encode(&registry);
        let info = format!(
            "rim_build_info{{version=\"{}\",role=\"comet\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.lines().any(|l| l == info), "{text}");
        if std::path::Path::new("/proc/self/stat").exists() {
            let rss = text
                .lines()
                .find_map(|l| l.strip_prefix("rim_process_resident_memory_bytes "))
                .and_then(|v| v.parse::<u64>().ok())
                .expect("resident memory sample");
            assert!(rss > 0, "{text}");
            assert!(text.contains("rim_process_cpu_seconds_total "), "{text}");
            assert!(text.contains("rim_process_open_fds "), "{text}");
        }
    }
}
