//! Raw `bpf(2)` through libc: create maps, read and write their elements, load a program
//! (with the verifier's log in the error), attach it to a `SO_REUSEPORT` group.
//!
//! Only what the reuseport policy needs; every `bpf_attr` variant used here is a `#[repr(C)]`
//! struct laid out as the prefix of `union bpf_attr` in `include/uapi/linux/bpf.h`. The kernel
//! accepts a shorter attr than its own union (it zero-fills the rest), and rejects one whose
//! bytes past the command's last field are not zero, so each struct ends at its last field.
//!
//! Capabilities: `REUSEPORT_SOCKARRAY` maps and `SK_REUSEPORT` programs need `CAP_BPF`
//! (Linux 5.8+) or `CAP_SYS_ADMIN`; attaching an already loaded program to a socket needs none.

use std::ffi::CStr;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::insn::Insn;

// `enum bpf_cmd`.
const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_int = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
const BPF_MAP_DELETE_ELEM: libc::c_int = 3;
const BPF_PROG_LOAD: libc::c_int = 5;

// `enum bpf_map_type`.
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_REUSEPORT_SOCKARRAY: u32 = 20;

// `enum bpf_prog_type`.
const BPF_PROG_TYPE_SK_REUSEPORT: u32 = 21;

// `enum bpf_attach_type`.
const BPF_SK_REUSEPORT_SELECT: u32 = 39;
const BPF_SK_REUSEPORT_SELECT_OR_MIGRATE: u32 = 40;

// Map update flags.
const BPF_ANY: u64 = 0;

/// How many bytes of verifier log a failed load keeps (the tail is the useful part).
const LOG_SIZE: usize = 64 * 1024;

/// The kinds of map the reuseport policy uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKind {
    /// `BPF_MAP_TYPE_HASH`.
    Hash,
    /// `BPF_MAP_TYPE_ARRAY`: every key `0..max_entries` exists, zero-filled.
    Array,
    /// `BPF_MAP_TYPE_REUSEPORT_SOCKARRAY`: `u32` key to a listening `SO_REUSEPORT` socket; the
    /// value written is the socket's fd, the value read back is its cookie. The kernel clears
    /// an entry by itself when its socket stops listening.
    ReuseportSockarray,
}

impl MapKind {
    fn raw(self) -> u32 {
        match self {
            MapKind::Hash => BPF_MAP_TYPE_HASH,
            MapKind::Array => BPF_MAP_TYPE_ARRAY,
            MapKind::ReuseportSockarray => BPF_MAP_TYPE_REUSEPORT_SOCKARRAY,
        }
    }
}

/// When the reuseport program runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachType {
    /// `BPF_SK_REUSEPORT_SELECT`: new connections and datagrams only; the connections queued
    /// on a listener that closes are reset.
    Select,
    /// `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE` (Linux 5.14+): also runs with
    /// `ctx->migrating_sk` set for every connection queued (or half-open) on a closing
    /// listener, which moves to the listener it picks.
    SelectOrMigrate,
}

impl AttachType {
    fn raw(self) -> u32 {
        match self {
            AttachType::Select => BPF_SK_REUSEPORT_SELECT,
            AttachType::SelectOrMigrate => BPF_SK_REUSEPORT_SELECT_OR_MIGRATE,
        }
    }
}

/// A failed `bpf(2)` call: which operation, the errno, and for a program load the tail of the
/// verifier's log.
#[derive(Debug)]
pub struct BpfError {
    pub op: &'static str,
    pub errno: i32,
    pub verifier_log: Option<String>,
}

impl BpfError {
    fn last(op: &'static str) -> BpfError {
        BpfError {
            op,
            errno: io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
            verifier_log: None,
        }
    }

    fn invalid(op: &'static str) -> BpfError {
        BpfError {
            op,
            errno: libc::EINVAL,
            verifier_log: None,
        }
    }

    /// The caller lacks the capability (`EPERM`: no `CAP_BPF`/`CAP_SYS_ADMIN`), or a
    /// seccomp/LSM policy forbids `bpf(2)` (`EACCES` without a verifier log; with one, the
    /// verifier rejected the program).
    pub fn is_permission(&self) -> bool {
        self.errno == libc::EPERM || (self.errno == libc::EACCES && self.verifier_log.is_none())
    }

    /// One line for the log and `sockvisor status`, with the fix when there is one.
    pub fn hint(&self) -> &'static str {
        if self.verifier_log.is_some() {
            return "the kernel's verifier rejected the program (SELECT_OR_MIGRATE needs \
                    Linux 5.14+, the atomic fetch-add 5.12+)";
        }
        if self.is_permission() {
            return "the kernel-steered policy needs CAP_BPF (Linux 5.8+) or CAP_SYS_ADMIN \
                    (as root under systemd: CAP_BPF in the unit's CapabilityBoundingSet=; as \
                    another user: AmbientCapabilities=CAP_BPF; in a container: CAP_BPF and the \
                    bpf system call from the container manager)";
        }
        match self.errno {
            libc::ENOSYS => "this kernel has no bpf(2) (CONFIG_BPF_SYSCALL)",
            _ => "",
        }
    }
}

