//! Configuration: TOML file < `SOCKVISOR_*` environment < command line, validated into one
//! [`Config`]. Every error names the file, the line and the key, and says how to fix it;
//! `main` exits with [`crate::exit::CONFIG`] on any of them.
//!
//! One key, from the file to [`Config`]: its row in `keys` (name, variable, flag, kind,
//! default, help and doc lines) -> `layers` (file, environment) and `cli` parse it with the
//! `values` parser its kind picks -> the layers are overlaid -> `resolve` reads it into its
//! `Config` field. `help` prints `--help` and the reference table of docs/config.md from
//! the same rows.

mod cli;
mod help;
mod keys;
mod layers;
mod resolve;
#[cfg(test)]
mod tests;
mod values;

pub use help::{help_text, reference_table};
pub use resolve::{check_worker_count, max_workers, WORKERS_CEILING};
pub use values::{check_listener_name, parse_duration, parse_listen};

use cli::{parse_cli, Sub};
use layers::{env_get, env_layer, file_layer, Layer};
use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where a configuration comes from: kept by the supervisor so that a reload re-reads the
/// file with the same arguments and the environment as it was at start.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// Command-line arguments without `argv[0]`.
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
    /// `sockvisor status [NAME] [--json] [--check]`
    Status {
        target: Target,
        json: bool,
        check: bool,
    },
    /// `sockvisor reload [NAME] [--canary N]`
    Reload {
        target: Target,
        canary: Option<usize>,
    },
    /// `sockvisor scale [NAME] N`
    Scale { target: Target, workers: usize },
    /// `sockvisor signal [NAME] SIGNAL [--slot N] [--generation G]` (the signal checked)
    Signal {
        target: Target,
        signal: String,
        slot: Option<usize>,
        generation: Option<u64>,
    },
    /// `sockvisor send [NAME] [--slot N] PAYLOAD`
    Send {
        target: Target,
        slot: Option<usize>,
        payload: String,
    },
    /// `sockvisor messages [NAME] --follow [--json]`
    Messages { target: Target, json: bool },
    /// `sockvisor metrics [NAME]`
    Metrics { target: Target },
    /// `--help`: the text to print.
    Help(String),
    /// `--version`
    Version,
}

/// The fleet a client command talks to (`control::locate` finds its socket).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The control socket the daemon would use with the same settings.
    pub control: PathBuf,
    /// `control` was named (`--control`, `control_socket`, `runtime_dir`, a config file,
    /// `$RUNTIME_DIRECTORY`): use it as it is.
    pub explicit: bool,
    /// `sockvisor status NAME`: a unit or fleet name to look for.
    pub name: Option<String>,
    /// `$XDG_RUNTIME_DIR`, where user units' runtime directories are.
    pub xdg_runtime_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyAccess {
    /// The worker's own pid only (systemd's `NotifyAccess=main`).
    Main,
    /// Also any process descended from the worker (`NotifyAccess=all`).
    All,
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
    /// The default: `reuseport` where it can run, else `shared` (decided per listener at
    /// start, with the reason in the log and in `status`). Any program serves.
    Auto,
    /// Each worker gets its own `SO_REUSEPORT` listener (or UDP socket) and an eBPF program
    /// picks the next ready worker for each connection (each UDP flow). Any program serves.
    Reuseport,
    /// Workers accept on the listening socket themselves; the kernel picks who wakes up.
    Shared,
    /// sockvisor accepts and hands connections out in turn over each worker's channel
    /// (workers that speak the channel protocol).
    RoundRobin,
    /// The same client address goes to the same worker slot.
    IpHash,
    /// The worker with the fewest open connections.
    LeastConnections,
}

impl DispatchPolicy {
    pub fn name(self) -> &'static str {
        match self {
            DispatchPolicy::Auto => "auto",
            DispatchPolicy::Reuseport => "reuseport",
            DispatchPolicy::RoundRobin => "round-robin",
            DispatchPolicy::Shared => "shared",
            DispatchPolicy::IpHash => "ip-hash",
            DispatchPolicy::LeastConnections => "least-connections",
        }
    }

    /// sockvisor accepts and hands connections over channels: the workers must speak the
    /// channel protocol (docs/protocol.md).
    pub fn uses_channels(self) -> bool {
        matches!(
            self,
            DispatchPolicy::RoundRobin | DispatchPolicy::IpHash | DispatchPolicy::LeastConnections
        )
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

/// How a reload starts with canary workers (docs/canary.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanaryConfig {
    /// Canary workers a reload starts with (0: a plain reload).
    pub workers: usize,
    /// Their share of new connections together, per mille; `None`: by weight.
    pub share_permille: Option<u32>,
    /// The share is by client address buckets rather than by weight.
    pub by_client: bool,
    /// How long the ready canary serves before it is promoted.
    pub observe: Duration,
}

