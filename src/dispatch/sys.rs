//! Raw `sendmsg`/`recvmsg` with one `SCM_RIGHTS` fd, without allocation.
//!
//! nix's `sendmsg` allocates a `Vec` for the control buffer on every call, and its
//! `RecvMsg::cmsgs()` refuses to parse anything when `MSG_CTRUNC` is set, which would leak
//! the fds the kernel did install. These helpers use a stack buffer and always collect every
//! fd that arrived, so a caller never loses a connection.

use nix::errno::Errno;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// The most fds collected from one message. sockvisor sends exactly one; a message with more
/// (a foreign sender) is cut by the kernel at this many (it closes the rest: `MSG_CTRUNC`).
pub(crate) const MAX_FDS: usize = 4;

const FD_SIZE: u32 = std::mem::size_of::<RawFd>() as u32;
// SAFETY: CMSG_SPACE is pure arithmetic on its argument.
const RECV_SPACE: usize = unsafe { libc::CMSG_SPACE(FD_SIZE * MAX_FDS as u32) } as usize;
// SAFETY: as above.
const SEND_SPACE: usize = unsafe { libc::CMSG_SPACE(FD_SIZE) } as usize;

/// A control buffer aligned for `cmsghdr`, on the stack.
#[repr(C)]
union CmsgBuf {
    _align: libc::cmsghdr,
    bytes: [u8; RECV_SPACE],
}

/// The fds that came with one message (at most [`MAX_FDS`]); the rest of them are closed
/// when this is dropped.
pub(crate) struct Fds {
    fds: [Option<OwnedFd>; MAX_FDS],
}

impl Fds {
    fn new() -> Fds {
        Fds {
            fds: std::array::from_fn(|_| None),
        }
    }

    fn push(&mut self, fd: OwnedFd) {
        if let Some(slot) = self.fds.iter_mut().find(|f| f.is_none()) {
            *slot = Some(fd);
        } // else: dropped (closed); cannot happen with a buffer of MAX_FDS fds
    }

    /// How many fds arrived.
    pub(crate) fn len(&self) -> usize {
        self.fds.iter().filter(|f| f.is_some()).count()
    }

    /// Take the first fd; the others stay (and are closed on drop unless taken).
    pub(crate) fn take_first(&mut self) -> Option<OwnedFd> {
        self.fds.iter_mut().find_map(Option::take)
    }

    /// Take every fd.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = OwnedFd> + '_ {
        self.fds.iter_mut().filter_map(Option::take)
    }
}

/// One received message.
pub(crate) struct Received {
    /// Payload bytes (0 with no fd = end of file, or an empty message).
    pub(crate) bytes: usize,
    /// `msg_flags` (`MSG_CTRUNC`, `MSG_TRUNC`).
    pub(crate) flags: libc::c_int,
    pub(crate) fds: Fds,
}

impl Received {
    /// The control data was truncated: the sender passed more fds than we take.
    pub(crate) fn ctrunc(&self) -> bool {
        self.flags & libc::MSG_CTRUNC != 0
    }
}

/// `recvmsg(fd, buf, flags | MSG_CMSG_CLOEXEC)`, collecting `SCM_RIGHTS` fds.
pub(crate) fn recv(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    flags: libc::c_int,
) -> Result<Received, Errno> {
    let mut cbuf = CmsgBuf {
        bytes: [0; RECV_SPACE],
    };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is a plain C struct; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = std::ptr::addr_of_mut!(cbuf).cast();
    msg.msg_controllen = RECV_SPACE as _;
    // SAFETY: msg points at live buffers (iov -> buf, control -> cbuf) of the given lengths;
    // fd is a borrowed, open descriptor.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, flags | libc::MSG_CMSG_CLOEXEC) };
    let n = Errno::result(n)?;
    let mut fds = Fds::new();
    // SAFETY: the CMSG_* macros walk the control buffer within msg_controllen as set by the
    // kernel; every SCM_RIGHTS fd the kernel installed is ours and wrapped exactly once.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let hdr = std::ptr::read_unaligned(cmsg);
            if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let count = (hdr.cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize)
                    / FD_SIZE as usize;
                for i in 0..count {
                    let raw: RawFd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    if raw >= 0 {
                        fds.push(OwnedFd::from_raw_fd(raw));
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Received {
        bytes: n as usize,
        flags: msg.msg_flags,
        fds,
    })
}

/// `sendmsg(fd, data, flags)` with `pass` (if any) as the one `SCM_RIGHTS` fd. One syscall,
/// no allocation.
pub(crate) fn send(
    fd: BorrowedFd<'_>,
    data: &[u8],
    pass: Option<BorrowedFd<'_>>,
    flags: libc::c_int,
) -> Result<usize, Errno> {
    let mut cbuf = CmsgBuf {
        bytes: [0; RECV_SPACE],
    };
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is a plain C struct; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(pass) = pass {
        msg.msg_control = std::ptr::addr_of_mut!(cbuf).cast();
        msg.msg_controllen = SEND_SPACE as _;
        // SAFETY: the control buffer is aligned and SEND_SPACE <= RECV_SPACE bytes long, so
        // CMSG_FIRSTHDR is non-null and CMSG_DATA has room for one fd.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(FD_SIZE) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), pass.as_raw_fd());
        }
    }
    // SAFETY: msg points at live buffers of the given lengths; the kernel only reads them
    // (iov_base is never written by sendmsg).
    let n = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, flags) };
    Errno::result(n).map(|n| n as usize)
}

/// `poll(fd, events, timeout_ms)` on one fd; returns `revents` (0 on timeout).
pub(crate) fn poll_one(
    fd: BorrowedFd<'_>,
    events: libc::c_short,
    timeout_ms: i32,
) -> Result<libc::c_short, Errno> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd, count 1.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    Errno::result(n)?;
    Ok(pfd.revents)
}

/// After a `recv` of 0 bytes and no fd on a `SOCK_SEQPACKET` socket: whether the peer hung
/// up (end of file), rather than sent an empty message. `poll(POLLRDHUP)` tells them apart
/// (a poll error counts as a hang-up).
pub(crate) fn peer_hung_up(fd: BorrowedFd<'_>) -> bool {
    loop {
        match poll_one(fd, libc::POLLRDHUP, 0) {
            // EINTR (a signal pending, even with a zero timeout) says nothing about the peer.
            Err(Errno::EINTR) => continue,
            r => return r.map_or(true, |r| r & (libc::POLLRDHUP | libc::POLLHUP) != 0),
        }
    }
}

/// Bytes waiting in `fd`'s receive queue (`FIONREAD`/`SIOCINQ`).
pub(crate) fn inq(fd: BorrowedFd<'_>) -> Result<usize, Errno> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int to the pointer; fd is open.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    Errno::result(r)?;
    Ok(n.max(0) as usize)
}
