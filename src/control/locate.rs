//! Finding a fleet's control socket from a shell: `sockvisor status`, `sockvisor status
//! myapp`.
//!
//! A client computes the socket path as the daemon does (`config::control_socket_path`),
//! but a shell lacks what the daemon had: systemd's `$RUNTIME_DIRECTORY`, the config file
//! name. So, unless the path was named (`--control`, `runtime_dir`, `-c FILE`,
//! `$RUNTIME_DIRECTORY`), the client looks for the fleet:
//!
//! 1. **Running fleets**: every `sockvisor` process this user may inspect (all of them as
//!    root) and the unix stream socket it listens on, read from /proc (`PID/fd` and
//!    `PID/net/unix`); its systemd unit from `PID/cgroup`. This finds a fleet wherever its
//!    config put the socket, through `PID/root` when the fleet has a private /tmp.
//! 2. **Conventional places**, by name: `/run/NAME/control.sock` (a unit's
//!    `RuntimeDirectory=NAME`, as units/myapp.service), `/run/sockvisor/NAME/control.sock`
//!    (the template `sockvisor@NAME`), `/run/sockvisor/NAME.sock` (a root fleet with config
//!    `NAME.toml`), and the same under `$XDG_RUNTIME_DIR` for user units.
//!
//! With a NAME, a running fleet matches when its unit is `NAME`, `NAME.service` or
//! `sockvisor@NAME.service`, or its socket's directory or file stem is `NAME`. Without one,
//! the default path is used if a fleet listens there; else the only running fleet; several
//! are an error that lists them by name.

use std::path::{Path, PathBuf};

/// A running fleet, as found in /proc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub pid: i32,
    /// Where to connect (through `/proc/PID/root` when the path is not visible here).
    pub socket: PathBuf,
    /// Its systemd unit, if it runs in one (`myapp.service`).
    pub unit: Option<String>,
}

impl Found {
    /// How to name it in a list: its unit, else its socket.
    pub fn name(&self) -> String {
        match &self.unit {
            Some(u) => format!("{u} (pid {}, {})", self.pid, self.socket.display()),
            None => format!("pid {} ({})", self.pid, self.socket.display()),
        }
    }

    fn matches(&self, name: &str) -> bool {
        let bare = name.strip_suffix(".service").unwrap_or(name);
        let unit_matches = self.unit.as_deref().is_some_and(|u| {
            u == name || u == format!("{bare}.service") || u == format!("sockvisor@{bare}.service")
        });
        // `/run/NAME/control.sock`, or `/run/sockvisor/NAME.sock`.
        let named = if self.socket.file_name().is_some_and(|f| f == "control.sock") {
            self.socket.parent().and_then(Path::file_name)
        } else {
            self.socket.file_stem()
        };
        unit_matches || named.and_then(|n| n.to_str()) == Some(bare)
    }
}

/// The socket inodes listed in a `net/unix` table that are listening stream sockets with
/// a path: (inode, path).
fn listening_paths(net_unix: &str) -> Vec<(u64, String)> {
    net_unix
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Num RefCount Protocol Flags Type St Inode Path
            let (flags, kind, inode, path) = (f.get(3)?, f.get(4)?, f.get(6)?, f.get(7)?);
            let listening = u32::from_str_radix(flags, 16).ok()? & 0x0001_0000 != 0;
            let stream = *kind == "0001";
            if !(listening && stream && path.starts_with('/')) {
                return None;
            }
            Some((inode.parse().ok()?, path.to_string()))
        })
        .collect()
}

/// The unit of a process from its /proc/PID/cgroup (v2 line, or v1 `name=systemd`).
fn unit_of(cgroup: &str) -> Option<String> {
    cgroup
        .lines()
        .filter_map(|l| l.splitn(3, ':').nth(2))
        .filter_map(|path| path.rsplit('/').find(|c| c.ends_with(".service")))
        .map(str::to_string)
        .next()
}

/// Socket inodes a process holds.
fn socket_inodes(pid: i32) -> Vec<u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    fds.flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let t = target.to_str()?;
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// Every running sockvisor that listens on a unix stream socket (its control socket).
pub fn running_fleets() -> Vec<Found> {
    let me = std::process::id() as i32;
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim_end() != "sockvisor" {
            continue;
        }
        let inodes = socket_inodes(pid);
        if inodes.is_empty() {
            continue;
        }
        let net = std::fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap_or_default();
        let Some((_, path)) = listening_paths(&net)
            .into_iter()
            .find(|(inode, _)| inodes.contains(inode))
        else {
            continue;
        };
        let mut socket = PathBuf::from(&path);
        if !socket.exists() {
            // A private /tmp (PrivateTmp=) or another mount namespace.
            socket = Path::new(&format!("/proc/{pid}/root")).join(path.trim_start_matches('/'));
        }
        let unit = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .ok()
            .and_then(|c| unit_of(&c));
        found.push(Found { pid, socket, unit });
    }
    found.sort_by_key(|f| f.pid);
    found
}

