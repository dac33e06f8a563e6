//! The overlaid layers, validated into one [`Config`]: defaults from the table of keys, the
//! listeners' names and policies, the checks that involve more than one key, and the worker
//! limit.

use super::keys;
use super::layers::{At, Layer, Origin};
use super::values::{self, got, FromValue};
use super::{Backoff, Config, ConfigError, DispatchPolicy, ListenAddr, ListenerSpec};
use crate::cgroup::CpuLimit;
use std::path::PathBuf;
use std::time::Duration;

/// The most workers any fleet may have, whatever the fd limit: far above the cores of any
/// machine a single supervisor loop serves, and low enough that one bad `scale` cannot fork
/// the machine to a halt.
pub const WORKERS_CEILING: usize = 1024;

/// fds sockvisor keeps whatever the fleet's size: stdio, epoll, signalfd, timerfd, the notify
/// and control sockets and the control clients, the listeners, connections being accepted.
pub(crate) const RESERVED_FDS: u64 = 256;

/// The most workers a fleet with `dispatched_listeners` listeners sockvisor accepts on may
/// run under this process's fd limit: min([`WORKERS_CEILING`], what the hard
/// `RLIMIT_NOFILE` (sockvisor raises its soft limit to it) leaves after `RESERVED_FDS` (256)).
/// A worker costs sockvisor both ends of one channel per dispatched listener, and a reload
/// may briefly hold two generations. Used for `workers`, `SOCKVISOR_WORKERS`, `--workers`,
/// and by the supervisor for `scale` and SIGTTIN.
pub fn max_workers(dispatched_listeners: usize) -> usize {
    max_workers_within(fd_limit(), dispatched_listeners)
}

/// [`max_workers`] for a given fd limit.
pub(crate) fn max_workers_within(fd_limit: u64, dispatched_listeners: usize) -> usize {
    let per_worker = 2 * 2 * dispatched_listeners.max(1) as u64;
    let by_fds = fd_limit.saturating_sub(RESERVED_FDS) / per_worker;
    usize::try_from(by_fds)
        .unwrap_or(usize::MAX)
        .clamp(1, WORKERS_CEILING)
}

/// The hard `RLIMIT_NOFILE` (unlimited counts as `u64::MAX`).
fn fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, Resource};
    getrlimit(Resource::RLIMIT_NOFILE)
        .map(|(_, hard)| hard)
        .unwrap_or(u64::MAX)
}

/// An error when `workers` is more than [`max_workers`] allows, saying which bound applies
/// and the fix (no file or key: the caller knows where the count came from). For the
/// config and for the supervisor's `scale` and SIGTTIN.
pub fn check_worker_count(workers: usize, dispatched_listeners: usize) -> Result<(), ConfigError> {
    let limit = fd_limit();
    let max = max_workers_within(limit, dispatched_listeners);
    if workers <= max {
        return Ok(());
    }
    let (message, fix) = if max == WORKERS_CEILING {
        (
            format!("{workers} is more than the maximum of {max} workers"),
            "use fewer workers",
        )
    } else {
        (
            format!("{workers} is more than the {max} workers the fd limit of {limit} allows"),
            "use fewer workers, or raise the hard fd limit (LimitNOFILE=, ulimit -Hn)",
        )
    };
    Err(ConfigError {
        file: None,
        line: None,
        key: None,
        message,
        fix: Some(fix.to_string()),
    })
}

/// The table's default of `name` (a `Default::Value`), parsed by the key's own parser.
fn default_of<T: FromValue>(name: &str) -> T {
    let key = keys::by_name(name).map(|(_, k)| k);
    let parsed = match key.map(|k| (k.kind, k.default)) {
        Some((kind, keys::Default::Value(text))) => {
            values::parse(kind, text, &Origin::Cli("default".into())).ok()
        }
        _ => None,
    };
    match parsed.and_then(T::from_value) {
        Some(v) => v,
        None => panic!("config key `{name}` has no default of the type resolve reads"),
    }
}

/// The value of `name` from the layers, or the table's default.
fn value<T: FromValue>(layer: &mut Layer, name: &str) -> T {
    match layer.take(name) {
        Some(a) => a.v,
        None => default_of(name),
    }
}

