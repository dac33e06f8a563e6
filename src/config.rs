//! Configuration: TOML file < `SOCKVISOR_*` environment < command line, validated into one
//! [`Config`]. Every error names the file, the line and the key, and says how to fix it;
//! `main` exits with [`crate::exit::CONFIG`] on any of them.
//!
//! SKELETON: types are the contract used by the rest of the crate; `load` is to be written.

use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Where a configuration comes from: kept by the supervisor so that a reload re-reads the
/// file with the same arguments and the environment as it was at start.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// Command-line arguments without argv[0].
    pub args: Vec<OsString>,
    /// The process environment at start (only `SOCKVISOR_*` keys matter).
    pub env: Vec<(String, String)>,
}

impl Sources {
    pub fn from_process() -> Sources {
        Sources {
            args: std::env::args_os().skip(1).collect(),
            env: std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect(),
        }
    }
}

/// What the command line asks for.
#[derive(Debug, Clone)]
pub enum Invocation {
    /// Run a fleet.
    Run(Box<Config>),
    /// `sockvisor status [--json]`
    Status { control: PathBuf, json: bool },
    /// `sockvisor reload`
    Reload { control: PathBuf },
    /// `sockvisor scale N`
    Scale { control: PathBuf, workers: usize },
    /// `--help`: the text to print.
    Help(String),
    /// `--version`
    Version,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadyMode {
    /// A worker is ready as soon as it has been exec'd.
    Exec,
    /// A worker is ready at its `READY=1`.
    Notify,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DispatchPolicy {
    /// sockvisor accepts and hands connections out in turn (TCP and unix stream default).
    RoundRobin,
    /// Workers accept on the listening socket themselves (always the case for datagrams).
    Shared,
    /// The same client address goes to the same worker slot.
    IpHash,
    /// The worker with the fewest open connections.
    LeastConnections,
}

impl DispatchPolicy {
    pub fn name(self) -> &'static str {
        match self {
            DispatchPolicy::RoundRobin => "round-robin",
            DispatchPolicy::Shared => "shared",
            DispatchPolicy::IpHash => "ip-hash",
            DispatchPolicy::LeastConnections => "least-connections",
        }
    }
}

/// A listener's address, parsed from `tcp://HOST:PORT`, `udp://HOST:PORT` or `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Udp(SocketAddr),
    /// A unix stream socket at a path.
    Unix(PathBuf),
}

impl ListenAddr {
    pub fn is_stream(&self) -> bool {
        !matches!(self, ListenAddr::Udp(_))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "tcp://{a}"),
            ListenAddr::Udp(a) => write!(f, "udp://{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSpec {
    /// The name workers see in `LISTEN_FDNAMES`, and the `FileDescriptorName=` systemd
    /// must pass it under.
    pub name: String,
    /// Where to bind when not socket-activated. `None`: only valid under systemd.
    pub addr: Option<ListenAddr>,
    /// Resolved policy (UDP: always `Shared`).
    pub policy: DispatchPolicy,
}

/// Restart backoff per slot: `initial * 2^(n-1)` capped at `max`, reset once a worker has
/// stayed up `reset_after`. The fleet gives up when every slot has failed `give_up_after`
/// times in a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub reset_after: Duration,
    pub give_up_after: u32,
}

/// The resolved configuration of a fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file it came from, if any.
    pub file: Option<PathBuf>,
    pub command: Vec<String>,
    pub workers: usize,
    pub listeners: Vec<ListenerSpec>,
    pub ready: ReadyMode,
    pub ready_timeout: Duration,
    pub stop_timeout: Duration,
    pub backoff: Backoff,
    /// Worker exit codes that mean "do not restart" (e.g. the app's own bad-config code).
    pub fatal_exit_codes: Vec<i32>,
    pub user: Option<String>,
    pub group: Option<String>,
    /// `WATCHDOG_USEC` given to each worker.
    pub worker_watchdog: Option<Duration>,
    /// Ready workers needed before `READY=1` upstream (default: all).
    pub min_ready: Option<usize>,
    /// Ready workers needed for `WATCHDOG=1` upstream.
    pub min_healthy: usize,
    /// How long the fleet may have fewer than `min_healthy` before `WATCHDOG=trigger`.
    pub unhealthy_grace: Duration,
    /// Connections that may wait in one worker's channel.
    pub window: usize,
    /// A worker whose channel queue does not move for this long is wedged.
    pub wedged_after: Duration,
    /// Extra workers a reload may run at once.
    pub reload_surge: usize,
    /// How long a new generation has to become ready before it is rolled back.
    pub reload_timeout: Duration,
    pub control_socket: Option<PathBuf>,
    pub runtime_dir: Option<PathBuf>,
}

/// A configuration or usage error. Its `Display` is the whole message the user sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: Option<PathBuf>,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub message: String,
    pub fix: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => write!(f, "{}:{}: ", file.display(), line)?,
            (Some(file), None) => write!(f, "{}: ", file.display())?,
            _ => {}
        }
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        write!(f, "{}", self.message)?;
        if let Some(fix) = &self.fix {
            write!(f, " ({fix})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Parse the command line, environment and config file into an [`Invocation`].
pub fn load(_sources: &Sources) -> Result<Invocation, ConfigError> {
    todo!("config helper")
}
