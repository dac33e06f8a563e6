//! Messages and signals for workers (docs/messages.md, docs/control.md): the verbs that tie
//! the message router ([`crate::messages::Router`]) to the fleet and the control socket.

use super::Supervisor;
use crate::control::{Event, Reply, WorkerSignal, WorkerTarget};
use crate::dispatch::WorkerRef;
use crate::messages::{payload, OperatorMessage};
use nix::unistd::Pid;

fn target(w: WorkerRef) -> WorkerTarget {
    WorkerTarget {
        slot: w.slot,
        pid: w.pid.as_raw(),
        generation: w.generation,
    }
}

/// `slots 0, 1, 2` / `slot 3`.
fn slots(targets: &[WorkerTarget]) -> String {
    let list: Vec<String> = targets.iter().map(|t| t.slot.to_string()).collect();
    match list.len() {
        1 => format!("slot {}", list[0]),
        _ => format!("slots {}", list.join(", ")),
    }
}

impl Supervisor {
    /// With `messages = true`, make the next worker's message socket. A worker whose socket
    /// cannot be made starts without one (and says so): messages are no reason to fail a
    /// slot.
    pub(super) fn stage_message_socket(&mut self, slot: usize) {
        if !self.config.messages {
            return;
        }
        if let Err(e) = self.messages.stage() {
            log::warn!("slot {slot}: cannot create its message socket: {e}; it starts without one");
        }
    }

    /// Who receives a slot's messages: the slot's current worker.
    fn message_slots(&self) -> Vec<Option<Pid>> {
        self.slots.iter().map(|s| s.current).collect()
    }

    /// A worker's message socket is ready: route what it sent, write what waits for it.
    pub(super) fn route_messages(&mut self, pid: Pid) {
        let current = self.message_slots();
        let for_operator = self.messages.handle(pid, &self.poller, &current);
        self.tell_operator(for_operator);
    }

    /// Stream workers' messages to the `messages --follow` clients; with none, they are
    /// counted as unheard.
    fn tell_operator(&mut self, messages: Vec<OperatorMessage>) {
        if messages.is_empty() {
            return;
        }
        let control = self.control.as_mut().filter(|c| c.followers() > 0);
        let Some(control) = control else {
            log::debug!(
                "{} messages to the operator, and no `sockvisor messages --follow` to print them",
                messages.len()
            );
            self.messages.count_unheard(messages.len() as u64);
            return;
        };
        for m in messages {
            let (payload, payload_base64) = payload::to_json(&m.payload);
            let event = Event::Message {
                from: target(m.from),
                payload,
                payload_base64,
            };
            control.publish(&event.to_line());
        }
    }

    /// Messages can be sent in this fleet (turned on, or workers still have sockets from
    /// before a reload turned them off).
    fn messages_available(&self) -> Result<(), String> {
        if self.config.messages || self.messages.has_endpoints() {
            return Ok(());
        }
        Err(
            "messages are off in this fleet: set messages = true (or --messages) and reload"
                .to_string(),
        )
    }

    /// `sockvisor send [--slot N] PAYLOAD`.
    pub(super) fn operator_send(&mut self, slot: Option<usize>, payload: Vec<u8>) -> Reply {
        if let Err(e) = self.messages_available() {
            return Reply::error(e);
        }
        let current = self.message_slots();
        let delivery =
            match self
                .messages
                .send_from_operator(slot, &payload, &self.poller, &current)
            {
                Ok(d) => d,
                Err(e) => return Reply::error(e),
            };
        let to: Vec<WorkerTarget> = delivery.to.into_iter().map(target).collect();
        let dropped: Vec<WorkerTarget> = delivery.dropped.into_iter().map(target).collect();
        if to.is_empty() {
            return Reply::error(format!(
                "not delivered: the message queue of {} is full (the worker does not read its messages)",
                slots(&dropped)
            ));
        }
        let mut message = format!("sent to {} worker(s): {}", to.len(), slots(&to));
        if !dropped.is_empty() {
            message.push_str(&format!("; dropped for {} (queue full)", slots(&dropped)));
        }
        Reply::with_workers(message, to)
    }

    /// The reply to `sockvisor messages --follow` (the control server streams the rest).
    pub(super) fn follow_messages(&self) -> Reply {
        match self.messages_available() {
            Ok(()) => Reply::ok(Some(
                "following the messages workers send to the operator".into(),
            )),
            Err(e) => Reply::error(e),
        }
    }

    /// `sockvisor signal SIGNAL [--slot N] [--generation G]`: signal every live worker (any
    /// state) that matches, each by its pid (not its process group: a worker decides what
    /// its children get). sockvisor does not follow what the signal does.
    pub(super) fn signal_workers(
        &mut self,
        signal: &str,
        slot: Option<usize>,
        generation: Option<u64>,
    ) -> Reply {
        let signal = match WorkerSignal::parse(signal) {
            Ok(s) => s,
            Err(e) => return Reply::error(e),
        };
        let chosen: Vec<WorkerTarget> = self
            .workers
            .values()
            .filter(|w| slot.is_none_or(|s| w.slot == s))
            .filter(|w| generation.is_none_or(|g| w.generation == g))
            .map(|w| WorkerTarget {
                slot: w.slot,
                pid: w.pid.as_raw(),
                generation: w.generation,
            })
            .collect();
        if chosen.is_empty() {
            let what = match (slot, generation) {
                (Some(s), Some(g)) => format!("no worker of generation {g} in slot {s}"),
                (Some(s), None) => format!("no worker in slot {s}"),
                (None, Some(g)) => format!("no worker of generation {g}"),
                (None, None) => "no worker".to_string(),
            };
            return Reply::error(format!(
                "{what} (the fleet has {} slots, generation {}); nothing sent",
                self.slots.len(),
                self.generation
            ));
        }
        let mut reached = Vec::new();
        let mut failed = Vec::new();
        for w in chosen {
            match nix::sys::signal::kill(Pid::from_raw(w.pid), signal.signal()) {
                Ok(()) => reached.push(w),
                // Exited and not reaped yet, most likely.
                Err(e) => failed.push(format!("pid {}: {e}", w.pid)),
            }
        }
        let pids: Vec<String> = reached.iter().map(|t| t.pid.to_string()).collect();
        log::info!(
            "{} sent to {} worker(s) on request: pids {}",
            signal.name(),
            reached.len(),
            pids.join(", ")
        );
        if reached.is_empty() {
            return Reply::error(format!("{} not sent: {}", signal.name(), failed.join("; ")));
        }
        let mut message = format!(
            "{} sent to {} worker(s): pids {}",
            signal.name(),
            reached.len(),
            pids.join(", ")
        );
        if !failed.is_empty() {
            message.push_str(&format!("; not sent to {}", failed.join("; ")));
        }
        Reply::with_workers(message, reached)
    }
}
