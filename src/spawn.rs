//! fork + exec of a worker. Everything the child needs is prepared before `fork` (invariant
//! 4 in lib.rs): argv, envp with `LISTEN_PID=` (and `WATCHDOG_PID=`) placeholders that the
//! child patches in place, the fd plan, the credentials. Between fork and exec the child
//! makes only raw, async-signal-safe syscalls. This module holds all of sockvisor's
//! `unsafe` that concerns processes.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::unistd::{ForkResult, Pid};

/// Variables of sockvisor's own that never reach a worker (invariant 3): the service
/// manager's protocol variables, and sockvisor's configuration.
fn is_private_variable(key: &str) -> bool {
    matches!(
        key,
        "LISTEN_PID"
            | "LISTEN_FDS"
            | "LISTEN_FDNAMES"
            | "NOTIFY_SOCKET"
            | "WATCHDOG_USEC"
            | "WATCHDOG_PID"
    ) || key.starts_with("SOCKVISOR_")
}

/// Width of the pid placeholders: enough for any pid (`pid_max` is at most 2^22).
const PID_DIGITS: usize = 10;

/// A worker command, resolved and checked before any worker is forked.
#[derive(Debug, Clone)]
pub struct Command {
    program: CString,
    argv: Vec<CString>,
    /// sockvisor's environment without its private variables, as `KEY=VALUE`.
    base_env: Vec<CString>,
    credentials: Option<Credentials>,
}

/// Who workers run as, resolved with getpwnam/getgrnam before fork.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub groups: Vec<libc::gid_t>,
    pub user: String,
}

/// Why a command cannot be run; a configuration error for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError(pub String);

impl std::fmt::Display for CommandError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn cstring(s: &[u8], what: &str) -> Result<CString, CommandError> {
    CString::new(s).map_err(|_| CommandError(format!("{what} contains a NUL byte")))
}

/// Find `program` the way execvp would: as given if it contains a slash, else on `PATH`.
fn resolve_program(program: &str, path_var: Option<&OsStr>) -> Result<PathBuf, CommandError> {
    let executable = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return match p.metadata() {
            Err(e) => Err(CommandError(format!("{program}: {e}"))),
            Ok(_) if !executable(&p) => Err(CommandError(format!(
                "{program}: not an executable file (check its permissions)"
            ))),
            Ok(_) => Ok(p),
        };
    }
    let path_var = path_var.unwrap_or(OsStr::new("/usr/local/bin:/usr/bin:/bin"));
    std::env::split_paths(path_var)
        .map(|dir| dir.join(program))
        .find(|p| executable(p))
        .ok_or_else(|| CommandError(format!("{program}: command not found on PATH")))
}

/// Resolve `user` and `group` (names or numeric ids) for the workers.
fn resolve_credentials(
    user: Option<&str>,
    group: Option<&str>,
) -> Result<Option<Credentials>, CommandError> {
    use nix::unistd::{Gid, Group, Uid, User};
    let Some(user) = user else {
        if let Some(g) = group {
            return Err(CommandError(format!(
                "group = \"{g}\" needs user as well (set user, or remove group)"
            )));
        }
        return Ok(None);
    };
    let pw = match user.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)),
        Err(_) => User::from_name(user),
    }
    .map_err(|e| CommandError(format!("user {user}: {e}")))?
    .ok_or_else(|| CommandError(format!("user {user}: no such user")))?;
    let gid = match group {
        None => pw.gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => Gid::from_raw(gid),
            Err(_) => {
                Group::from_name(g)
                    .map_err(|e| CommandError(format!("group {g}: {e}")))?
                    .ok_or_else(|| CommandError(format!("group {g}: no such group")))?
                    .gid
            }
        },
    };
    if !nix::unistd::geteuid().is_root() {
        if pw.uid == nix::unistd::geteuid() && gid == nix::unistd::getegid() {
            return Ok(None);
        }
        return Err(CommandError(format!(
            "user = \"{user}\" needs sockvisor to run as root (remove user/group, or start sockvisor as root)"
        )));
    }
    let name =
        CString::new(pw.name.as_bytes()).map_err(|_| CommandError("bad user name".into()))?;
    let groups = nix::unistd::getgrouplist(&name, gid)
        .map(|gs| gs.into_iter().map(|g| g.as_raw()).collect())
        .unwrap_or_else(|_| vec![gid.as_raw()]);
    Ok(Some(Credentials {
        uid: pw.uid.as_raw(),
        gid: gid.as_raw(),
        groups,
        user: pw.name,
    }))
}

