//! Figures of a process from /proc: sockvisor's own for the standard `process_*` series,
//! and a worker's resident memory for `worker_memory_max`.
//!
//! The kernel reports CPU times in `USER_HZ` ticks, 100 per second on every Linux ABI (the
//! Prometheus Go client's procfs assumes the same).

use std::path::PathBuf;

const USER_HZ: f64 = 100.0;

/// sockvisor's own figures, as the Prometheus clients' process collectors name them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessFigures {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub open_fds: u64,
    pub max_fds: u64,
    pub start_time_seconds: f64,
}

fn proc_dir(pid: Option<i32>) -> PathBuf {
    match pid {
        Some(p) => PathBuf::from(format!("/proc/{p}")),
        None => PathBuf::from("/proc/self"),
    }
}

/// A `Name:   N kB` line of /proc/PID/status, in bytes.
fn status_kb(status: &str, name: &str) -> Option<u64> {
    let rest = status.lines().find_map(|l| l.strip_prefix(name))?;
    let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb.saturating_mul(1024))
}

/// The resident memory of `pid` (`VmRSS`), or `None` once it is gone (or a zombie).
pub fn resident_bytes(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(proc_dir(Some(pid)).join("status")).ok()?;
    status_kb(&status, "VmRSS:")
}

/// (utime + stime in seconds, start time in ticks after boot) from /proc/PID/stat.
fn stat_times(stat: &str) -> Option<(f64, u64)> {
    // The command name may hold spaces and parentheses: fields count from its last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Field 3 (state) is f[0]: utime is field 14, stime 15, starttime 22.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let start: u64 = f.get(19)?.parse().ok()?;
    Some(((utime + stime) as f64 / USER_HZ, start))
}

fn boot_time() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// sockvisor's own figures now; what cannot be read is 0.
pub fn this_process() -> ProcessFigures {
    let dir = proc_dir(None);
    let mut f = ProcessFigures::default();
    if let Some((cpu, start)) = std::fs::read_to_string(dir.join("stat"))
        .ok()
        .as_deref()
        .and_then(stat_times)
    {
        f.cpu_seconds = cpu;
        if let Some(boot) = boot_time() {
            f.start_time_seconds = boot as f64 + start as f64 / USER_HZ;
        }
    }
    if let Ok(status) = std::fs::read_to_string(dir.join("status")) {
        f.resident_bytes = status_kb(&status, "VmRSS:").unwrap_or(0);
        f.virtual_bytes = status_kb(&status, "VmSize:").unwrap_or(0);
    }
    f.open_fds = std::fs::read_dir(dir.join("fd")).map_or(0, |d| d.count() as u64);
    f.max_fds = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(0, |(soft, _)| soft);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_and_status() {
        let stat = "1234 (a (weird) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 9000 1000 200 18446744073709551615";
        assert_eq!(stat_times(stat), Some((3.0, 9000)));
        assert_eq!(stat_times("garbage"), None);
        let status = "Name:\tx\nVmSize:\t   2048 kB\nVmRSS:\t    512 kB\n";
        assert_eq!(status_kb(status, "VmRSS:"), Some(512 * 1024));
        assert_eq!(status_kb(status, "VmSize:"), Some(2048 * 1024));
        assert_eq!(status_kb(status, "VmSwap:"), None);
    }

    #[test]
    fn reads_this_process() {
        let f = this_process();
        assert!(
            f.resident_bytes > 0 && f.open_fds >= 3 && f.max_fds > 0,
            "{f:?}"
        );
        assert!(f.start_time_seconds > 1.0e9, "{f:?}");
        assert!(resident_bytes(std::process::id() as i32).is_some());
    }
}
