//! The worker's end of the message socket (re-exported as `sockvisor::worker::Messages`).

use super::wire::{self, Address};
use crate::dispatch::sys;
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::sys::socket::{getsockopt, sockopt, SockType};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// The variable that gives the message socket's fd (set only with `messages = true`).
pub const MESSAGES_FD_VAR: &str = "SOCKVISOR_MESSAGES_FD";

/// Why [`Messages::recv`] ended: sockvisor closed its end (it exited).
pub const MESSAGES_CLOSED: &str = "sockvisor closed the message socket";

/// `from_env` wraps a raw fd in an `OwnedFd`: doing it twice would close it twice.
static FROM_ENV_DONE: AtomicBool = AtomicBool::new(false);

/// One message a worker received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// [`Address::Operator`] (`sockvisor send`) or the sender's slot.
    pub from: Address,
    /// This worker's slot ([`Address::Slot`]), or [`Address::All`] for a broadcast.
    pub to: Address,
    pub payload: Vec<u8>,
}

/// A worker's message socket: messages to and from sockvisor's operator and the other
/// workers (docs/messages.md). Sending blocks while sockvisor's end is full, which it
/// empties at once; call [`Messages::set_nonblocking`] for an event loop.
///
/// ```no_run
/// use sockvisor::worker::{Address, Messages};
///
/// let messages = Messages::from_env()?.expect("run with sockvisor --messages");
/// messages.broadcast(b"cache: drop user 42")?;
/// loop {
///     let m = messages.recv()?; // Err(UnexpectedEof): sockvisor is gone
///     if m.from == Address::Operator && m.payload == b"ping" {
///         messages.to_operator(b"pong")?;
///     }
/// }
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct Messages {
    fd: OwnedFd,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl Messages {
    /// The socket sockvisor announced in `SOCKVISOR_MESSAGES_FD`. `Ok(None)` when there is
    /// none (messages are off), or when `LISTEN_PID` is not this process (the variable was
    /// inherited from the worker by a child: the socket is the worker's, not its child's).
    /// The fd is set close-on-exec. Can be called once per process (then `AlreadyExists`).
    pub fn from_env() -> io::Result<Option<Messages>> {
        let Some(value) = std::env::var(MESSAGES_FD_VAR)
            .ok()
            .filter(|v| !v.is_empty())
        else {
            return Ok(None);
        };
        let ours = std::env::var("LISTEN_PID")
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            == Some(std::process::id());
        if !ours {
            return Ok(None);
        }
        let raw: RawFd = value
            .trim()
            .parse()
            .ok()
            .filter(|&fd| fd > 2)
            .ok_or_else(|| invalid(format!("{MESSAGES_FD_VAR}={value:?} is not an fd above 2")))?;
        if FROM_ENV_DONE.swap(true, Ordering::SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "Messages::from_env was already called in this process",
            ));
        }
        // SAFETY: borrowed only for the check; F_GETFD fails with EBADF if it is not open,
        // and no OwnedFd is made then.
        let borrowed = unsafe { BorrowedFd::borrow_raw(raw) };
        let flags = fcntl(borrowed, FcntlArg::F_GETFD)
            .map_err(|e| invalid(format!("{MESSAGES_FD_VAR}: fd {raw}: {e}")))?;
        fcntl(
            borrowed,
            FcntlArg::F_SETFD(FdFlag::from_bits_truncate(flags) | FdFlag::FD_CLOEXEC),
        )?;
        // SAFETY: fd `raw` is open (checked above) and was given to this process by sockvisor
        // for this purpose; FROM_ENV_DONE makes sure it is wrapped once.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Messages::from_fd(fd).map(Some)
    }

    /// Wrap a message socket obtained some other way (tests). It must be a
    /// `SOCK_SEQPACKET` socket.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Messages> {
        match getsockopt(&fd, sockopt::SockType) {
            Ok(SockType::SeqPacket) => Ok(Messages { fd }),
            Ok(other) => Err(invalid(format!(
                "the message socket is {other:?}, not SOCK_SEQPACKET"
            ))),
            Err(e) => Err(invalid(format!("the message socket: {e}"))),
        }
    }

    /// Sends fail with `WouldBlock` instead of waiting, and so does [`Messages::recv`]
    /// (use [`Messages::try_recv`]).
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        let fl = OFlag::from_bits_truncate(fcntl(&self.fd, FcntlArg::F_GETFL)?);
        let fl = if nonblocking {
            fl | OFlag::O_NONBLOCK
        } else {
            fl - OFlag::O_NONBLOCK
        };
        fcntl(&self.fd, FcntlArg::F_SETFL(fl))?;
        Ok(())
    }

    /// To the worker of `slot` (whoever serves that slot when sockvisor routes it).
    pub fn send_to(&self, slot: usize, payload: &[u8]) -> io::Result<()> {
        let slot = u32::try_from(slot)
            .ok()
            .filter(|&s| s < wire::ALL)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no such slot"))?;
        self.send(Address::Slot(slot), payload)
    }

    /// To every other worker.
    pub fn broadcast(&self, payload: &[u8]) -> io::Result<()> {
        self.send(Address::All, payload)
    }

    /// To the operator: `sockvisor messages --follow` prints it.
    pub fn to_operator(&self, payload: &[u8]) -> io::Result<()> {
        self.send(Address::Operator, payload)
    }

    fn send(&self, to: Address, payload: &[u8]) -> io::Result<()> {
        // `from` is stamped by sockvisor; 0 here.
        let packet = wire::encode(Address::Slot(0), to, payload)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        loop {
            match sys::send(self.fd.as_fd(), &packet, None, libc::MSG_NOSIGNAL) {
                Ok(_) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Wait for the next message. Packets this version does not understand are skipped.
    /// When sockvisor is gone the error has kind `UnexpectedEof` ([`MESSAGES_CLOSED`]).
    pub fn recv(&self) -> io::Result<Message> {
        loop {
            match self.recv_once(0)? {
                Some(m) => return Ok(m),
                None => continue,
            }
        }
    }

    /// The next message if one is waiting, else `Ok(None)`; never blocks.
    pub fn try_recv(&self) -> io::Result<Option<Message>> {
        loop {
            match self.recv_once(libc::MSG_DONTWAIT) {
                Ok(Some(m)) => return Ok(Some(m)),
                Ok(None) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// One packet: `Ok(None)` when it was skipped.
    fn recv_once(&self, flags: libc::c_int) -> io::Result<Option<Message>> {
        let mut buf = vec![0u8; wire::MAX_PACKET + 1];
        let got = loop {
            match sys::recv(self.fd.as_fd(), &mut buf, flags) {
                Ok(got) => break got,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        if got.bytes == 0 && got.fds.len() == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                MESSAGES_CLOSED,
            ));
        }
        if got.flags & libc::MSG_TRUNC != 0 {
            return Ok(None);
        }
        Ok(wire::decode(&buf[..got.bytes]).ok().map(|m| Message {
            from: m.from,
            to: m.to,
            payload: m.payload.to_vec(),
        }))
    }
}

impl AsFd for Messages {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Messages {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag};
    use std::os::unix::net::UnixDatagram;

    fn pair() -> (Messages, UnixDatagram) {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        (Messages::from_fd(a).unwrap(), UnixDatagram::from(b))
    }

    #[test]
    fn sends_what_the_wire_format_says_and_skips_what_it_does_not_know() {
        let (m, sockvisor) = pair();
        m.send_to(3, b"a").unwrap();
        m.broadcast(b"b").unwrap();
        m.to_operator(b"c").unwrap();
        let mut buf = [0u8; 64];
        for (to, payload) in [
            (Address::Slot(3), b"a"),
            (Address::All, b"b"),
            (Address::Operator, b"c"),
        ] {
            let n = sockvisor.recv(&mut buf).unwrap();
            let d = wire::decode(&buf[..n]).unwrap();
            assert_eq!((d.to, d.payload), (to, &payload[..]));
        }
        assert!(m.try_recv().unwrap().is_none());
        sockvisor
            .send(&[1, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
            .unwrap(); // unknown kind
        sockvisor
            .send(&wire::encode(Address::Operator, Address::Slot(3), b"hi").unwrap())
            .unwrap();
        let got = m.recv().unwrap();
        assert_eq!(
            got,
            Message {
                from: Address::Operator,
                to: Address::Slot(3),
                payload: b"hi".to_vec()
            }
        );
        assert!(m.send_to(0, &[0; wire::MAX_PAYLOAD + 1]).is_err());
        drop(sockvisor);
        assert_eq!(m.recv().unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn only_a_seqpacket_socket_is_a_message_socket() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(Messages::from_fd(OwnedFd::from(a)).is_err());
    }
}
