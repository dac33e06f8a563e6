//! Runtime files: the unix sockets sockvisor binds on a path and the directories that hold
//! them. Three users: the control socket (`control`), unix listeners sockvisor binds itself
//! (`activation`), and the workers' notify socket when it lives in `$RUNTIME_DIRECTORY`
//! (`notify_server`). They all follow one policy, written here once.
//!
//! # The policy
//!
//! 1. **The socket's directory** must be a real directory (its last component not a symlink:
//!    `/var/run/x.sock` is refused, say `/run/x.sock`), owned by root or by sockvisor's
//!    effective uid, and not writable by other users unless it is a root-owned sticky
//!    directory like `/tmp`. Anyone else who can write there could swap the socket for their
//!    own. Checks are made on the opened directory (`O_NOFOLLOW`), not on a path that could
//!    change between the check and the use. The directories above it are the admin's choice
//!    and are not checked.
//! 2. **Creating directories**: a missing directory is created (with its missing parents)
//!    mode 0700 only where sockvisor picks the place itself (the control socket); a unix
//!    listener's directory must exist (`RuntimeDirectory=` makes it). A *private* directory
//!    (`$RUNTIME_DIRECTORY/workers`) belongs to sockvisor alone: it must be owned by
//!    sockvisor's uid, and its mode is set to 0700, or 0710 with the workers' group when they
//!    run as another user and must reach a socket inside it.
//! 3. **The socket path**: nothing there, or a **stale socket**, which is removed. A stale
//!    socket is one nothing answers on: a connect probe of the same socket type (non-blocking,
//!    so a full backlog still counts as "answers") is refused. A live socket is "in use" and
//!    left alone; a symlink (even to a socket) or any other file is refused, never followed,
//!    never removed.
//! 4. **Removal**: a socket sockvisor bound is removed when it is dropped, and only if the
//!    file at its path is still the one it bound (same device and inode): another process may
//!    have taken the path over meanwhile. Unix listeners are left in place for the next start
//!    (rule 3 reclaims them), as they are never re-bound on reload.
//! 5. **Nothing is left behind by a crash**: a file sockvisor cannot remove after a SIGKILL
//!    must be one the next start reclaims (a fixed path, rule 3) or one systemd removes
//!    (`$RUNTIME_DIRECTORY`). That is why the workers' notify socket outside systemd is an
//!    abstract socket (`@sockvisor/...`, see `notify_server`), which vanishes with its
//!    process, rather than a file in a fresh temporary directory.

use nix::errno::Errno;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// How [`prepare_dir`] treats the directory that will hold a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirSetup {
    /// It must exist already (a unix listener: the admin or `RuntimeDirectory=` made it).
    Existing,
    /// Create it (and its missing parents) mode 0700 when missing; an existing one is only
    /// checked (the control socket's directory, which may be `/run` or `$HOME/...`).
    Create,
    /// sockvisor's own directory: created when missing, owned by sockvisor's uid, mode 0700,
    /// or 0710 with this group for workers that run as another user.
    Private { group: Option<u32> },
}

fn refused(dir: &Path, why: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("{} {why}; refusing to put a socket there", dir.display()),
    )
}

