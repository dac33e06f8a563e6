//! Configuration: TOML file < `SOCKVISOR_*` environment < command line, validated into one
//! [`Config`]. Every error names the file, the line and the key, and says how to fix it;
//! `main` exits with [`crate::exit::CONFIG`] on any of them.
//!
//! The keys, their environment variables, flags and defaults are documented in `docs/config.md`
//! and in [`help_text`] (from which the man page is generated).

use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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
    /// The global `dispatch` policy: the default for stream listeners, and the policy
    /// [`crate::activation::listeners`] gives systemd-passed stream sockets when no listener
    /// is configured.
    pub dispatch: DispatchPolicy,
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
    /// `control_socket` was given (not derived): failing to bind it is an error.
    pub control_socket_explicit: bool,
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

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

/// Every configuration key, as written in the TOML file. The environment variable is
/// `SOCKVISOR_<KEY IN UPPER CASE>`, the flag `--<key-with-dashes>` (except `command`, which is
/// positional, and `listen`, which is `-l/--listen`).
pub const KEYS: &[&str] = &[
    "command",
    "workers",
    "listen",
    "dispatch",
    "ready",
    "ready_timeout",
    "stop_timeout",
    "restart_delay",
    "restart_delay_max",
    "restart_reset",
    "give_up_after",
    "fatal_exit_codes",
    "user",
    "group",
    "worker_watchdog",
    "min_ready",
    "min_healthy",
    "unhealthy_grace",
    "window",
    "wedged_after",
    "reload_surge",
    "reload_timeout",
    "control_socket",
    "runtime_dir",
];

/// Keys of one `[[listen]]` table.
const LISTEN_KEYS: &[&str] = &["name", "url", "dispatch"];

/// `SOCKVISOR_*` variables that are not configuration keys (read elsewhere, or set by
/// sockvisor for its workers).
const ENV_NOT_KEYS: &[&str] = &["SOCKVISOR_CONFIG", "SOCKVISOR_LOG", "SOCKVISOR_WORKER_ID"];

fn env_name(key: &str) -> String {
    format!("SOCKVISOR_{}", key.to_ascii_uppercase())
}

fn flag_name(key: &str) -> String {
    match key {
        "control_socket" => "--control".to_string(),
        _ => format!("--{}", key.replace('_', "-")),
    }
}

/// Levenshtein distance (small strings only: keys and flags).
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// The closest candidate, if it is close enough to be a plausible typo.
fn closest<'a, I: IntoIterator<Item = &'a str>>(word: &str, candidates: I) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(2);
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

// ---------------------------------------------------------------------------------------------
// Value parsers (shared by file, environment and command line)
// ---------------------------------------------------------------------------------------------

/// A value error: what was wrong, and how to fix it.
type VErr = (String, String);

fn got(s: &str) -> String {
    format!("{s:?}")
}

fn parse_count(s: &str, min: usize) -> Result<usize, VErr> {
    let what = if min >= 1 {
        "a positive integer"
    } else {
        "a non-negative integer"
    };
    match s.trim().parse::<usize>() {
        Ok(n) if n >= min => Ok(n),
        _ => Err((
            format!("expected {what}, got {}", got(s)),
            format!("use a whole number >= {min}"),
        )),
    }
}

/// Parse a systemd-style duration: `500ms`, `10s`, `2min`, `2m`, `1h`, `1.5s`, `1min 30s`, or
/// a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "expected a duration, got {} (use e.g. \"500ms\", \"10s\", \"1.5s\", \"2min\", \"1h\" or a number of seconds)",
            got(s)
        )
    };
    let t = s.trim();
    if t.is_empty() {
        return Err(bad());
    }
    let b = t.as_bytes();
    let mut i = 0;
    let mut total: u128 = 0;
    while i < b.len() {
        while i < b.len() && b[i] == b' ' {
            i += 1;
        }
        if i == b.len() {
            break;
        }
        let num_start = i;
        while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
            i += 1;
        }
        let num = &t[num_start..i];
        while i < b.len() && b[i] == b' ' {
            i += 1;
        }
        let unit_start = i;
        while i < b.len() && b[i].is_ascii_alphabetic() {
            i += 1;
        }
        let unit = &t[unit_start..i];
        let unit_ns: u128 = match unit {
            "" | "s" | "sec" | "secs" | "second" | "seconds" => 1_000_000_000,
            "us" | "usec" | "µs" => 1_000,
            "ms" | "msec" => 1_000_000,
            "m" | "min" | "mins" | "minute" | "minutes" => 60_000_000_000,
            "h" | "hr" | "hour" | "hours" => 3_600_000_000_000,
            "d" | "day" | "days" => 86_400_000_000_000,
            _ => return Err(bad()),
        };
        let (int, frac) = match num.split_once('.') {
            Some((a, f)) => (a, f),
            None => (num, ""),
        };
        if (int.is_empty() && frac.is_empty()) || frac.contains('.') || frac.len() > 18 {
            return Err(bad());
        }
        let int: u128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| bad())?
        };
        let mut part = int.checked_mul(unit_ns).ok_or_else(bad)?;
        if !frac.is_empty() {
            let f: u128 = frac.parse().map_err(|_| bad())?;
            part += f * unit_ns / 10u128.pow(frac.len() as u32);
        }
        total = total.checked_add(part).ok_or_else(bad)?;
        // A bare number is only allowed alone.
        if unit.is_empty() && (num_start != 0 || i != b.len()) {
            return Err(bad());
        }
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| bad())?;
    if secs > MAX_DURATION_SECS {
        return Err(format!("duration {} is too long (at most 365d)", got(s)));
    }
    Ok(Duration::new(secs, (total % 1_000_000_000) as u32))
}

/// Durations are deadlines added to the monotonic clock: a year is long enough for any of
/// them and far from overflowing `Instant`.
const MAX_DURATION_SECS: u64 = 365 * 86_400;

fn parse_dur(s: &str) -> Result<Duration, VErr> {
    // parse_duration's message already says how to write one.
    parse_duration(s).map_err(|m| (m, String::new()))
}

fn parse_policy(s: &str) -> Result<DispatchPolicy, VErr> {
    match s.trim() {
        "round-robin" | "round_robin" | "rr" => Ok(DispatchPolicy::RoundRobin),
        "shared" => Ok(DispatchPolicy::Shared),
        "ip-hash" | "ip_hash" => Ok(DispatchPolicy::IpHash),
        "least-connections" | "least_connections" => Ok(DispatchPolicy::LeastConnections),
        _ => Err((
            format!("unknown dispatch policy {}", got(s)),
            "use round-robin, shared, ip-hash or least-connections".into(),
        )),
    }
}

fn parse_ready(s: &str) -> Result<ReadyMode, VErr> {
    match s.trim() {
        "exec" => Ok(ReadyMode::Exec),
        "notify" => Ok(ReadyMode::Notify),
        _ => Err((
            format!("expected \"exec\" or \"notify\", got {}", got(s)),
            "use exec (ready when started) or notify (ready at the worker's READY=1)".into(),
        )),
    }
}

fn parse_exit_code(s: &str) -> Result<i32, VErr> {
    match s.trim().parse::<i32>() {
        Ok(n) if (0..=255).contains(&n) => Ok(n),
        _ => Err((
            format!("expected an exit code 0-255, got {}", got(s)),
            "list exit codes like [2, 78]".into(),
        )),
    }
}

fn parse_nonempty(s: &str) -> Result<String, VErr> {
    if s.trim().is_empty() {
        Err((
            "must not be empty".into(),
            "give a value or remove it".into(),
        ))
    } else {
        Ok(s.trim().to_string())
    }
}

fn parse_path(s: &str) -> Result<PathBuf, VErr> {
    parse_nonempty(s).map(PathBuf::from)
}

fn split_command(s: &str) -> Result<Vec<String>, VErr> {
    let v: Vec<String> = s.split_whitespace().map(String::from).collect();
    if v.is_empty() {
        Err((
            "the command is empty".into(),
            "give the program to run and its arguments".into(),
        ))
    } else {
        Ok(v)
    }
}

const LISTEN_FORMS: &str = "accepted forms: NAME (provided by systemd), [NAME=]tcp://HOST:PORT, [NAME=]udp://HOST:PORT, [NAME=]unix:/ABSOLUTE/PATH; e.g. web=tcp://127.0.0.1:8000, tcp://[::1]:8000, tcp://:8000 (all interfaces), dns=udp://0.0.0.0:53, unix:/run/app.sock";

