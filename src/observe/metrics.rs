//! The Prometheus series (docs/metrics.md lists them all, and a test holds it to this file).
//!
//! Two halves: [`Tally`] holds what only events can tell (why workers ended, reload
//! results, readiness times, connections dispatched to workers that are gone); it lives in
//! the supervisor and is told as things happen. [`Snapshot`] is everything at one instant,
//! built by the supervisor for each scrape from its own state, the dispatch figures and the
//! tally; [`render`] turns it into the Prometheus text format (0.0.4) or OpenMetrics with
//! the `prometheus-client` crate. Nothing here is shared with another thread: a scrape is
//! answered by the loop, from a registry built for that scrape.

use super::http::HttpFigures;
use super::process::ProcessFigures;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// Why a worker's slot got a new worker: the `reason` of `sockvisor_worker_restarts_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EndReason {
    /// It exited on its own (any status, or `STOPPING=1` then 0).
    Exit,
    /// A signal sockvisor did not send killed it (not an OOM kill).
    Signal,
    /// Its watchdog expired (or it sent `WATCHDOG=trigger`).
    Watchdog,
    /// Its connections did not move for `wedged_after`.
    Wedged,
    /// It was not ready within `ready_timeout`.
    ReadyTimeout,
    /// The kernel's OOM killer killed it.
    Oom,
    /// Recycled: its RSS passed `worker_memory_max`.
    Memory,
    /// Its channel broke (channel policies).
    Channel,
    /// It failed `health_check_fails` active health checks in a row.
    HealthCheck,
}

