//! The control socket (`sockvisor status | reload | scale N | signal | send | messages`): a
//! unix stream socket, mode 0600, one JSON request and one JSON reply per line, replies in
//! request order (docs/control.md); `messages --follow` then streams.
//!
//! - [`protocol`]: the requests and replies on the wire.
//! - [`server`]: [`ControlServer`], for the supervisor's epoll loop.
//! - [`client`]: [`request`], for the `sockvisor status|reload|scale` commands.
//! - [`table`]: the human `status` table.
//!
//! The supervisor registers one fd, [`ControlServer::as_fd`], and when it is readable calls
//! [`ControlServer::poll`]; it answers each request once with [`ControlServer::reply`], now
//! or later (a reload answers when it is over):
//!
//! ```
//! use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
//! use sockvisor::control::{self, ControlServer, Reply, Request};
//! use std::time::Duration;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! let path = dir.path().join("control.sock");
//! let mut server = ControlServer::bind(&path)?;
//! // The client side, here a thread (`sockvisor scale 3` in real life).
//! let client = std::thread::spawn({
//!     let path = path.clone();
//!     move || control::request(&path, &Request::Scale { workers: 3 }, Duration::from_secs(5))
//! });
//! // The supervisor's side: wait until `as_fd()` is readable, then `poll()`.
//! while !client.is_finished() {
//!     let mut fds = [PollFd::new(server.as_fd(), PollFlags::POLLIN)];
//!     poll(&mut fds, PollTimeout::from(100u16))?;
//!     for (id, request) in server.poll() {
//!         let reply = match request {
//!             Request::Scale { workers } => Reply::ok(Some(format!("scaling to {workers}"))),
//!             _ => Reply::error("not in this example"),
//!         };
//!         server.reply(id, &reply);
//!     }
//! }
//! let reply = client.join().unwrap()?;
//! assert_eq!(reply.message.as_deref(), Some("scaling to 3"));
//! # Ok(())
//! # }
//! ```

pub mod client;
pub mod locate;
pub mod protocol;
pub mod server;
pub mod signal;
pub mod table;

#[cfg(test)]
mod tests;

pub use client::{follow, request, ClientError};
pub use protocol::{
    CanaryStatus, CheckStatus, Event, FleetStatus, ListenerStatus, MessageTotals, Reply, Request,
    WorkerMessages, WorkerStatus, WorkerTarget, MAX_LINE,
};
pub use server::{
    ControlServer, RequestId, FOLLOW_OUTPUT_LIMIT, MAX_CLIENTS, MAX_IN_FLIGHT, MAX_PENDING_OUTPUT,
};
pub use signal::WorkerSignal;
pub use table::{format_status_table, format_uptime};
