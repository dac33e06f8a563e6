//! The command line: the top layer, and the client commands (`status`, `reload`, `scale`,
//! `signal`, `send`, `messages`). Flags come from the table of keys; only `-c`, `-h`, `-V`
//! and the client commands' own (`--json`, `--slot`, `--generation`, `--follow`) are not
//! keys.

use super::keys::{self, KEYS};
use super::layers::{Layer, Origin, RawListener};
use super::resolve::WORKERS_CEILING;
use super::values::{got, is_port_spec, parse_count, parse_listen, Value, LISTEN_FORMS};
use super::{check_listener_name, ConfigError};
use crate::control::WorkerSignal;
use std::ffi::OsString;
use std::path::PathBuf;

#[derive(Debug, Default)]
pub(crate) struct Cli {
    pub layer: Layer,
    pub config: Option<PathBuf>,
    pub help: bool,
    pub version: bool,
    pub sub: Option<Sub>,
    /// A client command's fleet name (`sockvisor status myapp`).
    pub fleet: Option<String>,
}

#[derive(Debug)]
pub(crate) enum Sub {
    Status {
        json: bool,
        check: bool,
    },
    Reload {
        canary: Option<usize>,
    },
    Scale {
        workers: usize,
    },
    Signal {
        signal: String,
        slot: Option<usize>,
        generation: Option<u64>,
    },
    Send {
        slot: Option<usize>,
        payload: String,
    },
    Messages {
        json: bool,
    },
    Metrics,
}

/// The client commands, and the flags of their own each takes (with a value, but
/// `--json`, `--check` and `--follow`). Each takes a fleet NAME first (`sockvisor status
/// myapp`, `sockvisor scale myapp 4`; control::locate finds it).
const SUBCOMMANDS: &[(&str, &[&str])] = &[
    ("status", &["--json", "--check"]),
    ("reload", &["--canary"]),
    ("scale", &[]),
    ("signal", &["--slot", "--generation"]),
    ("send", &["--slot"]),
    ("messages", &["--follow", "--json"]),
    ("metrics", &[]),
];

/// The client commands whose last word is their argument (`scale N`, `signal SIGNAL`,
/// `send PAYLOAD`); a word before it is the fleet's NAME.
fn takes_argument(sub: &str) -> bool {
    matches!(sub, "scale" | "signal" | "send")
}

fn sub_flags(sub: &str) -> &'static [&'static str] {
    SUBCOMMANDS
        .iter()
        .find(|(name, _)| *name == sub)
        .map_or(&[], |(_, flags)| *flags)
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
    v.extend(["--config", "--help", "--version"]);
    v.extend(
        SUBCOMMANDS
            .iter()
            .flat_map(|(_, flags)| flags.iter().copied()),
    );
    v
}