impl EndReason {
    pub const ALL: [EndReason; 9] = [
        EndReason::Exit,
        EndReason::Signal,
        EndReason::Watchdog,
        EndReason::Wedged,
        EndReason::ReadyTimeout,
        EndReason::Oom,
        EndReason::Memory,
        EndReason::Channel,
        EndReason::HealthCheck,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Exit => "exit",
            EndReason::Signal => "signal",
            EndReason::Watchdog => "watchdog",
            EndReason::Wedged => "wedged",
            EndReason::ReadyTimeout => "ready_timeout",
            EndReason::Oom => "oom",
            EndReason::Memory => "memory",
            EndReason::Channel => "channel",
            EndReason::HealthCheck => "health_check",
        }
    }
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a reload ended: the `result` of `sockvisor_reloads_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ReloadResult {
    /// The new generation serves.
    Ok,
    /// The new generation failed; the old one was kept.
    RolledBack,
    /// Refused before anything started (a broken config, changed listeners).
    Refused,
}

impl ReloadResult {
    pub const ALL: [ReloadResult; 3] = [
        ReloadResult::Ok,
        ReloadResult::RolledBack,
        ReloadResult::Refused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ReloadResult::Ok => "ok",
            ReloadResult::RolledBack => "rolled_back",
            ReloadResult::Refused => "refused",
        }
    }
}

/// Buckets of `sockvisor_worker_ready_seconds`: 5 ms to about 82 s.
fn ready_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 15)
}

/// What the supervisor counts as it happens (see the module docs).
#[derive(Debug)]
pub struct Tally {
    restarts: BTreeMap<(usize, EndReason), u64>,
    /// The last end of each slot's worker, for `status`: `oom (killed by SIGKILL)`.
    last_end: BTreeMap<usize, String>,
    reloads: BTreeMap<ReloadResult, u64>,
    ready_seconds: Histogram,
    /// Connections dispatched to workers that are gone, by slot.
    dispatched_gone: BTreeMap<usize, u64>,
}

impl Default for Tally {
    fn default() -> Tally {
        Tally {
            restarts: BTreeMap::new(),
            last_end: BTreeMap::new(),
            reloads: BTreeMap::new(),
            ready_seconds: Histogram::new(ready_buckets()),
            dispatched_gone: BTreeMap::new(),
        }
    }
}

impl Tally {
    /// `slot` gets a new worker because its last one ended for `reason` (`how`: the exit as
    /// the log says it).
    pub fn restarted(&mut self, slot: usize, reason: EndReason, how: &str) {
        *self.restarts.entry((slot, reason)).or_default() += 1;
        self.last_end.insert(slot, format!("{reason} ({how})"));
    }

    pub fn reloaded(&mut self, result: ReloadResult) {
        *self.reloads.entry(result).or_default() += 1;
    }

    /// A worker got ready `after` its start.
    pub fn worker_ready(&mut self, after: Duration) {
        self.ready_seconds.observe(after.as_secs_f64());
    }

    /// A worker of `slot` is gone, after `dispatched` connections.
    pub fn worker_gone(&mut self, slot: usize, dispatched: u64) {
        *self.dispatched_gone.entry(slot).or_default() += dispatched;
    }

    pub fn last_end(&self, slot: usize) -> Option<&str> {
        self.last_end.get(&slot).map(String::as_str)
    }

    pub fn restarts(&self, slot: usize, reason: EndReason) -> u64 {
        self.restarts.get(&(slot, reason)).copied().unwrap_or(0)
    }

    pub fn dispatched_gone(&self, slot: usize) -> u64 {
        self.dispatched_gone.get(&slot).copied().unwrap_or(0)
    }
}

/// One slot at a scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlotSnapshot {
    /// Its current worker is ready.
    pub up: bool,
    /// Connections dispatched to the slot's workers, gone ones included (`None`: the
    /// policy does not count them, `shared`).
    pub dispatched: Option<u64>,
    pub queued: Option<u64>,
    pub open: Option<u64>,
    pub resident_bytes: Option<u64>,
    /// By reason, every reason present.
    pub restarts: Vec<(EndReason, u64)>,
}

/// One listener at a scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ListenerSnapshot {
    pub name: String,
    /// Connections accepted (sockvisor accepts) or steered by the reuseport program; `None`
    /// where nobody counts them (`shared`, datagrams).
    pub accepted: Option<u64>,
    pub pending: u64,
    pub reclaimed: u64,
}

/// The upstream (systemd) watchdog at a scrape.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WatchdogSnapshot {
    /// `None`: systemd asked for no watchdog.
    pub interval: Option<Duration>,
    /// Pings are withheld: fewer than `min_healthy` healthy workers.
    pub withheld: bool,
    /// `WATCHDOG=trigger` was sent for the current unhealthy period.
    pub triggered: bool,
}

/// The fleet's states of `sockvisor_state`.
pub const FLEET_STATES: [&str; 5] = ["starting", "running", "reloading", "draining", "stopping"];
/// The worker states of `sockvisor_workers`.
pub const WORKER_STATES: [&str; 4] = ["starting", "ready", "draining", "stopping"];

/// Everything at one instant (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub generation: u64,
    /// One of [`FLEET_STATES`].
    pub state: &'static str,
    /// What `/readyz` answers.
    pub ready: bool,
    pub workers_wanted: usize,
    /// Live workers by [`WORKER_STATES`] name.
    pub workers: BTreeMap<&'static str, u64>,
    pub healthy_workers: usize,
    pub min_healthy: usize,
    pub slots: Vec<SlotSnapshot>,
    pub listeners: Vec<ListenerSnapshot>,
    pub reloads: Vec<(ReloadResult, u64)>,
    pub ready_seconds: Option<Histogram>,
    pub watchdog: WatchdogSnapshot,
    pub http: Option<HttpFigures>,
    pub process: ProcessFigures,
}

impl Snapshot {
    /// The tally's part of a snapshot: restarts by slot and reason, reload results, the
    /// readiness histogram. `slots` must be filled first.
    pub fn add_tally(&mut self, tally: &Tally) {
        for (slot, s) in self.slots.iter_mut().enumerate() {
            s.restarts = EndReason::ALL
                .iter()
                .map(|&r| (r, tally.restarts(slot, r)))
                .collect();
        }
        self.reloads = ReloadResult::ALL
            .iter()
            .map(|&r| (r, tally.reloads.get(&r).copied().unwrap_or(0)))
            .collect();
        self.ready_seconds = Some(tally.ready_seconds.clone());
    }
}

type Labels = Vec<(&'static str, String)>;

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|&(k, v)| (k, v.to_string())).collect()
}

/// Write one metric family: a descriptor, then one sample per label set.
fn family<M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    series: Vec<(Labels, M)>,
) -> fmt::Result {
    if series.is_empty() {
        return Ok(());
    }
    let mut me = enc.encode_descriptor(name, help, None, kind)?;
    for (l, m) in &series {
        if l.is_empty() {
            m.encode(me.encode_family(&NoLabels)?)?;
        } else {
            m.encode(me.encode_family(l)?)?;
        }
    }
    Ok(())
}

/// An empty label set (prometheus-client writes no braces for it).
struct NoLabels;

impl prometheus_client::encoding::EncodeLabelSet for NoLabels {
    fn encode(&self, _encoder: &mut prometheus_client::encoding::LabelSetEncoder) -> fmt::Result {
        Ok(())
    }
}

fn gauge<N>(v: N) -> ConstGauge<N> {
    ConstGauge::new(v)
}

fn counter<N>(v: N) -> ConstCounter<N> {
    ConstCounter::new(v)
}

fn one<M>(m: M) -> Vec<(Labels, M)> {
    vec![(Vec::new(), m)]
}

/// The `sockvisor_*` series.
#[derive(Debug)]
struct FleetCollector(Snapshot);

impl Collector for FleetCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let s = &self.0;
        let e = &mut enc;
        family(
            e,
            "build_info",
            "sockvisor's version; always 1",
            MetricType::Gauge,
            vec![(
                labels(&[("version", env!("CARGO_PKG_VERSION"))]),
                gauge(1i64),
            )],
        )?;
        family(
            e,
            "generation",
            "The configuration generation serving (1 at start, +1 per reload)",
            MetricType::Gauge,
            one(gauge(s.generation as i64)),
        )?;
        family(
            e,
            "state",
            "The fleet's state: 1 for the current one",
            MetricType::Gauge,
            FLEET_STATES
                .iter()
                .map(|&st| (labels(&[("state", st)]), gauge(i64::from(s.state == st))))
                .collect(),
        )?;
        family(
            e,
            "ready",
            "1 when /readyz answers 200 (enough workers ready, not stopping or draining)",
            MetricType::Gauge,
            one(gauge(i64::from(s.ready))),
        )?;
        family(
            e,
            "workers_wanted",
            "Worker slots configured (workers, or the last scale)",
            MetricType::Gauge,
            one(gauge(s.workers_wanted as i64)),
        )?;
        family(
            e,
            "workers",
            "Live worker processes by state",
            MetricType::Gauge,
            WORKER_STATES
                .iter()
                .map(|&st| {
                    let n = s.workers.get(st).copied().unwrap_or(0);
                    (labels(&[("state", st)]), gauge(n as i64))
                })
                .collect(),
        )?;
        family(
            e,
            "healthy_workers",
            "Ready workers not overdue on their watchdog",
            MetricType::Gauge,
            one(gauge(s.healthy_workers as i64)),
        )?;
        family(
            e,
            "min_healthy_workers",
            "Healthy workers needed for the upstream watchdog pings (min_healthy)",
            MetricType::Gauge,
            one(gauge(s.min_healthy as i64)),
        )?;
        let slot = |i: usize| labels(&[("slot", &i.to_string())]);
        family(
            e,
            "worker_up",
            "1 when the slot's worker is ready",
            MetricType::Gauge,
            s.slots
                .iter()
                .enumerate()
                .map(|(i, w)| (slot(i), gauge(i64::from(w.up))))
                .collect(),
        )?;
        family(
            e,
            "worker_restarts",
            "Workers that took the slot over, by why the previous one ended",
            MetricType::Counter,
            s.slots
                .iter()
                .enumerate()
                .flat_map(|(i, w)| {
                    w.restarts.iter().map(move |&(r, n)| {
                        (
                            labels(&[("slot", &i.to_string()), ("reason", r.as_str())]),
                            counter(n),
                        )
                    })
                })
                .collect(),
        )?;
        let per_slot = |f: fn(&SlotSnapshot) -> Option<u64>| -> Vec<(Labels, u64)> {
            s.slots
                .iter()
                .enumerate()
                .filter_map(|(i, w)| f(w).map(|v| (slot(i), v)))
                .collect()
        };
        family(
            e,
            "worker_connections_dispatched",
            "Connections dispatched to the slot's workers (channel policies: handed over; reuseport: steered to its listener)",
            MetricType::Counter,
            per_slot(|w| w.dispatched)
                .into_iter()
                .map(|(l, v)| (l, counter(v)))
                .collect(),
        )?;
        family(
            e,
            "worker_connections_queued",
            "Connections waiting for the slot's worker to take them (its channel, or its listener's accept queue)",
            MetricType::Gauge,
            per_slot(|w| w.queued)
                .into_iter()
                .map(|(l, v)| (l, gauge(v as i64)))
                .collect(),
        )?;
        family(
            e,
            "worker_connections_open",
            "Connections the slot's worker holds open (workers that send close reports)",
            MetricType::Gauge,
            per_slot(|w| w.open)
                .into_iter()
                .map(|(l, v)| (l, gauge(v as i64)))
                .collect(),
        )?;
        family(
            e,
            "worker_resident_memory_bytes",
            "Resident memory (RSS) of the slot's worker process",
            MetricType::Gauge,
            per_slot(|w| w.resident_bytes)
                .into_iter()
                .map(|(l, v)| (l, gauge(v as i64)))
                .collect(),
        )?;
        if let Some(h) = &s.ready_seconds {
            let mut me = e.encode_descriptor(
                "worker_ready_seconds",
                "Time from a worker's start to its readiness",
                None,
                MetricType::Histogram,
            )?;
            h.encode(me.encode_family(&NoLabels)?)?;
        }
        let listener = |name: &str| labels(&[("listener", name)]);
        family(
            e,
            "connections_accepted",
            "New connections on the listener: accepted by sockvisor (channel policies), or steered to a worker by the reuseport program",
            MetricType::Counter,
            s.listeners
                .iter()
                .filter_map(|l| l.accepted.map(|a| (listener(&l.name), counter(a))))
                .collect(),
        )?;
        family(
            e,
            "connections_pending",
            "Connections waiting for any worker (accepted and held by sockvisor, or queued on the reuseport anchor)",
            MetricType::Gauge,
            s.listeners
                .iter()
                .map(|l| (listener(&l.name), gauge(l.pending as i64)))
                .collect(),
        )?;
        family(
            e,
            "connections_reclaimed",
            "Connections taken back from workers that left or died and given to others",
            MetricType::Counter,
            s.listeners
                .iter()
                .map(|l| (listener(&l.name), counter(l.reclaimed)))
                .collect(),
        )?;
        family(
            e,
            "reloads",
            "Reloads by result",
            MetricType::Counter,
            s.reloads
                .iter()
                .map(|&(r, n)| (labels(&[("result", r.as_str())]), counter(n)))
                .collect(),
        )?;
        family(
            e,
            "upstream_watchdog_interval_seconds",
            "The watchdog interval systemd asked for (WATCHDOG_USEC); 0: none",
            MetricType::Gauge,
            one(gauge(s.watchdog.interval.map_or(0.0, |d| d.as_secs_f64()))),
        )?;
        family(
            e,
            "upstream_watchdog_withheld",
            "1 while watchdog pings are withheld (fewer than min_healthy healthy workers)",
            MetricType::Gauge,
            one(gauge(i64::from(s.watchdog.withheld))),
        )?;
        family(
            e,
            "upstream_watchdog_triggered",
            "1 once WATCHDOG=trigger was sent for the current unhealthy period",
            MetricType::Gauge,
            one(gauge(i64::from(s.watchdog.triggered))),
        )?;
        if let Some(h) = &s.http {
            family(
                e,
                "http_requests",
                "Requests answered by the metrics listener",
                MetricType::Counter,
                one(counter(h.answered)),
            )?;
            family(
                e,
                "http_connections_dropped",
                "Metrics listener connections closed without an answer (over_limit, timeout) or answered with an error (bad_request)",
                MetricType::Counter,
                vec![
                    (labels(&[("reason", "over_limit")]), counter(h.over_limit)),
                    (labels(&[("reason", "timeout")]), counter(h.timed_out)),
                    (labels(&[("reason", "bad_request")]), counter(h.bad_requests)),
                ],
            )?;
        }
        Ok(())
    }
}

/// The standard `process_*` series of sockvisor itself.
#[derive(Debug)]
struct ProcessCollector(ProcessFigures);

impl Collector for ProcessCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let p = &self.0;
        let e = &mut enc;
        family(
            e,
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            MetricType::Counter,
            one(counter(p.cpu_seconds)),
        )?;
        family(
            e,
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            MetricType::Gauge,
            one(gauge(p.resident_bytes as i64)),
        )?;
        family(
            e,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            MetricType::Gauge,
            one(gauge(p.virtual_bytes as i64)),
        )?;
        family(
            e,
            "process_open_fds",
            "Number of open file descriptors",
            MetricType::Gauge,
            one(gauge(p.open_fds as i64)),
        )?;
        family(
            e,
            "process_max_fds",
            "Maximum number of open file descriptors",
            MetricType::Gauge,
            one(gauge(p.max_fds as i64)),
        )?;
        family(
            e,
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds",
            MetricType::Gauge,
            one(gauge(p.start_time_seconds)),
        )
    }
}

/// `Content-Type` of [`render`]'s output.
pub fn content_type(openmetrics: bool) -> &'static str {
    if openmetrics {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else {
        prometheus_client::encoding::prometheus_text::CONTENT_TYPE
    }
}

/// The exposition of `snapshot`: OpenMetrics, or the Prometheus text format 0.0.4.
pub fn render(snapshot: Snapshot, openmetrics: bool) -> String {
    let process = snapshot.process;
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ProcessCollector(process)));
    registry
        .sub_registry_with_prefix("sockvisor")
        .register_collector(Box::new(FleetCollector(snapshot)));
    let mut out = String::new();
    let result = if openmetrics {
        prometheus_client::encoding::text::encode(&mut out, &registry)
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
    };
    if let Err(e) = result {
        // Writing to a String does not fail; a label the encoder refuses would.
        log::warn!("cannot encode the metrics: {e}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        let mut tally = Tally::default();
        tally.restarted(1, EndReason::Oom, "killed by SIGKILL");
        tally.reloaded(ReloadResult::Ok);
        tally.worker_ready(Duration::from_millis(30));
        let mut s = Snapshot {
            generation: 2,
            state: "running",
            ready: true,
            workers_wanted: 2,
            slots: vec![
                SlotSnapshot {
                    up: true,
                    dispatched: Some(5),
                    queued: Some(0),
                    ..SlotSnapshot::default()
                },
                SlotSnapshot::default(),
            ],
            listeners: vec![ListenerSnapshot {
                name: "web".into(),
                accepted: Some(7),
                pending: 1,
                reclaimed: 0,
            }],
            http: Some(HttpFigures::default()),
            ..Snapshot::default()
        };
        s.workers.insert("ready", 2);
        s.add_tally(&tally);
        s
    }

    #[test]
    fn prometheus_text() {
        let text = render(sample(), false);
        for line in [
            "# TYPE sockvisor_connections_accepted_total counter",
            "sockvisor_connections_accepted_total{listener=\"web\"} 7",
            "sockvisor_worker_restarts_total{slot=\"1\",reason=\"oom\"} 1",
            "sockvisor_worker_restarts_total{slot=\"0\",reason=\"exit\"} 0",
            "sockvisor_reloads_total{result=\"ok\"} 1",
            "sockvisor_state{state=\"running\"} 1",
            "sockvisor_state{state=\"draining\"} 0",
            "sockvisor_workers{state=\"ready\"} 2",
            "sockvisor_generation 2",
            "sockvisor_worker_ready_seconds_count 1",
            "sockvisor_worker_connections_dispatched_total{slot=\"0\"} 5",
            "# TYPE process_cpu_seconds_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} not in:\n{text}");
        }
        assert!(!text.contains("# EOF"));
        // slot 1 has no dispatch figures: no series for it
        assert!(!text.contains("dispatched_total{slot=\"1\"}"));
    }

    #[test]
    fn openmetrics_text() {
        let text = render(sample(), true);
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(text.contains("# TYPE sockvisor_connections_accepted counter"));
        assert!(text.contains("sockvisor_connections_accepted_total{listener=\"web\"} 7"));
    }
}