impl fmt::Display for BpfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bpf {}: {}",
            self.op,
            io::Error::from_raw_os_error(self.errno)
        )?;
        let hint = self.hint();
        if !hint.is_empty() {
            write!(f, ": {hint}")?;
        }
        if let Some(log) = &self.verifier_log {
            write!(f, "\nverifier log:\n{log}")?;
        }
        Ok(())
    }
}

impl std::error::Error for BpfError {}

impl From<BpfError> for io::Error {
    fn from(e: BpfError) -> io::Error {
        io::Error::new(io::Error::from_raw_os_error(e.errno).kind(), e.to_string())
    }
}

/// `bpf_attr` for `BPF_MAP_CREATE` (up to `map_name`).
#[repr(C)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

/// `bpf_attr` for `BPF_MAP_{LOOKUP,UPDATE,DELETE}_ELEM`.
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `bpf_attr` for `BPF_PROG_LOAD` (up to `expected_attach_type`).
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `bpf(cmd, attr, sizeof attr)`: the raw return value, or `None` with errno set.
fn sys_bpf<T>(cmd: libc::c_int, attr: &mut T) -> Option<libc::c_long> {
    // SAFETY: `attr` is a live, exclusively borrowed `#[repr(C)]` struct laid out as a prefix
    // of `union bpf_attr` for `cmd`, and its size is passed with it; every pointer inside it
    // (keys, values, instructions, license, log) was set by the caller to a buffer that
    // outlives this call and is as large as the kernel will read or write for this map or
    // program. The kernel reads only `size` bytes of attr.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    (r >= 0).then_some(r)
}

/// A name the kernel accepts for a map or program: at most 15 bytes of `[A-Za-z0-9_.]`.
fn object_name(name: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (o, b) in out
        .iter_mut()
        .zip(
            name.bytes()
                .filter(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'.'),
        )
        .take(15)
    {
        *o = b;
    }
    out
}

fn fd_from_return(r: libc::c_long) -> OwnedFd {
    // SAFETY: bpf(2) returned a new file descriptor (a non-negative value for the commands
    // that create objects), which nothing else owns; bpf objects are created O_CLOEXEC.
    unsafe { OwnedFd::from_raw_fd(r as RawFd) }
}

/// A bpf map, closed (and freed once no program uses it) when dropped.
#[derive(Debug)]
pub struct Map {
    fd: OwnedFd,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

impl Map {
    /// `BPF_MAP_CREATE`.
    pub fn create(
        kind: MapKind,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        name: &str,
    ) -> Result<Map, BpfError> {
        let mut attr = MapCreateAttr {
            map_type: kind.raw(),
            key_size,
            value_size,
            max_entries,
            map_flags: 0,
            inner_map_fd: 0,
            numa_node: 0,
            map_name: object_name(name),
        };
        let r = sys_bpf(BPF_MAP_CREATE, &mut attr).ok_or_else(|| BpfError::last("map create"))?;
        Ok(Map {
            fd: fd_from_return(r),
            key_size,
            value_size,
            max_entries,
        })
    }

    pub fn max_entries(&self) -> u32 {
        self.max_entries
    }

    fn elem_attr(&self, key: &[u8], value: u64, flags: u64) -> MapElemAttr {
        MapElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            _pad: 0,
            key: key.as_ptr() as u64,
            value,
            flags,
        }
    }

    /// `BPF_MAP_UPDATE_ELEM` with `BPF_ANY`. For a sockarray, `value` is the socket's fd as a
    /// `u64` (or `u32`, matching the map's value size).
    pub fn update(&self, key: &[u8], value: &[u8]) -> Result<(), BpfError> {
        if key.len() != self.key_size as usize || value.len() != self.value_size as usize {
            return Err(BpfError::invalid("map update (key or value size)"));
        }
        let mut attr = self.elem_attr(key, value.as_ptr() as u64, BPF_ANY);
        sys_bpf(BPF_MAP_UPDATE_ELEM, &mut attr).ok_or_else(|| BpfError::last("map update"))?;
        Ok(())
    }

