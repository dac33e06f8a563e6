//! What the machine lets this process use, as a container or a systemd unit sees it: the CPUs
//! of its affinity mask, the CPU quota of its cgroup (v2 `cpu.max`, v1
//! `cpu.cfs_quota_us`/`cpu.cfs_period_us`, on unified, legacy and hybrid layouts), and the
//! OOM kills its cgroup counted (v2 `memory.events`, v1 `memory.oom_control`).
//!
//! The default worker count (`workers = "auto"`) is [`CpuLimit::workers`]: the CPUs of the
//! affinity mask, lowered to the quota rounded up (a 1.5-CPU quota gives 2 workers: a
//! worker is idle part of the time, and the kernel throttles the cgroup at its quota
//! whatever the process count), at least 1. A quota anywhere between sockvisor's cgroup and
//! the root of the hierarchy counts (a parent's quota limits its children): the smallest
//! wins. Only files are read: nothing here needs privileges, and a file that cannot be read
//! means "no limit there".

use std::fmt;
use std::path::{Path, PathBuf};

/// A CPU quota found in a cgroup.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuQuota {
    /// CPUs' worth of time per period (quota / period).
    pub cpus: f64,
    /// The file(s) it came from and their values, for the log.
    pub source: String,
}

/// The CPUs this process may use.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuLimit {
    /// CPUs in the affinity mask (`Cpus_allowed_list`), or what the system reports.
    pub affinity: usize,
    /// The smallest CPU quota of its cgroup and the cgroup's parents, if any.
    pub quota: Option<CpuQuota>,
}

impl CpuLimit {
    /// The limit of the calling process.
    pub fn of_this_process() -> CpuLimit {
        let proc_root = Path::new("/proc/self");
        let affinity = std::fs::read_to_string(proc_root.join("status"))
            .ok()
            .and_then(|s| affinity_from_status(&s))
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let quota = match (
            std::fs::read_to_string(proc_root.join("cgroup")),
            std::fs::read_to_string(proc_root.join("mountinfo")),
        ) {
            (Ok(cgroup), Ok(mountinfo)) => cpu_quota(&cgroup, &mountinfo, Path::new("/")),
            _ => None,
        };
        CpuLimit { affinity, quota }
    }

    /// Workers to run: see the module docs.
    pub fn workers(&self) -> usize {
        let by_quota = self
            .quota
            .as_ref()
            .map_or(usize::MAX, |q| (q.cpus.ceil() as usize).max(1));
        self.affinity.min(by_quota).max(1)
    }
}

impl fmt::Display for CpuLimit {
    /// `2 CPUs in the affinity mask; cgroup CPU quota 1.00 (cpu.max "100000 100000" in ...)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} CPU{} in the affinity mask",
            self.affinity,
            if self.affinity == 1 { "" } else { "s" }
        )?;
        match &self.quota {
            Some(q) => write!(f, "; cgroup CPU quota {:.2} ({})", q.cpus, q.source),
            None => write!(f, "; no cgroup CPU quota"),
        }
    }
}

/// The count of CPUs in `Cpus_allowed_list:` of /proc/PID/status (`0-3,8,10-11`).
fn affinity_from_status(status: &str) -> Option<usize> {
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?
        .trim();
    let mut n = 0usize;
    for part in list.split(',').filter(|p| !p.is_empty()) {
        n += match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                b.checked_sub(a)? + 1
            }
            None => {
                part.trim().parse::<usize>().ok()?;
                1
            }
        };
    }
    (n > 0).then_some(n)
}

/// One line of /proc/self/cgroup: `ID:CONTROLLERS:PATH`.
struct Membership<'a> {
    controllers: Vec<&'a str>,
    path: &'a str,
}

fn memberships(cgroup: &str) -> impl Iterator<Item = Membership<'_>> {
    cgroup.lines().filter_map(|l| {
        let mut parts = l.splitn(3, ':');
        let _id = parts.next()?;
        let controllers = parts.next()?.split(',').filter(|c| !c.is_empty()).collect();
        let path = parts.next()?;
        Some(Membership { controllers, path })
    })
}

/// A cgroup mount from /proc/self/mountinfo.
struct Mount {
    /// The cgroup path the mount shows at its mount point (`/` but in a cgroup namespace
    /// or a bind mount of a sub-tree).
    root: String,
    point: PathBuf,
    v2: bool,
    /// v1: the controllers of the hierarchy (from the super options).
    controllers: Vec<String>,
}