/// Where a fleet named `name` would have its socket by convention (module docs, step 2).
pub fn conventional_paths(name: &str, xdg_runtime_dir: Option<&Path>) -> Vec<PathBuf> {
    let bare = name.strip_suffix(".service").unwrap_or(name);
    let bare = bare.strip_prefix("sockvisor@").unwrap_or(bare);
    let mut v = Vec::new();
    for base in [Some(Path::new("/run")), xdg_runtime_dir]
        .into_iter()
        .flatten()
    {
        v.push(base.join(bare).join("control.sock"));
        v.push(base.join("sockvisor").join(bare).join("control.sock"));
        v.push(base.join("sockvisor").join(format!("{bare}.sock")));
    }
    v
}

fn is_socket(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

/// The control socket to use (module docs), and, when it was not named, which fleet that
/// is (for a note on stderr). `default` is the path the daemon would use with the same
/// settings; `explicit`: it was named, use it as it is.
pub fn locate(
    default: &Path,
    explicit: bool,
    name: Option<&str>,
    xdg_runtime_dir: Option<&Path>,
) -> Result<(PathBuf, Option<String>), String> {
    let Some(name) = name else {
        if explicit || is_socket(default) {
            return Ok((default.to_path_buf(), None));
        }
        let fleets = running_fleets();
        return match fleets.as_slice() {
            [] => Ok((default.to_path_buf(), None)),
            [one] => Ok((one.socket.clone(), Some(one.name()))),
            many => Err(format!(
                "no sockvisor at {}, and {} others are running: name one (sockvisor status NAME) or give --control PATH: {}",
                default.display(),
                many.len(),
                many.iter().map(Found::name).collect::<Vec<_>>().join("; ")
            )),
        };
    };
    if explicit {
        return Err(format!(
            "both a fleet name ({name}) and a control socket ({}) were given: give one",
            default.display()
        ));
    }
    let fleets = running_fleets();
    let matching: Vec<&Found> = fleets.iter().filter(|f| f.matches(name)).collect();
    match matching.as_slice() {
        [one] => return Ok((one.socket.clone(), None)),
        [] => {}
        many => {
            return Err(format!(
                "{} running fleets match {name:?}: {}; give --control PATH",
                many.len(),
                many.iter().map(|f| f.name()).collect::<Vec<_>>().join("; ")
            ))
        }
    }
    let candidates = conventional_paths(name, xdg_runtime_dir);
    if let Some(p) = candidates.iter().find(|p| is_socket(p)) {
        return Ok((p.clone(), None));
    }
    let running = if fleets.is_empty() {
        "no sockvisor is running that this user can see".to_string()
    } else {
        format!(
            "running: {}",
            fleets
                .iter()
                .map(Found::name)
                .collect::<Vec<_>>()
                .join("; ")
        )
    };
    Err(format!(
        "no fleet named {name:?}: no running sockvisor of that unit or socket, and no socket at {} ({running})",
        candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_unix_tables() {
        let t = "Num       RefCount Protocol Flags    Type St Inode Path
00000000dafc0e4b: 00000002 00000000 00010000 0001 01 139467135 /run/myapp/control.sock
00000000268eef45: 00000003 00000000 00000000 0001 03  1057
00000000397955e0: 00000003 00000000 00000000 0001 03 139475591 /run/myapp/control.sock
000000004c40feda: 00000002 00000000 00010000 0002 01 139475553 /run/dgram.sock
000000004c40fedb: 00000002 00000000 00010000 0001 01 139475554 @abstract
";
        assert_eq!(
            listening_paths(t),
            vec![(139467135, "/run/myapp/control.sock".to_string())]
        );
    }

    #[test]
    fn units_from_cgroups() {
        assert_eq!(
            unit_of("0::/system.slice/myapp.service\n").as_deref(),
            Some("myapp.service")
        );
        assert_eq!(
            unit_of("9:name=systemd:/system.slice/sockvisor@web.service\n0::/\n").as_deref(),
            Some("sockvisor@web.service")
        );
        assert_eq!(unit_of("0::/user.slice/session-1.scope\n"), None);
    }

    #[test]
    fn names_match_units_and_paths() {
        let f = |unit: Option<&str>, socket: &str| Found {
            pid: 1,
            socket: socket.into(),
            unit: unit.map(str::to_string),
        };
        let a = f(Some("myapp.service"), "/run/myapp/control.sock");
        assert!(a.matches("myapp") && a.matches("myapp.service") && !a.matches("other"));
        let t = f(
            Some("sockvisor@web.service"),
            "/run/sockvisor/web/control.sock",
        );
        assert!(t.matches("web") && t.matches("sockvisor@web.service"));
        let plain = f(None, "/run/sockvisor/api.sock");
        assert!(plain.matches("api") && !plain.matches("sockvisor"));
        assert_eq!(
            conventional_paths("sockvisor@web.service", None)[1],
            PathBuf::from("/run/sockvisor/web/control.sock")
        );
    }
}