impl Command {
    /// Resolve the program on `PATH`, the credentials, and snapshot the environment.
    pub fn new(
        argv: &[String],
        user: Option<&str>,
        group: Option<&str>,
    ) -> Result<Command, CommandError> {
        let first = argv
            .first()
            .ok_or_else(|| CommandError("no command to run".to_string()))?;
        let program = resolve_program(first, std::env::var_os("PATH").as_deref())?;
        let argv = argv
            .iter()
            .map(|a| cstring(a.as_bytes(), "an argument"))
            .collect::<Result<Vec<_>, _>>()?;
        let base_env = std::env::vars_os()
            .filter(|(k, _)| !k.to_str().is_some_and(is_private_variable))
            .filter_map(|(k, v)| {
                let mut kv = k.as_bytes().to_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                CString::new(kv).ok()
            })
            .collect();
        Ok(Command {
            program: cstring(program.as_os_str().as_bytes(), "the program path")?,
            argv,
            base_env,
            credentials: resolve_credentials(user, group)?,
        })
    }

    /// The program as resolved, for messages.
    pub fn program_name(&self) -> std::borrow::Cow<'_, str> {
        self.program.to_string_lossy()
    }

    pub fn credentials(&self) -> Option<&Credentials> {
        self.credentials.as_ref()
    }
}

/// What one worker gets besides the command.
pub struct WorkerSetup<'a> {
    /// Placed at fds 3, 4, ... in this order; `LISTEN_FDS` counts them.
    pub fds: &'a [BorrowedFd<'a>],
    /// Placed right after `fds`, in this order, and not counted in `LISTEN_FDS` (the
    /// message socket, announced by a variable of its own in `env`).
    pub extra_fds: &'a [BorrowedFd<'a>],
    /// `LISTEN_FDNAMES`, colon-separated, one per fd.
    pub fd_names: &'a str,
    /// Extra `KEY=VALUE` pairs (`SOCKVISOR_WORKER_ID`, `NOTIFY_SOCKET`, `WATCHDOG_USEC`).
    pub env: &'a [(&'a str, String)],
    /// Also set `WATCHDOG_PID` to the worker's own pid.
    pub watchdog_pid: bool,
}

/// Everything the child touches, allocated before fork.
struct Prepared {
    /// The `KEY=VALUE\0` strings; `envp` points into them. Not touched again once `envp` is
    /// built: the child writes its pid digits only through `pid_digits`, pointers derived
    /// from the same mutable borrow as `envp` (no reference to the strings is made after).
    _envp_storage: Vec<Vec<u8>>,
    envp: Vec<*mut libc::c_char>,
    /// Where the child writes its pid: the digits of `LISTEN_PID=` / `WATCHDOG_PID=`.
    pid_digits: Vec<*mut u8>,
    fds: Vec<RawFd>,
    temp_fds: Vec<RawFd>,
    parent: libc::pid_t,
    /// The write end of the exec report pipe.
    exec_report: RawFd,
    /// The soft `RLIMIT_NOFILE` sockvisor started with, given back to the worker (sockvisor
    /// raises its own; a worker using `select()` must keep the usual 1024).
    nofile: Option<libc::rlimit>,
}

fn placeholder(key: &str) -> (Vec<u8>, usize) {
    let mut v = format!("{key}=").into_bytes();
    let offset = v.len();
    v.extend(std::iter::repeat_n(b' ', PID_DIGITS));
    v.push(0);
    (v, offset)
}

/// The soft and hard `RLIMIT_NOFILE` sockvisor had before it raised its own: what workers get.
static WORKER_NOFILE: std::sync::OnceLock<libc::rlimit> = std::sync::OnceLock::new();