/// Check a listener name: it becomes a `LISTEN_FDNAMES` entry and must match a systemd
/// `FileDescriptorName=`: 1-255 printable ASCII characters, no `:`.
pub fn check_listener_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 255 {
        return Err(format!(
            "listener name {} must be 1-255 characters",
            got(name)
        ));
    }
    if !name.bytes().all(|c| c.is_ascii_graphic() && c != b':') {
        return Err(format!(
            "listener name {} may only contain printable ASCII characters other than ':' (it is a FileDescriptorName=)",
            got(name)
        ));
    }
    Ok(())
}

fn parse_host_port(rest: &str, spec: &str) -> Result<SocketAddr, String> {
    let bad = |why: &str| format!("bad listen address {}: {why}", got(spec));
    let (host, port) = if let Some(r) = rest.strip_prefix('[') {
        let (h, p) = r
            .split_once(']')
            .ok_or_else(|| bad("missing ']' after an IPv6 address"))?;
        let p = p
            .strip_prefix(':')
            .ok_or_else(|| bad("missing :PORT after the address"))?;
        let ip: std::net::Ipv6Addr = h
            .parse()
            .map_err(|_| bad("not an IPv6 address between [ ]"))?;
        (std::net::IpAddr::V6(ip), p)
    } else {
        let (h, p) = rest
            .rsplit_once(':')
            .ok_or_else(|| bad("missing :PORT (give a port, 0 for any)"))?;
        let ip = match h {
            "" | "*" => std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            "localhost" => std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            _ if h.contains(':') => {
                return Err(bad("write an IPv6 address in brackets, like [::1]:8000"))
            }
            _ => h
                .parse::<std::net::Ipv4Addr>()
                .map(std::net::IpAddr::V4)
                .map_err(|_| {
                    bad("the host must be an IP address, \"localhost\" or empty for all interfaces")
                })?,
        };
        (ip, p)
    };
    if port.is_empty() {
        return Err(bad("missing port after ':'"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| bad("the port must be a number 0-65535"))?;
    Ok(SocketAddr::new(host, port))
}

/// Parse a `[NAME=]URL` listener spec: `tcp://HOST:PORT`, `udp://HOST:PORT` or `unix:PATH`
/// (`unix:///run/x.sock` is accepted too). HOST is an IPv4 address, `[IPv6]`, `localhost`, or
/// empty/`*` for all IPv4 interfaces. Port 0 is allowed (the kernel picks one). A unix path
/// must be absolute and fit in `sun_path` (107 bytes).
pub fn parse_listen(spec: &str) -> Result<(Option<String>, ListenAddr), String> {
    let spec = spec.trim();
    let (name, url) = match spec.split_once('=') {
        Some((n, u)) if !n.contains(':') && !n.contains('/') => (Some(n.to_string()), u),
        _ => (None, spec),
    };
    if let Some(n) = &name {
        check_listener_name(n)?;
    }
    let addr = parse_listen_url(url)?;
    Ok((name, addr))
}

fn parse_listen_url(url: &str) -> Result<ListenAddr, String> {
    let url = url.trim();
    if let Some(rest) = url.strip_prefix("tcp://") {
        return parse_host_port(rest, url).map(ListenAddr::Tcp);
    }
    if let Some(rest) = url.strip_prefix("udp://") {
        return parse_host_port(rest, url).map(ListenAddr::Udp);
    }
    if let Some(rest) = url.strip_prefix("unix:") {
        let path = match rest.strip_prefix("//") {
            Some(p) if p.starts_with('/') => p,
            _ => rest,
        };
        if path.starts_with('@') {
            return Err(format!(
                "bad listen address {}: abstract unix sockets are not supported (use a path)",
                got(url)
            ));
        }
        if !path.starts_with('/') {
            return Err(format!(
                "bad listen address {}: the unix socket path must be absolute, like unix:/run/app.sock",
                got(url)
            ));
        }
        if path.len() > 107 || path.contains('\0') {
            return Err(format!(
                "bad listen address {}: a unix socket path must be at most 107 bytes",
                got(url)
            ));
        }
        return Ok(ListenAddr::Unix(PathBuf::from(path)));
    }
    let why = match url.split_once("://") {
        Some((scheme, _)) => format!("unknown scheme {}", got(scheme)),
        None => "no scheme".to_string(),
    };
    Err(format!("bad listen address {}: {why}", got(url)))
}

// ---------------------------------------------------------------------------------------------
// Layers
// ---------------------------------------------------------------------------------------------

/// Where a value came from, for error messages.
#[derive(Debug, Clone)]
enum Origin {
    File { path: PathBuf, line: Option<usize> },
    Env(String),
    Cli(String),
}

impl Origin {
    /// An error about `key` (a TOML key; the env var or the flag is named instead for those).
    fn err(&self, key: &str, message: impl Into<String>, fix: impl Into<String>) -> ConfigError {
        let fix = fix.into();
        let fix = if fix.is_empty() { None } else { Some(fix) };
        match self {
            Origin::File { path, line } => ConfigError {
                file: Some(path.clone()),
                line: *line,
                key: Some(key.to_string()),
                message: message.into(),
                fix,
            },
            Origin::Env(var) | Origin::Cli(var) => ConfigError {
                file: None,
                line: None,
                key: Some(var.clone()),
                message: message.into(),
                fix,
            },
        }
    }
}

#[derive(Debug, Clone)]
struct At<T> {
    v: T,
    at: Origin,
}

#[derive(Debug, Clone)]
struct RawListener {
    name: Option<String>,
    addr: Option<ListenAddr>,
    policy: Option<DispatchPolicy>,
    at: Origin,
}

/// One layer's worth of settings; `None` = not set in this layer.
#[derive(Debug, Clone, Default)]
struct Layer {
    command: Option<At<Vec<String>>>,
    workers: Option<At<usize>>,
    listen: Option<At<Vec<RawListener>>>,
    dispatch: Option<At<DispatchPolicy>>,
    ready: Option<At<ReadyMode>>,
    ready_timeout: Option<At<Duration>>,
    stop_timeout: Option<At<Duration>>,
    restart_delay: Option<At<Duration>>,
    restart_delay_max: Option<At<Duration>>,
    restart_reset: Option<At<Duration>>,
    give_up_after: Option<At<u32>>,
    fatal_exit_codes: Option<At<Vec<i32>>>,
    user: Option<At<String>>,
    group: Option<At<String>>,
    worker_watchdog: Option<At<Option<Duration>>>,
    min_ready: Option<At<Option<usize>>>,
    min_healthy: Option<At<usize>>,
    unhealthy_grace: Option<At<Duration>>,
    window: Option<At<usize>>,
    wedged_after: Option<At<Duration>>,
    reload_surge: Option<At<usize>>,
    reload_timeout: Option<At<Duration>>,
    control_socket: Option<At<PathBuf>>,
    runtime_dir: Option<At<PathBuf>>,
}

impl Layer {
    /// Set `key` from its string form (environment, command line, or a TOML scalar).
    fn set_str(&mut self, key: &str, s: &str, at: &Origin) -> Result<(), ConfigError> {
        let wrap = |r: Result<(), VErr>| r.map_err(|(m, f)| at.err(key, m, f));
        fn put<T>(slot: &mut Option<At<T>>, v: T, at: &Origin) {
            *slot = Some(At { v, at: at.clone() });
        }
        let a = at;
        wrap(match key {
            "command" => split_command(s).map(|v| put(&mut self.command, v, a)),
            "workers" => parse_count(s, 1).map(|v| put(&mut self.workers, v, a)),
            "listen" => {
                let mut list = Vec::new();
                for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
                    let (name, addr) =
                        parse_listen(item).map_err(|m| at.err(key, m, LISTEN_FORMS))?;
                    list.push(RawListener {
                        name,
                        addr: Some(addr),
                        policy: None,
                        at: at.clone(),
                    });
                }
                put(&mut self.listen, list, a);
                Ok(())
            }
            "dispatch" => parse_policy(s).map(|v| put(&mut self.dispatch, v, a)),
            "ready" => parse_ready(s).map(|v| put(&mut self.ready, v, a)),
            "ready_timeout" => parse_dur(s).map(|v| put(&mut self.ready_timeout, v, a)),
            "stop_timeout" => parse_dur(s).map(|v| put(&mut self.stop_timeout, v, a)),
            "restart_delay" => parse_dur(s).map(|v| put(&mut self.restart_delay, v, a)),
            "restart_delay_max" => parse_dur(s).map(|v| put(&mut self.restart_delay_max, v, a)),
            "restart_reset" => parse_dur(s).map(|v| put(&mut self.restart_reset, v, a)),
            "give_up_after" => parse_count(s, 1).and_then(|v| {
                let v = u32::try_from(v).map_err(|_| {
                    (
                        format!("{} is too large", got(s)),
                        "use a smaller number".to_string(),
                    )
                })?;
                put(&mut self.give_up_after, v, a);
                Ok(())
            }),
            "fatal_exit_codes" => s
                .split(',')
                .map(str::trim)
                .filter(|i| !i.is_empty())
                .map(parse_exit_code)
                .collect::<Result<Vec<_>, _>>()
                .map(|v| put(&mut self.fatal_exit_codes, v, a)),
            "user" => parse_nonempty(s).map(|v| put(&mut self.user, v, a)),
            "group" => parse_nonempty(s).map(|v| put(&mut self.group, v, a)),
            "worker_watchdog" => match s.trim() {
                "none" | "off" | "0" => {
                    put(&mut self.worker_watchdog, None, a);
                    Ok(())
                }
                _ => parse_dur(s).map(|v| {
                    let v = if v.is_zero() { None } else { Some(v) };
                    put(&mut self.worker_watchdog, v, a)
                }),
            },
            "min_ready" => match s.trim() {
                "all" => {
                    put(&mut self.min_ready, None, a);
                    Ok(())
                }
                _ => parse_count(s, 1)
                    .map_err(|(m, _)| (m, "use a number of workers, or \"all\"".into()))
                    .map(|v| put(&mut self.min_ready, Some(v), a)),
            },
            "min_healthy" => parse_count(s, 0).map(|v| put(&mut self.min_healthy, v, a)),
            "unhealthy_grace" => parse_dur(s).map(|v| put(&mut self.unhealthy_grace, v, a)),
            "window" => parse_count(s, 1).map(|v| put(&mut self.window, v, a)),
            "wedged_after" => parse_dur(s).map(|v| put(&mut self.wedged_after, v, a)),
            "reload_surge" => parse_count(s, 1).map(|v| put(&mut self.reload_surge, v, a)),
            "reload_timeout" => parse_dur(s).map(|v| put(&mut self.reload_timeout, v, a)),
            "control_socket" => parse_path(s).map(|v| put(&mut self.control_socket, v, a)),
            "runtime_dir" => parse_path(s).map(|v| put(&mut self.runtime_dir, v, a)),
            _ => Err((
                format!("unknown key `{key}`"),
                "see docs/config.md for the keys".into(),
            )),
        })
    }

    /// Overlay `top` on `self`: every value `top` sets wins.
    fn overlay(self, top: Layer) -> Layer {
        macro_rules! pick {
            ($($f:ident),*) => { Layer { $($f: top.$f.or(self.$f)),* } };
        }
        pick!(
            command,
            workers,
            listen,
            dispatch,
            ready,
            ready_timeout,
            stop_timeout,
            restart_delay,
            restart_delay_max,
            restart_reset,
            give_up_after,
            fatal_exit_codes,
            user,
            group,
            worker_watchdog,
            min_ready,
            min_healthy,
            unhealthy_grace,
            window,
            wedged_after,
            reload_surge,
            reload_timeout,
            control_socket,
            runtime_dir
        )
    }
}

// ---------------------------------------------------------------------------------------------
// TOML file
// ---------------------------------------------------------------------------------------------

fn line_of(src: &str, offset: usize) -> usize {
    let end = offset.min(src.len());
    src.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

use toml::de::{DeTable, DeValue};
use toml::Spanned;

fn type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a datetime",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// A TOML scalar as the string the value parsers take.
fn scalar(v: &DeValue<'_>) -> Result<String, String> {
    match v {
        DeValue::String(s) => Ok(s.to_string()),
        DeValue::Integer(i) => {
            let digits = i.as_str().replace('_', "");
            i128::from_str_radix(&digits, i.radix())
                .map(|n| n.to_string())
                .map_err(|_| format!("integer {} out of range", i.as_str()))
        }
        DeValue::Float(f) => Ok(f.as_str().replace('_', "")),
        other => Err(format!("expected a value, got {}", type_name(other))),
    }
}

struct FileCtx<'a> {
    path: &'a Path,
    src: &'a str,
}

impl FileCtx<'_> {
    fn at(&self, span: std::ops::Range<usize>) -> Origin {
        Origin::File {
            path: self.path.to_path_buf(),
            line: Some(line_of(self.src, span.start)),
        }
    }
}

