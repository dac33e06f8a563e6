//! sockvisor: one socket, N workers of any language, natively on systemd.
//!
//! The `sockvisor` binary is a supervisor in the spirit of Node's `cluster` primary: it takes
//! its sockets from systemd (or binds them), forks N workers and spreads new connections over
//! them in round robin: by default each worker gets its own `SO_REUSEPORT` listener and an
//! eBPF program picks the next ready worker (any program serves unchanged); workers that
//! speak the channel protocol can instead get each connection over a `SOCK_SEQPACKET`
//! channel with `SCM_RIGHTS`. The library half ([`worker`]) is the Rust API for workers.
//! docs/design.md has the module map, the loop and the contract.
//!
//! # Invariants
//!
//! 1. **One thread.** The supervisor is a single-threaded event loop (epoll + signalfd +
//!    timerfd) that owns all state. No thread is ever alive when it forks, so the child may
//!    run the prepared exec path without fear of a lock held by another thread.
//! 2. **Signals are data.** Every signal sockvisor handles is blocked from the first line of
//!    `main` and read from a signalfd; nothing runs in a signal handler. Children get an
//!    empty mask and default dispositions before exec.
//! 3. **Nothing leaks into workers.** Every fd sockvisor opens is `O_CLOEXEC`; a worker gets
//!    exactly fds 0-2 and its listeners at 3.. (and, with `messages = true`, its message
//!    socket right after them), the soft fd limit sockvisor started with, and a process
//!    group of its own. Its environment is built explicitly: systemd's
//!    `NOTIFY_SOCKET`, `WATCHDOG_*` and `LISTEN_*` never reach it.
//! 4. **Everything between fork and exec is prepared before fork** (`spawn`): argv, envp with
//!    a `LISTEN_PID` placeholder patched through pointers prepared with it, fd plan,
//!    credentials. The child only makes raw async-signal-safe syscalls.
//! 5. **No connection is lost to sockvisor's fault.** Channel policies: an accepted
//!    connection is in a listener's pending queue, or in exactly one worker's channel, or
//!    owned by a worker; sockvisor keeps a reference to every worker's end of every channel,
//!    so a leaving or dead worker's queue is read back and handed to others. `reuseport`: the
//!    anchor never closes and is never scheduled, what reaches it is requeued onto a ready
//!    worker, and sockvisor's own copy of a dead worker's listener is its last reference:
//!    closing it migrates the queue (`dispatch::reuseport::steered`).
//! 6. **Bounded memory.** A worker's channel holds at most `window` connections; pending
//!    queues, control clients and notify datagrams per wake-up are bounded; when nothing
//!    can be queued the listener leaves epoll and the kernel backlog absorbs the burst.
//! 7. **One PID for life.** Reload replaces workers in generations; the supervisor never
//!    re-execs itself, so systemd's MAINPID never changes.
//! 8. **Upstream health is honest.** `READY=1` only when the fleet is ready; `WATCHDOG=1`
//!    only while the loop runs and enough workers are healthy. Workers' own notifications are
//!    consumed by sockvisor and never forwarded.
//! 9. **No unsupervised process.** sockvisor is a child subreaper: whatever a worker leaves
//!    behind is stopped, and every child is reaped.
//! 10. **One owner per piece of state.** Dispatch state belongs to each listener's dispatch
//!     owner; the supervisor tells it what happened to the fleet and reads back troubles,
//!     never the other way round.

pub mod activation;
pub mod cgroup;
pub mod config;
pub mod control;
pub mod dispatch;
pub mod logging;
pub mod messages;
pub mod notify_server;
pub mod observe;
pub mod poller;
pub mod protocol;
pub mod runtime_files;
pub mod spawn;
pub mod supervisor;
pub mod upstream;
pub mod worker;

/// The rule for unit tests that need root or a program: skip with a `SKIP:` line, or fail
/// with `SOCKVISOR_REQUIRE_ALL=1` (the integration tests' helper, tests/common/prereq.rs).
#[cfg(test)]
#[path = "../tests/common/prereq.rs"]
pub(crate) mod prereq;

/// Exit codes: a contract (docs/design.md section 6), documented in docs/config.md.
pub mod exit {
    /// Clean stop.
    pub const OK: i32 = 0;
    /// The fleet could not stay up: every slot kept failing (EX_UNAVAILABLE), so systemd's
    /// `Restart=` and start limits take over.
    pub const FLEET_FAILED: i32 = 69;
    /// Internal error (EX_SOFTWARE): a syscall sockvisor cannot run without failed.
    pub const INTERNAL: i32 = 70;
    /// Configuration or usage error (EX_CONFIG); units say `RestartPreventExitStatus=78`.
    pub const CONFIG: i32 = 78;
}
