//! The command line: the top layer, and the client commands (`status`, `reload`, `scale`).
//! Flags come from the table of keys; only `-c`, `-h`, `-V` and `--json` are not keys.

use super::keys::{self, KEYS};
use super::layers::{Layer, Origin, RawListener};
use super::resolve::WORKERS_CEILING;
use super::values::{got, is_port_spec, parse_count, parse_listen, Value, LISTEN_FORMS};
use super::{check_listener_name, ConfigError};
use std::ffi::OsString;
use std::path::PathBuf;

#[derive(Debug, Default)]
pub(crate) struct Cli {
    pub layer: Layer,
    pub config: Option<PathBuf>,
    pub help: bool,
    pub version: bool,
    pub sub: Option<Sub>,
}

#[derive(Debug)]
pub(crate) enum Sub {
    Status { json: bool },
    Reload { canary: Option<usize> },
    Scale { workers: usize },
}

fn usage(flag: &str, message: impl Into<String>, fix: impl Into<String>) -> ConfigError {
    Origin::Cli(flag.to_string()).err(flag, message, fix)
}

/// Every long flag, for "did you mean".
fn long_flags() -> Vec<&'static str> {
    let mut v: Vec<&str> = KEYS
        .iter()
        .flat_map(|k| k.flag.into_iter().chain(k.aliases.iter().copied()))
        .collect();
    v.extend(["--config", "--help", "--version", "--json", "--canary"]);
    v
}

pub(crate) fn parse_cli(args: &[OsString]) -> Result<Cli, ConfigError> {
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
    let mut canary: Option<usize> = None;
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
        let key = match flag.as_str() {
            "-h" | "--help" => {
                cli.help = true;
                continue;
            }
            "-V" | "--version" => {
                cli.version = true;
                continue;
            }
            "--canary" => {
                if sub_name.as_deref() != Some("reload") {
                    return Err(usage(
                        "--canary",
                        "only applies to `sockvisor reload`",
                        "use sockvisor reload --canary N",
                    ));
                }
                let n = inline.or_else(|| {
                    let v = strs.get(i).cloned();
                    i += 1;
                    v
                });
                let n = n.ok_or_else(|| {
                    usage(
                        "--canary",
                        "needs a worker count",
                        "use sockvisor reload --canary 1",
                    )
                })?;
                canary = Some(
                    parse_count(&n, 0, WORKERS_CEILING)
                        .map_err(|(m, f)| usage("--canary", m, f))?,
                );
                continue;
            }
            "--json" => {
                if sub_name.as_deref() != Some("status") {
                    return Err(usage(
                        "--json",
                        "only applies to `sockvisor status`",
                        "use sockvisor status --json",
                    ));
                }
                json = true;
                continue;
            }
            "-c" | "--config" => None,
            f => match keys::by_flag(f) {
                Some(k) => Some(k),
                None => {
                    let fix = match keys::closest(f, long_flags()) {
                        Some(c) => format!("did you mean {c}?"),
                        None => "see sockvisor --help; to run a program whose name starts with '-', put it after --".into(),
                    };
                    // The message names the flag: no `--flag:` in front of it.
                    return Err(ConfigError {
                        file: None,
                        line: None,
                        key: None,
                        message: format!("unknown option {flag}"),
                        fix: Some(fix),
                    });
                }
            },
        };
        let canonical = key.and_then(|k| k.flag).unwrap_or("--config");
        let value = match inline {
            Some(v) => v,
            None => match strs.get(i) {
                Some(v) => {
                    i += 1;
                    v.clone()
                }
                None => {
                    return Err(usage(
                        canonical,
                        "needs a value",
                        format!("give it as {canonical} VALUE or {canonical}=VALUE"),
                    ))
                }
            },
        };
        if sub_name.is_some() && !matches!(key.map(|k| k.name), None | Some("control_socket")) {
            return Err(usage(
                canonical,
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
            Some(k) if k.name == "listen" => {
                // Repeatable: each --listen adds one. A bare NAME (that is not a port) is a
                // listener only systemd provides (its type comes from the fd): `--listen web`
                // under a socket unit.
                let at = Origin::Cli(canonical.to_string());
                let listener = match parse_listen(&value) {
                    Ok((name, addr)) => RawListener::new(name, Some(addr), at),
                    Err(_)
                        if !is_port_spec(&value) && check_listener_name(value.trim()).is_ok() =>
                    {
                        RawListener::new(Some(value.trim().to_string()), None, at)
                    }
                    Err(m) => return Err(usage(canonical, m, LISTEN_FORMS)),
                };
                listen.push(listener);
            }
            Some(k) => cli
                .layer
                .set_str(k.name, &value, &Origin::Cli(canonical.to_string()))?,
        }
    }
    if let Some(first) = listen.first() {
        let at = first.at.clone();
        cli.layer.set("listen", Value::Listeners(listen), at);
    }
    if let Some(cmd) = command.filter(|c| !c.is_empty()) {
        cli.layer.set(
            "command",
            Value::Command(cmd),
            Origin::Cli("COMMAND".into()),
        );
    }
    cli.sub = match sub_name.as_deref() {
        None => None,
        Some("status") => Some(Sub::Status { json }),
        Some("reload") => Some(Sub::Reload { canary }),
        Some(_) => {
            let n = scale_n.ok_or_else(|| {
                usage(
                    "scale",
                    "needs a worker count",
                    "use sockvisor scale N, e.g. sockvisor scale 4",
                )
            })?;
            // The fleet checks its own limit (which depends on its fd limit); the client
            // refuses what no fleet could take.
            let workers =
                parse_count(&n, 1, WORKERS_CEILING).map_err(|(m, f)| usage("scale", m, f))?;
            Some(Sub::Scale { workers })
        }
    };
    Ok(cli)
}