fn file_layer(path: &Path, src: &str) -> Result<Layer, ConfigError> {
    let doc = DeTable::parse(src).map_err(|e| ConfigError {
        file: Some(path.to_path_buf()),
        line: e.span().map(|s| line_of(src, s.start)),
        key: None,
        message: format!("invalid TOML: {}", e.message().trim()),
        fix: Some("fix the syntax at that line".into()),
    })?;
    let ctx = FileCtx { path, src };
    let mut layer = Layer::default();
    for (k, v) in doc.get_ref().iter() {
        let key: &str = k.get_ref();
        let at = ctx.at(k.span());
        if !KEYS.contains(&key) {
            let msg = match closest(key, KEYS.iter().copied()) {
                Some(c) => format!("unknown key `{key}` (did you mean `{c}`?)"),
                None => format!("unknown key `{key}`"),
            };
            return Err(at.err(key, msg, "the valid keys are listed in docs/config.md"));
        }
        let vat = ctx.at(v.span());
        match (key, v.get_ref()) {
            ("command", DeValue::Array(items)) => {
                let mut cmd = Vec::new();
                for item in items {
                    match item.get_ref() {
                        DeValue::String(s) => cmd.push(s.to_string()),
                        other => {
                            return Err(ctx.at(item.span()).err(
                                key,
                                format!("expected an array of strings, got {} in it", type_name(other)),
                                "quote every argument, e.g. command = [\"/usr/bin/myapp\", \"--port\", \"0\"]",
                            ))
                        }
                    }
                }
                if cmd.is_empty() {
                    return Err(vat.err(
                        key,
                        "the command is empty",
                        "give the program to run, e.g. command = [\"/usr/bin/myapp\"]",
                    ));
                }
                layer.command = Some(At { v: cmd, at: vat });
            }
            ("fatal_exit_codes", DeValue::Array(items)) => {
                let mut codes = Vec::new();
                for item in items {
                    let iat = ctx.at(item.span());
                    let s = match item.get_ref() {
                        DeValue::Integer(_) => {
                            scalar(item.get_ref()).map_err(|m| iat.err(key, m, ""))?
                        }
                        other => {
                            return Err(iat.err(
                                key,
                                format!(
                                    "expected an array of exit codes, got {} in it",
                                    type_name(other)
                                ),
                                "list exit codes like [2, 78]",
                            ))
                        }
                    };
                    codes.push(parse_exit_code(&s).map_err(|(m, f)| iat.err(key, m, f))?);
                }
                layer.fatal_exit_codes = Some(At { v: codes, at: vat });
            }
            ("listen", DeValue::Array(items)) => {
                let mut list = Vec::new();
                for item in items {
                    list.push(file_listener(&ctx, item)?);
                }
                layer.listen = Some(At { v: list, at: vat });
            }
            ("listen", DeValue::String(_))
            | (_, DeValue::String(_) | DeValue::Integer(_) | DeValue::Float(_)) => {
                let s = scalar(v.get_ref()).map_err(|m| vat.err(key, m, ""))?;
                layer.set_str(key, &s, &vat)?;
            }
            (_, other) => {
                let expected = match key {
                    "command" => "an array of strings or a string",
                    "fatal_exit_codes" => "an array of integers",
                    "listen" => "[[listen]] tables",
                    _ => "a string or a number",
                };
                return Err(vat.err(
                    key,
                    format!("expected {expected}, got {}", type_name(other)),
                    "see docs/config.md for this key's type",
                ));
            }
        }
    }
    Ok(layer)
}

