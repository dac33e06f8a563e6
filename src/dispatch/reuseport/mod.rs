//! The kernel-steered dispatch policy's foundation: per-worker `SO_REUSEPORT` listeners in one
//! group with an anchor, and a `BPF_PROG_TYPE_SK_REUSEPORT` program that picks the listener for
//! every new connection (round robin over the ready workers), every UDP flow (by its hash) and
//! every connection migrating off a closing listener. sockvisor is not in the per-connection
//! path; it only edits the maps when the ready set changes.
//!
//! * [`bpf`]: raw `bpf(2)` and the attach `setsockopt`s.
//! * [`insn`]: eBPF instruction encoding and a label assembler.
//! * [`program`]: the program and the layout of its maps.
//! * [`schedule`]: plain and smooth weighted round-robin schedules.
//! * [`listener`]: anchor, sibling listeners, queue depth, requeue.
//! * [`group`]: [`SteeredGroup`], the safe type over the maps and the program.
//! * [`steered`]: [`steered::Steered`], the listener's dispatch owner (the policy itself).
//!
//! Measurements and the design notes behind them: docs/reuseport.md.

pub mod bpf;
pub mod group;
pub mod insn;
pub mod listener;
pub mod program;
pub mod schedule;
pub mod steered;

#[cfg(test)]
mod tests;

pub use bpf::{AttachType, BpfError};
pub use group::{Counters, Key, SteeredGroup};