/// Raise sockvisor's soft fd limit to the hard one (every worker costs it a few fds, and
/// every connection in flight one), remembering the original for workers.
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let _ = WORKER_NOFILE.set(libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    });
    if soft < hard {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            log::debug!("could not raise RLIMIT_NOFILE from {soft} to {hard}: {e}");
        }
    }
}

fn prepare(cmd: &Command, setup: &WorkerSetup<'_>) -> Prepared {
    let mut envp_storage: Vec<Vec<u8>> = cmd
        .base_env
        .iter()
        .map(|c| c.as_bytes_with_nul().to_vec())
        .collect();
    let mut pid_slots = Vec::new();
    let n = setup.fds.len();
    let placed = n + setup.extra_fds.len();
    envp_storage.push(format!("LISTEN_FDS={n}\0").into_bytes());
    envp_storage.push(format!("LISTEN_FDNAMES={}\0", setup.fd_names).into_bytes());
    for key in ["LISTEN_PID"]
        .into_iter()
        .chain(setup.watchdog_pid.then_some("WATCHDOG_PID"))
    {
        let (v, off) = placeholder(key);
        pid_slots.push((envp_storage.len(), off));
        envp_storage.push(v);
    }
    for (k, v) in setup.env {
        let mut kv = format!("{k}={v}").into_bytes();
        kv.retain(|&b| b != 0);
        kv.push(0);
        envp_storage.push(kv);
    }
    let mut envp: Vec<*mut libc::c_char> = envp_storage
        .iter_mut()
        .map(|e| e.as_mut_ptr() as *mut libc::c_char)
        .collect();
    let pid_digits = pid_slots
        .iter()
        // SAFETY: `off` is inside the placeholder string `envp[index]` points to.
        .map(|&(index, off)| unsafe { (envp[index] as *mut u8).add(off) })
        .collect();
    envp.push(std::ptr::null_mut());
    Prepared {
        _envp_storage: envp_storage,
        envp,
        pid_digits,
        fds: setup
            .fds
            .iter()
            .chain(setup.extra_fds)
            .map(|f| f.as_raw_fd())
            .collect(),
        temp_fds: vec![-1; placed],
        parent: nix::unistd::getpid().as_raw(),
        exec_report: -1,
        nofile: WORKER_NOFILE.get().copied(),
    }
}

impl Prepared {
    /// Write the child's pid into the placeholders: left-aligned digits, NUL-terminated.
    /// Async-signal-safe: no allocation.
    fn patch_pid(&mut self, pid: libc::pid_t) {
        for &dst in &self.pid_digits {
            // SAFETY: each `dst` points to PID_DIGITS + 1 writable bytes of a placeholder.
            unsafe { write_pid(dst, pid) };
        }
    }
}

/// A forked worker: its pid, and the read end of its exec report (see [`ExecReport`]).
#[derive(Debug)]
pub struct Spawned {
    pub pid: Pid,
    pub exec_report: OwnedFd,
}

/// What the exec report pipe says. The child holds the write end, close-on-exec, from fork
/// to exec: end of file means it exec'd (or died before, which `SIGCHLD` tells); four bytes
/// are the `errno` of a failed `execve`, written just before it exits 127.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecReport {
    /// Not exec'd yet.
    Pending,
    Execed,
    Failed(nix::errno::Errno),
}

impl ExecReport {
    /// Read the report from the pipe's (non-blocking) read end.
    pub fn read(pipe: &OwnedFd) -> ExecReport {
        let mut buf = [0u8; 4];
        loop {
            return match nix::unistd::read(pipe, &mut buf) {
                Ok(4) => ExecReport::Failed(nix::errno::Errno::from_raw(i32::from_le_bytes(buf))),
                // A short report cannot happen (a pipe write of 4 bytes is atomic).
                Ok(_) => ExecReport::Execed,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => ExecReport::Pending,
            };
        }
    }
}

