//! CPU time of processes from `/proc/<pid>/stat`, to say where time goes.

use std::collections::HashMap;

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

/// The parent process id of a `/proc/<pid>/stat` line (field 4).
fn parent_of(stat: &str) -> Option<u32> {
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Each watched process with its direct children (processes whose parent is
/// it), read from one pass over `/proc`.
fn with_children(watched: &[Watched]) -> Vec<Vec<u32>> {
    let mut groups: Vec<Vec<u32>> = watched.iter().map(|w| vec![w.pid]).collect();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return groups;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Some(parent) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .as_deref()
            .and_then(parent_of)
        else {
            continue;
        };
        for (w, group) in watched.iter().zip(&mut groups) {
            if w.pid == parent {
                group.push(pid);
            }
        }
    }
    groups
}

/// CPU times of the watched processes *and their direct children* at one
/// instant (PostgreSQL: the postmaster and its backends and workers).
pub struct TreeSnapshot(Vec<(Watched, HashMap<u32, f64>)>);

impl TreeSnapshot {
    /// Reads every watched process and its children now.
    pub fn take(watched: &[Watched]) -> TreeSnapshot {
        TreeSnapshot(
            watched
                .iter()
                .zip(with_children(watched))
                .map(|(w, pids)| {
                    let times = pids
                        .into_iter()
                        .filter_map(|pid| Some((pid, cpu_seconds(pid)?)))
                        .collect();
                    (w.clone(), times)
                })
                .collect(),
        )
    }

    /// CPU used by each watched process and its children between `self` and
    /// `later`, over `secs`. A child that appeared in between counts all its
    /// CPU time; one that exited in between is not counted (its time is in
    /// the parent's `cutime`, which this does not read). A process that
    /// could not be read at the end is left out.
    pub fn used_until(&self, later: &TreeSnapshot, secs: f64) -> Vec<CpuUse> {
        self.0
            .iter()
            .zip(&later.0)
            .filter(|(_, (w, after))| after.contains_key(&w.pid))
            .map(|((w, before), (_, after))| {
                let used: f64 = after
                    .iter()
                    .map(|(pid, t)| (t - before.get(pid).copied().unwrap_or(0.0)).max(0.0))
                    .sum();
                CpuUse {
                    name: w.name.clone(),
                    pid: w.pid,
                    cpu_seconds: used,
                    cores: if secs > 0.0 { used / secs } else { 0.0 },
                }
            })
            .collect()
    }
}

/// The whole box's CPU time from the first line of `/proc/stat`, in clock
/// ticks: (busy, busy + idle). Busy is user + nice + system + irq + softirq
/// + steal; idle is idle + iowait.
pub fn box_ticks() -> Option<(u64, u64)> {
    parse_box_ticks(&std::fs::read_to_string("/proc/stat").ok()?)
}

fn parse_box_ticks(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let field = |i: usize| v.get(i).copied().unwrap_or(0);
    let busy = field(0) + field(1) + field(2) + field(5) + field(6) + field(7);
    let idle = field(3) + field(4);
    Some((busy, busy + idle))
}

/// Cores of the whole box busy between two `box_ticks` readings `secs`
/// apart.
pub fn box_busy_cores(before: (u64, u64), after: (u64, u64), secs: f64) -> Option<f64> {
    let busy = after.0.checked_sub(before.0)?;
    (secs > 0.0).then(|| busy as f64 / TICKS_PER_SEC / secs)
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

    #[test]
    fn counts_children_and_the_box() {
        assert_eq!(parent_of("12 (a b) S 7 12 12 0"), Some(7));
        assert_eq!(parent_of("12 (x"), None);
        // This test process's parent sees it as a child.
        let me = Watched {
            name: "parent".into(),
            pid: parent_of(&std::fs::read_to_string("/proc/self/stat").unwrap()).unwrap(),
        };
        let groups = with_children(std::slice::from_ref(&me));
        assert!(groups[0].contains(&std::process::id()));
        let snap = TreeSnapshot::take(&[me]);
        let used = snap.used_until(
            &TreeSnapshot::take(&[Watched {
                name: "parent".into(),
                pid: snap.0[0].0.pid,
            }]),
            1.0,
        );
        assert_eq!(used.len(), 1);
        assert!(used[0].cpu_seconds >= 0.0);
        let stat = "cpu  10 1 5 100 4 2 3 7 0 0\ncpu0 1 1 1 1 1 1 1 1 0 0\n";
        assert_eq!(parse_box_ticks(stat), Some((28, 132)));
        assert_eq!(parse_box_ticks("intr 5\n"), None);
        assert_eq!(box_busy_cores((0, 0), (200, 400), 2.0), Some(1.0));
        assert_eq!(box_busy_cores((5, 0), (1, 0), 2.0), None);
        assert!(box_ticks().is_some());
    }
}
