//! What travels on the control socket: one JSON object per line each way (docs/control.md).

use serde::{Deserialize, Serialize};

/// Longest request line (bytes, without the newline). A longer one is answered with one
/// error and skipped up to its newline.
pub const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    /// `canary`: start with that many canary workers (`sockvisor reload --canary N`).
    Reload {
        #[serde(skip_serializing_if = "Option::is_none", default)]
        canary: Option<usize>,
    },
    Scale {
        workers: usize,
    },
    /// Send a signal to the workers (all, or those of one slot or generation).
    Signal {
        /// A name or number (`SIGUSR1`, `usr1`, `10`), checked by [`super::WorkerSignal`].
        signal: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        slot: Option<usize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        generation: Option<u64>,
    },
    /// A message from the operator to the worker of one slot, or to every worker.
    Send {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        slot: Option<usize>,
        /// The payload as text, or ...
        #[serde(default, skip_serializing_if = "Option::is_none")]
        payload: Option<String>,
        /// ... as base64 (any bytes).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        payload_base64: Option<String>,
    },
    /// Stream the messages workers send to the operator: the reply, then one [`Event`]
    /// line per message until the client hangs up. The last request of its connection.
    Messages {
        #[serde(default)]
        follow: bool,
    },
    /// The Prometheus exposition (text format 0.0.4), as `GET /metrics` serves it.
    Metrics,
}

impl Request {
    /// A plain reload (the configuration's `canary_workers` decide).
    pub const RELOAD: Request = Request::Reload { canary: None };
}

/// A worker a request acted on (`signal`, `send`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerTarget {
    pub slot: usize,
    pub pid: i32,
    pub generation: u64,
}

/// A line streamed to a `messages --follow` client after its reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// A worker's message to the operator.
    Message {
        from: WorkerTarget,
        /// The payload when it is UTF-8 text ...
        #[serde(default, skip_serializing_if = "Option::is_none")]
        payload: Option<String>,
        /// ... else as base64.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        payload_base64: Option<String>,
    },
    /// This many messages were not written to this client: it did not read fast enough.
    Dropped { count: u64 },
}

impl Event {
    /// The event as one line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_else(|e| {
            log::warn!("cannot encode a control event: {e}");
            br#"{"event":"dropped","count":1}"#.to_vec()
        });
        line.push(b'\n');
        line
    }
}

/// Message figures of one worker in `status` (`messages = true`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerMessages {
    /// Messages it sent.
    pub sent: u64,
    /// Messages written into its socket.
    pub received: u64,
    /// Messages waiting in sockvisor's queue for it.
    pub queued: u64,
    /// Messages meant for it and dropped (its queue was full, or it closed its socket).
    pub dropped: u64,
}

/// The fleet's message figures in `status`, since sockvisor started: the router's totals,
/// flattened into one object with the followers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageTotals {
    #[serde(flatten)]
    pub totals: crate::messages::Totals,
    /// `messages --follow` clients connected now.
    pub followers: usize,
}

/// One worker in `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub slot: usize,
    pub pid: i32,
    pub generation: u64,
    /// starting | ready | draining | stopping
    pub state: String,
    pub uptime_secs: f64,
    pub restarts: u64,
    pub dispatched: u64,
    pub queued: u64,
    /// Open connections, when the worker reports closes.
    pub open: Option<u64>,
    /// The worker's last `STATUS=`.
    pub status: Option<String>,
    /// Its weight in (smooth weighted) round robin.
    #[serde(default = "one")]
    pub weight: u32,
    /// Taken out of the rotation by a failed active health check.
    #[serde(default)]
    pub out_of_rotation: bool,
    /// One of the workers of a canary being observed.
    #[serde(default)]
    pub canary: bool,
    /// Its active health checks, when configured.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub health_check: Option<CheckStatus>,
    /// Its message figures, when it has a message socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<WorkerMessages>,
    /// How the slot's previous worker ended, if one did: `oom (killed by SIGKILL)`,
    /// `exit (exited with status 1)` (the reason is the metrics' `reason`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_exit: Option<String>,
}

fn one() -> u32 {
    1
}

/// A worker's active health checks in `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckStatus {
    pub passes: u64,
    pub failures: u64,
    pub consecutive_passes: u32,
    pub consecutive_failures: u32,
    /// `passed: HTTP 200 in 1ms`, `failed: no answer within 2000ms`, ...
    pub last: Option<String>,
}