/// Fork and exec one worker. The parent's side is plain Rust; the child's side never
/// returns. The worker leads a process group of its own, so a terminal's signals (Ctrl-C)
/// reach sockvisor alone, and stopping a worker reaches its children too.
pub fn spawn(cmd: &Command, setup: &WorkerSetup<'_>) -> nix::Result<Spawned> {
    let (report_read, report_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
    let mut prepared = prepare(cmd, setup);
    prepared.exec_report = report_write.as_raw_fd();
    let argv_ptrs: Vec<*const libc::c_char> = cmd
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();

    // SAFETY: sockvisor is single-threaded (invariant 1), and the child runs only
    // `exec_child`, which makes async-signal-safe syscalls on memory prepared above.
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Parent { child } => {
            // Only the child may hold the write end, or the end of file never comes.
            drop(report_write);
            // Also from the parent, so the group exists before anyone signals it (the
            // child may not have run yet). EACCES once it has exec'd: it did it itself.
            let _ = nix::unistd::setpgid(child, child);
            Ok(Spawned {
                pid: child,
                exec_report: report_read,
            })
        }
        ForkResult::Child => {
            // SAFETY: we are the freshly forked child of a single-threaded parent.
            unsafe { exec_child(cmd, &mut prepared, &argv_ptrs) }
        }
    }
}

/// Write `value` as decimal digits, left-aligned and NUL-terminated, at `dst`.
///
/// # Safety
/// `dst` must point to at least `PID_DIGITS + 1` writable bytes.
unsafe fn write_pid(dst: *mut u8, value: libc::pid_t) {
    let mut digits = [0u8; PID_DIGITS];
    let mut v = value as u32;
    let mut len = 0;
    loop {
        digits[len] = b'0' + (v % 10) as u8;
        v /= 10;
        len += 1;
        if v == 0 || len == PID_DIGITS {
            break;
        }
    }
    for i in 0..len {
        *dst.add(i) = digits[len - 1 - i];
    }
    *dst.add(len) = 0;
}