fn file_listener(
    ctx: &FileCtx<'_>,
    item: &Spanned<DeValue<'_>>,
) -> Result<RawListener, ConfigError> {
    let at = ctx.at(item.span());
    let table = match item.get_ref() {
        DeValue::Table(t) => t,
        DeValue::String(s) => {
            let (name, addr) = parse_listen(s).map_err(|m| at.err("listen", m, LISTEN_FORMS))?;
            return Ok(RawListener {
                name,
                addr: Some(addr),
                policy: None,
                at,
            });
        }
        other => {
            return Err(at.err(
                "listen",
                format!("expected a [[listen]] table, got {}", type_name(other)),
                "write [[listen]] name = \"web\" url = \"tcp://127.0.0.1:8000\"",
            ))
        }
    };
    let mut l = RawListener {
        name: None,
        addr: None,
        policy: None,
        at: at.clone(),
    };
    for (k, v) in table.iter() {
        let key: &str = k.get_ref();
        let kat = ctx.at(k.span());
        let full = format!("listen.{key}");
        if !LISTEN_KEYS.contains(&key) {
            let msg = match closest(key, LISTEN_KEYS.iter().copied()) {
                Some(c) => format!("unknown key `{key}` in [[listen]] (did you mean `{c}`?)"),
                None => format!("unknown key `{key}` in [[listen]]"),
            };
            return Err(kat.err(&full, msg, "a [[listen]] table has name, url and dispatch"));
        }
        let vat = ctx.at(v.span());
        let s = match v.get_ref() {
            DeValue::String(s) => s.to_string(),
            other => {
                return Err(vat.err(
                    &full,
                    format!("expected a string, got {}", type_name(other)),
                    "quote the value",
                ))
            }
        };
        match key {
            "name" => {
                check_listener_name(&s)
                    .map_err(|m| vat.err(&full, m, "use a name like \"web\""))?;
                l.name = Some(s);
            }
            "url" => {
                let addr = parse_listen_url(&s).map_err(|m| vat.err(&full, m, LISTEN_FORMS))?;
                l.addr = Some(addr);
            }
            _ => {
                l.policy = Some(parse_policy(&s).map_err(|(m, f)| vat.err(&full, m, f))?);
            }
        }
    }
    if l.name.is_none() && l.addr.is_none() {
        return Err(at.err(
            "listen",
            "a [[listen]] table needs a name, a url, or both",
            "add name = \"web\" (the FileDescriptorName= systemd passes) and/or url = \"tcp://127.0.0.1:8000\"",
        ));
    }
    l.at = at;
    Ok(l)
}

// ---------------------------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------------------------

fn env_get<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
    env.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn env_layer(env: &[(String, String)]) -> Result<Layer, ConfigError> {
    let mut layer = Layer::default();
    for key in KEYS {
        let var = env_name(key);
        if let Some(v) = env_get(env, &var) {
            layer.set_str(key, v, &Origin::Env(var.clone()))?;
        }
    }
    for (k, _) in env {
        if let Some(rest) = k.strip_prefix("SOCKVISOR_") {
            if !ENV_NOT_KEYS.contains(&k.as_str())
                && !KEYS.contains(&rest.to_ascii_lowercase().as_str())
            {
                match closest(&rest.to_ascii_lowercase(), KEYS.iter().copied()) {
                    Some(c) => log::warn!(
                        "ignoring unknown variable {k} (did you mean {}?)",
                        env_name(c)
                    ),
                    None => log::warn!("ignoring unknown variable {k}"),
                }
            }
        }
    }
    Ok(layer)
}

// ---------------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Cli {
    layer: Layer,
    config: Option<PathBuf>,
    help: bool,
    version: bool,
    sub: Option<Sub>,
}

#[derive(Debug)]
enum Sub {
    Status { json: bool },
    Reload,
    Scale { workers: usize },
}

fn usage(flag: &str, message: impl Into<String>, fix: impl Into<String>) -> ConfigError {
    ConfigError {
        file: None,
        line: None,
        key: Some(flag.to_string()),
        message: message.into(),
        fix: Some(fix.into()),
    }
}

fn long_flags() -> Vec<String> {
    let mut v: Vec<String> = KEYS
        .iter()
        .filter(|k| **k != "command")
        .map(|k| flag_name(k))
        .collect();
    v.extend(
        [
            "--config",
            "--help",
            "--version",
            "--json",
            "--control-socket",
        ]
        .map(String::from),
    );
    v
}

fn parse_cli(args: &[OsString]) -> Result<Cli, ConfigError> {
    let mut strs = Vec::with_capacity(args.len());
    for a in args {
        match a.to_str() {
            Some(s) => strs.push(s.to_string()),
            None => {
                return Err(usage(
                    "command line",
                    format!("argument {a:?} is not valid UTF-8"),
                    "sockvisor only takes UTF-8 arguments",
                ))
            }
        }
    }
    let mut cli = Cli::default();
    let mut listen: Vec<RawListener> = Vec::new();
    let mut i = 0;
    // In a subcommand, only these apply.
    let mut sub_name: Option<String> = None;
    let mut scale_n: Option<String> = None;
    let mut json = false;
    let mut command: Option<Vec<String>> = None;
    while i < strs.len() {
        let arg = strs[i].clone();
        i += 1;
        if arg == "--" {
            if sub_name.is_none() {
                command = Some(strs[i..].to_vec());
            }
            break;
        }
        if !arg.starts_with('-') || arg == "-" {
            match (&sub_name, arg.as_str()) {
                (None, "status" | "reload" | "scale") => {
                    sub_name = Some(arg);
                    continue;
                }
                (None, _) => {
                    command = Some(strs[i - 1..].to_vec());
                    break;
                }
                (Some(s), _) if s == "scale" && scale_n.is_none() => {
                    scale_n = Some(arg);
                    continue;
                }
                (Some(s), _) => {
                    return Err(usage(
                        s,
                        format!("unexpected argument {}", got(&arg)),
                        "see sockvisor --help",
                    ))
                }
            }
        }
        // Split `--flag=value`, `-w4`.
        let (flag, inline): (String, Option<String>) = if let Some(long) = arg.strip_prefix("--") {
            match long.split_once('=') {
                Some((f, v)) => (format!("--{f}"), Some(v.to_string())),
                None => (arg.clone(), None),
            }
        } else {
            let mut chars = arg.chars();
            chars.next();
            let c = chars.next().unwrap_or('-');
            let rest: String = chars.collect();
            (
                format!("-{c}"),
                if rest.is_empty() { None } else { Some(rest) },
            )
        };
        let canonical = match flag.as_str() {
            "-h" | "--help" => {
                cli.help = true;
                continue;
            }
            "-V" | "--version" => {
                cli.version = true;
                continue;
            }
            "--json" => {
                if sub_name.as_deref() != Some("status") {
                    return Err(usage(
                        "--json",
                        "--json only applies to `sockvisor status`",
                        "use sockvisor status --json",
                    ));
                }
                json = true;
                continue;
            }
            "-c" | "--config" => "--config".to_string(),
            "-w" => "--workers".to_string(),
            "-l" => "--listen".to_string(),
            "--control-socket" => "--control".to_string(),
            f => f.to_string(),
        };
        let key = if canonical == "--config" {
            None
        } else {
            let k = KEYS
                .iter()
                .find(|k| **k != "command" && flag_name(k) == canonical);
            match k {
                Some(k) => Some(*k),
                None => {
                    let flags = long_flags();
                    let msg = match closest(&flag, flags.iter().map(String::as_str)) {
                        Some(c) => format!("unknown option {flag} (did you mean {c}?)"),
                        None => format!("unknown option {flag}"),
                    };
                    return Err(usage(&flag, msg, "see sockvisor --help; to run a program whose name starts with '-', put it after --"));
                }
            }
        };
        let value = match inline {
            Some(v) => v,
            None => match strs.get(i) {
                Some(v) => {
                    i += 1;
                    v.clone()
                }
                None => {
                    return Err(usage(
                        &canonical,
                        "needs a value",
                        format!("give it as {canonical} VALUE or {canonical}=VALUE"),
                    ))
                }
            },
        };
        if sub_name.is_some() && !matches!(key, None | Some("control_socket")) {
            return Err(usage(
                &canonical,
                format!(
                    "does not apply to `sockvisor {}`",
                    sub_name.as_deref().unwrap_or("")
                ),
                "client commands take --control PATH and -c FILE only",
            ));
        }
        match key {
            None => {
                if value.is_empty() {
                    return Err(usage(
                        "--config",
                        "needs a file name",
                        "give -c /etc/sockvisor/app.toml",
                    ));
                }
                cli.config = Some(PathBuf::from(value));
            }
            Some("listen") => {
                // A bare NAME is a listener that only systemd provides (its type comes
                // from the fd): `--listen web` under a socket unit.
                let bare = check_listener_name(value.trim()).is_ok();
                let (name, addr) = if bare {
                    (Some(value.trim().to_string()), None)
                } else {
                    let (n, a) =
                        parse_listen(&value).map_err(|m| usage("--listen", m, LISTEN_FORMS))?;
                    (n, Some(a))
                };
                listen.push(RawListener {
                    name,
                    addr,
                    policy: None,
                    at: Origin::Cli("--listen".into()),
                });
            }
            Some(k) => cli
                .layer
                .set_str(k, &value, &Origin::Cli(canonical.clone()))?,
        }
    }
    if !listen.is_empty() {
        cli.layer.listen = Some(At {
            v: listen,
            at: Origin::Cli("--listen".into()),
        });
    }
    if let Some(cmd) = command {
        if !cmd.is_empty() {
            cli.layer.command = Some(At {
                v: cmd,
                at: Origin::Cli("COMMAND".into()),
            });
        }
    }
    cli.sub = match sub_name.as_deref() {
        None => None,
        Some("status") => Some(Sub::Status { json }),
        Some("reload") => Some(Sub::Reload),
        Some(_) => {
            let n = scale_n.ok_or_else(|| {
                usage(
                    "scale",
                    "needs a worker count",
                    "use sockvisor scale N, e.g. sockvisor scale 4",
                )
            })?;
            let workers = parse_count(&n, 1).map_err(|(m, f)| usage("scale", m, f))?;
            Some(Sub::Scale { workers })
        }
    };
    Ok(cli)
}