/// A flag's value: given inline (`--flag=VALUE`), or the next argument (taken).
fn flag_value(
    inline: Option<String>,
    args: &[String],
    next: &mut usize,
    flag: &str,
    example: String,
) -> Result<String, ConfigError> {
    if let Some(v) = inline {
        return Ok(v);
    }
    let v = args
        .get(*next)
        .ok_or_else(|| usage(flag, "needs a value", example))?;
    *next += 1;
    Ok(v.clone())
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
    // A client command's words: [NAME], then the argument of `scale N`, `signal SIGNAL`,
    // `send PAYLOAD`.
    let mut sub_words: Vec<String> = Vec::new();
    let words_max = |sub: &str| if takes_argument(sub) { 2 } else { 1 };
    let mut json = false;
    let mut check = false;
    let mut canary: Option<usize> = None;
    let mut follow = false;
    let mut slot: Option<usize> = None;
    let mut generation: Option<u64> = None;
    let mut command: Option<Vec<String>> = None;
    while i < strs.len() {
        let arg = strs[i].clone();
        i += 1;
        if arg == "--" {
            match sub_name.as_deref() {
                None => command = Some(strs[i..].to_vec()),
                // `send -- -PAYLOAD`: what follows is the argument, even if it starts with -.
                Some(s) if takes_argument(s) && sub_words.len() < 2 && i < strs.len() => {
                    sub_words.push(strs[i].clone());
                    i += 1;
                    continue;
                }
                Some(_) => {}
            }
            if i < strs.len() && sub_name.is_some() {
                return Err(usage(
                    sub_name.as_deref().unwrap_or(""),
                    format!("unexpected argument {}", got(&strs[i])),
                    "see sockvisor --help",
                ));
            }
            break;
        }
        if !arg.starts_with('-') || arg == "-" {
            match (&sub_name, arg.as_str()) {
                (None, s) if SUBCOMMANDS.iter().any(|(name, _)| *name == s) => {
                    sub_name = Some(arg);
                    continue;
                }
                (None, _) => {
                    command = Some(strs[i - 1..].to_vec());
                    break;
                }
                (Some(s), _) if sub_words.len() < words_max(s) => {
                    sub_words.push(arg);
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
            f @ ("--json" | "--check" | "--follow" | "--slot" | "--generation" | "--canary") => {
                let Some(sub) = sub_name.as_deref().filter(|s| sub_flags(s).contains(&f)) else {
                    let takers: Vec<String> = SUBCOMMANDS
                        .iter()
                        .filter(|(_, flags)| flags.contains(&f))
                        .map(|(name, _)| format!("`sockvisor {name}`"))
                        .collect();
                    return Err(usage(
                        f,
                        format!("only applies to {}", takers.join(" and ")),
                        "see sockvisor --help",
                    ));
                };
                match f {
                    "--json" => json = true,
                    "--check" => check = true,
                    "--follow" => follow = true,
                    _ => {
                        let example = format!("give it as {f} N, e.g. sockvisor {sub} {f} 0");
                        let value = flag_value(inline, &strs, &mut i, f, example)?;
                        // A canary of more workers than any fleet may have is refused here.
                        let max = if f == "--canary" {
                            WORKERS_CEILING
                        } else {
                            usize::MAX
                        };
                        let n = parse_count(&value, 0, max).map_err(|(m, x)| usage(f, m, x))?;
                        match f {
                            "--slot" => slot = Some(n),
                            "--canary" => canary = Some(n),
                            _ => generation = Some(n as u64),
                        }
                    }
                }
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
        let switch = key.is_some_and(|k| k.kind == keys::Kind::Switch);
        let value = match inline {
            // `--messages` alone turns it on (`--messages=false` turns it off).
            None if switch => "true".to_string(),
            inline => {
                let example = format!("give it as {canonical} VALUE or {canonical}=VALUE");
                flag_value(inline, &strs, &mut i, canonical, example)?
            }
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
    // `scale [NAME] N`, `signal [NAME] SIGNAL`, `send [NAME] PAYLOAD`; the others [NAME].
    let sub_arg = match sub_name.as_deref() {
        Some(s) if takes_argument(s) => sub_words.pop(),
        _ => None,
    };
    cli.fleet = sub_words.pop();
    cli.sub = match sub_name.as_deref() {
        None => None,
        Some("status") => Some(Sub::Status { json, check }),
        Some("reload") => Some(Sub::Reload { canary }),
        Some("signal") => {
            let signal = sub_arg.ok_or_else(|| {
                usage(
                    "signal",
                    "needs a signal",
                    "use sockvisor signal SIGNAL [--slot N | --generation G], e.g. sockvisor signal SIGUSR1",
                )
            })?;
            // Checked here too, so that a typo is reported before anything is sent.
            WorkerSignal::parse(&signal).map_err(|m| usage("signal", m, ""))?;
            Some(Sub::Signal {
                signal,
                slot,
                generation,
            })
        }
        Some("send") => {
            let payload = sub_arg.ok_or_else(|| {
                usage(
                    "send",
                    "needs a payload",
                    "use sockvisor send [--slot N] PAYLOAD, e.g. sockvisor send --slot 0 reopen-logs",
                )
            })?;
            if payload.len() > crate::messages::wire::MAX_PAYLOAD {
                return Err(usage(
                    "send",
                    crate::messages::wire::TooLarge(payload.len()).to_string(),
                    "send less, or split it into several messages",
                ));
            }
            Some(Sub::Send { slot, payload })
        }
        Some("messages") => {
            if !follow {
                return Err(usage(
                    "messages",
                    "needs --follow (it prints the messages workers send to the operator as they come; the counters are in sockvisor status)",
                    "use sockvisor messages --follow",
                ));
            }
            Some(Sub::Messages { json })
        }
        Some("metrics") => Some(Sub::Metrics),
        Some(_) => {
            let n = sub_arg.ok_or_else(|| {
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