/// mountinfo escapes spaces and a few others as `\040`-style octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn cgroup_mounts(mountinfo: &str) -> Vec<Mount> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        if left.len() < 5 || right.len() < 3 {
            continue;
        }
        let (fstype, superopts) = (right[0], right[2]);
        let v2 = match fstype {
            "cgroup2" => true,
            "cgroup" => false,
            _ => continue,
        };
        out.push(Mount {
            root: unescape(left[3]),
            point: PathBuf::from(unescape(left[4])),
            v2,
            controllers: superopts.split(',').map(str::to_string).collect(),
        });
    }
    out
}

/// The directory of the cgroup at `path` under `mount`, if the mount shows it.
fn cgroup_dir(mount: &Mount, path: &str) -> Option<PathBuf> {
    let rel = if mount.root == "/" {
        path.trim_start_matches('/')
    } else {
        path.strip_prefix(mount.root.as_str())?
            .trim_start_matches('/')
    };
    Some(mount.point.join(rel))
}

/// The directories from `dir` up to `top` (the mount point), both included.
fn up_to(dir: &Path, top: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut d = Some(dir);
    while let Some(p) = d {
        out.push(p.to_path_buf());
        if p == top || !p.starts_with(top) {
            break;
        }
        d = p.parent();
    }
    out
}

fn read(root: &Path, file: &Path) -> Option<String> {
    let full = root.join(file.strip_prefix("/").unwrap_or(file));
    std::fs::read_to_string(full)
        .ok()
        .map(|s| s.trim().to_string())
}

/// v2: `cpu.max` is `max PERIOD` or `QUOTA PERIOD`.
fn quota_v2(root: &Path, dir: &Path) -> Option<CpuQuota> {
    let file = dir.join("cpu.max");
    let text = read(root, &file)?;
    let mut parts = text.split_whitespace();
    let quota: f64 = parts.next()?.parse().ok()?; // "max" does not parse: no quota
    let period: f64 = parts.next()?.parse().ok()?;
    (quota > 0.0 && period > 0.0).then(|| CpuQuota {
        cpus: quota / period,
        source: format!("{} = \"{text}\"", file.display()),
    })
}

/// v1: `cpu.cfs_quota_us` (-1: none) and `cpu.cfs_period_us`.
fn quota_v1(root: &Path, dir: &Path) -> Option<CpuQuota> {
    let qfile = dir.join("cpu.cfs_quota_us");
    let pfile = dir.join("cpu.cfs_period_us");
    let quota: i64 = read(root, &qfile)?.parse().ok()?;
    let period: i64 = read(root, &pfile)?.parse().ok()?;
    (quota > 0 && period > 0).then(|| CpuQuota {
        cpus: quota as f64 / period as f64,
        source: format!(
            "{} = {quota}, {} = {period}",
            qfile.display(),
            pfile.display()
        ),
    })
}

/// A cgroup of this process that has `controller`: on the v1 hierarchy of that controller,
/// or on the v2 hierarchy (whose controllers are not listed in /proc/PID/cgroup).
struct Place {
    v2: bool,
    dir: PathBuf,
    mount_point: PathBuf,
}

/// Every place of `controller` in a /proc/PID/cgroup and mountinfo pair.
fn places(cgroup: &str, mountinfo: &str, controller: &str) -> Vec<Place> {
    let mounts = cgroup_mounts(mountinfo);
    let mut out = Vec::new();
    for m in memberships(cgroup) {
        let v2 = m.controllers.is_empty();
        let mount = mounts.iter().find(|mt| {
            mt.v2 == v2
                && (v2
                    || (m.controllers.contains(&controller)
                        && mt.controllers.iter().any(|c| c == controller)))
        });
        if let Some(mount) = mount {
            if let Some(dir) = cgroup_dir(mount, m.path) {
                out.push(Place {
                    v2,
                    dir,
                    mount_point: mount.point.clone(),
                });
            }
        }
    }
    out
}

/// The smallest CPU quota on the way from this process's cgroup up to the root, on the v1
/// `cpu` hierarchy and the v2 hierarchy (a hybrid layout has both; the smaller applies).
/// `root` prefixes every path read (tests use a scratch tree; "/" otherwise).
fn cpu_quota(cgroup: &str, mountinfo: &str, root: &Path) -> Option<CpuQuota> {
    let mut best: Option<CpuQuota> = None;
    for place in places(cgroup, mountinfo, "cpu") {
        for d in up_to(&place.dir, &place.mount_point) {
            let q = if place.v2 {
                quota_v2(root, &d)
            } else {
                quota_v1(root, &d)
            };
            if let Some(q) = q {
                if best.as_ref().is_none_or(|b| q.cpus < b.cpus) {
                    best = Some(q);
                }
            }
        }
    }
    best
}

