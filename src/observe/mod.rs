//! Observability for operators and orchestrators: Prometheus metrics, health probes.
//!
//! - [`metrics`]: the series, from a [`metrics::Snapshot`] of the fleet and the supervisor's
//!   [`metrics::Tally`], encoded with `prometheus-client`;
//! - [`http`]: a small non-blocking HTTP server for the supervisor's loop (`metrics_listen`):
//!   `GET /metrics`, `/livez`, `/readyz`;
//! - [`probes`]: the readiness rule shared by `/readyz` and `sockvisor status --check`;
//! - [`process`]: figures of a process from /proc (sockvisor's own, a worker's RSS).
//!
//! The supervisor owns all of it; its side is src/supervisor/observe.rs.

pub mod http;
pub mod metrics;
pub mod probes;
pub mod process;