    /// `BPF_MAP_LOOKUP_ELEM`: `Ok(false)` when the key has no value (`ENOENT`).
    pub fn lookup(&self, key: &[u8], value: &mut [u8]) -> Result<bool, BpfError> {
        if key.len() != self.key_size as usize || value.len() != self.value_size as usize {
            return Err(BpfError::invalid("map lookup (key or value size)"));
        }
        let mut attr = self.elem_attr(key, value.as_mut_ptr() as u64, 0);
        match sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Some(_) => Ok(true),
            None => match BpfError::last("map lookup") {
                e if e.errno == libc::ENOENT => Ok(false),
                e => Err(e),
            },
        }
    }

    /// `BPF_MAP_DELETE_ELEM`: `Ok(false)` when there was nothing to delete.
    pub fn delete(&self, key: &[u8]) -> Result<bool, BpfError> {
        if key.len() != self.key_size as usize {
            return Err(BpfError::invalid("map delete (key size)"));
        }
        let mut attr = self.elem_attr(key, 0, 0);
        match sys_bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
            Some(_) => Ok(true),
            None => match BpfError::last("map delete") {
                e if e.errno == libc::ENOENT => Ok(false),
                e => Err(e),
            },
        }
    }

    /// The fd to embed in a program (`BPF_LD_IMM64` with `BPF_PSEUDO_MAP_FD`). The program
    /// holds its own reference to the map once loaded.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Map {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A loaded `BPF_PROG_TYPE_SK_REUSEPORT` program. A reuseport group it is attached to keeps
/// its own reference (and through it the maps'), so dropping this does not detach it.
#[derive(Debug)]
pub struct Program {
    fd: OwnedFd,
}

impl Program {
    /// `BPF_PROG_LOAD` of an `SK_REUSEPORT` program. The first attempt runs without a log (so
    /// a large program cannot fail for a short log buffer); when it fails, a second attempt
    /// collects the verifier's log for the error.
    pub fn load_sk_reuseport(
        insns: &[Insn],
        attach: AttachType,
        name: &str,
    ) -> Result<Program, BpfError> {
        match Self::load(insns, attach, name, None) {
            Ok(p) => Ok(p),
            Err(first) if first.errno == libc::EPERM || first.errno == libc::ENOSYS => Err(first),
            Err(first) => {
                let mut log = vec![0u8; LOG_SIZE];
                match Self::load(insns, attach, name, Some(&mut log)) {
                    Ok(p) => Ok(p),
                    Err(mut e) => {
                        let text = CStr::from_bytes_until_nul(&log)
                            .map(|c| c.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        e.verifier_log = Some(tail(&text, 4000).to_string());
                        // A log too short for the verifier's output fails with ENOSPC: the
                        // first attempt's errno is the one that matters.
                        if e.errno == libc::ENOSPC {
                            e.errno = first.errno;
                        }
                        Err(e)
                    }
                }
            }
        }
    }

    fn load(
        insns: &[Insn],
        attach: AttachType,
        name: &str,
        log: Option<&mut [u8]>,
    ) -> Result<Program, BpfError> {
        const LICENSE: &[u8] = b"GPL\0";
        let (log_level, log_size, log_buf) = match log {
            Some(buf) => (1, buf.len() as u32, buf.as_mut_ptr() as u64),
            None => (0, 0, 0),
        };
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_SK_REUSEPORT,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: LICENSE.as_ptr() as u64,
            log_level,
            log_size,
            log_buf,
            kern_version: 0,
            prog_flags: 0,
            prog_name: object_name(name),
            prog_ifindex: 0,
            expected_attach_type: attach.raw(),
        };
        let r = sys_bpf(BPF_PROG_LOAD, &mut attr).ok_or_else(|| BpfError::last("prog load"))?;
        Ok(Program {
            fd: fd_from_return(r),
        })
    }
}

impl AsFd for Program {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

fn setsockopt_int(socket: BorrowedFd<'_>, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `socket` is a live fd for the duration of the borrow; the option value is a
    // c_int on the stack whose exact size is passed.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            &value as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `setsockopt(SO_ATTACH_REUSEPORT_EBPF)` on any member of a group: the program now selects
/// for the whole group, replacing the one attached before (whoever attached it). The socket
/// should already be hashed (listening, or a bound UDP socket) in its group: a socket given a
/// program before `listen()` gets a provisional group of its own, and its `listen()` beside an
/// existing group then fails with `EADDRINUSE`.
pub fn attach_reuseport_program(socket: BorrowedFd<'_>, program: &Program) -> io::Result<()> {
    setsockopt_int(
        socket,
        libc::SO_ATTACH_REUSEPORT_EBPF,
        program.fd.as_raw_fd(),
    )
}

/// `setsockopt(SO_DETACH_REUSEPORT_BPF)`: the group goes back to the kernel's hash.
pub fn detach_reuseport_program(socket: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt_int(socket, libc::SO_DETACH_REUSEPORT_BPF, 0)
}
