//! Messages between sockvisor's operator and the workers, and between workers (opt-in:
//! `messages = true`). docs/messages.md is the normative text.
//!
//! Each worker gets one end of its own `socketpair(AF_UNIX, SOCK_SEQPACKET)`, placed at the
//! fd after its `LISTEN_FDS` sockets and announced by `SOCKVISOR_MESSAGES_FD` (it is not
//! counted in `LISTEN_FDS`, so programs that do not ask never see it as a listener). A
//! message is one packet: a small header ([`wire`]) and an opaque payload of at most
//! [`wire::MAX_PAYLOAD`] bytes, addressed to a slot, to every other worker, or to the
//! operator.
//!
//! - [`wire`]: the format, for both ends.
//! - [`router`]: sockvisor's side ([`Router`]): the endpoints, the bounded queues, the
//!   routing and the figures; driven by the supervisor's loop.
//! - [`worker`]: the worker's side ([`Messages`], also `sockvisor::worker::Messages`).
//! - [`payload`]: how a payload travels in the control socket's JSON lines.

pub mod payload;
pub mod router;
pub mod wire;
pub mod worker;

pub use router::{Delivery, EndpointFigures, OperatorMessage, Router, Totals};
pub use wire::Address;
pub use worker::{Message, Messages, MESSAGES_FD_VAR};