/// Where this process's cgroup counts OOM kills: v2 `memory.events` (`oom_kill N`), v1
/// `memory.oom_control` (`oom_kill N`, kernels >= 4.13).
#[derive(Debug, Clone)]
pub struct OomCounter {
    file: PathBuf,
}

impl OomCounter {
    /// The counter of the calling process's memory cgroup, if it has one we can read.
    pub fn of_this_process() -> Option<OomCounter> {
        let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let mut candidates: Vec<(bool, PathBuf)> = places(&cgroup, &mountinfo, "memory")
            .into_iter()
            .map(|p| {
                let file = if p.v2 {
                    "memory.events"
                } else {
                    "memory.oom_control"
                };
                (p.v2, p.dir.join(file))
            })
            .collect();
        // v1's own file first: on a hybrid layout the memory controller is there.
        candidates.sort_by_key(|(v2, _)| *v2);
        candidates
            .into_iter()
            .map(|(_, file)| OomCounter { file })
            .find(|c| c.read().is_some())
    }

    /// OOM kills counted so far.
    pub fn read(&self) -> Option<u64> {
        let text = std::fs::read_to_string(&self.file).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
    }

    pub fn path(&self) -> &Path {
        &self.file
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affinity_lists() {
        let s = |l: &str| affinity_from_status(&format!("Name:\tx\nCpus_allowed_list:\t{l}\n"));
        assert_eq!(s("0"), Some(1));
        assert_eq!(s("0-1"), Some(2));
        assert_eq!(s("0-3,8,10-11"), Some(7));
        assert_eq!(s(""), None);
        assert_eq!(s("3-1"), None);
        assert_eq!(affinity_from_status("Name: x\n"), None);
    }

    fn limit(affinity: usize, cpus: Option<f64>) -> CpuLimit {
        CpuLimit {
            affinity,
            quota: cpus.map(|cpus| CpuQuota {
                cpus,
                source: "test".into(),
            }),
        }
    }

    #[test]
    fn workers_from_affinity_and_quota() {
        assert_eq!(limit(48, Some(2.0)).workers(), 2);
        assert_eq!(limit(2, Some(1.0)).workers(), 1);
        assert_eq!(limit(2, Some(1.5)).workers(), 2);
        assert_eq!(limit(8, Some(0.25)).workers(), 1);
        assert_eq!(limit(1, Some(4.0)).workers(), 1);
        assert_eq!(limit(4, None).workers(), 4);
        assert!(limit(2, Some(1.0))
            .to_string()
            .contains("quota 1.00 (test)"));
    }

    /// A scratch hybrid layout: v1 `cpu` at /sys/fs/cgroup/cpu,cpuacct with a quota on the
    /// parent, v2 at /sys/fs/cgroup/unified with a larger one.
    #[test]
    fn quotas_of_a_hybrid_layout() {
        let root = tempfile::tempdir().unwrap();
        let w = |p: &str, s: &str| {
            let p = root.path().join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, s).unwrap();
        };
        w("sys/fs/cgroup/cpu,cpuacct/app/cpu.cfs_quota_us", "-1\n");
        w(
            "sys/fs/cgroup/cpu,cpuacct/app/cpu.cfs_period_us",
            "100000\n",
        );
        w("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "150000\n");
        w("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n");
        w("sys/fs/cgroup/unified/app/svc/cpu.max", "max 100000\n");
        w("sys/fs/cgroup/unified/app/cpu.max", "300000 100000\n");
        let mountinfo = "\
30 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
31 25 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
32 25 0:28 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
";
        let cgroup = "4:memory:/app\n2:cpu,cpuacct:/app\n0::/app/svc\n";
        let q = cpu_quota(cgroup, mountinfo, root.path()).unwrap();
        assert_eq!(q.cpus, 1.5);
        assert!(
            q.source.contains("cpu.cfs_quota_us = 150000"),
            "{}",
            q.source
        );
        // v2 only
        let q = cpu_quota("0::/app/svc\n", mountinfo, root.path()).unwrap();
        assert_eq!(q.cpus, 3.0);
        assert!(q.source.contains("\"300000 100000\""), "{}", q.source);
        // no quota anywhere
        assert_eq!(cpu_quota("0::/other\n", mountinfo, root.path()), None);
        // a cgroup namespace: the mount shows /app at its mount point
        let ns = "31 25 0:27 /app /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        w("sys/fs/cgroup/unified/svc/cpu.max", "50000 100000\n");
        let q = cpu_quota("0::/app/svc\n", ns, root.path()).unwrap();
        assert_eq!(q.cpus, 0.5);
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
    }

    #[test]
    fn this_process_has_a_limit() {
        let l = CpuLimit::of_this_process();
        assert!(l.affinity >= 1 && l.workers() >= 1, "{l}");
    }
}