/// What an active health check sends and expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// The connection is made.
    Tcp,
    /// This request line is answered with this status.
    Http { request: String, status: u16 },
}

/// Active health checks (docs/health.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub kind: CheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive passes that put a worker back in the rotation.
    pub passes: u32,
    /// Consecutive failures that replace it.
    pub fails: u32,
}

/// The resolved configuration of a fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file it came from, if any.
    pub file: Option<PathBuf>,
    pub command: Vec<String>,
    pub workers: usize,
    /// `workers = "auto"` (the default): what the count was worked out from, for the log.
    pub workers_auto: Option<String>,
    pub listeners: Vec<ListenerSpec>,
    /// The global `dispatch` policy: the default for stream listeners, and the policy
    /// [`crate::activation::listeners`] gives systemd-passed stream sockets when no listener
    /// is configured.
    pub dispatch: DispatchPolicy,
    pub ready: ReadyMode,
    /// Whose notifications count for a worker.
    pub notify_access: NotifyAccess,
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
    /// Weight of this generation's workers in (smooth weighted) round robin.
    pub weight: u32,
    /// Canary rollouts: how many, what share, for how long.
    pub canary: CanaryConfig,
    /// Active health checks of each worker (`None`: off).
    pub health_check: Option<HealthCheck>,
    /// On SIGTERM: `/readyz` fails and the fleet serves this long before it stops.
    pub drain_delay: Duration,
    /// A worker whose RSS passes this many bytes is recycled.
    pub worker_memory_max: Option<u64>,
    /// Where to serve `/metrics`, `/livez` and `/readyz` over HTTP.
    pub metrics_listen: Option<SocketAddr>,
    pub control_socket: Option<PathBuf>,
    /// `control_socket` was given (not derived): failing to bind it is an error.
    pub control_socket_explicit: bool,
    pub runtime_dir: Option<PathBuf>,
    /// Give each worker a message socket (`SOCKVISOR_MESSAGES_FD`, docs/messages.md).
    pub messages: bool,
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

/// Where the control socket is, found the same way by the daemon and by the client commands:
/// 1. an explicit path (`control_socket`, `--control`, `SOCKVISOR_CONTROL_SOCKET`);
/// 2. `runtime_dir` (`SOCKVISOR_RUNTIME_DIR`) + `/control.sock`;
/// 3. `$RUNTIME_DIRECTORY` (its first entry; set by systemd's `RuntimeDirectory=`) + `/control.sock`;
/// 4. as root: `/run/sockvisor/<instance>.sock`;
/// 5. `$XDG_RUNTIME_DIR/sockvisor/<instance>.sock`;
/// 6. `/tmp/sockvisor-<uid>/<instance>.sock`,
///
/// where `<instance>` is the config file's stem (`/etc/sockvisor/app.toml` → `app`) or
/// `sockvisor`. `env` is the environment to read (`Sources::env`).
pub fn control_socket_path(
    config_control: Option<&Path>,
    runtime_dir: Option<&Path>,
    config_file: Option<&Path>,
    env: &[(String, String)],
) -> PathBuf {
    if let Some(p) = config_control {
        return p.to_path_buf();
    }
    if let Some(d) = runtime_dir {
        return d.join("control.sock");
    }
    if let Some(first) =
        env_get(env, "RUNTIME_DIRECTORY").and_then(|v| v.split(':').find(|s| !s.is_empty()))
    {
        return Path::new(first).join("control.sock");
    }
    let instance = config_file
        .and_then(|f| f.file_stem())
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty())
        .unwrap_or("sockvisor");
    let sock = format!("{instance}.sock");
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        return Path::new("/run/sockvisor").join(sock);
    }
    if let Some(x) = env_get(env, "XDG_RUNTIME_DIR").filter(|s| s.starts_with('/')) {
        return Path::new(x).join("sockvisor").join(sock);
    }
    PathBuf::from(format!("/tmp/sockvisor-{uid}")).join(sock)
}

