//! The table of configuration keys: the one place a key is declared.
//!
//! Each row gives the TOML name, the `SOCKVISOR_*` variable, the flag, the value's kind (which
//! picks its parser), the default, the `--help` line and the docs/config.md line. The file,
//! environment and command-line layers, `--help` and the reference table in docs/config.md are
//! all produced from these rows (a test fails when the doc is stale). Adding a key is one row
//! here, plus its field in [`super::Config`] and the line of `resolve` that fills it.

/// What a key's value is; picks the parser in `values` and the TOML shapes `layers` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A whole number in `min..=max`.
    Count { min: usize, max: usize },
    /// A whole number >= 1, or `all` (no limit).
    CountOrAll,
    /// A whole number >= 1, or `auto` (worked out at start).
    CountOrAuto,
    /// A size in bytes (`512M`, `1G`, `65536`), or `none`/`off`/`0` for none.
    OptBytes,
    /// A systemd-style duration.
    Duration,
    /// A duration, or `none`/`off`/`0` for none.
    OptDuration,
    /// A non-empty string.
    Text,
    /// A non-empty path.
    Path,
    /// A TCP address to listen on (`tcp://HOST:PORT`, `HOST:PORT`, `PORT`), or `off`.
    OptTcp,
    /// A dispatch policy name.
    Policy,
    /// `exec` or `notify`.
    Ready,
    /// One of these words.
    Choice(&'static [&'static str]),
    /// A percentage (`10%`, `12.5`, kept in tenths of a percent), or `none`.
    OptPercent,
    /// On or off: a TOML boolean, or `true`/`false`, `yes`/`no`, `on`/`off`, `1`/`0`. Its
    /// flag may be given without a value (`--messages` is `--messages=true`).
    Switch,
    /// Exit codes 0-255: a TOML array of integers, or a comma-separated list.
    ExitCodes,
    /// A program and its arguments: a TOML array of strings, or a string split on whitespace.
    Command,
    /// Listeners: `[[listen]]` tables, or `[NAME=]URL` strings (comma-separated in one string).
    Listen,
}