pub(crate) fn resolve(
    mut layer: Layer,
    file: Option<PathBuf>,
    control: PathBuf,
) -> Result<Config, ConfigError> {
    let command = match layer.take::<Vec<String>>("command") {
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
    let dispatch: DispatchPolicy = value(&mut layer, "dispatch");
    let listeners = resolve_listeners(&mut layer, dispatch)?;

    // Listeners sockvisor accepts on cost fds per worker; with none configured, systemd's
    // sockets are not known yet: count one.
    let dispatched = listeners
        .iter()
        .filter(|l| l.policy != DispatchPolicy::Shared)
        .count();
    let (workers, workers_auto) = match layer.take::<Option<usize>>("workers") {
        Some(At { v: Some(v), at }) => {
            check_worker_count(v, dispatched)
                .map_err(|e| at.err("workers", e.message, e.fix.unwrap_or_default()))?;
            (v, None)
        }
        _ => {
            let limit = CpuLimit::of_this_process();
            let max = max_workers(dispatched);
            let n = limit.workers().min(max);
            let capped = if n < limit.workers() {
                format!(", capped at {max} by the fd limit")
            } else {
                String::new()
            };
            (n, Some(format!("{limit}{capped}")))
        }
    };

    let min_ready = match layer.take::<Option<usize>>("min_ready") {
        Some(At { v: Some(n), at }) if n > workers => {
            return Err(at.err(
                "min_ready",
                format!("min_ready = {n} is more than the {workers} workers"),
                "lower min_ready or raise workers",
            ))
        }
        Some(a) => a.v,
        None => default_of("min_ready"),
    };
    let min_healthy = match layer.take::<usize>("min_healthy") {
        Some(At { v, at }) if v > workers => {
            return Err(at.err(
                "min_healthy",
                format!("min_healthy = {v} is more than the {workers} workers"),
                "lower min_healthy or raise workers",
            ))
        }
        Some(a) => a.v,
        None => default_of("min_healthy"),
    };
    let initial: Duration = value(&mut layer, "restart_delay");
    let max = match layer.take::<Duration>("restart_delay_max") {
        Some(At { v, at }) if v < initial => {
            return Err(at.err(
                "restart_delay_max",
                format!("{v:?} is shorter than restart_delay = {initial:?}"),
                "make restart_delay_max at least restart_delay",
            ))
        }
        Some(a) => a.v,
        None => default_of::<Duration>("restart_delay_max").max(initial),
    };
    let canary = super::CanaryConfig {
        workers: value(&mut layer, "canary_workers"),
        share_permille: value::<Option<usize>>(&mut layer, "canary_share").map(|p| p as u32),
        by_client: value::<String>(&mut layer, "canary_by") == "client",
        observe: value(&mut layer, "canary_observe"),
    };
    let health_check = resolve_health_check(&mut layer)?;
    let control_socket_explicit = layer.is_set("control_socket");
    Ok(Config {
        file,
        command,
        workers,
        workers_auto,
        listeners,
        dispatch,
        ready: value(&mut layer, "ready"),
        notify_access: match value::<String>(&mut layer, "notify_access").as_str() {
            "all" => super::NotifyAccess::All,
            _ => super::NotifyAccess::Main,
        },
        ready_timeout: value(&mut layer, "ready_timeout"),
        stop_timeout: value(&mut layer, "stop_timeout"),
        backoff: Backoff {
            initial,
            max,
            reset_after: value(&mut layer, "restart_reset"),
            give_up_after: value(&mut layer, "give_up_after"),
        },
        fatal_exit_codes: layer
            .take("fatal_exit_codes")
            .map(|a| a.v)
            .unwrap_or_default(),
        user: layer.take("user").map(|a| a.v),
        group: layer.take("group").map(|a| a.v),
        worker_watchdog: value(&mut layer, "worker_watchdog"),
        min_ready,
        min_healthy,
        unhealthy_grace: value(&mut layer, "unhealthy_grace"),
        window: value(&mut layer, "window"),
        wedged_after: value(&mut layer, "wedged_after"),
        reload_surge: value(&mut layer, "reload_surge"),
        reload_timeout: value(&mut layer, "reload_timeout"),
        weight: value(&mut layer, "weight"),
        canary,
        health_check,
        drain_delay: value(&mut layer, "drain_delay"),
        worker_memory_max: value(&mut layer, "worker_memory_max"),
        metrics_listen: value(&mut layer, "metrics_listen"),
        control_socket: Some(control),
        control_socket_explicit,
        runtime_dir: layer.take("runtime_dir").map(|a| a.v),
        messages: value(&mut layer, "messages"),
    })
}

fn resolve_health_check(layer: &mut Layer) -> Result<Option<super::HealthCheck>, ConfigError> {
    let kind = match value::<String>(layer, "health_check").as_str() {
        "tcp" => super::CheckKind::Tcp,
        "http" => {
            let request: String = value(layer, "health_check_request");
            let status: usize = value(layer, "health_check_status");
            super::CheckKind::Http {
                request: request.trim().to_string(),
                status: status as u16,
            }
        }
        _ => return Ok(None),
    };
    let interval: Duration = value(layer, "health_check_interval");
    let timeout = match layer.take::<Duration>("health_check_timeout") {
        Some(At { v, at }) if v.is_zero() => {
            return Err(at.err(
                "health_check_timeout",
                "0 leaves no time for an answer".to_string(),
                "use a duration such as 2s",
            ))
        }
        Some(a) => a.v,
        None => default_of::<Duration>("health_check_timeout"),
    };
    if interval.is_zero() {
        return Err(ConfigError {
            file: None,
            line: None,
            key: Some("health_check_interval".into()),
            message: "0 is not an interval".into(),
            fix: Some("use a duration such as 5s".into()),
        });
    }
    Ok(Some(super::HealthCheck {
        kind,
        interval,
        timeout,
        passes: value(layer, "health_check_passes"),
        fails: value(layer, "health_check_fails"),
    }))
}

fn resolve_listeners(
    layer: &mut Layer,
    dispatch: DispatchPolicy,
) -> Result<Vec<ListenerSpec>, ConfigError> {
    let mut listeners: Vec<ListenerSpec> = Vec::new();
    let raws = layer
        .take::<Vec<super::layers::RawListener>>("listen")
        .map(|a| a.v)
        .unwrap_or_default();
    for raw in raws {
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
                "give each listener its own name, e.g. --listen web=tcp://127.0.0.1:8000 --listen admin=tcp://127.0.0.1:9000; a listener without NAME= is called tcp, udp or unix after its scheme",
            ));
        }
        let policy = match (&raw.addr, raw.policy) {
            (Some(ListenAddr::Udp(_)), Some(p)) if p.uses_channels() => {
                return Err(raw.at.err(
                    "listen",
                    format!(
                        "listener {} is UDP, but dispatch = {} hands over connections, which UDP does not have",
                        got(&name),
                        p.name()
                    ),
                    "remove its dispatch, or use auto, reuseport or shared",
                ))
            }
            (Some(ListenAddr::Unix(_)), Some(DispatchPolicy::Reuseport)) => {
                return Err(raw.at.err(
                    "listen",
                    format!("listener {} is a unix socket, which has no SO_REUSEPORT groups", got(&name)),
                    "remove its dispatch, or use shared or a channel policy (round-robin, ip-hash, least-connections)",
                ))
            }
            // A channel policy given for all listeners does not apply to datagrams.
            (Some(ListenAddr::Udp(_)), None) if dispatch.uses_channels() => DispatchPolicy::Shared,
            (_, Some(p)) => p,
            (_, None) => dispatch,
        };
        listeners.push(ListenerSpec {
            name,
            addr: raw.addr,
            policy,
        });
    }
    Ok(listeners)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::keys::KEYS;

    /// Every key's default parses with its own parser (what `--help` shows is what applies).

    #[test]
    fn every_default_value_parses() {
        for k in KEYS {
            if let keys::Default::Value(text) = k.default {
                let at = Origin::Cli("default".into());
                assert!(values::parse(k.kind, text, &at).is_ok(), "{}", k.name);
            }
        }
    }

    /// Issue 14 item 1: the limit follows the fd limit, and never passes the ceiling.
    #[test]
    fn max_workers_follows_the_fd_limit() {
        assert_eq!(max_workers_within(u64::MAX, 1), WORKERS_CEILING);
        assert_eq!(max_workers_within(1 << 20, 3), WORKERS_CEILING);
        // 512 fds: 256 reserved, 4 per worker with one dispatched listener.
        assert_eq!(max_workers_within(512, 0), 64);
        assert_eq!(max_workers_within(512, 1), 64);
        assert_eq!(max_workers_within(512, 2), 32);
        assert_eq!(max_workers_within(100, 1), 1);
        assert!(max_workers(1) >= 1 && max_workers(1) <= WORKERS_CEILING);
        assert!(check_worker_count(1, 1).is_ok());
        let e = check_worker_count(WORKERS_CEILING + 1, 1)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "1025 is more than the maximum of 1024 workers (use fewer workers)"
        );
    }
}