/// The child between fork and exec. Exit codes when it fails before exec: 126 (fd or signal
/// setup), 125 (privileges), 127 (exec failed); the supervisor logs them as such.
///
/// # Safety
/// Must be called only in a child just forked from a single-threaded process.
unsafe fn exec_child(cmd: &Command, prepared: &mut Prepared, argv: &[*const libc::c_char]) -> ! {
    let me = libc::getpid();
    prepared.patch_pid(me);
    // A process group of its own (see `spawn`).
    libc::setpgid(0, 0);
    if let Some(nofile) = &prepared.nofile {
        libc::setrlimit(libc::RLIMIT_NOFILE, nofile);
    }
    // fd placement, two phases: first duplicate every source above the target range (the
    // sources may sit inside 3..3+n, even swapped), then dup2 down. dup2 clears CLOEXEC on
    // the targets; the temporaries keep it and vanish at exec. Never dup2(fd, fd): that is a
    // no-op that keeps CLOEXEC.
    let n = prepared.fds.len() as RawFd;
    let above = 3 + n;
    // The exec report's write end, out of the way of the placement and of the close_range
    // below; still close-on-exec.
    let report = libc::fcntl(prepared.exec_report, libc::F_DUPFD_CLOEXEC, above);
    if report < 0 {
        libc::_exit(126);
    }
    for (i, &fd) in prepared.fds.iter().enumerate() {
        let t = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, above);
        if t < 0 {
            libc::_exit(126);
        }
        prepared.temp_fds[i] = t;
    }
    for (i, &t) in prepared.temp_fds.iter().enumerate() {
        if libc::dup2(t, 3 + i as RawFd) < 0 {
            libc::_exit(126);
        }
    }
    // Anything else sockvisor inherited without CLOEXEC must not reach the worker either:
    // everything from `above` on but the report (the lowest free fd from `above` when it
    // was duplicated, so only fds that were open before lie between).
    if report > above {
        libc::syscall(
            libc::SYS_close_range,
            above as libc::c_uint,
            (report - 1) as libc::c_uint,
            0 as libc::c_uint,
        );
    }
    libc::syscall(
        libc::SYS_close_range,
        (report + 1) as libc::c_uint,
        libc::c_uint::MAX,
        0 as libc::c_uint,
    );

    // Signals: default dispositions (Rust ignores SIGPIPE; ignored signals survive exec) and
    // an empty mask (sockvisor blocks the signals it reads from its signalfd).
    // The raw syscall, because glibc's signal() refuses its reserved real-time signals
    // (32, 33), which can arrive ignored from whoever started sockvisor. The kernel's
    // struct sigaction is {handler, flags, restorer, mask}; all zero is SIG_DFL.
    let default_action = [0u64; 4];
    for sig in 1..=64 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                default_action.as_ptr(),
                std::ptr::null_mut::<u64>(),
                8usize,
            );
        }
    }
    let mut empty: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut empty);
    libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());

    // Privileges: supplementary groups, then gid, then uid (after setuid we could not).
    if let Some(c) = &cmd.credentials {
        if libc::setgroups(c.groups.len(), c.groups.as_ptr()) != 0
            || libc::setgid(c.gid) != 0
            || libc::setuid(c.uid) != 0
        {
            libc::_exit(125);
        }
    }
    // Die with sockvisor. Set after the credential change, which clears it. If sockvisor
    // died before this line, the signal will never come: check the parent ourselves.
    libc::prctl(
        libc::PR_SET_PDEATHSIG,
        libc::SIGKILL as libc::c_ulong,
        0,
        0,
        0,
    );
    if libc::getppid() != prepared.parent {
        libc::_exit(126);
    }
    libc::execve(
        cmd.program.as_ptr(),
        argv.as_ptr(),
        prepared.envp.as_ptr() as *const *const libc::c_char,
    );
    let errno = (*libc::__errno_location()).to_le_bytes();
    libc::write(report, errno.as_ptr().cast(), errno.len());
    libc::_exit(127);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The environment as the child would pass it to execve, read through `envp`.
    fn envp_strings(p: &Prepared) -> Vec<String> {
        p.envp
            .iter()
            .take_while(|e| !e.is_null())
            // SAFETY: every non-null entry points to a NUL-terminated string in the storage.
            .map(|&e| {
                unsafe { std::ffi::CStr::from_ptr(e) }
                    .to_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    }

    /// Also run under Miri (`cargo +nightly miri test --lib spawn::tests::pid`): the child's
    /// patching must not write through a reference that `envp` outlived.
    #[test]
    fn pid_digits_patched_through_envp() {
        let cmd = Command {
            program: CString::new("/bin/true").unwrap(),
            argv: vec![CString::new("true").unwrap()],
            base_env: vec![CString::new("PATH=/bin").unwrap()],
            credentials: None,
        };
        let env = [("SOCKVISOR_WORKER_ID", "3".to_string())];
        let setup = WorkerSetup {
            fds: &[],
            extra_fds: &[],
            fd_names: "",
            env: &env,
            watchdog_pid: true,
        };
        let mut p = prepare(&cmd, &setup);
        p.patch_pid(4194303);
        let env = envp_strings(&p);
        assert!(env.contains(&"LISTEN_PID=4194303".to_string()), "{env:?}");
        assert!(env.contains(&"WATCHDOG_PID=4194303".to_string()), "{env:?}");
        p.patch_pid(7);
        let env = envp_strings(&p);
        assert!(env.contains(&"LISTEN_PID=7".to_string()), "{env:?}");
        assert!(
            env.contains(&"SOCKVISOR_WORKER_ID=3".to_string()),
            "{env:?}"
        );
        assert_eq!(env[0], "PATH=/bin");
    }

    #[test]
    fn private_variables() {
        for k in [
            "LISTEN_PID",
            "LISTEN_FDS",
            "LISTEN_FDNAMES",
            "NOTIFY_SOCKET",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
            "SOCKVISOR_WORKERS",
        ] {
            assert!(is_private_variable(k), "{k}");
        }
        for k in ["PATH", "HOME", "JOURNAL_STREAM", "LISTEN"] {
            assert!(!is_private_variable(k), "{k}");
        }
    }

    #[test]
    fn resolves_on_path() {
        assert!(resolve_program("sh", Some(OsStr::new("/usr/bin:/bin"))).is_ok());
        let e = resolve_program("no-such-program-xyz", Some(OsStr::new("/usr/bin"))).unwrap_err();
        assert!(e.0.contains("command not found"), "{e}");
        let e = resolve_program("./no/such", None).unwrap_err();
        assert!(e.0.contains("No such file"), "{e}");
    }
}