/// A key's value when no layer sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Default {
    /// This value, parsed by the key's own parser (so what `--help` shows is what applies).
    Value(&'static str),
    /// Not set; the text says what that means.
    Unset(&'static str),
    /// Worked out by `resolve`; the text says how.
    Computed(&'static str),
    /// There is no default: the key must be given.
    Required,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Key {
    /// The TOML key.
    pub name: &'static str,
    /// `SOCKVISOR_` + the name in upper case.
    pub env: &'static str,
    /// `--` + the name with dashes; `None` for the positional command.
    pub flag: Option<&'static str>,
    pub short: Option<char>,
    /// Other spellings of the flag that are accepted.
    pub aliases: &'static [&'static str],
    /// What the value is called in `--help`: `N`, `DUR`, ...
    pub arg: &'static str,
    pub kind: Kind,
    pub default: Default,
    /// The `--help` line (wrapped when printed; the default is appended).
    pub help: &'static str,
    /// The "meaning" column of docs/config.md (Markdown).
    pub doc: &'static str,
}

const BASE: Key = Key {
    name: "",
    env: "",
    flag: None,
    short: None,
    aliases: &[],
    arg: "",
    kind: Kind::Text,
    default: Default::Unset("none"),
    help: "",
    doc: "",
};

const N: Kind = Kind::Count {
    min: 1,
    max: usize::MAX,
};

/// Every configuration key, in the order `--help` and docs/config.md list them.
pub(crate) const KEYS: &[Key] = &[
    Key {
        name: "command",
        env: "SOCKVISOR_COMMAND",
        arg: "COMMAND ARGS...",
        kind: Kind::Command,
        default: Default::Required,
        help: "the program to run and its arguments",
        doc: "the worker program and its arguments: an array of strings, or a string split on whitespace",
        ..BASE
    },
    Key {
        name: "workers",
        env: "SOCKVISOR_WORKERS",
        flag: Some("--workers"),
        short: Some('w'),
        arg: "N|auto",
        kind: Kind::CountOrAuto,
        default: Default::Value("auto"),
        help: "number of workers; auto: the CPUs of the affinity mask, at most the cgroup's \
               CPU quota rounded up",
        doc: "number of workers, >= 1 and at most the [maximum](#maximum-worker-count); `auto`: the CPUs of sockvisor's affinity mask, lowered to its cgroup's CPU quota rounded up (v2 `cpu.max`, v1 `cpu.cfs_quota_us`), at least 1; the log says what was found ([Worker count](#worker-count))",
        ..BASE
    },
    Key {
        name: "listen",
        env: "SOCKVISOR_LISTEN",
        flag: Some("--listen"),
        short: Some('l'),
        arg: "[NAME=]URL",
        kind: Kind::Listen,
        default: Default::Unset("none"),
        help: "listen on URL, repeatable; URL is tcp://HOST:PORT, udp://HOST:PORT or \
               unix:/PATH (HOST: IPv4, [IPv6], localhost, or empty for all IPv4 interfaces; \
               port 0 lets the kernel choose), or PORT or :PORT for TCP on all addresses, \
               IPv6 and IPv4 (as systemd's ListenStream=PORT). NAME (what workers see in \
               LISTEN_FDNAMES, and the FileDescriptorName= of the socket unit) defaults to \
               the scheme: tcp, udp, unix; a NAME alone is a socket systemd passes. Used \
               only when not socket-activated; replaces the config file's listeners",
        doc: "listeners, see [Listeners](#listeners)",
        ..BASE
    },
    Key {
        name: "dispatch",
        env: "SOCKVISOR_DISPATCH",
        flag: Some("--dispatch"),
        arg: "POLICY",
        kind: Kind::Policy,
        default: Default::Value("auto"),
        help: "auto (reuseport where it can run, else shared) | reuseport | shared \
               (any program); round-robin | ip-hash | least-connections (workers that \
               speak the channel protocol, TCP/unix only)",
        doc: "default policy of every listener. Any program serves under `auto` (`reuseport` where it can run, else `shared`, saying why in the log and in `status`), `reuseport` (the kernel sends each new connection to the next ready worker, each UDP flow to one worker; needs CAP_BPF or CAP_SYS_ADMIN, Linux 5.14 and the socket's uid) and `shared` (the workers accept on one socket; the kernel picks who wakes up); `round-robin`, `ip-hash`, `least-connections` need workers that speak the channel protocol (streams only). See [Dispatch policies](#dispatch-policies)",
        ..BASE
    },
    Key {
        name: "ready",
        env: "SOCKVISOR_READY",
        flag: Some("--ready"),
        arg: "MODE",
        kind: Kind::Ready,
        default: Default::Value("exec"),
        help: "exec: ready once exec'd (a failed exec is never ready) | notify: ready at the worker's READY=1 on NOTIFY_SOCKET",
        doc: "a worker is ready once its `execve` succeeded (`exec`, as systemd's `Type=exec`), or at its `READY=1` (`notify`)",
        ..BASE
    },
    Key {
        name: "notify_access",
        env: "SOCKVISOR_NOTIFY_ACCESS",
        flag: Some("--notify-access"),
        arg: "WHO",
        kind: Kind::Choice(&["main", "all"]),
        default: Default::Value("main"),
        help: "main: a worker's notifications count from its own pid only | all: also from \
               its descendants (systemd's NotifyAccess=)",
        doc: "whose notifications count for a worker: `main` (the worker's own pid) or `all` (also any process descended from it, as systemd's `NotifyAccess=all`; see docs/health.md)",
        ..BASE
    },
    Key {
        name: "ready_timeout",
        env: "SOCKVISOR_READY_TIMEOUT",
        flag: Some("--ready-timeout"),
        arg: "DUR",
        kind: Kind::Duration,
        default: Default::Value("30s"),
        help: "time a worker has to get ready",
        doc: "time a worker has to get ready",
        ..BASE
    },
    Key {
        name: "stop_timeout",
        env: "SOCKVISOR_STOP_TIMEOUT",
        flag: Some("--stop-timeout"),
        arg: "DUR",
        kind: Kind::Duration,
        default: Default::Value("10s"),
        help: "SIGTERM to SIGKILL delay when stopping",
        doc: "SIGTERM to SIGKILL delay when stopping workers",
        ..BASE
    },
    Key {
        name: "restart_delay",
        env: "SOCKVISOR_RESTART_DELAY",
        flag: Some("--restart-delay"),
        arg: "DUR",
        kind: Kind::Duration,
        default: Default::Value("100ms"),
        help: "first restart delay of a slot",
        doc: "first restart delay of a slot; doubles on each failure",
        ..BASE
    },
    Key {
        name: "restart_delay_max",
        env: "SOCKVISOR_RESTART_DELAY_MAX",
        flag: Some("--restart-delay-max"),
        arg: "DUR",
        kind: Kind::Duration,
        default: Default::Value("10s"),
        help: "cap of the doubling restart delay",
        doc: "cap of the restart delay (>= `restart_delay`)",
        ..BASE
    },
    Key {
        name: "restart_reset",
        env: "SOCKVISOR_RESTART_RESET",
        flag: Some("--restart-reset"),
        arg: "DUR",
        kind: Kind::Duration,
        default: Default::Value("10s"),
        help: "uptime that resets a slot's backoff",
        doc: "uptime after which a slot's backoff starts over",
        ..BASE
    },
    Key {
        name: "give_up_after",
        env: "SOCKVISOR_GIVE_UP_AFTER",
        flag: Some("--give-up-after"),
        arg: "N",
        kind: Kind::Count {
            min: 1,
            max: u32::MAX as usize,
        },
        default: Default::Value("5"),
        help: "give up (exit 69) once every slot failed N times in a row",
        doc: "the fleet gives up (exit 69) when every slot failed this many times in a row",
        ..BASE
    },
    Key {
        name: "fatal_exit_codes",
        env: "SOCKVISOR_FATAL_EXIT_CODES",
        flag: Some("--fatal-exit-codes"),
        arg: "LIST",
        kind: Kind::ExitCodes,
        default: Default::Unset("none"),
        help: "worker exit codes that are not restarted, comma-separated",
        doc: "worker exit codes (0-255) that are not restarted, e.g. `[78]`",
        ..BASE
    },
    Key {
        name: "user",
        env: "SOCKVISOR_USER",
        flag: Some("--user"),
        arg: "USER",
        kind: Kind::Text,
        default: Default::Unset("none"),
        help: "run workers as USER",
        doc: "run workers as this user",
        ..BASE
    },
    Key {
        name: "group",
        env: "SOCKVISOR_GROUP",
        flag: Some("--group"),
        arg: "GROUP",
        kind: Kind::Text,
        default: Default::Unset("none"),
        help: "run workers with group GROUP",
        doc: "run workers with this group",
        ..BASE
    },
    Key {
        name: "worker_watchdog",
        env: "SOCKVISOR_WORKER_WATCHDOG",
        flag: Some("--worker-watchdog"),
        arg: "DUR",
        kind: Kind::OptDuration,
        default: Default::Value("none"),
        help: "WATCHDOG_USEC given to workers; a worker that stops sending WATCHDOG=1 is killed",
        doc: "`WATCHDOG_USEC` given to workers; a worker that stops sending `WATCHDOG=1` is killed. `none`, `off` or `0` disable it",
        ..BASE
    },
    Key {
        name: "min_ready",
        env: "SOCKVISOR_MIN_READY",
        flag: Some("--min-ready"),
        arg: "N|all",
        kind: Kind::CountOrAll,
        default: Default::Value("all"),
        help: "ready workers needed for READY=1",
        doc: "ready workers needed before `READY=1` is sent to systemd; a number <= `workers`, or `all`",
        ..BASE
    },
    Key {
        name: "min_healthy",
        env: "SOCKVISOR_MIN_HEALTHY",
        flag: Some("--min-healthy"),
        arg: "N",
        kind: Kind::Count {
            min: 0,
            max: usize::MAX,
        },
        default: Default::Value("1"),
        help: "ready workers needed for WATCHDOG=1",
        doc: "ready workers needed for `WATCHDOG=1`; 0..=`workers`",
        ..BASE
    },
    Key {
        name: "unhealthy_grace",
        env: "SOCKVISOR_UNHEALTHY_GRACE",
        flag: Some("--unhealthy-grace"),
        arg: "DUR",
        kind: Kind::Duration,
        default: Default::Value("30s"),
        help: "time below min-healthy before WATCHDOG=trigger",
        doc: "time below `min_healthy` before `WATCHDOG=trigger`",
        ..BASE
    },
    Key {
        name: "window",
        env: "SOCKVISOR_WINDOW",
        flag: Some("--window"),
        arg: "N",
        kind: N,
        default: Default::Value("64"),
        help: "connections queued per worker",
        doc: "connections that may wait in one worker's channel, >= 1",
        ..BASE
    },
    Key {
        name: "wedged_after",
        env: "SOCKVISOR_WEDGED_AFTER",
        flag: Some("--wedged-after"),
        arg: "DUR",
        kind: Kind::Duration,
        default: Default::Value("30s"),
        help: "a worker whose queue does not move for DUR is unhealthy",
        doc: "a worker whose queue does not move for this long is unhealthy",
        ..BASE
    },
    Key {
        name: "reload_surge",
        env: "SOCKVISOR_RELOAD_SURGE",
        flag: Some("--reload-surge"),
        arg: "N",
        kind: N,
        default: Default::Value("1"),
        help: "extra workers during a reload",
        doc: "extra workers a reload may run at once, >= 1",
        ..BASE
    },
    Key {
        name: "reload_timeout",
        env: "SOCKVISOR_RELOAD_TIMEOUT",
        flag: Some("--reload-timeout"),
        arg: "DUR",
        kind: Kind::Duration,
        default: Default::Value("60s"),
        help: "time a new generation has to get ready before it is rolled back",
        doc: "time a new generation has to get ready before it is rolled back",
        ..BASE
    },
    Key {
        name: "weight",
        env: "SOCKVISOR_WEIGHT",
        flag: Some("--weight"),
        arg: "N",
        kind: Kind::Count { min: 1, max: 1000 },
        default: Default::Value("1"),
        help: "weight of this generation's workers in (smooth weighted) round robin",
        doc: "weight of each worker of this generation in smooth weighted round robin (`round-robin` and `reuseport`; 1..=1000). Workers of one generation share evenly; during a reload or a canary the old and new generations share by their weights. See docs/canary.md",
        ..BASE
    },
    Key {
        name: "canary_workers",
        env: "SOCKVISOR_CANARY_WORKERS",
        flag: Some("--canary-workers"),
        arg: "N",
        kind: Kind::Count {
            min: 0,
            max: usize::MAX,
        },
        default: Default::Value("0"),
        help: "reloads start with N canary workers of the new generation (0: plain reload; \
               sockvisor reload --canary N overrides)",
        doc: "a reload (SIGHUP, `systemctl reload`, `sockvisor reload`) starts with this many canary workers of the new generation beside the old fleet, observes them, then promotes or rolls back; 0 is a plain reload. `sockvisor reload --canary N` overrides it for one reload. See docs/canary.md",
        ..BASE
    },
    Key {
        name: "canary_share",
        env: "SOCKVISOR_CANARY_SHARE",
        flag: Some("--canary-share"),
        arg: "PCT",
        kind: Kind::OptPercent,
        default: Default::Value("none"),
        help: "share of new connections the canary workers get together (none: by their \
               generation's weight)",
        doc: "share of new connections the canary workers get together, `10%` (0-100, tenths allowed); `none`: each canary worker weighs its generation's `weight` against the old workers' weights",
        ..BASE
    },
    Key {
        name: "canary_by",
        env: "SOCKVISOR_CANARY_BY",
        flag: Some("--canary-by"),
        arg: "HOW",
        kind: Kind::Choice(&["weight", "client"]),
        default: Default::Value("weight"),
        help: "weight: the canary's share by smooth weighted round robin | client: by client \
               address buckets (sticky; channel policies only)",
        doc: "how `canary_share` is applied: `weight` (smooth weighted round robin between canary and old workers) or `client` (a client address falls in one of 1000 buckets; the first `canary_share` of them go to the canary, so a client stays on one generation; needs a channel policy)",
        ..BASE
    },
    Key {
        name: "canary_observe",
        env: "SOCKVISOR_CANARY_OBSERVE",
        flag: Some("--canary-observe"),
        arg: "DUR",
        kind: Kind::Duration,
        default: Default::Value("60s"),
        help: "how long the canary serves before it is promoted",
        doc: "how long the ready canary serves its share before it is promoted; a crash, a watchdog/wedge/ready-timeout kill or a failed active health check meanwhile rolls it back",
        ..BASE
    },
    Key {
        name: "health_check",
        env: "SOCKVISOR_HEALTH_CHECK",
        flag: Some("--health-check"),
        arg: "KIND",
        kind: Kind::Choice(&["none", "tcp", "http"]),
        default: Default::Value("none"),
        help: "active health check of every worker: none | tcp (connect) | http (request \
               line, expected status)",
        doc: "active health check of each worker, through a connection that reaches it alone (docs/health.md): `none`, `tcp` (the connection is made) or `http` (`health_check_request` answered with `health_check_status`). Needs a channel policy or `reuseport` (TCP)",
        ..BASE
    },
    Key {
        name: "health_check_request",
        env: "SOCKVISOR_HEALTH_CHECK_REQUEST",
        flag: Some("--health-check-request"),
        arg: "LINE",
        kind: Kind::Text,
        default: Default::Value("GET / HTTP/1.1"),
        help: "HTTP request line of the http check (Host and Connection: close are added)",
        doc: "request line of the `http` check; `Host: localhost` and `Connection: close` are added",
        ..BASE
    },
    Key {
        name: "health_check_status",
        env: "SOCKVISOR_HEALTH_CHECK_STATUS",
        flag: Some("--health-check-status"),
        arg: "CODE",
        kind: Kind::Count { min: 100, max: 599 },
        default: Default::Value("200"),
        help: "status the http check expects",
        doc: "the status code the `http` check expects",
        ..BASE
    },
    Key {
        name: "health_check_interval",
        env: "SOCKVISOR_HEALTH_CHECK_INTERVAL",
        flag: Some("--health-check-interval"),
        arg: "DUR",
        kind: Kind::Duration,
        default: Default::Value("5s"),
        help: "time between checks of a worker",
        doc: "time from the start of one check of a worker to the next",
        ..BASE
    },
    Key {
        name: "health_check_timeout",
        env: "SOCKVISOR_HEALTH_CHECK_TIMEOUT",
        flag: Some("--health-check-timeout"),
        arg: "DUR",
        kind: Kind::Duration,
        default: Default::Value("2s"),
        help: "check time limit",
        doc: "a check not answered within this time fails (the next check starts `health_check_interval` after the start of the previous one, or when it ends if it took longer)",
        ..BASE
    },
    Key {
        name: "health_check_passes",
        env: "SOCKVISOR_HEALTH_CHECK_PASSES",
        flag: Some("--health-check-passes"),
        arg: "N",
        kind: Kind::Count { min: 1, max: 1000 },
        default: Default::Value("2"),
        help: "consecutive passes that put a failing worker back in the rotation",
        doc: "consecutive passes that put a worker back in the rotation after a failed check (one failure takes it out at once)",
        ..BASE
    },
    Key {
        name: "health_check_fails",
        env: "SOCKVISOR_HEALTH_CHECK_FAILS",
        flag: Some("--health-check-fails"),
        arg: "N",
        kind: Kind::Count { min: 1, max: 1000 },
        default: Default::Value("3"),
        help: "consecutive failures that replace a worker",
        doc: "consecutive failed checks after which the worker is replaced (SIGTERM, its slot restarts it)",
        ..BASE
    },
    Key {
        name: "messages",
        env: "SOCKVISOR_MESSAGES",
        flag: Some("--messages"),
        arg: "[=BOOL]",
        kind: Kind::Switch,
        default: Default::Value("false"),
        help: "give each worker a message socket (SOCKVISOR_MESSAGES_FD) for sockvisor send, \
               messages --follow and messages between workers",
        doc: "give each worker a message socket, announced by `SOCKVISOR_MESSAGES_FD` and not counted in `LISTEN_FDS`: `sockvisor send`, `sockvisor messages --follow`, messages between workers (docs/messages.md)",
        ..BASE
    },
    Key {
        name: "drain_delay",
        env: "SOCKVISOR_DRAIN_DELAY",
        flag: Some("--drain-delay"),
        arg: "DUR",
        kind: Kind::Duration,
        default: Default::Value("0s"),
        help: "on SIGTERM, keep serving this long with /readyz failing before stopping",
        doc: "on SIGTERM, `/readyz` fails at once and the fleet keeps serving for this long (so a balancer takes the endpoint out first), then stops as usual; SIGINT and SIGQUIT stop at once. See [docs/containers.md](containers.md)",
        ..BASE
    },
    Key {
        name: "worker_memory_max",
        env: "SOCKVISOR_WORKER_MEMORY_MAX",
        flag: Some("--worker-memory-max"),
        arg: "SIZE",
        kind: Kind::OptBytes,
        default: Default::Value("none"),
        help: "a worker whose RSS passes SIZE (512M, 1G) is replaced: a new one starts, \
               the old one drains once it is ready",
        doc: "a worker whose resident memory passes this size (`512M`, `1G`; powers of 1024) is recycled: a replacement starts, and once it is ready the old worker drains (SIGTERM). Checked every second. `none` disables it",
        ..BASE
    },
    Key {
        name: "metrics_listen",
        env: "SOCKVISOR_METRICS_LISTEN",
        flag: Some("--metrics-listen"),
        arg: "ADDR",
        kind: Kind::OptTcp,
        default: Default::Value("off"),
        help: "serve GET /metrics (Prometheus), /livez and /readyz over HTTP on ADDR \
               (tcp://HOST:PORT or :PORT)",
        doc: "serve `GET /metrics` (Prometheus text or OpenMetrics), `/livez` and `/readyz` on this TCP address (`tcp://127.0.0.1:9100`, `:9100`; port 0 picks one, logged). `off`: no HTTP listener. See [docs/metrics.md](metrics.md)",
        ..BASE
    },
    Key {
        name: "control_socket",
        env: "SOCKVISOR_CONTROL_SOCKET",
        flag: Some("--control"),
        aliases: &["--control-socket"],
        arg: "PATH",
        kind: Kind::Path,
        default: Default::Computed("see below"),
        help: "path of the control socket",
        doc: "path of the control socket",
        ..BASE
    },
    Key {
        name: "runtime_dir",
        env: "SOCKVISOR_RUNTIME_DIR",
        flag: Some("--runtime-dir"),
        arg: "DIR",
        kind: Kind::Path,
        default: Default::Unset("none"),
        help: "directory for the control socket (control.sock)",
        doc: "directory for the control socket (`control.sock`)",
        ..BASE
    },
];

/// A setting that is not a configuration key (it is read before the file, or by the logger),
/// listed in `--help` and docs/config.md next to the keys.
pub(crate) struct Setting {
    pub env: &'static str,
    /// The flag with its value, as `--help` shows it.
    pub flag: Option<&'static str>,
    /// Markdown, for docs/config.md.
    pub default: &'static str,
    pub help: &'static str,
}

pub(crate) const CONFIG_FILE: Setting = Setting {
    env: "SOCKVISOR_CONFIG",
    flag: Some("-c, --config FILE"),
    default: "none",
    help: "TOML config file",
};

pub(crate) const LOG_LEVEL: Setting = Setting {
    env: "SOCKVISOR_LOG",
    flag: None,
    default: "`info`",
    help: "log level (error, warn, info, debug, trace)",
};

/// `SOCKVISOR_*` variables that are not configuration keys (read elsewhere, or set by
/// sockvisor for its workers): no "unknown variable" warning for them.
pub(crate) const ENV_NOT_KEYS: &[&str] = &[
    CONFIG_FILE.env,
    LOG_LEVEL.env,
    "SOCKVISOR_WORKER_ID",
    crate::messages::MESSAGES_FD_VAR,
];

/// Keys of one `[[listen]]` table.
pub(crate) const LISTEN_KEYS: &[&str] = &["name", "url", "dispatch"];

pub(crate) fn by_name(name: &str) -> Option<(usize, &'static Key)> {
    KEYS.iter().enumerate().find(|(_, k)| k.name == name)
}

/// The key a flag sets: its long form, `-X` for its short form, or an alias.
pub(crate) fn by_flag(flag: &str) -> Option<&'static Key> {
    let short = match flag.strip_prefix('-').map(|s| s.chars()) {
        Some(mut c) => c.next().filter(|_| c.next().is_none()),
        None => None,
    };
    KEYS.iter().find(|k| {
        k.flag == Some(flag) || k.aliases.contains(&flag) || (short.is_some() && k.short == short)
    })
}

pub(crate) fn names() -> impl Iterator<Item = &'static str> {
    KEYS.iter().map(|k| k.name)
}

