//! `shared`: every worker gets the listening socket itself and accepts on it (or reads its
//! datagrams); the kernel decides which waiting worker wakes up. sockvisor never touches a
//! connection, so there is nothing to count, queue or take back.

use super::ListenerDispatch;
use crate::activation::Listener;
use std::os::fd::{AsFd, BorrowedFd};

pub struct Shared {
    listener: Listener,
}

impl Shared {
    pub fn new(listener: Listener) -> Shared {
        Shared { listener }
    }
}

impl ListenerDispatch for Shared {
    fn listener(&self) -> &Listener {
        &self.listener
    }

    fn staged_fd(&self) -> BorrowedFd<'_> {
        self.listener.fd.as_fd()
    }
}
