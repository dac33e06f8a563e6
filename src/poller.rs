//! The supervisor's epoll instance and the tokens its events carry.
//!
//! Every fd the loop waits on is registered here with a [`Token`] that says what it is. A
//! token packs a kind (8 bits), a listener index (16 bits) and a worker pid (32 bits) into
//! the 64-bit epoll data, so no two fds of one fleet ever share a token: listener indexes
//! are bounded by `MAX_LISTENERS`, pids by the kernel's `pid_max` (at most 2^22).

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::unistd::Pid;
use std::os::fd::AsFd;

/// The most listeners one fleet may have: the width of a token's listener field.
pub const MAX_LISTENERS: usize = u16::MAX as usize;

/// What a ready fd is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token {
    Signal,
    Timer,
    /// The workers' notify socket.
    Notify,
    /// The control socket (its own epoll of clients inside).
    Control,
    /// A listener sockvisor accepts on, by index.
    Listener(usize),
    /// A worker's channel of a listener, readable when the worker sends close reports.
    Channel {
        listener: usize,
        pid: Pid,
    },
    /// The active health check connection of a worker (one at a time per worker).
    Probe(Pid),
    /// A worker's message socket (`messages = true`), by worker pid.
    Messages(Pid),
    /// The HTTP listener of `/metrics` and the probes (`metrics_listen`).
    HttpListener,
    /// One of its connections, by connection id.
    HttpClient(u32),
    /// A worker's exec report pipe (spawn::ExecReport), by worker pid.
    Exec(Pid),
}

const KIND_SHIFT: u32 = 56;
const LISTENER_SHIFT: u32 = 32;

impl Token {
    fn encode(self) -> u64 {
        let (kind, listener, pid) = match self {
            Token::Signal => (1u64, 0, 0),
            Token::Timer => (2, 0, 0),
            Token::Notify => (3, 0, 0),
            Token::Control => (4, 0, 0),
            Token::Listener(i) => (5, i, 0),
            Token::Channel { listener, pid } => (6, listener, pid.as_raw()),
            Token::Probe(pid) => (7, 0, pid.as_raw()),
            Token::Messages(pid) => (8, 0, pid.as_raw()),
            Token::HttpListener => (9, 0, 0),
            Token::HttpClient(id) => (10, 0, id as i32),
            Token::Exec(pid) => (11, 0, pid.as_raw()),
        };
        debug_assert!(listener <= MAX_LISTENERS);
        kind << KIND_SHIFT | (listener as u64 & 0xffff) << LISTENER_SHIFT | u64::from(pid as u32)
    }

    fn decode(data: u64) -> Option<Token> {
        let listener = ((data >> LISTENER_SHIFT) & 0xffff) as usize;
        let pid = Pid::from_raw(data as u32 as i32);
        Some(match data >> KIND_SHIFT {
            1 => Token::Signal,
            2 => Token::Timer,
            3 => Token::Notify,
            4 => Token::Control,
            5 => Token::Listener(listener),
            6 => Token::Channel { listener, pid },
            7 => Token::Probe(pid),
            8 => Token::Messages(pid),
            9 => Token::HttpListener,
            10 => Token::HttpClient(data as u32),
            11 => Token::Exec(pid),
            _ => return None,
        })
    }
}

pub struct Poller {
    epoll: Epoll,
}

/// Room for the events of one wake-up.
pub fn event_buffer() -> Vec<EpollEvent> {
    vec![EpollEvent::empty(); 64]
}

impl Poller {
    pub fn new() -> nix::Result<Poller> {
        Ok(Poller {
            epoll: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?,
        })
    }

    /// Wait for `EPOLLIN` (level-triggered) on `fd`.
    pub fn register(&self, fd: impl AsFd, token: Token) -> nix::Result<()> {
        self.epoll
            .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, token.encode()))
    }

    /// Wait for `EPOLLOUT` (`writable`) or `EPOLLIN` on `fd`, registering it or changing what
    /// it waits for.
    pub fn watch(&self, fd: impl AsFd, token: Token, writable: bool) -> nix::Result<()> {
        let flags = if writable {
            EpollFlags::EPOLLOUT
        } else {
            EpollFlags::EPOLLIN
        };
        let mut event = EpollEvent::new(flags, token.encode());
        match self.epoll.modify(&fd, &mut event) {
            Err(nix::errno::Errno::ENOENT) => self.epoll.add(fd, event),
            other => other,
        }
    }

    /// Change what `fd` (registered with `token`) is waited for: `EPOLLIN`, and `EPOLLOUT`
    /// too when `writable` (level-triggered both).
    pub fn set_writable(&self, fd: impl AsFd, token: Token, writable: bool) -> nix::Result<()> {
        let mut flags = EpollFlags::EPOLLIN;
        if writable {
            flags |= EpollFlags::EPOLLOUT;
        }
        self.epoll
            .modify(fd, &mut EpollEvent::new(flags, token.encode()))
    }

    /// Stop waiting on `fd`; an fd that is not registered is fine.
    pub fn unregister(&self, fd: impl AsFd) {
        let _ = self.epoll.delete(fd);
    }

    /// Block until something is ready; `tokens` then says what is.
    pub fn wait(&self, events: &mut [EpollEvent], tokens: &mut Vec<Token>) -> nix::Result<()> {
        let n = self.epoll.wait(events, EpollTimeout::NONE)?;
        tokens.clear();
        tokens.extend(events[..n].iter().filter_map(|ev| Token::decode(ev.data())));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_without_collisions() {
        let mut seen = std::collections::HashSet::new();
        let pids = [1, 2, 255, 256, 65_535, 65_536, 4_194_304, i32::MAX];
        let listeners = [0, 1, 255, 256, 257, 1024, MAX_LISTENERS];
        let mut all = vec![
            Token::Signal,
            Token::Timer,
            Token::Notify,
            Token::Control,
            Token::HttpListener,
        ];
        all.extend(pids.iter().map(|&p| Token::Probe(Pid::from_raw(p))));
        for &p in &pids {
            all.push(Token::Messages(Pid::from_raw(p)));
            all.push(Token::Exec(Pid::from_raw(p)));
        }
        for id in [0, 1, 65_536, u32::MAX] {
            all.push(Token::HttpClient(id));
        }
        for &l in &listeners {
            all.push(Token::Listener(l));
            for &p in &pids {
                all.push(Token::Channel {
                    listener: l,
                    pid: Pid::from_raw(p),
                });
            }
        }
        for t in all {
            let data = t.encode();
            assert_eq!(Token::decode(data), Some(t));
            assert!(seen.insert(data), "{t:?} collides");
        }
        assert_eq!(Token::decode(0), None);
    }
}