// ---------------------------------------------------------------------------------------------
// load
// ---------------------------------------------------------------------------------------------

/// `sockvisor <version>`, printed by `--version`.
pub fn version_text() -> String {
    format!("sockvisor {}", env!("CARGO_PKG_VERSION"))
}

fn read_file_layer(path: &Path) -> Result<Layer, ConfigError> {
    let src = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: Some(path.to_path_buf()),
        line: None,
        key: None,
        message: format!("cannot read the config file: {}", io_reason(&e)),
        fix: Some("check the path given by -c/--config or SOCKVISOR_CONFIG".into()),
    })?;
    file_layer(path, &src)
}

/// An I/O error's reason without std's " (os error N)" tail, which would put a second
/// parenthesis before the fix.
fn io_reason(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => nix::errno::Errno::from_raw(n).desc().to_string(),
        None => e.to_string(),
    }
}

/// Parse the command line, environment and config file into an [`Invocation`].
///
/// Layers: TOML file < `SOCKVISOR_*` environment < command line. A list (`listen`,
/// `fatal_exit_codes`, `command`) set in a higher layer replaces the lower one's entirely.
pub fn load(sources: &Sources) -> Result<Invocation, ConfigError> {
    load_with(sources, read_file_layer)
}

/// [`load`], with `file_text` standing in for the contents of whatever config file the
/// sources name (`-c FILE` or `SOCKVISOR_CONFIG`); nothing is read from disk. For the fuzz
/// targets (fuzz/) and tests: the same code path as [`load`] after the file is read.
pub fn load_str(sources: &Sources, file_text: &str) -> Result<Invocation, ConfigError> {
    load_with(sources, |path| file_layer(path, file_text))
}

fn load_with(
    sources: &Sources,
    read_file: impl FnOnce(&Path) -> Result<Layer, ConfigError>,
) -> Result<Invocation, ConfigError> {
    let cli = parse_cli(&sources.args)?;
    if cli.help {
        return Ok(Invocation::Help(help_text()));
    }
    if cli.version {
        return Ok(Invocation::Version);
    }
    let env = &sources.env;
    let file = cli.config.clone().or_else(|| {
        env_get(env, keys::CONFIG_FILE.env)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    });
    let file_layer = match &file {
        Some(path) => read_file(path)?,
        None => Layer::default(),
    };
    let layer = file_layer.overlay(env_layer(env)?).overlay(cli.layer);
    let control = control_socket_path(
        layer.get::<PathBuf>("control_socket").as_deref(),
        layer.get::<PathBuf>("runtime_dir").as_deref(),
        file.as_deref(),
        env,
    );
    let target = || Target {
        control: control.clone(),
        explicit: layer.is_set("control_socket")
            || layer.is_set("runtime_dir")
            || file.is_some()
            || env_get(env, "RUNTIME_DIRECTORY").is_some_and(|v| !v.is_empty()),
        name: cli.fleet.clone(),
        xdg_runtime_dir: env_get(env, "XDG_RUNTIME_DIR")
            .filter(|s| s.starts_with('/'))
            .map(PathBuf::from),
    };
    match cli.sub {
        Some(Sub::Status { json, check }) => {
            return Ok(Invocation::Status {
                target: target(),
                json,
                check,
            })
        }
        Some(Sub::Reload { canary }) => {
            return Ok(Invocation::Reload {
                target: target(),
                canary,
            })
        }
        Some(Sub::Scale { workers }) => {
            return Ok(Invocation::Scale {
                target: target(),
                workers,
            })
        }
        Some(Sub::Signal {
            signal,
            slot,
            generation,
        }) => {
            return Ok(Invocation::Signal {
                target: target(),
                signal,
                slot,
                generation,
            })
        }
        Some(Sub::Send { slot, payload }) => {
            return Ok(Invocation::Send {
                target: target(),
                slot,
                payload,
            })
        }
        Some(Sub::Messages { json }) => {
            return Ok(Invocation::Messages {
                target: target(),
                json,
            })
        }
        Some(Sub::Metrics) => return Ok(Invocation::Metrics { target: target() }),
        None => {}
    }
    resolve::resolve(layer, file, control).map(|c| Invocation::Run(Box::new(c)))
}