/// Make sure `dir` may hold a socket of sockvisor's (policy rules 1 and 2).
pub fn prepare_dir(dir: &Path, setup: DirSetup) -> io::Result<()> {
    let euid = nix::unistd::geteuid().as_raw();
    let mut created = false;
    if setup != DirSetup::Existing {
        match std::fs::symlink_metadata(dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|e| {
                        io::Error::new(e.kind(), format!("cannot create {}: {e}", dir.display()))
                    })?;
                created = true;
            }
            _ => {}
        }
    }
    // O_NOFOLLOW|O_DIRECTORY: a symlink or a file fails here, and every check below is on the
    // directory we opened.
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir);
    let handle = match opened {
        Ok(f) => f,
        Err(e) => {
            return Err(match std::fs::symlink_metadata(dir) {
                Err(m) if m.kind() == io::ErrorKind::NotFound => io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "the directory {} does not exist; create it (e.g. RuntimeDirectory= in the unit)",
                        dir.display()
                    ),
                ),
                Ok(m) if m.file_type().is_symlink() => {
                    let to = std::fs::read_link(dir)
                        .map(|t| format!(" (to {})", t.display()))
                        .unwrap_or_default();
                    refused(
                        dir,
                        format!("is a symlink{to}; give the real directory"),
                    )
                }
                Ok(m) if !m.is_dir() => refused(dir, "is not a directory"),
                _ => io::Error::new(e.kind(), format!("cannot open {}: {e}", dir.display())),
            });
        }
    };
    let meta = handle.metadata()?;
    let (owner, mode) = (meta.uid(), meta.mode() & 0o7777);
    match setup {
        DirSetup::Private { .. } if owner != euid => {
            return Err(refused(
                dir,
                format!("is owned by uid {owner}, not by sockvisor's uid {euid}"),
            ))
        }
        _ if owner != 0 && owner != euid => {
            return Err(refused(
                dir,
                format!("is owned by uid {owner} (only root or sockvisor's uid {euid} may own it)"),
            ))
        }
        _ => {}
    }
    if mode & 0o002 != 0 && !(owner == 0 && mode & 0o1000 != 0) {
        return Err(refused(
            dir,
            "is writable by other users and not a root-owned sticky directory",
        ));
    }
    if let DirSetup::Private { group } = setup {
        let want = match group {
            Some(gid) => {
                if meta.gid() != gid {
                    nix::unistd::fchown(
                        handle.as_fd(),
                        None,
                        Some(nix::unistd::Gid::from_raw(gid)),
                    )?;
                }
                0o710
            }
            None => 0o700,
        };
        if mode != want {
            if !created {
                log::debug!("{}: mode {mode:o} -> {want:o}", dir.display());
            }
            handle.set_permissions(std::fs::Permissions::from_mode(want))?;
        }
    }
    Ok(())
}

/// A new unix socket of type `ty`, non-blocking and close-on-exec.
pub fn unix_socket(ty: SockType) -> io::Result<OwnedFd> {
    Ok(socket::socket(
        AddressFamily::Unix,
        ty,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?)
}

/// Whether something answers on the socket at `path`: a non-blocking connect of type `ty`.
/// A full backlog, or a live socket of another type, counts as an answer; "refused" or "no
/// such file" does not. Other errors (say, no permission to probe) are returned.
pub fn answers(path: &Path, ty: SockType) -> io::Result<bool> {
    let addr = unix_addr(path)?;
    let probe = unix_socket(ty)?;
    match socket::connect(probe.as_raw_fd(), &addr) {
        Ok(()) | Err(Errno::EAGAIN | Errno::EINPROGRESS | Errno::EPROTOTYPE) => Ok(true),
        Err(Errno::ECONNREFUSED | Errno::ENOENT) => Ok(false),
        Err(e) => Err(io::Error::new(
            io::Error::from(e).kind(),
            format!("cannot probe {}: {e}", path.display()),
        )),
    }
}

/// `path` as a unix socket address, or a clear error (too long).
pub fn unix_addr(path: &Path) -> io::Result<UnixAddr> {
    UnixAddr::new(path).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} cannot be a socket path ({e}; at most 107 bytes)",
                path.display()
            ),
        )
    })
}

fn describe(ft: std::fs::FileType) -> &'static str {
    if ft.is_file() {
        "a regular file"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a pipe or FIFO"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else {
        "not a socket"
    }
}