// ---------------------------------------------------------------------------------------------
// Control socket
// ---------------------------------------------------------------------------------------------

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
        message: format!("cannot read the config file: {e}"),
        fix: Some("check the path given by -c/--config or SOCKVISOR_CONFIG".into()),
    })?;
    file_layer(path, &src)
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
        env_get(env, "SOCKVISOR_CONFIG")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    });
    let file_layer = match &file {
        Some(path) => read_file(path)?,
        None => Layer::default(),
    };
    let layer = file_layer.overlay(env_layer(env)?).overlay(cli.layer);
    let control = control_socket_path(
        layer.control_socket.as_ref().map(|a| a.v.as_path()),
        layer.runtime_dir.as_ref().map(|a| a.v.as_path()),
        file.as_deref(),
        env,
    );
    match cli.sub {
        Some(Sub::Status { json }) => return Ok(Invocation::Status { control, json }),
        Some(Sub::Reload) => return Ok(Invocation::Reload { control }),
        Some(Sub::Scale { workers }) => return Ok(Invocation::Scale { control, workers }),
        None => {}
    }
    resolve(layer, file, control).map(|c| Invocation::Run(Box::new(c)))
}

fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn resolve(layer: Layer, file: Option<PathBuf>, control: PathBuf) -> Result<Config, ConfigError> {
    let command = match layer.command {
        Some(c) if !c.v.is_empty() => c.v,
        _ => {
            return Err(ConfigError {
                file: file.clone(),
                line: None,
                key: None,
                message: "no command".into(),
                fix: Some("give one after `--` or set command in the config".into()),
            })
        }
    };
    let workers = layer.workers.map(|a| a.v).unwrap_or_else(default_workers);
    let dispatch = layer
        .dispatch
        .map(|a| a.v)
        .unwrap_or(DispatchPolicy::RoundRobin);

    // Listeners.
    let mut listeners: Vec<ListenerSpec> = Vec::new();
    for raw in layer.listen.map(|a| a.v).unwrap_or_default() {
        let name = match (&raw.name, &raw.addr) {
            (Some(n), _) => n.clone(),
            (None, Some(ListenAddr::Tcp(_))) => "tcp".into(),
            (None, Some(ListenAddr::Udp(_))) => "udp".into(),
            (None, Some(ListenAddr::Unix(_))) => "unix".into(),
            // Parsers never produce a listener without both (checked in `file_listener`).
            (None, None) => "listener".into(),
        };
        if listeners.iter().any(|l| l.name == name) {
            return Err(raw.at.err(
                "listen",
                format!("two listeners are named {}", got(&name)),
                "give each listener its own name, e.g. --listen web=tcp://127.0.0.1:8000 --listen admin=tcp://127.0.0.1:9000 (unnamed listeners are named after their scheme: tcp, udp, unix)",
            ));
        }
        let policy = match (&raw.addr, raw.policy) {
            (Some(ListenAddr::Udp(_)), Some(p)) if p != DispatchPolicy::Shared => {
                return Err(raw.at.err(
                    "listen",
                    format!(
                        "listener {} is UDP, which is always shared, but dispatch = {} was asked for",
                        got(&name),
                        p.name()
                    ),
                    "remove its dispatch or set dispatch = \"shared\"",
                ))
            }
            (Some(ListenAddr::Udp(_)), _) => DispatchPolicy::Shared,
            (_, Some(p)) => p,
            (_, None) => dispatch,
        };
        listeners.push(ListenerSpec {
            name,
            addr: raw.addr,
            policy,
        });
    }

    let cross = |at: &Option<Origin>, key: &str, msg: String, fix: &str| match at {
        Some(at) => at.err(key, msg, fix),
        None => ConfigError {
            file: file.clone(),
            line: None,
            key: Some(key.to_string()),
            message: msg,
            fix: Some(fix.to_string()),
        },
    };
    let min_ready = match layer.min_ready {
        Some(At { v: Some(n), at }) if n > workers => {
            return Err(cross(
                &Some(at),
                "min_ready",
                format!("min_ready = {n} is more than the {workers} workers"),
                "lower min_ready or raise workers",
            ))
        }
        Some(a) => a.v,
        None => None,
    };
    let min_healthy = match layer.min_healthy {
        Some(At { v, at }) if v > workers => {
            return Err(cross(
                &Some(at),
                "min_healthy",
                format!("min_healthy = {v} is more than the {workers} workers"),
                "lower min_healthy or raise workers",
            ))
        }
        Some(a) => a.v,
        None => 1,
    };
    let initial = layer
        .restart_delay
        .map(|a| a.v)
        .unwrap_or(Duration::from_millis(100));
    let max = match layer.restart_delay_max {
        Some(At { v, at }) if v < initial => {
            return Err(at.err(
                "restart_delay_max",
                format!("restart_delay_max ({v:?}) is shorter than restart_delay ({initial:?})"),
                "make restart_delay_max at least restart_delay",
            ))
        }
        Some(a) => a.v,
        None => Duration::from_secs(10).max(initial),
    };
    let secs = Duration::from_secs;
    Ok(Config {
        file,
        command,
        workers,
        listeners,
        dispatch,
        ready: layer.ready.map(|a| a.v).unwrap_or(ReadyMode::Exec),
        ready_timeout: layer.ready_timeout.map(|a| a.v).unwrap_or(secs(30)),
        stop_timeout: layer.stop_timeout.map(|a| a.v).unwrap_or(secs(10)),
        backoff: Backoff {
            initial,
            max,
            reset_after: layer.restart_reset.map(|a| a.v).unwrap_or(secs(10)),
            give_up_after: layer.give_up_after.map(|a| a.v).unwrap_or(5),
        },
        fatal_exit_codes: layer.fatal_exit_codes.map(|a| a.v).unwrap_or_default(),
        user: layer.user.map(|a| a.v),
        group: layer.group.map(|a| a.v),
        worker_watchdog: layer.worker_watchdog.and_then(|a| a.v),
        min_ready,
        min_healthy,
        unhealthy_grace: layer.unhealthy_grace.map(|a| a.v).unwrap_or(secs(30)),
        window: layer.window.map(|a| a.v).unwrap_or(64),
        wedged_after: layer.wedged_after.map(|a| a.v).unwrap_or(secs(30)),
        reload_surge: layer.reload_surge.map(|a| a.v).unwrap_or(1),
        reload_timeout: layer.reload_timeout.map(|a| a.v).unwrap_or(secs(60)),
        control_socket: Some(control),
        control_socket_explicit: layer.control_socket.is_some(),
        runtime_dir: layer.runtime_dir.map(|a| a.v),
    })
}