/// A canary rollout in `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanaryStatus {
    pub generation: u64,
    pub pids: Vec<i32>,
    /// `10% by weight`, `10% by client address`, `weight 1 per worker (old workers: 3)`.
    pub share: String,
    /// starting | observing
    pub phase: String,
    /// Observation time left.
    pub observe_left_secs: Option<f64>,
    /// `1/1 workers passing their health checks`, ...
    pub health: String,
}

/// `status` reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetStatus {
    pub pid: i32,
    pub generation: u64,
    /// starting | running | reloading | draining | stopping
    pub state: String,
    /// What `/readyz` answers: enough workers ready (`min_ready`), not stopping or draining.
    #[serde(default)]
    pub ready: bool,
    /// Why not, in one line.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub not_ready: Option<String>,
    pub workers_wanted: usize,
    pub summary: String,
    pub workers: Vec<WorkerStatus>,
    pub listeners: Vec<ListenerStatus>,
    /// The canary being rolled out, if any.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub canary: Option<CanaryStatus>,
    /// Message figures, when `messages = true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<MessageTotals>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListenerStatus {
    pub name: String,
    pub address: String,
    pub policy: String,
    /// Why the policy is not the one asked for (`auto` that fell back to `shared`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub policy_note: Option<String>,
    /// Connections sockvisor accepted; `None` where the workers accept (shared, reuseport).
    pub accepted: Option<u64>,
    pub pending: u64,
}

/// Every reply: `{"ok":true,...}` or `{"ok":false,"error":"..."}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub status: Option<FleetStatus>,
    /// The workers a `signal` or `send` reached.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub workers: Option<Vec<WorkerTarget>>,
    /// `metrics`: the Prometheus text.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub metrics: Option<String>,
}

impl Reply {
    /// `{"ok":true}` with an optional message.
    pub fn ok(message: Option<String>) -> Reply {
        Reply {
            ok: true,
            error: None,
            message,
            status: None,
            workers: None,
            metrics: None,
        }
    }

    /// `{"ok":true,"metrics":"..."}`
    pub fn with_metrics(text: String) -> Reply {
        Reply {
            metrics: Some(text),
            ..Reply::ok(None)
        }
    }

    /// `{"ok":false,"error":...}`
    pub fn error(error: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            error: Some(error.into()),
            message: None,
            status: None,
            workers: None,
            metrics: None,
        }
    }

    /// `{"ok":true,"status":{...}}`
    pub fn with_status(status: FleetStatus) -> Reply {
        Reply {
            ok: true,
            error: None,
            message: None,
            status: Some(status),
            metrics: None,
            workers: None,
        }
    }

    /// `{"ok":true,"message":...,"workers":[...]}`
    pub fn with_workers(message: String, workers: Vec<WorkerTarget>) -> Reply {
        Reply {
            workers: Some(workers),
            ..Reply::ok(Some(message))
        }
    }

    /// The reply as one line, newline included. Never fails (an encoding error, which these
    /// types cannot produce, becomes an error reply).
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_else(|e| {
            log::warn!("cannot encode a control reply: {e}");
            br#"{"ok":false,"error":"internal error: cannot encode the reply"}"#.to_vec()
        });
        line.push(b'\n');
        line
    }
}

/// One request line (without its newline), or the error message to send back.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    serde_json::from_slice::<Request>(line).map_err(|e| {
        format!(
            r#"bad request ({e}); expected one JSON object per line: {{"cmd":"status"}}, {{"cmd":"reload"}} ({{"cmd":"reload","canary":N}}), {{"cmd":"scale","workers":N}}, {{"cmd":"signal","signal":"SIGUSR1"}}, {{"cmd":"send","payload":"..."}}, {{"cmd":"messages","follow":true}} or {{"cmd":"metrics"}}; docs/control.md"#
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shapes() {
        assert_eq!(
            serde_json::to_string(&Request::Scale { workers: 4 }).unwrap(),
            r#"{"cmd":"scale","workers":4}"#
        );
        assert_eq!(
            Reply::error("x").to_line(),
            b"{\"ok\":false,\"error\":\"x\"}\n"
        );
        assert_eq!(Reply::ok(None).to_line(), b"{\"ok\":true}\n");
        assert_eq!(parse_request(br#"{"cmd":"reload"}"#), Ok(Request::RELOAD));
        assert_eq!(
            parse_request(br#"{"cmd":"reload","canary":2}"#),
            Ok(Request::Reload { canary: Some(2) })
        );
        assert_eq!(
            serde_json::to_string(&Request::RELOAD).unwrap(),
            r#"{"cmd":"reload"}"#
        );
        let e = parse_request(b"status").unwrap_err();
        assert!(
            e.starts_with("bad request") && e.contains(r#"{"cmd":"status"}"#),
            "{e}"
        );
    }
}