/// Levenshtein distance (small strings only: keys and flags).
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
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
pub(crate) fn closest<'a, I: IntoIterator<Item = &'a str>>(
    word: &str,
    candidates: I,
) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(2);
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// The names follow one rule, so a row cannot drift from it by a typo: the variable is
    /// `SOCKVISOR_` + the name in upper case, the flag `--` + the name with dashes (one
    /// exception, `--control`, which is shorter); names, variables, flags are unique.
    #[test]
    fn rows_follow_the_naming_rule() {
        let mut seen = HashSet::new();
        for k in KEYS {
            assert_eq!(k.env, format!("SOCKVISOR_{}", k.name.to_ascii_uppercase()));
            match (k.name, k.flag) {
                ("command", None) | ("control_socket", Some("--control")) => {}
                (name, flag) => {
                    assert_eq!(flag, Some(format!("--{}", name.replace('_', "-")).as_str()))
                }
            }
            assert!(!k.help.is_empty() && !k.doc.is_empty(), "{}", k.name);
            assert!(!k.arg.is_empty(), "{}", k.name);
            for s in [Some(k.name), Some(k.env), k.flag]
                .into_iter()
                .flatten()
                .chain(k.aliases.iter().copied())
            {
                assert!(seen.insert(s.to_string()), "{s} twice");
            }
            if let Some(c) = k.short {
                assert!(seen.insert(format!("-{c}")), "-{c} twice");
                assert!(!matches!(c, 'c' | 'h' | 'V'), "-{c} is taken");
            }
        }
    }

    #[test]
    fn lookups() {
        assert_eq!(
            by_name("window").map(|(_, k)| k.env),
            Some("SOCKVISOR_WINDOW")
        );
        assert_eq!(by_flag("-w").map(|k| k.name), Some("workers"));
        assert_eq!(
            by_flag("--control-socket").map(|k| k.name),
            Some("control_socket")
        );
        assert!(by_flag("--command").is_none() && by_flag("-x").is_none());
    }

    #[test]
    fn edit_distance_works() {
        assert_eq!(edit_distance("wrkers", "workers"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(closest("stop_timout", names()), Some("stop_timeout"));
        assert_eq!(closest("zzzz", names()), None);
    }
}