/// Make `path` free for a socket of type `ty` to bind (policy rule 3): nothing there, or a
/// stale socket, which is removed. A live socket is an `AddrInUse` error; a symlink or any
/// other file an `AlreadyExists` error.
pub fn claim_socket_path(path: &Path, ty: SockType) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("cannot inspect {}: {e}", path.display()),
            ))
        }
    };
    let ft = meta.file_type();
    if ft.is_symlink() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} is a symlink, not a socket; refusing to follow or replace it (remove it or choose another path)",
                path.display()
            ),
        ));
    }
    if !ft.is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is {}, not a socket; refusing to replace it (remove it or choose another path)",
                path.display(),
                describe(ft)
            ),
        ));
    }
    if answers(path, ty)? {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "{} is in use: another process answers on it",
                path.display()
            ),
        ));
    }
    log::info!("removing stale socket {}", path.display());
    std::fs::remove_file(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot remove stale socket {}: {e}", path.display()),
        )
    })
}

/// A socket file sockvisor bound; removed on drop if it is still ours (policy rule 4).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    /// (dev, ino) of the file we bound.
    ident: (u64, u64),
}

impl SocketFile {
    /// Bind `fd` at `path` (claimed with [`claim_socket_path`] before), then give the file
    /// `mode` and, if set, `group`. On error nothing is left at `path`.
    pub fn bind(
        fd: &impl AsFd,
        path: &Path,
        mode: u32,
        group: Option<u32>,
    ) -> io::Result<SocketFile> {
        let addr = unix_addr(path)?;
        socket::bind(fd.as_fd().as_raw_fd(), &addr)?;
        let meta = std::fs::symlink_metadata(path)?;
        // From here on, Drop removes the file on any error.
        let file = SocketFile {
            path: path.to_path_buf(),
            ident: (meta.dev(), meta.ino()),
        };
        if let Some(gid) = group {
            nix::unistd::fchownat(
                nix::fcntl::AT_FDCWD,
                path,
                None,
                Some(nix::unistd::Gid::from_raw(gid)),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        Ok(file)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if m.file_type().is_socket() && (m.dev(), m.ino()) == self.ident {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::net::{UnixDatagram, UnixListener};

    fn mode_of(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    fn set_mode(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn claim_stale_live_and_foreign_files() {
        let t = tempfile::tempdir().unwrap();
        // Nothing there.
        let p = t.path().join("s.sock");
        claim_socket_path(&p, SockType::Stream).unwrap();
        // A stale stream socket is removed; a live one is in use.
        drop(UnixListener::bind(&p).unwrap());
        assert!(!answers(&p, SockType::Stream).unwrap());
        claim_socket_path(&p, SockType::Stream).unwrap();
        assert!(!p.exists());
        let live = UnixListener::bind(&p).unwrap();
        let e = claim_socket_path(&p, SockType::Stream).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        assert!(e.to_string().contains("is in use"), "{e}");
        // Probed with the other type, a live socket still answers.
        assert!(answers(&p, SockType::Datagram).unwrap());
        drop(live);
        std::fs::remove_file(&p).unwrap();
        // Datagram sockets: the same, probed as datagrams.
        let d = UnixDatagram::bind(&p).unwrap();
        assert!(answers(&p, SockType::Datagram).unwrap());
        assert!(claim_socket_path(&p, SockType::Datagram).is_err());
        drop(d);
        claim_socket_path(&p, SockType::Datagram).unwrap();
        assert!(!p.exists());
        // A regular file and a symlink (even to a live socket) are never replaced.
        std::fs::write(&p, b"keep").unwrap();
        let e = claim_socket_path(&p, SockType::Stream).unwrap_err();
        assert!(
            e.to_string()
                .contains("exists and is a regular file, not a socket"),
            "{e}"
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"keep");
        std::fs::remove_file(&p).unwrap();
        let target = t.path().join("target.sock");
        let _l = UnixListener::bind(&target).unwrap();
        std::os::unix::fs::symlink(&target, &p).unwrap();
        let e = claim_socket_path(&p, SockType::Stream).unwrap_err();
        assert!(e.to_string().contains("is a symlink, not a socket"), "{e}");
        assert!(target.exists() && p.symlink_metadata().is_ok());
    }

    #[test]
    fn socket_file_is_removed_only_if_still_ours() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("s.sock");
        let s = unix_socket(SockType::Stream).unwrap();
        let f = SocketFile::bind(&s, &p, 0o600, None).unwrap();
        assert_eq!(mode_of(&p), 0o600);
        drop(f);
        assert!(!p.exists());
        // Someone else took the path over: their file stays.
        let f = SocketFile::bind(&unix_socket(SockType::Stream).unwrap(), &p, 0o600, None).unwrap();
        // (A hard link keeps our inode allocated, so theirs cannot get its number.)
        std::fs::hard_link(&p, t.path().join("ours")).unwrap();
        std::fs::remove_file(&p).unwrap();
        let _theirs = UnixListener::bind(&p).unwrap();
        drop(f);
        assert!(p.exists());
    }

    #[test]
    fn directories_follow_one_policy() {
        let t = tempfile::tempdir().unwrap();
        // Existing: must exist, is not created.
        let missing = t.path().join("missing");
        let e = prepare_dir(&missing, DirSetup::Existing).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        assert!(!missing.exists());
        // Create: made 0700 with its parents; an existing one keeps its mode.
        let made = t.path().join("a/b");
        prepare_dir(&made, DirSetup::Create).unwrap();
        assert_eq!(mode_of(&made), 0o700);
        assert_eq!(mode_of(&t.path().join("a")), 0o700);
        set_mode(&made, 0o755);
        prepare_dir(&made, DirSetup::Create).unwrap();
        assert_eq!(mode_of(&made), 0o755);
        // Private: the mode is set, with the group when given (our own gid always works).
        prepare_dir(&made, DirSetup::Private { group: None }).unwrap();
        assert_eq!(mode_of(&made), 0o700);
        let gid = nix::unistd::getegid().as_raw();
        prepare_dir(&made, DirSetup::Private { group: Some(gid) }).unwrap();
        assert_eq!(mode_of(&made), 0o710);
        // Symlinks and files are refused, whatever the setup.
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&made, &link).unwrap();
        let file = t.path().join("file");
        std::fs::write(&file, b"").unwrap();
        for setup in [
            DirSetup::Existing,
            DirSetup::Create,
            DirSetup::Private { group: None },
        ] {
            let e = prepare_dir(&link, setup).unwrap_err();
            assert!(e.to_string().contains("is a symlink (to "), "{e}");
            let e = prepare_dir(&file, setup).unwrap_err();
            assert!(e.to_string().contains("is not a directory"), "{e}");
        }
        // World-writable: refused, unless root-owned and sticky.
        let ww = t.path().join("ww");
        std::fs::create_dir(&ww).unwrap();
        set_mode(&ww, 0o777);
        let e = prepare_dir(&ww, DirSetup::Existing).unwrap_err();
        assert!(e.to_string().contains("writable by other users"), "{e}");
        set_mode(&ww, 0o1777);
        let root = nix::unistd::geteuid().is_root();
        assert_eq!(prepare_dir(&ww, DirSetup::Existing).is_ok(), root);
        prepare_dir(Path::new("/tmp"), DirSetup::Existing).unwrap();
    }

    #[test]
    fn directories_of_other_users_are_refused() {
        if !crate::prereq::require(
            crate::prereq::is_root(),
            "needs root to chown a directory to uid 65534",
        ) {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("foreign");
        std::fs::create_dir(&d).unwrap();
        nix::unistd::chown(&d, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        for setup in [DirSetup::Existing, DirSetup::Create] {
            let e = prepare_dir(&d, setup).unwrap_err();
            assert!(
                e.to_string().contains("is owned by uid 65534 (only root"),
                "{e}"
            );
        }
        let e = prepare_dir(&d, DirSetup::Private { group: None }).unwrap_err();
        assert!(
            e.to_string()
                .contains("owned by uid 65534, not by sockvisor's"),
            "{e}"
        );
        // Root-owned is fine for a shared directory, not for a private one unless we are root.
        prepare_dir(Path::new("/"), DirSetup::Existing).unwrap();
    }
}
