//! CPU time of processes from `/proc/<pid>/stat`, to say where time goes.

use serde::Serialize;

/// Clock ticks per second of `/proc/<pid>/stat` times (USER_HZ, 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

/// A process whose CPU time the benchmark reports.
#[derive(Clone, Debug, Serialize)]
pub struct Watched {
    /// Label given on the command line (`comet`, `job`, ...), or `rim-bench`.
    pub name: String,
    /// Process id.
    pub pid: u32,
}

/// Parses `NAME=PID`.
pub fn parse_watched(arg: &str) -> Result<Watched, String> {
    let (name, pid) = arg
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=PID, got {arg:?}"))?;
    let pid = pid
        .parse()
        .map_err(|_| format!("{pid:?} is not a process id"))?;
    Ok(Watched {
        name: name.to_owned(),
        pid,
    })
}

/// utime + stime of a process in seconds; `None` when it cannot be read.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces: count fields after ')'.
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace();
    // After ')' come field 3 (state) onwards; utime and stime are 14 and 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / TICKS_PER_SEC)
}

/// Resident set size (VmRSS) of a process in bytes; `None` when unreadable.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_rss(&status)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Bytes a process caused to be written to storage (`write_bytes` of
/// `/proc/<pid>/io`); `None` when it cannot be read.
pub fn write_bytes(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))?
        .trim()
        .parse()
        .ok()
}

/// The 1-minute load average of the host, from `/proc/loadavg`.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// CPU use of one process over the measured window.
#[derive(Clone, Debug, Serialize)]
pub struct CpuUse {
    /// Label.
    pub name: String,
    /// Process id.
    pub pid: u32,
    /// CPU seconds (user + system) spent in the window.
    pub cpu_seconds: f64,
    /// Average cores busy: cpu_seconds / window seconds.
    pub cores: f64,
}

/// CPU times of the watched processes at one instant.
pub struct Snapshot(Vec<(Watched, Option<f64>)>);

impl Snapshot {
    /// Reads every watched process now.
    pub fn take(watched: &[Watched]) -> Snapshot {
        Snapshot(
            watched
                .iter()
                .map(|w| (w.clone(), cpu_seconds(w.pid)))
                .collect(),
        )
    }

    /// CPU used by each process between `self` and `later`, over `secs`.
    pub fn used_until(&self, later: &Snapshot, secs: f64) -> Vec<CpuUse> {
        self.0
            .iter()
            .zip(&later.0)
            .filter_map(|((w, before), (_, after))| {
                let used = (*after)? - (*before)?;
                Some(CpuUse {
                    name: w.name.clone(),
                    pid: w.pid,
                    cpu_seconds: used,
                    cores: if secs > 0.0 { used / secs } else { 0.0 },
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_name_equals_pid() {
        let w = parse_watched("comet=42").unwrap();
        assert_eq!((w.name.as_str(), w.pid), ("comet", 42));
        assert!(parse_watched("comet").is_err());
        assert!(parse_watched("comet=x").is_err());
    }

    #[test]
    fn reads_own_cpu_time_and_memory() {
        assert!(cpu_seconds(std::process::id()).is_some());
        assert!(rss_bytes(std::process::id()).is_some_and(|b| b > 0));
        assert!(load_average().is_some());
        assert!(write_bytes(std::process::id()).is_some());
        assert_eq!(
            parse_vm_rss("Name:\tx\nVmRSS:\t  1234 kB\n"),
            Some(1234 * 1024)
        );
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
    }
}