/// The `--help` text (complete: the man page is generated from it with help2man).
pub fn help_text() -> String {
    format!(
        r#"sockvisor {version} - one socket, N workers of any language, natively on systemd

Usage:
  sockvisor [OPTIONS] [--] COMMAND [ARGS]...   run a fleet of COMMAND workers
  sockvisor status [--json] [--control PATH] [-c FILE]
  sockvisor reload [--control PATH] [-c FILE]
  sockvisor scale N [--control PATH] [-c FILE]

sockvisor takes its sockets from systemd (LISTEN_FDS/LISTEN_FDNAMES) or binds the
--listen addresses itself, forks the workers, shares datagram sockets with them and
hands each accepted stream connection to a worker over SCM_RIGHTS (or lets them all
accept on the socket with --dispatch shared). Options stop at the first word that
is not an option, or at `--`; the command may also come from the config file.

Options (every option is also a config key and a SOCKVISOR_* variable;
command line > environment > config file):
  -c, --config FILE           TOML config file (env SOCKVISOR_CONFIG)
  -w, --workers N             number of workers (default: number of CPUs)
  -l, --listen [NAME=]URL     listen on URL, repeatable; URL is tcp://HOST:PORT,
                              udp://HOST:PORT or unix:/PATH (HOST: IPv4, [IPv6],
                              localhost, or empty for all IPv4 interfaces; port 0
                              lets the kernel choose). NAME (what workers see in
                              LISTEN_FDNAMES, and the FileDescriptorName= of the
                              socket unit) defaults to the scheme: tcp, udp, unix.
                              Used only when not socket-activated; replaces the
                              config file's listeners entirely
      --dispatch POLICY       round-robin (default) | shared | ip-hash |
                              least-connections, for stream listeners; UDP is
                              always shared
      --ready MODE            exec (default: ready once started) | notify (ready at
                              the worker's READY=1 on NOTIFY_SOCKET)
      --ready-timeout DUR     time a worker has to get ready (default 30s)
      --stop-timeout DUR      SIGTERM to SIGKILL delay when stopping (default 10s)
      --restart-delay DUR     first restart delay of a slot (default 100ms)
      --restart-delay-max DUR cap of the doubling restart delay (default 10s)
      --restart-reset DUR     uptime that resets a slot's backoff (default 10s)
      --give-up-after N       give up (exit 69) once every slot failed N times in a
                              row (default 5)
      --fatal-exit-codes LIST worker exit codes that are not restarted, comma-
                              separated (default: none)
      --user USER             run workers as USER
      --group GROUP           run workers with group GROUP
      --worker-watchdog DUR   WATCHDOG_USEC given to workers; a worker that stops
                              sending WATCHDOG=1 is killed (default: none)
      --min-ready N|all       ready workers needed for READY=1 (default: all)
      --min-healthy N         ready workers needed for WATCHDOG=1 (default 1)
      --unhealthy-grace DUR   time below min-healthy before WATCHDOG=trigger
                              (default 30s)
      --window N              connections queued per worker (default 64)
      --wedged-after DUR      a worker whose queue does not move for DUR is
                              unhealthy (default 30s)
      --reload-surge N        extra workers during a reload (default 1)
      --reload-timeout DUR    time a new generation has to get ready before it is
                              rolled back (default 60s)
      --control PATH          control socket (config control_socket)
      --runtime-dir DIR       directory for the control socket (control.sock)
  -h, --help                  print this help
  -V, --version               print the version

Durations: 500ms, 10s, 1.5s, 2min (or 2m), 1h, or a plain number of seconds.
Values take the form --option VALUE or --option=VALUE (-w4 and -w 4 both work).

Commands (talk to a running sockvisor over its control socket):
  status [--json]             the fleet's state, one line per worker
  reload                      re-read the config and replace the workers in a new
                              generation (also: systemctl reload, SIGHUP)
  scale N                     change the number of workers
To run a program literally called status, reload or scale, put it after `--`.

The control socket is --control/control_socket; else runtime_dir/control.sock;
else $RUNTIME_DIRECTORY/control.sock; else /run/sockvisor/INSTANCE.sock as root;
else $XDG_RUNTIME_DIR/sockvisor/INSTANCE.sock; else /tmp/sockvisor-UID/INSTANCE.sock,
INSTANCE being the config file's name without .toml, or sockvisor.

Environment:
  SOCKVISOR_<KEY>             any config key, e.g. SOCKVISOR_WORKERS=8,
                              SOCKVISOR_LISTEN=web=tcp://:8000,dns=udp://:53
                              (lists comma-separated, the command split on spaces)
  SOCKVISOR_CONFIG            config file, when -c is not given
  SOCKVISOR_LOG               log level (error, warn, info, debug, trace)
  LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID, NOTIFY_SOCKET, WATCHDOG_USEC
                              set by systemd; never passed on to workers
Workers get LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID (their own), SOCKVISOR_WORKER_ID
(their slot, 0..N-1) and NOTIFY_SOCKET (sockvisor's).

Exit status:
  0    clean stop
  69   the fleet could not stay up (every slot kept failing)
  70   internal error
  78   configuration or usage error (units: RestartPreventExitStatus=78)

See docs/config.md for the config file.
"#,
        version = env!("CARGO_PKG_VERSION")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    fn env(e: &[(&str, &str)]) -> Vec<(String, String)> {
        e.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn run(a: &[&str], e: &[(&str, &str)]) -> Result<Config, ConfigError> {
        match load(&Sources {
            args: args(a),
            env: env(e),
        })? {
            Invocation::Run(c) => Ok(*c),
            other => panic!("expected Run, got {other:?}"),
        }
    }

    fn err(a: &[&str], e: &[(&str, &str)]) -> String {
        load(&Sources {
            args: args(a),
            env: env(e),
        })
        .expect_err("expected an error")
        .to_string()
    }

    fn toml_file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn defaults() {
        let c = run(&["--", "/bin/app"], &[]).unwrap();
        assert_eq!(c.command, vec!["/bin/app"]);
        assert!(c.workers >= 1);
        assert_eq!(c.ready, ReadyMode::Exec);
        assert_eq!(c.ready_timeout, Duration::from_secs(30));
        assert_eq!(c.stop_timeout, Duration::from_secs(10));
        assert_eq!(
            c.backoff,
            Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(10),
                reset_after: Duration::from_secs(10),
                give_up_after: 5
            }
        );
        assert_eq!(c.window, 64);
        assert_eq!(c.min_healthy, 1);
        assert_eq!(c.min_ready, None);
        assert_eq!(c.worker_watchdog, None);
        assert_eq!(c.reload_surge, 1);
        assert_eq!(c.reload_timeout, Duration::from_secs(60));
        assert_eq!(c.dispatch, DispatchPolicy::RoundRobin);
        assert!(c.listeners.is_empty());
        assert!(c.control_socket.is_some());
    }

    #[test]
    fn layering_cli_over_env_over_file() {
        let f = toml_file(
            "workers = 2\nwindow = 10\nready = \"notify\"\ncommand = \"/bin/file-app --x\"\n",
        );
        let p = f.path().to_str().unwrap();
        let c = run(&["-c", p], &[]).unwrap();
        assert_eq!((c.workers, c.window, c.ready), (2, 10, ReadyMode::Notify));
        assert_eq!(c.command, vec!["/bin/file-app", "--x"]);
        assert_eq!(c.file.as_deref(), Some(f.path()));

        let e = [("SOCKVISOR_WORKERS", "3"), ("SOCKVISOR_WINDOW", "20")];
        let c = run(&["-c", p], &e).unwrap();
        assert_eq!((c.workers, c.window), (3, 20));

        let c = run(&["-c", p, "-w4", "--", "/bin/cli"], &e).unwrap();
        assert_eq!((c.workers, c.window), (4, 20));
        assert_eq!(c.command, vec!["/bin/cli"]);

        // SOCKVISOR_CONFIG when -c is absent.
        let c = run(
            &[],
            &[
                ("SOCKVISOR_CONFIG", p),
                ("SOCKVISOR_COMMAND", "/bin/env-app a b"),
            ],
        )
        .unwrap();
        assert_eq!(c.workers, 2);
        assert_eq!(c.command, vec!["/bin/env-app", "a", "b"]);
    }

    #[test]
    fn flag_forms() {
        for a in [
            &["-w", "4", "app"][..],
            &["-w4", "app"],
            &["--workers", "4", "app"],
            &["--workers=4", "app"],
        ] {
            assert_eq!(run(a, &[]).unwrap().workers, 4, "{a:?}");
        }
        let c = run(
            &[
                "--listen=web=tcp://127.0.0.1:80",
                "-l",
                "udp://[::1]:53",
                "--ready-timeout",
                "1.5s",
                "app",
                "--workers",
                "9",
            ],
            &[],
        )
        .unwrap();
        // Options stop at the first non-option word.
        assert_eq!(c.command, vec!["app", "--workers", "9"]);
        assert_eq!(c.listeners.len(), 2);
        assert_eq!(c.listeners[0].name, "web");
        assert_eq!(c.listeners[1].name, "udp");
        assert_eq!(c.listeners[1].policy, DispatchPolicy::Shared);
        assert_eq!(c.ready_timeout, Duration::from_millis(1500));
    }

    #[test]
    fn listeners_cli_replaces_file_and_policies() {
        let f = toml_file(
            "command = [\"app\"]\ndispatch = \"ip-hash\"\n[[listen]]\nname = \"web\"\nurl = \"tcp://127.0.0.1:8000\"\n[[listen]]\nname = \"admin\"\ndispatch = \"shared\"\n[[listen]]\nname = \"dns\"\nurl = \"udp://0.0.0.0:53\"\n",
        );
        let p = f.path().to_str().unwrap();
        let c = run(&["-c", p], &[]).unwrap();
        let got: Vec<_> = c
            .listeners
            .iter()
            .map(|l| (l.name.as_str(), l.policy))
            .collect();
        assert_eq!(
            got,
            vec![
                ("web", DispatchPolicy::IpHash),
                ("admin", DispatchPolicy::Shared),
                ("dns", DispatchPolicy::Shared)
            ]
        );
        assert_eq!(c.listeners[1].addr, None);
        let c = run(&["-c", p, "-l", "unix:/run/x.sock"], &[]).unwrap();
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.listeners[0].name, "unix");
        assert_eq!(
            c.listeners[0].addr,
            Some(ListenAddr::Unix("/run/x.sock".into()))
        );
        let c = run(
            &["-c", p],
            &[("SOCKVISOR_LISTEN", "a=tcp://:1,b=udp://127.0.0.1:2")],
        )
        .unwrap();
        assert_eq!(c.listeners.len(), 2);
        assert_eq!(
            c.listeners[0].addr,
            Some(ListenAddr::Tcp("0.0.0.0:1".parse().unwrap()))
        );
    }

    #[test]
    fn udp_with_non_shared_policy_is_an_error() {
        let f = toml_file("command = [\"app\"]\n[[listen]]\nname = \"dns\"\nurl = \"udp://127.0.0.1:53\"\ndispatch = \"round-robin\"\n");
        let e = err(&["-c", f.path().to_str().unwrap()], &[]);
        assert!(e.contains(":2: listen:"), "{e}");
        assert!(
            e.contains("always shared") && e.contains("dispatch = \"shared\""),
            "{e}"
        );
        // A global non-shared policy simply does not apply to UDP.
        let c = run(
            &["--dispatch", "ip-hash", "-l", "udp://127.0.0.1:53", "app"],
            &[],
        )
        .unwrap();
        assert_eq!(c.listeners[0].policy, DispatchPolicy::Shared);
    }

    #[test]
    fn duplicate_listener_names() {
        let e = err(
            &["-l", "tcp://127.0.0.1:1", "-l", "tcp://127.0.0.1:2", "app"],
            &[],
        );
        assert!(e.contains("two listeners are named \"tcp\""), "{e}");
    }

    #[test]
    fn malformed_toml_names_file_and_line() {
        let f = toml_file("workers = 2\n\nready = \n");
        let e = err(&["-c", f.path().to_str().unwrap()], &[]);
        assert!(
            e.starts_with(&format!("{}:3: invalid TOML", f.path().display())),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_suggests() {
        let f = toml_file("command = \"app\"\nwrkers = 2\n");
        let e = err(&["-c", f.path().to_str().unwrap()], &[]);
        assert!(
            e.contains(":2: wrkers: unknown key `wrkers` (did you mean `workers`?)"),
            "{e}"
        );
        let f = toml_file("[[listen]]\nnmae = \"web\"\n");
        let e = err(&["-c", f.path().to_str().unwrap()], &[]);
        assert!(
            e.contains(":2:") && e.contains("did you mean `name`?"),
            "{e}"
        );
        let e = err(&["--wrokers", "2", "app"], &[]);
        assert!(
            e.contains("unknown option --wrokers (did you mean --workers?)"),
            "{e}"
        );
        let e = err(&["--zzzzzzzzzzzz", "app"], &[]);
        assert!(e.contains("unknown option --zzzzzzzzzzzz"), "{e}");
    }

    #[test]
    fn wrong_values_name_their_source() {
        let f = toml_file("command = \"app\"\n\nworkers = \"abc\"\n");
        let e = err(&["-c", f.path().to_str().unwrap()], &[]);
        assert!(
            e.contains(":3: workers: expected a positive integer, got \"abc\""),
            "{e}"
        );
        let f = toml_file("workers = true\n");
        let e = err(&["-c", f.path().to_str().unwrap()], &[]);
        assert!(
            e.contains(":1: workers: expected a string or a number, got a boolean"),
            "{e}"
        );
        let e = err(&["app"], &[("SOCKVISOR_WORKERS", "0")]);
        assert!(
            e.starts_with("SOCKVISOR_WORKERS: expected a positive integer, got \"0\""),
            "{e}"
        );
        let e = err(&["--stop-timeout", "soon", "app"], &[]);
        assert!(e.starts_with("--stop-timeout: expected a duration"), "{e}");
        let e = err(&["--dispatch=random", "app"], &[]);
        assert!(
            e.contains("unknown dispatch policy") && e.contains("least-connections"),
            "{e}"
        );
        let e = err(&["--ready", "later", "app"], &[]);
        assert!(e.contains("expected \"exec\" or \"notify\""), "{e}");
        let e = err(&["-w"], &[]);
        assert!(e.contains("-w") || e.contains("--workers"), "{e}");
        let e = err(&["-l", "http://x:1", "app"], &[]);
        assert!(
            e.starts_with("--listen: bad listen address") && e.contains("tcp://HOST:PORT"),
            "{e}"
        );
    }

    #[test]
    fn cross_checks() {
        let e = err(&["-w", "2", "--min-ready", "3", "app"], &[]);
        assert!(
            e.contains("min_ready = 3 is more than the 2 workers"),
            "{e}"
        );
        let e = err(&["-w", "2", "app"], &[("SOCKVISOR_MIN_HEALTHY", "5")]);
        assert!(e.starts_with("SOCKVISOR_MIN_HEALTHY:"), "{e}");
        let e = err(&["--window", "0", "app"], &[]);
        assert!(e.contains("--window: expected a positive integer"), "{e}");
        let e = err(&[], &[]);
        assert!(e.contains("no command") && e.contains("after `--`"), "{e}");
        let e = err(
            &["--restart-delay", "5s", "--restart-delay-max", "1s", "app"],
            &[],
        );
        assert!(e.contains("restart_delay_max"), "{e}");
        let c = run(
            &["-w", "3", "--min-ready", "all", "--min-healthy", "0", "app"],
            &[],
        )
        .unwrap();
        assert_eq!((c.min_ready, c.min_healthy), (None, 0));
    }

    #[test]
    fn toml_types() {
        let f = toml_file(
            "command = [\"/bin/app\", \"-v\"]\nstop_timeout = 3\nready_timeout = \"2min\"\nfatal_exit_codes = [2, 78]\nworker_watchdog = \"500ms\"\nworkers = 0x10\n",
        );
        let c = run(&["-c", f.path().to_str().unwrap()], &[]).unwrap();
        assert_eq!(c.stop_timeout, Duration::from_secs(3));
        assert_eq!(c.ready_timeout, Duration::from_secs(120));
        assert_eq!(c.fatal_exit_codes, vec![2, 78]);
        assert_eq!(c.worker_watchdog, Some(Duration::from_millis(500)));
        assert_eq!(c.workers, 16);
        let f = toml_file("command = [\"app\", 3]\n");
        let e = err(&["-c", f.path().to_str().unwrap()], &[]);
        assert!(
            e.contains(":1: command: expected an array of strings"),
            "{e}"
        );
        let f = toml_file("command = \"app\"\nfatal_exit_codes = [300]\n");
        let e = err(&["-c", f.path().to_str().unwrap()], &[]);
        assert!(
            e.contains(":2: fatal_exit_codes: expected an exit code 0-255"),
            "{e}"
        );
        let e = err(&["-c", "/nonexistent/x.toml"], &[]);
        assert!(
            e.starts_with("/nonexistent/x.toml: cannot read the config file"),
            "{e}"
        );
    }

    #[test]
    fn durations_are_capped_at_a_year() {
        assert_eq!(
            parse_duration("365d"),
            Ok(Duration::from_secs(365 * 86_400))
        );
        let e = parse_duration("4000000000000000h").unwrap_err();
        assert!(e.contains("too long"), "{e}");
        assert!(parse_duration("366d").is_err());
    }

    #[test]
    fn durations() {
        let d = |s| parse_duration(s);
        assert_eq!(d("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(d("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(d("2min"), Ok(Duration::from_secs(120)));
        assert_eq!(d("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(d("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(d("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(d("0.1s"), Ok(Duration::from_millis(100)));
        assert_eq!(d("7"), Ok(Duration::from_secs(7)));
        assert_eq!(d("1min 30s"), Ok(Duration::from_secs(90)));
        assert_eq!(d(" 250 us "), Ok(Duration::from_micros(250)));
        for bad in [
            "",
            "s",
            "-1s",
            "1x",
            "1.2.3s",
            "1 2",
            "ms5",
            "99999999999999999999999999999h",
            "µ",
        ] {
            assert!(d(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn listen_urls() {
        let tcp = |s: &str| ListenAddr::Tcp(s.parse().unwrap());
        assert_eq!(
            parse_listen("tcp://127.0.0.1:8000"),
            Ok((None, tcp("127.0.0.1:8000")))
        );
        assert_eq!(
            parse_listen("web=tcp://[::1]:80"),
            Ok((Some("web".into()), tcp("[::1]:80")))
        );
        assert_eq!(
            parse_listen("tcp://127.0.0.1:0"),
            Ok((None, tcp("127.0.0.1:0")))
        );
        assert_eq!(parse_listen("tcp://:80"), Ok((None, tcp("0.0.0.0:80"))));
        assert_eq!(
            parse_listen("tcp://localhost:80"),
            Ok((None, tcp("127.0.0.1:80")))
        );
        assert_eq!(
            parse_listen("dns=udp://0.0.0.0:53"),
            Ok((
                Some("dns".into()),
                ListenAddr::Udp("0.0.0.0:53".parse().unwrap())
            ))
        );
        assert_eq!(
            parse_listen("unix:/run/a.sock"),
            Ok((None, ListenAddr::Unix("/run/a.sock".into())))
        );
        assert_eq!(
            parse_listen("unix:///run/a.sock"),
            Ok((None, ListenAddr::Unix("/run/a.sock".into())))
        );
        let e = parse_listen("http://127.0.0.1:80").unwrap_err();
        assert!(e.contains("unknown scheme \"http\""), "{e}");
        let e = parse_listen("tcp://127.0.0.1").unwrap_err();
        assert!(e.contains("missing :PORT"), "{e}");
        let e = parse_listen("tcp://127.0.0.1:").unwrap_err();
        assert!(e.contains("missing port"), "{e}");
        let e = parse_listen("tcp://::1:80").unwrap_err();
        assert!(e.contains("brackets"), "{e}");
        let e = parse_listen("tcp://1.2.3.4:70000").unwrap_err();
        assert!(e.contains("0-65535"), "{e}");
        let e = parse_listen("unix:run/a.sock").unwrap_err();
        assert!(e.contains("absolute"), "{e}");
        let e = parse_listen("a:b=tcp://1.2.3.4:1").unwrap_err();
        assert!(e.contains("bad listen address"), "{e}");
        assert!(parse_listen("=tcp://1.2.3.4:1").is_err());
        assert!(parse_listen("127.0.0.1:80").is_err());
    }

    #[test]
    fn subcommands() {
        let sub = |a: &[&str]| {
            load(&Sources {
                args: args(a),
                env: vec![],
            })
            .unwrap()
        };
        match sub(&["status", "--json", "--control", "/run/x.sock"]) {
            Invocation::Status { control, json } => {
                assert_eq!(control, PathBuf::from("/run/x.sock"));
                assert!(json);
            }
            other => panic!("{other:?}"),
        }
        match sub(&["--control=/c.sock", "reload"]) {
            Invocation::Reload { control } => assert_eq!(control, PathBuf::from("/c.sock")),
            other => panic!("{other:?}"),
        }
        match sub(&["scale", "6", "--control", "/c.sock"]) {
            Invocation::Scale { workers, .. } => assert_eq!(workers, 6),
            other => panic!("{other:?}"),
        }
        // `--` makes it a program.
        match sub(&["--", "status"]) {
            Invocation::Run(c) => assert_eq!(c.command, vec!["status"]),
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(sub(&["--help"]), Invocation::Help(t) if t.contains("--worker-watchdog") && t.contains("78"))
        );
        assert!(matches!(sub(&["-V"]), Invocation::Version));
        assert!(err(&["scale"], &[]).contains("needs a worker count"));
        assert!(err(&["scale", "x"], &[]).contains("expected a positive integer"));
        assert!(err(&["status", "extra"], &[]).contains("unexpected argument"));
        assert!(err(&["status", "-w", "3"], &[]).contains("does not apply"));
        assert!(err(&["--json", "app"], &[]).contains("only applies"));
    }

    #[test]
    fn control_socket_resolution() {
        let e = env(&[
            ("RUNTIME_DIRECTORY", "/run/app:/run/other"),
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
        ]);
        assert_eq!(
            control_socket_path(Some(Path::new("/x.sock")), Some(Path::new("/rd")), None, &e),
            PathBuf::from("/x.sock")
        );
        assert_eq!(
            control_socket_path(None, Some(Path::new("/rd")), None, &e),
            PathBuf::from("/rd/control.sock")
        );
        assert_eq!(
            control_socket_path(None, None, None, &e),
            PathBuf::from("/run/app/control.sock")
        );
        let e = env(&[("XDG_RUNTIME_DIR", "/run/user/1000")]);
        let p = control_socket_path(None, None, Some(Path::new("/etc/sockvisor/web.toml")), &e);
        if nix::unistd::geteuid().is_root() {
            assert_eq!(p, PathBuf::from("/run/sockvisor/web.sock"));
        } else {
            assert_eq!(p, PathBuf::from("/run/user/1000/sockvisor/web.sock"));
            let p = control_socket_path(None, None, None, &[]);
            assert!(
                p.starts_with("/tmp/sockvisor-") && p.ends_with("sockvisor.sock"),
                "{p:?}"
            );
        }
        // The daemon and the client agree.
        let c = run(&["app"], &[("RUNTIME_DIRECTORY", "/run/q")]).unwrap();
        assert_eq!(c.control_socket, Some(PathBuf::from("/run/q/control.sock")));
    }

    #[test]
    fn example_config_loads() {
        let p = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/sockvisor.toml");
        let c = run(&["-c", p], &[]).unwrap();
        assert_eq!(c.workers, 4);
        assert_eq!(c.listeners.len(), 3);
        assert_eq!(c.ready, ReadyMode::Notify);
        assert_eq!(c.fatal_exit_codes, vec![78]);
    }

    #[test]
    fn edit_distance_works() {
        assert_eq!(edit_distance("wrkers", "workers"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(
            closest("stop_timout", KEYS.iter().copied()),
            Some("stop_timeout")
        );
        assert_eq!(closest("zzzz", KEYS.iter().copied()), None);
    }

    #[test]
    fn never_panics_on_junk() {
        let junk = [
            "",
            "=",
            "[[listen]]",
            "[[listen]]\nurl = 3",
            "listen = 5",
            "listen = [1]",
            "command = []",
            "command = \"\"",
            "workers = -1",
            "workers = 99999999999999999999",
            "workers = 1.5",
            "window = {}",
            "a.b.c = 1",
            "[listen]\nname = \"x\"",
            "stop_timeout = \"9999999999999999h\"",
            "min_ready = \"all\"",
            "\u{0}",
            "command = [\"a\"]\nlisten = [\"web=tcp://1.2.3.4:1\", \"web=udp://1.2.3.4:1\"]",
        ];
        for j in junk {
            let f = toml_file(j);
            let _ = load(&Sources {
                args: args(&["-c", f.path().to_str().unwrap(), "x"]),
                env: vec![],
            });
        }
        for a in [
            &["-"][..],
            &["--="],
            &["-l"],
            &["--listen="],
            &["-c"],
            &["-c="],
            &["--", ""],
            &["scale", "-1"],
            &["-é"],
        ] {
            let _ = load(&Sources {
                args: args(a),
                env: vec![],
            });
        }
    }

    #[test]
    fn never_panics_on_random_input() {
        // A deterministic LCG over TOML/CLI-ish fragments: bounded and reproducible.
        let frags = [
            "workers",
            "=",
            " ",
            "\n",
            "\"",
            "[[listen]]",
            "[",
            "]",
            "{",
            "}",
            ",",
            "1",
            "-1",
            "0x",
            "1.5",
            "s",
            "ms",
            "min",
            "tcp://",
            "udp://",
            "unix:",
            "[::1]",
            ":",
            "80",
            "name",
            "url",
            "dispatch",
            "shared",
            "command",
            "'",
            "#",
            "window",
            "min_ready",
            "all",
            "=web",
            "é",
            "\u{0}",
            "true",
            "listen",
            "--",
            "-w",
            "-l",
            "--listen=",
            "status",
            "scale",
            "-c",
        ];
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as usize
        };
        for _ in 0..3000 {
            let n = next() % 12;
            let text: String = (0..n).map(|_| frags[next() % frags.len()]).collect();
            let _ = file_layer(Path::new("fuzz.toml"), &text)
                .map(|l| resolve(l, None, PathBuf::from("/c")));
            let _ = parse_listen(&text);
            let _ = parse_duration(&text);
            let argv: Vec<OsString> = (0..n)
                .map(|_| OsString::from(frags[next() % frags.len()]))
                .collect();
            let _ = parse_cli(&argv);
        }
    }
}
