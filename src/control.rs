//! The control socket (`sockvisor status | reload | scale N`): a unix stream socket,
//! mode 0600, peer credentials checked (root or sockvisor's own uid). One JSON request and
//! one JSON reply per line (docs/control.md).
//!
//! SKELETON: signatures are the contract used by the supervisor and `main`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Reload,
    Scale { workers: usize },
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
}

/// `status` reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetStatus {
    pub pid: i32,
    pub generation: u64,
    /// starting | running | reloading | stopping
    pub state: String,
    pub workers_wanted: usize,
    pub summary: String,
    pub workers: Vec<WorkerStatus>,
    pub listeners: Vec<ListenerStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListenerStatus {
    pub name: String,
    pub address: String,
    pub policy: String,
    pub accepted: u64,
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
}

/// SKELETON stub.
pub fn request(
    path: &std::path::Path,
    req: &Request,
    timeout: std::time::Duration,
) -> Result<Reply, String> {
    let _ = (path, req, timeout);
    todo!()
}

/// SKELETON stub.
pub fn format_status_table(status: &FleetStatus) -> String {
    let _ = status;
    todo!()
}
